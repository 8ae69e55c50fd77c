"""The `bench` verb: where one training epoch's time goes, measured side by side.

The parts, each timed on the pipeline's own data, model, method and E-step settings:

``views``  the batched tensor view maker (:mod:`pcl_ray.data.views`) against the per-image PIL
           pipeline of the same recipe (torchvision transforms), on the same images;
``mstep``  training steps of the method (views + forward + backward + SGD), and the same steps on
           views made once in advance, so the share of the step spent making views shows;
``estep``  the E-step: embedding the training split (eval pass) and faiss k-means + φ at every
           granularity, set against the M-step time of one epoch;
``mfu``    the step's FLOPs per image and achieved FLOP/s against the machine's matmul peak
           (:mod:`pcl_ray.bench_mfu`);
``compile`` torch.compile of the encoders against the eager step, and its warm-up (only when named);
``epoch``  the PCL epoch against the MoCo epoch, per E-step feature mode (:mod:`pcl_ray.bench_epoch`);
``loop``   short Ray Train runs against the single-process loop: throughput ratio, first-epoch
           overhead, start-up (:mod:`pcl_ray.bench_loop`; only when named);
``pcl-moco`` whole PCL epochs in each E-step mode against MoCo epochs, trained in this process
           (:mod:`pcl_ray.bench_pcl_moco`; only when named);
``estep-scale`` the E-step at N up to 1.28M on synthetic embeddings (:mod:`pcl_ray.bench_scale`; alone).

Absolute numbers depend on the machine and on whatever else runs on it; the ratios are measured
in one run, back to back. The numbers are printed, written to ``bench.json`` + ``bench.md`` under
``runs/bench-<stamp>/`` and logged to MLflow (experiment ``tracking.experiment``, tag
``pcl_ray.kind=bench``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ConfigError, ExperimentConfig

PARTS = ("views", "mstep", "mfu", "compile", "estep", "epoch", "estep-scale", "loop", "pcl-moco")
#: what "all" runs: estep-scale (synthetic N up to 1.28M, minutes), loop (Ray Train runs, pcl_ray/bench_loop.py),
#: pcl-moco (trained epochs, pcl_ray/bench_pcl_moco.py) and compile (torch.compile's warm-up) only when named
DEFAULT_PARTS = ("views", "mstep", "mfu", "estep", "epoch")


@dataclass
class BenchRow:
    part: str
    what: str
    value: float
    unit: str


@dataclass
class BenchReport:
    label: str
    rows: list[BenchRow] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    def add(self, part: str, what: str, value: float, unit: str) -> float:
        self.rows.append(BenchRow(part, what, float(value), unit))
        return float(value)

    def value(self, part: str, what: str) -> float | None:
        return next((r.value for r in self.rows if r.part == part and r.what == what), None)

    def markdown(self) -> str:
        lines = [f"# pcl-ray bench: {self.label}", "",
                 ", ".join(f"{k} {v}" for k, v in self.info.items()), "",
                 "| part | what | value | unit |", "|---|---|---:|---|"]
        lines += [f"| {r.part} | {r.what} | {r.value:.4g} | {r.unit} |" for r in self.rows]
        return "\n".join(lines) + "\n"


def parse_parts(text: str | None) -> tuple[str, ...]:
    if not text or text == "all":
        return DEFAULT_PARTS
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise ConfigError(f"--parts: expected a comma-separated subset of {','.join(PARTS)} or 'all', got {text!r}")
    return parts


def _alternating(fns, repeats: int, warmup: int = 1) -> list[float]:
    """Mean seconds per call of each of ``fns``, called in turn ``repeats`` times after ``warmup`` rounds.

    Alternating the candidates spreads whatever else the machine is doing evenly over them, so their
    ratio holds even when the absolute times drift.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    totals = [0.0] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            totals[i] += time.perf_counter() - t0
    return [t / repeats for t in totals]


def _batch(ds, size: int, seed: int = 0) -> torch.Tensor:
    """A random batch of ``size`` training images as one uint8 tensor."""
    idx = np.random.default_rng(seed).choice(len(ds), size=min(size, len(ds)), replace=False)
    return torch.stack([ds[int(i)][0] for i in idx])


def pil_pipeline(cfg: ExperimentConfig, ds, size: int, min_scale: float):
    """The torchvision per-image equivalent of the batched recipe (what a Dataset.__getitem__ would run)."""
    from torchvision import transforms as T

    from .data.views import blur_kernel_size

    crop = T.RandomResizedCrop(size, scale=(min_scale, 1.0))
    if cfg.data.views.recipe == "pcl_v1":
        middle = [T.RandomGrayscale(p=0.2), T.ColorJitter(0.4, 0.4, 0.4)]
    else:
        middle = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                  T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=(0.1, 2.0))], p=0.5)]
    return T.Compose([crop, *middle, T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(ds.mean, ds.std)])


def bench_views(cfg: ExperimentConfig, ds, method, report: BenchReport, repeats: int) -> None:
    from PIL import Image

    from .training import build_view_makers

    makers, _ = build_view_makers(method, cfg, ds)
    specs = method.view_specs(ds.image_size)
    images = _batch(ds, cfg.train.batch_size)
    n = images.shape[0] * len(makers)  # views made per call
    gen = torch.Generator().manual_seed(0)
    pipelines = [pil_pipeline(cfg, ds, s.size, s.min_scale) for s in specs]
    mode = "L" if ds.channels == 1 else "RGB"
    arrays = [img.squeeze(0).numpy() if ds.channels == 1 else img.permute(1, 2, 0).numpy() for img in images]

    def per_image():
        for a in arrays:  # as a torchvision data set does: array -> PIL image -> transforms, per item
            pil = Image.fromarray(a, mode=mode)
            for p in pipelines:
                p(pil)

    batched, pil = _alternating([lambda: [m(images, generator=gen) for m in makers], per_image], repeats)
    report.add("views", "batched tensor views", n / batched, "views/s")
    report.add("views", "per-image PIL views (torchvision)", n / pil, "views/s")
    report.add("views", "speed-up batched / PIL", pil / batched, "x")


def _prototypes(cfg: ExperimentConfig, ds, method, device, report: BenchReport | None):
    """Embed the training split and run the E-step once; time both when ``report`` is given."""
    from .distributed.trainer import estep_kwargs
    from .training import build_view_makers, embed_shard
    from .estep import run_estep

    _, eval_views = build_view_makers(method, cfg, ds)
    t0 = time.perf_counter()
    emb = embed_shard(method, ds, eval_views, np.arange(len(ds)), 512, device)
    embed_s = time.perf_counter() - t0
    kwargs = estep_kwargs(cfg, gpu=device.type == "cuda")
    per_k = []
    for k in kwargs.pop("num_clusters"):
        pset = run_estep(emb, [k], **kwargs)
        per_k.append((k, pset.seconds))
    pset = run_estep(emb, list(cfg.estep.num_clusters), **kwargs)
    if report is not None:
        _warm_start_rows(emb, pset, kwargs, cfg, report)
        report.add("estep", f"embed {len(ds)} training images (eval pass)", embed_s, "s")
        for k, sec in per_k:
            report.add("estep", f"k-means + phi, k={k} ({pset.backend}, nredo {cfg.estep.nredo})", sec, "s")
        report.add("estep", "E-step total (embed + every k)", embed_s + sum(s for _, s in per_k), "s")
        report.add("estep", "E-step total with estep.features=stream (every k, no eval pass)",
                   sum(s for _, s in per_k), "s")
    return pset


def _warm_start_rows(emb: np.ndarray, pset, kwargs: dict, cfg: ExperimentConfig, report: BenchReport) -> None:
    """``estep.warm_start`` on the same embeddings moved by a small random drift (a stand-in for one epoch of
    training): the cold E-step (``nredo`` random restarts) against k-means started from the undrifted
    centroids (one restart, ``estep.warm_niter`` iterations); its time and how far its assignments agree with the cold run's (AMI)."""
    from sklearn.metrics import adjusted_mutual_info_score

    from .estep import run_estep

    rng = np.random.default_rng(cfg.estep.seed)
    scale = 0.1 * float(np.linalg.norm(emb, axis=1).mean()) / np.sqrt(emb.shape[1])
    drifted = (emb + rng.normal(scale=scale, size=emb.shape)).astype(np.float32)  # (N, d)
    ks = list(cfg.estep.num_clusters)
    kw = {k: v for k, v in kwargs.items() if k != "num_clusters"}
    init = [g.centroids for g in pset.granularities]
    cold = warm = None

    def run_cold():
        nonlocal cold
        cold = run_estep(drifted, ks, **kw)

    def run_warm():
        nonlocal warm
        warm = run_estep(drifted, ks, init_centroids=init, warm_niter=cfg.estep.warm_niter, **kw)

    t_cold, t_warm = _alternating([run_cold, run_warm], 1, warmup=0)
    other = run_estep(drifted, ks, **{**kw, "seed": kw.get("seed", 0) + 1000})  # the baseline: another cold seed
    report.add("estep", f"warm-start k-means + phi ({cfg.estep.warm_niter} iterations) / cold", t_warm / t_cold,
               "ratio")
    for gc, gw, go in zip(cold.granularities, warm.granularities, other.granularities):
        report.add("estep", f"warm-start assignments vs cold, AMI, k={gc.num_clusters}",
                   adjusted_mutual_info_score(gc.assignments, gw.assignments), "AMI")
        report.add("estep", f"cold vs cold of another seed (baseline), AMI, k={gc.num_clusters}",
                   adjusted_mutual_info_score(gc.assignments, go.assignments), "AMI")


def bench_mstep(cfg: ExperimentConfig, ds, method, device, prototypes, report: BenchReport, steps: int) -> None:
    """The run's own step: its optimizer, precision and speed options (``method`` prepared by :func:`run_bench`)."""
    from .training import Precision, build_optimizer, build_view_makers, prepare_views, train_step

    makers, _ = build_view_makers(method, cfg, ds)
    net = method.net
    precision = Precision.for_device(cfg.train.precision, device)
    optimizer = build_optimizer(cfg, net.parameters())  # the run's optimizer, as the worker builds it
    images = _batch(ds, cfg.train.batch_size, seed=1).to(device)
    index = torch.arange(images.shape[0], device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    epoch = cfg.train.warmup_epochs if prototypes is not None else 0
    fixed = prepare_views([m(images, generator=gen) for m in makers], cfg)
    net.train()

    def step(views):
        train_step(method, net, optimizer, views, index, prototypes, generator=gen, epoch=epoch,
                   global_step=10**6, precision=precision)

    full, compute = _alternating([lambda: step(prepare_views([m(images, generator=gen) for m in makers], cfg)),
                                  lambda: step(fixed)], steps, warmup=2)
    b = images.shape[0]
    report.add("mstep", f"training step, views included (batch {b})", b / full, "img/s")
    report.add("mstep", "training step on views made in advance", b / compute, "img/s")
    report.add("mstep", "share of the step spent making views", max(0.0, 1.0 - compute / full), "fraction")
    report.add("mstep", f"M-step epoch estimate ({len(ds)} images)", len(ds) / (b / full), "s")


def run_bench(cfg: ExperimentConfig, parts: tuple[str, ...], steps: int = 10, log=print,
              loop: dict | None = None) -> BenchReport:
    """Measure ``parts`` for ``cfg`` in this process (all CPU threads; the GPU when there is one).

    ``loop``: keyword arguments of :func:`pcl_ray.bench_loop.bench_loop` (``images``, ``epochs``, ``repeats``).
    """
    from .data import load_split
    from .methods import build_method
    from .training import prepare_model
    from .training.optim import channels_last_enabled

    if steps < 1:
        raise ConfigError(f"--steps: expected a positive number of timed steps, got {steps}")
    if "loop" in parts or "pcl-moco" in parts:
        from .bench_loop import DEFAULT_EPOCHS, check_loop_options

        check_loop_options(**(loop or {}))
        if "pcl-moco" in parts:
            from .bench_pcl_moco import check_pcl_moco

            check_pcl_moco(cfg, (loop or {}).get("epochs", DEFAULT_EPOCHS))
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(cfg.train.seed)
    if parts == ("estep-scale",):  # synthetic embeddings: no data, no model (pcl_ray/bench_scale.py)
        from .bench_scale import bench_estep_scale

        report = BenchReport("E-step at scale (synthetic 128-d embeddings)", info={"device": "cpu"})
        log(f"[pcl-ray] bench {report.label}")
        bench_estep_scale(cfg, report, log=log)
        return report
    if "estep-scale" in parts:
        raise ConfigError("--parts: estep-scale runs alone (it uses synthetic embeddings, not the pipeline's data)")
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.ray.use_gpu is not False else "cpu")
    ds = load_split(cfg.data, "train")
    method = build_method(cfg, ds.channels, generator=torch.Generator().manual_seed(cfg.train.seed)).to(device)
    prepare_model(method, cfg, device)  # the run's train.channels_last / train.compile (mfu sets both layouts)
    report = BenchReport(f"{cfg.method.name} on {cfg.data.name}",
                         info={"images": len(ds), "batch": cfg.train.batch_size, "backbone": cfg.model.backbone,
                               "device": device.type, "threads": torch.get_num_threads(),
                               "layout": "channels_last" if channels_last_enabled(cfg, device) else "default"})
    log(f"[pcl-ray] bench {report.label}: {', '.join(parts)} ({len(ds)} images, {device.type})")
    if "views" in parts:
        bench_views(cfg, ds, method, report, steps)
        log(f"[pcl-ray] views: batched {report.value('views', 'batched tensor views'):.0f} views/s, "
            f"PIL {report.value('views', 'per-image PIL views (torchvision)'):.0f} views/s")
    prototypes = None
    if method.needs_estep and ("mstep" in parts or "mfu" in parts or "compile" in parts or "estep" in parts):
        pset = _prototypes(cfg, ds, method, device, report if "estep" in parts else None)
        prototypes = pset.to_torch(device)
        method.on_prototypes(prototypes)
        if "estep" in parts:
            log(f"[pcl-ray] E-step: {report.value('estep', 'E-step total (embed + every k)'):.2f}s")
    elif "estep" in parts:
        report.info["estep"] = f"none ({cfg.method.name} has no E-step)"
    if "mstep" in parts:
        bench_mstep(cfg, ds, method, device, prototypes, report, steps)
        rate = next(r.value for r in report.rows if r.part == "mstep" and r.unit == "img/s")
        log(f"[pcl-ray] M-step: {rate:.0f} img/s, views included")
    if "mfu" in parts:  # pcl_ray/bench_mfu.py
        from .bench_mfu import bench_mfu

        bench_mfu(cfg, ds, method, device, prototypes, report, steps, _alternating, _batch)
        log(f"[pcl-ray] MFU: {report.value('mfu', 'training step MFU, channels_last'):.2f} of the "
            f"{report.value('mfu', 'fp32 matmul peak (2048^2)'):.0f} GFLOP/s matmul peak in channels_last, "
            f"{report.value('mfu', 'training step MFU, default layout'):.2f} in the "
            f"default layout; convolutions alone "
            f"{report.value('mfu', 'convolutions alone (fwd + bwd), achieved / matmul peak'):.2f}; ceiling "
            f"{report.value('mfu', 'MFU ceiling (convolutions at their replayed rate, other FLOPs at peak)'):.2f}")
    if "compile" in parts:  # pcl_ray/bench_mfu.py
        from .bench_mfu import bench_mfu

        bench_mfu(cfg, ds, method, device, prototypes, report, steps, _alternating, _batch, compile_only=True)
        log(f"[pcl-ray] torch.compile: {report.value('compile', 'speed-up torch.compile / eager (channels_last)'):.2f}x "
            f"the eager step after "
            f"{report.value('compile', 'torch.compile warm-up (first two steps, less two eager steps)'):.0f}s of warm-up")
    if "epoch" in parts:  # pcl_ray/bench_epoch.py
        from .bench_epoch import bench_epoch

        bench_epoch(cfg, ds, device, report, steps, _alternating, _batch)
        ratio = report.value("epoch", "PCL epoch / MoCo epoch (stream, warm)")
        if ratio is not None:
            log(f"[pcl-ray] PCL epoch / MoCo epoch: eval_pass {report.value('epoch', 'PCL epoch / MoCo epoch (eval_pass, cold)'):.2f}, "
                f"stream {report.value('epoch', 'PCL epoch / MoCo epoch (stream, cold)'):.2f}, "
                f"stream + warm start {ratio:.2f}")
    if "loop" in parts:  # pcl_ray/bench_loop.py: Ray Train runs against the single-process loop
        from .bench_loop import bench_loop

        bench_loop(cfg, report, log=log, **(loop or {}))
        ratio, ray_first, plain_first, startup = (report.value("loop", what) for what in (
            "Ray / single-process throughput", "Ray Train loop, first-epoch overhead (epoch 1 - mean of later)",
            "single-process loop, first-epoch overhead (epoch 1 - mean of later)",
            "Ray run start-up (train() call to epoch 1's first step)"))
        log(f"[pcl-ray] loop: Ray Train {ratio:.2f}x the single-process throughput; first-epoch overhead Ray "
            f"{ray_first:.1f}s, single-process {plain_first:.1f}s; Ray run start-up {startup:.1f}s")
    if "pcl-moco" in parts:  # pcl_ray/bench_pcl_moco.py: trained PCL epochs against trained MoCo epochs
        from .bench_loop import DEFAULT_EPOCHS, DEFAULT_IMAGES, DEFAULT_REPEATS
        from .bench_pcl_moco import MODES, bench_pcl_moco

        sizes = {"images": DEFAULT_IMAGES, "epochs": DEFAULT_EPOCHS, "repeats": DEFAULT_REPEATS, **(loop or {})}
        bench_pcl_moco(cfg, report, log=log, **sizes)
        log("[pcl-ray] pcl-moco: PCL epoch / MoCo epoch, trained: " + ", ".join(
            f"{label} {report.value('pcl-moco', f'PCL, {label}: PCL epoch / MoCo epoch'):.3f}" for label, _ in MODES))
    epoch_s = report.value("mstep", f"M-step epoch estimate ({len(ds)} images)")
    estep_s = report.value("estep", "E-step total (embed + every k)")
    if epoch_s and estep_s is not None:
        report.add("estep", "E-step time / M-step epoch time", estep_s / epoch_s, "ratio")
    return report


def write_files(report: BenchReport, out_dir: Path) -> list[Path]:
    """``bench.json`` + ``bench.md`` in ``out_dir``, each written whole or not at all."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for name, text in (("bench.json", json.dumps({"label": report.label, "info": report.info,
                                                  "rows": [asdict(r) for r in report.rows]}, indent=2)),
                       ("bench.md", report.markdown())):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out_dir / name)
        files.append(out_dir / name)
    return files


def save_report(report: BenchReport, cfg: ExperimentConfig, *, out: Path | None, storage, name: str,
                mlflow: bool = True) -> list[str]:
    """Write the report where the user asked; returns the files written (paths or URIs).

    ``out``: a local folder (``--out``). Otherwise ``<storage>/<name>/``: directly when the storage is a
    folder of this machine (or a shared mount), else made in a local temporary folder and uploaded whole.
    """
    import tempfile

    def write(folder: Path) -> list[Path]:
        return write_report(report, cfg, folder, name=name) if mlflow else write_files(report, folder)

    if out is not None:
        return [str(f) for f in write(out)]
    if storage.on_local_disk:
        return [str(f) for f in write(storage.local_path(name))]
    with tempfile.TemporaryDirectory(prefix="pcl-ray-bench-") as tmp:
        files = write(Path(tmp) / name)
        for f in files:
            storage.upload(f, f"{name}/{f.name}")
        return [storage.uri_of(name, f.name) for f in files]


def write_report(report: BenchReport, cfg: ExperimentConfig, out_dir: Path, name: str | None = None) -> list[Path]:
    """The files of :func:`write_files`, and one MLflow run (``name``, default the folder's name) with the
    numbers as metrics and the files."""
    from .tracking import RunLogger, resolve_uri

    files = write_files(report, out_dir)
    logger = RunLogger.start(resolve_uri(cfg.tracking.uri), cfg.tracking.experiment, name or out_dir.name,
                             tags={"pcl_ray.kind": "bench", "pcl_ray.method": cfg.method.name})
    logger.log_params({**cfg.flat(), **{f"bench.{k}": v for k, v in report.info.items()}})
    logger.log_metrics({f"bench/{r.part}/{_slug(r.what)}": r.value for r in report.rows})
    for f in files:
        logger.log_artifact(f)
    logger.end("FINISHED")
    return files


def _slug(text: str) -> str:
    keep = "".join(c if c.isalnum() else "_" for c in text.lower())
    return "_".join(filter(None, keep.split("_")))[:80]
