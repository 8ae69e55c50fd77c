"""SimCLR and SwAV as methods: a few optimizer steps in one process, their hooks, and one Ray run each."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from pcl_ray.config import load_config
from pcl_ray.data import ViewMaker, load_split
from pcl_ray.methods import METHODS, build_method
from pcl_ray.methods.simclr import SimCLR
from pcl_ray.methods.swav import SwAV
from pcl_ray.training import train_step

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "pipelines" / "digits_tiny.yaml"
BATCH = 64
#: digits are 8x8: small multi-crop views of 6x6 pixels
SWAV_TINY = ["method.temperature=0.1", "method.swav.small_crop_size=6", "method.swav.num_prototypes=30"]
OVERRIDES = {"simclr": ["method.temperature=0.5"], "swav": SWAV_TINY}


def _setup(name: str, extra: list[str] = ()):
    cfg = load_config(TINY, [f"method.name={name}", *OVERRIDES[name], *extra])
    ds = load_split(cfg.data, "train")
    torch.manual_seed(0)
    method = build_method(cfg, ds.channels)
    gen = torch.Generator().manual_seed(0)
    images = torch.stack([ds[i][0] for i in range(BATCH)])
    makers = [ViewMaker(cfg.data.views.recipe, v.size, ds.channels, ds.mean, ds.std, v.min_scale, v.max_scale)
              for v in method.view_specs(ds.image_size)]
    views = [make(images, generator=gen) for make in makers]
    optimizer = torch.optim.SGD(method.net.parameters(), lr=cfg.train.lr, momentum=0.9, weight_decay=1e-4)
    return method, views, torch.arange(BATCH), optimizer


def _step(method, views, index, optimizer, step: int, epoch: int = 0):
    """One iteration through the worker loop's own :func:`~pcl_ray.training.train_step` (no DDP: ``online``
    is the plain net)."""
    result = train_step(method, method.net, optimizer, views, index, None, generator=None, epoch=epoch,
                        global_step=step)
    return float(result.loss.detach()), {k: float(v) for k, v in result.metrics.items()}


def test_registered():
    assert METHODS["simclr"] is SimCLR and METHODS["swav"] is SwAV
    assert not SimCLR.needs_estep and not SwAV.needs_estep


@pytest.mark.parametrize("name", ["simclr", "swav"])
def test_ten_steps_on_a_fixed_batch_decrease_the_loss(name):
    method, views, index, optimizer = _setup(name)
    losses = []
    for step in range(10):
        loss, metrics = _step(method, views, index, optimizer, step)
        assert all(math.isfinite(v) for v in metrics.values()), metrics
        losses.append(loss)
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    assert losses[-1] < losses[0], losses
    expected = {"simclr": {"loss/nt_xent", "acc/instance"},
                "swav": {"loss/swav", "codes/distinct", "codes/entropy", "codes/queue_used"}}[name]
    assert set(metrics) == expected


def _count_encoder_calls(method, part: str | None = None) -> list[int]:
    """Batch size of every forward of the encoder (or of its ``part``: ``backbone``, ``head``)."""
    calls = []
    module = method.encoder if part is None else getattr(method.encoder, part)
    module.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    return calls


def test_simclr_runs_both_views_as_one_batch():
    method, views, index, _ = _setup("simclr")
    calls = _count_encoder_calls(method)
    z_a, z_b = method.net(views[0], views[1])
    assert calls == [2 * BATCH]  # one BN batch over both views
    assert z_a.shape == z_b.shape == (BATCH, method.cfg.model.feature_dim)
    torch.testing.assert_close(z_a.norm(dim=1), torch.ones(BATCH))


def test_swav_multicrop_groups_by_resolution():
    method, views, index, _ = _setup("swav")
    assert [v.shape[-1] for v in views] == [8, 8, 6, 6]
    backbone_calls = _count_encoder_calls(method, "backbone")
    head_calls = _count_encoder_calls(method, "head")
    z, scores = method.net(views)
    assert backbone_calls == [2 * BATCH, 2 * BATCH]  # one backbone pass per resolution
    assert head_calls == [4 * BATCH]  # one head pass: its BatchNorm sees every crop
    assert z.shape == (4 * BATCH, method.cfg.model.feature_dim) and scores.shape == (4 * BATCH, 30)
    assert scores.abs().max() <= 1.0 + 1e-5  # unit features · unit prototypes


def test_swav_prototypes_stay_normalized_and_frozen_first():
    method, views, index, optimizer = _setup("swav", ["method.swav.freeze_prototypes_iters=3"])
    w = method.net.prototypes.weight
    initial = w.detach().clone()
    torch.testing.assert_close(w.norm(dim=1), torch.ones(30))
    for step in range(3):
        _step(method, views, index, optimizer, step)
    torch.testing.assert_close(w.detach(), initial)  # frozen: no gradient, no decay, no momentum
    _step(method, views, index, optimizer, 3)
    assert not torch.allclose(w.detach(), initial)
    method.net(views)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(30))  # re-normalized before use


def test_swav_queue_starts_at_its_epoch_and_is_used_once_full():
    method, views, index, optimizer = _setup("swav", [f"method.swav.queue_length={2 * BATCH}",
                                                      "method.swav.queue_start_epoch=1"])
    used = [_step(method, views, index, optimizer, s, epoch=0)[1]["codes/queue_used"] for s in range(2)]
    assert used == [0.0, 0.0] and method._queue is None
    used = [_step(method, views, index, optimizer, 2 + s, epoch=1)[1]["codes/queue_used"] for s in range(3)]
    assert used == [0.0, 0.0, 1.0]
    assert method._queue.shape == (2, 2 * BATCH, method.cfg.model.feature_dim)


def test_swav_queue_shorter_than_the_batch_is_an_error():
    method, views, index, optimizer = _setup("swav", ["method.swav.queue_length=10", "method.swav.queue_start_epoch=0"])
    with pytest.raises(ValueError, match="queue_length"):
        _step(method, views, index, optimizer, 0)


def test_swav_collapse_warning():
    method = _setup("swav")[0]
    ln_k = math.log(30)
    for _ in range(4):
        method._track_collapse(3.0, epoch=0)  # the first epoch never counts
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(4):
            method._track_collapse(0.9 * ln_k, epoch=1)  # learning: no warning
        for _ in range(3):
            method._track_collapse(ln_k * 1.001, epoch=2)  # not yet a whole epoch
    with pytest.warns(RuntimeWarning, match="collapsed.*queue.*lr.*epsilon"):
        method._track_collapse(ln_k * 0.999, epoch=2)


# --------------------------------------------------------------------------- #
# two real gloo ranks under DDP give the gradient of the global batch
# --------------------------------------------------------------------------- #
def _exact_setup(name: str, batch: int = 16):
    """A float64 model in eval mode (BN on running stats, so splitting the batch changes nothing)."""
    cfg = load_config(TINY, [f"method.name={name}", *OVERRIDES[name]])
    torch.manual_seed(0)
    method = build_method(cfg, 1).double()
    method.net.eval()
    g = torch.Generator().manual_seed(1)
    sizes = [v.size for v in method.view_specs(8)]
    views = [torch.randn(batch, 1, s, s, generator=g, dtype=torch.float64) for s in sizes]
    return method, views


def _ddp_rank(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        results = {}
        for name in ("simclr", "swav"):
            method, views = _exact_setup(name)
            half = views[0].shape[0] // 2
            local = [v[rank * half:(rank + 1) * half] for v in views]
            online = DistributedDataParallel(method.net)  # keep a reference: its reducer syncs the grads
            loss = method.training_loss(online, local, None).loss
            loss.backward()
            total = loss.detach().clone()
            dist.all_reduce(total)
            results[name] = (float(total) / 2, [p.grad.clone() for p in method.net.parameters()])
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_match_one_process_on_the_global_batch(tmp_path):
    """SimCLR's gathered negatives carry gradients across ranks and SwAV's Sinkhorn balances the
    global batch: the mean loss over ranks and DDP's averaged gradients equal one process's."""
    import torch.multiprocessing as mp

    out = tmp_path / "ranks.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(_ddp_rank, args=(str(tmp_path / "store"), str(out)), nprocs=2)
    results = torch.load(out, weights_only=True)
    for name in ("simclr", "swav"):
        method, views = _exact_setup(name)
        loss = method.training_loss(method.net, views, None).loss
        loss.backward()
        mean_loss, grads = results[name]
        assert mean_loss == pytest.approx(loss.item(), rel=1e-12)
        for got, p in zip(grads, method.net.parameters(), strict=True):
            torch.testing.assert_close(got, p.grad, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------- #
# end to end through Ray Train (2 workers, 2 epochs, MLflow, evaluation)
# --------------------------------------------------------------------------- #
RAY_OVERRIDES = {
    "simclr": ["method.temperature=0.5"],
    # the queue (per worker 256 / 2 workers = 128 rows = 2 local batches) fills early in epoch 2
    "swav": [*SWAV_TINY, "method.swav.freeze_prototypes_iters=5", "method.swav.queue_length=256",
             "method.swav.queue_start_epoch=1"],
}


@pytest.mark.ray
@pytest.mark.parametrize("name", ["simclr", "swav"])
def test_trains_through_ray_and_evaluates(name, ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from pcl_ray.workflow import train

    cfg = load_config(TINY, [
        f"method.name={name}", *RAY_OVERRIDES[name],
        "train.epochs=2", "ray.num_workers=2",
        f"ray.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=it-family", "eval.kmeans_restarts=1",
    ])
    out = train(cfg, run_name=f"it-{name}")
    client = MlflowClient(out.tracking_uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == name
    part = {"simclr": "loss/nt_xent", "swav": "loss/swav"}[name]
    for key in ("loss/total", part):
        history = client.get_metric_history(out.mlflow_run_id, key)
        assert [m.step for m in history] == [1, 2]
        assert all(math.isfinite(m.value) and m.value > 0 for m in history)
    if name == "swav":
        queue = client.get_metric_history(out.mlflow_run_id, "codes/queue_used")
        assert [m.value for m in queue][0] == 0.0 and queue[-1].value > 0.5  # used in epoch 2
    assert set(out.eval) == {f"{name}_backbone", f"{name}_head", "raw_pixels"}
    for row in out.eval.values():
        assert 0.0 <= row["ami"] <= 1.0 and 0.0 < row["knn_acc"] <= 1.0
