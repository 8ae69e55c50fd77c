"""The end-of-run report is the ``eval`` suite's knn/cluster/lowshot parts plus a raw-pixel row: the same
numbers as ``run_suite`` on the same encoder, under the report's names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pcl_ray.config import build_config
from pcl_ray.data import load_split
from pcl_ray.evaluation.features import raw_pixel_split
from pcl_ray.evaluation.report import REPORT_SUITES, evaluate_here, report_row
from pcl_ray.evaluation.suite import SuiteContext, run_suite, score
from pcl_ray.methods import build_method


@pytest.fixture(scope="module")
def digits():
    cfg = build_config({
        "data": {"name": "digits"},
        "model": {"backbone": "convnet", "width": 8},
        "method": {"name": "moco", "queue_size": 256},
        "train": {"batch_size": 64, "epochs": 1, "warmup_epochs": 0},
        "eval": {"knn_k": 20, "knn_extra_k": [5], "kmeans_restarts": 1, "lowshot_shots": [1, 4],
                 "lowshot_draws": 2, "lowshot_costs": [1.0], "lowshot_val_per_class": 5},
    })
    torch.manual_seed(0)
    return cfg, build_method(cfg, 1).state_dict()


def test_report_row_names_the_suite_metrics_as_the_results_table_reads_them():
    row = report_row({"knn": {"acc": 0.9, "acc_k5": 0.8}, "cluster": {"ami": 0.5, "nmi": 0.6, "ari": 0.4, "acc": 0.7},
                      "lowshot": {"k1_mean": 0.3, "k1_std": 0.01, "k16_mean": 0.6, "k16_std": 0.02}})
    assert row == {"knn_acc": 0.9, "knn5_acc": 0.8, "ami": 0.5, "nmi": 0.6, "ari": 0.4, "acc": 0.7,
                   "svm_k1": 0.3, "svm_k16": 0.6}
    assert list(row)[:2] == ["knn_acc", "knn5_acc"]  # the table's column order


def test_report_rows_are_the_suite_on_each_feature(digits, tmp_path):
    cfg, state = digits
    rows = evaluate_here(cfg, state, log=lambda _: None)
    assert list(rows) == ["moco_backbone", "moco_head", "raw_pixels"]
    for feature in ("backbone", "head"):
        cfg_f = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"feature": feature})})
        flat = run_suite(cfg_f, state, list(REPORT_SUITES), tmp_path / feature, log=lambda _: None)
        nested: dict[str, dict[str, float]] = {}
        for key, value in flat.items():
            _, suite, metric = key.split("/")
            nested.setdefault(suite, {})[metric] = value
        assert rows[f"moco_{feature}"] == pytest.approx(report_row(nested)), feature
    assert set(rows["raw_pixels"]) == set(rows["moco_backbone"]) == {
        "knn_acc", "knn5_acc", "ami", "nmi", "ari", "acc", "svm_k1", "svm_k4"}
    assert rows["raw_pixels"]["knn_acc"] > 0.9  # digits are easy in pixel space
    assert rows["moco_backbone"] != rows["moco_head"]


def test_raw_pixel_row_scores_the_pixels(digits):
    cfg, _ = digits
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    xtr, xte = raw_pixel_split(train, 8), raw_pixel_split(test, 8)  # N x 64 in [0, 1]
    assert xtr.shape == (len(train), 64) and xtr.dtype == np.float32 and 0.0 <= xtr.min() <= xtr.max() <= 1.0
    num_classes = int(train.labels.max() + 1)
    row = report_row(score(SuiteContext(cfg, train, test, num_classes, lambda _: None, xtr, xte), ["knn"]))
    assert row["knn_acc"] == pytest.approx(evaluate_here(cfg, build_method(cfg, 1).state_dict(),
                                                         log=lambda _: None)["raw_pixels"]["knn_acc"])


def test_report_refuses_a_checkpoint_without_the_head(digits):
    cfg, state = digits
    backbone_only = {k: v for k, v in state.items() if k.startswith("encoder.backbone.")}
    with pytest.raises(ValueError, match="report's head row needs the projection head"):
        evaluate_here(cfg, backbone_only, log=lambda _: None)
