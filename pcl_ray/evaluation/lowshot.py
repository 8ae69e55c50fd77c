"""Low-shot classification: a linear SVM trained on k labelled images per class.

The protocol of the PCL paper's low-shot evaluation (after Goyal et al., 2019):
for each number of shots ``k``, draw ``k`` labelled training images per class
at random, train a linear SVM (scikit-learn ``LinearSVC``) on their
L2-normalized features and score it on the test split; repeat over several
seeded draws and report the mean and standard deviation of the test accuracy.

One deliberate difference from the reference code: the SVM cost ``C`` is chosen
there by accuracy on the *test* set, which leaks test labels into the reported
number. Here ``C`` is chosen, per draw, on a validation set drawn from the
*remaining* training images (``val_per_class`` per class, disjoint from the
``k`` training shots); the test labels are read only to score the model that
was already chosen.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.svm import LinearSVC

from .features import l2_normalize

__all__ = ["LowShotResult", "draw_shots", "lowshot_svm", "select_cost"]


@dataclass(frozen=True)
class LowShotResult:
    """Outcome of :func:`lowshot_svm` for one number of shots.

    Attributes:
        shots: labelled training images per class.
        accuracies: test accuracy of each draw.
        costs: the ``C`` chosen (on validation data) for each draw.
    """

    shots: int
    accuracies: tuple[float, ...]
    costs: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        """Sample standard deviation over draws (0 for a single draw)."""
        return float(np.std(self.accuracies, ddof=1)) if len(self.accuracies) > 1 else 0.0


def draw_shots(
    labels: np.ndarray, shots: int, val_per_class: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``shots`` training and up to ``val_per_class`` validation positions per class.

    The two sets are disjoint; the validation images come from what is left of
    each class after the shots are drawn.

    Raises:
        ValueError: a class has fewer than ``shots + 1`` images (no validation image would be left).
    """
    train_parts, val_parts = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if members.size < shots + 1:
            raise ValueError(f"class {c} has {members.size} training images; {shots}-shot evaluation "
                             "needs at least one more for validation")
        train_parts.append(members[:shots])
        val_parts.append(members[shots : shots + val_per_class])
    return np.concatenate(train_parts), np.concatenate(val_parts)


def _fit_svm(x: np.ndarray, y: np.ndarray, cost: float, seed: int) -> LinearSVC:
    svm = LinearSVC(C=cost, max_iter=5000, random_state=seed)
    with warnings.catch_warnings():
        # Large C on a few separable points may stop at max_iter; the model is still usable.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return svm.fit(x, y)


def select_cost(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    costs: Sequence[float],
    seed: int = 0,
) -> tuple[float, LinearSVC]:
    """The ``C`` from ``costs`` with the best validation accuracy, and its fitted SVM.

    Ties go to the smaller ``C`` (the stronger regularization).
    """
    best: tuple[float, float, LinearSVC] | None = None
    for cost in sorted(float(c) for c in costs):
        svm = _fit_svm(x_train, y_train, cost, seed)
        acc = float((svm.predict(x_val) == y_val).mean())
        if best is None or acc > best[0]:
            best = (acc, cost, svm)
    if best is None:
        raise ValueError("costs is empty")
    return best[1], best[2]


def lowshot_svm(
    train_feats: np.ndarray,
    train_labels: np.ndarray,
    test_feats: np.ndarray,
    test_labels: np.ndarray,
    *,
    shots: Sequence[int] = (1, 2, 4, 8, 16),
    draws: int = 5,
    costs: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0),
    val_per_class: int = 20,
    seed: int = 0,
) -> list[LowShotResult]:
    """Low-shot linear-SVM test accuracy, one :class:`LowShotResult` per entry of ``shots``.

    Args:
        train_feats, train_labels: ``(N, d)`` features and ``(N,)`` labels of the
            labelled training pool (shots and validation images come from it).
        test_feats, test_labels: ``(M, d)`` and ``(M,)``; the labels are used only
            to score the already chosen model.
        shots: labelled images per class.
        draws: random draws per number of shots.
        costs: the ``C`` grid.
        val_per_class: validation images per class for choosing ``C``.
        seed: draw ``d`` of ``k`` shots uses ``SeedSequence([seed, k, d])``, so
            adding a shot count or a draw leaves the others unchanged.
    """
    x_tr, x_te = l2_normalize(train_feats), l2_normalize(test_feats)  # N x d, M x d, unit rows
    y_tr = np.asarray(train_labels).astype(np.int64).ravel()
    y_te = np.asarray(test_labels).astype(np.int64).ravel()
    if x_tr.shape[0] != y_tr.size or x_te.shape[0] != y_te.size:
        raise ValueError("features and labels differ in length")
    if y_tr.size == 0 or y_tr.min() < 0:
        raise ValueError("lowshot_svm needs a non-empty labelled training pool (labels >= 0)")
    if draws < 1 or val_per_class < 1 or any(k < 1 for k in shots):
        raise ValueError(f"need draws >= 1, val_per_class >= 1 and shots >= 1, got {draws}, "
                         f"{val_per_class}, {list(shots)}")

    results = []
    for k in shots:
        accs, chosen = [], []
        for d in range(draws):
            rng = np.random.default_rng(np.random.SeedSequence([seed, int(k), d]))
            tr, val = draw_shots(y_tr, int(k), val_per_class, rng)  # positions: k and <= val_per_class a class
            cost, svm = select_cost(x_tr[tr], y_tr[tr], x_tr[val], y_tr[val], costs, seed=seed)
            chosen.append(cost)
            accs.append(float((svm.predict(x_te) == y_te).mean()))
        results.append(LowShotResult(int(k), tuple(accs), tuple(chosen)))
    return results
