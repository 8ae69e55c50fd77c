"""The E-step's embedding pass over a shard of the training set (eval mode, deterministic transform)."""

from __future__ import annotations

import numpy as np
import torch

from ..data import ViewMaker, iterate_batches


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
