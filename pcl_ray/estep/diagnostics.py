"""Cluster-health diagnostics of an E-step against labels (monitoring only, never used for training)."""

from __future__ import annotations

import dataclasses

import numpy as np
from sklearn.metrics import adjusted_mutual_info_score

from .prototypes import PrototypeSet


def with_label_agreement(pset: PrototypeSet, labels: np.ndarray | None) -> PrototypeSet:
    """A copy of ``pset`` whose diagnostics hold ``estep/k{k}/ami_labels`` per granularity.

    Samples with a negative label (unknown) are left out; without any label, ``pset`` is returned as is.
    """
    if labels is None:
        return pset
    labels = np.asarray(labels)
    known = labels >= 0
    if not known.any():
        return pset
    diag = dict(pset.diagnostics)
    for i, g in enumerate(pset.granularities):
        diag[f"{pset.metric_prefix(i)}/ami_labels"] = float(adjusted_mutual_info_score(labels[known], g.assignments[known]))
    return dataclasses.replace(pset, diagnostics=diag)
