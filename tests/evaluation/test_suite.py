"""Tests for the evaluation suite: linear probe, low-shot SVM, fine-tuning, t-SNE picture,
exports, ``run_suite`` and the ``eval`` verb of the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from pcl_ray.cli import main
from pcl_ray.config import build_config
from pcl_ray.data import load_split
from pcl_ray.evaluation import (
    DEFAULT_SUITES,
    SUITES,
    backbone_state_dict,
    balanced_subset,
    export_backbone,
    export_embeddings,
    finetune_backbone,
    fit_linear_probe,
    lowshot_svm,
    parse_suites,
    plot_embedding,
    read_embeddings,
    run_suite,
)
from pcl_ray.evaluation.linear_probe import stratified_split
from pcl_ray.evaluation.lowshot import draw_shots
from pcl_ray.methods import build_method
from pcl_ray.models import ConvNet, build_backbone
from pcl_ray.tracking import RunLogger

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _blobs(n_classes: int = 5, per_class: int = 60, dim: int = 32, noise: float = 0.3, seed: int = 0,
           sample_seed: int = 0):
    """Gaussian blobs around class centres drawn from ``seed``: (x, y), classes interleaved.

    Train and test sets share ``seed`` (the classes) and differ in ``sample_seed``.
    """
    centres = np.random.default_rng(seed).normal(size=(n_classes, dim)) * 3.0
    y = np.tile(np.arange(n_classes), per_class)
    noise_rng = np.random.default_rng([seed, sample_seed])
    x = (centres[y] + noise_rng.normal(scale=noise, size=(y.size, dim))).astype(np.float32)
    return x, y


# ------------------------------------------------------------------- linear probe


def test_linear_probe_separable_data_is_near_perfect() -> None:
    x_tr, y_tr = _blobs(seed=0)
    x_te, y_te = _blobs(per_class=30, seed=0, sample_seed=1)
    res = fit_linear_probe(x_tr, y_tr, x_te, y_te, weight_decays=(1e-4, 1e-2), seed=0)
    assert res.accuracy >= 0.99
    assert res.weight_decay in (1e-4, 1e-2)
    assert set(res.val_accuracies) == {1e-4, 1e-2}


def test_linear_probe_choice_ignores_test_labels() -> None:
    rng = np.random.default_rng(1)
    x, y = _blobs(noise=6.0, seed=1)  # overlapping classes: the penalty matters
    x_te, y_te = _blobs(per_class=20, noise=6.0, seed=1, sample_seed=1)
    grid = (1e-5, 1e-3, 1e-1, 10.0)
    truth = fit_linear_probe(x, y, x_te, y_te, weight_decays=grid)
    assert len(set(truth.val_accuracies.values())) > 1  # the choice is not a tie
    shuffled = fit_linear_probe(x, y, x_te, rng.permutation(y_te), weight_decays=grid)
    assert shuffled.weight_decay == truth.weight_decay
    assert shuffled.val_accuracies == truth.val_accuracies


def test_logistic_regression_matches_sklearn() -> None:
    from sklearn.linear_model import LogisticRegression

    from pcl_ray.evaluation.linear_probe import fit_logistic_regression

    x, y = _blobs(n_classes=3, per_class=40, dim=6, noise=4.0, seed=7)
    x = (x - x.mean(0)) / x.std(0)
    lam = 1e-2
    w, b = fit_logistic_regression(torch.from_numpy(x).double(), torch.from_numpy(y), 3, lam, max_iter=500)
    # sklearn minimizes C * sum(loss) + ||W||^2 / 2, i.e. lambda = 1 / (C * N).
    ref = LogisticRegression(C=1.0 / (lam * y.size), tol=1e-10, max_iter=10_000).fit(x, y)
    np.testing.assert_allclose(w.numpy(), ref.coef_, atol=1e-4)
    np.testing.assert_allclose(b.numpy(), ref.intercept_, atol=1e-4)


def test_stratified_split_keeps_every_class() -> None:
    y = np.array([0] * 50 + [1] * 10 + [2])
    fit, val = stratified_split(y, 0.2, np.random.default_rng(0))
    assert np.intersect1d(fit, val).size == 0 and fit.size + val.size == y.size
    assert (y[val] == 0).sum() == 10 and (y[val] == 1).sum() == 2 and (y[val] == 2).sum() == 0


# ------------------------------------------------------------------------ low-shot


def test_lowshot_separable_data_is_near_perfect() -> None:
    x_tr, y_tr = _blobs(per_class=40, seed=2)
    x_te, y_te = _blobs(per_class=20, seed=2, sample_seed=1)
    results = lowshot_svm(x_tr, y_tr, x_te, y_te, shots=(1, 4), draws=3, costs=(0.1, 1.0), val_per_class=5)
    assert [r.shots for r in results] == [1, 4]
    for r in results:
        assert len(r.accuracies) == 3 and len(r.costs) == 3
        assert r.mean >= 0.98
        assert r.std >= 0.0


def test_lowshot_cost_choice_never_touches_test_labels() -> None:
    x_tr, y_tr = _blobs(per_class=40, noise=6.0, seed=3)  # noisy: different C win on different draws
    x_te, y_te = _blobs(per_class=20, noise=6.0, seed=3, sample_seed=1)
    kwargs = dict(shots=(1, 2, 8), draws=4, costs=(0.01, 1.0, 100.0), val_per_class=10, seed=0)
    truth = lowshot_svm(x_tr, y_tr, x_te, y_te, **kwargs)
    assert len({c for r in truth for c in r.costs}) > 1  # the choice of C is not trivial here
    wrong = lowshot_svm(x_tr, y_tr, x_te, (y_te + 1) % 5, **kwargs)  # every test label wrong
    shuffled = lowshot_svm(x_tr, y_tr, x_te, np.random.default_rng(0).permutation(y_te), **kwargs)
    for t, w, s in zip(truth, wrong, shuffled, strict=True):
        assert t.costs == w.costs == s.costs
    # The same models, scored against other labels: only the reported accuracy changes.
    assert max(r.mean for r in wrong) < min(r.mean for r in truth)


def test_draw_shots_are_disjoint_and_sized() -> None:
    y = np.repeat(np.arange(3), 10)
    tr, val = draw_shots(y, 4, 3, np.random.default_rng(0))
    assert np.intersect1d(tr, val).size == 0
    assert np.bincount(y[tr]).tolist() == [4, 4, 4] and np.bincount(y[val]).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="class 0 has 10"):
        draw_shots(y, 10, 1, np.random.default_rng(0))


# ---------------------------------------------------------------------- t-SNE, export


def test_tsne_plot_writes_png(tmp_path) -> None:
    x, y = _blobs(n_classes=4, per_class=50, seed=5)
    out = plot_embedding(x, y, tmp_path / "sub" / "tsne.png", max_points=120, seed=0,
                         class_names=["a", "b", "c", "d"])
    assert out.read_bytes().startswith(_PNG_MAGIC)
    assert out.stat().st_size > 1000


def test_parquet_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(6)
    train = (rng.normal(size=(7, 5)).astype(np.float32), np.arange(7) % 3)
    test = (rng.normal(size=(4, 5)).astype(np.float32), np.array([2, -1, 0, 1]))
    path = export_embeddings(tmp_path / "emb.parquet", {"train": train, "test": test}, feature="head")

    everything = read_embeddings(path)
    assert everything["embedding"].shape == (11, 5) and everything["embedding"].dtype == np.float32
    assert everything["split"].tolist() == ["train"] * 7 + ["test"] * 4
    only_test = read_embeddings(path, split="test")
    np.testing.assert_array_equal(only_test["embedding"], test[0])
    np.testing.assert_array_equal(only_test["label"], test[1])
    np.testing.assert_array_equal(only_test["index"], np.arange(4))

    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    emb_type = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(emb_type) and emb_type.list_size == 5
    assert emb_type.value_type == pa.float32()
    assert schema.metadata[b"pcl_ray.feature"] == b"head"


def _method_state_with_backbone(backbone: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A method-like state dict: the backbone under ``encoder.backbone.`` plus unrelated keys."""
    state = {f"encoder.backbone.{k}": v for k, v in backbone.state_dict().items()}
    state["encoder.head.net.weight"] = torch.zeros(2, 2)
    state["key_encoder.encoder.backbone.x"] = torch.zeros(1)
    return state


def test_resnet18_backbone_loads_into_plain_torchvision(tmp_path) -> None:
    backbone, _ = build_backbone("resnet18", in_channels=1)
    path = export_backbone(_method_state_with_backbone(backbone), tmp_path / "backbone.pt")

    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = torch.nn.Identity()
    missing, unexpected = net.load_state_dict(torch.load(path, weights_only=True), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"]
    assert unexpected == []
    torch.testing.assert_close(net.layer4[1].conv2.weight, backbone.layer4[1].conv2.weight)


def test_convnet_backbone_loads_strictly(tmp_path) -> None:
    backbone, _ = build_backbone("convnet", in_channels=3, width=8)
    path = export_backbone(_method_state_with_backbone(backbone), tmp_path / "backbone.pt")
    net = ConvNet(3, width=8)
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    x = torch.randn(2, 3, 16, 16)
    backbone.eval(), net.eval()
    torch.testing.assert_close(net(x), backbone(x))
    with pytest.raises(KeyError):
        backbone_state_dict({"encoder.head.w": torch.zeros(1)})


# --------------------------------------------------------------------- fine-tuning


def _digits_cfg(tmp_path: Path, **eval_overrides):
    return build_config({
        "data": {"name": "digits"},
        "model": {"backbone": "convnet", "width": 8},
        "method": {"name": "pcl", "queue_size": 256, "num_negative_prototypes": 16},
        "estep": {"num_clusters": [10, 20], "nredo": 1},
        "train": {"batch_size": 64, "epochs": 1, "warmup_epochs": 0},
        "ray": {"storage_path": str(tmp_path / "runs")},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "eval-test"},
        "eval": {"knn_k": 20, "kmeans_restarts": 2, "lowshot_shots": [1, 4], "lowshot_draws": 2,
                 "lowshot_val_per_class": 10, "tsne_points": 150, **eval_overrides},
    })


def test_balanced_subset() -> None:
    y = np.array([0] * 100 + [1] * 100 + [2] * 5 + [-1] * 10)
    sub = balanced_subset(y, 0.1, np.random.default_rng(0))
    assert np.bincount(y[sub]).tolist() == [7, 7, 5]  # round(0.1 * 205 / 3) = 7 per class, class 2 has 5
    assert (y[sub] >= 0).all()


def test_finetune_learns_and_leaves_backbone_untouched(tmp_path) -> None:
    cfg = _digits_cfg(tmp_path)
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    torch.manual_seed(0)
    backbone, dim = build_backbone("convnet", train.channels, width=8)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    res = finetune_backbone(backbone, dim, train, test, fraction=0.1, epochs=8, batch_size=32, lr=0.05,
                            classifier_lr=0.1, seed=0, device="cpu")
    assert res.labelled == 150
    assert res.accuracy > 0.5  # chance is 0.1
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(v, before[k])


# ------------------------------------------------------------------ suite and CLI


def _save_fake_checkpoint(cfg, path: Path, epoch: int = 0) -> Path:
    """A checkpoint in the worker's format (``_save_state``) from an untrained method."""
    torch.manual_seed(0)
    method = build_method(cfg, 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"method": method.state_dict(), "optimizer": {}, "epoch": epoch, "global_step": 0,
                "config": cfg.model_dump(mode="json")}, path)
    return path


def test_parse_suites() -> None:
    assert parse_suites(None) == list(DEFAULT_SUITES) and "finetune" not in DEFAULT_SUITES
    assert parse_suites("knn, lowshot,knn") == ["knn", "lowshot"]
    assert "finetune" in parse_suites("all")
    with pytest.raises(ValueError, match="bogus"):
        parse_suites("knn,bogus")


def test_knn_suite_reports_every_extra_neighbour_count(tmp_path) -> None:
    from pcl_ray.evaluation.features import embed_split, eval_views, load_encoder
    from pcl_ray.evaluation.knn import knn_accuracy

    cfg = _digits_cfg(tmp_path, knn_extra_k=[1, 5])
    torch.manual_seed(0)
    state = build_method(cfg, 1).state_dict()
    metrics = run_suite(cfg, state, ["knn"], tmp_path / "out", log=lambda _: None)
    assert set(metrics) == {"eval/knn/acc", "eval/knn/acc_k1", "eval/knn/acc_k5"}
    train, test = load_split(cfg.data, "train"), load_split(cfg.data, "test")
    enc = load_encoder(cfg, state, train.channels)
    views = eval_views(cfg, train)
    xtr, xte = (embed_split(enc, ds, views, [cfg.eval.feature])[cfg.eval.feature] for ds in (train, test))
    for name, k in (("acc", 20), ("acc_k1", 1), ("acc_k5", 5)):
        expected = knn_accuracy(xtr, train.labels, xte, test.labels, k=k, temperature=cfg.eval.knn_temperature)
        assert metrics[f"eval/knn/{name}"] == pytest.approx(expected), name
    assert metrics["eval/knn/acc_k1"] != metrics["eval/knn/acc"]  # the k really differs


def test_run_suite_writes_metrics_and_artifacts(tmp_path) -> None:
    cfg = _digits_cfg(tmp_path)
    torch.manual_seed(0)
    state = build_method(cfg, 1).state_dict()
    suites = ["knn", "linear", "cluster", "tsne", "export"]
    metrics = run_suite(cfg, state, suites, tmp_path / "out", log=lambda _: None)
    for key in ("eval/knn/acc", "eval/linear/acc", "eval/linear/val_acc", "eval/linear/weight_decay",
                "eval/cluster/ami", "eval/cluster/nmi", "eval/cluster/ari", "eval/cluster/acc"):
        assert key in metrics, key
    assert 0.2 < metrics["eval/linear/acc"] <= 1.0  # random convnet features still beat chance
    assert (tmp_path / "out" / "tsne.png").read_bytes().startswith(_PNG_MAGIC)
    emb = read_embeddings(tmp_path / "out" / "embeddings.parquet")
    assert emb["embedding"].shape == (1797, 64)
    ConvNet(1, width=8).load_state_dict(torch.load(tmp_path / "out" / "backbone.pt", weights_only=True))


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A finished-looking run on digits: ``runs/fake-digits/final_state.pt`` + its MLflow run."""
    tmp = tmp_path_factory.mktemp("fake_run")
    cfg = _digits_cfg(tmp)
    state_path = _save_fake_checkpoint(cfg, tmp / "runs" / "fake-digits" / "final_state.pt", epoch=2)
    uri = cfg.tracking.uri
    logger = RunLogger.start(uri, cfg.tracking.experiment, "fake-digits", tags={"pcl_ray.run_name": "fake-digits"})
    logger.end("FINISHED")
    meta = tmp / "runs" / ".pcl_ray" / "fake-digits.json"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"mlflow_run_id": logger.run_id, "tracking_uri": uri}))
    return {"tmp": tmp, "cfg": cfg, "state": state_path, "run_id": logger.run_id, "uri": uri}


def test_eval_cli_by_run_name_logs_to_the_run(fake_run, capsys) -> None:
    rc = main(["eval", "fake-digits", "--suite", "knn,cluster,lowshot",
               "--set", f"ray.storage_path={fake_run['tmp'] / 'runs'}"])
    out = capsys.readouterr().out
    assert rc == 0, out
    for needle in ("knn", "cluster", "ami", "lowshot", "k1", "±", fake_run["run_id"]):
        assert needle in out, needle

    from mlflow.tracking import MlflowClient

    client = MlflowClient(fake_run["uri"])
    metrics = client.get_run(fake_run["run_id"]).data.metrics
    for key in ("eval/knn/acc", "eval/cluster/ami", "eval/lowshot/k1_mean", "eval/lowshot/k4_std"):
        assert key in metrics, key
    history = client.get_metric_history(fake_run["run_id"], "eval/knn/acc")
    assert [m.step for m in history] == [3]  # checkpoint epoch 2 (0-based) -> step 3


def test_eval_cli_on_a_loose_checkpoint_starts_a_new_run(fake_run, tmp_path, capsys) -> None:
    loose = tmp_path / "elsewhere" / "state.pt"
    loose.parent.mkdir()
    shutil.copy(fake_run["state"], loose)
    rc = main(["eval", str(loose), "--suite", "knn,export", "--set", "eval.export_splits=[test]"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (loose.parent / "eval" / "embeddings.parquet").is_file()
    assert read_embeddings(loose.parent / "eval" / "embeddings.parquet")["split"].tolist() == ["test"] * 297

    from mlflow.tracking import MlflowClient

    client = MlflowClient(fake_run["uri"])
    exp = client.get_experiment_by_name(fake_run["cfg"].tracking.experiment)
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'eval-elsewhere'")
    assert len(runs) == 1
    assert "eval/knn/acc" in runs[0].data.metrics
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id, "eval")} == {
        "eval/backbone.pt", "eval/embeddings.parquet"}


def test_eval_by_mlflow_run_id(fake_run, tmp_path) -> None:
    from pcl_ray.config import dump_config
    from pcl_ray.eval_workflow import resolve_target

    uri_override = f"tracking.uri={fake_run['uri']}"
    # With a local checkpoint: found through the run's pcl_ray.run_name tag.
    target = resolve_target(fake_run["run_id"], [uri_override, f"ray.storage_path={fake_run['tmp'] / 'runs'}"])
    assert target.checkpoint == fake_run["state"] and target.mlflow_run_id == fake_run["run_id"]

    # Without one: rebuilt from the logged config.yaml and model/backbone.pt, as `train` logs them.
    cfg = fake_run["cfg"]
    remote = RunLogger.start(fake_run["uri"], cfg.tracking.experiment, "remote-run",
                             tags={"pcl_ray.run_name": "remote-run"})
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    remote.log_artifact(tmp_path / "config.yaml")
    state = torch.load(fake_run["state"], weights_only=True)["method"]
    remote.log_artifact(export_backbone(state, tmp_path / "backbone.pt"), "model")
    remote.end()
    assert main(["eval", remote.run_id, "--suite", "knn", "--set", uri_override]) == 0

    from mlflow.tracking import MlflowClient

    assert "eval/knn/acc" in MlflowClient(fake_run["uri"]).get_run(remote.run_id).data.metrics


def test_eval_cli_unknown_run_exits_2(tmp_path, capsys) -> None:
    assert main(["eval", "no-such-run-xyz"]) == 2
    assert "no-such-run-xyz" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.pt")]) == 2
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(1)}, bogus)
    assert main(["eval", str(bogus)]) == 2
    assert "not a pcl_ray training checkpoint" in capsys.readouterr().err


def test_eval_cli_unknown_suite_exits_2(fake_run, capsys) -> None:
    assert main(["eval", str(fake_run["state"]), "--suite", "knn,nope"]) == 2
    assert "nope" in capsys.readouterr().err


def test_eval_help_and_default_verb(tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    assert "RUN" in help_text and "lowshot" in help_text and "never on the test set" in help_text
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text("data: {name: digits}\ntrain: {epochs: 3}\n")
    assert main([str(pipeline), "--print-config"]) == 0  # no verb: train
    assert "epochs: 3" in capsys.readouterr().out


def test_run_suite_finetune(tmp_path) -> None:
    # On digits (8x8, 150 labels at 10 %) this takes well under a second; on Fashion-MNIST
    # the default budget takes minutes on a CPU, hence finetune is not in the default suites.
    cfg = _digits_cfg(tmp_path, finetune_epochs=2, finetune_batch_size=32)
    torch.manual_seed(0)
    metrics = run_suite(cfg, build_method(cfg, 1).state_dict(), ["finetune"], tmp_path, log=lambda _: None)
    assert set(metrics) == {"eval/finetune/acc_1pct", "eval/finetune/acc_10pct"}


def test_every_suite_the_config_names_has_a_runner() -> None:
    from pcl_ray.evaluation.suite import _RUNNERS

    assert tuple(_RUNNERS) == SUITES  # eval.suites (config.EVAL_SUITES) and the runners name the same suites
