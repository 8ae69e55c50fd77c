"""Data: sources (``load_split``), the indexed dataset, batch iteration and batched views.

Every item is ``(image, dataset index)``; the index is the join key between the E-step and
the M-step. Labels ride along for evaluation only.
"""

from .checks import check_data, check_decodes, check_evaluable
from .dataset import IndexedImages
from .errors import BadImageError, DataError, DataNotFoundError
from .loader import iterate_batches, shard_indices
from .sources import DATA_SOURCES, load_split
from .views import RECIPES, Recipe, ViewMaker

__all__ = [
    "BadImageError",
    "DATA_SOURCES",
    "DataError",
    "DataNotFoundError",
    "RECIPES",
    "Recipe",
    "IndexedImages",
    "ViewMaker",
    "check_data",
    "check_decodes",
    "check_evaluable",
    "iterate_batches",
    "load_split",
    "shard_indices",
]
