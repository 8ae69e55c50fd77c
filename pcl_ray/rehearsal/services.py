"""The head's services: an S3 API server (moto) with the rehearsal's bucket, and an MLflow tracking server
whose artifacts go to that bucket. Both listen on the head's subnet address only."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .netns import NODE_DIR, Network, Proc, RehearsalError

VENV_BIN = Path(sys.executable).parent  # the venv this runs from (CI runs from a clean clone elsewhere)
CHECKOUT = Path(__file__).resolve().parents[2]
S3_PORT = 9000
MLFLOW_PORT = 5000
BUCKET = "pcl-rehearsal"

# What an instance profile and a cloud image give every node (the credentials are the S3 server's dummies).
AWS_ENV = {"AWS_ACCESS_KEY_ID": "rehearsal", "AWS_SECRET_ACCESS_KEY": "rehearsal", "AWS_DEFAULT_REGION": "us-east-1"}
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0"}


def venv_tool(name: str) -> str:
    path = VENV_BIN / name
    if not path.exists():
        raise RehearsalError(f"{path} is missing: install the project with its dev extra (`make setup`)")
    return str(path)


def host_env(net: Network, host: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The whole environment of a process on ``host``: the venv first on PATH, a home on the host's own disk,
    the node credentials and the S3 endpoint on the head, Ray kept quiet."""
    head_ip = net.hosts["head"].ip
    env = {
        "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": f"{NODE_DIR}/home",
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        "PYTHONUNBUFFERED": "1",
        "AWS_ENDPOINT_URL": f"http://{head_ip}:{S3_PORT}",
        **AWS_ENV,
        **QUIET_ENV,
        # the cluster is reachable only inside the rehearsal's namespaces; no token file from a shared home
        "RAY_AUTH_MODE": "disabled",
        "RAY_DEDUP_LOGS": "0",  # every rank's lines reach the job log, with their pid and node address
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
        # The hosts share the machine's process table, so Ray's address auto-detection (Train's placement-group
        # cleaner uses it) would list every other Ray of the machine; on a cloud node it sees only its own.
        "RAY_ADDRESS": f"{head_ip}:6379",
    }
    for key in ("PCL_RAY_FMNIST_DIR", "PCL_RAY_DATA_DIR"):
        if key in os.environ:
            env[key] = os.environ[key]
    env.update(extra or {})
    return env


def probe(net: Network, host: str, command: str, timeout: float = 120.0, **args) -> dict:
    """Run :mod:`pcl_ray.rehearsal.probe` inside ``host``; returns its JSON answer."""
    done = net.run_in(host, [venv_tool("python"), "-m", "pcl_ray.rehearsal.probe", command, json.dumps(args)],
                      host_env(net, host, {"PYTHONPATH": str(CHECKOUT)}), timeout=timeout, cwd=str(CHECKOUT))
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RehearsalError(f"probe {command} in {host} failed ({done.returncode}): {done.stderr[-1500:]}")
    return json.loads(lines[-1])


@dataclass
class Services:
    object_store: Proc
    tracking: Proc
    s3_endpoint: str
    tracking_uri: str
    bucket: str

    @property
    def storage_uri(self) -> str:
        return f"s3://{self.bucket}/runs"


def start_services(net: Network, bucket: str = BUCKET, timeout_s: float = 120.0, log=print) -> Services:
    """Start the object store and the tracking server in the head and create the bucket.

    Returns once the object store answers and the bucket exists; :func:`wait_tracking` waits for the
    tracking server (it takes a while to start, so the Ray nodes start meanwhile).
    """
    ip = net.hosts["head"].ip
    endpoint = f"http://{ip}:{S3_PORT}"
    s3 = net.spawn("moto-s3", "head", [venv_tool("moto_server"), "-H", ip, "-p", str(S3_PORT)],
                   host_env(net, "head"), cwd=NODE_DIR)
    uri = f"http://{ip}:{MLFLOW_PORT}"
    mlflow = net.spawn(
        "mlflow-server", "head",
        [venv_tool("mlflow"), "server", "--host", ip, "--port", str(MLFLOW_PORT), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{NODE_DIR}/mlflow.db",  # the head's own disk
         "--artifacts-destination", f"s3://{bucket}/mlflow"],
        host_env(net, "head", {"MLFLOW_S3_ENDPOINT_URL": endpoint}), cwd=NODE_DIR)
    ready = probe(net, "head", "wait-http", url=f"{endpoint}/", timeout_s=timeout_s, timeout=timeout_s + 30)
    if not ready["ok"]:
        raise RehearsalError(f"S3 server: {ready['error']}\n{s3.log_tail()}")
    made = probe(net, "head", "make-bucket", endpoint=endpoint, bucket=bucket)
    if not made["ok"]:
        raise RehearsalError(f"S3 bucket {bucket}: {made['error']}")
    log(f"[rehearsal] S3 server {endpoint} up in {ready['seconds']:.1f}s, bucket {bucket}")
    return Services(s3, mlflow, endpoint, uri, bucket)


def wait_tracking(net: Network, services: Services, timeout_s: float = 120.0, log=print) -> None:
    ready = probe(net, "head", "wait-http", url=f"{services.tracking_uri}/health", timeout_s=timeout_s,
                  timeout=timeout_s + 30)
    if not ready["ok"]:
        raise RehearsalError(f"MLflow server: {ready['error']}\n{services.tracking.log_tail()}")
    log(f"[rehearsal] MLflow server {services.tracking_uri} up (artifacts in s3://{services.bucket}/mlflow)")
