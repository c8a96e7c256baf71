"""Simulation speed and accuracy: deepmorph vs GalSim on the same parameter draws, in one run.

Usage::

    python benchmarks/simulate.py                      # CPU, plus CUDA when present
    python benchmarks/simulate.py --write 100000       # also time writing 100k stamps to HDF5

Prints a markdown table: stamps/s of GalSim (``Convolve(Sersic + Exponential, Moffat)``,
``drawImage``, one stamp at a time, as GalSim users run it), of the deepmorph renderer
(noise-free, same PSF) and of the full simulator (priors, rendering, noise, catalogue),
with the speed-up ratio and the relative L2 error against GalSim on the same galaxies.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from deepmorph.simulate import Simulator


def galsim_stamps(catalog: dict, n: int, stamp: int, scale: float, psf: dict) -> np.ndarray:
    """GalSim, one stamp at a time as its users run it (``Convolve(Sersic + Exponential, Moffat)``)."""
    from deepmorph.simulate.reference import catalog_rows, galsim_stamp

    return np.asarray([galsim_stamp(row, stamp, scale, psf) for row in catalog_rows(catalog, n)])


def rate(fn, n: int, device: str) -> float:
    fn()  # warm-up: tables, FFT plans, CUDA context
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--survey", default="candels-f160w")
    ap.add_argument("--stamp", type=int, default=64)
    ap.add_argument("--n-galsim", type=int, default=100, help="stamps GalSim renders (it is slow; 0 skips GalSim)")
    ap.add_argument("--n-ours", type=int, default=8192, help="stamps per timing on the CPU")
    ap.add_argument("--n-gpu", type=int, default=1_048_576, help="stamps per timing on a GPU")
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--gpu-batch-size", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (GalSim uses one core)")
    ap.add_argument("--write", type=int, default=0, help="also time writing this many stamps to HDF5")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    sim = Simulator(args.survey, args.stamp, noise="none")
    psf = sim.survey.psf
    draws = sim.simulate(range(max(args.n_galsim, 1)), seed=0)

    # deepmorph first: GalSim's OpenMP threads keep spinning for a while after each call and
    # would steal the cores that torch is timed on.
    ours = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        n = args.n_ours if device == "cpu" else args.n_gpu
        bs = args.batch_size if device == "cpu" else args.gpu_batch_size
        quiet = Simulator(args.survey, args.stamp, noise="none", device=device)
        noisy = Simulator(args.survey, args.stamp, device=device)

        def run(s, n=n, bs=bs, device=device):
            # On a GPU the stamps stay on the device, as when training on the fly.
            for start in range(0, n, bs):
                s.simulate(np.arange(start, min(n, start + bs)), seed=1, as_numpy=device == "cpu")

        name = torch.cuda.get_device_name() if device == "cuda" else f"{args.threads} threads"
        ours.append((f"deepmorph ({name})", device, rate(lambda s=quiet: run(s), n, device),
                     rate(lambda s=noisy: run(s), n, device)))

    if args.n_galsim > 0:
        t0 = time.perf_counter()
        ref = galsim_stamps(draws["catalog"], args.n_galsim, args.stamp, sim.pixel_scale, psf)
        galsim_rate = args.n_galsim / (time.perf_counter() - t0)
        err = np.linalg.norm((draws["noiseless"][:, 0] - ref).reshape(len(ref), -1), axis=1)
        err /= np.linalg.norm(ref.reshape(len(ref), -1), axis=1)
        acc = f"median {np.median(err):.2e}, p99 {np.percentile(err, 99):.2e}, max {err.max():.2e}"
        rows = [("GalSim drawImage (1 core)", "cpu", galsim_rate, 1.0, "reference")]
    else:  # no GalSim here (e.g. a GPU machine without it): deepmorph's rates alone
        galsim_rate, acc, rows = float("nan"), "not measured", []
    for label, device, r1, r2 in ours:
        rows.append((label + ", noise-free", device, r1, r1 / galsim_rate, acc))
        rows.append((label + ", + noise + catalogue", device, r2, r2 / galsim_rate, "same renderer"))

    print(f"\nSimulation of {args.stamp}x{args.stamp} {args.survey} bulge+disk stamps, default priors, "
          f"Moffat PSF (FWHM {psf['fwhm_arcsec']}\", beta {psf['beta']})\n")
    print("| renderer | device | stamps/s | ratio vs GalSim | relative L2 error vs GalSim |")
    print("|---|---|---:|---:|---|")
    for name, dev, r, ratio, acc in rows:
        print(f"| {name} | {dev} | {r:,.0f} | {ratio:,.0f}x | {acc} |")

    if args.write:
        from deepmorph.data import write_dataset

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.h5"
            t0 = time.perf_counter()
            write_dataset(path, Simulator(args.survey, args.stamp), args.write, seed=0, progress=False)
            dt = time.perf_counter() - t0
            size = path.stat().st_size / 2**20
        print(f"\nWrote {args.write:,} stamps to HDF5 in {dt:.1f} s ({args.write / dt:,.0f} stamps/s, {size:,.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
