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
# # 8. Hyper-parameter search: coarse to fine, in parallel, and ensembles
#
# How wide should the network be, how fast should it learn, how much dropout, which schedule, which
# augmentation? Rather than guess, we let Optuna search: each *trial* trains one config on the training
# split and is scored on the validation split; a sampler (TPE) proposes the next config from the scores
# so far, and a pruner stops a trial early when, epoch for epoch, it does worse than the median of
# the earlier ones. The held-out test split is used once, at the end, to compare the best config with
# the default one.
#
# * a **space file** lists the run-config fields to search (any dotted key of `--set`);
# * a **coarse** stage of many short trials, then a **fine** stage of longer ones in a narrower space
#   around the best;
# * **workers**: several processes, or machines, share one study through a journal file on a shared
#   disk or a PostgreSQL/MySQL database, and finish exactly the number of trials asked for;
# * **ensembles**: averaging the predicted probabilities of the best few trials.
#
# With `DEEPMORPH_FAST=1` the sizes are tiny (seconds) and the numbers mean little; outputs go to
# `DEEPMORPH_OUT`. The default sizes (2,000 galaxies, 20 + 6 trials, as `benchmarks/tune.py`) take
# about 15 minutes on 2 CPU cores.

# %%
import json
import os
import tempfile
from pathlib import Path

from astropy.table import Table

from deepmorph.data import write_dataset
from deepmorph.simulate import Priors, Simulator
from deepmorph.training import RunConfig
from deepmorph.training.search import SearchSpace
from deepmorph.workflows.classify import Split
from deepmorph.workflows.ensemble import ensemble_classify, top_trials
from deepmorph.workflows.tune import tune

FAST = os.environ.get("DEEPMORPH_FAST", "") not in ("", "0")
OUT = Path(os.environ.get("DEEPMORPH_OUT") or tempfile.mkdtemp(prefix="deepmorph-tutorial8-"))
OUT.mkdir(parents=True, exist_ok=True)
N, TRIALS, EPOCHS, FINE_TRIALS, FINE_EPOCHS, WORKERS = (240, 4, 1, 2, 1, 1) if FAST else (2000, 20, 3, 6, 8, 2)
# The default config: RunConfig(), the lecture's CNN (widths 32, 64, 128); a narrower one in fast mode.
BASE = RunConfig(accelerator="cpu", model={"kwargs": {"widths": [8, 16]}}) if FAST else RunConfig(accelerator="cpu")
WIDTHS = [[8, 16], [16, 32]] if FAST else [[8, 16], [16, 32], [16, 32, 64], [32, 64, 128]]
summary = {}

# %% [markdown]
# ## A small classification problem
#
# Four balanced classes (spheroid, disk, edge-on, clumpy) of simulated CANDELS F160W galaxies,
# 32 x 32 pixels. The split (70% train, 10% validation, 20% test) is fixed by its seed.

# %%
data = OUT / "classes.h5"
sim = Simulator("candels-f160w", 32, clumps=True, priors=Priors(balanced_classes=True))
write_dataset(data, sim, N, seed=11, overwrite=True, progress=False)
split = Split(seed=0, fractions=(0.7, 0.1, 0.2))

# %% [markdown]
# ## The search space
#
# Keys are run-config fields, as for `--set`; values are ranges (`low`, `high`, optionally `log` for a
# uniform draw in log, `step` for a grid) or `choices`. Whether a range is an integer or a float
# follows the config field (`model.kwargs.dropout` is a float even if written `{low: 0, high: 1}`).
# `coarse` and `fine` set the two stages; the fine stage's ranges are `shrink` times as wide, around
# the best coarse trial, and it starts from that trial. A wrong key or range is a one-line error that
# names the file and the key.

# %%
space_file = OUT / "space.yaml"
space_file.write_text(f"""\
optimizer.lr: {{low: 3.0e-4, high: 1.0e-2, log: true}}
batch_size: {{choices: [16, 32, 64, 128]}}
model.kwargs.widths: {{choices: {WIDTHS}}}
model.kwargs.dropout: {{low: 0.0, high: 0.5}}
schedule.kind: {{choices: [none, cosine, exponential]}}
augmentation: {{choices: [null, flips]}}
coarse: {{trials: {TRIALS}, epochs: {EPOCHS}}}
fine: {{trials: {FINE_TRIALS}, epochs: {FINE_EPOCHS}, shrink: 0.5}}
""")
space = SearchSpace.from_yaml(space_file)
for p in space.params:
    print(f"{p.key:<22} {p.kind:<12} {p.to_dict()}")
# The default config lies in this space, so the search's first trial is the default.
print("default as a trial:", space.labels_of(BASE))

# %% [markdown]
# ## The search
#
# `tune` is what `deepmorph tune classify --data classes.h5 --space space.yaml --out RUN` runs. Here two
# worker processes (this one and another) share the study through the journal file `RUN/study.journal`;
# a worker on another machine would run the same command with `--storage journal:/shared/study.journal`
# (or `--storage postgresql://user:pass@host/db`) and the same `--study` name. Each trial is a complete
# classification run in `RUN/trials/STAGE-NNNN`; `RUN/trials.ecsv` lists them all.

# %%
run = OUT / "search"
result = tune("classify", data, space, run, base=BASE, split=split, workers=WORKERS, seed=0, progress=False)
table = Table.read(run / "trials.ecsv")
table["value"].format = ".4f"
table["seconds"].format = ".1f"
table["optimizer.lr"].format = ".2e"
table["model.kwargs.dropout"].format = ".2f"
table[["stage", "number", "state", "value", "epochs", "optimizer.lr", "batch_size", "model.kwargs.widths",
       "schedule.kind"]].pprint(max_lines=-1, max_width=-1)
summary["states"] = {s: int(sum(table["state"] == s)) for s in ("complete", "pruned", "fail")}
summary["n_trials"] = len(table)

# %% [markdown]
# The search writes `optimization_history.png` (each trial's validation loss, the best so far, the
# pruned trials) and `param_importances.png` (fANOVA: which parameters the validation loss depends
# on), and `best_config.yaml`, a run config to train with: `deepmorph train classify --config
# RUN/best_config.yaml --data classes.h5 --out runs/best`.

# %%
print((run / "best_config.yaml").read_text())
best, default = result["best"], result["default"]
print(f"validation loss: default {default['val']:.4f}, best {best['value']:.4f}")
print(f"test accuracy ({result['n_test']} galaxies): default {100 * default['test_accuracy']:.2f}%, "
      f"best {100 * best['test_accuracy']:.2f}% ({100 * result['gain_test_accuracy']:+.2f} points)")
summary.update(default_val=default["val"], best_val=best["value"], default_test_accuracy=default["test_accuracy"],
               best_test_accuracy=best["test_accuracy"], n_test=result["n_test"])

# %% [markdown]
# ## Ensembles
#
# Averaging the predicted probabilities of several models never raises the log loss above the members'
# mean (the log is concave) and usually raises the accuracy, most when the members disagree. Here the
# members are the best trials of the search's last stage (`deepmorph ensemble classify --tune RUN
# --top-k 3`); `--seeds 0,1,2` would instead train the best config with three seeds.

# %%
ens = ensemble_classify(top_trials(run, 3, minimum=2), OUT / "ensemble")
for row in [*ens["members"], ens["ensemble"]]:
    print(f"{Path(row['member']).name:<12} accuracy {100 * row['accuracy']:.2f}%  log loss {row['log_loss']:.4f}")
print(f"ensemble vs its best member: {100 * ens['gain_vs_best']:+.2f} points; log loss "
      f"{ens['log_loss_gain_vs_mean']:.4f} below the members' mean")
summary.update(ensemble_test_accuracy=ens["ensemble"]["accuracy"], ensemble_gain_vs_best=ens["gain_vs_best"],
               ensemble_log_loss_gain=ens["log_loss_gain_vs_mean"])

# %% [markdown]
# ## When workers die
#
# A trial that raises is retried with the same parameters (up to `--max-retry` times) under a new
# trial number; the table's `retry_of` column says which trial it replaces. A worker that is killed
# stops its heartbeat: after the grace period (60 s) another worker marks its trial failed and runs it
# again. A search stopped by `--timeout` or by Ctrl-C continues when the same command is rerun.

# %%
(OUT / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary, indent=1))
