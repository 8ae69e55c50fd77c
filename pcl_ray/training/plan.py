"""What each step of an epoch trains on, independent of how many workers share it.

An epoch is a seeded permutation of the ``n`` training indices cut into ``n // B`` global batches of ``B``
(``train.batch_size``); the last ``n % B`` indices are not trained on that epoch (a different few each
epoch). Rank ``r`` of ``W`` takes columns ``[r * B/W, (r+1) * B/W)`` of every global batch. The global
batches depend only on ``(seed, epoch)``: an elastic run that resumes on another number of workers trains
on exactly the same batches, and only their split across ranks changes. ``B`` must be divisible by ``W``
(the config checks every world size an elastic run may take).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class EpochPlan:
    n: int           # training images
    batch_size: int  # the global batch B
    seed: int
    epoch: int

    def __post_init__(self):
        if self.batch_size > self.n:
            raise ValueError(f"train.batch_size {self.batch_size} is larger than the data ({self.n} images)")

    @property
    def steps(self) -> int:
        return self.n // self.batch_size

    def order(self) -> np.ndarray:
        """The epoch's permutation of ``range(n)``: ``steps`` global batches, then the untrained rest."""
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def global_batches(self) -> np.ndarray:
        """``(steps, B)`` indices: row ``s`` is step ``s``'s global batch."""
        return self.order()[: self.steps * self.batch_size].reshape(self.steps, self.batch_size)

    def local_batch(self, world: int) -> int:
        if self.batch_size % world:
            raise ValueError(f"train.batch_size {self.batch_size} is not divisible by the world size {world}")
        return self.batch_size // world

    def rank_indices(self, rank: int, world: int) -> np.ndarray:
        """This rank's indices in step order: ``steps * B/W`` of them, step ``s`` at ``[s*b, (s+1)*b)``."""
        b = self.local_batch(world)
        return self.global_batches()[:, rank * b : (rank + 1) * b].reshape(-1)

    def untrained(self) -> np.ndarray:
        """The indices no rank trains on this epoch (``n % B`` of them)."""
        return self.order()[self.steps * self.batch_size:]
