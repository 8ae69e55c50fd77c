"""End-of-run evaluation of a trained encoder beside raw-pixel baselines (same data, same run)."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch

from ..config import ExperimentConfig
from ..data import ViewMaker, iterate_batches, load_split
from ..models import Encoder, build_encoder
from .clustering import cluster_metrics
from .features import embed_many, eval_device, raw_pixel_matrix
from .knn import knn_accuracies
from .lowshot import lowshot_svm


_EXTRA_KNN = re.compile(r"knn(\d+)_acc")  # eval.knn_extra_k, as named by _row


def extra_knn_columns(metric_names) -> list[tuple[str, str]]:
    """``(name, title)`` of every kNN accuracy at an extra neighbour count among ``metric_names``, by k."""
    ks = sorted({int(m.group(1)) for name in metric_names if (m := _EXTRA_KNN.fullmatch(name))})
    return [(f"knn{k}_acc", f"kNN k={k}") for k in ks]


def load_encoder(cfg: ExperimentConfig, method_state: dict[str, torch.Tensor], in_channels: int) -> Encoder:
    """The online encoder from a checkpoint's method state dict (keys prefixed ``encoder.``)."""
    enc = build_encoder(cfg.model, in_channels)
    prefix = "encoder."
    enc.load_state_dict({k[len(prefix):]: v for k, v in method_state.items() if k.startswith(prefix)})
    return enc.eval()


def embed_split(enc: Encoder, ds, views: ViewMaker, batch_size: int = 512) -> dict[str, np.ndarray]:
    """Backbone features and normalized head outputs of every image of ``ds``, in dataset order.

    One pass, block by block, on :func:`eval_device`; each block lands in its rows of the two result
    arrays (no list of blocks, no concatenation).
    """
    device = eval_device()
    enc = enc.to(device)

    def both(images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = enc.features(views.eval(images.to(device, non_blocking=True)))
        return {"backbone": h, "head": torch.nn.functional.normalize(enc.head(h), dim=1)}

    batches = (b for b, _ in iterate_batches(ds, None, batch_size, shuffle=False, seed=0, drop_last=False))
    return embed_many(both, batches, total=len(ds))


def _row(train_x, train_y, test_x, test_y, cfg: ExperimentConfig, num_classes: int) -> dict[str, float]:
    accs = knn_accuracies(train_x, train_y, test_x, test_y, [cfg.eval.knn_k, *cfg.eval.knn_extra_k],
                          temperature=cfg.eval.knn_temperature, num_classes=num_classes)
    row = {"knn_acc": accs[cfg.eval.knn_k], **{f"knn{k}_acc": accs[k] for k in cfg.eval.knn_extra_k}}
    cm = cluster_metrics(test_x, test_y, num_clusters=num_classes, restarts=cfg.eval.kmeans_restarts, seed=cfg.train.seed)
    row.update({k: float(v) for k, v in cm.items()})
    e = cfg.eval
    for r in lowshot_svm(train_x, train_y, test_x, test_y, shots=e.lowshot_shots, draws=e.lowshot_draws,
                         costs=e.lowshot_costs, val_per_class=e.lowshot_val_per_class, seed=cfg.train.seed):
        row[f"svm_k{r.shots}"] = r.mean
    return row


def evaluate(cfg: ExperimentConfig, method_state: dict[str, torch.Tensor], log=print, *, remote: bool = False,
             gpu: bool | None = None) -> dict[str, dict[str, Any]]:
    """kNN accuracy (train split as the bank), test-split k-means AMI/NMI/ARI/ACC and low-shot SVM accuracy.

    Low-shot: ``svm_k<k>`` is the mean test accuracy of a linear SVM trained on ``k`` labelled train images
    per class over ``eval.lowshot_draws`` draws, its cost chosen on other train images (``eval.lowshot_*``).

    Rows: the learned representation (backbone and head features) and, when ``eval.baselines``,
    raw pixels. Labels are used here only.

    ``remote``: run it as one Ray task with a training worker's resources (``ray.cpus_per_worker``, a GPU
    when the run trained on GPUs, or as ``gpu`` says), so that on a cluster it runs on a worker node
    rather than on the driver's (see :mod:`.remote`); in this process otherwise.
    """
    if remote:
        from .remote import evaluate_remote

        return evaluate_remote(cfg, method_state, gpu=gpu, log=log)
    return evaluate_here(cfg, method_state, log=log)


def evaluate_here(cfg: ExperimentConfig, method_state: dict[str, torch.Tensor], log=print) -> dict[str, dict[str, Any]]:
    """:func:`evaluate` in this process."""
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    if (train.labels < 0).all() or (test.labels < 0).all():
        raise ValueError(f"data.name={cfg.data.name}: evaluation needs labels, the data set has none")
    num_classes = int(max(train.labels.max(), test.labels.max()) + 1)
    size = cfg.data.image_size or train.image_size
    views = ViewMaker(cfg.data.views.recipe, size, train.channels, train.mean, train.std)
    enc = load_encoder(cfg, method_state, train.channels)
    log(f"[pcl-ray] evaluating: embedding {len(train)} train + {len(test)} test images")
    ftr, fte = embed_split(enc, train, views), embed_split(enc, test, views)
    results: dict[str, dict[str, Any]] = {}
    for kind in ("backbone", "head"):
        results[f"{cfg.method.name}_{kind}"] = _row(ftr[kind], train.labels, fte[kind], test.labels, cfg, num_classes)
    if cfg.eval.baselines:
        log("[pcl-ray] evaluating: raw-pixel baseline")
        rtr, rte = _raw_pixels(train, size), _raw_pixels(test, size)
        results["raw_pixels"] = _row(rtr, train.labels, rte, test.labels, cfg, num_classes)
    return results


def _image_blocks(ds, size: int, batch_size: int = 1024):
    """The split's uint8 images in dataset order, ``batch_size`` at a time, resized to ``size`` when needed."""
    for x, _ in iterate_batches(ds, None, batch_size, shuffle=False, seed=0, drop_last=False):
        if x.shape[-1] != size or x.shape[-2] != size:
            x = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True,
                                                align_corners=False).round().clamp(0, 255).to(torch.uint8)
        yield x


def _raw_pixels(ds, size: int) -> np.ndarray:
    """Raw-pixel features of the split, converted block by block into one float32 matrix."""
    return raw_pixel_matrix(_image_blocks(ds, size), len(ds))


def _all_images(ds, size: int) -> torch.Tensor:
    """Every image of the split as one uint8 tensor at ``size`` (the split's own tensor when it fits as is)."""
    tensor = ds.tensor
    if tensor is not None and tensor.shape[0] == len(ds) and tensor.shape[-2:] == (size, size):
        return tensor
    out = None
    filled = 0
    for x in _image_blocks(ds, size):
        if out is None:
            out = torch.empty((len(ds), *x.shape[1:]), dtype=torch.uint8)
        out[filled : filled + x.shape[0]] = x
        filled += x.shape[0]
    return out
