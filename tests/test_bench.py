"""The `bench` verb on the tiny digits pipeline: every part measured, files and MLflow run written, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pcl_ray.bench import parse_parts, pil_pipeline, run_bench, write_report
from pcl_ray.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "pipelines" / "digits_tiny.yaml"


def test_parts_are_parsed_and_a_bad_name_is_refused():
    assert parse_parts("all") == ("views", "mstep", "mfu", "estep", "epoch")
    assert parse_parts("compile,mfu") == ("compile", "mfu")
    assert parse_parts("pcl-moco,loop") == ("pcl-moco", "loop")
    assert parse_parts("estep, views") == ("estep", "views")
    with pytest.raises(ConfigError, match="--parts: expected .* got 'viewz'"):
        parse_parts("viewz")


def test_pil_pipeline_makes_views_like_the_batched_maker():
    from PIL import Image

    from pcl_ray.data import load_split
    from pcl_ray.data.views import ViewMaker

    cfg = load_config(TINY)
    ds = load_split(cfg.data, "train")
    img = ds[0][0]
    pil = pil_pipeline(cfg, ds, ds.image_size, 0.3)(Image.fromarray(img.squeeze(0).numpy(), mode="L"))
    batched = ViewMaker(cfg.data.views.recipe, ds.image_size, ds.channels, ds.mean, ds.std, 0.3)(img[None])[0]
    assert pil.shape == batched.shape == (1, ds.image_size, ds.image_size)
    # same normalisation: both map [0, 1] pixels through (x - mean) / std
    lo, hi = (0 - ds.mean[0]) / ds.std[0], (1 - ds.mean[0]) / ds.std[0]
    for v in (pil, batched):
        assert lo - 1e-4 <= float(v.min()) and float(v.max()) <= hi + 1e-4


def test_bench_measures_every_part_and_writes_files_and_an_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'db'}"
    cfg = load_config(TINY, [f"tracking.uri={uri}", "tracking.experiment=bench-test"])
    report = run_bench(cfg, ("views", "mstep", "estep"), steps=1, log=lambda _: None)
    parts = {r.part for r in report.rows}
    assert parts == {"views", "mstep", "estep"}
    assert all(r.value > 0 for r in report.rows if r.unit not in ("fraction", "AMI"))
    k_rows = [r for r in report.rows if r.what.startswith("k-means + phi")]
    assert [r.what.split(" (")[0] for r in k_rows] == [f"k-means + phi, k={k}" for k in cfg.estep.num_clusters]
    speedup = report.value("views", "speed-up batched / PIL")
    assert speedup == pytest.approx(report.value("views", "batched tensor views")
                                    / report.value("views", "per-image PIL views (torchvision)"), rel=1e-6)
    epoch = report.value("mstep", f"M-step epoch estimate ({report.info['images']} images)")
    total = report.value("estep", "E-step total (embed + every k)")
    assert report.value("estep", "E-step time / M-step epoch time") == pytest.approx(total / epoch, rel=1e-6)
    assert 0.0 <= report.value("mstep", "share of the step spent making views") < 1.0

    files = write_report(report, cfg, tmp_path / "bench-x")
    saved = json.loads((tmp_path / "bench-x" / "bench.json").read_text())
    assert len(saved["rows"]) == len(report.rows) and saved["info"]["images"] == report.info["images"]
    assert "| views | batched tensor views |" in files[1].read_text()
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("bench-test").experiment_id])[0]
    assert run.data.tags["pcl_ray.kind"] == "bench" and run.info.status == "FINISHED"
    assert run.data.metrics["bench/views/speed_up_batched_pil"] == pytest.approx(speedup)
    assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"bench.json", "bench.md"}


def test_mfu_and_epoch_parts_count_flops_and_compare_pcl_with_moco():
    cfg = load_config(TINY)
    report = run_bench(cfg, ("mfu", "epoch", "estep"), steps=1, log=lambda _: None)
    # FlopCounterMode counts the real step: the convolutions are a part of it, the MFU a fraction of the peak
    assert report.value("mfu", "step FLOPs per image (forward + backward)") > 0
    assert 0 < report.value("mfu", "convolution share of the step's FLOPs") < 1
    peak = report.value("mfu", "fp32 matmul peak (2048^2)")
    for layout in ("default layout", "channels_last"):
        mfu = report.value("mfu", f"training step MFU, {layout}")
        assert mfu == pytest.approx(report.value("mfu", f"training step, achieved ({layout})") / peak, rel=1e-6)
    # the digits pipeline trains in channels_last (train.channels_last unset = on)
    assert report.value("mfu", "training step MFU as the run trains (channels_last)") == \
        report.value("mfu", "training step MFU, channels_last")
    # the epoch ratio is assembled from the rows it prints: (N/B * t_pcl + t_estep) / (N/B * t_moco)
    moco = report.value("epoch", f"MoCo M-step epoch estimate ({report.info['images']} images)")
    step_ratio = report.value("epoch", "PCL step / MoCo step (same batch, views made in advance)")
    warm = report.value("epoch", "E-step k-means + phi, warm start (5 iterations)")
    assert report.value("epoch", "PCL epoch / MoCo epoch (stream, warm)") == pytest.approx(
        (moco * step_ratio + warm) / moco, rel=1e-6)
    for k in cfg.estep.num_clusters:
        assert 0 <= report.value("estep", f"warm-start assignments vs cold, AMI, k={k}") <= 1 + 1e-9
    # the account of the gap: shares of the profiled step by kind add up to 1, the convolutions among them;
    # the ceiling: the convolutions' FLOPs at their own (better-layout) rate, the rest at the matmul peak
    shares = [r.value for r in report.rows if r.what.startswith("step time share: ")]
    assert len(shares) == 6 and sum(shares) == pytest.approx(1.0)
    assert next(r.value for r in report.rows if r.what.startswith("step time share: convolution")) > 0
    conv = max(report.value("mfu", "convolutions alone (fwd + bwd), achieved / matmul peak"),
               report.value("mfu", "convolutions alone in channels_last, achieved / matmul peak"))
    share = report.value("mfu", "convolution share of the step's FLOPs")
    assert report.value("mfu", "MFU ceiling (convolutions at their replayed rate, other FLOPs at peak)") == \
        pytest.approx(1.0 / (share / conv + 1.0 - share), rel=1e-6)


def test_the_pcl_moco_part_trains_each_e_step_mode_against_moco():
    cfg = load_config(TINY)
    report = run_bench(cfg, ("pcl-moco",), steps=1, log=lambda _: None,
                       loop={"images": 512, "epochs": 3, "repeats": 1})
    moco = report.value("pcl-moco", "MoCo epoch (epochs 3+)")
    assert moco > 0
    for mode in ("eval_pass", "stream", "stream + warm start"):
        epoch = report.value("pcl-moco", f"PCL, {mode}: epoch, E-step + M-step (epochs 3+)")
        assert report.value("pcl-moco", f"PCL, {mode}: PCL epoch / MoCo epoch") == pytest.approx(epoch / moco)
        assert 0 < report.value("pcl-moco", f"PCL, {mode}: E-step per epoch") < epoch
        # the paired epochs (same epoch, same repetition) bracket the ratio of the means
        low = report.value("pcl-moco", f"PCL, {mode}: PCL epoch / MoCo epoch, lowest of the paired epochs")
        high = report.value("pcl-moco", f"PCL, {mode}: PCL epoch / MoCo epoch, highest of the paired epochs")
        assert low <= epoch / moco <= high  # one measured epoch per candidate here: low == high
        assert report.value("pcl-moco", f"PCL, {mode}: M-step / MoCo M-step") > 0
    assert "interleaved epoch by epoch" in report.info["pcl-moco"]


@pytest.mark.slow
def test_the_compile_part_reports_warm_up_and_speed_up():
    report = run_bench(load_config(TINY), ("compile",), steps=2, log=lambda _: None)
    assert report.value("compile", "torch.compile warm-up (first two steps, less two eager steps)") > 0
    assert report.value("compile", "speed-up torch.compile / eager (channels_last)") > 0
    assert {r.part for r in report.rows} == {"compile"}


def test_the_pcl_moco_part_refuses_another_method_or_too_few_epochs():
    with pytest.raises(ConfigError, match="method.name=pcl"):
        run_bench(load_config(TINY, ["method.name=simclr"]), ("pcl-moco",), loop={"epochs": 3})
    with pytest.raises(ConfigError, match="--loop-epochs: the pcl-moco part needs at least 3"):
        run_bench(load_config(TINY), ("pcl-moco",), loop={"epochs": 2})


def test_a_method_without_e_step_reports_no_e_step():
    cfg = load_config(TINY, ["method.name=moco"])
    report = run_bench(cfg, ("mstep", "estep", "epoch"), steps=1, log=lambda _: None)
    assert {r.part for r in report.rows} == {"mstep"}
    assert report.info["estep"] == "none (moco has no E-step)"
    assert report.info["epoch"].startswith("skipped (the PCL/MoCo ratio needs method.name=pcl")


def test_cli_refuses_bad_input_before_measuring(tmp_path, capsys):
    from pcl_ray.cli import main

    out = tmp_path / "out"
    assert main(["bench", str(TINY), "--parts", "gpu", "--out", str(out)]) == 2
    assert "--parts" in capsys.readouterr().err
    assert main(["bench", str(TINY), "--steps", "0", "--out", str(out), "--no-mlflow"]) == 2
    assert "--steps" in capsys.readouterr().err
    assert main(["bench", str(TINY), "--set", "train.batch_size=-1", "--out", str(out)]) == 2
    assert "train.batch_size" in capsys.readouterr().err
    assert main(["bench", str(TINY), "--parts", "views,loop", "--loop-epochs", "1", "--out", str(out)]) == 2
    assert "--loop-epochs: expected at least 2" in capsys.readouterr().err  # before the views were measured
    assert not out.exists()
    assert main(["bench", str(TINY), "--parts", "views", "--steps", "1", "--out", str(out), "--no-mlflow"]) == 0
    assert "speed-up batched / PIL" in capsys.readouterr().out
    assert sorted(f.name for f in out.iterdir()) == ["bench.json", "bench.md"]  # no temporary files left


@pytest.mark.slow
@pytest.mark.ray
def test_the_loop_part_sets_a_ray_train_run_against_the_single_process_loop(ray_local, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default runs/ and mlruns/ would be here: the part leaves neither
    cfg = load_config(TINY)
    assert parse_parts("loop") == ("loop",) and "loop" not in parse_parts("all")
    lines = []
    report = run_bench(cfg, ("loop",), log=lines.append, loop={"images": 512, "epochs": 3, "repeats": 1})
    ray_rate = report.value("loop", "Ray Train loop, epoch 2+ throughput (batch 128)")
    plain_rate = report.value("loop", "single-process loop, epoch 2+ throughput")
    assert ray_rate > 0 and plain_rate > 0
    assert report.value("loop", "Ray / single-process throughput") == pytest.approx(ray_rate / plain_rate, rel=1e-6)
    startup = report.value("loop", "Ray run start-up (train() call to epoch 1's first step)")
    outside = report.value("loop", "Ray run: train() wall time minus its M-step epochs")
    assert 0 < startup < outside  # the start-up is a part of the time outside the epochs
    for who in ("Ray Train loop", "single-process loop"):
        assert report.value("loop", f"{who}, first-epoch overhead (epoch 1 - mean of later)") is not None
        assert report.value("loop", f"{who}, E-step per E-step (embed + k-means)" if who.startswith("single")
                            else f"{who}, E-step hand-off per E-step") > 0  # PCL: an E-step at epochs 2 and 3
    assert report.value("loop", "local Ray start (ray.init)") is None  # the session's Ray was up already
    assert report.info["loop"] == "3 epochs on 512 images, 1 repetitions, 2 Ray workers"
    assert any(line.startswith("[pcl-ray] loop: Ray Train ") for line in lines)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlruns").exists()
    with pytest.raises(ConfigError, match="--loop-epochs: expected at least 2"):
        run_bench(cfg, ("loop",), log=lambda _: None, loop={"epochs": 1})
