"""Tests for pcl_ray.evaluation: kNN, clustering metrics, features, plots."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pcl_ray.evaluation import (
    cluster_metrics,
    embed,
    hungarian_accuracy,
    knn_accuracies,
    knn_accuracy,
    knn_predict,
    knn_predict_many,
    plot_metric_curves,
    plot_prototype_stats,
    raw_pixel_features,
)


def _knn_reference(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, k: int, tau: float, n_classes: int
) -> np.ndarray:
    """Brute-force weighted kNN in float64 numpy, one test point at a time."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    preds = []
    for q in test:
        sims = train @ q
        nbrs = np.argsort(-sims, kind="stable")[:k]
        scores = np.zeros(n_classes)
        for j in nbrs:
            scores[y_train[j]] += np.exp(sims[j] / tau)
        preds.append(int(np.argmax(scores)))
    return np.asarray(preds)


# --------------------------------------------------------------------------- kNN


@pytest.mark.parametrize(("k", "tau", "batch_size"), [(1, 0.1, 7), (10, 0.1, 64), (25, 0.5, 1000)])
def test_knn_matches_bruteforce_reference(k: int, tau: float, batch_size: int) -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 16)).astype(np.float32)
    test = rng.normal(size=(90, 16)).astype(np.float32)
    y_train = rng.integers(0, 5, size=300)
    y_test = rng.integers(0, 5, size=90)

    expected = _knn_reference(train, y_train, test, k, tau, 5)
    got = knn_predict(train, y_train, test, k=k, temperature=tau, num_classes=5, batch_size=batch_size)
    np.testing.assert_array_equal(got, expected)

    acc = knn_accuracy(train, y_train, test, y_test, k=k, temperature=tau, batch_size=batch_size)
    assert acc == pytest.approx(float((expected == y_test).mean()))


def test_knn_at_several_k_from_one_search_matches_the_reference_at_each() -> None:
    rng = np.random.default_rng(3)
    train = rng.normal(size=(300, 16)).astype(np.float32)
    test = rng.normal(size=(90, 16)).astype(np.float32)
    y_train = rng.integers(0, 5, size=300)
    y_test = rng.integers(0, 5, size=90)
    ks = [200, 1, 20, 20, 999]  # unsorted, a duplicate, one beyond N (clipped)
    preds = knn_predict_many(train, y_train, test, ks, temperature=0.2, num_classes=5, batch_size=32)
    assert list(preds) == [200, 1, 20, 999]
    for k, got in preds.items():
        np.testing.assert_array_equal(got, _knn_reference(train, y_train, test, min(k, 300), 0.2, 5))
    accs = knn_accuracies(train, y_train, test, y_test, ks, temperature=0.2, batch_size=32)
    assert accs == {k: pytest.approx(float((p == y_test).mean())) for k, p in preds.items()}
    assert len({round(a, 6) for a in accs.values()}) > 1  # the k really differ
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_predict_many(train, y_train, test, [])


def test_knn_accepts_torch_tensors_and_clips_k() -> None:
    rng = np.random.default_rng(1)
    train = rng.normal(size=(40, 8)).astype(np.float32)
    test = rng.normal(size=(10, 8)).astype(np.float32)
    y_train = rng.integers(0, 3, size=40)
    from_numpy = knn_predict(train, y_train, test, k=500)  # k > N: every point votes
    from_torch = knn_predict(
        torch.from_numpy(train), torch.from_numpy(y_train), torch.from_numpy(test), k=500
    )
    np.testing.assert_array_equal(from_numpy, from_torch)
    np.testing.assert_array_equal(from_numpy, _knn_reference(train, y_train, test, 40, 0.1, 3))


def test_knn_perfectly_separable_data_scores_one() -> None:
    rng = np.random.default_rng(2)
    centres = np.eye(4, 32, dtype=np.float32) * 10.0
    y_train = np.repeat(np.arange(4), 50)
    y_test = np.repeat(np.arange(4), 20)
    train = centres[y_train] + rng.normal(scale=0.1, size=(200, 32)).astype(np.float32)
    test = centres[y_test] + rng.normal(scale=0.1, size=(80, 32)).astype(np.float32)
    assert knn_accuracy(train, y_train, test, y_test, k=20, batch_size=16) == 1.0


def test_knn_rejects_bad_input() -> None:
    x = np.ones((4, 3), dtype=np.float32)
    with pytest.raises(ValueError):
        knn_predict(x, np.zeros(4, dtype=np.int64), np.ones((2, 5), dtype=np.float32))
    with pytest.raises(ValueError):
        knn_predict(x, np.array([0, 1, -1, 0]), x)
    with pytest.raises(ValueError):
        knn_accuracy(x, np.zeros(4, dtype=np.int64), x, np.zeros(3, dtype=np.int64))


# ------------------------------------------------------------------- clustering


def test_hungarian_accuracy_permuted_labels_is_one() -> None:
    y = np.array([0, 0, 1, 1, 2, 2, 2])
    relabel = np.array([7, 3, 5])  # arbitrary cluster ids
    assert hungarian_accuracy(y, relabel[y]) == 1.0


def test_hungarian_accuracy_hand_computed() -> None:
    y_true = np.array([0, 0, 0, 1, 1, 1])
    y_pred = np.array([1, 1, 0, 0, 0, 0])
    # Best map: cluster 1 -> class 0 (2 hits), cluster 0 -> class 1 (3 hits): 5/6.
    assert hungarian_accuracy(y_true, y_pred) == pytest.approx(5 / 6)
    # More clusters than classes: the unmatched cluster's points are errors.
    assert hungarian_accuracy([0, 0, 1, 1], [0, 1, 2, 2]) == pytest.approx(3 / 4)


def test_cluster_metrics_on_separated_gaussians() -> None:
    rng = np.random.default_rng(3)
    n_classes, per_class, dim = 6, 80, 16
    centres = rng.normal(size=(n_classes, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(n_classes), per_class)
    feats = (centres[labels] + rng.normal(scale=0.02, size=(labels.size, dim))).astype(np.float32)
    perm = rng.permutation(labels.size)

    metrics = cluster_metrics(feats[perm], labels[perm], restarts=3, seed=0)
    assert set(metrics) == {"ami", "nmi", "ari", "acc"}
    for name, value in metrics.items():
        assert isinstance(value, float)
        assert value == pytest.approx(1.0, abs=1e-6), name


def test_cluster_metrics_skips_unknown_labels() -> None:
    rng = np.random.default_rng(4)
    labels = np.repeat(np.arange(3), 30)
    feats = (np.eye(3, 8)[labels] * 5 + rng.normal(scale=0.05, size=(90, 8))).astype(np.float32)
    labels_with_unknown = labels.copy()
    labels_with_unknown[::10] = -1
    metrics = cluster_metrics(feats, labels_with_unknown, restarts=2)
    assert metrics["acc"] == pytest.approx(1.0)


# --------------------------------------------------------------------- features


def test_raw_pixel_features() -> None:
    images = torch.tensor([[[[0, 255], [51, 102]]], [[[255, 255], [0, 0]]]], dtype=torch.uint8)
    feats = raw_pixel_features(images)
    assert feats.dtype == np.float32
    assert feats.shape == (2, 4)
    np.testing.assert_allclose(feats[0], [0.0, 1.0, 0.2, 0.4], rtol=1e-6)
    with pytest.raises(TypeError):
        raw_pixel_features(images.float())


def test_embed_runs_without_grad_and_concatenates() -> None:
    layer = torch.nn.Linear(3, 2)
    batches = [torch.randn(4, 3), torch.randn(5, 3)]
    grad_enabled: list[bool] = []

    def model_fn(x: torch.Tensor) -> torch.Tensor:
        grad_enabled.append(torch.is_grad_enabled())
        return layer(x)

    out = embed(model_fn, iter(batches))
    assert out.shape == (9, 2) and out.dtype == np.float32
    assert grad_enabled == [False, False]
    with torch.no_grad():
        np.testing.assert_allclose(out[4:], layer(batches[1]).numpy(), rtol=1e-6)
    with pytest.raises(ValueError):
        embed(model_fn, [])


# ------------------------------------------------------------------------ plots

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_prototype_stats_writes_png(tmp_path) -> None:
    rng = np.random.default_rng(5)
    grans = []
    for k in (10, 40):
        sizes = rng.integers(0, 100, size=k)
        phi = rng.uniform(0.05, 0.3, size=k)
        grans.append(SimpleNamespace(num_clusters=k, sizes=sizes, concentration=phi))
    out = plot_prototype_stats(grans, tmp_path / "sub" / "protos.png")
    assert out.read_bytes().startswith(_PNG_MAGIC)
    assert out.stat().st_size > 1000

    # An object with .granularities (a PrototypeSet) is accepted as well.
    out2 = plot_prototype_stats(SimpleNamespace(granularities=tuple(grans)), tmp_path / "pset.png")
    assert out2.read_bytes().startswith(_PNG_MAGIC)


def test_plot_metric_curves_writes_png(tmp_path) -> None:
    history = {
        "loss": [5.0, 4.2, 3.9, float("nan"), 3.1],
        "knn_acc": [0.5, 0.6, 0.65, 0.7, 0.72],
        "lr": [0.03] * 5,
        "ami": [0.3, 0.4, 0.5, 0.5, 0.55],
    }
    out = plot_metric_curves(history, tmp_path / "curves.png")
    assert out.read_bytes().startswith(_PNG_MAGIC)
    assert out.stat().st_size > 1000

    empty = plot_metric_curves({}, tmp_path / "empty.png")
    assert empty.read_bytes().startswith(_PNG_MAGIC)
