"""The cluster actor: shard hand-off through the object store, epoch tags, restart recovery."""

from __future__ import annotations

import numpy as np
import pytest

from pcl_ray.estep import run_estep

pytestmark = pytest.mark.ray

ESTEP = {"num_clusters": [4, 8], "temperature": 0.2, "niter": 10, "nredo": 1, "seed": 3, "backend": "cpu"}


def _features(n=400, d=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, d))
    x = centres[rng.integers(0, 4, n)] + 0.1 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _submit_all(ray, actor, epoch, feats, world=2):
    n = len(feats)
    refs = []
    for rank in range(world):
        idx = np.arange(n)[rank::world]
        refs.append(actor.submit_shard.remote(epoch, rank, ray.put(idx), ray.put(feats[idx])))
    ray.get(refs)


def test_actor_publishes_epoch_tagged_prototypes_equal_to_library_estep(ray_local):
    ray = ray_local
    from pcl_ray.distributed.cluster_actor import start_cluster_actor

    feats = _features()
    actor = start_cluster_actor("t-publish", len(feats), feats.shape[1], ESTEP)
    try:
        _submit_all(ray, actor, 5, feats)
        reply = ray.get(actor.wait_prototypes.remote(5, 0, 30.0))
        assert reply["status"] == "ready"
        pset = ray.get(reply["ref"][0])
        assert pset.epoch == 5
        direct = run_estep(feats, epoch=5, **ESTEP)
        for got, want in zip(pset.granularities, direct.granularities):
            np.testing.assert_array_equal(got.assignments, want.assignments)
            np.testing.assert_allclose(got.concentration, want.concentration, rtol=1e-5)
        # a later epoch is not served before its shards are complete, and never as the stale epoch
        idx = np.arange(len(feats))[0::2]
        ray.get(actor.submit_shard.remote(6, 0, ray.put(idx), ray.put(feats[idx])))
        assert ray.get(actor.wait_prototypes.remote(6, 0, 0.5))["status"] == "pending"
        assert ray.get(actor.wait_prototypes.remote(6, 1, 0.5))["status"] == "missing"
    finally:
        ray.kill(actor)


def test_bad_shard_is_rejected_with_a_clear_error(ray_local):
    ray = ray_local
    from pcl_ray.distributed.cluster_actor import start_cluster_actor

    actor = start_cluster_actor("t-bad", 10, 4, ESTEP)
    try:
        with pytest.raises(ray.exceptions.RayTaskError, match="do not match"):
            ray.get(actor.submit_shard.remote(0, 0, np.arange(3), np.zeros((3, 5), np.float32)))
        with pytest.raises(ray.exceptions.RayTaskError, match="outside"):
            ray.get(actor.submit_shard.remote(0, 0, np.array([10]), np.zeros((1, 4), np.float32)))
    finally:
        ray.kill(actor)


def test_restarted_actor_asks_for_shards_again(ray_local):
    ray = ray_local
    from pcl_ray.distributed.cluster_actor import start_cluster_actor

    feats = _features(seed=1)
    actor = start_cluster_actor("t-restart", len(feats), feats.shape[1], ESTEP)
    try:
        idx = np.arange(len(feats))[0::2]
        ray.get(actor.submit_shard.remote(2, 0, ray.put(idx), ray.put(feats[idx])))
        ray.kill(actor, no_restart=False)  # crash: Ray restarts it with an empty store
        reply = None
        for _ in range(50):
            try:
                reply = ray.get(actor.wait_prototypes.remote(2, 0, 0.5))
                break
            except ray.exceptions.RayActorError:
                continue
        assert reply == {"status": "missing"}
        # the restarted actor flags its first epoch: some ranks may have fetched it before the crash
        ray.get(actor.submit_shard.remote(2, 1, ray.put(np.arange(len(feats))[1::2]), ray.put(feats[1::2])))
        pending = ray.get(actor.wait_prototypes.remote(2, 1, 0.2))
        assert pending["status"] == "pending" and pending["after_restart"] is True
        assert ray.get(actor.info.remote())["restarted"] is True
        _submit_all(ray, actor, 2, feats)
        assert ray.get(actor.wait_prototypes.remote(2, 0, 30.0))["status"] == "ready"
        # later epochs are collected as usual
        ray.get(actor.submit_shard.remote(3, 0, ray.put(idx), ray.put(feats[idx])))
        assert ray.get(actor.wait_prototypes.remote(3, 0, 0.2))["after_restart"] is False
    finally:
        ray.kill(actor)


def test_failed_estep_starts_over_on_a_fresh_submission(ray_local):
    """A Train retry after a failed E-step resubmits its shards: the actor forgets the error and runs again."""
    ray = ray_local
    from pcl_ray.distributed.cluster_actor import start_cluster_actor

    feats = _features(seed=2)
    bad = feats.copy()
    bad[7] = np.nan  # a diverged step's embedding: run_estep refuses non-finite features
    actor = start_cluster_actor("t-retry", len(feats), feats.shape[1], ESTEP)
    try:
        _submit_all(ray, actor, 1, bad)
        reply = ray.get(actor.wait_prototypes.remote(1, 0, 30.0))
        assert reply["status"] == "error" and "epoch 2" in reply["message"] and "NaN" in reply["message"]
        assert ray.get(actor.wait_prototypes.remote(1, 1, 1.0))["status"] == "error"  # every rank hears it
        # the retry: one rank's new shard alone is a new collection, not the old error
        idx = np.arange(len(feats))[0::2]
        ray.get(actor.submit_shard.remote(1, 0, ray.put(idx), ray.put(feats[idx])))
        pending = ray.get(actor.wait_prototypes.remote(1, 0, 0.2))
        assert pending["status"] == "pending" and pending["phase"] == "collecting"
        assert pending["ranks"] == [0] and pending["covered"] == len(idx)
        assert ray.get(actor.wait_prototypes.remote(1, 1, 0.2))["status"] == "missing"
        _submit_all(ray, actor, 1, feats)
        reply = ray.get(actor.wait_prototypes.remote(1, 1, 30.0))
        assert reply["status"] == "ready"
        pset = ray.get(reply["ref"][0])
        direct = run_estep(feats, epoch=1, **ESTEP)
        for got, want in zip(pset.granularities, direct.granularities):
            np.testing.assert_array_equal(got.assignments, want.assignments)
        assert ray.get(actor.info.remote())["failed_epochs"] == []
    finally:
        ray.kill(actor)


def test_label_agreement_comes_after_the_prototypes_and_reaches_the_epoch(ray_local):
    """The published PrototypeSet carries no AMI (it is not on the critical path); health(epoch) has it."""
    ray = ray_local
    from sklearn.metrics import adjusted_mutual_info_score

    from pcl_ray.distributed.cluster_actor import start_cluster_actor
    from pcl_ray.distributed.handoff import fetch_health

    feats = _features(seed=2)
    labels = np.arange(len(feats)) % 4
    labels[:10] = -1  # unknown labels are left out
    actor = start_cluster_actor("t-health", len(feats), feats.shape[1], ESTEP, labels=labels)
    try:
        _submit_all(ray, actor, 3, feats)
        reply = ray.get(actor.wait_prototypes.remote(3, 0, 30.0))
        pset = ray.get(reply["ref"][0])
        assert not any(k.endswith("ami_labels") for k in pset.stats())
        health = fetch_health(actor, 3, timeout_s=30.0)
        for g in pset.granularities:
            want = adjusted_mutual_info_score(labels[10:], g.assignments[10:])
            assert health[f"estep/k{g.num_clusters}/ami_labels"] == pytest.approx(want)
        assert health["estep/ami_sample"] == len(feats) - 10
        assert fetch_health(actor, 99, timeout_s=1.0) == {}  # an epoch the actor never ran
    finally:
        ray.kill(actor)


def test_warm_start_begins_each_epoch_from_the_previous_epochs_centroids(ray_local):
    """estep.warm_start: epoch 1 starts cold, epoch 2 starts from epoch 1's published centroids."""
    ray = ray_local
    from pcl_ray.distributed.cluster_actor import start_cluster_actor

    first = _features()
    rng = np.random.default_rng(1)
    drifted = first + 0.3 * rng.normal(size=first.shape).astype(np.float32)  # the next epoch's embeddings
    drifted /= np.linalg.norm(drifted, axis=1, keepdims=True)
    actor = start_cluster_actor("t-warm", len(first), first.shape[1], {**ESTEP, "warm_start": True, "warm_niter": 2})
    try:
        psets = []
        for epoch, feats in ((1, first), (2, drifted)):
            _submit_all(ray, actor, epoch, feats)
            reply = ray.get(actor.wait_prototypes.remote(epoch, 0, 30.0))
            psets.append(ray.get(reply["ref"][0]))
        cold1 = run_estep(first, epoch=1, **ESTEP)
        for got, want in zip(psets[0].granularities, cold1.granularities):  # no previous epoch: cold
            np.testing.assert_array_equal(got.assignments, want.assignments)
        init = [g.centroids for g in psets[0].granularities]
        warm = run_estep(drifted, epoch=2, init_centroids=init, warm_niter=2, **ESTEP)
        cold2 = run_estep(drifted, epoch=2, **ESTEP)
        # the check below can only tell warm from cold if the two differ on these embeddings
        assert any(not np.allclose(w.centroids, c.centroids, atol=1e-4)
                   for w, c in zip(warm.granularities, cold2.granularities))
        for got, want in zip(psets[1].granularities, warm.granularities):
            np.testing.assert_array_equal(got.assignments, want.assignments)
            np.testing.assert_allclose(got.centroids, want.centroids, rtol=1e-5, atol=1e-6)
    finally:
        ray.kill(actor)
