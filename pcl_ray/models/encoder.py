"""Encoder = backbone + projection head with an L2-normalized output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import build_backbone


class ProjectionHead(nn.Module):
    """Linear head (MoCo v1 / PCL v1) or a 2-layer MLP head (MoCo v2 / PCL v2); ``bn`` puts a BatchNorm after
    the hidden layer (Linear-BN-ReLU-Linear, SwAV's and DeepCluster-v2's head)."""

    def __init__(self, in_dim: int, out_dim: int, mlp: bool, bn: bool = False):
        super().__init__()
        if mlp:
            hidden = [nn.Linear(in_dim, in_dim)] + ([nn.BatchNorm1d(in_dim)] if bn else [])
            self.net = nn.Sequential(*hidden, nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim))
        else:
            self.net = nn.Linear(in_dim, out_dim)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class Encoder(nn.Module):
    def __init__(self, backbone: str, in_channels: int, feature_dim: int = 128, mlp_head: bool = True, width: int = 32,
                 small_stem: bool = True, head_bn: bool = False):
        super().__init__()
        self.backbone, self.backbone_dim = build_backbone(backbone, in_channels, width, small_stem)
        self.head = ProjectionHead(self.backbone_dim, feature_dim, mlp_head, bn=head_bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalized embedding (the space where contrast and clustering happen)."""
        return F.normalize(self.head(self.backbone(x)), dim=1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (what downstream evaluation uses)."""
        return self.backbone(x)


def build_encoder(model_cfg, in_channels: int) -> Encoder:
    """``model.head_bn`` (resolved per method by the config: SwAV, DeepCluster-v2) gives Linear-BN-ReLU-Linear."""
    return Encoder(model_cfg.backbone, in_channels, model_cfg.feature_dim, model_cfg.mlp_head, model_cfg.width,
                   small_stem=model_cfg.stem == "small", head_bn=bool(getattr(model_cfg, "head_bn", False)))
