"""The local Ray that `train`, `compare` and `tune` start listens on the loopback address only."""

from __future__ import annotations

import ipaddress
import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PROBE = r"""
import json, os, time
import ray
from pcl_ray.config import load_config
from pcl_ray.distributed.trainer import init_ray

init_ray(load_config("pipelines/digits_tiny.yaml"))

@ray.remote
def ping():
    return os.getpid()

worker = ray.get(ping.remote())  # a worker process is up, with its own gRPC server
time.sleep(3)  # the agents come up after ray.init returns
print("PROBE" + json.dumps({"driver": os.getpid(), "worker": worker,
                             "gcs": ray.get_runtime_context().gcs_address}), flush=True)
input()  # the test reads the sockets now, then lets go
ray.shutdown()
"""


def _descendants(root: int) -> set[int]:
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            parent[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p and c not in out]
        out.update(kids)
        frontier.extend(kids)
    return out


def _listening(pids: set[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of ``pids``, from /proc."""
    owner = {}
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = fd.readlink().name if fd.is_symlink() else ""
                if link.startswith("socket:["):
                    owner[int(link[8:-1])] = pid
        except OSError:
            continue
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] != "0A" or int(f[9]) not in owner:  # 0A: LISTEN
                continue
            hex_ip, hex_port = f[1].split(":")
            raw = bytes.fromhex(hex_ip)
            raw = b"".join(struct.pack("<I", w) for w in struct.unpack(f">{len(raw) // 4}I", raw))
            ip = socket.inet_ntop(family, raw)
            name = Path(f"/proc/{owner[int(f[9])]}/comm").read_text().strip()
            found.append((name, ip, int(hex_port, 16)))
    return found


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


@pytest.mark.ray
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc (Linux)")
def test_the_local_ray_listens_on_loopback_only():
    proc = subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("PROBE"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]
        probe = json.loads(line[len("PROBE"):])
        pids = _descendants(probe["driver"])
        assert probe["worker"] in pids  # the worker processes are the driver's descendants
        listening = _listening(pids)
        proc.communicate("\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    names = {name for name, _, _ in listening}
    assert "raylet" in names and "gcs_server" in names, listening
    exposed = [x for x in listening if not _loopback(x[1])]
    assert exposed == [], f"listening beyond the loopback address: {exposed}"
    assert probe["gcs"].startswith("127.0.0.1:")
