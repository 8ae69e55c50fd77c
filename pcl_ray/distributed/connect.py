"""Attaching to a Ray cluster, and the checks that refuse a run a cluster cannot carry, before anything starts.

- Where to attach: ``ray.address`` when set; else ``RAY_ADDRESS`` from the environment (``ray job submit``
  sets it for the job's driver); else a new local Ray.
- An address that does not answer is an error within ``ray.connect_timeout_s``, not a hang in Ray's
  own reconnect loop.
- On a cluster of more than one node, a local ``ray.storage_path`` and a sqlite/file ``tracking.uri`` are
  refused: the other nodes cannot see this machine's disk.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from urllib.parse import urlparse

from ..config import ConfigError, ExperimentConfig

# RAY_ADDRESS values this process exported itself for its own local Ray (tune's pinned GCS): not a cluster.
OWN_ADDRESSES: set[str] = set()


def attach_address(cfg: ExperimentConfig) -> str | None:
    """The address to attach to, or None for a new local Ray."""
    if cfg.ray.address:
        return cfg.ray.address
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env and env not in OWN_ADDRESSES:
        return env
    return None


def _current_cluster_file() -> Path:
    import tempfile

    return Path(os.environ.get("RAY_TMPDIR", tempfile.gettempdir())) / "ray" / "ray_current_cluster"


def _host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` to probe for ``address``; None when Ray must find the cluster itself."""
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS", "").strip()
        if env and env != "auto":
            return _host_port(env)
        f = _current_cluster_file()
        text = f.read_text().strip() if f.is_file() else ""
        if not text:
            raise ConfigError("ray.address: 'auto' found no running Ray cluster on this machine "
                              "(no RAY_ADDRESS and no `ray start` record); start one or give HOST:PORT")
        return _host_port(text)
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if not parsed.hostname:
        raise ConfigError(f"ray.address: expected 'auto', HOST:PORT or ray://HOST:PORT, got {address!r}")
    try:
        port = parsed.port
    except ValueError:
        raise ConfigError(f"ray.address: bad port in {address!r}") from None
    default = 10001 if parsed.scheme == "ray" else (8265 if parsed.scheme in ("http", "https") else 6379)
    return parsed.hostname, port or default


def check_reachable(address: str, timeout_s: float) -> None:
    """Open a TCP connection to the cluster's address; ConfigError naming ``ray.address`` if none answers."""
    target = _host_port(address)
    if target is None:
        return
    host, port = target
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, max(0.5, deadline - time.monotonic()))):
                return
        except OSError as exc:
            last = exc
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    reason = getattr(last, "strerror", None) or str(last) or "timed out"
    raise ConfigError(f"ray.address: no Ray cluster answers at {host}:{port} within {timeout_s:g}s ({reason}); "
                      "check the address and that the head node is up (ray.connect_timeout_s sets the wait)")


def alive_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n.get("Alive"))


def is_local_tracking(uri: str) -> bool:
    scheme = urlparse(uri).scheme.lower() if "://" in uri or uri.startswith(("sqlite:", "file:")) else ""
    return scheme in ("", "file", "sqlite")


def check_multi_node(cfg: ExperimentConfig, storage, tracking_uri: str, nodes: int) -> None:
    """Refuse storage and tracking that other nodes cannot reach on a cluster of ``nodes`` nodes."""
    if nodes <= 1:
        return
    if storage.is_local:
        raise ConfigError(
            f"ray.storage_path: {storage.uri} is a folder on this machine, but the cluster has {nodes} nodes and "
            "Train workers on other nodes write checkpoints there; use s3://BUCKET/PREFIX, gs://BUCKET/PREFIX, "
            "or file:///PATH for a file system mounted at the same path on every node")
    if is_local_tracking(tracking_uri):
        from ..tracking import redact

        raise ConfigError(
            f"tracking.uri: {redact(tracking_uri)} is a store on this machine, but the cluster has {nodes} nodes "
            "and Train rank 0 logs from whichever node it runs on; use an MLflow tracking server "
            "(http://HEAD_PRIVATE_IP:5000, see cluster.yaml)")


def check_resources(cfg: ExperimentConfig, gpu: bool, attached: bool) -> None:
    """On a local Ray, a worker group larger than the machine would wait forever: refuse it."""
    import ray

    if attached:  # an autoscaling cluster may grow to fit; Ray Train reports a placement timeout
        return
    total = ray.cluster_resources()
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker + (cfg.ray.actor_cpus if cfg.needs_estep else 0.0)
    if need_cpu > total.get("CPU", 0) + 1e-9:
        raise ConfigError(
            f"ray.num_workers: {cfg.ray.num_workers} workers x ray.cpus_per_worker {cfg.ray.cpus_per_worker:g} "
            f"(+ ray.actor_cpus) = {need_cpu:g} CPUs, but this machine's Ray has {total.get('CPU', 0):g}")
    if gpu and cfg.ray.num_workers > total.get("GPU", 0):
        raise ConfigError(f"ray.num_workers: {cfg.ray.num_workers} GPU workers, but this machine has "
                          f"{total.get('GPU', 0):g} GPUs (ray.use_gpu=false trains on the CPU)")
