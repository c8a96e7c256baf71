"""Does a hyper-parameter search beat the default config? Best vs default on held-out galaxies.

Simulates a 4-class problem (spheroid, disk, edge-on, clumpy; balanced; CANDELS F160W, 32 px),
runs ``deepmorph tune classify``'s search (a coarse stage of short runs, then a fine stage of
longer ones around the best, pruned by the median rule, on ``--workers`` local processes sharing
one journal file), and compares the best config with the default config (``RunConfig()``: the
lecture's CNN, Adam at 1e-3, batch 64, no schedule, no augmentation), both trained for the fine
stage's epochs, on the held-out test split. Then averages the predictions of the top trials, and
of the best config trained with several seeds.

Usage::

    python benchmarks/tune.py                        # 2,000 galaxies, 20 + 6 trials, 2 workers
    python benchmarks/tune.py --n 4000 --trials 40 --fine-trials 10 --out runs/tune-bench

Prints the trial counts, the best parameters, and a table of test accuracy: default, best, the
ensemble of the top 3 trials and that of the best config trained with 3 seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

#: The search space: every field of the default config lies in it, so trial 0 is the default.
SPACE = """\
optimizer.lr: {low: 3.0e-4, high: 1.0e-2, log: true}
batch_size: {choices: [16, 32, 64, 128]}
model.kwargs.widths: {choices: [[16, 32], [16, 32, 64], [32, 64, 128]]}
model.kwargs.kernel_size: {choices: [3, 5]}
model.kwargs.dropout: {low: 0.0, high: 0.5}
model.kwargs.noise_sigma: {low: 0.0, high: 0.2}
schedule.kind: {choices: [none, cosine, exponential]}
augmentation: {choices: [null, flips]}
coarse: {trials: 20, epochs: 3}
fine: {trials: 6, epochs: 8, shrink: 0.5}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="simulated galaxies [2000]")
    parser.add_argument("--trials", type=int, help="coarse trials [20]")
    parser.add_argument("--fine-trials", type=int, help="fine trials [6]")
    parser.add_argument("--workers", type=int, default=2, help="local worker processes [2]")
    parser.add_argument("--seeds", type=int, default=3, help="members of the seed ensemble of the best config [3]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/tune-benchmark"))
    args = parser.parse_args()

    from deepmorph.data import write_dataset
    from deepmorph.simulate import Priors, Simulator
    from deepmorph.training import RunConfig
    from deepmorph.workflows.classify import Split
    from deepmorph.workflows.ensemble import ensemble_classify, seed_runs, top_trials
    from deepmorph.workflows.tune import tune

    args.out.mkdir(parents=True, exist_ok=True)
    data = args.out / f"classes-{args.n}.h5"
    if not data.is_file():
        sim = Simulator("candels-f160w", 32, clumps=True, priors=Priors(balanced_classes=True))
        write_dataset(data, sim, args.n, seed=args.seed + 11, progress=False)
    space = args.out / "space.yaml"
    space.write_text(SPACE)
    start = time.perf_counter()
    summary = tune("classify", data, space, args.out / "search", base=RunConfig(accelerator="cpu"),
                   split=Split(args.seed, (0.7, 0.1, 0.2)), trials=args.trials, fine_trials=args.fine_trials,
                   workers=args.workers, seed=args.seed, progress=True)
    seconds = time.perf_counter() - start
    counts = {stage: sum(c.values()) for stage, c in summary["trials"].items()}
    print(f"{args.n} galaxies ({summary['n_test']} test); trials {counts} "
          f"({json.dumps(summary['trials'])}); {seconds / 60:.1f} min with {args.workers} workers")
    print("best:", ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in summary["best"]["params"].items()))
    runs = top_trials(args.out / "search", 3, minimum=2)
    ens = ensemble_classify(runs, args.out / "ensemble")
    # The best config with other seeds; the best trial itself is the member with the search's seed.
    config = RunConfig.from_yaml(args.out / "search" / "best_config.yaml").with_overrides({"progress_bar": False})
    others = [config.seed + k for k in range(1, args.seeds)]
    members = [Path(summary["best"]["run"])] + seed_runs(config, data, args.out / "seeds", others,
                                                         Split(args.seed, (0.7, 0.1, 0.2)))
    seeds = ensemble_classify(members, args.out / "seed-ensemble")
    rows = [("default config", summary["default"]["test_accuracy"], summary["default"]["val"]),
            ("best config", summary["best"]["test_accuracy"], summary["best"]["value"]),
            (f"ensemble of the top {len(runs)} trials", ens["ensemble"]["accuracy"], float("nan")),
            (f"ensemble of the best config, {len(members)} seeds", seeds["ensemble"]["accuracy"], float("nan"))]
    print(f"\n| model | test accuracy | val {summary['metric']} |\n|---|---|---|")
    for name, acc, val in rows:
        print(f"| {name} | {100 * acc:.2f}% | {val:.4f} |")
    print(f"\ngain of the search: {100 * summary['gain_test_accuracy']:+.2f} points")
    for name, r in (("top trials", ens), ("seeds", seeds)):
        print(f"ensemble of {name}: {100 * r['gain_vs_best']:+.2f} points over its best member, "
              f"{100 * r['gain_vs_mean']:+.2f} over the members' mean (members: "
              + ", ".join(f"{100 * m['accuracy']:.2f}%" for m in r["members"]) + ")")
    (args.out / "benchmark.json").write_text(json.dumps(
        {"summary": summary, "ensemble": ens, "seed_ensemble": seeds, "seconds": seconds}, indent=1))


if __name__ == "__main__":
    main()
