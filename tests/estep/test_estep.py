"""Tests for pcl_ray.estep: k-means, concentration φ, PrototypeSet, run_estep."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_mutual_info_score

from pcl_ray.estep import (
    Granularity,
    PrototypeSet,
    compute_concentration,
    gpu_available,
    kmeans,
    run_estep,
)

TAU = 0.2
SPREADS = np.array([0.02, 0.04, 0.06, 0.08, 0.10])  # per-dimension noise σ of each true cluster
PER_CLUSTER = 300
DIM = 32


def normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gaussian clusters on the unit sphere with known centres and different spreads (shuffled)."""
    rng = np.random.default_rng(0)
    centres = normalize(rng.standard_normal((len(SPREADS), DIM)))
    labels = np.repeat(np.arange(len(SPREADS)), PER_CLUSTER)
    x = normalize(centres[labels] + SPREADS[labels, None] * rng.standard_normal((labels.size, DIM)))
    perm = rng.permutation(labels.size)
    return x[perm].astype(np.float32), labels[perm], centres


@pytest.fixture(scope="module")
def protos(blobs) -> PrototypeSet:
    x, _, _ = blobs
    # unnormalized input: run_estep must L2-normalize it itself
    return run_estep(3.0 * x, [len(SPREADS), 20], TAU, epoch=7, seed=0, num_threads=2)


def ref_concentration(
    d: np.ndarray, assign: np.ndarray, k: int, tau: float, alpha: float = 10.0
) -> np.ndarray:
    """Loop transcription of the salesforce/PCL reference `density` computation."""
    dcluster: list[list[float]] = [[] for _ in range(k)]
    for i, c in enumerate(assign):
        dcluster[c].append(float(d[i]))
    density = np.zeros(k)
    for i, dist in enumerate(dcluster):
        if len(dist) > 1:
            density[i] = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + alpha)
    dmax = density.max()
    for i, dist in enumerate(dcluster):
        if len(dist) <= 1:
            density[i] = dmax
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    return tau * density / density.mean()


# --------------------------------------------------------------------------- #
# run_estep on synthetic clusters
# --------------------------------------------------------------------------- #
def test_prototype_set_structure(protos: PrototypeSet, blobs) -> None:
    x, _, _ = blobs
    assert protos.epoch == 7
    assert protos.backend == "faiss-cpu"
    assert protos.seconds > 0
    assert protos.num_clusters == (5, 20)
    for g in protos.granularities:
        k = g.num_clusters
        assert g.assignments.shape == (x.shape[0],) and g.assignments.dtype == np.int64
        assert g.centroids.shape == (k, DIM) and g.centroids.dtype == np.float32
        assert g.concentration.shape == (k,) and g.concentration.dtype == np.float32
        assert np.array_equal(g.sizes, np.bincount(g.assignments, minlength=k))
        np.testing.assert_allclose(np.linalg.norm(g.centroids, axis=1), 1.0, rtol=1e-5)
        assert not g.assignments.flags.writeable  # immutable


def test_assignments_recover_true_partition(protos: PrototypeSet, blobs) -> None:
    _, labels, _ = blobs
    g = protos.granularities[0]
    assert adjusted_mutual_info_score(labels, g.assignments) > 0.99


def test_centroids_close_to_true_centres(protos: PrototypeSet, blobs) -> None:
    _, labels, centres = blobs
    g = protos.granularities[0]
    for c in range(len(SPREADS)):
        true = np.bincount(labels[g.assignments == c]).argmax()
        assert float(g.centroids[c] @ centres[true]) > 0.99


def test_phi_ordering_follows_spread(protos: PrototypeSet, blobs) -> None:
    _, labels, _ = blobs
    g = protos.granularities[0]
    # cluster id of each true cluster, ordered from tightest to widest
    cluster_of = [np.bincount(g.assignments[labels == t], minlength=5).argmax() for t in range(5)]
    phi_by_spread = g.concentration[cluster_of]
    assert np.all(np.diff(phi_by_spread) > 0), phi_by_spread


def test_phi_mean_equals_temperature_and_is_clipped(protos: PrototypeSet) -> None:
    for g in protos.granularities:
        assert float(g.concentration.astype(np.float64).mean()) == pytest.approx(TAU, rel=1e-6)
        assert np.all(g.concentration > 0)
    # k = 20: the 10th/90th percentiles interpolate between the 2nd/3rd and
    # 18th/19th smallest values, so the two extremes on each side are clipped.
    phi = protos.granularities[1].concentration
    assert np.count_nonzero(phi == phi.min()) >= 2
    assert np.count_nonzero(phi == phi.max()) >= 2


def test_run_estep_phi_matches_reference_pipeline(blobs) -> None:
    x, _, _ = blobs
    ps = run_estep(x, [20], TAU, seed=3, num_threads=1)
    res = kmeans(x, 20, seed=3, backend="cpu", num_threads=1)
    np.testing.assert_array_equal(ps.granularities[0].assignments, res.assignments)
    np.testing.assert_allclose(
        ps.granularities[0].concentration,
        ref_concentration(res.distances, res.assignments, 20, TAU),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        ps.granularities[0].centroids, normalize(res.centroids), rtol=1e-5, atol=1e-6
    )


def test_reproducible_with_same_seed(blobs) -> None:
    x, _, _ = blobs
    a = run_estep(x, [5, 20], TAU, seed=11)
    b = run_estep(x, [5, 20], TAU, seed=11)
    for ga, gb in zip(a.granularities, b.granularities, strict=True):
        np.testing.assert_array_equal(ga.assignments, gb.assignments)
        np.testing.assert_array_equal(ga.centroids, gb.centroids)
        np.testing.assert_array_equal(ga.concentration, gb.concentration)


def test_stats_keys_and_values(protos: PrototypeSet, blobs) -> None:
    x, _, _ = blobs
    s = protos.stats()
    for k in (5, 20):
        for name in ("size_min", "size_median", "size_max", "empty", "phi_mean", "phi_min", "phi_max"):
            assert isinstance(s[f"estep/k{k}/{name}"], float)
    assert s["estep/k5/size_min"] == s["estep/k5/size_max"] == PER_CLUSTER
    assert s["estep/k5/empty"] == 0.0
    assert s["estep/k20/phi_mean"] == pytest.approx(TAU, rel=1e-6)
    assert s["estep/seconds"] == protos.seconds
    dup = run_estep(x, [5, 5], TAU).stats()
    assert "estep/k5_g0/size_min" in dup and "estep/k5_g1/size_min" in dup


def test_to_torch_copies_read_only_arrays(protos: PrototypeSet) -> None:
    tensors = protos.to_torch("cpu")
    assert len(tensors) == 2
    assign, cents, phi = tensors[0]
    assert assign.dtype == torch.int64 and cents.dtype == torch.float32 and phi.dtype == torch.float32
    assign[0] = -1  # writable copy; the stored array is untouched
    assert protos.granularities[0].assignments[0] >= 0


# --------------------------------------------------------------------------- #
# kmeans
# --------------------------------------------------------------------------- #
def test_kmeans_distances_are_squared_l2_to_unnormalized_centroid(blobs) -> None:
    x, _, _ = blobs
    res = kmeans(x, 20, niter=10, nredo=1, seed=0, backend="cpu")
    assert res.assignments.dtype == np.int64 and res.distances.dtype == np.float32
    # centroids of unit vectors are strictly inside the sphere (unnormalized)
    assert np.all(np.linalg.norm(res.centroids, axis=1) < 1.0)
    all_d = ((x[:, None, :] - res.centroids[None, :, :]) ** 2).sum(-1)
    np.testing.assert_allclose(res.distances, all_d[np.arange(len(x)), res.assignments], atol=1e-5)
    np.testing.assert_allclose(res.distances, all_d.min(1), atol=1e-5)  # nearest centroid


def test_kmeans_invalid_arguments(blobs) -> None:
    x, _, _ = blobs
    with pytest.raises(ValueError, match="backend"):
        kmeans(x, 5, backend="tpu")
    with pytest.raises(ValueError, match="num_clusters"):
        kmeans(x[:4], 5)


@pytest.mark.skipif(gpu_available(), reason="a faiss GPU is available here")
def test_gpu_backend_errors_without_gpu(blobs) -> None:
    x, _, _ = blobs
    with pytest.raises(RuntimeError, match="GPU"):
        run_estep(x, [5], TAU, backend="gpu")
    with pytest.raises(RuntimeError, match="GPU"):
        kmeans(x, 5, backend="gpu")
    assert run_estep(x, [5], TAU, backend="auto", nredo=1).backend == "faiss-cpu"


# --------------------------------------------------------------------------- #
# run_estep validation
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("ks", [[50], [49, 50], [1], [0], [2.5], [True], 51])
def test_invalid_num_clusters(ks) -> None:
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    with pytest.raises(ValueError, match=r"num_clusters.*N=50"):
        run_estep(x, ks, TAU)


def test_invalid_features_and_temperature() -> None:
    x = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="2-D"):
        run_estep(x[:, 0], [5], TAU)
    with pytest.raises(ValueError, match="floating"):
        run_estep(x.astype(np.int64), [5], TAU)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        run_estep(bad, [5], TAU)
    with pytest.raises(ValueError, match="temperature"):
        run_estep(x, [5], 0.0)
    assert run_estep(torch.from_numpy(x), 5, TAU, nredo=1).num_clusters == (5,)  # tensors, scalar k


# --------------------------------------------------------------------------- #
# compute_concentration on hand-built inputs
# --------------------------------------------------------------------------- #
def test_concentration_singletons_and_empty_match_loop_reference() -> None:
    rng = np.random.default_rng(1)
    sizes = [3, 1, 0, 4, 2, 5, 1, 7, 6, 2, 0, 9]  # singletons (1, 6) and empty clusters (2, 10)
    k = len(sizes)
    assign = rng.permutation(np.repeat(np.arange(k), sizes))
    d = rng.uniform(0.01, 0.5, size=assign.size).astype(np.float32)
    phi = compute_concentration(d, assign, k, TAU)
    expected = ref_concentration(d, assign, k, TAU)
    assert phi.dtype == np.float32 and phi.shape == (k,)
    np.testing.assert_allclose(phi, expected, rtol=1e-6)
    assert float(phi.astype(np.float64).mean()) == pytest.approx(TAU, rel=1e-6)


def test_concentration_small_case_by_hand() -> None:
    # cluster 0: distances 0.1, 0.3 (D = squared); cluster 1: singleton; cluster 2: distances 0.2 ×3
    d = np.array([0.01, 0.09, 0.5, 0.04, 0.04, 0.04])
    assign = np.array([0, 0, 1, 2, 2, 2])
    phi0 = 0.2 / math.log(12)
    phi2 = 0.2 / math.log(13)
    raw = np.array([phi0, max(phi0, phi2), phi2])  # the singleton takes the largest φ
    raw = raw.clip(np.percentile(raw, 10), np.percentile(raw, 90))
    expected = 0.5 * raw / raw.mean()
    np.testing.assert_allclose(compute_concentration(d, assign, 3, 0.5), expected, rtol=1e-6)


def test_concentration_degenerate_inputs_stay_finite() -> None:
    # every cluster a singleton or empty: no φ can be measured, all take τ
    np.testing.assert_allclose(compute_concentration(np.ones(3), np.arange(3), 4, TAU), TAU)
    # all members exactly on the centroid: φ = 0 everywhere would divide logits by 0
    np.testing.assert_allclose(compute_concentration(np.zeros(6), np.repeat(np.arange(3), 2), 3, TAU), TAU)
    with pytest.raises(ValueError, match="assignments"):
        compute_concentration(np.ones(3), np.array([0, 1, 5]), 3, TAU)


def test_granularity_rejects_inconsistent_shapes() -> None:
    with pytest.raises(ValueError, match="rows"):
        Granularity(3, np.zeros(4), np.zeros((2, 8)), np.ones(3), np.zeros(3))


def test_label_agreement_diagnostic_is_ami_of_assignments():
    from sklearn.metrics import adjusted_mutual_info_score

    from pcl_ray.estep.diagnostics import with_label_agreement

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 8))
    labels = rng.integers(0, 3, 300)
    x = (centres[labels] + 0.05 * rng.normal(size=(300, 8))).astype(np.float32)
    pset = run_estep(x, [3, 6], 0.2, nredo=1, seed=0)
    labelled = labels.copy()
    labelled[:10] = -1  # unknown labels are left out
    out = with_label_agreement(pset, labelled)
    stats = out.stats()
    for i, g in enumerate(pset.granularities):
        want = adjusted_mutual_info_score(labels[10:], g.assignments[10:])
        assert stats[f"estep/k{g.num_clusters}/ami_labels"] == pytest.approx(want)
    assert stats["estep/k3/ami_labels"] > 0.99
    assert with_label_agreement(pset, np.full(300, -1)) is pset
    assert "estep/k3/ami_labels" not in pset.stats()
