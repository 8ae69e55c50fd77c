"""Shared fixtures. One small local Ray per test session, started only by tests that ask for it."""

from __future__ import annotations

import os

import pytest

for _k, _v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_DEDUP_LOGS": "0",
    # S3 tests talk to a moto server on 127.0.0.1 only: dummy credentials for every process (Ray workers
    # inherit them from the local Ray started in this process), and no instance-metadata lookups.
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from pcl_ray.distributed.loopback import loopback_only

    if not ray.is_initialized():
        loopback_only()  # as the product's own local Ray: every port on 127.0.0.1
        ray.init(num_cpus=2, object_store_memory=384 * 1024 * 1024, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """An S3 API server (moto) on 127.0.0.1 for the session; yields ``(endpoint_url, make_bucket)``.

    Dummy AWS credentials are exported for this process (and so for the Ray workers it starts later).
    The server runs in its own session and is stopped by its process group id.
    """
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    boto3 = pytest.importorskip("boto3")
    moto_server = Path(sys.executable).parent / "moto_server"
    if not moto_server.exists():
        pytest.skip("moto[server] is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    proc = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            break
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("moto_server did not start")
            time.sleep(0.2)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION"):
        os.environ.setdefault(k, env[k])
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")

    def make_bucket(name: str) -> str:
        client.create_bucket(Bucket=name)
        return name

    try:
        yield endpoint, make_bucket
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=10)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


def pytest_collection_modifyitems(session, config, items):
    """The bad-input tests run first: they check that a refused command never starts Ray in this process,
    which only holds before the first test that starts the session's local Ray (``ray_local``)."""
    first = [item for item in items if item.path.name == "test_bad_input.py"]
    items[:] = first + [item for item in items if item.path.name != "test_bad_input.py"]
