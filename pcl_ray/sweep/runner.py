"""Run a sweep: Ray (local with driver slots, or attached), the Tuner (new or restored), MLflow parent run.

Layout under the storage root (``ray.storage_path``: a local folder, ``file://`` or an object store; every
file goes through :class:`~pcl_ray.storage.Storage`, written whole)::

    <root>/<sweep>/                       Tune experiment (trial dirs, experiment state) + the sweep's outputs:
        trials.csv  metric_vs_params.png  metric_curves.png  best_config.yaml
        pbt_checkpoints/                  PBT: the Train states that clones start from
    <root>/<sweep>-<trial_id>/            each trial's Ray Train run (checkpoints), as for `run.py train`
    <root>/.pcl_ray_sweeps/<sweep>.json   what --resume needs: parent MLflow run, the sweep's resolved config

Decided once on the driver for the whole sweep, and saved in that record: ``ray.use_gpu: auto`` (against
the cluster at the sweep's start) and ``estep.backend: auto``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError, _flatten, build_config
from ..registry import check_name, run_storage
from ..storage import Storage
from ..tracking import RunLogger, ensure_experiment, redact, resolve_uri
from .report import (
    TrialRow,
    plot_metric_curves,
    plot_metric_vs_params,
    rows_to_frame,
    sort_rows,
    write_best_config,
)
from .spec import DRIVER_SLOT, SweepSpec, TuneConfig, set_path
from .trial import STATUS_TAG, SWEEP_TAG, TRIAL_TAG, make_trainable

META_DIR = ".pcl_ray_sweeps"
LATEST = "__latest__"


@dataclass
class SweepOutcome:
    name: str
    storage: Storage                  # the storage root; the sweep's folder is ``<root>/<name>/``
    parent_run_id: str
    tracking_uri: str
    spec: SweepSpec
    rows: list[TrialRow] = field(default_factory=list)
    interrupted: bool = False
    csv: str | None = None            # where the outputs were written: local paths or URIs
    best_config: str | None = None
    plots: list[str] = field(default_factory=list)

    @property
    def best(self) -> TrialRow | None:
        done = [r for r in self.rows if r.metric is not None and r.status in ("finished", "early_stopped")]
        return done[0] if done else None


def sweep_prefix(spec: SweepSpec) -> str:
    return spec.tune.name or spec.pipeline.stem


def meta_rel(name: str) -> str:
    return f"{META_DIR}/{name}.json"


def latest_sweep(storage: Storage, prefix: str) -> str | None:
    """The most recently created sweep of ``prefix`` recorded under the storage root, or None."""
    found = []
    for entry, is_dir, _ in storage.list(META_DIR):
        if is_dir or not entry.endswith(".json") or entry.startswith("."):
            continue
        try:
            meta = storage.read_json(f"{META_DIR}/{entry}")
        except ValueError:  # not a record of ours
            continue
        if meta.get("prefix") == prefix:
            found.append((float(meta.get("created", 0)), entry[: -len(".json")]))
    return max(found)[1] if found else None


def tune_location(storage: Storage, name: str) -> tuple[str, dict[str, Any]]:
    """The Tune experiment's path and the ``storage_filesystem`` keyword (for restore and analysis)."""
    fs = storage.ray_kwargs().get("storage_filesystem")
    return storage.path(name), ({"storage_filesystem": fs} if fs is not None else {})


def count_trials(tcfg: TuneConfig) -> int:
    grid = math.prod(len(d.args) for d in tcfg.search_space.values() if d.kind == "grid")
    return grid * tcfg.num_samples


def describe(spec: SweepSpec, concurrency: int | None = None) -> str:
    t = spec.tune
    fp = spec.trial_footprint()
    lines = [f"search space ({count_trials(t)} trials: grid x num_samples={t.num_samples}):"]
    lines += [f"  {k}: {d.describe()}" for k, d in t.search_space.items()]
    sched = t.scheduler.name
    if sched == "asha":
        sched += f" (grace {t.scheduler.grace_period} epochs, reduction {t.scheduler.reduction_factor:g})"
    elif sched == "pbt":
        sched += f" (perturbation every {t.scheduler.perturbation_interval} epochs)"
    lines.append(f"metric: {t.metric} ({t.mode}, {t.scope} epoch); scheduler: {sched}")
    gpu = spec.base_cfg.ray.use_gpu
    device = "GPU" if gpu is True else ("CPU" if gpu is False else "decided at the sweep's start (ray.use_gpu auto)")
    driver = f"{t.trial_resources.driver_cpus:g} CPU" if t.trial_resources.driver_cpus else f"1 {DRIVER_SLOT}"
    lines.append(f"per trial: driver {driver} + {fp['workers']} Train worker(s) x "
                 f"{spec.base_cfg.ray.cpus_per_worker:g} CPU + cluster actor {fp['actor_cpus']:g} CPU "
                 f"= {fp['CPU']:g} CPU; trials at once: {concurrency or t.max_concurrent_trials or 'auto'}; "
                 f"Train workers on {device}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- Ray
def _start_ray(spec: SweepSpec, log: Callable[[str], None]) -> int | None:
    """Start (or attach to) Ray; returns how many trials may run at once (None: as many as fit)."""
    import ray

    from ..distributed.connect import attach_address
    from ..distributed.trainer import init_ray

    cfg, t = spec.base_cfg, spec.tune
    fp = spec.trial_footprint()
    use_slot = t.trial_resources.driver_cpus == 0
    address = attach_address(cfg)  # ray.address, or RAY_ADDRESS (inside `ray job submit`)
    if address is not None:
        init_ray(cfg)
        if use_slot and ray.cluster_resources().get(DRIVER_SLOT, 0) < 1:
            raise ConfigError(
                f"tune.trial_resources.driver_cpus: 0 puts every trial driver on a `{DRIVER_SLOT}` resource, but "
                f"the Ray cluster at {address} declares none (Tune would wait forever): declare them on the head "
                f"node (cluster.yaml's head node type: resources: {{\"{DRIVER_SLOT}\": N}}; by hand: `ray start "
                f"--head --resources='{{\"{DRIVER_SLOT}\": N}}'`, N = trials at once), or set "
                "tune.trial_resources.driver_cpus=1 to give each trial driver a CPU")
        return t.max_concurrent_trials
    cpus = os.cpu_count() or 1
    if fp["CPU"] > cpus:
        raise ConfigError(f"one trial needs {fp['CPU']:g} CPUs (driver + {fp['workers']} Train workers + cluster "
                          f"actor) but this machine has {cpus}: lower tune.trial_resources.num_workers")
    fits = max(1, int(cpus // fp["CPU"])) if fp["CPU"] > 0 else 1
    concurrency = t.max_concurrent_trials or fits
    if concurrency * fp["CPU"] > cpus:
        raise ConfigError(f"tune.max_concurrent_trials={concurrency} x {fp['CPU']:g} CPUs per trial exceeds the "
                          f"{cpus} CPUs of this machine (the Train workers would wait forever): use at most {fits}")
    if ray.is_initialized():
        if use_slot and ray.cluster_resources().get(DRIVER_SLOT, 0) < concurrency:
            raise ConfigError(f"Ray is already running without {concurrency} `{DRIVER_SLOT}` resources")
    else:
        init_ray(cfg, resources={DRIVER_SLOT: concurrency} if use_slot else None, pin_address=True)
    if concurrency == 1 and t.scheduler.name == "pbt":
        log("[pcl-ray] note: PBT with one trial at a time has no population to exploit")
    return concurrency


def _pin(spec: SweepSpec, key: str, value: Any) -> None:
    """Fix ``key`` to ``value`` in the sweep's base config; the user's own value stays for best_config.yaml."""
    section, leaf = key.split(".")
    spec.pinned.setdefault(key, spec.base_raw.get(section, {}).get(leaf))
    spec.base_raw = set_path(spec.base_raw, key, value)
    spec.base_cfg = build_config(spec.base_raw)


def resolve_use_gpu(spec: SweepSpec, log: Callable[[str], None] = print) -> bool:
    """The sweep's one answer to ``ray.use_gpu: auto``, decided against the cluster as it is at the start.

    A base config with ``auto`` is pinned to it (and saved with the sweep, so a resume keeps it); swept
    ``auto`` values get it too (see :func:`.trial.trial_config`). On an autoscaling cluster, trials that
    start after GPU nodes joined then train on the same device as the first ones.
    """
    import ray

    base = spec.base_cfg.ray.use_gpu
    if "ray.use_gpu" in spec.pinned:  # decided when the sweep started (a resume)
        return bool(base)
    if base != "auto" and "ray.use_gpu" not in spec.tune.search_space:
        return bool(base)
    gpus = ray.cluster_resources().get("GPU", 0)
    resolved = gpus > 0
    if base == "auto":
        _pin(spec, "ray.use_gpu", resolved)
    log(f"[pcl-ray] ray.use_gpu auto -> {str(resolved).lower()} for the whole sweep (the cluster shows "
        f"{gpus:g} GPUs now; ray.use_gpu=true waits for the GPU nodes an autoscaler adds)")
    return resolved


def _resolve_estep_backend(spec: SweepSpec, concurrency: int | None) -> None:
    """Pin ``estep.backend: auto`` for the sweep so that each trial's reservation matches its actor."""
    import ray

    cfg = spec.base_cfg
    if not cfg.needs_estep or cfg.estep.backend != "auto" or "estep.backend" in spec.tune.search_space:
        return
    gpus = ray.cluster_resources().get("GPU", 0)
    worker_gpus = cfg.ray.num_workers if (cfg.ray.use_gpu is True or (cfg.ray.use_gpu == "auto" and gpus > 0)) else 0
    backend = "gpu" if gpus >= (concurrency or 1) * (worker_gpus + 1) else "cpu"
    _pin(spec, "estep.backend", backend)


# ----------------------------------------------------------------------------- Tune
def _trial_dirname(trial) -> str:
    return f"{trial.trainable_name}_{trial.trial_id}"


def _build_tuner(spec: SweepSpec, name: str, storage: Storage, trainable, concurrency: int | None):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator

    t = spec.tune
    s = t.scheduler
    epochs = spec.max_epochs()
    scheduler: Any = FIFOScheduler()
    if s.name == "asha":
        # Rungs end one epoch before the last, and trials past the top rung are never stopped: a trial that
        # reaches its last epoch always finishes its run (final checkpoint, evaluation, FINISHED in MLflow).
        top = min(s.max_t or epochs, epochs - 1)
        if top >= s.grace_period:
            scheduler = ASHAScheduler(time_attr="training_iteration", max_t=top, grace_period=s.grace_period,
                                      reduction_factor=s.reduction_factor, stop_last_trials=False)
    elif s.name == "pbt":
        scheduler = PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=s.perturbation_interval,
            hyperparam_mutations={k: d.to_mutation() for k, d in t.search_space.items()},
            quantile_fraction=s.quantile_fraction, resample_probability=s.resample_probability)
    return tune.Tuner(
        trainable,
        param_space={k: d.to_tune() for k, d in t.search_space.items()},
        tune_config=tune.TuneConfig(
            metric=t.metric, mode=t.mode, scheduler=scheduler, num_samples=t.num_samples,
            # the generator takes the concurrency limit itself (Tune ignores max_concurrent_trials with it)
            search_alg=BasicVariantGenerator(random_state=t.seed, max_concurrent=concurrency or 0),
            trial_dirname_creator=_trial_dirname),
        run_config=tune.RunConfig(
            name=name, **storage.ray_kwargs(), verbose=1,
            failure_config=tune.FailureConfig(max_failures=t.max_failures)),
    )


# ----------------------------------------------------------------------------- results
def _child_runs(logger: RunLogger, experiment: str) -> dict[str, list]:
    exp_id = ensure_experiment(logger.tracking_uri, experiment)
    runs = logger.client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{logger.run_id}'",
                                     max_results=50000)
    by_trial: dict[str, list] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time):
        tid = run.data.tags.get(TRIAL_TAG)
        if tid:
            by_trial.setdefault(tid, []).append(run)
    return by_trial


def _metric_series(df, metric: str) -> list[tuple[int, float]]:
    if df is None or df.empty or metric not in df.columns:
        return []
    x = "epoch" if "epoch" in df.columns else "training_iteration"
    sub = df[[x, metric]].dropna()
    return [(int(a), float(b)) for a, b in zip(sub[x], sub[metric])]


def collect_rows(spec: SweepSpec, sweep_dir: str | Path, logger: RunLogger,
                 filesystem_kwargs: dict[str, Any] | None = None) -> list[TrialRow]:
    """One row per trial, and the trial's MLflow runs marked with how it ended.

    ``sweep_dir``: the Tune experiment's path (in ``storage_filesystem`` when ``filesystem_kwargs`` give one).
    """
    from ray.tune import ExperimentAnalysis

    t = spec.tune
    ea = ExperimentAnalysis(str(sweep_dir), default_metric=t.metric, default_mode=t.mode,
                            **(filesystem_kwargs or {}))
    runs = _child_runs(logger, spec.base_cfg.tracking.experiment)
    dfs = ea.trial_dataframes
    rows = []
    for trial in ea.trials:
        tid = trial.trial_id
        df = dfs.get(tid)
        history = _metric_series(df, t.metric)
        epochs = int(df["training_iteration"].max()) if df is not None and not df.empty and \
            "training_iteration" in df.columns else 0
        trial_runs = runs.get(tid, [])
        latest = trial_runs[-1] if trial_runs else None
        if not history and latest is not None and latest.info.status == "FINISHED":
            # finished before an interruption let Tune record its results (a resume then only completes
            # the trial's tags): its per-epoch metric is in the MLflow run, logged with step = epoch
            history = [(int(m.step), float(m.value)) for m in
                       sorted(logger.client.get_metric_history(latest.info.run_id, t.metric), key=lambda m: m.step)]
            epochs = max((e for e, _ in history), default=epochs)
        values = [v for _, v in history if v == v]
        metric = None
        if values:
            metric = values[-1] if t.scope == "last" else (max(values) if t.mode == "max" else min(values))
        if trial.status == "ERROR":
            status = "error"
        elif trial.status == "TERMINATED":
            status = "finished" if latest is not None and latest.info.status == "FINISHED" else "early_stopped"
        else:
            status = "interrupted"
        _mark_runs(logger, trial_runs, status)
        extra = {}
        if latest is not None:
            fresh = logger.client.get_run(latest.info.run_id).data.metrics
            extra = {k: v for k, v in fresh.items() if k.startswith("eval/") and k.split("/")[1].endswith("_backbone")
                     and k.split("/")[-1] in ("knn_acc", "ami")}
        rows.append(TrialRow(
            trial_id=tid, status=status, values={k: trial.config.get(k) for k in spec.keys}, metric=metric,
            epochs=epochs, history=history, run_name=latest.info.run_name if latest else "",
            mlflow_run_id=latest.info.run_id if latest else "", extra=extra))
    return sort_rows(rows, t.mode)


def _mark_runs(logger: RunLogger, trial_runs: list, status: str) -> None:
    """Tag every MLflow run of a trial with how it ended; close runs a killed trial left open."""
    client = logger.client
    for i, run in enumerate(trial_runs):
        tag = status if i == len(trial_runs) - 1 else "exploited"  # PBT: an earlier run a clone replaced
        target = {"early_stopped": "KILLED", "error": "FAILED", "interrupted": "KILLED", "exploited": "KILLED"}.get(tag)
        client.set_tag(run.info.run_id, STATUS_TAG, tag)
        current = client.get_run(run.info.run_id).info.status
        if target and current not in ("FINISHED", target):
            client.set_terminated(run.info.run_id, status=target)


# ----------------------------------------------------------------------------- the sweep
def _saved_spec(meta: dict[str, Any]) -> SweepSpec:
    tcfg = TuneConfig.model_validate(meta["tune"])
    return SweepSpec(Path(meta["pipeline"]), list(meta["overrides"]), meta["base_raw"],
                     build_config(meta["base_raw"], f"saved sweep {meta['name']}"), tcfg,
                     pinned=dict(meta.get("pinned", {})))


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    fa, fb = dict(_flatten(a)), dict(_flatten(b))
    return sorted(k for k in set(fa) | set(fb) if fa.get(k) != fb.get(k))


def _sweep_name(spec: SweepSpec, name: str | None, resume: str | None, storage: Storage) -> str:
    """The sweep's name: checked safe (it names folders in the storage), from --resume, --name or generated."""
    prefix = sweep_prefix(spec)
    if resume:
        if resume == LATEST:
            found = latest_sweep(storage, prefix)
            if found is None:
                raise ConfigError(f"--resume: no sweep of {prefix!r} under {storage.uri}")
            return found
        check_name(resume, "--resume")
        if not storage.is_file(meta_rel(resume)):
            raise ConfigError(f"--resume: no sweep {resume!r} under {storage.uri}")
        return resume
    if name is not None:
        check_name(name, "--name")
    else:
        name = check_name(f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}", "tune.name")
    if storage.exists(meta_rel(name)) or storage.exists(name):
        raise ConfigError(f"--name: sweep {name!r} already exists under {storage.uri}: continue it with "
                          f"--resume {name}")
    return name


def run_sweep(spec: SweepSpec, *, name: str | None = None, resume: str | None = None,
              log: Callable[[str], None] = print) -> SweepOutcome:
    from ray import tune

    from ..distributed.connect import alive_nodes, check_multi_node
    from ..tracking import check_tracking

    if spec.tune.name is not None:
        check_name(spec.tune.name, "tune.name")
    storage = run_storage(spec.base_cfg)
    uri = resolve_uri(spec.base_cfg.tracking.uri)
    # Checked before anything is written: the tracking store answers, the storage takes a write.
    check_tracking(uri)
    storage.check_writable()
    name = _sweep_name(spec, name, resume, storage)
    meta: dict[str, Any] | None = None
    if resume:
        meta = storage.read_json(meta_rel(name))
        saved = _saved_spec(meta)
        diff = _differences(spec.base_raw, saved.base_raw) + [
            f"tune.{k}" for k in _differences(spec.tune.model_dump(mode="json"), saved.tune.model_dump(mode="json"))]
        diff = [k for k in diff if k not in ("estep.backend", "ray.use_gpu")]
        if diff:
            log(f"[pcl-ray] --resume continues {name} with its saved config; ignored changes: {', '.join(diff)}")
        spec = saved

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # warm-up epochs lack E-step metrics
    concurrency = _start_ray(spec, log)
    check_multi_node(spec.base_cfg, storage, uri, alive_nodes())
    use_gpu = resolve_use_gpu(spec, log)  # once, on this driver, for every trial of the sweep
    if meta is None:  # a resumed sweep keeps the backend saved with it
        _resolve_estep_backend(spec, concurrency)
    log("[pcl-ray] sweep " + name + "\n" + describe(spec, concurrency))

    if meta is not None and meta.get("tracking_uri") == uri:
        logger = RunLogger(uri, meta["parent_run_id"])
        logger.client.update_run(logger.run_id, status="RUNNING")
    else:
        logger = RunLogger.start(uri, spec.base_cfg.tracking.experiment, name,
                                 tags={SWEEP_TAG: name, "pcl_ray.kind": "sweep",
                                       "pcl_ray.method": spec.base_cfg.method.name})
        t = spec.tune
        logger.log_params({
            "sweep.pipeline": str(spec.pipeline), "sweep.overrides": json.dumps(spec.overrides),
            "sweep.search_space": json.dumps({k: {d.kind: d.args} for k, d in t.search_space.items()}),
            "sweep.num_samples": t.num_samples, "sweep.trials": count_trials(t), "sweep.metric": t.metric,
            "sweep.mode": t.mode, "sweep.scope": t.scope, "sweep.scheduler": t.scheduler.name,
            "sweep.max_concurrent_trials": concurrency or "auto", "sweep.storage": storage.uri_of(name),
            "sweep.use_gpu": use_gpu,
        })
        meta = {"name": name, "prefix": sweep_prefix(spec), "created": time.time(), "parent_run_id": logger.run_id,
                "tracking_uri": uri, "pipeline": str(spec.pipeline), "overrides": spec.overrides,
                "base_raw": spec.base_raw, "pinned": spec.pinned, "tune": spec.tune.model_dump(mode="json")}
        storage.write_json(meta_rel(name), meta)
    log(f"[pcl-ray] MLflow parent run {logger.run_id} at {redact(uri)}; sweep folder {storage.uri_of(name)}")

    trainable = make_trainable({
        "keys": spec.keys, "base_raw": spec.base_raw, "sweep": name, "parent_run_id": logger.run_id,
        "storage": storage, "use_gpu": use_gpu, "driver_cpus": spec.tune.trial_resources.driver_cpus,
    })
    path, fs_kwargs = tune_location(storage, name)
    if resume and tune.Tuner.can_restore(path, **fs_kwargs):
        log(f"[pcl-ray] resuming {name}: finished trials are kept, unfinished and errored ones continue")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   **fs_kwargs)
    else:
        tuner = _build_tuner(spec, name, storage, trainable, concurrency)

    outcome = SweepOutcome(name, storage, logger.run_id, uri, spec)
    status = "FAILED"
    try:
        tuner.fit()
        outcome.rows = collect_rows(spec, path, logger, fs_kwargs)
        outcome.interrupted = any(r.status == "interrupted" for r in outcome.rows)
        if outcome.interrupted:
            status = "KILLED"
            return outcome
        write_outputs(outcome, logger)
        status = "FINISHED"
        return outcome
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        logger.end(status)


def _shown(storage: Storage, *parts: str) -> str:
    """A file in the storage as the user reaches it: a local path (local or shared roots) or a URI."""
    return str(storage.local_path(*parts)) if storage.on_local_disk else storage.uri_of(*parts)


def write_outputs(outcome: SweepOutcome, logger: RunLogger | None) -> list[str]:
    """The table, plots and best config, made in a local temporary folder, then uploaded whole to
    ``<storage>/<sweep>/`` and logged to the parent MLflow run. Returns where they were written."""
    spec, rows, storage, name = outcome.spec, outcome.rows, outcome.storage, outcome.name
    best = outcome.best
    with tempfile.TemporaryDirectory(prefix="pcl-ray-sweep-") as tmp:
        local = Path(tmp)
        files = [local / "trials.csv"]
        rows_to_frame(rows, spec).to_csv(files[0], index=False)
        files += [plot_metric_vs_params(rows, spec, local / "metric_vs_params.png"),
                  plot_metric_curves(rows, spec, local / "metric_curves.png")]
        if best is not None:
            files.append(write_best_config(best, spec, name, local / "best_config.yaml",
                                           shown_as=_shown(storage, name, "best_config.yaml")))
        written = []
        for f in files:
            storage.upload(f, f"{name}/{f.name}")
            written.append(_shown(storage, name, f.name))
            if logger is not None:
                logger.log_artifact(f, "sweep")
    outcome.csv, outcome.plots = written[0], written[1:3]
    outcome.best_config = written[3] if best is not None else None
    if logger is not None:
        if best is not None:
            logger.log_metrics({f"best/{spec.tune.metric}": best.metric})
            logger.set_tags({"pcl_ray.best_trial": best.trial_id, "pcl_ray.best_run_id": best.mlflow_run_id})
        counts: dict[str, int] = {}
        for r in rows:
            counts[r.status] = counts.get(r.status, 0) + 1
        logger.log_metrics({f"trials/{k}": v for k, v in counts.items()})
    return written
