"""The compare verb: identical-conditions check, summary table, and a real 2-method run on digits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pcl_ray.compare import load_compare, markdown_table, plot_comparison, summarize
from pcl_ray.config import ConfigError

ROOT = Path(__file__).resolve().parent.parent
DIGITS = str(ROOT / "pipelines" / "digits_tiny.yaml")


def _write(tmp_path, body: str, name: str = "cmp.yaml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


def test_shipped_compare_pipelines_resolve_with_identical_conditions():
    for name in ("compare_fmnist.yaml", "compare_fmnist_quick.yaml"):
        spec, configs = load_compare(ROOT / "pipelines" / name, [])
        methods = {c.method.name for c in configs.values()}
        assert methods == {"pcl", "moco", "simclr", "swav", "deepcluster", "spcl"}
        assert len(configs) == len(spec.entries) * len(spec.seeds)
        assert {c.train.seed for c in configs.values()} == set(spec.seeds)
        # the raw-pixel baseline (identical for every entry of a seed) is computed by the first entry only
        with_pixels = sorted(key for key, c in configs.items() if c.eval.baselines)
        assert with_pixels == sorted((spec.entries[0].label, s) for s in spec.seeds)


def test_every_shipped_compare_pipeline_validates():
    paths = sorted((ROOT / "pipelines").glob("*.yaml"))
    compares = [p for p in paths if "\ncompare:" in "\n" + p.read_text()]  # a top-level compare section
    assert len(compares) >= 8
    for path in compares:
        spec, configs = load_compare(path, [])
        assert len(configs) == len(spec.entries) * len(spec.seeds), path.name


def test_differing_budget_is_rejected_naming_the_key(tmp_path):
    p = _write(tmp_path, f"""compare:
  entries:
    - {{label: a, pipeline: {DIGITS}}}
    - {{label: b, pipeline: {DIGITS}, set: [train.epochs=5]}}
""")
    with pytest.raises(ConfigError, match="train.epochs differs between a"):
        load_compare(p, [])


@pytest.mark.parametrize("body, needle", [
    ("compare: {entries: [{label: a, pipeline: x.yaml}]}", "compare.entries"),
    ("compare: {entries: [{label: a, pipeline: P}, {label: a, pipeline: P}]}", "labels must be unique"),
    ("compare: {seedz: [1], entries: []}", "compare.seedz"),
    ("train: {epochs: 1}", "needs a `compare:` section"),
])
def test_bad_compare_sections(tmp_path, body, needle):
    with pytest.raises(ConfigError, match=needle):
        load_compare(_write(tmp_path, body.replace("P", DIGITS)), [])


def test_summary_counts_the_pixel_baseline_once_per_seed(tmp_path):
    def ev(v):
        row = {"knn_acc": v, "ami": v / 2, "nmi": v / 2, "acc": v}
        return {"m_backbone": row, "m_head": row, "raw_pixels": {"knn_acc": 0.5, "ami": 0.1, "nmi": 0.1, "acc": 0.3}}

    results = {("a", 0): ev(0.8), ("a", 1): ev(0.6), ("b", 0): ev(0.7), ("b", 1): ev(0.7)}
    rows = {(r["label"], r["features"]): r for r in summarize(results)}
    assert rows[("a", "backbone")]["knn_acc"] == [0.8, 0.6]
    assert rows[("raw pixels", "pixels")]["knn_acc"] == [0.5, 0.5]
    md = markdown_table(list(rows.values()), [0, 1])
    assert "| a | backbone | 0.7000 ± 0.1414 |" in md
    png = plot_comparison(list(rows.values()), tmp_path / "c.png")
    assert png.stat().st_size > 1000
    assert md.splitlines()[0].count("|") == 9  # a metric no run reported is shown as "–", never invented
    assert "| – | – |" in md


def test_extra_knn_columns_follow_the_main_knn_column():
    results = {("a", 0): {"m_backbone": {"knn_acc": 0.8, "knn20_acc": 0.85, "knn5_acc": 0.9, "ami": 0.5}}}
    rows = summarize(results)
    assert rows[0]["knn20_acc"] == [0.85] and rows[0]["knn5_acc"] == [0.9]
    head = markdown_table(rows, [0]).splitlines()[0]
    assert head.startswith("| method | features | kNN acc | kNN k=5 | kNN k=20 | AMI |")
    body = markdown_table(rows, [0]).splitlines()[2]
    assert body.startswith("| a | backbone | 0.8000 | 0.9000 | 0.8500 | 0.5000 |")


def test_training_curves_are_read_back_per_label_and_seed(tmp_path):
    from pcl_ray.compare import training_curves
    from pcl_ray.evaluation.plots import plot_curves_by_label
    from pcl_ray.tracking import RunLogger

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = RunLogger.start(uri, "curves", "cmp", tags={"pcl_ray.kind": "compare"})
    RunLogger.start(uri, "curves", "unrelated").log_metrics({"online/knn_acc": 0.1}, step=1)
    for label, seed, estep in (("pcl", 0, True), ("pcl", 1, True), ("moco", 0, False)):
        child = RunLogger.start(uri, "curves", f"{label}-s{seed}", tags={"pcl_ray.compare_label": label},
                                parent_run_id=parent.run_id)
        for epoch in (1, 2, 3):
            child.log_metrics({"online/knn_acc": 0.5 + 0.1 * epoch + 0.01 * seed}, step=epoch)
            if estep and epoch >= 2:  # warm-up epoch 1; coarsest k=10 is the one plotted
                child.log_metrics({"estep/k10/ami_labels": 0.3 * epoch, "estep/k50/ami_labels": 0.9}, step=epoch)
    curves = training_curves(uri, parent.run_id)
    knn = curves["online kNN acc (held training images)"]
    assert sorted(knn) == ["moco", "pcl"] and len(knn["pcl"]) == 2 and len(knn["moco"]) == 1
    assert knn["moco"][0] == [(1, pytest.approx(0.6)), (2, pytest.approx(0.7)), (3, pytest.approx(0.8))]
    ami = curves["E-step AMI vs labels (smallest k)"]
    assert list(ami) == ["pcl"] and ami["pcl"][1] == [(2, pytest.approx(0.6)), (3, pytest.approx(0.9))]
    png = plot_curves_by_label(curves, tmp_path / "curves.png", title="t")
    assert png.read_bytes().startswith(b"\x89PNG") and png.stat().st_size > 5000


def test_embedding_grid_has_one_panel_per_representation(tmp_path):
    from pcl_ray.evaluation.embedding_plot import plot_embedding_grid

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    panels = [(f"m{i}", rng.normal(size=(120, 8)) + labels[:, None] * i) for i in range(4)]
    png = plot_embedding_grid(panels, labels, tmp_path / "e.png", max_points=90, class_names=["a", "b", "c"])
    assert png.stat().st_size > 1000
    with pytest.raises(ValueError, match="panel 'bad': 5 feature rows but 120 labels"):
        plot_embedding_grid([("bad", np.zeros((5, 2)))], labels, tmp_path / "x.png")


@pytest.mark.ray
def test_compare_two_methods_on_digits(ray_local, tmp_path):
    from mlflow.tracking import MlflowClient

    from pcl_ray.compare import run_compare

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    p = _write(tmp_path, f"""compare:
  name: cmp-test
  seeds: [0]
  set: [train.epochs=1, train.warmup_epochs=0, eval.kmeans_restarts=1, tracking.experiment=cmp,
        "tracking.uri={uri}", "ray.storage_path={tmp_path / 'runs'}"]
  entries:
    - {{label: moco, pipeline: {DIGITS}, set: [method.name=moco]}}
    - {{label: simclr, pipeline: {DIGITS}, set: [method.name=simclr]}}
""")
    md, out = run_compare(p, [])
    out_dir = out.storage.local_path(out.name)  # a local storage: the comparison's folder on this disk
    assert out.files == [str(out_dir / f) for f in ("comparison.md", "comparison.png", "curves.png",
                                                     "embeddings.png")]
    assert "| moco | backbone |" in md and "| simclr | head |" in md and "| raw pixels | pixels |" in md
    assert (out_dir / "comparison.md").read_text() == md
    assert (out_dir / "comparison.png").stat().st_size > 1000
    assert (out_dir / "embeddings.png").stat().st_size > 1000
    header = md.splitlines()[0]
    assert "1-shot SVM" in header and "16-shot SVM" in header
    moco_row = next(line for line in md.splitlines() if line.startswith("| moco | backbone |"))
    one_shot = float(moco_row.split("|")[7])
    assert 0.0 < one_shot <= 1.0
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cmp")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("pcl_ray.kind") == "compare"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert sorted(r.data.tags["pcl_ray.compare_label"] for r in children) == ["moco", "simclr"]
    # resuming a finished comparison reads every result back and trains nothing
    md2, out2 = run_compare(p, [], resume=out.name)
    assert out2.storage.local_path(out2.name) == out_dir and md2 == md
    runs = client.search_runs([exp.experiment_id])
    assert len([r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]) == 2
    assert client.get_run(parents[0].info.run_id).info.status == "FINISHED"
    with pytest.raises(ConfigError, match="--resume cmp-test-0: no comparison of that name"):
        run_compare(p, [], resume="cmp-test-0")
    # a comparison stopped after its first seed (recorded as seeds [0, 1]) reports the finished seed
    import json

    meta = json.loads((out_dir / "compare.json").read_text())
    (out_dir / "compare.json").write_text(json.dumps({**meta, "seeds": [0, 1]}))
    p2 = _write(tmp_path, p.read_text().replace("seeds: [0]", "seeds: [0, 1]"), name="two-seeds.yaml")
    md3, _ = run_compare(p2, [], seeds=[0], resume=out.name)
    assert md3 == md  # nothing trained: seed 0 read back
    assert client.get_run(parents[0].info.run_id).data.tags["compare.reported_seeds"] == "0"
    with pytest.raises(ConfigError, match=r"seeds \[0, 1\].*--seeds may pick some of its seeds"):
        run_compare(p2, [], seeds=[0, 2], resume=out.name)
    (out_dir / "compare.json").write_text(json.dumps(meta))
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id)} == {
        "comparison.md", "comparison.png", "embeddings.png", "curves.png"}
    assert (out_dir / "curves.png").read_bytes().startswith(b"\x89PNG")
