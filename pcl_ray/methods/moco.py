"""MoCo v2: momentum encoder, negative-key queue, InfoNCE. PCL without the prototype term."""

from __future__ import annotations

import torch
from torch import nn

from ..losses import accuracy, info_nce
from ..models import KeyQueue, MomentumEncoder, build_encoder
from ..models.collectives import concat_all_gather, shuffled_forward
from .base import Method, unwrap


class MoCo(Method):
    name = "moco"
    needs_estep = False

    def __init__(self, cfg, in_channels: int, generator: torch.Generator | None = None):
        super().__init__(cfg)
        self.method_cfg = cfg.method
        self.encoder = build_encoder(cfg.model, in_channels)
        self.net = self.encoder
        self.key_encoder = MomentumEncoder(self.encoder)
        self.queue = KeyQueue(cfg.method.queue_size, cfg.model.feature_dim, generator=generator)
        self._keys: torch.Tensor | None = None

    def estep_module(self) -> nn.Module:
        return self.key_encoder

    def embed_for_estep(self, x: torch.Tensor) -> torch.Tensor:
        """PCL's E-step features: the momentum encoder's normalized output."""
        return self.key_encoder(x)

    def contrast(self, online: nn.Module, views: list[torch.Tensor]):
        """Instance-level InfoNCE between the query view and the momentum key of the other view."""
        q = online(views[0])
        with torch.no_grad():
            self.key_encoder.update(unwrap(online), self.method_cfg.momentum)
            k = shuffled_forward(self.key_encoder, views[1])
        loss, logits, targets = info_nce(q, k, self.queue.keys.clone().detach(), self.method_cfg.temperature)
        self._keys = k
        self.stream_embedding = k  # what embed_for_estep computes, on this step's second view
        metrics = {"loss/info_nce": float(loss.detach()), "acc/instance": accuracy(logits, targets)}
        return q, loss, metrics

    def training_loss(self, online, views, index, prototypes=None, generator=None, epoch=0):
        _, loss, metrics = self.contrast(online, views)
        return loss, metrics

    @torch.no_grad()
    def after_step(self) -> None:
        """Enqueue this step's keys from every rank (the queue stays identical across ranks)."""
        if self._keys is not None:
            self.queue.push(concat_all_gather(self._keys))
            self._keys = None
