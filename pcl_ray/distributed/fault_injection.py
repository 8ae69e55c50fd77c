"""Test-only fault injection for the Train worker loop (used by tests/distributed/test_faults_worker.py).

A file named :data:`KILL_FILE` in the run's folder of the storage (``<ray.storage_path>/<run name>/``),
holding ``EPOCH:STEP:RANK`` (0-based epoch and step), makes that rank's worker process exit with status 1
right before that step, once: the file is renamed to ``KILL_FILE + ".fired"`` first, so the worker group
Ray Train starts again trains on. Before exiting it waits until Ray Train has registered every checkpoint
reported so far (a crash right after a report may otherwise lose that checkpoint, and the retry would
resume from an earlier one: fine for a run, but a test wants to know where the run resumes). Without the
file (every real run) nothing happens; the file is read once per worker start, never per step. Only a run
folder on the local disk is looked at.
"""

from __future__ import annotations

import os
from pathlib import Path

KILL_FILE = ".pcl_ray_test_kill_at"


def injected_kill() -> tuple[tuple[int, int, int], Path] | None:
    """``((epoch, step, rank), file)`` when the run's folder holds a kill request, else None."""
    try:
        import ray.train

        storage = ray.train.get_context().get_storage()
        if storage.storage_filesystem.type_name != "local":
            return None
        path = Path(storage.experiment_fs_path) / KILL_FILE
        if not path.is_file():
            return None
        epoch, step, rank = (int(part) for part in path.read_text().strip().split(":"))
    except Exception:  # no Train context, another storage, an unreadable request: no injection
        return None
    return (epoch, step, rank), path


def kill_if_due(point: tuple[tuple[int, int, int], Path], epoch: int, step: int, rank: int) -> None:
    """Exit this process (status 1, no cleanup) when ``(epoch, step, rank)`` is the requested point."""
    where, path = point
    if where != (epoch, step, rank):
        return
    try:
        path.rename(path.with_name(path.name + ".fired"))
    except OSError:  # fired already (by an earlier attempt): train on
        return
    try:  # let Ray Train register the checkpoints reported so far, so that the test knows where it resumes
        import ray.train

        ray.train.get_all_reported_checkpoints(timeout_s=120)
    except Exception:
        pass
    os._exit(1)
