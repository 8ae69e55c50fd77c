"""A training run whose storage is an S3 bucket: checkpoints, final state and the registry land there."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcl_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray


# The rehearsal's train and rank0 scenarios cover this across nodes in the default suite; this one-machine
# version stays for quick checks of the storage path (pytest -m slow).


@pytest.mark.slow
def test_train_in_a_bucket_then_resume_from_it(ray_local, s3_server, tmp_path):
    from pcl_ray.registry import checkpoint_states, final_state_rel, load_record
    from pcl_ray.storage import Storage
    from pcl_ray.workflow import train

    endpoint, make_bucket = s3_server
    bucket = make_bucket("train-storage")

    def cfg(epochs):
        return load_config(ROOT / "pipelines" / "digits_tiny.yaml", [
            f"train.epochs={epochs}", "ray.num_workers=2", f"ray.storage_path=s3://{bucket}/runs",
            f"ray.storage_endpoint={endpoint}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "eval.enabled=false"])

    out = train(cfg(2), run_name="s3-run", pipeline="digits_tiny")
    storage = Storage.from_uri(f"s3://{bucket}/runs", endpoint)
    assert out.state_path == f"s3://{bucket}/runs/s3-run/final_state.pt"
    assert storage.is_file(final_state_rel("s3-run"))
    assert len(checkpoint_states(storage, "s3-run")) == 2  # train.keep_checkpoints
    record = load_record(storage, "s3-run")
    assert record.mlflow_run_id == out.mlflow_run_id and record.pipeline == "digits_tiny"
    assert not any(Path(tmp_path).glob("**/checkpoint_*"))  # nothing of the run on the local disk

    from mlflow.tracking import MlflowClient

    client = MlflowClient(out.tracking_uri)
    assert client.get_run(out.mlflow_run_id).data.tags["pcl_ray.storage"] == f"s3://{bucket}/runs/s3-run"
    # resuming the finished run restores the bucket's last checkpoint and trains nothing more
    again = train(cfg(2), run_name="s3-run", pipeline="digits_tiny")
    assert again.mlflow_run_id == out.mlflow_run_id
    assert [m.step for m in client.get_metric_history(out.mlflow_run_id, "loss/total")] == [1, 2]
    assert storage.is_file(final_state_rel("s3-run"))
