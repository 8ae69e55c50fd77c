"""SimCLR: one encoder, two views, NT-Xent with in-batch negatives gathered from every worker."""

from __future__ import annotations

import warnings

import torch
import torch.distributed.nn.functional as dist_nn
from torch import nn

from ..losses import nt_xent
from ..models import Encoder, build_encoder
from ..models.collectives import world
from .base import LossResult, Method, batch_accuracy


class SimCLRNet(nn.Module):
    """Both views through the encoder as ONE batch, so BatchNorm normalizes over both views.

    (Two separate forward passes would give each view its own batch statistics, a cue the
    network can use to tell the views apart; and DDP allows one forward per backward.)
    """

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x_a: torch.Tensor, x_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(torch.cat([x_a, x_b]))  # z: 2BxC, rows [0, B) view a, [B, 2B) view b
        return z[: x_a.shape[0]], z[x_a.shape[0] :]  # z_a: BxC, z_b: BxC


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' ``t`` concatenated along dim 0; gradients flow back to each rank's own rows."""
    with warnings.catch_warnings():  # torch 2.14 deprecates it for a private replacement; keep the public API
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*all_gather is deprecated")
        return torch.cat(dist_nn.all_gather(t))  # (world·B)xC


def global_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float):
    """NT-Xent with negatives from the whole global batch (2N - 2 per row) when several workers train.

    The gathered copies carry gradients back to the rank that produced them, so with DDP's gradient
    averaging every worker's update is the gradient of the global-batch loss.
    """
    rank, ws = world()
    if ws == 1:
        return nt_xent(z_a, z_b, temperature)
    return nt_xent(z_a, z_b, temperature, z_a_all=gather_with_grad(z_a), z_b_all=gather_with_grad(z_b),
                   rank_offset=rank * z_a.shape[0])


class SimCLR(Method):
    name = "simclr"
    needs_estep = False

    def __init__(self, cfg, in_channels: int, generator: torch.Generator | None = None):
        super().__init__(cfg)
        self.temperature = cfg.method.temperature
        self.encoder = build_encoder(cfg.model, in_channels)
        self.net = SimCLRNet(self.encoder)

    def training_loss(self, online, views, index, prototypes=None, generator=None, epoch=0) -> LossResult:
        z_a, z_b = online(views[0], views[1])  # z_a, z_b: BxC, unit rows
        # logits: 2Bx2N (N = world·B, own column -inf); targets: 2B, the column of each row's positive
        loss, logits, targets = global_nt_xent(z_a, z_b, self.temperature)
        return LossResult(loss, {"loss/nt_xent": loss.detach(), "acc/instance": batch_accuracy(logits, targets)})
