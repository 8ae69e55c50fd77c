"""One M-step epoch: :func:`~pcl_ray.training.step.train_step` over one rank's columns of the epoch's batches.

The Ray Train worker (:func:`pcl_ray.distributed.worker.mstep`) and ``bench --parts loop`` (the
single-process loop, :mod:`pcl_ray.bench_loop`) run the same function; nothing here imports Ray.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from ..data import iterate_batches
from .metrics import EpochMetrics
from .plan import EpochPlan
from .optim import prepare_views
from .schedule import lr_at
from .step import FiniteGuard, Precision, train_step
from .stream import StreamedEmbeddings
from .views import host_cropped_batches

__all__ = ["run_epoch"]


def run_epoch(method, online: torch.nn.Module, optimizer: torch.optim.Optimizer, ds, view_makers: list,
              crop_spec: Any, cfg, *, epoch: int, rank: int = 0, world: int = 1, local_bs: int | None = None,
              steps_per_epoch: int | None = None, device: torch.device | str = "cpu",
              precision: Precision | None = None, prototypes=None, global_step: int = 0,
              on_step: Callable[[int, int], None] | None = None,
              log: Callable[[str], None] | None = None) -> tuple[int, StreamedEmbeddings | None, dict[str, float]]:
    """Train epoch ``epoch`` on rank ``rank`` of ``world``; return (global step after it, streamed
    embeddings or None, metrics).

    ``online`` is ``method.net`` (DDP-wrapped when several ranks train); ``view_makers`` one per view the
    method trains on; ``crop_spec`` the host crop of a lazily decoded split (None: views cropped on the
    device). ``local_bs`` / ``steps_per_epoch`` default to the epoch plan's (``train.batch_size / world``,
    ``len(ds) // train.batch_size``). ``on_step(epoch, step)`` runs before each step (the worker's
    test-only kill); ``log`` gets a progress line every ``train.log_every`` steps (rank 0 passes one).

    The streamed embeddings (``estep.features=stream``) are this epoch's M-step embeddings for the next
    E-step. The metrics are the epoch's step averages plus ``lr`` (the last step's),
    ``throughput/img_per_s`` (all ranks' images) and ``time/epoch_s``.

    Non-finite losses are noted on the device (:class:`~pcl_ray.training.step.FiniteGuard`) and checked
    every ``train.log_every`` steps and at the epoch's end: a step reads nothing back to the host, and a
    NaN raises :class:`FloatingPointError` naming its step before the caller can checkpoint it.
    """
    device = torch.device(device)
    precision = precision or Precision.for_device(cfg.train.precision, device)
    n = len(ds)
    plan = EpochPlan(n, cfg.train.batch_size, cfg.train.seed, epoch)
    local_bs = plan.local_batch(world) if local_bs is None else local_bs
    steps_per_epoch = plan.steps if steps_per_epoch is None else steps_per_epoch
    online.train()
    # Every random draw of the epoch comes from seeds of (seed, epoch[, rank]), never from the history of
    # earlier epochs: a run resumed at an epoch boundary draws what an uninterrupted run draws. The global
    # generator (shuffle-BN's permutation, dropout) is the same on every rank.
    torch.manual_seed(cfg.train.seed * 1_000_003 + epoch * 7919 + 1)
    gen = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + epoch * 1009 + rank)
    collect = (method.needs_estep and cfg.estep.features == "stream"
               and cfg.train.warmup_epochs <= epoch + 1 < cfg.train.epochs)
    collecting = StreamedEmbeddings(epoch, steps_per_epoch * local_bs) if collect else None
    order = plan.rank_indices(rank, world)
    if crop_spec is not None:  # B×V×C×S×S: view i of every image, cropped from its full decoded image
        batches = host_cropped_batches(ds, order, local_bs, crop_spec, len(view_makers),
                                       seed=cfg.train.seed, epoch=epoch, loader_workers=cfg.data.views.loader_workers)
    else:  # B×C×H×W: the views are cropped on the device
        batches = iterate_batches(ds, order, local_bs, shuffle=False, seed=0, drop_last=True,
                                  loader_workers=cfg.data.views.loader_workers)
    guard = FiniteGuard()  # non-finite losses, read back only at the checks below
    sums = EpochMetrics()  # device-side sums: no host sync per step
    seen, lr = 0, lr_at(cfg, epoch, 0, steps_per_epoch)
    t_epoch = time.perf_counter()
    for step, (images, index) in enumerate(batches):
        if on_step is not None:
            on_step(epoch, step)
        lr = lr_at(cfg, epoch, step, steps_per_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = images.to(device, non_blocking=True)  # BxCxHxW (host crops: BxVxCxSxS)
        if crop_spec is not None:
            raw = [images[:, i] for i in range(len(view_makers))]  # V × (B×C×S×S)
        else:
            raw = [images] * len(view_makers)
        batch_views = prepare_views([make(x, generator=gen) for make, x in zip(view_makers, raw)], cfg)
        result = train_step(method, online, optimizer, batch_views, index.to(device), prototypes,
                            generator=gen, epoch=epoch, global_step=global_step, precision=precision, guard=guard)
        if collecting is not None:
            collecting.add(index, result.stream_embedding, method.name)
        global_step += 1
        seen += images.shape[0]
        sums.add({**result.metrics, "loss/total": result.loss.detach()})
        if (step + 1) % cfg.train.log_every == 0:  # every rank checks here: they all stop at the same step
            guard.check()
            if log is not None:
                rate = seen * world / (time.perf_counter() - t_epoch)
                log(f"epoch {epoch + 1}/{cfg.train.epochs} step {step + 1}/{steps_per_epoch} "
                    f"loss {sums.last('loss/total'):.3f} lr {lr:.4f} {rate:.0f} img/s")
    elapsed = time.perf_counter() - t_epoch
    guard.check()  # before the caller reports or checkpoints the epoch
    metrics = sums.means()
    metrics["lr"] = lr
    metrics["throughput/img_per_s"] = seen * world / elapsed
    metrics["time/epoch_s"] = elapsed
    return global_step, collecting, metrics
