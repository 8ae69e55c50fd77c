"""SPCL (Siamese Prototypical Contrastive Learning, Mo, Sun & Li, BMVC 2021).

Loss = ``weight_ntxent · NT-Xent + weight_metric · siamese metric loss + weight_proto · prototypical CE``
(weights and options in ``method.spcl``). ``method.spcl.variant`` picks one of two forms; docs/DESIGN.md,
"SPCL", lists every difference from the authors' code and why.

``full`` (default), as the reference:

* **E-step** on the pooled *backbone* features, PCA-whitened to ``min(D, method.spcl.pca_dim)`` dimensions
  and L2-normalized, with a new k-means seed every epoch (from ``(train.seed, estep.seed, epoch)``).
  ``estep.features=stream`` clusters the backbone features of the first *augmented* view, as the reference
  does; the default eval pass uses the deterministic transform.
* **NT-Xent** between the two views (τ = ``method.spcl.ntxent_temperature``, paper 0.5), negatives from the
  whole global batch.
* **Siamese metric loss**: ``method.spcl.metric_pairs`` image pairs of the batch, half in the same k-means
  cluster and half not (:func:`~pcl_ray.losses.balanced_pairs`); a linear head maps ``|h_u − h_v|`` of
  backbone features to a "same cluster" logit; six BCE terms per pair, summed
  (:func:`~pcl_ray.losses.siamese_metric_loss`: two same-image view pairs labelled 1, four cross-image ones).
* **Prototypical CE**: a linear classifier on the backbone features, re-initialized at the first step of
  every epoch with prototypes, trained on the epoch's pseudo-labels; CE of view 1 plus CE of view 2
  (symmetric CE when ``method.spcl.symmetric_ce``).

``lite`` (the earlier variant): k-means on the head's output with a fixed seed, the metric loss over one
cross-image view pair, and the prototypical CE against the frozen centroids in head space
(τ = ``method.temperature``).

Pseudo-labels come from the *first* granularity of ``estep.num_clusters``. During warm-up (no prototypes
yet) only NT-Xent trains; the heads stay in the graph with an exact-0 loss (DDP sees every parameter used).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import (balanced_pairs, pair_bce, prototype_ce, siamese_differences, siamese_metric_loss,
                      symmetric_ce)
from ..models import Encoder, build_backbone, build_encoder
from .base import LossResult, Method, batch_accuracy
from .deepcluster import run_seed
from .simclr import global_nt_xent

#: the reference's classifier initialization: weights N(0, 0.01²), bias 0
CLASSIFIER_INIT_STD = 0.01


class SPCLNet(nn.Module):
    """Every trainable module of SPCL; one call runs all trainable computation (one DDP forward per step)."""

    def __init__(self, encoder: Encoder, num_classes: int | None):
        super().__init__()
        self.encoder = encoder
        self.metric_head = nn.Linear(encoder.backbone_dim, 1)
        #: the full variant's prototypical classifier on backbone features (None in the lite variant)
        self.classifier = nn.Linear(encoder.backbone_dim, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor):
        """``x`` is both views stacked ``(2B, ...)``, view 1 first; ``first``/``second`` ``(P,)`` index images.

        Returns ``h`` ``(2B, D)`` backbone features, ``z`` ``(2B, d)`` L2-normalized projections, the pair
        logits (full: ``(6, P)`` in :data:`~pcl_ray.losses.SIAMESE_TERMS` order; lite: ``(P,)`` of view 1 of
        ``first`` against view 2 of ``second``) and the classifier's ``(2B, k)`` logits (None in lite).
        Both views pass as one batch, so BatchNorm sees both.
        """
        h = self.encoder.backbone(x)  # h: (2B, D)
        z = F.normalize(self.encoder.head(h), dim=1)  # z: (2B, d)
        b = x.shape[0] // 2
        if self.classifier is None:
            pair_logits = self.metric_head((h[first] - h[b + second]).abs()).squeeze(-1)  # (P,)
            return h, z, pair_logits, None
        diffs = siamese_differences(h[:b], h[b:], first, second)  # (6, P, D)
        pair_logits = self.metric_head(diffs).squeeze(-1)  # (6, P)
        return h, z, pair_logits, self.classifier(h)  # class logits: (2B, k)


class SPCL(Method):
    name = "spcl"
    needs_estep = True

    def __init__(self, cfg, in_channels: int, generator: torch.Generator | None = None):
        super().__init__(cfg)
        self.spcl = cfg.method.spcl
        self.full = self.spcl.variant == "full"
        self.proto_temperature = cfg.method.temperature
        self.encoder = build_encoder(cfg.model, in_channels)
        self.net = SPCLNet(self.encoder, cfg.estep.num_clusters[0] if self.full else None)
        # the epoch whose pseudo-labels the classifier was last initialized for; a buffer, so a resumed run
        # re-initializes exactly where an uninterrupted one does
        self.register_buffer("classifier_epoch", torch.tensor(-1, dtype=torch.long))
        self._classifier_epoch_host: int | None = None  # the buffer's value, read once: no sync per step
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_classifier_epoch_host", None))

    @classmethod
    def run_params(cls, cfg) -> dict[str, str]:
        return {"spcl.variant": cfg.method.spcl.variant}

    # ---- E-step -------------------------------------------------------------------------------
    @classmethod
    def estep_options(cls, cfg) -> dict:
        if cfg.method.spcl.variant != "full":
            return {}
        return {"pca_dim": cfg.method.spcl.pca_dim, "reseed": True, "seed": run_seed(cfg)}

    @classmethod
    def estep_dim(cls, cfg) -> int:
        if cfg.method.spcl.variant != "full":
            return cfg.model.feature_dim
        with torch.device("meta"):  # only the width is wanted: no memory, no initialization cost
            _, dim = build_backbone(cfg.model.backbone, 1, cfg.model.width, cfg.model.stem == "small")
        return dim

    def embed_for_estep(self, x: torch.Tensor) -> torch.Tensor:
        """Full: pooled backbone features ``(B, D)`` (the E-step PCA-whitens and normalizes them); lite: ``z``."""
        return self.encoder.backbone(x) if self.full else self.encoder(x)

    # ---- M-step -------------------------------------------------------------------------------
    @torch.no_grad()
    def _fresh_classifier(self, epoch: int) -> None:
        """Re-initialize the classifier for ``epoch``'s pseudo-labels, from a seed of ``(train.seed, epoch)``."""
        gen = torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)
        clf = self.net.classifier
        clf.weight.copy_(torch.randn(clf.weight.shape, generator=gen) * CLASSIFIER_INIT_STD)
        clf.bias.zero_()
        self.classifier_epoch.fill_(epoch)
        self._classifier_epoch_host = epoch

    def _classifier_epoch(self) -> int:
        """``classifier_epoch`` as an int, read from the device once (and again after a state load)."""
        if self._classifier_epoch_host is None:
            self._classifier_epoch_host = int(self.classifier_epoch)
        return self._classifier_epoch_host

    def training_loss(self, online, views, index, prototypes=None, generator=None, epoch=0):
        cfg = self.spcl
        b = views[0].shape[0]
        if prototypes is None:  # warm-up: the heads run on zero pairs (an exact 0, see below)
            first = second = index.new_empty(0)
            same = torch.empty(0, dtype=torch.bool, device=index.device)
        else:
            labels = prototypes[0].assignments[index]  # (B,) pseudo-label of each image
            first, second, same = balanced_pairs(labels, cfg.metric_pairs, generator)  # each (P,)
            if self.full and self._classifier_epoch() != epoch:
                self._fresh_classifier(epoch)

        h, z, pair_logits, class_logits = online(torch.cat(views[:2]), first, second)
        z_1, z_2 = z[:b], z[b:]  # (B, d) each
        ntx, logits, targets = global_nt_xent(z_1, z_2, cfg.ntxent_temperature)
        metrics = {"loss/nt_xent": ntx.detach(), "acc/instance": batch_accuracy(logits.detach(), targets)}
        # the E-step's features of this step's first (augmented) view: (B, D) full, (B, d) lite
        stream = (h[:b] if self.full else z_1).detach()
        if self.full:
            metric = siamese_metric_loss(pair_logits, same)  # sum of six BCE means; exact 0 without pairs
        else:
            metric = pair_bce(pair_logits, same)
        loss = cfg.weight_ntxent * ntx + cfg.weight_metric * metric
        if prototypes is None:
            if class_logits is not None:  # keep the classifier in the graph for DDP
                loss = loss + 0.0 * class_logits.sum()
            return LossResult(loss, metrics, stream_embedding=stream)

        cross = pair_logits[2:] if self.full else pair_logits[None]  # (4 or 1, P) cross-image logits
        metrics.update({"loss/metric": metric.detach(), "acc/metric": _pair_accuracy(cross.detach(), same)})
        proto, proto_logits, targets = self._proto_loss(z, class_logits, labels, prototypes[0].centroids)
        metrics.update({"loss/proto_ce": proto.detach(), "acc/proto": batch_accuracy(proto_logits.detach(), targets)})
        return LossResult(loss + cfg.weight_proto * proto, metrics, stream_embedding=stream)

    def _proto_loss(self, z: torch.Tensor, class_logits: torch.Tensor | None, labels: torch.Tensor,
                    centroids: torch.Tensor):
        """(loss, (2B, k) logits, (2B,) targets) of the prototypical CE; both views carry their image's label."""
        cfg = self.spcl
        targets = labels.repeat(2)  # (2B,)
        if self.full:  # the classifier's CE of view 1 plus that of view 2, as the reference sums them
            b = labels.shape[0]
            parts = [symmetric_ce(lg, labels, cfg.sce_alpha, cfg.sce_beta) if cfg.symmetric_ce
                     else F.cross_entropy(lg, labels) for lg in (class_logits[:b], class_logits[b:])]
            return parts[0] + parts[1], class_logits, targets
        # lite: softmax(z·Cᵀ/τ) against the frozen centroids, mean over both views; logits (2B, k)
        ce, logits = prototype_ce(z, centroids.detach(), targets, self.proto_temperature)
        proto = symmetric_ce(logits, targets, cfg.sce_alpha, cfg.sce_beta) if cfg.symmetric_ce else ce
        return proto, logits, targets


def _pair_accuracy(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor | float:
    """Percent of cross-image pair logits ``(T, P)`` whose sign matches the same/different label ``(P,)``
    (a 0-d tensor: no host sync)."""
    if logits.numel() == 0:
        return 0.0
    return ((logits > 0) == same[None]).float().mean() * 100.0
