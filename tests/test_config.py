import subprocess
import sys
from pathlib import Path

import pytest

from pcl_ray.config import ConfigError, ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_validate_and_flatten():
    cfg = load_config()
    assert isinstance(cfg, ExperimentConfig)
    flat = cfg.flat()
    for key in ("data.name", "data.root", "data.subset", "model.backbone", "method.name", "method.temperature",
                "method.queue_size", "estep.num_clusters", "train.epochs", "train.warmup_epochs",
                "train.batch_size", "train.lr", "train.seed", "ray.num_workers", "ray.address",
                "tracking.uri", "tracking.experiment"):
        assert key in flat


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_validates(path):
    load_config(path)


def test_overrides_are_typed_yaml_values():
    cfg = load_config(ROOT / "pipelines" / "fmnist_pcl.yaml",
                      ["train.epochs=3", "estep.num_clusters=[5, 7]", "data.subset=100", "ray.address=auto"])
    assert cfg.train.epochs == 3
    assert cfg.estep.num_clusters == [5, 7]
    assert cfg.data.subset == 100
    assert cfg.ray.address == "auto"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.epochz=3", "train.epochz: unknown key"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("data.name=mnist", "data.name: Input should be"),
        ("estep.num_clusters=[1, 10]", "estep.num_clusters"),
        ("train.epochs=two", "train.epochs"),
        ("train.warmup_epochs=50", "train.warmup_epochs (50) must be <= train.epochs"),
        ("noequals", "expected KEY=VALUE"),
        ("train.epochs.x=1", "train.epochs: is a value, not a section"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "pipelines" / "fmnist_pcl.yaml", [override])
    assert needle in str(err.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epochs: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_cli_rejects_bad_override_with_exit_2():
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "train", "--set", "method.temperature=0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "method.temperature" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_help_lists_verbs():
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "--help"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0
    assert "train" in proc.stdout


def test_cli_missing_data_dir_fails_before_anything_is_written(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "train", "--set", f"data.root={tmp_path / 'nowhere'}",
         "--set", f"tracking.uri=sqlite:///{db}", "--set", f"ray.storage_path={tmp_path / 'runs'}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "nowhere" in proc.stderr and "Traceback" not in proc.stderr
    assert not db.exists() and not (tmp_path / "runs").exists()


def test_cli_too_many_clusters_fails_before_anything_is_written(tmp_path):
    db = tmp_path / "mlflow.db"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "train", str(ROOT / "pipelines" / "digits_tiny.yaml"),
         "--set", "estep.num_clusters=[10,5000]", "--set", f"tracking.uri=sqlite:///{db}"],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "estep.num_clusters: [5000]" in proc.stderr
    assert not db.exists()
