"""Evaluation as one Ray task, so that on a cluster it runs where the training resources are.

The driver of a cluster run sits on the head node, which has no GPU and is sized for coordination;
embedding a large training split there takes hours and tens of GB. When the run is attached to a
cluster, the end-of-run report (:func:`pcl_ray.evaluation.report.evaluate`) and the ``eval`` verb's
suite (:func:`pcl_ray.evaluation.suite.run_suite`) instead run as a single Ray task that asks for a
training worker's resources: ``ray.cpus_per_worker`` CPUs and one GPU when the run trained on GPUs.
The method state travels through the object store; the task returns the metrics, and the artifacts
either as bytes (small files) or by writing them itself to the run's storage (large files, when the
storage is one that every node reaches).

This is the one module of :mod:`pcl_ray.evaluation` that knows Ray (imported lazily).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ExperimentConfig

__all__ = ["SMALL_ARTIFACT_BYTES", "RemoteSuiteResult", "evaluate_remote", "on_cluster", "run_suite_remote",
           "task_options"]

# Artifacts up to this size come back to the driver as bytes; larger ones are written to the storage by
# the task (when the storage is reachable from every node).
SMALL_ARTIFACT_BYTES = 64 << 20


def on_cluster(cfg: ExperimentConfig) -> bool:
    """True when this process is attached to a Ray cluster: ``ray.address`` or ``RAY_ADDRESS`` says so, or
    Ray is up with more than one alive node."""
    import sys

    from ..distributed.connect import alive_nodes, attach_address

    if attach_address(cfg) is not None:
        return True
    ray = sys.modules.get("ray")  # not imported: not initialised either (and a local eval need not pay for it)
    return ray is not None and ray.is_initialized() and alive_nodes() > 1


def trains_on_gpu(cfg: ExperimentConfig) -> bool:
    """Whether ``cfg``'s training workers get GPUs on the connected cluster (the trainer's own rule)."""
    from ..distributed.trainer import use_gpu

    return use_gpu(cfg)


def task_options(cfg: ExperimentConfig, gpu: bool) -> dict[str, Any]:
    """The evaluation task's resources: one training worker's."""
    return {"num_cpus": cfg.ray.cpus_per_worker, "num_gpus": 1 if gpu else 0}


def _connect(cfg: ExperimentConfig) -> None:
    import ray

    if not ray.is_initialized():
        from ..distributed.trainer import init_ray

        init_ray(cfg)


def _where() -> dict[str, Any]:
    """Where the task ran (returned to the driver for its log line and for tests)."""
    import socket

    import ray

    return {"node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(), "pid": os.getpid(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def _task_log(line: str) -> None:
    print(line, flush=True)  # the task's stdout reaches the driver's console through Ray's log forwarding


def _threads(num_cpus: float) -> None:
    torch.set_num_threads(max(1, int(num_cpus)))  # Ray starts workers with one thread


def _report_task(cfg: ExperimentConfig, method_state: Mapping[str, torch.Tensor]) -> tuple[dict, dict]:
    from .report import evaluate_here

    _threads(cfg.ray.cpus_per_worker)
    return evaluate_here(cfg, dict(method_state), log=_task_log), _where()


def _run_remote(fn, cfg: ExperimentConfig, method_state: Mapping[str, torch.Tensor], gpu: bool | None,
                log: Callable[[str], None], *args) -> tuple[Any, dict]:
    import ray

    _connect(cfg)
    if gpu is None:
        gpu = trains_on_gpu(cfg)
    options = task_options(cfg, gpu)
    state_ref = ray.put(dict(method_state))  # once into the object store; the task reads it from there
    log(f"[pcl-ray] evaluating as a Ray task ({options['num_cpus']:g} CPUs, {options['num_gpus']} GPU) "
        "on a node with a training worker's resources")
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    # placement_group=None: outside any placement group of the caller (a Tune trial's driver runs inside one
    # that holds only its train_driver_slot, where the task would never fit)
    task = ray.remote(**options, max_retries=1)(fn).options(
        name=f"pcl_ray.{fn.__name__.strip('_')}",
        scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None))
    result, where = ray.get(task.remote(cfg, state_ref, *args))
    log(f"[pcl-ray] evaluation ran on node {where['node_id'][:12]} ({where['host']}, {where['device']})")
    return result, where


def evaluate_remote(cfg: ExperimentConfig, method_state: Mapping[str, torch.Tensor], *, gpu: bool | None = None,
                    log: Callable[[str], None] = print, where: dict | None = None) -> dict[str, dict[str, Any]]:
    """:func:`pcl_ray.evaluation.report.evaluate` as one Ray task; returns the same rows.

    ``gpu``: ask for a GPU (None: when the run's workers train on GPUs). ``where``: filled with the
    task's node id, host, pid and device.
    """
    rows, info = _run_remote(_report_task, cfg, method_state, gpu, log)
    if where is not None:
        where.update(info)
    return rows


@dataclass
class RemoteSuiteResult:
    """What the suite task sends back.

    Attributes:
        metrics: ``eval/<suite>/<metric>`` values.
        files: artifact name -> bytes, for the files that came back through the object store.
        stored: names of the artifacts the task wrote to the destination storage itself.
        where: node id, host, pid and device of the task.
    """

    metrics: dict[str, float]
    files: dict[str, bytes] = field(default_factory=dict)
    stored: list[str] = field(default_factory=list)
    where: dict[str, Any] = field(default_factory=dict)


def _suite_task(cfg: ExperimentConfig, method_state: Mapping[str, torch.Tensor], names: list[str], dest,
                small_bytes: int) -> tuple[RemoteSuiteResult, dict]:
    from .suite import run_suite

    _threads(cfg.ray.cpus_per_worker)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = run_suite(cfg, dict(method_state), names, tmp, log=_task_log)
        result = RemoteSuiteResult(metrics)
        for p in sorted(Path(tmp).iterdir()):
            if not p.is_file():
                continue
            if dest is not None and p.stat().st_size > small_bytes:
                dest.upload(p, p.name)  # whole or not at all (Storage.upload)
                result.stored.append(p.name)
            else:
                result.files[p.name] = p.read_bytes()
    return result, _where()


def run_suite_remote(cfg: ExperimentConfig, method_state: Mapping[str, torch.Tensor], names: Sequence[str], *,
                     dest=None, gpu: bool | None = None, log: Callable[[str], None] = print,
                     small_bytes: int = SMALL_ARTIFACT_BYTES) -> RemoteSuiteResult:
    """:func:`pcl_ray.evaluation.suite.run_suite` as one Ray task.

    Args:
        dest: a :class:`pcl_ray.storage.Storage` the task may write large artifacts to (it must be
            reachable from the task's node: an object store or a shared mount), or None to bring
            every artifact back as bytes.
        gpu: ask for a GPU (None: when the run's workers train on GPUs).
        small_bytes: artifacts up to this size always come back as bytes.
    """
    if dest is not None and getattr(dest, "is_local", False):
        dest = None  # a folder on this machine's disk: the task's node may not see it
    result, where = _run_remote(_suite_task, cfg, method_state, gpu, log, list(names), dest, small_bytes)
    result.where = where
    return result
