"""The learning-rate schedule."""

from __future__ import annotations

import math


def lr_at(cfg, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Cosine (per step, from ``train.lr`` to 0 over ``train.epochs``) or step (x0.1 at each ``train.lr_steps``)."""
    t = cfg.train
    if t.schedule == "cosine":
        progress = (epoch + step / steps_per_epoch) / t.epochs
        return t.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return t.lr * (0.1 ** sum(epoch >= s for s in t.lr_steps))
