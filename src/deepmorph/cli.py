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
import sys
import time
from pathlib import Path

from deepmorph import __version__
from deepmorph.errors import DeepmorphError

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
    sim.add_argument("--out", type=Path, required=True, help="output HDF5 file")
    sim.add_argument("--seed", type=int, default=0, help="dataset seed [0]")
    sim.add_argument("--stamp-size", type=int, default=64, help="stamp side, pixels [64]")
    sim.add_argument("--pixel-scale", type=float, metavar="ARCSEC", help="pixel scale, arcsec/px [survey's]")
    sim.add_argument("--psf", help="gaussian:FWHM, moffat:FWHM,BETA (arcsec), FILE.fits[:HDU][@ARCSEC_PER_PX] "
                     "or none [survey's]")
    noise = sim.add_mutually_exclusive_group()
    noise.add_argument("--background", type=Path, metavar="FITS", help="add cutouts of this real background image")
    noise.add_argument("--noise", choices=["none"], help="'none': noise-free images")
    sim.add_argument("--clumps", action="store_true", help="add unresolved clumps and a clump mask")
    sim.add_argument("--neighbors", action="store_true", help="add companion galaxies and a neighbour mask")
    sim.add_argument("--components", action="store_true", help="also store noiseless, bulge and disk images")
    sim.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="[cpu]")
    sim.add_argument("--batch-size", type=int, default=512, help="stamps per batch [512]")
    sim.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sim.add_argument("--catalog-out", type=Path, metavar="FILE", help="also write the catalogue (.ecsv or .fits)")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    _prior_options(sim)
    sim.set_defaults(handler=_simulate)

    info = sub.add_parser("info", help="summarise a dataset file")
    info.add_argument("file", type=Path)
    info.set_defaults(handler=_info)

    tour = sub.add_parser("tour", help="run the guided tour and write its HTML report")
    tour.add_argument("--quick", action="store_true", help="small, fast version")
    tour.add_argument("--out", type=Path, default=Path("runs/tour"), help="output folder [runs/tour]")
    tour.set_defaults(handler=_tour)
    return parser


def _simulate(args: argparse.Namespace) -> None:
    from deepmorph.data import check_output, export_catalog, partial_path, write_dataset

    check_output(args.out, args.overwrite)  # before the slower imports and set-up
    if args.catalog_out is not None:
        check_output(args.catalog_out, args.overwrite)
    from deepmorph.simulate import Priors, Simulator, get_survey, read_background

    survey = get_survey(args.survey)
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
                             overwrite=args.overwrite, progress=not args.no_progress)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted; {partial_path(args.out)} keeps the stamps done so far: rerun the same command to resume"
        ) from None
    print(f"{path}: {args.n} stamps of {args.stamp_size}x{args.stamp_size} px ({survey.name}) "
          f"in {time.perf_counter() - start:.1f} s")
    if args.catalog_out is not None:
        print(f"{export_catalog(path, args.catalog_out)}: catalogue")


def _info(args: argparse.Namespace) -> None:
    from deepmorph.data import summarize

    print(summarize(args.file))


def _tour(args: argparse.Namespace) -> None:
    try:
        from deepmorph.tour import run_tour
    except ModuleNotFoundError as exc:
        if exc.name != "deepmorph.tour":
            raise
        raise DeepmorphError("the tour is not part of this installation (no deepmorph.tour module)") from None
    print(f"tour report: {run_tour(out=args.out, quick=args.quick)}")


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
