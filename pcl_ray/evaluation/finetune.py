"""Semi-supervised fine-tuning: the whole backbone plus a linear classifier on a few labels.

As in the PCL paper's semi-supervised evaluation (1 % and 10 % of the labels):
a class-balanced, seeded subset of the training split keeps its labels; the
pretrained backbone (a copy: the caller's module is left untouched) and a new
linear classifier are trained end to end with cross-entropy, SGD with momentum
and a cosine schedule, the backbone at a smaller learning rate than the
classifier. Inputs are random views from :class:`~pcl_ray.data.ViewMaker` with
the light supervised recipe :data:`FINETUNE_RECIPE` (random resized crop and
horizontal flip, no colour distortion); the test split is scored once, on
centre views, at the end.

This is by far the most expensive suite on a CPU; the default budget
(``eval.finetune_epochs``) is kept small.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import IndexedImages, Recipe, ViewMaker, iterate_batches
from .features import eval_device

__all__ = ["FINETUNE_RECIPE", "FinetuneResult", "balanced_subset", "finetune_backbone"]

#: Supervised augmentation: random resized crop + horizontal flip only.
FINETUNE_RECIPE = Recipe(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, flip_p=0.5)
#: Smallest crop area fraction of the fine-tuning views.
FINETUNE_CROP_MIN_SCALE = 0.5


@dataclass(frozen=True)
class FinetuneResult:
    """Outcome of :func:`finetune_backbone`: test accuracy after training on ``labelled`` images."""

    fraction: float
    labelled: int
    accuracy: float
    final_loss: float


def balanced_subset(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Sorted positions of a class-balanced labelled subset of about ``fraction`` of the data.

    Every class contributes ``max(1, round(fraction * N / num_classes))`` images
    (fewer when the class is smaller); points labelled ``< 0`` are never picked.
    """
    labels = np.asarray(labels)
    known = labels >= 0
    classes = np.unique(labels[known])
    if classes.size == 0:
        raise ValueError("no labelled images to fine-tune on")
    per_class = max(1, int(round(fraction * known.sum() / classes.size)))
    parts = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(parts)).astype(np.int64)


def finetune_backbone(
    backbone: nn.Module,
    feature_dim: int,
    train: IndexedImages,
    test: IndexedImages,
    *,
    fraction: float,
    image_size: int | None = None,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 0.01,
    classifier_lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    num_classes: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    log: Callable[[str], None] | None = None,
) -> FinetuneResult:
    """Fine-tune a copy of ``backbone`` with a linear classifier on ``fraction`` of the train labels.

    Args:
        backbone: maps normalized images to ``(B, feature_dim)`` pooled features.
        feature_dim: width of the backbone's output.
        train, test: the splits (views use ``train``'s normalization constants).
        fraction: share of the labelled training images kept, class-balanced.
        image_size: side of the views; the training split's when None.
        epochs: passes over the labelled subset.
        batch_size: images per step.
        lr, classifier_lr: peak learning rates of the backbone and the classifier.
        momentum, weight_decay: SGD settings.
        num_classes: ``None`` means one more than the largest label.
        seed: subset, classifier init, shuffling and augmentation seed.
        device: where to train; CUDA when available, else the CPU, when None.
        log: progress callback (one line per epoch).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    dev = torch.device(device) if device is not None else eval_device()
    labels_all = torch.from_numpy(np.asarray(train.labels, dtype=np.int64))
    n_classes = int(max(train.labels.max(), test.labels.max()) + 1) if num_classes is None else int(num_classes)
    size = image_size or train.image_size
    views = ViewMaker(FINETUNE_RECIPE, size, train.channels, train.mean, train.std,
                      crop_min_scale=FINETUNE_CROP_MIN_SCALE)

    subset = balanced_subset(train.labels, fraction, np.random.default_rng(np.random.SeedSequence([seed, 7])))
    gen = torch.Generator().manual_seed(seed)
    classifier = nn.Linear(feature_dim, n_classes)
    with torch.no_grad():
        classifier.weight.normal_(0.0, 0.01, generator=gen)
        classifier.bias.zero_()
    model = nn.Sequential(copy.deepcopy(backbone), classifier).to(dev)

    opt = torch.optim.SGD([{"params": model[0].parameters(), "lr": lr},
                           {"params": model[1].parameters(), "lr": classifier_lr}],
                          momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = max(1, math.ceil(subset.size / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, epochs * steps_per_epoch)
                                                / (epochs * steps_per_epoch))))
    last_loss = float("nan")
    for epoch in range(epochs):
        model.train()
        losses = []
        for images, idx in iterate_batches(train, subset, batch_size, shuffle=True, seed=seed + epoch,
                                           drop_last=False):
            if images.shape[0] < 2:  # batch norm needs two samples
                continue
            x = views(images.to(dev), generator=gen)  # B x C x size x size, augmented
            loss = F.cross_entropy(model(x), labels_all[idx].to(dev))  # logits: B x classes
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        last_loss = float(np.mean(losses)) if losses else last_loss
        if log is not None:
            log(f"[pcl-ray] finetune {fraction:.0%}: epoch {epoch + 1}/{epochs} loss {last_loss:.3f}")

    model.eval()
    correct = total = 0
    test_labels = torch.from_numpy(np.asarray(test.labels, dtype=np.int64))
    with torch.no_grad():
        for images, idx in iterate_batches(test, None, 512, shuffle=False, seed=0, drop_last=False):
            y = test_labels[idx]
            known = y >= 0
            pred = model(views.eval(images.to(dev))).argmax(dim=1).cpu()  # B
            correct += int((pred[known] == y[known]).sum())
            total += int(known.sum())
    if total == 0:
        raise ValueError("the test split has no labels")
    return FinetuneResult(fraction=float(fraction), labelled=int(subset.size), accuracy=correct / total,
                          final_loss=last_loss)
