"""Clustering quality of frozen features: AMI, NMI, ARI and Hungarian accuracy.

The features are L2-normalized and clustered with faiss k-means (Euclidean on
unit vectors, k-means++ seeding, several restarts keeping the lowest
objective), with ``k`` equal to the number of classes by default; the clusters
are then scored against the ground-truth labels. One k-means solution moves AMI by a few hundredths from
seed to seed, hence the restarts (see the README, "Comparing methods").
"""

from __future__ import annotations

import os

from ..estep.kmeans import faiss  # one import site: a clear message when no faiss extra is installed
import numpy as np
from scipy.optimize import linear_sum_assignment
from numpy.typing import ArrayLike
from sklearn.metrics import (
    adjusted_mutual_info_score,
    adjusted_rand_score,
    normalized_mutual_info_score,
)

from .features import l2_normalize

__all__ = ["cluster_metrics", "hungarian_accuracy", "kmeans_assign"]


def hungarian_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Accuracy of ``y_pred`` under the best one-to-one map from clusters to classes.

    The map is found with the Hungarian algorithm on the cluster/class contingency
    table. Label values are arbitrary (they need not be ``0..k-1``), and the number
    of clusters may differ from the number of classes: unmatched clusters count
    as errors.
    """
    y_true = np.asarray(y_true).ravel()
    y_pred = np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true has {y_true.size} entries but y_pred has {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("cannot score an empty labelling")
    classes, true_idx = np.unique(y_true, return_inverse=True)
    clusters, pred_idx = np.unique(y_pred, return_inverse=True)
    counts = np.zeros((clusters.size, classes.size), dtype=np.int64)
    np.add.at(counts, (pred_idx, true_idx), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return float(counts[rows, cols].sum() / y_true.size)


def _kmeans_plusplus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): ``(k, d)`` float32 initial centroids.

    Each new centre is a data point drawn with probability proportional to its
    squared distance to the nearest centre chosen so far. Costs ``k`` passes of
    one matrix-vector product over ``x``.
    """
    n = x.shape[0]
    sq_norms = np.einsum("ij,ij->i", x, x)  # N: |x_i|^2
    chosen = [int(rng.integers(n))]
    closest = np.full(n, np.inf, dtype=np.float64)  # N: squared distance to the nearest chosen centre
    for _ in range(1, k):
        c = chosen[-1]
        dist = np.maximum(sq_norms + sq_norms[c] - 2.0 * (x @ x[c]), 0.0)  # N: |x_i - x_c|^2
        np.minimum(closest, dist, out=closest)
        total = closest.sum()
        chosen.append(int(rng.choice(n, p=closest / total)) if total > 0 else int(rng.integers(n)))
    return np.ascontiguousarray(x[chosen], dtype=np.float32)


def kmeans_assign(
    feats: np.ndarray,
    num_clusters: int,
    *,
    restarts: int = 5,
    niter: int = 50,
    seed: int = 0,
) -> np.ndarray:
    """Cluster L2-normalized ``feats`` with faiss k-means; return ``(N,)`` int64 assignments.

    Each of the ``restarts`` runs starts from its own k-means++ seeding and runs
    ``niter`` Lloyd iterations in faiss on every point (no subsampling); the
    run with the lowest objective wins. Plain random seeding (faiss's own, as in
    the E-step) gets stuck merging two true clusters often enough to move AMI by
    a tenth on well-separated data, which would drown the differences between
    methods that these metrics exist to show.

    faiss uses all CPU cores for the duration of the call; its previous thread
    count is restored afterwards.
    """
    x = np.ascontiguousarray(l2_normalize(feats))  # N x d float32, unit rows
    n, d = x.shape
    if not 1 <= num_clusters <= n:
        raise ValueError(f"num_clusters must be in [1, {n}], got {num_clusters}")
    rng = np.random.default_rng(seed)
    previous_threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    try:
        best_obj, best_index = np.inf, None
        for restart in range(max(1, restarts)):
            kmeans = faiss.Kmeans(
                d,
                num_clusters,
                niter=niter,
                nredo=1,
                seed=seed + restart,
                max_points_per_centroid=n,  # evaluate on all points, never a subsample
                min_points_per_centroid=1,
                verbose=False,
            )
            obj = kmeans.train(x, init_centroids=_kmeans_plusplus(x, num_clusters, rng))
            if best_index is None or obj < best_obj:
                best_obj, best_index = obj, kmeans.index
        _, assignments = best_index.search(x, 1)  # N x 1: the nearest centroid of each point
    finally:
        faiss.omp_set_num_threads(previous_threads)
    return assignments.ravel().astype(np.int64)


def cluster_metrics(
    feats: np.ndarray,
    labels: np.ndarray,
    num_clusters: int | None = None,
    restarts: int = 5,
    seed: int = 0,
    niter: int = 50,
) -> dict[str, float]:
    """Cluster ``feats`` with k-means and score the clusters against ``labels``.

    Args:
        feats: ``(N, d)`` features; L2-normalized here.
        labels: ``(N,)`` integer ground truth; points labelled ``< 0`` (unknown)
            are left out before clustering.
        num_clusters: ``k``; ``None`` means the number of distinct labels.
        restarts: k-means restarts (each from its own k-means++ seeding), best
            objective kept.
        seed: k-means seed.
        niter: k-means iterations per restart.

    Returns:
        ``{"ami", "nmi", "ari", "acc"}`` as floats; ``acc`` is Hungarian-matched
        accuracy (:func:`hungarian_accuracy`).
    """
    x = np.asarray(feats, dtype=np.float32)
    y = np.asarray(labels).ravel().astype(np.int64)
    if x.ndim != 2 or x.shape[0] != y.size:
        raise ValueError(f"feats {x.shape} and labels ({y.size},) do not match")
    known = y >= 0
    x, y = x[known], y[known]
    if y.size == 0:
        raise ValueError("no labelled points to score")
    k = int(np.unique(y).size) if num_clusters is None else int(num_clusters)

    pred = kmeans_assign(x, k, restarts=restarts, niter=niter, seed=seed)
    return {
        "ami": float(adjusted_mutual_info_score(y, pred)),
        "nmi": float(normalized_mutual_info_score(y, pred)),
        "ari": float(adjusted_rand_score(y, pred)),
        "acc": hungarian_accuracy(y, pred),
    }
