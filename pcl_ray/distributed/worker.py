"""The Ray Train worker loop: the M-step on each worker, the E-step hand-off to the cluster actor."""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from ..config import ExperimentConfig
from ..data import ViewMaker, iterate_batches, load_split, shard_indices
from ..methods import build_method
from ..methods.base import unwrap
from ..models.collectives import broadcast_buffers
from ..training import EpochPlan, lr_at
from .cluster_actor import NAMESPACE, actor_name
from .fault_injection import injected_kill, kill_if_due  # test-only (tests/test_faults_worker.py)
from .handoff import fetch_prototypes

STATE_FILE = "state.pt"


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


class StreamedEmbeddings:
    """One rank's M-step embeddings of one epoch, kept for the next epoch's E-step (``estep.features=stream``)."""

    def __init__(self, epoch: int, capacity: int):
        self.epoch = epoch
        self.capacity = capacity
        self.indices = np.empty(capacity, dtype=np.int64)
        self.embeddings: np.ndarray | None = None
        self.filled = 0

    def add(self, index: torch.Tensor, embedding: torch.Tensor | None, method_name: str) -> None:
        if embedding is None:
            raise RuntimeError(f"estep.features=stream: method {method_name!r} sets no stream_embedding")
        emb = embedding.detach().float().cpu().numpy()
        if self.embeddings is None:
            self.embeddings = np.empty((self.capacity, emb.shape[1]), dtype=np.float32)
        end = self.filled + emb.shape[0]
        self.indices[self.filled:end] = index.cpu().numpy()
        self.embeddings[self.filled:end] = emb
        self.filled = end

    def shard(self) -> tuple[np.ndarray, np.ndarray]:
        assert self.embeddings is not None
        return self.indices[: self.filled], self.embeddings[: self.filled]


@torch.no_grad()
def embed_shard(method, ds, views: ViewMaker, indices: np.ndarray, batch_size: int, device,
                loader_workers: int = 0) -> np.ndarray:
    """The method's E-step embeddings (eval mode, deterministic transform) of ``indices``, in that order."""
    module = method.estep_module()
    was_training = module.training
    module.eval()
    out = []
    for images, _ in iterate_batches(ds, indices, batch_size, shuffle=False, seed=0, drop_last=False,
                                     loader_workers=loader_workers):
        out.append(method.embed_for_estep(views.eval(images.to(device))).float().cpu())
    module.train(was_training)
    return torch.cat(out).numpy()


def build_view_makers(method, cfg: ExperimentConfig, ds) -> tuple[list[ViewMaker], ViewMaker]:
    """One ViewMaker per view the method asks for, plus the deterministic evaluation transform."""
    size = ds.image_size

    def make(spec_size: int, lo: float, hi: float) -> ViewMaker:
        return ViewMaker(cfg.data.views.recipe, spec_size, ds.channels, ds.mean, ds.std,
                         crop_min_scale=lo, crop_max_scale=hi)

    makers = [make(v.size, v.min_scale, v.max_scale) for v in method.view_specs(size)]
    return makers, make(size, cfg.data.views.crop_min_scale, 1.0)


def rank_state_file(rank: int, world: int) -> str:
    return f"rank_{rank}_of_{world}.pt"


def _save_state(path: Path, method, optimizer, epoch: int, step: int, extra: dict) -> None:
    torch.save(
        {"method": unwrap(method).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
         "global_step": step, **extra},
        path,
    )


def train_loop(loop_config: dict) -> None:
    cfg = ExperimentConfig.model_validate(loop_config["cfg"])
    _quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(loop_config.get("threads_per_worker", 1))))
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # identical init on every rank

    ds = load_split(cfg.data, "train")
    n = len(ds)
    method = build_method(cfg, ds.channels, generator=torch.Generator().manual_seed(cfg.train.seed)).to(device)
    view_makers, views = build_view_makers(method, cfg, ds)
    online = ray.train.torch.prepare_model(method.net)
    optimizer = torch.optim.SGD([p for p in unwrap(online).parameters() if p.requires_grad], lr=cfg.train.lr,
                                momentum=cfg.train.sgd_momentum, weight_decay=cfg.train.weight_decay)

    start_epoch, global_step = 0, 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and loop_config.get("init_checkpoint"):  # PBT: start from the cloned trial's state
        ckpt = ray.train.Checkpoint(loop_config["init_checkpoint"])
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = torch.load(Path(d) / STATE_FILE, map_location=device, weights_only=True)
            own_file = Path(d) / rank_state_file(rank, world)
            if own_file.is_file():  # same world size: this rank's own state (e.g. SwAV's queue) continues
                method.load_rank_state(torch.load(own_file, map_location=device, weights_only=True))
            elif rank == 0 and any(Path(d).glob("rank_*_of_*.pt")):
                say(f"resumed on {world} workers from a checkpoint of another world size: per-rank state "
                    "(e.g. SwAV's queue) starts empty")
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, global_step = int(state["epoch"]) + 1, int(state["global_step"])
        if rank == 0:
            say(f"resumed from checkpoint after epoch {state['epoch'] + 1}")

    # The epoch's global batches depend on (seed, epoch) only; this rank takes its columns of each.
    plan = EpochPlan(n, cfg.train.batch_size, cfg.train.seed, 0)  # sizes only: the same every epoch
    local_bs, steps_per_epoch = plan.local_batch(world), plan.steps
    if rank == 0 and world != cfg.ray.num_workers:
        say(f"training on {world} of up to {cfg.ray.num_workers} workers (elastic): same global batches, "
            f"{local_bs} images per worker")
    actor = ray.get_actor(actor_name(loop_config["run_name"]), namespace=NAMESPACE) if method.needs_estep else None
    online_knn = None
    if rank == 0 and cfg.eval.online_every:
        from ..evaluation.online import OnlineKNN

        online_knn = OnlineKNN(ds, cfg.eval.online_bank, cfg.eval.online_queries, cfg.eval.knn_k,
                               cfg.eval.knn_temperature, seed=cfg.train.seed)
    tracker = None
    if rank == 0 and loop_config.get("mlflow"):
        from ..tracking import RunLogger

        tracker = RunLogger(**loop_config["mlflow"])

    streamed: StreamedEmbeddings | None = None  # the previous epoch's M-step embeddings (estep.features=stream)
    kill_at = injected_kill()  # test-only fault injection; None in every real run
    for epoch in range(start_epoch, cfg.train.epochs):
        metrics: dict[str, float] = {"epoch": epoch + 1}
        prototypes = None
        if method.needs_estep and epoch >= cfg.train.warmup_epochs:
            t0 = time.perf_counter()
            embed_bs = max(256, local_bs)
            if streamed is not None and streamed.epoch == epoch - 1:
                # last epoch's embeddings, plus a fresh pass over the few images no rank trained on
                rest = EpochPlan(n, cfg.train.batch_size, cfg.train.seed, epoch - 1).untrained()[rank::world]
                seen_idx, seen_emb = streamed.shard()
                extra = embed_shard(method, ds, views, rest, embed_bs, device) if rest.size else seen_emb[:0]
                own, emb = np.concatenate([seen_idx, rest]), np.concatenate([seen_emb, extra])
                source = "the M-step's embeddings of the last epoch"
            else:  # the paper's mode; also the first E-step after a resume in stream mode
                own = shard_indices(n, rank, world)
                emb = embed_shard(method, ds, views, own, embed_bs, device, cfg.data.views.loader_workers)
                source = "an eval pass"
            metrics["estep/from_stream"] = float(streamed is not None and streamed.epoch == epoch - 1)
            streamed = None
            idx_ref, emb_ref = ray.put(own), ray.put(emb)
            pset = fetch_prototypes(actor, epoch, rank,
                                    lambda: actor.submit_shard.remote(epoch, rank, idx_ref, emb_ref),
                                    timeout_s=cfg.estep.handoff_timeout_s, grace_s=cfg.estep.handoff_grace_s,
                                    device=device)
            prototypes = pset.to_torch(device)
            method.on_prototypes(prototypes)
            metrics.update(pset.stats())
            metrics["time/estep_total_s"] = time.perf_counter() - t0
            if rank == 0:
                ks = ",".join(str(g.num_clusters) for g in pset.granularities)
                say(f"epoch {epoch + 1}: E-step k=[{ks}] on {source}, {pset.backend} "
                    f"k-means {pset.seconds:.2f}s, total {metrics['time/estep_total_s']:.2f}s")

        online.train()
        # Every random draw of the epoch comes from seeds of (seed, epoch[, rank]), never from the history of
        # earlier epochs: a run resumed at an epoch boundary draws what an uninterrupted run draws. The global
        # generator (shuffle-BN's permutation, dropout) is the same on every rank.
        torch.manual_seed(cfg.train.seed * 1_000_003 + epoch * 7919 + 1)
        gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + epoch * 1009 + rank)
        sums: dict[str, float] = {}
        seen = 0
        t_epoch = time.perf_counter()
        order = EpochPlan(n, cfg.train.batch_size, cfg.train.seed, epoch).rank_indices(rank, world)
        collect = (method.needs_estep and cfg.estep.features == "stream"
                   and cfg.train.warmup_epochs <= epoch + 1 < cfg.train.epochs)
        collecting = StreamedEmbeddings(epoch, steps_per_epoch * local_bs) if collect else None
        batches = iterate_batches(ds, order, local_bs, shuffle=False, seed=0, drop_last=True,
                                  loader_workers=cfg.data.views.loader_workers)
        for step, (images, index) in enumerate(batches):
            if kill_at is not None:  # test-only: tests/test_faults_worker.py kills this worker here
                kill_if_due(kill_at, epoch, step, rank)
            lr = lr_at(cfg, epoch, step, steps_per_epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            images = images.to(device, non_blocking=True)
            batch_views = [make(images, generator=gen) for make in view_makers]
            loss, parts = method.training_loss(online, batch_views, index.to(device), prototypes, generator=gen,
                                               epoch=epoch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch + 1} step {step}: {parts}")
            if collecting is not None:
                collecting.add(index, method.stream_embedding, method.name)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            method.before_optimizer_step(epoch, global_step)
            optimizer.step()
            method.after_step()
            global_step += 1
            seen += images.shape[0]
            parts["loss/total"] = float(loss.detach())
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + value
            if rank == 0 and (step + 1) % cfg.train.log_every == 0:
                rate = seen * world / (time.perf_counter() - t_epoch)
                say(f"epoch {epoch + 1}/{cfg.train.epochs} step {step + 1}/{steps_per_epoch} "
                      f"loss {parts['loss/total']:.3f} lr {lr:.4f} {rate:.0f} img/s")
        elapsed = time.perf_counter() - t_epoch
        streamed = collecting
        metrics.update({k: v / max(1, step + 1) for k, v in sums.items()})
        metrics["lr"] = lr
        metrics["throughput/img_per_s"] = seen * world / elapsed
        metrics["time/epoch_s"] = elapsed

        broadcast_buffers(method)  # every rank holds rank 0's buffers: the checkpoint is every rank's state

        if online_knn is not None and (epoch + 1) % cfg.eval.online_every == 0:
            acc = online_knn(method.encoder, views, device)
            if acc is not None:
                metrics["online/knn_acc"] = acc

        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            own = method.rank_state()  # per-rank state (SwAV's queue): each rank adds its file to the checkpoint
            if own:
                torch.save(own, Path(tmp) / rank_state_file(rank, world))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            if rank == 0:
                _save_state(Path(tmp) / STATE_FILE, method, optimizer, epoch, global_step,
                            {"config": loop_config["cfg"]})
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
                summary = " ".join(f"{k.split('/')[-1]} {metrics[k]:.3f}" for k in
                                   ("loss/total", "acc/instance", "acc/proto", "online/knn_acc")
                                   if k in metrics)
                say(f"epoch {epoch + 1}/{cfg.train.epochs} done in {elapsed:.1f}s: {summary} "
                      f"({metrics['throughput/img_per_s']:.0f} img/s)")
                if tracker is not None:
                    tracker.log_metrics(metrics, step=epoch + 1, final=epoch + 1 == cfg.train.epochs)
            ray.train.report(metrics, checkpoint=checkpoint)
