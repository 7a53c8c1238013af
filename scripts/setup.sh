#!/usr/bin/env bash
# Set up a fresh machine: the Fashion-MNIST Debian package, a venv in .venv, the package, its test
# tools and its Ray extra (offline scoring). Safe to run again (it only installs what is missing).
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
.venv/bin/python -m pip install -q -e ".[compile,dev,ray]" 2>&1 | grep -v "^WARNING: Location" || true
# tensorrt-stubs declares a dependency on tensorrt, whose libraries cannot install without an NVIDIA
# index; the stubs alone are what mypy needs.
.venv/bin/python -m pip install -q --no-deps tensorrt-stubs 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import dgate_export, torch, onnxruntime; print('ready: torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"

# The Triton server for `dgate-export serve` and tests/test_serving.py, in its own venv: the tritonserver
# that nvidia-pytriton bundles (2.51, Python backend only) needs numpy<2 in its Python backend, and
# tritonclient's protobuf pin conflicts with .venv's. DGATE_SKIP_TRITON=1 skips it (the serving tests
# then skip, saying why).
if [ "${DGATE_SKIP_TRITON:-0}" != "1" ]; then
  if [ ! -x .venv-triton/bin/python ]; then
    echo "== creating .venv-triton (Triton Inference Server from nvidia-pytriton, for dgate-export serve)"
    "$PY" -m venv .venv-triton
  fi
  .venv-triton/bin/python -m pip install -q "nvidia-pytriton==0.7.0" "numpy<2" "onnxruntime>=1.20" \
      "tritonclient[http,grpc]~=2.50" 2>&1 | grep -v "^WARNING: Location" || true
  .venv-triton/bin/python -c "import pytriton, numpy, onnxruntime, tritonclient.grpc; print('triton env ready: numpy', numpy.__version__)"
fi
