"""The ``deepmorph`` command: ``simulate``, ``info``, ``tour``.

Errors a user can cause (bad arguments, missing or unreadable files) print one line,
``deepmorph: error: <message>``, on stderr and exit with status 2; Ctrl-C exits with 130.
Anything else is a bug and keeps its traceback.

>>> main(["simulate", "--n", "1000", "--out", "sims.h5", "--stamp-size", "32"])   # doctest: +SKIP
0
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

from deepmorph import __version__
from deepmorph.errors import DeepmorphError, DeepmorphValueError

PROG = "deepmorph"


class _UsageError(DeepmorphError):
    """A command-line usage error, reported like every other DeepmorphError."""


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors raise (one line, exit 2) instead of printing the usage and exiting."""

    def error(self, message: str):
        hint = f" (see {self.prog} --help)"
        raise _UsageError(message + hint)


def _prior_options(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`~deepmorph.simulate.Priors` field: ``--bulge-n LO HI``, ``--max-offset-pix X``."""
    from deepmorph.simulate import Priors

    group = parser.add_argument_group("priors (uniform ranges; defaults in brackets)")
    for f in dataclasses.fields(Priors):
        default = f.default
        option = "--" + f.name.replace("_", "-")
        if isinstance(default, tuple):
            kind = int if all(isinstance(v, int) for v in default) else float
            group.add_argument(option, dest=f"prior_{f.name}", type=kind, nargs=2, metavar=("LO", "HI"),
                               help=f"[{default[0]} {default[1]}]")
        elif isinstance(default, bool):
            group.add_argument(option, dest=f"prior_{f.name}", action="store_true", default=None,
                               help="draw the class first, then class-separated parameters (see Priors)")
        else:
            group.add_argument(option, dest=f"prior_{f.name}", type=type(default), metavar="X", help=f"[{default}]")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Deep learning on galaxy images: simulate, inspect, tour.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    sim = sub.add_parser("simulate", help="simulate a dataset of galaxy stamps into one HDF5 file",
                         description="Simulate galaxy stamps (item i depends only on --seed and i) into one "
                         "HDF5 file; an interrupted run resumes when rerun with the same arguments.")
    sim.add_argument("--survey", default="candels-f160w", help="survey preset [candels-f160w]")
    sim.add_argument("--n", type=int, required=True, help="number of stamps")
    sim.add_argument("--out", type=Path, required=True, help="output HDF5 file (with --shards: sims.h5 -> "
                     "sims-0000I-of-0000K.h5, a directory -> DIR/sims-0000I-of-0000K.h5)")
    sim.add_argument("--shards", type=int, default=1, metavar="K",
                     help="write one of K shards of the N items (e.g. one per machine); --data DIR, a quoted glob "
                     "or the unsharded --out name reads them as one dataset [1]")
    sim.add_argument("--shard-index", type=int, default=0, metavar="I",
                     help="which shard, 0 .. K-1: items I*N//K .. (I+1)*N//K - 1 [0]")
    sim.add_argument("--seed", type=_SEED, default=0, help="dataset seed [0]")
    sim.add_argument("--stamp-size", type=_STAMP, default=64, help="stamp side, pixels [64]")
    sim.add_argument("--pixel-scale", type=_POSITIVE, metavar="ARCSEC", help="pixel scale, arcsec/px [survey's]")
    sim.add_argument("--psf", help="gaussian:FWHM, moffat:FWHM,BETA (arcsec), FILE.fits[:HDU][@ARCSEC_PER_PX] "
                     "or none [survey's]")
    sim.add_argument("--zeropoint", type=_FINITE, metavar="MAG",
                     help="AB magnitude of one image count, e.g. a real frame's [survey's]")
    sim.add_argument("--gain", type=_POSITIVE, metavar="E_PER_COUNT",
                     help="electrons per image count, for the sources' Poisson noise [survey's]")
    noise = sim.add_mutually_exclusive_group()
    noise.add_argument("--background", type=Path, metavar="FITS", help="add cutouts of this real background image")
    noise.add_argument("--noise", choices=["none"], help="'none': noise-free images")
    sim.add_argument("--clumps", action="store_true", help="add unresolved clumps and a clump mask")
    sim.add_argument("--neighbors", action="store_true", help="add companion galaxies and a neighbour mask")
    sim.add_argument("--components", action="store_true", help="also store noiseless, bulge and disk images")
    sim.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N [cpu]")
    sim.add_argument("--batch-size", type=int, default=512, help="stamps per batch [512]")
    sim.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sim.add_argument("--catalog-out", type=Path, metavar="FILE", help="also write the catalogue (.ecsv or .fits)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    _prior_options(sim)
    sim.set_defaults(handler=_simulate)

    info = sub.add_parser("info", help="summarise a dataset or field file")
    info.add_argument("file", type=Path)
    info.set_defaults(handler=_info)

    verbs = {name: _verb(sub, name, text, metavar) for name, text, metavar in VERBS}
    _classify_commands(sub, verbs)
    _image_commands(verbs)
    _adapt_command(verbs)
    _generative_gan_commands(sub, verbs)
    _generative_latent_commands(sub, verbs)
    _recover_commands(sub, verbs)
    _field_commands(sub, verbs)
    _detect_commands(verbs)
    _tune_commands(sub)

    tour = sub.add_parser("tour", help="run the guided tour and write its HTML report")
    tour.add_argument("--quick", action="store_true", help="small, fast version")
    tour.add_argument("--out", type=Path, default=Path("runs/tour"), help="output folder [runs/tour]")
    tour.set_defaults(handler=_tour)
    return parser


def _run_options(parser: argparse.ArgumentParser, finetune: bool = False) -> None:
    """Training flags: each one overrides the matching field of the YAML run config (fine-tuning
    starts from the source run's config, so it has no --config, --model, --weights or --freeze here)."""
    g = parser.add_argument_group("training (override the source run's config)" if finetune
                                  else "training (override --config)")
    if not finetune:
        g.add_argument("--config", type=Path, help="YAML run config (see deepmorph.training.RunConfig)")
    g.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any config field, dotted, e.g. --set model.kwargs.dropout=0.5 (repeatable)")
    if not finetune:
        g.add_argument("--model", dest="cfg__model.name", help="registered model: cnn, resnet18, unet")
    g.add_argument("--epochs", dest="cfg__epochs", type=int)
    g.add_argument("--batch-size", dest="cfg__batch_size", type=int)
    g.add_argument("--lr", dest="cfg__optimizer.lr", type=float, help="initial learning rate")
    g.add_argument("--optimizer", dest="cfg__optimizer.name", choices=["adam", "adamw", "sgd"])
    g.add_argument("--schedule", dest="cfg__schedule.kind",
                   choices=["none", "step", "exponential", "inverse_time", "cosine", "plateau"])
    g.add_argument("--augmentation", dest="cfg__augmentation", help="preset: none, keras, flips, rotate")
    g.add_argument("--patience", dest="cfg__early_stopping.patience", type=int, help="early-stopping patience")
    if not finetune:
        g.add_argument("--weights", dest="cfg__finetune.weights", help="start from this run's weights")
        g.add_argument("--freeze", dest="cfg__finetune.freeze", help="none, head or blocks:K")
    g.add_argument("--seed", dest="cfg__seed", type=_SEED)
    g.add_argument("--num-workers", dest="cfg__num_workers", type=int)
    g.add_argument("--accelerator", dest="cfg__accelerator", help="auto, cpu, gpu")
    g.add_argument("--devices", dest="cfg__devices", type=_device_count, metavar="N|auto",
                   help="GPUs (or CPU processes) per machine; more than one trains with DDP, --batch-size per device")
    g.add_argument("--num-nodes", dest="cfg__num_nodes", type=int, metavar="N",
                   help="machines, each running this command (started by srun or torchrun)")
    g.add_argument("--strategy", dest="cfg__strategy", help="auto, ddp (every process runs the command), ddp_spawn "
                   "or ddp_fork (it runs once and starts the processes), ddp_find_unused_parameters_true")
    g.add_argument("--precision", dest="cfg__precision", help="32-true, bf16-mixed, 16-mixed (GPU)")
    g.add_argument("--channels-last", dest="cfg__channels_last", action="store_true", default=None,
                   help="channels-last memory layout (faster convolutions on tensor-core GPUs)")
    g.add_argument("--sync-batchnorm", dest="cfg__sync_batchnorm", action="store_true", default=None,
                   help="batch-norm statistics over all devices (GPU DDP)")
    g.add_argument("--quiet", dest="cfg__progress_bar", action="store_false", default=None, help="no progress bar")


def _device(text: str) -> str:
    """``--device``: ``cpu``, or ``cuda[:N]`` when this machine has that GPU."""
    if text == "cpu":
        return text
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: no CUDA GPU on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return text


def _number(kind=float, lo: float | None = None, hi: float | None = None, open_lo: bool = False):
    """An argparse ``type``: a finite ``kind`` number within ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    if lo is not None and hi is not None:
        where = f" within {'(' if open_lo else '['}{lo:g}, {hi:g}]"
    elif lo is not None:
        where = f" {'>' if open_lo else '>='} {lo:g}"
    else:
        where = ""
    noun = "an integer" if kind is int else "a finite number"

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {noun}, got {text!r}") from None
        too_low = lo is not None and (value <= lo if open_lo else value < lo)
        if not math.isfinite(value) or too_low or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"expected {noun}{where}, got {text!r}")
        return value

    return convert


_SEED = _number(int, 0)
_STAMP = _number(int, 8, 1024)
_COUNT = _number(int, 1)
_FRACTION = _number(float, 0, 1)
_POSITIVE = _number(float, 0, open_lo=True)
_FINITE = _number(float)


def _device_count(text: str) -> int | str:
    """``--devices``: a positive integer or ``auto``."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _run_config(args: argparse.Namespace, default=None):
    """The run config: ``default()`` (a task's starting config) or the defaults, then the values
    that --config sets, then the flags and --set."""
    import yaml

    from deepmorph.training import RunConfig

    config = default() if default is not None else RunConfig()
    if args.config:
        RunConfig.from_yaml(args.config)  # validates the file, with a one-line error naming it
        config = config.with_overrides(yaml.safe_load(args.config.read_text(encoding="utf-8")) or {})
    return config.with_overrides(_flag_overrides(args))


def _flag_overrides(args: argparse.Namespace) -> dict:
    """Run-config overrides from the training flags and ``--set KEY=VALUE`` (YAML values)."""
    import yaml

    overrides = {k[5:]: v for k, v in vars(args).items() if k.startswith("cfg__") and v is not None}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise DeepmorphError(f"--set {item!r}: use KEY=VALUE")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _verb(sub, name: str, help: str, metavar: str = "TASK"):
    """``deepmorph NAME TASK ...``: a command whose tasks are sub-commands."""
    return sub.add_parser(name, help=help).add_subparsers(dest="task", metavar=metavar, required=True,
                                                           parser_class=_Parser)


#: ``deepmorph VERB TASK``: the verbs whose tasks are sub-commands.
VERBS = (
    ("train", "train a model", "TASK"),
    ("predict", "apply a trained model", "TASK"),
    ("detect", "detect objects with a trained model", "WHAT"),
    ("evaluate", "score a trained model", "TASK"),
    ("finetune", "fine-tune a trained model on new data (domain adaptation, transfer)", "TASK"),
    ("experiment", "experiments of the lecture", "EXPERIMENT"),
)


def _classify_commands(sub, verbs: dict) -> None:
    train = verbs["train"]
    cls = train.add_parser("classify", help="morphology classification: CNN or statmorph + random forest")
    cls.add_argument("--data", type=Path, required=True, help="labelled dataset (.h5)")
    cls.add_argument("--out", type=Path, required=True, help="run directory (resumed if it holds a checkpoint)")
    cls.add_argument("--method", choices=["cnn", "forest"], default="cnn", help="[cnn]")
    cls.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split [0]")
    cls.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    cls.add_argument("--train-size", type=int, help="use only this many training galaxies")
    cls.add_argument("--jobs", type=int, default=2, help="processes for statmorph (forest) [2]")
    _run_options(cls)
    cls.set_defaults(handler=_train_classify)

    p = verbs["predict"].add_parser("classify", help="classify the stamps of a dataset file")
    p.add_argument("--model", type=Path, required=True, help="run directory")
    p.add_argument("--images", type=Path, required=True, help="dataset (.h5; import real cutouts first)")
    p.add_argument("--out", type=Path, required=True, help="predictions (.ecsv or .fits)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=_predict_classify)

    e = verbs["evaluate"].add_parser("classify",
                                     help="accuracy, per-class precision/recall, confusion matrix, calibration")
    e.add_argument("--model", type=Path, required=True, help="run directory")
    e.add_argument("--data", type=Path, required=True, help="labelled dataset (.h5)")
    e.add_argument("--json", type=Path, help="write the metrics here")
    e.set_defaults(handler=_evaluate_classify)

    x = verbs["experiment"].add_parser("classify-vs-size",
                                       help="accuracy of the CNN and the forest vs training-set size")
    x.add_argument("--data", type=Path, required=True)
    x.add_argument("--out", type=Path, required=True)
    x.add_argument("--sizes", default="100,300,1000,3000", help="comma-separated training-set sizes")
    x.add_argument("--methods", default="cnn,forest")
    x.add_argument("--split-seed", type=int, default=0)
    x.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    x.add_argument("--jobs", type=int, default=2)
    _run_options(x)
    x.set_defaults(handler=_classify_vs_size)

    t = verbs["experiment"].add_parser(
        "transfer", help="survey-to-survey transfer: target accuracy vs number of target labels",
        description="Train the CNN classifier on one survey preset, then score it on another with no fine-tuning, "
        "fine-tuned (each freezing strategy) and trained from scratch on the same target labels.")
    t.add_argument("--source", default="sdss-r", help="source survey preset [sdss-r]")
    t.add_argument("--target", default="des-r", help="target survey preset [des-r]")
    t.add_argument("--labels", default="0,50,100,200,500,1000,5000", help="comma-separated target label counts")
    t.add_argument("--out", type=Path, required=True, help="output folder (rerun to resume)")
    t.add_argument("--n-source", type=int, default=8000, help="simulated source galaxies [8000]")
    t.add_argument("--n-target", type=int, default=8000, help="simulated target galaxies [8000]")
    t.add_argument("--source-data", type=Path, help="labelled source set (.h5) instead of simulating")
    t.add_argument("--target-data", type=Path, help="labelled target set (.h5) instead of simulating")
    t.add_argument("--strategies", default="head,blocks:2,none", help="freezing strategies [head,blocks:2,none]")
    t.add_argument("--stamp-size", type=_STAMP, default=48, help="stamp side, pixels [48]")
    t.add_argument("--finetune-lr", type=float, help="fine-tuning learning rate [the training --lr, 2e-3]")
    t.add_argument("--steps", type=int, default=200, help="least optimiser steps per run on target labels [200]")
    t.add_argument("--finetune-epochs", type=int, default=3, help="least epochs per fine-tuning run [3]")
    t.add_argument("--data-seed", type=int, default=0, help="seed of the simulated sets and the splits [0]")
    _run_options(t)
    t.set_defaults(handler=_transfer)

    imp = sub.add_parser("import", help="real cutouts (FITS, PNG, JPEG) + a label catalogue into a dataset")
    imp.add_argument("--images", required=True, help="folder or glob of cutouts")
    imp.add_argument("--catalog", type=Path, required=True, help="labels (.csv, .ecsv, .fits): file name + label")
    imp.add_argument("--out", type=Path, required=True)
    imp.add_argument("--size", type=int, default=64, help="stamp size, pixels [64]")
    imp.add_argument("--channels", choices=["gray", "rgb", "fits-ext"], default="gray")
    imp.add_argument("--name-column", default="file")
    imp.add_argument("--label-column", help="catalogue column of class labels, required when given [label, "
                     "if the catalogue has one; else the images are unlabelled]")
    imp.add_argument("--overwrite", action="store_true")
    imp.set_defaults(handler=_import)


def _image_commands(verbs: dict) -> None:
    """``train clumps``, ``detect clumps``, ``train decompose``, ``predict decompose``."""
    for task, text in (("clumps", "U-Net clump detector (data simulated with --clumps --components)"),
                       ("decompose", "U-Net bulge/disk decomposition (data simulated with --components)")):
        t = verbs["train"].add_parser(task, help=text, description=text + "; scored against the classical "
                                      "method on the held-out test split.")
        t.add_argument("--data", type=Path, required=True, help="simulated dataset (.h5)")
        t.add_argument("--out", type=Path, required=True, help="run directory (resumed if it holds a checkpoint)")
        t.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split [0]")
        t.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1),
                       metavar=("TRAIN", "VAL", "TEST"))
        t.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the test-split scoring")
        if task == "clumps":
            t.add_argument("--pos-weight", type=float, default=5.0, help="weight of clump pixels in the loss [5]")
        else:
            t.add_argument("--flux-weight", type=float, default=1.0,
                           help="weight of the flux and B/T terms in the loss [1]")
            t.add_argument("--baseline-max", type=int, default=200,
                           help="imfit fits on at most this many test galaxies [200]")
            t.add_argument("--jobs", type=int, default=2, help="processes for the imfit fits [2]")
        _run_options(t)
        t.set_defaults(handler=_train_clumps if task == "clumps" else _train_decompose, image_task=task)

    m = verbs["train"].add_parser("morphometry", help="CNN measuring Sersic parameters with uncertainties",
                                  description="A CNN predicting magnitude, half-light radius, Sersic n, axis ratio "
                                  "and position angle, each with a 1-sigma error, from single-Sersic galaxies "
                                  "(simulate --bulge-to-total 1 1); scored on the held-out test split.")
    m.add_argument("--data", type=Path, required=True, help="simulated single-Sersic dataset (.h5)")
    m.add_argument("--out", type=Path, required=True, help="run directory (resumed if it holds a checkpoint)")
    m.add_argument("--parameters", default="mag,hlr,n,q,pa", help="comma-separated subset of mag,hlr,n,q,pa")
    m.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split [0]")
    m.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    _run_options(m)
    m.set_defaults(handler=_train_morphometry)

    for task in ("classify", "morphometry"):
        f = verbs["finetune"].add_parser(task, help=f"fine-tune a trained {task} run on new data",
                                    description="Start from a run's architecture and weights, freeze the head's "
                                    "inputs (--freeze head), the first K blocks (blocks:K) or nothing (none), and "
                                    "train on the target data; a new head replaces the old one when the classes or "
                                    "parameters differ. The normalisation is refitted on the target.")
        f.add_argument("--model", type=Path, required=True, help="the source run directory")
        f.add_argument("--data", type=Path, required=True, help="target dataset (.h5)")
        f.add_argument("--out", type=Path, required=True, help="the new run directory")
        f.add_argument("--freeze", default="head", help="head, blocks:K or none [head]")
        f.add_argument("--train-size", type=int, help="use only this many labelled target galaxies")
        f.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split [0]")
        f.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
        if task == "morphometry":
            f.add_argument("--parameters", help="comma-separated parameters [the source's]")
        _run_options(f, finetune=True)
        f.set_defaults(handler=_finetune, finetune_task=task)

    pm = verbs["predict"].add_parser("morphometry", help="Sersic parameters of FITS cutouts or of a frame's sources",
                                     description="Real FITS cutouts of any size and pixel scale are resampled to "
                                     "the model's, centred, and measured; bad cutouts get a flag, not an error. "
                                     "With --field, a whole frame's sources are detected (sep, SExtractor's "
                                     "algorithm), cut and measured by a model trained for that frame.")
    pm.add_argument("--model", type=Path, required=True, help="morphometry run directory")
    what = pm.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", help="FITS cutouts, one galaxy at the centre of each")
    what.add_argument("--field", type=Path, metavar="FITS",
                      help="a whole frame in counts: detect its sources with sep and measure each")
    pm.add_argument("--threshold", type=float, help="--field: detection threshold, background sigmas [1.5]")
    pm.add_argument("--compare", type=Path, metavar="CAT",
                    help="--field: compare with this SExtractor catalogue (and plot OUT stem + _vs_sextractor.png)")
    pm.add_argument("--pixel-scale", type=_POSITIVE, help="arcsec per pixel of the cutouts [from each header]")
    pm.add_argument("--zeropoint", type=_FINITE, help="AB zero point of the cutouts' units [the training survey's]")
    pm.add_argument("--psf", help="the cutouts' PSF: gaussian:FWHM, moffat:FWHM,BETA (arcsec) or "
                    "FILE.fits[:HDU][@SCALE]; a sharper one is matched to the model's [the model's]")
    pm.add_argument("--out", type=Path, required=True, help="parameters (.ecsv or .fits)")
    pm.add_argument("--overwrite", action="store_true")
    pm.set_defaults(handler=_predict_morphometry)

    d = verbs["detect"].add_parser("clumps", help="clump catalogue from a U-Net's probability maps",
                                   description="Probability map -> threshold -> sep on the map -> clumps, with "
                                   "fluxes measured on the image. Images larger than a tile are tiled.")
    d.add_argument("--model", type=Path, required=True, help="clump run directory")
    d.add_argument("--images", nargs="+", required=True, help="a dataset (.h5) or FITS images")
    d.add_argument("--threshold", type=float, default=0.5, help="probability threshold [0.5]")
    d.add_argument("--out", type=Path, required=True, help="clump catalogue (.ecsv or .fits)")
    d.add_argument("--maps", type=Path, help="probability maps (FITS) [OUT stem + _maps.fits]")
    d.add_argument("--tile", type=int, default=256, help="tile side for large images, pixels [256]")
    d.add_argument("--overlap", type=int, default=48, help="context kept around each tile, pixels [48]")
    d.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N [cpu]")
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(handler=_detect_clumps)

    p = verbs["predict"].add_parser("decompose", help="bulge and disk images (FITS) and a B/T catalogue")
    p.add_argument("--model", type=Path, required=True, help="decomposition run directory")
    p.add_argument("--images", nargs="+", required=True, help="a dataset (.h5) or FITS cutouts of one size")
    p.add_argument("--out", type=Path, required=True, help="output folder: bulge.fits, disk.fits, bt.ecsv")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N [cpu]")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.set_defaults(handler=_predict_decompose)


def _split(args: argparse.Namespace):
    from deepmorph.workflows.classify import Split

    return Split(args.split_seed, tuple(args.fractions))


def _train_clumps(args: argparse.Namespace) -> None:
    from deepmorph.workflows.clumps import default_config, train_clumps

    r = train_clumps(args.data, args.out, _run_config(args, default_config), _split(args),
                     pos_weight=args.pos_weight, evaluate=args.evaluate)
    print(f"{args.out}: U-Net trained on {r['train_size']} galaxies in {r['epochs_run']} epochs")
    if args.evaluate:
        for name in ("unet", "classical"):
            m = r[name]
            print(f"  {name:<9} completeness {100 * m['completeness_at_purity_90']:.1f}% at purity >= 90% "
                  f"(S/N >= 5 clumps, threshold {m['threshold']:g})")


def _train_decompose(args: argparse.Namespace) -> None:
    from deepmorph.workflows.decompose import default_config, train_decompose

    r = train_decompose(args.data, args.out, _run_config(args, default_config), _split(args),
                        flux_weight=args.flux_weight, evaluate=args.evaluate, baseline_max=args.baseline_max,
                        n_jobs=args.jobs)
    print(f"{args.out}: U-Net trained on {r['train_size']} galaxies in {r['epochs_run']} epochs")
    if args.evaluate:
        for name in ("unet", "imfit"):
            if name in r:
                m = r[name]
                print(f"  {name:<6} RMS B/T error {m['bt_rmse']:.3f} on {m['n']} galaxies with mag < "
                      f"{r['mag_limit']:g}; {1e3 * m['seconds_per_galaxy']:.2f} ms per galaxy")


def _train_morphometry(args: argparse.Namespace) -> None:
    from deepmorph.workflows.morphometry import default_config, train_morphometry

    params = tuple(p.strip() for p in args.parameters.split(",") if p.strip())
    r = train_morphometry(args.data, args.out, _run_config(args, default_config), _split(args), parameters=params)
    print(f"{args.out}: CNN trained on {r['train_size']} galaxies in {r['epochs_run']} epochs; on {r['n_test']} "
          "test galaxies:")
    for name in params:
        m = r[name]
        unit = " (fraction)" if name in ("hlr", "n") else ""
        print(f"  {name:<4} bias {m['bias']:+.4f}  scatter {m['scatter']:.4f}{unit}  within 1 sigma "
              f"{100 * m['coverage_1sigma']:.0f}%")


def _finetune(args: argparse.Namespace) -> None:
    from deepmorph.workflows.classify import Split
    from deepmorph.workflows.finetune import finetune

    overrides = _flag_overrides(args)
    params = getattr(args, "parameters", None)
    params = tuple(p.strip() for p in params.split(",") if p.strip()) if params else None
    r = finetune(args.finetune_task, args.model, args.data, args.out, args.freeze,
                 Split(args.split_seed, tuple(args.fractions), args.train_size), overrides, parameters=params)
    head = "a new head" if r["new_head"] else "the source's head"
    print(f"{args.out}: fine-tuned {args.model} ({args.freeze} frozen, {head}) on {r['train_size']} galaxies")
    if args.finetune_task == "classify":
        print(f"  test accuracy {100 * r['accuracy']:.2f}%")
    else:
        for name in params or [k for k in ("mag", "hlr", "n", "q", "pa") if k in r]:
            m = r[name]
            print(f"  {name:<4} scatter {m['scatter']:.4f}  within 1 sigma {100 * m['coverage_1sigma']:.0f}%")


def _predict_morphometry(args: argparse.Namespace) -> None:
    from deepmorph.data import check_output
    from deepmorph.workflows.morphometry import predict_cutouts

    check_output(args.out, args.overwrite)
    if args.field is not None:
        return _predict_field(args)
    if args.threshold is not None or args.compare is not None:
        raise DeepmorphError("--threshold and --compare go with --field, not --images")
    table = predict_cutouts(args.model, args.images, args.pixel_scale, args.zeropoint, psf=args.psf)
    _write_table(table, args.out)
    flagged = int((table["flag"] != "").sum())
    print(f"{args.out}: {len(table) - flagged} cutouts measured, {flagged} flagged")


def _predict_field(args: argparse.Namespace) -> None:
    from deepmorph.workflows.field import compare_with_sextractor, measure_field

    if args.psf is not None:
        raise DeepmorphError("--psf goes with --images; a --field model is trained for the frame's PSF")
    if args.compare is not None:
        from deepmorph.workflows.field import read_sextractor_catalog

        read_sextractor_catalog(args.compare)  # a bad catalogue fails before the measurement and the output
    table = measure_field(args.model, args.field, args.zeropoint, args.pixel_scale, threshold=args.threshold)
    _write_table(table, args.out)
    flagged = int((table["flag"] != "").sum())
    print(f"{args.out}: {len(table)} sources detected and measured, {flagged} flagged (edge, saturated...)")
    if args.compare is not None:
        figure = args.out.with_name(args.out.stem + "_vs_sextractor.png")
        r = compare_with_sextractor(table, args.compare, figure=figure)
        print(f"  {r['n_matched']} of {r['n_sextractor']} SExtractor sources matched within {r['radius_pix']:g} px "
              f"(median offset {r['median_offset_pix']:.2g} px); figure {figure}")
        for key, label in (("cnn", "CNN mag     "), ("sep", "sep mag_auto")):
            m = r[key]
            print(f"  {label} - SExtractor MAG_AUTO: median |delta| {m['median_abs_dmag']:.3f}, median "
                  f"{m['median_dmag']:+.3f} mag ({m['n']} sources)")


def _detect_clumps(args: argparse.Namespace) -> None:
    from deepmorph.data import check_output
    from deepmorph.workflows.clumps import detect_clumps

    check_output(args.out, args.overwrite)
    maps = args.maps or args.out.with_name(args.out.stem + "_maps.fits")
    check_output(maps, args.overwrite)
    table = detect_clumps(args.model, args.images, args.threshold, maps, tile=args.tile, overlap=args.overlap,
                          device=args.device)
    _write_table(table, args.out)
    print(f"{args.out}: {len(table)} clumps; probability maps in {maps}")


def _predict_decompose(args: argparse.Namespace) -> None:
    from deepmorph.workflows.decompose import predict_decompose

    table = predict_decompose(args.model, args.images, args.out, device=args.device, overwrite=args.overwrite)
    print(f"{args.out}: bulge.fits, disk.fits and bt.ecsv for {len(table)} galaxies")


def _write_table(table, out: Path) -> None:
    """Write an astropy table to ``out`` (.fits or .ecsv) via a temporary name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial" + out.suffix)
    table.write(tmp, overwrite=True, format="fits" if out.suffix.lower() in (".fits", ".fit") else "ascii.ecsv")
    tmp.replace(out)


def _train_classify(args: argparse.Namespace) -> None:
    from deepmorph.workflows.classify import Split, train_cnn, train_forest_run

    split = Split(args.split_seed, tuple(args.fractions), args.train_size)
    if args.method == "cnn":
        result = train_cnn(args.data, args.out, _run_config(args), split)
    else:
        result = train_forest_run(args.data, args.out, split, n_jobs=args.jobs)
    print(f"{args.out}: {args.method} trained on {result['train_size']} galaxies; "
          f"test accuracy {100 * result['accuracy']:.2f}% ({args.out / 'test_metrics.json'})")


def _predict_classify(args: argparse.Namespace) -> None:
    from deepmorph.data import check_output
    from deepmorph.workflows.classify import predict

    check_output(args.out, args.overwrite)
    table = predict(args.model, args.images)
    _write_table(table, args.out)
    print(f"{args.out}: {len(table)} predictions")


def _evaluate_classify(args: argparse.Namespace) -> None:
    from deepmorph.workflows.classify import evaluate

    metrics = evaluate(args.model, args.data, args.json)
    print(f"accuracy {100 * metrics['accuracy']:.2f}% on {args.data}")
    for name, row in metrics["per_class"].items():
        print(f"  {name:<10} precision {row['precision']:.3f}  recall {row['recall']:.3f}  n={row['support']}")


def _classify_vs_size(args: argparse.Namespace) -> None:
    from deepmorph.workflows.classify import classify_vs_size

    try:
        sizes = [int(v) for v in args.sizes.split(",") if v.strip()]
    except ValueError:
        raise DeepmorphError(f"--sizes {args.sizes!r}: give comma-separated integers") from None
    table = classify_vs_size(args.data, args.out, sizes, _run_config(args), args.methods.split(","),
                             split_seed=args.split_seed, n_jobs=args.jobs, fractions=tuple(args.fractions))
    table.pprint(max_lines=-1)


def _transfer(args: argparse.Namespace) -> None:
    from deepmorph.workflows.transfer import labels_needed, transfer_config, transfer_experiment

    try:
        labels = [int(v) for v in args.labels.split(",") if v.strip()]
    except ValueError:
        raise DeepmorphError(f"--labels {args.labels!r}: give comma-separated integers") from None
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    table = transfer_experiment(
        args.out, args.source, args.target, labels, n_source=args.n_source, n_target=args.n_target,
        strategies=strategies, stamp_size=args.stamp_size, config=_run_config(args, transfer_config),
        finetune_lr=args.finetune_lr, steps=args.steps, finetune_epochs=args.finetune_epochs, seed=args.data_seed,
        source_data=args.source_data, target_data=args.target_data)
    table["accuracy"].format = ".4f"
    table["train_seconds"].format = ".1f"
    table.pprint(max_lines=-1, max_width=-1)
    print(f"source CNN on its own survey: accuracy {100 * table.meta['source_accuracy']:.2f}%")
    print("target labels needed for 95% accuracy:")
    for curve, n in labels_needed(table).items():
        print(f"  {curve:<18} {'not reached' if n is None else n}")
    print(f"{args.out / 'transfer.ecsv'}, {args.out / 'transfer.png'}")


def _import(args: argparse.Namespace) -> None:
    from deepmorph.data import import_images

    report = import_images(args.images, args.catalog, args.out, size=args.size, channels=args.channels,
                           name_column=args.name_column, label_column=args.label_column or "label",
                           require_labels=args.label_column is not None, overwrite=args.overwrite)
    print(report)


def _simulate(args: argparse.Namespace) -> None:
    from deepmorph.data import check_output, export_catalog, partial_path, write_dataset
    from deepmorph.data.store import catalog_format, shard_path, shard_range

    out = args.out
    if args.shards != 1 or args.shard_index != 0:
        first, count = shard_range(args.n, args.shards, args.shard_index)  # a one-line error if out of range
        out = shard_path(args.out, args.shard_index, args.shards)
    check_output(out, args.overwrite)  # before the slower imports and set-up
    if args.catalog_out is not None:
        check_output(args.catalog_out, args.overwrite)
        catalog_format(args.catalog_out)  # refused before the stamps are written, not after
    from deepmorph.simulate import Priors, Simulator, get_survey, read_background

    survey = get_survey(args.survey).with_photometry(args.zeropoint, args.gain)
    overrides = {
        f.name: tuple(v) if isinstance(v, list) else v
        for f in dataclasses.fields(Priors)
        if (v := getattr(args, f"prior_{f.name}")) is not None
    }
    noise = args.noise
    if args.background is not None:
        noise = read_background(args.background, gain_e_per_count=survey.gain_e_per_count)
    simulator = Simulator(
        survey, stamp_size=args.stamp_size, priors=Priors(**overrides), psf=args.psf,
        pixel_scale_arcsec=args.pixel_scale, noise=noise, clumps=args.clumps, neighbors=args.neighbors,
        components=args.components, device=args.device,
    )
    start = time.perf_counter()
    try:
        path = write_dataset(args.out, simulator, args.n, args.seed, batch_size=args.batch_size,
                             overwrite=args.overwrite, progress=not args.no_progress, shards=args.shards,
                             shard_index=args.shard_index)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted; {partial_path(out)} keeps the stamps done so far: rerun the same command to resume"
        ) from None
    what = f"{args.n} stamps" if out is args.out else f"stamps {first}..{first + count - 1} of {args.n}"
    print(f"{path}: {what} of {args.stamp_size}x{args.stamp_size} px ({survey.name}) "
          f"in {time.perf_counter() - start:.1f} s")
    if args.catalog_out is not None:
        print(f"{export_catalog(path, args.catalog_out)}: catalogue")


def _info(args: argparse.Namespace) -> None:
    from deepmorph.data import summarize
    from deepmorph.simulate.fields import is_field_file, summarize_fields

    print(summarize_fields(args.file) if is_field_file(args.file) else summarize(args.file))


def _tour(args: argparse.Namespace) -> None:
    try:
        from deepmorph.tour import run_tour
    except ModuleNotFoundError as exc:
        if exc.name != "deepmorph.tour":
            raise
        raise DeepmorphError("the tour is not part of this installation (no deepmorph.tour module)") from None
    print(f"tour report: {run_tour(out=args.out, quick=args.quick)}")


def _adapt_command(verbs: dict) -> None:
    """``experiment adapt``: morphometry domain adaptation, idealised -> harder simulations."""
    a = verbs["experiment"].add_parser(
        "adapt", help="morphometry domain adaptation: idealised -> harder simulations, few target labels",
        description="Train the morphometry CNN on idealised simulations (isolated, Gaussian sky), score it on harder "
        "ones (real sky cutouts, a real HST PSF, neighbours, clumps), fine-tune it on a labelled fraction of the "
        "target set with each freezing strategy, and train from scratch on the same labels; every model is scored "
        "on one target test split.")
    a.add_argument("--out", type=Path, required=True, help="output folder (rerun to resume)")
    a.add_argument("--source-run", type=Path, help="a trained morphometry run to adapt [train one on the source set]")
    a.add_argument("--source-data", type=Path, help="source set (.h5) instead of simulating it")
    a.add_argument("--target-data", type=Path, help="target set (.h5) instead of simulating it")
    a.add_argument("--fractions", default="0.001,0.01,0.1", help="labelled fractions of the target set "
                   "[0.001,0.01,0.1]; each must give at least 5 labels")
    a.add_argument("--strategies", default="head,blocks:2,none", help="freezing strategies [head,blocks:2,none]")
    a.add_argument("--n-source", type=int, default=8000, help="simulated source galaxies [8000]")
    a.add_argument("--n-target", type=int, default=8000, help="simulated target galaxies [8000]")
    a.add_argument("--background", type=Path, metavar="FITS", help="sky image of the target, scaled to the survey's "
                   "sky noise [../shared/data's NTT frame, else the Hubble Deep Field]")
    a.add_argument("--psf", help="the target's PSF: gaussian:FWHM, moffat:FWHM,BETA or FILE.fits[:HDU][@SCALE] "
                   "[a real HST ACS PSF from ../shared/data, else moffat:0.25,2.5]")
    a.add_argument("--stamp-size", type=_STAMP, default=64, help="stamp side of the simulated sets, pixels [64]")
    a.add_argument("--finetune-lr", type=float, default=5e-4, help="fine-tuning learning rate [5e-4]")
    a.add_argument("--steps", type=int, default=150, help="optimiser steps of each few-label run [150]")
    a.add_argument("--data-seed", type=int, default=0, help="seed of the simulated sets and the splits [0]")
    _run_options(a)
    a.set_defaults(handler=_adapt)


def _adapt(args: argparse.Namespace) -> None:
    from deepmorph.workflows.adapt import adapt_config, adapt_experiment

    try:
        fractions = [float(v) for v in args.fractions.split(",") if v.strip()]
    except ValueError:
        raise DeepmorphError(f"--fractions {args.fractions!r}: give comma-separated numbers") from None
    config = _run_config(args, lambda: adapt_config(**{"model.kwargs.image_size": args.stamp_size}))
    table = adapt_experiment(
        args.out, args.source_run, args.source_data, args.target_data, fractions,
        [s.strip() for s in args.strategies.split(",") if s.strip()], n_source=args.n_source,
        n_target=args.n_target, config=config, finetune_lr=args.finetune_lr, steps=args.steps, seed=args.data_seed,
        stamp_size=args.stamp_size, background=args.background, psf=args.psf)
    names = ["method", "strategy", "labels", "mag_scatter", "hlr_scatter", "hlr_dex_scatter", "n_scatter",
             "n_dex_scatter", "q_scatter", "pa_scatter", "mag_gap_closed", "hlr_dex_gap_closed"]
    shown = table[names]
    for name in names[3:]:
        shown[name].format = ".3f"
    shown.pprint(max_lines=-1, max_width=-1)
    print("scatter: NMAD of the errors (mag in mag, hlr and n as fractions, q absolute, pa in deg); dex: NMAD of "
          "log10(measured / true); gap closed: (un-adapted - row) / (un-adapted - source domain)")
    print(f"{args.out / 'adapt.ecsv'}, {args.out / 'adapt.png'}, {args.out / 'adapt_examples.png'}")


def _generative_latent_commands(sub, verbs: dict) -> None:
    """``train ae``, ``train vae`` and ``latent maps|grid|interpolate|compare``."""
    for kind, text in (("ae", "convolutional autoencoder of the stamps"),
                       ("vae", "convolutional (beta-)VAE of the stamps, and its latent space")):
        t = verbs["train"].add_parser(
            kind, help=text, description=f"Train a {text} on a dataset's training split (normalisation fitted on "
            "it); the latent space is then scored on the held-out test split: rank correlations and probes of each "
            "catalogue parameter, latent maps, a decoded grid and interpolations (files in --out).")
        t.add_argument("--data", type=Path, required=True, help="dataset (.h5), simulated or imported")
        t.add_argument("--out", type=Path, required=True, help="run directory (resumed if it holds a checkpoint)")
        t.add_argument("--latent-dim", dest="cfg__model.kwargs.latent_dim", type=int, metavar="K",
                       help="latent dimensions (2 for maps of the latent itself) [16]")
        t.add_argument("--likelihood", choices=["gaussian", "laplace"], default="gaussian",
                       help="per-pixel likelihood of the normalised image [gaussian]")
        t.add_argument("--scale", type=float, help="fixed likelihood scale, normalised units [learned]")
        t.add_argument("--align", action="store_true", default=None,
                       help="pose normalisation: rotate each stamp so that its major axis lies along +x before "
                            "encoding (the code then holds shape, not orientation)")
        if kind == "vae":
            t.add_argument("--beta", type=float, default=1.0, help="weight of the KL term (beta-VAE) [1]")
            t.add_argument("--kl-warmup", type=float, default=5.0, metavar="EPOCHS",
                           help="epochs of linear KL warm-up, 0 for none [5]")
        t.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split [0]")
        t.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
        t.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the latent-space scoring")
        _run_options(t)
        t.set_defaults(handler=_train_latent, latent_kind=kind)

    latent = _verb(sub, "latent", "explore the latent space of a trained autoencoder or VAE", "TOOL")
    tools = (
        ("maps", "the latent plane (or its first two principal components) coloured by each catalogue parameter, "
                 "and the table of rank correlations and probes"),
        ("grid", "images decoded over the latent plane"),
        ("interpolate", "images decoded along the line between pairs of galaxies' codes"),
        ("compare", "two datasets in one latent space, with two-sample distances (energy, MMD, classifier AUC)"),
    )
    for tool, text in tools:
        p = latent.add_parser(tool, help=text, description=text[0].upper() + text[1:] + ".")
        p.add_argument("--model", type=Path, required=True, help="autoencoder or VAE run directory")
        p.add_argument("--data", type=Path, required=tool in ("interpolate", "compare"),
                       help="dataset (.h5)" + ("" if tool in ("interpolate", "compare")
                                               else " [the run's own data, its test split]"))
        p.add_argument("--out", type=Path, required=True, help="output folder")
        if tool in ("maps", "grid", "compare"):
            p.add_argument("--max-items", type=_COUNT, default=20000 if tool == "maps" else 5000 if tool == "grid"
                           else 2000, help="use at most this many galaxies of each dataset (random subset)")
        if tool == "grid":
            p.add_argument("--n", type=int, default=8, help="images per side [8]")
            p.add_argument("--span", type=_POSITIVE, default=2.0, help="half-width, standard deviations [2]")
        if tool == "interpolate":
            p.add_argument("--pairs", default="0:1,2:3,4:5,6:7", help="item pairs A:B, comma-separated [0:1,...,6:7]")
            p.add_argument("--steps", type=int, default=8, help="decoded images per path, ends included [8]")
        if tool == "compare":
            p.add_argument("--other", type=Path, required=True, help="the second dataset (.h5)")
            p.add_argument("--labels", nargs=2, metavar=("A", "B"), help="names of the two [the file names]")
            p.add_argument("--permutations", type=_COUNT, default=200, help="permutations of the MMD test [200]")
        p.add_argument("--seed", type=_SEED, default=0, help="seed of subsets and probe splits [0]")
        p.set_defaults(handler=_latent_tool, latent_tool=tool)


def _print_correlations(rows) -> None:
    print(f"  {'parameter':<10} {'n':>6} {'best |rho|':>10} {'dim':>4} {'probe rho':>9} {'linear R2':>9} "
          f"{'kNN R2':>7} {'MI':>6}")
    def f(r, key, width=9):
        v = r[key]
        return f"{v:>{width}.3f}" if v is not None and v == v else f"{'-':>{width}}"

    for r in rows:
        print(f"  {r['parameter']:<10} {r['n']:>6} {f(r, 'best_abs_spearman', 10)} {r['best_dim']:>4} "
              f"{f(r, 'probe_spearman')} {f(r, 'linear_r2')} {f(r, 'knn_r2', 7)} {f(r, 'mutual_info', 6)}")


def _train_latent(args: argparse.Namespace) -> None:
    from deepmorph.data import dataset_exists
    from deepmorph.workflows.latent import default_config, train_autoencoder

    if not dataset_exists(args.data):
        raise DeepmorphError(f"{args.data}: no such dataset file (or shards)")
    kind = args.latent_kind
    r = train_autoencoder(args.data, args.out, _run_config(args, lambda: default_config(kind)), kind, _split(args),
                          likelihood=args.likelihood, beta=getattr(args, "beta", 1.0),
                          kl_warmup=getattr(args, "kl_warmup", 0.0), scale=args.scale, evaluate=args.evaluate,
                          align=args.align)
    print(f"{args.out}: {kind} trained on {r['train_size']} galaxies in {r['epochs_run']} epochs "
          f"({r['train_seconds']:.0f} s)")
    if args.evaluate:
        print(f"  latent space on {r['n_eval']} test galaxies (reconstruction MSE {r['recon_mse']:.3g}, normalised "
              f"units); {args.out / 'latent_correlations.ecsv'}:")
        _print_correlations(r["correlations"])


def _latent_tool(args: argparse.Namespace) -> None:
    from deepmorph.data import dataset_exists
    from deepmorph.workflows import latent

    latent.require_run_dir(args.model)
    for path in (args.data, getattr(args, "other", None)):
        if path is not None and not dataset_exists(path):
            raise DeepmorphError(f"{path}: no such dataset file (or shards)")
    tool, out = args.latent_tool, args.out
    if tool == "maps":
        r = latent.latent_maps(args.model, args.data, out, max_items=args.max_items, seed=args.seed)
        print(f"{out / 'latent_maps.png'}, {out / 'latent_maps.ecsv'}: {len(r['z'])} galaxies; "
              f"{out / 'latent_correlations.ecsv'}:")
        rows = [dict(zip(r["correlations"].colnames, row, strict=True)) for row in r["correlations"]]
        _print_correlations(rows)
    elif tool == "grid":
        latent.decoded_grid(args.model, args.data, args.n, args.span, out, max_items=args.max_items, seed=args.seed)
        print(f"{out / 'decoded_grid.png'}: {args.n} x {args.n} decoded images")
    elif tool == "interpolate":
        try:
            pairs = [tuple(int(v) for v in item.split(":")) for item in args.pairs.split(",") if item.strip()]
        except ValueError:
            raise DeepmorphError(f"--pairs {args.pairs!r}: give comma-separated A:B item pairs") from None
        if not pairs or any(len(p) != 2 for p in pairs):
            raise DeepmorphError(f"--pairs {args.pairs!r}: give comma-separated A:B item pairs")
        latent.interpolation_figure(args.model, args.data, pairs, args.steps, out)
        print(f"{out / 'interpolation.png'}: {len(pairs)} paths of {args.steps} decoded images")
    else:
        r = latent.compare_populations(args.model, args.data, args.other, out,
                                       labels=tuple(args.labels) if args.labels else None, max_items=args.max_items,
                                       permutations=args.permutations, seed=args.seed)
        a, b = r["labels"]
        print(f"{out / 'compare.png'}, {out / 'compare.json'}: {a} ({r['n_a']}) vs {b} ({r['n_b']})")
        print(f"  energy distance {r['energy_distance']:.4g} (two halves of {a}: {r['energy_distance_null']:.2g})")
        print(f"  MMD^2 {r['mmd2']:.4g} (RBF, bandwidth {r['mmd_bandwidth']:.3g}; "
              f"permutation p = {r['mmd_p_value']:.3g})")
        print(f"  classifier two-sample AUC {r['classifier_auc']:.3f} (0.5: indistinguishable)")


def _generative_gan_commands(sub, verbs: dict) -> None:
    """``train gan``, ``train anomaly-encoder``, ``anomalies``, ``evaluate anomalies``, ``simulate-anomalies``."""
    from deepmorph.simulate.anomalies import KINDS

    def gan_train(args: argparse.Namespace) -> None:
        from deepmorph.workflows.gan import default_config, train_gan

        r = train_gan(args.data, args.out, _run_config(args, default_config), loss=args.loss, d_steps=args.d_steps,
                      label_smoothing=args.label_smoothing, spectral_norm=args.spectral_norm or None,
                      latent_dim=args.latent_dim, gp_weight=args.gp_weight, feature_matching=args.feature_matching,
                      split=_split(args), evaluate=args.evaluate, n_eval=args.n_eval, classifier=args.classifier,
                      noise=_gan_noise(args.noise))
        print(f"{args.out}: GAN trained on {r['train_size']} stamps in {r['epochs_run']} epochs "
              f"(d_loss {r['d_loss']:.3f}, g_loss {r['g_loss']:.3f}); samples in {args.out / 'samples'}")
        for name, ks in r.get("ks", {}).items():
            print(f"  {name:<14} KS D {ks['d']:.3f}  p {ks['p']:.3g}  ({r['n_generated']} generated vs "
                  f"{r['n_real']} real)")
        if "fd_generated_real" in r:
            print(f"  Frechet distance generated-real {r['fd_generated_real']:.4g}, real-real "
                  f"{r['fd_real_real']:.4g} ({r['fd_n']} stamps each)")

    def encoder_train(args: argparse.Namespace) -> None:
        from deepmorph.workflows.gan import encoder_config, train_encoder

        config = encoder_config().with_overrides(_flag_overrides(args))
        split = None if args.split_seed is None else _split(args)  # default: the GAN's own split
        r = train_encoder(args.model, args.data, args.out, config, kappa=args.kappa, split=split)
        print(f"{args.out}: izi encoder trained on {r['train_size']} stamps in {r['epochs_run']} epochs "
              f"(val_loss {r['val_loss']:.4g})")

    def rank(args: argparse.Namespace) -> None:
        from deepmorph.data import check_output
        from deepmorph.workflows.anomaly import rank_images

        check_output(args.out, args.overwrite)
        if args.residuals is not None:
            check_output(args.residuals, args.overwrite)
        table = rank_images(args.model, images=args.images, data=args.data, method=args.method, lam=args.lam,
                            steps=args.steps, lr=args.lr, fpr=args.fpr, reference=args.reference,
                            n_reference=args.n_reference, residuals=args.residuals, power=args.power,
                            reduce=args.reduce)
        _write_table(table, args.out)
        m = table.meta
        print(f"{args.out}: {len(table)} images ranked by {m['method']} score; {int(table['anomalous'].sum())} above "
              f"the threshold {m['threshold']:.4g} (false-positive rate {m['fpr']:g} on {m['n_reference']} normal "
              f"galaxies of {m['reference']}); {1e3 * m['seconds_per_image']:.2f} ms per image")

    def evaluate(args: argparse.Namespace) -> None:
        from deepmorph.workflows.anomaly import evaluate_anomalies

        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        table = evaluate_anomalies(args.model, args.benchmark, args.out, methods=methods, lam=args.lam,
                                   steps=args.steps, lr=args.lr, fpr=args.fpr, pixel_fpr=args.pixel_fpr,
                                   smooth=args.smooth, max_per_kind=args.max_per_kind, power=args.power,
                                   reduce=args.reduce)
        for name in table.colnames[1:]:
            table[name].format = ".3g"
        table.pprint(max_lines=-1, max_width=-1)
        print(f"{args.out / 'anomaly_table.ecsv'}, {args.out / 'scores.ecsv'}, residual maps in {args.out}")

    def simulate(args: argparse.Namespace) -> None:
        from deepmorph.simulate.anomalies import write_benchmark

        kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
        start = time.perf_counter()
        path = write_benchmark(args.out, args.n_normal, args.n_per_kind, seed=args.seed, kinds=kinds,
                               survey=args.survey, stamp_size=args.stamp_size, overwrite=args.overwrite,
                               progress=not args.no_progress)
        print(f"{path}: {args.n_normal} normal galaxies + {args.n_per_kind} of each of {', '.join(kinds)} "
              f"({args.stamp_size}x{args.stamp_size} px, masks in /anomaly_mask) in "
              f"{time.perf_counter() - start:.1f} s")

    def split_options(p) -> None:
        p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split [0]")
        p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))

    def score_options(p) -> None:
        p.add_argument("--lambda", dest="lam", type=float, default=0.1,
                       help="weight of the discriminator-feature term: A = (1-l) R + l D [0.1]")
        p.add_argument("--steps", type=int, default=100, help="latent-search steps (anogan) [100]")
        p.add_argument("--lr", type=float, default=0.05, help="latent-search learning rate [0.05]")
        p.add_argument("--fpr", type=float, default=0.05,
                       help="target false-positive rate on normal galaxies, which sets the threshold [0.05]")
        p.add_argument("--power", type=float, default=1.0,
                       help="R = sum |x - G(z*)|^POWER (AnoGAN: 1; 2 favours compact anomalies) [1]")
        p.add_argument("--reduce", choices=["sum", "max", "scan"], default="sum",
                       help="R sums the residual map (AnoGAN), takes its largest pixel, or its largest multi-scale "
                       "significance (scan: residual smoothed at 0, 1, 2 px, in units of its noise) [sum]")

    g = verbs["train"].add_parser(
        "gan", help="DCGAN of galaxy stamps (k discriminator steps per generator step)",
        description="Train a DCGAN on the stamps of a dataset (e.g. normal galaxies from simulate-anomalies "
        "--n-per-kind 0); sample grids every epoch in OUT/samples; afterwards the generated stamps' flux, radius, "
        "concentration, ellipticity and asymmetry are compared with real ones (KS tests), and with --classifier "
        "the Frechet distance in a classifier's feature space.")
    g.add_argument("--data", type=Path, required=True, help="dataset (.h5) of square stamps (32, 48, 64... px)")
    g.add_argument("--out", type=Path, required=True, help="run directory (resumed if it holds a checkpoint)")
    g.add_argument("--latent-dim", type=int, help="latent size [64]")
    g.add_argument("--d-steps", type=int, default=1, help="discriminator steps per generator step [1]")
    g.add_argument("--loss", choices=["bce", "wgan-gp"], default="bce", help="[bce]")
    g.add_argument("--spectral-norm", action="store_true", help="spectral norm in the discriminator")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="one-sided label smoothing, bce [0]")
    g.add_argument("--gp-weight", type=float, default=10.0, help="gradient-penalty weight, wgan-gp [10]")
    g.add_argument("--feature-matching", type=float, default=0.0, help="feature-matching weight in G's loss [0]")
    g.add_argument("--noise", default="sky",
                   help="who makes the noise: 'sky' (the generator draws noise-free galaxies and the GAN adds the "
                   "dataset's recorded sky + Poisson noise), 'none' (the generator draws it too), or a sky sigma in "
                   "counts [sky]")
    g.add_argument("--classifier", type=Path, help="a classify run: its CNN's features give the Frechet distance")
    g.add_argument("--n-eval", type=int, default=2000, help="stamps of the quality measurement [2000]")
    g.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the quality measurement")
    split_options(g)
    _run_options(g)
    g.set_defaults(handler=gan_train)

    e = verbs["train"].add_parser(
        "anomaly-encoder", help="f-AnoGAN's izi encoder of a trained GAN (fast anomaly scores)",
        description="Train an encoder E (image -> latent) with the GAN's generator and discriminator frozen: "
        "loss |x - G(E(x))|^2 + kappa |f(x) - f(G(E(x)))|^2 on normal galaxies.")
    e.add_argument("--model", type=Path, required=True, help="the GAN run directory")
    e.add_argument("--data", type=Path, help="normal galaxies (.h5) [the GAN's training data]")
    e.add_argument("--out", type=Path, required=True, help="run directory of the encoder")
    e.add_argument("--kappa", type=float, default=1.0, help="weight of the discriminator-feature residual [1]")
    e.add_argument("--split-seed", type=int, help="seed of the train/val/test split [the GAN's]")
    e.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                   help="with --split-seed [0.8 0.1 0.1]")
    _run_options(e, finetune=True)
    e.set_defaults(handler=encoder_train)

    a = sub.add_parser(
        "anomalies", help="rank images by GAN anomaly score (AnoGAN latent search or the izi encoder)",
        description="Score each image with A = (1-lambda) R + lambda D (R: summed residual |x - G(z*)|, D: "
        "discriminator-feature distance), z* by latent search (anogan) or the encoder (izi), and rank them. "
        "The 'anomalous' flag uses the threshold that gives --fpr false positives on normal galaxies "
        "(--reference, default the GAN's held-out test split).")
    a.add_argument("--model", type=Path, required=True,
                   help="an anomaly-encoder run (izi, anogan) or a GAN run (anogan)")
    what = a.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+", help="FITS (or PNG) stamps of the model's size, in counts")
    what.add_argument("--data", type=Path, help="a dataset file (.h5)")
    a.add_argument("--out", type=Path, required=True, help="ranked scores (.ecsv or .fits)")
    a.add_argument("--method", choices=["anogan", "izi"], help="[izi for an encoder run, else anogan]")
    score_options(a)
    a.add_argument("--reference", type=Path, help="normal galaxies (.h5) that set the threshold [the GAN's test split]")
    a.add_argument("--n-reference", type=_COUNT, default=200, help="reference galaxies used [200]")
    a.add_argument("--residuals", type=Path, metavar="FITS", help="write the residual maps |x - G(z*)| here")
    a.add_argument("--overwrite", action="store_true")
    a.set_defaults(handler=rank)

    v = verbs["evaluate"].add_parser(
        "anomalies", help="ROC AUC per anomaly kind, TPR at the threshold, residual-map IoU, time per image",
        description="Score a benchmark (simulate-anomalies) with every method on the same images; the even normal "
        "items set the thresholds, the odd ones measure the false-positive rate reached.")
    v.add_argument("--model", type=Path, required=True,
                   help="an anomaly-encoder run (or a GAN run with --methods anogan)")
    v.add_argument("--benchmark", type=Path, required=True, help="a benchmark file from simulate-anomalies")
    v.add_argument("--out", type=Path, required=True, help="output folder")
    v.add_argument("--methods", default="izi,anogan", help="comma-separated: izi, anogan [izi,anogan]")
    score_options(v)
    v.add_argument("--pixel-fpr", type=float, default=0.003,
                   help="false-positive rate of residual-map pixels on normal galaxies, for the IoU [0.003]")
    v.add_argument("--smooth", type=_number(float, 0), default=0.0,
                   help="Gaussian smoothing of residual maps, pixels [0]")
    v.add_argument("--max-per-kind", type=_COUNT, help="score at most this many images of each kind")
    v.set_defaults(handler=evaluate)

    s = sub.add_parser(
        "simulate-anomalies", help="the anomaly benchmark: normal galaxies + injected anomalies with truth masks",
        description="Item i is normal for i < N_NORMAL, then N_PER_KIND items of each kind: the normal galaxy of "
        "the same item with an anomaly injected (companion, stream, clumps, cosmic_ray, satellite_trail, "
        "bad_column). A dataset file with an extra /anomaly_mask array and catalogue columns anomaly, anomaly_kind, "
        "anomaly_flux_fraction, mask_pixels. --n-per-kind 0 writes normal galaxies only (a GAN's training set).")
    s.add_argument("--out", type=Path, required=True, help="output HDF5 file")
    s.add_argument("--n-normal", type=int, required=True, help="normal galaxies")
    s.add_argument("--n-per-kind", type=int, default=0, help="anomalies of each kind [0]")
    s.add_argument("--kinds", default=",".join(KINDS[1:]), help=f"comma-separated kinds [{','.join(KINDS[1:])}]")
    s.add_argument("--seed", type=_SEED, default=0, help="[0]")
    s.add_argument("--survey", default="candels-f160w", help="[candels-f160w]")
    s.add_argument("--stamp-size", type=_STAMP, default=32, help="[32]")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(handler=simulate)


def _field_commands(sub, verbs: dict) -> None:
    """``simulate-fields`` and ``evaluate detect-baseline``: fields of galaxies and stars, and sep on them."""

    def simulate(args: argparse.Namespace) -> None:
        from deepmorph.simulate.fields import FieldSimulator, write_fields

        start = time.perf_counter()
        kwargs = {} if args.density is None else {"density": args.density}
        sim = FieldSimulator(args.survey, size=args.size, star_fraction=args.star_fraction,
                             pair_fraction=args.pair_fraction, device=args.device, **kwargs)
        path = write_fields(args.out, sim, args.n, seed=args.seed, progress=not args.no_progress,
                            overwrite=args.overwrite)
        print(f"{path}: {args.n} fields of {args.size}x{args.size} px ({sim.survey.name}, "
              f"~{sim.mean_objects:.0f} objects each) in {time.perf_counter() - start:.1f} s")

    def baseline(args: argparse.Namespace) -> None:
        from deepmorph.measure.detection import evaluate_sep_baseline

        scores = evaluate_sep_baseline(args.data, args.out, threshold=args.threshold, minarea=args.minarea,
                                       deblend_cont=args.deblend_cont, max_fields=args.max_fields,
                                       overwrite=args.overwrite)
        print(f"{args.out}: sep on {scores['n_fields']} fields: completeness {scores['completeness']:.3f}, "
              f"purity {scores['purity']:.3f}, detection limit {scores['mag_limit']:.2f} mag, AP@0.5 box "
              f"{scores['ap50_box']:.3f} mask {scores['ap50_mask']:.3f} (galaxies < {scores['bright_mag']:.2f} mag), "
              f"blends split {scores['blend_split_fraction']:.3f}")

    s = sub.add_parser(
        "simulate-fields", help="fields of galaxies and stars with instance masks and a truth table (detection)",
        description="A Poisson number of galaxies (the four morphology classes) and stars per field, some in forced "
        "close pairs (blends), with the preset's PSF and noise. One HDF5 file: /images, /segmaps (instance masks: "
        "pixels where an object dominates above 1 sky sigma), /objects (one row per object, column field).")
    s.add_argument("--out", type=Path, required=True, help="output HDF5 file")
    s.add_argument("--n", type=int, required=True, help="number of fields")
    s.add_argument("--size", type=int, default=128, help="field side, pixels [128]")
    s.add_argument("--survey", default="candels-f160w", help="[candels-f160w]")
    s.add_argument("--seed", type=_SEED, default=0, help="[0]")
    s.add_argument("--density", type=float, help="objects per 10^4 pixels [12]")
    s.add_argument("--star-fraction", type=float, default=0.15, help="[0.15]")
    s.add_argument("--pair-fraction", type=float, default=0.2, help="galaxies forced into close pairs [0.2]")
    s.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N [cpu]")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(handler=simulate)

    b = verbs["evaluate"].add_parser(
        "detect-baseline", help="sep (SExtractor) detection + deblending on a field file, scored against the truth",
        description="Completeness and purity vs magnitude, AP@0.5 (box, mask) of galaxies brighter than the "
        "detection limit - 1 mag, flux error, blended pairs split. Writes scores.json, catalogue.ecsv, detection.png.")
    b.add_argument("--data", type=Path, required=True, help="a field file from simulate-fields")
    b.add_argument("--out", type=Path, required=True, help="output folder")
    b.add_argument("--threshold", type=float, default=1.5, help="DETECT_THRESH, sky sigmas [1.5]")
    b.add_argument("--minarea", type=int, default=5, help="DETECT_MINAREA, pixels [5]")
    b.add_argument("--deblend-cont", type=_FRACTION, default=0.005, help="DEBLEND_MINCONT [0.005]")
    b.add_argument("--max-fields", type=int, help="score only the first fields")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(handler=baseline)


def _detect_commands(verbs: dict) -> None:
    """``train detect``, ``detect galaxies``, ``evaluate detect``: Mask R-CNN on fields (deepmorph.workflows.detect)."""

    def train(args: argparse.Namespace) -> None:
        from deepmorph.workflows.detect import default_config, train_detector

        if not args.data.is_file():
            raise DeepmorphError(f"{args.data}: no such field file")
        r = train_detector(args.data, args.out, _run_config(args, default_config), _split(args),
                           map_every=args.map_every, evaluate=args.evaluate, progress=True)
        print(f"{args.out}: Mask R-CNN trained on {r['train_size']} fields in {r['epochs_run']} epochs "
              f"({r['train_seconds']:.0f} s); mask threshold {r['mask_threshold']:g}")
        if args.evaluate:
            _print_detection_scores(r)

    def detect(args: argparse.Namespace) -> None:
        import numpy as np

        from deepmorph.data import check_output
        from deepmorph.workflows.detect import detect_files

        check_output(args.out, args.overwrite)
        if args.segmap is not None:
            check_output(args.segmap, args.overwrite)
        table = detect_files(args.model, args.images, args.out, args.segmap, sky_sigma=args.sky_sigma,
                             tile=args.tile, overlap=args.overlap, score_threshold=args.score, batch=args.batch,
                             zeropoint=args.zeropoint, gain=args.gain, morphology=args.morphology,
                             mask_threshold=args.mask_threshold, device=args.device, progress=True, tta=args.tta)
        counts = ", ".join(f"{n} {c}" for c, n in zip(*np.unique(table["class_name"], return_counts=True),
                                                     strict=True)) if len(table) else "none"
        print(f"{args.out}: {len(table)} objects in {len(args.images)} image(s) ({counts})"
              + (f"; segmentation maps in {args.segmap}" if args.segmap else ""))

    def evaluate(args: argparse.Namespace) -> None:
        from deepmorph.workflows.detect import evaluate_detector

        if not args.data.is_file():
            raise DeepmorphError(f"{args.data}: no such field file")
        r = evaluate_detector(args.model, args.data, items=None if args.all else "test", out=args.out,
                              score_threshold=args.score, tta=args.tta, mask_threshold=args.mask_threshold)
        _print_detection_scores(r)
        print(f"{args.out}: detection_table.ecsv, test_metrics.json, completeness.png, overlay.png "
              f"(mask threshold {r['mask_threshold']:g})")

    t = verbs["train"].add_parser(
        "detect", help="Mask R-CNN: detect, outline and classify every object of a field",
        description="Train a Mask R-CNN (ResNet-18-FPN, from scratch) on simulated fields (simulate-fields): "
        "boxes, instance masks and classes (four galaxy classes and stars); then score it and sep (SExtractor) on "
        "the held-out test fields: completeness and purity vs magnitude, AP@0.5, blends split.")
    t.add_argument("--data", type=Path, required=True, help="field file (.h5) from simulate-fields")
    t.add_argument("--out", type=Path, required=True, help="run directory (resumed if it holds a checkpoint)")
    t.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split of the fields [0]")
    t.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    t.add_argument("--map-every", type=int, default=1, help="validation AP@0.5 every K epochs [1]")
    t.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the test-field scoring")
    _run_options(t)
    t.set_defaults(handler=train)

    d = verbs["detect"].add_parser(
        "galaxies", help="catalogue and segmentation map of every object in FITS images (Mask R-CNN)",
        description="Images of any size are tiled with overlap (a detection is kept by the tile that owns its centre; "
        "duplicates merged); the sky is subtracted and the image divided by its noise (sep) unless --sky-sigma is "
        "given. Images smaller than a tile are padded with sky noise; smaller than 16 px, NaN-only or with another "
        "number of bands than the model's are errors. NaN pixels are masked and flag the objects they touch.")
    d.add_argument("--model", type=Path, required=True, help="detection run directory (train detect)")
    d.add_argument("--images", nargs="+", required=True, help="FITS images (counts)")
    d.add_argument("--out", type=Path, required=True, help="catalogue (.ecsv or .fits), one row per object")
    d.add_argument("--segmap", type=Path, help="segmentation maps (FITS, one HDU per image)")
    d.add_argument("--tile", type=int, help="tile side, pixels [the training fields', at least 2 overlap + 32]")
    d.add_argument("--overlap", type=_number(int, 0), default=32,
                   help="tile overlap, pixels: wider objects may be split [32]")
    d.add_argument("--score", type=_FRACTION, default=0.5, help="least detection score kept (the network's "
                   "probability that the object is real) [0.5]")
    d.add_argument("--sky-sigma", type=_POSITIVE, help="sky noise, counts, of sky-subtracted images [measured by sep]")
    d.add_argument("--zeropoint", type=_FINITE, help="AB magnitude of one count [the training survey's]")
    d.add_argument("--gain", type=_POSITIVE, help="electrons per count, for the sources' Poisson noise")
    d.add_argument("--morphology", action="store_true", help="statmorph on each segment (Gini, M20, CAS...; slow)")
    d.add_argument("--batch", type=_COUNT, default=4, help="tiles per forward pass [4]")
    d.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N [cpu]")
    d.add_argument("--mask-threshold", type=float, help=_MASK_THRESHOLD_HELP)
    d.add_argument("--tta", action="store_true", help=_TTA_HELP)
    d.add_argument("--overwrite", action="store_true")
    d.set_defaults(handler=detect)

    e = verbs["evaluate"].add_parser(
        "detect", help="Mask R-CNN vs sep on held-out fields: completeness, purity, AP@0.5, blends",
        description="Detect with the run's Mask R-CNN and with sep (SExtractor) on the same fields and score both "
        "against the truth; a table, completeness/purity vs magnitude and an overlay of one field.")
    e.add_argument("--model", type=Path, required=True, help="detection run directory")
    e.add_argument("--data", type=Path, required=True, help="field file (.h5)")
    e.add_argument("--out", type=Path, required=True, help="output folder")
    e.add_argument("--all", action="store_true", help="every field of --data [its test split when it is the "
                   "run's own training file]")
    e.add_argument("--score", type=_FRACTION, default=0.5, help="least detection score of the catalogue scored "
                   "for completeness and purity (AP uses every score >= 0.05) [0.5]")
    e.add_argument("--mask-threshold", type=float, help=_MASK_THRESHOLD_HELP)
    e.add_argument("--tta", action="store_true", help=_TTA_HELP)
    e.set_defaults(handler=evaluate)

    def masks(args: argparse.Namespace) -> None:
        from deepmorph.workflows.detect import calibrate_masks

        r = calibrate_masks(args.model, args.data, items=None if args.all else "val", tta=args.tta, progress=True)
        for t, box, mask in zip(r["thresholds"], r["ap50_box"], r["ap50_mask"], strict=True):
            print(f"  threshold {t:.2f}  AP@0.5 box {box:.3f} mask {mask:.3f}" + ("  <-" if t == r["mask_threshold"]
                                                                                  else ""))
        suffix = "_tta" if args.tta else ""
        what = f"mask threshold{' (TTA)' if args.tta else ''} {r['mask_threshold']:g}"
        if r["stored"]:
            print(f"{args.model}: {what} from {r['n_fields']} fields ({r['n_bright']} bright galaxies) stored in "
                  f"run.json; mask_calibration{suffix}.ecsv, mask_calibration{suffix}.png")
        else:
            print(f"{args.model}: no bright galaxy to score in {r['n_fields']} fields; {what} unchanged")

    c = verbs["evaluate"].add_parser(
        "detect-masks", help="choose a detection run's mask threshold on its validation fields",
        description="Detect once on the run's validation fields and build the outlines at mask probability "
        "thresholds 0.3-0.75; store the one with the best mask AP@0.5 in the run's run.json, where detect galaxies "
        "and evaluate detect take it from (train detect does this after training). Writes mask_calibration.ecsv "
        "and .png (mask_calibration_tta.* with --tta).")
    c.add_argument("--model", type=Path, required=True, help="detection run directory")
    c.add_argument("--data", type=Path, help="field file [the run's training file]")
    c.add_argument("--all", action="store_true", help="every field of --data, a file other than the run's "
                   "training file [the run's validation split]")
    c.add_argument("--tta", action="store_true", help="calibrate the threshold used with --tta")
    c.set_defaults(handler=masks)


_MASK_THRESHOLD_HELP = ("mask probability above which a pixel belongs to an object, in (0, 1) [the run's, chosen "
                        "on its validation fields by evaluate detect-masks; 0.5 if never chosen]")
_TTA_HELP = "test-time augmentation: detect on the 8 flips and quarter turns of each tile and fuse them (~8x slower)"


def _print_detection_scores(r: dict) -> None:
    for name in ("maskrcnn", "sep"):
        m = r[name]
        print(f"  {name:<9} completeness {100 * m['completeness']:.1f}%  purity {100 * m['purity']:.1f}%  "
              f"AP@0.5 box {m['ap50_box']:.3f} mask {m['ap50_mask']:.3f}  blends split "
              f"{100 * m['blend_split_fraction']:.0f}%  ({m['n_fields']} fields)")


def _gan_noise(text: str) -> str | float:
    """``--noise``: 'sky', 'none' or a number (the sky sigma in counts)."""
    if text in ("sky", "none"):
        return text
    try:
        return float(text)
    except ValueError:
        raise DeepmorphValueError(f"--noise must be 'sky', 'none' or a sky sigma in counts, got {text!r}") from None


def _recover_commands(sub, verbs: dict) -> None:
    """``simulate-pairs``, ``train recover``, ``evaluate recover``, ``predict recover`` (image recovery, pix2pix)."""

    def simulate(args: argparse.Namespace) -> None:
        from deepmorph.data import check_output, partial_path
        from deepmorph.simulate.anomalies import normal_priors
        from deepmorph.simulate.pairs import write_pairs

        check_output(args.out, args.overwrite)
        priors = normal_priors(args.stamp_size)
        if args.mag is not None:
            priors = dataclasses.replace(priors, mag=tuple(args.mag))
        start = time.perf_counter()
        try:
            path = write_pairs(args.out, args.n, seed=args.seed, survey=args.survey, stamp_size=args.stamp_size,
                               psf=args.psf, psf_factor=args.psf_factor, noise_factor=args.noise_factor,
                               original_noise_factor=args.original_noise_factor, priors=priors,
                               batch_size=args.batch_size, overwrite=args.overwrite, progress=not args.no_progress)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted; {partial_path(args.out.with_name(args.out.name + '.building'))} "
                                    "keeps the degraded stamps done so far: rerun the same command to resume") from None
        print(f"{path}: {args.n} pairs of {args.stamp_size}x{args.stamp_size} px ({args.survey}): degraded (PSF FWHM "
              f"x{args.psf_factor:g}, sky noise x{args.noise_factor:g}) in /images, originals in /original, in "
              f"{time.perf_counter() - start:.1f} s")

    def show(table) -> None:
        for name in table.colnames:
            if table[name].dtype.kind == "f":
                table[name].format = ".4g"
        table.pprint(max_lines=-1, max_width=-1)
        print(f"  (Richardson-Lucy: {table.meta['rl_iterations']} iterations; PSNR against the noisy original, "
              "errors against the noise-free original's measurements)")

    def train(args: argparse.Namespace) -> None:
        from deepmorph.workflows.recover import default_config, train_recover

        r = train_recover(args.data, args.out, _run_config(args, default_config), loss=args.loss,
                          lambda_l1=args.lambda_l1, gan_loss=args.gan_loss, d_steps=args.d_steps,
                          label_smoothing=args.label_smoothing, gp_weight=args.gp_weight,
                          spectral_norm=args.spectral_norm, d_width=args.d_width, d_layers=args.d_layers,
                          split=_split(args), evaluate=args.evaluate, max_test=args.max_test)
        print(f"{args.out}: U-Net ({args.loss}) trained on {r['train_size']} pairs in {r['epochs_run']} epochs "
              f"(validation PSNR {r['val_psnr']:.2f} dB)")
        if args.evaluate:
            from astropy.table import Table

            show(Table.read(args.out / "evaluation" / "recovery.ecsv"))

    def evaluate(args: argparse.Namespace) -> None:
        from deepmorph.workflows.recover import evaluate_recovery

        show(evaluate_recovery(args.model, args.data, args.out, rl_iterations=args.rl_iterations,
                               max_test=args.max_test))
        print(f"{args.out / 'recovery.ecsv'}, {args.out / 'recovery_per_image.ecsv'}, {args.out / 'recovery.png'}")

    def predict(args: argparse.Namespace) -> None:
        from deepmorph.workflows.recover import predict_recover

        recovered = predict_recover(args.model, args.images, args.out, overwrite=args.overwrite, device=args.device)
        print(f"{args.out}: {len(recovered)} recovered stamps (counts)")

    s = sub.add_parser(
        "simulate-pairs", help="pairs of degraded and original stamps of the same galaxies (image recovery)",
        description="Each galaxy (item i depends only on --seed and i) rendered through the survey's PSF with its "
        "sky noise (the original) and through a PSF --psf-factor times wider with --noise-factor times the sky "
        "noise (the degraded stamp, in /images); the known kernel from one PSF to the other is stored for "
        "Richardson-Lucy.")
    s.add_argument("--out", type=Path, required=True, help="output HDF5 file")
    s.add_argument("--n", type=int, required=True, help="number of pairs")
    s.add_argument("--seed", type=_SEED, default=0, help="[0]")
    s.add_argument("--survey", default="candels-f160w", help="[candels-f160w]")
    s.add_argument("--stamp-size", type=_STAMP, default=64, help="[64]")
    s.add_argument("--psf", help="the original's PSF, gaussian:FWHM or moffat:FWHM,BETA (arcsec) [survey's]")
    s.add_argument("--psf-factor", type=float, default=2.0, help="degraded PSF FWHM / original's (>= 1) [2]")
    s.add_argument("--noise-factor", type=float, default=2.0, help="degraded sky sigma / original's [2]")
    s.add_argument("--original-noise-factor", type=float, default=1.0,
                   help="original's sky sigma / the survey's (< 1: deeper originals) [1]")
    s.add_argument("--mag", type=float, nargs=2, metavar=("LO", "HI"), help="magnitude range [19 23]")
    s.add_argument("--batch-size", type=int, default=512, help="[512]")
    s.add_argument("--overwrite", action="store_true")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(handler=simulate)

    t = verbs["train"].add_parser(
        "recover", help="U-Net recovering degraded stamps: pix2pix cGAN (U-Net + PatchGAN) or L1 alone",
        description="Train a U-Net on simulate-pairs data to map degraded stamps to the originals, with pix2pix's "
        "loss (adversarial + LAMBDA x L1 against a conditional PatchGAN) or L1 alone (--loss l1); then score it "
        "against the degraded input and Richardson-Lucy deconvolution on the held-out pairs.")
    t.add_argument("--data", type=Path, required=True, help="pairs file from simulate-pairs (.h5)")
    t.add_argument("--out", type=Path, required=True, help="run directory (resumed if it holds a checkpoint)")
    t.add_argument("--loss", choices=["gan", "l1"], default="gan", help="[gan]")
    t.add_argument("--lambda-l1", type=float, default=100.0, help="weight of the L1 term of the cGAN loss [100]")
    t.add_argument("--gan-loss", choices=["bce", "lsgan", "wgan-gp"], default="bce", help="adversarial term [bce]")
    t.add_argument("--d-steps", type=int, default=1, help="discriminator steps per generator step [1]")
    t.add_argument("--label-smoothing", type=float, default=0.0, help="one-sided label smoothing, bce [0]")
    t.add_argument("--gp-weight", type=float, default=10.0, help="gradient-penalty weight, wgan-gp [10]")
    t.add_argument("--spectral-norm", action="store_true", help="spectral norm in the PatchGAN")
    t.add_argument("--d-width", type=int, default=64, help="PatchGAN's first width [64]")
    t.add_argument("--d-layers", type=int, help="PatchGAN's stride-2 layers [2 at 64 px: 34x34 patches]")
    t.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split [0]")
    t.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    t.add_argument("--no-evaluate", dest="evaluate", action="store_false", help="skip the test-split scoring")
    t.add_argument("--max-test", type=int, help="score at most this many test pairs")
    _run_options(t)
    t.set_defaults(handler=train)

    e = verbs["evaluate"].add_parser(
        "recover", help="PSNR, radius, ellipticity and flux errors of recovery runs vs Richardson-Lucy",
        description="Score the degraded input, Richardson-Lucy with the known kernel (iterations chosen on the "
        "validation pairs) and each run on the same held-out pairs (the first run's test split).")
    e.add_argument("--model", type=Path, nargs="+", required=True, help="recovery run directories")
    e.add_argument("--data", type=Path, required=True, help="pairs file (.h5)")
    e.add_argument("--out", type=Path, required=True, help="output folder")
    e.add_argument("--rl-iterations", type=int, help="fix Richardson-Lucy's iterations [chosen on validation pairs]")
    e.add_argument("--max-test", type=int, help="score at most this many test pairs")
    e.set_defaults(handler=evaluate)

    p = verbs["predict"].add_parser("recover", help="recover degraded stamps (FITS cube of counts)")
    p.add_argument("--model", type=Path, required=True, help="recovery run directory")
    p.add_argument("--images", nargs="+", required=True, help="a dataset (.h5) or FITS cutouts of one size")
    p.add_argument("--out", type=Path, required=True, help="output FITS cube (N, H, W)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu, cuda or cuda:N [cpu]")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(handler=predict)


def _tune_commands(sub) -> None:
    """``tune classify`` (hyper-parameter search) and ``ensemble classify``."""

    def tune(args: argparse.Namespace) -> None:
        from deepmorph.workflows.tune import tune as run_tune

        summary = run_tune(args.task, args.data, args.space, args.out, base=_run_config(args), split=_split(args),
                           metric=args.metric, compare=args.compare, trials=args.trials, fine_trials=args.fine_trials,
                           workers=args.workers, storage=args.storage, study=args.study, timeout=args.timeout,
                           seed=args.seed, pruner=args.pruner, max_retry=args.max_retry, progress=not args.quiet)
        counts = {}
        for stage in summary["trials"].values():
            for state, k in stage.items():
                counts[state] = counts.get(state, 0) + k
        stages = " + ".join(f"{sum(c.values())} {name}" for name, c in summary["trials"].items())
        print(f"{args.out}: {stages} trials ({', '.join(f'{k} {s}' for s, k in sorted(counts.items()))}) in "
              f"{summary['seconds']:.0f} s")
        best = summary["best"]
        if best["trial"] is None:
            print("  no trial completed")
            return
        print(f"  best: {best['stage']} trial {best['trial']}, {summary['metric']} {best['value']:.4g}: "
              + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["params"].items()))
        if "default" in summary:
            d = summary["default"]
            print(f"  test accuracy ({summary['n_test']} galaxies): best {100 * best['test_accuracy']:.2f}%, default "
                  f"{100 * d['test_accuracy']:.2f}% ({100 * summary['gain_test_accuracy']:+.2f} points)")
            if summary["selected"] == "default":
                print(f"  the default, trained for {d['epochs']} epochs too, scores better on the validation split "
                      f"({summary['metric']} {d['val']:.4g}): keep it")
        elif not summary["complete"]:
            print("  unfinished (timeout or lost workers): rerun the same command to continue")
        print(f"  {args.out / 'trials.ecsv'}, {args.out / 'best_config.yaml'}, {args.out / 'summary.json'}")

    def ensemble(args: argparse.Namespace) -> None:
        from deepmorph.workflows.classify import Split, load_run
        from deepmorph.workflows.ensemble import ensemble_classify, seed_runs, top_trials

        if args.runs and args.seeds:
            raise DeepmorphError("--seeds goes with --tune (it trains the search's best config)")
        if args.runs:
            runs = args.runs
        elif args.seeds:
            try:
                seeds = [int(v) for v in args.seeds.split(",") if v.strip()]
            except ValueError:
                raise DeepmorphError(f"--seeds {args.seeds!r}: give comma-separated integers") from None
            best = top_trials(args.tune, 1)[0]
            meta = load_run(best)
            from deepmorph.training import RunConfig

            config = RunConfig.from_yaml(args.tune / "best_config.yaml").with_overrides({"progress_bar": False})
            runs = seed_runs(config, args.data or meta["data"], args.out, seeds,
                             Split(meta["split_seed"], tuple(meta["fractions"])))
        else:
            runs = top_trials(args.tune, args.top_k, minimum=2)
            if len(runs) < args.top_k:
                print(f"only {len(runs)} trials of the last stage completed: an ensemble of {len(runs)}")
        r = ensemble_classify(runs, args.out, data=args.data)
        for row in [*r["members"], r["ensemble"]]:
            print(f"  {row['member']:<40} accuracy {100 * row['accuracy']:6.2f}%  log loss {row['log_loss']:.4f}")
        print(f"{args.out}: ensemble of {len(runs)} on {r['n_test']} test galaxies: "
              f"{100 * r['gain_vs_best']:+.2f} points over the best member, {100 * r['gain_vs_mean']:+.2f} over their "
              f"mean; log loss {r['log_loss_gain_vs_mean']:+.4f} below their mean")

    t = _verb(sub, "tune", "hyper-parameter search (Optuna)").add_parser(
        "classify", help="search the classifier's run config; best vs default on the test split",
        description="An Optuna study over any run-config field (a YAML space file: dotted keys -> {low, high, "
        "log, step} or {choices}; optional coarse: {trials, epochs} and fine: {trials, epochs, shrink} stages). "
        "Trials train on the training split and are scored and pruned on the validation split; the best config "
        "and the default are then scored on the held-out test split. Several --workers, or several machines "
        "running the same command with one --storage and --study, share the search; rerun to continue it.")
    t.add_argument("--data", type=Path, required=True, help="labelled dataset (.h5)")
    t.add_argument("--space", type=Path, required=True, help="search space (YAML)")
    t.add_argument("--out", type=Path, required=True, help="output folder (rerun to continue)")
    t.add_argument("--trials", type=int, help="trials of the (coarse) search [the space file's, else 20]")
    t.add_argument("--fine-trials", type=int, help="trials of the fine search, 0 for none [the space file's]")
    t.add_argument("--workers", type=int, default=1, help="local worker processes [1]")
    t.add_argument("--storage", help="journal:FILE (shared disk) or postgresql://USER:PASS@HOST/DB, "
                   "mysql+pymysql://... [journal:OUT/study.journal]")
    t.add_argument("--study", default="deepmorph-tune", help="study name shared by workers [deepmorph-tune]")
    t.add_argument("--timeout", type=float, help="start no trial after this many seconds")
    t.add_argument("--seed", type=_SEED, default=0, help="sampler seed; give each machine its own [0]")
    t.add_argument("--metric", choices=["val_loss", "val_acc"], help="validation metric [early_stopping.monitor]")
    t.add_argument("--pruner", choices=["median", "halving", "none"], default="median", help="[median]")
    t.add_argument("--max-retry", type=int, default=2, help="retries of a failed trial [2]")
    t.add_argument("--no-compare", dest="compare", action="store_false",
                   help="skip training the default and the test-split comparison")
    t.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split [0]")
    t.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"))
    t.add_argument("--config", type=Path, help="the default run config (YAML); searched fields vary around it")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a default config field")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(handler=tune)

    e = _verb(sub, "ensemble", "average the predictions of several trained models").add_parser(
        "classify", help="average classifiers' probabilities; score on the test split",
        description="Members: --runs (classification runs of one data file and split), the --top-k best trials "
        "of a search (--tune), or the search's best config trained with several --seeds. The ensemble and each "
        "member are scored on the held-out test split.")
    members = e.add_mutually_exclusive_group(required=True)
    members.add_argument("--runs", type=Path, nargs="+", help="classification run directories")
    members.add_argument("--tune", type=Path, help="a tune classify output folder")
    e.add_argument("--top-k", type=int, default=3, help="with --tune: the k best trials of the last stage [3]")
    e.add_argument("--seeds", help="with --tune: train best_config.yaml with these seeds instead, e.g. 0,1,2")
    e.add_argument("--data", type=Path, help="the data file [the members']")
    e.add_argument("--out", type=Path, required=True, help="output folder")
    e.set_defaults(handler=ensemble)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_error_message(exc: OSError) -> str:
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the ``deepmorph`` command with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help and --version
            return int(exc.code or 0)
        args.handler(args)
    except KeyboardInterrupt as exc:
        print(f"{PROG}: error: {_one_line(exc) or 'interrupted'}", file=sys.stderr)
        return 130
    except DeepmorphError as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # h5py, astropy or the OS on a user's file
        print(f"{PROG}: error: {_one_line(_os_error_message(exc))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
