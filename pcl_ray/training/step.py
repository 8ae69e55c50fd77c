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


def train_step(method, online: nn.Module, optimizer: torch.optim.Optimizer, views: list[torch.Tensor],
               index: torch.Tensor, prototypes=None, *, generator: torch.Generator | None, epoch: int,
               global_step: int, precision: Precision | None = None) -> LossResult:
    """Run one step on ``views`` (each (B, C, H, W)) of the images ``index`` (B,) and return its result.

    The loss is checked for finiteness here (one device sync per step, worth it: a NaN caught at its step
    names the step instead of poisoning the checkpoint).
    """
    precision = precision or Precision("fp32", "cpu")
    with precision.autocast():
        result = method.training_loss(online, views, index, prototypes, generator=generator, epoch=epoch)
    if not torch.isfinite(result.loss.detach()):
        parts = {k: float(v) for k, v in result.metrics.items()}
        raise FloatingPointError(f"non-finite loss at epoch {epoch + 1} step {global_step}: {parts}")
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
