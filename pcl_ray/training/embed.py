"""The E-step's embedding pass over a shard of the training set (eval mode, deterministic transform)."""

from __future__ import annotations

import numpy as np
import torch

from ..data import ViewMaker, iterate_batches, shard_indices
from .plan import EpochPlan


@torch.no_grad()
def embed_shard(method, ds, views: ViewMaker, indices: np.ndarray, batch_size: int, device,
                loader_workers: int = 0) -> np.ndarray:
    """The method's E-step embeddings (len(indices), d) of ``indices``, in that order."""
    module = method.estep_module()
    was_training = module.training
    module.eval()
    out = []
    for images, _ in iterate_batches(ds, indices, batch_size, shuffle=False, seed=0, drop_last=False,
                                     loader_workers=loader_workers):
        out.append(method.embed_for_estep(views.eval(images.to(device))).float().cpu())  # (b, d)
    module.train(was_training)
    return torch.cat(out).numpy()


def estep_shard(method, ds, views: ViewMaker, cfg, epoch: int, streamed, *, rank: int = 0, world: int = 1,
                batch_size: int, device) -> tuple[np.ndarray, np.ndarray, bool]:
    """This rank's features for the E-step of ``epoch``: (dataset indices (n,), embeddings (n, d), from_stream).

    From last epoch's M-step embeddings (``streamed``, ``estep.features=stream``) plus a fresh pass over
    this rank's share of the few images no rank trained on; otherwise (the paper's mode, and the first
    E-step after a resume) an eval pass over the rank's ``shard_indices``.
    """
    if streamed is not None and streamed.epoch == epoch - 1:
        rest = EpochPlan(len(ds), cfg.train.batch_size, cfg.train.seed, epoch - 1).untrained()[rank::world]
        seen_idx, seen_emb = streamed.shard()
        extra = embed_shard(method, ds, views, rest, batch_size, device) if rest.size else seen_emb[:0]
        return np.concatenate([seen_idx, rest]), np.concatenate([seen_emb, extra]), True
    own = shard_indices(len(ds), rank, world)
    return own, embed_shard(method, ds, views, own, batch_size, device, cfg.data.views.loader_workers), False
