"""pcl-ray: Prototypical Contrastive Learning and its family as a distributed workflow on Ray."""

import logging as _logging

# faiss logs every SIMD variant it fails to load at INFO; Ray workers print INFO. Keep only real problems.
_logging.getLogger("faiss.loader").setLevel(_logging.WARNING)

__version__ = "0.1.0"
