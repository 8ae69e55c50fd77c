"""The `bench` part ``mfu``: how close the training step runs to the machine's own matmul peak.

Measured in one process, back to back (:func:`pcl_ray.bench._alternating`):

* the FLOPs of one training step per image (forward + backward, :class:`torch.utils.flop_counter.FlopCounterMode`
  on a real :func:`~pcl_ray.training.step.train_step`, views made in advance);
* the machine's fp32 matmul peak (square ``torch.mm``, the same threads), and the step's achieved FLOP/s as a
  fraction of it (model FLOP utilisation, MFU);
* the convolutions alone: every Conv2d of the encoder replayed on its own input shape (forward + backward),
  their FLOP/s against the same peak: the ceiling the step cannot pass while the convolutions dominate;
* the same replay in ``channels_last`` (model and inputs), the layout the channels_last step runs in;
* step variants, alternated against the default: SGD with ``foreach=True`` and the model + views in
  ``channels_last``, the latter also on one thread (what each of the Ray loop's CPU workers runs on);
* the ceiling: the MFU the step would reach if its convolutions ran at their replayed rate (the better
  layout) and every other FLOP at the matmul peak with nothing else costing time;
* where the step's time goes by kind of operation (convolution, BatchNorm, matmul, optimizer, elementwise,
  overhead; :mod:`pcl_ray.bench_profile`), profiled in the faster layout.

The ``compile`` part (named on its own: its warm-up takes a minute or more) times ``torch.compile`` of the
encoders against the eager step, and how long compiling takes (``train.compile``).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .bench_profile import KINDS, step_breakdown
from .training import Precision, train_step
from .training.optim import channels_last_enabled


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of an fp32 (n, n) @ (n, n) matmul on ``device`` (best of ``repeats``)."""
    import time

    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def _conv_inputs(net: nn.Module, run) -> list[tuple[nn.Conv2d, torch.Size]]:
    """Every Conv2d of ``net`` with the input shape it sees during ``run()``."""
    seen: list[tuple[nn.Conv2d, torch.Size]] = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.append((mod, args[0].shape)))
             for m in net.modules() if isinstance(m, nn.Conv2d)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


def _conv_replay(convs: list[tuple[nn.Conv2d, torch.Size]], device: torch.device, channels_last: bool = False):
    """A function running each recorded convolution alone, forward + backward, on random inputs."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    inputs = [(copy.deepcopy(conv).to(device, memory_format=fmt),
               torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_(True))
              for conv, shape in convs]

    def run():
        for conv, x in inputs:
            conv(x).sum().backward()

    return run


def bench_mfu(cfg, ds, method, device, prototypes, report, steps: int, alternating, batch,
              compile_only: bool = False) -> None:
    """The ``mfu`` part's rows (see the module docstring); with ``compile_only`` the ``compile`` part's instead:
    torch.compile's warm-up and its step speed-up against the eager step, both in channels_last."""
    import time

    from .models.encoder import Encoder
    from .training import build_view_makers

    b = cfg.train.batch_size
    images = batch(ds, b, seed=2).to(device)
    index = torch.arange(images.shape[0], device=device)
    epoch = cfg.train.warmup_epochs if prototypes is not None else 0
    precision = Precision.for_device(cfg.train.precision, device)

    def candidate(channels_last: bool, foreach: bool, compiled: bool = False):
        m = copy.deepcopy(method)  # each candidate in its own layout, whatever train.channels_last says
        m.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if compiled:  # as prepare_model compiles: every encoder in place
            for module in m.modules():
                if isinstance(module, Encoder):
                    module.compile()
        makers, _ = build_view_makers(m, cfg, ds)
        gen = torch.Generator(device=device).manual_seed(0)
        views = [v(images, generator=gen) for v in makers]
        if channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        opt = torch.optim.SGD([p for p in m.net.parameters() if p.requires_grad], lr=cfg.train.lr,
                              momentum=cfg.train.sgd_momentum, weight_decay=cfg.train.weight_decay, foreach=foreach)
        m.net.train()
        step_no = [0]

        def step():
            step_no[0] += 1
            train_step(m, m.net, opt, views, index, prototypes, generator=gen, epoch=epoch,
                       global_step=step_no[0], precision=precision)
        return m, step

    if compile_only:  # the compile part: eager against torch.compile, both in channels_last
        _, eager = candidate(True, False)
        _, compiled = candidate(True, False, compiled=True)
        eager()
        eager_s = alternating([eager], 2, warmup=0)[0]
        t0 = time.perf_counter()
        compiled()
        compiled()
        warmup_s = time.perf_counter() - t0 - 2 * eager_s  # compiling, beyond the two steps it ran
        t_eager, t_compiled = alternating([eager, compiled], steps, warmup=1)
        report.add("compile", "torch.compile warm-up (first two steps, less two eager steps)", warmup_s, "s")
        report.add("compile", "speed-up torch.compile / eager (channels_last)", t_eager / t_compiled, "x")
        report.add("compile", "steps until the warm-up is paid back", warmup_s / max(t_eager - t_compiled, 1e-9)
                   if t_compiled < t_eager else float("inf"), "steps")
        return
    base_method, base = candidate(False, False)
    _, fore = candidate(False, True)
    _, cl = candidate(True, False)
    base()  # warm-up (first-touch, oneDNN primitives) before counting
    flops = _flops(base)
    convs = _conv_inputs(base_method.net, base)
    conv_run = _conv_replay(convs, device)
    conv_cl_run = _conv_replay(convs, device, channels_last=True)
    conv_flops = _flops(conv_run)
    peak = matmul_peak(device)
    t_base, t_fore, t_cl, t_conv, t_conv_cl = alternating([base, fore, cl, conv_run, conv_cl_run], steps, warmup=1)
    peak = max(peak, matmul_peak(device))  # measured again after the steps: the better of the two
    one_thread = None
    if device.type == "cpu" and torch.get_num_threads() > 1:  # a Ray CPU worker's setting (one thread each)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            t1_base, t1_cl = alternating([base, cl], max(2, steps // 2), warmup=1)
        finally:
            torch.set_num_threads(threads)
        one_thread = t1_base / t1_cl
    layout_cl = t_cl < t_base
    shares = step_breakdown(cl if layout_cl else base, max(2, steps // 4), device)
    report.add("mfu", "step FLOPs per image (forward + backward)", flops / b / 1e6, "MFLOP")
    report.add("mfu", "convolution share of the step's FLOPs", conv_flops / flops, "fraction")
    report.add("mfu", "fp32 matmul peak (2048^2)", peak / 1e9, "GFLOP/s")
    report.add("mfu", "training step, achieved (default layout)", flops / t_base / 1e9, "GFLOP/s")
    report.add("mfu", "training step MFU, default layout", flops / t_base / peak, "fraction")
    report.add("mfu", "convolutions alone (fwd + bwd), achieved / matmul peak", conv_flops / t_conv / peak,
               "fraction")
    report.add("mfu", "convolutions' share of the step's time", t_conv / t_base, "fraction")
    report.add("mfu", "convolutions alone in channels_last, achieved / matmul peak", conv_flops / t_conv_cl / peak,
               "fraction")
    report.add("mfu", "speed-up SGD foreach=True / default", t_base / t_fore, "x")
    report.add("mfu", "speed-up channels_last / default", t_base / t_cl, "x")
    if one_thread is not None:
        report.add("mfu", "speed-up channels_last / default, 1 thread (a Ray CPU worker)", one_thread, "x")
    report.add("mfu", "training step, achieved (channels_last)", flops / t_cl / 1e9, "GFLOP/s")
    report.add("mfu", "training step MFU, channels_last", flops / t_cl / peak, "fraction")
    trained_cl = channels_last_enabled(cfg, device)
    report.add("mfu", f"training step MFU as the run trains ({'channels_last' if trained_cl else 'default layout'})",
               flops / (t_cl if trained_cl else t_base) / peak, "fraction")
    share = conv_flops / flops
    conv_rate = conv_flops / min(t_conv, t_conv_cl) / peak  # the convolutions' own rate, better layout
    report.add("mfu", "MFU ceiling (convolutions at their replayed rate, other FLOPs at peak)",
               1.0 / (share / conv_rate + (1.0 - share)), "fraction")
    layout = "channels_last" if layout_cl else "default layout"
    for kind in KINDS:
        report.add("mfu", f"step time share: {kind} (profiled, {layout})", shares[kind], "fraction")
