"""Batch iteration over an :class:`~pcl_ray.data.dataset.IndexedImages` and index sharding.

Every batch carries the dataset indices of its images (``int64``), the join key between
the E-step and the M-step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from .dataset import IndexedImages

__all__ = ["iterate_batches", "shard_indices"]

IndexLike = Sequence[int] | np.ndarray | torch.Tensor


def shard_indices(
    n: int,
    rank: int,
    world_size: int,
    *,
    seed: int | None = None,
    even: bool = False,
) -> np.ndarray:
    """The dataset indices owned by ``rank`` out of ``world_size``.

    By default ``arange(n)[rank::world_size]``: across ranks every index appears exactly
    once, with no padding duplicates (shards differ in length by at most one). This is the
    sharding the E-step needs, since each index must be embedded once.

    Args:
        seed: when given, the indices are permuted with this seed before striding (pass
            ``seed + epoch`` for DistributedSampler-like reshuffling across ranks).
        even: truncate every shard to ``n // world_size`` indices, so that all ranks run the
            same number of steps (DDP needs that in the M-step); drops at most
            ``world_size - 1`` indices.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    order = np.arange(n, dtype=np.int64)
    if seed is not None:
        order = np.random.default_rng(seed).permutation(order)
    shard = order[rank::world_size]
    if even:
        shard = shard[: n // world_size]
    return shard


def _as_index_array(indices: IndexLike | None, n: int) -> np.ndarray:
    if indices is None:
        return np.arange(n, dtype=np.int64)
    if isinstance(indices, torch.Tensor):
        indices = indices.detach().cpu().numpy()
    arr = np.asarray(indices, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise IndexError(f"indices must lie in [0, {n}), got range [{arr.min()}, {arr.max()}]")
    return arr


def iterate_batches(
    ds: IndexedImages,
    indices: IndexLike | None,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool,
    loader_workers: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(uint8 N×C×H×W images, int64 N dataset indices)`` over ``indices``.

    Args:
        ds: the split.
        indices: the dataset indices to visit (e.g. this rank's shard); None means all.
        batch_size: images per batch.
        shuffle: visit ``indices`` in a random order drawn from ``seed`` (deterministic:
            the caller passes ``seed + epoch`` to reshuffle every epoch).
        drop_last: drop the final short batch.
        loader_workers: ``DataLoader`` worker processes for lazily decoded sets.

    In-memory sets are sliced directly from ``ds.tensor`` (no ``DataLoader``, no copies
    beyond the gathered batch); lazy sets go through a ``DataLoader`` over a ``Subset``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    order = _as_index_array(indices, len(ds))
    if shuffle:
        order = order[np.random.default_rng(seed).permutation(len(order))]
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    order = order[:stop]
    if ds.tensor is not None:
        tensor = ds.tensor
        order_t = torch.from_numpy(order)
        for start in range(0, stop, batch_size):
            idx = order_t[start : start + batch_size]
            yield tensor.index_select(0, idx), idx
        return
    loader = DataLoader(
        Subset(ds, order.tolist()),
        batch_size=batch_size,
        shuffle=False,  # the order is already drawn above
        drop_last=False,  # already truncated above
        num_workers=loader_workers,
        persistent_workers=False,
    )
    for images, idx in loader:
        yield images, idx.to(torch.int64)
