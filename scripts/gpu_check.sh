#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU and onnxruntime-gpu (and TensorRT, where installed):
# the tests marked gpu/tensorrt, then `dgate-export bench` of the benchmark networks on ONNX Runtime's
# CUDA provider, gated vs un-gated. CI has no GPU; run this by hand and record what it prints.
#
#   scripts/gpu_check.sh [OUTDIR]        (default OUTDIR: runs/gpu; uses the python on PATH, or $PYTHON)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu}
py=${PYTHON:-python3}
mkdir -p "$out"
status=0

echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
"$py" - <<'EOF'
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_available_providers())
try:
    import tensorrt
    print("tensorrt", tensorrt.__version__)
except Exception as err:  # noqa: BLE001
    print("tensorrt: not usable here:", err)
EOF

echo "== tests marked gpu or tensorrt"
"$py" -m pytest -q -rs -p no:cacheprovider -m "(gpu or tensorrt) and not slow" \
    tests/test_backend_onnxruntime.py tests/test_runtime_parity.py tests/test_tensorrt.py \
    2>&1 | tee "$out/pytest.txt" || status=1

echo "== bench on the CUDA execution provider"
for net in resnet56 densenet_bc; do
    bundle=engines/bench-$net
    if [ ! -f "$bundle/manifest.json" ]; then
        "$py" cli.py build "benchmarks/weights/${net}_gated.pt" -o "$bundle" --force || { status=1; continue; }
    fi
    "$py" cli.py bench --engine "$bundle" --data fashion-mnist --providers cuda \
        --batch-sizes 1,256 --min-seconds 3 --json "$out/${net}_cuda.json" 2>&1 | tee "$out/${net}_cuda.txt" \
        || status=1
done
exit $status
