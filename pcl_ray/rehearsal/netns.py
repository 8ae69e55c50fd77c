"""Hosts on one machine: network namespaces on a private subnet, a private disk per host, teardown.

Layout for a rehearsal tagged ``T`` (several rehearsals can run at once, each with its own tag)::

    pclr-T-sw      the "switch": a bridge br0, no address; one veth end per host is enslaved to it
    pclr-T-head    eth0 10.77.0.1/24, lo
    pclr-T-worker1 eth0 10.77.0.2/24, lo
    pclr-T-worker2 eth0 10.77.0.3/24, lo

The machine's own namespace gets no interface on the subnet, so nothing in it can reach a rehearsal
host and no rehearsal service can listen on the machine's real interfaces.

Each host incarnation has an *anchor*: a ``sleep`` in the host's network namespace and in a mount
namespace of its own with private tmpfs mounts on ``/tmp``, ``/dev/shm`` and :data:`NODE_DIR`, a UTS
namespace with the host's own name (``pclr-<host>``) and an ``/etc/hosts`` that maps every host's name to
its subnet address. Every
process of the host is started by entering the anchor's namespaces (``nsenter``), each in a session of
its own (``setsid``), so that :func:`kill_sessions` ends exactly what was started. The project checkout
and its venv stay visible (everything outside those mounts is shared), as a shared image would be.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

NODE_DIR = "/var/tmp/pcl-node"  # a host's private "local disk" (tmpfs inside its mount namespace)
PRIVATE_MOUNTS = ("/tmp", "/dev/shm", NODE_DIR)


def shared_image_paths() -> list[str]:
    """The checkout and the venv when they lie under one of :data:`PRIVATE_MOUNTS` (else nothing to keep)."""
    import sys

    checkout = Path(__file__).resolve().parents[2]
    out = []
    for p in (checkout, Path(sys.prefix).resolve()):
        under = any(p == Path(m) or Path(m) in p.parents for m in PRIVATE_MOUNTS)
        if under and not any(Path(o) == p or Path(o) in p.parents for o in out):
            out.append(str(p))
    return out
STATE_DIR = Path("/run/pcl-rehearsal")  # one JSON file per live rehearsal: what teardown must undo


class RehearsalError(RuntimeError):
    """A step of bringing up or using the rehearsal failed (the message says which and why)."""


def unavailable_reason() -> str | None:
    """Why the rehearsal cannot run on this machine, or None when it can."""
    if os.name != "posix" or not Path("/proc/self/ns/net").exists():
        return "needs Linux network namespaces (/proc/self/ns/net)"
    if os.geteuid() != 0:
        return "needs root (creates network and mount namespaces)"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"needs `{tool}` (iproute2 / util-linux) on PATH"
    try:
        probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ip netns list` did not run ({exc})"
    if probe.returncode != 0:
        return f"`ip netns` is unavailable: {probe.stderr.strip() or probe.returncode}"
    return None


def sh(*cmd: str, check: bool = True, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run a short command; on failure raise :class:`RehearsalError` with its stderr."""
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RehearsalError(f"`{' '.join(cmd)}` did not finish within {timeout:g}s") from None
    if check and done.returncode != 0:
        raise RehearsalError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()}")
    return done


# ----------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    sid: int
    comm: str
    netns: int  # inode of /proc/PID/ns/net
    cmdline: str


def processes() -> dict[int, ProcInfo]:
    """Every process of the machine that can still be read (processes may end while this runs)."""
    out: dict[int, ProcInfo] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            netns = os.stat(d / "ns" / "net").st_ino
            cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(d.name)] = ProcInfo(int(d.name), int(fields[1]), int(fields[3]), comm, netns, cmdline)
    return out


def netns_inode(name: str) -> int:
    return os.stat(f"/run/netns/{name}").st_ino


def session_members(sids: set[int], table: dict[int, ProcInfo] | None = None) -> set[int]:
    table = processes() if table is None else table
    return {p.pid for p in table.values() if p.sid in sids}


def kill_sessions(sids: set[int], grace_s: float = 5.0, extra_pids: set[int] = frozenset()) -> set[int]:
    """End every process of the sessions ``sids`` (and ``extra_pids``): SIGTERM, then SIGKILL after ``grace_s``
    (``grace_s`` 0: SIGKILL at once, as a host that loses power). Returns the pids that were signalled."""
    targets = session_members(sids) | set(extra_pids)
    targets.discard(os.getpid())
    first = signal.SIGKILL if grace_s <= 0 else signal.SIGTERM
    for pid in targets:
        _signal(pid, first)
    deadline = time.monotonic() + max(grace_s, 0.0)
    while True:
        alive = {p for p in session_members(sids) | targets if _alive(p)}
        alive.discard(os.getpid())
        if not alive:
            break
        if time.monotonic() >= deadline:
            for pid in alive:
                _signal(pid, signal.SIGKILL)
            if time.monotonic() >= deadline + 10:
                break
        time.sleep(0.2)
    return targets


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if state[state.rindex(")") + 2] == "Z":  # a zombie: dead, waiting to be reaped
        try:
            os.waitpid(pid, os.WNOHANG)  # reap our own children
        except ChildProcessError:
            pass
        return False
    return True


# ----------------------------------------------------------------------------- processes in a host


@dataclass
class Proc:
    """A long-lived process started in a host, leader of its own session (sid = pid)."""
    name: str
    host: str
    popen: subprocess.Popen
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def sid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Host:
    """One host of the rehearsal: its network namespace, address and current anchor (mount namespace)."""
    name: str
    netns: str
    ip: str
    anchor: Proc | None = None
    generation: int = 0

    @property
    def hostname(self) -> str:
        return f"pclr-{self.name}"

    def nsenter(self) -> list[str]:
        """Command prefix that runs a program in this host's network and mount namespaces."""
        if self.anchor is None or not self.anchor.alive():
            raise RehearsalError(f"host {self.name} is down (no anchor)")
        return ["nsenter", f"--target={self.anchor.pid}", "--net", "--mount", "--uts"]


@dataclass
class Network:
    """The switch, the hosts and every process started in them. Use as a context manager or call :meth:`teardown`."""
    hosts: dict[str, Host]
    tag: str
    subnet: str = "10.77.0"
    log_dir: Path = field(default_factory=Path)
    procs: list[Proc] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # namespaces made so far, deleted by teardown
    inodes: dict[str, int] = field(default_factory=dict)  # host name (and "switch") -> netns inode
    kept: bool = False  # left up on purpose (--keep): only an explicit cleanup removes it
    _torn_down: bool = False

    @classmethod
    def create(cls, host_names: tuple[str, ...] = ("head", "worker1", "worker2"), subnet: str = "10.77.0",
               log_dir: Path | None = None, tag: str | None = None) -> "Network":
        tag = tag or secrets.token_hex(2)
        hosts = {n: Host(n, f"pclr-{tag}-{n}", f"{subnet}.{i + 1}") for i, n in enumerate(host_names)}
        if log_dir is None:
            log_dir = Path("/tmp") / f"pcl-rehearsal-{tag}"
        log_dir.mkdir(parents=True, exist_ok=True)
        net = cls(hosts=hosts, tag=tag, subnet=subnet, log_dir=log_dir)
        try:
            net._build()
        except BaseException:
            net.teardown()
            raise
        return net

    @property
    def switch(self) -> str:
        return f"pclr-{self.tag}-sw"

    def _add_ns(self, name: str) -> None:
        sh("ip", "netns", "add", name)
        self.created.append(name)
        self._save_state()
        sh("ip", "-n", name, "link", "set", "lo", "up")

    def _build(self) -> None:
        self._add_ns(self.switch)
        self.inodes["switch"] = netns_inode(self.switch)
        sh("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", self.switch, "link", "set", "br0", "up")
        for host in self.hosts.values():
            self._add_ns(host.netns)
            self.inodes[host.name] = netns_inode(host.netns)
            port = f"v-{host.name}"[:15]
            # both ends are created inside namespaces: the machine's own namespace never sees them
            sh("ip", "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
            sh("ip", "-n", self.switch, "link", "set", port, "master", "br0")
            sh("ip", "-n", self.switch, "link", "set", port, "up")
            sh("ip", "-n", host.netns, "addr", "add", f"{host.ip}/24", "dev", "eth0")
            sh("ip", "-n", host.netns, "link", "set", "eth0", "up")

    # ------------------------------------------------------------------ state file (for --cleanup)
    def _state_file(self) -> Path:
        return STATE_DIR / f"{self.tag}.json"

    def _save_state(self) -> None:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self._state_file().write_text(json.dumps({
            "owner": os.getpid(), "namespaces": self.created, "inodes": self.inodes,
            "sessions": [p.sid for p in self.procs], "log_dir": str(self.log_dir), "kept": self.kept}))

    def keep(self) -> None:
        """Leave everything up when this process ends; :func:`cleanup_stale` with ``kept=True`` removes it."""
        self.kept = True
        self._save_state()

    # ------------------------------------------------------------------ hosts
    def boot(self, name: str, timeout_s: float = 20.0) -> Host:
        """Start a fresh incarnation of host ``name``: a new anchor with empty private mounts."""
        host = self.hosts[name]
        if host.anchor is not None and host.anchor.alive():
            raise RehearsalError(f"host {name} is already up")
        host.generation += 1
        # its own name and a hosts file that resolves every host to its subnet address, as a cloud's DNS does
        # (gloo, for one, binds to what the hostname resolves to; the machine's name resolves to loopback)
        hosts_file = self.log_dir / "hosts"
        hosts_file.write_text("127.0.0.1 localhost\n::1 localhost\n"
                              + "".join(f"{h.ip} {h.hostname}\n" for h in self.hosts.values()))
        mounts = " && ".join(f"mkdir -p {m} && mount -t tmpfs -o mode=1777 pcl-{name} {m}" for m in PRIVATE_MOUNTS)
        # The checkout and its venv are the shared "image": when they lie under a private mount point (a clone
        # in /tmp, as CI may make), stage them with a bind mount first and put them back on top of the tmpfs.
        keep, restore = [], []
        for i, path in enumerate(shared_image_paths()):
            stage = f"{STATE_DIR}/keep-{self.tag}-{name}-{i}"
            keep.append(f"mkdir -p {shlex.quote(stage)} && mount --bind {shlex.quote(path)} {shlex.quote(stage)}")
            restore.append(f"mkdir -p {shlex.quote(path)} && mount --bind {shlex.quote(stage)} {shlex.quote(path)}")
        steps = [f"mount --bind {hosts_file} /etc/hosts", f"hostname {host.hostname}", *keep, mounts, *restore,
                 "exec sleep infinity"]
        cmd = ["ip", "netns", "exec", host.netns, "unshare", "--mount", "--uts", "--propagation", "private", "--",
               "sh", "-c", " && ".join(steps)]
        host.anchor = self._popen(f"{name}-anchor{host.generation}", name, cmd, env={"PATH": os.environ["PATH"]})
        deadline = time.monotonic() + timeout_s
        while not self._mounted(host.anchor.pid):
            if not host.anchor.alive():
                raise RehearsalError(f"host {name} did not boot: {host.anchor.log_tail()}")
            if time.monotonic() > deadline:
                raise RehearsalError(f"host {name}: private mounts not up within {timeout_s:g}s")
            time.sleep(0.05)
        return host

    @staticmethod
    def _mounted(pid: int) -> bool:
        try:
            mounts = Path(f"/proc/{pid}/mounts").read_text().split("\n")
        except OSError:
            return False
        points = {line.split()[1] for line in mounts if line.startswith("pcl-")}
        every = {line.split()[1] for line in mounts if line.strip()}
        # the private disks, and the shared image put back on top of them (the last step before the sleep)
        return set(PRIVATE_MOUNTS) <= points and set(shared_image_paths()) <= every

    def spawn(self, name: str, host: str, argv: list[str], env: dict[str, str], cwd: str | None = None) -> Proc:
        """Start ``argv`` inside ``host`` (its network and mount namespaces) in a session of its own.

        ``env`` is the whole environment of the process (nothing of this process's environment leaks in).
        Output goes to ``<log_dir>/<name>.log`` on the machine's disk, outside every host.
        """
        h = self.hosts[host]
        prefix = h.nsenter() + ([f"--wd={cwd}"] if cwd else [])
        proc = self._popen(name, host, [*prefix, "--", *argv], env=env)
        deadline = time.monotonic() + 10
        while self.host_of_pid(proc.pid) != host and proc.alive() and time.monotonic() < deadline:
            time.sleep(0.01)  # nsenter has not entered the host yet
        return proc

    def _popen(self, name: str, host: str, cmd: list[str], env: dict[str, str]) -> Proc:
        log = self.log_dir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)  # setsid: the session id is the pid
        proc = Proc(name, host, popen, log)
        self.procs.append(proc)
        self._save_state()
        return proc

    def run_in(self, host: str, argv: list[str], env: dict[str, str], timeout: float = 120.0,
               cwd: str | None = None) -> subprocess.CompletedProcess:
        """Run a short command inside ``host`` and wait for it (its own session too; killed on timeout)."""
        h = self.hosts[host]
        prefix = h.nsenter() + ([f"--wd={cwd}"] if cwd else [])
        popen = subprocess.Popen([*prefix, "--", *argv], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        try:
            out, err = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_sessions({popen.pid}, grace_s=0)
            out, err = popen.communicate()
            raise RehearsalError(f"`{' '.join(argv[:4])} ...` in {host} did not finish within {timeout:g}s: "
                                 f"{(err or '')[-1500:]}") from None
        return subprocess.CompletedProcess(argv, popen.returncode, out, err)

    def host_of_pid(self, pid: int) -> str | None:
        """The rehearsal host whose network namespace ``pid`` lives in (None: not in any of them)."""
        try:
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            return None
        return next((n for n, i in self.inodes.items() if i == ino and n != "switch"), None)

    def members(self) -> set[int]:
        """Every live process of the rehearsal: its sessions and anything inside its namespaces."""
        table = processes()
        sids = {p.sid for p in self.procs}
        inodes = set(self.inodes.values())
        return {p.pid for p in table.values() if p.sid in sids or p.netns in inodes} - {os.getpid()}

    def stop_host(self, name: str, grace_s: float = 0.0) -> set[int]:
        """Take host ``name`` down: every session started in it, its anchor last (its private disk goes)."""
        procs = [p for p in self.procs if p.host == name]
        sids = {p.sid for p in procs}
        inode = self.inodes[name]
        strays = {p.pid for p in processes().values() if p.netns == inode}
        killed = kill_sessions(sids, grace_s=grace_s, extra_pids=strays)
        for p in procs:
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.hosts[name].anchor = None
        return killed

    def stop_session(self, proc: Proc, grace_s: float = 3.0) -> None:
        """End one process started by :meth:`spawn` and everything in its session."""
        kill_sessions({proc.sid}, grace_s=grace_s)
        try:
            proc.popen.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass

    # ------------------------------------------------------------------ teardown
    def teardown(self, grace_s: float = 5.0) -> None:
        """Stop every process of the rehearsal and delete its namespaces. Safe to call more than once."""
        if self._torn_down:
            return
        sids = {p.sid for p in self.procs}
        inodes = set(self.inodes.values())
        strays = {p.pid for p in processes().values() if p.netns in inodes}
        kill_sessions(sids, grace_s=grace_s, extra_pids=strays)
        for p in self.procs:
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for ns in reversed(self.created):
            sh("ip", "netns", "del", ns, check=False)
        for stage in STATE_DIR.glob(f"keep-{self.tag}-*"):  # empty staging folders of the shared image
            try:
                stage.rmdir()
            except OSError:
                pass
        self._torn_down = True
        try:
            self._state_file().unlink()
        except OSError:
            pass

    def leftovers(self) -> dict[str, list]:
        """What teardown should have removed and is still there: namespaces and processes."""
        listed = sh("ip", "netns", "list", check=False).stdout
        names = {line.split()[0] for line in listed.splitlines() if line.strip()}
        table = processes()
        sids = {p.sid for p in self.procs}
        inodes = set(self.inodes.values())
        left = [f"{p.pid} {p.comm}" for p in table.values() if (p.sid in sids or p.netns in inodes)
                and p.pid != os.getpid()]
        return {"namespaces": sorted(names & set(self.created)), "processes": left}

    def __enter__(self) -> "Network":
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()


def cleanup_stale(kept: bool = False) -> list[str]:
    """Undo rehearsals whose owning process died without tearing down (e.g. SIGKILL); with ``kept``, also those
    left up on purpose. Returns the namespaces removed."""
    removed: list[str] = []
    if not STATE_DIR.is_dir():
        return removed
    for f in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        if _alive(int(state.get("owner", 0))) or (state.get("kept") and not kept):
            continue
        # only what still lives in its namespaces: after a crash its session ids may have been reused
        existing = set(sh("ip", "netns", "list", check=False).stdout.split())
        inodes = {ino for name, ino in state.get("inodes", {}).items()
                  if any(ns.endswith(f"-{'sw' if name == 'switch' else name}") for ns in existing)}
        strays = {p.pid for p in processes().values() if p.netns in inodes}
        kill_sessions(set(), grace_s=2.0, extra_pids=strays)
        for ns in reversed(state.get("namespaces", [])):
            if sh("ip", "netns", "del", ns, check=False).returncode == 0:
                removed.append(ns)
        f.unlink(missing_ok=True)
    return removed
