"""The M-step's own embeddings of an epoch, kept for the next epoch's E-step (``estep.features=stream``)."""

from __future__ import annotations

import numpy as np
import torch


class StreamedEmbeddings:
    """One rank's M-step embeddings of one epoch, in the order this rank trained on them.

    The rows stay on the step's device until :meth:`shard` copies them to the host once, at the E-step: a
    step adds its (B, d) embeddings with a device-side copy and reads nothing back (on a GPU, a per-step
    copy to the host would stall every step).
    """

    def __init__(self, epoch: int, capacity: int):
        self.epoch = epoch
        self.capacity = capacity
        self.indices = np.empty(capacity, dtype=np.int64)  # (capacity,) dataset indices
        self._index_view = torch.from_numpy(self.indices)  # the same memory, written by tensor copies
        self._rows: torch.Tensor | None = None  # (capacity, d) float32 on the step's device, at the first add
        self._host: np.ndarray | None = None  # (filled, d) float32: the rows once copied to the host
        self.filled = 0

    def add(self, index: torch.Tensor, embedding: torch.Tensor | None, method_name: str) -> None:
        """Append one step's ``embedding`` (B, d) of the images ``index`` (B,; on the host: the loader's)."""
        if embedding is None:
            raise RuntimeError(f"estep.features=stream: method {method_name!r} returns no stream_embedding")
        if self._rows is None:
            self._rows = torch.empty((self.capacity, embedding.shape[1]), dtype=torch.float32,
                                     device=embedding.device)
        end = self.filled + embedding.shape[0]
        self._rows[self.filled:end].copy_(embedding.detach())  # device to device (any dtype to fp32)
        self._index_view[self.filled:end].copy_(index)  # the loader's host tensor: no read of a device value
        self.filled = end
        self._host = None

    def shard(self) -> tuple[np.ndarray, np.ndarray]:
        """(indices (n,), embeddings (n, d)) of what was added, on the host."""
        if self._rows is None and self._host is None:
            raise RuntimeError("StreamedEmbeddings.shard: nothing was added this epoch")
        if self._host is None:
            self._host = self._rows[: self.filled].cpu().numpy()
        return self.indices[: self.filled], self._host

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
        out._host = emb
        out.filled = idx.shape[0]
        return out
