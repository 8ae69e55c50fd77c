"""Pure losses of the clustering family: DeepCluster-v2 and SPCL (no state, no Ray, no config objects).

- :func:`prototype_ce`: cross-entropy of ``softmax(z·Pᵀ/τ)`` against k-means pseudo-labels, with an
  ignore index for unassigned samples (DeepCluster-v2, facebookresearch/swav ``main_deepclusterv2.py``).
- :func:`symmetric_ce`: ``α·CE + β·RCE`` (Wang et al. 2019, "Symmetric Cross Entropy for Robust Learning
  with Noisy Labels"), SPCL's option for its prototypical cross-entropy on noisy pseudo-labels.
- :func:`pair_bce`: binary cross-entropy on pair logits (SPCL's siamese metric loss).
- :func:`balanced_pairs`: sample index pairs, half same-cluster and half different-cluster.

Conventions: ``targets`` are int64 class ids, ``ignore_index`` marks samples without a pseudo-label;
a loss over zero valid rows is an exact 0 that still depends on the inputs (so a backward pass
reaches every parameter, as DistributedDataParallel requires). Randomness comes only from the
``generator`` argument.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["RCE_LABEL_FLOOR", "balanced_pairs", "pair_bce", "prototype_ce", "symmetric_ce"]

#: Reverse CE clamps the one-hot label at this floor before its log (Wang et al. 2019: A = log 1e-4).
RCE_LABEL_FLOOR = 1e-4


def _check_targets(targets: torch.Tensor, rows: int) -> None:
    if not isinstance(targets, torch.Tensor) or targets.dim() != 1 or targets.shape[0] != rows:
        shape = tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be a 1-D tensor of {rows} class ids, got {shape}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got dtype {targets.dtype}")


def _zero_like_graph(t: torch.Tensor) -> torch.Tensor:
    """An exact 0 that stays connected to ``t``'s graph (empty batches, all rows ignored)."""
    return t.sum() * 0.0


def prototype_ce(
    z: torch.Tensor,
    prototypes: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int = -1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``softmax(z·Pᵀ/τ)`` against pseudo-labels ``targets`` (DeepCluster-v2).

    ``z`` is ``(B, d)``, ``prototypes`` ``(k, d)`` (rows are usually L2-normalized centroids), ``targets``
    ``(B,)`` in ``[0, k)`` or ``ignore_index``. Rows labelled ``ignore_index`` are left out of the mean.

    Returns ``(loss, logits)`` with ``logits = z·Pᵀ/τ`` of shape ``(B, k)``.
    """
    if z.dim() != 2 or prototypes.dim() != 2 or prototypes.shape[1] != z.shape[1]:
        raise ValueError(f"z (B, d) and prototypes (k, d) must share d, got {tuple(z.shape)} and "
                         f"{tuple(prototypes.shape)}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_targets(targets, z.shape[0])
    logits = z @ prototypes.to(z.dtype).t() / temperature  # (B, k)
    # Mean over the labelled rows as sum / count: an exact 0 (in the graph) when every row is ignored, and
    # no host sync to find that out.
    kept = (targets != ignore_index).sum().clamp_min(1)  # 0-d
    total = F.cross_entropy(logits, targets.long(), ignore_index=ignore_index, reduction="sum")  # 0-d
    return total / kept, logits


def symmetric_ce(
    logits: torch.Tensor,
    targets: torch.Tensor,
    alpha: float,
    beta: float,
    ignore_index: int = -1,
) -> torch.Tensor:
    """Symmetric cross-entropy ``α·CE + β·RCE`` (Wang et al. 2019), mean over rows not ``ignore_index``.

    ``RCE = −Σ_c p_c · log(max(onehot_c, 1e-4))`` with ``p = softmax(logits)``: for one row this is
    ``−log(1e-4) · (1 − p_target)``, a bounded loss that is robust to wrong pseudo-labels.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D (B, k), got shape {tuple(logits.shape)}")
    _check_targets(targets, logits.shape[0])
    # Means over the labelled rows as masked sums / count: no boolean indexing (its size would need a host
    # sync), and an exact 0 in the graph when every row is ignored.
    keep = (targets != ignore_index).to(logits.dtype)  # (B,) 1 = labelled
    count = keep.sum().clamp_min(1)  # 0-d
    safe = torch.where(targets != ignore_index, targets, torch.zeros_like(targets)).long()  # (B,) in [0, k)
    ce = F.cross_entropy(logits, safe, reduction="none")  # (B,)
    one_hot = F.one_hot(safe, logits.shape[1]).to(logits.dtype).clamp_(min=RCE_LABEL_FLOOR)  # (B, k)
    rce = -(logits.softmax(dim=1) * one_hot.log()).sum(dim=1)  # (B,)
    return (alpha * (ce * keep).sum() + beta * (rce * keep).sum()) / count


def pair_bce(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of pair logits ``(P,)`` against ``same`` ``(P,)`` (1 = same cluster), mean over pairs."""
    if logits.dim() != 1 or same.shape != logits.shape:
        raise ValueError(f"logits and same must both have shape (P,), got {tuple(logits.shape)} and "
                         f"{tuple(same.shape)}")
    if logits.numel() == 0:
        return _zero_like_graph(logits)
    return F.binary_cross_entropy_with_logits(logits, same.to(logits.dtype))


def balanced_pairs(
    labels: torch.Tensor,
    num_pairs: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample ``num_pairs`` index pairs of a batch: half same-cluster, half different-cluster.

    ``labels`` is the ``(B,)`` pseudo-label of each batch row. Each half has ``num_pairs // 2`` pairs
    drawn with replacement: an anchor uniform among the eligible rows (rows whose cluster has another
    member, resp. rows whose cluster is not the whole batch), then a partner uniform among the other
    members of its cluster (resp. among the rows of other clusters); a row is never paired with itself.
    A half that is impossible (every row in its own cluster, or all rows in one cluster) is empty, so
    fewer pairs come back. Vectorized: one sort, no Python loop over rows.

    Returns ``(first, second, same)``: int64 row indices ``(P,)`` and a bool ``(P,)`` that is True
    exactly where ``labels[first] == labels[second]``; same-cluster pairs come first.
    """
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 0:
        raise ValueError(f"num_pairs must be an int >= 0, got {num_pairs!r}")
    device = labels.device
    sample_device = generator.device if generator is not None else device
    n, half = labels.shape[0], num_pairs // 2

    # Sorted by label, every cluster is a contiguous run [start, start + count) of `order`.
    order = torch.argsort(labels, stable=True)
    sorted_labels = labels[order]
    _, inverse, counts = torch.unique_consecutive(sorted_labels, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    count = counts[inverse]  # (n,) size of each sorted row's cluster
    start = starts[inverse]
    position = torch.arange(n, device=device) - start  # rank of the row inside its cluster

    def draw(eligible: torch.Tensor, bound: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``half`` anchors among ``eligible`` sorted positions, and a uniform draw in ``[0, bound[anchor])``."""
        candidates = eligible.nonzero().squeeze(1)
        if half == 0 or candidates.numel() == 0:
            empty = torch.empty(0, dtype=torch.long, device=device)
            return empty, empty
        pick = torch.randint(candidates.numel(), (half,), generator=generator, device=sample_device)
        anchor = candidates[pick.to(device)]
        u = torch.rand(half, generator=generator, device=sample_device, dtype=torch.float64).to(device)
        offset = (u * bound[anchor].double()).long().clamp_(max=bound[anchor] - 1)
        return anchor, offset

    # Same cluster: a partner among the count - 1 other members, skipping the anchor's own slot.
    a_same, r = draw(count >= 2, count - 1)
    b_same = start[a_same] + r + (r >= position[a_same]).long()
    # Different cluster: a partner among the n - count rows outside [start, start + count).
    a_diff, r = draw(count < n, n - count)
    b_diff = r + (r >= start[a_diff]).long() * count[a_diff]

    first = order[torch.cat([a_same, a_diff])]
    second = order[torch.cat([b_same, b_diff])]
    same = torch.cat([torch.ones_like(a_same, dtype=torch.bool), torch.zeros_like(a_diff, dtype=torch.bool)])
    return first, second, same
