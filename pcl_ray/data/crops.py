"""Per-image random-resized crop + flip on the full decoded image: the paper's ImageNet views.

Lazily decoded sources (ImageFolder, mixed-size Parquet) hold images of different sizes. The paper's
``RandomResizedCrop(224, scale=(0.2, 1))`` crops from the *full* image, so the crop cannot be a batched
tensor op on a fixed-size decode (:mod:`pcl_ray.data.views` crops from what it is given). Here the crop box
is drawn per image from the header size, exactly as torchvision's ``RandomResizedCrop.get_params`` draws it
(10 tries of area scale and log-uniform aspect ratio, else the whole image with the ratio clamped,
centred), the JPEG is draft-decoded at the smallest scale whose crop still has at least ``size`` pixels per
side, and the box is resized (bilinear, antialiased by PIL) to ``size×size`` and flipped with probability
``flip_p``. Colour jitter, grayscale and blur stay batched on the device (``ViewMaker(crop_on_device=False)``).

:class:`CroppedViews` runs this in ``DataLoader`` worker processes: item ``i`` is ``(V×C×size×size uint8, i)``,
``V`` independent crops, drawn from a generator seeded by ``(seed, epoch, i)`` (the same on a resumed run,
whichever worker process decodes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .dataset import IndexedImages, pil_to_tensor

__all__ = ["CropSpec", "CroppedViews", "crop_box", "random_resized_crop"]


@dataclass(frozen=True)
class CropSpec:
    """Output side, area-scale range, aspect-ratio range and flip probability of the crop."""

    size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"crop size must be >= 1, got {self.size}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")


def crop_box(width: int, height: int, spec: CropSpec, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(left, top, w, h)`` of one random crop of a ``width×height`` image (torchvision's ``get_params``)."""
    area = width * height
    log_lo, log_hi = math.log(spec.ratio[0]), math.log(spec.ratio[1])
    for _ in range(10):
        target = area * rng.uniform(spec.scale[0], spec.scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    in_ratio = width / height  # fallback: the whole image, aspect ratio clamped, centred
    if in_ratio < spec.ratio[0]:
        w, h = width, int(round(width / spec.ratio[0]))
    elif in_ratio > spec.ratio[1]:
        h, w = height, int(round(height * spec.ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(img: Image.Image, spec: CropSpec, rng: np.random.Generator, mode: str) -> Image.Image:
    """One random crop of the opened (not yet decoded) ``img``, resized to ``spec.size`` and maybe flipped.

    The box is drawn on the header size; for a JPEG, ``draft`` then decodes at the smallest DCT scale at which
    the box is still at least ``spec.size`` pixels on each side, and the box is scaled to the decoded size.
    """
    width, height = img.size
    left, top, w, h = crop_box(width, height, spec, rng)
    flip = rng.uniform() < spec.flip_p
    want = (math.ceil(width * spec.size / w), math.ceil(height * spec.size / h))
    if want[0] < width and want[1] < height:
        img.draft(mode, want)  # no-op for formats without reduced-scale decoding
    img = img.convert(mode)
    sx, sy = img.size[0] / width, img.size[1] / height
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    out = img.resize((spec.size, spec.size), Image.Resampling.BILINEAR, box=box)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


class CroppedViews(Dataset):
    """``V`` random-resized crops of each image of a lazily decoded split, decoded from the full image.

    Args:
        ds: a lazy :class:`IndexedImages` (``ds.tensor is None``); its decoder's ``items`` and ``open``
            give the undecoded images.
        spec: the crop.
        views: crops per image (2 for MoCo/PCL's query and key).
        seed: with :meth:`set_epoch`'s epoch and the index, seeds each image's crops.
    """

    def __init__(self, ds: IndexedImages, spec: CropSpec, views: int = 2, seed: int = 0) -> None:
        decoder = getattr(ds, "decoder", None)
        if ds.tensor is not None or decoder is None:
            raise ValueError("CroppedViews needs a lazily decoded split (ImageFolder, mixed-size Parquet); "
                             "in-memory splits use the batched crop of ViewMaker")
        self.decoder, self.spec, self.views, self.seed, self.epoch = decoder, spec, int(views), int(seed), 0
        self.channels = int(ds.channels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.decoder)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        mode = "L" if self.channels == 1 else "RGB"
        crops = []
        for _ in range(self.views):
            try:
                with self.decoder.open(self.decoder.items[i]) as img:
                    crops.append(pil_to_tensor(random_resized_crop(img, self.spec, rng, mode), self.channels))
            except Exception as exc:
                raise self.decoder.bad_image(i, exc) from None
        return torch.stack(crops), int(i)  # V×C×size×size
