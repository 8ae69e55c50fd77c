"""End of a sweep: the trials table (printed + CSV), plots, and the best config as a pipeline file."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..config import build_config
from .spec import SweepSpec, trial_raw


@dataclass
class TrialRow:
    trial_id: str
    status: str                       # finished | early_stopped | error | interrupted
    values: dict[str, Any]            # the swept keys' values
    metric: float | None              # ranked value (last epoch, or best epoch with scope: all)
    epochs: int                       # epochs reported to Tune
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, metric)
    run_name: str = ""
    mlflow_run_id: str = ""
    extra: dict[str, float] = field(default_factory=dict)  # eval/* metrics of the trial's run, when it ran them


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    if isinstance(v, dict):
        return ",".join(f"{k}={_fmt(x)}" for k, x in v.items())
    return str(v)


def sort_rows(rows: list[TrialRow], mode: str) -> list[TrialRow]:
    """Best first; trials without a metric value last."""
    sign = -1.0 if mode == "max" else 1.0

    def key(r: TrialRow):
        m = r.metric
        return (m is None or (isinstance(m, float) and math.isnan(m)), sign * (m if m is not None else 0.0))

    return sorted(rows, key=key)


def rows_to_frame(rows: list[TrialRow], spec: SweepSpec):
    import pandas as pd

    metric = spec.tune.metric
    records = []
    for rank, r in enumerate(rows, 1):
        rec: dict[str, Any] = {"rank": rank, "trial_id": r.trial_id, "status": r.status}
        rec.update({k: (json.dumps(v) if isinstance(v, (list, dict)) else v) for k, v in r.values.items()})
        rec[metric] = r.metric
        rec["epochs"] = r.epochs
        rec.update(r.extra)
        rec["run_name"] = r.run_name
        rec["mlflow_run_id"] = r.mlflow_run_id
        records.append(rec)
    return pd.DataFrame.from_records(records)


def print_table(rows: list[TrialRow], spec: SweepSpec, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    metric = spec.tune.metric
    extras = sorted({k for r in rows for k in r.extra})[:3]
    headers = ["#", "trial", "status", *spec.keys, f"{metric} ({spec.tune.mode}, {spec.tune.scope})", "epochs",
               *(f"test {k.split('/')[-1]}" for k in extras)]  # eval/<row>/<metric> of the trial's own run
    table = Table(title=title)
    for col in headers:
        table.add_column(col, justify="left" if col in ("trial", "status") else "right")
    for rank, r in enumerate(rows, 1):
        table.add_row(str(rank), r.trial_id, r.status, *(_fmt(r.values.get(k)) for k in spec.keys),
                      "-" if r.metric is None else f"{r.metric:.4f}", str(r.epochs),
                      *(f"{r.extra[k]:.4f}" if k in r.extra else "-" for k in extras))
    Console(width=max(100, sum(max(len(h), 10) + 3 for h in headers) + 4)).print(table)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_metric_vs_params(rows: Sequence[TrialRow], spec: SweepSpec, path: str | os.PathLike[str]) -> Path:
    """One panel per swept key: the ranked metric of every trial against the key's value."""
    keys = spec.keys
    metric = spec.tune.metric
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.6 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    styles = {"finished": dict(marker="o", color="tab:blue"), "early_stopped": dict(marker="x", color="tab:orange"),
              "exploited": dict(marker="s", color="tab:gray")}
    for ax, key in zip(axes, keys):
        dim = spec.tune.search_space[key]
        pts = [r for r in rows if r.metric is not None and key in r.values]
        numeric = not dim.categorical or all(_is_number(v) for v in dim.args)
        if numeric:
            xs_of = lambda r: float(r.values[key])  # noqa: E731
            ticks = None
        else:
            labels = [_fmt(v) for v in (dim.args if dim.categorical else sorted({_fmt(r.values[key]) for r in pts}))]
            labels = list(dict.fromkeys(labels))
            xs_of = lambda r: float(labels.index(_fmt(r.values[key])))  # noqa: E731
            ticks = labels
        for status, style in styles.items():
            sel = [r for r in pts if r.status == status]
            if sel:
                ax.scatter([xs_of(r) for r in sel], [r.metric for r in sel], label=status.replace("_", " "),
                           s=36, **style)
        if ticks is not None:
            ax.set_xticks(range(len(ticks)), ticks, rotation=20 if max(map(len, ticks)) > 6 else 0)
            ax.set_xlim(-0.5, len(ticks) - 0.5)
        elif dim.kind == "loguniform" or (dim.categorical and all(_is_number(v) and v > 0 for v in dim.args)
                                          and max(dim.args) / min(dim.args) >= 100):
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    if rows:
        axes[0].legend(fontsize=8)
    fig.suptitle(f"{metric} ({spec.tune.scope} epoch) against each swept key")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=100)
    return out


def plot_metric_curves(rows: Sequence[TrialRow], spec: SweepSpec, path: str | os.PathLike[str]) -> Path:
    """The metric per epoch, one line per trial (early-stopped trials dashed)."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    for r in rows:
        if not r.history:
            continue
        xs, ys = zip(*r.history)
        label = " ".join(f"{k.split('.')[-1]}={_fmt(r.values.get(k))}" for k in spec.keys)
        ax.plot(xs, ys, marker=".", linestyle="--" if r.status != "finished" else "-", label=label[:60])
    ax.set_xlabel("epoch")
    ax.set_ylabel(spec.tune.metric)
    ax.grid(alpha=0.3)
    if len(rows) <= 16:
        ax.legend(fontsize=7)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, format="png", dpi=100)
    return out


def write_best_config(best: TrialRow, spec: SweepSpec, sweep: str, path: str | os.PathLike[str],
                      shown_as: str | None = None) -> Path:
    """The base pipeline (+ --set) with the best trial's values, as a pipeline ``run.py train`` accepts.

    ``shown_as``: where the file will live for the user (its header says how to train it), when ``path``
    is only where it is made before the upload to the storage.
    """
    raw = trial_raw(spec.base_raw, best.values)
    for key, original in spec.pinned.items():  # e.g. estep.backend, pinned for the sweep's reservations
        if key in best.values:
            continue
        section, leaf = key.rsplit(".", 1)
        node = raw
        for part in section.split("."):
            node = node.setdefault(part, {})
        if original is None:
            node.pop(leaf, None)
        else:
            node[leaf] = original
    build_config(raw, f"best config of {sweep}")  # it must load
    header = [
        f"# Best trial of sweep {sweep}: {best.trial_id} ({spec.tune.metric} = {best.metric:.4f}, "
        f"mode {spec.tune.mode}, {spec.tune.scope} epoch).",
        f"# Base: {spec.pipeline}" + (f" with --set {' '.join(spec.overrides)}" if spec.overrides else ""),
        "# Swept values: " + ", ".join(f"{k}={_fmt(v)}" for k, v in best.values.items()),
        (f"# Train it: python run.py train {shown_as or path}" if "://" not in (shown_as or "") else
         f"# Train it: download {shown_as}, then python run.py train best_config.yaml"),
    ]
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False, default_flow_style=None))
    return out
