"""The evaluation suite behind ``python run.py eval``: every protocol on one trained encoder.

``run_suite(cfg, method_state, suites, out_dir)`` embeds the train and test
splits once with the encoder of a method state dict (:mod:`.features`) (``eval.feature``: the
pooled backbone features by default, or the projection head's normalized
output), runs the requested suites on them and returns flat metrics named
``eval/<suite>/<metric>``:

========== ================================================================ ==========================
suite      protocol                                                         metrics
========== ================================================================ ==========================
knn        weighted kNN, cosine, ``eval.knn_k`` / ``eval.knn_temperature``  ``acc``,
           (and every k of ``eval.knn_extra_k``)                            ``acc_k<k>``
linear     logistic regression on standardized features, λ chosen on a      ``acc``, ``val_acc``,
           validation split of train (:mod:`.linear_probe`)                 ``weight_decay``
lowshot    linear SVM on k labelled images per class, ``C`` chosen on       ``k<k>_mean``,
           validation images from the rest of train (:mod:`.lowshot`)       ``k<k>_std``
finetune   backbone + linear classifier fine-tuned on 1 % / 10 % of the     ``acc_<p>pct``
           labels (:mod:`.finetune`); not in the default set: slow on CPU
cluster    k-means with k = number of classes on the test features:         ``ami``, ``nmi``,
           AMI, NMI, ARI, Hungarian accuracy (:mod:`.clustering`)           ``ari``, ``acc``
tsne       t-SNE picture of the test features, coloured by class            (``tsne.png``)
export     embeddings + labels to Parquet, backbone state dict              (``embeddings.parquet``,
           (:mod:`.export`)                                                 ``backbone.pt``)
========== ================================================================ ==========================

The end-of-run report of ``train`` (:mod:`.report`) is the ``knn``, ``cluster``
and ``lowshot`` suites through :func:`score`, on the backbone and head
features and on raw pixels.

Artifacts are written into ``out_dir``. Labels are read only here, never in
training; every choice of a hyper-parameter (λ, ``C``) uses training labels
only, and the test labels only score the chosen model.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..console import progress
from ..config import EVAL_SUITES, ExperimentConfig
from ..data import IndexedImages, load_split
from ..models import Encoder
from .clustering import cluster_metrics
from .embedding_plot import plot_embedding
from .export import export_backbone, export_embeddings
from .features import embed_split, eval_views, load_encoder
from .finetune import finetune_backbone
from .knn import knn_accuracies
from .linear_probe import fit_linear_probe
from .lowshot import lowshot_svm

__all__ = ["DEFAULT_SUITES", "SUITES", "SuiteContext", "load_splits", "parse_suites", "run_suite", "score"]

SUITES: tuple[str, ...] = EVAL_SUITES
DEFAULT_SUITES: tuple[str, ...] = tuple(s for s in SUITES if s != "finetune")


def parse_suites(spec: str | Sequence[str] | None) -> list[str]:
    """Validate suite names: ``"knn,lowshot"`` or a list; ``"all"`` means every suite.

    ``None`` or empty gives :data:`DEFAULT_SUITES`. Order is kept, repeats dropped.

    Raises:
        ValueError: an unknown name (the message lists the valid ones).
    """
    if spec is None:
        return list(DEFAULT_SUITES)
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s and s.strip()]
    if not names:
        return list(DEFAULT_SUITES)
    if names == ["all"]:
        return list(SUITES)
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown eval suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)} (or all)")
    return list(dict.fromkeys(names))


def load_splits(cfg: ExperimentConfig, names: Sequence[str]) -> tuple[IndexedImages, IndexedImages, int]:
    """The train and test splits of ``cfg.data`` and their number of classes.

    Raises:
        ValueError: a suite of ``names`` that scores against labels, on a data set without them.
    """
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    if set(names) & _NEEDS_LABELS and ((train.labels < 0).all() or (test.labels < 0).all()):
        raise ValueError(f"data.name={cfg.data.name}: suites {sorted(set(names) & _NEEDS_LABELS)} need labels "
                         "on both splits, the data set has none")
    return train, test, int(max(train.labels.max(), test.labels.max(), 0) + 1)


@dataclass
class SuiteContext:
    """What every suite reads: config, splits, their features and, for the suites that need them, the
    encoder (``finetune``), the method state (``export``) and the output folder (``tsne``, ``export``).

    The features need not come from an encoder: the end-of-run report scores raw pixels through the same
    suites (:mod:`.report`).
    """

    cfg: ExperimentConfig
    train: IndexedImages
    test: IndexedImages
    num_classes: int
    log: Callable[[str], None]
    train_feats: np.ndarray | None = None  # N_train x d
    test_feats: np.ndarray | None = None  # N_test x d
    encoder: Encoder | None = None
    method_state: Mapping[str, torch.Tensor] | None = None
    out_dir: Path | None = None

    @property
    def seed(self) -> int:
        return self.cfg.train.seed

    def labelled(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Features and labels of the labelled images of ``split``."""
        ds, x = (self.train, self.train_feats) if split == "train" else (self.test, self.test_feats)
        assert x is not None
        known = ds.labels >= 0
        if known.all():  # the usual case: no copy of the features
            return x, ds.labels
        return x[known], ds.labels[known]


def _knn(ctx: SuiteContext) -> dict[str, float]:
    (xtr, ytr), (xte, yte) = ctx.labelled("train"), ctx.labelled("test")
    e = ctx.cfg.eval
    accs = knn_accuracies(xtr, ytr, xte, yte, [e.knn_k, *e.knn_extra_k], temperature=e.knn_temperature,
                          num_classes=ctx.num_classes)
    return {"acc": accs[e.knn_k], **{f"acc_k{k}": accs[k] for k in e.knn_extra_k}}


def _linear(ctx: SuiteContext) -> dict[str, float]:
    e = ctx.cfg.eval
    res = fit_linear_probe(
        *ctx.labelled("train"), *ctx.labelled("test"), weight_decays=e.linear_weight_decays,
        val_fraction=e.linear_val_fraction, max_iter=e.linear_max_iter, num_classes=ctx.num_classes, seed=ctx.seed,
    )
    return {"acc": res.accuracy, "val_acc": res.val_accuracy, "weight_decay": res.weight_decay}


def _lowshot(ctx: SuiteContext) -> dict[str, float]:
    e = ctx.cfg.eval
    out: dict[str, float] = {}
    for r in lowshot_svm(*ctx.labelled("train"), *ctx.labelled("test"), shots=e.lowshot_shots,
                         draws=e.lowshot_draws, costs=e.lowshot_costs, val_per_class=e.lowshot_val_per_class,
                         seed=ctx.seed):
        out[f"k{r.shots}_mean"], out[f"k{r.shots}_std"] = r.mean, r.std
        ctx.log(f"[pcl-ray] lowshot k={r.shots}: {r.mean:.4f} ± {r.std:.4f} over {len(r.accuracies)} draws "
                f"(C chosen on validation: {', '.join(f'{c:g}' for c in r.costs)})")
    return out


def _finetune(ctx: SuiteContext) -> dict[str, float]:
    e = ctx.cfg.eval
    assert ctx.encoder is not None
    out: dict[str, float] = {}
    for fraction in e.finetune_fractions:
        res = finetune_backbone(
            ctx.encoder.backbone, ctx.encoder.backbone_dim, ctx.train, ctx.test, fraction=fraction,
            image_size=ctx.cfg.data.image_size, epochs=e.finetune_epochs, batch_size=e.finetune_batch_size,
            lr=e.finetune_lr, classifier_lr=e.finetune_classifier_lr, num_classes=ctx.num_classes,
            seed=ctx.seed, log=ctx.log,
        )
        out[f"acc_{fraction * 100:g}pct"] = res.accuracy
        ctx.log(f"[pcl-ray] finetune {fraction:.0%} ({res.labelled} labels): test acc {res.accuracy:.4f}")
    return out


def _cluster(ctx: SuiteContext) -> dict[str, float]:
    x, y = ctx.labelled("test")
    return cluster_metrics(x, y, num_clusters=ctx.num_classes, restarts=ctx.cfg.eval.kmeans_restarts, seed=ctx.seed)


def _tsne(ctx: SuiteContext) -> dict[str, float]:
    assert ctx.test_feats is not None and ctx.out_dir is not None
    cfg = ctx.cfg
    path = plot_embedding(ctx.test_feats, ctx.test.labels, ctx.out_dir / "tsne.png", max_points=cfg.eval.tsne_points,
                          seed=ctx.seed, class_names=ctx.test.classes,
                          title=f"t-SNE: {cfg.method.name} {cfg.eval.feature} features, {cfg.data.name} test")
    ctx.log(f"[pcl-ray] wrote {path}")
    return {}


def _export(ctx: SuiteContext) -> dict[str, float]:
    assert ctx.out_dir is not None and ctx.method_state is not None
    parts = {"train": (ctx.train_feats, ctx.train.labels), "test": (ctx.test_feats, ctx.test.labels)}
    path = export_embeddings(ctx.out_dir / "embeddings.parquet",
                             {s: parts[s] for s in ctx.cfg.eval.export_splits}, feature=ctx.cfg.eval.feature)
    weights = export_backbone(ctx.method_state, ctx.out_dir / "backbone.pt")
    ctx.log(f"[pcl-ray] wrote {path} and {weights}")
    return {}


_RUNNERS: dict[str, Callable[[SuiteContext], dict[str, float]]] = {
    "knn": _knn, "linear": _linear, "lowshot": _lowshot, "finetune": _finetune,
    "cluster": _cluster, "tsne": _tsne, "export": _export,
}
_NEEDS_FEATURES = {"knn", "linear", "lowshot", "cluster", "tsne", "export"}
_NEEDS_LABELS = {"knn", "linear", "lowshot", "finetune", "cluster"}


def run_suite(
    cfg: ExperimentConfig,
    method_state: Mapping[str, torch.Tensor],
    suites: str | Sequence[str] | None,
    out_dir: str | Path,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """Run the named evaluation suites on the encoder in ``method_state``.

    Args:
        cfg: the run's config (data, model, seed and the ``eval.*`` settings).
        method_state: a method's ``state_dict`` (the checkpoint's ``"method"`` entry).
        suites: names from :data:`SUITES` (a list or ``"knn,lowshot"``); ``None`` = :data:`DEFAULT_SUITES`.
        out_dir: folder for the artifacts (created).
        log: progress lines.

    Returns:
        Flat metrics ``{"eval/<suite>/<name>": float}``.
    """
    names = parse_suites(suites)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train, test, num_classes = load_splits(cfg, names)
    encoder = load_encoder(cfg, method_state, train.channels)
    ctx = SuiteContext(cfg, train, test, num_classes, log, encoder=encoder, method_state=method_state, out_dir=out)

    if set(names) & _NEEDS_FEATURES:
        start = time.perf_counter()
        views = eval_views(cfg, train)
        feature = cfg.eval.feature
        ctx.train_feats = embed_split(encoder, train, views, [feature])[feature]  # N_train x d
        ctx.test_feats = embed_split(encoder, test, views, [feature])[feature]  # N_test x d
        log(f"[pcl-ray] eval: embedded {len(train)} train + {len(test)} test images "
            f"({feature} features, d={ctx.train_feats.shape[1]}) in {time.perf_counter() - start:.1f}s")

    return {f"eval/{name}/{k}": v for name, values in score(ctx, names).items() for k, v in values.items()}


def score(ctx: SuiteContext, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """Run the suites ``names`` (valid names, see :func:`parse_suites`) on ``ctx``: ``{suite: {metric: value}}``."""
    results: dict[str, dict[str, float]] = {}
    # a rich progress bar in a terminal; in a log file the per-suite lines below are the progress
    steps = progress(names, "evaluation") if sys.stdout.isatty() else names
    for name in steps:
        start = time.perf_counter()
        results[name] = {k: float(v) for k, v in _RUNNERS[name](ctx).items()}
        ctx.log(f"[pcl-ray] eval {name}: done in {time.perf_counter() - start:.1f}s")
    return results
