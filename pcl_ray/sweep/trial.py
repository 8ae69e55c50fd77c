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
checkpoint: a copy of its ``state.pt`` in the sweep's storage (``<sweep>/pbt_checkpoints/``), reached
through the storage's filesystem, so a clone may start on any node. The cloned trial then starts a new
Train run ``<sweep>-<trial_id>-x<hash>`` from that state with its perturbed config; its Train workers
open the copy by URI (:func:`checkpoint_uri`).

``ray.use_gpu: auto`` is decided once for the whole sweep by the runner (``spec["use_gpu"]``), so every
trial of a sweep trains on the same kind of device however the cluster grows meanwhile.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import urlencode

from ..config import build_config
from ..registry import finished_run
from ..storage import Storage
from .spec import DRIVER_SLOT, trial_raw

TRIAL_TAG = "pcl_ray.trial_id"
SWEEP_TAG = "pcl_ray.sweep"
STATUS_TAG = "pcl_ray.trial_status"
CLONED_TAG = "pcl_ray.pbt_cloned_from"
SOURCE_FILE = "pcl_ray_source.json"
PBT_DIR = "pbt_checkpoints"
STATE_FILE = "state.pt"


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def trial_config(spec: dict[str, Any], config: dict[str, Any], label: str = "trial"):
    values = {k: config[k] for k in spec["keys"] if k in config}
    raw = trial_raw(spec["base_raw"], values)
    raw.setdefault("tracking", {})["run_name"] = None  # every trial's MLflow run is named after the trial
    ray_raw = raw.setdefault("ray", {})
    ray_raw["run_name"] = None
    if spec.get("use_gpu") is not None and ray_raw.get("use_gpu", "auto") == "auto":
        ray_raw["use_gpu"] = bool(spec["use_gpu"])  # the sweep's decision, never the cluster's of the moment
    return build_config(raw, label)


def sweep_storage(spec: dict[str, Any], cfg=None) -> Storage:
    """The sweep's storage root. The runner hands it over pickled (a pyarrow filesystem keeps its
    endpoint and region, not the credentials); without it, the trial config's ``ray.storage_path``."""
    storage = spec.get("storage")
    if storage is not None:
        return storage
    return Storage.from_config(cfg if cfg is not None else build_config(spec["base_raw"]), create=False)


def checkpoint_uri(storage: Storage, fs_path: str) -> str:
    """A URI for ``fs_path`` (a path inside ``storage.fs``) that ``ray.train.Checkpoint(uri)`` opens alone.

    Local and shared roots: the path itself. Object stores: ``s3://bucket/key``, with the filesystem's
    endpoint, scheme and region as query parameters (pyarrow's URI options) so that a Train worker on
    any node reaches an S3-compatible store without the driver's environment.
    """
    if storage.on_local_disk:
        return fs_path
    scheme = storage.uri.split("://", 1)[0]
    query: dict[str, str] = {}
    if scheme == "s3":
        options = storage.fs.__reduce__()[1][0]  # the constructor's keyword arguments
        query = {k: str(options[k]) for k in ("endpoint_override", "scheme", "region") if options.get(k)}
    return f"{scheme}://{fs_path.lstrip('/')}" + (f"?{urlencode(query)}" if query else "")


def clone_checkpoint(storage: Storage, sweep: str, trial_id: str, train_checkpoint: str):
    """Copy a Train checkpoint (``train_checkpoint``: its folder in ``storage.fs``; ``state.pt`` and the
    per-rank ``rank_*_of_*.pt``) to the sweep's PBT folder and return the copy as a Tune checkpoint on the
    storage's filesystem, or None when the checkpoint holds no state. A copy: Train keeps only its newest
    checkpoints, and the clone may start later.
    """
    from pyarrow import fs as pafs
    from ray import tune

    src_dir = train_checkpoint.rstrip("/")
    if storage.fs.get_file_info(f"{src_dir}/{STATE_FILE}").type != pafs.FileType.File:
        return None
    folder = src_dir.rsplit("/", 1)
    run_name = folder[0].rsplit("/", 1)[-1] if len(folder) == 2 else ""
    rel = f"{sweep}/{PBT_DIR}/{trial_id}-{folder[-1]}"
    for info in storage.fs.get_file_info(pafs.FileSelector(src_dir)):
        if info.type == pafs.FileType.File and not info.base_name.startswith("."):  # Ray's own metadata stays
            storage.copy_from(storage.fs, info.path, f"{rel}/{info.base_name}")
    storage.write_json(f"{rel}/{SOURCE_FILE}", {"run_name": run_name, "trial_id": trial_id,
                                                 "train_checkpoint": train_checkpoint})
    return tune.Checkpoint(storage.path(rel), filesystem=storage.fs)


def resolve_start(storage: Storage, base: str, ckpt) -> tuple[str, str | None, str | None]:
    """(run name, checkpoint URI to start from, trial it was cloned from) for this (re)start of a trial.

    ``ckpt``: the Tune checkpoint the trial (re)starts from, or None.
    """
    if ckpt is None:
        return base, None, None
    with ckpt.filesystem.open_input_stream(f"{ckpt.path.rstrip('/')}/{SOURCE_FILE}") as f:
        source = json.loads(f.read())
    if source["run_name"] == base or source["run_name"].startswith(base + "-x"):
        return source["run_name"], None, None  # own state: the Train run resumes from its latest checkpoint
    digest = hashlib.sha1(str(ckpt.path).encode()).hexdigest()[:6]
    return f"{base}-x{digest}", checkpoint_uri(storage, ckpt.path), source.get("trial_id")


def run_trial(config: dict[str, Any], spec: dict[str, Any]) -> None:
    """Body of one trial (runs inside the Tune trial actor)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from ..tracking import RunLogger
    from ..workflow import train  # the train verb (tests replace it: looked up at call time)

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(spec, config, f"trial {trial_id}")
    base = trial_run_name(spec["sweep"], trial_id)
    run_name, init_checkpoint, cloned_from = resolve_start(sweep_storage(spec, cfg), base,
                                                            tune.get_checkpoint())
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
            src = result.metrics.get(CHECKPOINT_PATH_KEY)  # a folder in the storage's filesystem
            clone = clone_checkpoint(sweep_storage(spec), spec["sweep"], self.trial_id, src) if src else None
            if clone is None:
                return result
            return _TrainingResult(checkpoint=clone, metrics=dict(result.metrics))

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
