"""The Tune trainable: one trial is one complete ``workflow.train`` run.

Each trial builds its config (the sweep's base config + the trial's sampled values) and runs the same
workflow as ``run.py train``: its own MLflow run (a child of the sweep's parent run), its own cluster
actor (named after the trial's run name), a TorchTrainer whose RunConfig carries
``TuneReportCallback()`` so that every epoch's report reaches Tune (and its scheduler), then evaluation.

Runs are named ``<sweep>-<trial_id>`` and stored under the same storage root as every training run, so
a trial restarted by Tune (driver failure, ``--resume``) continues its Train run from the latest
checkpoint and reopens the same MLflow run. Worker failures inside a trial are Ray Train's business
(``ray.max_failures``).

PBT: Tune clones the state of a better trial into a worse one through a Tune checkpoint. The
trainable below turns the Train checkpoint path that ``TuneReportCallback`` reports into such a
checkpoint (a copy of its ``state.pt``); the cloned trial then starts a new Train run
``<sweep>-<trial_id>-x<hash>`` from that state with its perturbed config.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from ..config import build_config
from .spec import DRIVER_SLOT, trial_raw

TRIAL_TAG = "pcl_ray.trial_id"
SWEEP_TAG = "pcl_ray.sweep"
STATUS_TAG = "pcl_ray.trial_status"
CLONED_TAG = "pcl_ray.pbt_cloned_from"
SOURCE_FILE = "pcl_ray_source.json"


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def trial_config(spec: dict[str, Any], config: dict[str, Any], label: str = "trial"):
    values = {k: config[k] for k in spec["keys"] if k in config}
    raw = trial_raw(spec["base_raw"], values)
    raw.setdefault("tracking", {})["run_name"] = None  # every trial's MLflow run is named after the trial
    raw.setdefault("ray", {})["run_name"] = None
    return build_config(raw, label)


def _resolve_start(spec: dict[str, Any], base: str) -> tuple[str, str | None, str | None]:
    """(run name, checkpoint to start from, trial it was cloned from) for this (re)start of a trial."""
    from ray import tune

    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return base, None, None
    source = json.loads((Path(ckpt.path) / SOURCE_FILE).read_text())
    if source["run_name"] == base or source["run_name"].startswith(base + "-x"):
        return source["run_name"], None, None  # own state: the Train run resumes from its latest checkpoint
    digest = hashlib.sha1(str(ckpt.path).encode()).hexdigest()[:6]
    return f"{base}-x{digest}", str(ckpt.path), source.get("trial_id")


def run_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """Body of one trial (runs inside the Tune trial actor)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..tracking import RunLogger
    from ..workflow import finished_run, train

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(spec, config, f"trial {trial_id}")
    base = trial_run_name(spec["sweep"], trial_id)
    run_name, init_checkpoint, cloned_from = _resolve_start(spec, base)
    done = finished_run(cfg, run_name)
    if done is not None:
        # The trial finished (train() closes its MLflow run FINISHED only after training and evaluation)
        # but the sweep was interrupted before Tune recorded it, maybe even before the status tag below
        # was set: its results are all logged already, so a resume only completes the tag.
        if done.client.get_run(done.run_id).data.tags.get(STATUS_TAG) != "finished":
            done.set_tags({STATUS_TAG: "finished"})
        return
    tags = {SWEEP_TAG: spec["sweep"], TRIAL_TAG: trial_id, STATUS_TAG: "running"}
    if cloned_from:
        tags[CLONED_TAG] = cloned_from
    out = train(cfg, run_name=run_name, parent_run_id=spec["parent_run_id"], callbacks=[TuneReportCallback()],
                tags=tags, init_checkpoint=init_checkpoint)
    RunLogger(out.tracking_uri, out.mlflow_run_id).set_tags({STATUS_TAG: "finished"})


def make_trainable(spec: dict[str, Any]):
    """The Tune trainable class for a sweep, with its per-trial resources attached."""
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY
    from ray.tune.trainable.function_trainable import wrap_function

    def pcl_trial(config):
        run_trial(config, spec)

    base_cls = wrap_function(pcl_trial, name="pcl_trial")

    class SweepTrial(base_cls):
        """A function trainable whose ``save()`` hands Tune the trial's latest Train checkpoint (for PBT)."""

        def save_checkpoint(self, checkpoint_dir: str = ""):
            result = super().save_checkpoint(checkpoint_dir)
            if result is None or result.checkpoint is not None:
                return result
            src = result.metrics.get(CHECKPOINT_PATH_KEY)
            if not src or not (Path(src) / "state.pt").exists():
                return result
            # copy: Train keeps only its newest checkpoints, and the clone may start later
            dest = Path(spec["sweep_dir"]) / "pbt_checkpoints" / f"{self.trial_id}-{Path(src).name}"
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(Path(src) / "state.pt", dest / "state.pt")
            (dest / SOURCE_FILE).write_text(json.dumps(
                {"run_name": Path(src).parent.name, "trial_id": self.trial_id, "train_checkpoint": str(src)}))
            return _TrainingResult(checkpoint=tune.Checkpoint.from_directory(str(dest)), metrics=dict(result.metrics))

    def resources(config):
        return trial_resources(spec, config)

    return tune.with_resources(SweepTrial, resources)


def trial_resources(spec: dict[str, Any], config: dict[str, Any]):
    """Placement group of one trial: its driver, plus the cluster actor's CPUs/GPU.

    The Train workers take their own placement group (created by the TorchTrainer's controller); the
    cluster actor is created from the trial's driver and lands in this group, so it is reserved here.
    """
    from ray.tune import PlacementGroupFactory

    cfg = trial_config(spec, config)
    driver_cpus = float(spec["driver_cpus"])
    bundles: list[dict[str, float]] = [{"CPU": driver_cpus} if driver_cpus > 0 else {"CPU": 0, DRIVER_SLOT: 1}]
    if cfg.needs_estep:
        actor = {"CPU": float(cfg.ray.actor_cpus)}
        if cfg.estep.backend == "gpu":
            actor["GPU"] = 1.0
        if any(actor.values()):
            bundles.append(actor)
    return PlacementGroupFactory(bundles)
