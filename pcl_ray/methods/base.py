"""The contract every method implements; the worker loop only talks to this interface.

A method is an ``nn.Module`` holding all of its state (so one ``state_dict`` checkpoints it):

- ``self.encoder``: the :class:`~pcl_ray.models.Encoder` whose backbone is evaluated and exported
  (checkpoint keys ``encoder.*``).
- ``self.net``: the module with every trainable parameter. The loop wraps it in DDP
  (``ray.train.torch.prepare_model``) and passes the wrapper as ``online``; ``training_loss``
  must call ``online(...)`` exactly once per step (DDP allows one forward per backward).
- ``needs_estep``: whether the cluster actor runs the epoch-level E-step for this method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..estep.prototypes import PrototypeTensors


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view per batch: output size and the crop's scale range."""

    size: int
    min_scale: float
    max_scale: float = 1.0


@dataclass
class LossResult:
    """What one batch's ``training_loss`` hands back to the training step.

    ``metrics`` values are detached 0-d tensors (or floats); the loop averages them on the device and reads
    them once per log line, so a step does not wait on the device for its metrics.
    """

    loss: torch.Tensor  #: scalar, differentiable
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)
    #: (B, d) detached embeddings in the E-step's space, row i = batch item i (``estep.features=stream``)
    stream_embedding: torch.Tensor | None = None
    #: (B, d) detached keys the method enqueues after ``optimizer.step()`` (MoCo's queue), or None
    enqueue: torch.Tensor | None = None


@torch.no_grad()
def batch_accuracy(logits: torch.Tensor, targets: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Top-1 accuracy in percent as a detached 0-d tensor on the logits' device (no device sync per step;
    :func:`pcl_ray.losses.accuracy` is the float version). ``keep`` (B,) bool: count only those rows."""
    hits = (logits.argmax(dim=1) == targets).float()  # logits: BxC, targets: B -> B
    if keep is None:
        return hits.mean() * 100.0  # 0-d
    keep = keep.float()  # B
    return (hits * keep).sum() * 100.0 / keep.sum().clamp_min(1)  # 0-d: 0 when no row is kept


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module behind a DistributedDataParallel wrapper."""
    return getattr(module, "module", module)


class Method(nn.Module):
    name = "base"
    needs_estep = False

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    @classmethod
    def run_params(cls, cfg) -> dict[str, str]:
        """Extra MLflow params that say which variant of the method this config runs."""
        return {}

    # ---- views ------------------------------------------------------------------------------
    def view_specs(self, image_size: int) -> list[ViewSpec]:
        """Views per image, in the order ``training_loss`` receives them. Default: two global crops."""
        s = self.cfg.data.views.crop_min_scale
        return [ViewSpec(image_size, s), ViewSpec(image_size, s)]

    # ---- E-step -------------------------------------------------------------------------------
    @classmethod
    def estep_options(cls, cfg) -> dict:
        """Extra keyword arguments of :func:`~pcl_ray.estep.run_estep` this method's E-step needs
        (``pca_dim``, ``reseed``, ``seed``; docs/DESIGN.md, "E-step"). Default: none (PCL's E-step)."""
        return {}

    @classmethod
    def estep_dim(cls, cfg) -> int:
        """Width of what :meth:`embed_for_estep` returns. Default: the projection head's ``model.feature_dim``."""
        return cfg.model.feature_dim

    def estep_module(self) -> nn.Module:
        """The module put in eval mode while the E-step embeds the training set."""
        return self.encoder

    def embed_for_estep(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalized embeddings that the cluster actor clusters (called under no_grad, eval mode)."""
        return self.encoder(x)

    def on_prototypes(self, prototypes: "list[PrototypeTensors]") -> None:
        """Called once per epoch with the epoch's prototypes (per granularity: assignments, centroids, φ)."""

    # ---- M-step -------------------------------------------------------------------------------
    def training_loss(self, online: nn.Module, views: list[torch.Tensor], index: torch.Tensor,
                      prototypes: "list[PrototypeTensors] | None" = None,
                      generator: torch.Generator | None = None, epoch: int = 0) -> LossResult:
        """The loss of one batch. ``views[j]`` is (B, C, H, W) view j, ``index`` (B,) the dataset indices;
        methods with an E-step fill ``stream_embedding``."""
        raise NotImplementedError

    def before_optimizer_step(self, epoch: int, global_step: int) -> None:
        """Hook after ``backward()``, before ``optimizer.step()`` (e.g. freeze prototypes early on)."""

    @torch.no_grad()
    def after_step(self, result: LossResult) -> None:
        """Hook after ``optimizer.step()`` with this step's result (queues, re-normalization)."""

    # ---- per-rank state ---------------------------------------------------------------------
    def rank_state(self) -> dict[str, torch.Tensor]:
        """State that differs between ranks (e.g. a per-worker queue), saved by each rank beside the
        checkpoint so that a resume on the same world size continues exactly. Default: none."""
        return {}

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`rank_state` returned (same rank, same world size)."""
