"""The Ray Train worker loop: the M-step on each worker, the E-step hand-off to the cluster actor.

Read :func:`train_loop` first: set-up, resume, then per epoch E-step hand-off → M-step → report. Everything
that does not need Ray (the step, the schedule, the epoch's index plan, streamed embeddings, checkpoint
files) lives in :mod:`pcl_ray.training`.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch

from ..config import ExperimentConfig
from ..data import ViewMaker, load_split
from ..estep.prototypes import PrototypeTensors
from ..methods import build_method
from ..methods.base import Method, unwrap
from ..models.collectives import broadcast_buffers
from ..training import (
    RANK_STATE_GLOB,
    STATE_FILE,
    EpochPlan,
    Precision,
    StreamedEmbeddings,
    build_view_makers,
    estep_shard,
    host_crop_spec,
    load_state,
    rank_state_file,
    build_optimizer,
    prepare_model,
    run_epoch,
    save_state,
    stream_state_file,
)
from .cluster_actor import NAMESPACE, actor_name
from .fault_injection import injected_kill, kill_if_due  # test-only (tests/distributed/test_faults_worker.py)
from .handoff import fetch_health, fetch_prototypes

__all__ = ["STATE_FILE", "say", "train_loop"]


def say(message: str) -> None:
    """One progress line on the driver's console (bypasses Ray Train's print patch, which tees twice)."""
    sys.stdout.write(f"[pcl-ray] {message}\n")
    sys.stdout.flush()


def _quiet_report_log() -> None:
    """Ray Train logs every report's full metrics dict at INFO from each worker; keep the console readable."""
    try:
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
    except Exception:  # internal module moved: the lines just stay
        pass


@dataclass
class Worker:
    """What one rank trains with, built once by :func:`set_up`."""

    cfg: ExperimentConfig
    loop_config: dict
    rank: int
    world: int
    device: torch.device
    ds: Any  #: the training split
    method: Method
    online: torch.nn.Module  #: ``method.net``, DDP-wrapped when several workers train
    optimizer: torch.optim.Optimizer
    precision: Precision
    view_makers: list[ViewMaker]  #: one per view the method trains on
    views: ViewMaker  #: the deterministic evaluation transform (E-step, online kNN)
    local_bs: int
    steps_per_epoch: int
    actor: Any = None  #: the cluster actor (methods with an E-step)
    online_knn: Any = None  #: rank 0, ``eval.online_every``
    tracker: Any = None  #: rank 0, MLflow
    crop_spec: Any = None  #: lazily decoded splits: the crop taken from the full image in loader processes
    kill_at: Any = field(default=None)  #: test-only fault injection; None in every real run

    @property
    def n(self) -> int:
        return len(self.ds)


def train_loop(loop_config: dict) -> None:
    """Ray Train's per-worker function: set-up, resume, then E-step → M-step → report once per epoch."""
    w = set_up(loop_config)
    # streamed: the previous epoch's M-step embeddings (estep.features=stream), from the checkpoint on a resume
    start_epoch, global_step, streamed = resume(w)
    for epoch in range(start_epoch, w.cfg.train.epochs):
        metrics: dict[str, float] = {"epoch": epoch + 1}
        prototypes = None
        if w.method.needs_estep and epoch >= w.cfg.train.warmup_epochs:
            prototypes = estep_handoff(w, epoch, streamed, metrics)
        global_step, streamed = mstep(w, epoch, prototypes, global_step, metrics)
        if prototypes is not None and w.rank == 0:  # label agreement, computed by the actor during the M-step
            metrics.update(fetch_health(w.actor, epoch))
        report(w, epoch, global_step, metrics, prototypes, streamed)


# ---- set-up and resume ----------------------------------------------------------------------------------
def set_up(loop_config: dict) -> Worker:
    """Data, method, DDP wrapper, optimizer, precision, views; the actor, online kNN and tracker handles."""
    cfg = ExperimentConfig.model_validate(loop_config["cfg"])
    _quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # identical init on every rank

    ds = load_split(cfg.data, "train")
    method = build_method(cfg, ds.channels, generator=torch.Generator().manual_seed(cfg.train.seed)).to(device)
    prepare_model(method, cfg, device)  # train.channels_last / train.compile
    crop_spec = host_crop_spec(method, cfg, ds)  # lazily decoded splits crop from the full image
    view_makers, views = build_view_makers(method, cfg, ds, crop_on_device=crop_spec is None)
    online = ray.train.torch.prepare_model(method.net)
    optimizer = build_optimizer(cfg, unwrap(online).parameters())
    precision = Precision.for_device(cfg.train.precision, device)

    # The epoch's global batches depend on (seed, epoch) only; this rank takes its columns of each.
    plan = EpochPlan(len(ds), cfg.train.batch_size, cfg.train.seed, 0)  # sizes only: the same every epoch
    w = Worker(cfg, loop_config, rank, world, device, ds, method, online, optimizer, precision, view_makers,
               views, plan.local_batch(world), plan.steps, crop_spec=crop_spec, kill_at=injected_kill())
    if rank == 0 and world != cfg.ray.num_workers:
        say(f"training on {world} of up to {cfg.ray.num_workers} workers (elastic): same global batches, "
            f"{w.local_bs} images per worker")
    if method.needs_estep:
        w.actor = ray.get_actor(actor_name(loop_config["run_name"]), namespace=NAMESPACE)
    if rank == 0 and cfg.eval.online_every:
        from ..evaluation.online import OnlineKNN

        w.online_knn = OnlineKNN(ds, cfg.eval.online_bank, cfg.eval.online_queries, cfg.eval.knn_k,
                                 cfg.eval.knn_temperature, seed=cfg.train.seed)
    if rank == 0 and loop_config.get("mlflow"):
        from ..tracking import RunLogger

        w.tracker = RunLogger(**loop_config["mlflow"])
    return w


def resume(w: Worker) -> tuple[int, int, StreamedEmbeddings | None]:
    """Load this run's latest checkpoint (or PBT's cloned trial's); return (first epoch, global step, this rank's
    streamed embeddings of the checkpoint's epoch or None).

    With ``estep.warm_start`` the checkpoint's last E-step centroids prime the cluster actor (a new one after a
    driver resume), so the next E-step starts from them as the uninterrupted run's did.
    """
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and w.loop_config.get("init_checkpoint"):  # PBT: start from the cloned trial's state
        ckpt = ray.train.Checkpoint(w.loop_config["init_checkpoint"])
    if ckpt is None:
        return 0, 0, None
    streamed = None
    with ckpt.as_directory() as d:
        state = load_state(Path(d), w.device)
        own_file = Path(d) / rank_state_file(w.rank, w.world)
        if own_file.is_file():  # same world size: this rank's own state (e.g. SwAV's queue) continues
            w.method.load_rank_state(torch.load(own_file, map_location=w.device, weights_only=True))
        elif w.rank == 0 and any(Path(d).glob(RANK_STATE_GLOB)):
            say(f"resumed on {w.world} workers from a checkpoint of another world size: per-rank state "
                "(e.g. SwAV's queue) starts empty")
        stream_file = Path(d) / stream_state_file(w.rank, w.world)
        if stream_file.is_file():  # same world size: the next E-step clusters these rows, as it would have
            streamed = StreamedEmbeddings.from_state(torch.load(stream_file, map_location="cpu", weights_only=True))
    w.method.load_state_dict(state["method"])
    w.optimizer.load_state_dict(state["optimizer"])
    w.precision.load_state_dict(state.get("grad_scaler", {}))
    epoch = int(state["epoch"])
    if w.rank == 0:
        say(f"resumed from checkpoint after epoch {epoch + 1}")
        if w.cfg.estep.features == "stream" and w.method.needs_estep and streamed is None \
                and w.cfg.train.warmup_epochs <= epoch + 1 < w.cfg.train.epochs:
            say("estep.features=stream: the checkpoint holds no streamed embeddings for this world size, so the "
                "next E-step embeds with an eval pass")
    if w.actor is not None and w.cfg.estep.warm_start and "estep_centroids" in state:
        centroids = [c.cpu().numpy() for c in state["estep_centroids"]]  # per granularity (k, d)
        ray.get(w.actor.prime_warm_start.remote(int(state["estep_epoch"]), centroids))  # before this rank's shard
    return epoch + 1, int(state["global_step"]), streamed


# ---- E-step hand-off ------------------------------------------------------------------------------------
def estep_handoff(w: Worker, epoch: int, streamed: StreamedEmbeddings | None,
                  metrics: dict[str, float]) -> list[PrototypeTensors]:
    """Embed this rank's shard (or reuse last epoch's M-step embeddings), send it to the cluster actor and
    wait for the epoch's prototypes; the E-step's stats go to ``metrics``."""
    t0 = time.perf_counter()
    own, emb, from_stream = estep_shard(w.method, w.ds, w.views, w.cfg, epoch, streamed, rank=w.rank,
                                        world=w.world, batch_size=max(256, w.local_bs), device=w.device)
    source = "the M-step's embeddings of the last epoch" if from_stream else "an eval pass"
    metrics["estep/from_stream"] = float(from_stream)
    idx_ref, emb_ref = ray.put(own), ray.put(emb)
    actor, rank = w.actor, w.rank
    pset = fetch_prototypes(actor, epoch, rank, lambda: actor.submit_shard.remote(epoch, rank, idx_ref, emb_ref),
                            timeout_s=w.cfg.estep.handoff_timeout_s, grace_s=w.cfg.estep.handoff_grace_s,
                            device=w.device)
    prototypes = pset.to_torch(w.device)
    w.method.on_prototypes(prototypes)
    metrics.update(pset.stats())
    metrics["time/estep_total_s"] = time.perf_counter() - t0
    if w.rank == 0:
        ks = ",".join(str(g.num_clusters) for g in pset.granularities)
        say(f"epoch {epoch + 1}: E-step k=[{ks}] on {source}, {pset.backend} "
            f"k-means {pset.seconds:.2f}s, total {metrics['time/estep_total_s']:.2f}s")
    return prototypes


# ---- M-step ---------------------------------------------------------------------------------------------
def mstep(w: Worker, epoch: int, prototypes: list[PrototypeTensors] | None, global_step: int,
          metrics: dict[str, float]) -> tuple[int, StreamedEmbeddings | None]:
    """One epoch of :func:`~pcl_ray.training.train_step` over this rank's columns of the epoch's batches
    (:func:`~pcl_ray.training.run_epoch`).

    Returns the global step after the epoch and, in stream mode, this epoch's embeddings for the next
    E-step. The epoch's averages, lr, throughput and time go to ``metrics``.
    """
    def kill(e: int, step: int) -> None:  # test-only: tests/distributed/test_faults_worker.py kills this worker here
        kill_if_due(w.kill_at, e, step, w.rank)

    global_step, collecting, epoch_metrics = run_epoch(
        w.method, w.online, w.optimizer, w.ds, w.view_makers, w.crop_spec, w.cfg, epoch=epoch, rank=w.rank,
        world=w.world, local_bs=w.local_bs, steps_per_epoch=w.steps_per_epoch, device=w.device,
        precision=w.precision, prototypes=prototypes, global_step=global_step,
        on_step=kill if w.kill_at is not None else None,
        log=say if w.rank == 0 else None)
    metrics.update(epoch_metrics)
    return global_step, collecting


# ---- report and checkpoint ------------------------------------------------------------------------------
def report(w: Worker, epoch: int, global_step: int, metrics: dict[str, float],
           prototypes: list[PrototypeTensors] | None = None, streamed: StreamedEmbeddings | None = None) -> None:
    """Sync buffers, run the online kNN, write the checkpoint (rank 0's state + per-rank files), log the
    epoch line and MLflow metrics, and hand both to ``ray.train.report``.

    The checkpoint also carries what the next E-step starts from, so that a resume is exact: each rank's
    ``streamed`` embeddings (``estep.features=stream``) and, with ``estep.warm_start``, this epoch's centroids.
    """
    cfg = w.cfg
    broadcast_buffers(w.method)  # every rank holds rank 0's buffers: the checkpoint is every rank's state
    if w.online_knn is not None and (epoch + 1) % cfg.eval.online_every == 0:
        acc = w.online_knn(w.method.encoder, w.views, w.device)
        if acc is not None:
            metrics["online/knn_acc"] = acc

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        own = w.method.rank_state()  # per-rank state (SwAV's queue): each rank adds its file to the checkpoint
        if own:
            torch.save(own, Path(tmp) / rank_state_file(w.rank, w.world))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        if streamed is not None:  # the next E-step's input, this rank's rows
            torch.save(streamed.state_dict(), Path(tmp) / stream_state_file(w.rank, w.world))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        if w.rank == 0:
            extra = {"config": w.loop_config["cfg"]}
            if prototypes is not None and cfg.estep.warm_start:  # the next E-step's warm start
                extra.update(estep_epoch=epoch, estep_centroids=[p.centroids.cpu() for p in prototypes])
            save_state(Path(tmp) / STATE_FILE, w.method, w.optimizer, epoch, global_step,
                       scaler=w.precision.state_dict(), extra=extra)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            shown = (("loss/total", "loss {:.3f}"), ("acc/instance", "instance acc {:.1f}%"),
                     ("acc/proto", "proto acc {:.1f}%"), ("online/knn_acc", "online kNN {:.3f}"))
            summary = " ".join(fmt.format(metrics[k]) for k, fmt in shown if k in metrics)
            say(f"epoch {epoch + 1}/{cfg.train.epochs} done in {metrics['time/epoch_s']:.1f}s: {summary} "
                f"({metrics['throughput/img_per_s']:.0f} img/s)")
            if w.tracker is not None:
                w.tracker.log_metrics(metrics, step=epoch + 1, final=epoch + 1 == cfg.train.epochs)
        ray.train.report(metrics, checkpoint=checkpoint)
