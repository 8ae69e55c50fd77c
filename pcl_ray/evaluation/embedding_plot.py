"""A 2-D picture of an embedding: t-SNE of a seeded subsample, coloured by class.

The features are L2-normalized (the geometry the methods train), reduced to 50
dimensions with PCA, then mapped to 2-D with scikit-learn's Barnes-Hut t-SNE.
The figure is drawn on matplotlib's Agg canvas directly (as in
:mod:`pcl_ray.evaluation.plots`), never through pyplot, so the process-wide
backend is left alone.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from ..normalize import l2_normalize
from .plots import _save

__all__ = ["plot_embedding", "plot_embedding_grid", "tsne_2d"]

PCA_DIM = 50


def tsne_2d(feats: np.ndarray, *, seed: int = 0, perplexity: float = 30.0) -> np.ndarray:
    """``(N, 2)`` t-SNE coordinates of L2-normalized, PCA-reduced ``feats`` (deterministic in ``seed``)."""
    x = np.asarray(feats, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] < 3:
        raise ValueError(f"t-SNE needs at least 3 points of 2-D features, got shape {x.shape}")
    x = l2_normalize(x)  # N x d, unit rows
    n_components = min(PCA_DIM, x.shape[0], x.shape[1])
    if n_components < x.shape[1]:
        x = PCA(n_components=n_components, random_state=seed).fit_transform(x)
    perplexity = min(perplexity, (x.shape[0] - 1) / 3.0)
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                random_state=seed, n_jobs=os.cpu_count())
    return tsne.fit_transform(x).astype(np.float32)


def _scatter_by_class(ax, xy: np.ndarray, y: np.ndarray, class_names: Sequence[str] | None, size: float) -> None:
    """Scatter ``xy`` on ``ax`` with one colour and legend label per class of ``y`` (``-1``: grey, unlabelled)."""
    classes = np.unique(y)
    palette = colormaps["tab10" if classes.max() < 10 else "tab20"]
    for c in classes:
        sel = y == c
        if c < 0:
            name, colour = "unlabelled", "0.6"
        else:
            name = class_names[c] if class_names is not None and c < len(class_names) else str(c)
            colour = palette(int(c) % palette.N)
        ax.scatter(xy[sel, 0], xy[sel, 1], s=size, color=colour, label=name, alpha=0.8, linewidths=0)


def plot_embedding(
    feats: np.ndarray,
    labels: np.ndarray,
    path: str | os.PathLike[str],
    *,
    max_points: int = 3000,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    title: str = "t-SNE of the embedding",
) -> Path:
    """Write a PNG scatter of the t-SNE of ``feats``, one colour per label.

    Args:
        feats: ``(N, d)`` features.
        labels: ``(N,)`` integer labels (``-1``: unknown, drawn grey).
        path: where to write the PNG (parent folders are created).
        max_points: at most this many points, a uniform subsample drawn with ``seed``.
        seed: subsample, PCA and t-SNE seed.
        class_names: legend names indexed by label; the label number otherwise.
        title: figure title.

    Returns:
        The path written.
    """
    x = np.asarray(feats)
    y = np.asarray(labels).astype(np.int64).ravel()
    if x.shape[0] != y.size:
        raise ValueError(f"{x.shape[0]} feature rows but {y.size} labels")
    if x.shape[0] > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=max_points, replace=False))
        x, y = x[keep], y[keep]
    xy = tsne_2d(x, seed=seed)

    classes = np.unique(y)
    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.subplots()
    _scatter_by_class(ax, xy, y, class_names, size=4)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"{title} ({y.size} points)", fontsize=11)
    if classes.size <= 30:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=3, fontsize=8, frameon=False)
    return _save(fig, path)


def plot_embedding_grid(
    panels: Sequence[tuple[str, np.ndarray]],
    labels: np.ndarray,
    path: str | os.PathLike[str],
    *,
    max_points: int = 2000,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
    title: str = "t-SNE of the test features",
) -> Path:
    """One t-SNE panel per ``(title, feats)`` in a grid, all on the same seeded subsample of ``labels``.

    Every ``feats`` holds one row per entry of ``labels`` (the same images in the same order), so the
    panels differ only in the representation. Returns the path written.
    """
    y = np.asarray(labels).astype(np.int64).ravel()
    if not panels:
        raise ValueError("plot_embedding_grid needs at least one panel")
    for name, feats in panels:
        if np.asarray(feats).shape[0] != y.size:
            raise ValueError(f"panel {name!r}: {np.asarray(feats).shape[0]} feature rows but {y.size} labels")
    keep = (np.sort(np.random.default_rng(seed).choice(y.size, size=max_points, replace=False))
            if y.size > max_points else np.arange(y.size))
    y = y[keep]
    classes = np.unique(y)
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(3.6 * cols + 1.6, 3.5 * rows + 0.4), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax, (name, feats) in zip(axes, panels):
        _scatter_by_class(ax, tsne_2d(np.asarray(feats)[keep], seed=seed), y, class_names, size=2)
        ax.set_title(name, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(panels):]:
        ax.set_axis_off()
    if classes.size <= 30:
        handles, names = axes[0].get_legend_handles_labels()
        fig.legend(handles, names, loc="outside right center", markerscale=4, fontsize=8, frameon=False)
    fig.suptitle(f"{title} ({y.size} points)", fontsize=11)
    return _save(fig, path)
