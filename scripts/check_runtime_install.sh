#!/usr/bin/env bash
# The plain install: `pip install .` (no extras) into a fresh venv in a temporary folder, then check that
# torch, onnx, matplotlib and pyarrow are absent and that it runs a bundle: inspect, bench --random,
# profile, triton (--platform python: Triton's Python backend), score (-o NAME.csv); that what needs an
# extra names it (gate: [compile], bench --plot: [plot], triton's native platforms: [onnx], score -o
# NAME.parquet: [parquet], folder: data: [images]); and print the venv's size against the goal (at most SIZE_GOAL_MB, default
# 200), failing when it is over. The small bundle is built beforehand with the full venv (MAIN_PYTHON,
# default .venv/bin/python). Needs the package index (pip). A minute or two.
#
#   ./scripts/check_runtime_install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
MAIN_PY=${MAIN_PYTHON:-$ROOT/.venv/bin/python}
GOAL=${SIZE_GOAL_MB:-200}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
fail() { echo "FAILED: $*" >&2; exit 1; }
trap 'echo "FAILED: line $LINENO exited $?" >&2' ERR
# needs_extra EXTRA CMD...: CMD must fail with status 2 and name `pip install 'dgate-export[EXTRA]'`.
needs_extra() {
    local extra=$1 out rc=0
    shift
    out=$("$@" 2>&1) || rc=$?
    echo "$out" | tail -n 3
    [ "$rc" -eq 2 ] || fail "$* exited $rc, expected 2"
    echo "$out" | tr -s ' \n' ' ' | grep -qF "pip install 'dgate-export[$extra]'" || fail "$* does not name the $extra extra"
    echo "ok: names dgate-export[$extra]"
}

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
                   thresholds=[0.5, 0.5, 0.5], normalization={"scale": 1 / 255, "mean": [0.286], "std": [0.353]})
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
echo "== import dgate_export.runtime; what the plain install leaves out"
"$V/python" -c "import dgate_export.runtime, sys; assert 'torch' not in sys.modules; print('ok:', dgate_export.runtime.__file__)"
for package in torch onnx matplotlib pyarrow; do
    if "$V/python" -c "import $package" 2>/dev/null; then fail "$package is importable in the plain install"; fi
done
echo "ok: torch, onnx, matplotlib and pyarrow are not installed"
echo "== dgate-export inspect"
"$V/dgate-export" inspect "$WORK/bundle" | tail -n 1
echo "== dgate-export bench --random"
"$V/dgate-export" bench --engine "$WORK/bundle" --random 64 --batch-sizes 1,8 --min-iterations 3 \
    --min-seconds 0.2 --warmup-ms 20 --json "$WORK/bench.json" | tail -n 3
"$V/python" -c "import json, sys; r = json.load(open(sys.argv[1])); assert r['speed'], r; print('ok: bench.json')" \
    "$WORK/bench.json"
echo "== dgate-export profile"
"$V/dgate-export" profile "$WORK/bundle" --batch-size 1 --min-seconds 0.2 -o "$WORK/profile.json" | tail -n 2
echo "== dgate-export triton --platform python"
"$V/dgate-export" triton "$WORK/bundle" -o "$WORK/repo" --platform python
"$V/python" - "$WORK/repo" <<'PYEOF'
import json, sys
from pathlib import Path

repo = Path(sys.argv[1])
segments = sorted(p for p in repo.iterdir() if p.name.startswith("bundle_seg"))
assert len(segments) == 4, segments
for seg in segments:
    assert '"index"' not in (seg / "config.pbtxt").read_text(), seg  # the model feeds it (model_segment.py)
    assert (seg / "1" / "model.onnx").is_file() and (seg / "1" / "dgate_export" / "contract.py").is_file(), seg
gate = json.loads((repo / "bundle" / "1" / "gate.json").read_text())
assert all("index" not in s["inputs"] for s in gate["segments"]), gate
print(f"ok: {len(segments)} segment models without an index input")
PYEOF
echo "== dgate-export score -o predictions.csv"
"$V/python" -c "import numpy as np, sys; np.savez(sys.argv[1], x=np.random.default_rng(0).random((40, 1, 28, 28), np.float32), y=np.arange(40) % 10)" \
    "$WORK/data.npz"
"$V/dgate-export" score "$WORK/bundle" --data "npz:$WORK/data.npz" -o "$WORK/predictions.csv" --logits --no-progress
"$V/python" - "$WORK/predictions.csv" <<'PYEOF'
import csv, json, sys

with open(sys.argv[1], newline="") as f:
    rows = list(csv.DictReader(f))
assert len(rows) == 40 and list(rows[0]) == ["row", "prediction", "exit", "confidence", "label", "logits"], rows[0]
assert [int(r["row"]) for r in rows] == list(range(40)) and len(json.loads(rows[0]["logits"])) == 10
print("ok: predictions.csv")
PYEOF
echo "== what needs an extra says which"
needs_extra compile "$V/dgate-export" gate --arch resnet20 --data fashion-mnist -o "$WORK/x.pt"
needs_extra plot "$V/dgate-export" bench --engine "$WORK/bundle" --random 8 --batch-sizes 1 --min-iterations 1 \
    --min-seconds 0 --warmup-ms 0 --plot "$WORK/bench.png"
needs_extra onnx "$V/dgate-export" triton "$WORK/bundle" -o "$WORK/repo_native" --platform onnxruntime
needs_extra parquet "$V/dgate-export" score "$WORK/bundle" --data "npz:$WORK/data.npz" -o "$WORK/p.parquet" --no-progress
# an image folder (written with the full venv's Pillow): decoding it needs the [images] extra
"$MAIN_PY" -c "import sys, numpy as np; from PIL import Image; from pathlib import Path
d = Path(sys.argv[1]) / 'test' / '0-a'; d.mkdir(parents=True)
Image.fromarray(np.zeros((28, 28), np.uint8)).save(d / 'x.png')" "$WORK/photos"
needs_extra images "$V/dgate-export" score "$WORK/bundle" --data "folder:$WORK/photos" -o "$WORK/f.csv" --no-progress
[ ! -e "$WORK/bench.png" ] && [ ! -e "$WORK/repo_native" ] && [ ! -e "$WORK/p.parquet" ] && [ ! -e "$WORK/f.csv" ] \
    || fail "a refused command left a file"
size=$(du -sm "$WORK/venv" | cut -f1)
echo "== venv size: ${size} MB (du -sm of the venv; goal: <= ${GOAL} MB); the largest parts (MB):"
du -sm "$WORK"/venv/lib/python3*/site-packages/* | sort -rn | head -n 10
tools=$(du -scm "$WORK"/venv/lib/python3*/site-packages/{pip,setuptools,pkg_resources,_distutils_hack} 2>/dev/null | tail -n 1 | cut -f1)
echo "(of which ${tools} MB are pip and setuptools, which every venv brings)"
"$V/python" -m pip list --format=freeze 2>/dev/null | tr '\n' ' '; echo
if [ "$size" -le "$GOAL" ]; then
    echo "goal met: ${size} MB <= ${GOAL} MB"
else
    fail "the plain venv is ${size} MB, over the goal of ${GOAL} MB"
fi
