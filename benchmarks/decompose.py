"""Bulge/disk decomposition per galaxy: the U-Net vs a 2-component imfit fit, on the same CPU cores.

Usage::

    python benchmarks/decompose.py --model runs/decompose      # a trained run: speed and accuracy
    python benchmarks/decompose.py                               # random weights: speed only

Simulates ``--n`` CANDELS-like 64x64 bulge + disk galaxies brighter than H = 22 (the tour's
decomposition priors), decomposes them with the U-Net (batched, ``--threads`` torch threads) and
with :func:`deepmorph.measure.bulgedisk.fit_bulge_disk` (imfit's LM solver, ``--threads``
processes: the same cores), and prints a markdown table: wall time per galaxy, the ratio, and,
with a trained model, the RMS B/T error of both against the truth.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch

from deepmorph.measure.bulgedisk import fit_bulge_disk
from deepmorph.models import UNet
from deepmorph.simulate import Priors, Simulator
from deepmorph.tasks import Decomposer
from deepmorph.workflows.decompose import component_table, decompose_images, load_decomposer


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a decomposition run directory (default: an untrained depth-3, width-16 U-Net)")
    ap.add_argument("--n", type=int, default=100, help="galaxies")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, and imfit processes")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    priors = Priors(mag=(18.0, 22.0), bulge_n=(2.0, 6.0), log10_bulge_hlr_pix=(0.0, 0.8),
                    log10_disk_hlr_pix=(0.6, 1.4))
    sim = Simulator("candels-f160w", 64, priors=priors, components=True)
    out = sim.simulate(np.arange(args.n), seed=args.seed)
    images, cat = out["images"], out["catalog"]
    truth_bt = np.asarray(cat["bulge_to_total"])

    if args.model:
        decomposer, _ = load_decomposer(args.model)
    else:
        decomposer = Decomposer(UNet(1, 2, depth=3, width=16)).eval()
    decompose_images(decomposer, images[:8])  # warm-up
    t0 = time.perf_counter()
    pred = decompose_images(decomposer, images)
    unet_s = (time.perf_counter() - t0) / args.n
    unet_bt = np.asarray(component_table(pred, cat["id"])["bulge_to_total"])

    psf = sim.renderer.psf_image(25).numpy()
    t0 = time.perf_counter()
    fits = fit_bulge_disk(images, psf, sim.noise.sky_sigma, gain=sim.noise.gain_e_per_count, n_jobs=args.threads,
                          progress=False)
    imfit_s = (time.perf_counter() - t0) / args.n
    ok = np.asarray(fits["converged"], bool)
    imfit_bt = np.asarray(fits["bulge_to_total"], dtype=float)

    def rms(x):
        return float(np.sqrt(np.nanmean(x**2)))

    print(f"\nBulge/disk decomposition of {args.n} 64x64 CANDELS-like galaxies (H < 22) on {args.threads} CPU "
          f"threads/processes{'' if args.model else ' (untrained U-Net: speed only)'}\n")
    print("| method | ms per galaxy (wall) | speed-up | RMS B/T error (imfit's converged fits) | failed fits |")
    print("|---|---:|---:|---:|---:|")
    acc_u = f"{rms(unet_bt[ok] - truth_bt[ok]):.3f}" if args.model else "-"
    print(f"| U-Net (batched) | {1e3 * unet_s:.2f} | {imfit_s / unet_s:,.0f}x | {acc_u} | - |")
    print(f"| imfit Sersic + exponential (LM) | {1e3 * imfit_s:.1f} | 1x | {rms(imfit_bt[ok] - truth_bt[ok]):.3f} | "
          f"{int((~ok).sum())} |")
    print(f"\nimfit single-process fit time: mean {1e3 * np.nanmean(fits['fit_seconds']):.0f} ms, "
          f"median {1e3 * np.nanmedian(fits['fit_seconds']):.0f} ms per galaxy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
