"""SIGTERM during training: exit 130, the MLflow run is closed as KILLED (not left RUNNING)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_sigterm_marks_run_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), "train", str(ROOT / "pipelines" / "digits_tiny.yaml"),
         "--set", "train.epochs=6", "--set", f"tracking.uri={uri}", "--set", f"ray.storage_path={tmp_path / 'runs'}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "epoch 1/6 done" in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=180) == 130, rest[-2000:]
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.status for r in runs] == ["KILLED"]
