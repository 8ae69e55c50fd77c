"""cluster.yaml must be a valid Ray cluster launcher config that installs this project."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema  # a dependency of ray itself
import pytest
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _ray_schema() -> dict[str, Any]:
    """The JSON schema that ships inside the installed ray package."""
    from importlib.resources import files

    resource = files("ray").joinpath("autoscaler", "ray-schema.json")
    return json.loads(resource.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    with CLUSTER_YAML.open(encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def test_validates_against_ray_schema(config: dict[str, Any]) -> None:
    jsonschema.validate(instance=config, schema=_ray_schema())


def test_head_and_gpu_workers(config: dict[str, Any]) -> None:
    assert config["provider"]["type"] == "aws"
    assert config["provider"]["region"] == "us-west-2"
    assert "docker" not in config or not config["docker"]
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in node_types.items() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no GPU worker node type"
    for node_type in gpu_types:
        assert node_type["min_workers"] == 0
        assert 1 <= node_type["max_workers"] <= config["max_workers"]


def test_setup_installs_pinned_torch_and_this_project(config: dict[str, Any]) -> None:
    assert config["file_mounts"] == {"~/pcl-ray": "."}
    commands = config["setup_commands"]
    joined = "\n".join(commands)
    assert "torch==2.14.1" in joined
    assert "torchvision==0.29.1" in joined

    def index(fragment: str) -> int:
        return next(i for i, cmd in enumerate(commands) if fragment in cmd)

    install_project = index("pcl-ray[gpu]")
    assert "install" in commands[install_project] and "-e" in commands[install_project].split()
    # torch is pinned before the project install, and faiss-cpu goes after it.
    assert index("torch==2.14.1") < install_project < index("uninstall -y faiss-cpu")


def test_ray_started_on_head_and_workers(config: dict[str, Any]) -> None:
    assert any("ray start --head" in cmd for cmd in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP" in cmd for cmd in config["worker_start_ray_commands"])
