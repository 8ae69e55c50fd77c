"""MLflow wiring: the embedded default store, one run per training run, logging helpers."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parent.parent
DEFAULT_DIR = Path(os.environ.get("PCL_RAY_MLRUNS", PROJECT_DIR / "mlruns"))


def default_tracking_uri() -> str:
    DEFAULT_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(DEFAULT_DIR / 'mlflow.db').resolve()}"


def resolve_uri(uri: str | None) -> str:
    return uri or default_tracking_uri()


def redact(uri: str | None) -> str:
    """``uri`` with any password replaced by ``***`` (for messages, params and saved configs)."""
    if not uri:
        return str(uri)
    return re.sub(r"(://[^/@:\s]*):[^/@\s]*@", r"\1:***@", str(uri))


def check_tracking(uri: str, timeout_s: float = 10.0) -> None:
    """Refuse an unusable ``tracking.uri`` before a run starts: a server that does not answer, an unknown
    scheme, a sqlite file that is not a database. Raises ConfigError naming ``tracking.uri``."""
    import sqlite3
    import urllib.error
    import urllib.request
    from urllib.parse import urlparse

    from .config import ConfigError

    scheme = urlparse(uri).scheme.lower()
    shown = redact(uri)
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as reply:
                if reply.status >= 400:
                    raise OSError(f"HTTP {reply.status}")
        except (OSError, urllib.error.URLError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError(f"tracking.uri: no MLflow tracking server answers at {shown} within "
                              f"{timeout_s:g}s ({reason})") from None
        return
    if scheme == "sqlite":
        path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if not path:
            raise ConfigError(f"tracking.uri: expected sqlite:////ABSOLUTE/PATH.db, got {shown}")
        db = Path(path)
        if db.exists():
            try:
                with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=timeout_s) as con:
                    con.execute("select name from sqlite_master limit 1").fetchall()
            except sqlite3.DatabaseError as exc:
                raise ConfigError(f"tracking.uri: {shown} is not a usable sqlite database ({exc})") from None
        elif not db.parent.is_dir():
            try:
                db.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"tracking.uri: cannot create the folder of {shown} ({exc.strerror})") from None
        return
    if scheme in ("postgresql", "mysql", "mssql", "databricks", "file") or scheme.startswith(("postgresql+", "mysql+")):
        return  # MLflow's own stores: their client reports their errors
    raise ConfigError(f"tracking.uri: unsupported scheme in {shown}; expected http(s)://HOST:PORT (an MLflow "
                      "server), sqlite:////ABSOLUTE/PATH.db or a database URI")


def ensure_experiment(uri: str, name: str) -> str:
    """Experiment id for ``name``, created with an explicit artifact location for sqlite stores."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        artifact_location = (db.parent / "artifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def _clean_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


class RunLogger:
    """Thin wrapper around ``MlflowClient`` bound to one run (safe to use from a Ray worker)."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str | None, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> "RunLogger":
        from mlflow.tracking import MlflowClient

        exp_id = ensure_experiment(tracking_uri, experiment)
        tags = dict(tags or {})
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = MlflowClient(tracking_uri).create_run(exp_id, run_name=run_name, tags=tags)
        return cls(tracking_uri, run.info.run_id)

    def spec(self) -> dict[str, str]:
        """Constructor arguments, to rebuild this logger inside a worker."""
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id}

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        items = [Param(k, _clean_value(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v]
        for i in range(0, len(items), 500):
            self.client.log_batch(self.run_id, metrics=items[i : i + 500])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)
