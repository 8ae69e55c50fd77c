from .backbones import ConvNet, build_backbone
from .encoder import Encoder, ProjectionHead, build_encoder
from .momentum import KeyQueue, MomentumEncoder

__all__ = ["ConvNet", "build_backbone", "Encoder", "ProjectionHead", "build_encoder", "KeyQueue", "MomentumEncoder"]
