"""The Ray-free training core: what an epoch trains on, the learning-rate schedule, one training step.

Nothing here imports Ray; the Ray Train worker loop (:mod:`pcl_ray.distributed.worker`), ``bench`` and the
tests call the same functions.
"""

from .embed import embed_shard, estep_shard
from .epoch import run_epoch
from .metrics import EpochMetrics
from .optim import build_optimizer, prepare_model, prepare_views
from .plan import EpochPlan
from .schedule import lr_at
from .state import RANK_STATE_GLOB, STATE_FILE, load_state, rank_state_file, save_state, stream_state_file
from .step import FiniteGuard, Precision, resolve_precision, train_step
from .stream import StreamedEmbeddings
from .views import build_view_makers, host_crop_spec, host_cropped_batches

__all__ = [
    "EpochMetrics", "EpochPlan", "FiniteGuard", "Precision", "RANK_STATE_GLOB", "STATE_FILE", "StreamedEmbeddings",
    "build_optimizer", "build_view_makers", "embed_shard", "estep_shard", "host_crop_spec", "host_cropped_batches", "load_state", "lr_at", "prepare_model",
    "prepare_views", "rank_state_file", "resolve_precision", "run_epoch", "save_state", "stream_state_file",
    "train_step",
]
