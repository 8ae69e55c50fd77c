"""One :func:`~pcl_ray.training.train_step` on the CPU, in each precision the CPU runs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pcl_ray.config import load_config
from pcl_ray.methods import build_method
from pcl_ray.training import EpochMetrics, Precision, train_step

TINY = Path(__file__).resolve().parents[2] / "pipelines" / "digits_tiny.yaml"


def _moco():
    cfg = load_config(TINY, ["method.name=moco", "ray.num_workers=1"])
    torch.manual_seed(0)
    method = build_method(cfg, 1, generator=torch.Generator().manual_seed(0))
    x = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    views = [x, x.flip(-1)]  # 16x1x8x8 each
    optimizer = torch.optim.SGD(method.net.parameters(), lr=0.1, momentum=0.9)
    return method, views, optimizer


@pytest.mark.parametrize("precision", ["fp32", "bf16", "auto"])
def test_a_cpu_step_changes_the_parameters_and_returns_a_finite_loss(precision):
    method, views, optimizer = _moco()
    before = [p.detach().clone() for p in method.net.parameters()]
    ptr = int(method.queue.ptr)
    result = train_step(method, method.net, optimizer, views, torch.arange(16), None, generator=None, epoch=0,
                        global_step=0, precision=Precision.for_device(precision, "cpu"))
    assert result.loss.dim() == 0 and math.isfinite(float(result.loss.detach()))
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in result.metrics.values()), result.metrics
    assert {"loss/info_nce", "acc/instance"} <= set(result.metrics)
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, method.net.parameters(), strict=True)]
    assert sum(changed) > len(changed) // 2
    assert int(method.queue.ptr) == (ptr + 16) % method.queue.size  # after_step enqueued result.enqueue


def test_auto_is_fp32_on_the_cpu():
    assert Precision.for_device("auto", "cpu").name == "fp32" and Precision.for_device("auto", "cpu").scaler is None


def test_fp16_on_the_cpu_names_train_precision():
    with pytest.raises(ValueError, match=r"train\.precision.*fp16 needs a GPU"):
        Precision.for_device("fp16", "cpu")


def test_a_non_finite_loss_names_its_step():
    method, views, optimizer = _moco()
    views = [torch.full_like(v, float("nan")) for v in views]
    with pytest.raises(FloatingPointError, match="epoch 3 step 7"):
        train_step(method, method.net, optimizer, views, torch.arange(16), None, generator=None, epoch=2,
                   global_step=7)


def test_epoch_metrics_average_tensors_and_floats():
    sums = EpochMetrics()
    sums.add({"a": torch.tensor(1.0), "b": 2.0})
    sums.add({"a": torch.tensor(3.0), "b": 4.0})
    assert sums.last("a") == 3.0
    assert sums.means() == {"a": 2.0, "b": 3.0}


def test_channels_last_is_on_by_default_and_one_key_away():
    from pcl_ray.training.optim import channels_last_enabled, prepare_views

    auto = load_config(TINY, ["ray.num_workers=1"])
    assert auto.train.channels_last is None
    assert channels_last_enabled(auto, "cuda") and channels_last_enabled(auto, "cpu")
    off = load_config(TINY, ["ray.num_workers=1", "train.channels_last=false"])
    assert not channels_last_enabled(off, "cpu") and not channels_last_enabled(off, "cuda")
    x = torch.rand(4, 3, 8, 8)  # 4x3x8x8, contiguous
    (y,) = prepare_views([x], auto)
    assert y.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, y)
    (z,) = prepare_views([x], off)  # off: left as it is
    assert z is x
