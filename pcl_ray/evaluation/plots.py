"""PNG plots of E-step statistics and training curves.

The figures are drawn on matplotlib's Agg canvas directly (no pyplot), so the
functions are safe to call from Ray workers and threads and never change the
process-wide matplotlib backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

__all__ = ["plot_curves_by_label", "plot_metric_curves", "plot_prototype_stats"]

#: one training run's curve: (epoch, value) pairs
Curve = Sequence[tuple[int, float]]


class GranularityLike(Protocol):
    """What :func:`plot_prototype_stats` reads from one granularity."""

    num_clusters: int
    sizes: np.ndarray
    concentration: np.ndarray


def _save(fig: Figure, path: str | os.PathLike[str]) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=100)
    return out


def plot_prototype_stats(
    pset_like: Sequence[GranularityLike] | Any,
    path: str | os.PathLike[str],
) -> Path:
    """Draw cluster-size and concentration (φ) histograms, one row per granularity.

    Args:
        pset_like: a sequence of per-granularity objects with ``num_clusters``,
            ``sizes`` (int, length k) and ``concentration`` (float, length k); an
            object with a ``granularities`` attribute (a ``PrototypeSet``) works too.
        path: where to write the PNG (parent folders are created).

    Returns:
        The path written.
    """
    grans = list(getattr(pset_like, "granularities", pset_like))
    if not grans:
        raise ValueError("no granularities to plot")

    fig = Figure(figsize=(10, 3.2 * len(grans)), layout="constrained")
    axes = fig.subplots(len(grans), 2, squeeze=False)
    for row, gran in zip(axes, grans, strict=True):
        sizes = np.asarray(gran.sizes).ravel()
        phi = np.asarray(gran.concentration, dtype=np.float64).ravel()
        k = int(gran.num_clusters)
        empty = int((sizes == 0).sum())

        ax_size, ax_phi = row
        ax_size.hist(sizes, bins=min(50, max(1, k)), color="tab:blue")
        ax_size.set_yscale("log")
        ax_size.yaxis.set_minor_formatter(NullFormatter())
        ax_size.set_xlabel("cluster size")
        ax_size.set_ylabel("clusters (log)")
        ax_size.set_title(
            f"k={k}: size min {sizes.min()} / median {np.median(sizes):g} / "
            f"max {sizes.max()}, empty {empty}",
            fontsize=9,
        )

        finite = phi[np.isfinite(phi)]
        ax_phi.hist(finite if finite.size else [0.0], bins=min(50, max(1, k)), color="tab:orange")
        ax_phi.set_xlabel("concentration φ")
        ax_phi.set_ylabel("clusters")
        if finite.size:
            ax_phi.set_title(
                f"k={k}: φ mean {finite.mean():.3g}, min {finite.min():.3g}, max {finite.max():.3g}",
                fontsize=9,
            )
    return _save(fig, path)


def plot_metric_curves(history: Mapping[str, Sequence[float]], path: str | os.PathLike[str]) -> Path:
    """Plot each metric's per-epoch values in its own panel and write a PNG.

    Args:
        history: metric name -> list of values, one per epoch (NaN leaves a gap).
        path: where to write the PNG (parent folders are created).

    Returns:
        The path written. An empty ``history`` gives a figure that says so.
    """
    names = [name for name, values in history.items() if len(values) > 0]
    if not names:
        fig = Figure(figsize=(4, 2))
        fig.text(0.5, 0.5, "no metrics recorded yet", ha="center", va="center")
        return _save(fig, path)

    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    fig = Figure(figsize=(4.5 * ncols, 3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, name in zip(axes, names):
        values = np.asarray(history[name], dtype=np.float64)
        epochs = np.arange(1, values.size + 1)
        ax.plot(epochs, values, marker="o" if values.size <= 30 else None, markersize=3)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    return _save(fig, path)


def plot_curves_by_label(panels: Mapping[str, Mapping[str, Sequence[Curve]]], path: str | os.PathLike[str],
                         title: str | None = None) -> Path:
    """One panel per metric, one line per label: the mean over that label's runs, shaded from min to max.

    Args:
        panels: panel title -> label -> the label's runs (e.g. one per seed), each a list of
            ``(epoch, value)`` pairs. Runs may cover different epochs (an E-step metric starts after
            the warm-up); each epoch is averaged over the runs that have it.
        path: where to write the PNG.
        title: optional figure title.
    """
    names = [name for name, by_label in panels.items() if any(any(runs) for runs in by_label.values())]
    if not names:
        fig = Figure(figsize=(4, 2))
        fig.text(0.5, 0.5, "no per-epoch metrics recorded", ha="center", va="center")
        return _save(fig, path)
    labels = list(dict.fromkeys(label for name in names for label in panels[name]))
    colour = {label: f"C{i % 10}" for i, label in enumerate(labels)}  # one colour per label in every panel
    fig = Figure(figsize=(5.2 * len(names), 3.6), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False).ravel()
    for ax, name in zip(axes, names):
        for label, runs in panels[name].items():
            by_epoch: dict[int, list[float]] = {}
            for run in runs:
                for epoch, value in run:
                    by_epoch.setdefault(int(epoch), []).append(float(value))
            if not by_epoch:
                continue
            epochs = sorted(by_epoch)
            vals = [np.asarray(by_epoch[e]) for e in epochs]
            ax.plot(epochs, [v.mean() for v in vals], marker="o", markersize=3, label=label, color=colour[label])
            if any(v.size > 1 for v in vals):
                ax.fill_between(epochs, [v.min() for v in vals], [v.max() for v in vals],
                                color=colour[label], alpha=0.15, linewidth=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
