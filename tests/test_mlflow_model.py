"""A short training run logs MLflow Models that load with one line and give the checkpoint's features;
``--register`` puts the backbone in the Model Registry and ``eval`` takes its ``models:/`` URI."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pcl_ray.config import load_config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.ray


def test_logged_models_match_the_checkpoint_and_resolve_in_eval(ray_local, tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from pcl_ray.data.sources import load_split
    from pcl_ray.eval_workflow import evaluate_target, resolve_target
    from pcl_ray.evaluation.features import eval_views, load_encoder
    from pcl_ray.workflow import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(ROOT / "pipelines" / "digits_tiny.yaml", [
        "train.epochs=1", "train.warmup_epochs=1", "ray.num_workers=1", f"ray.storage_path={tmp_path / 'runs'}",
        f"tracking.uri={uri}", "tracking.experiment=models", "eval.enabled=false"])
    out = train(cfg, run_name="models-it", pipeline="digits_tiny", register="pcl-digits-it")
    assert out.models == {"backbone": "models:/pcl-digits-it/1", "encoder": f"runs:/{out.mlflow_run_id}/encoder"}

    # the checkpoint's encoder on the test images, through the evaluation's own views
    state = torch.load(io.BytesIO(Path(out.state_path).read_bytes()), map_location="cpu", weights_only=True)
    test = load_split(cfg.data, "test")
    enc = load_encoder(cfg, state["method"], test.channels)
    images = test.tensor[:16]  # 16 x 1 x 8 x 8 uint8
    with torch.no_grad():
        x = eval_views(cfg, test).eval(images)
        want_backbone = enc.features(x)  # 16 x backbone_dim
        want_embedding = F.normalize(enc.head(want_backbone), dim=1)  # 16 x feature_dim

    mlflow.set_tracking_uri(uri)
    try:
        for model_uri, want in ((f"runs:/{out.mlflow_run_id}/backbone", want_backbone),
                                ("models:/pcl-digits-it/1", want_backbone),
                                (out.models["encoder"], want_embedding)):
            model = mlflow.pytorch.load_model(model_uri, map_location="cpu")  # a torch.export program
            with torch.no_grad():
                got = model(images.float() / 255.0)  # 16 x d: any batch size, not only the example's 2
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            info = mlflow.models.get_model_info(model_uri)
            assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 8, 8]
            assert info.metadata["mean"] == pytest.approx(list(test.mean))
            assert info.metadata["std"] == pytest.approx(list(test.std))
            assert (info.metadata["channels"], info.metadata["input_size"]) == (1, 8)
            assert info.run_id == out.mlflow_run_id
        assert mlflow.models.Model.load(f"runs:/{out.mlflow_run_id}/backbone").saved_input_example_info is not None
    finally:
        mlflow.set_tracking_uri("")

    run = MlflowClient(uri).get_run(out.mlflow_run_id)
    assert run.data.tags["mlflow.source.type"] == "LOCAL" and run.data.tags["mlflow.source.name"]
    assert run.data.tags["pcl_ray.pipeline"] == "digits_tiny"
    if (ROOT / ".git").exists():
        assert len(run.data.tags["mlflow.source.git.commit"]) == 40

    # eval takes the registered model: its weights, the config in its metadata, results on the training run
    target = resolve_target("models:/pcl-digits-it/1", [f"tracking.uri={uri}"])
    assert target.mlflow_run_id == out.mlflow_run_id
    checkpoint_encoder = {k: v for k, v in state["method"].items() if k.startswith("encoder.")}
    assert sorted(target.method_state) == sorted(checkpoint_encoder)
    for k, v in checkpoint_encoder.items():
        torch.testing.assert_close(target.method_state[k], v)
    outcome = evaluate_target(target, overrides=[f"tracking.uri={uri}"], suites=["knn"],
                              out_dir=str(tmp_path / "eval-out"))
    assert 0 < outcome.metrics["eval/knn/acc"] <= 1
    assert outcome.mlflow_run_id == out.mlflow_run_id
    assert "eval/knn/acc" in MlflowClient(uri).get_run(out.mlflow_run_id).data.metrics


def test_an_unknown_model_uri_is_a_clear_eval_error(tmp_path):
    from pcl_ray.eval_workflow import EvalTargetError, resolve_target

    with pytest.raises(EvalTargetError, match="models:/nope/1: no such MLflow model"):
        resolve_target("models:/nope/1", [f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
