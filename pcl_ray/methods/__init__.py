"""One file per method; each declares whether it needs the epoch-level E-step."""

from .moco import MoCo
from .pcl import PCL
from .deepcluster import DeepClusterV2
from .spcl import SPCL
from .simclr import SimCLR
from .swav import SwAV

METHODS = {m.name: m for m in (MoCo, PCL, DeepClusterV2, SPCL, SimCLR, SwAV)}


def build_method(cfg, in_channels: int, generator=None):
    try:
        cls = METHODS[cfg.method.name]
    except KeyError:
        raise ValueError(f"method.name: expected one of {sorted(METHODS)}, got {cfg.method.name!r}") from None
    return cls(cfg, in_channels, generator=generator)


__all__ = ["METHODS", "build_method", "MoCo", "PCL", "SimCLR", "SwAV", "DeepClusterV2", "SPCL"]
