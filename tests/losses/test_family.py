"""Tests for the SimCLR and SwAV losses (pcl_ray.losses.nt_xent / .swav) against hand-written references."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from pcl_ray.losses import nt_xent, sinkhorn, swapped_prediction_loss


# --------------------------------------------------------------------------- #
# helpers and references
# --------------------------------------------------------------------------- #
def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(rows, dim, generator=g, dtype=torch.float64), dim=1)


def ref_nt_xent(a: torch.Tensor, b: torch.Tensor, tau: float) -> float:
    """SimCLR eq. 1, one row at a time: 2N rows, positive = other view, denominator = all but self."""
    z = torch.cat([a, b]).tolist()
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        sims = {k: sum(x * y for x, y in zip(z[i], z[k])) / tau for k in range(n2) if k != i}
        m = max(sims.values())
        lse = m + math.log(sum(math.exp(v - m) for v in sims.values()))
        total += lse - sims[pos]
    return total / n2


def ref_sinkhorn(scores: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """SwAV's distributed_sinkhorn on one process, verbatim (plain exp, float64)."""
    q = torch.exp(scores.double() / eps).t()
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iters):
        q /= q.sum(dim=1, keepdim=True)
        q /= k
        q /= q.sum(dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


def ref_swapped(scores: list[torch.Tensor], codes: list[torch.Tensor], tau: float) -> float:
    """The reference's double loop over crops, written out per sample and per prototype."""
    n_crops = len(scores)
    loss = 0.0
    for i, q in enumerate(codes):
        sub = 0.0
        for v in range(n_crops):
            if v == i:
                continue
            per_sample = []
            for row_s, row_q in zip(scores[v].tolist(), q.tolist()):
                m = max(row_s) / tau
                lse = m + math.log(sum(math.exp(s / tau - m) for s in row_s))
                per_sample.append(-sum(qk * (s / tau - lse) for qk, s in zip(row_q, row_s)))
            sub += sum(per_sample) / len(per_sample)
        loss += sub / (n_crops - 1)
    return loss / len(codes)


class FakeGroup:
    """An in-process "process group": ``world`` threads meet in ``all_reduce`` (sum or max)."""

    def __init__(self, world: int):
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world)

    def all_reduce_for(self, rank: int):
        def all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
            self.slots[rank] = t.clone()
            self.barrier.wait()
            stacked = torch.stack(self.slots)
            out = stacked.sum(0) if op == "sum" else stacked.amax(0)
            self.barrier.wait()  # nobody overwrites a slot before everyone has read it
            return out

        return all_reduce

    def run(self, fn):
        """``fn(rank, all_reduce)`` on every rank concurrently; results in rank order."""
        with ThreadPoolExecutor(self.world) as pool:
            futures = [pool.submit(fn, r, self.all_reduce_for(r)) for r in range(self.world)]
            return [f.result(timeout=30) for f in futures]


# --------------------------------------------------------------------------- #
# NT-Xent
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_nt_xent_matches_loop_reference(tau):
    a, b = unit(6, 5, 0), unit(6, 5, 1)
    loss, logits, targets = nt_xent(a, b, tau)
    assert loss.item() == pytest.approx(ref_nt_xent(a, b, tau), rel=1e-10)
    assert logits.shape == (12, 12)
    assert torch.isinf(logits.diagonal()).all()  # a row is never its own negative
    assert targets.tolist() == list(range(6, 12)) + list(range(6))


def test_nt_xent_is_symmetric_in_its_views():
    a, b = unit(7, 4, 2), unit(7, 4, 3)
    assert nt_xent(a, b, 0.2)[0].item() == pytest.approx(nt_xent(b, a, 0.2)[0].item(), rel=1e-12)


def test_nt_xent_identical_views_are_found():
    a = unit(16, 32, 4)
    loss, logits, targets = nt_xent(a, a.clone(), 0.1)
    assert (logits.argmax(dim=1) == targets).all()
    assert loss.item() < nt_xent(a, unit(16, 32, 5), 0.1)[0].item()


def test_nt_xent_gathered_equals_global_batch_averaged_over_ranks():
    """Two simulated ranks of 4 rows each against the gathered 8: their mean is the 8-row loss."""
    a = unit(8, 6, 6).requires_grad_()
    b = unit(8, 6, 7).requires_grad_()
    global_loss = nt_xent(a, b, 0.3)[0]
    parts = [nt_xent(a[r * 4:(r + 1) * 4], b[r * 4:(r + 1) * 4], 0.3, z_a_all=a, z_b_all=b, rank_offset=r * 4)
             for r in range(2)]
    mean = (parts[0][0] + parts[1][0]) / 2
    assert mean.item() == pytest.approx(global_loss.item(), rel=1e-12)
    # every local row sees 2N - 2 = 14 negatives: 16 columns minus itself and its positive
    logits, targets = parts[1][1], parts[1][2]
    assert logits.shape == (8, 16) and torch.isfinite(logits).sum(dim=1).tolist() == [15] * 8
    assert targets.tolist() == [12, 13, 14, 15, 4, 5, 6, 7]
    # and the gradients agree (what DDP's averaging of gather-with-grad computes)
    g_global = torch.autograd.grad(global_loss, (a, b))
    g_mean = torch.autograd.grad(mean, (a, b))
    for x, y in zip(g_global, g_mean):
        torch.testing.assert_close(x, y)


def test_nt_xent_validates_inputs():
    a, b = unit(4, 3, 0), unit(4, 3, 1)
    with pytest.raises(ValueError, match="both"):
        nt_xent(a, b, 0.2, z_a_all=a)
    with pytest.raises(ValueError, match="rank_offset"):
        nt_xent(a, b, 0.2, z_a_all=a, z_b_all=b, rank_offset=1)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(a, b, 0.0)
    with pytest.raises(ValueError, match="same shape"):
        nt_xent(a, b[:3], 0.2)


# --------------------------------------------------------------------------- #
# Sinkhorn
# --------------------------------------------------------------------------- #
def cosine_scores(batch: int, k: int, seed: int) -> torch.Tensor:
    return unit(batch, 16, seed) @ unit(k, 16, seed + 100).t()


def test_sinkhorn_matches_reference_implementation():
    scores = cosine_scores(32, 10, 0)
    torch.testing.assert_close(sinkhorn(scores, 0.05, 3), ref_sinkhorn(scores, 0.05, 3), rtol=1e-9, atol=1e-12)


def test_sinkhorn_marginals_are_uniform():
    scores = cosine_scores(40, 8, 1)
    # a few iterations: the last step normalizes the samples, so every code row sums to 1 exactly
    codes = sinkhorn(scores, 0.05, 3)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(40, dtype=torch.float64))
    assert (codes >= 0).all()
    # converged: Q = codes / B has sample marginal 1/B and prototype marginal 1/K
    q = sinkhorn(scores, 0.5, 300) / 40
    torch.testing.assert_close(q.sum(dim=1), torch.full((40,), 1 / 40, dtype=torch.float64))
    torch.testing.assert_close(q.sum(dim=0), torch.full((8,), 1 / 8, dtype=torch.float64), rtol=1e-6, atol=1e-8)


def test_sinkhorn_two_simulated_ranks_equal_one_process():
    scores = cosine_scores(24, 7, 2)
    single = sinkhorn(scores, 0.05, 3)
    halves = scores.split(12)
    group = FakeGroup(2)
    parts = group.run(lambda r, reduce: sinkhorn(halves[r], 0.05, 3, world_size=2, all_reduce=reduce))
    torch.testing.assert_close(torch.cat(parts), single, rtol=1e-9, atol=1e-12)
    # the global prototype marginal is what gets balanced: one half alone gives other codes
    assert not torch.allclose(sinkhorn(halves[0], 0.05, 3), single[:12])


def test_sinkhorn_stays_finite_for_large_scores():
    g = torch.Generator().manual_seed(3)
    scores = 1000.0 * torch.randn(64, 20, generator=g)  # unnormalized features: exp(s/ε) overflows
    with torch.no_grad():
        assert not torch.isfinite(ref_sinkhorn(scores.float(), 0.05, 3)).all()  # the trap
    for dtype in (torch.float32, torch.float64, torch.float16):
        codes = sinkhorn(scores.to(dtype), 0.05, 3)
        assert torch.isfinite(codes).all()
        assert codes.dtype == torch.promote_types(dtype, torch.float32)  # computed in >= float32
        torch.testing.assert_close(codes.sum(dim=1).double(), torch.ones(64, dtype=torch.float64), atol=1e-5, rtol=0)


def test_sinkhorn_is_detached_and_validates():
    scores = cosine_scores(8, 4, 4).requires_grad_()
    assert not sinkhorn(scores, 0.05, 3).requires_grad
    with pytest.raises(ValueError, match="all_reduce"):
        sinkhorn(scores, 0.05, 3, world_size=2)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(scores, 0.0, 3)
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn(scores, 0.05, 0)


# --------------------------------------------------------------------------- #
# swapped prediction
# --------------------------------------------------------------------------- #
def test_swapped_prediction_matches_reference():
    scores = [cosine_scores(6, 5, s) for s in range(4)]  # 2 large + 2 small crops
    codes = [sinkhorn(scores[i], 0.05, 3) for i in range(2)]
    loss = swapped_prediction_loss(scores, codes, 0.1)
    assert loss.item() == pytest.approx(ref_swapped(scores, codes, 0.1), rel=1e-10)


def test_swapped_prediction_uniform_predictions_give_ln_k():
    """Whatever the codes, uniform predictions score ln K (the collapse signature)."""
    k = 12
    scores = [torch.zeros(5, k, requires_grad=True) for _ in range(3)]
    codes = [F.one_hot(torch.arange(5) % k, k).float() for _ in range(2)]
    assert swapped_prediction_loss(scores, codes, 0.1).item() == pytest.approx(math.log(k))


def test_swapped_prediction_gradients_reach_scores_not_codes():
    scores = [cosine_scores(4, 3, s).requires_grad_() for s in range(3)]
    codes = [sinkhorn(s, 0.05, 3).requires_grad_() for s in scores[:2]]
    swapped_prediction_loss(scores, codes, 0.1).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in scores)
    assert all(c.grad is None for c in codes)


def test_swapped_prediction_validates():
    s = [cosine_scores(4, 3, 0)]
    with pytest.raises(ValueError, match="at least 2 crops"):
        swapped_prediction_loss(s, s, 0.1)
    with pytest.raises(ValueError, match="shape"):
        swapped_prediction_loss([s[0], cosine_scores(5, 3, 1)], s, 0.1)
