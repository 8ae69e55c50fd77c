"""E-step options a method may ask for: PCA-whitening, and a new k-means seed each epoch."""

from __future__ import annotations

import numpy as np
import pytest

from pcl_ray.estep import run_estep
from pcl_ray.estep.run import epoch_seed, pca_whiten


def _features(n: int = 600, d: int = 12, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * np.linspace(0.1, 5.0, d) + rng.normal(size=d)).astype(np.float32)


def test_pca_whiten_gives_unit_covariance_and_caps_the_width():
    x = _features()
    w = pca_whiten(x, 8)
    assert w.shape == (600, 8) and w.dtype == np.float32
    np.testing.assert_allclose(w.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.cov(w, rowvar=False, bias=True), np.eye(8), atol=1e-3)
    assert pca_whiten(x, 256).shape == (600, 12)  # min(d, 256)


def test_pca_whiten_stays_finite_with_dead_dimensions():
    x = _features()
    x[:, 3] = 0.0  # a ReLU unit that never fires
    assert np.isfinite(pca_whiten(x, 256)).all()


def test_epoch_seed_differs_per_epoch_and_repeats_for_the_same_epoch():
    seeds = [epoch_seed(7, e) for e in range(20)]
    assert len(set(seeds)) == 20 and seeds == [epoch_seed(7, e) for e in range(20)]
    assert epoch_seed(8, 0) != epoch_seed(7, 0) and all(0 <= s < 2**31 for s in seeds)


def test_reseed_changes_the_kmeans_draw_between_epochs_only_when_asked():
    x = _features(d=4)
    kw = dict(num_clusters=[8], temperature=0.2, niter=2, nredo=1, backend="cpu")
    fixed = [run_estep(x, epoch=e, seed=0, **kw).granularities[0].centroids for e in (0, 1)]
    np.testing.assert_array_equal(fixed[0], fixed[1])  # PCL: the same seed every epoch
    fresh = [run_estep(x, epoch=e, seed=0, reseed=True, **kw).granularities[0].centroids for e in (0, 1, 1)]
    assert not np.array_equal(fresh[0], fresh[1])
    np.testing.assert_array_equal(fresh[1], fresh[2])  # a resumed epoch draws the same


def test_pca_dim_changes_the_clustered_space():
    x = _features()
    pset = run_estep(x, [5], 0.2, niter=2, nredo=1, backend="cpu", pca_dim=3)
    assert pset.granularities[0].centroids.shape == (5, 3)
    with pytest.raises(ValueError, match="pca_dim"):
        run_estep(x, [5], 0.2, backend="cpu", pca_dim=0)
