"""PCL: MoCo's InfoNCE plus ProtoNCE against the E-step's prototypes (mean over granularities)."""

from __future__ import annotations

import torch

from ..losses import accuracy, proto_nce_multi, resolve_proto_form
from .moco import MoCo


class PCL(MoCo):
    name = "pcl"
    needs_estep = True

    @classmethod
    def run_params(cls, cfg) -> dict[str, str]:
        """Which ProtoNCE form runs at each granularity (``proto_form.k<k>``: ``sampled`` or ``full``)."""
        local_bs = cfg.train.batch_size // cfg.ray.num_workers
        return {f"proto_form.k{k}": resolve_proto_form(cfg.method.proto_form, k, local_bs,
                                                       cfg.method.num_negative_prototypes)
                for k in cfg.estep.num_clusters}

    def training_loss(self, online, views, index, prototypes=None, generator=None, epoch=0):
        q, loss, metrics = self.contrast(online, views)
        if prototypes is None:  # warm-up: InfoNCE only (no proto accuracy is reported, rather than a fake 0)
            return loss, metrics
        assignments = [a[index] for a, _, _ in prototypes]
        centroids = [c for _, c, _ in prototypes]
        phis = [p for _, _, p in prototypes]
        if self.method_cfg.fixed_proto_temperature:  # ablation: one fixed temperature instead of φ
            phis = [torch.full_like(p, self.method_cfg.temperature) for p in phis]
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
