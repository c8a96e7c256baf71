"""Image recovery: a U-Net trained with L1 and as a pix2pix cGAN, against Richardson-Lucy, on the same pairs.

Usage::

    python benchmarks/recover.py                                  # laptop size: 4,000 pairs of 64 px, 10 epochs
    python benchmarks/recover.py --n 3000 --epochs 6 --width 16   # ~15-20 min on 2 busy CPU cores

Simulates ``--n`` CANDELS-like pairs (``deepmorph simulate-pairs``: the degraded PSF ``--psf-factor``
times wider, ``--noise-factor`` times the sky noise), trains the same U-Net with the L1 loss and
with pix2pix's loss (adversarial + 100 L1 against a PatchGAN) on 80% of them, and scores the
degraded input, Richardson-Lucy (known kernel, iterations chosen on the validation pairs) and both
networks on the held-out 10% (:func:`deepmorph.workflows.recover.evaluate_recovery`). Prints a
markdown table: PSNR, the errors of the recovered half-light radius, ellipticity and flux against
the noise-free original, and the wall time per image on ``--threads`` threads. Runs resume: rerun
to finish an interrupted one.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch

from deepmorph.simulate.pairs import write_pairs
from deepmorph.workflows.recover import default_config, evaluate_recovery, train_recover

#: Schawinski et al. (2017), their Table 1 (PSNR on 8-bit asinh-stretched SDSS colour images).
PUBLISHED = {"cGAN": 37.2, "blind deconvolution": 19.9}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/bench_recover"), help="output folder [runs/bench_recover]")
    ap.add_argument("--n", type=int, default=4000, help="pairs [4000]")
    ap.add_argument("--stamp-size", type=int, default=64, help="[64]")
    ap.add_argument("--psf-factor", type=float, default=2.0, help="[2]")
    ap.add_argument("--noise-factor", type=float, default=2.0, help="[2]")
    ap.add_argument("--epochs", type=int, default=10, help="epochs of each network [10]")
    ap.add_argument("--width", type=int, default=32, help="U-Net's first width [32]")
    ap.add_argument("--d-width", type=int, default=32, help="PatchGAN's first width [32]")
    ap.add_argument("--batch-size", type=int, default=32, help="[32]")
    ap.add_argument("--lr", type=float, default=1e-3, help="[1e-3]")
    ap.add_argument("--lambda-l1", type=float, default=100.0, help="[100]")
    ap.add_argument("--max-test", type=int, help="score at most this many test pairs [all]")
    ap.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / f"pairs_{args.n}_{args.stamp_size}.h5"
    t0 = time.perf_counter()
    if not data.is_file():
        write_pairs(data, args.n, seed=args.seed, stamp_size=args.stamp_size, psf_factor=args.psf_factor,
                    noise_factor=args.noise_factor, progress=False)
    print(f"{data}: {args.n} pairs in {time.perf_counter() - t0:.0f} s", flush=True)
    config = default_config(epochs=args.epochs, batch_size=args.batch_size, progress_bar=False, seed=args.seed,
                            **{"model.kwargs.width": args.width, "optimizer.lr": args.lr})
    runs, seconds = [], {}
    for loss in ("l1", "gan"):
        run = args.out / f"unet_{loss}"
        t0 = time.perf_counter()
        r = train_recover(data, run, config, loss=loss, lambda_l1=args.lambda_l1, d_width=args.d_width,
                          evaluate=False)
        seconds[loss] = time.perf_counter() - t0
        print(f"{run}: {r['epochs_run']} epochs on {r['train_size']} pairs in {seconds[loss]:.0f} s, validation PSNR "
              f"{r['val_psnr']:.2f} dB", flush=True)
        runs.append(run)
    table = evaluate_recovery(runs, data, args.out / "evaluation", max_test=args.max_test)

    print(f"\nImage recovery on {table.meta['n_test']} held-out {args.stamp_size}x{args.stamp_size} CANDELS-like pairs "
          f"(PSF FWHM x{args.psf_factor:g}, sky noise x{args.noise_factor:g}); U-Net width {args.width}, "
          f"{args.epochs} epochs on {r['train_size']} pairs; {args.threads} CPU threads\n")
    print("| method | PSNR (dB) | PSNR vs noise-free (dB) | median abs hlr error | median abs e error | "
          "median abs flux error | ms per image |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in table:
        psnr = "-" if row["method"] == "original" else f"{row['psnr_db']:.2f}"
        print(f"| {row['label']} | {psnr} | {row['psnr_clean_db']:.2f} | {100 * row['hlr_rel_err']:.2f}% | "
              f"{row['e_abs_err']:.4f} | {100 * row['flux_rel_err']:.2f}% | {row['ms_per_image']:.2f} |")
    print(f"\nRichardson-Lucy: {table.meta['rl_iterations']} iterations (best mean PSNR on validation pairs). "
          "Errors are against the same measurement (adaptive moments, curve of growth) on the noise-free original; "
          "the 'original' row is the noisy original itself (the noise floor).")
    print(f"Published (Schawinski et al. 2017, SDSS, 8-bit asinh-stretched colour images, not this scale): cGAN "
          f"{PUBLISHED['cGAN']} dB, blind deconvolution {PUBLISHED['blind deconvolution']} dB.")
    print(f"Training: L1 {seconds['l1']:.0f} s, cGAN {seconds['gan']:.0f} s. Files in {args.out / 'evaluation'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
