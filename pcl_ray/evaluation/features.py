"""Turning images into feature matrices for evaluation, one block at a time.

Feature matrices are the largest objects of an evaluation (1.28M x 2048 float32 = 10 GB for the
ImageNet training split), so every function here writes each block of outputs straight into one
preallocated array instead of collecting blocks in a list and concatenating them at the end, which
holds every feature twice at the moment of the concatenation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch

__all__ = ["embed", "embed_many", "eval_device", "raw_pixel_features", "raw_pixel_matrix"]


def eval_device() -> torch.device:
    """Where evaluation runs its forward passes: the GPU when this process sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def raw_pixel_features(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Flatten uint8 images ``(N, C, H, W)`` into float32 ``(N, C*H*W)`` features in ``[0, 1]``.

    This is the "no learning" baseline that every representation should beat.
    """
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images (N, C, H, W), got shape {x.shape}")
    out = x.reshape(x.shape[0], -1).astype(np.float32)
    np.divide(out, np.float32(255.0), out=out)  # in place: one float copy of the images, not two
    return out


def raw_pixel_matrix(blocks: Iterable[torch.Tensor], total: int) -> np.ndarray:
    """:func:`raw_pixel_features` of ``total`` images arriving in uint8 blocks, without stacking them first.

    Only the float32 result is allocated at full size; each block is converted into its rows.
    """
    out: np.ndarray | None = None
    filled = 0
    for block in blocks:
        rows = raw_pixel_features(block)
        if out is None:
            out = np.empty((total, rows.shape[1]), dtype=np.float32)
        if filled + rows.shape[0] > total:
            raise ValueError(f"raw_pixel_matrix got more than the {total} images announced")
        out[filled : filled + rows.shape[0]] = rows
        filled += rows.shape[0]
    if out is None or filled != total:
        raise ValueError(f"raw_pixel_matrix expected {total} images, got {filled}")
    return out


def embed_many(
    model_fn: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    batches: Iterable[torch.Tensor],
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model_fn`` over ``batches`` without gradients; stack each named output into one array.

    Args:
        model_fn: maps a batch to ``{name: (B, d_name) features}`` (on any device; the rows are
            copied to the CPU block by block).
        batches: the batches, in the order the rows should appear.
        total: the number of rows all batches add up to. When given, each output array is
            allocated once at its final size and filled block by block (peak memory: the features
            once plus one block); when None, the blocks are kept and concatenated at the end.

    Returns:
        ``{name: float32 (rows, d_name)}`` on the CPU.
    """
    out: dict[str, np.ndarray] = {}
    parts: dict[str, list[np.ndarray]] = {}
    filled = 0
    with torch.no_grad():
        for batch in batches:
            named = model_fn(batch)
            rows = None
            for name, value in named.items():
                block = value.detach().to("cpu", torch.float32).numpy()
                rows = block.shape[0] if rows is None else rows
                if block.shape[0] != rows:
                    raise ValueError(f"embed: output {name!r} has {block.shape[0]} rows, expected {rows}")
                if total is None:
                    parts.setdefault(name, []).append(block)
                    continue
                if name not in out:
                    out[name] = np.empty((total, *block.shape[1:]), dtype=np.float32)
                if filled + rows > total:
                    raise ValueError(f"embed: the batches hold more than the {total} rows announced")
                out[name][filled : filled + rows] = block
            filled += rows or 0
    if filled == 0:
        raise ValueError("embed() got no batches")
    if total is None:
        return {name: np.concatenate(blocks, axis=0) for name, blocks in parts.items()}
    if filled != total:
        raise ValueError(f"embed: expected {total} rows, the batches held {filled}")
    return out


def embed(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    total: int | None = None,
) -> np.ndarray:
    """Run ``model_fn`` over ``batches`` without gradients and stack the outputs.

    Args:
        model_fn: maps a float batch ``(B, ...)`` to features ``(B, d)``; moving the
            batch to the model's device and switching the model to eval mode are
            the caller's business (wrap it in a lambda if needed).
        batches: iterable of float batches, in the order the rows should appear.
        total: the number of rows, when known: the result is then filled in place
            (see :func:`embed_many`).

    Returns:
        float32 ``(sum of B, d)`` array on the CPU.
    """
    return embed_many(lambda b: {"x": model_fn(b)}, batches, total)["x"]
