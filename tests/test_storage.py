"""The storage layer: local folders, shared mounts and an S3 API server behave alike; writes are never partial."""

from __future__ import annotations

import os

import pytest

from pcl_ray.config import ConfigError
from pcl_ray.storage import Storage


def _roundtrip(storage: Storage) -> None:
    storage.write_json("a/b.json", {"x": 1})
    storage.write_bytes("a/c/d.bin", b"\x00\x01")
    assert storage.read_json("a/b.json") == {"x": 1}
    assert storage.read_bytes("a/c/d.bin") == b"\x00\x01"
    assert storage.is_file("a/b.json") and not storage.is_dir("a/b.json")
    assert storage.is_dir("a") and storage.is_dir("a/c")
    assert not storage.exists("a/nothing")
    listing = storage.list("a")
    assert [(name, is_dir) for name, is_dir, _ in listing] == [("b.json", False), ("c", True)]
    assert storage.list("no/such/folder") == []
    storage.delete("a/c")
    assert not storage.exists("a/c/d.bin")


def test_local_folder_roundtrip_and_paths(tmp_path):
    storage = Storage.from_uri(tmp_path / "runs")
    assert storage.kind == "local" and storage.is_local and storage.on_local_disk
    assert (tmp_path / "runs").is_dir()
    _roundtrip(storage)
    assert storage.uri_of("r1", "final_state.pt") == f"{tmp_path}/runs/r1/final_state.pt"
    assert storage.local_path("r1") == tmp_path / "runs" / "r1"
    assert storage.ray_kwargs() == {"storage_path": str(tmp_path / "runs")}


def test_file_uri_is_a_shared_mount(tmp_path):
    storage = Storage.from_uri(f"file://{tmp_path}/shared")
    assert storage.kind == "shared" and not storage.is_local and storage.on_local_disk
    assert storage.uri == (tmp_path / "shared").as_uri()
    _roundtrip(storage)


def test_local_writes_leave_no_partial_file(tmp_path, monkeypatch):
    storage = Storage.from_uri(tmp_path)
    storage.write_text("meta.json", "old")

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        storage.write_text("meta.json", "new and longer")
    monkeypatch.undo()
    assert storage.read_text("meta.json") == "old"  # the reader sees the old file whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["meta.json"]  # and no temporary left behind


def test_download_and_upload(tmp_path):
    storage = Storage.from_uri(tmp_path / "root")
    src = tmp_path / "state.pt"
    src.write_bytes(b"x" * 1000)
    storage.upload(src, "run/final_state.pt")
    out = storage.download("run/final_state.pt", tmp_path / "copy" / "state.pt")
    assert out.read_bytes() == b"x" * 1000
    folder = tmp_path / "plots"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(b"a")
    (folder / "sub" / "b.png").write_bytes(b"b")
    storage.upload_dir(folder, "cmp/plots")
    assert storage.read_bytes("cmp/plots/sub/b.png") == b"b"


@pytest.mark.parametrize("value, message", [
    ("ftp://host/x", "unsupported scheme 'ftp'"),
    ("s3:///prefix", "no bucket"),
    ("hdfs://nn/x", "unsupported scheme 'hdfs'"),
])
def test_bad_storage_paths_name_the_key(value, message):
    with pytest.raises(ConfigError, match="ray.storage_path") as err:
        Storage.from_uri(value)
    assert message in str(err.value)


def test_bad_endpoint_names_its_key():
    with pytest.raises(ConfigError, match="ray.storage_endpoint"):
        Storage.from_uri("s3://bucket/x", "http://")


def test_s3_roundtrip_and_ray_arguments(s3_server):
    endpoint, make_bucket = s3_server
    bucket = make_bucket("storage-roundtrip")
    storage = Storage.from_uri(f"s3://{bucket}/runs/", endpoint)
    assert storage.kind == "remote" and not storage.on_local_disk
    assert storage.uri == f"s3://{bucket}/runs" and storage.root == f"{bucket}/runs"
    storage.check_writable()
    _roundtrip(storage)
    kwargs = storage.ray_kwargs()
    assert kwargs["storage_path"] == f"{bucket}/runs" and kwargs["storage_filesystem"] is storage.fs
    with pytest.raises(ValueError):
        storage.local_path("x")


def test_s3_endpoint_from_the_environment(s3_server, monkeypatch):
    endpoint, make_bucket = s3_server
    bucket = make_bucket("storage-env-endpoint")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    Storage.from_uri(f"s3://{bucket}").write_text("x.txt", "hi")
    assert Storage.from_uri(f"s3://{bucket}", endpoint).read_text("x.txt") == "hi"


def test_missing_bucket_and_dead_endpoint_are_one_line_errors(s3_server):
    endpoint, _ = s3_server
    with pytest.raises(ConfigError) as err:
        Storage.from_uri("s3://no-such-bucket-here/runs", endpoint).check_writable()
    text = str(err.value)
    assert text.startswith("ray.storage_path: cannot write to s3://no-such-bucket-here/runs") and "\n" not in text
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with pytest.raises(ConfigError, match="ray.storage_path: cannot write"):
        Storage.from_uri("s3://any-bucket/runs", dead).check_writable()
