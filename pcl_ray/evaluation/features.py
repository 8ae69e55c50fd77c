"""Turning images into feature matrices for evaluation."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

__all__ = ["embed", "raw_pixel_features"]


def raw_pixel_features(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Flatten uint8 images ``(N, C, H, W)`` into float32 ``(N, C*H*W)`` features in ``[0, 1]``.

    This is the "no learning" baseline that every representation should beat.
    """
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images (N, C, H, W), got shape {x.shape}")
    return x.reshape(x.shape[0], -1).astype(np.float32) / np.float32(255.0)


def embed(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
) -> np.ndarray:
    """Run ``model_fn`` over ``batches`` without gradients and stack the outputs.

    Args:
        model_fn: maps a float batch ``(B, ...)`` to features ``(B, d)``; moving the
            batch to the model's device and switching the model to eval mode are
            the caller's business (wrap it in a lambda if needed).
        batches: iterable of float batches, in the order the rows should appear.

    Returns:
        float32 ``(sum of B, d)`` array on the CPU.
    """
    outputs: list[np.ndarray] = []
    with torch.no_grad():
        for batch in batches:
            out = model_fn(batch)
            outputs.append(out.detach().float().cpu().numpy())
    if not outputs:
        raise ValueError("embed() got no batches")
    return np.concatenate(outputs, axis=0)
