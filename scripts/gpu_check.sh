#!/usr/bin/env bash
# The GPU checks, in one go (about 6-8 minutes on one H200), for a machine with an NVIDIA GPU and
# onnxruntime-gpu (and TensorRT, where installed). CI has no GPU; run this by hand and record what it
# prints. Steps (each step's output is kept in OUTDIR; a failed step makes the exit status 1 and is
# named in the last lines, the others still run):
#
#   1. device: nvidia-smi, onnxruntime's providers (the CUDA provider must be there), tensorrt.
#   2. the tests marked gpu or tensorrt (not slow): CUDA-provider parity with the torch reference, with
#      fixed buffers and CUDA graphs too; TensorRT tests where TensorRT imports.
#   3. benchmarks/runtime_modes.py on the two benchmark bundles (benchmarks/weights, built into
#      engines/bench-NET when absent) with their own thresholds on Fashion-MNIST test images, and on
#      torchvision ResNet-50 at 3x224x224 with random weights (built into engines/bench-resnet50 when
#      absent), thresholds sending about 60/15/10% out at its three gates: batch 1, 64 and 256,
#      un-gated vs gated, plain / fixed buffers / fixed + table / CUDA graphs / CUDA graphs + table.
#      JSON into OUTDIR/runtime_modes.json.
#
#   scripts/gpu_check.sh [OUTDIR]     (default OUTDIR: benchmarks/results/gpu; python: $PYTHON or python3)
#
# Dry run without a GPU (everything up to the GPU-specific parts, small sizes):
#   GPU_CHECK_PROVIDERS=cpu GPU_CHECK_QUICK=1 scripts/gpu_check.sh /tmp/gpu-dry
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results/gpu}
py=${PYTHON:-python3}
providers=${GPU_CHECK_PROVIDERS:-cuda}
mkdir -p "$out"
failed=()
start=$(date +%s)
step() { echo; echo "== $1 ($(( $(date +%s) - start )) s)"; }

step "device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || \
    { [ "$providers" = cuda ] && failed+=("nvidia-smi"); }
"$py" - "$providers" <<'EOF' || failed+=("device: onnxruntime has no CUDA provider")
import sys
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_available_providers())
try:
    import tensorrt
    print("tensorrt", tensorrt.__version__)
except Exception as err:  # noqa: BLE001
    print("tensorrt: not usable here:", err)
if sys.argv[1] == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
    sys.exit("FAILED: no CUDAExecutionProvider: install onnxruntime-gpu (and CUDA / cuDNN) first")
EOF

step "tests marked gpu or tensorrt"
"$py" -m pytest -q -rs -p no:cacheprovider -m "(gpu or tensorrt) and not slow" \
    tests/test_backend_onnxruntime.py tests/test_runtime_parity.py tests/test_tensorrt.py \
    2>&1 | tee "$out/pytest.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("tests (see $out/pytest.txt)")
if [ "$providers" = cuda ] && grep -q "needs onnxruntime-gpu and a CUDA GPU" "$out/pytest.txt"; then
    failed+=("tests: the CUDA tests were skipped on a machine that should have run them")
fi

step "benchmark bundles"
bundles=()
for net in resnet56 densenet_bc; do
    bundle=engines/bench-$net
    if [ ! -f "$bundle/manifest.json" ]; then
        "$py" cli.py build "benchmarks/weights/${net}_gated.pt" -o "$bundle" --force 2>&1 | tail -3
        [ "${PIPESTATUS[0]}" -eq 0 ] || { failed+=("build $net"); continue; }
    fi
    bundles+=(--bundle "$bundle")
done

step "runtime modes: un-gated vs gated, with and without fixed buffers and CUDA graphs"
if [ -n "${GPU_CHECK_QUICK:-}" ]; then  # the dry run: tiny sizes, a small ResNet-50
    sizes=1,8; r50=(--resnet50 engines/bench-resnet50-dry --resnet50-size 32 --resnet50-samples 64)
    timing=(--rounds 1 --batches 2 --profile-repeats 1 --calibrate 256)
else
    sizes=1,64,256; r50=(--resnet50 engines/bench-resnet50)
    timing=(--rounds 5 --batches 4 --profile-repeats 5)
fi
exporter=dynamo
if ! "$py" -c "import onnxscript" 2>/dev/null; then
    exporter=torchscript
    echo "onnxscript does not import here: ResNet-50 is exported with the TorchScript exporter"
fi
"$py" benchmarks/runtime_modes.py "${bundles[@]}" "${r50[@]}" --exporter "$exporter" --providers "$providers" \
    --batch-sizes "$sizes" "${timing[@]}" --out "$out/runtime_modes.json" 2>&1 | tee "$out/runtime_modes.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || failed+=("runtime modes (see $out/runtime_modes.txt)")

step "done"
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}"
    exit 1
fi
echo "all GPU checks passed; figures in $out/runtime_modes.json"
