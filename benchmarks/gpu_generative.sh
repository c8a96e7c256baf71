#!/usr/bin/env bash
# One GPU session for issue 6: train the DCGAN, its izi encoder and two VAEs at full size, then
# score the anomaly benchmark here on the GPU machine's CPU. The runs come back as OUT/RUN.tgz
# (checkpoints only where training was cut short); score them again on the CPU with
# `python benchmarks/anomaly.py` and `deepmorph latent maps`. Usage:
#   bash benchmarks/gpu_generative.sh OUT_DIR
# Needs deepmorph importable (PYTHONPATH=src) and a CUDA GPU. About 9 minutes.
set -u
OUT=${1:?output folder}
mkdir -p "$OUT" /tmp/gen/runs
export PYTHONUNBUFFERED=1
DM="python3 -m deepmorph.cli"
FAST="--accelerator gpu --quiet --set deterministic=false --num-workers 3"
nvidia-smi -L
t0=$(date +%s)
step() { echo "== $1 ($(( $(date +%s) - t0 )) s)"; }

step "simulate"
timeout 120 $DM simulate-anomalies --out /tmp/gen/normal.h5 --n-normal 40000 --n-per-kind 0 --seed 0 --no-progress &
timeout 120 $DM simulate-anomalies --out /tmp/gen/bench.h5 --n-normal 1000 --n-per-kind 300 --seed 1 --no-progress &
timeout 120 $DM simulate --n 40000 --out /tmp/gen/bd48.h5 --stamp-size 48 --mag 18 23 --bulge-to-total 0 1 \
  --device cuda --no-progress --batch-size 8192 &
wait
step "train"
timeout 330 $DM train gan --data /tmp/gen/normal.h5 --out /tmp/gen/runs/gan --epochs 40 --batch-size 128 \
  --latent-dim 64 --spectral-norm --label-smoothing 0.1 --d-steps 1 --no-evaluate $FAST > /tmp/gen/gan.log 2>&1 &
timeout 330 $DM train vae --data /tmp/gen/bd48.h5 --out /tmp/gen/runs/vae48 --epochs 40 --batch-size 128 \
  --latent-dim 16 --no-evaluate $FAST > /tmp/gen/vae48.log 2>&1 &
timeout 330 $DM train vae --data /tmp/gen/normal.h5 --out /tmp/gen/runs/vae32 --epochs 40 --batch-size 128 \
  --latent-dim 16 --no-evaluate $FAST > /tmp/gen/vae32.log 2>&1 &
wait
step "encoder"
timeout 120 $DM train anomaly-encoder --model /tmp/gen/runs/gan --out /tmp/gen/runs/enc --epochs 15 \
  --batch-size 128 $FAST > /tmp/gen/enc.log 2>&1
for f in /tmp/gen/*.log; do echo "-- $f"; grep -v -i "warn\|deprecat\|tip" "$f" | tail -4; done
step "score"
timeout 150 python3 benchmarks/anomaly.py --model /tmp/gen/runs/enc --benchmark /tmp/gen/bench.h5 \
  --vae /tmp/gen/runs/vae32 --steps 100 --threads 16 --max-per-kind 300
for d in /tmp/gen/runs/*; do
  skip=checkpoints; [ -f "$d/model.pt" ] || skip=none
  tar czf "$OUT/$(basename "$d").tgz" -C /tmp/gen/runs --exclude tb --exclude "$skip" "$(basename "$d")"
done
ls -la "$OUT"
step "done"
