#!/usr/bin/env bash
# End-to-end demo on Fashion-MNIST (the Debian package dataset-fashion-mnist):
#   1. gate: train a small zoo ResNet-20 briefly (no --weights), attach 3 d-gates, train them with the
#      backbone frozen, calibrate thresholds on the validation split for at most 1 point of accuracy
#      drop, report un-gated vs gated accuracy and FLOPs on the test split.
# Sized for a 2-core CPU: ResNet-20 with a stride-2 stem (14x14 feature maps, ~15.5 MFLOPs per image)
# and one backbone epoch. More epochs give a better backbone: BACKBONE_EPOCHS=3 scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/demo}
BACKBONE_EPOCHS=${BACKBONE_EPOCHS:-1}
mkdir -p "$OUT"

echo "== gate: train backbone, attach and train d-gates, calibrate (--max-drop 0.01) =="
"$PYTHON" cli.py gate --arch resnet20 --arch-kwargs '{"stem_stride": 2}' --data fashion-mnist \
    --backbone-epochs "$BACKBONE_EPOCHS" --epochs 10 --max-drop 0.01 -o "$OUT/model.pt"
