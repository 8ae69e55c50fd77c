"""The `eval` verb: find a trained run or checkpoint → evaluation suite → metrics and artifacts in MLflow.

What ``RUN`` may be, tried in this order:

1. a path: a checkpoint file (``final_state.pt``, or ``state.pt`` inside a Ray Train
   ``checkpoint_*`` folder), or a folder holding one;
2. a run name under the storage root (``runs/<name>/final_state.pt``, else the run's
   latest ``checkpoint_*/state.pt``);
3. an MLflow run id (32 hex digits): the run's local checkpoint when its
   ``pcl_ray.run_name`` is under the storage root, else its logged ``config.yaml`` and
   ``model/backbone.pt`` artifacts (enough for every suite on backbone features).

The config is the one saved with the checkpoint (``state["config"]``, see the worker's
``_save_state``), with the command line's ``--set`` overrides applied on top. Metrics go
to the run's own MLflow run when it is known (``runs/.pcl_ray/<name>.json`` or the run
id), else to a new run in ``tracking.experiment``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .config import ExperimentConfig, apply_overrides, build_config, parse_override
from .tracking import PROJECT_DIR, RunLogger, resolve_uri

__all__ = ["EvalOutcome", "EvalTarget", "EvalTargetError", "evaluate_target", "resolve_target", "storage_roots"]

FINAL_STATE = "final_state.pt"
CHECKPOINT_STATE = "state.pt"
_RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class EvalTargetError(LookupError):
    """``RUN`` names no run or checkpoint, or what it names cannot be evaluated. The message says which."""


@dataclass
class EvalTarget:
    """A trained encoder ready for evaluation, and where its results belong.

    Attributes:
        label: a short name for tables and new MLflow runs.
        method_state: the method's state dict (at least ``encoder.backbone.*``).
        config: the run's config as a plain dict (before ``--set`` overrides).
        checkpoint: the checkpoint file, when one was read from disk.
        epoch: the checkpoint's epoch (0-based), when known.
        mlflow_run_id, tracking_uri: the run's MLflow run, when known.
    """

    label: str
    method_state: dict[str, torch.Tensor]
    config: dict[str, Any]
    checkpoint: Path | None = None
    epoch: int | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None


@dataclass
class EvalOutcome:
    target: EvalTarget
    cfg: ExperimentConfig
    suites: list[str]
    metrics: dict[str, float]
    out_dir: Path
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    artifacts: list[str] = field(default_factory=list)
    seconds: float = 0.0


def storage_roots(overrides: Sequence[str] = ()) -> list[Path]:
    """Folders that may hold runs: ``--set ray.storage_path`` when given, ``<project>/runs``, ``./runs``."""
    roots = []
    for item in overrides:
        path, value = parse_override(item)
        if path == ["ray", "storage_path"] and value:
            roots.append(Path(str(value)).expanduser())
    roots += [PROJECT_DIR / "runs", Path.cwd() / "runs"]
    return list(dict.fromkeys(r.resolve() for r in roots))


def _override_value(overrides: Sequence[str], key: str) -> Any:
    value = None
    for item in overrides:
        path, v = parse_override(item)
        if ".".join(path) == key:
            value = v
    return value


# ----------------------------------------------------------------------------------- resolving


def _state_file_in(folder: Path) -> Path | None:
    """``final_state.pt`` or ``state.pt`` in ``folder``, else the latest ``checkpoint_*/state.pt``."""
    for name in (FINAL_STATE, CHECKPOINT_STATE):
        if (folder / name).is_file():
            return folder / name
    checkpoints = sorted(folder.glob(f"checkpoint_*/{CHECKPOINT_STATE}"))
    return checkpoints[-1] if checkpoints else None


def _run_dir(state_file: Path) -> Path:
    """The training run's folder: the file's folder, or its parent for a ``checkpoint_*`` folder."""
    folder = state_file.parent
    return folder.parent if folder.name.startswith("checkpoint_") else folder


def _mlflow_link(state_file: Path) -> tuple[str | None, str | None]:
    """The MLflow run recorded for the training run that wrote ``state_file``, if any."""
    run_dir = _run_dir(state_file)
    meta = run_dir.parent / ".pcl_ray" / f"{run_dir.name}.json"
    if not meta.is_file():
        return None, None
    try:
        saved = json.loads(meta.read_text())
        return saved["mlflow_run_id"], saved["tracking_uri"]
    except (ValueError, KeyError):
        return None, None


def _from_checkpoint(path: Path, label: str) -> EvalTarget:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a non-checkpoint file
        raise EvalTargetError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict) or "method" not in state or "config" not in state:
        raise EvalTargetError(f"{path}: not a pcl_ray training checkpoint (expected 'method' and 'config' entries)")
    run_id, uri = _mlflow_link(path)
    epoch = state.get("epoch")
    return EvalTarget(label=label, method_state=state["method"], config=state["config"], checkpoint=path,
                      epoch=int(epoch) if epoch is not None else None, mlflow_run_id=run_id, tracking_uri=uri)


def _from_mlflow(run_id: str, uri: str, roots: Sequence[Path]) -> EvalTarget | None:
    """The target for an MLflow run id, or None when the store does not know the id."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    run_name = run.data.tags.get("pcl_ray.run_name")
    for root in roots if run_name else ():
        state_file = _state_file_in(root / run_name) if (root / run_name).is_dir() else None
        if state_file is not None:
            target = _from_checkpoint(state_file, run_name)
            target.mlflow_run_id, target.tracking_uri = run_id, uri
            return target
    # No local checkpoint: rebuild an encoder state from the logged config and backbone.
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg_file = Path(client.download_artifacts(run_id, "config.yaml", tmp))
            weights = Path(client.download_artifacts(run_id, "model/backbone.pt", tmp))
        except (MlflowException, OSError) as exc:
            raise EvalTargetError(f"MLflow run {run_id} has no local checkpoint (run name {run_name!r} not under "
                                  f"{', '.join(map(str, roots))}) and no config.yaml + model/backbone.pt "
                                  f"artifacts to evaluate: {exc}") from None
        config = yaml.safe_load(cfg_file.read_text())
        backbone = torch.load(weights, map_location="cpu", weights_only=True)
    state = {f"encoder.backbone.{k}": v for k, v in backbone.items()}
    return EvalTarget(label=run_name or run_id, method_state=state, config=config, mlflow_run_id=run_id,
                      tracking_uri=uri)


def resolve_target(spec: str, overrides: Sequence[str] = ()) -> EvalTarget:
    """Find what ``spec`` names (see the module docstring).

    Raises:
        EvalTargetError: nothing matches, or the match is not a usable checkpoint.
    """
    roots = storage_roots(overrides)
    path = Path(spec).expanduser()
    if path.is_file():
        return _from_checkpoint(path.resolve(), _run_dir(path.resolve()).name)
    if path.is_dir():
        state_file = _state_file_in(path)
        if state_file is None:
            raise EvalTargetError(f"{path}: folder holds no {FINAL_STATE}, {CHECKPOINT_STATE} or "
                                  f"checkpoint_*/{CHECKPOINT_STATE}")
        return _from_checkpoint(state_file.resolve(), _run_dir(state_file.resolve()).name)
    if "/" not in spec:
        for root in roots:
            if (root / spec).is_dir():
                state_file = _state_file_in(root / spec)
                if state_file is None:
                    raise EvalTargetError(f"run {spec!r} under {root} has no checkpoint yet")
                return _from_checkpoint(state_file, spec)
    uri = resolve_uri(_override_value(overrides, "tracking.uri"))
    if _RUN_ID.match(spec):
        target = _from_mlflow(spec, uri, roots)
        if target is not None:
            return target
    raise EvalTargetError(
        f"no run or checkpoint named {spec!r}: it is not a file or folder, not a run under "
        f"{' or '.join(map(str, roots))}, and not an MLflow run id in {uri}")


# ----------------------------------------------------------------------------------- evaluating


def _logger_for(target: EvalTarget, cfg: ExperimentConfig, log: Callable[[str], None]) -> tuple[RunLogger, bool]:
    """The target's MLflow run, or a new one in ``cfg.tracking.experiment``; ``True`` when new."""
    if target.mlflow_run_id and target.tracking_uri:
        from mlflow.exceptions import MlflowException

        logger = RunLogger(target.tracking_uri, target.mlflow_run_id)
        try:
            if logger.client.get_run(logger.run_id).info.lifecycle_stage == "active":
                return logger, False
        except MlflowException:
            pass
        log(f"[pcl-ray] MLflow run {target.mlflow_run_id} is gone; logging to a new run")
    tags = {"pcl_ray.method": cfg.method.name, "pcl_ray.eval_of": str(target.checkpoint or target.label)}
    logger = RunLogger.start(resolve_uri(cfg.tracking.uri), cfg.tracking.experiment, f"eval-{target.label}", tags=tags)
    logger.log_params(cfg.flat())
    return logger, True


def evaluate_target(
    target: EvalTarget,
    *,
    overrides: Sequence[str] = (),
    suites: str | Sequence[str] | None = None,
    out_dir: str | Path | None = None,
    mlflow: bool = True,
    log: Callable[[str], None] = print,
) -> EvalOutcome:
    """Run the evaluation suite on ``target`` and log metrics and artifacts to MLflow.

    Args:
        target: from :func:`resolve_target`.
        overrides: ``--set`` items applied to the target's saved config.
        suites: suite names (``"knn,lowshot"`` or a list); ``None`` means ``eval.suites``.
        out_dir: artifact folder; ``eval/`` beside the checkpoint when None (without a
            local checkpoint: a temporary folder, removed afterwards, so that the
            artifacts live in MLflow only).
        mlflow: log to MLflow (metrics at step ``epoch + 1``, artifacts under ``eval/``).
        log: progress lines.
    """
    from .evaluation.suite import parse_suites, run_suite

    source = f"{target.label} checkpoint config" + (" + --set " + " ".join(overrides) if overrides else "")
    cfg = build_config(apply_overrides(target.config, list(overrides)), source)
    names = parse_suites(suites if suites is not None else cfg.eval.suites)

    with tempfile.TemporaryDirectory() as tmp:
        if out_dir is not None:
            out = Path(out_dir)
        elif target.checkpoint is not None:
            out = target.checkpoint.parent / "eval"
        else:
            out = Path(tmp)
        torch.set_num_threads(os.cpu_count() or 1)
        started = time.time()
        metrics = run_suite(cfg, target.method_state, names, out, log=log)
        seconds = time.time() - started
        # Only what this evaluation wrote (the folder may hold an earlier evaluation's files).
        written = sorted(p for p in out.iterdir() if p.is_file() and p.stat().st_mtime >= started - 1)
        outcome = EvalOutcome(target, cfg, names, metrics, out, artifacts=[p.name for p in written],
                              seconds=seconds)
        if mlflow:
            logger, is_new = _logger_for(target, cfg, log)
            step = target.epoch + 1 if target.epoch is not None else None
            logger.log_metrics(metrics, step=step)
            logger.set_tags({"pcl_ray.eval.suites": ",".join(names), "pcl_ray.eval.feature": cfg.eval.feature})
            for p in written:
                logger.log_artifact(p, "eval")
            if is_new:
                logger.end("FINISHED")
            outcome.mlflow_run_id, outcome.tracking_uri = logger.run_id, logger.tracking_uri
    return outcome
