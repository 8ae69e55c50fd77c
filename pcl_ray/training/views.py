"""The augmentations one method trains on, built from the config and the data set's statistics.

Two paths make the random-resized crop (README "Data"):

* **in memory** (Fashion-MNIST, digits, CIFAR, same-size Parquet): the whole batch is cropped, flipped,
  jittered and blurred with tensor ops on the device (:class:`~pcl_ray.data.ViewMaker`);
* **lazily decoded** (ImageFolder, mixed-size Parquet): each image is cropped from its *full* decoded
  image in the loader's worker processes (:class:`~pcl_ray.data.crops.CroppedViews`, torchvision's
  RandomResizedCrop draw), as the paper's ImageNet pipeline does; colour, grayscale and blur stay
  batched on the device (``ViewMaker(crop_on_device=False)``).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from ..data import ViewMaker
from ..data.crops import CropSpec, CroppedViews


def host_crop_spec(method, cfg, ds) -> CropSpec | None:
    """The crop that lazily decoded splits take from the full image, or None for the device path.

    Used when the split is decoded lazily and every view the method asks for has the same size and scale
    range (two global crops: PCL, MoCo, SimCLR, DeepCluster-v2, SPCL). SwAV's multi-crop views keep the
    device path.
    """
    if ds.tensor is not None or getattr(ds, "decoder", None) is None:
        return None
    specs = {(v.size, v.min_scale, v.max_scale) for v in method.view_specs(ds.image_size)}
    if len(specs) != 1:
        return None
    size, lo, hi = specs.pop()
    return CropSpec(size, (lo, hi))


def build_view_makers(method, cfg, ds, *, crop_on_device: bool = True) -> tuple[list[ViewMaker], ViewMaker]:
    """One ViewMaker per view the method asks for, plus the deterministic evaluation transform.

    ``crop_on_device=False``: the batches already hold the views' crops (:func:`host_cropped_batches`).
    """
    size = ds.image_size

    def make(spec_size: int, lo: float, hi: float, on_device: bool) -> ViewMaker:
        return ViewMaker(cfg.data.views.recipe, spec_size, ds.channels, ds.mean, ds.std,
                         crop_min_scale=lo, crop_max_scale=hi, crop_on_device=on_device)

    makers = [make(v.size, v.min_scale, v.max_scale, crop_on_device) for v in method.view_specs(size)]
    return makers, make(size, cfg.data.views.crop_min_scale, 1.0, True)


def host_cropped_batches(ds, order: np.ndarray, batch_size: int, spec: CropSpec, views: int, *, seed: int,
                         epoch: int, loader_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(uint8 B×V×C×S×S crops, int64 B indices)`` over ``order`` in whole batches.

    Image ``i``'s crops are drawn from a generator of ``(seed, epoch, i)``: the same whichever rank or
    loader process decodes it, so an elastic or resumed run crops what an uninterrupted one crops.
    """
    crops = CroppedViews(ds, spec, views=views, seed=seed)
    crops.set_epoch(epoch)
    stop = len(order) - len(order) % batch_size
    loader = DataLoader(Subset(crops, np.asarray(order[:stop]).tolist()), batch_size=batch_size, shuffle=False,
                        drop_last=False, num_workers=loader_workers, persistent_workers=False)
    for images, idx in loader:  # images: B×V×C×S×S
        yield images, idx.to(torch.int64)
