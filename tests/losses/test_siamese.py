"""SPCL's six-term siamese metric loss against a hand-written, loop-by-loop reference."""

from __future__ import annotations

import math

import pytest
import torch

from pcl_ray.losses import SIAMESE_TERMS, siamese_differences, siamese_metric_loss


def _bce(logit: float, label: float) -> float:
    """-[y log σ(x) + (1-y) log(1-σ(x))], written out."""
    p = 1.0 / (1.0 + math.exp(-logit))
    return -(label * math.log(p) + (1.0 - label) * math.log(1.0 - p))


def _reference(h1, h2, first, second, same, weight, bias) -> float:
    """Per pair, per view pair: score = w·|h_u − h_v| + b; sum over the six terms of the mean over pairs."""
    views = {"a1": lambda i: h1[first[i]], "a2": lambda i: h2[first[i]],
             "b1": lambda i: h1[second[i]], "b2": lambda i: h2[second[i]]}
    terms = [("a1", "a2", True), ("b1", "b2", True), ("a1", "b1", False), ("a1", "b2", False),
             ("a2", "b1", False), ("a2", "b2", False)]
    total = 0.0
    for u, v, same_image in terms:
        per_pair = []
        for i in range(len(first)):
            score = float((weight * (views[u](i) - views[v](i)).abs()).sum() + bias)
            per_pair.append(_bce(score, 1.0 if same_image else float(same[i])))
        total += sum(per_pair) / len(per_pair)
    return total


def test_six_terms_match_the_hand_written_reference():
    g = torch.Generator().manual_seed(0)
    h1, h2 = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g, dtype=torch.float64)
    first, second = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 0, 2])
    same = torch.tensor([True, False, False, True])
    head = torch.nn.Linear(5, 1).double()
    diffs = siamese_differences(h1, h2, first, second)  # (6, P, D)
    assert diffs.shape == (len(SIAMESE_TERMS), 4, 5)
    logits = head(diffs).squeeze(-1)  # (6, P)
    got = siamese_metric_loss(logits, same)
    want = _reference(h1, h2, first, second, same, head.weight[0].detach(), float(head.bias.detach()))
    assert float(got.detach()) == pytest.approx(want, rel=1e-10)


def test_same_image_terms_are_labelled_one_whatever_the_cluster():
    # logits: only the two same-image rows are non-zero; with every pair "different", those rows still want 1
    logits = torch.zeros(6, 3)
    logits[:2] = 4.0
    same = torch.zeros(3, dtype=torch.bool)
    expected = 2 * _bce(4.0, 1.0) + 4 * _bce(0.0, 0.0)
    assert float(siamese_metric_loss(logits, same)) == pytest.approx(expected, rel=1e-6)


def test_no_pairs_is_an_exact_zero_that_reaches_the_head():
    head = torch.nn.Linear(3, 1)
    h = torch.randn(4, 3)
    empty = torch.empty(0, dtype=torch.long)
    loss = siamese_metric_loss(head(siamese_differences(h, h, empty, empty)).squeeze(-1),
                               torch.empty(0, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert head.weight.grad is not None and torch.all(head.weight.grad == 0)


def test_bad_shapes_name_what_was_expected():
    with pytest.raises(ValueError, match=r"logits must be \(6, P\)"):
        siamese_metric_loss(torch.zeros(4, 3), torch.zeros(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="h_1 and h_2"):
        siamese_differences(torch.zeros(4, 3), torch.zeros(4, 2), torch.tensor([0]), torch.tensor([1]))
