"""SPCL as its reference builds it: E-step on PCA-whitened backbone features, a fresh classifier per epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pcl_ray.config import load_config
from pcl_ray.distributed.trainer import estep_dim, estep_kwargs
from pcl_ray.estep.prototypes import PrototypeTensors
from pcl_ray.methods import build_method

PIPELINE = Path(__file__).resolve().parents[2] / "pipelines" / "digits_tiny.yaml"
B, K = 16, 4


def _method(*overrides: str):
    cfg = load_config(PIPELINE, ["method.name=spcl", f"estep.num_clusters=[{K}]", *overrides])
    torch.manual_seed(0)
    return cfg, build_method(cfg, 1)


def _batch(cfg, n: int = 64):
    g = torch.Generator().manual_seed(0)
    size = 8  # a small image keeps the convnet cheap; the pooled features do not depend on the size
    views = [torch.randn(B, 1, size, size, generator=g) for _ in range(2)]
    labels = torch.arange(n) % K
    protos = [PrototypeTensors(labels, torch.nn.functional.normalize(torch.randn(K, 3), dim=1), torch.ones(K))]
    return views, torch.arange(B), protos


def test_full_variant_asks_its_estep_for_pca_whitening_and_a_seed_per_epoch():
    cfg, method = _method()
    kwargs = estep_kwargs(cfg, gpu=False)
    assert kwargs["pca_dim"] == 256 and kwargs["reseed"] is True
    assert estep_dim(cfg) == method.encoder.backbone_dim  # the cluster actor stores backbone features
    with torch.no_grad():
        method.eval()
        x = torch.randn(3, 1, 8, 8)
        assert torch.equal(method.embed_for_estep(x), method.encoder.backbone(x))


def test_lite_variant_keeps_the_head_space_estep_with_a_fixed_seed():
    cfg, method = _method("method.spcl.variant=lite")
    kwargs = estep_kwargs(cfg, gpu=False)
    assert "pca_dim" not in kwargs and "reseed" not in kwargs
    assert estep_dim(cfg) == cfg.model.feature_dim
    assert method.net.classifier is None


def test_classifier_is_fresh_at_each_epochs_first_step_and_the_same_on_a_resume():
    cfg, method = _method()
    views, index, protos = _batch(cfg)
    clf = method.net.classifier
    method.training_loss(method.net, views, index, protos, generator=torch.Generator(), epoch=3)
    init3 = clf.weight.detach().clone()
    assert torch.all(clf.bias == 0) and init3.std() == pytest.approx(0.01, rel=0.2)
    with torch.no_grad():
        clf.weight.add_(1.0)  # "training" within the epoch
    method.training_loss(method.net, views, index, protos, generator=torch.Generator(), epoch=3)
    assert torch.equal(clf.weight, init3 + 1.0)  # same epoch: no re-initialization
    method.training_loss(method.net, views, index, protos, generator=torch.Generator(), epoch=4)
    init4 = clf.weight.detach().clone()
    assert not torch.allclose(init4, init3 + 1.0) and not torch.equal(init4, init3)

    # a resumed run (state saved after epoch 3) draws the same epoch-4 classifier
    _, resumed = _method()
    state = method.state_dict()
    state["classifier_epoch"] = torch.tensor(3)
    resumed.load_state_dict(state)
    resumed.training_loss(resumed.net, views, index, protos, generator=torch.Generator(), epoch=4)
    assert torch.equal(resumed.net.classifier.weight, init4)


def test_full_loss_is_the_weighted_sum_of_its_parts_and_metric_has_six_terms():
    cfg, method = _method("method.spcl.weight_metric=0.5", "method.spcl.weight_proto=2.0")
    views, index, protos = _batch(cfg)
    result = method.training_loss(method.net, views, index, protos, generator=torch.Generator().manual_seed(1))
    m = {k: float(v) for k, v in result.metrics.items()}
    s = cfg.method.spcl
    expected = s.weight_ntxent * m["loss/nt_xent"] + 0.5 * m["loss/metric"] + 2.0 * m["loss/proto_ce"]
    assert float(result.loss.detach()) == pytest.approx(expected, rel=1e-5)
    # six BCE means of an untrained head (logits near 0) sum to about 6 ln 2, not ln 2
    assert 3.0 < m["loss/metric"] < 6.0
    # the classifier's CE of view 1 plus that of view 2: about 2 ln k at initialization
    assert m["loss/proto_ce"] == pytest.approx(2 * np.log(K), rel=0.1)
    assert result.stream_embedding.shape == (B, method.encoder.backbone_dim)
