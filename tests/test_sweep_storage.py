"""compare, tune and bench outputs through the storage layer (a local folder or an S3 bucket on a moto
server), safe names, one `use_gpu` decision per sweep, the `train_driver_slot` check on a cluster, and
PBT clones that travel through the storage.

Most tests drive the output layer with the training call replaced; the two real runs against the bucket
(a tune sweep and a compare on digits) are marked slow.
"""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pcl_ray.config import ConfigError, load_config
from pcl_ray.storage import Storage

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "pipelines" / "tune_digits_smoke.yaml"
DIGITS = ROOT / "pipelines" / "digits_tiny.yaml"


def _compare_file(tmp_path: Path, sets: list[str], name: str = "cmp", labels=("moco", "simclr")) -> Path:
    quoted = ", ".join(f'"{s}"' for s in sets)
    entries = "\n".join(f"    - {{label: {json_str(label)}, pipeline: {DIGITS}, set: [method.name={method}]}}"
                        for label, method in zip(labels, ("moco", "simclr")))
    p = tmp_path / "cmp.yaml"
    p.write_text(f"compare:\n  name: {json_str(name)}\n  seeds: [0]\n  set: [{quoted}]\n  entries:\n{entries}\n")
    return p


def json_str(text: str) -> str:
    import json

    return json.dumps(text)


def _bucket_keys(endpoint: str, bucket: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


# ----------------------------------------------------------------------------- safe names (no Ray)
@pytest.mark.parametrize(("name", "labels", "key"), [
    ("../../x", ("moco", "simclr"), "compare.name"),
    ("a/b", ("moco", "simclr"), "compare.name"),
    ("/abs", ("moco", "simclr"), "compare.name"),
    ("has space", ("moco", "simclr"), "compare.name"),
    ("x" * 110, ("moco", "simclr"), "compare.name"),          # too long once stamp, label and seed are added
    ("cmp", ("../up", "simclr"), "compare.entries[0].label"),
    ("cmp", ("moco", "a/b"), "compare.entries[1].label"),
    ("cmp", ("moco", ".."), "compare.entries[1].label"),
    ("cmp", ("moco", "-dash"), "compare.entries[1].label"),
])
def test_unsafe_compare_names_fail_naming_the_key(tmp_path, name, labels, key):
    from pcl_ray.compare import load_compare

    p = _compare_file(tmp_path, [f"ray.storage_path={tmp_path / 'runs'}"], name=name, labels=labels)
    with pytest.raises(ConfigError) as err:
        load_compare(p, [])
    assert str(err.value).startswith(f"{key}: ") and "not a safe name" in str(err.value)


@pytest.mark.parametrize("argv, key", [
    (["compare", "{cmp}", "--resume", "../../etc"], "--resume"),
    (["compare", "{cmp}", "--resume", "a/b"], "--resume"),
    (["tune", str(SMOKE), "--name", "../../x"], "--name"),
    (["tune", str(SMOKE), "--name", "x/y"], "--name"),
    (["tune", str(SMOKE), "--resume", "../x"], "--resume"),
    (["tune", str(SMOKE), "--resume", ".hidden"], "--resume"),
    (["tune", str(SMOKE), "--set", "tune.name=../x"], "tune.name"),
])
def test_unsafe_names_on_the_cli_exit_2_before_anything_is_written(tmp_path, capsys, argv, key):
    from pcl_ray.cli import main

    runs = tmp_path / "runs"
    cmp = _compare_file(tmp_path, [f"ray.storage_path={runs}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    argv = [a.replace("{cmp}", str(cmp)) for a in argv]
    if argv[0] == "tune":
        argv += ["--set", f"ray.storage_path={runs}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err
    assert not (tmp_path / "m.db").exists() and not runs.exists()


def test_unsafe_sweep_names_are_refused_by_run_sweep_too(tmp_path):
    from pcl_ray.sweep import load_sweep
    from pcl_ray.sweep.runner import run_sweep

    spec = load_sweep(SMOKE, [f"ray.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    for kwargs, key in (({"name": "../../x"}, "--name"), ({"resume": "../x"}, "--resume"),
                        ({"resume": "nosuch"}, "--resume")):
        with pytest.raises(ConfigError, match=f"^{key}: "):
            run_sweep(spec, log=lambda _: None, **kwargs)
    assert not (tmp_path / "runs" / ".pcl_ray_sweeps").exists()


# ----------------------------------------------------------------------------- compare on S3 (train replaced)
def _fake_train(calls: list):
    """Stands in for workflow.train: a real (untrained) method state in the run's storage, an MLflow child run."""
    from pcl_ray.methods import build_method
    from pcl_ray.registry import final_state_rel
    from pcl_ray.tracking import RunLogger, resolve_uri
    from pcl_ray.registry import run_storage
    from pcl_ray.workflow import TrainOutcome

    def train(cfg, *, run_name, parent_run_id=None, tags=None, **_):
        calls.append(run_name)
        storage = run_storage(cfg)
        buf = io.BytesIO()
        torch.save({"method": build_method(cfg, 1, generator=torch.Generator().manual_seed(0)).state_dict()}, buf)
        storage.write_bytes(final_state_rel(run_name), buf.getvalue())
        uri = resolve_uri(cfg.tracking.uri)
        child = RunLogger.start(uri, cfg.tracking.experiment, run_name, tags=tags, parent_run_id=parent_run_id)
        child.log_metrics({"online/knn_acc": 0.5 + 0.1 * len(calls)}, step=1)
        child.end("FINISHED")
        row = {"knn_acc": 0.5 + 0.1 * len(calls), "ami": 0.2, "nmi": 0.3, "acc": 0.4}
        ev = {f"{cfg.method.name}_backbone": row, f"{cfg.method.name}_head": row}
        if cfg.eval.baselines:
            ev["raw_pixels"] = {"knn_acc": 0.9, "ami": 0.5, "nmi": 0.5, "acc": 0.6}
        return TrainOutcome(run_name, child.run_id, uri, storage.uri_of(final_state_rel(run_name)), eval=ev)

    return train


def test_compare_outputs_land_in_the_bucket_and_resume_reads_them_back(s3_server, tmp_path, monkeypatch):
    from pcl_ray import compare, workflow

    endpoint, make_bucket = s3_server
    bucket = make_bucket("cmp-out")
    runs = tmp_path / "runs"
    p = _compare_file(tmp_path, [f"ray.storage_path=s3://{bucket}/runs", f"ray.storage_endpoint={endpoint}",
                                 f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "tracking.experiment=cmp-s3",
                                 "eval.kmeans_restarts=1"])
    calls: list[str] = []
    monkeypatch.setattr(workflow, "train", _fake_train(calls))
    monkeypatch.chdir(tmp_path)
    md, out = compare.run_compare(p, [], log=lambda _: None)
    assert len(calls) == 2 and out.uri == f"s3://{bucket}/runs/{out.name}"
    assert "| moco | backbone |" in md and "| raw pixels | pixels |" in md
    keys = _bucket_keys(endpoint, bucket)
    for f in ("compare.json", "results/moco-s0.json", "results/simclr-s0.json", "comparison.md",
              "comparison.png", "curves.png", "embeddings.png"):
        assert f"runs/{out.name}/{f}" in keys, keys
    assert not any(k.endswith(".part") for k in keys)
    assert out.files == [f"s3://{bucket}/runs/{out.name}/{f}"
                         for f in ("comparison.md", "comparison.png", "curves.png", "embeddings.png")]
    assert out.storage.read_text(out.rel("comparison.md")) == md
    assert out.storage.read_bytes(out.rel("embeddings.png")).startswith(b"\x89PNG")
    assert not runs.exists() and not list(tmp_path.glob(f"{out.name}*"))  # nothing on this machine's disk

    # resume: every result comes back from the bucket (final states too, for the t-SNE), nothing trains
    monkeypatch.setattr(workflow, "train", lambda *a, **k: pytest.fail("trained again"))
    md2, out2 = compare.run_compare(p, [], log=lambda _: None, resume=out.name)
    assert md2 == md and out2.name == out.name
    with pytest.raises(ConfigError, match=r"^--resume cmp-0: no comparison of that name under s3://"):
        compare.run_compare(p, [], resume="cmp-0")
    with pytest.raises(ConfigError, match=r"^--resume: "):
        compare.run_compare(p, [], resume="../" + out.name)


def test_compare_refuses_a_missing_bucket_before_anything_is_written(s3_server, tmp_path, monkeypatch):
    from pcl_ray import compare, workflow

    endpoint, _ = s3_server
    p = _compare_file(tmp_path, ["ray.storage_path=s3://no-such-bucket/runs", f"ray.storage_endpoint={endpoint}",
                                 f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    monkeypatch.setattr(workflow, "train", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(ConfigError, match=r"^ray.storage_path: cannot write to s3://no-such-bucket/runs"):
        compare.run_compare(p, [], log=lambda _: None)
    assert not (tmp_path / "m.db").exists()  # no MLflow parent run either


# ----------------------------------------------------------------------------- tune outputs on S3 (no Ray)
def test_sweep_outputs_and_records_go_through_the_bucket(s3_server, tmp_path):
    from pcl_ray.sweep import load_sweep
    from pcl_ray.sweep.report import TrialRow
    from pcl_ray.sweep.runner import SweepOutcome, latest_sweep, meta_rel, tune_location, write_outputs

    endpoint, make_bucket = s3_server
    bucket = make_bucket("sweep-out")
    spec = load_sweep(SMOKE, [f"ray.storage_path=s3://{bucket}/sweeps", f"ray.storage_endpoint={endpoint}"])
    storage = Storage.from_config(spec.base_cfg)
    assert latest_sweep(storage, "tune_digits_smoke") is None
    for name, created in (("tune_digits_smoke-1", 1.0), ("tune_digits_smoke-2", 2.0), ("other-3", 3.0)):
        storage.write_json(meta_rel(name), {"name": name, "prefix": name.rsplit("-", 1)[0], "created": created})
    assert latest_sweep(storage, "tune_digits_smoke") == "tune_digits_smoke-2"
    path, fs_kwargs = tune_location(storage, "sw")
    assert path == f"{bucket}/sweeps/sw" and fs_kwargs["storage_filesystem"] is storage.fs

    rows = [TrialRow("b", "finished", {"method.proto_weight": 1.0}, 0.8, 1, [(1, 0.8)]),
            TrialRow("a", "early_stopped", {"method.proto_weight": 0.0}, 0.6, 1, [(1, 0.6)])]
    outcome = SweepOutcome("sw", storage, "run-id", "sqlite:///x", spec, rows=rows)
    written = write_outputs(outcome, logger=None)
    base = f"s3://{bucket}/sweeps/sw"
    assert written == [f"{base}/{f}" for f in ("trials.csv", "metric_vs_params.png", "metric_curves.png",
                                                  "best_config.yaml")]
    assert outcome.csv == f"{base}/trials.csv" and outcome.best_config == f"{base}/best_config.yaml"
    keys = _bucket_keys(endpoint, bucket)
    assert {f"sweeps/sw/{f}" for f in ("trials.csv", "metric_vs_params.png", "metric_curves.png",
                                        "best_config.yaml")} <= set(keys)
    text = storage.read_text("sw/best_config.yaml")
    assert f"download {base}/best_config.yaml" in text
    local = tmp_path / "best.yaml"
    local.write_text(text)
    assert load_config(local).method.proto_weight == 1.0
    assert storage.read_text("sw/trials.csv").splitlines()[1].startswith("1,b,finished")


# ----------------------------------------------------------------------------- one use_gpu per sweep (no Ray)
def test_use_gpu_auto_is_decided_once_for_the_whole_sweep(tmp_path, monkeypatch):
    import ray

    from pcl_ray.distributed.trainer import use_gpu
    from pcl_ray.sweep import load_sweep
    from pcl_ray.sweep.report import TrialRow, write_best_config
    from pcl_ray.sweep.runner import _saved_spec, resolve_use_gpu
    from pcl_ray.sweep.trial import trial_config

    cluster = {"CPU": 16.0, "GPU": 0.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(cluster))
    spec = load_sweep(SMOKE, ['tune.search_space={"method.proto_weight": [0.0, 1.0], "ray.use_gpu": ["auto", false]}'])
    assert spec.base_cfg.ray.use_gpu == "auto"
    logs: list[str] = []
    assert resolve_use_gpu(spec, logs.append) is False
    assert spec.base_cfg.ray.use_gpu is False and "for the whole sweep" in logs[0]
    trial_spec = {"keys": spec.keys, "base_raw": spec.base_raw, "use_gpu": False}
    cluster["GPU"] = 8.0  # the autoscaler added GPU nodes after the sweep started
    for values in ({"method.proto_weight": 1.0, "ray.use_gpu": "auto"}, {"method.proto_weight": 0.0}):
        cfg = trial_config(trial_spec, values)
        assert cfg.ray.use_gpu is False and use_gpu(cfg) is False  # Train does not decide again
    assert trial_config(trial_spec, {"ray.use_gpu": True}).ray.use_gpu is True  # an explicit value stays

    # saved with the sweep: a resume keeps the decision even though the cluster now has GPUs
    meta = {"name": "sw", "pipeline": str(SMOKE), "overrides": [], "base_raw": spec.base_raw,
            "pinned": spec.pinned, "tune": spec.tune.model_dump(mode="json")}
    resumed = _saved_spec(meta)
    assert resolve_use_gpu(resumed, logs.append) is False and len(logs) == 1
    # the best config is the user's pipeline, not the sweep's decision
    best = TrialRow("t", "finished", {"method.proto_weight": 1.0}, 0.9, 1)
    assert load_config(write_best_config(best, spec, "sw", tmp_path / "b.yaml")).ray.use_gpu == "auto"

    fresh = load_sweep(SMOKE)
    assert resolve_use_gpu(fresh, logs.append) is True and fresh.base_cfg.ray.use_gpu is True
    explicit = load_sweep(SMOKE, ["ray.use_gpu=false"])
    assert resolve_use_gpu(explicit, logs.append) is False and "ray.use_gpu" not in explicit.pinned


# ----------------------------------------------------------------------------- driver slots on a cluster (no Ray)
def test_an_attached_cluster_without_driver_slots_fails_up_front(tmp_path, monkeypatch):
    import ray

    from pcl_ray.distributed import connect, trainer
    from pcl_ray.sweep import load_sweep
    from pcl_ray.sweep.runner import _start_ray, run_sweep

    db = tmp_path / "m.db"
    spec = load_sweep(SMOKE, [f"ray.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{db}"])
    monkeypatch.setattr(connect, "attach_address", lambda cfg: "10.0.0.1:6379")
    monkeypatch.setattr(trainer, "init_ray", lambda cfg, **k: False)
    resources = {"CPU": 64.0, "GPU": 8.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(resources))
    with pytest.raises(ConfigError) as err:
        run_sweep(spec, name="sw", log=lambda _: None)
    msg = str(err.value)
    assert msg.startswith("tune.trial_resources.driver_cpus: ") and "train_driver_slot" in msg
    assert "head" in msg and "10.0.0.1:6379" in msg and "\n" not in msg
    assert not (tmp_path / "runs" / ".pcl_ray_sweeps").exists() and not (tmp_path / "runs" / "sw").exists()
    assert not db.exists()  # no MLflow parent run

    resources["train_driver_slot"] = 4.0
    assert _start_ray(spec, lambda _: None) == spec.tune.max_concurrent_trials
    del resources["train_driver_slot"]  # a CPU per trial driver needs no slot
    with_cpu = load_sweep(SMOKE, ["tune.trial_resources.driver_cpus=1"])
    assert _start_ray(with_cpu, lambda _: None) == with_cpu.tune.max_concurrent_trials


def test_a_local_storage_on_a_multi_node_cluster_is_refused_before_the_sweep(tmp_path, monkeypatch):
    import ray

    from pcl_ray.distributed import connect, trainer
    from pcl_ray.sweep import load_sweep
    from pcl_ray.sweep.runner import run_sweep

    spec = load_sweep(SMOKE, [f"ray.storage_path={tmp_path / 'runs'}", "tracking.uri=sqlite:///"
                              f"{tmp_path / 'm.db'}"])
    monkeypatch.setattr(connect, "attach_address", lambda cfg: "10.0.0.1:6379")
    monkeypatch.setattr(connect, "alive_nodes", lambda: 3)
    monkeypatch.setattr(trainer, "init_ray", lambda cfg, **k: False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0, "train_driver_slot": 2.0})
    with pytest.raises(ConfigError, match=r"^ray.storage_path: .* is a folder on this machine, but the cluster has 3"):
        run_sweep(spec, name="sw", log=lambda _: None)
    assert not (tmp_path / "runs" / ".pcl_ray_sweeps").exists()


# ----------------------------------------------------------------------------- PBT clones through the storage
def _state_bytes(value: float) -> bytes:
    buf = io.BytesIO()
    torch.save({"method": {"w": torch.full((3,), value)}, "epoch": 1, "global_step": 7}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("where", ["s3", "local"])
def test_a_pbt_clone_is_copied_to_the_storage_and_opened_by_uri_on_any_node(s3_server, tmp_path, monkeypatch,
                                                                           where):
    import ray.train

    from pcl_ray.sweep.trial import PBT_DIR, clone_checkpoint, resolve_start

    endpoint, make_bucket = s3_server
    if where == "s3":
        storage = Storage.from_uri(f"s3://{make_bucket('pbt-clones')}/runs", endpoint)
    else:
        storage = Storage.from_uri(tmp_path / "runs")
    train_ckpt = "sw-t1/checkpoint_2026-01-01_00-00-01.000000"
    storage.write_bytes(f"{train_ckpt}/state.pt", _state_bytes(3.0))
    storage.write_bytes(f"{train_ckpt}/rank_1_of_2.pt", b"rank state")
    clone = clone_checkpoint(storage, "sw", "t1", storage.path(train_ckpt))
    rel = f"sw/{PBT_DIR}/t1-checkpoint_2026-01-01_00-00-01.000000"
    assert storage.read_bytes(f"{rel}/rank_1_of_2.pt") == b"rank state"  # per-rank state (SwAV's queue) too
    assert storage.is_file(f"{rel}/state.pt") and storage.read_json(f"{rel}/pcl_ray_source.json")["run_name"] == "sw-t1"
    assert clone.path == storage.path(rel) and clone.filesystem.type_name == ("s3" if where == "s3" else "local")
    assert clone_checkpoint(storage, "sw", "t1", storage.path("sw-t1/checkpoint_none")) is None
    storage.delete(train_ckpt)  # Train keeps only its newest checkpoints: the clone does not need the original

    clone = pickle.loads(pickle.dumps(clone))  # Tune hands it to another trial's actor
    assert resolve_start(storage, "sw-t1", clone) == ("sw-t1", None, None)  # its own state: Train resumes
    run_name, init, source = resolve_start(storage, "sw-t2", clone)
    assert run_name.startswith("sw-t2-x") and source == "t1"
    if where == "s3":
        assert init.startswith(f"s3://pbt-clones/runs/{rel}?") and "endpoint_override=127.0.0.1" in init
    else:
        assert init == str(tmp_path / "runs" / rel)
    # the Train worker side, as pcl_ray/distributed/worker.py does it: Checkpoint(uri), without the
    # driver's environment (no AWS_ENDPOINT_URL: the URI carries the endpoint)
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    with ray.train.Checkpoint(init).as_directory() as d:
        state = torch.load(Path(d) / "state.pt", map_location="cpu", weights_only=True)
        assert (Path(d) / "rank_1_of_2.pt").read_bytes() == b"rank state"
    assert torch.equal(state["method"]["w"], torch.full((3,), 3.0)) and state["global_step"] == 7


# ----------------------------------------------------------------------------- bench
def test_bench_writes_to_the_bucket_through_a_local_temp_folder(s3_server, tmp_path, monkeypatch, capsys):
    from pcl_ray import bench
    from pcl_ray.cli import main

    endpoint, make_bucket = s3_server
    bucket = make_bucket("bench-out")

    def fake_bench(cfg, parts, steps=10, log=print, **kwargs):
        report = bench.BenchReport(label="fake")
        report.add("mstep", "M-step", 123.0, "img/s")
        return report

    monkeypatch.setattr(bench, "run_bench", fake_bench)
    monkeypatch.chdir(tmp_path)
    rc = main(["bench", str(DIGITS), "--set", f"ray.storage_path=s3://{bucket}/b", "--set",
               f"ray.storage_endpoint={endpoint}", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    keys = _bucket_keys(endpoint, bucket)
    stamps = {k.split("/")[1] for k in keys if k.startswith("b/bench-")}
    assert len(stamps) == 1
    stamp = stamps.pop()
    assert {f"b/{stamp}/bench.json", f"b/{stamp}/bench.md"} <= set(keys)
    assert f"s3://{bucket}/b/{stamp}/bench.json" in "".join(out.split())  # the table printer wraps lines
    assert not list(tmp_path.glob("**/bench-*"))  # no bench folder on this disk (MLflow keeps its own copy)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_name for r in runs] == [stamp]  # the MLflow run is named as the folder, not the temp dir

    local = tmp_path / "runs-local"
    assert main(["bench", str(DIGITS), "--no-mlflow", "--set", f"ray.storage_path={local}"]) == 0
    assert len(list(local.glob("bench-*/bench.json"))) == 1


# ----------------------------------------------------------------------------- real runs against the bucket (slow)
def _s3_env(endpoint: str) -> dict[str, str]:
    return {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "RAY_DEDUP_LOGS": "0"}


@pytest.mark.slow
@pytest.mark.ray
def test_a_real_sweep_on_s3_writes_the_bucket_and_resumes_from_it(s3_server, tmp_path):
    import pandas as pd

    endpoint, make_bucket = s3_server
    bucket = make_bucket("sweep-real")
    cmd = [sys.executable, "-m", "pcl_ray.tune", str(SMOKE), "--name", "s3smoke",
           "--set", f"ray.storage_path=s3://{bucket}/sweeps", "--set", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
           "--set", "train.epochs=1", "--set", "train.warmup_epochs=0", "--set", "eval.enabled=false",
           "--set", "tune.max_concurrent_trials=1"]
    env = _s3_env(endpoint)  # the endpoint comes from AWS_ENDPOINT_URL here (ray.storage_endpoint is unset)
    first = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    out1 = first.stdout + first.stderr
    assert first.returncode == 0, out1[-4000:]
    assert f"s3://{bucket}/sweeps/s3smoke/trials.csv" in out1
    keys = set(_bucket_keys(endpoint, bucket))
    assert "sweeps/.pcl_ray_sweeps/s3smoke.json" in keys
    for f in ("trials.csv", "metric_vs_params.png", "metric_curves.png", "best_config.yaml"):
        assert f"sweeps/s3smoke/{f}" in keys
    assert any(k.startswith("sweeps/s3smoke/experiment_state") for k in keys)  # the Tune experiment itself
    assert any(k.startswith("sweeps/s3smoke-") and k.endswith("/final_state.pt") for k in keys)
    storage = Storage.from_uri(f"s3://{bucket}/sweeps", endpoint)
    table = pd.read_csv(io.StringIO(storage.read_text("s3smoke/trials.csv")))
    assert len(table) == 2 and set(table["status"]) <= {"finished", "early_stopped"}

    # resume of the finished sweep: Tune restores from the bucket and runs nothing again
    resumed = subprocess.run(cmd[:4] + ["--resume", "s3smoke"] + cmd[6:], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    out2 = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out2[-4000:]
    assert "resuming s3smoke" in out2 and "sweep s3smoke: 2 trials" in out2
    again = pd.read_csv(io.StringIO(storage.read_text("s3smoke/trials.csv")))
    assert list(again["trial_id"]) == list(table["trial_id"])


@pytest.mark.slow
@pytest.mark.ray
def test_a_real_compare_on_s3_reads_final_states_from_the_bucket(ray_local, s3_server, tmp_path, monkeypatch):
    from pcl_ray.compare import run_compare

    endpoint, make_bucket = s3_server
    bucket = make_bucket("cmp-real")
    p = _compare_file(tmp_path, [f"ray.storage_path=s3://{bucket}/runs", f"ray.storage_endpoint={endpoint}",
                                 f"tracking.uri=sqlite:///{tmp_path / 'm.db'}", "train.epochs=1",
                                 "train.warmup_epochs=0", "eval.kmeans_restarts=1", "ray.num_workers=1"])
    monkeypatch.chdir(tmp_path)
    md, out = run_compare(p, [])
    keys = set(_bucket_keys(endpoint, bucket))
    for label in ("moco", "simclr"):
        assert f"runs/{out.name}-{label}-s0/final_state.pt" in keys
        assert f"runs/{out.name}/results/{label}-s0.json" in keys
    assert f"runs/{out.name}/embeddings.png" in keys and "| moco | backbone |" in md
    md2, _ = run_compare(p, [], resume=out.name)
    assert md2 == md
