"""Faiss k-means with a CPU/GPU backend switch.

Follows the PCL reference: Euclidean k-means (not spherical) on L2-normalized
features, ``niter`` Lloyd iterations, ``nredo`` restarts keeping the best
objective, at most ``max_points_per_centroid`` training points per centroid,
then every point is assigned to its nearest centroid with ``D`` the squared L2
distance to the (unnormalized) centroid.
"""

from __future__ import annotations

import os
from typing import Literal, NamedTuple

import numpy as np

#: why `import faiss` failed: faiss is not a base dependency, an extra picks its build
FAISS_MISSING = (
    "faiss is not installed: pcl-ray needs one faiss build, chosen by an extra: "
    "`pip install -e '.[cpu]'` (any machine) or `pip install -e '.[gpu]'` (Linux x86_64 with an NVIDIA GPU); "
    "from a wheel: `pip install 'pcl-ray[cpu]'` or `'pcl-ray[gpu]'`"
)

try:
    import faiss
except ImportError as exc:  # neither the cpu nor the gpu extra is installed
    raise ModuleNotFoundError(FAISS_MISSING, name="faiss") from exc

__all__ = ["Backend", "FAISS_MISSING", "KMeansResult", "gpu_available", "kmeans", "resolve_backend"]

Backend = Literal["auto", "cpu", "gpu"]


class KMeansResult(NamedTuple):
    """Output of :func:`kmeans`."""

    centroids: np.ndarray  #: (k, d) float32, unnormalized
    assignments: np.ndarray  #: (N,) int64, nearest centroid
    distances: np.ndarray  #: (N,) float32, squared L2 distance to the assigned centroid


def gpu_available() -> bool:
    """True when the faiss GPU build is installed and sees at least one GPU."""
    get_num_gpus = getattr(faiss, "get_num_gpus", None)
    return (
        hasattr(faiss, "StandardGpuResources")
        and get_num_gpus is not None
        and get_num_gpus() > 0
    )


def resolve_backend(backend: str) -> str:
    """Map ``"auto" | "cpu" | "gpu"`` to the backend that runs: ``"faiss-cpu"`` or ``"faiss-gpu"``.

    ``"auto"`` takes the GPU when :func:`gpu_available`, else the CPU;
    ``"gpu"`` raises ``RuntimeError`` when no faiss GPU is available.
    """
    if backend == "auto":
        return "faiss-gpu" if gpu_available() else "faiss-cpu"
    if backend == "cpu":
        return "faiss-cpu"
    if backend == "gpu":
        if not gpu_available():
            built = hasattr(faiss, "StandardGpuResources")
            why = "no GPU is visible to faiss" if built else "the installed faiss is the CPU-only build"
            raise RuntimeError(
                f"backend='gpu' requested but faiss GPU k-means is unavailable: {why}. "
                "Install faiss-gpu on a GPU machine, or use backend='auto' or 'cpu'."
            )
        return "faiss-gpu"
    raise ValueError(f"backend must be 'auto', 'cpu' or 'gpu', got {backend!r}")


def kmeans(
    features: np.ndarray,
    num_clusters: int,
    *,
    niter: int = 20,
    nredo: int = 5,
    seed: int = 0,
    max_points_per_centroid: int = 1000,
    spherical: bool = False,
    backend: Backend = "auto",
    num_threads: int | None = None,
    gpu_device: int = 0,
    init_centroids: np.ndarray | None = None,
) -> KMeansResult:
    """Run faiss k-means on ``features`` (N, d) and assign every row to its nearest centroid.

    ``num_threads`` (default ``os.cpu_count()``) sets faiss' OpenMP threads for
    this call. ``gpu_device`` is the CUDA ordinal used by the GPU backend.
    ``init_centroids`` (k, d): a warm start, e.g. the previous epoch's centroids. Faiss then starts every
    restart from them instead of from ``k`` random points, so a warm run uses one restart (``nredo`` is
    ignored: the restarts would all be the same run).
    """
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be 2-D (N, d), got shape {x.shape}")
    n, d = x.shape
    k = int(num_clusters)
    if not 1 <= k <= n:
        raise ValueError(f"num_clusters must lie in [1, N={n}], got {num_clusters}")
    if niter < 1 or nredo < 1 or max_points_per_centroid < 1:
        raise ValueError(
            f"niter, nredo and max_points_per_centroid must be >= 1, got {niter}, {nredo}, "
            f"{max_points_per_centroid}"
        )
    use_gpu = resolve_backend(backend) == "faiss-gpu"
    if init_centroids is not None:
        init = np.ascontiguousarray(init_centroids, dtype=np.float32)
        if init.shape != (k, d):
            raise ValueError(f"init_centroids must have shape (k, d) = ({k}, {d}), got {init.shape}")
        if not np.isfinite(init).all():
            raise ValueError("init_centroids contain NaN or infinite values")
        nredo = 1

    faiss.omp_set_num_threads(int(num_threads or os.cpu_count() or 1))

    clus = faiss.Clustering(d, k)
    clus.verbose = False
    clus.niter = int(niter)
    clus.nredo = int(nredo)
    clus.seed = int(seed)
    clus.spherical = bool(spherical)
    clus.max_points_per_centroid = int(max_points_per_centroid)
    clus.min_points_per_centroid = 1  # only silences faiss' "too few points" warning
    if init_centroids is not None:  # faiss uses centroids already present as the initialization
        faiss.copy_array_to_vector(init.ravel(), clus.centroids)

    if use_gpu:
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False
        cfg.device = int(gpu_device)
        index = faiss.GpuIndexFlatL2(res, d, cfg)
    else:
        index = faiss.IndexFlatL2(d)

    clus.train(x, index)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d).astype(np.float32, copy=False)

    # Assign against exactly the returned centroids (the best of the nredo runs).
    index.reset()
    index.add(centroids)
    dist, idx = index.search(x, 1)
    return KMeansResult(
        centroids=centroids,
        assignments=idx[:, 0].astype(np.int64),
        distances=np.maximum(dist[:, 0], 0.0).astype(np.float32),
    )
