"""Exact resume: a 2-worker PCL run killed mid-epoch and resumed from its checkpoint (Ray Train's restart with
``ray.max_failures=1``) logs the same per-epoch numbers as the same run uninterrupted, number for number."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcl_ray.config import load_config

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray

TIMING = ("time/", "throughput/", "estep/seconds")  # wall-clock numbers differ by nature


def _history(client, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in sorted(run.data.metrics) if not key.startswith(TIMING) and not key.startswith("eval/")}


def test_killed_and_resumed_run_equals_uninterrupted_run(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from pcl_ray.distributed.fault_injection import KILL_FILE
    from pcl_ray.workflow import train

    cfg = load_config(ROOT / "pipelines" / "digits_tiny.yaml", [
        "train.epochs=3", "train.warmup_epochs=1", "ray.num_workers=2", "ray.max_failures=1",
        f"ray.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "eval.enabled=false"])
    plain = train(cfg, run_name="plain")
    # the same run, but rank 0 dies at step 3 of epoch 2 (after epoch 1's checkpoint and E-step hand-off)
    (tmp_path / "runs" / "resumed").mkdir(parents=True)
    (tmp_path / "runs" / "resumed" / KILL_FILE).write_text("1:3:0")
    resumed = train(cfg, run_name="resumed")
    assert (tmp_path / "runs" / "resumed" / f"{KILL_FILE}.fired").exists()  # the kill happened

    client = MlflowClient(plain.tracking_uri)
    a, b = _history(client, plain.mlflow_run_id), _history(client, resumed.mlflow_run_id)
    assert a.keys() == b.keys() and "acc/proto" in a and "estep/k10/size_max" in a
    assert [s for s, _ in a["loss/total"]] == [1, 2, 3] == [s for s, _ in b["loss/total"]]
    differ = {key: (a[key], b[key]) for key in a if a[key] != b[key]}
    assert not differ, " ".join(sorted(differ))


def test_driver_resume_of_a_streamed_warm_started_run_equals_uninterrupted_run(ray_local, tmp_path, capfd):
    """``estep.features=stream`` + ``estep.warm_start``: rank 0 dies at step 3 of epoch 3 with no retries
    (``ray.max_failures=0``), so the run fails and its cluster actor goes with it; the same ``train`` again
    resumes from epoch 2's checkpoint with a new actor. The resumed E-step still clusters the checkpoint's
    streamed embeddings from the checkpoint's centroids, and every per-epoch number equals the uninterrupted
    run's."""
    from mlflow.tracking import MlflowClient

    from pcl_ray.distributed.fault_injection import KILL_FILE
    from pcl_ray.workflow import train

    cfg = load_config(ROOT / "pipelines" / "digits_tiny.yaml", [
        "train.epochs=4", "train.warmup_epochs=1", "ray.num_workers=2", "ray.max_failures=0",
        "estep.features=stream", "estep.warm_start=true", f"ray.storage_path={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "eval.enabled=false"])
    plain = train(cfg, run_name="plain")
    (tmp_path / "runs" / "resumed").mkdir(parents=True)
    (tmp_path / "runs" / "resumed" / KILL_FILE).write_text("2:3:0")
    with pytest.raises(Exception):
        train(cfg, run_name="resumed")
    assert (tmp_path / "runs" / "resumed" / f"{KILL_FILE}.fired").exists()  # the kill happened
    capfd.readouterr()
    resumed = train(cfg, run_name="resumed")
    out = "".join(capfd.readouterr())
    assert "resumed from checkpoint after epoch 2" in out
    assert "epoch 3: E-step k=[10,30] on the M-step's embeddings of the last epoch" in out  # not an eval pass

    client = MlflowClient(plain.tracking_uri)
    a, b = _history(client, plain.mlflow_run_id), _history(client, resumed.mlflow_run_id)
    assert a.keys() == b.keys() and "acc/proto" in a
    assert [s for s, _ in a["estep/from_stream"]] == [2, 3, 4] and all(v == 1.0 for _, v in b["estep/from_stream"])
    differ = {key: (a[key], b[key]) for key in a if a[key] != b[key]}
    assert not differ, " ".join(sorted(differ))
