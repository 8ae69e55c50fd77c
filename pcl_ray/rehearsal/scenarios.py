"""What the rehearsal runs on its cluster, and what each scenario must show to pass.

Every scenario is one or more ``ray job submit`` jobs of ``run.py`` from the head, reading and writing
only through the bucket (``ray.storage_path=s3://...``) and the tracking server (``tracking.uri=http://...``).
After each, the listening sockets of every rehearsal process are audited (:meth:`Cluster.audit`).

====  ==================  ==========================================================================
key   scenario            expected
====  ==================  ==========================================================================
train PCL train run       SUCCEEDED; checkpoints and final_state.pt in the bucket; the MLflow run
                          FINISHED with one loss/total per epoch; its artifacts in the bucket
tune  two-trial sweep     SUCCEEDED; trials.csv + best_config.yaml in the bucket; a parent run and
                          two child runs on the tracking server
eval  eval of train's run SUCCEEDED; eval/* metrics on the run's MLflow run; exports in the bucket
rank0 kill rank 0's node  the run resumes from the bucket's checkpoint, ends with every epoch, and
      mid-epoch           its per-epoch losses equal the uninterrupted run's
actor kill the cluster    the actor restarts on another node, the run ends with every epoch (no hang)
      actor's node
local local storage_path  refused before training: exit 2, the error names ray.storage_path,
                          nothing in the bucket, no MLflow run
sqlite sqlite tracking    refused before training: exit 2, the error names tracking.uri
elastic shrink under an   ray.num_workers=[1,2]: after a worker node is lost the run continues with
      elastic run         one worker and ends with every epoch
====  ==================  ==========================================================================

``--short`` (CI) runs train, local and rank0 with fewer epochs.
"""

from __future__ import annotations

import re
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

from .cluster import WORKER_LINE, Audit, Cluster, JobResult

PIPELINE = "pipelines/digits_tiny.yaml"
SWEEP_PIPELINE = "pipelines/tune_digits_smoke.yaml"
ACTOR_NAMESPACE = "pcl_ray"  # pcl_ray/distributed/cluster_actor.py
RANK0_STEP = re.compile(r"\[pcl-ray\] epoch (\d+)/(\d+) step (\d+)/(\d+)")  # printed by rank 0 only
RESUMED = re.compile(r"resumed from checkpoint after epoch (\d+)")
LOSS_TOLERANCE = 1e-4  # per-epoch loss of a resumed run against the uninterrupted one (same seeds, same config)

SHORT = ("train", "local", "rank0")
FULL = ("train", "tune", "eval", "rank0", "actor", "local", "sqlite", "elastic")


@dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclass
class Outcome:
    key: str
    title: str
    expected: str
    checks: list[Check] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    jobs: list[JobResult] = field(default_factory=list)
    audit: Audit | None = None
    error: str | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.ok for c in self.checks)

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(what, bool(ok), detail))
        return bool(ok)


class Rehearsal:
    """Runs the scenarios on one :class:`Cluster`; results accumulate in :attr:`outcomes`."""

    def __init__(self, cluster: Cluster, short: bool = False, log: Callable[[str], None] = print):
        self.cluster, self.short, self.log = cluster, short, log
        self.tag = cluster.net.tag
        self.experiment = f"rehearsal-{self.tag}"
        # digits epochs last about a second on an idle machine: enough of them that a fault triggered at
        # epoch 2 lands before the end of the run (the job log reaches the rehearsal a second or two late)
        self.epochs = 4 if short else 6
        self.job_timeout = 480 if short else 900
        self.outcomes: list[Outcome] = []
        self.runs: dict[str, str] = {}        # scenario key -> run name
        self.losses: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ helpers
    @property
    def storage(self) -> str:
        return self.cluster.services.storage_uri

    @property
    def tracking(self) -> str:
        return self.cluster.services.tracking_uri

    def routing(self, storage: bool = True, tracking: bool = True) -> list[str]:
        out = ["--set", f"tracking.experiment={self.experiment}"]
        if storage:
            out += ["--set", f"ray.storage_path={self.storage}"]
        if tracking:
            out += ["--set", f"tracking.uri={self.tracking}"]
        return out

    def train_cmd(self, key: str, *extra: str, storage: bool = True, tracking: bool = True) -> list[str]:
        name = f"rh-{self.tag}-{key}"
        self.runs[key] = name
        return ["python", "run.py", "train", PIPELINE, *self.routing(storage, tracking),
                "--set", f"ray.run_name={name}", "--set", f"train.epochs={self.epochs}",
                "--set", "train.log_every=2", *extra]

    def run_keys(self, key: str) -> list[str]:
        return [k["key"] for k in self.cluster.bucket_keys(f"runs/{self.runs[key]}/")]

    def mlflow_run(self, key: str) -> dict | None:
        name = self.runs[key]
        runs = [r for r in self.cluster.mlflow_runs(self.experiment) if r["tags"].get("pcl_ray.run_name") == name
                or r["name"] == name]
        return runs[0] if runs else None

    def check_job(self, out: Outcome, job: JobResult, expect: str = "SUCCEEDED") -> bool:
        out.jobs.append(job)
        detail = f"{job.status} in {job.seconds:.0f}s, exit code {job.exit_code}"
        if job.status != expect:
            detail += f": {job.message.strip()[:300]}\n--- job log tail ---\n{job.tail(30)}"
        return out.check(f"job {expect.lower()}", job.status == expect, detail)

    def check_epochs(self, out: Outcome, key: str) -> list[float]:
        run = self.mlflow_run(key)
        if not out.check("MLflow run on the tracking server", run is not None, self.runs[key]):
            return []
        steps = [s for s, _ in run["history"]]
        out.check("MLflow run FINISHED", run["status"] == "FINISHED", run["status"])
        out.check(f"loss/total logged for epochs 1..{self.epochs}", steps == list(range(1, self.epochs + 1)),
                  f"steps {steps}")
        losses = [v for _, v in run["history"]]
        out.numbers["losses"] = [round(v, 5) for v in losses]
        out.numbers["mlflow_run_id"] = run["run_id"]
        return losses

    def wait_rank0(self, job, min_epoch: int, timeout_s: float) -> re.Match | None:
        """The first rank-0 progress line of an epoch >= ``min_epoch`` (Ray prefixes it with pid and node address)."""
        def accept(m: re.Match) -> bool:
            step = RANK0_STEP.search(m.group("text"))
            return step is not None and int(step.group(1)) >= min_epoch
        return job.wait_for(WORKER_LINE, timeout_s, accept)

    def audit(self, out: Outcome) -> None:
        out.audit = self.cluster.audit()
        out.check("every process in the rehearsal's namespaces; no listener outside them", out.audit.ok,
                  out.audit.summary())

    # ------------------------------------------------------------------ running
    def run(self, keys: tuple[str, ...] | None = None) -> list[Outcome]:
        """Run ``keys`` (default: the short or full list) in order; returns their outcomes."""
        done: list[Outcome] = []
        for key in keys or (SHORT if self.short else FULL):
            fn = getattr(self, f"scenario_{key}")
            title, expected = fn.__doc__.split("\n", 1)[0], " ".join(fn.__doc__.split("\n", 1)[1].split())
            out = Outcome(key, title.strip(), expected)
            self.log(f"\n[rehearsal] ===== {key}: {out.title}")
            t0 = time.monotonic()
            try:
                self.cluster.ensure_all_nodes()  # a node killed by an earlier fault re-joins first
                fn(out)
                self.audit(out)
            except Exception as exc:
                out.error = f"{type(exc).__name__}: {exc}"
                self.log(traceback.format_exc())
            out.seconds = time.monotonic() - t0
            self.outcomes.append(out)
            done.append(out)
            self.log(format_outcome(out))
        return done

    # ------------------------------------------------------------------ scenarios
    def scenario_train(self, out: Outcome) -> None:
        """PCL train run on digits, storage in the bucket, tracking on the server
        SUCCEEDED; checkpoints and final_state.pt in the bucket; the MLflow run FINISHED with loss/total for
        every epoch and its artifacts in the bucket."""
        job = self.cluster.run_job(self.train_cmd("train"), self.job_timeout, name="train")
        self.check_job(out, job)
        keys = self.run_keys("train")
        out.numbers["bucket_objects"] = len(keys)
        out.check("checkpoints in the bucket", any("/checkpoint_" in k for k in keys),
                  f"{sum('/checkpoint_' in k for k in keys)} checkpoint objects under runs/{self.runs['train']}/")
        out.check("final_state.pt in the bucket", any(k.endswith("final_state.pt") for k in keys),
                  ", ".join(k.split("/", 2)[-1] for k in keys if "/checkpoint_" not in k and not k.endswith("/"))[:300])
        self.losses["train"] = self.check_epochs(out, "train")
        run = self.mlflow_run("train")
        if run is not None:
            arts = [k["key"] for k in self.cluster.bucket_keys("mlflow/") if run["run_id"] in k["key"]]
            out.check("MLflow artifacts in the bucket", bool(arts),
                      f"{len(arts)} objects under s3://{self.cluster.services.bucket}/mlflow/ (artifact_uri "
                      f"{run['artifact_uri']})")
            evals = {k: round(v, 4) for k, v in run["metrics"].items() if k.startswith("eval/") and k.endswith("knn_acc")}
            out.numbers["eval"] = evals
        out.numbers["job_s"] = round(job.seconds)

    def scenario_tune(self, out: Outcome) -> None:
        """Two-trial tune sweep through the bucket and the tracking server
        SUCCEEDED; trials.csv and best_config.yaml under the sweep's folder in the bucket; a parent MLflow run
        and one child run per trial."""
        sweep = f"rh-{self.tag}-sweep"
        job = self.cluster.run_job(["python", "run.py", "tune", SWEEP_PIPELINE, *self.routing(), "--name", sweep],
                                   self.job_timeout, name="tune")
        self.check_job(out, job)
        keys = [k["key"] for k in self.cluster.bucket_keys(f"runs/{sweep}/")]
        for f in ("trials.csv", "best_config.yaml"):
            out.check(f"{f} in the bucket", any(k.endswith(f"/{f}") for k in keys), f"{len(keys)} objects under runs/{sweep}/")
        runs = self.cluster.mlflow_runs(self.experiment, metric="online/knn_acc")
        parents = [r for r in runs if r["tags"].get("pcl_ray.sweep") == sweep and r["tags"].get("pcl_ray.kind") == "sweep"]
        if out.check("sweep parent run", len(parents) == 1, f"{len(parents)} parent runs tagged {sweep}"):
            kids = [r for r in runs if r["tags"].get("mlflow.parentRunId") == parents[0]["run_id"]]
            out.check("two trial child runs", len(kids) == 2,
                      ", ".join(f"{r['name']} {r['status']} {r['tags'].get('pcl_ray.trial_status')}" for r in kids))
            statuses = [r["tags"].get("pcl_ray.trial_status") for r in kids]
            out.check("every trial finished or was stopped by the scheduler",
                      bool(statuses) and all(s in ("finished", "early_stopped") for s in statuses), f"{statuses}")
            out.numbers["trials"] = {r["name"]: {"status": r["tags"].get("pcl_ray.trial_status"),
                                                 "online_knn": [round(v, 4) for _, v in r["history"]]} for r in kids}
        out.numbers["job_s"] = round(job.seconds)

    def scenario_eval(self, out: Outcome) -> None:
        """Eval of the train scenario's run, read from the bucket
        SUCCEEDED; eval/<suite>/* metrics on the run's MLflow run; the exports (embeddings, backbone) in the
        bucket."""
        if "train" not in self.runs:
            self.train_cmd("train")  # the name only: a run left by an earlier scenario list
        name = self.runs["train"]
        suites = "knn,cluster,export" if self.short else "knn,linear,lowshot,cluster,export"
        job = self.cluster.run_job(["python", "run.py", "eval", name, *self.routing(), "--suite", suites],
                                   self.job_timeout, name="eval")
        self.check_job(out, job)
        run = self.mlflow_run("train")
        evals = {k: round(v, 4) for k, v in (run or {}).get("metrics", {}).items() if k.startswith("eval/knn/")}
        out.check("eval/knn/* metrics on the run's MLflow run", bool(evals), str(evals))
        keys = self.run_keys("train")
        exported = [k for k in keys if "embeddings" in k or k.endswith("backbone.pt")]
        out.check("exports in the bucket", bool(exported), ", ".join(k.split("/", 2)[-1] for k in exported)[:300])
        out.numbers.update(evals)
        out.numbers["job_s"] = round(job.seconds)

    def scenario_rank0(self, out: Outcome) -> None:
        """Kill the worker node hosting Train rank 0 mid-epoch (ray.max_failures=2)
        The run resumes from the bucket's checkpoint and ends with every epoch; its per-epoch losses equal the
        uninterrupted train run's (same seeds and config)."""
        job = self.cluster.submit(self.train_cmd("rank0", "--set", "ray.max_failures=2"), name="rank0")
        m = self.wait_rank0(job, 2, self.job_timeout)
        if not out.check("rank 0 reached epoch 2", m is not None, job.proc.log_tail(1500) if m is None else m.group(0)):
            out.jobs.append(job.wait(60))
            return
        step = RANK0_STEP.search(m.group("text"))
        host = self.cluster.host_of_ip(m.group("ip"))
        by_pid = self.cluster.node_of(pid=int(m.group("pid")))
        out.check("rank 0's node found (log address = its process's namespace)", host is not None and host == by_pid,
                  f"ip {m.group('ip')} -> {host}; pid {m.group('pid')} -> {by_pid}")
        out.numbers.update(killed=host, at_epoch=int(step.group(1)), at_step=f"{step.group(3)}/{step.group(4)}")
        t_kill = time.monotonic()
        self.cluster.kill_node(host)
        result = job.wait(self.job_timeout)
        out.numbers["after_kill_s"] = round(time.monotonic() - t_kill)
        self.check_job(out, result)
        resumed = RESUMED.findall(result.log)
        out.check("resumed from the bucket's checkpoint", bool(resumed), f"after epoch {resumed[-1]}" if resumed else
                  "no 'resumed from checkpoint' line in the job log")
        if resumed:
            out.numbers["interrupted_epoch"] = int(resumed[-1]) + 1
        losses = self.check_epochs(out, "rank0")
        ref = self.losses.get("train")
        if ref and len(ref) == len(losses):
            diff = max(abs(a - b) for a, b in zip(ref, losses))
            out.numbers["max_loss_diff"] = f"{diff:.2e}"
            out.check(f"per-epoch losses equal the uninterrupted run's (|diff| <= {LOSS_TOLERANCE:g})",
                      diff <= LOSS_TOLERANCE, f"uninterrupted {[round(v, 5) for v in ref]}")
        else:
            out.numbers["loss_comparison"] = "skipped (no uninterrupted run of the same config in this rehearsal)"

    def scenario_actor(self, out: Outcome) -> None:
        """Kill the node hosting the cluster actor mid-run
        The actor (pcl-cluster-<run>, namespace pcl_ray) restarts on another node, ranks resubmit their shards,
        the run ends with every epoch (no hang)."""
        # 0.5 CPU for the actor keeps it off the 0-CPU head; 0.5 per Train worker leaves room on one node
        cmd = self.train_cmd("actor", "--set", "ray.max_failures=2", "--set", "ray.actor_cpus=0.5",
                             "--set", "ray.cpus_per_worker=0.5")
        actor = f"pcl-cluster-{self.runs['actor']}"
        job = self.cluster.submit(cmd, name="actor")
        m = self.wait_rank0(job, 2, self.job_timeout)
        where = self.cluster.actor_location(actor, ACTOR_NAMESPACE) if m else None
        if not out.check("actor alive and rank 0 in epoch 2", where is not None and where["host"] not in (None, "head"),
                         f"actor at {where}" if m else job.proc.log_tail(1500)):
            out.jobs.append(job.wait(self.job_timeout))
            return
        rank0_host = self.cluster.host_of_ip(m.group("ip"))
        out.numbers.update(actor_host=where["host"], rank0_host=rank0_host)
        t_kill = time.monotonic()
        self.cluster.kill_node(where["host"])
        moved = None
        deadline = t_kill + 180
        while time.monotonic() < deadline and job.proc.alive():
            now = self.cluster.actor_location(actor, ACTOR_NAMESPACE)
            if now is not None and now["host"] not in (None, where["host"]):
                moved = now
                break
            time.sleep(1.0)
        if out.check("actor restarted on another node", moved is not None,
                     f"now on {moved['host']} (pid {moved['pid']}) after {time.monotonic() - t_kill:.0f}s" if moved
                     else "not seen alive elsewhere within 180 s"):
            out.numbers["restart_s"] = round(time.monotonic() - t_kill)
            out.numbers["actor_host_after"] = moved["host"]
        result = job.wait(self.job_timeout)
        out.numbers["after_kill_s"] = round(time.monotonic() - t_kill)
        self.check_job(out, result)
        out.numbers["train_workers_restarted"] = bool(RESUMED.findall(result.log))
        self.check_epochs(out, "actor")

    def _refused(self, out: Outcome, key: str, cmd: list[str], names: str) -> None:
        job = self.cluster.run_job(cmd, 300, name=key)
        self.check_job(out, job, expect="FAILED")
        out.check("exit code 2", job.exit_code == 2, f"exit code {job.exit_code}")
        errors = [ln for ln in job.log.splitlines() if ln.startswith("error:")]
        out.check(f"one-line error naming {names}", any(names in ln for ln in errors), errors[-1] if errors else
                  job.tail(8))
        out.check("refused within 60 s of submission (upload and runtime env included)", job.seconds < 60,
                  f"{job.seconds:.0f}s")
        out.check("no training started", RANK0_STEP.search(job.log) is None, "")
        out.check("nothing written to the bucket", not self.run_keys(key), f"runs/{self.runs[key]}/")
        out.check("no MLflow run", self.mlflow_run(key) is None, "")

    def scenario_local(self, out: Outcome) -> None:
        """A local ray.storage_path on the multi-node cluster
        Refused before training: exit 2, a one-line error naming ray.storage_path, nothing in the bucket, no
        MLflow run."""
        self._refused(out, "local", self.train_cmd("local", storage=False), "ray.storage_path")

    def scenario_sqlite(self, out: Outcome) -> None:
        """A sqlite tracking.uri on the multi-node cluster
        Refused before training: exit 2, a one-line error naming tracking.uri."""
        cmd = self.train_cmd("sqlite", "--set", "tracking.uri=sqlite:////var/tmp/pcl-node/local.db", tracking=False)
        self._refused(out, "sqlite", cmd, "tracking.uri")

    def scenario_elastic(self, out: Outcome) -> None:
        """Shrink the cluster under an elastic run (ray.num_workers=[1,2])
        After the node of one of its two workers is lost, the run continues with one worker and ends with every
        epoch."""
        # 1.5 CPUs per worker: one worker per node, so the survivor cannot take both
        cmd = self.train_cmd("elastic", "--set", "ray.num_workers=[1,2]", "--set", "ray.cpus_per_worker=1.5",
                             "--set", "ray.max_failures=2")
        job = self.cluster.submit(cmd, name="elastic")
        m = self.wait_rank0(job, 2, self.job_timeout)
        if not out.check("two workers, rank 0 reached epoch 2", m is not None, job.proc.log_tail(1500) if m is None
                         else m.group(0)):
            out.jobs.append(job.wait(60))
            return
        host = self.cluster.host_of_ip(m.group("ip"))
        other = next(w for w in self.cluster.workers if w != host)
        out.numbers.update(killed=other, rank0_host=host)
        self.cluster.kill_node(other)
        result = job.wait(self.job_timeout)
        self.check_job(out, result)
        self.check_epochs(out, "elastic")
        sizes = [int(n) for n in re.findall(r"training worker group of size (\d+)", result.log)]
        out.numbers["worker_group_sizes"] = sizes
        out.check("continued with one worker after the loss", sizes[:1] == [2] and sizes[-1:] == [1], f"{sizes}")


def format_outcome(out: Outcome) -> str:
    lines = [f"[{'PASS' if out.passed else 'FAIL'}] {out.key}: {out.title} ({out.seconds:.0f}s)",
             f"    expected: {out.expected}"]
    for c in out.checks:
        detail = f" — {c.detail}" if c.detail else ""
        lines.append(f"    {'ok ' if c.ok else 'NO '} {c.what}{detail}".replace("\n", "\n        "))
    if out.error:
        lines.append(f"    ERROR {out.error}")
    if out.numbers:
        lines.append("    numbers: " + ", ".join(f"{k}={v}" for k, v in out.numbers.items()))
    return "\n".join(lines)


def format_report(outcomes: list[Outcome], header: str = "") -> str:
    lines = ["", "=" * 78, f"pcl-ray cluster rehearsal {header}".rstrip(), "=" * 78]
    for out in outcomes:
        lines.append(format_outcome(out))
    passed = sum(o.passed for o in outcomes)
    lines.append(f"{passed}/{len(outcomes)} scenarios passed")
    return "\n".join(lines)
