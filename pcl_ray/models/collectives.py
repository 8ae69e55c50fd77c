"""Gradient-free collectives used by momentum-contrast methods (identity on a single process)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def concat_all_gather(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0 (equal shapes required; no gradient)."""
    _, ws = world()
    if ws == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(ws)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def shuffled_forward(fn, x: torch.Tensor) -> torch.Tensor:
    """Shuffling BN (MoCo): run ``fn`` on a batch shuffled across ranks, return outputs in the original order.

    Each rank's BatchNorm statistics for the keys then come from a different subset of samples than
    its queries', which removes the BN shortcut. On a single process this is just ``fn(x)``.
    """
    rank, ws = world()
    if ws == 1:
        return fn(x)
    b = x.shape[0]
    full = concat_all_gather(x)
    perm = torch.randperm(full.shape[0], device=x.device)
    dist.broadcast(perm, src=0)
    inverse = torch.argsort(perm)
    out = fn(full[perm[rank * b : (rank + 1) * b]])
    gathered = concat_all_gather(out)
    return gathered[inverse][rank * b : (rank + 1) * b]


@torch.no_grad()
def broadcast_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics, queues) to every rank.

    DDP keeps the buffers of the module it wraps in step; modules outside it (MoCo's momentum encoder,
    whose BatchNorm sees a different shuffled batch on every rank) drift apart. Synchronising them once per
    epoch makes every rank's E-step embed with the same encoder, and makes rank 0's checkpoint the state of
    every rank, so a resumed run continues exactly as an uninterrupted one.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf.data, src=0)
