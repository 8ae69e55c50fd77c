"""The `tune` verb: search-space validation (fast, no Ray) and an end-to-end sweep on digits with resume.

The sweep runs in a subprocess (`python -m pcl_ray.tune`, the same code as `run.py tune`): the verb starts
its own local Ray with `train_driver_slot` resources and the dashboard, which cannot share a process with
the session's `ray_local` fixture.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcl_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "pipelines" / "tune_digits_smoke.yaml"


def _load(*overrides: str):
    from pcl_ray.sweep import load_sweep

    return load_sweep(SMOKE, list(overrides))


# ----------------------------------------------------------------------------- validation (no Ray)
def test_smoke_pipeline_is_a_valid_sweep_and_train_ignores_its_tune_section():
    from pcl_ray.sweep.runner import count_trials

    spec = _load()
    assert spec.keys == ["method.proto_weight"]
    assert count_trials(spec.tune) == 2
    assert spec.tune.metric == "online/knn_acc" and spec.tune.mode == "max"
    assert spec.tune.scheduler.name == "asha"
    assert spec.base_cfg.ray.num_workers == 1
    assert spec.trial_footprint()["CPU"] == 1.0
    assert load_config(SMOKE).method.name == "pcl"  # `run.py train` accepts a sweep pipeline too


def test_every_ablation_pipeline_validates():
    from pcl_ray.sweep import load_sweep
    from pcl_ray.sweep.runner import count_trials

    pipes = sorted((ROOT / "pipelines").glob("ablate_*.yaml")) + sorted((ROOT / "pipelines").glob("tune_*.yaml"))
    assert len(pipes) >= 6
    for p in pipes:
        spec = load_sweep(p)
        assert count_trials(spec.tune) >= 2, p


@pytest.mark.parametrize(
    ("space", "expected"),
    [
        ('{"method.no_such_key": [1, 2]}', "tune.search_space['method.no_such_key']: unknown config key"),
        ('{"nosection.lr": [1, 2]}', "unknown config key"),
        ('{"train.lr.x": [1, 2]}', "train.lr is a value, not a section"),
        ('{"train.lr": {"uniform": [0.1, 0.01]}}', "tune.search_space['train.lr']: uniform: low must be below high"),
        ('{"train.lr": {"loguniform": [0, 1]}}', "loguniform: low must be > 0"),
        ('{"train.epochs": {"randint": [3, 3]}}', "randint: low must be below high"),
        ('{"train.lr": {"normal": [0, 1]}}', "tune.search_space['train.lr'].normal: unknown key"),
        ('{"train.lr": {"grid": []}}', "tune.search_space['train.lr'].grid"),
        ('{"train.lr": {"grid": [0.1], "choice": [0.2]}}', "exactly one of"),
        ('{"train.lr": {"grid": [0.1, -1.0]}}', "tune.search_space['train.lr']: value -1.0"),
        ('{"method.name": ["pcl", "nope"]}', "tune.search_space['method.name']: value 'nope'"),
        ('{"train.warmup_epochs": {"randint": [0, 5]}}', "train.warmup_epochs (4) must be <= train.epochs (2)"),
        ('{"tracking.uri": ["a", "b"]}', "cannot be swept"),
        ('{"ray.storage_path": ["a", "b"]}', "cannot be swept"),
        ('{}', "tune.search_space"),
    ],
)
def test_invalid_search_space_fails_naming_the_key(space, expected):
    with pytest.raises(ConfigError) as err:
        _load(f"tune.search_space={space}")
    assert expected in str(err.value)


def test_combinations_and_tune_options_are_checked():
    with pytest.raises(ConfigError, match=r"combination train.epochs=1, train.warmup_epochs=2"):
        _load('tune.search_space={"train.epochs": [1, 3], "train.warmup_epochs": [0, 2]}')
    with pytest.raises(ConfigError, match=r"tune.sheduler: unknown key"):
        _load("tune.sheduler=fifo")
    with pytest.raises(ConfigError, match=r"tune.scheduler.name"):
        _load("tune.scheduler=hyperband")
    with pytest.raises(ConfigError, match=r"tune.mode"):
        _load("tune.mode=maximize")
    with pytest.raises(ConfigError, match=r"logged once after training"):
        _load("tune.metric=eval/pcl_backbone/knn_acc")
    with pytest.raises(ConfigError, match=r"eval.online_every > 0"):
        _load("eval.online_every=0")
    with pytest.raises(ConfigError, match=r"names k=99"):
        _load("tune.metric=estep/k99/ami_labels")
    with pytest.raises(ConfigError, match=r"no `tune:` section"):
        from pcl_ray.sweep import load_sweep

        load_sweep(ROOT / "pipelines" / "digits_tiny.yaml")
    # trial_resources become the trials' ray.* values
    spec = _load("tune.trial_resources={num_workers: 2, actor_cpus: 0.5}")
    assert spec.base_cfg.ray.num_workers == 2 and spec.trial_footprint()["CPU"] == 2.5


def test_space_maps_to_tune_domains():
    from ray import tune

    spec = _load('tune.search_space={"train.lr": {"loguniform": [0.01, 0.1]}, "estep.num_clusters": '
                 '{"choice": [[10], [10, 30]]}, "train.warmup_epochs": {"randint": [0, 2]}, '
                 '"method.proto_weight": [0.5, 1.0], "method.temperature": {"uniform": [0.1, 0.3]}}')
    dims = spec.tune.search_space
    assert isinstance(dims["train.lr"].to_tune(), tune.search.sample.Float)
    assert dims["method.proto_weight"].to_tune() == {"grid_search": [0.5, 1.0]}
    assert dims["estep.num_clusters"].to_mutation() == [[10], [10, 30]]
    assert dims["train.warmup_epochs"].edge_values() == [0, 1]
    raw = spec.trial_raw({"estep.num_clusters": [10, 30], "train.lr": 0.02})
    assert raw["estep"]["num_clusters"] == [10, 30] and raw["train"]["lr"] == 0.02


def test_cli_parser_and_invalid_space_exits_2_before_ray_starts(tmp_path):
    from pcl_ray.tune import add_tune_parser

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="verb")
    t = add_tune_parser(sub)
    assert "search_space" in t.epilog and t.description
    args = parser.parse_args(["tune", str(SMOKE), "--set", "train.epochs=1", "--resume"])
    assert args.verb == "tune" and args.resume == "__latest__" and args.overrides == ["train.epochs=1"]

    proc = subprocess.run(
        [sys.executable, "-m", "pcl_ray.tune", str(SMOKE), "--set", f"ray.storage_path={tmp_path / 'runs'}",
         "--set", 'tune.search_space={"method.no_such_key": [1, 2]}'],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "tune.search_space['method.no_such_key']: unknown config key" in proc.stderr
    assert "Started a local Ray" not in proc.stderr + proc.stdout
    assert not (tmp_path / "runs").exists()  # nothing written


# ----------------------------------------------------------------------------- end to end (Ray)
def _children(db: Path) -> list[tuple[str, str, int]]:
    """(trial_id, status, end_time) of the child runs in the sqlite store."""
    if not db.exists():
        return []
    try:
        with sqlite3.connect(db) as con:
            return con.execute(
                "select t.value, r.status, coalesce(r.end_time, 0) from runs r join tags t on t.run_uuid = r.run_uuid "
                "where t.key = 'pcl_ray.trial_id'").fetchall()
    except sqlite3.OperationalError:  # tables not created yet / locked
        return []


@pytest.mark.ray
def test_sweep_two_trials_parent_children_table_best_config_and_resume(tmp_path):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    cmd = [sys.executable, "-m", "pcl_ray.tune", str(SMOKE), "--name", "smoke",
           "--set", f"ray.storage_path={tmp_path / 'runs'}", "--set", f"tracking.uri={uri}",
           "--set", "tracking.experiment=tune-test", "--set", "train.epochs=1", "--set", "train.warmup_epochs=0",
           "--set", "eval.enabled=false", "--set", "tune.max_concurrent_trials=1"]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}

    # 1) run, and interrupt (SIGINT, as Ctrl+C) once the first trial has finished
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    interrupted = False
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if any(status == "FINISHED" for _, status, _ in _children(db)):
            proc.send_signal(signal.SIGINT)
            interrupted = True
            break
        time.sleep(0.3)
    out1, _ = proc.communicate(timeout=240)
    assert proc.returncode in ((130, 0) if interrupted else (0,)), out1[-4000:]
    first = {tid: (status, end) for tid, status, end in _children(db) if status == "FINISHED"}
    assert first, out1[-4000:]
    if proc.returncode == 130:
        assert "--resume smoke" in out1

    # 2) resume: finished trials are not run again, the rest completes into the same MLflow runs
    resumed = subprocess.run(cmd[:4] + ["--resume", "smoke"] + cmd[6:], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    out2 = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out2[-4000:]

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("tune-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pcl_ray.kind") == "sweep"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "smoke"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 and len(runs) == 3
    assert sorted(r.data.params["method.proto_weight"] for r in children) == ["0.0", "1.0"]
    for r in children:
        assert r.info.status == "FINISHED"
        assert r.data.tags["pcl_ray.trial_status"] == "finished"
        assert r.info.run_name == f"smoke-{r.data.tags['pcl_ray.trial_id']}"
        history = client.get_metric_history(r.info.run_id, "online/knn_acc")
        assert [m.step for m in history] == [1]  # one epoch, logged once: nothing ran twice
        tid = r.data.tags["pcl_ray.trial_id"]
        if tid in first:  # finished before the interruption: untouched by the resume
            assert r.info.end_time == first[tid][1]
    if proc.returncode == 130:
        assert "resuming smoke" in out2

    # outputs: table (printed + CSV), plots, best config that `run.py train` accepts; logged to the parent
    sweep_dir = tmp_path / "runs" / "smoke"
    import pandas as pd

    table = pd.read_csv(sweep_dir / "trials.csv")
    assert len(table) == 2 and list(table["rank"]) == [1, 2]
    assert set(table["status"]) == {"finished"}
    assert table["online/knn_acc"].is_monotonic_decreasing
    assert "sweep smoke: 2 trials by online/knn_acc" in out2
    for png in ("metric_vs_params.png", "metric_curves.png"):
        assert (sweep_dir / png).stat().st_size > 1000
    best = load_config(sweep_dir / "best_config.yaml")
    assert best.method.proto_weight == float(table["method.proto_weight"][0])
    assert best.train.epochs == 1 and best.data.name == "digits"
    assert parent.data.metrics["best/online/knn_acc"] == pytest.approx(table["online/knn_acc"][0])
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert {"sweep/trials.csv", "sweep/best_config.yaml", "sweep/metric_vs_params.png"} <= logged


def test_a_trial_finished_before_an_interruption_is_not_rerun(tmp_path, monkeypatch):
    """Tune may not have recorded a trial's end when the sweep is interrupted; its MLflow run says it ended."""
    from ray import tune

    from pcl_ray import registry, workflow
    from pcl_ray.sweep import trial

    cfg = load_config(SMOKE, [f"ray.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'db'}"])
    assert registry.finished_run(cfg, "smoke-t1") is None  # never started
    logger = workflow._open_mlflow_run(cfg, registry.run_storage(cfg), "smoke-t1", None)
    assert registry.finished_run(cfg, "smoke-t1") is None  # started, still running

    calls = []
    monkeypatch.setattr(workflow, "train", lambda *a, **k: calls.append(k) or pytest.fail("trained again"))
    monkeypatch.setattr(tune, "get_context", lambda: argparse.Namespace(get_trial_id=lambda: "t1"))
    monkeypatch.setattr(tune, "get_checkpoint", lambda: None)
    monkeypatch.setattr("ray.tune.integration.ray_train.TuneReportCallback", object)
    spec = {"sweep": "smoke", "keys": [], "base_raw": {**load_config(SMOKE).model_dump(mode="json"),
            "ray": {**cfg.ray.model_dump(mode="json")}, "tracking": cfg.tracking.model_dump(mode="json")},
            "parent_run_id": None}
    # train() closes the run FINISHED only after training and evaluation; an interruption may still
    # come before the trial tags it finished: the resume completes the tag and trains nothing
    logger.end("FINISHED")
    assert registry.finished_run(cfg, "smoke-t1").run_id == logger.run_id
    end_time = logger.client.get_run(logger.run_id).info.end_time
    trial.run_trial({}, spec)
    run = logger.client.get_run(logger.run_id)
    assert run.data.tags[trial.STATUS_TAG] == "finished" and run.info.end_time == end_time
    trial.run_trial({}, spec)  # tagged already: returns at once
    assert calls == []


# ----------------------------------------------------------------------------- driver-side pieces (no Ray)
def test_killed_trials_are_marked_in_mlflow(tmp_path):
    """ASHA-stopped trials (their run left RUNNING) become KILLED + early_stopped; PBT's replaced runs exploited."""
    from pcl_ray.sweep.runner import _mark_runs
    from pcl_ray.tracking import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = RunLogger.start(uri, "marks", "sweep")
    stopped = RunLogger.start(uri, "marks", "t1", parent_run_id=parent.run_id)
    replaced = RunLogger.start(uri, "marks", "t2", parent_run_id=parent.run_id)
    clone = RunLogger.start(uri, "marks", "t2-x", parent_run_id=parent.run_id)
    clone.end("FINISHED")
    client = parent.client
    _mark_runs(parent, [client.get_run(stopped.run_id)], "early_stopped")
    _mark_runs(parent, [client.get_run(replaced.run_id), client.get_run(clone.run_id)], "finished")
    run = client.get_run(stopped.run_id)
    assert run.info.status == "KILLED" and run.data.tags["pcl_ray.trial_status"] == "early_stopped"
    run = client.get_run(replaced.run_id)
    assert run.info.status == "KILLED" and run.data.tags["pcl_ray.trial_status"] == "exploited"
    run = client.get_run(clone.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["pcl_ray.trial_status"] == "finished"


def test_a_trial_tune_never_saw_finish_is_ranked_from_its_mlflow_history(tmp_path, monkeypatch):
    """A resume only completes the tags of a trial that finished before the interruption reached Tune:
    Tune then holds no result for it, and its row takes the per-epoch metric from its MLflow run."""
    import pandas as pd
    import ray.tune

    from pcl_ray.sweep import runner
    from pcl_ray.sweep.trial import TRIAL_TAG
    from pcl_ray.tracking import RunLogger

    spec = _load()
    metric = spec.tune.metric
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    exp = spec.base_cfg.tracking.experiment
    parent = RunLogger.start(uri, exp, "sweep")
    seen = RunLogger.start(uri, exp, "sw-a", tags={TRIAL_TAG: "a"}, parent_run_id=parent.run_id)
    unseen = RunLogger.start(uri, exp, "sw-b", tags={TRIAL_TAG: "b"}, parent_run_id=parent.run_id)
    for epoch, (va, vb) in enumerate([(0.5, 0.6), (0.7, 0.9)], 1):
        seen.log_metrics({metric: va}, step=epoch)
        unseen.log_metrics({metric: vb}, step=epoch)
    seen.end("FINISHED")
    unseen.end("FINISHED")

    class FakeAnalysis:
        def __init__(self, *a, **k):
            self.trials = [argparse.Namespace(trial_id=t, status="TERMINATED", config={}) for t in ("a", "b")]
            self.trial_dataframes = {"a": pd.DataFrame({"training_iteration": [1, 2], "epoch": [1, 2],
                                                        metric: [0.5, 0.7]}), "b": pd.DataFrame()}

    monkeypatch.setattr(ray.tune, "ExperimentAnalysis", FakeAnalysis)
    rows = runner.collect_rows(spec, tmp_path, parent)
    assert [(r.trial_id, r.status, r.metric, r.epochs) for r in rows] == [("b", "finished", 0.9, 2),
                                                                        ("a", "finished", 0.7, 2)]
    assert rows[0].history == [(1, 0.6), (2, 0.9)]


def test_table_plots_and_best_config_without_ray(tmp_path):
    from pcl_ray.sweep.report import TrialRow, plot_metric_curves, plot_metric_vs_params, rows_to_frame, sort_rows
    from pcl_ray.sweep.report import write_best_config

    spec = _load('tune.search_space={"train.lr": {"loguniform": [0.01, 0.1]}, "estep.num_clusters": '
                 '{"choice": [[10], [10, 30]]}}')
    spec.pinned["estep.backend"] = None  # as the runner does when it resolves `auto`
    spec.base_raw["estep"]["backend"] = "cpu"
    rows = [TrialRow("a", "finished", {"train.lr": 0.02, "estep.num_clusters": [10]}, 0.8, 2, [(1, 0.7), (2, 0.8)]),
            TrialRow("b", "early_stopped", {"train.lr": 0.09, "estep.num_clusters": [10, 30]}, 0.6, 1, [(1, 0.6)]),
            TrialRow("c", "error", {"train.lr": 0.05, "estep.num_clusters": [10]}, None, 0),
            TrialRow("d", "finished", {"train.lr": 0.03, "estep.num_clusters": [10, 30]}, 0.9, 2, [(1, 0.8), (2, 0.9)])]
    ranked = sort_rows(rows, "max")
    assert [r.trial_id for r in ranked] == ["d", "a", "b", "c"]
    assert [r.trial_id for r in sort_rows(rows, "min")] == ["b", "a", "d", "c"]
    frame = rows_to_frame(ranked, spec)
    assert list(frame["estep.num_clusters"])[:2] == ["[10, 30]", "[10]"]
    assert plot_metric_vs_params(ranked, spec, tmp_path / "p.png").stat().st_size > 1000
    assert plot_metric_curves(ranked, spec, tmp_path / "c.png").stat().st_size > 1000
    path = write_best_config(ranked[0], spec, "sw", tmp_path / "best.yaml")
    cfg = load_config(path)
    assert cfg.train.lr == 0.03 and cfg.estep.num_clusters == [10, 30]
    assert cfg.estep.backend == "auto"  # the sweep's pinned value is not baked into the pipeline
    assert path.read_text().startswith("# Best trial of sweep sw: d")


def test_section_values_merge_into_the_section():
    from pcl_ray.sweep import load_sweep

    spec = load_sweep(ROOT / "pipelines" / "ablate_spcl_weights.yaml")
    dim = spec.tune.search_space["method.spcl"]
    raw = spec.trial_raw({"method.spcl": dim.args[1]})
    cfg = load_config(ROOT / "pipelines" / "ablate_spcl_weights.yaml")  # base
    from pcl_ray.config import build_config

    trial = build_config(raw)
    assert trial.method.spcl.weight_ntxent == 0.0 and trial.method.spcl.weight_metric == 1.0
    assert trial.method.spcl.ntxent_temperature == cfg.method.spcl.ntxent_temperature == 0.5
