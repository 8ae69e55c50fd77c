"""``python -m pcl_ray.rehearsal [--short] [--keep] [--scenarios a,b] [--cleanup]`` (``make rehearsal``).

Brings up the rehearsal cluster (head + two worker hosts in network namespaces, S3 server and MLflow
server in the head), runs the scenarios of :mod:`pcl_ray.rehearsal.scenarios`, prints a report with
PASS/FAIL and the numbers of each, and tears everything down, also on failure, Ctrl-C or SIGTERM.
Exit code: 0 all scenarios passed, 1 some failed, 2 the rehearsal cannot run here.
"""

from __future__ import annotations

import argparse
import atexit
import signal
import sys
import time

from .netns import RehearsalError, cleanup_stale, unavailable_reason
from .scenarios import FULL, SHORT, Rehearsal, format_report


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pcl_ray.rehearsal", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--short", action="store_true", help=f"the CI version: {', '.join(SHORT)}")
    p.add_argument("--keep", action="store_true",
                   help="leave the cluster up at the end (remove it later with --cleanup)")
    p.add_argument("--scenarios", default=None, metavar="KEYS", help=f"comma-separated subset of {','.join(FULL)}")
    p.add_argument("--cleanup", action="store_true",
                   help="remove what rehearsals that died or were kept left behind, then exit")
    args = p.parse_args(argv)
    reason = unavailable_reason()
    if reason:
        print(f"error: the rehearsal cannot run here: {reason}", file=sys.stderr)
        return 2
    if args.cleanup:
        removed = cleanup_stale(kept=True)
        print(f"removed {len(removed)} namespaces: {' '.join(removed)}" if removed else "nothing to remove")
        return 0
    keys = None
    if args.scenarios:
        keys = tuple(k.strip() for k in args.scenarios.split(",") if k.strip())
        unknown = [k for k in keys if k not in FULL]
        if unknown:
            print(f"error: --scenarios: unknown {unknown}; expected some of {','.join(FULL)}", file=sys.stderr)
            return 2
    cleanup_stale()

    from .cluster import Cluster

    signal.signal(signal.SIGTERM, _interrupt)
    t0 = time.monotonic()
    cluster = None
    outcomes = []
    try:
        cluster = Cluster.up()
        if args.keep:
            cluster.net.keep()
        else:
            atexit.register(cluster.down)  # also if something below exits without unwinding
        rehearsal = Rehearsal(cluster, short=args.short)
        outcomes = rehearsal.run(keys)
    except KeyboardInterrupt:
        print("[rehearsal] interrupted: tearing down", file=sys.stderr)
        return 130
    except RehearsalError as exc:
        print(f"error: the rehearsal cluster did not come up: {exc}", file=sys.stderr)
        return 1
    finally:
        if outcomes:
            print(format_report(outcomes, f"({'short' if args.short else 'full'}, {time.monotonic() - t0:.0f}s)"))
        if cluster is not None:
            if args.keep:
                head = cluster.net.hosts["head"]
                print(f"[rehearsal] kept: enter the head with `nsenter --target {head.anchor.pid} --net --mount`; "
                      "remove it with `python -m pcl_ray.rehearsal --cleanup`")
            else:
                cluster.down()
                left = cluster.net.leftovers()
                print(f"[rehearsal] torn down (namespaces left: {left['namespaces'] or 'none'}, "
                      f"processes left: {left['processes'] or 'none'}); logs in {cluster.net.log_dir}")
    return 0 if outcomes and all(o.passed for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
