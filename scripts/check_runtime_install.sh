#!/usr/bin/env bash
# The plain install: `pip install .` (no extras) into a fresh venv in a temporary folder, then check that
# it runs and benchmarks a bundle without torch, that a command needing torch names the extra to install,
# and print the venv's size (goal: at most 150 MB). The small bundle is built beforehand with the full
# venv (MAIN_PYTHON, default .venv/bin/python). Needs the package index (pip). A minute or two.
#
#   ./scripts/check_runtime_install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
MAIN_PY=${MAIN_PYTHON:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAILED: $*" >&2; exit 1; }

echo "== a small bundle (ResNet-20, random weights), built with the full venv"
PYTHONPATH=$ROOT "$MAIN_PY" - "$WORK" <<'PYEOF'
import sys
from pathlib import Path

from dgate_export.compile import checkpoint
from dgate_export.compile.build import BuildOptions, build_bundle
from dgate_export.compile.model import GatedModel
from dgate_export.compile.zoo import arch_info, build_backbone

work = Path(sys.argv[1])
kwargs = {"num_classes": 10}
model = GatedModel(build_backbone("resnet20", kwargs), list(arch_info("resnet20").default_exits),
                   arch={"name": "resnet20", "kwargs": kwargs}, num_classes=10, input_shape=(1, 28, 28),
                   thresholds=[0.5, 0.5, 0.5])
build_bundle(checkpoint.save(model, work / "model.pt"), work / "bundle", BuildOptions(max_batch=8), progress=None)
PYEOF

echo "== pip install . (no extras) into a fresh venv"
"$PY" -m venv "$WORK/venv"
V=$WORK/venv/bin
"$V/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# A copy of the tracked files as they are in the working tree: pip builds in the source folder (build/,
# *.egg-info), which must not be the checkout.
mkdir "$WORK/src"
git ls-files -z | tar --null -T - -cf - | tar -xf - -C "$WORK/src"
"$V/python" -m pip install -q "$WORK/src" > "$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; fail "pip install ."; }

cd "$WORK"  # not the checkout: the installed package, not the source tree, must answer
echo "== import dgate_export.runtime"
"$V/python" -c "import dgate_export.runtime, sys; assert 'torch' not in sys.modules; print('ok:', dgate_export.runtime.__file__)"
if "$V/python" -c "import torch" 2>/dev/null; then fail "torch is importable in the plain install"; fi
echo "ok: torch is not installed"
echo "== dgate-export inspect"
"$V/dgate-export" inspect "$WORK/bundle" | tail -n 1
echo "== dgate-export bench --random"
"$V/dgate-export" bench --engine "$WORK/bundle" --random 64 --batch-sizes 1,8 --min-iterations 3 \
    --min-seconds 0.2 --warmup-ms 20 --json "$WORK/bench.json" | tail -n 3
"$V/python" -c "import json, sys; r = json.load(open(sys.argv[1])); assert r['speed'], r; print('ok: bench.json')" \
    "$WORK/bench.json"
echo "== dgate-export gate (needs torch)"
set +e
out=$("$V/dgate-export" gate --arch resnet20 --data fashion-mnist -o "$WORK/x.pt" 2>&1)
rc=$?
set -e
echo "$out"
[ "$rc" -eq 2 ] || fail "gate exited $rc, expected 2"
echo "$out" | tr -s ' \n' ' ' | grep -q "pip install 'dgate-export\[compile\]'" || fail "gate does not name the compile extra"
echo "ok: gate names dgate-export[compile]"
size=$(du -sm "$WORK/venv" | cut -f1)
echo "== venv size: ${size} MB (goal: <= 150 MB); the largest parts:"
du -sm "$WORK"/venv/lib/python3*/site-packages/* | sort -rn | head -n 10
"$V/python" -m pip list --format=freeze 2>/dev/null | tr '\n' ' '; echo
