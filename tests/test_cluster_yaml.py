"""cluster.yaml: a valid Ray cluster launcher config that installs this project and can run every shipped pipeline.

Fast checks, no Ray started: the config against the schema inside the installed ray package; the
resource demand of every shipped pipeline (single runs, compare entries, tune trials at their
concurrency) against the node types; what the setup installs where; what listens where.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import jsonschema  # a dependency of ray itself
import pytest
import yaml

from pcl_ray.config import ExperimentConfig, load_config, load_yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
MLFLOW_SCRIPT = ROOT / "scripts" / "cluster_mlflow.sh"
PIPELINES = sorted((ROOT / "pipelines").glob("*.yaml"))
DRIVER_SLOT = "train_driver_slot"  # the custom resource `run.py tune` gives each trial driver


def _ray_schema() -> dict[str, Any]:
    """The JSON schema that ships inside the installed ray package."""
    from importlib.resources import files

    resource = files("ray").joinpath("autoscaler", "ray-schema.json")
    return json.loads(resource.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    with CLUSTER_YAML.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def _commands(config: dict[str, Any], key: str) -> str:
    return "\n".join(config.get(key) or [])


# ----------------------------------------------------------------------------- the launcher config
def test_validates_against_ray_schema(config: dict[str, Any]) -> None:
    jsonschema.validate(instance=config, schema=_ray_schema())


def test_head_and_gpu_workers(config: dict[str, Any]) -> None:
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"
    assert config["provider"]["cache_stopped_nodes"] is False
    assert 0 < config["idle_timeout_minutes"] <= 30
    assert "docker" not in config or not config["docker"]
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in node_types.items() if t["resources"].get("GPU", 0) > 0}
    assert any(t["max_workers"] >= 1 for t in gpu_types.values()), "no GPU worker node type can start"
    for node_type in gpu_types.values():
        assert node_type["min_workers"] == 0  # nothing bills while no job asks for it
        assert 0 <= node_type["max_workers"] <= config["max_workers"]
    # every node can reach the bucket: an instance profile on each node type
    for name, node_type in node_types.items():
        assert node_type["node_config"].get("IamInstanceProfile"), f"{name}: no IamInstanceProfile"


def test_iam_permissions_are_written_out() -> None:
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    for action in ("s3:ListBucket", "s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                   "ec2:RunInstances", "ec2:TerminateInstances", "iam:PassRole", "ray-autoscaler-v1"):
        assert action in text, action


def test_ray_started_on_head_and_workers(config: dict[str, Any]) -> None:
    assert any("ray start --head" in cmd for cmd in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in cmd for cmd in config["worker_start_ray_commands"])


# ----------------------------------------------------------------------------- what listens where
def test_dashboard_stays_on_loopback_and_ray_submit_is_gone(config: dict[str, Any]) -> None:
    head_start = _commands(config, "head_start_ray_commands")
    assert "--dashboard-host=127.0.0.1" in head_start
    every_command = "\n".join(_commands(config, k) for k in config if k.endswith("_commands"))
    assert "0.0.0.0" not in every_command
    text = CLUSTER_YAML.read_text(encoding="utf-8")
    assert "ray submit" not in text  # `ray job submit --working-dir .` replaces it
    assert "ray job submit --address http://127.0.0.1:8265 --working-dir ." in text


def test_mlflow_server_started_on_head_off_every_public_interface(config: dict[str, Any]) -> None:
    head_start = config["head_start_ray_commands"]
    starts = [cmd for cmd in head_start if "cluster_mlflow.sh start" in cmd]
    assert len(starts) == 1, "the head starts one MLflow server"
    assert "/mlflow" in starts[0] and "s3://" in starts[0]  # artifacts in the bucket
    assert head_start.index(starts[0]) > next(i for i, c in enumerate(head_start) if "ray start --head" in c)
    assert "0.0.0.0" not in starts[0]
    script = MLFLOW_SCRIPT.read_text(encoding="utf-8")
    server = script[script.index("server --host"):]
    server = server[: server.index("&\n")]
    assert '--host "$MLFLOW_BIND_HOST"' in server and "0.0.0.0" not in server
    for flag in ("--workers 1", "sqlite:///", "--artifacts-destination"):
        assert flag in server, flag
    assert "setsid nohup" in script
    assert "get_node_ip_address" in script  # default bind: the address Ray registers for the head


@pytest.mark.parametrize("host", ["0.0.0.0", "::", ""])
def test_mlflow_script_refuses_all_interfaces(host: str, tmp_path: Path) -> None:
    # no BIND_HOST: the script asks Ray (through $PYTHON) for the node's address; /bin/true answers nothing
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "MLFLOW_HOME": str(tmp_path / "mlflow"),
           "PYTHON": sys.executable if host else "/bin/true"}
    args = ["bash", str(MLFLOW_SCRIPT), "start", "s3://bucket/mlflow"] + ([host] if host else [])
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refusing to bind" in proc.stderr
    assert not (tmp_path / "mlflow" / "server.pid").exists()


@pytest.mark.slow
def test_mlflow_script_serves_logs_backs_up_and_stops(tmp_path: Path) -> None:
    """The script's server on 127.0.0.1 (a private address's stand-in): a run with an artifact, a backup, a stop."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
           "MLFLOW_HOME": str(tmp_path / "mlflow"), "MLFLOW_PORT": str(port), "PYTHON": sys.executable}
    script = ["bash", str(MLFLOW_SCRIPT)]
    artifacts = tmp_path / "artifacts"
    try:
        start = subprocess.run([*script, "start", str(artifacts), "127.0.0.1"], env=env, capture_output=True,
                               text=True, timeout=180)
        assert start.returncode == 0, start.stdout + start.stderr
        uri = subprocess.run([*script, "uri"], env=env, capture_output=True, text=True, timeout=30).stdout.strip()
        assert uri == f"http://127.0.0.1:{port}"
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=uri)
        run = client.create_run(client.create_experiment("cluster-check"))
        note = tmp_path / "note.txt"
        note.write_text("logged through the server")
        client.log_artifact(run.info.run_id, str(note))
        assert list(artifacts.rglob("note.txt")), "the artifact did not reach --artifacts-destination"
        backup = subprocess.run([*script, "backup", str(tmp_path / "backup" / "mlflow.db")], env=env,
                                capture_output=True, text=True, timeout=60)
        assert backup.returncode == 0, backup.stderr
        import sqlite3

        with sqlite3.connect(tmp_path / "backup" / "mlflow.db") as db:
            assert db.execute("select count(*) from runs").fetchone()[0] == 1
    finally:
        subprocess.run([*script, "stop"], env=env, capture_output=True, timeout=60)
    assert not (tmp_path / "mlflow" / "server.pid").exists()
    with socket.socket() as sock:  # nothing listens on the port any more
        assert sock.connect_ex(("127.0.0.1", port)) != 0


# ----------------------------------------------------------------------------- what the setup installs
def test_setup_installs_pinned_torch_then_one_faiss_build_per_node_kind(config: dict[str, Any]) -> None:
    assert config["file_mounts"] == {"~/pcl-ray": "."}
    common = _commands(config, "setup_commands")
    head = _commands(config, "head_setup_commands")
    workers = _commands(config, "worker_setup_commands")
    assert "torch==2.14.1" in common and "torchvision==0.29.1" in common  # before the project, everywhere
    assert "pcl-ray[" not in common and " -e " not in common  # the project comes per node kind
    assert "-e \"$HOME/pcl-ray[cpu]\"" in head and "[gpu]" not in head
    assert "-e \"$HOME/pcl-ray[gpu]\"" in workers and "[cpu]" not in workers
    assert "boto3" in head  # the autoscaler's EC2 calls, the MLflow server's S3 artifacts
    every_command = "\n".join(_commands(config, k) for k in config if k.endswith("_commands"))
    assert "uninstall" not in every_command and "--force-reinstall" not in every_command
    assert "dataset-fashion-mnist" in common  # data on every node


def test_faiss_comes_from_an_extra_not_a_base_dependency() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert not [d for d in project["dependencies"] if d.lower().startswith("faiss")]
    extras = project["optional-dependencies"]
    assert [d for d in extras["cpu"] if d.startswith("faiss-cpu")]
    assert [d for d in extras["gpu"] if d.startswith("faiss-gpu")]
    assert not [d for d in extras["dev"] if d.startswith("faiss")]
    assert '-e ".[dev,cpu]"' in (ROOT / "scripts" / "setup.sh").read_text(encoding="utf-8")


def test_missing_faiss_names_the_extras() -> None:
    code = ("import sys; sys.modules['faiss'] = None\n"
            "try:\n    import pcl_ray.estep.kmeans\nexcept ImportError as exc:\n    print(exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "faiss is not installed" in proc.stdout and ".[cpu]" in proc.stdout and ".[gpu]" in proc.stdout


# ----------------------------------------------------------------------------- resource demand vs node types
Bundle = dict[str, float]


def _workers(cfg: ExperimentConfig) -> int:
    """The most Train workers a run holds (``ray.num_workers`` may be an elastic ``[min, max]``)."""
    n = cfg.ray.num_workers
    return int(max(n)) if isinstance(n, (list, tuple)) else int(n)


def _run_bundles(cfg: ExperimentConfig, gpu: bool, trial_driver: float | None = None) -> list[Bundle]:
    """Resource bundles of one run: Train workers, the cluster actor, and a Tune trial's driver.

    ``gpu``: the workers take one GPU each. The cluster actor takes a GPU for ``estep.backend: gpu``, and
    for ``auto`` beside GPU workers too (the cluster launcher's docs tell users to ask for it).
    ``trial_driver``: None for a plain run (the job's driver holds nothing); 0 = a train_driver_slot; else CPUs.
    """
    worker: Bundle = {"CPU": cfg.ray.cpus_per_worker, **({"GPU": 1.0} if gpu else {})}
    bundles = [dict(worker) for _ in range(_workers(cfg))]
    if cfg.needs_estep:
        actor_gpu = cfg.estep.backend == "gpu" or (cfg.estep.backend == "auto" and gpu)
        bundles.append({"CPU": cfg.ray.actor_cpus, **({"GPU": 1.0} if actor_gpu else {})})
    if trial_driver is not None:
        bundles.append({"CPU": trial_driver} if trial_driver > 0 else {DRIVER_SLOT: 1.0})
    return bundles


def _gpu_variants(cfg: ExperimentConfig) -> list[bool]:
    use = cfg.ray.use_gpu
    return [True, False] if use == "auto" else [bool(use)]


def _fits(bundle: Bundle, node: Bundle) -> bool:
    return all(node.get(k, 0.0) >= v - 1e-9 for k, v in bundle.items() if v > 0)


def _packs(bundles: list[Bundle], nodes: list[Bundle]) -> bool:
    """First-fit decreasing: True means the bundles do fit (a False could be a packing this order misses)."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0), b.get(DRIVER_SLOT, 0)), reverse=True):
        node = next((n for n in free if _fits(b, n)), None)
        if node is None:
            return False
        for k, v in b.items():
            node[k] = node.get(k, 0.0) - v
    return True


def _cluster_fits(bundles: list[Bundle], config: dict[str, Any]) -> bool:
    """Some mix of worker nodes within every node type's and the cluster's max_workers holds the bundles."""
    types = config["available_node_types"]
    head = types[config["head_node_type"]]["resources"]
    workers = [(name, t) for name, t in types.items() if name != config["head_node_type"]]
    for counts in itertools.product(*(range(t["max_workers"] + 1) for _, t in workers)):
        if sum(counts) > config["max_workers"]:
            continue
        nodes = [head] + [t["resources"] for (_, t), c in zip(workers, counts) for _ in range(c)]
        if _packs(bundles, nodes):
            return True
    return False


def _entry_path(pipeline: str) -> Path:
    path = Path(pipeline)
    return path if path.is_absolute() else ROOT / path


def _shipped_runs() -> list[tuple[str, ExperimentConfig, float | None, int]]:
    """(what, resolved config, trial driver, runs at once) for every run a shipped pipeline starts."""
    from pcl_ray.sweep import load_sweep

    runs = []
    for path in PIPELINES:
        raw = load_yaml(path)
        name = path.name
        if "compare" in raw:  # entries train one after another
            compare = raw["compare"]
            for entry in compare["entries"]:
                cfg = load_config(_entry_path(entry["pipeline"]), [*compare.get("set", []), *entry.get("set", [])])
                runs.append((f"{name}:{entry['label']}", cfg, None, 1))
        elif "tune" in raw:
            spec = load_sweep(path)
            driver = spec.tune.trial_resources.driver_cpus
            concurrency = spec.tune.max_concurrent_trials or 1
            runs.append((f"{name} (trial)", spec.base_cfg, driver, concurrency))
            for key in ("ray.num_workers", "ray.cpus_per_worker", "ray.actor_cpus"):  # swept resources
                if key in spec.tune.search_space:
                    from pcl_ray.config import build_config
                    from pcl_ray.sweep.spec import set_path

                    for value in spec.tune.search_space[key].edge_values():
                        cfg = build_config(set_path(spec.base_raw, key, value))
                        runs.append((f"{name} ({key}={value})", cfg, driver, concurrency))
        else:
            runs.append((name, load_config(path), None, 1))
    return runs


SHIPPED = _shipped_runs()


def test_every_pipeline_is_checked() -> None:
    names = {what.split(":")[0].split(" ")[0] for what, *_ in SHIPPED}
    assert names == {p.name for p in PIPELINES}
    assert any("imagenet" in what for what, *_ in SHIPPED)


@pytest.mark.parametrize("what,cfg,driver,concurrency", SHIPPED, ids=[s[0] for s in SHIPPED])
def test_pipeline_demand_fits_the_node_types(config: dict[str, Any], what: str, cfg: ExperimentConfig,
                                             driver: float | None, concurrency: int) -> None:
    node_types = config["available_node_types"]
    usable = [t["resources"] for name, t in node_types.items()
              if name == config["head_node_type"] or t["max_workers"] > 0]
    for gpu in _gpu_variants(cfg):
        bundles = _run_bundles(cfg, gpu, driver)
        for bundle in bundles:  # one Train worker (or the actor) never spans two nodes
            assert any(_fits(bundle, node) for node in usable), f"{what}: no node type holds {bundle}"
        demand = bundles * concurrency
        total = {k: sum(b.get(k, 0.0) for b in demand) for k in ("CPU", "GPU", DRIVER_SLOT)}
        assert _cluster_fits(demand, config), (
            f"{what} (use_gpu={gpu}, {concurrency} at once): {total} does not fit the node types within max_workers")


def test_head_declares_driver_slots_for_the_shipped_sweeps(config: dict[str, Any]) -> None:
    head = config["available_node_types"][config["head_node_type"]]["resources"]
    slots = head.get(DRIVER_SLOT, 0)
    assert slots >= 1, "the head declares no train_driver_slot: every `run.py tune` on the cluster stops at once"
    wanted = [(what, n) for what, _, driver, n in SHIPPED if driver == 0]
    assert wanted, "no shipped sweep uses driver slots"
    for what, n in wanted:
        assert slots >= n, f"{what}: {n} trials at once, the head declares {slots} {DRIVER_SLOT}"


def test_the_paper_imagenet_runs_fit_as_shipped(config: dict[str, Any]) -> None:
    """8 GPU workers x 8 CPUs + a GPU cluster actor: 9 GPUs, placed without touching the pipelines."""
    for name in ("pcl_v1_imagenet.yaml", "pcl_v2_imagenet.yaml"):
        cfg = load_config(ROOT / "pipelines" / name)
        assert _workers(cfg) == 8 and cfg.ray.use_gpu is True and cfg.estep.backend == "gpu"
        bundles = _run_bundles(cfg, gpu=True)
        assert sum(b.get("GPU", 0) for b in bundles) == 9
        assert _cluster_fits(bundles, config)
