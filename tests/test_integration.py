"""End-to-end: PCL on digits through Ray Train workers + the cluster actor, MLflow, evaluation, resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from pcl_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray


def _cfg(tmp_path: Path, epochs: int):
    return load_config(
        ROOT / "pipelines" / "digits_tiny.yaml",
        [
            f"train.epochs={epochs}",
            "train.warmup_epochs=1",
            "ray.num_workers=2",
            f"ray.storage_path={tmp_path / 'runs'}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.experiment=it",
            "eval.kmeans_restarts=1",
        ],
    )


def test_pcl_trains_evaluates_logs_and_resumes(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from pcl_ray.workflow import train

    out = train(_cfg(tmp_path, 2), run_name="it-pcl")
    client = MlflowClient(out.tracking_uri)
    run = client.get_run(out.mlflow_run_id)
    assert run.info.status == "FINISHED"

    # the E-step ran (after the 1 warm-up epoch) and its stats reached MLflow at epoch 2 only
    sizes = client.get_metric_history(out.mlflow_run_id, "estep/k10/size_max")
    assert [m.step for m in sizes] == [2]
    assert sizes[0].value >= 1500 / 10
    assert [m.step for m in client.get_metric_history(out.mlflow_run_id, "estep/k10/ami_labels")] == [2]
    proto = client.get_metric_history(out.mlflow_run_id, "acc/proto")
    assert [m.step for m in proto] == [2]
    losses = client.get_metric_history(out.mlflow_run_id, "loss/total")
    assert [m.step for m in losses] == [1, 2]
    online = client.get_metric_history(out.mlflow_run_id, "online/knn_acc")
    assert [m.step for m in online] == [1, 2] and all(0 < m.value <= 1 for m in online)
    assert all(m.value == m.value and m.value > 0 for m in losses)
    assert run.data.params["method.name"] == "pcl"
    assert run.data.params["proto_form.k10"] == "full"
    assert run.data.params["estep.backend_used"] == "faiss-cpu"

    # artifacts: resolved config, backbone weights, prototype plot
    names = {a.path for a in client.list_artifacts(out.mlflow_run_id)}
    assert "config.yaml" in names
    assert {a.path for a in client.list_artifacts(out.mlflow_run_id, "model")} == {"model/backbone.pt"}
    plots = [a.path for a in client.list_artifacts(out.mlflow_run_id, "plots")]
    assert plots and plots[0].endswith(".png")

    # evaluation with the raw-pixel baseline in the same run
    assert set(out.eval) == {"pcl_backbone", "pcl_head", "raw_pixels"}
    for row in out.eval.values():
        assert 0.0 <= row["ami"] <= 1.0 and 0.0 < row["knn_acc"] <= 1.0
    assert out.eval["raw_pixels"]["knn_acc"] > 0.9  # digits are easy in pixel space
    # low-shot linear SVM, 1..16 labels per class: more labels help (pixels of digits, mean of 5 draws)
    pix = out.eval["raw_pixels"]
    assert {f"svm_k{k}" for k in (1, 2, 4, 8, 16)} <= set(pix)
    assert 0.1 < pix["svm_k1"] < pix["svm_k16"] <= 1.0
    assert client.get_run(out.mlflow_run_id).data.metrics["eval/raw_pixels/knn_acc"] == pytest.approx(
        out.eval["raw_pixels"]["knn_acc"])

    # a resume that would train differently (another epoch count reshapes the cosine schedule) is refused
    # before anything runs, naming the key; the MLflow run is left as it was
    from pcl_ray.config import ConfigError

    with pytest.raises(ConfigError, match=r"--resume it-pcl: .*train\.epochs: 2 -> 3"):
        train(_cfg(tmp_path, 3), run_name="it-pcl")
    assert client.get_run(out.mlflow_run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(out.mlflow_run_id, "loss/total")] == [1, 2]
