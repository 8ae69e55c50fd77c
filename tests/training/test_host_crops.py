"""Lazily decoded splits crop each image from its full decoded image in the loader (the ImageNet path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pcl_ray.config import load_config
from pcl_ray.data import load_split
from pcl_ray.methods import build_method
from pcl_ray.training import (
    EpochPlan,
    build_view_makers,
    host_crop_spec,
    host_cropped_batches,
    train_step,
)

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "digits_tiny.yaml"


def _folder(root: Path) -> None:
    """Two classes of RGB images of different sizes (so no in-memory tensor can hold them)."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / "train" / cls).mkdir(parents=True)
        for j in range(8):
            h, w = (40, 60) if j % 2 else (64, 48)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "train" / cls / f"{j}.png")


@pytest.fixture()
def lazy(tmp_path):
    _folder(tmp_path)
    cfg = load_config(TINY, ["method.name=moco", "ray.num_workers=1", "data.name=imagefolder",
                             f"data.root={tmp_path}", "data.image_size=16", "train.batch_size=8"])
    ds = load_split(cfg.data, "train")
    method = build_method(cfg, ds.channels, generator=torch.Generator().manual_seed(0))
    return cfg, ds, method


def test_lazy_splits_take_the_host_crop_and_in_memory_splits_do_not(lazy):
    cfg, ds, method = lazy
    spec = host_crop_spec(method, cfg, ds)
    assert ds.tensor is None and spec is not None and spec.size == 16
    assert spec.scale == (cfg.data.views.crop_min_scale, 1.0)
    digits_cfg = load_config(TINY, ["method.name=moco", "ray.num_workers=1"])
    digits = load_split(digits_cfg.data, "train")
    assert host_crop_spec(build_method(digits_cfg, 1), digits_cfg, digits) is None


def test_host_cropped_batches_are_per_image_views_fixed_by_seed_and_epoch(lazy):
    cfg, ds, method = lazy
    spec = host_crop_spec(method, cfg, ds)
    order = EpochPlan(len(ds), 8, 0, 0).rank_indices(0, 1)

    def first(epoch):
        return next(host_cropped_batches(ds, order, 8, spec, 2, seed=0, epoch=epoch))

    images, idx = first(0)
    assert images.shape == (8, 2, 3, 16, 16) and images.dtype == torch.uint8
    assert idx.tolist() == order[:8].tolist()
    assert not torch.equal(images[:, 0], images[:, 1])  # two independent crops per image
    again, _ = first(0)
    assert torch.equal(images, again)  # (seed, epoch, index) fix the crops
    assert not torch.equal(images, first(1)[0])  # a new epoch draws new crops


def test_a_training_step_runs_on_host_crops(lazy):
    cfg, ds, method = lazy
    spec = host_crop_spec(method, cfg, ds)
    makers, _ = build_view_makers(method, cfg, ds, crop_on_device=False)
    images, idx = next(host_cropped_batches(ds, np.arange(len(ds)), 8, spec, 2, seed=0, epoch=0))
    gen = torch.Generator().manual_seed(0)
    views = [make(images[:, i], generator=gen) for i, make in enumerate(makers)]  # 2 × (8×3×16×16)
    assert all(v.shape == (8, 3, 16, 16) and v.dtype == torch.float32 for v in views)
    optimizer = torch.optim.SGD(method.net.parameters(), lr=0.1)
    result = train_step(method, method.net, optimizer, views, idx, None, generator=gen, epoch=0, global_step=0)
    assert torch.isfinite(result.loss)
