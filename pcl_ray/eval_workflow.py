"""The `eval` verb: find a trained run or checkpoint → evaluation suite → metrics and artifacts in MLflow.

What ``RUN`` may be, tried in this order:

1. a URI (``s3://bucket/prefix/...``, ``gs://...``, ``file:///shared/...``) of a checkpoint file or of a
   run folder, read through the storage layer (:mod:`pcl_ray.storage`; ``--set ray.storage_endpoint=...``
   or ``AWS_ENDPOINT_URL`` for S3-compatible stores);
2. a local path: a checkpoint file (``final_state.pt``, or ``state.pt`` inside a Ray Train
   ``checkpoint_*`` folder), or a folder holding one;
3. a run name under the storage root: ``--set ray.storage_path=...`` when given (a local folder, a
   ``file://`` mount or an object store), else the local ``runs/`` folder;
4. an MLflow run id (32 hex digits): the run folder that ``train`` recorded in the run's
   ``pcl_ray.storage`` tag, else its ``pcl_ray.run_name`` under the storage root, else its logged
   ``config.yaml`` and ``model/backbone.pt`` artifacts (enough for every suite on backbone features);
5. an MLflow model that train logged: ``models:/NAME/VERSION`` (``train --register NAME``) or
   ``runs:/RUN_ID/backbone`` (or ``/encoder``): its weights and the config in its metadata.

A run folder's states are tried best first (:func:`pcl_ray.registry.state_candidates`: the final state,
then every checkpoint, newest first). A file that does not load (half-written by a run that died while
saving, or not a checkpoint) is skipped with one line saying which and why, and the next one is tried.
Every state is copied to a temporary local file first and loaded with ``weights_only=True``.

The config is the one saved with the checkpoint (``state["config"]``, see the worker's ``_save_state``),
with the command line's ``--set`` overrides applied on top; the training session's ``ray.address`` is
dropped (where to evaluate is the evaluating command's business). Metrics go to the run's own MLflow
run when it is known (the registry record ``.pcl_ray/<run>.json`` beside the run folder, or the run
id), else to a new run in ``tracking.experiment``. Artifacts go to MLflow under ``eval/`` and, for a run
folder in a storage root, to ``<run>/eval/`` there (each file written whole).

Attached to a cluster (``ray.address``/``RAY_ADDRESS``, or a Ray with more than one node), the suite
runs as one Ray task with a training worker's resources (:mod:`pcl_ray.evaluation.remote`).
"""

from __future__ import annotations

import copy
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

from .config import ConfigError, ExperimentConfig, apply_overrides, build_config, parse_override
from .registry import CHECKPOINT_STATE, FINAL_STATE, SAFE_NAME, load_record, run_exists, state_candidates
from .evaluation.export import is_model_uri, load_mlflow_model
from .storage import REMOTE_SCHEMES, Storage
from .tracking import RunLogger, redact, resolve_uri

__all__ = ["EvalOutcome", "EvalTarget", "EvalTargetError", "evaluate_target", "resolve_target", "storage_roots"]

_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_URI_SCHEMES = (*REMOTE_SCHEMES, "file")


class EvalTargetError(LookupError):
    """``RUN`` names no run or checkpoint, or what it names cannot be evaluated. The message says which."""


@dataclass
class EvalTarget:
    """A trained encoder ready for evaluation, and where its results belong.

    Attributes:
        label: a short name for tables and new MLflow runs.
        method_state: the method's state dict (at least ``encoder.backbone.*``).
        config: the run's config as a plain dict (before ``--set`` overrides).
        checkpoint: the state file that was loaded: a local Path, or a URI for an object store.
        epoch: the checkpoint's epoch (0-based), when known.
        mlflow_run_id, tracking_uri: the run's MLflow run, when known.
        storage, run: the storage root that holds the run folder, and the folder's name there (the
            evaluation's artifacts go to ``<run>/eval/``); None for a run known only to MLflow.
        skipped: one line per state file that was tried first and did not load.
    """

    label: str
    method_state: dict[str, torch.Tensor]
    config: dict[str, Any]
    checkpoint: Path | str | None = None
    epoch: int | None = None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    storage: Storage | None = None
    run: str | None = None
    skipped: list[str] = field(default_factory=list)


@dataclass
class EvalOutcome:
    """What an evaluation produced. ``out_dir`` says where the artifacts went (a folder or a URI)."""

    target: EvalTarget
    cfg: ExperimentConfig
    suites: list[str]
    metrics: dict[str, float]
    out_dir: str | None
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    artifacts: list[str] = field(default_factory=list)
    seconds: float = 0.0
    remote: dict[str, Any] | None = None  # node, host, pid and device of the Ray task, when it ran as one


def _override_value(overrides: Sequence[str], key: str) -> Any:
    value = None
    for item in overrides:
        path, v = parse_override(item)
        if ".".join(path) == key:
            value = v
    return value


def _endpoint(overrides: Sequence[str]) -> str | None:
    value = _override_value(overrides, "ray.storage_endpoint")
    return str(value) if value else None


def storage_roots(overrides: Sequence[str] = ()) -> list[Storage]:
    """Storage roots that may hold runs: ``--set ray.storage_path`` (with ``ray.storage_endpoint``) when
    given, else the default local ``runs/`` folder (and ``./runs`` when that is another folder)."""
    value = _override_value(overrides, "ray.storage_path")
    if value:
        return [Storage.from_uri(str(value), _endpoint(overrides), create=False)]
    roots = [Storage.from_uri(None, create=False)]
    cwd_runs = (Path.cwd() / "runs").resolve()
    if str(cwd_runs) != roots[0].root and cwd_runs.is_dir():
        roots.append(Storage.from_uri(cwd_runs, create=False))
    return roots


# ----------------------------------------------------------------------------------- locating


def _is_uri(spec: str) -> bool:
    return "://" in spec and spec.split("://", 1)[0].lower() in _URI_SCHEMES


def _split(location: str) -> tuple[str, str]:
    """``(parent, last part)`` of a path or URI: ``s3://b/runs/r1`` -> ``("s3://b/runs", "r1")``."""
    text = location.rstrip("/")
    head, sep, rest = text.partition("://")
    if not sep:
        head, rest = "", text
    parent, _, name = rest.rpartition("/")
    if not name:
        raise EvalTargetError(f"{location}: expected a run folder or a checkpoint file, not a storage root")
    if sep:
        parent = f"{head}://{parent}" if parent else f"{head}://"
        if parent.endswith("://") and head.lower() == "file":
            parent += "/"
    elif not parent:
        parent = "/" if text.startswith("/") else "."
    return parent, name


def _storage(uri: str, endpoint: str | None) -> Storage:
    try:
        return Storage.from_uri(uri, endpoint, create=False)
    except ConfigError as exc:
        raise EvalTargetError(str(exc)) from None


@dataclass
class _Location:
    """Where to look: the storage root that holds the run folder, the folder's name, the files to try."""

    storage: Storage
    run: str
    candidates: list[str]  # relative to ``storage``, best first
    explicit: bool = False  # the user named one file: no fallback


def _folder_candidates(storage: Storage, rel: str) -> list[str]:
    """States in the folder ``rel``: the final state, its own ``state.pt``, then ``checkpoint_*``, newest first."""
    out = state_candidates(storage, rel)
    own = f"{rel}/{CHECKPOINT_STATE}"
    if storage.is_file(own):
        out.insert(1 if out and out[0].endswith(FINAL_STATE) else 0, own)
    return out


def _locate(location: str, endpoint: str | None) -> _Location:
    """The run folder and state files that a file or folder (path or URI) names."""
    parent, name = _split(location)
    holder = _storage(parent, endpoint)
    try:
        is_file = holder.is_file(name)
        is_dir = not is_file and holder.is_dir(name)
    except OSError as exc:
        raise EvalTargetError(f"cannot read {holder.uri_of(name)}: {_first_line(exc)}") from None
    if not (is_file or is_dir):
        raise EvalTargetError(f"{holder.uri_of(name)}: no such file or folder")
    # The run folder: the file's folder, or the folder itself; one level up for a checkpoint_* folder.
    inner = parent if is_file else location.rstrip("/")
    inner_parent, inner_name = _split(inner)
    if inner_name.startswith("checkpoint_"):
        run_dir, tail = inner_parent, f"{inner_name}/"
    else:
        run_dir, tail = inner, ""
    root_uri, run = _split(run_dir)
    root = _storage(root_uri, endpoint)
    if is_file:
        return _Location(root, run, [f"{run}/{tail}{name}"], explicit=True)
    folder = f"{run}/{tail}".rstrip("/")
    if tail:  # a checkpoint folder: its own state only
        own = f"{folder}/{CHECKPOINT_STATE}"
        return _Location(root, run, [own] if root.is_file(own) else [], explicit=True)
    return _Location(root, run, _folder_candidates(root, folder))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _read_state(storage: Storage, rel: str) -> dict:
    """Load ``rel`` with ``weights_only=True``, from a temporary local copy for an object store."""
    if storage.on_local_disk:
        return torch.load(storage.local_path(rel), map_location="cpu", weights_only=True)
    with tempfile.TemporaryDirectory(prefix="pcl-ray-eval-") as tmp:
        local = storage.download(rel, Path(tmp) / "state.pt")
        return torch.load(local, map_location="cpu", weights_only=True)


class _NotACheckpoint(ValueError):
    pass


def _check_state(state: Any) -> None:
    if not isinstance(state, dict) or "method" not in state or "config" not in state:
        raise _NotACheckpoint("not a pcl_ray training checkpoint (expected 'method' and 'config' entries)")


def _shown(storage: Storage, rel: str) -> Path | str:
    return storage.local_path(rel) if storage.on_local_disk else storage.uri_of(rel)


def _from_location(loc: _Location, log: Callable[[str], None]) -> EvalTarget:
    """Load the first readable state of ``loc``; each unreadable one is skipped with a line saying why."""
    where = loc.storage.uri_of(loc.run)
    if not loc.candidates:
        raise EvalTargetError(f"run {loc.run!r} at {where} has no {FINAL_STATE} or checkpoint_*/{CHECKPOINT_STATE} "
                              "yet")
    skipped: list[str] = []
    for i, rel in enumerate(loc.candidates):
        uri = loc.storage.uri_of(rel)
        try:
            state = _read_state(loc.storage, rel)
            _check_state(state)
        except Exception as exc:  # torch raises several types for a truncated or foreign file
            reason = (str(exc) if isinstance(exc, _NotACheckpoint)
                      else f"not a readable torch checkpoint ({type(exc).__name__}: {_first_line(exc)})")
            if loc.explicit:
                raise EvalTargetError(f"{_shown(loc.storage, rel)}: {reason}") from None
            following = loc.candidates[i + 1] if i + 1 < len(loc.candidates) else None
            line = f"skipped {uri}: {reason}"
            log(f"[pcl-ray] eval: {line}; " + (f"trying {loc.storage.uri_of(following)}" if following
                                               else "no older checkpoint left"))
            skipped.append(line)
            continue
        record = load_record(loc.storage, loc.run) if SAFE_NAME.match(loc.run) else None
        epoch = state.get("epoch")
        return EvalTarget(label=loc.run, method_state=state["method"], config=state["config"],
                          checkpoint=_shown(loc.storage, rel), epoch=int(epoch) if epoch is not None else None,
                          mlflow_run_id=record.mlflow_run_id if record else None,
                          tracking_uri=record.tracking_uri if record else None,
                          storage=loc.storage, run=loc.run, skipped=skipped)
    raise EvalTargetError(f"run {loc.run!r} at {where}: no readable checkpoint ({'; '.join(skipped)})")


def _from_run_name(storage: Storage, name: str, log: Callable[[str], None]) -> EvalTarget | None:
    """The target for a run under ``storage``, or None when the storage has no such run."""
    try:
        if not run_exists(storage, name):
            return None
        loc = _Location(storage, name, _folder_candidates(storage, name))
    except OSError as exc:
        raise EvalTargetError(f"cannot read {storage.uri_of(name)}: {_first_line(exc)}") from None
    return _from_location(loc, log)


def _from_mlflow(run_id: str, uri: str, roots: Sequence[Storage], endpoint: str | None,
                 log: Callable[[str], None]) -> EvalTarget | None:
    """The target for an MLflow run id, or None when the store does not know the id."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        return None
    run_name = run.data.tags.get("pcl_ray.run_name")
    folder = run.data.tags.get("pcl_ray.storage")
    tried = []
    places: list[tuple[str, Callable[[], EvalTarget | None]]] = []
    if folder:
        places.append((folder, lambda: _from_location(_locate(folder, endpoint), log)))
    if run_name and SAFE_NAME.match(run_name):
        for root in roots:
            places.append((root.uri_of(run_name), lambda root=root: _from_run_name(root, run_name, log)))
    for shown, find in places:
        try:
            target = find()
        except EvalTargetError as exc:
            log(f"[pcl-ray] eval: MLflow run {run_id}: {exc}")
            target = None
        if target is not None:
            target.mlflow_run_id, target.tracking_uri = run_id, uri
            return target
        tried.append(shown)
    # No checkpoint reachable: rebuild an encoder state from the logged config and backbone.
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg_file = Path(client.download_artifacts(run_id, "config.yaml", tmp))
            weights = Path(client.download_artifacts(run_id, "model/backbone.pt", tmp))
        except (MlflowException, OSError) as exc:
            where = ", ".join(tried) if tried else "no pcl_ray.storage or pcl_ray.run_name tag"
            raise EvalTargetError(f"MLflow run {run_id} has no readable checkpoint ({where}) and no config.yaml + "
                                  f"model/backbone.pt artifacts to evaluate: {_first_line(exc)}") from None
        config = yaml.safe_load(cfg_file.read_text())
        backbone = torch.load(weights, map_location="cpu", weights_only=True)
    state = {f"encoder.backbone.{k}": v for k, v in backbone.items()}
    return EvalTarget(label=run_name or run_id, method_state=state, config=config, mlflow_run_id=run_id,
                      tracking_uri=uri)


def _from_model_uri(spec: str, uri: str) -> EvalTarget:
    """The target for an MLflow model (``models:/NAME/VERSION``, ``runs:/RUN_ID/backbone``) that train
    logged: its weights, the config in its metadata; results go to the run that logged it."""
    try:
        model, metadata, run_id = load_mlflow_model(spec, uri)
    except LookupError as exc:
        raise EvalTargetError(str(exc)) from None
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("encoder.")}
    return EvalTarget(label=spec, method_state=state, config=metadata["pcl_ray_config"], checkpoint=spec,
                      mlflow_run_id=run_id, tracking_uri=uri)


def resolve_target(spec: str, overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> EvalTarget:
    """Find what ``spec`` names (see the module docstring).

    ``log`` gets one line per state file skipped because it does not load.

    Raises:
        EvalTargetError: nothing matches, or the match is not a usable checkpoint.
    """
    endpoint = _endpoint(overrides)
    if is_model_uri(spec):
        return _from_model_uri(spec, resolve_uri(_override_value(overrides, "tracking.uri")))
    if _is_uri(spec):
        return _from_location(_locate(spec, endpoint), log)
    path = Path(spec).expanduser()
    if path.exists():
        return _from_location(_locate(str(path.resolve()), None), log)
    try:
        roots = storage_roots(overrides)
    except ConfigError as exc:
        raise EvalTargetError(str(exc)) from None
    if SAFE_NAME.match(spec) and ".." not in spec:
        for storage in roots:
            target = _from_run_name(storage, spec, log)
            if target is not None:
                return target
    uri = resolve_uri(_override_value(overrides, "tracking.uri"))
    if _RUN_ID.match(spec):
        target = _from_mlflow(spec, uri, roots, endpoint, log)
        if target is not None:
            return target
    raise EvalTargetError(
        f"no run or checkpoint named {spec!r}: it is not a file or folder, not a run under "
        f"{' or '.join(r.uri for r in roots)}, and not an MLflow run id in {redact(uri)}")


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


def _eval_config(target: EvalTarget, overrides: Sequence[str]) -> ExperimentConfig:
    raw = copy.deepcopy(target.config)
    if isinstance(raw.get("ray"), dict):
        raw["ray"]["address"] = None  # the training session's cluster; --set ray.address=... picks this one's
    source = f"{target.label} checkpoint config" + (" + --set " + " ".join(overrides) if overrides else "")
    return build_config(apply_overrides(raw, list(overrides)), source)


def _destination(target: EvalTarget, out_dir: str | os.PathLike | None, overrides: Sequence[str]) -> Storage | None:
    """Where the artifacts are kept besides MLflow: ``out_dir``, else ``<run>/eval/`` in the run's storage."""
    if out_dir is not None:
        return Storage.from_uri(str(out_dir), _endpoint(overrides))
    if target.storage is not None and target.run:
        return target.storage.sub(f"{target.run}/eval")
    return None


def evaluate_target(
    target: EvalTarget,
    *,
    overrides: Sequence[str] = (),
    suites: str | Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
    mlflow: bool = True,
    log: Callable[[str], None] = print,
    remote: bool | None = None,
) -> EvalOutcome:
    """Run the evaluation suite on ``target`` and log metrics and artifacts to MLflow.

    Args:
        target: from :func:`resolve_target`.
        overrides: ``--set`` items applied to the target's saved config.
        suites: suite names (``"knn,lowshot"`` or a list); ``None`` means ``eval.suites``.
        out_dir: where to keep the artifacts (a folder or a storage URI); ``<run>/eval/`` in the run's
            storage when None (for a run known only to MLflow: MLflow only). Each file is written
            whole, under a temporary name first.
        mlflow: log to MLflow (metrics at step ``epoch + 1``, artifacts under ``eval/``).
        log: progress lines.
        remote: run the suite as one Ray task with a training worker's resources
            (:mod:`pcl_ray.evaluation.remote`); None decides: yes when attached to a cluster.
    """
    from .evaluation.remote import on_cluster, run_suite_remote
    from .evaluation.suite import parse_suites, run_suite

    cfg = _eval_config(target, overrides)
    names = parse_suites(suites if suites is not None else cfg.eval.suites)
    dest = _destination(target, out_dir, overrides)
    use_remote = on_cluster(cfg) if remote is None else remote

    with tempfile.TemporaryDirectory(prefix="pcl-ray-eval-") as tmp:
        out = Path(tmp)
        started = time.time()
        stored: list[str] = []
        where = None
        if use_remote:
            result = run_suite_remote(cfg, target.method_state, names, dest=dest, log=log)
            metrics, stored, where = result.metrics, result.stored, result.where
            for name, data in result.files.items():
                (out / name).write_bytes(data)
            if mlflow and dest is not None:
                for name in stored:  # large files the task wrote to the storage: a local copy for MLflow
                    dest.download(name, out / name)
        else:
            torch.set_num_threads(os.cpu_count() or 1)
            metrics = run_suite(cfg, target.method_state, names, out, log=log)
        seconds = time.time() - started
        written = sorted(p for p in out.iterdir() if p.is_file())
        if dest is not None:
            for p in written:
                if p.name not in stored:
                    dest.upload(p, p.name)
        shown = dest.uri if dest is not None else ("MLflow artifacts eval/" if mlflow else None)
        artifacts = sorted({p.name for p in written} | set(stored))
        outcome = EvalOutcome(target, cfg, names, metrics, shown, artifacts=artifacts, seconds=seconds, remote=where)
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
