"""Checks of the data a run trains and evaluates on, made before anything starts.

- :func:`check_decodes`: a lazily decoded split (ImageFolder, mixed-size Parquet) decodes a small
  seeded sample of its images when it loads, so a wrong column or a folder of broken files stops
  the run at once instead of in the middle of the first epoch. An image that breaks later still
  stops the run with an error naming the file (:class:`~pcl_ray.data.errors.BadImageError`), or is
  replaced when ``data.skip_bad_images`` is set.
- :func:`check_evaluable`: what evaluation on the test split needs: both splits labelled and at least
  two classes.
- :func:`check_data`: everything above for one experiment config; returns the training split.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

from .dataset import IndexedImages
from .errors import BadImageError, DataError

__all__ = ["DECODE_SAMPLE", "sample_indices", "check_decodes", "check_evaluable", "check_data"]

#: Images of a lazily decoded split decoded when it loads.
DECODE_SAMPLE = 32


def sample_indices(n: int, sample: int = DECODE_SAMPLE, seed: int = 0) -> np.ndarray:
    """The sorted indices :func:`check_decodes` tries for a split of ``n`` images."""
    if n <= sample:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919]))
    return np.sort(rng.choice(n, size=sample, replace=False)).astype(np.int64)


def check_decodes(ds: IndexedImages, sample: int = DECODE_SAMPLE, seed: int = 0) -> None:
    """Decode a seeded sample of a lazily decoded split's images; in-memory splits decoded already.

    Raises the first failure as :class:`BadImageError` naming the file. With the decoder's
    ``skip_bad`` (``data.skip_bad_images``) a few bad images only print a warning, and the check
    fails only when none of the sample decodes (nothing to replace them with).
    """
    decoder = ds.decoder
    if decoder is None:
        return
    indices = sample_indices(len(ds), sample, seed)
    bad: list[BadImageError] = []
    for i in indices.tolist():
        try:
            decoder.decode(i)
        except Exception as exc:
            error = decoder.bad_image(i, exc)
            if not decoder.skip_bad:
                raise error from None
            bad.append(error)
    if bad and len(bad) == len(indices):
        raise BadImageError(f"none of {len(indices)} sampled images of the {ds.split} split decodes, e.g. {bad[0]}")
    if bad:
        print(f"[pcl-ray] warning: {len(bad)} of {len(indices)} sampled images of the {ds.split} split do not "
              f"decode and will be replaced (data.skip_bad_images=true), e.g. {bad[0]}", file=sys.stderr, flush=True)


def _classes(labels: np.ndarray) -> np.ndarray:
    return np.unique(labels[labels >= 0])


def check_evaluable(train: IndexedImages, test: IndexedImages, asked_by: str = "eval.enabled=true",
                    way_out: str = "set eval.enabled=false to train without it") -> None:
    """Refuse splits that evaluation cannot score: unlabelled images, or fewer than two classes.

    Evaluation fits on labelled training features (kNN bank, linear probe, low-shot SVM) and scores
    on labelled test features; k-means scoring uses one cluster per class. ``asked_by`` says what asks
    for the evaluation and ``way_out`` how to do without it, in the message.
    """
    for ds in (train, test):
        unknown = int((ds.labels < 0).sum())
        if unknown:
            what = "has no labels" if unknown == len(ds) else f"has {unknown} of {len(ds)} images without a label"
            raise DataError(f"data.label_column: the {ds.split} split {what}, but evaluation ({asked_by}) needs "
                            f"labelled train and test images ({way_out})")
    for ds in (train, test):
        found = _classes(ds.labels)
        if found.size < 2:
            raise DataError(f"data.label_column: the {ds.split} split has {found.size} class(es) "
                            f"({', '.join(map(str, found.tolist())) or 'none'}), but evaluation ({asked_by}) needs "
                            f"at least 2 ({way_out})")


def check_data(cfg: Any) -> IndexedImages:
    """Load the training split of ``cfg`` (an ExperimentConfig) and check what training and evaluation need.

    Loads the test split too when ``cfg.eval.enabled``: it must exist, decode and be labelled, as must
    the training split, with at least two classes. Returns the training split.
    """
    from .sources import load_split

    train = load_split(cfg.data, "train")
    if getattr(cfg.eval, "enabled", False):
        test = load_split(cfg.data, "test")
        check_evaluable(train, test)
    return train
