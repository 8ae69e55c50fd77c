"""SPCL (Siamese Prototypical Contrastive Learning, Mo, Sun & Li, BMVC 2021).

Loss = ``weight_ntxent · NT-Xent + weight_metric · siamese metric loss + weight_proto · prototypical CE``
(weights and options in ``method.spcl``):

* **NT-Xent** between the two views (τ = ``method.spcl.ntxent_temperature``, paper 0.5); with several
  workers the negatives are the whole global batch, gathered with a gradient-carrying all-gather.
* **Siamese metric loss**: for ``method.spcl.metric_pairs`` pairs of different images of the batch, half
  in the same k-means cluster and half not (:func:`~pcl_ray.losses.balanced_pairs`), a learned linear
  layer maps ``|h_a − h_b|`` to a "same cluster" logit, trained with binary cross-entropy. ``h`` are the
  pooled *backbone* features (what evaluation uses) of view a of the first image and view b of the
  second, so the metric shapes the representation itself rather than only the projection.
* **Prototypical CE** on the epoch's k-means labels: ``softmax(z·Cᵀ/τ)`` against each image's cluster,
  with ``C`` the E-step's L2-normalized centroids (fixed during the epoch, no gradient) and
  τ = ``method.temperature``; symmetric CE (``α·CE + β·RCE``) when ``method.spcl.symmetric_ce``. Both
  views are classified.

Pseudo-labels and centroids come from the *first* granularity of ``estep.num_clusters``; further
granularities are clustered (and logged) but not used, so SPCL pipelines name a single k. During warm-up
(no prototypes yet) only NT-Xent trains.

Differences from the reference code, deliberate: the reference trains a linear classifier on the
pseudo-labels and re-initializes it every ``classifier_init_freq`` epochs; here the classifier is the
epoch's centroids themselves (as PCL's prototypes and DeepCluster-v2's frozen heads), which needs no
re-initialization (and no stale optimizer momentum for re-initialized weights) and adds no parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..losses import accuracy, balanced_pairs, pair_bce, prototype_ce, symmetric_ce
from ..models import Encoder, build_encoder
from .base import Method
from .simclr import global_nt_xent


class SPCLNet(nn.Module):
    """Every trainable module of SPCL; one call runs all trainable computation (one DDP forward per step)."""

    def __init__(self, encoder: Encoder):
        super().__init__()
        self.encoder = encoder
        self.metric_head = nn.Linear(encoder.backbone_dim, 1)

    def forward(self, x: torch.Tensor, first: torch.Tensor, second: torch.Tensor):
        """``x`` is both views stacked ``(2B, ...)``, view a first; ``first``/``second`` index images.

        Returns the L2-normalized projections ``z`` ``(2B, d)`` and the pair logits ``(P,)`` of
        ``|h_a[first] − h_b[second]|``. Both views pass as one batch, so BatchNorm sees both.
        """
        h = self.encoder.backbone(x)
        z = F.normalize(self.encoder.head(h), dim=1)
        b = x.shape[0] // 2
        pair_logits = self.metric_head((h[first] - h[b + second]).abs()).squeeze(1)
        return z, pair_logits


class SPCL(Method):
    name = "spcl"
    needs_estep = True

    def __init__(self, cfg, in_channels: int, generator: torch.Generator | None = None):
        super().__init__(cfg)
        self.spcl = cfg.method.spcl
        self.proto_temperature = cfg.method.temperature
        self.encoder = build_encoder(cfg.model, in_channels)
        self.net = SPCLNet(self.encoder)

    def training_loss(self, online, views, index, prototypes=None, generator=None, epoch=0):
        cfg = self.spcl
        b = views[0].shape[0]
        if prototypes is None:  # warm-up: the metric head runs on zero pairs (an exact 0, see below)
            first = second = index.new_empty(0)
            same = torch.empty(0, dtype=torch.bool, device=index.device)
        else:
            assignments, centroids, _ = prototypes[0]
            labels = assignments[index]
            first, second, same = balanced_pairs(labels, cfg.metric_pairs, generator)

        z, pair_logits = online(torch.cat(views[:2]), first, second)
        z_a, z_b = z[:b], z[b:]
        self.stream_embedding = z_a.detach()
        ntx, logits, targets = global_nt_xent(z_a, z_b, cfg.ntxent_temperature)
        metrics = {"loss/nt_xent": float(ntx.detach()), "acc/instance": accuracy(logits.detach(), targets)}
        metric = pair_bce(pair_logits, same)  # an exact 0 (still in the graph) when there are no pairs
        loss = cfg.weight_ntxent * ntx + cfg.weight_metric * metric
        if prototypes is None:  # the metric head stays in the graph, so DDP sees every parameter used
            return loss, metrics

        targets = labels.repeat(2)  # both views carry their image's pseudo-label
        ce, logits = prototype_ce(z, centroids.detach(), targets, self.proto_temperature)
        proto = symmetric_ce(logits, targets, cfg.sce_alpha, cfg.sce_beta) if cfg.symmetric_ce else ce
        metrics.update({
            "loss/metric": float(metric.detach()),
            "acc/metric": _pair_accuracy(pair_logits.detach(), same),
            "loss/proto_ce": float(proto.detach()),
            "acc/proto": accuracy(logits.detach(), targets),
        })
        return loss + cfg.weight_proto * proto, metrics


def _pair_accuracy(logits: torch.Tensor, same: torch.Tensor) -> float:
    """Percent of pairs whose logit sign matches the same/different label."""
    if logits.numel() == 0:
        return 0.0
    return ((logits > 0) == same).float().mean().item() * 100.0
