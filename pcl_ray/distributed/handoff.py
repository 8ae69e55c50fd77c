"""The E-step hand-off seen from one Train worker: submit a shard, get the epoch's PrototypeSet, agree.

:func:`fetch_prototypes` is the whole hand-off. It runs in two parts:

1. :func:`obtain` talks to the cluster actor (:mod:`pcl_ray.distributed.cluster_actor`): submit this
   rank's shard, wait for the epoch's PrototypeSet, resubmit when the actor restarted and lost the
   shards. It never waits past ``timeout_s``; after a restart it waits only ``grace_s`` for the other
   ranks' shards to arrive again (ranks that already had the PrototypeSet will not resubmit).
2. :func:`share` makes the ranks agree over the training process group (when one is initialised):
   one all-reduce says who has the PrototypeSet; if some rank lacks it, the lowest rank that has it
   broadcasts it; if no rank has it, every rank raises the same error naming each rank's reason.

Without an initialised ``torch.distributed`` group (world size 1, tests of the actor alone) the
second part is a no-op: the rank either has the PrototypeSet or raises its own reason.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import ray

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0  # the whole hand-off, E-step included (estep.handoff_timeout_s)
DEFAULT_GRACE_S = 60.0  # after an actor restart: how long to wait for the other ranks' shards again
POLL_S = 30.0  # one wait_prototypes call on the actor
_RETRY_PAUSE_S = 0.5  # between calls to an unreachable actor


def fetch_prototypes(actor, epoch: int, rank: int, submit: Callable[[], Any], *,
                     timeout_s: float = DEFAULT_TIMEOUT_S, grace_s: float = DEFAULT_GRACE_S,
                     device=None, poll_s: float = POLL_S):
    """Hand this rank's shard to the actor and return epoch ``epoch``'s PrototypeSet (never a stale one).

    ``submit()`` sends the shard again (it returns the ObjectRef of ``actor.submit_shard``); it is called
    once, and again whenever the actor turns out to have lost it. Raises RuntimeError naming the epoch,
    the ranks and what was missing when no rank could get the PrototypeSet in time.
    """
    pset, reason = obtain(actor, epoch, rank, submit, timeout_s=timeout_s, grace_s=grace_s, poll_s=poll_s)
    return share(pset, reason, epoch, rank, device=device)


def obtain(actor, epoch: int, rank: int, submit: Callable[[], Any], *, timeout_s: float = DEFAULT_TIMEOUT_S,
           grace_s: float = DEFAULT_GRACE_S, poll_s: float = POLL_S):
    """This rank's own attempt: ``(PrototypeSet, "")``, or ``(None, reason)`` once there is no point waiting.

    Gives up when the actor reports that the E-step failed, at ``timeout_s`` after the start, or
    ``grace_s`` after it first found the actor restarted (without this rank's shard, unreachable, or
    flagging the epoch ``after_restart``) while the epoch's shards were still incomplete: ranks that
    had the PrototypeSet from the actor before its restart do not submit again, and :func:`share`
    hands it over. An E-step under way is always waited for, up to ``timeout_s``.
    """
    start = time.monotonic()
    deadline = start + timeout_s
    lost_since: float | None = None  # when the actor was first found restarted (or unreachable)
    sign = ""  # how the restart showed
    phase = "collecting"
    need_submit = True
    heard = False  # a pending reply came: ``last`` says what the actor held
    last = "the cluster actor did not answer"
    while True:
        now = time.monotonic()
        if now >= deadline:
            return None, f"no PrototypeSet after {timeout_s:g}s: {last}"
        if lost_since is not None and phase != "running" and now - lost_since >= grace_s:
            return None, (f"the cluster actor restarted ({sign}) and the epoch's shards were not all submitted "
                          f"again within {grace_s:g}s: {last}")
        left = deadline - now
        if lost_since is not None and phase != "running":
            left = min(left, max(0.1, grace_s - (now - lost_since)))
        try:
            if need_submit:
                ray.get(submit(), timeout=deadline - now)  # not cut short by the grace: the shard must go
                need_submit = False
                if lost_since is not None:  # the grace counts from this rank's own resubmission
                    lost_since = time.monotonic()
            reply = ray.get(actor.wait_prototypes.remote(epoch, rank, min(poll_s, left)), timeout=left + 10.0)
        except ray.exceptions.GetTimeoutError:  # keep what the actor said last, if it said anything
            last = last if heard else "the cluster actor did not answer in time"
            continue
        except ray.exceptions.RayActorError as exc:  # restarting, or gone for good: retried until the bounds
            if lost_since is None:
                lost_since, sign = time.monotonic(), "it was unreachable"
            phase, need_submit, heard = "collecting", True, False
            last = f"the cluster actor is unreachable ({_first_line(exc)})"
            time.sleep(_RETRY_PAUSE_S)
            continue
        status = reply["status"]
        if status == "ready":
            try:
                pset = ray.get(reply["ref"][0], timeout=max(1.0, deadline - time.monotonic()))
            except (ray.exceptions.ObjectLostError, ray.exceptions.RayActorError) as exc:
                # the actor died after publishing: the PrototypeSet it owned went with it
                if lost_since is None:
                    lost_since, sign = time.monotonic(), "its published PrototypeSet was lost"
                phase, need_submit = "collecting", True
                last = f"the published PrototypeSet was lost with the actor ({type(exc).__name__})"
                continue
            except ray.exceptions.GetTimeoutError:
                last = "the published PrototypeSet could not be fetched in time"
                continue
            if pset.epoch != epoch:
                return None, f"the cluster actor returned prototypes of epoch {pset.epoch + 1}"
            return pset, ""
        if status == "missing":  # the actor restarted and lost this epoch's shards
            if lost_since is None:
                lost_since, sign = time.monotonic(), "it had lost this rank's shard"
            phase, need_submit = "collecting", True
            last = "the restarted cluster actor had lost this rank's shard"
        elif status == "error":
            return None, reply["message"]
        else:  # pending
            phase, heard = reply.get("phase", "collecting"), True
            last = _describe_pending(reply)
            if reply.get("after_restart") and lost_since is None:  # our shard reached a restarted actor
                lost_since, sign = time.monotonic(), "this rank's shard reached the restarted actor"


def share(pset, reason: str, epoch: int, rank: int, *, device=None):
    """Agree on epoch ``epoch``'s PrototypeSet across the default process group (see the module docstring)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        if pset is None:
            raise RuntimeError(_failure_message(epoch, {rank: reason}))
        return pset
    world, me = dist.get_world_size(), dist.get_rank()
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    have = pset is not None
    # MIN over ranks: [the lowest rank that has it (world = nobody), 0 when any rank lacks it]
    flags = torch.tensor([me if have else world, int(have)], dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    src, everyone = int(flags[0]), bool(flags[1])
    if everyone:
        return pset
    if src == world:
        reasons: list = [None] * world
        dist.all_gather_object(reasons, reason)
        raise RuntimeError(_failure_message(epoch, dict(enumerate(reasons))))
    box = [pset if me == src else None]
    dist.broadcast_object_list(box, src=src, device=device if dist.get_backend() == "nccl" else None)
    if not have:
        log.warning("rank %d: %s; took epoch %d's PrototypeSet from rank %d", rank, reason, epoch + 1, src)
    return box[0]


def _failure_message(epoch: int, reasons: dict[int, str]) -> str:
    if len(reasons) == 1:
        (r, why), = reasons.items()
        return f"E-step hand-off of epoch {epoch + 1} failed on rank {r}: {why}"
    per_rank = "; ".join(f"rank {r}: {why}" for r, why in sorted(reasons.items()))
    return f"E-step hand-off of epoch {epoch + 1} failed on every rank ({per_rank})"


def _describe_pending(reply: dict) -> str:
    if reply.get("phase") == "running":
        return "the E-step was still running"
    covered, total = reply.get("covered"), reply.get("num_samples")
    ranks = reply.get("ranks")
    if covered is None or total is None:
        return "the actor was still collecting shards"
    return (f"the actor held shards of ranks {ranks} covering {covered} of {total} indices "
            f"({total - covered} missing), so the E-step never started")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def fetch_health(actor, epoch: int, timeout_s: float = 60.0) -> dict[str, float]:
    """Epoch ``epoch``'s health metrics from the cluster actor (label AMI, computed after the prototypes were
    published), to log with the epoch's other metrics; ``{}`` when there are none or the actor does not answer.
    A health metric never fails or stalls training beyond ``timeout_s``."""
    try:
        return dict(ray.get(actor.health.remote(epoch, timeout_s), timeout=timeout_s + 10.0))
    except Exception as exc:  # an unreachable or restarted actor: the epoch is logged without them
        log.warning("no health metrics for epoch %d: %s: %s", epoch + 1, type(exc).__name__, exc)
        return {}
