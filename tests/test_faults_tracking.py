"""A tracking store that fails for a while: training-side logging goes on, metrics are kept and arrive later,
one warning says so, and ``end()`` never hides the error that ended a run."""

from __future__ import annotations

import logging
import socket
import sqlite3
import time

import pytest

from pcl_ray.tracking import RunLogger


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "pcl_ray.tracking" and r.levelno == logging.WARNING]


def _closed_port() -> int:
    with socket.socket() as sock:  # bound, then released: nothing listens there
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_locked_sqlite_store_keeps_metrics_and_writes_them_when_it_answers(tmp_path, caplog):
    from mlflow.tracking import MlflowClient

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    run_id = RunLogger.start(uri, "faults", "locked").run_id
    logger = RunLogger(uri, run_id, retry_s=1.0)
    logger.log_metrics({"loss/total": 3.0}, step=1)

    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")  # another process holds the store (a long write, a backup)
    caplog.set_level(logging.WARNING, logger="pcl_ray.tracking")
    try:
        logger.log_metrics({"loss/total": 2.0, "lr": 0.5}, step=2)  # returns: training goes on
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    (warning,) = _warnings(caplog)
    assert uri in warning and "database is locked" in warning and "1 epoch(s) of metrics (step 2) kept" in warning

    logger.log_metrics({"loss/total": 1.0}, step=3)  # the store answers again: kept epoch first
    assert "answers again: the 1 kept epoch(s) of metrics are written" in _warnings(caplog)[-1]
    client = MlflowClient(uri)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss/total")] == [(1, 3.0), (2, 2.0),
                                                                                              (3, 1.0)]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [2]
    logger.end()
    assert client.get_run(run_id).info.status == "FINISHED"


def test_unreachable_server_warns_once_counts_kept_epochs_and_redacts(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once instead of MLflow's own backoff
    uri = f"http://alice:s3cret@127.0.0.1:{_closed_port()}"
    logger = RunLogger(uri, "0123456789abcdef", retry_s=0.5)
    caplog.set_level(logging.WARNING, logger="pcl_ray.tracking")
    t0 = time.monotonic()
    for epoch in (1, 2, 3):
        logger.log_metrics({"loss/total": 1.0 / epoch}, step=epoch)
    assert time.monotonic() - t0 < 60  # bounded: the later epochs try once
    (warning,) = _warnings(caplog)  # one line, not one per epoch
    assert "http://alice:***@127.0.0.1" in warning and "1 epoch(s) of metrics (step 1) kept" in warning
    logger.log_metrics({"loss/total": 0.2}, step=4, final=True)  # a worker's last epoch: says what is lost
    assert "4 epoch(s) of metrics (step 1, 2, 3, 4) could not be written" in _warnings(caplog)[-1]
    assert not any("s3cret" in w for w in _warnings(caplog))


def test_end_never_hides_the_error_that_ended_the_run(monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    logger = RunLogger(f"http://127.0.0.1:{_closed_port()}", "0123456789abcdef", retry_s=0.5)
    caplog.set_level(logging.WARNING, logger="pcl_ray.tracking")
    with pytest.raises(ZeroDivisionError):  # the first error is the one the caller sees
        try:
            1 / 0
        finally:
            logger.end("FAILED")
    assert "could not mark MLflow run 0123456789abcdef FAILED" in _warnings(caplog)[-1]
    # with no error on its way, a store that does not answer is an error of its own
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        logger.end("FINISHED")


def test_invalid_metrics_still_raise(tmp_path):
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = RunLogger.start(uri, "faults", "bad")
    with pytest.raises(MlflowException):
        logger.log_metrics({"bad name!\n": 1.0}, step=1)
