"""The indexed image container every data source returns, and its image helpers.

``IndexedImages`` is the one dataset type of the project. Item ``i`` is ``(image, i)``:
the dataset index is the join key between the E-step (embeddings per index) and the
M-step (views per index), so it travels with every image.

Two storage modes:

* **in memory**: the whole split is one ``N×C×H×W`` uint8 tensor (``.tensor``). Batches
  are slices of it, no decoding, no ``DataLoader`` (see :mod:`pcl_ray.data.loader`).
* **lazy**: a picklable decoder turns item ``i`` (a file path or encoded bytes) into a
  ``C×H×W`` uint8 tensor on access; ``.tensor`` is ``None``. Every item has the same
  square size so that batches stack.
"""

from __future__ import annotations

import bisect
import io
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from .errors import BadImageError, reason

__all__ = [
    "IndexedImages",
    "LazyDecoder",
    "FileDecoder",
    "BytesDecoder",
    "pil_to_tensor",
    "resize_center_crop_pil",
    "resize_center_crop_tensor",
    "channel_stats",
]


# --------------------------------------------------------------------------------------
# image helpers
# --------------------------------------------------------------------------------------


#: The evaluation view of lazily decoded images: the shorter side resized to ``size · 256/224``, then the
#: centre ``size×size`` crop; at 224 this is the ImageNet protocol's Resize(256) → CenterCrop(224).
EVAL_RESIZE_RATIO = 256 / 224


def eval_resize(size: int) -> int:
    """The shorter side an image is resized to before its ``size×size`` centre crop (256 for 224)."""
    return int(round(size * EVAL_RESIZE_RATIO))


def resize_center_crop_pil(img: Image.Image, size: int, resize: int | None = None) -> Image.Image:
    """Resize so that the shorter side is ``resize`` (default ``size``; bilinear, antialiased), then
    centre-crop a ``size×size`` square."""
    w, h = img.size
    resize = max(int(resize or size), size)
    if (w, h) != (size, size) or resize != size:
        scale = resize / min(w, h)
        new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        img = img.crop((left, top, left + size, top + size))
    return img


def pil_to_tensor(img: Image.Image, channels: int) -> torch.Tensor:
    """PIL image → ``C×H×W`` uint8 tensor, converted to ``L`` (1 channel) or ``RGB`` (3)."""
    img = img.convert("L" if channels == 1 else "RGB")
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def resize_center_crop_tensor(images: torch.Tensor, size: int | None, chunk: int = 4096) -> torch.Tensor:
    """Resize a ``N×C×H×W`` uint8 tensor to ``N×C×size×size``.

    The shorter side goes to ``size`` (bilinear, antialiased) and the centre square is kept.
    ``size=None`` keeps the native resolution and only centre-crops non-square images.
    Works in chunks so that the float copy stays small.
    """
    n, c, h, w = images.shape
    target = min(h, w) if size is None else size
    if (h, w) == (target, target):
        return images
    if size is None or min(h, w) == target:
        top, left = (h - target) // 2, (w - target) // 2
        return images[:, :, top : top + target, left : left + target].contiguous()
    scale = target / min(h, w)
    new_h, new_w = max(target, round(h * scale)), max(target, round(w * scale))
    top, left = (new_h - target) // 2, (new_w - target) // 2
    out = torch.empty((n, c, target, target), dtype=torch.uint8)
    for start in range(0, n, chunk):
        part = images[start : start + chunk].float()
        part = F.interpolate(part, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        part = part[:, :, top : top + target, left : left + target]
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(images: torch.Tensor, chunk: int = 8192) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of a ``N×C×H×W`` uint8 tensor, in [0, 1] units."""
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].to(torch.float64).div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
        count += part.shape[0] * part.shape[2] * part.shape[3]
    if count == 0:
        return (0.5,) * c, (0.5,) * c
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std)


# --------------------------------------------------------------------------------------
# lazy decoders (module-level classes, so that they pickle into DataLoader/Ray workers)
# --------------------------------------------------------------------------------------


class LazyDecoder:
    """Decodes item ``i`` of ``items`` into a ``C×size×size`` uint8 tensor on access.

    An item that does not decode raises :class:`~pcl_ray.data.errors.BadImageError` naming it
    (:meth:`describe`). With ``skip_bad=True`` (``data.skip_bad_images``) it is replaced by the next
    item that decodes, with one warning line per bad item; the index that travels with it stays ``i``.
    """

    #: How many following items a skipped bad item may try before giving up.
    MAX_SUBSTITUTE_TRIES = 16

    def __init__(self, items: Sequence[Any], size: int, channels: int, *, skip_bad: bool = False,
                 eval_view: bool = True) -> None:
        self.items = items
        self.size = size
        self.channels = channels
        self.skip_bad = bool(skip_bad)
        #: True: item i is the evaluation view (shorter side to size·256/224, centre crop); False: the
        #: shorter side to size, centre crop (decoding same-size images into memory at their own size)
        self.eval_view = bool(eval_view)
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            return self.decode(i)
        except Exception as exc:
            if not self.skip_bad:
                raise self.bad_image(i, exc) from None
            why = reason(exc)
        for step in range(1, min(self.MAX_SUBSTITUTE_TRIES, len(self) - 1) + 1):
            j = (i + step) % len(self)
            try:
                image = self.decode(j)
            except Exception:
                continue
            if i not in self._warned:
                self._warned.add(i)
                print(f"[pcl-ray] warning: {self.describe(i)}: cannot decode the image ({why}); using "
                      f"{self.describe(j)} in its place (data.skip_bad_images=true)", file=sys.stderr, flush=True)
            return image
        raise BadImageError(f"{self.describe(i)}: cannot decode the image ({why}), and none of the next "
                            f"{self.MAX_SUBSTITUTE_TRIES} images decodes either (data.skip_bad_images=true "
                            "has nothing to replace it with)")

    def decode(self, i: int) -> torch.Tensor:
        """Item ``i`` as a tensor; raises whatever the image library raises on a bad item."""
        mode = "L" if self.channels == 1 else "RGB"
        # the evaluation view: Resize(256) → CenterCrop(224) at 224
        resize = eval_resize(self.size) if self.eval_view else self.size
        with self.open(self.items[i]) as img:
            img.draft(mode, (resize, resize))  # JPEG: decode at a reduced scale ≥ the resize
            img = img.convert(mode)
        return pil_to_tensor(resize_center_crop_pil(img, self.size, resize), self.channels)

    def bad_image(self, i: int, exc: BaseException) -> BadImageError:
        """The error for item ``i`` failing to decode with ``exc``."""
        return BadImageError(f"{self.describe(i)}: cannot decode the image ({reason(exc)}); replace or remove it, "
                             "or set data.skip_bad_images=true to train on without it")

    def describe(self, i: int) -> str:
        """Where item ``i`` comes from, for messages."""
        return f"image {i}"

    def open(self, item: Any) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def take(self, n: int) -> LazyDecoder:
        """The decoder restricted to the first ``n`` items."""
        return type(self)(self.items[:n], self.size, self.channels, skip_bad=self.skip_bad,
                          eval_view=self.eval_view)


class FileDecoder(LazyDecoder):
    """Items are image file paths (ImageFolder layout)."""

    def open(self, item: str) -> Image.Image:
        return Image.open(item)

    def describe(self, i: int) -> str:
        return str(self.items[i])


class BytesDecoder(LazyDecoder):
    """Items are encoded image bytes (PNG/JPEG, e.g. from a Parquet column).

    ``origins``: ``(file, first item index)`` pairs in item order, naming where the bytes were read
    from (item ``i`` is row ``i - first`` of the last file whose first index is ``<= i``).
    """

    def __init__(self, items: Sequence[Any], size: int, channels: int, *, skip_bad: bool = False,
                 eval_view: bool = True, origins: Sequence[tuple[str, int]] = ()) -> None:
        super().__init__(items, size, channels, skip_bad=skip_bad, eval_view=eval_view)
        self.origins = [(str(f), int(start)) for f, start in origins]

    def open(self, item: bytes) -> Image.Image:
        if not isinstance(item, (bytes, bytearray, memoryview)):
            raise TypeError(f"expected encoded image bytes, got {type(item).__name__}")
        return Image.open(io.BytesIO(item))

    def describe(self, i: int) -> str:
        if not self.origins:
            return f"image {i}"
        k = bisect.bisect_right([start for _, start in self.origins], i) - 1
        if k < 0:
            return f"image {i}"
        file, start = self.origins[k]
        return f"{file} row {i - start}"

    def take(self, n: int) -> BytesDecoder:
        return BytesDecoder(self.items[:n], self.size, self.channels, skip_bad=self.skip_bad,
                            eval_view=self.eval_view, origins=[(f, s) for f, s in self.origins if s < n])


# --------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------


class IndexedImages(Dataset):
    """A split of an image data set whose items are ``(uint8 C×H×W image, index)``.

    Attributes:
        tensor: the whole split as ``N×C×H×W`` uint8 when it is held in memory, else ``None``.
        labels: ``int64`` array of length ``N``; ``-1`` where unknown. Never used in training.
        num_classes: number of label classes (0 when there are no labels).
        channels: 1 (grayscale) or 3 (RGB).
        image_size: side of the square images this split yields.
        mean, std: per-channel normalisation constants in [0, 1] units (the training split's
            for the sets with known constants; build view pipelines from the training split).
        name, split: where it came from (``data.name`` and ``"train"``/``"test"``).
        classes: class names when the source knows them.
    """

    def __init__(
        self,
        *,
        labels: np.ndarray,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        tensor: torch.Tensor | None = None,
        decoder: LazyDecoder | None = None,
        name: str = "",
        split: str = "train",
        classes: Sequence[str] | None = None,
    ) -> None:
        if (tensor is None) == (decoder is None):
            raise ValueError("IndexedImages needs exactly one of `tensor` or `decoder`")
        if tensor is not None:
            if tensor.dtype != torch.uint8 or tensor.ndim != 4 or tensor.shape[2] != tensor.shape[3]:
                raise ValueError(f"tensor must be uint8 N×C×S×S, got {tuple(tensor.shape)} {tensor.dtype}")
            length, channels, image_size = tensor.shape[0], tensor.shape[1], tensor.shape[2]
        else:
            assert decoder is not None
            length, channels, image_size = len(decoder), decoder.channels, decoder.size
        labels = np.asarray(labels, dtype=np.int64)
        if labels.shape != (length,):
            raise ValueError(f"labels has shape {labels.shape}, expected ({length},)")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} entries, got {len(mean)}/{len(std)}")
        self.tensor = tensor
        self.decoder = decoder
        self.labels = labels
        self.num_classes = int(num_classes)
        self.channels = int(channels)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.name = name
        self.split = split
        self.classes = list(classes) if classes is not None else None
        self._length = int(length)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = int(i)
        if not -self._length <= i < self._length:
            raise IndexError(f"index {i} out of range for {self._length} images")
        i %= self._length
        if self.tensor is not None:
            return self.tensor[i], i
        assert self.decoder is not None
        return self.decoder[i], i

    @property
    def in_memory(self) -> bool:
        """Whether the whole split is held as one tensor."""
        return self.tensor is not None

    def take(self, n: int | None) -> IndexedImages:
        """The first ``n`` images (all when ``n`` is None or at least ``len(self)``)."""
        if n is None or n >= self._length:
            return self
        if n < 0:
            raise ValueError(f"subset size must be non-negative, got {n}")
        return IndexedImages(
            labels=self.labels[:n],
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
            tensor=None if self.tensor is None else self.tensor[:n].clone(),
            decoder=None if self.decoder is None else self.decoder.take(n),
            name=self.name,
            split=self.split,
            classes=self.classes,
        )

    def resized(self, size: int | None) -> IndexedImages:
        """In-memory split resized (shorter side + centre crop) to ``size``; None keeps it."""
        if self.tensor is None or size is None or size == self.image_size:
            return self
        return IndexedImages(
            labels=self.labels,
            num_classes=self.num_classes,
            mean=self.mean,
            std=self.std,
            tensor=resize_center_crop_tensor(self.tensor, size),
            name=self.name,
            split=self.split,
            classes=self.classes,
        )

    def __repr__(self) -> str:
        where = "in memory" if self.tensor is not None else "lazy"
        return (
            f"IndexedImages(name={self.name!r}, split={self.split!r}, n={self._length}, "
            f"shape={self.channels}×{self.image_size}×{self.image_size}, classes={self.num_classes}, {where})"
        )
