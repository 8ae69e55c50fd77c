"""Evaluation as one Ray task (what runs on a cluster's worker node) gives what the in-process evaluation
gives: the end-of-run report, and the `eval` suite with its artifacts coming back as bytes or written
to the storage by the task."""

from __future__ import annotations

import os

import pytest
import torch

from pcl_ray.config import build_config
from pcl_ray.eval_workflow import EvalTarget, evaluate_target
from pcl_ray.evaluation.remote import evaluate_remote, on_cluster, run_suite_remote, task_options
from pcl_ray.evaluation.report import evaluate
from pcl_ray.methods import build_method
from pcl_ray.storage import Storage


@pytest.fixture(scope="module")
def digits():
    cfg = build_config({
        "data": {"name": "digits"},
        "model": {"backbone": "convnet", "width": 8},
        "method": {"name": "pcl", "queue_size": 256, "num_negative_prototypes": 16},
        "estep": {"num_clusters": [10, 20], "nredo": 1},
        "train": {"batch_size": 64, "epochs": 1, "warmup_epochs": 0},
        "ray": {"cpus_per_worker": 1, "use_gpu": False},
        "eval": {"knn_k": 20, "kmeans_restarts": 1, "lowshot_shots": [1, 2], "lowshot_draws": 1, "lowshot_costs": [1.0],
                 "lowshot_val_per_class": 5},
    })
    torch.manual_seed(0)
    return cfg, build_method(cfg, 1).state_dict()


def test_task_resources_are_a_training_workers(digits):
    cfg, _ = digits
    assert task_options(cfg, gpu=False) == {"num_cpus": 1, "num_gpus": 0}
    assert task_options(cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"cpus_per_worker": 4.0})}),
                        gpu=True) == {"num_cpus": 4.0, "num_gpus": 1}


def test_attached_means_remote(digits, monkeypatch):
    cfg, _ = digits
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with_address = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"address": "10.0.0.1:6379"})})
    assert on_cluster(with_address)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # as `ray job submit` sets it for the job's driver
    assert on_cluster(cfg)


def test_end_of_run_report_as_a_ray_task_matches_in_process(ray_local, digits):
    cfg, state = digits
    assert not on_cluster(cfg)  # one local node, no address: train's evaluation stays in process
    here = evaluate(cfg, state, log=lambda _: None)
    where: dict = {}
    there = evaluate_remote(cfg, state, gpu=False, log=lambda _: None, where=where)
    assert where["pid"] != os.getpid() and where["device"] == "cpu"  # it really ran in a Ray worker
    assert set(there) == set(here) == {"pcl_backbone", "pcl_head", "raw_pixels"}
    for row, values in here.items():
        assert set(there[row]) == set(values)
        for name, value in values.items():
            assert there[row][name] == pytest.approx(value, abs=1e-6), (row, name)



def test_report_switch_that_train_uses(digits, monkeypatch):
    from pcl_ray.evaluation import remote

    cfg, state = digits
    calls = []
    monkeypatch.setattr(remote, "evaluate_remote", lambda *a, **k: calls.append((a, k)) or {"row": {}})
    assert evaluate(cfg, state, log=print, remote=True) == {"row": {}}  # train passes remote=<on a cluster>
    assert len(calls) == 1 and calls[0][0][1] is state and calls[0][1]["gpu"] is None


def test_eval_suite_as_a_ray_task_matches_in_process(ray_local, digits, tmp_path):
    cfg, state = digits
    target = EvalTarget(label="fake", method_state=state, config=cfg.model_dump(mode="json"))
    kwargs = dict(suites="knn,lowshot,cluster,export", overrides=["eval.export_splits=[test]"], mlflow=False,
                  log=lambda _: None)
    here = evaluate_target(target, out_dir=tmp_path / "here", remote=False, **kwargs)
    there = evaluate_target(target, out_dir=tmp_path / "there", remote=True, **kwargs)
    assert there.remote is not None and there.remote["pid"] != os.getpid() and here.remote is None
    assert set(there.metrics) == set(here.metrics) and "eval/lowshot/k2_mean" in here.metrics
    for key, value in here.metrics.items():
        assert there.metrics[key] == pytest.approx(value, abs=1e-6), key
    assert here.artifacts == there.artifacts == ["backbone.pt", "embeddings.parquet"]
    for name in here.artifacts:  # the task's files came back whole
        assert (tmp_path / "there" / name).stat().st_size == (tmp_path / "here" / name).stat().st_size


def test_large_artifacts_are_written_to_the_storage_by_the_task(ray_local, digits, tmp_path):
    cfg, state = digits
    shared = Storage.from_uri(f"file://{tmp_path}/shared")  # a mount every node sees
    result = run_suite_remote(cfg, state, ["export"], dest=shared.sub("run/eval"), gpu=False, log=lambda _: None,
                              small_bytes=0)
    assert sorted(result.stored) == ["backbone.pt", "embeddings.parquet"] and result.files == {}
    assert shared.is_file("run/eval/embeddings.parquet") and shared.is_file("run/eval/backbone.pt")
    local_only = Storage.from_uri(tmp_path / "local")  # only this machine sees it: everything comes back as bytes
    result = run_suite_remote(cfg, state, ["export"], dest=local_only, gpu=False, log=lambda _: None, small_bytes=0)
    assert result.stored == [] and sorted(result.files) == ["backbone.pt", "embeddings.parquet"]
