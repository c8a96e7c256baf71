"""RoIAlign on a CPU: deepmorph's sparse-matrix pool vs torchvision's kernel, alone and in a training step.

Usage::

    python benchmarks/roi_align.py                 # 2 threads, 20 training steps per variant
    python benchmarks/roi_align.py --threads 1 --steps 40

Rows:

* ``RoIAlign box (7x7)`` and ``RoIAlign mask (14x14)``: forward + backward of one pyramid level
  (4 images, 64 channels, 32 x 32 features at stride 4) for as many RoIs as a detector's training
  step pools (``box_batch_size_per_image`` x 4 and a quarter of those for the masks);
* ``Mask R-CNN training step``: the default detector (:data:`deepmorph.workflows.detect.DEFAULT_MODEL`),
  batch of 4 simulated 128-px fields, forward + backward + AdamW step, with each pool.

Prints a markdown table of milliseconds per call for torchvision and deepmorph, their ratio
(> 1: deepmorph faster) and the largest difference of the outputs (they compute the same values).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torchvision.ops import MultiScaleRoIAlign, roi_align

from deepmorph.models.maskrcnn import maskrcnn, sparse_roi_align
from deepmorph.workflows.detect import DEFAULT_MODEL


def _median_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def _pool_rows(repeat: int) -> list[tuple]:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(4, 64, 32, 32, generator=gen, requires_grad=True)
    rows = []
    for name, n, out in (("RoIAlign box (7x7)", 512, 7), ("RoIAlign mask (14x14)", 128, 14)):
        xy = torch.rand(n, 2, generator=gen) * 120
        side = 2 + torch.rand(n, 2, generator=gen) * 30
        rois = torch.cat([torch.randint(0, 4, (n, 1), generator=gen).float(), xy, xy + side], 1)

        def run(fn, rois=rois, out=out):
            features.grad = None
            fn(features, rois, (out, out), 0.25, 2).sum().backward()

        diff = float((roi_align(features, rois, (out, out), 0.25, 2).detach()
                      - sparse_roi_align(features, rois, (out, out), 0.25, 2).detach()).abs().max())
        rows.append((name, _median_ms(lambda run=run: run(roi_align), repeat),
                     _median_ms(lambda run=run: run(sparse_roi_align), repeat), diff))
    return rows


def _fields(n: int) -> tuple[list[torch.Tensor], list[dict]]:
    from deepmorph.simulate.fields import FieldSimulator

    sim = FieldSimulator("candels-f160w", size=128)
    images, targets = [], []
    for i in range(n):
        f = sim.simulate_field(i, seed=5)
        o = f["objects"]
        keep = np.flatnonzero(o["npix"] > 0)
        boxes = np.stack([o[c][keep] for c in ("x0", "y0", "x1", "y1")], axis=1) + 0.5
        images.append(torch.from_numpy(np.arcsinh(f["image"] / sim.sky_sigma).astype(np.float32))[None])
        targets.append({"boxes": torch.as_tensor(boxes, dtype=torch.float32),
                        "labels": torch.as_tensor(o["label"][keep] + 1),
                        "masks": torch.from_numpy(f["segmap"][None] == (keep[:, None, None] + 1))})
    return images, targets


def _step_row(steps: int) -> tuple:
    images, targets = _fields(4 * steps)
    times, losses = {}, {}
    for variant in ("torchvision", "deepmorph"):
        torch.manual_seed(0)
        model = maskrcnn(**DEFAULT_MODEL["kwargs"]).train()
        if variant == "torchvision":
            heads = model.roi_heads
            heads.box_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 7, heads.box_roi_pool.sampling_ratio)
            heads.mask_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, heads.mask_roi_pool.sampling_ratio)
        optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
        elapsed = []
        for s in range(steps):
            batch = slice(4 * s, 4 * s + 4)
            start = time.perf_counter()
            loss = sum(model(images[batch], targets[batch]).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            elapsed.append(time.perf_counter() - start)
        times[variant] = 1e3 * float(np.median(elapsed[2:]))
        losses[variant] = float(loss.detach())
    return ("Mask R-CNN training step", times["torchvision"], times["deepmorph"],
            abs(losses["torchvision"] - losses["deepmorph"]))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads [2]")
    parser.add_argument("--repeat", type=int, default=10, help="timed calls per RoIAlign row [10]")
    parser.add_argument("--steps", type=int, default=20, help="training steps per variant [20]")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = _pool_rows(args.repeat) + [_step_row(args.steps)]
    print(f"threads: {args.threads}; difference: largest |output difference| (training step: final loss)\n")
    print("| operation | torchvision ms | deepmorph ms | speed-up | difference |")
    print("|---|---:|---:|---:|---:|")
    for name, tv, ours, diff in rows:
        print(f"| {name} | {tv:.1f} | {ours:.1f} | {tv / ours:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
