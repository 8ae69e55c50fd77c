"""The learning-rate schedule against its closed forms."""

from __future__ import annotations

import math

import pytest

from pcl_ray.config import load_config
from pcl_ray.training import lr_at


def test_cosine_closed_form():
    cfg = load_config(None, ["train.lr=0.1", "train.epochs=4", "train.schedule=cosine"])
    assert lr_at(cfg, 0, 0, 10) == pytest.approx(0.1)
    assert lr_at(cfg, 2, 0, 10) == pytest.approx(0.05)  # half way: cos(pi/2) = 0
    assert lr_at(cfg, 1, 5, 10) == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 1.5 / 4)))
    assert lr_at(cfg, 3, 9, 10) < lr_at(cfg, 3, 8, 10)  # decreasing within an epoch
    assert lr_at(cfg, 3, 10, 10) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule_drops_tenfold_at_each_milestone():
    cfg = load_config(None, ["train.lr=0.03", "train.epochs=200", "train.schedule=step", "train.lr_steps=[120,160]"])
    assert [lr_at(cfg, e, 0, 10) for e in (0, 119, 120, 159, 160, 199)] == pytest.approx(
        [0.03, 0.03, 0.003, 0.003, 0.0003, 0.0003])
