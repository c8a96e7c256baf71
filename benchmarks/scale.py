"""Training throughput as it scales: one process vs two data-parallel (DDP) processes on the CPU, and
float32 vs float16/bfloat16 mixed precision and the channels-last layout on a GPU.

The model is the classification workflow's default CNN (``RunConfig()``: widths 32, 64, 128, batch
norm, dropout) on 64 x 64 stamps, trained by :func:`deepmorph.training.fit` as ``deepmorph train
classify`` trains it. Throughput counts training images only: each epoch is timed from the end of
its first batch to the end of its last (no start-up, first-batch warm-up or validation), and the
DDP runs keep the single process's effective batch (two processes of half the batch each).

Usage::

    python benchmarks/scale.py                      # CPU part; GPU part too when CUDA is available
    python benchmarks/scale.py --n 2048 --epochs 3 --gpu-batch-size 512 --gpu-n 16384

Prints markdown tables of images/s and ratios to the first row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one thread per process unless asked otherwise

import lightning as L  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from deepmorph.data import Normalization, StampDataset, make_loader, write_dataset  # noqa: E402
from deepmorph.simulate import Priors, Simulator  # noqa: E402
from deepmorph.tasks import ClassifyTask  # noqa: E402
from deepmorph.training import RunConfig, build_model, fit  # noqa: E402


class Throughput(L.Callback):
    """Time each training epoch on global rank 0, from the end of its first batch to the end of its
    last, and write ``throughput.json`` (images of every process, seconds) when fit ends."""

    def __init__(self, path: str):
        self.path = path
        self.images, self.seconds = 0, 0.0
        self._t0 = None

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(trainer)
        now = time.perf_counter()
        if batch_idx == 0:
            self._t0 = now
            return
        self.images += len(batch["image"]) * trainer.world_size
        if batch_idx == trainer.num_training_batches - 1 and self._t0 is not None:
            self.seconds += now - self._t0

    def on_fit_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            Path(self.path).write_text(json.dumps({"images": self.images, "seconds": self.seconds}))


def images_per_second(sets: dict, config: RunConfig, out: Path, threads: int) -> float:
    """Train the default CNN with ``config`` and return the training images per second."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(config, in_channels=1, num_outputs=4)
    task = ClassifyTask(model, config, 4)
    train = make_loader(sets["train"], config.batch_size, shuffle=True, seed=0, drop_last=True)
    val = make_loader(sets["val"], 256)
    record = out / "throughput.json"
    fit(task, train, val, config, out, resume=False, callbacks=[Throughput(str(record))])
    result = json.loads(record.read_text())
    return result["images"] / result["seconds"]


def _table(title: str, rows: list[tuple[str, float]]) -> None:
    print(f"\n{title}\n")
    print("| configuration | images/s | ratio |")
    print("|---|---:|---:|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} | {rate / rows[0][1]:.2f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024, help="training images for the CPU runs [1024]")
    ap.add_argument("--stamp", type=int, default=64, help="stamp side, pixels [64]")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per run (each timed after its first batch) [2]")
    ap.add_argument("--batch-size", type=int, default=64, help="effective batch on the CPU [64]")
    ap.add_argument("--gpu-n", type=int, default=8192, help="training images for the GPU runs [8192]")
    ap.add_argument("--gpu-batch-size", type=int, default=256, help="batch on the GPU [256]")
    ap.add_argument("--skip-cpu", action="store_true", help="only the GPU part")
    ap.add_argument("--skip-gpu", action="store_true", help="only the CPU part")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    sim = Simulator("candels-f160w", args.stamp, priors=Priors(balanced_classes=True))
    cuda = torch.cuda.is_available() and not args.skip_gpu
    n_val = 256
    n_total = max(args.n, args.gpu_n if cuda else 0) + n_val
    base = RunConfig().with_overrides({
        "epochs": args.epochs, "progress_bar": False, "early_stopping.enabled": False, "deterministic": False,
    })
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        path = write_dataset(tmp / "bench.h5", sim, n_total, seed=0, progress=False)
        norm = Normalization("asinh").fit(StampDataset(path, np.arange(n_total - n_val), target=None),
                                          max_images=1024)
        val = StampDataset(path, np.arange(n_total - n_val, n_total), normalization=norm, in_memory=True)

        if not args.skip_cpu:
            sets = {"train": StampDataset(path, np.arange(args.n), normalization=norm, in_memory=True), "val": val}
            cpu = base.with_overrides({"accelerator": "cpu", "batch_size": args.batch_size})
            half = args.batch_size // 2
            runs = [
                ("1 process x 1 thread", cpu, 1),
                ("1 process x 2 threads", cpu, 2),
                ("2 DDP processes (gloo, fork) x 1 thread", cpu.with_overrides(
                    {"devices": 2, "strategy": "ddp_fork", "batch_size": half}), 1),
            ]
            rows = [(name, images_per_second(sets, config, tmp / f"cpu{i}", threads))
                    for i, (name, config, threads) in enumerate(runs)]
            _table(f"CPU ({os.cpu_count()} cores): default CNN, {args.stamp}x{args.stamp} stamps, {args.n} images x "
                   f"{args.epochs} epochs, effective batch {args.batch_size}", rows)

        if cuda:
            sets = {"train": StampDataset(path, np.arange(args.gpu_n), normalization=norm, in_memory=True),
                    "val": val}
            gpu = base.with_overrides({"accelerator": "gpu", "devices": 1, "batch_size": args.gpu_batch_size})
            runs = [("float32", gpu),
                    ("float32 + channels-last", gpu.with_overrides({"channels_last": True})),
                    ("16-mixed", gpu.with_overrides({"precision": "16-mixed"})),
                    ("bf16-mixed", gpu.with_overrides({"precision": "bf16-mixed"})),
                    ("bf16-mixed + channels-last", gpu.with_overrides({"precision": "bf16-mixed",
                                                                       "channels_last": True}))]
            images_per_second(sets, gpu, tmp / "warmup", 1)  # CUDA context, cuDNN autotuning
            rows = [(name, images_per_second(sets, config, tmp / f"gpu{i}", 1))
                    for i, (name, config) in enumerate(runs)]
            _table(f"GPU ({torch.cuda.get_device_name()}): default CNN, {args.stamp}x{args.stamp} stamps, "
                   f"{args.gpu_n} images x {args.epochs} epochs, batch {args.gpu_batch_size}", rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
