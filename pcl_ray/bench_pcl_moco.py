"""The `bench` part ``pcl-moco``: whole PCL epochs (E-step + M-step) against whole MoCo epochs, trained.

The ``epoch`` part estimates the PCL/MoCo epoch ratio from timed steps and E-steps; this part measures it on
real epochs. Four candidates train the pipeline's config for ``epochs`` epochs (at least 3) on its first
``images`` training images, each through the single-process loop of :func:`pcl_ray.bench_loop.plain_run`
(:func:`pcl_ray.training.run_epoch`, the E-step in process between epochs), alternated ``repeats`` times:

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
    """Alternate the four candidates ``repeats`` times (see the module docstring) and add their rows."""
    from .bench_loop import check_loop_options, loop_config, plain_run
    from .data import load_split

    check_loop_options(images, epochs, repeats)
    check_pcl_moco(cfg, epochs)
    run_cfg = loop_config(cfg, images, epochs)
    candidates = _candidates(run_cfg)
    ds = load_split(run_cfg.data, "train")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.ray.use_gpu is not False else "cpu")
    report.info["pcl-moco"] = f"{epochs} epochs on {len(ds)} images, {repeats} repetitions, epochs 3+ measured"
    per_epoch: dict[str, list[float]] = {label: [] for label, _ in candidates}
    esteps: dict[str, list[float]] = {label: [] for label, _ in candidates}
    t0 = time.perf_counter()
    for rep in range(repeats):
        for label, c in candidates:
            log(f"[pcl-ray] pcl-moco {rep + 1}/{repeats}: {label} ({time.perf_counter() - t0:.0f}s so far)")
            stats = plain_run(c, ds, device)
            whole = np.asarray(stats["epoch_s"]) + np.asarray(stats["estep_s"])  # (epochs,) E-step + M-step
            per_epoch[label].extend(whole[2:].tolist())
            esteps[label].extend(stats["estep_s"][2:])
    moco = float(np.mean(per_epoch["MoCo"]))
    report.add("pcl-moco", "MoCo epoch (epochs 3+)", moco, "s")
    for label, _ in candidates[:-1]:
        pcl = float(np.mean(per_epoch[label]))
        report.add("pcl-moco", f"{label}: epoch, E-step + M-step (epochs 3+)", pcl, "s")
        report.add("pcl-moco", f"{label}: E-step per epoch", float(np.mean(esteps[label])), "s")
        report.add("pcl-moco", f"{label}: PCL epoch / MoCo epoch", pcl / moco, "ratio")
