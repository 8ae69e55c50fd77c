"""The Ray-free training core: what an epoch trains on, the learning-rate schedule.

Nothing here imports Ray; the Ray Train worker loop (:mod:`pcl_ray.distributed.worker`), ``bench`` and the
tests call the same functions.
"""

from .plan import EpochPlan
from .schedule import lr_at

__all__ = ["EpochPlan", "lr_at"]
