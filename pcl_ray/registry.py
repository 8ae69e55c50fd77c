"""The run registry: which training runs exist under a storage root, their MLflow runs and checkpoints.

Layout under the storage root (see :mod:`pcl_ray.storage`)::

    .pcl_ray/<run>.json          one record per run: MLflow run id, tracking URI, pipeline, start time
    <run>/checkpoint_*/state.pt  Ray Train's checkpoints (the newest ``train.keep_checkpoints``)
    <run>/final_state.pt         the last checkpoint's state, copied when training ends

Every record is written whole (:meth:`Storage.write_json` never leaves a half-written file), and a reader
that meets an unreadable checkpoint falls back to the previous complete one.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field

from .config import ConfigError
from .storage import Storage
from .tracking import RunLogger, redact, resolve_uri

REGISTRY_DIR = ".pcl_ray"
FINAL_STATE = "final_state.pt"
CHECKPOINT_STATE = "state.pt"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(value: str, key: str) -> str:
    """``value`` when it is a safe file name (letters, digits, ``.``, ``_``, ``-``; no path parts)."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise ConfigError(f"{key}: {value!r} is not a safe name (expected 1-128 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit, no '..')")
    return value


@dataclass
class RunRecord:
    """What the registry keeps of one training run."""

    run_name: str
    mlflow_run_id: str
    tracking_uri: str
    pipeline: str | None = None
    started_at: float = field(default_factory=time.time)
    config: dict | None = None  # the config the run started with (passwords masked), for --resume

    @classmethod
    def from_json(cls, data: dict) -> "RunRecord":
        return cls(run_name=data.get("run_name", ""), mlflow_run_id=data["mlflow_run_id"],
                   tracking_uri=data["tracking_uri"], pipeline=data.get("pipeline"),
                   started_at=float(data.get("started_at", 0.0)), config=data.get("config"))


def record_rel(run_name: str) -> str:
    return f"{REGISTRY_DIR}/{run_name}.json"


def save_record(storage: Storage, record: RunRecord) -> None:
    storage.write_json(record_rel(record.run_name), asdict(record))


def load_record(storage: Storage, run_name: str) -> RunRecord | None:
    """The run's record, or None when the registry has none (or it is unreadable)."""
    rel = record_rel(run_name)
    if not storage.is_file(rel):
        return None
    try:
        record = RunRecord.from_json(storage.read_json(rel))
    except (ValueError, KeyError, TypeError):
        return None
    record.run_name = record.run_name or run_name
    return record


def list_records(storage: Storage) -> list[RunRecord]:
    out = []
    for name, is_dir, mtime in storage.list(REGISTRY_DIR):
        if is_dir or not name.endswith(".json") or name.startswith("."):
            continue
        record = load_record(storage, name[: -len(".json")])
        if record is not None:
            record.started_at = record.started_at or mtime
            out.append(record)
    return out


def latest_run(storage: Storage, pipeline: str | None = None) -> str | None:
    """The most recently started run (of ``pipeline`` when given), or None."""
    records = [r for r in list_records(storage) if pipeline is None or r.pipeline == pipeline]
    return max(records, key=lambda r: r.started_at).run_name if records else None


def run_storage(cfg) -> Storage:
    """The storage root of ``cfg`` (``ray.storage_path``), see :mod:`pcl_ray.storage`."""
    return Storage.from_config(cfg)


def latest_run_name(storage: Storage, pipeline: str | None = None) -> str | None:
    """Name of the most recently started run (of ``pipeline`` when given), for ``--resume`` without a name."""
    return latest_run(storage, pipeline)


def finished_run(cfg, run_name: str) -> RunLogger | None:
    """The MLflow run of ``run_name`` when an earlier start of it already ended FINISHED, else None."""
    uri = resolve_uri(cfg.tracking.uri)
    saved = load_record(run_storage(cfg), run_name)
    if saved is None or saved.tracking_uri not in (uri, redact(uri)):
        return None
    logger = RunLogger(uri, saved.mlflow_run_id)
    return logger if logger.client.get_run(logger.run_id).info.status == "FINISHED" else None


def run_exists(storage: Storage, run_name: str) -> bool:
    return storage.is_file(record_rel(run_name)) or storage.is_dir(run_name)


def final_state_rel(run_name: str) -> str:
    return f"{run_name}/{FINAL_STATE}"


def checkpoint_states(storage: Storage, run_name: str) -> list[str]:
    """Relative paths of the run's ``checkpoint_*/state.pt``, newest first."""
    dirs = [name for name, is_dir, _ in storage.list(run_name) if is_dir and name.startswith("checkpoint_")]
    out = []
    for d in sorted(dirs, reverse=True):  # Ray Train names them checkpoint_<timestamp>: lexicographic = time
        rel = f"{run_name}/{d}/{CHECKPOINT_STATE}"
        if storage.is_file(rel):
            out.append(rel)
    return out


def state_candidates(storage: Storage, run_name: str) -> list[str]:
    """Where the run's trained state may be, best first: the final state, then each checkpoint, newest first."""
    final = final_state_rel(run_name)
    return ([final] if storage.is_file(final) else []) + checkpoint_states(storage, run_name)
