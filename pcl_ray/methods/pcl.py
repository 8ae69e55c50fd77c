"""PCL: MoCo's InfoNCE plus ProtoNCE against the E-step's prototypes (mean over granularities)."""

from __future__ import annotations

import torch

from ..losses import accuracy, proto_nce_multi
from .moco import MoCo


class PCL(MoCo):
    name = "pcl"
    needs_estep = True

    def training_loss(self, online, views, index, prototypes=None, generator=None, epoch=0):
        q, loss, metrics = self.contrast(online, views)
        if prototypes is None:  # warm-up: InfoNCE only (no proto accuracy is reported, rather than a fake 0)
            return loss, metrics
        assignments = [a[index] for a, _, _ in prototypes]
        centroids = [c for _, c, _ in prototypes]
        phis = [p for _, _, p in prototypes]
        ploss, outs, forms = proto_nce_multi(
            q,
            assignments,
            centroids,
            phis,
            num_negatives=self.method_cfg.num_negative_prototypes,
            form=self.method_cfg.proto_form,
            generator=generator,
        )
        metrics["loss/proto_nce"] = float(ploss.detach())
        metrics["acc/proto"] = sum(accuracy(lg, tg) for lg, tg in outs) / len(outs)
        self.last_forms = forms
        return loss + self.method_cfg.proto_weight * ploss, metrics
