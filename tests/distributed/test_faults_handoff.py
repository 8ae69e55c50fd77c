"""Faults in the E-step hand-off: the cluster actor killed after some ranks fetched, killed during the E-step,
an E-step that fails once, a hand-off that can never complete. Never a hang: a result or one clear error.

The multi-rank cases run two real ranks (spawned processes in a gloo group, as Train workers are) against a
real ClusterActor on the session's local Ray; each rank is a Ray driver attached to it.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

from pcl_ray.estep import run_estep

pytestmark = pytest.mark.ray

ESTEP = {"num_clusters": [4, 8], "temperature": 0.2, "niter": 10, "nredo": 1, "seed": 3, "backend": "cpu"}
# slow enough on one thread (about a second or more) to kill the actor while it runs
SLOW_ESTEP = {"num_clusters": [300], "temperature": 0.2, "niter": 60, "nredo": 1, "seed": 5, "backend": "cpu",
              "num_threads": 1}
RANK_DEADLINE_S = 240.0  # the test fails, and its ranks are killed, if they take longer


def _features(n=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, d))
    x = centres[rng.integers(0, 4, n)] + 0.1 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _submitter(ray, actor, epoch, rank, feats, world=2):
    idx = np.arange(len(feats))[rank::world]
    idx_ref, emb_ref = ray.put(idx), ray.put(feats[idx])
    return lambda: actor.submit_shard.remote(epoch, rank, idx_ref, emb_ref)


# ------------------------------------------------------------------ one process, no process group
def test_handoff_deadline_names_epoch_rank_and_what_is_missing(ray_local):
    ray = ray_local
    from pcl_ray.distributed.cluster_actor import start_cluster_actor
    from pcl_ray.distributed.handoff import fetch_prototypes

    feats = _features()
    actor = start_cluster_actor("t-deadline", len(feats), feats.shape[1], ESTEP)
    try:
        ray.get(actor.info.remote())  # started
        t0 = time.monotonic()
        with pytest.raises(RuntimeError) as err:  # rank 1 never submits
            fetch_prototypes(actor, 3, 0, _submitter(ray, actor, 3, 0, feats), timeout_s=5.0, poll_s=0.5)
        assert time.monotonic() - t0 < 60
        msg = str(err.value)
        assert "epoch 4" in msg and "rank 0" in msg and "after 5s" in msg
        assert "ranks [0] covering 200 of 400 indices (200 missing)" in msg
    finally:
        ray.kill(actor)


def test_handoff_of_a_failed_estep_raises_and_a_retry_succeeds(ray_local):
    ray = ray_local
    from concurrent.futures import ThreadPoolExecutor

    from pcl_ray.distributed.cluster_actor import start_cluster_actor
    from pcl_ray.distributed.handoff import fetch_prototypes

    feats = _features(seed=4)
    bad = feats.copy()
    bad[1] = np.inf
    actor = start_cluster_actor("t-failonce", len(feats), feats.shape[1], ESTEP)
    try:
        def both(data):
            with ThreadPoolExecutor(2) as pool:
                futures = [pool.submit(fetch_prototypes, actor, 0, r, _submitter(ray, actor, 0, r, data),
                                       timeout_s=60.0) for r in range(2)]
                return [f.exception() or f.result() for f in futures]

        first = both(bad)
        assert all(isinstance(e, RuntimeError) and "E-step of epoch 1 failed" in str(e) for e in first), first
        second = both(feats)  # what a Train retry does: submit again
        want = run_estep(feats, epoch=0, **ESTEP)
        for pset in second:
            assert pset.epoch == 0
            np.testing.assert_array_equal(pset.granularities[1].assignments, want.granularities[1].assignments)
    finally:
        ray.kill(actor)


# ------------------------------------------------------------------ two ranks in a gloo group
def _rank_main(rank: int, world: int, job: dict) -> None:
    """One rank: attach to the test's Ray, join the gloo group, run ``job["scenario"]``, write results."""
    import logging
    from datetime import timedelta

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    import ray
    import torch.distributed as dist

    from pcl_ray.distributed.cluster_actor import NAMESPACE
    from pcl_ray.distributed.handoff import fetch_prototypes, obtain, share

    out = Path(job["out"])
    handler = logging.FileHandler(out / f"log{rank}.txt")
    logging.getLogger("pcl_ray.distributed.handoff").addHandler(handler)
    ray.init(address=job["address"], log_to_driver=False)
    dist.init_process_group("gloo", init_method=f"file://{job['init_file']}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=RANK_DEADLINE_S))
    actor = ray.get_actor(job["actor"], namespace=NAMESPACE)
    feats = np.load(job["features"])
    results: dict = {}

    def save(key, pset):
        np.save(out / f"{key}_rank{rank}.npy", np.stack([g.assignments for g in pset.granularities]))

    def wait_for(name):
        t0 = time.monotonic()
        while not (out / name).exists():
            assert time.monotonic() - t0 < 120, f"{name} never appeared"
            time.sleep(0.05)

    def rank0_fetches_first(epoch, signal):
        """Rank 0: the PrototypeSet from the actor, then tell rank 1 (which kills the actor), then agree."""
        pset, reason = obtain(actor, epoch, rank, _submitter(ray, actor, epoch, rank, feats), timeout_s=120.0,
                              grace_s=5.0)
        results[f"rank0_reason_{epoch}"] = reason
        (out / signal).write_text("1")
        return share(pset, reason, epoch, rank)

    def kill():
        pid = ray.get(actor.info.remote())["pid"]
        ray.kill(actor, no_restart=False)  # a crash: Ray restarts it with an empty store
        t0 = time.monotonic()
        while ray.get(actor.info.remote())["pid"] == pid:  # ray.kill returns at once: wait for the new one
            assert time.monotonic() - t0 < 120, "the actor did not restart"
            time.sleep(0.05)
        return pid

    try:
        if job["scenario"] == "kill_after_rank0_fetched":
            # epoch 1: rank 1 submitted, then is slow to ask; meanwhile rank 0 fetched and the actor died
            if rank == 0:
                pset = rank0_fetches_first(0, "fetched0")
            else:
                real = _submitter(ray, actor, 0, rank, feats)
                calls = []

                def slow_submit():
                    ref = real()
                    if not calls:  # the first submission: wait until rank 0 has it, then the crash
                        ray.get(ref)
                        wait_for("fetched0")
                        results["pid_before"] = kill()
                    calls.append(1)
                    return ref

                pset = fetch_prototypes(actor, 0, rank, slow_submit, timeout_s=120.0, grace_s=5.0)
                results["pid_after"] = ray.get(actor.info.remote())["pid"]
                results["submits"] = len(calls)
            save("after_kill", pset)
            # epoch 2: an E-step that fails gives every rank the same error ...
            bad = feats.copy()
            bad[0] = np.nan
            try:
                fetch_prototypes(actor, 1, rank, _submitter(ray, actor, 1, rank, bad), timeout_s=120.0)
            except RuntimeError as exc:
                results["error"] = str(exc)
            # ... and the retry with good shards succeeds
            save("retry", fetch_prototypes(actor, 1, rank, _submitter(ray, actor, 1, rank, feats), timeout_s=120.0))
            # epoch 3: rank 1's shard reaches only the restarted actor (it never hears "missing")
            if rank == 0:
                pset = rank0_fetches_first(2, "fetched2")
            else:
                ray.get(_submitter(ray, actor, 2, rank, feats)())
                wait_for("fetched2")
                kill()
                pset = fetch_prototypes(actor, 2, rank, _submitter(ray, actor, 2, rank, feats), timeout_s=120.0,
                                        grace_s=5.0)
            save("after_restart", pset)
        elif job["scenario"] == "plain":
            save("plain", fetch_prototypes(actor, 0, rank, _submitter(ray, actor, 0, rank, feats),
                                           timeout_s=180.0, grace_s=60.0))
        dist.barrier()
    finally:
        (out / f"results{rank}.json").write_text(json.dumps(results))
        dist.destroy_process_group()
        ray.shutdown()


def _run_ranks(tmp_path: Path, job: dict, during=None, world: int = 2) -> list[dict]:
    """Spawn the ranks; ``during()`` runs in the test process meanwhile. Kills them at RANK_DEADLINE_S."""
    import torch.multiprocessing as mp

    job = {**job, "out": str(tmp_path), "init_file": str(tmp_path / "pg_init")}
    ctx = mp.spawn(_rank_main, args=(world, job), nprocs=world, join=False)
    try:
        if during is not None:
            during()
        deadline = time.monotonic() + RANK_DEADLINE_S
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"the ranks did not finish within {RANK_DEADLINE_S:g}s (a hang)")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    return [json.loads((tmp_path / f"results{r}.json").read_text()) for r in range(world)]


def test_actor_killed_after_rank0_fetched_both_ranks_get_the_same_prototypes(ray_local, tmp_path):
    ray = ray_local
    from pcl_ray.distributed.cluster_actor import start_cluster_actor

    feats = _features(seed=6)
    np.save(tmp_path / "feats.npy", feats)
    actor = start_cluster_actor("t-kill-after", len(feats), feats.shape[1], ESTEP)
    try:
        ray.get(actor.info.remote())
        res = _run_ranks(tmp_path, {"scenario": "kill_after_rank0_fetched", "actor": "pcl-cluster-t-kill-after",
                                    "address": ray.get_runtime_context().gcs_address,
                                    "features": str(tmp_path / "feats.npy")})
    finally:
        ray.kill(actor)
    # rank 0 had the PrototypeSet from the actor before each kill; the actor did restart
    assert res[0]["rank0_reason_0"] == "" and res[0]["rank0_reason_2"] == ""
    assert res[1]["pid_after"] != res[1]["pid_before"] and res[1]["submits"] == 2
    log1 = (tmp_path / "log1.txt").read_text()
    lines = log1.splitlines()
    assert len(lines) == 2
    assert "restarted (it had lost this rank's shard)" in lines[0] and "within 5s" in lines[0]
    assert "took epoch 1's PrototypeSet from rank 0" in lines[0]
    assert "restarted (this rank's shard reached the restarted actor)" in lines[1]
    assert "took epoch 3's PrototypeSet from rank 0" in lines[1]
    for epoch, key in ((0, "after_kill"), (1, "retry"), (2, "after_restart")):
        want = np.stack([g.assignments for g in run_estep(feats, epoch=epoch, **ESTEP).granularities])
        for r in range(2):
            np.testing.assert_array_equal(np.load(tmp_path / f"{key}_rank{r}.npy"), want)
    # a failed E-step: the same error on both ranks, naming each rank's reason; then the retry works
    assert res[0]["error"] == res[1]["error"]
    assert "failed on every rank" in res[0]["error"]
    assert "rank 0: E-step of epoch 2 failed" in res[0]["error"] and "rank 1: E-step of epoch 2" in res[0]["error"]


def test_actor_killed_during_the_estep_every_rank_resubmits(ray_local, tmp_path):
    ray = ray_local
    from pcl_ray.distributed.cluster_actor import start_cluster_actor

    rng = np.random.default_rng(7)
    feats = rng.normal(size=(20000, 32)).astype(np.float32)
    np.save(tmp_path / "feats.npy", feats)
    actor = start_cluster_actor("t-kill-during", len(feats), feats.shape[1], SLOW_ESTEP)
    seen = {}

    def kill_while_running():
        seen["pid_before"] = ray.get(actor.info.remote())["pid"]
        t0 = time.monotonic()
        while 0 not in ray.get(actor.info.remote())["running_epochs"]:
            assert time.monotonic() - t0 < 180, "the E-step never started"
            time.sleep(0.05)
        ray.kill(actor, no_restart=False)
        seen["killed"] = True

    try:
        _run_ranks(tmp_path, {"scenario": "plain", "actor": "pcl-cluster-t-kill-during",
                              "address": ray.get_runtime_context().gcs_address,
                              "features": str(tmp_path / "feats.npy")}, during=kill_while_running)
        info = ray.get(actor.info.remote())
    finally:
        ray.kill(actor)
    assert seen["killed"] and info["pid"] != seen["pid_before"] and info["published_epochs"] == [0]
    got = [np.load(tmp_path / f"plain_rank{r}.npy") for r in range(2)]
    np.testing.assert_array_equal(got[0], got[1])
    want = run_estep(feats, epoch=0, **SLOW_ESTEP)
    np.testing.assert_array_equal(got[0], np.stack([g.assignments for g in want.granularities]))
