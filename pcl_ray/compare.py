"""The `compare` verb: several methods trained under identical conditions, evaluated alike, tabulated.

A compare pipeline is a YAML file with one `compare:` section::

    compare:
      name: fmnist-quick                  # sweep name (runs/<name>/, MLflow parent run)
      seeds: [0, 1, 2]                    # every entry is trained once per seed
      set: [train.epochs=8]               # overrides applied to every entry (the shared budget)
      entries:
        - {label: pcl, pipeline: pipelines/fmnist_pcl.yaml}
        - {label: moco, pipeline: pipelines/fmnist_pcl.yaml, set: [method.name=moco]}

Before anything trains, every entry's resolved config is checked to share the data, backbone,
epochs, batch size and evaluation settings (``SHARED_KEYS``); a difference is an error naming the key.
The name and the labels build folder and run names, so they must be safe names (:func:`registry.check_name`).

Outputs live in the first entry's storage (``ray.storage_path``: a local folder, ``file://`` or an object
store), every file written whole through :class:`~pcl_ray.storage.Storage`::

    <storage>/<name>-<stamp>/compare.json               the MLflow parent run, entries, seeds (for --resume)
    <storage>/<name>-<stamp>/results/<label>-s<seed>.json  each finished run's evaluation
    <storage>/<name>-<stamp>/comparison.md, comparison.png, curves.png, embeddings.png
"""

from __future__ import annotations

import io
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .config import ConfigError, ExperimentConfig, load_config, load_yaml
from .registry import check_name, final_state_rel, run_storage
from .storage import Storage
from .paths import resolve_pipeline
from .tracking import RunLogger, redact, resolve_uri

SHARED_KEYS = ("data.", "model.backbone", "model.width", "model.feature_dim", "train.epochs",
               "train.batch_size", "ray.num_workers", "eval.")
STAMP = "%Y%m%d-%H%M%S"  # a comparison's folder is <name>-<stamp>
COLUMNS = (("knn_acc", "kNN acc"), ("ami", "AMI"), ("nmi", "NMI"), ("acc", "cluster acc"),
           ("svm_k1", "1-shot SVM"), ("svm_k16", "16-shot SVM"))


def table_columns(metric_names) -> list[tuple[str, str]]:
    """COLUMNS, with a ``kNN k=<k>`` column after ``kNN acc`` for every extra neighbour count reported."""
    from .evaluation.report import extra_knn_columns

    return [COLUMNS[0], *extra_knn_columns(metric_names), *COLUMNS[1:]]


class Entry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: str = Field(min_length=1)
    pipeline: str
    set: list[str] = Field(default_factory=list)


class CompareConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field("compare", min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    set: list[str] = Field(default_factory=list)
    entries: list[Entry] = Field(min_length=2)


def load_compare(path: str | Path, overrides: list[str], seeds: list[int] | None = None
                 ) -> tuple[CompareConfig, dict[tuple[str, int], ExperimentConfig]]:
    """Parse the `compare:` section and resolve one config per (entry, seed); check identical conditions."""
    raw = load_yaml(path).get("compare")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a compare pipeline needs a `compare:` section (name, seeds, set, entries)")
    try:
        spec = CompareConfig.model_validate(raw)
    except ValidationError as err:
        lines = [f"compare.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
        raise ConfigError(f"invalid compare section ({path}):\n  " + "\n  ".join(lines)) from None
    if seeds:
        spec = spec.model_copy(update={"seeds": list(seeds)})
    labels = [e.label for e in spec.entries]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"compare.entries: labels must be unique, got {labels}")
    _check_names(spec)
    base = Path(path).resolve().parent
    configs: dict[tuple[str, int], ExperimentConfig] = {}
    for entry in spec.entries:
        pipe = Path(entry.pipeline)
        if not pipe.is_absolute():
            pipe = pipe if pipe.exists() else (base / pipe if (base / pipe).exists() else resolve_pipeline(pipe))
        for seed in spec.seeds:
            configs[(entry.label, seed)] = load_config(pipe, [*spec.set, *entry.set, *overrides, f"train.seed={seed}"])
    _check_identical(configs)
    # The raw-pixel baseline is the same in every run of a seed: only the first entry computes it.
    for (label, seed), cfg in configs.items():
        if label != spec.entries[0].label and cfg.eval.baselines:
            configs[(label, seed)] = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"baselines": False})})
    return spec, configs


def _check_names(spec: CompareConfig) -> None:
    """The name and labels are safe, and so is the longest run name they make (``<name>-<stamp>-<label>-s<seed>``)."""
    check_name(spec.name, "compare.name")
    for i, entry in enumerate(spec.entries):
        check_name(entry.label, f"compare.entries[{i}].label")
    stamp = time.strftime(STAMP, time.gmtime(0))
    longest = max((f"{spec.name}-{stamp}-{e.label}-s{seed}" for e in spec.entries for seed in spec.seeds), key=len)
    check_name(longest, "compare.name")  # too long with the stamp, label and seed: say so before training


def _check_identical(configs: dict[tuple[str, int], ExperimentConfig]) -> None:
    (ref_key, ref), *rest = configs.items()
    ref_flat = ref.flat()
    for key, cfg in rest:
        flat = cfg.flat()
        for name, value in flat.items():
            if name.startswith(SHARED_KEYS) and ref_flat.get(name) != value:
                raise ConfigError(f"compare: {name} differs between {ref_key[0]} ({ref_flat.get(name)!r}) and "
                                  f"{key[0]} ({value!r}); compared methods must share data, backbone, budget "
                                  f"and evaluation")


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summarize(results: dict[tuple[str, int], dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Rows (label, representation, metric → list over seeds), with one raw-pixel row."""
    rows: dict[tuple[str, str], dict[str, list[float]]] = {}
    baseline_seeds: set[int] = set()
    for (label, seed), ev in results.items():
        for rep, metrics in ev.items():
            if rep == "raw_pixels":  # identical in every run of a seed: count it once per seed
                if seed in baseline_seeds:
                    continue
                baseline_seeds.add(seed)
                key = ("raw pixels", "pixels")
            else:
                key = (label, rep.rsplit("_", 1)[-1])
            bucket = rows.setdefault(key, {})
            for m, _ in table_columns(metrics):
                if m in metrics:
                    bucket.setdefault(m, []).append(float(metrics[m]))
    return [{"label": k[0], "features": k[1], **v} for k, v in rows.items()]


def markdown_table(rows: list[dict[str, Any]], seeds: list[int]) -> str:
    cols = table_columns({m for r in rows for m in r})
    head = "| method | features | " + " | ".join(title for _, title in cols) + " |"
    sep = "|---|---|" + "---:|" * len(cols)
    body = [f"| {r['label']} | {r['features']} | " + " | ".join(_mean_std(r.get(m, [])) for m, _ in cols) + " |"
            for r in rows]
    note = f"\nTest split; mean ± std over seeds {seeds}." if len(seeds) > 1 else f"\nTest split; seed {seeds[0]}."
    return "\n".join([head, sep, *body]) + "\n" + note + "\n"


def plot_comparison(rows: list[dict[str, Any]], path: Path) -> Path:
    """Grouped bars (kNN acc and AMI of backbone features, with std error bars) per method."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chosen = [r for r in rows if r["features"] in ("backbone", "pixels")]
    fig = Figure(figsize=(1.2 + 1.1 * len(chosen), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.38
    for j, (metric, title) in enumerate((("knn_acc", "kNN acc"), ("ami", "AMI"))):
        means = [statistics.mean(r[metric]) for r in chosen]
        stds = [statistics.stdev(r[metric]) if len(r[metric]) > 1 else 0.0 for r in chosen]
        ax.bar([i + (j - 0.5) * width for i in range(len(chosen))], means, width, yerr=stds, label=title, capsize=3)
    ax.set_xticks(range(len(chosen)), [r["label"] for r in chosen], rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("test split (backbone features)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


CURVE_PANELS = (("online/knn_acc", "online kNN acc (held training images)"),
                ("estep/ami_labels", "E-step AMI vs labels (smallest k)"))


def training_curves(uri: str, parent_run_id: str, names: set[str] | None = None
                    ) -> dict[str, dict[str, list[list[tuple[int, float]]]]]:
    """Per-epoch curves of every child run of a comparison, read back from MLflow: panel -> label -> runs.
    ``names``: only the child runs of these names (the seeds a comparison reports).

    ``estep/ami_labels`` stands for the run's coarsest granularity, ``estep/k<min k>/ami_labels`` (the
    AMI of the E-step's own assignments against the labels; monitoring only, never used in training).
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                                  order_by=["attributes.start_time ASC"])
    panels: dict[str, dict[str, list[list[tuple[int, float]]]]] = {title: {} for _, title in CURVE_PANELS}
    for child in children:
        label = child.data.tags.get("pcl_ray.compare_label")
        if label is None or (names is not None and child.info.run_name not in names):
            continue
        ks = sorted(int(m[len("estep/k"):-len("/ami_labels")]) for m in child.data.metrics
                    if m.startswith("estep/k") and m.endswith("/ami_labels"))
        for key, title in CURVE_PANELS:
            if key == "estep/ami_labels":
                if not ks:
                    continue
                key = f"estep/k{ks[0]}/ami_labels"
            if key in child.data.metrics:
                history = sorted((m.step, m.value) for m in client.get_metric_history(child.info.run_id, key))
                panels[title].setdefault(label, []).append(history)
    return panels


class EmbeddingPanels:
    """Test-split features of each compared method (first seed), drawn as one t-SNE grid at the end."""

    def __init__(self) -> None:
        self.panels: list[tuple[str, np.ndarray]] = []
        self.labels: np.ndarray | None = None
        self.class_names: list[str] | None = None
        self.what = "backbone"
        self._test = None  # the test split: the same for every entry (compare checks that data.* match)

    def add(self, label: str, cfg: ExperimentConfig, state: dict) -> None:
        """Embed the test split with the trained ``state`` (a final-state dict, see :func:`load_final_state`)."""
        from .data import load_split
        from .evaluation.features import all_images, embed_split, eval_views, load_encoder, raw_pixel_features

        if self._test is None:
            self._test = load_split(cfg.data, "test")
        test = self._test
        size = cfg.data.image_size or test.image_size
        if self.labels is None:
            self.labels, self.class_names = test.labels, list(test.classes or []) or None
            self.panels.append(("raw pixels", raw_pixel_features(all_images(test, size))))
        enc = load_encoder(cfg, state["method"], test.channels)
        self.what = cfg.eval.feature
        self.panels.append((label, embed_split(enc, test, eval_views(cfg, test), [self.what])[self.what]))

    def plot(self, path: Path, seed: int) -> Path:
        from .evaluation.embedding_plot import plot_embedding_grid

        assert self.labels is not None
        return plot_embedding_grid(self.panels, self.labels, path, seed=seed, class_names=self.class_names,
                                   title=f"t-SNE of the test split ({self.what} features, seed {seed})")


@dataclass
class CompareOutput:
    """A comparison's folder in the storage: ``<storage>/<name>/``."""

    name: str
    storage: Storage                                  # the storage root
    files: list[str] = field(default_factory=list)   # where the final files were written (paths or URIs)

    @property
    def uri(self) -> str:
        return self.storage.uri_of(self.name)

    def rel(self, *parts: str) -> str:
        return "/".join((self.name, *parts))

    def shown(self, *parts: str) -> str:
        """A file of the comparison as the user reaches it: a local path, or the storage URI."""
        if self.storage.on_local_disk:
            return str(self.storage.local_path(self.rel(*parts)))
        return self.storage.uri_of(self.rel(*parts))


def load_final_state(cfg: ExperimentConfig, run_name: str) -> dict:
    """The final state of a finished run, read through its storage (``<run>/final_state.pt``)."""
    import torch

    raw = run_storage(cfg).read_bytes(final_state_rel(run_name))
    return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)


def _open_parent(spec: CompareConfig, first: ExperimentConfig, resume: str | None, log
                 ) -> tuple[RunLogger, CompareOutput]:
    """The comparison's folder and MLflow parent run: new, or reopened for ``resume`` (a folder name).

    Checked first, before anything is written: the name, the tracking store and the storage.
    """
    from .tracking import check_tracking

    if resume is not None:
        check_name(resume, "--resume")
    storage = run_storage(first)
    uri = resolve_uri(first.tracking.uri)
    check_tracking(uri)
    storage.check_writable()
    if resume is None:
        name = check_name(f"{spec.name}-{time.strftime(STAMP)}", "compare.name")
        out = CompareOutput(name, storage)
        if storage.exists(name):
            raise ConfigError(f"compare.name: {out.uri} exists already (another comparison started this second)")
        parent = RunLogger.start(uri, first.tracking.experiment, name, tags={"pcl_ray.kind": "compare"})
        parent.log_params({"compare.entries": [e.label for e in spec.entries], "compare.seeds": spec.seeds,
                           "compare.set": spec.set, "compare.storage": out.uri})
        storage.write_json(out.rel("compare.json"), {
            "mlflow_run_id": parent.run_id, "tracking_uri": uri,
            "entries": [e.label for e in spec.entries], "seeds": spec.seeds})
        return parent, out
    out = CompareOutput(resume, storage)
    meta_rel = out.rel("compare.json")
    if not storage.is_file(meta_rel):
        raise ConfigError(f"--resume {resume}: no comparison of that name under {storage.uri} "
                          f"(expected {storage.uri_of(meta_rel)})")
    try:
        meta = storage.read_json(meta_rel)
        entries, seeds, saved_uri, run_id = meta["entries"], meta["seeds"], meta["tracking_uri"], meta["mlflow_run_id"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"--resume {resume}: {storage.uri_of(meta_rel)} is not a comparison record") from None
    # --seeds may name some of the recorded seeds: a long comparison stopped early reports those
    if entries != [e.label for e in spec.entries] or not spec.seeds or not set(spec.seeds) <= set(seeds):
        raise ConfigError(f"--resume {resume}: that comparison ran entries {entries} and seeds "
                          f"{seeds}; this pipeline has {[e.label for e in spec.entries]} and {spec.seeds} "
                          f"(--seeds may pick some of its seeds)")
    if saved_uri != uri:
        raise ConfigError(f"--resume {resume}: its MLflow store is {redact(saved_uri)}, not {redact(uri)}")
    parent = RunLogger(uri, run_id)
    parent.client.update_run(parent.run_id, status="RUNNING")
    log(f"[pcl-ray] compare: resuming {resume}")
    if spec.seeds != seeds:
        log(f"[pcl-ray] compare: reporting seeds {spec.seeds} of {seeds}")
        parent.client.set_tag(parent.run_id, "compare.reported_seeds", ",".join(map(str, spec.seeds)))
    return parent, out


def _check_entries_data(configs) -> None:
    """Each distinct data section loads and fits its entries (k, batch size), before anything is written."""
    import json

    from .data import check_data
    from .workflow import preflight

    sizes: dict[str, int] = {}
    for cfg in configs:
        key = json.dumps(cfg.data.model_dump(mode="json"), sort_keys=True) + f"|eval={cfg.eval.enabled}"
        if key not in sizes:
            sizes[key] = len(check_data(cfg).labels)
        preflight(cfg, sizes[key])


def run_compare(path: str | Path, overrides: list[str], seeds: list[int] | None = None,
                log=print, resume: str | None = None) -> tuple[str, CompareOutput]:
    """Train every (entry, seed), evaluate, write ``comparison.md``, ``comparison.png`` and ``embeddings.png``
    (t-SNE of every method's test features at the first seed, beside raw pixels); return (markdown, output).

    Each finished training run's results are kept in ``<name>/results/`` of the storage; with ``resume``
    (the folder name printed when a comparison starts) finished runs are read back, an interrupted one
    continues from its last checkpoint, and the rest train. Plots are drawn in a local temporary folder,
    then uploaded whole.
    """
    from .workflow import train

    spec, configs = load_compare(path, overrides, seeds)
    _check_entries_data(configs.values())
    parent, out = _open_parent(spec, next(iter(configs.values())), resume, log)
    storage = out.storage
    log(f"[pcl-ray] compare {out.name}: {len(spec.entries)} entries x {len(spec.seeds)} seeds in {out.uri} "
        f"(continue an interrupted one with --resume {out.name})")
    status = "FAILED"
    try:
        results: dict[tuple[str, int], dict[str, dict[str, float]]] = {}
        pictures = EmbeddingPanels()
        # Seed-major: an interrupted comparison holds every entry at its first seeds, a comparable table.
        order = [(e.label, s) for s in spec.seeds for e in spec.entries]
        for i, (label, seed) in enumerate(order, 1):
            cfg = configs[(label, seed)]
            run_name = f"{out.name}-{label}-s{seed}"
            done = out.rel("results", f"{label}-s{seed}.json")
            if storage.is_file(done):
                saved = storage.read_json(done)
                log(f"[pcl-ray] compare {i}/{len(configs)}: {label} seed {seed} finished earlier ({run_name})")
            else:
                log(f"[pcl-ray] compare {i}/{len(configs)}: {label} seed {seed}")
                outcome = train(cfg, run_name=run_name, parent_run_id=parent.run_id, log=log,
                                tags={"pcl_ray.compare_label": label})
                saved = {"eval": outcome.eval, "run_name": run_name,
                         "state_path": str(outcome.state_path) if outcome.state_path else None}
                storage.write_json(done, saved)  # a result file is whole or absent
            results[(label, seed)] = saved["eval"]
            if seed == spec.seeds[0] and saved["state_path"] and cfg.eval.enabled:
                pictures.add(label, cfg, load_final_state(cfg, saved.get("run_name", run_name)))
        rows = summarize(results)
        md = markdown_table(rows, spec.seeds)
        from .evaluation.plots import plot_curves_by_label

        with tempfile.TemporaryDirectory(prefix="pcl-ray-compare-") as tmp:
            local = Path(tmp)
            (local / "comparison.md").write_text(md)
            plot_comparison(rows, local / "comparison.png")
            files = ["comparison.md", "comparison.png"]
            curves = training_curves(parent.tracking_uri, parent.run_id,
                                     names={f"{out.name}-{label}-s{seed}" for label, seed in order})
            if any(curves.values()):
                plot_curves_by_label(curves, local / "curves.png",
                                     title=f"{spec.name}: mean over seeds {spec.seeds}, shaded min to max")
                files.append("curves.png")
            if pictures.panels:
                log(f"[pcl-ray] compare: t-SNE of {len(pictures.panels)} test embeddings (seed {spec.seeds[0]})")
                pictures.plot(local / "embeddings.png", seed=spec.seeds[0])
                files.append("embeddings.png")
            for f in files:
                storage.upload(local / f, out.rel(f))
                out.files.append(out.shown(f))
                parent.log_artifact(local / f)
        for r in rows:
            parent.log_metrics({f"{r['label']}/{r['features']}/{m}": statistics.mean(r[m])
                                for m, _ in table_columns(r) if r.get(m)})
        status = "FINISHED"
        return md, out
    except KeyboardInterrupt:
        status = "KILLED"
        log(f"[pcl-ray] compare interrupted: continue with `python run.py compare {path} --resume {out.name}`")
        raise
    finally:
        parent.end(status)
