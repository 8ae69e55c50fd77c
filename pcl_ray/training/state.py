"""What a checkpoint holds: the method, the optimizer, the grad scaler, where training stands; per-rank files."""

from __future__ import annotations

from pathlib import Path

import torch

from ..methods.base import unwrap

STATE_FILE = "state.pt"  #: rank 0's state in every checkpoint directory
RANK_STATE_GLOB = "rank_*_of_*.pt"


def rank_state_file(rank: int, world: int) -> str:
    """The file of one rank's own state (e.g. SwAV's queue) in a checkpoint written by ``world`` ranks."""
    return f"rank_{rank}_of_{world}.pt"


def stream_state_file(rank: int, world: int) -> str:
    """The file of one rank's streamed M-step embeddings (``estep.features=stream``) in a checkpoint written by
    ``world`` ranks: the next epoch's E-step input (:meth:`~pcl_ray.training.stream.StreamedEmbeddings.state_dict`)."""
    return f"stream_{rank}_of_{world}.pt"


def save_state(path: Path, method, optimizer, epoch: int, step: int, *, scaler: dict | None = None,
               extra: dict | None = None) -> None:
    """Write the training state after ``epoch`` (0-based) and ``step`` global steps to ``path``."""
    torch.save(
        {"method": unwrap(method).state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
         "global_step": step, "grad_scaler": scaler or {}, **(extra or {})},
        path,
    )


def load_state(directory: Path, device) -> dict:
    """The state :func:`save_state` wrote into the checkpoint ``directory``."""
    return torch.load(Path(directory) / STATE_FILE, map_location=device, weights_only=True)
