#!/usr/bin/env bash
# One GPU session: train the full-size clump and decomposition U-Nets (for the held-out numbers,
# scored afterwards on the CPU with `deepmorph` itself), and time the GPU paths. (The reported
# decomposition model ran 40 epochs, then 30 more from those weights at --lr 5e-4; 70 in one go
# is the equivalent here.) Usage:
#   bash benchmarks/gpu_train_and_time.sh OUT_DIR
# Needs deepmorph importable (PYTHONPATH=src) and a CUDA GPU.
set -u
OUT=${1:?output folder}
mkdir -p "$OUT" /tmp/gpu
export PYTHONUNBUFFERED=1
DM="python3 -m deepmorph.cli"
FAST="--accelerator gpu --quiet --set deterministic=false"
nvidia-smi -L
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

step "simulate clumps"
timeout 120 $DM simulate --n 30000 --out /tmp/gpu/clumps.h5 --clumps --components --seed 11 --device cuda \
  --log10-disk-hlr-pix 0.6 1.4 --no-progress --batch-size 4096
step "train clumps"
timeout 200 $DM train clumps --data /tmp/gpu/clumps.h5 --out /tmp/gpu/runs/clumps --no-evaluate --epochs 30 \
  --batch-size 128 --set model.kwargs.width=32 --patience 8 $FAST
tail -3 /tmp/gpu/runs/clumps/history.csv

step "simulate decompose"
timeout 120 $DM simulate --n 30000 --out /tmp/gpu/bd.h5 --components --mag 18 23 --bulge-n 2 6 \
  --log10-bulge-hlr-pix 0.0 0.8 --log10-disk-hlr-pix 0.6 1.4 --seed 12 --device cuda --no-progress --batch-size 4096
step "train decompose"
timeout 400 $DM train decompose --data /tmp/gpu/bd.h5 --out /tmp/gpu/runs/decompose --no-evaluate --epochs 70 \
  --batch-size 128 --patience 10 $FAST
tail -3 /tmp/gpu/runs/decompose/history.csv
tar czf "$OUT/runs.tgz" -C /tmp/gpu --exclude checkpoints --exclude tb runs

step "benchmarks"
timeout 60 python3 benchmarks/unet.py --devices cuda --size 4096
timeout 60 python3 benchmarks/simulate.py --n-galsim 0 --n-ours 1024 --threads 16
timeout 90 python3 benchmarks/train.py --device cuda --n 32768 --epochs 2 --batch-size 256
step "done"
