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
# # 3. Image-to-image networks: the transposed convolution, clumps, bulges and disks
#
# The lecture's part IV. A convolution is a matrix; its transpose upsamples, and that is how an
# encoder-decoder (a **U-Net**) gets back to full resolution. Two science uses follow:
#
# * **clump detection** -- a U-Net turns a galaxy into a clump probability map; thresholding the
#   map and running SExtractor (sep) on it gives a clump catalogue. We compare it with the
#   classical method (subtract a median-filtered galaxy, find point sources in the residual);
# * **bulge/disk decomposition** -- a U-Net with two output maps predicts the bulge image and the
#   disk image (the lecture's "DeepLegato_2c"); B/T follows from their fluxes. We compare it with
#   a 2-component fit by imfit.
#
# With `DEEPMORPH_FAST=1` the sizes are tiny (seconds) and the numbers mean little; outputs go to
# `DEEPMORPH_OUT`. The numbers quoted below are from the full-size runs in the README.

# %%
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deepmorph.data import write_dataset
from deepmorph.models import UNet
from deepmorph.models.convmatrix import conv_matrix, convolve, transposed_convolve
from deepmorph.simulate import Priors, Simulator
from deepmorph.training import History
from deepmorph.workflows.classify import Split
from deepmorph.workflows.clumps import default_config as clump_config
from deepmorph.workflows.clumps import detect_clumps, train_clumps
from deepmorph.workflows.decompose import default_config as decompose_config
from deepmorph.workflows.decompose import predict_decompose, train_decompose

FAST = os.environ.get("DEEPMORPH_FAST", "") not in ("", "0")
OUT = Path(os.environ.get("DEEPMORPH_OUT") or tempfile.mkdtemp(prefix="deepmorph-tutorial-03-"))
OUT.mkdir(parents=True, exist_ok=True)
N, STAMP, EPOCHS, WIDTH = (200, 32, 8, 4) if FAST else (3000, 64, 15, 16)
summary = {}

# %% [markdown]
# ## The convolution matrix
#
# For a 3x3 kernel on a 4x4 image (no padding, stride 1) the output is 2x2, so C is 4x16:
# `conv(x) = C @ x.flatten()`, and the transposed convolution is `C.T @ y.flatten()`.

# %%
kernel = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(3, 3)
x = torch.randn(4, 4, dtype=torch.float64)
C = conv_matrix(kernel, (4, 4))
print(C.shape)
err_conv = float((convolve(C, x, (2, 2)) - F.conv2d(x[None, None], kernel[None, None])[0, 0]).abs().max())
y = torch.randn(2, 2, dtype=torch.float64)
err_t = float((transposed_convolve(C, y, (4, 4)) - F.conv_transpose2d(y[None, None], kernel[None, None])[0, 0])
              .abs().max())
print(f"max |C x - conv2d(x)| = {err_conv:.1e}, max |C^T y - conv_transpose2d(y)| = {err_t:.1e}")
summary["conv_matrix_shape"] = list(C.shape)
summary["conv_errors"] = [err_conv, err_t]

# %% [markdown]
# ## A U-Net
#
# `UNet(depth, width, upsample="transpose" | "bilinear" | "nearest", batchnorm, dropout)`: any
# stamp whose sides are multiples of `2**depth`, any number of input and output channels.

# %%
unet = UNet(in_channels=1, num_outputs=2, depth=3, width=8)
print(unet(torch.zeros(1, 1, 64, 64)).shape, sum(p.numel() for p in unet.parameters()), "parameters")

# %% [markdown]
# ## Clumps
#
# Clumpy disks (disk half-light radii 4-25 px at full size) with up to six unresolved clumps each.
# The target is a heat map, 1 at each clump's centre and falling off with the PSF's width, so
# that two clumps a PSF apart stay two peaks. Both detectors are scored on the same held-out
# galaxies: completeness of the clumps with S/N >= 5 at the best threshold with 90% purity.

# %%
clumps = OUT / "clumps.h5"
disks = (0.3, 1.0) if FAST else (0.6, 1.4)
sim = Simulator("candels-f160w", STAMP, clumps=True, components=True, priors=Priors(log10_disk_hlr_pix=disks))
write_dataset(clumps, sim, N, seed=2, progress=False, overwrite=True)
config = clump_config(**{"epochs": EPOCHS, "batch_size": 16 if FAST else 32, "progress_bar": False,
                         "model.kwargs": {"depth": 2 if FAST else 3, "width": WIDTH}, "optimizer.lr": 3e-3})
result = train_clumps(clumps, OUT / "clump-run", config, Split(seed=0, fractions=(0.7, 0.1, 0.2)), resume=False)
for method in ("unet", "classical"):
    m = result[method]
    print(f"{method:>9}: completeness {100 * m['completeness_at_purity_90']:.1f}% at purity >= 90% "
          f"(threshold {m['threshold']})")
summary["clumps"] = {k: result[k]["completeness_at_purity_90"] for k in ("unet", "classical")}
History.load(OUT / "clump-run").plot(title="clump U-Net").savefig(OUT / "clump-learning-curves.png", dpi=90)

# %% [markdown]
# `detect_clumps` (and `deepmorph detect clumps`) writes the catalogue and the probability maps
# for a dataset file or for FITS images of any size (tiled with overlap).

# %%
catalogue = detect_clumps(OUT / "clump-run", clumps, threshold=0.5, maps_out=OUT / "clump-maps.fits",
                          progress=False)
print(catalogue[:5])
summary["n_detected"] = len(catalogue)

# %% [markdown]
# ## Bulges and disks
#
# A Sersic bulge (n 2-6) more compact than its exponential disk. The U-Net sees each galaxy
# divided by its own peak brightness, so one network serves every magnitude; its loss adds the
# component fluxes and B/T to the pixel error. imfit fits the same held-out galaxies.

# %%
bd = OUT / "bulge-disk.h5"
priors = Priors(mag=(18.0, 23.0), bulge_n=(2.0, 6.0), log10_bulge_hlr_pix=(0.0, 0.5) if FAST else (0.0, 0.8),
                log10_disk_hlr_pix=(0.5, 1.1) if FAST else (0.6, 1.4))
write_dataset(bd, Simulator("candels-f160w", STAMP, components=True, priors=priors), N, seed=3, progress=False,
              overwrite=True)
config = decompose_config(**{"epochs": EPOCHS, "batch_size": 16 if FAST else 32, "progress_bar": False,
                             "model.kwargs": {"depth": 2 if FAST else 3, "width": WIDTH}, "optimizer.lr": 3e-3})
result = train_decompose(bd, OUT / "bd-run", config, Split(seed=0, fractions=(0.7, 0.1, 0.2)), resume=False,
                         baseline_max=4 if FAST else 100, n_jobs=1 if FAST else 2, progress=False)
for key in ("unet", "imfit"):
    m = result[key]
    print(f"{key:>6}: RMS B/T error {m['bt_rmse']:.3f} on {m['n']} galaxies with H < 22, "
          f"{1e3 * m['seconds_per_galaxy']:.1f} ms per galaxy")
print(f"the U-Net is {result['speedup']:.0f} times faster")
summary["decompose"] = {"unet_bt_rmse": result["unet"]["bt_rmse"], "imfit_bt_rmse": result["imfit"]["bt_rmse"],
                        "speedup": result["speedup"]}

# %% [markdown]
# `predict_decompose` (and `deepmorph predict decompose`) writes `bulge.fits`, `disk.fits` and
# a B/T catalogue.

# %%
table = predict_decompose(OUT / "bd-run", bd, OUT / "bd-predictions")
print(table[:5])
summary["n_decomposed"] = len(table)
summary["bt_range"] = [float(np.nanmin(table["bulge_to_total"])), float(np.nanmax(table["bulge_to_total"]))]

# %%
(OUT / "summary.json").write_text(json.dumps(summary, indent=1))
