"""Weighted k-nearest-neighbour evaluation of frozen features.

This is the monitor used by InstDisc (Wu et al., 2018) and MoCo (He et al.,
2020): features are L2-normalized, each test point looks up its ``k`` most
cosine-similar training points, every neighbour votes for its class with
weight ``exp(sim / temperature)``, and the class with the largest summed weight
wins.

Everything runs in torch, one block of test points at a time, so the largest
intermediate is a ``batch_size x N_train`` similarity block (about 250 MB for
1024 x 60k in float32) rather than the full ``N_test x N_train`` matrix.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["knn_accuracies", "knn_accuracy", "knn_predict", "knn_predict_many"]

ArrayLike = np.ndarray | torch.Tensor


def _as_tensor(x: ArrayLike, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Convert a numpy array or tensor to a tensor of ``dtype`` on ``device``."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t.detach().to(device=device, dtype=dtype)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def knn_predict(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> np.ndarray:
    """Predict a class for each test point by weighted kNN over the training set.

    Args:
        train_feats: ``(N, d)`` training features (any scale; normalized here).
        train_labels: ``(N,)`` integer labels in ``[0, num_classes)``.
        test_feats: ``(M, d)`` test features.
        k: number of neighbours; clipped to ``N``.
        temperature: τ in the neighbour weight ``exp(cos_sim / τ)``.
        num_classes: number of classes; ``None`` means ``max(train_labels) + 1``.
        batch_size: test points processed per block (bounds peak memory).

    Returns:
        ``(M,)`` int64 array of predicted labels. Ties in the class score go to
        the smallest class id.

    The computation runs on the device of ``train_feats`` when it is a tensor,
    otherwise on the CPU, in float32.
    """
    return knn_predict_many(train_feats, train_labels, test_feats, [k], temperature, num_classes, batch_size)[k]


def knn_predict_many(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    ks: Sequence[int],
    temperature: float = 0.1,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> dict[int, np.ndarray]:
    """:func:`knn_predict` at several neighbour counts at the cost of one.

    Each block's similarities and their top-``max(ks)`` are computed once; the
    neighbours of every smaller ``k`` are a prefix of that sorted list. Returns
    ``{k: predictions}`` for every ``k`` in ``ks`` (each clipped to ``N``).
    """
    ks = list(dict.fromkeys(int(k) for k in ks))
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be >= 1, got {ks if ks else 'none'}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")

    device = train_feats.device if isinstance(train_feats, torch.Tensor) else torch.device("cpu")
    train = F.normalize(_as_tensor(train_feats, dtype=torch.float32, device=device), dim=1)  # N x d, unit rows
    test = _as_tensor(test_feats, dtype=torch.float32, device=device)  # M x d
    labels = _as_tensor(train_labels, dtype=torch.int64, device=device)  # N

    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(
            f"expected 2-D features of equal width, got train {tuple(train.shape)} "
            f"and test {tuple(test.shape)}"
        )
    if labels.shape != (train.shape[0],):
        raise ValueError(f"train_labels has shape {tuple(labels.shape)}, expected ({train.shape[0]},)")
    if train.shape[0] == 0:
        raise ValueError("the training set is empty")
    if int(labels.min()) < 0:
        raise ValueError("train_labels must be non-negative (unlabelled points cannot vote)")

    n_classes = int(labels.max()) + 1 if num_classes is None else int(num_classes)
    if int(labels.max()) >= n_classes:
        raise ValueError(f"train label {int(labels.max())} out of range for num_classes={n_classes}")
    clipped = {k: min(k, train.shape[0]) for k in ks}
    k_max = max(clipped.values())

    preds = {k: torch.empty(test.shape[0], dtype=torch.int64, device=device) for k in ks}  # M each
    with torch.no_grad():
        for start in range(0, test.shape[0], batch_size):
            block = F.normalize(test[start : start + batch_size], dim=1)  # B x d
            sims, idx = (block @ train.T).topk(k_max, dim=1)  # (B, k_max) each, sorted by similarity
            weights = (sims / temperature).exp()  # B x k_max
            votes = labels[idx]  # B x k_max: the neighbours' labels
            for k, kk in clipped.items():
                scores = torch.zeros(block.shape[0], n_classes, dtype=weights.dtype, device=device)  # B x classes
                scores.scatter_add_(1, votes[:, :kk], weights[:, :kk])  # each of the kk nearest votes its weight
                preds[k][start : start + block.shape[0]] = scores.argmax(dim=1)
    return {k: p.cpu().numpy() for k, p in preds.items()}


def knn_accuracy(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    test_labels: ArrayLike,
    k: int = 200,
    temperature: float = 0.1,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> float:
    """Top-1 accuracy in ``[0, 1]`` of weighted kNN (see :func:`knn_predict`).

    ``num_classes`` defaults to one more than the largest label in either split.
    """
    return knn_accuracies(train_feats, train_labels, test_feats, test_labels, [k], temperature, num_classes,
                          batch_size)[k]


def knn_accuracies(
    train_feats: ArrayLike,
    train_labels: ArrayLike,
    test_feats: ArrayLike,
    test_labels: ArrayLike,
    ks: Sequence[int],
    temperature: float = 0.1,
    num_classes: int | None = None,
    batch_size: int = 1024,
) -> dict[int, float]:
    """:func:`knn_accuracy` at every ``k`` of ``ks``, from one neighbour search (:func:`knn_predict_many`)."""
    y_test = _to_numpy(test_labels).astype(np.int64, copy=False)
    if y_test.ndim != 1 or y_test.size == 0:
        raise ValueError(f"test_labels must be a non-empty 1-D array, got shape {y_test.shape}")
    if num_classes is None:
        num_classes = max(int(_to_numpy(train_labels).max()), int(y_test.max())) + 1
    preds = knn_predict_many(train_feats, train_labels, test_feats, ks, temperature, num_classes, batch_size)
    out = {}
    for k, p in preds.items():
        if p.shape != y_test.shape:
            raise ValueError(f"{p.shape[0]} test features but {y_test.shape[0]} test labels")
        out[k] = float((p == y_test).mean())
    return out
