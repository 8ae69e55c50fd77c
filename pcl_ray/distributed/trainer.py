"""Driver side of training: local or remote Ray, the cluster actor, and the TorchTrainer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..config import ExperimentConfig
from ..registry import final_state_rel
from ..storage import Storage
from .cluster_actor import start_cluster_actor, stop_cluster_actor
from .connect import OWN_ADDRESSES, attach_address, check_reachable
from .loopback import LoopbackTorchConfig, loopback_only
from .resources import EStepPlan, plan_estep
from ..estep.cost import predict_cpu_seconds
from .worker import STATE_FILE, train_loop

#: faiss-cpu E-steps predicted longer than this get a warning at the start of the run
CPU_ESTEP_WARN_S = 600.0
QUIET_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_enable_metrics_collection": "0"}


def init_ray(cfg: ExperimentConfig, resources: dict[str, float] | None = None, pin_address: bool = False) -> bool:
    """Attach to a cluster (``ray.address``, else ``RAY_ADDRESS``) or start a local Ray (dashboard on 127.0.0.1).

    Returns True when this call started a new local Ray, False when it attached or Ray was already up.

    ``resources``: custom resources of the local node (the tune verb declares its ``train_driver_slot``s).
    ``pin_address``: start the local GCS on a chosen port and export it as ``RAY_ADDRESS`` to every Ray
    process. Ray Train's placement-group cleaner finds the State API by address auto-detection, which
    fails ("Found multiple active Ray instances") when another Ray runs on the same machine; the group
    of a stopped trial then leaks and the next trial waits for CPUs forever. Sweeps stop trials on purpose.
    """
    if ray.is_initialized():
        return False
    for k, v in QUIET_ENV.items():
        os.environ.setdefault(k, v)
    address = attach_address(cfg)
    if address:
        check_reachable(address, cfg.ray.connect_timeout_s)
        ray.init(address=address, log_to_driver=True)
        return False
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    loopback_only()
    # Local runs keep Ray's token auth and put the dashboard on 127.0.0.1 too: Ray Train's
    # placement-group cleaner needs the State API it serves. address="local": always a new instance, even
    # when `ray start` left a cluster's address in Ray's temp folder.
    kwargs: dict[str, Any] = {"address": "local", "num_cpus": os.cpu_count(), "include_dashboard": True,
                              "dashboard_host": "127.0.0.1"}
    if cfg.ray.object_store_memory_mb:
        kwargs["object_store_memory"] = cfg.ray.object_store_memory_mb * 1024 * 1024
    if resources:
        kwargs["resources"] = dict(resources)
    if pin_address:
        import socket

        with socket.socket() as sock:  # a free port for the GCS; raylet and workers inherit this env
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        os.environ["RAY_ADDRESS"] = f"127.0.0.1:{port}"
        OWN_ADDRESSES.add(os.environ["RAY_ADDRESS"])
    ray.init(**kwargs)
    return True


def max_failures(cfg: ExperimentConfig, attached: bool) -> int:
    """``ray.max_failures``, or its default: 0 on a local Ray (a crash here is a bug to see), 3 on a cluster."""
    if cfg.ray.max_failures is not None:
        return cfg.ray.max_failures
    return 3 if attached else 0


def use_gpu(cfg: ExperimentConfig) -> bool:
    if cfg.ray.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(cfg.ray.use_gpu)


def estep_plan(cfg: ExperimentConfig, gpu_workers: bool) -> EStepPlan:
    """The run's one E-step placement decision (:func:`pcl_ray.distributed.resources.plan_estep`) on this cluster."""
    try:
        import faiss

        gpu_build = hasattr(faiss, "StandardGpuResources")
    except ImportError:  # the actor's import names the missing extra
        gpu_build = False
    return plan_estep(cfg.estep.backend, cfg.estep.gpu_share, ray.cluster_resources().get("GPU", 0.0),
                      cfg.ray.num_workers, gpu_workers, faiss_gpu_build=gpu_build)


def actor_gpus(cfg: ExperimentConfig, gpu_workers: bool) -> float:
    """GPUs for the cluster actor (:func:`estep_plan`)."""
    return estep_plan(cfg, gpu_workers).actor_gpus


def cpu_estep_warning(cfg: ExperimentConfig, num_samples: int, threads: int) -> str | None:
    """A warning when faiss-cpu is predicted to take long per epoch (cost model of README "Scale benchmark")."""
    seconds = predict_cpu_seconds(num_samples, cfg.estep.num_clusters, cfg.estep.niter, cfg.estep.nredo,
                                  cfg.estep.max_points_per_centroid, estep_dim(cfg), threads=threads)
    if seconds < CPU_ESTEP_WARN_S:
        return None
    return (f"faiss-cpu E-step predicted at ~{seconds / 60:.0f} min per epoch ({num_samples} points, "
            f"k={list(cfg.estep.num_clusters)}, {threads} threads): likely longer than an M-step epoch; give the "
            f"actor a GPU (estep.gpu_share, estep.backend=gpu) or lower estep.niter/nredo")


@dataclass
class FitOutcome:
    result: Any
    state_path: str | None  # URI of <run>/final_state.pt in the storage
    actor: Any
    backend_gpus: float


def estep_kwargs(cfg: ExperimentConfig, gpu: bool) -> dict:
    """Keyword arguments of :func:`pcl_ray.estep.run_estep` for this config.

    ``gpu``: the E-step runs on faiss-gpu (decided once, by :func:`estep_plan`); the backend passed is
    ``"gpu"`` or ``"cpu"``, never ``"auto"``.
    """
    return {
        "num_clusters": list(cfg.estep.num_clusters),
        "temperature": cfg.method.temperature,
        "niter": cfg.estep.niter,
        "nredo": cfg.estep.nredo,
        "seed": cfg.estep.seed,
        "max_points_per_centroid": cfg.estep.max_points_per_centroid,
        "alpha": cfg.estep.alpha,
        "backend": "gpu" if gpu else "cpu",
        "num_threads": cfg.estep.num_threads,
        # what the method asks of its E-step (PCA-whitening, a new k-means seed each epoch): docs/DESIGN.md
        **_method_class(cfg).estep_options(cfg),
    }


def warm_start_kwargs(cfg: ExperimentConfig) -> dict:
    """The cluster actor's warm-start option (it holds the previous epoch's centroids; ``estep.warm_start``)."""
    return {"warm_start": cfg.estep.warm_start, "warm_niter": cfg.estep.warm_niter}


def _method_class(cfg: ExperimentConfig):
    from ..methods import METHODS

    return METHODS[cfg.method.name]


def estep_dim(cfg: ExperimentConfig) -> int:
    """Width of the embeddings the method hands its E-step (the cluster actor's store)."""
    return _method_class(cfg).estep_dim(cfg)


def fit(cfg: ExperimentConfig, run_name: str, storage: Storage, num_samples: int,
        mlflow_spec: dict[str, str] | None, labels=None, callbacks: list | None = None,
        init_checkpoint: str | None = None, attached: bool = False) -> FitOutcome:
    """Run the EM training loop on Ray Train. Same ``(storage, run_name)`` resumes from the latest checkpoint.

    ``callbacks`` go to the trainer's RunConfig (a Tune trial passes ``TuneReportCallback()`` so that
    every epoch's report reaches Tune). ``init_checkpoint``: a checkpoint directory (``state.pt``) to start
    from when this run has none of its own yet (PBT: a trial continues from the trial it cloned).
    When training ends, the last checkpoint's state is copied to ``<run>/final_state.pt`` in the storage.
    """
    gpu = use_gpu(cfg)
    actor = None
    gpus = 0.0
    worker_resources: dict[str, float] = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.needs_estep:
        plan = estep_plan(cfg, gpu)
        gpus = plan.actor_gpus
        if gpu and plan.worker_gpus is not None:
            worker_resources["GPU"] = plan.worker_gpus
        print(f"[pcl-ray] E-step on {plan.backend_name} ({gpus:g} GPU for the cluster actor): {plan.reason}",
              flush=True)
        if plan.backend == "cpu":
            warning = cpu_estep_warning(cfg, num_samples, int(cfg.estep.num_threads or os.cpu_count() or 1))
            if warning:
                print(f"[pcl-ray] warning: {warning}", flush=True)
        kwargs = {**estep_kwargs(cfg, plan.backend == "gpu"), **warm_start_kwargs(cfg)}
        actor = start_cluster_actor(run_name, num_samples, estep_dim(cfg), kwargs,
                                    num_cpus=cfg.ray.actor_cpus, num_gpus=gpus, labels=labels)
    trainer = TorchTrainer(
        train_loop,
        torch_config=LoopbackTorchConfig(),  # on a local Ray: the rendezvous store on 127.0.0.1 too
        train_loop_config={
            "cfg": cfg.public_dict(),  # saved in every checkpoint: no passwords
            "run_name": run_name,
            "mlflow": mlflow_spec,
            "threads_per_worker": max(1, int(cfg.ray.cpus_per_worker)),
            "init_checkpoint": init_checkpoint,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.ray.scaling_workers,
            use_gpu=gpu,
            resources_per_worker=worker_resources,
        ),
        run_config=RunConfig(
            name=run_name,
            **storage.ray_kwargs(),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=FailureConfig(max_failures=max_failures(cfg, attached)),
            callbacks=callbacks or None,
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:  # Train gave up (max_failures reached) or the driver was interrupted
        # End the actor now: its creating handle would otherwise live on in the traceback, and when that is
        # collected Ray kills the actor, even one a retry of the same run has attached to by name since.
        stop_cluster_actor(actor, run_name)
        raise
    state_path = None
    if result.checkpoint is not None:
        ckpt = result.checkpoint
        storage.copy_from(ckpt.filesystem, f"{ckpt.path.rstrip('/')}/{STATE_FILE}", final_state_rel(run_name))
        state_path = storage.uri_of(final_state_rel(run_name))
    return FitOutcome(result=result, state_path=state_path, actor=actor, backend_gpus=gpus)
