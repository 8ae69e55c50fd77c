"""The `bench` part ``pcl-moco``: whole PCL epochs (E-step + M-step) against whole MoCo epochs, trained.

The ``epoch`` part estimates the PCL/MoCo epoch ratio from timed steps and E-steps; this part measures it on
real epochs. Four candidates train the pipeline's config for ``epochs`` epochs (at least 3) on its first
``images`` training images, each through the single-process loop :class:`pcl_ray.bench_loop.PlainLoop`
(:func:`pcl_ray.training.run_epoch`, the E-step in process before the epoch), side by side: epoch 1 of each,
then epoch 2 of each, and so on (the order turning every epoch), ``repeats`` times from scratch. A 2-core
machine's speed drifts by 10 % and more over minutes; candidates trained one after another would measure
that drift, epochs interleaved measure the candidates:

* PCL with the paper's E-step (``estep.features=eval_pass``, k-means from ``estep.nredo`` restarts);
* PCL with ``estep.features=stream`` (the previous epoch's momentum keys; no eval pass);
* PCL with stream + ``estep.warm_start`` (k-means from the previous centroids, ``estep.warm_niter`` iterations);
* MoCo v2 (``method.name=moco``): the same encoder, queue, views and batches, no E-step.

PCL warms up for one epoch here (``train.warmup_epochs=1``, whatever the pipeline says), so epoch 2 has the
first E-step (always cold) and epochs 3+ are the steady state the rows report: mean seconds per epoch of
each candidate over epochs 3..``epochs`` (E-step + M-step for PCL), and each PCL mode's ratio to MoCo.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from .config import ConfigError

MODES = (("eval_pass", ["estep.features=eval_pass", "estep.warm_start=false"]),
         ("stream", ["estep.features=stream", "estep.warm_start=false"]),
         ("stream + warm start", ["estep.features=stream", "estep.warm_start=true"]))


def check_pcl_moco(cfg, epochs: int) -> None:
    if cfg.method.name != "pcl":
        raise ConfigError(f"bench --parts pcl-moco: sets PCL against MoCo and needs method.name=pcl, "
                          f"got {cfg.method.name!r}")
    if epochs < 3:
        raise ConfigError(f"--loop-epochs: the pcl-moco part needs at least 3 (one warm-up epoch, the first, "
                          f"cold E-step, then the measured epochs), got {epochs}")


def _candidates(cfg):
    from .config import apply_overrides

    def variant(sets: list[str]):
        return type(cfg).model_validate(apply_overrides(cfg.model_dump(), [*sets, "train.warmup_epochs=1"]))

    return [*((f"PCL, {label}", variant(sets)) for label, sets in MODES), ("MoCo", variant(["method.name=moco"]))]


def bench_pcl_moco(cfg, report, *, images: int, epochs: int, repeats: int, log=print) -> None:
    """Train the four candidates side by side, epoch by epoch, ``repeats`` times (see the module docstring)
    and add their rows."""
    import os

    from .bench_loop import PlainLoop, check_loop_options, loop_config
    from .data import load_split

    check_loop_options(images, epochs, repeats)
    check_pcl_moco(cfg, epochs)
    run_cfg = loop_config(cfg, images, epochs)
    candidates = _candidates(run_cfg)
    ds = load_split(run_cfg.data, "train")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.ray.use_gpu is not False else "cpu")
    torch.set_num_threads(os.cpu_count() or 1)
    report.info["pcl-moco"] = (f"{epochs} epochs on {len(ds)} images, candidates interleaved epoch by epoch, "
                               f"{repeats} repetitions, epochs 3+ measured")
    whole: dict[str, list[float]] = {label: [] for label, _ in candidates}  # E-step + M-step, per measured epoch
    msteps: dict[str, list[float]] = {label: [] for label, _ in candidates}
    esteps: dict[str, list[float]] = {label: [] for label, _ in candidates}
    t0 = time.perf_counter()
    for rep in range(repeats):
        loops = [(label, PlainLoop(c, ds, device)) for label, c in candidates]
        for epoch in range(epochs):
            log(f"[pcl-ray] pcl-moco {rep + 1}/{repeats}: epoch {epoch + 1}/{epochs} of each candidate "
                f"({time.perf_counter() - t0:.0f}s so far)")
            # the order turns every epoch, so no candidate always runs right after another's E-step
            for label, loop in (loops if (epoch + rep) % 2 == 0 else loops[::-1]):
                stats = loop.epoch(epoch)
                if epoch >= 2:  # epoch 1 warms up, epoch 2 has the first (cold) E-step
                    whole[label].append(stats["estep_s"] + stats["epoch_s"])
                    msteps[label].append(stats["epoch_s"])
                    esteps[label].append(stats["estep_s"])
    moco = float(np.mean(whole["MoCo"]))
    report.add("pcl-moco", "MoCo epoch (epochs 3+)", moco, "s")
    for label, _ in candidates[:-1]:
        pcl = float(np.mean(whole[label]))
        paired = np.asarray(whole[label]) / np.asarray(whole["MoCo"])  # the same epoch of the same repetition
        report.add("pcl-moco", f"{label}: epoch, E-step + M-step (epochs 3+)", pcl, "s")
        report.add("pcl-moco", f"{label}: E-step per epoch", float(np.mean(esteps[label])), "s")
        report.add("pcl-moco", f"{label}: M-step / MoCo M-step", float(np.mean(msteps[label])) / float(
            np.mean(msteps["MoCo"])), "ratio")
        report.add("pcl-moco", f"{label}: PCL epoch / MoCo epoch", pcl / moco, "ratio")
        report.add("pcl-moco", f"{label}: PCL epoch / MoCo epoch, lowest of the paired epochs", float(paired.min()),
                   "ratio")
        report.add("pcl-moco", f"{label}: PCL epoch / MoCo epoch, highest of the paired epochs", float(paired.max()),
                   "ratio")
