#!/usr/bin/env bash
# The main job on the embedded default (LiteMedSAM, `cpu` preset): generate the fundus-like demo data, train on its 16
# training pairs through the MONAI bundle (starting from the bundle's default weights), then segment the 16 held-out
# images with K = 4 supports, print Dice per object and write overlay PNGs to runs/demo/evaluate/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
CFG="bundle/configs/train.json','configs/cpu.json','configs/demo.json"
start=$(date +%s)
[ -f data/demo/fundus/dataset.json ] || $PY scripts/make_demo_data.py --out data/demo --families fundus
$PY -m monai.bundle run training --config_file "['$CFG']"
$PY -m monai.bundle run --config_file "['$CFG','bundle/configs/evaluate.json']" \
    --ckpt_path runs/demo/model.pt --output_dir runs/demo/evaluate
echo "main job done in $(( $(date +%s) - start )) s: Dice in runs/demo/evaluate/metrics.json, overlays beside it"
