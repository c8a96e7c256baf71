"""Single-Sersic morphometry per galaxy: CNNs vs a 1-component imfit fit, on the same CPU cores.

Usage::

    python benchmarks/morphometry.py --model runs/morph              # a trained run: speed and accuracy
    python benchmarks/morphometry.py --model runs/a runs/b           # several runs, one row each
    python benchmarks/morphometry.py --model runs/a --neighbors      # every galaxy with 1-2 companions
    python benchmarks/morphometry.py                                 # random weights: speed only

Simulates ``--n`` CANDELS-like 64x64 single-Sersic galaxies brighter than H = 23 (the whole galaxy is
the Sersic "bulge", as the morphometry CNN is trained; with ``--neighbors`` each has one or two
companions, -1 to +3 mag, as ``deepmorph simulate --neighbors`` draws them), measures them with each
CNN (:func:`deepmorph.workflows.morphometry.measure`, batched on ``--threads`` torch threads) and with
:func:`deepmorph.measure.bulgedisk.fit_sersic` (imfit's LM solver, ``--threads`` processes: the same
cores; with ``--neighbors`` the companions' sep segments are masked, as imfit's manual advises), and
prints a markdown table: wall time per galaxy, the ratio, and the NMAD scatter and outlier fraction of
each parameter's errors against the truth (mag in mag, hlr and n as fractions, q absolute, PA in
degrees), every method on the same galaxies: those imfit's fit converged on.

A CNN's time per galaxy is its steady-state rate on ``--n-cnn`` galaxies (the run is loaded once,
as for a survey catalogue; the load time is printed apart).
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
from deepmorph.workflows.morphometry import OUTLIER, PARAMETERS, measure, nmad, parameter_errors

#: Parameter -> (column of fit_sersic's table, factor to the CNN's unit (hlr in arcsec), header).
IMFIT = {"mag": ("mag", 1.0, "mag"), "hlr": ("hlr_pix", None, "hlr (frac.)"), "n": ("sersic_n", 1.0, "n (frac.)"),
         "q": ("q", 1.0, "q"), "pa": ("pa_deg", 1.0, "PA (deg)")}


@torch.no_grad()
def _forward(model, norm, images: np.ndarray, batch_size: int = 256) -> None:
    """An untrained network's batched forward pass, as :func:`measure` runs it (speed only)."""
    for start in range(0, len(images), batch_size):
        model(norm(torch.as_tensor(np.asarray(images[start:start + batch_size], dtype=np.float32))))


def _cnn_rows(runs, images: np.ndarray, timing_images: np.ndarray, sky_sigma: float) -> list:
    """``(name, seconds per galaxy, {parameter: values} or {}, load ms)`` per run (or an untrained CNN)."""
    if not runs:
        from deepmorph.data import Normalization
        from deepmorph.training import build_model
        from deepmorph.workflows.morphometry import coder_for, default_config

        model = build_model(default_config(), in_channels=1, num_outputs=2 * coder_for().size).eval()
        norm = Normalization("asinh", scale=sky_sigma)
        _forward(model, norm, timing_images[:8])  # warm-up
        t0 = time.perf_counter()
        _forward(model, norm, timing_images)
        return [("CNN (untrained, default config)", (time.perf_counter() - t0) / len(timing_images), {}, None)]
    from deepmorph.workflows.morphometry import load_morphometer

    rows = []
    for run in runs:
        measure(run, timing_images[:8])  # warm-up (and the first imports)
        t0 = time.perf_counter()
        load_morphometer(run)
        load_ms = 1e3 * (time.perf_counter() - t0)
        t0 = time.perf_counter()
        measure(run, timing_images)
        seconds = (time.perf_counter() - t0 - load_ms / 1e3) / len(timing_images)
        values = {name: value for name, (value, _) in measure(run, images).items()}
        rows.append((f"CNN {run}", seconds, values, load_ms))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="*", default=[], help="morphometry run directories (default: an untrained CNN "
                                                           "of default_config()'s shape)")
    ap.add_argument("--n", type=int, default=100, help="galaxies fitted by imfit and scored [100]")
    ap.add_argument("--n-cnn", type=int, default=4096, help="galaxies timing each CNN [4096]")
    ap.add_argument("--neighbors", action="store_true", help="every galaxy with 1-2 companions; imfit masks them")
    ap.add_argument("--threads", type=int, default=2, help="torch threads, and imfit processes")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    priors = Priors(mag=(18.0, 23.0), bulge_to_total=(1.0, 1.0), neighbor_fraction=1.0)
    sim = Simulator("candels-f160w", 64, priors=priors, neighbors=args.neighbors)
    out = sim.simulate(np.arange(max(args.n, args.n_cnn)), seed=args.seed)
    timing_images = out["images"][:args.n_cnn]
    images, cat = out["images"][:args.n], out["catalog"]
    truth = {name: np.asarray(cat[column], dtype=float)[:args.n] for name, (column, _, _) in PARAMETERS.items()}

    rows = _cnn_rows(args.model, images, timing_images, sim.noise.sky_sigma)
    psf = sim.renderer.psf_image(25).numpy()
    t0 = time.perf_counter()
    fits = fit_sersic(images, psf, sim.noise.sky_sigma, gain=sim.noise.gain_e_per_count, n_jobs=args.threads,
                      progress=False, zeropoint_mag=sim.zeropoint, mask_neighbours=args.neighbors)
    imfit_s = (time.perf_counter() - t0) / args.n
    ok = np.asarray(fits["converged"], bool)
    imfit = {name: np.asarray(fits[col], dtype=float) * (factor or sim.pixel_scale)
             for name, (col, factor, _) in IMFIT.items()}
    label = "imfit single Sersic (LM" + (", companions masked)" if args.neighbors else ")")
    rows.append((label, imfit_s, imfit, None))

    def scatter(values: dict, name: str) -> str:
        if name not in values:
            return "-"
        errors = parameter_errors(name, truth[name][ok], np.asarray(values[name], dtype=float)[ok])
        x = nmad(errors)
        outliers = 100 * np.mean(np.abs(errors) > OUTLIER[name])
        return (f"{x:.2f}" if name == "pa" else f"{x:.3f}") + f" ({outliers:.0f}%)"

    where = "with 1-2 companions each" if args.neighbors else "isolated"
    print(f"\nSingle-Sersic morphometry of {args.n} 64x64 CANDELS-like galaxies (H < 23, {where}) on "
          f"{args.threads} CPU threads/processes; NMAD scatter of the errors (outlier fraction) on imfit's "
          f"{int(ok.sum())} converged fits; CNN speed on {len(timing_images)} galaxies\n")
    heads = " | ".join(f"NMAD {head}" for _, _, head in IMFIT.values())
    print(f"| method | ms per galaxy (wall) | speed-up vs imfit | {heads} |")
    print("|---|---:|---:|" + "---:|" * len(IMFIT))
    for name, seconds, values, _ in rows:
        print(f"| {name} | {1e3 * seconds:.3g} | {imfit_s / seconds:,.0f}x | "
              + " | ".join(scatter(values, p) for p in IMFIT) + " |")
    print(f"\nimfit: {int((~ok).sum())} failed fits; single-process fit time mean "
          f"{1e3 * np.nanmean(fits['fit_seconds']):.0f} ms, median {1e3 * np.nanmedian(fits['fit_seconds']):.0f} ms")
    for name, _, _, load_ms in rows:
        if load_ms is not None:
            print(f"{name}: loading the run takes {load_ms:.0f} ms once")
    return 0


if __name__ == "__main__":
    sys.exit(main())
