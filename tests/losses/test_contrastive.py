"""Tests for pcl_ray.losses against hand-written per-row references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcl_ray.losses import (
    accuracy,
    info_nce,
    proto_nce,
    proto_nce_multi,
    resolve_proto_form,
    sample_negative_clusters,
)


# --------------------------------------------------------------------------- #
# helpers and references
# --------------------------------------------------------------------------- #
def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)


def log_softmax_row(row: list[float], target: int) -> float:
    """-log softmax(row)[target], computed with an explicit stable log-sum-exp."""
    m = max(row)
    lse = m + math.log(sum(math.exp(v - m) for v in row))
    return lse - row[target]


def ref_info_nce(q: np.ndarray, k: np.ndarray, queue: np.ndarray, tau: float) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        row = [float(np.dot(q[i], k[i])) / tau]
        row += [float(np.dot(q[i], queue[j])) / tau for j in range(queue.shape[0])]
        total += log_softmax_row(row, 0)
    return total / q.shape[0]


def ref_proto_full(q: np.ndarray, assign: np.ndarray, cents: np.ndarray, phi: np.ndarray) -> float:
    total = 0.0
    for i in range(q.shape[0]):
        row = [float(np.dot(q[i], cents[j])) / float(phi[j]) for j in range(cents.shape[0])]
        total += log_softmax_row(row, int(assign[i]))
    return total / q.shape[0]


def ref_proto_sampled(
    q: np.ndarray, assign: np.ndarray, neg: np.ndarray, cents: np.ndarray, phi: np.ndarray
) -> float:
    ids = list(assign) + list(neg)
    total = 0.0
    for i in range(q.shape[0]):
        row = [float(np.dot(q[i], cents[c])) / float(phi[c]) for c in ids]
        total += log_softmax_row(row, i)
    return total / q.shape[0]


def make_protos(k: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1000)
    phi = 0.05 + 0.5 * torch.rand(k, generator=g, dtype=torch.float64)  # distinct φ per cluster
    return unit(k, dim, seed), phi


# --------------------------------------------------------------------------- #
# info_nce
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("queue_len", [0, 1, 37])
def test_info_nce_matches_reference(queue_len: int) -> None:
    q, k, queue = unit(8, 16, 0), unit(8, 16, 1), unit(queue_len, 16, 2)
    loss, logits, targets = info_nce(q, k, queue, 0.2)
    assert logits.shape == (8, 1 + queue_len)
    assert targets.dtype == torch.long and torch.all(targets == 0)
    expected = ref_info_nce(q.numpy(), k.numpy(), queue.numpy(), 0.2)
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_info_nce_empty_queue_is_zero_and_none_allowed() -> None:
    q, k = unit(4, 8, 0), unit(4, 8, 1)
    loss, logits, _ = info_nce(q, k, None, 0.1)
    assert logits.shape == (4, 1)
    assert loss.item() == 0.0


def test_info_nce_gradient_finite() -> None:
    q = unit(6, 16, 0).float().requires_grad_()
    loss, _, _ = info_nce(q, unit(6, 16, 1).float(), unit(50, 16, 2).float(), 0.07)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_info_nce_shape_errors() -> None:
    q = unit(4, 8, 0)
    with pytest.raises(ValueError, match="k must"):
        info_nce(q, unit(3, 8, 1), unit(5, 8, 2), 0.2)
    with pytest.raises(ValueError, match="queue"):
        info_nce(q, unit(4, 8, 1), unit(5, 7, 2), 0.2)
    with pytest.raises(ValueError, match="q must be 2-D"):
        info_nce(q[0], unit(4, 8, 1)[0], unit(5, 8, 2), 0.2)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(q, unit(4, 8, 1), unit(5, 8, 2), 0.0)


# --------------------------------------------------------------------------- #
# proto_nce: full form
# --------------------------------------------------------------------------- #
def test_proto_full_matches_reference_with_per_column_phi() -> None:
    b, d, k = 10, 16, 7
    q = unit(b, d, 0)
    cents, phi = make_protos(k, d, 1)
    assign = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    loss, logits, targets, form = proto_nce(q, assign, cents, phi, num_negatives=5, form="full")
    assert form == "full"
    assert logits.shape == (b, k)
    assert torch.equal(targets, assign)
    # every column j is divided by φ_j
    assert torch.allclose(logits * phi, q @ cents.t())
    expected = ref_proto_full(q.numpy(), assign.numpy(), cents.numpy(), phi.numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-10)


# --------------------------------------------------------------------------- #
# proto_nce: sampled form
# --------------------------------------------------------------------------- #
def test_proto_sampled_matches_reference_with_per_column_phi() -> None:
    b, d, k, r = 6, 16, 40, 9
    q = unit(b, d, 0)
    cents, phi = make_protos(k, d, 1)
    assign = torch.tensor([3, 3, 7, 11, 20, 39])
    loss, logits, targets, form = proto_nce(
        q, assign, cents, phi, num_negatives=r, form="sampled", generator=torch.Generator().manual_seed(5)
    )
    assert form == "sampled"
    assert logits.shape == (b, b + r)
    assert torch.equal(targets, torch.arange(b))

    # The same seed reproduces the draw the loss used.
    neg = sample_negative_clusters(assign, k, r, generator=torch.Generator().manual_seed(5))
    expected = ref_proto_sampled(q.numpy(), assign.numpy(), neg.numpy(), cents.numpy(), phi.numpy())
    assert loss.item() == pytest.approx(expected, rel=1e-10)

    # Independent check: identify every column among the k full-form columns.
    full = (q @ cents.t()) / phi  # (b, k)
    cols = [int(torch.argmin((full - logits[:, [j]]).abs().sum(0))) for j in range(b + r)]
    assert cols[:b] == assign.tolist()  # column i is row i's positive, divided by its φ
    assert set(cols[b:]).isdisjoint(assign.tolist())
    assert len(set(cols[b:])) == r  # enough free clusters: no repeats
    assert torch.allclose(logits, full[:, cols])


def test_sampled_negatives_never_contain_batch_positives() -> None:
    k, r = 64, 12
    for seed in range(200):
        g = torch.Generator().manual_seed(seed)
        assign = torch.randint(k, (16,), generator=g)
        neg = sample_negative_clusters(assign, k, r, generator=g)
        assert neg.shape == (r,) and neg.dtype == torch.long
        assert not set(neg.tolist()) & set(assign.tolist())
        assert len(set(neg.tolist())) == r  # without replacement
        assert neg.min() >= 0 and neg.max() < k


def test_sampled_negatives_with_replacement_when_few_remain() -> None:
    k = 10
    assign = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1])  # clusters 8 and 9 remain
    neg = sample_negative_clusters(assign, k, 25, generator=torch.Generator().manual_seed(0))
    assert neg.shape == (25,)
    assert set(neg.tolist()) <= {8, 9}
    assert set(neg.tolist()) == {8, 9}  # 25 draws from 2 clusters hit both
    # and the loss still runs in the sampled form
    q = unit(10, 8, 0)
    cents, phi = make_protos(k, 8, 0)
    loss, logits, _, form = proto_nce(q, assign, cents, phi, num_negatives=25, form="sampled")
    assert form == "sampled" and logits.shape == (10, 35) and torch.isfinite(loss)


def test_sampled_raises_when_no_negative_cluster_remains() -> None:
    q = unit(4, 8, 0)
    cents, phi = make_protos(4, 8, 0)
    assign = torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match="no negative prototypes"):
        proto_nce(q, assign, cents, phi, num_negatives=2, form="sampled")
    # zero negatives requested: nothing to sample, no error
    _, logits, _, _ = proto_nce(q, assign, cents, phi, num_negatives=0, form="sampled")
    assert logits.shape == (4, 4)


def test_sampling_is_reproducible_with_generator() -> None:
    assign = torch.tensor([1, 5, 9])
    a = sample_negative_clusters(assign, 100, 20, generator=torch.Generator().manual_seed(3))
    b = sample_negative_clusters(assign, 100, 20, generator=torch.Generator().manual_seed(3))
    c = sample_negative_clusters(assign, 100, 20, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# --------------------------------------------------------------------------- #
# auto form, multi-granularity, gradients, errors
# --------------------------------------------------------------------------- #
def test_auto_form_switches_at_four_times_batch_plus_negatives() -> None:
    b, r, d = 4, 6, 8
    q = unit(b, d, 0)
    assign = torch.tensor([0, 1, 2, 3])
    threshold = 4 * (b + r)
    assert resolve_proto_form("auto", threshold, b, r) == "sampled"
    assert resolve_proto_form("auto", threshold - 1, b, r) == "full"
    for k, expected in [(threshold, "sampled"), (threshold - 1, "full")]:
        cents, phi = make_protos(k, d, 0)
        _, logits, _, form = proto_nce(q, assign, cents, phi, num_negatives=r)
        assert form == expected
        assert logits.shape == ((b, b + r) if expected == "sampled" else (b, k))


def test_proto_nce_multi_is_mean_over_granularities() -> None:
    q = unit(8, 16, 0)
    ks = [5, 30, 200]
    assigns, cents, phis = [], [], []
    for i, k in enumerate(ks):
        c, p = make_protos(k, 16, i)
        cents.append(c)
        phis.append(p)
        assigns.append(torch.randint(k, (8,), generator=torch.Generator().manual_seed(i)))
    loss, outs, forms = proto_nce_multi(
        q, assigns, cents, phis, num_negatives=10, generator=torch.Generator().manual_seed(0)
    )
    assert forms == ["full", "full", "sampled"]
    assert len(outs) == 3
    g = torch.Generator().manual_seed(0)
    singles = [
        proto_nce(q, a, c, p, num_negatives=10, generator=g)[0]
        for a, c, p in zip(assigns, cents, phis, strict=True)
    ]
    assert loss.item() == pytest.approx(torch.stack(singles).mean().item(), rel=1e-12)
    with pytest.raises(ValueError, match="same length"):
        proto_nce_multi(q, assigns, cents[:2], phis, num_negatives=10)
    with pytest.raises(ValueError, match="at least one"):
        proto_nce_multi(q, [], [], [], num_negatives=10)


@pytest.mark.parametrize("form", ["full", "sampled"])
def test_proto_nce_gradient_finite(form: str) -> None:
    q = unit(8, 16, 0).float().requires_grad_()
    cents, phi = make_protos(100, 16, 0)
    assign = torch.randint(100, (8,), generator=torch.Generator().manual_seed(0))
    loss, _, _, _ = proto_nce(q, assign, cents.float(), phi.float(), num_negatives=16, form=form)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


def test_proto_nce_shape_errors() -> None:
    q = unit(4, 8, 0)
    cents, phi = make_protos(10, 8, 0)
    assign = torch.tensor([0, 1, 2, 3])
    kw = {"num_negatives": 2}
    with pytest.raises(ValueError, match="assignments"):
        proto_nce(q, assign[:3], cents, phi, **kw)
    with pytest.raises(ValueError, match="assignments"):
        proto_nce(q, assign.float(), cents, phi, **kw)
    with pytest.raises(ValueError, match="assignments"):
        proto_nce(q, torch.tensor([0, 1, 2, 10]), cents, phi, **kw)
    with pytest.raises(ValueError, match="centroids"):
        proto_nce(q, assign, cents[:, :7], phi, **kw)
    with pytest.raises(ValueError, match="concentration"):
        proto_nce(q, assign, cents, phi[:9], **kw)
    with pytest.raises(ValueError, match="q must be 2-D"):
        proto_nce(q[0], assign, cents, phi, **kw)
    with pytest.raises(ValueError, match="num_negatives"):
        proto_nce(q, assign, cents, phi, num_negatives=-1)
    with pytest.raises(ValueError, match="form"):
        proto_nce(q, assign, cents, phi, num_negatives=2, form="sparse")


def test_accuracy() -> None:
    logits = torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.5, 0.2, 0.3], [0.0, 0.0, 1.0]])
    assert accuracy(logits, torch.tensor([0, 1, 2, 2])) == pytest.approx(75.0)
    assert accuracy(logits, torch.tensor([1, 0, 1, 0])) == 0.0
    with pytest.raises(ValueError, match="targets"):
        accuracy(logits, torch.tensor([0, 1]))
