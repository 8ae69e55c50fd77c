"""The local Ray that `train`, `compare` and `tune` start, and its Train workers' torch.distributed
process group (rendezvous store, gloo), listen on the loopback address only."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, os, sys, tempfile, threading, time
from pathlib import Path
import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from pcl_ray.config import load_config
from pcl_ray.distributed.loopback import LoopbackTorchConfig
from pcl_ray.distributed.trainer import init_ray

init_ray(load_config("pipelines/digits_tiny.yaml"))
tmp = Path(tempfile.mkdtemp())

def loop(config):
    import torch, torch.distributed as dist
    t = torch.ones(1)
    dist.all_reduce(t)  # the process group works
    rank = dist.get_rank()
    (Path(config["tmp"]) / f"rank{rank}").write_text(json.dumps({"pid": os.getpid(), "sum": float(t)}))
    while not (Path(config["tmp"]) / "release").exists():  # stay up while the test reads the sockets
        time.sleep(0.2)

trainer = TorchTrainer(loop, train_loop_config={"tmp": str(tmp)}, torch_config=LoopbackTorchConfig(),
                       scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                       run_config=RunConfig(name="probe", storage_path=str(tmp / "runs")))
fit = threading.Thread(target=trainer.fit)
fit.start()
while not all((tmp / f"rank{r}").exists() for r in (0, 1)):
    time.sleep(0.2)
    assert fit.is_alive(), "training ended before both ranks came up"
ranks = [json.loads((tmp / f"rank{r}").read_text()) for r in (0, 1)]
time.sleep(1)  # the agents come up after ray.init returns
print("PROBE" + json.dumps({"driver": os.getpid(), "ranks": ranks,
                             "gcs": ray.get_runtime_context().gcs_address}), flush=True)
input()  # the test reads the sockets now, then lets go
(tmp / "release").write_text("")
fit.join()
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


def _listening(pids: set[int]) -> list[tuple[int, str, str, int]]:
    """(pid, process name, address, port) of every listening TCP socket of ``pids``, from /proc."""
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
            pid = owner[int(f[9])]
            found.append((pid, Path(f"/proc/{pid}/comm").read_text().strip(), ip, int(hex_port, 16)))
    return found


@pytest.mark.ray
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads listening sockets from /proc (Linux)")
def test_the_local_ray_and_its_train_workers_listen_on_loopback_only():
    proc = subprocess.Popen([sys.executable, "-c", PROBE], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("PROBE"):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]
        probe = json.loads(line[len("PROBE"):])
        pids = _descendants(probe["driver"])
        workers = [r["pid"] for r in probe["ranks"]]
        assert set(workers) <= pids  # the Train workers are the driver's descendants
        assert [r["sum"] for r in probe["ranks"]] == [2.0, 2.0]  # all_reduce over the two ranks
        listening = _listening(pids)
        proc.communicate("\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    from pcl_ray.distributed.loopback import is_loopback

    names = {name for _, name, _, _ in listening}
    assert "raylet" in names and "gcs_server" in names, listening
    own = {pid: [x for x in listening if x[0] == pid] for pid in workers}
    assert all(own.values()), own  # each Train worker listens (gRPC, gloo; rank 0 the rendezvous store)
    exposed = [x for x in listening if not is_loopback(x[2])]
    assert exposed == [], f"listening beyond the loopback address: {exposed}"
    assert probe["gcs"].startswith("127.0.0.1:")


def test_loopback_addresses_are_told_apart():
    from pcl_ray.distributed.loopback import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.0.1.1", "::1", "::ffff:127.0.0.1", "localhost"))
    assert not any(is_loopback(h) for h in ("192.0.2.2", "10.0.0.7", "::", "0.0.0.0", "head-node"))
