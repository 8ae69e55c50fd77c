"""The Ray-free training core: what an epoch trains on, the learning-rate schedule, one training step.

Nothing here imports Ray; the Ray Train worker loop (:mod:`pcl_ray.distributed.worker`), ``bench`` and the
tests call the same functions.
"""

from .plan import EpochPlan
from .schedule import lr_at
from .step import Precision, resolve_precision, train_step

__all__ = ["EpochPlan", "Precision", "lr_at", "resolve_precision", "train_step"]
