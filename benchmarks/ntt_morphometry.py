"""Morphometry of a real frame end to end: the NTT/EMMI R-band field against SExtractor's catalogue.

Usage::

    python benchmarks/ntt_morphometry.py                      # train a model for the frame, then measure
    python benchmarks/ntt_morphometry.py --model runs/ntt     # reuse a trained frame model

Derives the frame's simulation settings from the frame itself
(:func:`deepmorph.workflows.field.frame_settings`: PSF FWHM from its stars, gain from its sky
level and rms, fluxes and sizes from its sources, its own cutouts as the noise), simulates
``--n`` single-Sersic galaxies like that and trains the small frame CNN for ``--epochs``
(:func:`~deepmorph.workflows.field.train_frame_model`), then detects the frame's sources with sep
using SExtractor's own settings (``default.sex``: no deblending, Kron parameters 2.5, 0.0,
saturation 50000 ADU), measures them with the CNN (:func:`~deepmorph.workflows.field.measure_field`)
and compares with SExtractor's ``image.cat`` (:func:`~deepmorph.workflows.field.compare_with_sextractor`).
Prints a markdown table: matched fraction, median |delta mag| of the CNN and of sep's AUTO
magnitude against SExtractor's FLUX_AUTO (all matched sources, and the unflagged ones), the
median signed offsets (the CNN's magnitude is a total one; a Kron aperture misses some light),
the median position offset and N; writes the catalogue, the comparison figure and the numbers
as JSON under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

from deepmorph.workflows.field import frame_end_to_end

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ntt_emmi_field"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with image.fits, image.cat, default.sex")
    ap.add_argument("--model", type=Path, help="a trained frame model (default: train one into --out)")
    ap.add_argument("--out", type=Path, default=Path("runs/ntt"), help="output folder [runs/ntt]")
    ap.add_argument("--zeropoint", type=float, default=25.0, help="AB zero point of one ADU [25]")
    ap.add_argument("--pixel-scale", type=float, default=1.0, help="arcsec per pixel (default.sex's PIXEL_SCALE) [1]")
    ap.add_argument("--n", type=int, default=12000, help="simulated training galaxies [12000]")
    ap.add_argument("--epochs", type=int, default=10, help="training epochs [10]")
    ap.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    image, cat, config = (args.data / name for name in ("image.fits", "image.cat", "default.sex"))
    for path in (image, cat, config):
        if not path.is_file():
            print(f"ntt_morphometry: {path} not found (see ../shared/data/README.md)", file=sys.stderr)
            return 2
    start = time.perf_counter()
    done = frame_end_to_end(image, cat, config, args.out, args.zeropoint, args.pixel_scale, n=args.n,
                            epochs=args.epochs, model=args.model)
    settings, result, r = done["settings"], done["training"], done["comparison"]
    print("## Frame-derived simulation settings\n")
    for key in ("psf_fwhm_pix", "n_stars", "gain_e_per_count", "sky_level", "sky_rms", "zeropoint_mag", "mag_range",
                "log10_hlr_pix_range", "stamp_size"):
        print(f"- {key}: {getattr(settings, key)}")
    print(f"- deepmorph {' '.join(settings.simulate_argv(args.out / 'simulations.h5', args.n))}\n", flush=True)
    if result is not None:
        m = result["mag"]
        print(f"trained on {result['train_size']} simulated galaxies, {result['epochs_run']} epochs, "
              f"{result['train_seconds']:.0f} s; simulated test set: mag bias {m['bias']:+.3f}, scatter "
              f"{m['scatter']:.3f}, hlr scatter {result['hlr']['scatter']:.3f} (fraction)\n", flush=True)
    print("## CNN and sep vs SExtractor FLUX_AUTO on the NTT/EMMI frame\n")
    print("| quantity | all matched | unflagged |")
    print("|---|---|---|")
    print(f"| matched fraction (within {r['radius_pix']:g} px) | {r['n_matched']}/{r['n_sextractor']} = "
          f"{r['matched_fraction']:.3f} | |")
    print(f"| median position offset (px) | {r['median_offset_pix']:.2g} | |")
    for key, label in (("cnn", "CNN mag"), ("sep", "sep MAG_AUTO")):
        a, c = r[key], r[f"{key}_clean"]
        print(f"| median abs(delta mag), {label} vs FLUX_AUTO | {a['median_abs_dmag']:.3f} | "
              f"{c['median_abs_dmag']:.3f} |")
        print(f"| median delta mag, {label} - FLUX_AUTO | {a['median_dmag']:+.3f} | {c['median_dmag']:+.3f} |")
        print(f"| N, {label} | {a['n']} | {c['n']} |")
    verdict = "PASS" if r["cnn"]["median_abs_dmag"] <= 0.2 else "FAIL"
    print(f"\ntarget median abs(delta mag) <= 0.2: {verdict}; wall time {time.perf_counter() - start:.0f} s; "
          f"catalogue {args.out / 'catalog.ecsv'}, figure {args.out / 'comparison.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
