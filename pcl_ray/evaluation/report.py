"""End-of-run evaluation of a trained encoder beside raw-pixel baselines (same data, same run)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data import ViewMaker, iterate_batches, load_split
from ..models import Encoder, build_encoder
from .clustering import cluster_metrics
from .features import raw_pixel_features
from .knn import knn_accuracies
from .lowshot import lowshot_svm


_EXTRA_KNN = re.compile(r"knn(\d+)_acc")  # eval.knn_extra_k, as named by _row


def extra_knn_columns(metric_names) -> list[tuple[str, str]]:
    """``(name, title)`` of every kNN accuracy at an extra neighbour count among ``metric_names``, by k."""
    ks = sorted({int(m.group(1)) for name in metric_names if (m := _EXTRA_KNN.fullmatch(name))})
    return [(f"knn{k}_acc", f"kNN k={k}") for k in ks]


def load_encoder(cfg: ExperimentConfig, method_state: dict[str, torch.Tensor], in_channels: int) -> Encoder:
    """The online encoder from a checkpoint's method state dict (keys prefixed ``encoder.``)."""
    enc = build_encoder(cfg.model, in_channels)
    prefix = "encoder."
    enc.load_state_dict({k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)})
    return enc.eval()


@torch.no_grad()
def embed_split(enc: Encoder, ds, views: ViewMaker, batch_size: int = 512) -> dict[str, np.ndarray]:
    backbone, head = [], []
    for images, _ in iterate_batches(ds, np.arange(len(ds)), batch_size, shuffle=False, seed=0, drop_last=False):
        h = enc.features(views.eval(images))
        backbone.append(h)
        head.append(torch.nn.functional.normalize(enc.head(h), dim=1))
    return {"backbone": torch.cat(backbone).numpy(), "head": torch.cat(head).numpy()}


def _row(train_x, train_y, test_x, test_y, cfg: ExperimentConfig, num_classes: int) -> dict[str, float]:
    accs = knn_accuracies(train_x, train_y, test_x, test_y, [cfg.eval.knn_k, *cfg.eval.knn_extra_k],
                          temperature=cfg.eval.knn_temperature, num_classes=num_classes)
    row = {"knn_acc": accs[cfg.eval.knn_k], **{f"knn{k}_acc": accs[k] for k in cfg.eval.knn_extra_k}}
    cm = cluster_metrics(test_x, test_y, num_clusters=num_classes, restarts=cfg.eval.kmeans_restarts, seed=cfg.train.seed)
    row.update({k: float(v) for k, v in cm.items()})
    e = cfg.eval
    for r in lowshot_svm(train_x, train_y, test_x, test_y, shots=e.lowshot_shots, draws=e.lowshot_draws,
                         costs=e.lowshot_costs, val_per_class=e.lowshot_val_per_class, seed=cfg.train.seed):
        row[f"svm_k{r.shots}"] = r.mean
    return row


def evaluate(cfg: ExperimentConfig, method_state: dict[str, torch.Tensor], log=print) -> dict[str, dict[str, Any]]:
    """kNN accuracy (train split as the bank), test-split k-means AMI/NMI/ARI/ACC and low-shot SVM accuracy.

    Low-shot: ``svm_k<k>`` is the mean test accuracy of a linear SVM trained on ``k`` labelled train images
    per class over ``eval.lowshot_draws`` draws, its cost chosen on other train images (``eval.lowshot_*``).

    Rows: the learned representation (backbone and head features) and, when ``eval.baselines``,
    raw pixels. Labels are used here only.
    """
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    if (train.labels < 0).all() or (test.labels < 0).all():
        raise ValueError(f"data.name={cfg.data.name}: evaluation needs labels, the data set has none")
    num_classes = int(max(train.labels.max(), test.labels.max()) + 1)
    size = cfg.data.image_size or train.image_size
    views = ViewMaker(cfg.data.views.recipe, size, train.channels, train.mean, train.std)
    enc = load_encoder(cfg, method_state, train.channels)
    log(f"[pcl-ray] evaluating: embedding {len(train)} train + {len(test)} test images")
    ftr, fte = embed_split(enc, train, views), embed_split(enc, test, views)
    results: dict[str, dict[str, Any]] = {}
    for kind in ("backbone", "head"):
        results[f"{cfg.method.name}_{kind}"] = _row(ftr[kind], train.labels, fte[kind], test.labels, cfg, num_classes)
    if cfg.eval.baselines:
        log("[pcl-ray] evaluating: raw-pixel baseline")
        rtr = raw_pixel_features(_all_images(train, size))
        rte = raw_pixel_features(_all_images(test, size))
        results["raw_pixels"] = _row(rtr, train.labels, rte, test.labels, cfg, num_classes)
    return results


def _all_images(ds, size: int) -> torch.Tensor:
    chunks = [b for b, _ in iterate_batches(ds, np.arange(len(ds)), 1024, shuffle=False, seed=0, drop_last=False)]
    x = torch.cat(chunks)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return x
