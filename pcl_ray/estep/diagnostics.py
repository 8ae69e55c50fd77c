"""Cluster-health diagnostics of an E-step against labels (monitoring only, never used for training)."""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.metrics import adjusted_mutual_info_score

from .prototypes import PrototypeSet


#: label agreement is measured on at most this many points (a seeded sample): its cost grows with classes × N
AMI_SAMPLE = 100_000


def label_agreement(pset: PrototypeSet, labels: np.ndarray | None, *, max_points: int = AMI_SAMPLE,
                    seed: int = 0) -> dict[str, float]:
    """``estep/k{k}/ami_labels`` per granularity: AMI of the assignments against ``labels``.

    Samples with a negative label (unknown) are left out; above ``max_points`` labelled samples, a sample of
    ``max_points`` of them drawn with ``seed`` (the cluster actor passes the epoch) is used, and
    ``estep/ami_sample`` says how many. ``{}`` without any label.
    """
    if labels is None:
        return {}
    labels = np.asarray(labels)
    known = np.flatnonzero(labels >= 0)
    if not known.size:
        return {}
    if known.size > max_points:
        known = np.sort(np.random.default_rng(seed).choice(known, size=max_points, replace=False))
    out = {"estep/ami_sample": float(known.size)}
    for i, g in enumerate(pset.granularities):
        out[f"{pset.metric_prefix(i)}/ami_labels"] = float(adjusted_mutual_info_score(labels[known],
                                                                                     g.assignments[known]))
    return out


def with_label_agreement(pset: PrototypeSet, labels: np.ndarray | None, *, max_points: int = AMI_SAMPLE,
                         seed: int = 0) -> PrototypeSet:
    """A copy of ``pset`` whose diagnostics also hold :func:`label_agreement` (``pset`` itself without labels)."""
    metrics = label_agreement(pset, labels, max_points=max_points, seed=seed)
    if not metrics:
        return pset
    return dataclasses.replace(pset, diagnostics={**pset.diagnostics, **metrics})
