"""U-Net inference throughput on a large image, tiled with overlap, in megapixels per second.

Usage::

    python benchmarks/unet.py                       # 4096 x 4096 on the CPU (2 threads), and CUDA when present
    python benchmarks/unet.py --size 2048 --tile 512

The image (simulated sky noise with galaxies pasted in, counts) goes through
:func:`deepmorph.models.predict_tiled` with the clump detector's default U-Net (depth 3, width 16,
random weights: speed does not depend on them). Memory stays constant: only one batch of tiles is
on the device. Prints a markdown table of megapixels/s per device and precision, and the peak
memory of the run.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import numpy as np
import torch

from deepmorph.models import UNet, predict_tiled


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096, help="image side, pixels")
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8, help="tiles per forward pass on the CPU")
    ap.add_argument("--gpu-batch-size", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--devices", default="cpu,cuda", help="comma-separated: cpu, cuda (when present)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 1.0, (1, args.size, args.size)).astype(np.float32)
    yy, xx = np.mgrid[-16:16, -16:16]
    blob = 50.0 * np.exp(-(xx**2 + yy**2) / 20.0)
    for y, x in rng.integers(16, args.size - 16, (args.size**2 // 4096, 2)):
        image[0, y - 16:y + 16, x - 16:x + 16] += blob
    mpix = args.size**2 / 1e6
    model = UNet(1, 1, depth=args.depth, width=args.width).eval()

    rows = []
    wanted = [d.strip() for d in args.devices.split(",")]
    devices = [d for d in ("cpu", "cuda") if d in wanted and (d == "cpu" or torch.cuda.is_available())]
    for device in devices:
        net = model.to(device)
        precisions = ["fp32"] + (["bf16"] if device == "cuda" else [])
        for precision in precisions:
            bs = args.batch_size if device == "cpu" else args.gpu_batch_size

            def fn(x, net=net, precision=precision):
                with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    return torch.sigmoid(net(torch.asinh(x)))

            def run(bs=bs, device=device, fn=fn):
                return predict_tiled(fn, image, tile=args.tile, overlap=args.overlap, multiple=2**args.depth,
                                     batch_size=bs, device=device)

            if device == "cuda":
                run()  # warm-up: cuDNN autotuning
                torch.cuda.reset_peak_memory_stats()
            seconds = timed(run, device)
            mem = (torch.cuda.max_memory_allocated() / 2**20 if device == "cuda"
                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
            name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {args.threads} threads"
            rows.append((name, precision, seconds, mpix / seconds, mem))

    print(f"\nU-Net (depth {args.depth}, width {args.width}) on a {args.size}x{args.size} image, tiles of "
          f"{args.tile} px with {args.overlap} px overlap\n")
    print("| device | precision | seconds | megapixels/s | peak memory (MiB) |")
    print("|---|---|---:|---:|---:|")
    for name, precision, seconds, rate, mem in rows:
        print(f"| {name} | {precision} | {seconds:.2f} | {rate:.2f} | {mem:,.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
