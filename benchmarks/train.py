"""Training throughput: the Lightning path (``deepmorph.training.fit`` + ``ClassifyTask``) vs a bare
PyTorch loop on the same model and data, with and without augmentation, and the rate at which
on-the-fly simulation (+ augmentation) delivers training batches.

Usage::

    python benchmarks/train.py                  # CPU, 48 px stamps
    python benchmarks/train.py --stamp 64 --n 4096 --device cuda

Prints a markdown table of images/s and the Lightning overhead (target: <= 10%).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from deepmorph.data import StampDataset, get_augmentation, make_loader, write_dataset
from deepmorph.data.datasets import SimulatedDataset
from deepmorph.simulate import Priors, Simulator
from deepmorph.tasks import ClassifyTask
from deepmorph.training import RunConfig, build_model, fit


def bare_loop(model, loader, epochs: int, lr: float, augmentation, device) -> float:
    """Images/s of a plain PyTorch loop: forward, cross-entropy, backward, Adam step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.to(device).train()
    n = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            x, y = batch["image"].to(device), batch["target"].to(device)
            if augmentation is not None:
                x, _, _ = augmentation(x)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += len(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def lightning_fit(config, sets, augmentation, out) -> float:
    model = build_model(config, in_channels=1, num_outputs=4)
    task = ClassifyTask(model, config, 4, augmentation=augmentation)
    train = make_loader(sets["train"], config.batch_size, shuffle=True, seed=0, drop_last=True)
    val = make_loader(sets["val"], 256)
    t0 = time.perf_counter()
    fit(task, train, val, config, out, resume=False)
    seconds = time.perf_counter() - t0
    # Validation is part of every Lightning epoch; count its images too (the bare loop has none,
    # so its time is subtracted by timing the forward passes alone).
    return (config.epochs * len(train) * config.batch_size) / seconds, len(sets["val"]) * config.epochs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048, help="training images")
    ap.add_argument("--stamp", type=int, default=48)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device = args.device

    sim = Simulator("candels-f160w", args.stamp, clumps=True, priors=Priors(balanced_classes=True), device=device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/bench.h5"
        n_val = 256
        write_dataset(path, sim, args.n + n_val, seed=0, progress=False)
        from deepmorph.data import Normalization

        norm = Normalization("asinh").fit(StampDataset(path, np.arange(args.n), target=None))
        sets = {"train": StampDataset(path, np.arange(args.n), normalization=norm, in_memory=True),
                "val": StampDataset(path, np.arange(args.n, args.n + n_val), normalization=norm, in_memory=True)}
        for aug_name in ("none", "keras"):
            aug = None if aug_name == "none" else get_augmentation(aug_name)
            config = RunConfig().with_overrides({
                "epochs": args.epochs, "batch_size": args.batch_size, "progress_bar": False,
                "early_stopping.enabled": False, "accelerator": "gpu" if device == "cuda" else "cpu",
                # Same kernels on both paths: Lightning's deterministic mode would otherwise stay
                # switched on (globally) for the bare loop that runs after it.
                "deterministic": False,
                "model.kwargs": {"widths": [32, 64, 128]}})
            torch.use_deterministic_algorithms(False)
            model = build_model(config, in_channels=1, num_outputs=4)
            loader = make_loader(sets["train"], args.batch_size, shuffle=True, seed=0, drop_last=True)
            bare = bare_loop(model, loader, args.epochs, 1e-3, aug, device)
            # Validation forward passes, timed alone, are added to the bare loop's time so that both
            # paths do the same work.
            model.eval()
            t0 = time.perf_counter()
            with torch.no_grad():
                for _ in range(args.epochs):
                    for b in make_loader(sets["val"], 256):
                        model(b["image"].to(device))
            val_seconds = time.perf_counter() - t0
            bare_same_work = 1.0 / (1.0 / bare + val_seconds / (args.epochs * len(loader) * args.batch_size))
            light, _ = lightning_fit(config, sets, aug, f"{tmp}/run-{aug_name}")
            rows.append((f"train, augmentation {aug_name}", bare_same_work, light, 100 * (bare_same_work / light - 1)))

        # Delivering batches by on-the-fly simulation (+ augmentation), no model.
        fly = SimulatedDataset(sim, args.n, seed=5, target="label", normalization=norm)
        fly_bs = max(512, args.n // 16)
        aug = get_augmentation("keras")
        for name, use_aug in (("on-the-fly simulation", False), ("on-the-fly simulation + keras", True)):
            t0 = time.perf_counter()
            for start in range(0, args.n, fly_bs):
                batch = fly.batch(np.arange(start, min(args.n, start + fly_bs)), device=device)
                if use_aug:
                    aug(batch["image"])
            if device == "cuda":
                torch.cuda.synchronize()
            rate = args.n / (time.perf_counter() - t0)
            rows.append((name, rate, float("nan"), float("nan")))

    print(f"\nTraining throughput, {args.stamp}x{args.stamp} stamps, {args.n} images x {args.epochs} epochs, "
          f"batch {args.batch_size}, device {device}\n")
    print("| what | bare PyTorch [images/s] | Lightning fit [images/s] | Lightning overhead |")
    print("|---|---:|---:|---:|")
    for name, bare, light, overhead in rows:
        light_s = "-" if np.isnan(light) else f"{light:,.0f}"
        over_s = "-" if np.isnan(overhead) else f"{overhead:+.1f}%"
        print(f"| {name} | {bare:,.0f} | {light_s} | {over_s} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
