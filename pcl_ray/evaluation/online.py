"""Cheap per-epoch monitoring inside the training loop: kNN accuracy on held training images.

The bank and the queries are two disjoint, seeded, class-stratified random samples of the training split
(never the test split), so sweeps can optimize the number without selecting on test labels, and a data set
stored sorted by class (every ImageFolder) gives the same picture as a shuffled one. Labels are read here
only.
"""

from __future__ import annotations

import numpy as np
import torch

from .features import embed
from .knn import knn_accuracy


def stratified_split(labels: np.ndarray, bank: int, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint index samples of sizes ~``bank`` and ~``queries`` with each class in its training share.

    Each class contributes in proportion to its frequency (rounded, at least one image to each side when
    it has two); indices come back sorted (a locality-friendly read order).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 4242]))
    n = labels.size
    bank_parts, query_parts = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        share = members.size / n
        nb = min(members.size, max(1, round(bank * share)))
        nq = min(members.size - nb, max(1 if members.size > 1 else 0, round(queries * share)))
        bank_parts.append(members[:nb])
        query_parts.append(members[nb : nb + nq])
    return np.sort(np.concatenate(bank_parts)), np.sort(np.concatenate(query_parts))


class OnlineKNN:
    def __init__(self, ds, bank: int, queries: int, k: int, temperature: float, seed: int = 0):
        n = len(ds)
        labels = np.asarray(ds.labels)
        bank = min(bank, n // 2)
        queries = min(queries, n - bank)
        self.enabled = bool((labels >= 0).all()) and np.unique(labels).size >= 2
        if self.enabled:
            self.bank_idx, self.query_idx = stratified_split(labels, bank, queries, seed)
        else:
            self.bank_idx = self.query_idx = np.arange(0)
        self.bank_labels, self.query_labels = labels[self.bank_idx], labels[self.query_idx]
        self.num_classes = int(labels.max()) + 1 if self.enabled else 0
        self.k, self.temperature = min(k, max(1, self.bank_idx.size)), temperature
        self.ds = ds

    @torch.no_grad()
    def __call__(self, encoder: torch.nn.Module, views, device, batch_size: int = 512) -> float | None:
        """Top-1 weighted-kNN accuracy of the backbone features, or None without labels."""
        if not self.enabled:
            return None
        from ..data import iterate_batches

        was_training = encoder.training
        encoder.eval()

        def features(idx: np.ndarray) -> np.ndarray:
            batches = (x for x, _ in iterate_batches(self.ds, idx, batch_size, shuffle=False, seed=0, drop_last=False))
            return embed(lambda x: encoder.features(views.eval(x.to(device))), batches)

        try:
            return knn_accuracy(features(self.bank_idx), self.bank_labels, features(self.query_idx), self.query_labels,
                                k=self.k, temperature=self.temperature, num_classes=self.num_classes)
        finally:
            encoder.train(was_training)
