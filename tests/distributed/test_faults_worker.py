"""A Train worker killed mid-epoch (``ray.max_failures=1``): the run resumes from its last checkpoint and
finishes with the same epoch count, every epoch logged once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcl_ray.config import load_config
from pcl_ray.distributed.fault_injection import KILL_FILE

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.ray


def test_worker_killed_mid_epoch_run_resumes_and_finishes(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from pcl_ray.workflow import train

    runs = tmp_path / "runs"
    cfg = load_config(ROOT / "pipelines" / "digits_tiny.yaml", [
        "train.epochs=2",
        "train.warmup_epochs=1",
        "ray.num_workers=2",
        "ray.max_failures=1",
        f"ray.storage_path={runs}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "tracking.experiment=faults",
        "eval.enabled=false",
        "eval.online_every=0",
    ])
    # rank 1 exits (status 1, no cleanup) before step 3 of the second epoch, once: after epoch 1's checkpoint
    # and during the first E-step's epoch; the file is renamed when it fires
    request = runs / "it-kill" / KILL_FILE
    request.parent.mkdir(parents=True)
    request.write_text("1:3:1")

    out = train(cfg, run_name="it-kill")

    assert not request.exists() and request.with_name(KILL_FILE + ".fired").exists()  # the kill happened
    client = MlflowClient(out.tracking_uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"
    # every epoch logged exactly once: the retried group resumed after epoch 1 instead of starting over
    assert [m.step for m in client.get_metric_history(out.mlflow_run_id, "loss/total")] == [1, 2]
    assert [m.step for m in client.get_metric_history(out.mlflow_run_id, "epoch")] == [1, 2]
    assert [m.step for m in client.get_metric_history(out.mlflow_run_id, "estep/k10/size_max")] == [2]
    assert out.state_path is not None
