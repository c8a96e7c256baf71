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
# # 2. Morphology classification, with and without deep learning
#
# The lecture's first result: does a convolutional network beat the classical route, and how
# does accuracy grow with the size of the training set? We simulate a class-balanced set of
# galaxies (spheroids, disks, edge-on disks, clumpy disks), split it once into training,
# validation and test sets, and train on the same split
#
# * a small **CNN**, with the practice of the lecture: a learning history, early stopping on the
#   validation loss, data augmentation, a learning-rate schedule;
# * **statmorph + a random forest**: non-parametric morphology (concentration, asymmetry,
#   smoothness, Gini, M20, MID statistics, a Sersic fit) measured on a SExtractor segmentation,
#   fed to a random forest.
#
# With `DEEPMORPH_FAST=1` the sizes are tiny (seconds); outputs go to `DEEPMORPH_OUT`.

# %%
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from deepmorph.data import open_dataset, write_dataset
from deepmorph.measure import confusion_figure
from deepmorph.report.figures import size_curve_figure
from deepmorph.simulate import LABEL_NAMES, Priors, Simulator
from deepmorph.training import History, RunConfig
from deepmorph.workflows.classify import Split, classify_vs_size, predict, train_cnn, train_forest_run

FAST = os.environ.get("DEEPMORPH_FAST", "") not in ("", "0")
OUT = Path(os.environ.get("DEEPMORPH_OUT") or tempfile.mkdtemp(prefix="deepmorph-tutorial-02-"))
OUT.mkdir(parents=True, exist_ok=True)
N, STAMP, EPOCHS = (240, 32, 4) if FAST else (4000, 64, 25)
SIZES = (60, 144) if FAST else (100, 300, 1000, 2400)
summary = {}

# %% [markdown]
# ## A labelled dataset
#
# `Priors(balanced_classes=True)` draws each galaxy's class first, then its structure from ranges
# that keep clear of the label rule's thresholds (B/T 0.6, disk axis ratio 0.35, clump flux 10%),
# so every label is unambiguous. The classes need clumps switched on.

# %%
data = OUT / "classify.h5"
sim = Simulator("candels-f160w", STAMP, clumps=True, priors=Priors(balanced_classes=True))
write_dataset(data, sim, N, seed=1, progress=False, overwrite=True)
with open_dataset(data) as ds:
    counts = np.bincount(np.asarray(ds.catalog["label"]), minlength=len(LABEL_NAMES))
print(dict(zip(LABEL_NAMES, counts.tolist(), strict=True)))
summary["class_counts"] = counts.tolist()

# %% [markdown]
# ## The CNN
#
# Every training option lives in one `RunConfig` (also a YAML file, and `deepmorph train classify`
# flags). The run directory keeps the history (Keras' `history.history` keys: `loss`,
# `val_loss`, `acc`, `val_acc`, `lr`), the learning curves, checkpoints (best and last, so an
# interrupted run resumes), TensorBoard logs and the test metrics.

# %%
config = RunConfig().with_overrides({
    "epochs": EPOCHS, "batch_size": 16 if FAST else 32, "progress_bar": False,
    "augmentation": "flips",                       # or "keras": rotation 45, shift 0.05, flips, zoom 0.75-1.3
    "model.kwargs": {"widths": [8, 16] if FAST else [32, 64, 128, 128], "blocks_per_stage": 2, "dropout": 0.05},
    "schedule.kind": "cosine",                     # step, exponential, inverse_time, plateau...
    "early_stopping.patience": 6,                  # epochs without a better validation loss
})
split = Split(seed=0, fractions=(0.6, 0.1, 0.3))
cnn = train_cnn(data, OUT / "cnn", config, split, resume=False)
print(f"CNN test accuracy {100 * cnn['accuracy']:.1f}% after {cnn['epochs_run']} epochs")
history = History.load(OUT / "cnn")
history.plot(title="learning history").savefig(OUT / "learning-curves.png", dpi=90)
summary["cnn_accuracy"] = cnn["accuracy"]
summary["epochs_run"] = cnn["epochs_run"]

# %% [markdown]
# ## statmorph + random forest on the same split
#
# statmorph costs ~0.1 s per stamp per core; the features are cached inside the dataset file,
# so a second run (or the size curve below) does not measure them again. Failed measurements
# stay in the table as NaN with a flag.

# %%
forest = train_forest_run(data, OUT / "forest", split, n_jobs=1, progress=False)
print(f"forest test accuracy {100 * forest['accuracy']:.1f}% ({forest['n_failed']} failed measurements)")
summary["forest_accuracy"] = forest["accuracy"]
for name, result in (("cnn", cnn), ("forest", forest)):
    fig = confusion_figure(np.asarray(result["confusion_matrix"]), LABEL_NAMES, title=name)
    fig.savefig(OUT / f"confusion-{name}.png", dpi=90)

# %% [markdown]
# ## Predicting new galaxies
#
# A run predicts any dataset file: simulated, or real cutouts imported with `deepmorph import`.

# %%
table = predict(OUT / "cnn", data)
print(table[:5])
summary["n_predicted"] = len(table)

# %% [markdown]
# ## How large does my dataset need to be?
#
# Nested training sets, one fixed test set.

# %%
curve = classify_vs_size(data, OUT / "size-curve", SIZES, config, split_seed=0, n_jobs=1, progress=False,
                         fractions=split.fractions)
curve.pprint()
size_curve_figure(curve).savefig(OUT / "size-curve.png", dpi=90)
summary["size_curve"] = [[str(r["method"]), int(r["train_size"]), float(r["accuracy"])] for r in curve]

# %%
(OUT / "summary.json").write_text(json.dumps(summary, indent=1))
