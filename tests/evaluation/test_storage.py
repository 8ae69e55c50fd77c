"""`eval RUN` through the storage layer: runs in an S3 bucket (a moto server on 127.0.0.1), on a shared
mount and in a local folder; a half-written newest state is skipped for the previous complete one;
the evaluation's artifacts land in ``<run>/eval/`` of the run's storage."""

from __future__ import annotations

import io
import uuid

import pytest
import torch

from pcl_ray.cli import main
from pcl_ray.config import build_config
from pcl_ray.eval_workflow import EvalTargetError, evaluate_target, resolve_target
from pcl_ray.evaluation import read_embeddings
from pcl_ray.methods import build_method
from pcl_ray.registry import RunRecord, save_record
from pcl_ray.storage import Storage
from pcl_ray.tracking import RunLogger


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    """One MLflow store for the module (creating its tables is the slowest step of these tests)."""
    return f"sqlite:///{tmp_path_factory.mktemp('eval_storage') / 'mlflow.db'}"


@pytest.fixture
def cfg(tracking_uri):
    return build_config({
        "data": {"name": "digits"},
        "model": {"backbone": "convnet", "width": 8},
        "method": {"name": "pcl", "queue_size": 256, "num_negative_prototypes": 16},
        "estep": {"num_clusters": [10, 20], "nredo": 1},
        "train": {"batch_size": 64, "epochs": 2, "warmup_epochs": 0},
        "tracking": {"uri": tracking_uri, "experiment": "eval-storage-test"},
        "eval": {"knn_k": 20, "kmeans_restarts": 1, "lowshot_shots": [1], "lowshot_draws": 1,
                 "lowshot_val_per_class": 5},
    })


def _state_bytes(cfg, epoch: int) -> bytes:
    """A checkpoint in the worker's format (``_save_state``) from an untrained method, as bytes."""
    torch.manual_seed(epoch)
    buf = io.BytesIO()
    torch.save({"method": build_method(cfg, 1).state_dict(), "optimizer": {}, "epoch": epoch, "global_step": 0,
                "config": cfg.model_dump(mode="json")}, buf)
    return buf.getvalue()


def _put_run(storage: Storage, run: str, cfg, *, truncate_newest: bool = False) -> str:
    """Two checkpoints (epochs 0 and 1) under ``<run>/checkpoint_00000{1,2}/state.pt`` + an MLflow run and
    the registry record that `train` writes; the newest one cut in half when ``truncate_newest``."""
    storage.write_bytes(f"{run}/checkpoint_000001/state.pt", _state_bytes(cfg, 0))
    newest = _state_bytes(cfg, 1)
    storage.write_bytes(f"{run}/checkpoint_000002/state.pt", newest[: len(newest) // 2] if truncate_newest else newest)
    logger = RunLogger.start(cfg.tracking.uri, cfg.tracking.experiment, run,
                             tags={"pcl_ray.run_name": run, "pcl_ray.storage": storage.uri_of(run)})
    logger.end("FINISHED")
    save_record(storage, RunRecord(run_name=run, mlflow_run_id=logger.run_id, tracking_uri=cfg.tracking.uri))
    return logger.run_id


@pytest.fixture
def bucket(s3_server, monkeypatch):
    """A fresh bucket on the session's S3 server; dummy credentials for this test."""
    endpoint, make_bucket = s3_server
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    name = make_bucket(f"eval-{uuid.uuid4().hex[:10]}")
    overrides = [f"ray.storage_path=s3://{name}/runs", f"ray.storage_endpoint={endpoint}"]
    return {"name": name, "endpoint": endpoint, "overrides": overrides,
            "storage": Storage.from_uri(f"s3://{name}/runs", endpoint)}


def test_run_name_is_found_in_the_bucket(bucket, cfg):
    run_id = _put_run(bucket["storage"], "r-s3", cfg)
    lines: list[str] = []
    target = resolve_target("r-s3", bucket["overrides"], log=lines.append)
    assert target.checkpoint == f"s3://{bucket['name']}/runs/r-s3/checkpoint_000002/state.pt"
    assert target.epoch == 1 and target.skipped == [] and lines == []
    assert target.mlflow_run_id == run_id and target.tracking_uri == cfg.tracking.uri  # from the registry record
    assert target.storage.uri == f"s3://{bucket['name']}/runs" and target.run == "r-s3"
    assert target.config["model"]["width"] == 8 and any(k.startswith("encoder.backbone.") for k in target.method_state)


def test_half_written_newest_checkpoint_falls_back_to_the_previous_one(bucket, cfg):
    _put_run(bucket["storage"], "r-cut", cfg, truncate_newest=True)
    lines: list[str] = []
    target = resolve_target("r-cut", bucket["overrides"], log=lines.append)
    base = f"s3://{bucket['name']}/runs/r-cut"
    assert target.checkpoint == f"{base}/checkpoint_000001/state.pt" and target.epoch == 0
    assert len(lines) == 1 and len(target.skipped) == 1
    line = lines[0]
    assert f"skipped {base}/checkpoint_000002/state.pt" in line
    assert "not a readable torch checkpoint" in line and f"trying {base}/checkpoint_000001/state.pt" in line

    # Named explicitly, the half-written file is an error, not a silent substitute.
    with pytest.raises(EvalTargetError, match="checkpoint_000002/state.pt: not a readable torch checkpoint"):
        resolve_target(f"{base}/checkpoint_000002/state.pt", bucket["overrides"][1:])


def test_every_state_unreadable_is_an_error_listing_them(bucket):
    storage = bucket["storage"]
    storage.write_bytes("r-bad/checkpoint_000001/state.pt", b"PK\x03\x04 not really")
    storage.write_bytes("r-bad/final_state.pt", b"")
    lines: list[str] = []
    with pytest.raises(EvalTargetError) as err:
        resolve_target("r-bad", bucket["overrides"], log=lines.append)
    text = str(err.value)
    assert "no readable checkpoint" in text and "final_state.pt" in text and "checkpoint_000001" in text
    assert len(lines) == 2 and "no older checkpoint left" in lines[-1]


def test_missing_run_names_the_storage_uri(bucket):
    with pytest.raises(EvalTargetError) as err:
        resolve_target("no-such-run", bucket["overrides"])
    assert f"s3://{bucket['name']}/runs" in str(err.value) and "no-such-run" in str(err.value)
    assert main(["eval", "no-such-run", *[a for o in bucket["overrides"] for a in ("--set", o)]]) == 2


def test_uris_of_a_file_and_of_a_run_folder(bucket, cfg):
    run_id = _put_run(bucket["storage"], "r-uri", cfg)
    base = f"s3://{bucket['name']}/runs/r-uri"
    endpoint = [f"ray.storage_endpoint={bucket['endpoint']}"]
    by_file = resolve_target(f"{base}/checkpoint_000001/state.pt", endpoint)
    assert by_file.checkpoint == f"{base}/checkpoint_000001/state.pt" and by_file.epoch == 0
    assert by_file.run == "r-uri" and by_file.mlflow_run_id == run_id  # the registry beside the run folder
    by_folder = resolve_target(base + "/", endpoint)
    assert by_folder.checkpoint == f"{base}/checkpoint_000002/state.pt"
    by_checkpoint_folder = resolve_target(f"{base}/checkpoint_000001", endpoint)
    assert by_checkpoint_folder.epoch == 0 and by_checkpoint_folder.run == "r-uri"
    with pytest.raises(EvalTargetError, match="no such file or folder"):
        resolve_target(f"{base}/checkpoint_000009/state.pt", endpoint)


def test_mlflow_run_id_finds_the_run_through_its_storage_tag(bucket, cfg):
    run_id = _put_run(bucket["storage"], "r-tag", cfg)
    # No ray.storage_path: the run's pcl_ray.storage tag says where its folder is.
    target = resolve_target(run_id, [f"tracking.uri={cfg.tracking.uri}", f"ray.storage_endpoint={bucket['endpoint']}"])
    assert target.checkpoint == f"s3://{bucket['name']}/runs/r-tag/checkpoint_000002/state.pt"
    assert target.mlflow_run_id == run_id


def test_eval_cli_writes_artifacts_whole_to_the_run_folder_in_the_bucket(bucket, tmp_path, capsys, cfg):
    run_id = _put_run(bucket["storage"], "r-out", cfg, truncate_newest=True)
    args = ["eval", "r-out", "--suite", "knn,export", "--set", "eval.export_splits=[test]"]
    rc = main([*args, *[a for o in bucket["overrides"] for a in ("--set", o)]])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "skipped s3://" in out and "after skipping 1 unreadable state file" in out
    storage = bucket["storage"]
    assert sorted(name for name, _, _ in storage.list("r-out/eval")) == ["backbone.pt", "embeddings.parquet"]
    local = storage.download("r-out/eval/embeddings.parquet", tmp_path / "emb.parquet")
    assert read_embeddings(local)["split"].tolist() == ["test"] * 297

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.uri)
    assert [m.step for m in client.get_metric_history(run_id, "eval/knn/acc")] == [1]  # epoch 0 -> step 1
    assert {a.path for a in client.list_artifacts(run_id, "eval")} == {"eval/backbone.pt", "eval/embeddings.parquet"}


def test_shared_mount_and_local_folder_fall_back_alike(tmp_path, cfg):
    for storage_path in (f"file://{tmp_path}/shared", str(tmp_path / "local")):
        storage = Storage.from_uri(storage_path)
        _put_run(storage, "r-disk", cfg)
        storage.write_bytes("r-disk/final_state.pt", _state_bytes(cfg, 1)[:100])  # died while copying
        lines: list[str] = []
        target = resolve_target("r-disk", [f"ray.storage_path={storage_path}"], log=lines.append)
        assert target.checkpoint == storage.local_path("r-disk/checkpoint_000002/state.pt")
        assert len(lines) == 1 and "final_state.pt" in lines[0] and "checkpoint_000002" in lines[0]
        outcome = evaluate_target(target, suites="knn", mlflow=False, log=lambda _: None)
        assert "eval/knn/acc" in outcome.metrics and outcome.out_dir == storage.uri_of("r-disk/eval")
