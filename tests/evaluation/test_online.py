"""The online kNN's held sample: stratified, disjoint, seeded; a class-sorted data set is no special case."""

from __future__ import annotations

import numpy as np
import torch

from pcl_ray.evaluation.online import OnlineKNN, stratified_split


def test_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(10), 600)  # sorted by class, as an ImageFolder is
    bank, queries = stratified_split(labels, 1000, 200, seed=0)
    assert not set(bank) & set(queries)
    assert np.bincount(labels[bank]).tolist() == [100] * 10
    assert np.bincount(labels[queries]).tolist() == [20] * 10
    again = stratified_split(labels, 1000, 200, seed=0)
    assert np.array_equal(bank, again[0]) and np.array_equal(queries, again[1])
    assert not np.array_equal(bank, stratified_split(labels, 1000, 200, seed=1)[0])


class _Images:
    """Two well-separated classes stored sorted by class: the old first-N/last-M split saw one class only."""

    def __init__(self):
        self.labels = np.repeat([0, 1], 200)
        gen = torch.Generator().manual_seed(0)
        base = torch.where(torch.from_numpy(self.labels)[:, None, None, None] == 0, 40, 200)
        self.images = (base + torch.randint(0, 10, (400, 1, 4, 4), generator=gen)).to(torch.uint8)
        self.tensor = self.images  # an in-memory set, as the loader expects

    def __len__(self):
        return 400

    def __getitem__(self, i):
        return self.images[i], i


class _Encoder(torch.nn.Module):
    def features(self, x):
        return x.flatten(1)


class _Views:
    def eval(self, x):
        return x.float() / 255.0 - 0.5


def test_class_sorted_data_gives_a_real_accuracy():
    knn = OnlineKNN(_Images(), bank=100, queries=50, k=5, temperature=0.1)
    assert set(knn.query_labels.tolist()) == {0, 1}
    assert knn(_Encoder(), _Views(), "cpu") == 1.0  # separable classes: every query right


def test_one_class_or_unlabelled_data_turns_it_off():
    ds = _Images()
    ds.labels = np.zeros(400, dtype=np.int64)
    assert OnlineKNN(ds, 100, 50, 5, 0.1)(_Encoder(), _Views(), "cpu") is None
    ds.labels = np.full(400, -1)
    assert OnlineKNN(ds, 100, 50, 5, 0.1)(_Encoder(), _Views(), "cpu") is None
