"""MoCo v2: momentum encoder, negative-key queue, InfoNCE. PCL without the prototype term."""

from __future__ import annotations

import torch
from torch import nn

from ..losses import info_nce
from ..models import KeyQueue, MomentumEncoder, build_encoder
from ..models.collectives import concat_all_gather, shuffled_forward
from .base import LossResult, Method, batch_accuracy, unwrap


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

    def estep_module(self) -> nn.Module:
        return self.key_encoder

    def embed_for_estep(self, x: torch.Tensor) -> torch.Tensor:
        """PCL's E-step features: the momentum encoder's normalized output."""
        return self.key_encoder(x)

    def contrast(self, online: nn.Module, views: list[torch.Tensor]) -> tuple[torch.Tensor, LossResult]:
        """Instance-level InfoNCE between the query view and the momentum key of the other view.

        Returns the queries (for PCL's prototype term) and the step's result; the keys go to
        ``result.enqueue`` (pushed by :meth:`after_step`) and, being what :meth:`embed_for_estep` computes on
        this step's second view, to ``result.stream_embedding``.
        """
        q = online(views[0])  # q: BxC, unit rows
        with torch.no_grad():
            self.key_encoder.update(unwrap(online), self.method_cfg.momentum)
            k = shuffled_forward(self.key_encoder, views[1])  # k: BxC, unit rows, no gradient
        negatives = self.queue.keys.clone().detach()  # KxC
        # logits: Bx(1+K), column 0 the positive; targets: B zeros
        loss, logits, targets = info_nce(q, k, negatives, self.method_cfg.temperature)
        metrics = {"loss/info_nce": loss.detach(), "acc/instance": batch_accuracy(logits, targets)}
        return q, LossResult(loss, metrics, stream_embedding=k, enqueue=k)

    def training_loss(self, online, views, index, prototypes=None, generator=None, epoch=0) -> LossResult:
        _, result = self.contrast(online, views)
        return result

    @torch.no_grad()
    def after_step(self, result: LossResult) -> None:
        """Enqueue this step's keys from every rank (the queue stays identical across ranks)."""
        if result.enqueue is not None:
            self.queue.push(concat_all_gather(result.enqueue))  # (world·B)xC
