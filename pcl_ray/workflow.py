"""The `train` verb: config → MLflow run → Ray Train EM loop → evaluation → artifacts → results table."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ExperimentConfig, dump_config
from .signals import sigterm_as_interrupt
from .tracking import PROJECT_DIR, RunLogger, resolve_uri


@dataclass
class TrainOutcome:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    state_path: Path | None
    eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    final_metrics: dict[str, Any] = field(default_factory=dict)


def storage_root(cfg: ExperimentConfig) -> Path:
    root = Path(cfg.ray.storage_path) if cfg.ray.storage_path else PROJECT_DIR / "runs"
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def latest_run_name(root: Path) -> str | None:
    """Name of the most recently started run under ``root`` (for ``--resume`` without a name)."""
    meta = sorted((root / ".pcl_ray").glob("*.json"), key=lambda p: p.stat().st_mtime)
    return meta[-1].stem if meta else None


def _run_meta(root: Path, run_name: str) -> Path:
    d = root / ".pcl_ray"
    d.mkdir(exist_ok=True)
    return d / f"{run_name}.json"


def _open_mlflow_run(cfg: ExperimentConfig, root: Path, run_name: str, parent_run_id: str | None) -> RunLogger:
    """Start the run's MLflow run, or reopen it when this ``run_name`` is being resumed."""
    uri = resolve_uri(cfg.tracking.uri)
    meta = _run_meta(root, run_name)
    if meta.exists():
        saved = json.loads(meta.read_text())
        if saved.get("tracking_uri") == uri:
            logger = RunLogger(uri, saved["mlflow_run_id"])
            logger.client.update_run(logger.run_id, status="RUNNING")
            return logger
    logger = RunLogger.start(uri, cfg.tracking.experiment, cfg.tracking.run_name or run_name,
                             tags={"pcl_ray.run_name": run_name, "pcl_ray.method": cfg.method.name},
                             parent_run_id=parent_run_id)
    meta.write_text(json.dumps({"mlflow_run_id": logger.run_id, "tracking_uri": uri}))
    return logger


def finished_run(cfg: ExperimentConfig, run_name: str) -> RunLogger | None:
    """The MLflow run of ``run_name`` when an earlier start of it already ended FINISHED, else None."""
    uri = resolve_uri(cfg.tracking.uri)
    meta = _run_meta(storage_root(cfg), run_name)
    if not meta.exists():
        return None
    saved = json.loads(meta.read_text())
    if saved.get("tracking_uri") != uri:
        return None
    logger = RunLogger(uri, saved["mlflow_run_id"])
    return logger if logger.client.get_run(logger.run_id).info.status == "FINISHED" else None


def default_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.method.name}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def train(cfg: ExperimentConfig, *, run_name: str | None = None, parent_run_id: str | None = None,
          log=print, callbacks: list | None = None, tags: dict[str, str] | None = None,
          init_checkpoint: str | None = None) -> TrainOutcome:
    from .data import load_split
    from .distributed.trainer import fit, init_ray
    from .evaluation.report import evaluate
    from .methods import METHODS

    run_name = run_name or cfg.ray.run_name or default_run_name(cfg)
    # Check what can be checked before anything is written: the data loads, every k fits.
    train_labels = load_split(cfg.data, "train").labels  # for monitoring only (estep/k*/ami_labels)
    num_samples = len(train_labels)
    if cfg.needs_estep:
        too_big = [k for k in cfg.estep.num_clusters if k >= num_samples]
        if too_big:
            raise ConfigError(f"estep.num_clusters: {too_big} must be below the {num_samples} training images")
    root = storage_root(cfg)
    logger = _open_mlflow_run(cfg, root, run_name, parent_run_id)
    if tags:
        logger.set_tags(tags)
    log(f"[pcl-ray] run {run_name}: MLflow run {logger.run_id} at {logger.tracking_uri}")
    logger.log_params(cfg.flat())
    status = "FAILED"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg_file = Path(tmp) / "config.yaml"
            cfg_file.write_text(dump_config(cfg))
            logger.log_artifact(cfg_file)
        init_ray(cfg)
        sigterm_as_interrupt()  # ray.init replaced the handler with a plain exit
        logger.log_params(METHODS[cfg.method.name].run_params(cfg))
        outcome = fit(cfg, run_name, root, num_samples, logger.spec(), labels=train_labels, callbacks=callbacks,
                      init_checkpoint=init_checkpoint)
        if outcome.result.error is not None:
            raise outcome.result.error
        logger.log_params({"estep.backend_used": "faiss-gpu" if outcome.backend_gpus else "faiss-cpu"}
                          if cfg.needs_estep else {})
        result = TrainOutcome(run_name, logger.run_id, logger.tracking_uri, outcome.state_path,
                              final_metrics=dict(outcome.result.metrics or {}))
        state = (torch.load(outcome.state_path, map_location="cpu", weights_only=True)
                 if outcome.state_path is not None else None)
        _log_training_artifacts(logger, outcome, state)
        if cfg.eval.enabled and state is not None:
            torch.set_num_threads(os.cpu_count() or 1)
            result.eval = evaluate(cfg, state["method"], log=log)
            for row, values in result.eval.items():
                logger.log_metrics({f"eval/{row}/{k}": v for k, v in values.items()})
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        log(f"[pcl-ray] interrupted: continue with `python run.py train ... --resume {run_name}`")
        raise
    finally:
        logger.end(status)


def _log_training_artifacts(logger: RunLogger, outcome, state: dict | None) -> None:
    """Backbone weights from the final checkpoint ``state`` and the last E-step's prototype plot."""
    import ray

    from .evaluation.plots import plot_prototype_stats

    with tempfile.TemporaryDirectory() as tmp:
        if state is not None:
            backbone = {k[len("encoder.backbone."):]: v for k, v in state["method"].items()
                        if k.startswith("encoder.backbone.")}
            weights = Path(tmp) / "backbone.pt"
            torch.save(backbone, weights)
            logger.log_artifact(weights, "model")
        if outcome.actor is not None:
            ref = ray.get(outcome.actor.latest.remote())
            if ref is not None:
                pset = ray.get(ref[0])
                png = Path(tmp) / f"prototypes_epoch{pset.epoch + 1}.png"
                plot_prototype_stats(pset.granularities, png)
                logger.log_artifact(png, "plots")
            ray.kill(outcome.actor)
