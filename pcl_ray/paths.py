"""Where pcl-ray reads its shipped pipelines and writes its outputs.

- Outputs (``runs/``, ``mlruns/``, the run registry ``runs/.pcl_ray/``) go under the *home* folder:
  ``$PCL_RAY_HOME`` when set, else the current directory, never the installed package. The CLI pins the
  home in the environment (:func:`pin_home`) before Ray starts, so that the processes a local Ray starts
  (Train workers, Tune trials, which Tune moves into trial folders) write to the same place.
- Shipped pipelines are package data (``pcl_ray/pipelines/*.yaml``; the clone's top-level ``pipelines/``
  is a link to that folder). A pipeline argument is a path, or a shipped pipeline's name
  (``fmnist_pcl``, ``fmnist_pcl.yaml``, ``pipelines/fmnist_pcl.yaml``) when no such file exists.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "PCL_RAY_HOME"
PIPELINES_DIR = Path(__file__).resolve().parent / "pipelines"


def home() -> Path:
    """The folder that holds ``runs/`` and ``mlruns/``: ``$PCL_RAY_HOME``, else the current directory."""
    value = os.environ.get(HOME_ENV, "").strip()
    return Path(value).expanduser().resolve() if value else Path.cwd().resolve()


def pin_home() -> Path:
    """Fix the home for this process and every process it starts from now on (a local Ray's workers)."""
    where = home()
    os.environ[HOME_ENV] = str(where)
    return where


def shipped_pipelines() -> list[str]:
    """Names of the pipelines shipped with the package (``fmnist_pcl``, ``digits_tiny``, ...)."""
    return sorted(p.stem for p in PIPELINES_DIR.glob("*.yaml"))


def resolve_pipeline(spec: str | os.PathLike) -> Path:
    """The pipeline file ``spec`` names: an existing path as given, else a shipped pipeline of that name
    (``digits_tiny``, ``digits_tiny.yaml`` or ``pipelines/digits_tiny.yaml``). Unknown: the path as given
    (the loader then says the file is not found)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    text = str(spec).replace("\\", "/")
    if text.startswith("pipelines/") and "/" not in text[len("pipelines/"):]:
        text = text[len("pipelines/"):]
    if "/" not in text:
        shipped = PIPELINES_DIR / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
        if shipped.is_file():
            return shipped
    return path
