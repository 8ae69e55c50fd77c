"""MLflow wiring: the embedded default store, one run per training run, logging helpers."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .secrets import redact  # noqa: F401  (re-exported: tracking URIs are shown redacted)



def default_dir() -> Path:
    """The embedded store's folder: ``$PCL_RAY_MLRUNS``, else ``mlruns/`` in the home (:mod:`pcl_ray.paths`)."""
    from .paths import home

    value = os.environ.get("PCL_RAY_MLRUNS", "").strip()
    return Path(value).expanduser() if value else home() / "mlruns"


def default_tracking_uri() -> str:
    folder = default_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{(folder / 'mlflow.db').resolve()}"


def resolve_uri(uri: str | None) -> str:
    return uri or default_tracking_uri()




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


def provenance_tags() -> dict[str, str]:
    """The tags ``mlflow.start_run`` would add and ``MlflowClient.create_run`` does not: the command that
    ran (``mlflow.source.name``), ``mlflow.source.type``, the user, and the git commit of the pcl-ray source
    when it runs from a git checkout (``mlflow.source.git.commit``)."""
    import getpass
    import subprocess

    from .cli import invoked_as

    tags = {"mlflow.source.name": invoked_as(), "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    source = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "--show-toplevel", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return tags
    lines = done.stdout.split()
    if done.returncode == 0 and len(lines) == 2 and Path(lines[0]).resolve() == source:
        tags["mlflow.source.git.commit"] = lines[1]
    return tags


def _clean_value(v: Any) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


class RunLogger:
    """Thin wrapper around ``MlflowClient`` bound to one run (safe to use from a Ray worker).

    Metrics outlive a tracking store that fails for a while (locked, unreachable): see :meth:`log_metrics`.
    ``retry_s``: how long one call keeps retrying a failing store (no new attempt starts after it; one
    attempt can itself take a while, e.g. 20 s on a locked sqlite file).
    """

    RETRY_S = 30.0

    def __init__(self, tracking_uri: str, run_id: str, retry_s: float = RETRY_S):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri)
        self.retry_s = float(retry_s)
        self._pending: list[tuple[int, list]] = []  # (step, metrics) batches not written yet, oldest first
        self._failing = False  # the store failed and the user was told; cleared when it answers again

    @classmethod
    def start(cls, tracking_uri: str, experiment: str, run_name: str | None, tags: dict[str, str] | None = None,
              parent_run_id: str | None = None) -> "RunLogger":
        from mlflow.tracking import MlflowClient

        exp_id = ensure_experiment(tracking_uri, experiment)
        tags = {**provenance_tags(), **(tags or {})}
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

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, *, final: bool = False) -> None:
        """Log ``metrics`` at ``step`` (the worker loop: one call per epoch); never stops training over the store.

        A write that fails is retried with backoff for up to ``retry_s`` (only once while the store is
        already known to fail, so that an outage does not slow every epoch); then the batch is kept in
        memory and one warning names the store and what is kept. Kept batches are written, oldest first
        and with their own steps, by the next call that gets through and by :meth:`end`. ``final``: the
        caller's last call (a worker's last epoch; its logger never reaches :meth:`end`): kept batches
        get the full retry budget, and a warning names those that could not be written. Metrics MLflow
        rejects as invalid still raise: no retry can fix them.
        """
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step or 0) for k, v in metrics.items()
                 if isinstance(v, (int, float)) and v == v]
        if items:
            self._pending.append((step or 0, items))
        error = self._flush(self.retry_s if final or not self._failing else 0.0, fresh=bool(items))
        if error is None:
            return
        if final:
            _warn(f"MLflow tracking store {redact(self.tracking_uri)} still fails ({_one_line(error)}): "
                  f"{self._kept()} could not be written")
        elif not self._failing:
            _warn(f"MLflow tracking store {redact(self.tracking_uri)} fails ({_one_line(error)}); training goes "
                  f"on: {self._kept()} kept in memory, written when the store answers again")
        self._failing = True

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def end(self, status: str = "FINISHED") -> None:
        """Write the kept metrics and mark the run ``status``, retrying for up to ``retry_s``.

        Called from a ``finally`` with another exception on its way, it never raises: a failure here is
        a warning and the first error stays the one the caller sees. Otherwise a store that still fails
        raises its error.
        """
        import sys

        earlier = sys.exc_info()[1]
        try:
            error = self._flush(self.retry_s)
            if error is not None:
                _warn(f"MLflow tracking store {redact(self.tracking_uri)} still fails ({_one_line(error)}): "
                      f"{self._kept()} could not be written")
            self._retry(lambda: self.client.set_terminated(self.run_id, status=status))
        except Exception as exc:
            if earlier is None:
                raise
            _warn(f"could not mark MLflow run {self.run_id} {status} at {redact(self.tracking_uri)} "
                  f"({_one_line(exc)}); the error that ended the run follows")

    # ---------------------------------------------------------------- failing stores
    def _flush(self, budget_s: float, fresh: bool = False) -> Exception | None:
        """Write the kept batches, oldest first; None when all went out, else the last error after ``budget_s``.

        ``fresh``: the newest batch is the caller's own, not one kept from an earlier call."""
        import time

        start, pause = time.monotonic(), 0.5
        written = 0
        while self._pending:
            step, items = self._pending[0]
            try:
                while items:  # chunk by chunk, dropping what went out: a retry never writes a value twice
                    self.client.log_batch(self.run_id, metrics=items[:500])
                    items = items[500:]
                    self._pending[0] = (step, items)
            except Exception as exc:
                if not _retryable(exc):
                    raise
                if time.monotonic() - start + pause > budget_s:
                    return exc
                time.sleep(pause)
                pause = min(2 * pause, 8.0)
                continue
            self._pending.pop(0)
            written += 1
        if self._failing:
            _warn(f"MLflow tracking store {redact(self.tracking_uri)} answers again: the {written - fresh} kept "
                  "epoch(s) of metrics are written")
            self._failing = False
        return None

    def _retry(self, call) -> None:
        """``call()``, retried with backoff on a failing store for up to ``retry_s``; raises the last error."""
        import time

        start, pause = time.monotonic(), 0.5
        while True:
            try:
                call()
                return
            except Exception as exc:
                if not _retryable(exc) or time.monotonic() - start + pause > self.retry_s:
                    raise
                time.sleep(pause)
                pause = min(2 * pause, 8.0)

    def _kept(self) -> str:
        steps = ", ".join(str(step) for step, _ in self._pending)
        return f"{len(self._pending)} epoch(s) of metrics (step {steps})"


def _retryable(exc: Exception) -> bool:
    """False for what MLflow rejects as invalid (a bad name or value): the same call would fail again."""
    return getattr(exc, "error_code", None) != "INVALID_PARAMETER_VALUE"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {redact(text[0])[:200]}" if text else type(exc).__name__


def _warn(message: str) -> None:
    """One console line (also from a Ray worker, whose stderr reaches the driver)."""
    import logging

    logging.getLogger(__name__).warning("[pcl-ray] warning: %s", message)
