"""The `bench` part ``loop``: the Ray Train loop against the single-process loop, on the same config.

Two candidates train the pipeline's config for ``epochs`` epochs (default 3) on its first ``images``
training images (default 4096, ``data.subset``), alternated (Ray, plain, Ray, plain; ``repeats`` = 2):

* **Ray Train loop**: a real :func:`pcl_ray.workflow.train` run (``ray.num_workers`` as configured,
  evaluation and the online kNN off) on a local Ray, with its storage and MLflow store in a temporary
  folder that is removed afterwards. Its per-epoch ``time/epoch_s`` and ``throughput/img_per_s`` are read
  back from the run's MLflow history.
* **single-process loop**: :func:`pcl_ray.training.run_epoch` in this process (rank 0 of 1, the global
  batch, torch threads = every CPU), the same epochs; a method with an E-step runs it in this process
  between epochs (:func:`~pcl_ray.training.embed_shard` + :func:`~pcl_ray.estep.run_estep`, or the streamed
  embeddings with ``estep.features=stream``), outside the M-step's time as in the Ray loop.

Rows: epoch-2+ throughput of each and their ratio; each one's first-epoch overhead (epoch 1's time minus
the mean of the later epochs; for a method with warm-up epochs the later epochs also train with
prototypes, which both loops share); the Ray run's ``train()`` wall time outside its M-step epochs and its
start-up (the call to epoch 1's first step, from the MLflow timestamp of epoch 1's report).

The single-process loop's intra-op threads are sensitive to other load on the machine: on a busy 2-CPU
machine its 2-thread steps cost ~2.5x the CPU time of the same steps on 1 thread (threads waiting for one
another), while Ray's 1-thread workers are not, so read the ratio together with the machine's load.

Not in ``bench all`` (:data:`pcl_ray.bench.DEFAULT_PARTS`): it starts a local Ray and trains real runs
(a minute or more even on the subset), and it runs only on a local Ray, unlike the other parts, which
measure in this process alone. Name it: ``--parts loop``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError

DEFAULT_IMAGES = 4096
DEFAULT_EPOCHS = 3
DEFAULT_REPEATS = 2


def check_loop_options(images: int = DEFAULT_IMAGES, epochs: int = DEFAULT_EPOCHS,
                       repeats: int = DEFAULT_REPEATS) -> None:
    """Refuse bad sizes before anything is measured (the CLI flags ``--loop-*``)."""
    if epochs < 2:
        raise ConfigError(f"--loop-epochs: expected at least 2 (epoch-2+ throughput), got {epochs}")
    if images < 1:
        raise ConfigError(f"--loop-images: expected a positive number of images, got {images}")
    if repeats < 1:
        raise ConfigError(f"--loop-repeats: expected a positive number of repetitions, got {repeats}")


def loop_config(cfg, images: int, epochs: int):
    """``cfg`` for the loop part: the first ``images`` training images, ``epochs`` epochs, no evaluation."""
    run = cfg.model_copy(deep=True)
    run.data.subset = min(images, run.data.subset or images)
    run.train.epochs = epochs
    run.train.warmup_epochs = min(run.train.warmup_epochs, epochs - 1)
    run.eval.enabled = False
    run.eval.online_every = 0
    run.ray.run_name = None
    run.tracking.run_name = None
    return type(cfg).model_validate(run.model_dump())  # re-validated: the subset fits every k and the batch


def _epoch_stats(times: list[float], rates: list[float]) -> dict[str, float]:
    later = times[1:]
    return {"rate": float(np.mean(rates[1:])), "overhead": times[0] - float(np.mean(later)),
            "epoch1": times[0], "later": float(np.mean(later))}


def ray_run(cfg, folder: Path, name: str) -> dict[str, float]:
    """One short ``train`` run of ``cfg`` with its storage and MLflow store under ``folder``."""
    from mlflow.tracking import MlflowClient

    from .workflow import train

    run = cfg.model_copy(deep=True)
    run.ray.storage_path = str(folder / "runs")  # nothing under the user's runs/ or mlruns/
    run.tracking.uri = f"sqlite:///{folder / 'mlflow.db'}"
    run.tracking.experiment = "bench-loop"
    start_wall = time.time()
    t0 = time.perf_counter()
    out = train(run, run_name=name, log=lambda _: None)
    wall = time.perf_counter() - t0
    client = MlflowClient(out.tracking_uri)

    def history(key: str) -> dict[int, tuple[float, int]]:
        return {m.step: (m.value, m.timestamp) for m in client.get_metric_history(out.mlflow_run_id, key)}

    times, rates, esteps = history("time/epoch_s"), history("throughput/img_per_s"), history("time/estep_total_s")
    steps = sorted(times)
    if steps != list(range(1, cfg.train.epochs + 1)):
        raise RuntimeError(f"bench loop: the Ray run logged time/epoch_s for epochs {steps}, "
                           f"expected 1..{cfg.train.epochs}")
    stats = _epoch_stats([times[s][0] for s in steps], [rates[s][0] for s in steps])
    first_start = times[1][1] / 1000.0 - times[1][0] - esteps.get(1, (0.0, 0))[0]  # wall clock, s
    stats["startup"] = first_start - start_wall
    stats["outside"] = wall - sum(times[s][0] for s in steps)
    stats["estep"] = float(np.mean([v for v, _ in esteps.values()])) if esteps else 0.0
    return stats


class PlainLoop:
    """The Ray worker's epochs through :func:`~pcl_ray.training.run_epoch` in this process (rank 0 of 1),
    one epoch per call, so that several candidates can be trained side by side, epoch by epoch.

    A method with an E-step runs it in this process before the epoch's M-step, as the worker hands it off
    (:func:`~pcl_ray.training.estep_shard`, then :func:`~pcl_ray.estep.run_estep` on the (N, d) store;
    ``estep.warm_start`` from the last E-step's centroids).
    """

    def __init__(self, cfg, ds, device: torch.device):
        from .distributed.trainer import estep_kwargs
        from .methods import build_method
        from .training import Precision, build_optimizer, build_view_makers, host_crop_spec, prepare_model

        self.cfg, self.ds, self.device = cfg, ds, device
        torch.manual_seed(cfg.train.seed)  # the worker's initialisation
        self.method = build_method(cfg, ds.channels,
                                   generator=torch.Generator().manual_seed(cfg.train.seed)).to(device)
        prepare_model(self.method, cfg, device)
        self.crop_spec = host_crop_spec(self.method, cfg, ds)
        self.makers, self.views = build_view_makers(self.method, cfg, ds, crop_on_device=self.crop_spec is None)
        self.optimizer = build_optimizer(cfg, self.method.net.parameters())
        self.precision = Precision.for_device(cfg.train.precision, device)
        self.estep_kwargs = estep_kwargs(cfg, gpu=device.type == "cuda")
        self.ks = self.estep_kwargs.pop("num_clusters")
        self.global_step, self.streamed, self.last = 0, None, None

    def _estep(self, epoch: int):
        from .estep import run_estep
        from .training import estep_shard

        cfg, n = self.cfg, len(self.ds)
        own, emb, _ = estep_shard(self.method, self.ds, self.views, cfg, epoch, self.streamed,
                                  batch_size=max(256, cfg.train.batch_size), device=self.device)
        feats = np.empty((n, emb.shape[1]), dtype=np.float32)  # (N, d), row i = image i, as the actor stores
        feats[own] = emb
        kwargs, init = self.estep_kwargs, None
        if cfg.estep.warm_start and self.last is not None:
            init = [g.centroids for g in self.last.granularities]
            kwargs = {**kwargs, "warm_niter": cfg.estep.warm_niter}
        self.last = run_estep(feats, self.ks, epoch=epoch, init_centroids=init, **kwargs)
        prototypes = self.last.to_torch(self.device)
        self.method.on_prototypes(prototypes)
        return prototypes

    def epoch(self, epoch: int) -> dict[str, float]:
        """Train ``epoch`` (E-step first when it has one); ``{"estep_s", "epoch_s", "rate"}``."""
        from .training import run_epoch

        cfg, prototypes, estep_s = self.cfg, None, 0.0
        if self.method.needs_estep and epoch >= cfg.train.warmup_epochs:
            t0 = time.perf_counter()
            prototypes = self._estep(epoch)
            estep_s = time.perf_counter() - t0
        self.global_step, self.streamed, metrics = run_epoch(
            self.method, self.method.net, self.optimizer, self.ds, self.makers, self.crop_spec, cfg, epoch=epoch,
            rank=0, world=1, device=self.device, precision=self.precision, prototypes=prototypes,
            global_step=self.global_step)
        return {"estep_s": estep_s, "epoch_s": metrics["time/epoch_s"], "rate": metrics["throughput/img_per_s"]}


def plain_run(cfg, ds, device: torch.device) -> dict:
    """All of ``cfg``'s epochs through :class:`PlainLoop`, with every CPU thread.

    Returns :func:`_epoch_stats` plus ``estep`` (mean E-step seconds) and the per-epoch lists ``epoch_s``
    (M-step) and ``estep_s`` (the E-step run before that epoch's M-step, 0 for none).
    """
    torch.set_num_threads(os.cpu_count() or 1)
    loop = PlainLoop(cfg, ds, device)
    per_epoch = [loop.epoch(e) for e in range(cfg.train.epochs)]
    times, rates = [p["epoch_s"] for p in per_epoch], [p["rate"] for p in per_epoch]
    esteps = [p["estep_s"] for p in per_epoch if p["estep_s"] > 0]
    stats = _epoch_stats(times, rates)
    stats["estep"] = float(np.mean(esteps)) if esteps else 0.0
    stats["epoch_s"] = times
    stats["estep_s"] = [p["estep_s"] for p in per_epoch]
    return stats


def bench_loop(cfg, report, *, images: int = DEFAULT_IMAGES, epochs: int = DEFAULT_EPOCHS,
               repeats: int = DEFAULT_REPEATS, log=print) -> None:
    """Alternate ``repeats`` Ray runs and single-process runs of ``cfg`` (see the module docstring)."""
    import ray

    from .data import load_split
    from .distributed.connect import attach_address
    from .distributed.trainer import init_ray

    check_loop_options(images, epochs, repeats)
    if not ray.is_initialized() and attach_address(cfg) is not None:
        raise ConfigError("bench --parts loop: runs on a local Ray next to this process; unset ray.address "
                          "(and RAY_ADDRESS)")
    run_cfg = loop_config(cfg, images, epochs)
    ds = load_split(run_cfg.data, "train")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.ray.use_gpu is not False else "cpu")
    report.info["loop"] = (f"{epochs} epochs on {len(ds)} images, {repeats} repetitions, "
                           f"{run_cfg.ray.num_workers} Ray workers")
    t0 = time.perf_counter()
    started = init_ray(run_cfg)  # before the timed runs: every Ray run's start-up excludes Ray's own
    if started:
        report.add("loop", "local Ray start (ray.init)", time.perf_counter() - t0, "s")
    threads = torch.get_num_threads()
    results: dict[str, list[dict[str, float]]] = {"ray": [], "plain": []}
    try:
        with tempfile.TemporaryDirectory(prefix="pcl-ray-bench-loop-") as tmp:
            for rep in range(repeats):
                log(f"[pcl-ray] loop {rep + 1}/{repeats}: Ray Train run ({run_cfg.ray.num_workers} workers)")
                results["ray"].append(ray_run(run_cfg, Path(tmp), f"bench-loop-{rep + 1}"))
                log(f"[pcl-ray] loop {rep + 1}/{repeats}: single-process run")
                results["plain"].append(plain_run(run_cfg, ds, device))
    finally:
        torch.set_num_threads(threads)
        if started:
            ray.shutdown()

    def mean(who: str, key: str) -> float:
        return float(np.mean([r[key] for r in results[who]]))

    b = run_cfg.train.batch_size
    ray_rate = report.add("loop", f"Ray Train loop, epoch 2+ throughput (batch {b})", mean("ray", "rate"), "img/s")
    plain_rate = report.add("loop", "single-process loop, epoch 2+ throughput", mean("plain", "rate"), "img/s")
    report.add("loop", "Ray / single-process throughput", ray_rate / plain_rate, "ratio")
    report.add("loop", "Ray Train loop, first-epoch overhead (epoch 1 - mean of later)", mean("ray", "overhead"), "s")
    report.add("loop", "single-process loop, first-epoch overhead (epoch 1 - mean of later)",
               mean("plain", "overhead"), "s")
    report.add("loop", "single-process loop, first-epoch overhead of its first run", results["plain"][0]["overhead"],
               "s")
    report.add("loop", "Ray run start-up (train() call to epoch 1's first step)", mean("ray", "startup"), "s")
    report.add("loop", "Ray run: train() wall time minus its M-step epochs", mean("ray", "outside"), "s")
    if run_cfg.needs_estep:
        report.add("loop", "Ray Train loop, E-step hand-off per E-step", mean("ray", "estep"), "s")
        report.add("loop", "single-process loop, E-step per E-step (embed + k-means)", mean("plain", "estep"), "s")
