"""E-step: k-means per granularity, concentration φ, and the immutable PrototypeSet.

Knows nothing of Ray: the ClusterActor calls :func:`run_estep` on the gathered
embeddings and publishes the returned :class:`PrototypeSet`.
"""

from pcl_ray.estep.concentration import compute_concentration
from pcl_ray.estep.kmeans import KMeansResult, gpu_available, kmeans, resolve_backend
from pcl_ray.estep.prototypes import Granularity, PrototypeSet, PrototypeTensors
from pcl_ray.estep.run import run_estep

__all__ = [
    "Granularity",
    "KMeansResult",
    "PrototypeSet",
    "PrototypeTensors",
    "compute_concentration",
    "gpu_available",
    "kmeans",
    "resolve_backend",
    "run_estep",
]
