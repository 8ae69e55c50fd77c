"""DeepCluster-v2: cross-entropy against k-means pseudo-labels through frozen prototype heads.

Reference: Caron et al. 2020 (the SwAV paper, appendix), facebookresearch/swav
``main_deepclusterv2.py``. Each epoch the training set is clustered at every granularity of
``estep.num_clusters``; one bias-free linear head per granularity holds that granularity's
L2-normalized centroids and is never trained (``requires_grad`` False). The M-step loss is, averaged over
heads and over every crop of the batch, ``CE(softmax(z·Pᵀ/τ), assignment of the image)`` with
τ = ``method.temperature`` (0.1, the reference's, when not given) and an ignore index for unassigned images.
As in the reference, the projection head is Linear-BN-ReLU-Linear and every epoch's k-means draws a new seed
(from ``(train.seed, estep.seed, epoch)``, so a resumed run draws the same). docs/DESIGN.md, "DeepCluster-v2".

Differences from the reference, all deliberate:

* E-step features: the reference clusters a memory bank of last epoch's *training* embeddings
  (prototypes one epoch stale). By default the loop's E-step makes a fresh eval-mode pass of the online
  encoder over the training set at the start of the epoch (deterministic transform);
  ``estep.features=stream`` clusters the first crop's training embeddings of the previous epoch, as the
  reference does.
* k-means: the cluster actor's faiss k-means (Euclidean on unit vectors, centroids L2-normalized
  afterwards) rather than the reference's hand-written spherical k-means; faiss re-splits empty
  clusters, and if one ever comes back empty its head keeps the previous centroid (as the reference).
* Warm-up: the reference clusters from epoch 0 (random-init features) and has no other loss, so there is
  nothing to train before the first E-step: this method requires ``train.warmup_epochs == 0``
  (checked when the config is loaded).
* Views: two global crops of the same size (the base :class:`Method` default) in one forward pass; the
  paper's multi-crop (2×224 + 6×96) is not wired up here.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..losses import prototype_ce
from ..models import build_encoder
from .base import LossResult, Method, batch_accuracy

IGNORE_INDEX = -1


class DeepClusterV2(Method):
    name = "deepcluster"
    needs_estep = True

    def __init__(self, cfg, in_channels: int, generator: torch.Generator | None = None):
        super().__init__(cfg)
        if cfg.train.warmup_epochs != 0:
            raise ValueError(warmup_error(cfg.train.warmup_epochs))
        self.temperature = cfg.method.temperature
        self.encoder = build_encoder(cfg.model, in_channels)  # model.head_bn: true (config)
        self.net = self.encoder
        d = cfg.model.feature_dim
        self.prototypes = nn.ModuleList(nn.Linear(d, k, bias=False) for k in cfg.estep.num_clusters)
        with torch.no_grad():
            for head in self.prototypes:
                head.weight.requires_grad_(False)
                head.weight.copy_(F.normalize(head.weight, dim=1))

    @classmethod
    def estep_options(cls, cfg) -> dict:
        """A new k-means seed every epoch, as the reference (its seed changes from one clustering to the next)."""
        return {"reseed": True, "seed": run_seed(cfg)}

    def embed_for_estep(self, x: torch.Tensor) -> torch.Tensor:
        """The online encoder's L2-normalized output (a fresh eval-mode pass; see the module docstring)."""
        return self.encoder(x)

    @torch.no_grad()
    def on_prototypes(self, prototypes) -> None:
        """Copy each granularity's centroids into its frozen head; an empty cluster keeps its old centroid."""
        if len(prototypes) != len(self.prototypes):
            raise ValueError(f"expected {len(self.prototypes)} granularities (estep.num_clusters), "
                             f"got {len(prototypes)}")
        for head, p in zip(self.prototypes, prototypes, strict=True):
            if p.centroids.shape != head.weight.shape:
                raise ValueError(f"centroids of shape {tuple(p.centroids.shape)} do not fit the prototype head "
                                 f"{tuple(head.weight.shape)}")
            assigned = p.assignments[p.assignments != IGNORE_INDEX]  # (N',)
            filled = torch.bincount(assigned, minlength=head.out_features) > 0  # (k,)
            head.weight.copy_(torch.where(filled[:, None], p.centroids.to(head.weight), head.weight))  # (k, d)

    def training_loss(self, online, views, index, prototypes=None, generator=None, epoch=0):
        if prototypes is None:
            raise RuntimeError(warmup_error(self.cfg.train.warmup_epochs))
        if len({tuple(v.shape[1:]) for v in views}) != 1:
            raise ValueError("deepcluster: every view must have the same shape (one forward over all crops)")
        z = online(torch.cat(views))  # z: (C·B, d), crop-major: rows [c*B, (c+1)*B) are crop c of the batch
        losses, accs = [], []
        for head, p in zip(self.prototypes, prototypes, strict=True):
            targets = p.assignments[index].repeat(len(views))  # (C·B,)
            # logits: (C·B, k) = z · Pᵀ / τ
            loss, logits = prototype_ce(z, head.weight, targets, self.temperature, ignore_index=IGNORE_INDEX)
            losses.append(loss)
            keep = targets != IGNORE_INDEX
            accs.append(batch_accuracy(logits.detach(), targets, keep))  # 0-d, over the labelled rows
        loss = torch.stack(losses).mean()  # mean over granularities
        metrics = {"loss/proto_ce": loss.detach(), "acc/proto": sum(accs) / len(accs)}
        # the first crop's embeddings (B, d): the reference's memory bank (estep.features=stream)
        return LossResult(loss, metrics, stream_embedding=z[: views[0].shape[0]].detach())


def run_seed(cfg) -> int:
    """The base of the per-epoch k-means seeds: one number of ``(train.seed, estep.seed)``."""
    return int(np.random.SeedSequence([cfg.train.seed, cfg.estep.seed]).generate_state(1)[0] & 0x7FFFFFFF)


def warmup_error(warmup_epochs: int) -> str:
    return (f"train.warmup_epochs must be 0 for method.name=deepcluster, got {warmup_epochs}: DeepCluster-v2 "
            "trains only on k-means pseudo-labels, clustered from the first epoch (as the reference does), "
            "so there is no loss to warm up with")
