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
# # 5. Generative models: a VAE's latent space, a GAN's galaxies, and anomalies
#
# The lecture's introduction to unsupervised deep learning:
#
# * a variational autoencoder learns to reconstruct galaxies without any label; its latent space
#   sorts them by brightness, size and shape, which we measure with rank correlations and probes;
# * a GAN (DCGAN) learns to generate galaxies; we compare the physical statistics of its galaxies
#   with real ones (two-sample KS tests) instead of eyeballing them;
# * a galaxy the GAN cannot reproduce is anomalous: the AnoGAN score (a latent search), its fast
#   f-AnoGAN variant (an encoder, izi) and a VAE's reconstruction error rank a benchmark of normal
#   galaxies and injected anomalies (companions, streams, clumps, cosmic rays, trails, bad columns).
#
# With `DEEPMORPH_FAST=1` the sizes are tiny (seconds) and the numbers mean little; outputs go to
# `DEEPMORPH_OUT`. Laptop-sized runs (the defaults below) take about ten minutes on 2 CPU cores.

# %%
import json
import math
import os
import tempfile
from pathlib import Path

from deepmorph.simulate.anomalies import write_benchmark
from deepmorph.workflows import latent
from deepmorph.workflows.anomaly import autoencoder_scorer, evaluate_anomalies
from deepmorph.workflows.classify import Split
from deepmorph.workflows.gan import default_config, encoder_config, train_encoder, train_gan

FAST = os.environ.get("DEEPMORPH_FAST", "") not in ("", "0")
OUT = Path(os.environ.get("DEEPMORPH_OUT") or tempfile.mkdtemp(prefix="deepmorph-tutorial5-"))
OUT.mkdir(parents=True, exist_ok=True)
N, EPOCHS, N_BENCH, PER_KIND = (300, 1, 40, 6) if FAST else (4000, 8, 300, 60)
summary = {}

# %% [markdown]
# ## Normal galaxies and a benchmark of anomalies
#
# `write_benchmark` simulates isolated bulge + disk galaxies (32x32 CANDELS F160W stamps) and, for
# a benchmark, the same kind of galaxies with an injected anomaly, each with a per-pixel mask of
# where the anomaly is. With `n_per_kind=0` it writes normal galaxies only: a training set.

# %%
normal = OUT / "normal.h5"
bench = OUT / "benchmark.h5"
write_benchmark(normal, N, 0, seed=0, stamp_size=32, overwrite=True, progress=False)
write_benchmark(bench, N_BENCH, PER_KIND, seed=1, stamp_size=32, overwrite=True, progress=False)

# %% [markdown]
# ## A VAE and its latent space
#
# `train_autoencoder` trains the VAE (KL warm-up, Gaussian likelihood) and scores its latent space
# on the held-out galaxies: per parameter, the best single latent dimension (|Spearman rho|), the
# best latent direction (a linear probe fitted on half of the galaxies and scored on the others)
# and a k-nearest-neighbour probe. The run directory holds `latent_maps.png`, `decoded_grid.png`
# and `interpolation.png`.

# %%
config = latent.default_config("vae", **{"model.kwargs.latent_dim": 8, "epochs": EPOCHS, "progress_bar": False})
vae_run = OUT / "vae"
r = latent.train_autoencoder(normal, vae_run, config, split=Split(seed=0, fractions=(0.8, 0.05, 0.15)))
for row in r["correlations"]:
    if row["parameter"] in ("mag", "log10_hlr", "q", "bt", "q_via_e1e2"):
        print(f"{row['parameter']:<11} best |rho| {row['best_abs_spearman'] or float('nan'):.2f}  "
              f"direction rho {row['probe_spearman'] or float('nan'):.2f}  linear R^2 {row['linear_r2'] or 0:.2f}")
summary["vae"] = {row["parameter"]: row["best_abs_spearman"] for row in r["correlations"]
                  if row["best_abs_spearman"] is not None}

# %% [markdown]
# ## A GAN and the quality of its galaxies
#
# The DCGAN trains its discriminator and generator in turns (`d_steps` discriminator steps per
# generator step), here with the WGAN-GP loss and a spectrally normalised critic. The generator
# draws noise-free galaxies; the GAN adds the survey's sky and Poisson noise itself. `train_gan`
# then compares the flux, half-light radius, concentration, ellipticity and asymmetry of
# generated and real galaxies with KS tests (`quality.json`, `statistics.png`, `samples.png`).

# %%
gan_run, enc_run = OUT / "gan", OUT / "encoder"
g = train_gan(normal, gan_run, default_config(epochs=EPOCHS, progress_bar=False,
                                              **{"model.kwargs.g_width": 16, "model.kwargs.d_width": 16}),
              loss="wgan-gp", spectral_norm=True, latent_dim=16, n_eval=min(N, 1000))
for name, v in g["ks"].items():
    print(f"{name:<14} KS D {v['d']:.3f}  p {v['p']:.2g}")
# A statistic is NaN where generated stamps hold no source to measure (an untrained generator).
summary["gan_ks_p"] = {name: v["p"] for name, v in g["ks"].items() if math.isfinite(v["p"])}

# %% [markdown]
# ## Anomalies: AnoGAN, izi and the VAE, on the same images
#
# The encoder maps an image to the GAN's latent space in one pass (f-AnoGAN's izi); AnoGAN
# searches that space by gradient descent. Both score A = (1 - lambda) R + lambda D, R the summed
# residual |x - G(z*)| and D the discriminator-feature distance. The VAE scores its
# reconstruction error. Thresholds keep 5% false positives on normal galaxies.
#
# The summed residual drowns a cosmic ray or a faint column in the noise of a thousand other
# pixels, and a model's own errors in bright galaxy cores dwarf the sky noise. The `scan`
# statistic fixes both: residuals are divided by the scale normal galaxies show at the same
# reconstructed level, filtered for points, blobs and lines, and each filter's largest value is
# standardised on half of the normal galaxies (the other half measures the false positives).
#
# A VAE's encoder is a compromise between the galaxy and whatever else is in the stamp, so it
# reconstructs part of a companion and the residual shrinks. `refine_steps` refits its latent to
# each image with a robust (Cauchy) loss: pixels far from the reconstruction stop pulling on it,
# and the anomaly stays in the residual. The `iou_all` column is the overlap of each method's
# significance map (thresholded at 0.3% false pixels on normal galaxies) with the injected masks.

# %%
train_encoder(gan_run, None, enc_run, encoder_config(epochs=EPOCHS, progress_bar=False))
tables = {reduce: evaluate_anomalies(enc_run, bench, OUT / f"anomalies_{reduce}", steps=5 if FAST else 50,
                                     extra={"vae": autoencoder_scorer(vae_run),
                                            "vae_refit": autoencoder_scorer(vae_run, refine_steps=5 if FAST else 30)},
                                     reduce=reduce)
          for reduce in ("sum", "scan")}
for reduce, table in tables.items():
    print(f"R = {reduce}")
    table[["method", "auc_mergers", "auc_artefacts", "auc_all", "fpr_test", "iou_all", "seconds_per_image"]].pprint(
        max_width=-1)
    summary[f"auc_all_{reduce}"] = {str(row["method"]): float(row["auc_all"]) for row in table}
(OUT / "summary.json").write_text(json.dumps(summary, indent=1))
