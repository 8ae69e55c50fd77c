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

__all__ = [
    "AUTO_FACTOR",
    "accuracy",
    "info_nce",
    "proto_nce",
    "proto_nce_multi",
    "resolve_proto_form",
    "sample_negative_clusters",
]
