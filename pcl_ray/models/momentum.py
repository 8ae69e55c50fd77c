"""Momentum (key) encoder and the negative-key queue of MoCo."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class MomentumEncoder(nn.Module):
    """An EMA copy of the query encoder; never receives gradients."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = copy.deepcopy(encoder)
        for p in self.encoder.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        for pk, pq in zip(self.encoder.parameters(), online.parameters()):
            pk.mul_(momentum).add_(pq.detach(), alpha=1.0 - momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)


class KeyQueue(nn.Module):
    """Fixed-size FIFO of L2-normalized keys (a ring buffer stored as module buffers, so it checkpoints)."""

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        init = F.normalize(torch.randn(size, dim, generator=generator), dim=1) if size > 0 else torch.zeros(0, dim)
        self.register_buffer("keys", init)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def push(self, keys: torch.Tensor) -> None:
        if self.size == 0:
            return
        n = keys.shape[0]
        if n >= self.size:
            self.keys.copy_(keys[-self.size :])
            self.ptr.zero_()
            return
        # Rows ptr, ptr+1, ... (wrapping) take the new keys; the pointer moves on the device, so a push
        # reads nothing back to the host.
        rows = (self.ptr + torch.arange(n, device=self.ptr.device)) % self.size  # (n,) distinct: n < size
        self.keys.index_copy_(0, rows, keys.to(self.keys.dtype))  # keys: (n, d)
        self.ptr.copy_((self.ptr + n) % self.size)
