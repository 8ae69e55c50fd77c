"""Row normalisation of NumPy feature matrices, shared by the E-step and evaluation (torch code uses
``torch.nn.functional.normalize``)."""

from __future__ import annotations

import numpy as np

EPS = np.float32(1e-12)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """float32 ``(N, d)`` rows of ``x`` scaled to unit length (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)  # N x d
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), EPS)  # N x d, unit rows
