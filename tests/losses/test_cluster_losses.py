"""Clustering-family losses (DeepCluster-v2, SPCL) against hand-written per-row references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pcl_ray.losses import balanced_pairs, pair_bce, prototype_ce, symmetric_ce


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)


def neg_log_softmax(row: list[float], target: int) -> float:
    m = max(row)
    return m + math.log(sum(math.exp(v - m) for v in row)) - row[target]


def softmax(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(v - m) for v in row]
    return [v / sum(e) for v in e]


# --------------------------------------------------------------------------- #
# prototype_ce
# --------------------------------------------------------------------------- #
def ref_prototype_ce(z, protos, targets, tau, ignore=-1) -> float:
    rows = [
        neg_log_softmax([float(z[i] @ protos[j]) / tau for j in range(protos.shape[0])], int(t))
        for i, t in enumerate(targets) if int(t) != ignore
    ]
    return sum(rows) / len(rows)


def test_prototype_ce_matches_reference_and_skips_ignored_rows():
    z, protos = unit(7, 5, 0), unit(4, 5, 1)
    targets = torch.tensor([0, 3, -1, 2, 1, -1, 3])
    loss, logits = prototype_ce(z, protos, targets, 0.1)
    assert loss.item() == pytest.approx(ref_prototype_ce(z, protos, targets, 0.1), rel=1e-10)
    assert logits.shape == (7, 4)
    assert torch.allclose(logits, z @ protos.t() / 0.1)
    # a different ignore index
    targets9 = torch.where(targets < 0, torch.tensor(9), targets)
    loss9, _ = prototype_ce(z, protos, targets9, 0.1, ignore_index=9)
    assert loss9.item() == pytest.approx(loss.item(), rel=1e-12)


def test_prototype_ce_all_ignored_is_zero_with_gradient_path():
    z = unit(3, 4, 2).requires_grad_(True)
    loss, _ = prototype_ce(z, unit(5, 4, 3), torch.full((3,), -1), 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert z.grad is not None and torch.all(z.grad == 0)


def test_prototype_ce_rejects_bad_inputs():
    with pytest.raises(ValueError, match="share d"):
        prototype_ce(unit(3, 4, 0), unit(5, 3, 0), torch.zeros(3, dtype=torch.long), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        prototype_ce(unit(3, 4, 0), unit(5, 4, 0), torch.zeros(3, dtype=torch.long), 0.0)
    with pytest.raises(ValueError, match="integer"):
        prototype_ce(unit(3, 4, 0), unit(5, 4, 0), torch.zeros(3), 0.1)


# --------------------------------------------------------------------------- #
# symmetric_ce
# --------------------------------------------------------------------------- #
def test_symmetric_ce_is_alpha_ce_plus_beta_reverse_ce():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 5, generator=g, dtype=torch.float64) * 3
    targets = torch.tensor([1, 4, -1, 0, 0, 2])
    alpha, beta = 0.1, 1.0
    ce = rce = 0.0
    kept = [i for i, t in enumerate(targets.tolist()) if t != -1]
    for i in kept:
        row, t = logits[i].tolist(), int(targets[i])
        ce += neg_log_softmax(row, t)
        p = softmax(row)
        # −Σ_c p_c log(one_hot_c clamped at 1e-4): the target class contributes log 1 = 0
        rce += -sum(p[c] * math.log(1.0 if c == t else 1e-4) for c in range(len(row)))
    expected = alpha * ce / len(kept) + beta * rce / len(kept)
    assert symmetric_ce(logits, targets, alpha, beta).item() == pytest.approx(expected, rel=1e-10)
    # the pieces: beta=0 is plain CE, and RCE = −log(1e-4)·(1 − p_target)
    assert symmetric_ce(logits, targets, 1.0, 0.0).item() == pytest.approx(
        F.cross_entropy(logits, targets, ignore_index=-1).item(), rel=1e-12)
    p_t = logits[kept].softmax(1)[torch.arange(len(kept)), targets[kept]]
    assert symmetric_ce(logits, targets, 0.0, 1.0).item() == pytest.approx(
        (-math.log(1e-4) * (1 - p_t)).mean().item(), rel=1e-10)


def test_symmetric_ce_all_ignored_is_zero():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = symmetric_ce(logits, torch.full((3,), -1), 0.1, 1.0)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


# --------------------------------------------------------------------------- #
# pair_bce
# --------------------------------------------------------------------------- #
def test_pair_bce_matches_reference():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0], dtype=torch.float64)
    same = torch.tensor([True, False, False, True])
    ref = 0.0
    for x, y in zip(logits.tolist(), same.tolist()):
        s = 1.0 / (1.0 + math.exp(-x))
        ref += -(math.log(s) if y else math.log(1.0 - s))
    assert pair_bce(logits, same).item() == pytest.approx(ref / 4, rel=1e-10)


def test_pair_bce_empty_is_zero_and_shapes_checked():
    logits = torch.empty(0, requires_grad=True)
    assert pair_bce(logits, torch.empty(0, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="shape"):
        pair_bce(torch.zeros(3), torch.zeros(2, dtype=torch.bool))


# --------------------------------------------------------------------------- #
# balanced_pairs
# --------------------------------------------------------------------------- #
def test_balanced_pairs_half_same_half_different_and_labelled_correctly():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 6, (64,), generator=g)
    first, second, same = balanced_pairs(labels, 200, torch.Generator().manual_seed(1))
    assert first.shape == second.shape == same.shape == (200,)
    assert int(same.sum()) == 100  # really balanced
    assert torch.equal(same, labels[first] == labels[second])  # labelled correctly
    assert torch.all(first != second)  # never an image with itself
    assert first.dtype == second.dtype == torch.long and same.dtype == torch.bool
    # every cluster with >= 2 members shows up in the same-cluster half
    assert set(labels[first[same]].tolist()) == {c for c in range(6) if int((labels == c).sum()) >= 2}


def test_balanced_pairs_is_seeded_and_covers_partners():
    labels = torch.tensor([0, 0, 0, 1, 1, 2])
    a = balanced_pairs(labels, 4000, torch.Generator().manual_seed(5))
    b = balanced_pairs(labels, 4000, torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    first, second, same = a
    pairs = set(zip(first.tolist(), second.tolist()))
    same_expected = {(i, j) for i in range(6) for j in range(6) if i != j and labels[i] == labels[j]}
    diff_expected = {(i, j) for i in range(6) for j in range(6) if labels[i] != labels[j]}
    assert pairs == same_expected | diff_expected  # every legal pair is reachable, no illegal one


def test_balanced_pairs_fewer_when_a_half_is_impossible():
    singletons = torch.arange(5)  # no two rows share a cluster: no same-cluster pair exists
    first, second, same = balanced_pairs(singletons, 10)
    assert first.numel() == 5 and not same.any()
    one_cluster = torch.zeros(5, dtype=torch.long)  # no different-cluster pair exists
    first, second, same = balanced_pairs(one_cluster, 10)
    assert first.numel() == 5 and same.all() and torch.all(first != second)
    assert balanced_pairs(torch.zeros(1, dtype=torch.long), 10)[0].numel() == 0
    assert balanced_pairs(singletons, 0)[0].numel() == 0
