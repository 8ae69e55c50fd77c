"""Shared fixtures. One small local Ray per test session, started only by tests that ask for it."""

from __future__ import annotations

import os

import pytest

for _k, _v in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_enable_metrics_collection": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_DEDUP_LOGS": "0",
}.items():
    os.environ.setdefault(_k, _v)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from pcl_ray.distributed.loopback import loopback_only

    if not ray.is_initialized():
        loopback_only()  # as the product's own local Ray: every port on 127.0.0.1
        ray.init(num_cpus=2, object_store_memory=384 * 1024 * 1024, include_dashboard=False)
    yield ray
    ray.shutdown()
