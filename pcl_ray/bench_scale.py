"""The ``estep-scale`` bench part: the E-step at growing N and k, and a fitted cost model.

Synthetic 128-d embeddings with cluster structure (Gaussian blobs around random unit centres) stand in for an
epoch's gathered embeddings. Every point of the grid runs in a fresh spawned process that does what the
cluster actor does for one epoch (README "Scale benchmark"): fill an (N, d) store from the workers' shards,
copy it, run :func:`pcl_ray.estep.run_estep`, pickle the PrototypeSet. Measured per point: wall time of
``run_estep``, the process's peak resident memory, the object-store bytes of the epoch (shards in, the
PrototypeSet out) and the PrototypeSet's size, which every worker fetches.

Cost model: faiss trains on ``n_train = min(N, k · max_points_per_centroid)`` points for ``niter · nredo``
Lloyd iterations, then assigns all N points once, each step a distance computation of ``k · d`` per point::

    t ≈ a · d · k · (n_train · niter · nredo + N) + b · N

``a`` and ``b`` are fitted (least squares) on the measured points; the fit is then evaluated at the ImageNet
pipelines' settings. The faiss-gpu figure is a *prediction*: the CPU coefficient ``a`` divided by an assumed
GPU/CPU throughput ratio (stated in the report), not a measurement; ``scripts/gpu_check.sh`` measures the
ratio when a GPU is available.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import resource
import time
from typing import Any

import numpy as np

DIM = 128
#: (N, k) points measured by default: about 3-6 minutes on a 2-core machine with niter=3, nredo=1.
DEFAULT_GRID: tuple[tuple[int, int], ...] = (
    (100_000, 1_000), (100_000, 10_000), (300_000, 1_000), (300_000, 3_000), (1_280_000, 1_000),
)
DEFAULT_NITER = 3
#: Assumed faiss-gpu (one datacentre GPU, fp32 flat L2) over faiss-cpu (this machine's cores) throughput
#: for the prediction only. Replace with the ratio scripts/gpu_check.sh measures.
ASSUMED_GPU_SPEEDUP = 200.0
#: The ImageNet pipelines' E-step (pipelines/pcl_v2_imagenet.yaml): N, k per granularity, niter, nredo.
IMAGENET = {"N": 1_281_167, "ks": (25_000, 50_000, 100_000), "niter": 20, "nredo": 5, "mppc": 1000}


def synthetic_embeddings(n: int, dim: int = DIM, centres: int = 1000, seed: int = 0) -> np.ndarray:
    """``n`` float32 points (n, dim) around ``centres`` random unit centres (σ 0.3 per dimension / sqrt(dim));
    the centres are the same for every ``seed`` (the workers' shards share one cluster structure)."""
    mu = np.random.default_rng(12345).standard_normal((centres, dim)).astype(np.float32)
    rng = np.random.default_rng(seed)
    mu /= np.linalg.norm(mu, axis=1, keepdims=True)
    out = mu[rng.integers(0, centres, n)]  # n×dim
    out += rng.standard_normal((n, dim), dtype=np.float32) * (0.3 / np.sqrt(dim))
    return out


def work_units(n: int, k: int, niter: int, nredo: int, mppc: int, dim: int = DIM) -> float:
    """The cost model's x (:func:`pcl_ray.estep.cost.work_units`)."""
    from .estep.cost import work_units as units

    return units(n, k, niter, nredo, mppc, dim)


def _measure(n: int, k: int, niter: int, nredo: int, mppc: int, workers: int, threads: int | None) -> dict[str, Any]:
    """One epoch of the cluster actor at (N, k), in this (fresh) process."""
    from pcl_ray.estep import run_estep

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    order = np.random.default_rng(1).permutation(n)
    shards_bytes = 0
    store = np.zeros((n, DIM), dtype=np.float32)  # the actor's store
    for rank in range(workers):  # shards as the workers submit them: (indices int64, embeddings float32)
        idx = np.sort(order[rank::workers])
        shard = (idx, synthetic_embeddings(idx.size, seed=1 + rank))
        buffers: list = []  # Ray serializes numpy arrays as out-of-band pickle-5 buffers: count them, no copy
        shards_bytes += len(pickle.dumps(shard, protocol=5, buffer_callback=buffers.append))
        shards_bytes += sum(memoryview(b).nbytes for b in buffers)
        store[shard[0]] = shard[1]
        del shard, buffers
    features = store.copy()  # ClusterActor._run copies the store before the E-step thread
    t0 = time.perf_counter()
    pset = run_estep(features, [k], 0.1, niter=niter, nredo=nredo, max_points_per_centroid=mppc,
                     backend="cpu", num_threads=threads)
    seconds = time.perf_counter() - t0
    pset_bytes = len(pickle.dumps(pset, protocol=5))
    g = pset.granularities[0]
    return {"N": n, "k": k, "seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "baseline_rss_mb": rss0 / 1024, "shards_bytes": shards_bytes, "pset_bytes": pset_bytes,
            "assignments_bytes": g.assignments.nbytes, "centroids_bytes": g.centroids.nbytes}


def _child(args, queue) -> None:
    try:
        queue.put(_measure(*args))
    except Exception as exc:  # reported by the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def measure_point(n: int, k: int, *, niter: int, nredo: int, mppc: int, workers: int,
                  threads: int | None) -> dict[str, Any]:
    """:func:`_measure` in a spawned process (its own peak memory, nothing left over from the last point)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=((n, k, niter, nredo, mppc, workers, threads), queue))
    proc.start()
    out = queue.get()
    proc.join()
    if "error" in out:
        raise RuntimeError(f"estep-scale point N={n} k={k}: {out['error']}")
    return out


def fit_cost_model(points: list[dict[str, Any]], niter: int, nredo: int, mppc: int) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``seconds ≈ a · work_units + b · N`` (both clipped at >= 0)."""
    x = np.array([[work_units(p["N"], p["k"], niter, nredo, mppc), p["N"]] for p in points], dtype=np.float64)
    y = np.array([p["seconds"] for p in points], dtype=np.float64)
    scale = x.max(axis=0)
    coef, *_ = np.linalg.lstsq(x / scale, y, rcond=None)
    a, b = (np.maximum(coef, 0.0) / scale).tolist()
    return float(a), float(b)


def predict_seconds(a: float, b: float, n: int, ks, niter: int, nredo: int, mppc: int) -> float:
    return sum(a * work_units(n, k, niter, nredo, mppc) + b * n for k in ks)


def bench_estep_scale(cfg, report, *, grid=DEFAULT_GRID, niter: int = DEFAULT_NITER, nredo: int = 1,
                      workers: int | None = None, log=print) -> None:
    """Measure ``grid`` and add the rows of part ``estep-scale`` to ``report`` (a :class:`BenchReport`)."""
    mppc = int(cfg.estep.max_points_per_centroid)
    workers = int(workers or cfg.ray.num_workers)
    threads = cfg.estep.num_threads
    part = "estep-scale"
    report.info.update({"estep_scale_niter": niter, "estep_scale_nredo": nredo, "estep_scale_workers": workers,
                        "estep_scale_dim": DIM, "estep_scale_threads": threads or os.cpu_count()})
    points = []
    for n, k in grid:
        p = measure_point(n, k, niter=niter, nredo=nredo, mppc=mppc, workers=workers, threads=threads)
        points.append(p)
        tag = f"N={n} k={k}"
        report.add(part, f"{tag}: E-step time", p["seconds"], "s")
        report.add(part, f"{tag}: actor peak memory", p["peak_rss_mb"], "MB")
        report.add(part, f"{tag}: actor peak memory above the imports", p["peak_rss_mb"] - p["baseline_rss_mb"], "MB")
        report.add(part, f"{tag}: object store in (shards)", p["shards_bytes"] / 1e6, "MB/epoch")
        report.add(part, f"{tag}: PrototypeSet per worker", p["pset_bytes"] / 1e6, "MB/epoch")
        report.add(part, f"{tag}: object store out ({workers} workers fetch)", workers * p["pset_bytes"] / 1e6,
                   "MB/epoch")
        log(f"[pcl-ray] estep-scale {tag}: {p['seconds']:.2f}s, peak {p['peak_rss_mb']:.0f} MB, shards "
            f"{p['shards_bytes'] / 1e6:.1f} MB in, PrototypeSet {p['pset_bytes'] / 1e6:.2f} MB per worker")
    a, b = fit_cost_model(points, niter, nredo, mppc)
    report.add(part, "cost model a (s per d·k·point·iteration)", a, "s")
    report.add(part, "cost model b (s per point)", b, "s")
    worst = max(abs(predict_seconds(a, b, p["N"], [p["k"]], niter, nredo, mppc) - p["seconds"]) / p["seconds"]
                for p in points)
    report.add(part, "cost model worst relative error on the measured points", worst, "ratio")
    im = IMAGENET
    cpu_s = predict_seconds(a, b, im["N"], im["ks"], im["niter"], im["nredo"], im["mppc"])
    report.add(part, "PREDICTION ImageNet E-step on this CPU (k=25k/50k/100k, niter 20, nredo 5)", cpu_s, "s")
    report.add(part, f"PREDICTION ImageNet E-step on faiss-gpu (assumed {ASSUMED_GPU_SPEEDUP:.0f}x this CPU)",
               cpu_s / ASSUMED_GPU_SPEEDUP, "s")
    n_im, n_k = im["N"], len(im["ks"])
    report.add(part, "ImageNet: shards in per epoch (d=128)", n_im * (8 + 4 * DIM) / 1e6, "MB/epoch")
    report.add(part, "ImageNet: PrototypeSet assignments per worker (int64)", n_im * 8 * n_k / 1e6, "MB/epoch")
    report.add(part, "ImageNet: PrototypeSet centroids per worker", sum(im["ks"]) * DIM * 4 / 1e6, "MB/epoch")
    log(f"[pcl-ray] estep-scale cost model: t = {a:.3g}·d·k·(n_train·iters + N) + {b:.3g}·N s "
        f"(worst error {worst:.0%}); ImageNet predicted {cpu_s / 3600:.1f} h on this CPU, "
        f"{cpu_s / ASSUMED_GPU_SPEEDUP / 60:.1f} min on faiss-gpu (assumed {ASSUMED_GPU_SPEEDUP:.0f}x)")
