"""The cluster rehearsal (pcl_ray/rehearsal): hosts in network namespaces, their teardown, and the short
scenario list on a head + two workers cluster with an S3 server and an MLflow server in the head.

The namespace tests need no Ray; the cluster tests run the short list (train, local storage refused, rank 0's
node lost) in a few minutes and are part of the default suite, as the CI version of the rehearsal
(`make rehearsal` runs the full list). Everything here skips where the machine cannot make namespaces.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pcl_ray.rehearsal.netns import Network, RehearsalError, processes, unavailable_reason

REASON = unavailable_reason()
pytestmark = [pytest.mark.rehearsal, pytest.mark.skipif(REASON is not None, reason=f"rehearsal: {REASON}")]
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


def _netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _alive(pids: set[int]) -> set[int]:
    table = processes()
    return {p for p in pids if p in table and not open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"}


def test_teardown_removes_namespaces_and_every_process_even_when_the_body_fails():
    started: set[int] = set()
    net_ref: list[Network] = []
    with pytest.raises(RuntimeError, match="scenario failed"):
        with Network.create(("head", "worker1"), subnet="10.78.0") as net:
            net_ref.append(net)
            for host in net.hosts:
                net.boot(host)
            started.add(net.spawn("sleeper", "worker1", ["sleep", "600"], ENV).pid)
            # a daemon that leaves its session: teardown still finds it by its network namespace
            net.run_in("head", ["sh", "-c", "setsid sleep 600 >/dev/null 2>&1 < /dev/null &"], ENV)
            started |= net.members()
            assert net.hosts["head"].anchor.pid in started
            assert len(started) >= 4  # two anchors, the sleeper, the daemon
            assert set(net.created) <= _netns_names()
            raise RuntimeError("scenario failed")
    net = net_ref[0]
    assert net.leftovers() == {"namespaces": [], "processes": []}
    assert not set(net.created) & _netns_names()
    assert _alive(started) == set()
    net.teardown()  # a second call is harmless


def test_hosts_have_private_disks_and_the_machine_no_address_on_their_subnet():
    with Network.create(("head", "worker1"), subnet="10.79.0") as net:
        for host in net.hosts:
            net.boot(host)
        wrote = net.run_in("worker1", ["sh", "-c", "echo local > /tmp/pcl-marker && echo local > "
                                       "/var/tmp/pcl-node/marker && stat -c %d /tmp"], ENV)
        assert wrote.returncode == 0, wrote.stderr
        seen = net.run_in("head", ["sh", "-c", "ls /tmp/pcl-marker /var/tmp/pcl-node/marker 2>&1; stat -c %d /tmp"], ENV)
        assert "No such file" in seen.stdout and seen.stdout.count("No such file") == 2, seen.stdout
        assert seen.stdout.split()[-1] != wrote.stdout.split()[-1]  # two different tmpfs
        assert not os.path.exists("/tmp/pcl-marker")
        # each host has its own name, which resolves to its subnet address (as a cloud's DNS would)
        named = net.run_in("worker1", ["python3", "-c", "import socket; n = socket.gethostname(); "
                                       "print(n, socket.gethostbyname(n), socket.gethostbyname('pclr-head'))"], ENV)
        assert named.stdout.split() == ["pclr-worker1", "10.79.0.2", "10.79.0.1"], named.stderr
        # the hosts reach each other ...
        ping = net.run_in("worker1", ["python3", "-c", "import socket; s = socket.create_connection(('10.79.0.1', 7), 3)"],
                          ENV)
        assert "Connection refused" in ping.stderr, ping.stderr  # routed to the head, nothing listens on port 7
        # ... the machine's own namespace has no address and no route on their subnet (no traffic is sent
        # from it: its default route leads off the machine)
        addrs = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout
        routes = subprocess.run(["ip", "route", "show"], capture_output=True, text=True).stdout
        assert "10.79.0." not in addrs and "10.79.0." not in routes


def test_stopping_one_host_leaves_the_others_running():
    with Network.create(("head", "worker1"), subnet="10.80.0") as net:
        for host in net.hosts:
            net.boot(host)
        keep = net.spawn("head-sleeper", "head", ["sleep", "600"], ENV)
        gone = net.spawn("worker-sleeper", "worker1", ["sleep", "600"], ENV)
        assert net.host_of_pid(gone.pid) == "worker1" and net.host_of_pid(keep.pid) == "head"
        net.stop_host("worker1")
        assert not gone.alive() and keep.alive()
        with pytest.raises(RehearsalError, match="down"):
            net.run_in("worker1", ["true"], ENV)
        net.boot("worker1")  # a replacement host: a fresh, empty disk
        fresh = net.run_in("worker1", ["ls", "-A", "/tmp"], ENV)
        from pcl_ray.rehearsal.netns import shared_image_paths

        image = {Path(p).relative_to("/tmp").parts[0] for p in shared_image_paths() if p.startswith("/tmp/")}
        assert set(fresh.stdout.split()) - image == set()  # only the shared checkout put back, when it is there


# ----------------------------------------------------------------------------- the cluster (slow)


@pytest.fixture(scope="module")
def rehearsal():
    from pcl_ray.rehearsal.cluster import Cluster
    from pcl_ray.rehearsal.scenarios import Rehearsal

    cluster = Cluster.up(log=print)
    try:
        yield Rehearsal(cluster, short=True, log=print)
    finally:
        cluster.down()


def _scenario(rehearsal, key: str):
    from pcl_ray.rehearsal.scenarios import format_outcome

    [out] = rehearsal.run((key,))
    assert out.passed, format_outcome(out)
    return out


def test_cluster_nodes_are_separate_hosts(rehearsal):
    cluster = rehearsal.cluster
    nodes = {n["node_ip"]: n for n in cluster.alive_nodes()}
    assert set(nodes) == {h.ip for h in cluster.net.hosts.values()}
    head = nodes[cluster.net.hosts["head"].ip]["resources_total"]
    assert head.get("CPU", 0) == 0 and head["train_driver_slot"] == 2
    devices = {name: cluster.net.run_in(name, ["stat", "-c", "%d", "/tmp/ray"], ENV).stdout.strip()
               for name in cluster.net.hosts}
    assert len(set(devices.values())) == len(devices), devices  # each node's session dir on its own disk
    job = cluster.run_job(["python", "-c", "import ray; ray.init(); print('NODES', len(ray.nodes()))"], 300)
    assert job.ok and "NODES 3" in job.log, job.tail()
    audit = cluster.audit()
    assert audit.ok, audit.summary()
    assert {li.host for li in audit.listeners} == set(cluster.net.hosts)


def test_train_run_writes_only_to_the_bucket_and_the_tracking_server(rehearsal):
    out = _scenario(rehearsal, "train")
    assert len(out.numbers["losses"]) == rehearsal.epochs


def test_a_local_storage_path_is_refused_on_the_cluster(rehearsal):
    _scenario(rehearsal, "local")


def test_losing_rank_0s_node_resumes_from_the_bucket_with_the_same_losses(rehearsal):
    out = _scenario(rehearsal, "rank0")
    assert "max_loss_diff" in out.numbers  # compared against the uninterrupted train run


def test_the_cluster_tears_down_completely(rehearsal):
    net = rehearsal.cluster.net
    rehearsal.cluster.down()
    assert net.leftovers() == {"namespaces": [], "processes": []}
