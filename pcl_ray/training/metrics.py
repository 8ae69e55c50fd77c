"""Epoch averages of the step metrics, summed on the device and read only when printed."""

from __future__ import annotations

import torch


class EpochMetrics:
    """Running sums of each step's metrics (detached 0-d tensors or floats).

    Adding a tensor queues an addition on its device and does not wait for it; :meth:`last` (a log line)
    and :meth:`means` (the epoch's end) are the only places that read values back to the host.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = {}
        self.latest: dict[str, torch.Tensor | float] = {}
        self.steps = 0

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for key, value in metrics.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value
            self.latest[key] = value
        self.steps += 1

    def last(self, key: str) -> float:
        """The value of ``key`` at the latest step (one device sync)."""
        return float(self.latest[key])

    def means(self) -> dict[str, float]:
        """Each metric's mean over the steps added (one device sync per metric)."""
        n = max(1, self.steps)
        return {key: float(total) / n for key, total in self.sums.items()}
