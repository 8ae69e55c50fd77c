"""The evaluation suite behind ``python run.py eval``: every protocol on one trained encoder.

``run_suite(cfg, method_state, suites, out_dir)`` embeds the train and test
splits once with the encoder of a method state dict (``eval.feature``: the
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

Artifacts are written into ``out_dir``. Labels are read only here, never in
training; every choice of a hyper-parameter (λ, ``C``) uses training labels
only, and the test labels only score the chosen model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import EVAL_SUITES, ExperimentConfig
from ..data import IndexedImages, ViewMaker, iterate_batches, load_split
from ..models import Encoder, build_encoder
from .clustering import cluster_metrics
from .embedding_plot import plot_embedding
from .export import export_backbone, export_embeddings
from .features import embed, eval_device
from .finetune import finetune_backbone
from .knn import knn_accuracies
from .linear_probe import fit_linear_probe
from .lowshot import lowshot_svm

__all__ = ["DEFAULT_SUITES", "SUITES", "encoder_from_state", "parse_suites", "run_suite"]

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


def encoder_from_state(cfg: ExperimentConfig, method_state: Mapping[str, torch.Tensor], in_channels: int) -> Encoder:
    """The online encoder of a method state dict (keys ``encoder.*``), in eval mode.

    A state holding only the backbone (``encoder.backbone.*``, e.g. rebuilt from
    an MLflow ``model/backbone.pt``) is accepted while ``eval.feature`` is
    ``backbone``.

    Raises:
        ValueError: the weights do not fit ``cfg.model``, or the head is needed but missing.
    """
    enc = build_encoder(cfg.model, in_channels)
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}
    try:
        missing, unexpected = enc.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"the checkpoint does not fit model={cfg.model.model_dump()}: {exc}") from None
    bad_missing = [k for k in missing if not k.startswith("head.")]
    if unexpected or bad_missing:
        raise ValueError(f"the checkpoint does not fit model={cfg.model.model_dump()}: "
                         f"missing {bad_missing[:5]}, unexpected {unexpected[:5]}")
    if missing and cfg.eval.feature == "head":
        raise ValueError("eval.feature=head needs the projection head, which this checkpoint does not hold")
    return enc.eval()


def _embed_split(enc: Encoder, ds: IndexedImages, views: ViewMaker, feature: str) -> np.ndarray:
    device = eval_device()
    enc = enc.to(device)

    def features(images: torch.Tensor) -> torch.Tensor:
        h = enc.features(views.eval(images.to(device, non_blocking=True)))
        return F.normalize(enc.head(h), dim=1) if feature == "head" else h

    batches = (b for b, _ in iterate_batches(ds, None, 512, shuffle=False, seed=0, drop_last=False))
    return embed(features, batches, total=len(ds))  # filled in place: the features are held once


@dataclass
class _Context:
    """What every suite reads: config, splits, features, encoder, output folder."""

    cfg: ExperimentConfig
    method_state: Mapping[str, torch.Tensor]
    train: IndexedImages
    test: IndexedImages
    encoder: Encoder
    num_classes: int
    out_dir: Path
    log: Callable[[str], None]
    train_feats: np.ndarray | None = None
    test_feats: np.ndarray | None = None

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


def _knn(ctx: _Context) -> dict[str, float]:
    (xtr, ytr), (xte, yte) = ctx.labelled("train"), ctx.labelled("test")
    e = ctx.cfg.eval
    accs = knn_accuracies(xtr, ytr, xte, yte, [e.knn_k, *e.knn_extra_k], temperature=e.knn_temperature,
                          num_classes=ctx.num_classes)
    return {"acc": accs[e.knn_k], **{f"acc_k{k}": accs[k] for k in e.knn_extra_k}}


def _linear(ctx: _Context) -> dict[str, float]:
    e = ctx.cfg.eval
    res = fit_linear_probe(
        *ctx.labelled("train"), *ctx.labelled("test"), weight_decays=e.linear_weight_decays,
        val_fraction=e.linear_val_fraction, max_iter=e.linear_max_iter, num_classes=ctx.num_classes, seed=ctx.seed,
    )
    return {"acc": res.accuracy, "val_acc": res.val_accuracy, "weight_decay": res.weight_decay}


def _lowshot(ctx: _Context) -> dict[str, float]:
    e = ctx.cfg.eval
    out: dict[str, float] = {}
    for r in lowshot_svm(*ctx.labelled("train"), *ctx.labelled("test"), shots=e.lowshot_shots,
                         draws=e.lowshot_draws, costs=e.lowshot_costs, val_per_class=e.lowshot_val_per_class,
                         seed=ctx.seed):
        out[f"k{r.shots}_mean"], out[f"k{r.shots}_std"] = r.mean, r.std
        ctx.log(f"[pcl-ray] lowshot k={r.shots}: {r.mean:.4f} ± {r.std:.4f} over {len(r.accuracies)} draws "
                f"(C chosen on validation: {', '.join(f'{c:g}' for c in r.costs)})")
    return out


def _finetune(ctx: _Context) -> dict[str, float]:
    e = ctx.cfg.eval
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


def _cluster(ctx: _Context) -> dict[str, float]:
    x, y = ctx.labelled("test")
    return cluster_metrics(x, y, num_clusters=ctx.num_classes, restarts=ctx.cfg.eval.kmeans_restarts, seed=ctx.seed)


def _tsne(ctx: _Context) -> dict[str, float]:
    assert ctx.test_feats is not None
    cfg = ctx.cfg
    path = plot_embedding(ctx.test_feats, ctx.test.labels, ctx.out_dir / "tsne.png", max_points=cfg.eval.tsne_points,
                          seed=ctx.seed, class_names=ctx.test.classes,
                          title=f"t-SNE: {cfg.method.name} {cfg.eval.feature} features, {cfg.data.name} test")
    ctx.log(f"[pcl-ray] wrote {path}")
    return {}


def _export(ctx: _Context) -> dict[str, float]:
    parts = {"train": (ctx.train_feats, ctx.train.labels), "test": (ctx.test_feats, ctx.test.labels)}
    path = export_embeddings(ctx.out_dir / "embeddings.parquet",
                             {s: parts[s] for s in ctx.cfg.eval.export_splits}, feature=ctx.cfg.eval.feature)
    weights = export_backbone(ctx.method_state, ctx.out_dir / "backbone.pt")
    ctx.log(f"[pcl-ray] wrote {path} and {weights}")
    return {}


_RUNNERS: dict[str, Callable[[_Context], dict[str, float]]] = {
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
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    if set(names) & _NEEDS_LABELS and ((train.labels < 0).all() or (test.labels < 0).all()):
        raise ValueError(f"data.name={cfg.data.name}: suites {sorted(set(names) & _NEEDS_LABELS)} need labels "
                         "on both splits, the data set has none")
    num_classes = int(max(train.labels.max(), test.labels.max(), 0) + 1)
    encoder = encoder_from_state(cfg, method_state, train.channels)
    ctx = _Context(cfg, method_state, train, test, encoder, num_classes, out, log)

    if set(names) & _NEEDS_FEATURES:
        start = time.perf_counter()
        views = ViewMaker(cfg.data.views.recipe, cfg.data.image_size or train.image_size, train.channels,
                          train.mean, train.std)
        ctx.train_feats = _embed_split(encoder, train, views, cfg.eval.feature)
        ctx.test_feats = _embed_split(encoder, test, views, cfg.eval.feature)
        log(f"[pcl-ray] eval: embedded {len(train)} train + {len(test)} test images "
            f"({cfg.eval.feature} features, d={ctx.train_feats.shape[1]}) in {time.perf_counter() - start:.1f}s")

    metrics: dict[str, float] = {}
    for name in names:
        start = time.perf_counter()
        values = _RUNNERS[name](ctx)
        metrics.update({f"eval/{name}/{k}": float(v) for k, v in values.items()})
        log(f"[pcl-ray] eval {name}: done in {time.perf_counter() - start:.1f}s")
    return metrics
