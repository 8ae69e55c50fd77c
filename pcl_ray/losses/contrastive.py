"""Pure contrastive loss functions (no state, no Ray, no config objects).

Tensors in, tensors out. The callers own the state (queue, momentum encoder,
prototypes); these functions only turn embeddings into logits, targets and a
cross-entropy loss, following the PCL reference implementation
(salesforce/PCL); docs/DESIGN.md, "ProtoNCE (PCL)", says where and why it differs.

Conventions: ``q`` and ``k`` are ``(B, d)`` L2-normalized embeddings, the
queue and the centroids are ``(K, d)`` / ``(k, d)`` L2-normalized rows, and
every loss is the mean cross-entropy over the batch. Gradients flow through
every tensor argument; detach keys / queue / prototypes at the call site when
they must not receive gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

__all__ = [
    "ProtoForm",
    "accuracy",
    "info_nce",
    "proto_nce",
    "proto_nce_multi",
    "resolve_proto_form",
    "sample_negative_clusters",
]

ProtoForm = Literal["auto", "sampled", "full"]
_FORMS = ("auto", "sampled", "full")
#: "auto" uses the sampled form only when k >= AUTO_FACTOR * (batch + negatives).
AUTO_FACTOR = 4


# --------------------------------------------------------------------------- #
# validation helpers
# --------------------------------------------------------------------------- #
def _check_2d(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (rows, dim), got shape {tuple(t.shape)}")


def _check_temperature(name: str, value: float) -> None:
    if not float(value) > 0.0:  # also rejects NaN
        raise ValueError(f"{name} must be > 0, got {value}")


def _check_assignments(assignments: torch.Tensor, batch: int, num_clusters: int, values: bool = True) -> None:
    if not isinstance(assignments, torch.Tensor):
        raise ValueError(f"assignments must be a torch.Tensor, got {type(assignments).__name__}")
    if assignments.dim() != 1 or assignments.shape[0] != batch:
        raise ValueError(
            f"assignments must have shape ({batch},) to match q, got {tuple(assignments.shape)}"
        )
    if assignments.dtype.is_floating_point or assignments.dtype == torch.bool:
        raise ValueError(f"assignments must be an integer tensor, got dtype {assignments.dtype}")
    if batch and values:
        check_assignment_range(assignments, num_clusters)


def check_assignment_range(assignments: torch.Tensor, num_clusters: int, what: str = "assignments") -> None:
    """Every value of the non-empty integer tensor ``assignments`` lies in ``[0, num_clusters)`` (one device sync)."""
    lo, hi = (int(v) for v in torch.aminmax(assignments))
    if lo < 0 or hi >= num_clusters:
        raise ValueError(
            f"{what} must lie in [0, {num_clusters}) (the number of centroids), got values in [{lo}, {hi}]"
        )


# --------------------------------------------------------------------------- #
# instance level
# --------------------------------------------------------------------------- #
def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor | None,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MoCo InfoNCE.

    ``logits = [q·k, q·queueᵀ] / τ`` with shape ``(B, 1 + K)``; the positive is
    column 0, so ``targets`` is all zeros. ``queue`` may be ``None`` or have
    ``K = 0`` rows (then the loss is exactly 0).

    Returns ``(loss, logits, targets)``.
    """
    _check_2d("q", q)
    _check_2d("k", k)
    if k.shape != q.shape:
        raise ValueError(f"k must have the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}")
    if queue is None:
        queue = q.new_zeros((0, q.shape[1]))
    _check_2d("queue", queue)
    if queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"queue must have {q.shape[1]} columns (the embedding dim of q), got {tuple(queue.shape)}"
        )
    _check_temperature("temperature", temperature)

    l_pos = (q * k).sum(dim=1, keepdim=True)  # (B, 1)
    l_neg = q @ queue.to(q.dtype).t()  # (B, K)
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # (B, 1 + K)
    targets = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # (B,): the positive is column 0
    return F.cross_entropy(logits, targets), logits, targets


# --------------------------------------------------------------------------- #
# prototype level
# --------------------------------------------------------------------------- #
def resolve_proto_form(form: str, num_clusters: int, batch: int, num_negatives: int) -> str:
    """Return the ProtoNCE form that runs: ``"sampled"`` or ``"full"``.

    ``"auto"`` picks ``"sampled"`` (reference PCL) when there are many more
    clusters than the batch plus the negatives (``k >= 4 (B + r)``), and the
    paper's full maximum-likelihood softmax otherwise.
    """
    if form not in _FORMS:
        raise ValueError(f"form must be one of {_FORMS}, got {form!r}")
    if form != "auto":
        return form
    return "sampled" if num_clusters >= AUTO_FACTOR * (batch + num_negatives) else "full"


def sample_negative_clusters(
    assignments: torch.Tensor,
    num_clusters: int,
    num_negatives: int,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Sample ``num_negatives`` cluster ids among clusters no batch row is assigned to.

    Without replacement when at least ``num_negatives`` such clusters remain,
    with replacement when fewer remain. Raises ``ValueError`` when none remain
    (and ``num_negatives > 0``). Randomness comes only from ``generator``
    (``torch.randperm`` / ``torch.randint``), so a seeded generator makes the
    draw reproducible. Returns an int64 tensor on ``assignments.device``.
    """
    if num_negatives < 0:
        raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
    device = assignments.device
    if num_negatives == 0:
        return torch.empty(0, dtype=torch.long, device=device)
    sample_device = generator.device if generator is not None else device
    if num_clusters > assignments.shape[0]:  # at least one cluster is free: a draw with no host sync
        return _sample_free_clusters(assignments, num_clusters, num_negatives, generator, sample_device)
    free = torch.ones(num_clusters, dtype=torch.bool, device=device)
    free[assignments.long()] = False
    candidates = free.nonzero().squeeze(1)
    n_free = candidates.numel()
    if n_free == 0:
        raise ValueError(
            f"no negative prototypes left to sample: all {num_clusters} clusters are positives of "
            f"this batch; use form='full' (or 'auto'), more clusters, or a smaller batch"
        )
    if n_free >= num_negatives:
        idx = torch.randperm(n_free, generator=generator, device=sample_device)[:num_negatives]
    else:
        idx = torch.randint(n_free, (num_negatives,), generator=generator, device=sample_device)
    return candidates[idx.to(device)]


def _sample_free_clusters(assignments: torch.Tensor, num_clusters: int, num_negatives: int,
                          generator: torch.Generator | None, sample_device) -> torch.Tensor:
    """:func:`sample_negative_clusters` when more clusters exist than batch rows, without reading anything
    back to the host (the candidate count is data-dependent; ``nonzero`` would wait for the device).

    Uniform random keys, positives' keys set below every free one: the top ``r`` keys are ``r`` free
    clusters drawn uniformly without replacement. Slots that still hit a positive (fewer than ``r`` clusters
    are free) are refilled by draws with replacement among the free clusters.
    """
    device = assignments.device
    keys = torch.rand(num_clusters, generator=generator, device=sample_device).to(device)  # (k,) in [0, 1)
    keys[assignments.long()] = -1.0  # (k,): positives rank last
    top = keys.topk(min(num_negatives, num_clusters))  # (min(r, k),) distinct, free clusters first
    if num_negatives <= num_clusters - assignments.shape[0]:  # enough free clusters whatever the batch
        return top.indices
    free = (keys >= 0).to(sample_device, torch.float32)  # (k,) 1 = free; at least one
    refill = torch.multinomial(free, num_negatives, replacement=True, generator=generator).to(device)  # (r,)
    picked = top.indices.new_zeros(num_negatives)  # (r,)
    ok = torch.zeros(num_negatives, dtype=torch.bool, device=device)  # (r,)
    picked[: top.indices.shape[0]] = top.indices
    ok[: top.indices.shape[0]] = top.values >= 0
    return torch.where(ok, picked, refill)  # (r,)


def proto_nce(
    q: torch.Tensor,
    assignments: torch.Tensor,
    centroids: torch.Tensor,
    concentration: torch.Tensor,
    *,
    num_negatives: int,
    form: ProtoForm = "auto",
    generator: torch.Generator | None = None,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Prototype-level InfoNCE for one granularity.

    ``check_values=False`` skips the range check of ``assignments`` (a device sync per call); for callers
    that checked them once where they came from (PCL checks each E-step's hand-off).

    ``"sampled"`` (reference PCL): columns are the B positive prototypes
    ``centroids[assignments]`` (column i is row i's positive) followed by
    ``num_negatives`` prototypes of clusters not positive in this batch (see
    :func:`sample_negative_clusters`); targets are ``arange(B)``.

    ``"full"`` (the paper's maximum-likelihood form): columns are all k
    prototypes; targets are ``assignments``.

    In both forms column j is divided by the concentration φ of its cluster.
    ``"auto"`` chooses with :func:`resolve_proto_form`.

    Returns ``(loss, logits, targets, form_used)``.
    """
    _check_2d("q", q)
    _check_2d("centroids", centroids)
    batch, dim = q.shape
    num_clusters = centroids.shape[0]
    if centroids.shape[1] != dim:
        raise ValueError(
            f"centroids must have {dim} columns (the embedding dim of q), got {tuple(centroids.shape)}"
        )
    if not isinstance(concentration, torch.Tensor) or concentration.shape != (num_clusters,):
        shape = tuple(concentration.shape) if isinstance(concentration, torch.Tensor) else None
        raise ValueError(
            f"concentration must be a tensor of shape ({num_clusters},) (one φ per centroid), got {shape}"
        )
    _check_assignments(assignments, batch, num_clusters, values=check_values)
    if isinstance(num_negatives, bool) or not isinstance(num_negatives, int) or num_negatives < 0:
        raise ValueError(f"num_negatives must be an int >= 0, got {num_negatives!r}")
    form_used = resolve_proto_form(form, num_clusters, batch, num_negatives)

    centroids = centroids.to(q.dtype)
    concentration = concentration.to(q.dtype)
    assignments = assignments.long()
    if form_used == "full":
        logits = (q @ centroids.t()) / concentration  # (B, d) @ (d, k) / (k,) -> (B, k)
        targets = assignments  # (B,) in [0, k)
    else:
        neg = sample_negative_clusters(assignments, num_clusters, num_negatives, generator=generator)  # (r,)
        ids = torch.cat([assignments, neg])  # (B + r,): B positives, then r negatives
        logits = (q @ centroids[ids].t()) / concentration[ids]  # (B, d) @ (d, B + r) -> (B, B + r)
        targets = torch.arange(batch, dtype=torch.long, device=q.device)  # (B,): row i's positive is column i
    return F.cross_entropy(logits, targets), logits, targets, form_used


def proto_nce_multi(
    q: torch.Tensor,
    assignments_list: Sequence[torch.Tensor],
    centroids_list: Sequence[torch.Tensor],
    concentration_list: Sequence[torch.Tensor],
    **kw,
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]], list[str]]:
    """ProtoNCE averaged over granularities.

    Keyword arguments (``num_negatives``, ``form``, ``generator``) go to
    :func:`proto_nce` for every granularity.

    Returns ``(mean loss, [(logits, targets) per granularity], [form per granularity])``.
    """
    n = len(assignments_list)
    if n == 0:
        raise ValueError("assignments_list must hold at least one granularity")
    if len(centroids_list) != n or len(concentration_list) != n:
        raise ValueError(
            "assignments_list, centroids_list and concentration_list must have the same length, got "
            f"{n}, {len(centroids_list)}, {len(concentration_list)}"
        )
    losses, outputs, forms = [], [], []
    for assignments, centroids, concentration in zip(
        assignments_list, centroids_list, concentration_list, strict=True
    ):
        loss, logits, targets, form_used = proto_nce(q, assignments, centroids, concentration, **kw)
        losses.append(loss)
        outputs.append((logits, targets))
        forms.append(form_used)
    return torch.stack(losses).mean(), outputs, forms  # 0-d mean over the M granularities


# --------------------------------------------------------------------------- #
# metrics
# --------------------------------------------------------------------------- #
@torch.no_grad()
def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Top-1 accuracy of ``logits`` (B, C) against ``targets`` (B,), in percent."""
    _check_2d("logits", logits)
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must have shape ({logits.shape[0]},) to match logits, got {tuple(targets.shape)}"
        )
    if logits.shape[0] == 0:
        return 0.0
    return (logits.argmax(dim=1) == targets).float().mean().item() * 100.0
