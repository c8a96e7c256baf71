#!/usr/bin/env bash
# One GPU session for the morphometry speed/accuracy trade-off: simulate 300,000 isolated
# single-Sersic CANDELS-like galaxies (H = 18-23) on the GPU, then train the three strided
# morphometry CNNs of benchmarks/configs/morph_stride_{s,m,l}.yaml side by side on it, and one
# small model on galaxies with neighbours. The runs come back as OUT/RUN.tgz (checkpoints
# only where training was cut short) and are scored on the CPU with `python benchmarks/morphometry.py --model RUN`. Usage:
#   bash benchmarks/gpu_morphometry.sh OUT_DIR
# Needs deepmorph importable (PYTHONPATH=src) and a CUDA GPU.
set -u
OUT=${1:?output folder}
mkdir -p "$OUT" /tmp/gpu/runs
export PYTHONUNBUFFERED=1
DM="python3 -m deepmorph.cli"
FAST="--accelerator gpu --quiet --set deterministic=false --num-workers 3 --fractions 0.96 0.02 0.02"
nvidia-smi -L
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

step "simulate"
timeout 150 $DM simulate --n 300000 --out /tmp/gpu/sersic.h5 --bulge-to-total 1 1 --mag 18 23 --seed 101 \
  --device cuda --no-progress --batch-size 8192 &
timeout 150 $DM simulate --n 150000 --out /tmp/gpu/sersic_nbr.h5 --bulge-to-total 1 1 --mag 18 23 --seed 102 \
  --neighbors --neighbor-fraction 0.5 --device cuda --no-progress --batch-size 8192 &
wait
step "train"
for size in s m l; do
  timeout ${TRAIN_S:-330} $DM train morphometry --data /tmp/gpu/sersic.h5 --out /tmp/gpu/runs/stride_$size \
    --config benchmarks/configs/morph_stride_$size.yaml $FAST > /tmp/gpu/train_$size.log 2>&1 &
done
timeout ${TRAIN_S:-330} $DM train morphometry --data /tmp/gpu/sersic_nbr.h5 --out /tmp/gpu/runs/stride_s_nbr \
  --config benchmarks/configs/morph_stride_s.yaml $FAST > /tmp/gpu/train_s_nbr.log 2>&1 &
wait
for f in /tmp/gpu/train_*.log; do echo "-- $f"; grep -v -i "warn\|deprecat\|tip" "$f" | tail -8; done
for d in /tmp/gpu/runs/*; do echo "-- $d"; tail -2 "$d/history.csv"; done
for d in /tmp/gpu/runs/*; do  # one archive per run; the checkpoints only where training was cut short
  skip=checkpoints; [ -f "$d/model.pt" ] || skip=none
  tar czf "$OUT/$(basename "$d").tgz" -C /tmp/gpu/runs --exclude tb --exclude "$skip" "$(basename "$d")"
done
ls -la "$OUT"
step "done"
