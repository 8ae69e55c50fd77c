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

    def state_dict(self) -> dict:
        """What a checkpoint keeps of it (``torch.load(..., weights_only=True)`` reads it back): the epoch and
        the rows added so far, so that a resumed run's next E-step clusters what the uninterrupted run's did."""
        idx, emb = self.shard()
        return {"epoch": self.epoch, "indices": torch.from_numpy(idx.copy()),
                "embeddings": torch.from_numpy(emb.copy())}

    @classmethod
    def from_state(cls, state: dict) -> "StreamedEmbeddings":
        """The object :meth:`state_dict` described, full to its rows."""
        idx = state["indices"].cpu().numpy().astype(np.int64)  # (n,)
        emb = state["embeddings"].cpu().numpy().astype(np.float32)  # (n, d)
        if emb.ndim != 2 or emb.shape[0] != idx.shape[0]:
            raise ValueError(f"streamed embeddings in the checkpoint: {emb.shape} rows do not match {idx.shape[0]} "
                             "indices")
        out = cls(int(state["epoch"]), idx.shape[0])
        out.indices[:] = idx
        out.embeddings = emb
        out.filled = idx.shape[0]
        return out
