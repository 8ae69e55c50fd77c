#!/usr/bin/env bash
# Set up everything pcl-ray needs on a fresh machine: the offline data set, a venv, torch, the project.
# Idempotent: a second run only checks. Override the interpreter with PYTHON=..., the venv with VENV=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
FMNIST_DIR=${PCL_RAY_FMNIST_DIR:-/usr/share/datasets/fashion-mnist}

if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  echo "[setup] installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else
    echo "[setup] error: need root (or sudo) to apt-get install dataset-fashion-mnist, or set PCL_RAY_FMNIST_DIR" >&2; exit 1; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

stamp="$VENV/.pcl-ray-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  echo "[setup] environment up to date ($VENV)"; exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
echo "[setup] installing torch 2.14.1 / torchvision 0.29.1 (first: the rest must not pull another build)"
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
echo "[setup] installing pcl-ray and its dependencies (faiss: the cpu extra)"
$PIP install -q -e ".[dev,cpu]"
touch "$stamp"
echo "[setup] done"
