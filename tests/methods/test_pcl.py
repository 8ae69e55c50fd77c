"""PCL's training loss with real prototypes from :func:`~pcl_ray.estep.run_estep`, in one process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pcl_ray.config import load_config
from pcl_ray.estep import run_estep
from pcl_ray.methods import build_method
from pcl_ray.training import train_step

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "digits_tiny.yaml"
N, B = 96, 32


@pytest.fixture()
def setup():
    cfg = load_config(TINY, ["method.name=pcl", "ray.num_workers=1", "train.warmup_epochs=0",
                             "estep.num_clusters=[4,8]", "method.queue_size=64"])
    torch.manual_seed(0)
    method = build_method(cfg, 1, generator=torch.Generator().manual_seed(0))
    # synthetic data: 4 bright-square positions, noise; N x 1 x 8 x 8
    g = torch.Generator().manual_seed(0)
    images = 0.1 * torch.rand(N, 1, 8, 8, generator=g)
    for i in range(N):
        r, c = 4 * ((i % 4) // 2), 4 * (i % 2)
        images[i, :, r:r + 4, c:c + 4] += 0.9
    method.estep_module().eval()
    with torch.no_grad():
        emb = method.embed_for_estep(images).numpy()  # N x feature_dim, unit rows
    pset = run_estep(emb, list(cfg.estep.num_clusters), cfg.method.temperature, niter=10, nredo=1, seed=0,
                     backend="cpu", num_threads=1)
    prototypes = pset.to_torch("cpu")
    method.on_prototypes(prototypes)
    return cfg, method, images, prototypes


def _views(images, index, seed):
    g = torch.Generator().manual_seed(seed)
    x = images[index]  # B x 1 x 8 x 8
    return [x + 0.05 * torch.randn(x.shape, generator=g) for _ in range(2)]


def test_proto_nce_trains_with_real_prototypes(setup):
    """The loss falls over a few steps on one batch, once the queue holds real keys (WARM steps fill it:
    before that, its random initial keys make InfoNCE easier than it will be)."""
    cfg, method, images, prototypes = setup
    optimizer = torch.optim.SGD(method.net.parameters(), lr=0.1, momentum=0.9)
    index = torch.arange(B)
    views = _views(images, index, 0)
    ptr0 = int(method.queue.ptr)
    warm = cfg.method.queue_size // B
    losses, protos = [], []
    method.net.train()
    for step in range(warm + 10):
        result = train_step(method, method.net, optimizer, views, index, prototypes,
                            generator=torch.Generator().manual_seed(step), epoch=0, global_step=step)
        assert "acc/proto" in result.metrics and "loss/proto_nce" in result.metrics
        assert int(method.queue.ptr) == (ptr0 + (step + 1) * B) % method.queue.size  # keys enqueued
        if step >= warm:
            losses.append(float(result.loss.detach()))
            protos.append(float(result.metrics["loss/proto_nce"]))
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert np.mean(protos[-3:]) < np.mean(protos[:3]), protos


def test_concentration_changes_the_loss(setup):
    cfg, method, images, prototypes = setup
    index = torch.arange(B)
    views = _views(images, index, 1)
    method.net.eval()  # same batch, same weights: only φ differs

    def proto_loss(protos):
        with torch.no_grad():
            result = method.training_loss(method.net, views, index, protos, generator=torch.Generator().manual_seed(0))
        return float(result.metrics["loss/proto_nce"])

    scaled = [p._replace(concentration=p.concentration * 3.0) for p in prototypes]
    base, hotter = proto_loss(prototypes), proto_loss(scaled)
    assert np.isfinite(base) and np.isfinite(hotter)
    assert abs(base - hotter) > 1e-3, (base, hotter)


def test_warm_up_has_no_proto_terms(setup):
    cfg, method, images, _ = setup
    index = torch.arange(B)
    result = method.training_loss(method.net, _views(images, index, 2), index, None)
    assert set(result.metrics) == {"loss/info_nce", "acc/instance"}
    assert result.enqueue is not None and result.enqueue.shape == (B, cfg.model.feature_dim)
    assert result.stream_embedding is result.enqueue and not result.enqueue.requires_grad
