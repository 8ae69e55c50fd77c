"""The step profile's kinds: operator names sorted into kinds, shares of a profiled step adding up to 1."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pcl_ray.bench_profile import KINDS, kind_of, step_breakdown


def test_operator_names_are_sorted_into_kinds():
    assert kind_of("aten::mkldnn_convolution", False) == "convolution"
    assert kind_of("aten::convolution_backward", False) == "convolution"
    assert kind_of("aten::native_batch_norm_backward", False) == "batchnorm"
    assert kind_of("aten::addmm", False) == "matmul"
    assert kind_of("aten::threshold_backward", False) == "elementwise"
    assert kind_of("autograd::engine::evaluate_function: AddmmBackward0", False) == "overhead"
    assert kind_of("aten::add_", True) == "optimizer"  # an op under Optimizer.step is the optimizer's


def _stepper(net: nn.Module, x: torch.Tensor):
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)

    def step():
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    return step


def test_a_linear_net_spends_nothing_in_convolutions_and_a_conv_net_does():
    torch.manual_seed(0)
    linear = step_breakdown(_stepper(nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)),
                                     torch.randn(128, 64)), 3, torch.device("cpu"))
    assert set(linear) == set(KINDS) and sum(linear.values()) == pytest.approx(1.0)
    assert linear["convolution"] == 0 and linear["batchnorm"] == 0
    assert linear["matmul"] > 0 and linear["optimizer"] > 0
    conv = step_breakdown(_stepper(nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten()),
                                   torch.randn(32, 3, 16, 16)), 3, torch.device("cpu"))
    assert conv["convolution"] > 0 and conv["batchnorm"] > 0 and conv["matmul"] == 0
