"""The M-step's own embeddings of an epoch, kept for the next epoch's E-step (``estep.features=stream``)."""

from __future__ import annotations

import numpy as np
import torch


class StreamedEmbeddings:
    """One rank's M-step embeddings of one epoch, in the order this rank trained on them."""

    def __init__(self, epoch: int, capacity: int):
        self.epoch = epoch
        self.capacity = capacity
        self.indices = np.empty(capacity, dtype=np.int64)  # (capacity,) dataset indices
        self.embeddings: np.ndarray | None = None  # (capacity, d) float32, allocated at the first add
        self.filled = 0

    def add(self, index: torch.Tensor, embedding: torch.Tensor | None, method_name: str) -> None:
        """Append one step's ``embedding`` (B, d) of the images ``index`` (B,)."""
        if embedding is None:
            raise RuntimeError(f"estep.features=stream: method {method_name!r} returns no stream_embedding")
        emb = embedding.detach().float().cpu().numpy()  # (B, d)
        if self.embeddings is None:
            self.embeddings = np.empty((self.capacity, emb.shape[1]), dtype=np.float32)
        end = self.filled + emb.shape[0]
        self.indices[self.filled:end] = index.cpu().numpy()
        self.embeddings[self.filled:end] = emb
        self.filled = end

    def shard(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices (n,), embeddings (n, d)) of what was added."""
        if self.embeddings is None:
            raise RuntimeError("StreamedEmbeddings.shard: nothing was added this epoch")
        return self.indices[: self.filled], self.embeddings[: self.filled]
