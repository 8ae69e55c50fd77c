"""The rehearsal's Ray cluster: a head and worker nodes in their own hosts, jobs, node kills, the socket audit.

The head starts with 0 CPUs (training lands on worker nodes, as with a CPU head and GPU workers on a
cloud) and the sweep's ``train_driver_slot`` resources; its dashboard listens on 127.0.0.1 inside the
head, where ``ray job submit`` runs. Every node's environment carries what an instance profile would
give (S3 credentials, region, the bucket's endpoint).
"""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .netns import Network, Proc, RehearsalError, processes
from .services import CHECKOUT, Services, host_env, probe, start_services, venv_tool, wait_tracking

GCS_PORT = 6379
DASHBOARD = "http://127.0.0.1:8265"  # inside the head
WORKER_CPUS = 2
HEAD_RESOURCES = {"train_driver_slot": 2}
OBJECT_STORE_BYTES = 256 * 1024 * 1024
# faster failure detection than Ray's defaults, so that a killed node is noticed in seconds
FAST_HEALTH = {"RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "5"}
# what the job's working directory upload leaves out (the checkout's .gitignore applies too)
WORKDIR_EXCLUDES = [".git", ".venv", "runs", "mlruns", ".pytest_cache", "outputs"]
# Ray prefixes every line a worker prints with its process id and node address
ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the prefix
WORKER_LINE = re.compile(r"\((?P<actor>[\w.:]+) pid=(?P<pid>\d+), ip=(?P<ip>[\d.]+)\)\s*(?P<text>.*)")


@dataclass
class JobResult:
    submission_id: str
    status: str                 # SUCCEEDED, FAILED, STOPPED, TIMEOUT, ...
    exit_code: int | None       # the entrypoint's exit code when Ray reports it
    message: str
    seconds: float
    log: str

    def tail(self, lines: int = 25) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    @property
    def ok(self) -> bool:
        return self.status == "SUCCEEDED"


class Job:
    """A ``ray job submit`` running in the head; its output (the job's log) is read as it grows."""

    def __init__(self, cluster: "Cluster", submission_id: str, proc: Proc, entrypoint: list[str]):
        self.cluster, self.submission_id, self.proc, self.entrypoint = cluster, submission_id, proc, entrypoint
        self.started = time.monotonic()
        self.result: JobResult | None = None

    def text(self) -> str:
        return ANSI.sub("", self.proc.log_tail(10 ** 8))

    def lines(self) -> list[str]:
        return self.text().splitlines()

    def wait_for(self, pattern: str | re.Pattern, timeout_s: float,
                 accept: Callable[[re.Match], bool] = lambda m: True) -> re.Match | None:
        """The first line matching ``pattern`` (and ``accept``); None when the job ended or time ran out first."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout_s
        while True:
            for line in self.lines():
                m = rx.search(line)
                if m and accept(m):
                    return m
            if not self.proc.alive() or time.monotonic() > deadline:
                return None
            time.sleep(0.25)

    def info(self) -> dict:
        reply = probe(self.cluster.net, "head", "http-json", url=f"{DASHBOARD}/api/jobs/{self.submission_id}")
        return reply.get("body") or {} if reply.get("ok") else {}

    def wait(self, timeout_s: float) -> JobResult:
        """Wait for the job to end (stop it after ``timeout_s``) and collect its status and log."""
        if self.result is not None:
            return self.result
        deadline = self.started + timeout_s
        status = None
        while self.proc.alive() and time.monotonic() < deadline:
            time.sleep(0.5)
        if self.proc.alive():  # timed out: stop the job, then the client
            status = "TIMEOUT"
            probe(self.cluster.net, "head", "http-json", url=f"{DASHBOARD}/api/jobs/{self.submission_id}/stop",
                  method="POST")
            time.sleep(2)
            self.cluster.net.stop_session(self.proc)
        info = {}
        for _ in range(20):  # the status turns terminal shortly after the client returns
            info = self.info()
            if info.get("status") in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(0.5)
        exit_code = info.get("driver_exit_code")
        message = info.get("message") or ""
        if exit_code is None:
            m = re.search(r"exit code (-?\d+)", message)
            exit_code = int(m.group(1)) if m else None
        self.result = JobResult(self.submission_id, status or info.get("status") or "UNKNOWN", exit_code, message,
                                time.monotonic() - self.started, self.text())
        self.cluster.log(f"[rehearsal] job {self.submission_id}: {self.result.status} in {self.result.seconds:.0f}s"
                         + (f" (exit code {exit_code})" if exit_code not in (None, 0) else ""))
        return self.result


@dataclass
class Listener:
    host: str | None   # rehearsal host whose namespace the socket lives in (None: outside them)
    pid: int
    comm: str
    ip: str
    port: int


@dataclass
class Audit:
    processes: int
    outside: list[str] = field(default_factory=list)        # rehearsal processes in no rehearsal namespace
    listeners: list[Listener] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)            # what breaks the rule, in words

    @property
    def ok(self) -> bool:
        return not self.outside and not self.bad

    def summary(self) -> str:
        per_host: dict[str, int] = {}
        for li in self.listeners:
            per_host[li.host or "?"] = per_host.get(li.host or "?", 0) + 1
        hosts = ", ".join(f"{h} {n}" for h, n in sorted(per_host.items()))
        verdict = "all inside the rehearsal's namespaces" if self.ok else "; ".join(self.outside + self.bad)
        return f"{self.processes} processes, {len(self.listeners)} listening sockets ({hosts}): {verdict}"


def _tcp_table(path: Path) -> list[tuple[int, str, int]]:
    """(socket inode, address, port) of every listening TCP socket in one /proc/.../net/tcp{,6} table."""
    family = socket.AF_INET6 if path.name.endswith("6") else socket.AF_INET
    out = []
    try:
        rows = path.read_text().splitlines()[1:]
    except OSError:
        return out
    for line in rows:
        f = line.split()
        if f[3] != "0A":  # LISTEN
            continue
        hex_ip, hex_port = f[1].split(":")
        raw = bytes.fromhex(hex_ip)
        raw = b"".join(struct.pack("<I", w) for w in struct.unpack(f">{len(raw) // 4}I", raw))
        out.append((int(f[9]), socket.inet_ntop(family, raw), int(hex_port, 16)))
    return out


def _inside_host(ip: str, own_ip: str) -> bool:
    """A listening address a host may use: loopback, its own subnet address, or the wildcard (which inside
    a network namespace means that namespace's interfaces only)."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None) or addr
    return mapped.is_loopback or mapped.is_unspecified or addr.is_unspecified or str(mapped) == own_ip


class Cluster:
    """Hosts, services and Ray nodes of one rehearsal. ``with Cluster.up() as c: ...`` tears down at the end."""

    def __init__(self, net: Network, services: Services, workers: tuple[str, ...], log=print):
        self.net, self.services, self.workers, self.log = net, services, workers, log
        self.ray_procs: dict[str, Proc] = {}

    # ------------------------------------------------------------------ bring up
    @classmethod
    def up(cls, workers: int = 2, log=print, log_dir: Path | None = None, timeout_s: float = 240.0) -> "Cluster":
        names = ("head", *(f"worker{i + 1}" for i in range(workers)))
        net = Network.create(names, log_dir=log_dir)
        try:
            t0 = time.monotonic()
            for name in names:
                net.boot(name)
            log(f"[rehearsal] hosts {', '.join(f'{h.name} {h.ip}' for h in net.hosts.values())} "
                f"(namespaces pclr-{net.tag}-*, logs in {net.log_dir})")
            services = start_services(net, log=log, timeout_s=timeout_s)
            cluster = cls(net, services, names[1:], log=log)
            cluster.start_ray("head")
            cluster.wait_nodes(1, timeout_s)
            for w in cluster.workers:
                cluster.start_ray(w)
            wait_tracking(net, services, timeout_s, log=log)
            cluster.wait_nodes(len(names), timeout_s)
            log(f"[rehearsal] Ray cluster up: {len(names)} nodes in {time.monotonic() - t0:.0f}s")
            return cluster
        except BaseException:
            net.teardown()
            raise

    def start_ray(self, name: str) -> Proc:
        """Start the Ray node of host ``name`` (booting a fresh host first when it is down)."""
        host = self.net.hosts[name]
        if host.anchor is None or not host.anchor.alive():
            self.net.boot(name)
        head_ip = self.net.hosts["head"].ip
        common = [f"--node-ip-address={host.ip}", f"--object-store-memory={OBJECT_STORE_BYTES}",
                  "--disable-usage-stats", "--block"]
        if name == "head":
            argv = [venv_tool("ray"), "start", "--head", f"--port={GCS_PORT}", "--dashboard-host=127.0.0.1",
                    "--num-cpus=0", f"--resources={json.dumps(HEAD_RESOURCES)}", *common]
        else:
            argv = [venv_tool("ray"), "start", f"--address={head_ip}:{GCS_PORT}", f"--num-cpus={WORKER_CPUS}",
                    *common]
        proc = self.net.spawn(f"ray-{name}-{host.generation}", name, argv, host_env(self.net, name, FAST_HEALTH),
                              cwd=str(CHECKOUT))
        self.ray_procs[name] = proc
        return proc

    # ------------------------------------------------------------------ state
    def state(self, kind: str, **filters: str) -> list[dict]:
        """Ray's State API (``nodes``, ``actors``, ...) through the dashboard in the head."""
        query = "limit=1000&detail=true"
        for k, v in filters.items():
            query += f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}"
        reply = probe(self.net, "head", "http-json", url=f"{DASHBOARD}/api/v0/{kind}?{query}")
        if not reply.get("ok"):
            raise RehearsalError(f"State API {kind}: {reply.get('error')}")
        body = reply["body"]
        return body["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        try:
            return [n for n in self.state("nodes") if n.get("state") == "ALIVE"]
        except RehearsalError:
            return []  # the dashboard is not up yet

    def wait_nodes(self, count: int, timeout_s: float = 180.0, exclude_ips: set[str] = frozenset()) -> list[dict]:
        """Wait until exactly ``count`` nodes are alive (none of them at ``exclude_ips``)."""
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = self.alive_nodes()
            if len(nodes) == count and not {n["node_ip"] for n in nodes} & set(exclude_ips):
                return nodes
            for name, proc in self.ray_procs.items():
                if not proc.alive() and self.net.hosts[name].anchor is not None:
                    raise RehearsalError(f"the Ray node of {name} exited:\n{proc.log_tail()}")
            if time.monotonic() > deadline:
                raise RehearsalError(f"{len(nodes)} Ray nodes alive after {timeout_s:g}s, expected {count}: "
                                     f"{[(n.get('node_ip'), n.get('state')) for n in nodes]}")
            time.sleep(1.0)

    def host_of_ip(self, ip: str) -> str | None:
        return next((h.name for h in self.net.hosts.values() if h.ip == ip), None)

    def node_of(self, pid: int | None = None, actor: str | None = None, namespace: str | None = None) -> str | None:
        """The host that runs process ``pid``, or the (alive) actor named ``actor``."""
        if pid is not None:
            return self.net.host_of_pid(pid)
        where = self.actor_location(actor, namespace)
        return where["host"] if where else None

    def actor_location(self, name: str, namespace: str | None = None) -> dict | None:
        """``{"host", "pid", "state", "node_id", "restarts"}`` of the live actor called ``name`` (else None)."""
        actors = [a for a in self.state("actors", name=name)
                  if (namespace is None or a.get("ray_namespace") == namespace) and a.get("state") == "ALIVE"]
        if not actors:
            return None
        a = actors[-1]
        nodes = {n["node_id"]: n["node_ip"] for n in self.state("nodes")}
        return {"host": self.host_of_ip(nodes.get(a.get("node_id"), "")), "pid": a.get("pid"), "state": a["state"],
                "node_id": a.get("node_id"), "restarts": a.get("num_restarts")}

    # ------------------------------------------------------------------ faults
    def kill_node(self, name: str) -> int:
        """Take the host down at once (SIGKILL to every session started in it): a node lost with its disk."""
        if name == "head":
            raise RehearsalError("the rehearsal never kills the head (it holds the GCS, bucket and tracking server)")
        killed = self.net.stop_host(name, grace_s=0)
        self.ray_procs.pop(name, None)
        self.log(f"[rehearsal] killed node {name} ({len(killed)} processes)")
        return len(killed)

    def restart_node(self, name: str, timeout_s: float = 180.0) -> None:
        """A replacement for a killed host: fresh disk, same address, a new Ray node joins."""
        self.start_ray(name)
        self.wait_nodes(1 + len(self.workers), timeout_s)
        self.log(f"[rehearsal] node {name} re-joined")

    def ensure_all_nodes(self, timeout_s: float = 180.0) -> None:
        for w in self.workers:
            if w not in self.ray_procs or not self.ray_procs[w].alive():
                self.start_ray(w)
        self.wait_nodes(1 + len(self.workers), timeout_s)

    # ------------------------------------------------------------------ jobs
    def submit(self, entrypoint: list[str], env_vars: dict[str, str] | None = None, name: str = "job") -> Job:
        """``ray job submit`` of ``entrypoint`` with the checkout as working directory, from inside the head."""
        sid = f"{name}-{secrets.token_hex(3)}"
        runtime_env = {"excludes": WORKDIR_EXCLUDES, "env_vars": dict(env_vars or {})}
        argv = [venv_tool("ray"), "job", "submit", "--address", DASHBOARD, "--submission-id", sid,
                "--runtime-env-json", json.dumps(runtime_env), "--working-dir", str(CHECKOUT), "--", *entrypoint]
        proc = self.net.spawn(f"job-{sid}", "head", argv, host_env(self.net, "head"), cwd=str(CHECKOUT))
        self.log(f"[rehearsal] job {sid}: {' '.join(entrypoint)}")
        return Job(self, sid, proc, entrypoint)

    def run_job(self, entrypoint: list[str], timeout_s: float, **kwargs) -> JobResult:
        return self.submit(entrypoint, **kwargs).wait(timeout_s)

    # ------------------------------------------------------------------ inspection
    def bucket_keys(self, prefix: str = "") -> list[dict]:
        reply = probe(self.net, "head", "list-bucket", endpoint=self.services.s3_endpoint,
                      bucket=self.services.bucket, prefix=prefix)
        if not reply.get("ok"):
            raise RehearsalError(f"listing s3://{self.services.bucket}/{prefix}: {reply.get('error')}")
        return reply["keys"]

    def mlflow_runs(self, experiment: str, metric: str = "loss/total") -> list[dict]:
        reply = probe(self.net, "head", "mlflow-runs", uri=self.services.tracking_uri, experiment=experiment,
                      metric=metric, timeout=180)
        if not reply.get("ok"):
            raise RehearsalError(f"MLflow runs of {experiment}: {reply.get('error')}")
        return reply["runs"]

    def session_dirs(self) -> dict[str, list[str]]:
        """Ray session folders each host sees under its own /tmp/ray (each host has its own disk)."""
        out = {}
        for name, host in self.net.hosts.items():
            if host.anchor is None or not host.anchor.alive():
                continue
            done = self.net.run_in(name, ["sh", "-c", "ls -d /tmp/ray/session_2* 2>/dev/null || true"],
                                   host_env(self.net, name), timeout=30)
            out[name] = done.stdout.split()
        return out

    def audit(self) -> Audit:
        """Check that every process of the rehearsal lives in one of its network namespaces and list what
        each listens on: only loopback, the host's own subnet address, or the wildcard inside its namespace."""
        table = processes()
        members = self.net.members()
        audit = Audit(processes=len(members))
        tables: dict[int, list[tuple[int, str, int]]] = {}
        for pid in sorted(members):
            info = table.get(pid)
            if info is None:
                continue
            host = self.net.host_of_pid(pid)
            if host is None:
                audit.outside.append(f"pid {pid} ({info.comm}) is outside the rehearsal's namespaces")
                continue
            if info.netns not in tables:
                tables[info.netns] = (_tcp_table(Path(f"/proc/{pid}/net/tcp"))
                                      + _tcp_table(Path(f"/proc/{pid}/net/tcp6")))
            owned = set()
            try:
                for fd in Path(f"/proc/{pid}/fd").iterdir():
                    try:
                        link = fd.readlink().name
                    except OSError:
                        continue
                    if link.startswith("socket:["):
                        owned.add(int(link[8:-1]))
            except OSError:
                continue
            own_ip = self.net.hosts[host].ip
            for inode, ip, port in tables[info.netns]:
                if inode in owned:
                    audit.listeners.append(Listener(host, pid, info.comm, ip, port))
                    if not _inside_host(ip, own_ip):
                        audit.bad.append(f"{info.comm} (pid {pid}, {host}) listens on {ip}:{port}")
        # the machine's own namespace must hold no socket of the rehearsal
        own_ns = {inode for inode, _, _ in _tcp_table(Path("/proc/self/net/tcp")) + _tcp_table(Path("/proc/self/net/tcp6"))}
        for pid in members:
            try:
                fds = {int(fd.readlink().name[8:-1]) for fd in Path(f"/proc/{pid}/fd").iterdir()
                       if fd.readlink().name.startswith("socket:[")}
            except OSError:
                continue
            if fds & own_ns:
                audit.bad.append(f"pid {pid} holds a listening socket in the machine's own namespace")
        return audit

    # ------------------------------------------------------------------ teardown
    def down(self) -> None:
        self.net.teardown()

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.down()
