"""The cluster actor: sole owner of the gathered embeddings and of the E-step.

Workers hand it their shard ``(indices, embeddings)`` through the object store; once every index of
the training set has arrived for an epoch, it runs :func:`pcl_ray.estep.run_estep` in a thread and
publishes one immutable, epoch-tagged :class:`PrototypeSet` (one ``ray.put``) that all workers fetch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import numpy as np
import ray

from ..estep import run_estep
from ..estep.diagnostics import label_agreement

log = logging.getLogger(__name__)

NAMESPACE = "pcl_ray"


class ClusterActor:
    """Asyncio actor. Create it with :func:`start_cluster_actor`."""

    def __init__(self, num_samples: int, dim: int, estep_kwargs: dict[str, Any], keep_epochs: int = 2,
                 labels: np.ndarray | None = None):
        self.num_samples = int(num_samples)
        self.dim = int(dim)
        self.estep_kwargs = dict(estep_kwargs)
        #: estep.warm_start: each epoch's k-means starts from the last published epoch's centroids
        self.warm_start = bool(self.estep_kwargs.pop("warm_start", False))
        if not self.warm_start:
            self.estep_kwargs.pop("warm_niter", None)
        self.keep_epochs = keep_epochs
        # labels only feed the health metric estep/k*/ami_labels; the E-step never sees them
        self.labels = None if labels is None else np.asarray(labels).copy()
        self.store = np.zeros((self.num_samples, self.dim), dtype=np.float32)
        self._covered: dict[int, np.ndarray] = {}
        self._ranks: dict[int, set[int]] = {}
        self._ready: dict[int, asyncio.Event] = {}
        self._published: dict[int, ray.ObjectRef] = {}
        self._errors: dict[int, str] = {}
        self._running: set[int] = set()
        # health metrics (label AMI) per epoch, computed after the epoch's prototypes are published
        self._health: dict[int, dict[str, float]] = {}
        self._health_done: dict[int, asyncio.Event] = {}
        self._last_published_at: float | None = None  # monotonic time of the last publish (M-step gap)
        self._first_shard_at: dict[int, float] = {}
        # A restarted actor cannot know whether some ranks fetched its first epoch from the incarnation
        # before: its pending replies for that epoch say so (``after_restart``), and the ranks then wait
        # only a grace period for shards that may never come again (pcl_ray/distributed/handoff.py).
        self._restarted = _was_restarted()
        self._first_epoch: int | None = None
        #: estep.warm_start after a driver resume: (epoch, centroids) of the last E-step, from the checkpoint
        self._primed: tuple[int, list[np.ndarray]] | None = None

    # ---------------------------------------------------------------- hand-off
    async def submit_shard(self, epoch: int, rank: int, indices: np.ndarray, embeddings: np.ndarray) -> int:
        """Store one worker's embeddings for ``epoch``; start the E-step when the index space is covered."""
        if epoch in self._published or epoch in self._running:
            return epoch  # a retried submission after the epoch's E-step started: nothing to do
        if epoch in self._errors:
            # a fresh attempt after a failed E-step (a Train retry): collect the epoch again from scratch
            self._start_over(epoch)
        indices = np.asarray(indices, dtype=np.int64)
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.shape != (indices.shape[0], self.dim):
            raise ValueError(f"shard of rank {rank}: embeddings {embeddings.shape} do not match "
                             f"{indices.shape[0]} indices x dim {self.dim}")
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_samples):
            raise ValueError(f"shard of rank {rank}: indices outside [0, {self.num_samples})")
        if self._first_epoch is None:
            self._first_epoch = epoch
        if epoch not in self._covered:
            self._first_shard_at.setdefault(epoch, time.monotonic())
        covered = self._covered.setdefault(epoch, np.zeros(self.num_samples, dtype=bool))
        self._ranks.setdefault(epoch, set()).add(rank)
        self.store[indices] = embeddings
        covered[indices] = True
        self._event(epoch)
        if covered.all():
            self._running.add(epoch)
            asyncio.get_running_loop().create_task(self._run(epoch))
        return epoch

    def prime_warm_start(self, epoch: int, centroids: list[np.ndarray]) -> bool:
        """Take epoch ``epoch``'s centroids (one (k, d) array per granularity, from a checkpoint) as the warm start
        of epoch ``epoch + 1``'s k-means when this actor has not published ``epoch`` itself (a new actor after a
        driver resume), so the resumed run clusters as the uninterrupted one did. True when taken."""
        if not self.warm_start or epoch in self._published:
            return False
        self._primed = (int(epoch), [np.array(c, dtype=np.float32, copy=True) for c in centroids])
        return True

    async def wait_prototypes(self, epoch: int, rank: int, timeout_s: float = 30.0) -> dict[str, Any]:
        """Wait for epoch ``epoch``'s PrototypeSet.

        Returns ``{"status": "ready", "ref": [ObjectRef]}``; ``{"status": "missing"}`` when this actor
        holds no shard of ``rank`` for the epoch (it was restarted: the caller submits again);
        ``{"status": "pending", ...}`` on timeout, with what the actor holds (:meth:`_progress`);
        ``{"status": "error", "message": ...}`` if the E-step failed. A later :meth:`submit_shard` for a
        failed epoch clears its error and starts the collection over.
        """
        if epoch in self._errors:
            return {"status": "error", "message": self._errors[epoch]}
        if epoch not in self._published and rank not in self._ranks.get(epoch, set()):
            return {"status": "missing"}
        try:
            await asyncio.wait_for(self._event(epoch).wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            return {"status": "pending", **self._progress(epoch)}
        if epoch in self._errors:
            return {"status": "error", "message": self._errors[epoch]}
        return {"status": "ready", "ref": [self._published[epoch]]}  # wrapped: the caller gets the ref itself

    async def health(self, epoch: int, timeout_s: float = 60.0) -> dict[str, float]:
        """Epoch ``epoch``'s health metrics (``estep/k*/ami_labels``), computed after its prototypes were
        published: a worker asks at the end of the epoch's M-step and logs them with the epoch's metrics.
        ``{}`` when there are none (no labels, an unknown epoch) or they are not ready within ``timeout_s``."""
        done = self._health_done.get(epoch)
        if done is None:
            return {}
        try:
            await asyncio.wait_for(done.wait(), timeout=timeout_s)
        except asyncio.TimeoutError:
            log.warning("health metrics of epoch %d not ready after %.0fs", epoch + 1, timeout_s)
            return {}
        return dict(self._health.get(epoch, {}))

    async def latest(self) -> list[ray.ObjectRef] | None:
        """The newest published PrototypeSet (wrapped ref), or None."""
        if not self._published:
            return None
        return [self._published[max(self._published)]]

    def info(self) -> dict[str, Any]:
        return {
            "num_samples": self.num_samples,
            "dim": self.dim,
            "published_epochs": sorted(self._published),
            "running_epochs": sorted(self._running),
            "failed_epochs": sorted(self._errors),
            "restarted": self._restarted,
            "pid": os.getpid(),
            "gpu_ids": ray.get_gpu_ids(),
        }

    # ---------------------------------------------------------------- internals
    def _progress(self, epoch: int) -> dict[str, Any]:
        """What this actor holds of ``epoch``: ``phase`` "running" (E-step under way) or "collecting",
        the ranks that submitted and how many of the ``num_samples`` indices their shards cover."""
        covered = self._covered.get(epoch)
        return {
            "phase": "running" if epoch in self._running else "collecting",
            "ranks": sorted(self._ranks.get(epoch, set())),
            "covered": self.num_samples if covered is None and epoch in self._running else
            int(covered.sum()) if covered is not None else 0,
            "num_samples": self.num_samples,
            "after_restart": bool(self._restarted and self._first_epoch is not None and epoch <= self._first_epoch),
        }

    def _start_over(self, epoch: int) -> None:
        """Forget a failed epoch: its error, its coverage, its ranks and its (already set) event."""
        self._errors.pop(epoch, None)
        self._covered.pop(epoch, None)
        self._ranks.pop(epoch, None)
        self._ready.pop(epoch, None)  # waiters of the failed attempt were woken with the error already

    def _event(self, epoch: int) -> asyncio.Event:
        if epoch not in self._ready:
            self._ready[epoch] = asyncio.Event()
        return self._ready[epoch]

    async def _warm_centroids(self, epoch: int):
        """The previous epoch's centroids (one (k, d) array per granularity) for a warm start, else None: the
        first E-step starts cold, and so does the first after a restart of this actor unless a resumed worker
        primed it with the checkpoint's centroids (:meth:`prime_warm_start`)."""
        if not self.warm_start:
            return None
        if (epoch - 1) in self._published:
            prev = await self._published[epoch - 1]
            return [g.centroids for g in prev.granularities]
        if self._primed is not None and self._primed[0] == epoch - 1:
            return self._primed[1]
        return None

    async def _run(self, epoch: int) -> None:
        features = self.store.copy()
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        pset = None
        if self.labels is not None:  # before publishing: a worker asking health() right away waits for it
            self._health_done[epoch] = asyncio.Event()
        try:
            init = await self._warm_centroids(epoch)
            pset = await loop.run_in_executor(
                None, lambda: run_estep(features, epoch=epoch, init_centroids=init, **self.estep_kwargs))
            self._published[epoch] = ray.put(pset)
            log.info("E-step epoch %d done in %.2fs", epoch, time.perf_counter() - t0)
            self._warn_if_slow(epoch, pset)
        except Exception as exc:  # surfaced to every waiting worker
            self._errors[epoch] = f"E-step of epoch {epoch + 1} failed: {type(exc).__name__}: {exc}"
        finally:
            self._running.discard(epoch)
            self._covered.pop(epoch, None)
            self._event(epoch).set()  # the prototypes first: the workers start the M-step now
            for old in sorted(self._published)[: -self.keep_epochs]:
                del self._published[old]
                self._ready.pop(old, None)
                self._ranks.pop(old, None)
                self._health.pop(old, None)
                self._health_done.pop(old, None)
        if pset is not None and self.labels is not None:
            await self._compute_health(epoch, pset)
        elif epoch in self._health_done:
            self._health_done[epoch].set()  # failed E-step: no health metrics, nobody waits

    async def _compute_health(self, epoch: int, pset) -> None:
        """Label agreement of ``pset``, off the critical path (the prototypes are already published)."""
        done = self._health_done.setdefault(epoch, asyncio.Event())  # (pruned if the epoch is already old)
        try:
            self._health[epoch] = await asyncio.get_running_loop().run_in_executor(
                None, lambda: label_agreement(pset, self.labels, seed=epoch))
        except Exception as exc:  # a health metric never fails the run
            log.warning("health metrics of epoch %d failed: %s: %s", epoch + 1, type(exc).__name__, exc)
        finally:
            done.set()

    def _warn_if_slow(self, epoch: int, pset) -> None:
        """Warn when a faiss-cpu E-step took longer than the M-step epoch before it (the gap between the
        previous publish and this epoch's first shard)."""
        now = time.monotonic()
        first = self._first_shard_at.pop(epoch, None)
        last, self._last_published_at = self._last_published_at, now
        if pset.backend != "faiss-cpu" or last is None or first is None:
            return
        mstep_s = first - last
        if pset.seconds > mstep_s > 0:
            msg = (f"E-step of epoch {epoch + 1} on faiss-cpu took {pset.seconds:.0f}s, longer than the M-step "
                   f"epoch before it (~{mstep_s:.0f}s): give the cluster actor a GPU (estep.gpu_share, "
                   f"estep.backend=gpu) or lower estep.niter / estep.nredo")
            log.warning(msg)
            print(f"[pcl-ray] warning: {msg}", flush=True)


def _was_restarted() -> bool:
    """True in an actor that Ray restarted after a crash (asked once, at construction)."""
    import warnings

    try:
        with warnings.catch_warnings():  # Ray's property reads a deprecated attribute of its own
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside an actor (a test building the class directly), or no answer
        return False


def actor_name(run_name: str) -> str:
    return f"pcl-cluster-{run_name}"


def stop_cluster_actor(actor, run_name: str, timeout_s: float = 30.0) -> None:
    """End the run's cluster actor and wait until its name is free (it lives as long as the driver otherwise:
    in-process callers such as ``compare``, ``tune`` and the tests go on after a run). ``ray.kill`` returns
    before the actor is gone, and :func:`start_cluster_actor` for the same run name right after (a retry in
    the same process) would attach to the dying one."""
    if actor is None:
        return
    try:
        ray.kill(actor)
    except ray.exceptions.RayError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            ray.get_actor(actor_name(run_name), namespace=NAMESPACE)
        except ValueError:  # the name is free
            return
        time.sleep(0.05)
    log.warning("cluster actor %s still registered %.0fs after it was killed", actor_name(run_name), timeout_s)


def start_cluster_actor(run_name: str, num_samples: int, dim: int, estep_kwargs: dict[str, Any], *,
                        num_cpus: float = 0.0, num_gpus: float = 0.0, labels: np.ndarray | None = None):
    """Create (or attach to) the run's named cluster actor. Restarts on failure; workers resubmit shards."""
    cls = ray.remote(ClusterActor)
    return cls.options(
        name=actor_name(run_name),
        namespace=NAMESPACE,
        get_if_exists=True,
        lifetime=None,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        max_restarts=3,
        max_task_retries=3,
        max_concurrency=64,
    ).remote(num_samples, dim, estep_kwargs, labels=labels)
