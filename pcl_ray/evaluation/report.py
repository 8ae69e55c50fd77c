"""The end-of-run report: the ``eval`` suite's ``knn``, ``cluster`` and ``lowshot`` parts on the trained
encoder's backbone and head features, beside the same parts on raw pixels (same data, same run).

One pipeline with ``python run.py eval``: the splits, the encoder, the embedding and every metric come
from :mod:`.suite` and :mod:`.features`; this module only picks the suites, adds the raw-pixel row and
names the metrics the way the results table, ``compare`` and MLflow (``eval/<row>/<metric>``) read them.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..config import ExperimentConfig
from .features import FEATURES, embed_split, eval_views, load_encoder, raw_pixel_split
from .suite import SuiteContext, load_splits, score

__all__ = ["REPORT_SUITES", "evaluate", "evaluate_here", "extra_knn_columns", "report_row"]

REPORT_SUITES: tuple[str, ...] = ("knn", "cluster", "lowshot")  # the row's column order: kNN, clustering, SVM

_EXTRA_KNN = re.compile(r"knn(\d+)_acc")  # eval.knn_extra_k, as named by report_row


def extra_knn_columns(metric_names) -> list[tuple[str, str]]:
    """``(name, title)`` of every kNN accuracy at an extra neighbour count among ``metric_names``, by k."""
    ks = sorted({int(m.group(1)) for name in metric_names if (m := _EXTRA_KNN.fullmatch(name))})
    return [(f"knn{k}_acc", f"kNN k={k}") for k in ks]


def report_row(suites: dict[str, dict[str, float]]) -> dict[str, float]:
    """One row of the report from :func:`.suite.score`'s results.

    ``knn``: ``acc`` -> ``knn_acc``, ``acc_k<k>`` -> ``knn<k>_acc``; ``cluster``: ``ami``, ``nmi``, ``ari``,
    ``acc`` as they are; ``lowshot``: ``k<k>_mean`` -> ``svm_k<k>`` (the spread over draws stays in the
    ``eval`` verb's output).
    """
    row: dict[str, float] = {}
    for name, value in suites.get("knn", {}).items():
        row["knn_acc" if name == "acc" else f"knn{name.removeprefix('acc_k')}_acc"] = value
    row.update(suites.get("cluster", {}))
    row.update({f"svm_{name.removesuffix('_mean')}": v for name, v in suites.get("lowshot", {}).items()
                if name.endswith("_mean")})
    return row


def evaluate(cfg: ExperimentConfig, method_state: dict[str, torch.Tensor], log=print, *, remote: bool = False,
             gpu: bool | None = None) -> dict[str, dict[str, Any]]:
    """kNN accuracy (train split as the bank), test-split k-means AMI/NMI/ARI/ACC and low-shot SVM accuracy.

    Low-shot: ``svm_k<k>`` is the mean test accuracy of a linear SVM trained on ``k`` labelled train images
    per class over ``eval.lowshot_draws`` draws, its cost chosen on other train images (``eval.lowshot_*``).

    Rows: the learned representation (``<method>_backbone`` and ``<method>_head`` features) and, when
    ``eval.baselines``, ``raw_pixels``. Labels are used here only.

    ``remote``: run it as one Ray task with a training worker's resources (``ray.cpus_per_worker``, a GPU
    when the run trained on GPUs, or as ``gpu`` says), so that on a cluster it runs on a worker node
    rather than on the driver's (see :mod:`.remote`); in this process otherwise.
    """
    if remote:
        from .remote import evaluate_remote

        return evaluate_remote(cfg, method_state, gpu=gpu, log=log)
    return evaluate_here(cfg, method_state, log=log)


def evaluate_here(cfg: ExperimentConfig, method_state: dict[str, torch.Tensor], log=print) -> dict[str, dict[str, Any]]:
    """:func:`evaluate` in this process."""
    train, test, num_classes = load_splits(cfg, REPORT_SUITES)
    enc = load_encoder(cfg, method_state, train.channels, head_for="the end-of-run report's head row")
    log(f"[pcl-ray] evaluating: embedding {len(train)} train + {len(test)} test images")
    views = eval_views(cfg, train)
    ftr, fte = embed_split(enc, train, views, FEATURES), embed_split(enc, test, views, FEATURES)

    def row(train_x: np.ndarray, test_x: np.ndarray) -> dict[str, float]:
        # the suites' own progress lines stay out of the end-of-run output
        ctx = SuiteContext(cfg, train, test, num_classes, lambda _: None, train_x, test_x)
        return report_row(score(ctx, REPORT_SUITES))

    results: dict[str, dict[str, Any]] = {}
    for kind in FEATURES:
        results[f"{cfg.method.name}_{kind}"] = row(ftr[kind], fte[kind])  # N x d features of each split
    if cfg.eval.baselines:
        log("[pcl-ray] evaluating: raw-pixel baseline")
        size = cfg.data.image_size or train.image_size
        results["raw_pixels"] = row(raw_pixel_split(train, size), raw_pixel_split(test, size))  # N x C*H*W
    return results
