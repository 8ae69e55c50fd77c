"""estep.warm_start: k-means started from given centroids converges in fewer iterations to the cold result."""

from __future__ import annotations

import numpy as np
import pytest

from pcl_ray.estep import run_estep
from pcl_ray.estep.kmeans import kmeans


def _blobs(seed: int = 0, k: int = 8, per: int = 200, d: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    x = np.repeat(centres, per, axis=0) + 0.15 * rng.normal(size=(k * per, d))  # (k*per, d)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_warm_start_from_converged_centroids_keeps_the_clustering():
    x = _blobs()
    cold = kmeans(x, 8, niter=20, nredo=3, backend="cpu")
    warm = kmeans(x, 8, niter=2, init_centroids=cold.centroids, backend="cpu")
    # started at a fixed point of Lloyd's iteration, a warm run stays there: same assignments
    assert (warm.assignments == cold.assignments).all()
    assert warm.distances.sum() == pytest.approx(cold.distances.sum(), rel=1e-4)


def test_one_warm_iteration_is_one_lloyd_step_from_the_given_centroids():
    x = _blobs()
    rng = np.random.default_rng(3)
    init = (kmeans(x, 8, niter=20, nredo=1, backend="cpu").centroids
            + 0.05 * rng.normal(size=(8, x.shape[1]))).astype(np.float32)  # (k, d), off the optimum
    warm = kmeans(x, 8, niter=1, init_centroids=init, backend="cpu")
    nearest = ((x[:, None, :] - init[None]) ** 2).sum(-1).argmin(1)  # (N,)
    expected = np.stack([x[nearest == j].mean(0) for j in range(8)])  # (k, d): one Lloyd update
    np.testing.assert_allclose(warm.centroids, expected, atol=1e-4)


def test_run_estep_passes_previous_centroids_per_granularity():
    x = _blobs(seed=1)
    first = run_estep(x, [4, 8], 0.1, niter=20, nredo=2, backend="cpu")
    again = run_estep(x, [4, 8], 0.1, epoch=1, niter=20, nredo=2, backend="cpu",
                      init_centroids=[g.centroids for g in first.granularities], warm_niter=3)
    for a, b in zip(first.granularities, again.granularities):
        assert a.num_clusters == b.num_clusters
        agree = (a.assignments == b.assignments).mean()
        assert agree > 0.99, f"k={a.num_clusters}: warm start moved {1 - agree:.1%} of the points"


def test_bad_warm_start_input_is_refused():
    x = _blobs()
    with pytest.raises(ValueError, match=r"init_centroids must have shape \(k, d\) = \(8, 16\)"):
        kmeans(x, 8, init_centroids=np.zeros((7, 16), np.float32), backend="cpu")
    with pytest.raises(ValueError, match="one array per granularity"):
        run_estep(x, [4, 8], 0.1, backend="cpu", init_centroids=[np.zeros((4, 16), np.float32)])
