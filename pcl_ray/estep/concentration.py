"""Per-prototype concentration φ (docs/DESIGN.md, "E-step"; the PCL reference's ``density``)."""

from __future__ import annotations

import numpy as np

__all__ = ["compute_concentration"]


def compute_concentration(
    distances: np.ndarray,
    assignments: np.ndarray,
    num_clusters: int,
    temperature: float,
    alpha: float = 10.0,
) -> np.ndarray:
    """Concentration φ of every cluster, as a float32 array of shape (k,).

    ``distances`` are the squared L2 distances ``D`` of each point to its
    assigned (unnormalized) centroid, ``assignments`` the cluster ids. Then:

    - ``φ_c = mean_{v in c} ‖v − c‖ / log(Z_c + α)`` for clusters of size ``Z_c > 1``;
    - clusters with ``Z_c ≤ 1`` (singletons and empty clusters) take the largest of those φ;
    - φ is clipped to its 10th–90th percentile (``np.percentile``);
    - φ is rescaled so that ``mean(φ) = temperature``.

    Two degenerate cases the reference leaves as division by zero are guarded:
    if no cluster has ``Z > 1`` or every φ is 0, all φ equal ``temperature``;
    otherwise a φ of 0 (all members on the centroid) takes the smallest
    positive φ, so no logit is divided by 0.
    """
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    a = np.asarray(assignments).reshape(-1)
    k = int(num_clusters)
    if a.shape != d.shape:
        raise ValueError(f"assignments shape {a.shape} does not match distances shape {d.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"assignments must be integers, got dtype {a.dtype}")
    if a.size and (a.min() < 0 or a.max() >= k):
        raise ValueError(f"assignments must lie in [0, num_clusters={k})")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not float(alpha) > 0.0:
        raise ValueError(f"alpha must be > 0, got {alpha}")

    sizes = np.bincount(a, minlength=k)
    dist_sum = np.bincount(a, weights=np.sqrt(np.maximum(d, 0.0)), minlength=k)
    multi = sizes > 1
    if not multi.any():
        return np.full(k, temperature, dtype=np.float32)

    phi = np.zeros(k, dtype=np.float64)
    phi[multi] = dist_sum[multi] / sizes[multi] / np.log(sizes[multi] + alpha)
    phi[~multi] = phi[multi].max()
    phi = np.clip(phi, np.percentile(phi, 10), np.percentile(phi, 90))

    positive = phi > 0
    if not positive.any():
        return np.full(k, temperature, dtype=np.float32)
    phi[~positive] = phi[positive].min()
    return (temperature * phi / phi.mean()).astype(np.float32)
