"""Attaching to a cluster: where to attach, unreachable addresses, what a multi-node cluster refuses."""

from __future__ import annotations

import socket
import time

import pytest

from pcl_ray.config import ConfigError, load_config
from pcl_ray.distributed import connect
from pcl_ray.storage import Storage
from pcl_ray.tracking import check_tracking, redact


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_attach_address_prefers_config_then_environment(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert connect.attach_address(load_config(None)) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")  # what `ray job submit` gives the job's driver
    assert connect.attach_address(load_config(None)) == "10.0.0.5:6379"
    assert connect.attach_address(load_config(None, ["ray.address=ray://h:10001"])) == "ray://h:10001"
    monkeypatch.setattr(connect, "OWN_ADDRESSES", {"10.0.0.5:6379"})  # exported by this process for its own Ray
    assert connect.attach_address(load_config(None)) is None


def test_unreachable_address_fails_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^ray\.address: no Ray cluster answers at 127\.0\.0\.1:\d+ within 1s"):
        connect.check_reachable(f"127.0.0.1:{_free_port()}", 1.0)
    assert time.monotonic() - start < 10


def test_reachable_address_passes():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        connect.check_reachable(f"ray://127.0.0.1:{server.getsockname()[1]}", 2.0)


@pytest.mark.parametrize("address, message", [("ray://", "expected 'auto'"), ("host:notaport", "bad port")])
def test_malformed_addresses(address, message):
    with pytest.raises(ConfigError, match=f"ray.address: .*{message}"):
        connect.check_reachable(address, 1.0)


def test_auto_without_any_cluster(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    with pytest.raises(ConfigError, match="ray.address: 'auto' found no running Ray cluster"):
        connect.check_reachable("auto", 1.0)


def test_multi_node_refuses_local_storage_and_local_tracking(tmp_path):
    cfg = load_config(None)
    local = Storage.from_uri(tmp_path / "runs")
    shared = Storage.from_uri(f"file://{tmp_path}/shared")
    connect.check_multi_node(cfg, local, "sqlite:////x/mlflow.db", nodes=1)  # one node: anything goes
    with pytest.raises(ConfigError, match=r"^ray\.storage_path: .* cluster has 3 nodes"):
        connect.check_multi_node(cfg, local, "http://10.0.0.1:5000", nodes=3)
    with pytest.raises(ConfigError, match=r"^tracking\.uri: sqlite:////x/mlflow\.db is a store on this machine"):
        connect.check_multi_node(cfg, shared, "sqlite:////x/mlflow.db", nodes=3)
    connect.check_multi_node(cfg, shared, "http://10.0.0.1:5000", nodes=3)


def test_tracking_checks(tmp_path):
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"^tracking\.uri: no MLflow tracking server answers at http://127"):
        check_tracking(f"http://127.0.0.1:{_free_port()}", timeout_s=2)
    assert time.monotonic() - start < 10
    bad = tmp_path / "not.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ConfigError, match="tracking.uri: .* is not a usable sqlite database"):
        check_tracking(f"sqlite:///{bad}")
    with pytest.raises(ConfigError, match="tracking.uri: unsupported scheme"):
        check_tracking("htp://typo:5000")
    check_tracking(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")  # a new store: its folder is made
    assert (tmp_path / "new").is_dir()


def test_redact_hides_passwords_only():
    assert redact("postgresql://user:secret@db:5432/mlflow") == "postgresql://user:***@db:5432/mlflow"
    assert redact("http://10.0.0.1:5000") == "http://10.0.0.1:5000"
    assert redact("https://token:abc@host/x?y=1") == "https://token:***@host/x?y=1"
