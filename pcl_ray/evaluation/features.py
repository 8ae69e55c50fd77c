"""Turning images into feature matrices for evaluation, one block at a time.

The one place evaluation loads a trained encoder (:func:`load_encoder`) and embeds a split with it
(:func:`embed_split`), and where the raw-pixel baseline's features come from (:func:`raw_pixel_split`):
the end-of-run report, the ``eval`` suite and ``compare``'s t-SNE grid all go through here.

Feature matrices are the largest objects of an evaluation (1.28M x 2048 float32 = 10 GB for the
ImageNet training split), so every function here writes each block of outputs straight into one
preallocated array instead of collecting blocks in a list and concatenating them at the end, which
holds every feature twice at the moment of the concatenation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import EVAL_FEATURES, ExperimentConfig
from ..data import IndexedImages, ViewMaker, iterate_batches
from ..normalize import l2_normalize  # noqa: F401  (evaluation modules import it from here)
from ..models import Encoder, build_encoder

__all__ = ["FEATURES", "all_images", "embed", "embed_many", "embed_split", "eval_device", "eval_views",
           "image_blocks", "l2_normalize", "load_encoder", "raw_pixel_features", "raw_pixel_matrix", "raw_pixel_split"]

FEATURES: tuple[str, ...] = EVAL_FEATURES  # what embed_split can return (eval.feature picks one)


def eval_device() -> torch.device:
    """Where evaluation runs its forward passes: the GPU when this process sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def raw_pixel_features(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Flatten uint8 images ``(N, C, H, W)`` into float32 ``(N, C*H*W)`` features in ``[0, 1]``.

    This is the "no learning" baseline that every representation should beat.
    """
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.dtype != np.uint8:
        raise TypeError(f"expected uint8 images, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"expected a batch of images (N, C, H, W), got shape {x.shape}")
    out = x.reshape(x.shape[0], -1).astype(np.float32)
    np.divide(out, np.float32(255.0), out=out)  # in place: one float copy of the images, not two
    return out


def raw_pixel_matrix(blocks: Iterable[torch.Tensor], total: int) -> np.ndarray:
    """:func:`raw_pixel_features` of ``total`` images arriving in uint8 blocks, without stacking them first.

    Only the float32 result is allocated at full size; each block is converted into its rows.
    """
    out: np.ndarray | None = None
    filled = 0
    for block in blocks:
        rows = raw_pixel_features(block)
        if out is None:
            out = np.empty((total, rows.shape[1]), dtype=np.float32)
        if filled + rows.shape[0] > total:
            raise ValueError(f"raw_pixel_matrix got more than the {total} images announced")
        out[filled : filled + rows.shape[0]] = rows
        filled += rows.shape[0]
    if out is None or filled != total:
        raise ValueError(f"raw_pixel_matrix expected {total} images, got {filled}")
    return out


def embed_many(
    model_fn: Callable[[torch.Tensor], Mapping[str, torch.Tensor]],
    batches: Iterable[torch.Tensor],
    total: int | None = None,
) -> dict[str, np.ndarray]:
    """Run ``model_fn`` over ``batches`` without gradients; stack each named output into one array.

    Args:
        model_fn: maps a batch to ``{name: (B, d_name) features}`` (on any device; the rows are
            copied to the CPU block by block).
        batches: the batches, in the order the rows should appear.
        total: the number of rows all batches add up to. When given, each output array is
            allocated once at its final size and filled block by block (peak memory: the features
            once plus one block); when None, the blocks are kept and concatenated at the end.

    Returns:
        ``{name: float32 (rows, d_name)}`` on the CPU.
    """
    out: dict[str, np.ndarray] = {}
    parts: dict[str, list[np.ndarray]] = {}
    filled = 0
    with torch.no_grad():
        for batch in batches:
            named = model_fn(batch)
            rows = None
            for name, value in named.items():
                block = value.detach().to("cpu", torch.float32).numpy()
                rows = block.shape[0] if rows is None else rows
                if block.shape[0] != rows:
                    raise ValueError(f"embed: output {name!r} has {block.shape[0]} rows, expected {rows}")
                if total is None:
                    parts.setdefault(name, []).append(block)
                    continue
                if name not in out:
                    out[name] = np.empty((total, *block.shape[1:]), dtype=np.float32)
                if filled + rows > total:
                    raise ValueError(f"embed: the batches hold more than the {total} rows announced")
                out[name][filled : filled + rows] = block
            filled += rows or 0
    if filled == 0:
        raise ValueError("embed() got no batches")
    if total is None:
        return {name: np.concatenate(blocks, axis=0) for name, blocks in parts.items()}
    if filled != total:
        raise ValueError(f"embed: expected {total} rows, the batches held {filled}")
    return out


def embed(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    batches: Iterable[torch.Tensor],
    total: int | None = None,
) -> np.ndarray:
    """Run ``model_fn`` over ``batches`` without gradients and stack the outputs.

    Args:
        model_fn: maps a float batch ``(B, ...)`` to features ``(B, d)``; moving the
            batch to the model's device and switching the model to eval mode are
            the caller's business (wrap it in a lambda if needed).
        batches: iterable of float batches, in the order the rows should appear.
        total: the number of rows, when known: the result is then filled in place
            (see :func:`embed_many`).

    Returns:
        float32 ``(sum of B, d)`` array on the CPU.
    """
    return embed_many(lambda b: {"x": model_fn(b)}, batches, total)["x"]


def load_encoder(cfg: ExperimentConfig, method_state: Mapping[str, torch.Tensor], in_channels: int, *,
                 head_for: str | None = None) -> Encoder:
    """The online encoder of a method state dict (keys ``encoder.*``), in eval mode.

    A state holding only the backbone (``encoder.backbone.*``, e.g. rebuilt from an MLflow
    ``model/backbone.pt``) is accepted unless the head is needed: ``head_for`` names what needs it (the
    end-of-run report's head row); when None, ``eval.feature=head`` does.

    Raises:
        ValueError: the weights do not fit ``cfg.model``, or the head is needed but missing.
    """
    enc = build_encoder(cfg.model, in_channels)
    prefix = "encoder."
    state = {k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)}
    try:
        missing, unexpected = enc.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"the checkpoint does not fit model={cfg.model.model_dump()}: {exc}") from None
    bad_missing = [k for k in missing if not k.startswith("head.")]
    if unexpected or bad_missing:
        raise ValueError(f"the checkpoint does not fit model={cfg.model.model_dump()}: "
                         f"missing {bad_missing[:5]}, unexpected {unexpected[:5]}")
    if head_for is None and cfg.eval.feature == "head":
        head_for = "eval.feature=head"
    if missing and head_for is not None:
        raise ValueError(f"{head_for} needs the projection head, which this checkpoint does not hold")
    return enc.eval()


def eval_views(cfg: ExperimentConfig, ds: IndexedImages) -> ViewMaker:
    """The view maker whose ``eval`` transform (resize + normalize, no augmentation) evaluation embeds with."""
    return ViewMaker(cfg.data.views.recipe, cfg.data.image_size or ds.image_size, ds.channels, ds.mean, ds.std)


def embed_split(enc: Encoder, ds: IndexedImages, views: ViewMaker, features: Sequence[str] = FEATURES,
                batch_size: int = 512) -> dict[str, np.ndarray]:
    """The named ``features`` of every image of ``ds``, in dataset order, from one pass of ``enc``.

    ``"backbone"``: the pooled backbone features ``(N, backbone_dim)``; ``"head"``: the projection head's
    L2-normalized output ``(N, feature_dim)``. Runs on :func:`eval_device`, block by block; each block lands
    in its rows of the result arrays (see :func:`embed_many`).
    """
    unknown = [f for f in features if f not in FEATURES]
    if unknown or not features:
        raise ValueError(f"embed_split: features must be some of {', '.join(FEATURES)}, got {list(features)}")
    device = eval_device()
    enc = enc.to(device)

    def named(images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = enc.features(views.eval(images.to(device, non_blocking=True)))  # h: B x backbone_dim
        out = {"backbone": h} if "backbone" in features else {}
        if "head" in features:
            out["head"] = F.normalize(enc.head(h), dim=1)  # B x feature_dim, unit rows
        return out

    batches = (b for b, _ in iterate_batches(ds, None, batch_size, shuffle=False, seed=0, drop_last=False))
    return embed_many(named, batches, total=len(ds))


def image_blocks(ds: IndexedImages, size: int, batch_size: int = 1024) -> Iterator[torch.Tensor]:
    """The split's uint8 images ``(B, C, size, size)`` in dataset order, resized to ``size`` when needed."""
    for x, _ in iterate_batches(ds, None, batch_size, shuffle=False, seed=0, drop_last=False):
        if x.shape[-1] != size or x.shape[-2] != size:  # x: B x C x H x W uint8
            x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False).round().clamp(0, 255).to(torch.uint8)
        yield x


def raw_pixel_split(ds: IndexedImages, size: int) -> np.ndarray:
    """Raw-pixel features ``(N, C*size*size)`` of the split, converted block by block into one float32 matrix."""
    return raw_pixel_matrix(image_blocks(ds, size), len(ds))


def all_images(ds: IndexedImages, size: int) -> torch.Tensor:
    """Every image of the split as one uint8 ``(N, C, size, size)`` tensor (the split's own when it fits as is)."""
    tensor = ds.tensor
    if tensor is not None and tensor.shape[0] == len(ds) and tensor.shape[-2:] == (size, size):
        return tensor
    out = None
    filled = 0
    for x in image_blocks(ds, size):
        if out is None:
            out = torch.empty((len(ds), *x.shape[1:]), dtype=torch.uint8)
        out[filled : filled + x.shape[0]] = x
        filled += x.shape[0]
    assert out is not None  # load_split refuses empty splits
    return out
