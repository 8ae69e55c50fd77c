"""PCL: MoCo's InfoNCE plus ProtoNCE against the E-step's prototypes (mean over granularities)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..losses.contrastive import check_assignment_range, proto_nce_multi, resolve_proto_form
from .base import LossResult, batch_accuracy
from .moco import MoCo

if TYPE_CHECKING:
    from ..estep.prototypes import PrototypeTensors


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

    def on_prototypes(self, prototypes: "list[PrototypeTensors]") -> None:
        """Check each granularity's assignments once per hand-off (the steps skip the check: no host sync)."""
        super().on_prototypes(prototypes)
        for p in prototypes:  # assignments (N,), centroids (k, d): one sync per granularity per epoch
            check_assignment_range(p.assignments, p.centroids.shape[0], what="E-step hand-off: assignments")

    def training_loss(self, online, views, index, prototypes: "list[PrototypeTensors] | None" = None,
                      generator=None, epoch=0) -> LossResult:
        q, result = self.contrast(online, views)  # q: BxC
        if prototypes is None:  # warm-up: InfoNCE only (no proto accuracy is reported, rather than a fake 0)
            return result
        assignments = [p.assignments[index] for p in prototypes]  # per granularity m: B cluster ids in [0, k_m)
        centroids = [p.centroids for p in prototypes]  # per m: k_m x C, unit rows
        phis = [p.concentration for p in prototypes]  # per m: k_m, φ of each centroid
        if self.method_cfg.fixed_proto_temperature:  # ablation: one fixed temperature instead of φ
            phis = [torch.full_like(phi, self.method_cfg.temperature) for phi in phis]
        # ploss: 0-d mean over granularities; outs: per m (logits Bx(1+r) or Bxk_m, targets B)
        ploss, outs, _ = proto_nce_multi(
            q,
            assignments,
            centroids,
            phis,
            num_negatives=self.method_cfg.num_negative_prototypes,
            form=self.method_cfg.proto_form,
            generator=generator,
            check_values=False,  # checked in on_prototypes
        )
        result.metrics["loss/proto_nce"] = ploss.detach()
        result.metrics["acc/proto"] = torch.stack([batch_accuracy(lg, tg) for lg, tg in outs]).mean()
        result.loss = result.loss + self.method_cfg.proto_weight * ploss
        return result
