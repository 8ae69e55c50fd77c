"""Command-line interface: ``python run.py [train] [PIPELINE] [--set key=value ...]``,
``python run.py eval RUN [--suite ...] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import EVAL_SUITES, ConfigError, load_config
from .signals import sigterm_as_interrupt
from .console import console as make_console
from .paths import pin_home, resolve_pipeline, shipped_pipelines

DEFAULT_PIPELINE = "fmnist_pcl"  # a shipped pipeline (pcl_ray/pipelines/, the clone's pipelines/)
PIPELINE_HELP = ("pipeline: a YAML path, or the name of a shipped one (default: fmnist_pcl; shipped: "
                 f"{', '.join(shipped_pipelines())})")
VERBS = ("train", "eval", "compare", "tune", "bench")

EPILOG = """examples:
  python run.py                                   # PCL on Fashion-MNIST, local Ray, then evaluation
  python run.py train pipelines/digits_tiny.yaml  # a one-minute smoke run
  python run.py train pipelines/fmnist_pcl.yaml --set train.epochs=3 --set estep.num_clusters=[10,50]
  python run.py train pipelines/fmnist_pcl.yaml --set ray.address=auto   # attach to a running Ray cluster
  python run.py train pipelines/fmnist_pcl.yaml --resume                 # continue the latest run
  python run.py eval RUN_NAME_OR_MLFLOW_RUN_ID                          # evaluate a finished run
  python run.py bench pipelines/fmnist_pcl.yaml                          # where an epoch's time goes
"""

EVAL_DESCRIPTION = """\
Evaluate a trained encoder on the labelled test split and log the results to the run's MLflow run.

RUN is one of:
  - a run name under ray.storage_path (--set ray.storage_path=s3://bucket/runs, file:///shared/runs
    or a folder; default runs/; --set ray.storage_endpoint=URL for S3-compatible stores);
  - a checkpoint file (<run>/final_state.pt, <run>/checkpoint_*/state.pt) or a run folder, as a
    local path or an s3://, gs:// or file:// URI;
  - an MLflow run id (the run folder train recorded for it, else its logged config.yaml +
    model/backbone.pt).
A run's final state is tried first, then its checkpoints newest first: a file that does not load
(e.g. half-written when a run died) is skipped with a line saying so.

The config is the one saved with the checkpoint; --set overrides keys of it. Metrics are logged as
eval/<suite>/<metric> to the run's MLflow run when it is known (else to a new run in
tracking.experiment), artifacts under eval/ (and to <run>/eval/ in the run's storage), and printed
as a table. Attached to a Ray cluster (--set ray.address=..., or RAY_ADDRESS as under `ray job
submit`), the evaluation runs as one Ray task with a training worker's resources (a GPU when the
run trained on GPUs), not on the driver's node.

suites:
  knn       weighted kNN accuracy (cosine; eval.knn_k, eval.knn_temperature)
  linear    linear probe: logistic regression on standardized frozen features, L2 penalty
            chosen on a validation split of train (eval.linear_*)
  lowshot   linear SVM on k in eval.lowshot_shots labelled images per class, eval.lowshot_draws
            seeded draws, mean +- std; C chosen on validation images from the rest of train,
            never on the test set (eval.lowshot_*)
  finetune  backbone + linear classifier fine-tuned on 1% and 10% of the labels (eval.finetune_*;
            slow on CPU, not in the default set)
  cluster   k-means (k = number of classes) on test features: AMI, NMI, ARI, Hungarian accuracy
  tsne      t-SNE picture of eval.tsne_points test features coloured by class (tsne.png)
  export    embeddings + labels to Parquet (embeddings.parquet) and the backbone state dict
            (backbone.pt, loadable into plain torchvision / pcl_ray.models.ConvNet)
"""

EVAL_EPILOG = """examples:
  python run.py eval pcl-fashion-mnist-20261123-192110
  python run.py eval runs/pcl-fashion-mnist-20261123-192110/final_state.pt --suite knn,linear,lowshot
  python run.py eval b81ea2b39dd748f3b623db2253d6320c --suite all --set eval.finetune_epochs=2
  python run.py eval RUN --suite lowshot --set eval.lowshot_draws=10 --set eval.feature=head
  python run.py eval RUN --set ray.storage_path=s3://my-bucket/pcl-ray/runs
  python run.py eval s3://my-bucket/pcl-ray/runs/RUN/checkpoint_000003/state.pt --suite knn
"""


def _parser() -> argparse.ArgumentParser:
    command = invoked_as()
    p = argparse.ArgumentParser(
        prog=command,
        description="pcl-ray: Prototypical Contrastive Learning and its family (MoCo v2, SimCLR, SwAV, DeepCluster-v2, SPCL) as an EM workflow on Ray.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    sub = p.add_subparsers(dest="verb", metavar="VERB")
    t = sub.add_parser(
        "train",
        help="train one pipeline (Ray Train workers + cluster actor), evaluate, log to MLflow",
        description="Train one pipeline on Ray: M-step on Ray Train workers, E-step on the cluster actor; "
                    "then evaluate on the test split beside raw-pixel baselines and log everything to MLflow.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    t.add_argument("pipeline", nargs="?", default=DEFAULT_PIPELINE, help=PIPELINE_HELP)
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable; values are YAML)")
    t.add_argument("--resume", nargs="?", const="__latest__", default=None, metavar="RUN_NAME",
                   help="resume a run from its latest checkpoint (default: the latest run of this pipeline)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--register", default=None, metavar="NAME",
                   help="register the trained backbone in the MLflow Model Registry as NAME (a new version each "
                        "run); load it with mlflow.pytorch.load_model('models:/NAME/<version>')")

    from .tune import add_tune_parser

    add_tune_parser(sub)
    c = sub.add_parser(
        "compare",
        help="train several methods under identical conditions, evaluate alike, write a table and a plot",
        description="Train every entry of a compare pipeline's `compare:` section once per seed (same data, "
                    "backbone, budget, batch size, evaluation: checked before anything runs), evaluate each on "
                    "the test split, and write comparison.md + comparison.png (MLflow: one parent run, one "
                    "child run per training run).",
    )
    c.add_argument("pipeline", help="compare pipeline YAML, e.g. pipelines/compare_fmnist_quick.yaml")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every entry (e.g. --set train.epochs=2)")
    c.add_argument("--seeds", type=lambda v: [int(x) for x in v.split(",")], default=None, metavar="S[,S...]",
                   help="seeds to run instead of the pipeline's `compare.seeds`; with --resume, some of the "
                        "recorded seeds, to report a comparison stopped early")
    c.add_argument("--resume", default=None, metavar="NAME",
                   help="continue an interrupted comparison (the NAME it printed, a folder under runs/): finished "
                        "runs are read back, an interrupted one continues from its checkpoint")
    b = sub.add_parser(
        "bench",
        help="measure where a pipeline's training time goes: views, M-step, E-step (side by side)",
        description="Time, in this process and on the pipeline's own data, model and method: batched tensor "
                    "views against the per-image PIL pipeline of the same recipe; training steps with and "
                    "without making views; the E-step (embedding pass, faiss k-means + phi per granularity) "
                    "against one M-step epoch. Prints a table, writes bench.json + bench.md and logs an "
                    "MLflow run.",
    )
    b.add_argument("pipeline", nargs="?", default=DEFAULT_PIPELINE, help=PIPELINE_HELP)
    b.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    b.add_argument("--parts", default="all", metavar="NAMES",
                   help="comma-separated subset of views,mstep,mfu,compile,estep,epoch,loop,pcl-moco (all: every "
                        "one but compile, loop and pcl-moco), or estep-scale alone (the E-step at N up to 1.28M on "
                        "synthetic embeddings, minutes); compile times torch.compile and its warm-up, loop trains "
                        "short Ray Train runs against the single-process loop, pcl-moco trains PCL in each E-step "
                        "mode against MoCo, epochs interleaved (minutes each)")
    b.add_argument("--loop-images", type=int, default=4096, metavar="N",
                   help="loop, pcl-moco: training images per run (default 4096)")
    b.add_argument("--loop-epochs", type=int, default=3, metavar="E",
                   help="loop, pcl-moco: epochs per run (default 3; loop needs at least 2, pcl-moco 3)")
    b.add_argument("--loop-repeats", type=int, default=2, metavar="R",
                   help="loop, pcl-moco: alternated repetitions of each candidate (default 2)")
    b.add_argument("--steps", type=int, default=10, help="timed repetitions per measurement (default 10)")
    b.add_argument("--out", default=None, metavar="DIR", help="output folder (default: <ray.storage_path>/bench-<stamp>)")
    b.add_argument("--no-mlflow", action="store_true", help="write the files only; log nothing to MLflow")
    e = sub.add_parser(
        "eval",
        help="evaluate a trained run or checkpoint (kNN, linear probe, low-shot SVM, clustering, ...)",
        description=EVAL_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EVAL_EPILOG,
    )
    e.add_argument("run", metavar="RUN",
                   help="run name under ray.storage_path (default runs/), checkpoint file or run folder (a path or "
                        "an s3://, gs:// or file:// URI), or MLflow run id")
    e.add_argument("--suite", default=None, metavar="NAMES",
                   help=f"comma-separated suites from {{{','.join(EVAL_SUITES)}}} or 'all' "
                        "(default: eval.suites, i.e. all but finetune)")
    e.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the run's saved config, e.g. --set eval.lowshot_draws=2 (repeatable)")
    e.add_argument("--out", default=None, metavar="DIR",
                   help="folder or storage URI for the artifacts (default: <run>/eval/ in the run's storage)")
    e.add_argument("--no-mlflow", action="store_true", help="print the results only; log nothing to MLflow")
    for parser in (p, *sub.choices.values()):  # examples name the command as it was typed
        for attr in ("epilog", "description"):
            text = getattr(parser, attr)
            if text and command != "python run.py":
                setattr(parser, attr, text.replace("python run.py", command))
    return p


def invoked_as() -> str:
    """How the user started pcl-ray, for help texts: ``pcl-ray``, ``python -m pcl_ray`` or ``python run.py``."""
    name = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    if name == "__main__.py":
        return "python -m pcl_ray"
    if name.startswith("pcl-ray"):
        return "pcl-ray"
    return "python run.py"


def _print_results(outcome) -> None:
    from rich.table import Table

    console = make_console()
    table = Table(title=f"pcl-ray results: {outcome.run_name} (test split)")
    table.add_column("representation")
    from .evaluation.report import extra_knn_columns

    extra = extra_knn_columns({k for v in outcome.eval.values() for k in v})
    cols = [("knn_acc", "kNN acc"), *extra,
            ("ami", "AMI"), ("nmi", "NMI"), ("ari", "ARI"), ("acc", "cluster acc")]
    shots = sorted({int(k[5:]) for v in outcome.eval.values() for k in v if k.startswith("svm_k")})
    if shots:  # the fewest and the most labels per class
        cols += [(f"svm_k{s}", f"{s}-shot SVM") for s in sorted({shots[0], shots[-1]})]
    for _, title in cols:
        table.add_column(title, justify="right")
    for row, v in outcome.eval.items():
        table.add_row(row, *(f"{v[k]:.4f}" if k in v else "–" for k, _ in cols))
    if outcome.eval:
        console.print(table)
    m = outcome.final_metrics
    if m:
        parts = [f"{k} {m[k]:.3f}" for k in ("loss/total", "acc/instance", "acc/proto", "throughput/img_per_s") if k in m]
        console.print("final epoch: " + ", ".join(parts))
    console.print(f"MLflow run {outcome.mlflow_run_id} ({outcome.tracking_uri})")
    for name, uri in getattr(outcome, "models", {}).items():
        console.print(f"MLflow model {name}: {uri}")


def pipeline_label(pipeline: str | None) -> str | None:
    """How the run registry names a pipeline: its file name without the folder (the same on every node)."""
    return Path(pipeline).stem if pipeline else None


def cmd_train(args) -> int:
    from .registry import check_name, latest_run_name, run_exists, run_storage
    from .workflow import train

    cfg = load_config(args.pipeline, args.overrides)
    if args.print_config:
        from .config import dump_config

        print(dump_config(cfg))
        return 0
    run_name = None
    label = pipeline_label(args.pipeline)
    if args.resume:
        storage = run_storage(cfg)
        if args.resume == "__latest__":
            run_name = latest_run_name(storage, label)
            if run_name is None:
                raise ConfigError(f"--resume: no earlier run of pipeline {label!r} under {storage.uri}")
        else:
            run_name = check_name(args.resume, "--resume")
            if not run_exists(storage, run_name):
                raise ConfigError(f"--resume: no run named {run_name!r} under {storage.uri} "
                                  "(without a name, --resume continues the latest run of this pipeline)")
        print(f"[pcl-ray] resuming run {run_name}")
    if args.register is not None and not args.register.strip():
        raise ConfigError("--register: expected a model name, got an empty string")
    outcome = train(cfg, run_name=run_name, pipeline=label, register=args.register,
                    tags={"pcl_ray.pipeline_file": str(resolve_pipeline(args.pipeline).resolve())})
    _print_results(outcome)
    return 0


def cmd_compare(args) -> int:
    from .compare import run_compare

    md, out = run_compare(args.pipeline, args.overrides, seeds=args.seeds, resume=args.resume)
    print(md)
    print("written: " + ", ".join(out.files))
    return 0


def _format_metrics(metrics: dict[str, float]) -> list[tuple[str, str, str]]:
    """Table rows ``(suite, metric, value)``; ``<name>_mean`` and ``<name>_std`` share one row."""
    rows = []
    for key, value in metrics.items():
        _, suite, name = key.split("/", 2)
        if name.endswith("_std") and f"eval/{suite}/{name[:-4]}_mean" in metrics:
            continue
        if name.endswith("_mean") and (std := metrics.get(f"eval/{suite}/{name[:-5]}_std")) is not None:
            rows.append((suite, name[:-5], f"{value:.4f} ± {std:.4f}"))
        elif name == "weight_decay":
            rows.append((suite, name, f"{value:g}"))
        else:
            rows.append((suite, name, f"{value:.4f}"))
    return rows


def _print_eval(outcome) -> None:
    from rich.table import Table

    console = make_console()
    cfg = outcome.cfg
    epoch = f", epoch {outcome.target.epoch + 1}" if outcome.target.epoch is not None else ""
    console.print(f"pcl-ray eval of {outcome.target.label}: {cfg.method.name} on {cfg.data.name}{epoch}, "
                  f"{cfg.eval.feature} features, scored on the test split")
    table = Table()
    table.add_column("suite")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for row in _format_metrics(outcome.metrics):
        table.add_row(*row)
    console.print(table)
    if outcome.artifacts:
        console.print(f"artifacts in {outcome.out_dir}: {', '.join(outcome.artifacts)}")
    if outcome.mlflow_run_id:
        console.print(f"logged to MLflow run {outcome.mlflow_run_id} ({outcome.tracking_uri})")
    console.print(f"suites {', '.join(outcome.suites)} took {outcome.seconds:.1f}s")


def cmd_eval(args) -> int:
    from .eval_workflow import EvalTargetError, evaluate_target, resolve_target
    from .evaluation.suite import parse_suites

    try:
        suites = parse_suites(args.suite) if args.suite is not None else None  # fail fast on a typo
        target = resolve_target(args.run, args.overrides)
    except (EvalTargetError, ValueError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print(f"[pcl-ray] evaluating {target.checkpoint or target.label}"
          + (f" (MLflow run {target.mlflow_run_id})" if target.mlflow_run_id else "")
          + (f", after skipping {len(target.skipped)} unreadable state file(s)" if target.skipped else ""))
    outcome = evaluate_target(target, overrides=args.overrides, suites=suites, out_dir=args.out,
                              mlflow=not args.no_mlflow)
    _print_eval(outcome)
    return 0


def cmd_bench(args) -> int:
    import time

    from rich.table import Table

    from .bench import parse_parts, run_bench, save_report
    from .registry import run_storage

    parts = parse_parts(args.parts)
    cfg = load_config(args.pipeline, args.overrides)
    storage = None
    if not args.out:  # the storage answers before the bench spends anything
        storage = run_storage(cfg)
        storage.check_writable()
    report = run_bench(cfg, parts, steps=args.steps,
                       loop={"images": args.loop_images, "epochs": args.loop_epochs, "repeats": args.loop_repeats})
    table = Table(title=f"pcl-ray bench: {report.label}")
    for col, justify in (("part", "left"), ("what", "left"), ("value", "right"), ("unit", "left")):
        table.add_column(col, justify=justify)
    for r in report.rows:
        table.add_row(r.part, r.what, f"{r.value:.4g}", r.unit)
    console = make_console()
    console.print(table)
    files = save_report(report, cfg, out=Path(args.out) if args.out else None, storage=storage,
                        name=f"bench-{time.strftime('%Y%m%d-%H%M%S')}", mlflow=not args.no_mlflow)
    console.print("written: " + ", ".join(files))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] not in (*VERBS, "-h", "--help"):
        argv = ["train", *argv]  # `python run.py` and `python run.py PIPELINE` mean train
    args = parser.parse_args(argv)
    pin_home()  # runs/ and mlruns/ under $PCL_RAY_HOME or here, for this process and the Ray it starts
    sigterm_as_interrupt()
    try:
        if args.verb == "train":
            return cmd_train(args)
        if args.verb == "eval":
            return cmd_eval(args)
        if args.verb == "compare":
            return cmd_compare(args)
        if args.verb == "bench":
            return cmd_bench(args)
        if args.verb == "tune":
            from .tune import cmd_tune

            return cmd_tune(args)
    except KeyboardInterrupt:
        print("interrupted (the MLflow run is marked KILLED; checkpoints are kept)", file=sys.stderr)
        return 130
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        cause = config_error_in(exc)  # e.g. a corrupt image met by a Ray Train worker mid-epoch
        if cause is None:
            raise
        print(f"error: {one_line(cause)}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2


def one_line(exc: BaseException) -> str:
    """An error's message on one line: ``invalid config (src):`` + indented items become ``...: a; b``."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    head, rest = lines[0], lines[1:]
    if not rest:
        return head
    return f"{head} {'; '.join(rest)}" if head.endswith(":") else "; ".join(lines)


def config_error_in(exc: BaseException, depth: int = 8) -> BaseException | None:
    """The first ConfigError inside ``exc``: its cause/context chain and what Ray wraps (the worker
    failures of a Train run, a controller failure, a task's cause); None when there is none."""
    todo, seen = [exc], set()
    while todo and depth > 0:
        depth -= 1
        nxt = []
        for e in todo:
            if e is None or id(e) in seen:
                continue
            seen.add(id(e))
            if isinstance(e, ConfigError):
                return e
            nxt += [e.__cause__, e.__context__, getattr(e, "controller_failure", None), getattr(e, "cause", None)]
            failures = getattr(e, "worker_failures", None)
            if isinstance(failures, dict):
                nxt += list(failures.values())
        todo = [e for e in nxt if isinstance(e, BaseException)]
    return None


if __name__ == "__main__":
    raise SystemExit(main())
