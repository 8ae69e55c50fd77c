"""DeepCluster-v2 and SPCL: M-steps in one process on a fixed digits batch, then end to end on Ray."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pcl_ray.config import ConfigError, load_config
from pcl_ray.data import ViewMaker, iterate_batches, load_split
from pcl_ray.estep import run_estep
from pcl_ray.estep.prototypes import PrototypeTensors
from pcl_ray.methods import build_method
from pcl_ray.training import train_step

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipelines" / "digits_tiny.yaml"
BATCH = 128


def _cfg(name: str, *overrides: str):
    return load_config(PIPELINE, [f"method.name={name}", "train.warmup_epochs=0", "method.temperature=0.1",
                                  *overrides])


@pytest.fixture(scope="module")
def digits():
    return load_split(_cfg("deepcluster").data, "train")


def _views(cfg, ds, n_views: int = 2):
    """Fixed views of the first BATCH images (made once, so the loss only moves with the weights)."""
    images, _ = next(iter(iterate_batches(ds, np.arange(BATCH), BATCH, shuffle=False, seed=0, drop_last=False)))
    make = ViewMaker(cfg.data.views.recipe, ds.image_size, ds.channels, ds.mean, ds.std,
                     crop_min_scale=cfg.data.views.crop_min_scale)
    g = torch.Generator().manual_seed(0)
    return [make(images, generator=g) for _ in range(n_views)], torch.arange(BATCH)


@torch.no_grad()
def _prototypes(method, cfg, ds):
    """The E-step on the random-init model's features of the whole training split."""
    method.estep_module().eval()
    eval_views = ViewMaker(cfg.data.views.recipe, ds.image_size, ds.channels, ds.mean, ds.std)
    feats = torch.cat([method.embed_for_estep(eval_views.eval(x)) for x, _ in
                       iterate_batches(ds, np.arange(len(ds)), 512, shuffle=False, seed=0, drop_last=False)])
    method.estep_module().train()
    options = {"seed": 0, **type(method).estep_options(cfg)}  # what the method asks of its E-step
    pset = run_estep(feats, cfg.estep.num_clusters, cfg.method.temperature, nredo=1, **options)
    return pset.to_torch("cpu")


def _build(name: str, ds, *overrides: str):
    cfg = _cfg(name, *overrides)
    torch.manual_seed(0)
    method = build_method(cfg, ds.channels)
    prototypes = _prototypes(method, cfg, ds)
    method.on_prototypes(prototypes)
    return cfg, method, prototypes


def _train(method, cfg, views, index, prototypes, steps: int = 10) -> list[float]:
    params = [p for p in method.net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.train.lr, momentum=cfg.train.sgd_momentum,
                          weight_decay=cfg.train.weight_decay)
    losses = []
    for _ in range(steps):
        gen = torch.Generator().manual_seed(1)  # same pair draw every step: the loss moves only with the weights
        result = train_step(method, method.net, opt, views, index, prototypes, generator=gen, epoch=0,
                            global_step=len(losses))
        losses.append(float(result.loss.detach()))
        assert all(math.isfinite(float(v)) for v in result.metrics.values()), result.metrics
    return losses


def _assert_decreasing(losses: list[float]) -> None:
    assert all(math.isfinite(v) for v in losses), losses
    assert losses[-1] < losses[0], losses
    assert min(losses[-3:]) < min(losses[:3]), losses


# --------------------------------------------------------------------------- #
# DeepCluster-v2
# --------------------------------------------------------------------------- #
def test_deepcluster_loss_decreases_with_frozen_prototype_heads(digits):
    cfg, method, prototypes = _build("deepcluster", digits)
    heads = list(method.prototypes)
    assert [h.out_features for h in heads] == cfg.estep.num_clusters
    for head, p in zip(heads, prototypes):
        assert not head.weight.requires_grad
        assert torch.allclose(head.weight, p.centroids)
        assert torch.allclose(head.weight.norm(dim=1), torch.ones(head.out_features), atol=1e-5)
    # the heads are outside the DDP-wrapped net, so never in the optimizer
    assert not ({id(p) for p in method.net.parameters()} & {id(h.weight) for h in heads})

    views, index = _views(cfg, digits)
    losses = _train(method, cfg, views, index, prototypes)
    _assert_decreasing(losses)
    # ln k bounds the loss of an uninformed model; the first step starts near it, not at 0
    assert losses[0] > 0.1
    for head, p in zip(heads, prototypes):
        assert head.weight.grad is None and torch.equal(head.weight, p.centroids)


def test_deepcluster_empty_cluster_keeps_previous_centroid(digits):
    cfg, method, prototypes = _build("deepcluster", digits)
    before = method.prototypes[0].weight.clone()
    p = prototypes[0]
    moved = torch.nn.functional.normalize(p.centroids + 0.5, dim=1)
    emptied = torch.where(p.assignments == 3, torch.tensor(4), p.assignments)  # cluster 3 loses its members
    method.on_prototypes([PrototypeTensors(emptied, moved, p.concentration), *prototypes[1:]])
    after = method.prototypes[0].weight
    assert torch.equal(after[3], before[3])
    keep = torch.arange(after.shape[0]) != 3
    assert torch.allclose(after[keep], moved[keep])


def test_deepcluster_needs_no_warmup():
    with pytest.raises(ConfigError, match="warmup_epochs must be 0 for method.name=deepcluster"):
        load_config(PIPELINE, ["method.name=deepcluster", "train.warmup_epochs=1"])


# --------------------------------------------------------------------------- #
# SPCL
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("variant", ["full", "lite"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_spcl_loss_decreases_and_reports_all_parts(digits, symmetric, variant):
    cfg, method, prototypes = _build("spcl", digits, f"method.spcl.symmetric_ce={symmetric}",
                                     "estep.num_clusters=[10]", f"method.spcl.variant={variant}")
    views, index = _views(cfg, digits)
    result = method.training_loss(method.net, views, index, prototypes, generator=torch.Generator())
    assert {"loss/nt_xent", "loss/metric", "loss/proto_ce", "acc/instance", "acc/proto", "acc/metric"} <= set(
        result.metrics)
    # the stream embedding is what the variant's E-step clusters: backbone features (full) or the head (lite)
    assert result.stream_embedding.shape == (BATCH, type(method).estep_dim(cfg))
    losses = _train(method, cfg, views, index, prototypes)
    _assert_decreasing(losses)


def test_spcl_net_holds_every_trainable_module(digits):
    cfg = _cfg("spcl")
    method = build_method(cfg, digits.channels)
    trainable = {id(p) for p in method.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in method.net.parameters()}
    assert any(n.startswith("metric_head") for n, _ in method.net.named_parameters())


def test_spcl_warmup_trains_nt_xent_only_but_touches_every_parameter(digits):
    cfg = _cfg("spcl", "train.warmup_epochs=1")
    method = build_method(cfg, digits.channels)
    views, index = _views(cfg, digits)
    result = method.training_loss(method.net, views, index, None, generator=torch.Generator())
    assert set(result.metrics) == {"loss/nt_xent", "acc/instance"}
    assert result.loss.item() == pytest.approx(
        cfg.method.spcl.weight_ntxent * float(result.metrics["loss/nt_xent"]), rel=1e-6)
    result.loss.backward()
    # DDP without find_unused_parameters needs a gradient (here exactly 0) for the metric head and classifier too
    for head in (method.net.metric_head, method.net.classifier):
        assert head.weight.grad is not None and torch.all(head.weight.grad == 0)


# --------------------------------------------------------------------------- #
# end to end on Ray: E-step in the actor, 2 DDP workers, MLflow, evaluation
# --------------------------------------------------------------------------- #
@pytest.mark.ray
@pytest.mark.parametrize("name, warmup", [("deepcluster", 0), ("spcl", 1)])
def test_train_end_to_end(ray_local, tmp_path, name, warmup):
    from mlflow.tracking import MlflowClient

    from pcl_ray.workflow import train

    cfg = load_config(PIPELINE, [
        f"method.name={name}",
        "method.temperature=0.1",
        "estep.num_clusters=[10]",
        "train.epochs=2",
        f"train.warmup_epochs={warmup}",
        "ray.num_workers=2",
        f"ray.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=it-cluster",
        "eval.kmeans_restarts=1",
        "eval.baselines=false",
    ])
    out = train(cfg, run_name=f"it-{name}")
    client = MlflowClient(out.tracking_uri)
    assert client.get_run(out.mlflow_run_id).info.status == "FINISHED"
    sizes = client.get_metric_history(out.mlflow_run_id, "estep/k10/size_max")
    assert [m.step for m in sizes] == list(range(warmup + 1, 3))  # the E-step ran every epoch after warm-up
    losses = client.get_metric_history(out.mlflow_run_id, "loss/total")
    assert [m.step for m in losses] == [1, 2] and all(math.isfinite(m.value) for m in losses)
    proto = client.get_metric_history(out.mlflow_run_id, "loss/proto_ce")
    assert [m.step for m in proto] == list(range(warmup + 1, 3))
    assert set(out.eval) == {f"{name}_backbone", f"{name}_head"}
    for row in out.eval.values():
        assert 0.0 <= row["ami"] <= 1.0 and 0.0 < row["knn_acc"] <= 1.0
