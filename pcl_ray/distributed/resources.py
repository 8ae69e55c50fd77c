"""Where the E-step runs: the one decision of GPUs for the cluster actor and the Train workers.

Pure arithmetic over what the cluster shows (:func:`plan_estep`); :func:`pcl_ray.distributed.trainer.fit`
asks Ray for the numbers and applies the plan, and the cluster actor runs exactly the backend it names
(``"cpu"`` or ``"gpu"``, never ``"auto"``), so nothing downstream decides again.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EStepPlan:
    """GPUs of the cluster actor and of each Train worker, and the E-step backend that follows."""

    actor_gpus: float  #: the actor's GPU request (0, a fraction, or 1)
    worker_gpus: float | None  #: each GPU worker's GPU request; None = Ray Train's default (1 when use_gpu)
    backend: str  #: "cpu" or "gpu": what run_estep gets
    reason: str  #: one line for the run's output

    @property
    def backend_name(self) -> str:
        return "faiss-gpu" if self.backend == "gpu" else "faiss-cpu"


def plan_estep(backend: str, gpu_share: float | None, cluster_gpus: float, num_workers: int, gpu_workers: bool,
               faiss_gpu_build: bool = True) -> EStepPlan:
    """The plan for ``estep.backend`` / ``estep.gpu_share`` on a cluster showing ``cluster_gpus`` GPUs.

    * ``cpu``: faiss-cpu, no GPU for the actor.
    * a GPU beyond the ``num_workers`` GPU workers' (or any GPU when the workers train on CPUs): the actor
      takes a whole one.
    * no spare GPU but GPU workers and ``gpu_share``: the actor asks ``gpu_share`` of a GPU and every worker
      ``1 - gpu_share``, so the actor fits beside one worker on its GPU.
    * otherwise ``gpu`` asks a whole GPU anyway (an autoscaling cluster adds a node); ``auto`` runs faiss-cpu.

    ``auto`` also runs faiss-cpu when the installed faiss has no GPU build (``faiss_gpu_build``).
    """
    if backend not in ("auto", "cpu", "gpu"):
        raise ValueError(f"estep.backend must be 'auto', 'cpu' or 'gpu', got {backend!r}")
    if gpu_share is not None and not 0.0 < gpu_share < 1.0:
        raise ValueError(f"estep.gpu_share must lie in (0, 1), got {gpu_share!r}")
    if backend == "cpu":
        return EStepPlan(0.0, None, "cpu", "estep.backend=cpu")
    if backend == "auto" and not faiss_gpu_build:
        return EStepPlan(0.0, None, "cpu", "the installed faiss is the CPU-only build")
    held = float(num_workers) if gpu_workers else 0.0
    spare = float(cluster_gpus) - held
    if spare >= 1.0:
        why = "a GPU beside the workers'" if gpu_workers else "a GPU (the workers train on CPUs)"
        return EStepPlan(1.0, None, "gpu", f"the cluster has {why}")
    if gpu_workers and gpu_share is not None and cluster_gpus >= 1.0:
        return EStepPlan(float(gpu_share), 1.0 - float(gpu_share), "gpu",
                         f"no spare GPU: the actor shares one with a worker (estep.gpu_share={gpu_share:g}, "
                         f"each worker asks {1.0 - gpu_share:g} GPU)")
    if backend == "gpu":
        return EStepPlan(1.0, None, "gpu", "estep.backend=gpu (a GPU is requested; an autoscaler may add one)")
    why = "the cluster has no GPU" if cluster_gpus < 1.0 else "no spare GPU and estep.gpu_share is unset"
    return EStepPlan(0.0, None, "cpu", why)
