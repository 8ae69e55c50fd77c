"""One optimisation step, exactly as every caller runs it (the Ray worker, ``bench``, the tests).

zero_grad → forward under the run's precision → backward (scaled for fp16) → ``before_optimizer_step`` →
optimizer step → ``after_step`` with the step's :class:`~pcl_ray.methods.base.LossResult`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..methods.base import LossResult

PRECISIONS = ("fp32", "bf16", "fp16")


def resolve_precision(requested: str, device_type: str) -> str:
    """``auto`` is bf16 on a GPU and fp32 on the CPU; fp16 needs a GPU (its grad scaler is a CUDA feature)."""
    if requested == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    if requested not in PRECISIONS:
        raise ValueError(f"train.precision: expected one of auto, {', '.join(PRECISIONS)}; got {requested!r}")
    if requested == "fp16" and device_type != "cuda":
        raise ValueError("train.precision: fp16 needs a GPU (use fp32 or bf16 on a CPU-only run)")
    return requested


@dataclass
class Precision:
    """The autocast dtype of the forward pass, and the grad scaler fp16 needs."""

    name: str  #: fp32 | bf16 | fp16 (resolved)
    device_type: str  #: cpu | cuda

    def __post_init__(self) -> None:
        self.name = resolve_precision(self.name, self.device_type)
        self.scaler = torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None

    @classmethod
    def for_device(cls, requested: str, device: torch.device | str) -> "Precision":
        return cls(requested, torch.device(device).type)

    @property
    def dtype(self) -> torch.dtype | None:
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.name]

    def autocast(self):
        """The forward's context: autocast to bf16/fp16, or nothing for fp32."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def state_dict(self) -> dict:
        return {} if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


class FiniteGuard:
    """Non-finite losses noted on the device and read back only when :meth:`check` is called.

    A loop that checks at its log lines and before its checkpoint costs one device sync per check instead
    of one per step; a NaN still never reaches a checkpoint, and the error names the first bad step and its
    metrics (kept on the device with ``torch.where``, no host read per step).
    """

    def __init__(self) -> None:
        self.first_step: torch.Tensor | None = None  #: 0-d int64: the first non-finite global step, or -1
        self.first_epoch = 0
        self.metrics: dict[str, torch.Tensor] = {}  #: the metrics of that step (tensor-valued ones)

    def note(self, loss: torch.Tensor, metrics: dict, *, epoch: int, global_step: int) -> None:
        bad = ~torch.isfinite(loss.detach())  # 0-d bool, on the loss's device
        if self.first_step is None:
            self.first_step = torch.full((), -1, dtype=torch.int64, device=loss.device)
        fresh = bad & (self.first_step < 0)  # 0-d bool: this step is the first bad one
        self.first_step = torch.where(fresh, torch.full_like(self.first_step, global_step), self.first_step)
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.detach().float().reshape(())
                old = self.metrics.get(key, torch.full_like(value, float("nan")))
                self.metrics[key] = torch.where(fresh, value, old)
        self.first_epoch = epoch  # the loop's epoch: a guard lives for one epoch

    def check(self) -> None:
        """Raise :class:`FloatingPointError` if a noted loss was not finite (one device sync)."""
        if self.first_step is None:
            return
        step = int(self.first_step)
        if step >= 0:
            parts = {k: float(v) for k, v in self.metrics.items()}
            raise FloatingPointError(f"non-finite loss at epoch {self.first_epoch + 1} step {step}: {parts}")


def train_step(method, online: nn.Module, optimizer: torch.optim.Optimizer, views: list[torch.Tensor],
               index: torch.Tensor, prototypes=None, *, generator: torch.Generator | None, epoch: int,
               global_step: int, precision: Precision | None = None,
               guard: FiniteGuard | None = None) -> LossResult:
    """Run one step on ``views`` (each (B, C, H, W)) of the images ``index`` (B,) and return its result.

    Without ``guard`` the loss is checked for finiteness here (one device sync per step). With one, the
    check is noted on the device and made when the caller calls ``guard.check()`` (the worker: at its log
    lines and before the epoch's checkpoint), so a step reads nothing back to the host.
    """
    precision = precision or Precision("fp32", "cpu")
    with precision.autocast():
        result = method.training_loss(online, views, index, prototypes, generator=generator, epoch=epoch)
    if guard is None:
        guard = FiniteGuard()
        guard.note(result.loss, result.metrics, epoch=epoch, global_step=global_step)
        guard.check()
    else:
        guard.note(result.loss, result.metrics, epoch=epoch, global_step=global_step)
    optimizer.zero_grad(set_to_none=True)
    if precision.scaler is not None:
        precision.scaler.scale(result.loss).backward()
        precision.scaler.unscale_(optimizer)  # hooks see true gradients (e.g. SwAV zeroes its prototypes')
        method.before_optimizer_step(epoch, global_step)
        precision.scaler.step(optimizer)
        precision.scaler.update()
    else:
        result.loss.backward()
        method.before_optimizer_step(epoch, global_step)
        optimizer.step()
    method.after_step(result)
    return result
