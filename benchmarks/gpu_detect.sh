#!/usr/bin/env bash
# One GPU session for the Mask R-CNN field detector (issue 7) at a size a CPU cannot train: simulate
# 4,000 CANDELS F160W fields of 128 px (~80,000 galaxies and stars), train the ResNet-18-FPN detector
# on them (FPN and mask head at 128 channels, 30 epochs, batch 16), score it and sep on 300
# independent fields, time inference against sep, and run it on the real NTT frame and the Hubble
# Deep Field image. Prepared, not yet run: the times are estimates (an H100: ~60 s of simulation,
# <= 7 min of training). The run comes back as OUT/detect.tgz (model.pt, history, metrics, figures).
# Usage:
#   bash benchmarks/gpu_detect.sh OUT_DIR
# Needs deepmorph importable (PYTHONPATH=src) and a CUDA GPU.
set -u
OUT=${1:?output folder}
mkdir -p "$OUT" /tmp/gpu
export PYTHONUNBUFFERED=1
DM="python3 -m deepmorph.cli"
nvidia-smi -L
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

step "simulate"
timeout 240 $DM simulate-fields --n 4000 --size 128 --seed 11 --out /tmp/gpu/fields.h5 --device cuda --no-progress &
timeout 240 $DM simulate-fields --n 300 --size 128 --seed 12 --out /tmp/gpu/fields_test.h5 --no-progress &
wait
step "train"
timeout ${TRAIN_S:-420} $DM train detect --data /tmp/gpu/fields.h5 --out /tmp/gpu/detect --epochs 30 \
  --batch-size 16 --lr 2e-3 --accelerator gpu --num-workers 6 --map-every 2 --patience 20 --quiet \
  --fractions 0.95 0.025 0.025 \
  --set deterministic=false --set model.kwargs.fpn_channels=128 --set model.kwargs.mask_channels=128 \
  --set model.kwargs.mask_layers=4 --set model.kwargs.box_head_size=512 --set model.kwargs.box_batch_size_per_image=256 \
  > /tmp/gpu/train.log 2>&1
grep -v -i "warn\|deprecat\|tip" /tmp/gpu/train.log | tail -8
tail -3 /tmp/gpu/detect/history.csv
step "evaluate"
timeout 150 $DM evaluate detect --model /tmp/gpu/detect --data /tmp/gpu/fields_test.h5 --out /tmp/gpu/detect/eval_300
timeout 60 python3 benchmarks/detect.py --model /tmp/gpu/detect --data /tmp/gpu/fields_test.h5 --n 100 --device cuda
timeout 60 python3 benchmarks/detect.py --model /tmp/gpu/detect --data /tmp/gpu/fields_test.h5 --n 20 --device cpu
timeout 90 python3 -c "
from deepmorph.workflows.detect import detect_real
for name in ('ntt', 'hdf'):
    print(name, detect_real('/tmp/gpu/detect', name, '/tmp/gpu/detect/real', device='cuda'))
"
tar czf "$OUT/detect.tgz" -C /tmp/gpu --exclude tb --exclude checkpoints detect
ls -la "$OUT"
step "done"
