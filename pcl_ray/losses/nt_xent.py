"""SimCLR's NT-Xent (normalized-temperature cross-entropy) with in-batch negatives.

Pure: tensors in, tensors out (no state, no Ray, no ``torch.distributed``). The caller
gathers the embeddings of every worker (with a gradient-carrying all-gather such as
``torch.distributed.nn.functional.all_gather``) and passes them as ``z_a_all`` / ``z_b_all``
together with the offset of its own rows in the global batch.

Conventions: ``z_a`` and ``z_b`` are ``(B, d)`` L2-normalized embeddings of two views of
the same ``B`` images (row ``i`` of each is the same image). For a global batch of ``N``
images (``N = B`` on one process) each of the ``2B`` local rows is contrasted against all
``2N`` gathered rows except itself: one positive (the other view of the same image) and
``2N - 2`` negatives, exactly as in the SimCLR paper (Chen et al., 2020, eq. 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["nt_xent"]


def _check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}")


def nt_xent(
    z_a: torch.Tensor,
    z_b: torch.Tensor,
    temperature: float,
    *,
    z_a_all: torch.Tensor | None = None,
    z_b_all: torch.Tensor | None = None,
    rank_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """NT-Xent over the local rows ``[z_a; z_b]`` against the (gathered) global batch.

    Args:
        z_a, z_b: ``(B, d)`` local embeddings of the two views.
        temperature: τ > 0; logits are cosine similarities divided by τ.
        z_a_all, z_b_all: ``(N, d)`` embeddings of the two views gathered from every worker
            in rank order (both or neither); ``None`` means a single process (``N = B``).
        rank_offset: index of this worker's first row in ``z_a_all`` (``rank * B``).

    Logits have shape ``(2B, 2N)``; their columns are ``[z_a_all; z_b_all]``. The local row
    ``i`` of view a has its positive in column ``N + rank_offset + i`` (the same image in
    view b), the local row ``i`` of view b in column ``rank_offset + i``; a row's own
    column is masked with ``-inf`` so it is neither positive nor negative. The loss is the
    mean cross-entropy over the ``2B`` rows, so averaging it over workers gives the loss of
    the whole global batch.

    Returns ``(loss, logits, targets)``.
    """
    _check_2d("z_a", z_a)
    _check_2d("z_b", z_b)
    if z_b.shape != z_a.shape:
        raise ValueError(f"z_b must have the same shape as z_a {tuple(z_a.shape)}, got {tuple(z_b.shape)}")
    if (z_a_all is None) != (z_b_all is None):
        raise ValueError("pass both z_a_all and z_b_all (gathered form) or neither (single process)")
    if not float(temperature) > 0.0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z_a_all is None:
        z_a_all, z_b_all, rank_offset = z_a, z_b, 0
    _check_2d("z_a_all", z_a_all)
    _check_2d("z_b_all", z_b_all)
    if z_b_all.shape != z_a_all.shape or z_a_all.shape[1] != z_a.shape[1]:
        raise ValueError(
            f"z_a_all and z_b_all must both have shape (N, {z_a.shape[1]}), "
            f"got {tuple(z_a_all.shape)} and {tuple(z_b_all.shape)}"
        )
    b, n = z_a.shape[0], z_a_all.shape[0]
    if not 0 <= rank_offset <= n - b:
        raise ValueError(f"rank_offset must lie in [0, {n - b}] (N={n}, B={b}), got {rank_offset}")

    queries = torch.cat([z_a, z_b])  # (2B, d)
    keys = torch.cat([z_a_all, z_b_all]).to(queries.dtype)  # (2N, d)
    logits = queries @ keys.t() / temperature  # (2B, 2N) cosine similarities / τ

    rows = torch.arange(2 * b, device=queries.device)  # (2B,)
    own = torch.arange(b, device=queries.device) + rank_offset  # this worker's images, global ids
    self_cols = torch.cat([own, own + n])  # (2B,): each local row's own column
    targets = torch.cat([own + n, own])  # (2B,): each row's positive, the other view of its image
    logits = logits.index_put((rows, self_cols), logits.new_tensor(float("-inf")))  # (2B, 2N), self masked
    return F.cross_entropy(logits, targets), logits, targets
