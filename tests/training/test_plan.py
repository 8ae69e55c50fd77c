"""The epoch plan: global batches fixed by (seed, epoch), split exactly across any world size."""

from __future__ import annotations

import numpy as np
import pytest

from pcl_ray.training import EpochPlan


@pytest.mark.parametrize("world", [1, 2, 4, 8])
def test_global_batches_do_not_depend_on_the_world_size(world):
    plan = EpochPlan(n=1000, batch_size=64, seed=3, epoch=2)
    b = plan.local_batch(world)
    shards = [plan.rank_indices(r, world).reshape(plan.steps, b) for r in range(world)]
    rebuilt = np.concatenate(shards, axis=1)  # step s's batch = the ranks' step-s batches side by side
    assert np.array_equal(rebuilt, plan.global_batches())
    assert plan.steps == 1000 // 64


def test_index_space_is_covered_once_per_epoch_and_epochs_differ():
    plan = EpochPlan(n=1000, batch_size=64, seed=3, epoch=0)
    everything = np.concatenate([plan.global_batches().reshape(-1), plan.untrained()])
    assert np.array_equal(np.sort(everything), np.arange(1000))
    assert len(plan.untrained()) == 1000 % 64
    other = EpochPlan(n=1000, batch_size=64, seed=3, epoch=1)
    assert not np.array_equal(plan.global_batches(), other.global_batches())
    assert np.array_equal(plan.order(), EpochPlan(n=1000, batch_size=64, seed=3, epoch=0).order())


def test_bad_sizes():
    with pytest.raises(ValueError, match="not divisible by the world size 3"):
        EpochPlan(n=1000, batch_size=64, seed=0, epoch=0).local_batch(3)
    with pytest.raises(ValueError, match="larger than the data"):
        EpochPlan(n=10, batch_size=64, seed=0, epoch=0)
