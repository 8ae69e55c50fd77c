"""The `bench` part ``epoch``: the PCL epoch against the MoCo epoch on the same data, model and batch.

Measured in one process, alternated (:func:`pcl_ray.bench._alternating`): a PCL training step (with its
prototypes) against a MoCo v2 step (same encoder, same views made in advance); the E-step of each feature
mode: ``stream`` = k-means + φ at every granularity (cold: ``estep.nredo`` random restarts; warm:
``estep.warm_start`` from the previous centroids), ``eval_pass`` = the same plus embedding the training split
(timed on a slice, scaled to the split). The epoch ratio is
``(N/B · t_pcl_step + t_estep) / (N/B · t_moco_step)`` per mode.
"""

from __future__ import annotations

import numpy as np
import torch


def bench_epoch(cfg, ds, device, report, steps: int, alternating, batch, embed_slice: int = 2048) -> None:
    from .distributed.trainer import estep_kwargs
    from .estep import run_estep
    from .methods import build_method
    from .training import (Precision, build_optimizer, build_view_makers, embed_shard, prepare_model, prepare_views,
                           train_step)

    if cfg.method.name != "pcl":
        report.info["epoch"] = f"skipped (the PCL/MoCo ratio needs method.name=pcl, got {cfg.method.name})"
        return
    moco_cfg = cfg.model_copy(deep=True)
    moco_cfg.method.name = "moco"
    n, b = len(ds), cfg.train.batch_size
    images = batch(ds, b, seed=3).to(device)
    index = torch.arange(images.shape[0], device=device)
    precision = Precision.for_device(cfg.train.precision, device)
    kwargs = estep_kwargs(cfg, gpu=device.type == "cuda")
    ks = kwargs.pop("num_clusters")
    rng = np.random.default_rng(cfg.estep.seed)

    def stepper(c, prototypes):
        m = build_method(c, ds.channels, generator=torch.Generator().manual_seed(c.train.seed)).to(device)
        prepare_model(m, c, device)  # the run's layout (train.channels_last) and train.compile
        makers, eval_views = build_view_makers(m, c, ds)
        gen = torch.Generator(device=device).manual_seed(0)
        views = prepare_views([v(images, generator=gen) for v in makers], c)
        if prototypes is not None:
            m.on_prototypes(prototypes)
        opt = build_optimizer(c, m.net.parameters())
        m.net.train()
        epoch = c.train.warmup_epochs if prototypes is not None else 0
        return m, eval_views, lambda: train_step(m, m.net, opt, views, index, prototypes, generator=gen,
                                                 epoch=epoch, global_step=1, precision=precision)

    pcl, eval_views, _ = stepper(cfg, None)
    sliced = np.arange(min(embed_slice, n))
    emb = embed_shard(pcl, ds, eval_views, sliced, 512, device)  # (slice, d): real embeddings of a slice
    feats = emb[rng.integers(0, emb.shape[0], size=n)]  # (N, d): the split's size, for k-means timing
    feats = (feats + 0.05 * rng.normal(size=feats.shape)).astype(np.float32)
    first = run_estep(feats, ks, **kwargs)
    prototypes = first.to_torch(device)
    _, _, pcl_step = stepper(cfg, prototypes)
    _, _, moco_step = stepper(moco_cfg, None)
    drifted = (feats + 0.02 * rng.normal(size=feats.shape)).astype(np.float32)  # one epoch's drift, roughly
    init = [g.centroids for g in first.granularities]

    def embed():
        embed_shard(pcl, ds, eval_views, sliced, 512, device)

    t_pcl, t_moco, t_cold, t_warm, t_embed = alternating(
        [pcl_step, moco_step, lambda: run_estep(drifted, ks, **kwargs),
         lambda: run_estep(drifted, ks, init_centroids=init, warm_niter=cfg.estep.warm_niter, **kwargs), embed],
        steps, warmup=1)
    t_embed *= n / len(sliced)
    steps_per_epoch = n / b
    moco_epoch = steps_per_epoch * t_moco
    pcl_mstep = steps_per_epoch * t_pcl
    report.add("epoch", "PCL step / MoCo step (same batch, views made in advance)", t_pcl / t_moco, "ratio")
    report.add("epoch", f"MoCo M-step epoch estimate ({n} images)", moco_epoch, "s")
    report.add("epoch", "E-step k-means + phi, cold (every k)", t_cold, "s")
    report.add("epoch", f"E-step k-means + phi, warm start ({cfg.estep.warm_niter} iterations)", t_warm, "s")
    report.add("epoch", f"eval-pass embedding of {n} images (timed on {len(sliced)})", t_embed, "s")
    for mode, estep in (("eval_pass, cold", t_embed + t_cold), ("eval_pass, warm", t_embed + t_warm),
                        ("stream, cold", t_cold), ("stream, warm", t_warm)):
        report.add("epoch", f"PCL epoch / MoCo epoch ({mode})", (pcl_mstep + estep) / moco_epoch, "ratio")
