"""Where the E-step runs (GPU shares of the cluster actor and the workers), the cost model, the AMI sample."""

from __future__ import annotations

import numpy as np
import pytest

from pcl_ray.distributed.resources import plan_estep
from pcl_ray.estep.cost import predict_cpu_seconds, work_units


def test_spare_gpu_goes_whole_to_the_actor():
    plan = plan_estep("auto", 0.25, cluster_gpus=9, num_workers=8, gpu_workers=True)
    assert (plan.actor_gpus, plan.worker_gpus, plan.backend) == (1.0, None, "gpu")


def test_no_spare_gpu_shares_one_and_the_workers_ask_the_rest():
    plan = plan_estep("auto", 0.25, cluster_gpus=8, num_workers=8, gpu_workers=True)
    assert plan.actor_gpus == 0.25 and plan.worker_gpus == 0.75 and plan.backend_name == "faiss-gpu"
    assert "gpu_share=0.25" in plan.reason
    # the actor fits beside one worker on one GPU, and no two workers fit on one GPU
    assert plan.actor_gpus + plan.worker_gpus <= 1.0 < 2 * plan.worker_gpus
    # estep.backend=gpu without a spare GPU shares one too
    assert plan_estep("gpu", 0.4, cluster_gpus=1, num_workers=1, gpu_workers=True).worker_gpus == pytest.approx(0.6)


def test_without_a_share_or_a_gpu_auto_falls_back_to_the_cpu_and_says_why():
    plan = plan_estep("auto", None, cluster_gpus=8, num_workers=8, gpu_workers=True)
    assert (plan.actor_gpus, plan.worker_gpus, plan.backend) == (0.0, None, "cpu")
    assert "gpu_share is unset" in plan.reason
    assert "no GPU" in plan_estep("auto", 0.25, cluster_gpus=0, num_workers=2, gpu_workers=False).reason
    assert plan_estep("cpu", 0.25, cluster_gpus=8, num_workers=1, gpu_workers=True).actor_gpus == 0.0
    cpu_build = plan_estep("auto", 0.25, cluster_gpus=8, num_workers=8, gpu_workers=True, faiss_gpu_build=False)
    assert cpu_build.backend == "cpu" and "CPU-only" in cpu_build.reason
    # an explicit gpu backend asks a whole GPU even on a cluster showing none (an autoscaler adds it)
    assert plan_estep("gpu", None, cluster_gpus=0, num_workers=2, gpu_workers=False).actor_gpus == 1.0
    # CPU workers leave every GPU spare
    assert plan_estep("auto", 0.25, cluster_gpus=1, num_workers=4, gpu_workers=False).actor_gpus == 1.0


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1, 1.5])
def test_share_outside_the_open_unit_interval_is_refused(share):
    with pytest.raises(ValueError, match="estep.gpu_share"):
        plan_estep("auto", share, cluster_gpus=8, num_workers=8, gpu_workers=True)


def test_config_rejects_a_bad_share_naming_the_key():
    from pcl_ray.config import ConfigError, load_config

    for bad in ("0", "1", "1.2"):
        with pytest.raises(ConfigError, match="estep.gpu_share"):
            load_config("pipelines/digits_tiny.yaml", [f"estep.gpu_share={bad}"])
    assert load_config("pipelines/digits_tiny.yaml", ["estep.gpu_share=null"]).estep.gpu_share is None


def test_cost_model_counts_subsampled_training_points_and_the_full_assignment():
    # k·mppc < N: faiss trains on k·mppc points for niter·nredo iterations, then assigns all N once
    assert work_units(1_000_000, 100, niter=10, nredo=2, max_points_per_centroid=1000, dim=4) == 4 * 100 * (
        100_000 * 20 + 1_000_000)
    assert work_units(1000, 10, niter=1, nredo=1, max_points_per_centroid=1000, dim=1) == 10 * 2000
    one = predict_cpu_seconds(10_000, [10], 5, 1, 1000, 8, threads=2, seconds_per_unit=1.0)
    assert predict_cpu_seconds(10_000, [10, 10], 5, 1, 1000, 8, threads=4, seconds_per_unit=1.0) == one


def test_label_agreement_on_a_seeded_sample_when_n_is_large():
    from pcl_ray.estep import run_estep
    from pcl_ray.estep.diagnostics import label_agreement

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    feats = np.eye(3, 8, dtype=np.float32)[labels] + 0.01 * rng.standard_normal((600, 8)).astype(np.float32)
    pset = run_estep(feats, [3], 0.1, niter=5, nredo=1, backend="cpu")
    full = label_agreement(pset, labels)
    sample = label_agreement(pset, labels, max_points=200, seed=4)
    assert full["estep/ami_sample"] == 600 and sample["estep/ami_sample"] == 200
    assert sample == label_agreement(pset, labels, max_points=200, seed=4)  # the same sample for the same seed
    assert full["estep/k3/ami_labels"] > 0.99 and sample["estep/k3/ami_labels"] > 0.99
    assert label_agreement(pset, np.full(600, -1)) == {}


def test_cost_model_fit_recovers_known_coefficients():
    from pcl_ray.bench_scale import fit_cost_model

    a, b = 2e-10, 3e-6
    points = [{"N": n, "k": k, "seconds": a * work_units(n, k, 3, 1, 1000, 128) + b * n}
              for n, k in ((100_000, 1000), (100_000, 10_000), (300_000, 1000), (1_280_000, 1000))]
    got_a, got_b = fit_cost_model(points, 3, 1, 1000)
    assert got_a == pytest.approx(a, rel=1e-6) and got_b == pytest.approx(b, rel=1e-4)


def test_estep_scale_part_reports_every_point_and_the_prediction():
    from pcl_ray.bench import BenchReport, parse_parts
    from pcl_ray.bench_scale import bench_estep_scale
    from pcl_ray.config import load_config

    assert parse_parts("estep-scale") == ("estep-scale",) and "estep-scale" not in parse_parts("all")
    report = BenchReport("t")
    bench_estep_scale(load_config("pipelines/digits_tiny.yaml", []), report, grid=((3000, 20), (6000, 40)),
                      niter=2, log=lambda *_: None)
    assert report.value("estep-scale", "N=6000 k=40: E-step time") > 0
    # shards: int64 indices + float32 128-d embeddings of every point, plus pickle framing
    shards = report.value("estep-scale", "N=3000 k=20: object store in (shards)") * 1e6
    assert 3000 * (8 + 4 * 128) <= shards < 3000 * (8 + 4 * 128) + 10_000
    assert report.value("estep-scale", "N=3000 k=20: PrototypeSet per worker") * 1e6 > 3000 * 8
    assert any(r.what.startswith("PREDICTION ImageNet E-step on faiss-gpu") for r in report.rows)
