"""Anomaly scores per image: f-AnoGAN's encoder (izi) vs AnoGAN's latent search (and a VAE), same images.

Usage::

    deepmorph simulate-anomalies --out bench.h5 --n-normal 500 --n-per-kind 300 --seed 1
    python benchmarks/anomaly.py --model runs/encoder --benchmark bench.h5 [--vae runs/vae32] [--steps 100] \
        [--vae-refine 30]

``--model`` is an encoder run (``deepmorph train anomaly-encoder``); ``--vae`` an optional VAE
run on stamps of the same size (``--vae-refine N`` adds a row for it with N robust latent-refit
steps, :func:`deepmorph.workflows.anomaly.robust_refit`). Every method scores the same images on
``--threads`` CPU threads (:func:`deepmorph.workflows.anomaly.evaluate_anomalies`); the table
gives the time per image, the speed-up over the latent search, ROC AUC for mergers/companions,
artefacts and all anomalies, and the mean IoU of the thresholded significance maps with the
injected masks (all anomalies, then per kind).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings

import torch

from deepmorph.workflows.anomaly import autoencoder_scorer, evaluate_anomalies


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="an encoder run (deepmorph train anomaly-encoder)")
    ap.add_argument("--benchmark", required=True, help="a benchmark file (deepmorph simulate-anomalies)")
    ap.add_argument("--vae", help="a VAE run on stamps of the same size (its reconstruction error is a third score)")
    ap.add_argument("--vae-refine", type=int, default=0,
                    help="also score the VAE with this many robust latent-refit steps (0: no such row) [0]")
    ap.add_argument("--pixel-fpr", type=float, default=0.003,
                    help="false-positive rate of residual-map pixels on normal galaxies, for the IoU [0.003]")
    ap.add_argument("--steps", type=int, default=100, help="latent-search steps of AnoGAN [100]")
    ap.add_argument("--max-per-kind", type=int, help="score at most this many images of each kind")
    ap.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    ap.add_argument("--reduce", choices=["sum", "max", "scan"], default="scan",
                    help="residual statistic R (scan: calibrated matched-filter scan) [scan]")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    extra = {"vae": autoencoder_scorer(args.vae)} if args.vae else None
    if args.vae and args.vae_refine:
        extra[f"vae, refit {args.vae_refine} steps"] = autoencoder_scorer(args.vae, refine_steps=args.vae_refine)
    with tempfile.TemporaryDirectory() as out:
        table = evaluate_anomalies(args.model, args.benchmark, out, steps=args.steps, extra=extra,
                                   max_per_kind=args.max_per_kind, figures=False, reduce=args.reduce,
                                   pixel_fpr=args.pixel_fpr)
    search = {row["method"]: float(row["seconds_per_image"]) for row in table}.get("anogan")
    print(f"\nAnomaly scores of {args.benchmark} on {args.threads} CPU threads (AnoGAN: {args.steps} latent steps, "
          f"R = {args.reduce})\n")
    kinds = [c[4:] for c in table.colnames if c.startswith("iou_") and c != "iou_all"]
    print("| method | ms per image | speed-up vs latent search | AUC mergers | AUC artefacts | AUC all | IoU | "
          + " | ".join(f"IoU {k}" for k in kinds) + " |")
    print("|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(kinds))
    for row in table:
        seconds = float(row["seconds_per_image"])
        ratio = f"{search / seconds:,.0f}x" if search else "-"
        iou = f"{float(row['iou_all']):.2f}" if "iou_all" in table.colnames else "-"
        print(f"| {row['method']} | {1e3 * seconds:.3g} | {ratio} | {float(row['auc_mergers']):.3f} | "
              f"{float(row['auc_artefacts']):.3f} | {float(row['auc_all']):.3f} | {iou} | "
              + " | ".join(f"{float(row['iou_' + k]):.2f}" for k in kinds) + " |")
    print(f"\nIoU: residual maps thresholded at a pixel false-positive rate of {args.pixel_fpr:g} on normal galaxies")
    return 0


if __name__ == "__main__":
    sys.exit(main())
