"""Pure loss functions, one module per loss family; everything is re-exported here.

No state, no Ray, no config objects: tensors in, tensors out.
"""

from .contrastive import (
    AUTO_FACTOR,
    accuracy,
    info_nce,
    proto_nce,
    proto_nce_multi,
    resolve_proto_form,
    sample_negative_clusters,
)
from .clustering_ce import balanced_pairs, pair_bce, prototype_ce, symmetric_ce
from .nt_xent import nt_xent
from .siamese import SIAMESE_TERMS, siamese_differences, siamese_metric_loss
from .swav import sinkhorn, swapped_prediction_loss

__all__ = [
    "nt_xent",
    "sinkhorn",
    "swapped_prediction_loss",
    "balanced_pairs",
    "pair_bce",
    "prototype_ce",
    "symmetric_ce",
    "SIAMESE_TERMS",
    "siamese_differences",
    "siamese_metric_loss",
    "AUTO_FACTOR",
    "accuracy",
    "info_nce",
    "proto_nce",
    "proto_nce_multi",
    "resolve_proto_form",
    "sample_negative_clusters",
]
