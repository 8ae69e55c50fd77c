"""SwAV: Sinkhorn-Knopp codes and the swapped-prediction loss (Caron et al., 2020).

Pure: tensors in, tensors out. The distributed part of Sinkhorn (the prototype marginal
is taken over the *global* batch) is injected as an ``all_reduce`` callable, so the same
function runs on one process, inside DDP workers, and in tests that simulate several ranks.

Conventions: ``scores`` are ``(B, K)`` dot products between L2-normalized embeddings and
L2-normalized prototypes (cosine similarities in ``[-1, 1]``). With unnormalized features
or prototypes the scores grow, ``exp(scores / ε)`` overflows and the reference Sinkhorn
returns NaN (a known trap); this implementation works in the log domain and stays finite
for any finite scores, but the method must still normalize both sides, or ε loses its
meaning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["AllReduce", "sinkhorn", "swapped_prediction_loss"]

#: ``all_reduce(tensor, op) -> tensor``: reduce ``tensor`` over every worker with ``op``
#: (``"sum"`` or ``"max"``) and return the result (it may work in place).
AllReduce = Callable[[torch.Tensor, str], torch.Tensor]


def _global_row_logsumexp(log_q: torch.Tensor, all_reduce: AllReduce | None) -> torch.Tensor:
    """``log Σ_b exp(log_q[k, b])`` over the columns of every worker, stably (``(K, 1)``)."""
    m = log_q.amax(dim=1, keepdim=True)
    if all_reduce is not None:
        m = all_reduce(m, "max")
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # a row of -inf stays -inf below
    s = torch.exp(log_q - m).sum(dim=1, keepdim=True)
    if all_reduce is not None:
        s = all_reduce(s, "sum")
    return m + torch.log(s)


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float,
    iterations: int,
    *,
    world_size: int = 1,
    all_reduce: AllReduce | None = None,
) -> torch.Tensor:
    """Soft codes by the Sinkhorn-Knopp algorithm of SwAV's ``distributed_sinkhorn``.

    ``Q = exp(scores / ε)ᵀ`` (``K × B_global``) is alternately rescaled so that every
    prototype (row) holds mass ``1/K`` and every sample (column) mass ``1/B_global``,
    ``iterations`` times, ending with the column step; the codes are ``B_global · Qᵀ``,
    whose rows sum to 1. The row sums run over the global batch: ``world_size`` workers
    each hold ``B`` columns (equal ``B`` on every worker) and ``all_reduce`` combines their
    partial reductions; with ``all_reduce=None`` the batch is this process's only.

    Differences from the reference, neither of which changes the result in exact
    arithmetic: the iterations run on ``log Q`` with max-subtracted log-sum-exps (no
    overflow or 0/0 for large scores or small ε), and the reference's first normalization
    by the total sum is skipped (the row step that follows absorbs any global scale).

    Args:
        scores: ``(B, K)`` local scores (detached; computed in at least float32).
        epsilon: entropic regularization ε > 0 (SwAV: 0.05).
        iterations: Sinkhorn iterations ≥ 1 (SwAV: 3).
        world_size: number of workers whose columns ``all_reduce`` combines.
        all_reduce: ``(tensor, op) -> tensor`` with ``op`` in ``{"sum", "max"}``; required
            when ``world_size > 1``.

    Returns the ``(B, K)`` codes of the local rows (each row sums to 1).
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D (batch, prototypes) tensor, got {getattr(scores, 'shape', scores)}")
    if not float(epsilon) > 0.0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size > 1 and all_reduce is None:
        raise ValueError(f"world_size={world_size} needs an all_reduce callable to combine the workers' columns")

    dtype = torch.promote_types(scores.dtype, torch.float32)
    log_q = scores.detach().to(dtype).t() / epsilon  # (K, B)
    num_prototypes = log_q.shape[0]
    log_k = math.log(num_prototypes)
    log_b = math.log(log_q.shape[1] * world_size)
    for _ in range(iterations):
        # rows: every prototype gets total mass 1/K over the global batch
        log_q = log_q - _global_row_logsumexp(log_q, all_reduce) - log_k
        # columns: every sample gets total mass 1/B (local: one column is one sample)
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) - log_b
    return torch.exp(log_q + log_b).t()


def swapped_prediction_loss(
    scores_per_crop: Sequence[torch.Tensor],
    codes_per_large_crop: Sequence[torch.Tensor],
    temperature: float,
) -> torch.Tensor:
    """SwAV's swapped prediction: predict each large crop's code from every other crop.

    ``codes_per_large_crop[i]`` holds the codes of crop ``i`` (the large crops come first
    in ``scores_per_crop``). For each such ``i`` the sub-loss is the mean over the other
    crops ``v`` of ``-mean_b Σ_k q_i[b, k] · log softmax(scores_v[b] / τ)[k]``; the loss is
    the mean of the sub-losses, as in the reference ``swav`` training loop.

    Args:
        scores_per_crop: one ``(B, K)`` score tensor per crop (gradients flow through these).
        codes_per_large_crop: one ``(B, K)`` code tensor per large crop (targets; detached).
        temperature: τ > 0 (SwAV: 0.1).

    Returns the scalar loss.
    """
    n_crops, n_codes = len(scores_per_crop), len(codes_per_large_crop)
    if n_codes < 1 or n_crops < 2 or n_codes > n_crops:
        raise ValueError(
            f"need at least 2 crops and 1..n_crops code tensors, got {n_crops} crops and {n_codes} codes"
        )
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = scores_per_crop[0].shape
    for name, group in (("scores_per_crop", scores_per_crop), ("codes_per_large_crop", codes_per_large_crop)):
        for j, t in enumerate(group):
            if t.dim() != 2 or t.shape != shape:
                raise ValueError(f"{name}[{j}] must have shape {tuple(shape)}, got {tuple(t.shape)}")

    log_p = [F.log_softmax(s / temperature, dim=1) for s in scores_per_crop]
    total = scores_per_crop[0].new_zeros(())
    for i, q in enumerate(codes_per_large_crop):
        q = q.detach().to(log_p[0].dtype)
        sub = sum(-(q * log_p[v]).sum(dim=1).mean() for v in range(n_crops) if v != i)
        total = total + sub / (n_crops - 1)
    return total / n_codes
