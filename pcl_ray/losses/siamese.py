"""SPCL's siamese metric loss over pairs of images, two views each (pure: tensors in, tensors out).

A pair is two images ``a`` and ``b`` of the batch, each seen in two augmented views (``a1, a2`` and ``b1, b2``).
The reference (Mo, Sun & Li, BMVC 2021) scores six view pairs with one learned "same cluster?" head on the
absolute difference of their backbone features and sums six binary cross-entropies:

* two same-image pairs ``(a1, a2)`` and ``(b1, b2)``, always labelled 1;
* four cross-image pairs ``(a1, b1), (a1, b2), (a2, b1), (a2, b2)``, labelled 1 exactly when ``a`` and ``b``
  share a k-means cluster.

Each term is a mean over the pairs; the loss is their sum (not their mean), as the reference adds them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["SIAMESE_TERMS", "siamese_differences", "siamese_metric_loss"]

#: the six view pairs, in the order of :func:`siamese_differences`' first axis; the first two are same-image
SIAMESE_TERMS = ("a1-a2", "b1-b2", "a1-b1", "a1-b2", "a2-b1", "a2-b2")
NUM_SAME_IMAGE_TERMS = 2


def siamese_differences(h_1: torch.Tensor, h_2: torch.Tensor, first: torch.Tensor,
                        second: torch.Tensor) -> torch.Tensor:
    """``|h_u − h_v|`` of the six view pairs of every image pair: ``(6, P, D)``, ordered as :data:`SIAMESE_TERMS`.

    ``h_1``/``h_2`` are ``(B, D)`` features of view 1/2 of the batch (row i = image i); ``first``/``second``
    are the ``(P,)`` batch rows of images ``a`` and ``b`` of each pair.
    """
    if h_1.dim() != 2 or h_1.shape != h_2.shape:
        raise ValueError(f"h_1 and h_2 must both be (B, D), got {tuple(h_1.shape)} and {tuple(h_2.shape)}")
    if first.dim() != 1 or first.shape != second.shape:
        raise ValueError(f"first and second must both be (P,), got {tuple(first.shape)} and {tuple(second.shape)}")
    a1, a2, b1, b2 = h_1[first], h_2[first], h_1[second], h_2[second]  # each (P, D)
    return torch.stack([a1 - a2, b1 - b2, a1 - b1, a1 - b2, a2 - b1, a2 - b2]).abs()  # (6, P, D)


def siamese_metric_loss(logits: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    """Sum over the six terms of the mean BCE of ``logits`` ``(6, P)`` (rows as :data:`SIAMESE_TERMS`).

    ``same`` ``(P,)`` is True where the pair's images share a cluster: the label of the four cross-image rows;
    the two same-image rows are labelled 1. With ``P = 0`` the loss is an exact 0 still connected to ``logits``
    (a backward pass then reaches the metric head, as DistributedDataParallel requires).
    """
    if logits.dim() != 2 or logits.shape[0] != len(SIAMESE_TERMS) or same.shape != logits.shape[1:]:
        raise ValueError(f"logits must be (6, P) and same (P,), got {tuple(logits.shape)} and {tuple(same.shape)}")
    if logits.shape[1] == 0:
        return logits.sum() * 0.0
    labels = same.to(logits.dtype).expand(len(SIAMESE_TERMS), -1).clone()  # (6, P)
    labels[:NUM_SAME_IMAGE_TERMS] = 1.0
    per_term = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(dim=1)  # (6,)
    return per_term.sum()
