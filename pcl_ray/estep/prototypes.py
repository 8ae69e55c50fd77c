"""Immutable E-step results: one :class:`Granularity` per k, grouped in a :class:`PrototypeSet`."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Granularity", "PrototypeSet", "PrototypeTensors"]


class PrototypeTensors(NamedTuple):
    """One granularity of the E-step on the training device, as the M-step's losses use it."""

    assignments: torch.Tensor  #: int64 (N,): cluster of dataset index i
    centroids: torch.Tensor  #: float32 (k, d), L2-normalized
    concentration: torch.Tensor  #: float32 (k,), φ per centroid


def _frozen(array: np.ndarray, dtype: type, name: str, ndim: int) -> np.ndarray:
    """A read-only, C-contiguous view of ``array`` as ``dtype`` (the caller's array stays writable)."""
    out = np.ascontiguousarray(array, dtype=dtype).view()
    if out.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {out.shape}")
    out.flags.writeable = False
    return out


@dataclass(frozen=True, eq=False)
class Granularity:
    """Clustering of the training index space at one granularity k.

    Row ``i`` of ``assignments`` is the cluster of dataset index ``i``.
    Arrays are stored read-only.
    """

    num_clusters: int
    assignments: np.ndarray  #: int64 (N,)
    centroids: np.ndarray  #: float32 (k, d), L2-normalized
    concentration: np.ndarray  #: float32 (k,), φ per centroid
    sizes: np.ndarray  #: int64 (k,), members per cluster

    def __post_init__(self) -> None:
        k = int(self.num_clusters)
        object.__setattr__(self, "num_clusters", k)
        for name, dtype, ndim in (
            ("assignments", np.int64, 1),
            ("centroids", np.float32, 2),
            ("concentration", np.float32, 1),
            ("sizes", np.int64, 1),
        ):
            object.__setattr__(self, name, _frozen(getattr(self, name), dtype, name, ndim))
        if self.centroids.shape[0] != k or self.concentration.shape != (k,) or self.sizes.shape != (k,):
            raise ValueError(
                f"centroids, concentration and sizes must have {k} rows, got "
                f"{self.centroids.shape}, {self.concentration.shape}, {self.sizes.shape}"
            )

    @property
    def num_points(self) -> int:
        """N, the size of the clustered index space."""
        return int(self.assignments.shape[0])

    def to_torch(self, device: torch.device | str = "cpu") -> PrototypeTensors:
        """Assignments, centroids and φ as tensors on ``device``.

        The arrays are copied first: arrays fetched from Ray's object store are read-only.
        """
        return PrototypeTensors(
            torch.from_numpy(np.array(self.assignments, copy=True)).to(device),
            torch.from_numpy(np.array(self.centroids, copy=True)).to(device),
            torch.from_numpy(np.array(self.concentration, copy=True)).to(device),
        )


@dataclass(frozen=True, eq=False)
class PrototypeSet:
    """All granularities of one E-step, tagged with the epoch it was computed for."""

    epoch: int
    granularities: tuple[Granularity, ...]
    backend: str  #: "faiss-cpu" or "faiss-gpu"
    seconds: float  #: wall time of the E-step
    #: extra per-epoch health metrics (e.g. agreement with labels, never used for training)
    diagnostics: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "granularities", tuple(self.granularities))
        if not self.granularities:
            raise ValueError("granularities must hold at least one Granularity")

    @property
    def num_clusters(self) -> tuple[int, ...]:
        """k of every granularity, in order."""
        return tuple(g.num_clusters for g in self.granularities)

    def to_torch(self, device: torch.device | str = "cpu") -> list[PrototypeTensors]:
        """One :class:`PrototypeTensors` per granularity, in order, on ``device``."""
        return [g.to_torch(device) for g in self.granularities]

    def metric_prefix(self, i: int) -> str:
        """``estep/k{k}`` for granularity ``i``; ``estep/k{k}_g{i}`` when that k occurs twice."""
        k = self.granularities[i].num_clusters
        return f"estep/k{k}" + (f"_g{i}" if Counter(self.num_clusters)[k] > 1 else "")

    def stats(self) -> dict[str, float]:
        """Flat metrics dict: ``estep/k{k}/{size_min,size_median,size_max,empty,phi_mean,phi_min,phi_max}``
        per granularity, plus ``estep/seconds``. A k that occurs twice gets ``estep/k{k}_g{i}``.
        """
        out: dict[str, float] = {}
        for i, g in enumerate(self.granularities):
            key = self.metric_prefix(i)
            phi = g.concentration.astype(np.float64)
            out.update(
                {
                    f"{key}/size_min": float(g.sizes.min()),
                    f"{key}/size_median": float(np.median(g.sizes)),
                    f"{key}/size_max": float(g.sizes.max()),
                    f"{key}/empty": float(np.count_nonzero(g.sizes == 0)),
                    f"{key}/phi_mean": float(phi.mean()),
                    f"{key}/phi_min": float(phi.min()),
                    f"{key}/phi_max": float(phi.max()),
                }
            )
        out["estep/seconds"] = float(self.seconds)
        out.update({k: float(v) for k, v in self.diagnostics.items()})
        return out
