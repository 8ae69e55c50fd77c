"""SIGTERM during training: exit 130, the MLflow run is closed as KILLED (not left RUNNING), and
``--resume`` continues it from its checkpoint into the same MLflow run."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_sigterm_marks_run_killed_and_resume_finishes_it(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cmd = [sys.executable, str(ROOT / "run.py"), "train", str(ROOT / "pipelines" / "digits_tiny.yaml"),
           "--set", "train.epochs=4", "--set", f"tracking.uri={uri}", "--set", f"ray.storage_path={tmp_path / 'runs'}",
           "--set", "eval.enabled=false", "--set", "ray.run_name=sigterm-run"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:  # inside epoch 2: epoch 1's checkpoint is persisted and registered by then
        if "epoch 2/" in line and " step " in line:
            break
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=180) == 130, rest[-2000:]
    assert "--resume sigterm-run" in rest
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert [r.info.status for r in runs] == ["KILLED"]

    done = subprocess.run(cmd[:-2] + ["--resume", "sigterm-run"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    assert "resumed from checkpoint after epoch" in done.stdout + done.stderr
    run = client.get_run(runs[0].info.run_id)
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/total")]
    assert sorted(set(steps)) == [1, 2, 3, 4]


def test_sigkill_of_the_driver_then_resume_continues_from_the_checkpoint(tmp_path):
    """A driver killed outright (OOM killer, lost head shell) leaves its MLflow run RUNNING; ``--resume``
    continues it from the last checkpoint into the same MLflow run."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cmd = [sys.executable, str(ROOT / "run.py"), "train", str(ROOT / "pipelines" / "digits_tiny.yaml"),
           "--set", "train.epochs=3", "--set", f"tracking.uri={uri}", "--set", f"ray.storage_path={tmp_path / 'runs'}",
           "--set", "eval.enabled=false"]
    proc = subprocess.Popen(cmd + ["--set", "ray.run_name=sigkill-run"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    for line in proc.stdout:  # inside epoch 2: epoch 1's checkpoint is persisted and registered by then
        if "epoch 2/" in line and " step " in line:
            break
    import os

    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started, as a lost machine would
    proc.wait(timeout=60)
    done = subprocess.run(cmd + ["--resume", "sigkill-run"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    assert "resumed from checkpoint after epoch" in done.stdout + done.stderr
    client = MlflowClient(uri)
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(runs[0].info.run_id, "loss/total")}) == [1, 2, 3]
