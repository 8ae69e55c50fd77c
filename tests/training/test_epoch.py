"""One M-step epoch (:func:`~pcl_ray.training.run_epoch`) in one process on tiny in-memory data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import pcl_ray.training.epoch as epoch_module
from pcl_ray.config import load_config
from pcl_ray.data.dataset import IndexedImages
from pcl_ray.methods import build_method
from pcl_ray.training import FiniteGuard, build_optimizer, build_view_makers, lr_at, run_epoch

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "digits_tiny.yaml"


def _setup(*overrides: str, n: int = 40):
    cfg = load_config(TINY, ["method.name=moco", "ray.num_workers=1", "train.batch_size=8", "train.epochs=3",
                             "train.log_every=2", "method.queue_size=64", *overrides])
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8))  # N×1×8×8
    ds = IndexedImages(labels=np.zeros(n, dtype=np.int64), num_classes=1, mean=[0.5], std=[0.25], tensor=images)
    torch.manual_seed(0)
    method = build_method(cfg, 1, generator=torch.Generator().manual_seed(0))
    makers, _ = build_view_makers(method, cfg, ds)
    optimizer = build_optimizer(cfg, method.net.parameters())
    return cfg, ds, method, makers, optimizer


def _recording(monkeypatch):
    """Wrap the runner's train_step: record each call's lr, global step and guard."""
    calls = []
    real = epoch_module.train_step

    def spy(method, online, optimizer, views, index, prototypes=None, **kw):
        calls.append((optimizer.param_groups[0]["lr"], kw["global_step"], kw.get("guard")))
        return real(method, online, optimizer, views, index, prototypes, **kw)

    monkeypatch.setattr(epoch_module, "train_step", spy)
    return calls


def test_an_epoch_steps_at_the_scheduled_lr_and_returns_its_metrics(monkeypatch):
    cfg, ds, method, makers, optimizer = _setup()
    calls = _recording(monkeypatch)
    lines = []
    step, streamed, metrics = run_epoch(method, method.net, optimizer, ds, makers, None, cfg, epoch=1,
                                        global_step=5, log=lines.append)
    steps = len(ds) // cfg.train.batch_size  # 5
    assert step == 5 + steps and streamed is None  # moco streams nothing
    assert [c[0] for c in calls] == pytest.approx([lr_at(cfg, 1, s, steps) for s in range(steps)])
    assert [c[1] for c in calls] == list(range(5, 5 + steps))
    guards = {id(c[2]) for c in calls}
    assert len(guards) == 1 and isinstance(calls[0][2], FiniteGuard)  # one guard for the epoch, every step
    assert {"lr", "throughput/img_per_s", "time/epoch_s", "loss/total", "loss/info_nce"} <= set(metrics)
    assert metrics["lr"] == pytest.approx(lr_at(cfg, 1, steps - 1, steps))
    assert metrics["time/epoch_s"] > 0
    assert metrics["throughput/img_per_s"] == pytest.approx(steps * 8 / metrics["time/epoch_s"])
    assert all(isinstance(v, float) and np.isfinite(v) for v in metrics.values())
    # a progress line every train.log_every (2) steps, in the worker's format
    assert len(lines) == 2
    assert re.fullmatch(r"epoch 2/3 step 2/5 loss \d+\.\d{3} lr \d\.\d{4} \d+ img/s", lines[0]), lines[0]


def test_the_epoch_is_seeded_by_seed_and_epoch_alone():
    def run(warm: bool):
        cfg, ds, method, makers, optimizer = _setup()
        if warm:  # other draws before the epoch: the global generator's history must not matter
            torch.rand(100)
        _, _, metrics = run_epoch(method, method.net, optimizer, ds, makers, None, cfg, epoch=2)
        return metrics["loss/total"], [p.detach().clone() for p in method.net.parameters()]

    (loss_a, params_a), (loss_b, params_b) = run(False), run(True)
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b, strict=True))


def test_a_non_finite_loss_raises_naming_its_step_though_no_step_reads_it_back(monkeypatch):
    cfg, ds, method, makers, optimizer = _setup("train.log_every=50")  # no check inside the epoch
    calls = _recording(monkeypatch)
    first = next(method.net.parameters())

    def poison(epoch: int, step: int) -> None:  # from step 2 on the loss is NaN
        if step == 2:
            with torch.no_grad():
                first.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"non-finite loss at epoch 1 step 12\b"):
        run_epoch(method, method.net, optimizer, ds, makers, None, cfg, epoch=0, global_step=10, on_step=poison)
    # the steps after the bad one ran (no host sync per step): the check at the epoch's end named step 12
    assert len(calls) == len(ds) // cfg.train.batch_size
    assert all(c[2] is not None for c in calls)


def test_a_non_finite_loss_stops_the_epoch_at_the_next_log_line(monkeypatch):
    cfg, ds, method, makers, optimizer = _setup("train.log_every=2")
    calls = _recording(monkeypatch)
    first = next(method.net.parameters())
    lines = []

    def poison(epoch: int, step: int) -> None:
        if step == 0:
            with torch.no_grad():
                first.fill_(float("nan"))

    with pytest.raises(FloatingPointError, match=r"epoch 1 step 0\b"):
        run_epoch(method, method.net, optimizer, ds, makers, None, cfg, epoch=0, on_step=poison, log=lines.append)
    assert len(calls) == 2 and lines == []  # checked before the first progress line, which never printed
