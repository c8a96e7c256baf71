"""Single-Sersic morphometry per galaxy: the CNN vs a 1-component imfit fit, on the same CPU cores.

Usage::

    python benchmarks/morphometry.py --model runs/morph      # a trained run: speed and accuracy
    python benchmarks/morphometry.py                          # random weights: speed only

Simulates ``--n`` CANDELS-like 64x64 single-Sersic galaxies brighter than H = 23 (the whole galaxy is
the Sersic "bulge", as the morphometry CNN is trained), measures them with the CNN
(:func:`deepmorph.workflows.morphometry.measure`, batched, ``--threads`` torch threads; without
``--model``, an untrained CNN of the same shape times the forward pass) and with
:func:`deepmorph.measure.bulgedisk.fit_sersic` (imfit's LM solver, ``--threads`` processes: the same
cores), and prints a markdown table: wall time per galaxy, the ratio, and the NMAD scatter of each
parameter's errors against the truth (mag in mag, hlr and n as fractions, q absolute, PA in degrees),
both methods on the same galaxies: those imfit's fit converged on.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import numpy as np
import torch

from deepmorph.measure.bulgedisk import fit_sersic
from deepmorph.simulate import Priors, Simulator
from deepmorph.workflows.morphometry import PARAMETERS, measure, nmad, parameter_errors

#: Parameter -> (column of fit_sersic's table, factor to the CNN's unit (hlr in arcsec), header).
IMFIT = {"mag": ("mag", 1.0, "mag"), "hlr": ("hlr_pix", None, "hlr (frac.)"), "n": ("sersic_n", 1.0, "n (frac.)"),
         "q": ("q", 1.0, "q"), "pa": ("pa_deg", 1.0, "PA (deg)")}


@torch.no_grad()
def _forward(model, norm, images: np.ndarray, batch_size: int = 256) -> None:
    """An untrained network's batched forward pass, as :func:`measure` runs it (speed only)."""
    for start in range(0, len(images), batch_size):
        model(norm(torch.as_tensor(np.asarray(images[start:start + batch_size], dtype=np.float32))))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a morphometry run directory (default: an untrained CNN of default_config()'s "
                                    "shape)")
    ap.add_argument("--n", type=int, default=100, help="galaxies")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, and imfit processes")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    sim = Simulator("candels-f160w", 64, priors=Priors(mag=(18.0, 23.0), bulge_to_total=(1.0, 1.0)))
    out = sim.simulate(np.arange(args.n), seed=args.seed)
    images, cat = out["images"], out["catalog"]
    truth = {name: np.asarray(cat[column], dtype=float) for name, (column, _, _) in PARAMETERS.items()}

    load_ms = None
    if args.model:
        from deepmorph.workflows.morphometry import load_morphometer

        measure(args.model, images[:8])  # warm-up (and the first imports)
        t0 = time.perf_counter()
        load_morphometer(args.model)
        load_ms = 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        cnn = {name: value for name, (value, _) in measure(args.model, images).items()}
        cnn_s = (time.perf_counter() - t0) / args.n
    else:
        from deepmorph.data import Normalization
        from deepmorph.training import build_model
        from deepmorph.workflows.morphometry import coder_for, default_config

        model = build_model(default_config(), in_channels=1, num_outputs=2 * coder_for().size).eval()
        norm = Normalization("asinh", scale=sim.noise.sky_sigma)
        _forward(model, norm, images[:8])  # warm-up
        t0 = time.perf_counter()
        _forward(model, norm, images)
        cnn_s = (time.perf_counter() - t0) / args.n
        cnn = {}

    psf = sim.renderer.psf_image(25).numpy()
    t0 = time.perf_counter()
    fits = fit_sersic(images, psf, sim.noise.sky_sigma, gain=sim.noise.gain_e_per_count, n_jobs=args.threads,
                      progress=False, zeropoint_mag=sim.zeropoint)
    imfit_s = (time.perf_counter() - t0) / args.n
    ok = np.asarray(fits["converged"], bool)
    imfit = {name: np.asarray(fits[col], dtype=float) * (factor or sim.pixel_scale)
             for name, (col, factor, _) in IMFIT.items()}

    def scatter(values: dict, name: str) -> str:
        if name not in values:
            return "-"
        x = nmad(parameter_errors(name, truth[name][ok], np.asarray(values[name], dtype=float)[ok]))
        return f"{x:.2f}" if name == "pa" else f"{x:.3f}"

    print(f"\nSingle-Sersic morphometry of {args.n} 64x64 CANDELS-like galaxies (H < 23) on {args.threads} CPU "
          f"threads/processes{'' if args.model else ' (untrained CNN: speed only)'}; NMAD scatter of the errors on "
          f"imfit's {int(ok.sum())} converged fits\n")
    heads = " | ".join(f"NMAD {head}" for _, _, head in IMFIT.values())
    print(f"| method | ms per galaxy (wall) | speed-up | {heads} | failed fits |")
    print("|---|---:|---:|" + "---:|" * len(IMFIT) + "---:|")
    print(f"| CNN (batched) | {1e3 * cnn_s:.2f} | {imfit_s / cnn_s:,.0f}x | "
          + " | ".join(scatter(cnn, name) for name in IMFIT) + " | - |")
    print(f"| imfit single Sersic (LM) | {1e3 * imfit_s:.1f} | 1x | "
          + " | ".join(scatter(imfit, name) for name in IMFIT) + f" | {int((~ok).sum())} |")
    print(f"\nimfit single-process fit time: mean {1e3 * np.nanmean(fits['fit_seconds']):.0f} ms, "
          f"median {1e3 * np.nanmedian(fits['fit_seconds']):.0f} ms per galaxy")
    if load_ms is not None:
        print(f"The CNN's time includes loading the run once per measure() call ({load_ms:.0f} ms).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
