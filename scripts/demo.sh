#!/usr/bin/env bash
# End-to-end demo on Fashion-MNIST (the Debian package dataset-fashion-mnist):
#   1. gate: train a small zoo ResNet-20 briefly (no --weights), attach 3 d-gates (grid heads: pooling
#      to a few cells keeps where features fired; the paper's linear head is --head linear, the CLI
#      default), train them with the backbone frozen, calibrate thresholds on the validation split
#      with the default promise (accuracy drop at most 1 point on new data with probability >= 90%),
#      report un-gated vs gated accuracy and FLOPs on the test split.
#   2. build: per-segment ONNX graphs + the un-gated baseline, checked against torch -> engines/demo
#   3. bench: accuracy, exits, FLOPs, latency and throughput of the bundle vs the baseline, both on
#      ONNX Runtime (CPU), on the test split, with a threshold sweep and a plot.
# Sized for a 2-core CPU: ResNet-20 with a stride-2 stem (14x14 feature maps, ~15.5 MFLOPs per image)
# and one backbone epoch. More epochs give a better backbone: BACKBONE_EPOCHS=3 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/demo}
ENGINE=${ENGINE:-engines/demo}
BACKBONE_EPOCHS=${BACKBONE_EPOCHS:-1}
mkdir -p "$OUT"

echo "== gate: train backbone, attach and train d-gates, calibrate (--max-drop 0.01) =="
"$PYTHON" cli.py gate --arch resnet20 --arch-kwargs '{"stem_stride": 2}' --data fashion-mnist \
    --backbone-epochs "$BACKBONE_EPOCHS" --epochs 10 --head grid --max-drop 0.01 -o "$OUT/model.pt"

echo "== build: per-segment ONNX graphs, checker, parity with torch, manifest -> $ENGINE =="
"$PYTHON" cli.py build "$OUT/model.pt" -o "$ENGINE" --force

echo "== inspect =="
"$PYTHON" cli.py inspect "$ENGINE"

echo "== bench: gated vs un-gated on ONNX Runtime (CPU), Fashion-MNIST test split =="
"$PYTHON" cli.py bench --engine "$ENGINE" --data fashion-mnist --batch-sizes 1,256 --min-seconds 2 \
    --sweep --json "$OUT/bench.json" --plot "$OUT/bench.png"
echo "== done: $OUT/model.pt, $ENGINE/, $OUT/bench.json, $OUT/bench.png =="
