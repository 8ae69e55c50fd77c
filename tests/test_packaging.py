"""The package as users get it: a wheel installed into a fresh venv, `pcl-ray` run from an empty folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

from pcl_ray.paths import PIPELINES_DIR, resolve_pipeline

ROOT = Path(__file__).resolve().parent.parent


def test_top_level_pipelines_is_the_package_data_folder():
    link = ROOT / "pipelines"
    assert link.is_symlink() and not Path(os.readlink(link)).is_absolute()  # git stores a relative link
    assert link.resolve() == PIPELINES_DIR
    assert (link / "fmnist_pcl.yaml").is_file() and (link / "digits_tiny.yaml").is_file()


@pytest.mark.parametrize("spec", ["digits_tiny", "digits_tiny.yaml", "pipelines/digits_tiny.yaml"])
def test_a_shipped_pipeline_is_found_by_name_from_any_folder(spec, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_pipeline(spec) == PIPELINES_DIR / "digits_tiny.yaml"
    (tmp_path / "pipelines").mkdir()
    own = tmp_path / "pipelines" / "digits_tiny.yaml"
    own.write_text("data: {name: digits}\n")
    # a file at that path wins over the shipped pipeline; a bare name still means the shipped one
    expected = Path(spec) if spec == "pipelines/digits_tiny.yaml" else PIPELINES_DIR / "digits_tiny.yaml"
    assert resolve_pipeline(spec) == expected


def _build_wheel(tmp: Path) -> Path:
    """A wheel of the working tree, built from a copy (the build leaves nothing in the checkout)."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "pcl_ray", src / "pcl_ray", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("pcl_ray-*.whl")
    return wheel


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    """A venv of its own (no system site-packages) that reuses this environment's installed packages
    (torch, ray, mlflow, ...) through a .pth line, with the wheel installed into it without dependencies.
    A .pth line only appends a folder to sys.path: the checkout's editable install stays inactive there."""
    env = tmp / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=True).create(env)
    python = env / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "reuse_installed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                    "-q", str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    return env


@pytest.mark.ray
def test_wheel_in_a_fresh_venv_trains_from_an_empty_folder(tmp_path):
    wheel = _build_wheel(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"pcl_ray/__main__.py", "pcl_ray/pipelines/digits_tiny.yaml", "pcl_ray/pipelines/fmnist_pcl.yaml"} <= names
    assert len([n for n in names if n.startswith("pcl_ray/pipelines/") and n.endswith(".yaml")]) == \
        len(list(PIPELINES_DIR.glob("*.yaml")))
    env = _fresh_venv(tmp_path, wheel)
    python, script = env / "bin" / "python", env / "bin" / "pcl-ray"
    work = tmp_path / "work"
    work.mkdir()
    clean = {k: v for k, v in os.environ.items() if k not in ("PCL_RAY_HOME", "PCL_RAY_MLRUNS", "PYTHONPATH",
                                                                "RAY_ADDRESS", "VIRTUAL_ENV")}
    clean["PATH"] = f"{env / 'bin'}{os.pathsep}{clean.get('PATH', '')}"

    where = subprocess.run([str(python), "-c", "import pcl_ray; print(pcl_ray.__file__)"], cwd=work, env=clean,
                           check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(env), f"pcl_ray imported from {where}, not from the wheel"
    helped = subprocess.run([str(script), "train", "--help"], cwd=work, env=clean, capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: pcl-ray train"), helped.stdout[:300]
    assert "pcl-ray train pipelines/digits_tiny.yaml" in helped.stdout and "run.py" not in helped.stdout
    as_module = subprocess.run([str(python), "-m", "pcl_ray", "--help"], cwd=work, env=clean, capture_output=True,
                               text=True, timeout=120)
    assert as_module.returncode == 0 and as_module.stdout.startswith("usage: python -m pcl_ray")

    run = subprocess.run(
        [str(script), "train", "digits_tiny", "--set", "train.epochs=1", "--set", "train.warmup_epochs=1",
         "--set", "ray.num_workers=1", "--set", "eval.kmeans_restarts=1", "--set", "eval.baselines=false",
         "--set", "ray.run_name=wheel-smoke"],
        cwd=work, env=clean, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert (work / "runs" / "wheel-smoke" / "final_state.pt").is_file()
    assert (work / "mlruns" / "mlflow.db").is_file()
    assert "MLflow model backbone: runs:/" in run.stdout
    site = Path(where).parent.parent
    assert not (site / "runs").exists() and not (site / "mlruns").exists() and not (site / "pipelines").exists()
    assert sorted(p.name for p in work.iterdir()) == ["mlruns", "runs"]
