"""The ``tune`` verb: ``python run.py tune PIPELINE [--set KEY=VALUE ...] [--resume [SWEEP]]``.

Sweeps and ablations with Ray Tune around the whole training workflow (see :mod:`pcl_ray.sweep`):
each trial is one ``run.py train`` run (Ray Train workers + its own cluster actor) with the trial's
values of the pipeline's ``tune.search_space``; ASHA (default), FIFO or PBT decide which trials go on.
MLflow: one parent run per sweep, one child run per trial. The end prints the trials sorted by the
metric and writes ``trials.csv``, ``metric_vs_params.png``, ``metric_curves.png`` and
``best_config.yaml`` (a pipeline ``run.py train`` accepts) under ``<storage>/<sweep>/`` (``ray.storage_path``:
a local folder, ``file://`` or an object store such as ``s3://bucket/prefix``).
"""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError

TUNE_DESCRIPTION = (
    "Run a hyperparameter sweep or ablation: every trial is a full training run (Ray Train workers + "
    "its own cluster actor) with values drawn from the pipeline's `tune.search_space`; ASHA stops weak "
    "trials early (or FIFO / PBT). One MLflow parent run per sweep, one child run per trial. At the "
    "end: the trials sorted by the metric (printed and saved as CSV), a plot of the metric against each "
    "swept key, and the best config as a pipeline file for `run.py train`."
)

TUNE_EPILOG = """the pipeline's tune: section:
  tune:
    search_space:                          # dotted config keys
      method.proto_weight: {grid: [0.0, 0.5, 1.0]}
      train.lr: {loguniform: [0.01, 0.3]}
      estep.num_clusters: {choice: [[10], [10, 50, 200]]}
      train.warmup_epochs: {randint: [0, 4]}        # high exclusive
      method.temperature: {uniform: [0.1, 0.3]}
    num_samples: 1                         # repeats of the grid; random keys drawn anew each time
    metric: online/knn_acc                 # kNN accuracy on held TRAIN images, every epoch
    mode: max
    scheduler: asha                        # {name: asha, grace_period: 1, reduction_factor: 2} | fifo | pbt
    max_concurrent_trials: 1               # default: as many as the CPUs hold
    trial_resources: {num_workers: 1, cpus_per_worker: 1, actor_cpus: 0}

examples:
  python run.py tune pipelines/tune_digits_smoke.yaml                 # 2 trials on digits, about a minute
  python run.py tune pipelines/ablate_granularity.yaml --dry-run      # check the space, print the plan
  python run.py tune pipelines/ablate_warmup.yaml --set tune.max_concurrent_trials=4 --set ray.address=auto
  python run.py tune pipelines/ablate_granularity.yaml --resume       # continue the latest sweep of it
  python run.py train runs/<sweep>/best_config.yaml                   # train the winner
  python run.py tune pipelines/tune_digits_smoke.yaml --set ray.storage_path=s3://BUCKET/sweeps  # outputs in S3
"""


def add_tune_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``tune`` verb on an ``argparse`` sub-parser collection."""
    t = subparsers.add_parser(
        "tune",
        help="sweep a pipeline's tune.search_space with Ray Tune (ASHA/FIFO/PBT); MLflow parent + child runs",
        description=TUNE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TUNE_EPILOG,
    )
    t.add_argument("pipeline", help="pipeline YAML with a `tune:` section (e.g. pipelines/tune_digits_smoke.yaml)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, tune.* keys included, e.g. --set train.epochs=3 "
                        "--set tune.num_samples=2 (repeatable; values are YAML)")
    t.add_argument("--resume", nargs="?", const="__latest__", default=None, metavar="SWEEP",
                   help="continue an interrupted sweep where it stopped (default: the latest sweep of this "
                        "pipeline); finished trials are not run again")
    t.add_argument("--name", default=None, metavar="SWEEP",
                   help="name of a new sweep (default: <tune.name or pipeline stem>-<timestamp>)")
    t.add_argument("--dry-run", action="store_true",
                   help="validate the pipeline and its search space, print the plan, and exit")
    return t


def _print_outcome(outcome) -> None:
    from .sweep.report import print_table
    from .tracking import redact

    title = f"sweep {outcome.name}: {len(outcome.rows)} trials by {outcome.spec.tune.metric}"
    print_table(outcome.rows, outcome.spec, title)
    if outcome.interrupted:
        print(f"[pcl-ray] sweep interrupted: continue with `python run.py tune {outcome.spec.pipeline} "
              f"--resume {outcome.name}` (same --set options)")
        return
    best = outcome.best
    if best is not None:
        print(f"best: trial {best.trial_id} ({outcome.spec.tune.metric} = {best.metric:.4f}), "
              f"MLflow run {best.mlflow_run_id}")
    print(f"table: {outcome.csv}")
    for p in outcome.plots:
        print(f"plot:  {p}")
    if outcome.best_config:
        how = ("download it, then python run.py train best_config.yaml" if "://" in outcome.best_config
               else f"python run.py train {outcome.best_config}")
        print(f"best config: {outcome.best_config}  ({how})")
    print(f"MLflow parent run {outcome.parent_run_id} ({redact(outcome.tracking_uri)})")


def cmd_tune(args) -> int:
    """Run the ``tune`` verb. Raises :class:`ConfigError` (exit 2 in the CLI) on an invalid pipeline."""
    from .sweep import load_sweep
    from .sweep.runner import describe, run_sweep

    if args.resume and args.name:
        raise ConfigError("--resume and --name: give the sweep to resume as --resume SWEEP")
    from .registry import check_name

    if args.name is not None:
        check_name(args.name, "--name")  # names folders in the storage: checked before anything loads
    if args.resume not in (None, "__latest__"):
        check_name(args.resume, "--resume")
    spec = load_sweep(args.pipeline, args.overrides)
    if args.dry_run:
        print(describe(spec))
        print("search space OK")
        return 0
    outcome = run_sweep(spec, name=args.name, resume=args.resume)
    _print_outcome(outcome)
    return 130 if outcome.interrupted else 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (``python -m pcl_ray.tune ...``), the same as ``python run.py tune ...``."""
    parser = argparse.ArgumentParser(prog="python -m pcl_ray.tune")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    add_tune_parser(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "tune":
        argv = ["tune", *argv]
    args = parser.parse_args(argv)
    try:
        return cmd_tune(args)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
