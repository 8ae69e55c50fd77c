"""Command-line interface: ``python run.py [train] [PIPELINE] [--set key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import ConfigError, load_config
from .tracking import PROJECT_DIR

DEFAULT_PIPELINE = PROJECT_DIR / "pipelines" / "fmnist_pcl.yaml"

EPILOG = """examples:
  python run.py                                   # PCL on Fashion-MNIST, local Ray, then evaluation
  python run.py train pipelines/digits_tiny.yaml  # a one-minute smoke run
  python run.py train pipelines/fmnist_pcl.yaml --set train.epochs=3 --set estep.num_clusters=[10,50]
  python run.py train pipelines/fmnist_pcl.yaml --set ray.address=auto   # attach to a running Ray cluster
  python run.py train pipelines/fmnist_pcl.yaml --resume                 # continue the latest run
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run.py",
        description="pcl-ray: Prototypical Contrastive Learning (and MoCo) as an EM workflow on Ray.",
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
    t.add_argument("pipeline", nargs="?", default=str(DEFAULT_PIPELINE),
                   help=f"pipeline YAML (default: {DEFAULT_PIPELINE.relative_to(PROJECT_DIR)})")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable; values are YAML)")
    t.add_argument("--resume", nargs="?", const="__latest__", default=None, metavar="RUN_NAME",
                   help="resume a run from its latest checkpoint (default: the most recent run)")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def _print_results(outcome) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"pcl-ray results: {outcome.run_name} (test split)")
    table.add_column("representation")
    for col in ("kNN acc", "AMI", "NMI", "ARI", "cluster acc"):
        table.add_column(col, justify="right")
    for row, v in outcome.eval.items():
        table.add_row(row, *(f"{v[k]:.4f}" for k in ("knn_acc", "ami", "nmi", "ari", "acc")))
    if outcome.eval:
        console.print(table)
    m = outcome.final_metrics
    if m:
        parts = [f"{k} {m[k]:.3f}" for k in ("loss/total", "acc/instance", "acc/proto", "throughput/img_per_s") if k in m]
        console.print("final epoch: " + ", ".join(parts))
    console.print(f"MLflow run {outcome.mlflow_run_id} ({outcome.tracking_uri})")


def cmd_train(args) -> int:
    from .workflow import latest_run_name, storage_root, train

    cfg = load_config(args.pipeline, args.overrides)
    if args.print_config:
        from .config import dump_config

        print(dump_config(cfg))
        return 0
    run_name = None
    if args.resume:
        run_name = args.resume
        if run_name == "__latest__":
            run_name = latest_run_name(storage_root(cfg))
            if run_name is None:
                raise ConfigError(f"--resume: no earlier run under {storage_root(cfg)}")
    outcome = train(cfg, run_name=run_name)
    _print_results(outcome)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv or argv[0] not in ("train", "-h", "--help"):
        argv = ["train", *argv]  # `python run.py` and `python run.py PIPELINE` mean train
    args = parser.parse_args(argv)
    try:
        if args.verb == "train":
            return cmd_train(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
