"""The E-step: L2-normalize features, k-means per granularity, φ, normalized prototypes."""

from __future__ import annotations

import numbers
import time
from collections.abc import Sequence

import numpy as np

from ..normalize import l2_normalize

from pcl_ray.estep.concentration import compute_concentration
from pcl_ray.estep.kmeans import Backend, kmeans, resolve_backend
from pcl_ray.estep.prototypes import Granularity, PrototypeSet

__all__ = ["epoch_seed", "pca_whiten", "run_estep"]

_EPS = 1e-12


def epoch_seed(seed: int, epoch: int) -> int:
    """A k-means seed of ``(seed, epoch)``: different every epoch, the same on a resumed run (< 2**31)."""
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0] & 0x7FFFFFFF)


def pca_whiten(x: np.ndarray, dim: int, eps: float = 1e-5) -> np.ndarray:
    """``x`` (N, d) centred and projected on its top ``min(d, dim)`` principal axes, each scaled to unit variance.

    DeepCluster's preprocessing (faiss ``PCAMatrix`` with eigen power -0.5). A direction of (near) zero variance,
    e.g. a ReLU unit that never fires at initialization, is scaled by ``1/sqrt(λ + eps·λ_max)`` instead of
    ``1/sqrt(λ)``, so it stays finite rather than blowing up to inf.
    """
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
        raise ValueError(f"pca_dim must be an int >= 1, got {dim!r}")
    d_out = min(x.shape[1], int(dim))
    xc = x.astype(np.float64) - x.mean(axis=0, dtype=np.float64)  # (N, d)
    eigval, eigvec = np.linalg.eigh(xc.T @ xc / x.shape[0])  # ascending: (d,), (d, d)
    eigval, eigvec = eigval[::-1][:d_out].clip(min=0.0), eigvec[:, ::-1][:, :d_out]  # top d_out
    scale = 1.0 / np.sqrt(eigval + eps * max(float(eigval[0]), _EPS))  # (d_out,)
    return np.ascontiguousarray(xc @ (eigvec * scale), dtype=np.float32)  # (N, d_out)


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
    pca_dim: int | None = None,
    reseed: bool = False,
    init_centroids: Sequence[np.ndarray] | None = None,
    warm_niter: int | None = None,
) -> PrototypeSet:
    """Cluster ``features`` (N, d), row i = dataset index i, at every granularity in ``num_clusters``.

    Granularity ``i`` runs k-means with seed ``seed + i`` (PCL's reference: the same seeds every epoch), or,
    with ``reseed``, with ``epoch_seed(seed, epoch) + i`` (DeepCluster-v2 and SPCL draw a new one each epoch).
    ``pca_dim``: PCA-whiten the features to ``min(d, pca_dim)`` dimensions before the L2 normalization
    (SPCL's preprocessing, from DeepCluster; docs/DESIGN.md, "E-step"). Returns the
    immutable :class:`PrototypeSet` for ``epoch``, with L2-normalized
    centroids, φ rescaled to mean ``temperature``, the backend that ran
    (``"faiss-cpu"`` / ``"faiss-gpu"``) and the wall seconds.

    ``init_centroids``: a warm start, one (k, d) array per granularity (e.g. the previous epoch's
    ``PrototypeSet.granularities[i].centroids``); k-means then starts from them with one restart and
    ``warm_niter`` (default ``niter``) iterations (``estep.warm_start``, README "Benchmarks").
    """
    start = time.perf_counter()
    x = _as_features(features)
    ks = _as_cluster_counts(num_clusters, x.shape[0])
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    backend_name = resolve_backend(backend)
    kmeans_backend = "gpu" if backend_name == "faiss-gpu" else "cpu"

    if pca_dim is not None:
        x = pca_whiten(x, pca_dim)  # (N, d) -> (N, min(d, pca_dim))
    x = l2_normalize(x)
    base_seed = epoch_seed(seed, epoch) if reseed else int(seed)
    if init_centroids is not None and len(init_centroids) != len(ks):
        raise ValueError(f"init_centroids: expected one array per granularity ({len(ks)}), got {len(init_centroids)}")
    granularities = []
    for i, k in enumerate(ks):
        init = None if init_centroids is None else init_centroids[i]
        result = kmeans(
            x,
            k,
            niter=niter if init is None or warm_niter is None else int(warm_niter),
            init_centroids=init,
            nredo=nredo,
            seed=base_seed + i,
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
                centroids=l2_normalize(result.centroids),
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
