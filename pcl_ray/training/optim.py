"""What the training loop builds once per run: the SGD optimizer and the model's speed options.

The worker loop and ``bench`` both call these, so a speed option measured by ``bench`` is the one the run uses
(``train.sgd_foreach``, ``train.channels_last``, ``train.compile``; README "Benchmarks").
"""

from __future__ import annotations

import torch
from torch import nn


def build_optimizer(cfg, params) -> torch.optim.SGD:
    """SGD with the run's lr, momentum, weight decay and ``train.sgd_foreach``."""
    return torch.optim.SGD([p for p in params if p.requires_grad], lr=cfg.train.lr,
                           momentum=cfg.train.sgd_momentum, weight_decay=cfg.train.weight_decay,
                           foreach=cfg.train.sgd_foreach)


def compile_enabled(cfg, device: torch.device | str) -> bool:
    """``train.compile``: ``on``/``off`` as asked; ``auto`` is off (not measured faster on CPU; no GPU measured)."""
    return cfg.train.compile == "on"


def channels_last_enabled(cfg, device: torch.device | str) -> bool:
    """``train.channels_last``: as asked; None (the default) is on, on the CPU as on a GPU (oneDNN's and cuDNN's
    convolutions both run faster in it; ``bench --parts mfu`` measures the speed-up on the run's own model)."""
    if cfg.train.channels_last is None:
        return True
    return bool(cfg.train.channels_last)


def prepare_model(method: nn.Module, cfg, device: torch.device | str) -> nn.Module:
    """Apply ``train.channels_last`` and ``train.compile`` to ``method`` in place (call once, after ``.to(device)``).

    Compiling uses ``nn.Module.compile`` on every encoder, so parameter names and checkpoints do not change.
    """
    from ..models.encoder import Encoder

    if channels_last_enabled(cfg, device):
        method.to(memory_format=torch.channels_last)
    if compile_enabled(cfg, device):
        for module in method.modules():
            if isinstance(module, Encoder):
                module.compile()
    return method


def prepare_views(views: list[torch.Tensor], cfg) -> list[torch.Tensor]:
    """The step's views in the model's memory format (each (B, C, H, W))."""
    if not views or not channels_last_enabled(cfg, views[0].device):
        return views
    return [v.contiguous(memory_format=torch.channels_last) for v in views]
