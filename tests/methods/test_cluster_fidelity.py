"""SwAV and DeepCluster-v2 as their references build them: BN in the projection head, τ 0.1, reseeded k-means."""

from __future__ import annotations


import pytest
from torch import nn

from pcl_ray.config import DEFAULT_TEMPERATURE, METHOD_TEMPERATURES, load_config
from pcl_ray.distributed.trainer import estep_kwargs
from pcl_ray.methods import METHODS, build_method



def _cfg(name: str, *overrides: str):
    warm = ["train.warmup_epochs=0"] if name == "deepcluster" else []
    return load_config(None, [f"method.name={name}", *warm, *overrides])


def _head_layers(method) -> list[type]:
    return [type(m) for m in method.encoder.head.net]


@pytest.mark.parametrize("name", ["swav", "deepcluster"])
def test_swav_and_deepcluster_heads_are_linear_bn_relu_linear(name):
    method = build_method(_cfg(name), 1)
    assert _head_layers(method) == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


@pytest.mark.parametrize("name", ["pcl", "moco", "simclr", "spcl"])
def test_other_heads_keep_no_bn(name):
    assert nn.BatchNorm1d not in _head_layers(build_method(_cfg(name), 1))


@pytest.mark.parametrize("name", sorted(METHODS))
def test_temperature_default_resolves_per_method(name):
    cfg = _cfg(name)
    assert cfg.method.temperature == METHOD_TEMPERATURES.get(name, DEFAULT_TEMPERATURE)
    assert cfg.flat()["method.temperature"] == cfg.method.temperature  # what MLflow logs is what runs
    assert _cfg(name, "method.temperature=0.3").method.temperature == 0.3  # a given value always wins


def test_swav_and_deepcluster_default_to_their_references_tau():
    assert _cfg("swav").method.temperature == 0.1 and _cfg("deepcluster").method.temperature == 0.1
    assert _cfg("pcl").method.temperature == 0.2 and _cfg("moco").method.temperature == 0.2


@pytest.mark.parametrize("name, reseed", [("deepcluster", True), ("spcl", True), ("pcl", False)])
def test_reseeding_methods_ask_for_a_new_kmeans_seed_each_epoch(name, reseed):
    kw = estep_kwargs(_cfg(name), gpu=False)
    assert kw.get("reseed", False) is reseed
    if reseed:  # the base seed follows the run's seed, so the 3-seed comparison varies the k-means draws too
        assert kw["seed"] != estep_kwargs(_cfg(name, "train.seed=1"), gpu=False)["seed"]


@pytest.mark.parametrize("name", sorted(METHODS))
def test_head_bn_resolves_per_method_and_can_be_overridden(name):
    cfg = _cfg(name)
    assert cfg.model.head_bn is (name in ("swav", "deepcluster"))
    assert cfg.flat()["model.head_bn"] == cfg.model.head_bn  # logged as run
    # the evaluation's encoder (build_encoder on cfg.model alone) matches the trained one's keys
    from pcl_ray.models import build_encoder

    method = build_method(cfg, 1)
    assert build_encoder(cfg.model, 1).state_dict().keys() == method.encoder.state_dict().keys()
    off = _cfg(name, "model.head_bn=false")
    assert nn.BatchNorm1d not in _head_layers(build_method(off, 1))
