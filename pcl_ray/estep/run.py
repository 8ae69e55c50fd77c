"""The E-step: L2-normalize features, k-means per granularity, φ, normalized prototypes."""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence

import numpy as np

from pcl_ray.estep.concentration import compute_concentration
from pcl_ray.estep.kmeans import Backend, kmeans, resolve_backend
from pcl_ray.estep.prototypes import Granularity, PrototypeSet

__all__ = ["run_estep"]

_EPS = 1e-12


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, _EPS)).astype(np.float32, copy=False)


def _as_features(features) -> np.ndarray:
    if hasattr(features, "detach"):  # torch tensor
        features = features.detach().cpu().numpy()
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d), got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"features must be floating point, got dtype {x.dtype}")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"features must be non-empty, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_cluster_counts(num_clusters: int | Sequence[int], n: int) -> tuple[int, ...]:
    ks = (num_clusters,) if isinstance(num_clusters, numbers.Integral) else tuple(num_clusters)
    if not ks:
        raise ValueError("num_clusters must name at least one granularity")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 2 <= k < n:
            raise ValueError(
                f"num_clusters must be integers with 2 <= k < N (N={n} points), got {num_clusters!r}"
            )
    return tuple(int(k) for k in ks)


def run_estep(
    features,
    num_clusters: int | Sequence[int],
    temperature: float,
    *,
    epoch: int = 0,
    niter: int = 20,
    nredo: int = 5,
    seed: int = 0,
    max_points_per_centroid: int = 1000,
    alpha: float = 10.0,
    backend: Backend = "auto",
    num_threads: int | None = None,
) -> PrototypeSet:
    """Cluster ``features`` (N, d), row i = dataset index i, at every granularity in ``num_clusters``.

    Granularity ``i`` runs k-means with seed ``seed + i``. Returns the
    immutable :class:`PrototypeSet` for ``epoch``, with L2-normalized
    centroids, φ rescaled to mean ``temperature``, the backend that ran
    (``"faiss-cpu"`` / ``"faiss-gpu"``) and the wall seconds.
    """
    start = time.perf_counter()
    x = _as_features(features)
    ks = _as_cluster_counts(num_clusters, x.shape[0])
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    backend_name = resolve_backend(backend)
    kmeans_backend = "gpu" if backend_name == "faiss-gpu" else "cpu"

    x = _l2_normalize(x)
    granularities = []
    for i, k in enumerate(ks):
        result = kmeans(
            x,
            k,
            niter=niter,
            nredo=nredo,
            seed=seed + i,
            max_points_per_centroid=max_points_per_centroid,
            spherical=False,
            backend=kmeans_backend,
            num_threads=num_threads,
        )
        phi = compute_concentration(result.distances, result.assignments, k, temperature, alpha=alpha)
        granularities.append(
            Granularity(
                num_clusters=k,
                assignments=result.assignments,
                centroids=_l2_normalize(result.centroids),
                concentration=phi,
                sizes=np.bincount(result.assignments, minlength=k).astype(np.int64),
            )
        )
    return PrototypeSet(
        epoch=int(epoch),
        granularities=tuple(granularities),
        backend=backend_name,
        seconds=time.perf_counter() - start,
    )
