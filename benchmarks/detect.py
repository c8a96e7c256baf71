"""Detection speed: Mask R-CNN inference vs sep (SExtractor's algorithm) on the same fields.

Usage::

    python benchmarks/detect.py                                  # 20 simulated 128-px fields, CPU
    python benchmarks/detect.py --model runs/detect --data fields.h5 --n 50
    python benchmarks/detect.py --size 512 --n 5 --device cuda   # large fields (tiled), on a GPU

Without ``--model`` an untrained network of the default architecture is timed (its detections,
and so its mask-head time, differ from a trained one's: pass a run for real numbers). Rows:

* ``Mask R-CNN (network)``: the batched forward pass alone on normalised fields;
* ``Mask R-CNN (detect_image)``: the whole catalogue: sky, normalisation, tiling, masks, merging,
  segmentation map and photometry (one field at a time);
* ``Mask R-CNN (detect_image, TTA)``: the same with test-time augmentation (8 views fused);
* ``sep``: detection, deblending, segmentation map and photometry (``measure.detection.sep_catalog``).

Prints a markdown table of fields/s and megapixels/s with the ratio to sep (> 1: slower than sep).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

from deepmorph.measure.detection import sep_catalog
from deepmorph.simulate.fields import FieldSimulator, open_fields, write_fields
from deepmorph.workflows import detect


def _fields(args) -> tuple[list[np.ndarray], float]:
    if args.data:
        with open_fields(args.data) as ds:
            n = min(args.n, len(ds))
            return [ds.image(i) for i in range(n)], float(ds.attrs["sky_sigma"])
    sim = FieldSimulator("candels-f160w", size=args.size)
    path = os.path.join(tempfile.mkdtemp(prefix="deepmorph-bench-detect-"), "fields.h5")
    write_fields(path, sim, args.n, seed=args.seed, progress=False)
    with open_fields(path) as ds:
        return [ds.image(i) for i in range(args.n)], sim.sky_sigma


def _detector(args) -> detect.Detector:
    if args.model:
        return detect.load_detector(args.model, args.device)
    from deepmorph.models.maskrcnn import maskrcnn

    torch.manual_seed(0)
    model = maskrcnn(**detect.DEFAULT_MODEL["kwargs"], image_size=args.size)
    meta = {"in_channels": 1, "image_size": args.size, "classes": ["spheroid", "disk", "edge-on", "clumpy", "star"],
            "zeropoint_mag": 25.9}
    return detect.Detector(model.to(args.device).eval(), meta)


def _timed(fn, repeat: int, device: str) -> float:
    fn()  # warm-up (lazy initialisation, cuDNN autotuning)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a detection run [an untrained network]")
    p.add_argument("--data", help="a field file [simulate --n fields]")
    p.add_argument("--n", type=int, default=20, help="fields [20]")
    p.add_argument("--size", type=int, default=128, help="side of simulated fields, pixels [128]")
    p.add_argument("--batch", type=int, default=8, help="fields per forward pass of the network row [8]")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch threads on the CPU [torch's default]")
    p.add_argument("--repeat", type=int, default=2, help="timed passes over the fields [2]")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    images, sky = _fields(args)
    det = _detector(args)
    pixels = sum(im.size for im in images)
    norm = [torch.from_numpy(detect.normalize(im, sky))[None] for im in images]

    def network():
        with torch.no_grad():
            for start in range(0, len(norm), args.batch):
                det.model([x.to(args.device) for x in norm[start:start + args.batch]])

    def catalogue():
        for im in images:
            detect.detect_image(det, im, sky_sigma=sky, device=args.device)

    def catalogue_tta():
        for im in images:
            detect.detect_image(det, im, sky_sigma=sky, device=args.device, tta=True)

    def sep():
        for im in images:
            sep_catalog(im, sky_sigma=sky)

    rows = [("Mask R-CNN (network)", args.device, _timed(network, args.repeat, args.device)),
            ("Mask R-CNN (detect_image)", args.device, _timed(catalogue, args.repeat, args.device)),
            ("Mask R-CNN (detect_image, TTA)", args.device, _timed(catalogue_tta, args.repeat, args.device)),
            ("sep", "cpu", _timed(sep, args.repeat, "cpu"))]
    sep_seconds = rows[-1][2]
    n = len(images)
    print(f"{n} fields of {images[0].shape[1]}x{images[0].shape[0]} px, torch threads {torch.get_num_threads()}"
          f"{'' if args.model else ', untrained network'}\n")
    print("| method | device | fields/s | Mpix/s | time / sep |")
    print("|---|---|---|---|---|")
    for name, device, seconds in rows:
        print(f"| {name} | {device} | {n / seconds:.2f} | {pixels / seconds / 1e6:.3f} | {seconds / sep_seconds:.1f} |")


if __name__ == "__main__":
    main()
