#!/usr/bin/env bash
# Set up a fresh machine: the Fashion-MNIST Debian package, a venv in .venv, the package and its test
# tools. Safe to run again (it only installs what is missing).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ]; then
  echo "== installing the Fashion-MNIST Debian package (dataset-fashion-mnist)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
echo "== installing packages into .venv (torch is large: a few minutes the first time)"
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch/torchvision pinned to the releases this project is tested with (see docs/install.md).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# tensorrt-stubs declares a dependency on tensorrt, whose libraries cannot install without an NVIDIA
# index; the stubs alone are what mypy needs.
.venv/bin/python -m pip install -q --no-deps tensorrt-stubs 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import dgate_export, torch, onnxruntime; print('ready: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
