"""The `train` verb: config → MLflow run → Ray Train EM loop → evaluation → artifacts → results table."""

from __future__ import annotations

import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError, ExperimentConfig, dump_config
from .signals import sigterm_as_interrupt
from .resume import check_resume
from .registry import RunRecord, check_name, final_state_rel, load_record, run_storage, save_record
from .storage import Storage
from .tracking import RunLogger, redact, resolve_uri


@dataclass
class TrainOutcome:
    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    state_path: str | None  # where <run>/final_state.pt lives in the storage (a path or a URI)
    eval: dict[str, dict[str, Any]] = field(default_factory=dict)
    final_metrics: dict[str, Any] = field(default_factory=dict)
    models: dict[str, str] = field(default_factory=dict)  # MLflow model URIs: backbone, encoder


def _open_mlflow_run(cfg: ExperimentConfig, storage: Storage, run_name: str, parent_run_id: str | None,
                     pipeline: str | None = None) -> RunLogger:
    """Start the run's MLflow run, or reopen it when this ``run_name`` is being resumed."""
    uri = resolve_uri(cfg.tracking.uri)
    saved = load_record(storage, run_name)
    if saved is not None and saved.tracking_uri in (uri, redact(uri)):
        logger = RunLogger(uri, saved.mlflow_run_id)
        logger.client.update_run(logger.run_id, status="RUNNING")
        return logger
    logger = RunLogger.start(uri, cfg.tracking.experiment, cfg.tracking.run_name or run_name,
                             tags={"pcl_ray.run_name": run_name, "pcl_ray.method": cfg.method.name,
                                   "pcl_ray.storage": storage.uri_of(run_name),
                                   **({"pcl_ray.pipeline": pipeline} if pipeline else {})},
                             parent_run_id=parent_run_id)
    save_record(storage, RunRecord(run_name=run_name, mlflow_run_id=logger.run_id, tracking_uri=redact(uri),
                                   pipeline=pipeline, config=cfg.public_dict()))
    return logger


def default_run_name(cfg: ExperimentConfig) -> str:
    return f"{cfg.method.name}-{cfg.data.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_precision(cfg: ExperimentConfig, gpu: bool | None = None) -> None:
    """fp16 (its grad scaler) needs GPU workers. ``gpu``: whether the workers get GPUs, once Ray knows; before
    Ray starts, ``ray.use_gpu`` decides (``auto`` on a new local Ray: whether this machine has CUDA)."""
    if cfg.train.precision != "fp16":
        return
    if gpu is None:
        from .distributed.connect import attach_address

        if cfg.ray.use_gpu == "auto" and attach_address(cfg) is not None:
            return  # an attached cluster's GPUs are known once connected (connect() checks again)
        gpu = bool(cfg.ray.use_gpu) if cfg.ray.use_gpu != "auto" else torch.cuda.is_available()
    if not gpu:
        raise ConfigError("train.precision: fp16 needs GPU workers (ray.use_gpu and a CUDA device); "
                          "use fp32, bf16 or auto on a CPU-only run")


def preflight(cfg: ExperimentConfig, num_samples: int) -> None:
    """What the config and the data decide alone, checked before anything starts."""
    check_precision(cfg)
    if cfg.needs_estep:
        too_big = [k for k in cfg.estep.num_clusters if k >= num_samples]
        if too_big:
            raise ConfigError(f"estep.num_clusters: {too_big} must be below the {num_samples} training images")
    if cfg.train.batch_size > num_samples:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is larger than the {num_samples} training "
                          "images")


def connect(cfg: ExperimentConfig, storage: Storage, tracking_uri: str) -> bool:
    """Start or attach to Ray and check that the cluster can reach the storage and the tracking store.

    Returns True when the run is on a cluster (attached, or more than one node). Every check raises
    ConfigError before anything of the run is written.
    """
    from .distributed.connect import alive_nodes, attach_address, check_multi_node, check_resources
    from .distributed.trainer import init_ray, use_gpu
    from .tracking import check_tracking

    check_tracking(tracking_uri)
    storage.check_writable()
    attached = attach_address(cfg) is not None
    started_local = init_ray(cfg)
    sigterm_as_interrupt()  # ray.init replaced the handler with a plain exit
    nodes = alive_nodes()
    check_multi_node(cfg, storage, tracking_uri, nodes)
    check_precision(cfg, use_gpu(cfg))
    if started_local:
        check_resources(cfg, use_gpu(cfg), attached=False)
    return attached or nodes > 1


def train(cfg: ExperimentConfig, *, run_name: str | None = None, parent_run_id: str | None = None,
          log=print, callbacks: list | None = None, tags: dict[str, str] | None = None,
          init_checkpoint: str | None = None, pipeline: str | None = None,
          register: str | None = None) -> TrainOutcome:
    from .data import check_data
    from .distributed.cluster_actor import stop_cluster_actor
    from .distributed.trainer import fit
    from .evaluation.report import evaluate
    from .methods import METHODS

    run_name = check_name(run_name or cfg.ray.run_name or default_run_name(cfg), "ray.run_name")
    # Check what can be checked before anything is written: the data loads, every k fits, the cluster
    # reaches the storage and the tracking store.
    train_data = check_data(cfg)
    train_labels = train_data.labels  # for monitoring only (estep/k*/ami_labels)
    num_samples = len(train_labels)
    preflight(cfg, num_samples)
    storage = run_storage(cfg)
    on_cluster = connect(cfg, storage, resolve_uri(cfg.tracking.uri))
    saved = load_record(storage, run_name)
    if saved is not None:  # this name ran before: continue it only if it trains the same way
        check_resume(saved.config, cfg, run_name)
    logger = _open_mlflow_run(cfg, storage, run_name, parent_run_id, pipeline)
    if tags:
        logger.set_tags(tags)
    log(f"[pcl-ray] run {run_name}: storage {storage.uri_of(run_name)}, MLflow run {logger.run_id} at "
        f"{redact(logger.tracking_uri)}")
    logger.log_params(cfg.flat())
    status = "FAILED"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            cfg_file = Path(tmp) / "config.yaml"
            cfg_file.write_text(dump_config(cfg))
            logger.log_artifact(cfg_file)
        logger.log_params(METHODS[cfg.method.name].run_params(cfg))
        outcome = fit(cfg, run_name, storage, num_samples, logger.spec(), labels=train_labels, callbacks=callbacks,
                      init_checkpoint=init_checkpoint, attached=on_cluster)
        if outcome.result.error is not None:
            stop_cluster_actor(outcome.actor, run_name)  # a later --resume starts its own (primed from the checkpoint)
            raise outcome.result.error
        logger.log_params({"estep.backend_used": "faiss-gpu" if outcome.backend_gpus else "faiss-cpu"}
                          if cfg.needs_estep else {})
        result = TrainOutcome(run_name, logger.run_id, logger.tracking_uri, outcome.state_path,
                              final_metrics=dict(outcome.result.metrics or {}))
        state = None
        if outcome.state_path is not None:
            raw = storage.read_bytes(final_state_rel(run_name))
            state = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
        _log_training_artifacts(logger, outcome, state, run_name)
        if state is not None:  # MLflow Models: runs:/<id>/backbone and /encoder (models:/NAME/N with --register)
            from .evaluation.export import log_mlflow_models

            result.models = log_mlflow_models(
                logger.tracking_uri, logger.run_id, cfg, state["method"], mean=train_data.mean, std=train_data.std,
                channels=train_data.channels, input_size=cfg.data.image_size or train_data.image_size,
                register=register)
        if cfg.eval.enabled and state is not None:
            torch.set_num_threads(os.cpu_count() or 1)  # on a cluster: one Ray task with a worker's resources
            result.eval = evaluate(cfg, state["method"], log=log, remote=on_cluster)
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


def _log_training_artifacts(logger: RunLogger, outcome, state: dict | None, run_name: str) -> None:
    """Backbone weights from the final checkpoint ``state`` and the last E-step's prototype plot."""
    import ray

    from .distributed.cluster_actor import stop_cluster_actor
    from .evaluation.plots import plot_prototype_stats

    with tempfile.TemporaryDirectory() as tmp:
        if state is not None:
            backbone = {k[len("encoder.backbone."):]: v for k, v in state["method"].items()
                        if k.startswith("encoder.backbone.")}
            weights = Path(tmp) / "backbone.pt"
            torch.save(backbone, weights)
            logger.log_artifact(weights, "model")
        if outcome.actor is not None:
            try:  # a picture only: an actor lost with its node (or restarted empty) costs the plot, not the run
                ref = ray.get(outcome.actor.latest.remote(), timeout=120)
                pset = ray.get(ref[0], timeout=120) if ref is not None else None
            except (ray.exceptions.RayError, TimeoutError) as exc:
                print(f"[pcl-ray] no prototype plot: the cluster actor is unavailable ({type(exc).__name__})")
                pset = None
            if pset is not None:
                png = Path(tmp) / f"prototypes_epoch{pset.epoch + 1}.png"
                plot_prototype_stats(pset.granularities, png)
                logger.log_artifact(png, "plots")
            stop_cluster_actor(outcome.actor, run_name)
