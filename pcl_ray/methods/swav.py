"""SwAV: online Sinkhorn codes, swapped prediction between multi-crop views (Caron et al., 2020).

Follows the reference ``main_swav.py`` (facebookresearch/swav); docs/DESIGN.md, "SwAV", lists the differences:

- crops 0 and 1 are the two large crops; the others are small (multi-crop). Crops of equal
  resolution go through the backbone as one batch (one BN batch per resolution group), then the
  projection head (Linear-BN-ReLU-Linear, as the reference) runs once on every crop's features;
- τ defaults to 0.1 (the reference's) when ``method.temperature`` is not given (``config.METHOD_TEMPERATURES``);
- prototypes are a bias-free linear layer whose rows are re-normalized before every
  forward (under ``no_grad``), so scores are cosine similarities;
- codes come from the large crops' scores under ``no_grad`` via Sinkhorn over the global
  batch (optionally with a per-worker queue of past embeddings prepended);
- prototype gradients are dropped for the first ``freeze_prototypes_iters`` steps;
- a stuck loss (≈ ln K for a whole epoch after the first) raises a collapse warning.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..losses import sinkhorn, swapped_prediction_loss
from ..models import Encoder, build_encoder
from ..models.collectives import world
from .base import LossResult, Method, ViewSpec, unwrap

#: the crops whose codes are computed (``crops_for_assign`` in the reference): the large ones.
NUM_LARGE_CROPS = 2
#: a loss within this fraction of ln K for a whole epoch is reported as a probable collapse.
COLLAPSE_TOLERANCE = 0.01

_REDUCE_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}


def _dist_all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """The ``all_reduce`` callable that :func:`~pcl_ray.losses.sinkhorn` expects, over the default group."""
    dist.all_reduce(t, op=_REDUCE_OPS[op])
    return t


def resolution_groups(crops: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Consecutive crops of the same spatial size, grouped (the reference's ``unique_consecutive``)."""
    groups: list[list[torch.Tensor]] = []
    for crop in crops:
        if groups and groups[-1][0].shape[-2:] == crop.shape[-2:]:
            groups[-1].append(crop)
        else:
            groups.append([crop])
    return groups


class SwAVNet(nn.Module):
    """Encoder + bias-free prototype layer; ``forward(crops) -> (embeddings, scores)``."""

    def __init__(self, encoder: Encoder, feature_dim: int, num_prototypes: int):
        super().__init__()
        self.encoder = encoder
        self.prototypes = nn.Linear(feature_dim, num_prototypes, bias=False)
        self.normalize_prototypes()

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """L2-normalize every prototype in place (unnormalized prototypes make Sinkhorn's ε meaningless)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))

    def forward(self, crops: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings ``(n_crops·B, d)`` (L2-normalized) and prototype scores ``(n_crops·B, K)``, crop-major."""
        self.normalize_prototypes()
        # h: (n_crops·B, D) backbone features, one backbone pass per resolution group
        h = torch.cat([self.encoder.backbone(torch.cat(group)) for group in resolution_groups(crops)])
        z = F.normalize(self.encoder.head(h), dim=1)  # z: (n_crops·B, d), one head pass (its BN sees every crop)
        return z, self.prototypes(z)  # scores: (n_crops·B, K) cosine similarities


class SwAV(Method):
    name = "swav"
    needs_estep = False

    def __init__(self, cfg, in_channels: int, generator: torch.Generator | None = None):
        super().__init__(cfg)
        self.swav_cfg = cfg.method.swav
        self.temperature = cfg.method.temperature
        self.encoder = build_encoder(cfg.model, in_channels)  # model.head_bn: true (config)
        self.net = SwAVNet(self.encoder, cfg.model.feature_dim, self.swav_cfg.num_prototypes)
        # Per-worker queue of past large-crop embeddings, allocated when it activates. Not part of
        # the state dict (each worker's queue holds its own shard's samples): every rank saves its own
        # beside the checkpoint (rank_state), so a resume on the same world size continues exactly; on
        # another world size every worker refills its queue (queue_length / batch steps).
        self._queue: torch.Tensor | None = None
        self._queue_filled = 0
        # collapse check: per-epoch running mean and largest distance of the loss from ln K
        self._epoch: int | None = None
        self._epoch_steps = 0
        self._epoch_loss_sum = 0.0
        self._epoch_max_gap = 0.0
        self._steps_per_epoch: int | None = None
        self._collapse_warned = False

    # ---- views --------------------------------------------------------------------------------
    def view_specs(self, image_size: int) -> list[ViewSpec]:
        """Two large crops (full resolution), then ``num_small_crops`` low-resolution crops."""
        s = self.swav_cfg
        large = ViewSpec(image_size, s.large_crop_min_scale)
        small = ViewSpec(s.small_crop_size, *s.small_crop_scale)
        return [large] * NUM_LARGE_CROPS + [small] * s.num_small_crops

    # ---- M-step -------------------------------------------------------------------------------
    def training_loss(self, online, views, index, prototypes=None, generator=None, epoch=0):
        if len(views) < NUM_LARGE_CROPS:
            raise ValueError(f"SwAV needs at least {NUM_LARGE_CROPS} crops, got {len(views)}")
        b = views[0].shape[0]
        z, scores = online(views)  # z: (n_crops·B, d), scores: (n_crops·B, K)
        scores_per_crop = scores.split(b)  # n_crops x (B, K)
        codes, used_queue = self._codes(unwrap(online), z, scores_per_crop, b, epoch)  # 2 x (B, K), rows sum to 1
        loss = swapped_prediction_loss(scores_per_crop, codes, self.temperature)
        self._track_collapse(loss.detach(), epoch)
        with torch.no_grad():
            q = codes[0]  # q: (B, K)
            entropy = -(q * torch.log(q.clamp_min(1e-12))).sum(dim=1).mean()
            # prototypes that are some row's argmax: (K,) hit marks summed, no host sync (unique() would wait)
            distinct = q.new_zeros(q.shape[1]).index_fill_(0, q.argmax(dim=1), 1.0).sum()
            metrics = {
                "loss/swav": loss.detach(),
                "codes/distinct": distinct,
                "codes/entropy": entropy,
                "codes/queue_used": float(used_queue),
            }
        return LossResult(loss, metrics)

    @torch.no_grad()
    def _codes(self, net: SwAVNet, z: torch.Tensor, scores_per_crop, b: int, epoch: int):
        """Sinkhorn codes of the large crops (queue scores prepended once the queue is full)."""
        s = self.swav_cfg
        _, ws = world()
        all_reduce = _dist_all_reduce if ws > 1 else None
        queue = self._active_queue(epoch, b, ws, z)
        use_queue = queue is not None and self._queue_filled >= queue.shape[1]
        codes = []
        for i in range(NUM_LARGE_CROPS):
            out = scores_per_crop[i].detach()  # (B, K)
            if use_queue:  # (L + B, K): the queue's scores first
                out = torch.cat([queue[i] @ net.prototypes.weight.t(), out])
            codes.append(sinkhorn(out, s.epsilon, s.sinkhorn_iterations, world_size=ws, all_reduce=all_reduce)[-b:])
        if queue is not None:  # FIFO: newest embeddings first, as in the reference
            queue[:, b:] = queue[:, :-b].clone()
            queue[:, :b] = z[: NUM_LARGE_CROPS * b].detach().view(NUM_LARGE_CROPS, b, -1)
            self._queue_filled += b
        return codes, use_queue

    def rank_state(self) -> dict[str, torch.Tensor]:
        if self._queue is None:
            return {}
        return {"queue": self._queue.detach().cpu(), "queue_filled": torch.tensor(self._queue_filled)}

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        if "queue" in state:
            device = next(self.parameters()).device
            self._queue = state["queue"].to(device)
            self._queue_filled = int(state["queue_filled"])

    def _active_queue(self, epoch: int, b: int, ws: int, z: torch.Tensor) -> torch.Tensor | None:
        """This worker's queue ``(2, L, d)`` from ``queue_start_epoch`` on (``None`` before, or when disabled)."""
        s = self.swav_cfg
        if s.queue_length == 0 or epoch < s.queue_start_epoch:
            return None
        if self._queue is None:
            # the reference rounds the global queue down to a multiple of the global batch
            per_worker = (s.queue_length // ws) // b * b
            if per_worker == 0:
                raise ValueError(
                    f"method.swav.queue_length={s.queue_length} is smaller than the global batch ({b * ws}); "
                    "use 0 (no queue) or a multiple of the batch size"
                )
            self._queue = z.new_zeros(NUM_LARGE_CROPS, per_worker, z.shape[1])
            self._queue_filled = 0
        return self._queue

    def before_optimizer_step(self, epoch: int, global_step: int) -> None:
        """Freeze the prototypes for the first ``freeze_prototypes_iters`` steps (no update at all)."""
        if global_step < self.swav_cfg.freeze_prototypes_iters:
            self.net.prototypes.weight.grad = None

    # ---- health -------------------------------------------------------------------------------
    def _track_collapse(self, loss: torch.Tensor | float, epoch: int) -> None:
        """Warn once when the loss stays within 1 % of ln K for a whole epoch after the first.

        A uniform prediction over K prototypes scores exactly ln K whatever the codes, so a loss
        pinned there means the prototypes carry no information. Cost: a few tensor operations per
        step, summed on the loss's device and read back once per epoch (at its last step). The epoch
        length is learned from the first full epoch this process trains.
        """
        loss = torch.as_tensor(loss, dtype=torch.float32).detach()  # 0-d
        if epoch != self._epoch:
            if self._epoch is not None:
                self._steps_per_epoch = self._epoch_steps
            self._epoch, self._epoch_steps = epoch, 0
            self._epoch_loss_sum, self._epoch_max_gap = torch.zeros_like(loss), torch.zeros_like(loss)
        ln_k = math.log(self.swav_cfg.num_prototypes)
        self._epoch_steps += 1
        self._epoch_loss_sum = self._epoch_loss_sum + loss
        self._epoch_max_gap = torch.maximum(self._epoch_max_gap, (loss - ln_k).abs() / ln_k)
        if (self._collapse_warned or epoch < 1 or self._steps_per_epoch is None
                or self._epoch_steps != self._steps_per_epoch):
            return
        if float(self._epoch_max_gap) > COLLAPSE_TOLERANCE:  # the epoch's one host read
            return
        self._collapse_warned = True
        s = self.swav_cfg
        warnings.warn(
            f"SwAV looks collapsed: the swapped-prediction loss stayed within {COLLAPSE_TOLERANCE:.0%} of "
            f"ln K = {ln_k:.3f} (K = {s.num_prototypes} prototypes) for all of epoch {epoch + 1} "
            f"(mean {float(self._epoch_loss_sum) / self._epoch_steps:.3f}): the predictions are uniform over the "
            f"prototypes. Probable causes: a queue started too early or too large for the data "
            f"(method.swav.queue_length={s.queue_length}, queue_start_epoch={s.queue_start_epoch}), "
            f"a too large learning rate (train.lr), or a Sinkhorn epsilon too large for the score range "
            f"(method.swav.epsilon={s.epsilon}); prototypes unfrozen too early can also cause it "
            f"(freeze_prototypes_iters={s.freeze_prototypes_iters}).",
            RuntimeWarning,
            stacklevel=2,
        )
