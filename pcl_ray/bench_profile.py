"""Where a training step's time goes, by kind of operation: the ``mfu`` part's account of its gap to the peak.

:func:`step_breakdown` runs a step function under :mod:`torch.profiler` and sums each operator's *self*
time (on a GPU: the device time of the kernels it launched) into a few kinds, so the shares add up to the
whole profiled time:

``convolution``   oneDNN / cuDNN convolution forward and backward;
``batchnorm``     BatchNorm forward and backward;
``matmul``        mm / addmm / bmm: the projection head, the queue and prototype logits;
``optimizer``     everything under ``Optimizer.step`` and ``zero_grad`` (the update and its elementwise ops);
``elementwise``   every other aten operator: ReLU and its backward, adds, losses, softmax, reductions, copies;
``overhead``      what is not an aten operator: autograd bookkeeping, record functions, Python.

Profiling slows the step a little, so the timing rows of the part come from unprofiled runs and only the
shares come from here.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

KINDS = ("convolution", "batchnorm", "matmul", "optimizer", "elementwise", "overhead")
MATMUL_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmv", "aten::mv"})


def kind_of(name: str, in_optimizer: bool) -> str:
    """The kind (one of :data:`KINDS`) of a profiler event named ``name``."""
    if in_optimizer:
        return "optimizer"
    if "convolution" in name:
        return "convolution"
    if "batch_norm" in name:
        return "batchnorm"
    if name in MATMUL_OPS:
        return "matmul"
    if name.startswith("aten::"):
        return "elementwise"
    return "overhead"


def _under_optimizer(event) -> bool:
    node = event
    while node is not None:
        if node.name.startswith("Optimizer."):
            return True
        node = node.cpu_parent
    return False


def step_breakdown(step: Callable[[], None], repeats: int, device: torch.device) -> dict[str, float]:
    """Share of ``repeats`` profiled calls of ``step`` per kind (sums to 1), after one unprofiled warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(max(1, repeats)):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    totals = dict.fromkeys(KINDS, 0.0)
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # kernels are counted through the CPU operator that launched them
        spent = event.self_device_time_total if device.type == "cuda" else event.self_cpu_time_total
        totals[kind_of(event.name, _under_optimizer(event))] += float(spent)
    whole = sum(totals.values())
    if whole <= 0:
        raise RuntimeError("bench mfu: the profiler recorded no time for the training step")
    return {k: v / whole for k, v in totals.items()}
