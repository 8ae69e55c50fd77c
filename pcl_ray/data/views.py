"""Batched view recipes: random augmentations as tensor ops on whole batches.

Per-image PIL augmentation costs about two thirds of a CPU training step on 28×28 images
(README "How it works", views), so views are made here from a whole uint8 batch at once, on whatever device
the batch lives on. Every per-sample random parameter is drawn as a tensor (no Python loop
over samples), from an optional ``torch.Generator`` for reproducibility.

Recipes (MoCo / PCL, README "Methods"):

``pcl_v1``
    random resized crop (scale ``[crop_min_scale, 1]``, ratio 3/4–4/3), grayscale p 0.2,
    colour jitter 0.4 (brightness, contrast, saturation, hue; MoCo v1's ``ColorJitter(0.4, 0.4, 0.4, 0.4)``)
    p 1, horizontal flip p 0.5.
``pcl_v2`` ("aug-plus")
    random resized crop, colour jitter 0.4/0.4/0.4/0.1 (brightness, contrast, saturation,
    hue) p 0.8, grayscale p 0.2, Gaussian blur σ ∈ [0.1, 2] p 0.5, horizontal flip p 0.5.

Differences from the torchvision/PIL pipeline, all deliberate:

* crop and flip are one affine resampling (``grid_sample``, bilinear) with continuous crop
  boxes, straight to ``image_size``; no antialiasing when a crop is downscaled. The grid
  equals ``F.affine_grid``'s for the axis-aligned map but is built by broadcasting;
* jitter operations run in one random order per call (torchvision: per image);
* on 1-channel images grayscale, saturation and hue are no-ops;
* the blur kernel is ``max(3, ~10 % of image_size)`` taps, odd, reflect padding.

Lazily decoded sources of mixed-size images crop per image on the full decoded image instead
(:mod:`pcl_ray.data.crops`, in the loader's worker processes); their makers take
``crop_on_device=False`` and do only the colour, grayscale and blur steps here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["ViewMaker", "Recipe", "RECIPES", "blur_kernel_size"]

#: ITU-R 601 luma weights, as torchvision's ``rgb_to_grayscale``.
_LUMA = (0.2989, 0.587, 0.114)


@dataclass(frozen=True)
class Recipe:
    """Augmentation strengths and probabilities of a view recipe."""

    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.0
    jitter_p: float = 1.0
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_p: float = 0.5
    #: apply grayscale before colour jitter (v1 order) rather than after (v2 order).
    grayscale_first: bool = False


RECIPES: dict[str, Recipe] = {
    "pcl_v1": Recipe(hue=0.4, jitter_p=1.0, grayscale_p=0.2, blur_p=0.0, grayscale_first=True),
    "pcl_v2": Recipe(hue=0.1, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, grayscale_first=False),
}


def blur_kernel_size(image_size: int) -> int:
    """Gaussian blur taps: about 10 % of the image side, odd, at least 3."""
    k = max(3, int(round(0.1 * image_size)))
    return k if k % 2 == 1 else k + 1


def _gray(x: torch.Tensor) -> torch.Tensor:
    """``B×3×H×W`` → ``B×1×H×W`` luma (1-channel input is returned as is)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of ``B×3×H×W`` images in [0, 1] by ``shift`` (B,) turns.

    Same result as torchvision's ``adjust_hue`` (RGB → HSV, h += shift mod 1, HSV → RGB),
    written with few full-size intermediates: V = max, V·S = chroma = max − min.
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    chroma = maxc - x.amin(dim=1)
    inv = torch.where(chroma > 0, chroma.reciprocal(), torch.zeros_like(chroma))
    # hue in sixths of a turn (range [-1, 5)); grey pixels (chroma 0) get 0 from inv = 0
    hue6 = torch.where(
        maxc == r, (g - b) * inv, torch.where(maxc == g, 2.0 + (b - r) * inv, 4.0 + (r - g) * inv)
    )
    hue6 = hue6 + (6.0 * shift).view(-1, 1, 1)
    # HSV → RGB: channel n ∈ (5, 3, 1) is V − V·S·clamp(min(k, 4 − k), 0, 1), k = (n + 6h) mod 6.
    n = torch.tensor((5.0, 3.0, 1.0), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(hue6.unsqueeze(1) + n, 6.0)
    weight = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return maxc.unsqueeze(1) - chroma.unsqueeze(1) * weight


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur each image of ``B×C×H×W`` with its own σ (B,): separable, grouped convolutions."""
    bsz, c, h, w = x.shape
    half = kernel_size // 2
    taps = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B·C)×k
    flat = x.reshape(1, bsz * c, h, w)
    pad_mode = "reflect" if min(h, w) > half else "replicate"
    flat = F.pad(flat, (half, half, half, half), mode=pad_mode)
    flat = F.conv2d(flat, kernel.view(bsz * c, 1, 1, kernel_size), groups=bsz * c)
    flat = F.conv2d(flat, kernel.view(bsz * c, 1, kernel_size, 1), groups=bsz * c)
    return flat.view(bsz, c, h, w)


def _axis_aligned_grid(theta: torch.Tensor, size: int) -> torch.Tensor:
    """Sampling grid ``B×size×size×2`` of the axis-aligned affine maps
    ``theta = (sx, tx, sy, ty)`` (B×4).

    Equals ``F.affine_grid([[sx, 0, tx], [0, sy, ty]], align_corners=False)`` but built by
    broadcasting (x depends on the column only, y on the row only): about 10× faster on
    the CPU than the general batched matrix product.
    """
    base = (torch.arange(size, device=theta.device, dtype=theta.dtype) * 2.0 + 1.0) / size - 1.0
    gx = theta[:, 0:1] * base + theta[:, 1:2]  # B×size, per column
    gy = theta[:, 2:3] * base + theta[:, 3:4]  # B×size, per row
    return torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1)


class ViewMaker:
    """Makes random views (and deterministic eval inputs) from uint8 image batches.

    Args:
        recipe: ``"pcl_v1"`` or ``"pcl_v2"`` (see the module docstring), or a custom
            :class:`Recipe`.
        image_size: side of the square output views.
        channels: 1 or 3, the channel count of the batches.
        mean, std: per-channel normalisation constants in [0, 1] units.
        crop_min_scale, crop_max_scale: area fraction range of the random resized crop.
        crop_on_device: False when the batch already holds random-resized, flipped crops of
            ``image_size`` (:class:`pcl_ray.data.crops.CroppedViews`): the crop and flip are skipped.

    Calling the maker on a ``B×C×H×W`` uint8 batch (floating input is taken as [0, 1])
    returns one random normalised float32 view ``B×C×image_size×image_size`` on the same
    device; pass a ``torch.Generator`` to make it reproducible (it may live on the CPU
    while the batch is on a GPU: only the per-sample parameters are drawn from it).
    """

    def __init__(
        self,
        recipe: str | Recipe,
        image_size: int,
        channels: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_min_scale: float = 0.2,
        crop_max_scale: float = 1.0,
        crop_on_device: bool = True,
    ) -> None:
        if isinstance(recipe, Recipe):
            self.recipe_name, self.recipe = "custom", recipe
        elif recipe in RECIPES:
            self.recipe_name, self.recipe = recipe, RECIPES[recipe]
        else:
            raise ValueError(f"unknown view recipe {recipe!r}; choose one of: {', '.join(RECIPES)}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean/std need {channels} entries, got {len(mean)}/{len(std)}")
        if not 0.0 < crop_min_scale <= crop_max_scale <= 1.0:
            raise ValueError(f"need 0 < crop_min_scale <= crop_max_scale <= 1, got {crop_min_scale}, {crop_max_scale}")
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_scale = (float(crop_min_scale), float(crop_max_scale))
        self.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
        self.blur_kernel_size = blur_kernel_size(self.image_size)
        self.crop_on_device = bool(crop_on_device)
        self._norm_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def __repr__(self) -> str:
        return (
            f"ViewMaker(recipe={self.recipe_name!r}, image_size={self.image_size}, channels={self.channels}, "
            f"crop_scale={self.crop_scale})"
        )

    # ------------------------------------------------------------------ public API

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One random view of every image of ``batch``."""
        return self._view(self._to_float(batch), generator)

    def make_views(
        self, batch: torch.Tensor, n: int = 2, generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        """``n`` independent random views of ``batch``."""
        x = self._to_float(batch)
        return [self._view(x, generator) for _ in range(n)]

    def eval(self, batch: torch.Tensor) -> torch.Tensor:
        """Deterministic input: resize (shorter side, antialiased) + centre crop to
        ``image_size`` when needed, then normalise."""
        x = self._to_float(batch)
        h, w = x.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            new_h, new_w = max(s, round(h * scale)), max(s, round(w * scale))
            if (new_h, new_w) != (h, w):
                x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
            top, left = (new_h - s) // 2, (new_w - s) // 2
            x = x[:, :, top : top + s, left : left + s]
        return self._normalize(x)

    # ------------------------------------------------------------------ internals

    def _to_float(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.ndim != 4 or batch.shape[1] != self.channels:
            raise ValueError(f"expected a B×{self.channels}×H×W batch, got shape {tuple(batch.shape)}")
        if batch.dtype == torch.uint8:
            return batch.float().div_(255.0)
        return batch.float()

    def _rand(self, shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """Uniform [0, 1) parameters, drawn on the generator's device, returned on ``device``."""
        src = generator.device if generator is not None else device
        return torch.rand(tuple(shape), generator=generator, device=src).to(device)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        if key not in self._norm_cache:
            mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            inv_std = 1.0 / torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
            self._norm_cache[key] = (mean, inv_std)
        mean, inv_std = self._norm_cache[key]
        return (x - mean).mul_(inv_std)

    def _crop_flip(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Random resized crop + horizontal flip as one affine resampling to ``image_size``.

        Crop boxes follow torchvision's ``RandomResizedCrop.get_params``: 10 tries of
        (area scale, log-uniform aspect ratio) per image, the first one that fits wins, else
        the whole image (ratio clamped to the allowed range), centred.
        """
        bsz, _, h, w = x.shape
        dev = x.device
        tries = 10
        u = self._rand((bsz, tries * 2 + 3), generator, dev)
        area = h * w * (self.crop_scale[0] + (self.crop_scale[1] - self.crop_scale[0]) * u[:, :tries])
        log_lo, log_hi = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(log_lo + (log_hi - log_lo) * u[:, tries : 2 * tries])
        cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)
        fits = (cw <= w) & (ch <= h)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
        cw, ch = cw.gather(1, first).squeeze(1), ch.gather(1, first).squeeze(1)
        # fallback: whole image, aspect ratio clamped into range, centred
        in_ratio = w / h
        if in_ratio < self.crop_ratio[0]:
            fw, fh = float(w), w / self.crop_ratio[0]
        elif in_ratio > self.crop_ratio[1]:
            fw, fh = h * self.crop_ratio[1], float(h)
        else:
            fw, fh = float(w), float(h)
        ok = fits.any(dim=1)
        cw = torch.where(ok, cw, torch.full_like(cw, fw))
        ch = torch.where(ok, ch, torch.full_like(ch, fh))
        pos_x, pos_y, flip_u = u[:, 2 * tries], u[:, 2 * tries + 1], u[:, 2 * tries + 2]
        pos_x = torch.where(ok, pos_x, torch.full_like(pos_x, 0.5))
        pos_y = torch.where(ok, pos_y, torch.full_like(pos_y, 0.5))
        x0, y0 = pos_x * (w - cw), pos_y * (h - ch)
        flip = torch.where(flip_u < self.recipe.flip_p, -1.0, 1.0)
        # Affine map per image, in normalised coordinates (align_corners=False: −1 and 1 are
        # the outer pixel edges): input = scale · output + offset, the x scale signed by the flip.
        theta = torch.stack(
            (flip * cw / w, (2.0 * x0 + cw) / w - 1.0, ch / h, (2.0 * y0 + ch) / h - 1.0), dim=1
        ).to(x.dtype)
        grid = _axis_aligned_grid(theta, self.image_size)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def _grayscale(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.channels == 1 or self.recipe.grayscale_p <= 0:
            return x
        apply = self._rand((x.shape[0],), generator, x.device) < self.recipe.grayscale_p
        return torch.where(_per_sample(apply), _gray(x).expand_as(x), x)

    def _jitter(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        rc = self.recipe
        if rc.jitter_p <= 0:
            return x
        bsz, dev = x.shape[0], x.device
        u = self._rand((bsz, 5), generator, dev)
        apply = u[:, 4] < rc.jitter_p
        one = torch.ones_like(u[:, 0])

        def factor(col: int, strength: float) -> torch.Tensor:
            f = (1.0 - strength) + 2.0 * strength * u[:, col]
            return torch.where(apply, f, one).clamp_min(0.0)

        ops: list[tuple[str, torch.Tensor]] = [
            ("brightness", factor(0, rc.brightness)),
            ("contrast", factor(1, rc.contrast)),
        ]
        if self.channels == 3:
            if rc.saturation > 0:
                ops.append(("saturation", factor(2, rc.saturation)))
            if rc.hue > 0:
                ops.append(("hue", torch.where(apply, rc.hue * (2.0 * u[:, 3] - 1.0), torch.zeros_like(one))))
        # one random order of the operations per call (torchvision draws one per image)
        order = self._rand((len(ops),), generator, torch.device("cpu")).argsort()
        for i in order.tolist():
            op, f = ops[i]
            if op == "brightness":
                x = (x * _per_sample(f)).clamp_(0.0, 1.0)
            elif op == "contrast":
                m = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
                x = torch.lerp(m, x, _per_sample(f)).clamp_(0.0, 1.0)
            elif op == "saturation":
                x = torch.lerp(_gray(x), x, _per_sample(f)).clamp_(0.0, 1.0)
            else:
                x = _shift_hue(x, f)
        return x

    def _blur(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        rc = self.recipe
        if rc.blur_p <= 0:
            return x
        u = self._rand((x.shape[0], 2), generator, x.device)
        apply = u[:, 0] < rc.blur_p
        sigma = rc.blur_sigma[0] + (rc.blur_sigma[1] - rc.blur_sigma[0]) * u[:, 1]
        # Images that skip the blur get a vanishing σ, i.e. a unit impulse kernel.
        sigma = torch.where(apply, sigma, torch.full_like(sigma, 1e-3))
        return _gaussian_blur(x, sigma, self.blur_kernel_size)

    def _view(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if self.crop_on_device:
            x = self._crop_flip(x, generator)
        elif x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"crop_on_device=False needs {self.image_size}×{self.image_size} crops, got "
                             f"{tuple(x.shape[-2:])}")
        if self.recipe.grayscale_first:
            x = self._grayscale(x, generator)
            x = self._jitter(x, generator)
        else:
            x = self._jitter(x, generator)
            x = self._grayscale(x, generator)
        x = self._blur(x, generator)
        return self._normalize(x)
