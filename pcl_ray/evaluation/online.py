"""Cheap per-epoch monitoring inside the training loop: kNN accuracy on held training images.

The bank is the first ``bank`` training images and the queries the last ``queries`` ones, so the
number never looks at the test split; sweeps can optimize it without selecting on test labels.
Labels are read here only.
"""

from __future__ import annotations

import numpy as np
import torch

from .features import embed
from .knn import knn_accuracy


class OnlineKNN:
    def __init__(self, ds, bank: int, queries: int, k: int, temperature: float):
        n = len(ds)
        labels = np.asarray(ds.labels)
        bank = min(bank, n // 2)
        queries = min(queries, n - bank)
        self.bank_idx = np.arange(bank)
        self.query_idx = np.arange(n - queries, n)
        self.enabled = bool((labels[self.bank_idx] >= 0).all() and (labels[self.query_idx] >= 0).all())
        self.bank_labels, self.query_labels = labels[self.bank_idx], labels[self.query_idx]
        self.num_classes = int(labels.max()) + 1 if self.enabled else 0
        self.k, self.temperature = min(k, bank), temperature
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
