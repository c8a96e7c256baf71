# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 1. Simulating galaxies
#
# Deep networks for galaxy morphology are trained on images whose truth we know. This notebook
# teaches deepmorph's simulator: what a simulated galaxy is made of, the survey presets, the
# conventions (where a pixel's centre is, which way a position angle turns, which "radius" we
# mean, how magnitudes become image counts), noise, clumps and masks, writing a dataset to disk,
# and how we know the images are right: we compare them with GalSim, the reference code of
# weak-lensing surveys.
#
# A simulated galaxy is a **Sersic bulge** (index *n*) plus an **exponential disk** (n = 1)
# sharing one centre and one position angle, convolved with the survey's **PSF**, integrated
# over square **pixels**, and optionally decorated with unresolved star-forming **clumps** and
# **companion galaxies**; then **noise** is added (sky + source Poisson noise).
#
# Run it as a notebook (`jupytext --to notebook 01_simulate_galaxies.py`) or as a script.
# With `DEEPMORPH_FAST=1` it uses small samples and runs in seconds; outputs go to the folder
# in `DEEPMORPH_OUT` (a temporary folder otherwise).

# %%
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from astropy.table import Table

from deepmorph.report import new_figure, parameter_distributions, residual_figure, stamp_gallery
from deepmorph.simulate import LABEL_NAMES, SURVEYS, Priors, Sersic, Simulator

FAST = os.environ.get("DEEPMORPH_FAST", "") not in ("", "0")
OUT = Path(os.environ.get("DEEPMORPH_OUT") or tempfile.mkdtemp(prefix="deepmorph-tutorial-01-"))
OUT.mkdir(parents=True, exist_ok=True)
N = 16 if FAST else 256  # stamps per sample
N_GALSIM = 8 if FAST else 40  # galaxies compared with GalSim
summary = {}  # the numbers this notebook finds, saved at the end
start = time.perf_counter()


def show(fig, name):
    """Save a figure next to the other outputs and return it (a notebook then displays it)."""
    fig.savefig(OUT / f"{name}.png", dpi=90)
    return fig


print("outputs in", OUT, "| fast mode" if FAST else "")

# %% [markdown]
# ## Survey presets
#
# A preset fixes what an instrument does to a galaxy: the **pixel scale** (arcsec per pixel),
# the **PSF** (here Moffat profiles with the survey's typical seeing FWHM), the photometric
# **zero point** (the AB magnitude of one image count) and the **depth** (the 5-sigma
# limiting magnitude of a point source). The simulator turns the depth into a sky noise per
# pixel: a point source at the depth has flux `F5 = 10^(-0.4 (depth - zeropoint))`, and PSF
# fitting reaches S/N = 5 on it when `sigma_sky = F5 / (5 sqrt(NEA))`, with the PSF's
# noise-equivalent area `NEA = 1 / sum(psf^2)` (pixels).

# %%
sims = {name: Simulator(name, stamp_size=64, clumps=True, neighbors=True, components=True) for name in SURVEYS}
rows = []
for name, sim in sims.items():
    sv = sim.survey
    f5 = 10 ** (-0.4 * (sv.depth_5sigma_mag - sv.zeropoint_mag))
    by_hand = f5 / (5 * math.sqrt(sim.psf_nea_pix))
    assert abs(by_hand / sim.default_sky_sigma - 1) < 1e-12
    rows.append({
        "survey": name, "band": sv.band, "scale [\"/pix]": sv.pixel_scale_arcsec,
        "PSF FWHM [\"]": sv.psf["fwhm_arcsec"], "PSF FWHM [pix]": round(sim.psf_fwhm_pix, 2),
        "zero point": sv.zeropoint_mag, "depth (5 sigma)": sv.depth_5sigma_mag,
        "NEA [pix]": round(sim.psf_nea_pix, 1), "sky sigma [counts/pix]": float(f"{sim.default_sky_sigma:.4g}"),
        "unit": sv.image_unit,
    })
presets = Table(rows=rows)
presets.pprint_all()

# %% [markdown]
# ## Priors
#
# Galaxy parameters are drawn from uniform priors (the lecture's recipe for HST training sets).
# Note the units: **sizes are in pixels** (log-uniform major-axis half-light radii) and
# brightness in **magnitudes**, so the same prior gives physically larger galaxies in a survey
# with bigger pixels. Every range is configurable: `Priors(mag=(20, 23), ...)`.

# %%
priors = Priors()
Table(rows=[{"prior": k, "range": str(v)} for k, v in priors.to_dict().items()]).pprint_all()

# %% [markdown]
# ## Rendering stamps
#
# `Simulator.simulate(indices, seed)` returns numpy arrays `(B, 1, S, S)` in image counts and a
# catalogue of the true parameters. **Item i depends only on (seed, i)**: simulating items
# 0-15 in one batch or one at a time, on a CPU or a GPU, gives the same galaxies.
# Since the priors are in pixels and magnitudes, the same seed gives the *same* galaxies in
# every survey, seen through different PSFs, pixel scales and depths.

# %%
batch = sims["candels-f160w"].simulate(range(N), seed=0)
print({k: v.shape for k, v in batch.items() if hasattr(v, "shape")})
one = sims["candels-f160w"].simulate([3], seed=0)
assert np.array_equal(one["images"][0], batch["images"][3])  # item 3, alone or in a batch
Table(batch["catalog"])[:5].pprint_all()

# %%
show(stamp_gallery(batch, n=6, label_names=LABEL_NAMES, title="CANDELS F160W"), "gallery-candels")

# %%
for name in ("sdss-r", "hsc-i"):
    show(stamp_gallery(sims[name].simulate(range(N), seed=0), n=6, label_names=LABEL_NAMES, title=name),
         f"gallery-{name}")

# %%
show(parameter_distributions(batch["catalog"], LABEL_NAMES), "parameters")

# %% [markdown]
# Labels follow a rule on the truth (`deepmorph.simulate.morphology_label`): *clumpy* if clumps
# carry at least 10% of the flux, else *spheroid* if B/T >= 0.6, else *edge-on* if the disk's
# axis ratio q < 0.35, else *disk*.
#
# ## Conventions
#
# * Arrays are indexed `[..., y, x]`; **pixel centres are at integer coordinates** (0-based).
#   A stamp's galaxy sits at the stamp's geometric centre `((S-1)/2, (S-1)/2)` plus the
#   catalogued offset `(x_offset_pix, y_offset_pix)` -- exactly where GalSim's
#   `drawImage(nx=S, ny=S, offset=...)` puts it. For S = 64 the centre is (31.5, 31.5), a pixel
#   corner.
# * **Position angles** are degrees counter-clockwise from the +x axis (SExtractor, photutils,
#   GalSim's `beta`). Show images with `origin="lower"` so that +y points up.
# * **Radii are half-light radii along the major axis** (GALFIT's habit), in arcsec in
#   catalogues. GalSim's `half_light_radius` of a sheared profile is the *circularised* one,
#   `r_major * sqrt(q)`.
# * **Magnitudes** are AB: `flux [counts] = 10^(-0.4 (mag - zeropoint))`.
#
# Let us check the first two and the last with one elongated disk rendered directly with the
# renderer, and measure its centroid, orientation and flux.

# %%
sim = sims["candels-f160w"]
S = sim.stamp_size
mag, pa, dx, dy, q = 20.0, 30.0, 3.3, -2.7, 0.3
flux = 10 ** (-0.4 * (mag - sim.zeropoint))


def t(v):
    return torch.tensor([v], dtype=torch.float64)


disk = Sersic(flux=t(flux), hlr_pix=t(3.0), q=t(q), pa_deg=t(pa), x_pix=t(dx), y_pix=t(dy))
img = sim.renderer.render({"disk": disk}, {"image": ("disk",)})["image"][0].double().numpy()

y, x = np.mgrid[:S, :S]
w = img.clip(min=0)
xc, yc = (w * x).sum() / w.sum(), (w * y).sum() / w.sum()
mxx, myy, mxy = ((w * (x - xc) ** 2).sum(), (w * (y - yc) ** 2).sum(), (w * (x - xc) * (y - yc)).sum())
pa_measured = 0.5 * math.degrees(math.atan2(2 * mxy, mxx - myy))
print(f"centroid ({xc:.3f}, {yc:.3f}) vs expected ({(S - 1) / 2 + dx:.3f}, {(S - 1) / 2 + dy:.3f})")
print(f"position angle {pa_measured:.2f} deg vs {pa} deg (CCW from +x)")
print(f"flux in the stamp {img.sum():.2f} counts vs 10^(-0.4 (mag - zp)) = {flux:.2f} counts")
assert abs(xc - ((S - 1) / 2 + dx)) < 0.02 and abs(yc - ((S - 1) / 2 + dy)) < 0.02
assert abs(pa_measured - pa) < 0.5 and abs(img.sum() / flux - 1) < 0.01
summary["centroid_error_pix"] = float(math.hypot(xc - (S - 1) / 2 - dx, yc - (S - 1) / 2 - dy))
summary["pa_error_deg"] = abs(pa_measured - pa)
summary["flux_ratio"] = float(img.sum() / flux)

fig = new_figure((4, 4))
ax = fig.subplots()
ax.imshow(np.arcsinh(img / (0.01 * img.max())), origin="lower", cmap="magma")
ax.plot([(S - 1) / 2], [(S - 1) / 2], "c+", ms=12, label="stamp centre")
length = 12
ax.annotate("", xy=(xc + length * math.cos(math.radians(pa)), yc + length * math.sin(math.radians(pa))),
            xytext=(xc, yc), arrowprops={"arrowstyle": "->", "color": "w"})
ax.set_title(f"PA {pa:g} deg CCW from +x, offset ({dx}, {dy}) pix", fontsize=9)
ax.legend(fontsize=8, loc="lower left")
show(fig, "conventions")

# %% [markdown]
# ## Noise
#
# The default noise is Gaussian sky noise at the preset's depth plus the sources' Poisson
# noise (variance = model / gain, in counts). `images - noiseless` is the noise realisation;
# far from the galaxy its standard deviation is the sky sigma. For noise-free images ask for
# `noise="none"` (we use such a simulator for the GalSim check below), or read the `noiseless`
# array. The noise of item i also depends only on (seed, i).

# %%
noise = batch["images"] - batch["noiseless"]
sky = batch["noiseless"] < 0.01 * sim.default_sky_sigma  # pixels with (almost) no source light
measured = float(noise[sky].std())
print(f"sky noise measured {measured:.4g} vs preset {sim.default_sky_sigma:.4g} counts/pixel")
assert abs(measured / sim.default_sky_sigma - 1) < 0.05
summary["sky_sigma_ratio"] = measured / sim.default_sky_sigma

clean = Simulator("candels-f160w", stamp_size=64, noise="none")
assert np.array_equal(clean.simulate(range(4), seed=0)["images"], clean.simulate(range(4), seed=0)["noiseless"])

# %% [markdown]
# ## Clumps and masks
#
# With `clumps=True` about half of the galaxies get 1-6 unresolved clumps, each carrying 2-15%
# of the galaxy's flux, placed following the disk's light. `clump_mask` marks the pixels within
# max(1, FWHM/2) of a clump centre -- the target of a segmentation network -- and
# `clump_table` lists every clump (item `id`, position in pixels from the stamp centre, flux).
# With `neighbors=True` companion galaxies appear near the edges; `neighbor_mask` marks where a
# companion outshines the main galaxy and the sky noise.

# %%
clumps = Table(batch["clump_table"])
cat = batch["catalog"]
clumpy = cat["id"][cat["n_clumps"] > 0]
print(f"{len(clumpy)} of {N} galaxies have clumps; {len(clumps)} clumps in all")
if len(clumpy):
    first = int(clumpy[0])
    print(clumps[clumps["id"] == first])
    mask = batch["clump_mask"][first, 0]
    print(f"galaxy {first}: {int(mask.sum())} mask pixels for {int(cat['n_clumps'][first])} clumps")
    assert mask.sum() > 0
assert int(cat["n_clumps"].sum()) == len(clumps)
summary["clumpy_fraction"] = float(np.mean(cat["n_clumps"] > 0))

# %% [markdown]
# ## Writing a dataset
#
# `write_dataset` simulates items 0..n-1 batch by batch into one HDF5 file (written under a
# temporary name and renamed when complete; rerunning an interrupted write resumes it).
# `open_dataset` reads it lazily, `summarize` describes it. The same thing from a shell:
# `deepmorph simulate --survey hsc-i --n 1000 --seed 1 --clumps --out hsc.h5`.

# %%
from deepmorph.data import open_dataset, summarize, write_dataset  # noqa: E402

path = write_dataset(OUT / "hsc-i.h5", sims["hsc-i"], n=N, seed=1, batch_size=8, overwrite=True, progress=False)
print(summarize(path))
with open_dataset(path) as ds:
    item = ds[5]
    again = sims["hsc-i"].simulate([5], seed=1)
    summary["dataset_max_abs_diff"] = float(np.abs(item["images"] - again["images"][0]).max())
    print(len(ds), ds.array_names, "item 5 reproduced to", summary["dataset_max_abs_diff"])
    assert summary["dataset_max_abs_diff"] == 0.0


# %% [markdown]
# ## Checking against GalSim
#
# GalSim draws the same galaxies from the catalogue: a `galsim.Sersic` bulge and a
# `galsim.Exponential` disk, each with `half_light_radius = r_major * sqrt(q)` (GalSim's
# circularised radius), sheared to axis ratio q at `beta = PA`, summed, convolved with the
# survey's Moffat PSF, and drawn with `drawImage(nx=S, ny=S, scale=..., offset=(dx, dy))`. We
# report the relative L2 error `||ours - GalSim|| / ||GalSim||`, and, to see why the radius
# convention matters, the error GalSim would show if we forgot the `sqrt(q)`.

# %%
try:
    import galsim
except ImportError:
    galsim = None
    print("GalSim is not installed (pip install galsim): skipping the check")

if galsim is not None:
    ref = clean.simulate(range(N_GALSIM), seed=2)
    c, scale = ref["catalog"], clean.pixel_scale
    psf = galsim.Moffat(beta=clean.survey.psf["beta"], fwhm=clean.survey.psf["fwhm_arcsec"])

    def draw(i, circularise=True):
        beta = c["pa_deg"][i] * galsim.degrees
        qb, qd = (c["bulge_q"][i], c["disk_q"][i])
        fb, fd = (math.sqrt(qb), math.sqrt(qd)) if circularise else (1.0, 1.0)
        bulge = galsim.Sersic(c["bulge_n"][i], half_light_radius=c["bulge_hlr_arcsec"][i] * fb,
                              flux=c["bulge_flux"][i]).shear(q=qb, beta=beta)
        disk = galsim.Exponential(half_light_radius=c["disk_hlr_arcsec"][i] * fd,
                                  flux=c["disk_flux"][i]).shear(q=qd, beta=beta)
        image = galsim.Convolve(bulge + disk, psf).drawImage(
            nx=S, ny=S, scale=scale, offset=(c["x_offset_pix"][i], c["y_offset_pix"][i]))
        return image.array

    def rel_l2(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    gs = [draw(i) for i in range(N_GALSIM)]
    err = np.array([rel_l2(ref["noiseless"][i, 0], gs[i]) for i in range(N_GALSIM)])
    wrong = np.array([rel_l2(ref["noiseless"][i, 0], draw(i, circularise=False)) for i in range(N_GALSIM)])
    print(f"relative L2 error vs GalSim over {N_GALSIM} galaxies: median {np.median(err):.2e}, max {err.max():.2e}")
    print(f"... if the major-axis radius were passed as GalSim's half_light_radius: median {np.median(wrong):.2f}")
    assert np.median(err) < 5e-3 and err.max() < 2e-2
    summary.update(galsim_median_rel_l2=float(np.median(err)), galsim_max_rel_l2=float(err.max()),
                   galsim_wrong_radius_median_rel_l2=float(np.median(wrong)))
    worst = int(np.argmax(err))
    show(residual_figure(ref["noiseless"][worst, 0], gs[worst], title=f"galaxy {worst}: worst of {N_GALSIM}"),
         "galsim-residual")

# %% [markdown]
# ## Summary
#
# The numbers this notebook measured are saved to `summary.json` in the output folder.

# %%
summary["seconds"] = time.perf_counter() - start
(OUT / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
