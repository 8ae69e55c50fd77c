"""Small checks that run *inside* a rehearsal host (the machine's own namespace cannot reach the subnet).

``python -m pcl_ray.rehearsal.probe COMMAND JSON_ARGS`` prints one JSON line on stdout. The rehearsal
runs it with ``nsenter`` into the head; each command imports only what it needs.

- ``wait-http {"url", "timeout_s"}``: poll until the URL answers below HTTP 500.
- ``make-bucket {"endpoint", "bucket"}``, ``list-bucket {"endpoint", "bucket", "prefix"}``.
- ``http-json {"url", "method", "body"}``: one request to an HTTP JSON API (Ray's dashboard).
- ``mlflow-runs {"uri", "experiment", "metric"}``: every run of an experiment with its status, tags, params
  and the per-step history of ``metric`` (plus the latest value of every metric).
"""

from __future__ import annotations

import json
import sys
import time


def wait_http(url: str, timeout_s: float = 60.0) -> dict:
    import urllib.error
    import urllib.request

    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout_s:
        try:
            with urllib.request.urlopen(url, timeout=5) as reply:
                return {"ok": True, "status": reply.status, "seconds": time.monotonic() - t0}
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return {"ok": True, "status": exc.code, "seconds": time.monotonic() - t0}
            last = f"HTTP {exc.code}"
        except OSError as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.3)
    return {"ok": False, "error": f"{url} did not answer within {timeout_s:g}s ({last})"}


def _s3(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint)


def make_bucket(endpoint: str, bucket: str) -> dict:
    s3 = _s3(endpoint)
    s3.create_bucket(Bucket=bucket)
    return {"ok": True, "buckets": [b["Name"] for b in s3.list_buckets()["Buckets"]]}


def list_bucket(endpoint: str, bucket: str, prefix: str = "") -> dict:
    s3 = _s3(endpoint)
    keys = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [{"key": o["Key"], "size": o["Size"]} for o in page.get("Contents", [])]
    return {"ok": True, "keys": keys}


def http_json(url: str, method: str = "GET", body: dict | None = None) -> dict:
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as reply:
            return {"ok": True, "status": reply.status, "body": json.loads(reply.read() or b"null")}
    except urllib.error.HTTPError as exc:
        return {"ok": False, "status": exc.code, "error": exc.read().decode(errors="replace")[-2000:]}
    except OSError as exc:
        return {"ok": False, "error": str(getattr(exc, "reason", exc))}


def mlflow_runs(uri: str, experiment: str, metric: str = "loss/total") -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return {"ok": True, "experiment": None, "runs": []}
    runs = []
    for run in client.search_runs([exp.experiment_id], max_results=200):
        history = {}
        for m in client.get_metric_history(run.info.run_id, metric):
            history[m.step] = m.value  # a step logged twice (an epoch redone after a resume): the last value
        runs.append({
            "run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "artifact_uri": run.info.artifact_uri, "tags": dict(run.data.tags),
            "params": dict(run.data.params), "metrics": dict(run.data.metrics),
            "history": [[s, history[s]] for s in sorted(history)],
        })
    return {"ok": True, "experiment": exp.experiment_id, "artifact_location": exp.artifact_location, "runs": runs}


COMMANDS = {"wait-http": wait_http, "make-bucket": make_bucket, "list-bucket": list_bucket,
            "http-json": http_json, "mlflow-runs": mlflow_runs}


def main(argv: list[str]) -> int:
    command, args = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    try:
        out = COMMANDS[command](**args)
    except Exception as exc:  # reported to the rehearsal, which names the step
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
