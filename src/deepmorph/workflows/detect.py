"""Every galaxy of a field: Mask R-CNN detection, segmentation and classification, against sep.

The lecture's last image task. A Mask R-CNN (:func:`deepmorph.models.maskrcnn.maskrcnn`) learns
from simulated fields (:mod:`deepmorph.simulate.fields`: galaxies of four classes and stars,
blends, instance masks where an object dominates above 1 sky sigma) to find each object, outline
it and classify it. The classical baseline is SExtractor's algorithm through sep
(:func:`deepmorph.measure.detection.sep_catalog`); both are scored on the same held-out fields by
:func:`deepmorph.measure.detection.detection_scores`.

What the network sees
    The sky-subtracted image divided by its sky noise and stretched, ``asinh(image / sky_sigma)``
    (:func:`normalize`): noise of about +-1, the cores of bright galaxies 5-8. Training fields are
    normalised with the sky sigma their file records; an image to detect on has its sky
    subtracted and its noise measured by sep (SExtractor's background mesh) unless ``sky_sigma``
    is given. The network sees pixels: it was trained with the survey's PSF (CANDELS F160W: a
    FWHM of 3 pixels) and galaxies of 2-40 pixels, and images whose PSF or galaxies are much
    larger or smaller in pixels should be resampled first. Nothing else is rescaled (no resize to
    a fixed size, no ImageNet normalisation).

Large images (:func:`detect_image`)
    are cut into tiles of ``tile`` pixels overlapping by ``overlap``. Each tile owns the part of
    the image closer to its centre than to its neighbours' (boundaries halfway through the
    overlaps); a detection is kept only by the tile that owns its box centre, so an object narrower
    than ``overlap`` is always seen whole by the tile that keeps it. Detections whose masks still
    overlap by more than half (an object found by two tiles with slightly different centres, or
    one box given two classes) are merged, the best score kept. An image smaller than a tile is
    padded with sky noise to a full tile; the padding holds no detection.

Test-time augmentation (``tta=True``, :func:`tta_predict`)
    detects on the eight flips and quarter turns of each tile, turns what each view found back,
    and fuses the views by weighted box fusion: an object's box, mask and class probabilities are
    the score-weighted means of the views', and its score the mean over all eight views, so that
    objects only some views see rank lower. Eight times the network's time.

The catalogue
    has one row per object, best score first: ``id`` (its value in the segmentation map), ``x``,
    ``y`` (flux-weighted centroid of its segment, 0-based pixel centres), its box ``x0, y0, x1,
    y1`` (pixel edges: ``x1 - x0`` is the width), ``label`` and ``class_name`` (the most probable
    class), ``score`` (the probability that the object is real), ``class_prob`` (the probability of
    its class, given that it is real), ``npix``,
    ``flux`` and ``flux_err`` (counts in its segment; the error is ``sqrt(npix) sky_sigma``, plus
    the Poisson noise of the source when a gain is known), ``mag``, ``mag_err`` (AB with the zero
    point), ``flag`` (comma-joined: ``edge``, ``nan_pixels``, ``hidden``), and with
    ``morphology=True`` statmorph's Gini, M20, CAS, MID, Sersic and shape measurements on the
    segment (:data:`deepmorph.measure.morphology.FEATURES`; ~0.15 s per object), with
    ``morph_flag`` (statmorph's; 4: failed), ``morph_failed`` and ``morph_error`` (why the values
    are NaN). The segmentation map gives each pixel to the highest-scoring mask that covers it
    (mask probability above the run's threshold: 0.5, or the one :func:`calibrate_masks` chose).

A run directory holds :func:`deepmorph.training.fit`'s files, ``run.json`` (classes, the data's
sky sigma, the model's options, the split, and the mask thresholds ``mask_threshold`` and
``mask_threshold_tta`` once :func:`calibrate_masks` has chosen them, with its
``mask_calibration[_tta].ecsv`` and ``.png``), and after :func:`evaluate_detector`
``test_metrics.json``, ``detection_table.ecsv`` and ``completeness.ecsv``, ``completeness.png``
and ``overlay.png``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from deepmorph.errors import DeepmorphIOError, DeepmorphValueError
from deepmorph.workflows.classify import Split
from deepmorph.workflows.runs import load_run_weights, read_image_file, read_run, save_figure, save_table, write_json

#: The default detector: ResNet-18-FPN, narrow heads (see :func:`deepmorph.models.maskrcnn.maskrcnn`).
DEFAULT_MODEL = {"name": "maskrcnn", "kwargs": {"backbone": "resnet18", "fpn_channels": 64, "mask_channels": 64,
                                                "mask_layers": 2, "box_head_size": 256,
                                                "box_batch_size_per_image": 128}}
#: Flags of the detection catalogue.
DETECT_FLAGS = ("edge", "nan_pixels", "hidden")
#: Smallest image side detect_image accepts, pixels.
MIN_SIDE = 16


def default_config(**overrides):
    """The run config detection training starts from: ResNet-18-FPN, dihedral augmentation, AdamW 1e-3,
    cosine schedule, gradient clipping at 10, and early stopping (and best weights) on the validation
    AP@0.5, which follows detection better than the sum of the five losses does (with ``map_every``
    above 1, the epochs without it count towards the patience)."""
    from deepmorph.training import RunConfig

    base = RunConfig().with_overrides({
        "model": DEFAULT_MODEL, "augmentation": "dihedral", "epochs": 20, "batch_size": 4,
        "optimizer": {"name": "adamw", "lr": 1e-3, "weight_decay": 1e-4}, "schedule": {"kind": "cosine"},
        "early_stopping": {"monitor": "val_ap50", "mode": "max", "patience": 10}, "gradient_clip": 10.0,
    })
    return base.with_overrides(overrides) if overrides else base


def normalize(image, sky_sigma: float) -> np.ndarray:
    """What the detector sees: ``asinh(image / sky_sigma)``, float32 (image sky-subtracted, counts)."""
    if not (math.isfinite(sky_sigma) and sky_sigma > 0):
        raise DeepmorphValueError(f"sky noise must be a positive number of counts, got {sky_sigma!r}")
    return np.arcsinh(np.asarray(image, dtype=np.float32) / np.float32(sky_sigma)).astype(np.float32)


class FieldSet(torch.utils.data.Dataset):
    """Fields of a field file as :class:`~deepmorph.tasks.detect.DetectTask` items (normalised images).

    Parameters
    ----------
    path : path
        A field file (:func:`deepmorph.simulate.fields.write_fields`).
    items : array of int
        Which fields.
    sky_sigma : float
        The normalisation's sky noise, counts (the file's).
    """

    def __init__(self, path: str | Path, items, sky_sigma: float):
        from deepmorph.simulate.fields import open_fields

        self.fields = open_fields(path)
        self.items = np.asarray(items, dtype=np.int64)
        self.sky_sigma = float(sky_sigma)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        j = int(self.items[i])
        image, target = self.fields[j]
        boxes = target["boxes"]
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        return {"image": torch.from_numpy(normalize(image.numpy(), self.sky_sigma)), "boxes": boxes[keep],
                "labels": target["labels"][keep], "masks": target["masks"][keep], "index": j}


def _split_items(n: int, split: Split, test: bool = False) -> dict[str, np.ndarray]:
    """The split's field indices; an error when the training or validation part (or, with
    ``test``, the test part) is empty."""
    parts = split.indices(n)
    for name in ("train", "val", "test") if test else ("train", "val"):
        if len(parts[name]) == 0:
            raise DeepmorphValueError(f"{n} fields leave no {name} field with fractions {split.fractions}; "
                                      "simulate more fields" + (" or pass --no-evaluate" if name == "test" else ""))
    return parts


def _build(options: dict, seed: int):
    from deepmorph.models.maskrcnn import maskrcnn

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return maskrcnn(**options)


def train_detector(data: str | Path, out: str | Path, config=None, split: Split | None = None, map_every: int = 1,
                   resume: bool = True, evaluate: bool = True, progress: bool = False, calibrate: bool = True) -> dict:
    """Train a Mask R-CNN on simulated fields and score it and sep on the held-out test fields.

    Parameters
    ----------
    data : path
        A field file (``deepmorph simulate-fields``).
    out : path
        Run directory (resumed when it holds a checkpoint and ``resume``).
    config : RunConfig, optional
        Default :func:`default_config`; ``model.kwargs`` go to :func:`~deepmorph.models.maskrcnn.maskrcnn`,
        ``finetune.weights`` starts from another detection run's weights.
    split : Split
        Train/val/test split of the fields (by ``split.seed``).
    map_every : int
        Validation AP every this many epochs.
    evaluate : bool
        Score the model and sep on the test fields (:func:`evaluate_detector`).
    calibrate : bool
        Choose the mask threshold on the validation fields after training (:func:`calibrate_masks`;
        one pass of the network over them).

    Returns
    -------
    dict
        ``train_size``, ``epochs_run``, ``train_seconds``, ``seconds_per_field`` (training, per
        field and epoch), ``mask_threshold`` and, when ``evaluate``, :func:`evaluate_detector`'s
        metrics.
    """
    from deepmorph.data import make_loader
    from deepmorph.simulate.fields import open_fields
    from deepmorph.tasks.detect import DetectTask, collate_fields
    from deepmorph.training import fit, load_weights

    data, out = Path(data), Path(out)
    config = config or default_config()
    split = split or Split()
    if config.model.name != "maskrcnn":
        raise DeepmorphValueError(f"model {config.model.name!r}: the detector is 'maskrcnn'")
    if config.finetune.freeze != "none":
        raise DeepmorphValueError("a detector freezes backbone stages with model.kwargs.trainable_layers, not freeze")
    with open_fields(data) as fields:
        attrs, n = fields.attrs, len(fields)
        size = int(fields.image(0).shape[-1])
    classes = list(attrs["classes"])
    sky = float(attrs["sky_sigma"])
    parts = _split_items(n, split, test=evaluate)  # before training, not after it
    options = {**config.model.kwargs, "num_classes": len(classes), "in_channels": 1,
               "image_size": int(config.model.kwargs.get("image_size", size))}
    model = _build(options, config.seed)
    if config.finetune.weights is not None:
        load_weights(model, config.finetune.weights, strict=config.finetune.strict)
    task = DetectTask(model, config, map_every=map_every, class_names=classes)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "run.json", {
        "task": "detect", "method": "maskrcnn", "data": str(data.resolve()), "split_seed": split.seed,
        "fractions": list(split.fractions), "train_size": len(parts["train"]), "classes": classes,
        "in_channels": 1, "image_size": size, "sky_sigma": sky, "normalization": "asinh(image / sky_sigma)",
        "pixel_scale_arcsec": attrs.get("pixel_scale"), "zeropoint_mag": attrs.get("zeropoint"),
        "gain_e_per_count": attrs.get("gain_e_per_count"), "psf_fwhm_pix": attrs.get("psf_fwhm_pix"),
        "survey": attrs.get("survey"), "model_options": _jsonable(model.options),
    })
    for stale in out.glob("mask_calibration*"):  # new weights: the thresholds are chosen again below
        stale.unlink()
    config = config.with_overrides({"progress_bar": bool(progress and config.progress_bar)})
    sets = {k: FieldSet(data, parts[k], sky) for k in ("train", "val")}
    train = make_loader(sets["train"], config.batch_size, shuffle=True, num_workers=config.num_workers,
                        seed=config.seed, drop_last=len(sets["train"]) > config.batch_size, collate_fn=collate_fields)
    val = make_loader(sets["val"], config.batch_size, num_workers=config.num_workers, seed=config.seed,
                      collate_fn=collate_fields)
    start = time.perf_counter()
    history = fit(task, train, val, config, out, resume=resume)
    seconds = time.perf_counter() - start
    epochs = len(history.epoch)
    result = {"train_size": len(parts["train"]), "epochs_run": epochs, "train_seconds": seconds,
              "seconds_per_field": seconds / max(1, epochs * len(parts["train"])), "mask_threshold": 0.5}
    if calibrate and len(parts["val"]):
        result["mask_threshold"] = calibrate_masks(out, data, "val", progress=progress)["mask_threshold"]
    if evaluate:
        result.update(evaluate_detector(out, data, parts["test"]))
    return result


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# -- a trained detector -----------------------------------------------------------------------------

@dataclasses.dataclass
class Detector:
    """A trained Mask R-CNN (eval mode) and its run's ``run.json``."""

    model: torch.nn.Module
    meta: dict

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])


def load_detector(run: str | Path | Detector, device: str | torch.device = "cpu") -> Detector:
    """The trained detector of a run directory (its ``model.pt``), in eval mode on ``device``."""
    if isinstance(run, Detector):
        return Detector(run.model.to(device).eval(), run.meta)
    run = Path(run)
    meta = read_run(run, "detect", what="detection")
    options = {k: tuple(tuple(a) if isinstance(a, list) else a for a in v) if isinstance(v, list) else v
               for k, v in meta["model_options"].items()}
    model = load_run_weights(_build(options, 0), run)
    return Detector(model.to(device).eval(), meta)


# -- detection on an image of any size --------------------------------------------------------------

def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Origins of the tiles covering ``length`` pixels (``length >= tile``): ``tile - overlap`` apart,
    the last one flush with the end."""
    if length <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, length - tile, step))
    return starts + [length - tile]


def _owned(starts: list[int], tile: int) -> list[tuple[float, float]]:
    """Per tile, the interval of positions it owns: from halfway through its overlap with the previous
    tile to halfway through its overlap with the next one (pixel-centre coordinates)."""
    bounds = [-math.inf] + [0.5 * (b + a + tile) - 0.5 for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return list(zip(bounds, bounds[1:] + [math.inf], strict=True))


def _prepare(image, n_bands: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A (H, W) native float32 image and its bad-pixel mask, with one-line errors for bad input."""
    a = np.array(image, dtype=np.float32)  # a native-endian copy (FITS data arrive big-endian)
    if a.ndim == 3:
        if a.shape[0] != n_bands:
            raise DeepmorphValueError(f"{name}: {a.shape[0]} band(s), the model takes {n_bands}")
        a = a[0]
    if a.ndim != 2:
        raise DeepmorphValueError(f"{name}: expected a 2-D image, got shape {a.shape}")
    if min(a.shape) < MIN_SIDE:
        raise DeepmorphValueError(f"{name}: {a.shape[1]}x{a.shape[0]} pixels, too small to detect galaxies "
                                  f"(at least {MIN_SIDE} px a side)")
    bad = ~np.isfinite(a)
    if bad.all():
        raise DeepmorphValueError(f"{name}: no finite pixel (all NaN/inf)")
    return a, bad


def _sky(image: np.ndarray, bad: np.ndarray, sky_sigma: float | None) -> tuple[np.ndarray, float]:
    """The sky-subtracted image (NaN pixels 0) and its sky noise: given, or sep's background mesh."""
    clean = np.where(bad, 0.0, image).astype(np.float32)
    if sky_sigma is not None:
        return clean, float(sky_sigma)
    import sep

    box = 64 if min(image.shape) >= 128 else max(8, min(image.shape) // 2)
    bkg = sep.Background(np.ascontiguousarray(clean), mask=bad if bad.any() else None, bw=box, bh=box, fw=3, fh=3)
    residual = np.where(bad, 0.0, clean - bkg.back()).astype(np.float32)
    sigma = float(bkg.globalrms)
    if not sigma > 0:
        raise DeepmorphValueError("could not measure a sky noise (constant image?); pass sky_sigma")
    return residual, sigma


@dataclasses.dataclass
class _Found:
    score: float
    label: int
    class_prob: float
    box: np.ndarray  # x0, y0, x1, y1 in pixel edges (pixel j spans j - 0.5 .. j + 0.5)
    y0: int  # the mask crop's origin in the image
    x0: int
    mask: np.ndarray  # bool crop (mask probabilities before the outline is cut)


#: The eight symmetries of the pixel grid (quarter turns, after an optional flip) test-time augmentation uses.
DIHEDRAL_VIEWS = tuple((k, flip) for flip in (False, True) for k in range(4))


def _numpy(d: dict) -> dict:
    return {k: v.detach().float().cpu().numpy() if k != "labels" else v.cpu().numpy() for k, v in d.items()}


def _run_tiles(model, tiles: np.ndarray, device, tta: bool = False) -> list[dict]:
    with torch.no_grad():
        if not tta:
            return [_numpy(d) for d in model(list(torch.from_numpy(tiles).to(device)))]
        return tta_predict(model, torch.from_numpy(tiles).to(device))


def tta_predict(model, images: torch.Tensor, views=DIHEDRAL_VIEWS, iou: float = 0.55) -> list[dict]:
    """Test-time augmentation: detect on each symmetry of the images and fuse what the views found.

    Each image is flipped and turned (``views``: ``(quarter turns, flip)`` pairs, by default all
    eight symmetries of the pixel grid; the sky has no preferred orientation), detected on, and each
    view's boxes and masks are turned back. Per image, the views' detections are grouped greedily,
    best score first: a group takes at most one detection per view, each with a box IoU of at
    least ``iou`` with the group's best. A group becomes one detection (weighted box fusion,
    Solovyev et al. 2021, arXiv:1910.13302): its box, mask probabilities and class probabilities
    are the score-weighted means of its members', and its score is the sum of their scores divided
    by the number of views, so that an object only some views find ranks below one all of them find.

    Parameters
    ----------
    model : torch.nn.Module
        A Mask R-CNN in eval mode (torchvision's output format, optional ``class_probs``).
    images : torch.Tensor
        (B, C, H, W) square normalised tiles.
    views : sequence of (int, bool)
        The symmetries used.
    iou : float
        Least box IoU with a group's best detection to join the group.

    Returns
    -------
    list of dict
        Per image, numpy arrays ``boxes`` (N, 4; torchvision's pixel convention), ``scores``,
        ``labels``, ``masks`` (N, 1, H, W) and ``class_probs`` when the model gives them, best score
        first.
    """
    from deepmorph.tasks.detect import dihedral

    if images.shape[-1] != images.shape[-2]:
        raise DeepmorphValueError(f"test-time augmentation needs square tiles, got {tuple(images.shape[-2:])}")
    per_view = []
    for k, flip in views:
        turned = [torch.rot90(im.flip(-1) if flip else im, k, (-2, -1)).contiguous() for im in images]  # as dihedral
        back = []
        for im, d in zip(turned, model(turned), strict=True):
            target = {"boxes": d["boxes"], "masks": d["masks"][:, 0]}
            _, target = dihedral(im, target, (4 - k) % 4, False)  # undo the turns, then the flip
            _, target = dihedral(im, target, 0, flip)
            back.append(_numpy({**d, "boxes": target["boxes"], "masks": target["masks"][:, None]}))
        per_view.append(back)
    return [_fuse([v[i] for v in per_view], iou) for i in range(len(images))]


def _fuse(dets: list[dict], iou: float) -> dict:
    """Weighted box fusion of one image's detections by several views (see :func:`tta_predict`)."""
    from torchvision.ops import box_iou

    n_views = len(dets)
    boxes = np.concatenate([d["boxes"] for d in dets]).reshape(-1, 4)
    scores = np.concatenate([d["scores"] for d in dets])
    view = np.concatenate([np.full(len(d["scores"]), i) for i, d in enumerate(dets)])
    masks = np.concatenate([d["masks"] for d in dets])
    has_probs = all("class_probs" in d for d in dets)
    if has_probs:
        probs = np.concatenate([d["class_probs"] for d in dets])
    else:  # one-hot on the label
        n_classes = int(max((d["labels"].max(initial=0) for d in dets), default=0))
        labels = np.concatenate([d["labels"] for d in dets])
        probs = np.eye(max(n_classes, 1), dtype=np.float32)[np.clip(labels - 1, 0, None)]
    order = np.argsort(-scores, kind="stable")
    overlap = box_iou(torch.from_numpy(boxes), torch.from_numpy(boxes)).numpy() >= iou
    free = np.ones(len(scores), dtype=bool)
    groups = []
    for i in order:
        if not free[i]:
            continue
        members, seen = [], set()
        for j in order[overlap[i, order] & free[order]]:  # best first
            if view[j] not in seen:
                members.append(j)
                seen.add(view[j])
        free[members] = False
        groups.append(np.array(members))
    out_boxes, out_scores, out_masks, out_probs = [], [], [], []
    shape = masks.shape[1:]
    for g in groups:
        w = scores[g].astype(np.float64)
        w = w / w.sum()
        out_boxes.append((w[:, None] * boxes[g]).sum(0))
        out_scores.append(scores[g].sum() / n_views)
        out_probs.append((w[:, None] * probs[g]).sum(0))
        # Mask R-CNN pastes each mask into its box grown by 1/14 of its side (28 x 28 masks, one
        # pixel of border): outside the members' grown boxes every mask is 0
        lo, hi = boxes[g, :2].min(0), boxes[g, 2:].max(0)
        pad = 0.1 * (hi - lo).max() + 2
        x0, y0 = (max(0, int(v)) for v in np.floor(lo - pad))
        x1, y1 = int(np.ceil(hi[0] + pad)), int(np.ceil(hi[1] + pad))
        mask = np.zeros(shape, dtype=np.float32)
        mask[..., y0:y1, x0:x1] = np.tensordot(w, masks[g][..., y0:y1, x0:x1], axes=1)
        out_masks.append(mask)
    out = {"boxes": np.array(out_boxes, dtype=np.float32).reshape(-1, 4),
           "scores": np.array(out_scores, dtype=np.float32),
           "masks": np.array(out_masks, dtype=np.float32).reshape(-1, *shape),
           "class_probs": np.array(out_probs, dtype=np.float32).reshape(len(groups), probs.shape[1])}
    out["labels"] = out["class_probs"].argmax(axis=1).astype(np.int64) + 1
    if not has_probs:
        del out["class_probs"]
    best = np.argsort(-out["scores"], kind="stable")
    return {k: v[best] for k, v in out.items()}


def _raw_detections(model, norm: np.ndarray, tile: int, overlap: int, score_threshold: float, mask_threshold: float,
                    batch: int, device, shape: tuple[int, int], progress: bool, tta: bool = False) -> list[_Found]:
    """Detections of every tile scored at least ``score_threshold``, each kept by the tile that owns
    its box centre, with its mask probabilities (``_Found.mask``, float) cropped to where they exceed
    ``mask_threshold`` (the lowest threshold the outlines will be cut at)."""
    h, w = shape
    ys, xs = tile_starts(norm.shape[0], tile, overlap), tile_starts(norm.shape[1], tile, overlap)
    own_y, own_x = _owned(ys, tile), _owned(xs, tile)
    corners = [(iy, ix) for iy in range(len(ys)) for ix in range(len(xs))]
    found: list[_Found] = []
    batches = range(0, len(corners), batch)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="tiles", unit="batch")
    for start in batches:
        chunk = corners[start:start + batch]
        tiles = np.stack([norm[None, ys[iy]:ys[iy] + tile, xs[ix]:xs[ix] + tile] for iy, ix in chunk])
        for (iy, ix), det in zip(chunk, _run_tiles(model, tiles, device, tta), strict=True):
            oy, ox = ys[iy], xs[ix]
            for k in np.flatnonzero(det["scores"] >= score_threshold):
                box = det["boxes"][k] - 0.5 + np.array([ox, oy, ox, oy], dtype=np.float32)
                cx, cy = 0.5 * (box[0] + box[2]), 0.5 * (box[1] + box[3])
                (ya, yb), (xa, xb) = own_y[iy], own_x[ix]
                if not (ya <= cy < yb and xa <= cx < xb) or not (-0.5 <= cx < w - 0.5 and -0.5 <= cy < h - 0.5):
                    continue
                p = det["masks"][k, 0]
                crop = _crop(p, p > mask_threshold)
                if crop is None:
                    continue
                label = int(det["labels"][k])
                probs = det.get("class_probs")
                prob = float(probs[k, label - 1]) if probs is not None else float("nan")
                found.append(_Found(float(det["scores"][k]), label, prob, box, oy + crop[0], ox + crop[1],
                                    crop[2].copy()))
    return found


def _crop(values: np.ndarray, where: np.ndarray):
    """``(row, column, values[box])`` of the bounding box of ``where``, or None if it is empty."""
    rows, cols = np.flatnonzero(where.any(axis=1)), np.flatnonzero(where.any(axis=0))
    if not rows.size:
        return None
    return int(rows[0]), int(cols[0]), values[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _outlines(raw: list[_Found], mask_threshold: float) -> list[_Found]:
    """The detections of :func:`_raw_detections` with their masks cut at ``mask_threshold`` (bool
    crops); those with no pixel above it dropped."""
    found = []
    for f in raw:
        inside = f.mask > mask_threshold
        crop = _crop(inside, inside)
        if crop is not None:
            found.append(dataclasses.replace(f, y0=f.y0 + crop[0], x0=f.x0 + crop[1], mask=crop[2]))
    return found


def _mask_iou(a: _Found, b: _Found) -> float:
    y0, x0 = max(a.y0, b.y0), max(a.x0, b.x0)
    y1 = min(a.y0 + a.mask.shape[0], b.y0 + b.mask.shape[0])
    x1 = min(a.x0 + a.mask.shape[1], b.x0 + b.mask.shape[1])
    if y1 <= y0 or x1 <= x0:
        return 0.0
    inter = np.logical_and(a.mask[y0 - a.y0:y1 - a.y0, x0 - a.x0:x1 - a.x0],
                           b.mask[y0 - b.y0:y1 - b.y0, x0 - b.x0:x1 - b.x0]).sum()
    return float(inter / (a.mask.sum() + b.mask.sum() - inter))


def merge_duplicates(found: list, iou: float = 0.5) -> list:
    """Greedy, best score first: drop a detection whose mask overlaps a kept one's by IoU > ``iou``.

    Only detections whose mask crops overlap are compared (neighbours found with a k-d tree), so
    this costs ~N log N for the thousands of objects of a large image.
    """
    from scipy.spatial import cKDTree

    order = sorted(found, key=lambda f: -f.score)
    if len(order) < 2:
        return order
    centres = np.array([(f.x0 + 0.5 * f.mask.shape[1], f.y0 + 0.5 * f.mask.shape[0]) for f in order])
    reach = max(float(np.hypot(*f.mask.shape)) for f in order)  # crops farther apart cannot overlap
    neighbours = [[] for _ in order]
    for a, b in cKDTree(centres).query_pairs(reach):
        neighbours[min(a, b)].append(max(a, b))
    dropped = np.zeros(len(order), dtype=bool)
    kept = []
    for i, f in enumerate(order):
        if dropped[i]:
            continue
        kept.append(f)
        for j in neighbours[i]:  # lower scores only: j > i
            if not dropped[j] and _mask_iou(f, order[j]) > iou:
                dropped[j] = True
    return kept


def detect_image(run, image, sky_sigma: float | None = None, tile: int | None = None, overlap: int = 32,
                 score_threshold: float = 0.5, batch: int = 4, zeropoint: float | None = None,
                 gain: float | None = None, morphology: bool = False, mask_threshold: float | None = None,
                 device: str | torch.device = "cpu", progress: bool = False, name: str = "image", seed: int = 0,
                 tta: bool = False):
    """Detect, outline and classify every object of an image of any size.

    Parameters
    ----------
    run : path or Detector
        A detection run (:func:`train_detector`) or a :func:`load_detector` result.
    image : array_like
        ``(H, W)`` or ``(1, H, W)`` counts, any byte order; NaN/inf pixels are masked (they count
        as sky for the network, are left out of fluxes, and flag the objects they touch).
    sky_sigma : float, optional
        Sky noise per pixel, counts, of an image whose sky is already subtracted (a simulated
        field); default: sep measures and subtracts the background (SExtractor's mesh).
    tile, overlap : int
        Tile side and overlap, pixels (default tile: the training fields' side, at least
        ``2 * overlap + 32``). Objects wider than ``overlap`` may be split at tile borders.
    score_threshold : float
        Keep detections whose score (the network's probability that the object is real,
        ``1 - p(background)``) is at least this.
    batch : int
        Tiles per forward pass.
    zeropoint : float, optional
        AB magnitude of one count; default the training survey's.
    gain : float, optional
        Electrons per count, for the sources' Poisson noise in ``flux_err``.
    morphology : bool
        Add statmorph's measurements on each object's segment (slow: ~0.15 s per object).
    mask_threshold : float, optional
        Mask probability above which a pixel belongs to an object; default the run's, chosen on its
        validation fields (:func:`calibrate_masks`), or 0.5 for a run never calibrated.
    device : str
        Where the network runs.
    seed : int
        Seed of the sky noise that pads images smaller than a tile.
    tta : bool
        Test-time augmentation: detect on the eight flips and quarter turns of each tile and fuse
        the views (:func:`tta_predict`); ~8 times slower.

    Returns
    -------
    table : astropy.table.Table
        The catalogue (columns in the module docstring; ``meta`` holds ``sky_sigma``, the tiling
        and the zero point).
    segmap : numpy.ndarray
        ``(H, W)`` int32: 0 sky, ``id`` of the object that owns the pixel.
    """
    det = load_detector(run, device)
    if mask_threshold is None:
        mask_threshold = run_mask_threshold(det.meta, tta)
    return _detect(det, image, (mask_threshold,), sky_sigma=sky_sigma, tile=tile, overlap=overlap,
                   score_threshold=score_threshold, batch=batch, zeropoint=zeropoint, gain=gain,
                   morphology=morphology, device=device, progress=progress, name=name, seed=seed, tta=tta)[0]


def run_mask_threshold(meta: dict, tta: bool = False) -> float:
    """The mask probability threshold a run's detections use (``meta``: its ``run.json``): the one
    :func:`calibrate_masks` chose on its validation fields, ``mask_threshold_tta`` with test-time
    augmentation and else ``mask_threshold``, or 0.5 for a run never calibrated."""
    key = "mask_threshold_tta" if tta else "mask_threshold"
    return float(meta.get(key, meta.get("mask_threshold", 0.5)))


def _detect(det: Detector, image, mask_thresholds, sky_sigma=None, tile=None, overlap=32, score_threshold=0.5,
            batch=4, zeropoint=None, gain=None, morphology=False, device="cpu", progress=False, name="image", seed=0,
            tta=False) -> list[tuple]:
    """:func:`detect_image` at each of ``mask_thresholds`` from one pass of the network."""
    meta = det.meta
    bad_thresholds = [t for t in mask_thresholds if not 0 < t < 1]
    if not 0 <= score_threshold <= 1 or bad_thresholds:
        raise DeepmorphValueError(f"score threshold must be in [0, 1] and mask threshold in (0, 1), got "
                                  f"{score_threshold}, {', '.join(map(str, bad_thresholds or mask_thresholds))}")
    if int(batch) < 1:
        raise DeepmorphValueError(f"batch must be at least 1 tile, got {batch}")
    if gain is not None and not (math.isfinite(gain) and gain > 0):
        raise DeepmorphValueError(f"gain must be a positive number of electrons per count, got {gain}")
    if zeropoint is not None and not math.isfinite(zeropoint):
        raise DeepmorphValueError(f"zero point must be a finite AB magnitude, got {zeropoint}")
    a, bad = _prepare(image, int(meta["in_channels"]), name)
    residual, sigma = _sky(a, bad, sky_sigma)
    tile = int(tile) if tile is not None else max(det.image_size, 2 * int(overlap) + 32)
    if overlap < 0 or tile < 2 * overlap + 8:
        raise DeepmorphValueError(f"tile ({tile} px) must exceed twice the overlap ({overlap} px) by 8 px at least")
    h, w = a.shape
    if tile > max(h, w, det.image_size, 2 * int(overlap) + 32):
        raise DeepmorphValueError(f"{name}: tile ({tile} px) larger than the image ({h} x {w} px) and the training "
                                  f"fields ({det.image_size} px)")
    norm = normalize(residual, sigma)
    if h < tile or w < tile:  # pad with sky noise to a full tile (the padding holds no detection)
        rng = np.random.default_rng(seed)
        padded = np.arcsinh(rng.normal(size=(max(h, tile), max(w, tile)))).astype(np.float32)
        padded[:h, :w] = norm
        norm = padded
    start = time.perf_counter()
    raw = _raw_detections(det.model, norm, tile, int(overlap), score_threshold, min(mask_thresholds), int(batch),
                          device, (h, w), progress, tta)
    network = time.perf_counter() - start
    zp = float(zeropoint if zeropoint is not None else meta.get("zeropoint_mag") or 0.0)
    results = []
    for mask_threshold in mask_thresholds:
        start = time.perf_counter()
        found = merge_duplicates(_outlines(raw, mask_threshold))
        seconds = network + time.perf_counter() - start
        table, segmap = _catalog(found, residual, bad, sigma, gain, zp, det.classes)
        if morphology:
            table = _add_morphology(table, segmap, residual, bad, sigma, gain, progress)
        table.meta.update({"image": name, "sky_sigma": sigma, "tile": tile, "overlap": int(overlap),
                           "score_threshold": float(score_threshold), "mask_threshold": float(mask_threshold),
                           "zeropoint_mag": zp, "detect_seconds": seconds, "tta": bool(tta),
                           "coordinates": "0-based pixel centres; boxes in pixel edges"})
        results.append((table, segmap))
    return results


def _catalog(found: list[_Found], residual: np.ndarray, bad: np.ndarray, sigma: float, gain: float | None,
             zp: float, classes: list[str]):
    from astropy.table import Table

    h, w = residual.shape
    found = sorted(found, key=lambda f: -f.score)
    segmap = np.zeros((h, w), dtype=np.int32)
    for k in range(len(found) - 1, -1, -1):  # lowest score first: the best mask wins each pixel
        f = found[k]
        hh, ww = min(f.mask.shape[0], h - f.y0), min(f.mask.shape[1], w - f.x0)
        window = segmap[f.y0:f.y0 + hh, f.x0:f.x0 + ww]
        window[f.mask[:hh, :ww]] = k + 1
    n = len(found)
    ids = np.arange(1, n + 1)
    from scipy import ndimage

    from deepmorph.measure.detection import segment_photometry

    flat = np.where(bad, 0.0, residual).astype(np.float64)
    phot = segment_photometry(flat, segmap, n, sigma, gain, zp)
    npix = phot["npix"]
    if n:
        positive = np.clip(flat, 0, None)
        wsum = np.asarray(ndimage.sum_labels(positive, segmap, ids), dtype=float)
        yy, xx = np.indices((h, w))
        with np.errstate(invalid="ignore", divide="ignore"):
            cx = np.asarray(ndimage.sum_labels(positive * xx, segmap, ids)) / wsum
            cy = np.asarray(ndimage.sum_labels(positive * yy, segmap, ids)) / wsum
        nbad = np.bincount(segmap[bad].ravel(), minlength=n + 1)[1:]
        border = np.zeros((h, w), dtype=bool)
        border[[0, -1], :] = border[:, [0, -1]] = True
        at_edge = np.bincount(segmap[border].ravel(), minlength=n + 1)[1:] > 0
    else:
        wsum = cx = cy = np.zeros(0)
        nbad = np.zeros(0, int)
        at_edge = np.zeros(0, bool)
    boxes = np.array([f.box for f in found], dtype=float).reshape(-1, 4)
    centre_x, centre_y = 0.5 * (boxes[:, 0] + boxes[:, 2]), 0.5 * (boxes[:, 1] + boxes[:, 3])
    cx = np.where(np.isfinite(cx) & (wsum > 0), cx, centre_x)
    cy = np.where(np.isfinite(cy) & (wsum > 0), cy, centre_y)
    hidden = npix == 0
    flux, flux_err = np.where(hidden, np.nan, phot["flux"]), np.where(hidden, np.nan, phot["flux_err"])
    mag, mag_err = np.where(hidden, np.nan, phot["mag"]), np.where(hidden, np.nan, phot["mag_err"])
    labels = np.array([f.label for f in found], dtype=np.int64)
    flags = [",".join(name for name, on in (("edge", e), ("nan_pixels", b > 0), ("hidden", p == 0)) if on)
             for e, b, p in zip(at_edge, nbad, npix, strict=True)]
    table = Table({
        "id": ids.astype(np.int64), "x": cx, "y": cy,
        "x0": boxes[:, 0], "y0": boxes[:, 1], "x1": boxes[:, 2], "y1": boxes[:, 3],
        "label": labels - 1,
        "class_name": np.array([classes[i - 1] if 0 < i <= len(classes) else "?" for i in labels], dtype="U16"),
        "score": np.array([f.score for f in found], dtype=float),
        "class_prob": np.array([f.class_prob for f in found], dtype=float), "npix": npix,
        "flux": flux, "flux_err": flux_err, "mag": mag, "mag_err": mag_err,
        "flag": np.array(flags, dtype="U32") if flags else np.zeros(0, dtype="U32"),
    })
    for col in ("x", "y", "x0", "y0", "x1", "y1"):
        table[col].unit = "pix"
    for col in ("flux", "flux_err"):
        table[col].unit = "count"
    for col in ("mag", "mag_err"):
        table[col].unit = "mag"
    return table, segmap


def _add_morphology(table, segmap: np.ndarray, residual: np.ndarray, bad: np.ndarray, sigma: float,
                    gain: float | None, progress: bool):
    """statmorph on each object's segment (a cutout around it; other objects and bad pixels masked)."""
    import warnings

    import statmorph

    from deepmorph.measure.morphology import FEATURES, feature_values

    rows = []
    iterator = list(table)
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="statmorph", unit="object")
    h, w = segmap.shape
    for row in iterator:
        values = {name: math.nan for name, _, _ in FEATURES}
        values.update(morph_flag=4, morph_failed=True, morph_error="segment under 5 pixels")
        k = int(row["id"])
        if int(row["npix"]) >= 5:
            ys, xs = np.nonzero(segmap == k)
            pad = max(8, int(0.5 * max(np.ptp(ys), np.ptp(xs))) + 4)
            sl = (slice(max(ys.min() - pad, 0), min(ys.max() + pad + 1, h)),
                  slice(max(xs.min() - pad, 0), min(xs.max() + pad + 1, w)))
            cut = residual[sl].astype(np.float64)
            seg = (segmap[sl] == k).astype(np.int32)
            mask = ((segmap[sl] > 0) & (seg == 0)) | bad[sl]
            weight = np.sqrt(sigma**2 + (np.clip(cut, 0, None) / gain if gain else np.zeros_like(cut)))
            try:
                with warnings.catch_warnings(), np.errstate(all="ignore"):
                    warnings.simplefilter("ignore")
                    m = statmorph.SourceMorphology(cut, seg, 1, mask=mask, weightmap=weight)
                if int(m.flag) < 4:
                    values.update(feature_values(m))
                    values.update(morph_flag=int(m.flag), morph_failed=False, morph_error="")
                else:
                    values["morph_error"] = "statmorph flag 4 (non-positive flux in the segment)"
            except Exception as exc:  # statmorph raises assorted errors on tiny or odd segments: NaN + flag
                values["morph_error"] = f"{type(exc).__name__}: {str(exc).strip()[:150]}"
        rows.append(values)
    for name, _, unit in FEATURES:
        table[name] = np.array([r[name] for r in rows], dtype=float)
        if unit:
            table[name].unit = unit
    table["morph_flag"] = np.array([r["morph_flag"] for r in rows], dtype=np.int16)
    table["morph_failed"] = np.array([r["morph_failed"] for r in rows], dtype=bool)
    table["morph_error"] = np.array([r["morph_error"] for r in rows], dtype=str) if rows else np.zeros(0, "U1")
    return table


def detect_files(run, paths, out: str | Path, segmap_out: str | Path | None = None, **kwargs):
    """Detect on FITS images and write one catalogue (column ``image``) and, optionally, the
    segmentation maps (one FITS image HDU per input). ``kwargs`` go to :func:`detect_image`."""
    from astropy.table import vstack

    det = load_detector(run, kwargs.pop("device", "cpu"))
    paths = [Path(p) for p in paths]
    if not paths:
        raise DeepmorphValueError("no images given")
    tables, maps = [], []
    for path in paths:
        if not path.is_file():
            raise DeepmorphIOError(f"{path}: image not found")
        table, segmap = detect_image(det, _read_bands(path), name=str(path), **kwargs)
        table.add_column(np.array([path.name] * len(table), dtype=f"U{max(1, len(path.name))}"), index=0,
                         name="image")
        tables.append(table)
        maps.append(segmap)
    table = vstack(tables, metadata_conflicts="silent") if len(tables) > 1 else tables[0]
    save_table(table, out)
    if segmap_out is not None:
        _write_segmaps(Path(segmap_out), maps, paths)
    return table


def _read_bands(path: Path) -> np.ndarray:
    """A FITS image's first image HDU as ``(C, H, W)`` (a cube's planes are bands), or a PNG/JPEG's
    luminance as ``(1, H, W)``; native byte order (FITS data arrive big-endian)."""
    if path.suffix.lower() not in (".fits", ".fit", ".fts") and not path.name.lower().endswith(".fits.gz"):
        return read_image_file(path)
    import warnings

    from astropy.io import fits
    from astropy.utils.exceptions import AstropyWarning

    try:
        with warnings.catch_warnings():  # e.g. "File may have been truncated": the error below says it
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(path, memmap=False) as hdul:
                data = next((np.squeeze(np.asarray(h.data)) for h in hdul if h.is_image and h.data is not None
                             and np.asarray(h.data).size), None)
    except (OSError, ValueError) as exc:
        raise DeepmorphIOError(f"{path}: cannot read the image ({exc})") from None
    if data is None or data.ndim not in (2, 3):
        raise DeepmorphIOError(f"{path}: no 2-D image (or cube of bands) in any HDU")
    data = np.asarray(data, dtype=np.float32)  # native float32
    return data[None] if data.ndim == 2 else data


def _write_segmaps(path: Path, maps: list[np.ndarray], names: list[Path]) -> None:
    from astropy.io import fits

    from deepmorph.training._io import write_atomic

    hdus = [fits.PrimaryHDU()]
    for segmap, name in zip(maps, names, strict=True):
        hdu = fits.ImageHDU(segmap.astype(np.int32), name=name.stem[:60].upper() or "SEGMAP")
        hdu.header["COMMENT"] = "0: sky; k: object id k of the catalogue"
        hdus.append(hdu)
    write_atomic(path, lambda tmp: fits.HDUList(hdus).writeto(tmp, overwrite=True, output_verify="silentfix"))


# -- evaluation against sep on held-out fields ------------------------------------------------------

#: Class score of the Mask R-CNN detections kept for AP (the precision-recall curve needs low scores).
AP_SCORE = 0.05


def _test_items(run_meta: dict, data: Path, n: int, items) -> np.ndarray:
    """The fields to score: ``items``, or "test"/"val" (that split of the run when ``data`` is its
    training file; "test" is every field of another file), or None (every field)."""
    if items is None:
        return np.arange(n)
    if isinstance(items, str):
        if items not in ("test", "val"):
            raise DeepmorphValueError(f"items must be indices, 'test', 'val' or None, got {items!r}")
        if Path(run_meta.get("data", "")).resolve() != data.resolve():
            if items == "val":
                raise DeepmorphValueError(f"{data} is not the file the run was trained on "
                                          f"({run_meta.get('data')}): it has no validation split")
            return np.arange(n)
        split = Split(int(run_meta["split_seed"]), tuple(run_meta["fractions"]))
        return split.indices(n)[items]
    items = np.asarray(items, dtype=np.int64)
    if items.size and (items.min() < 0 or items.max() >= n):
        raise DeepmorphValueError(f"{data}: field indices must lie in [0, {n}), got {items.min()}..{items.max()}")
    return items


def _fields_to_score(det: Detector, ds, data: Path, items, purpose: str) -> np.ndarray:
    """:func:`_test_items` of an open field file whose classes are the detector's."""
    chosen = _test_items(det.meta, data, len(ds), items)
    if len(chosen) == 0:
        raise DeepmorphValueError(f"{data}: no field to {purpose}")
    if list(ds.attrs["classes"]) != det.classes:
        raise DeepmorphValueError(f"{data}: classes {ds.attrs['classes']} differ from the model's {det.classes}")
    return chosen


#: Mask probability thresholds :func:`calibrate_masks` tries.
MASK_THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75)


def calibrate_masks(run, data: str | Path | None = None, items="val", thresholds=MASK_THRESHOLDS,
                    tta: bool = False, device: str = "cpu", progress: bool = False, write: bool = True) -> dict:
    """Choose the mask probability threshold that maximises mask AP@0.5 on validation fields.

    A Mask R-CNN's mask head gives each pixel of a box the probability that it belongs to the
    object; the outline is where that probability exceeds a threshold (0.5 by default). The
    network is trained on outlines cut at 1 sky sigma of the noise-free model and is not exactly
    calibrated there, so the best threshold is measured: each field is detected once and its
    catalogue and segmentation map built at every threshold, then scored as :func:`evaluate_detector`
    does (AP@0.5 of galaxies brighter than sep's detection limit - 1 mag). The threshold chosen is
    the best of the mask AP curve averaged over neighbouring thresholds (a noise peak at one
    threshold does not win; of equal ones, the nearest to 0.5). It is written into the run's
    ``run.json`` (``mask_threshold``, or ``mask_threshold_tta`` for test-time augmentation, whose
    fused masks are smoother), which :func:`detect_image` and :func:`evaluate_detector` then use;
    ``mask_calibration[_tta].ecsv`` and ``.png`` show AP against the threshold.

    Parameters
    ----------
    run : path
        The detection run directory.
    data : path, optional
        A field file; default the run's training file.
    items : "val", None or array of int
        Fields to use: the run's validation split (default; the only choice on the run's own
        training file, whose test fields :func:`evaluate_detector` scores), or on another file
        every field (None) or indices.
    thresholds : sequence of float
        Candidate thresholds, each in (0, 1).
    tta : bool
        Calibrate the threshold of test-time augmentation's fused masks.
    device : str
        Where the network runs.
    progress : bool
        Show a progress bar over the fields.
    write : bool
        Store the choice in ``run.json`` and write the table and figure. Nothing is stored when
        the fields hold no galaxy to score (the run keeps its threshold; a warning says so).

    Returns
    -------
    dict
        ``thresholds``, ``ap50_box`` and ``ap50_mask`` (one per threshold), ``mask_threshold`` (the
        chosen one, or the run's current one when there was nothing to score), ``n_fields``,
        ``n_bright``, ``bright_mag``, ``tta``, ``data``, ``items`` ("val", "all" or "indices"),
        ``stored`` (whether ``run.json`` now holds it).
    """
    from astropy.table import Table

    from deepmorph.measure.detection import detection_scores, run_sep
    from deepmorph.simulate.fields import open_fields

    if not isinstance(run, (str, Path)):
        raise DeepmorphValueError("calibrate_masks needs a run directory (it stores the threshold there)")
    run = Path(run)
    det = load_detector(run, device)
    thresholds = sorted({float(t) for t in thresholds})
    if not thresholds or not all(0 < t < 1 for t in thresholds):
        raise DeepmorphValueError(f"mask thresholds must lie in (0, 1), got {thresholds}")
    data = Path(data) if data is not None else Path(det.meta["data"])
    if not data.is_file():
        raise DeepmorphIOError(f"{data}: no such field file")
    if isinstance(items, str) and items != "val":
        raise DeepmorphValueError(f"items must be 'val', None or indices, got {items!r}")
    if not isinstance(items, str) and Path(det.meta.get("data", "")).resolve() == data.resolve():
        raise DeepmorphValueError(f"{data} is the run's training file: calibrate on its validation split, not on "
                                  "fields that include the test split it is scored on")
    with open_fields(data) as ds:
        attrs = ds.attrs
        chosen = _fields_to_score(det, ds, data, items, "calibrate on (an empty validation split?)")
        sep_t, sep_s, truth_t, truth_s = run_sep(ds, chosen)
        per_threshold = [([], []) for _ in thresholds]
        iterator = chosen
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(chosen, desc="mask calibration", unit="field")
        for i in iterator:
            results = _detect(det, ds.image(int(i)), thresholds, sky_sigma=attrs["sky_sigma"],
                              score_threshold=AP_SCORE, gain=attrs.get("gain_e_per_count"),
                              zeropoint=attrs["zeropoint"], device=device, name=f"field {i}", tta=tta)
            for (tables, segmaps), (table, segmap) in zip(per_threshold, results, strict=True):
                tables.append(table)
                segmaps.append(segmap)
    bright = detection_scores(sep_t, sep_s, truth_t, truth_s, ap=False)["bright_mag"]
    scores = [detection_scores(t, m, truth_t, truth_s, bright_mag=bright) for t, m in per_threshold]
    box, mask = [s["ap50_box"] for s in scores], [s["ap50_mask"] for s in scores]
    best = choose_threshold(thresholds, mask)
    scored = best is not None
    if not scored:
        best = run_mask_threshold(det.meta, tta)
        warnings.warn(f"{data}: no galaxy brighter than sep's limit - 1 mag ({bright:.2f}) in the "
                      f"{len(chosen)} calibration fields; the mask threshold stays {best:g}", stacklevel=2)
    result = {"thresholds": thresholds, "ap50_box": box, "ap50_mask": mask, "mask_threshold": best,
              "n_fields": int(len(chosen)), "n_bright": int(scores[0]["n_bright"]), "bright_mag": float(bright),
              "tta": bool(tta), "data": str(data),
              "items": items if isinstance(items, str) else "all" if items is None else "indices",
              "stored": bool(write and scored)}
    if write and scored:
        suffix = "_tta" if tta else ""
        save_table(Table({"mask_threshold": thresholds, "ap50_box": box, "ap50_mask": mask}),
                   run / f"mask_calibration{suffix}.ecsv")
        save_figure(_calibration_figure(result), run / f"mask_calibration{suffix}.png")
        meta = read_run(run, "detect", what="detection")
        meta[f"mask_threshold{suffix}"] = best
        meta[f"mask_calibration{suffix}"] = {k: result[k] for k in ("n_fields", "n_bright", "data", "items")}
        write_json(run / "run.json", meta)
    return result


def choose_threshold(thresholds, ap) -> float | None:
    """The threshold of the best AP once each AP is averaged with its neighbours' (a noise peak at
    one threshold does not win); of equal ones, the nearest to 0.5; None if every AP is NaN."""
    smooth = _running_mean(ap)
    if not np.isfinite(smooth).any():
        return None
    top = np.nanmax(smooth)
    return min((float(t) for t, m in zip(thresholds, smooth, strict=True) if m >= top - 1e-9),
               key=lambda t: (abs(t - 0.5), t))


def _running_mean(values) -> np.ndarray:
    """Each value averaged with its neighbours (two at the ends), NaNs left out."""
    v = np.asarray(values, float)
    out = np.full(v.shape, np.nan)
    for i in range(len(v)):
        window = v[max(0, i - 1):i + 2]
        if np.isfinite(window).any():
            out[i] = np.nanmean(window)
    return out


def _calibration_figure(result: dict):
    from deepmorph.measure.plots import _figure

    fig = _figure((4.8, 3.4))
    ax = fig.subplots()
    ax.plot(result["thresholds"], result["ap50_mask"], "o-", ms=3, label="mask")
    ax.plot(result["thresholds"], result["ap50_box"], "s--", ms=3, label="box")
    ax.axvline(result["mask_threshold"], color="0.5", ls=":", lw=1)
    ax.set_xlabel("mask probability threshold")
    ax.set_ylabel("AP@0.5")
    ax.set_title(f"{result['n_fields']} {'validation ' if result['items'] == 'val' else ''}fields"
                 + (", TTA" if result["tta"] else ""))
    ax.legend(frameon=False)
    return fig


def evaluate_detector(run, data: str | Path, items="test", out: str | Path | None = None,
                      score_threshold: float = 0.5, device: str = "cpu", progress: bool = False,
                      tta: bool = False, mask_threshold: float | None = None) -> dict:
    """Mask R-CNN and sep on the same held-out fields, scored by the same functions.

    Both detect on each field with its recorded sky noise (the sky of simulated fields is zero).
    Completeness, purity, flux errors, classes and blends are scored on the Mask R-CNN detections
    with score >= ``score_threshold``; AP@0.5 on those with score >= :data:`AP_SCORE` (a
    precision-recall curve needs the low scores too), over galaxies brighter than sep's detection
    limit - 1 mag (sep's score is its S/N). See :func:`deepmorph.measure.detection.detection_scores`.

    Parameters
    ----------
    run : path or Detector
        The detection run.
    data : path
        A field file.
    items : "test", None or array of int
        Fields to score: "test" (the run's test split on its own training file, else every field),
        None (every field) or indices.
    out : path, optional
        Where to write ``test_metrics.json``, ``detection_table.ecsv``, ``completeness.ecsv``,
        ``completeness.png`` and ``overlay.png`` (default the run directory when ``run`` is a path).
    tta : bool
        Detect with test-time augmentation (:func:`detect_image`).
    mask_threshold : float, optional
        Mask probability threshold of the outlines; default the run's (:func:`run_mask_threshold`).

    Returns
    -------
    dict
        ``maskrcnn`` and ``sep``: :func:`~deepmorph.measure.detection.detection_scores` plus
        ``seconds_per_field``; ``n_fields``, ``bright_mag``, ``score_threshold``,
        ``mask_threshold`` (the one used).
    """
    from astropy.table import Table

    from deepmorph.measure.detection import detection_figure, detection_scores, run_sep
    from deepmorph.simulate.fields import open_fields

    if not 0 <= score_threshold <= 1:
        raise DeepmorphValueError(f"score threshold must be in [0, 1], got {score_threshold}")
    data = Path(data)
    det = load_detector(run, device)
    out = Path(out) if out is not None else (Path(run) if not isinstance(run, Detector) else None)
    with open_fields(data) as ds:
        attrs = ds.attrs
        chosen = _fields_to_score(det, ds, data, items, "evaluate on (an empty test split?)")
        start = time.perf_counter()
        sep_t, sep_s, truth_t, truth_s = run_sep(ds, chosen)
        sep_seconds = (time.perf_counter() - start) / len(chosen)
        tables, segmaps, images = [], [], []
        start = time.perf_counter()
        iterator = chosen
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(chosen, desc="Mask R-CNN", unit="field")
        for i in iterator:
            image = ds.image(int(i))
            table, segmap = detect_image(det, image, sky_sigma=attrs["sky_sigma"], score_threshold=AP_SCORE,
                                         gain=attrs.get("gain_e_per_count"), zeropoint=attrs["zeropoint"],
                                         mask_threshold=mask_threshold, device=device, name=f"field {i}", tta=tta)
            tables.append(table)
            segmaps.append(segmap)
            images.append(image)
        rcnn_seconds = (time.perf_counter() - start) / len(chosen)
    sep_scores = detection_scores(sep_t, sep_s, truth_t, truth_s)
    bright = sep_scores["bright_mag"]
    kept = [t[np.asarray(t["score"]) >= score_threshold] for t in tables]
    rcnn = detection_scores(kept, segmaps, truth_t, truth_s, bright_mag=bright, ap=False)
    ap = detection_scores(tables, segmaps, truth_t, truth_s, bright_mag=bright)
    rcnn.update({k: ap[k] for k in ("ap50_box", "ap50_mask", "n_bright")})
    rcnn["seconds_per_field"], sep_scores["seconds_per_field"] = rcnn_seconds, sep_seconds
    result = {"maskrcnn": rcnn, "sep": sep_scores, "n_fields": int(len(chosen)), "bright_mag": float(bright),
              "score_threshold": float(score_threshold), "ap_score": AP_SCORE, "data": str(data), "tta": bool(tta),
              "mask_threshold": (float(mask_threshold) if mask_threshold is not None
                                 else run_mask_threshold(det.meta, tta))}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "test_metrics.json", result)
        rows = [{"method": name, **{k: r[k] for k in _TABLE_KEYS if k in r}}
                for name, r in (("Mask R-CNN", rcnn), ("sep", sep_scores))]
        save_table(Table(rows=rows), out / "detection_table.ecsv")
        curves = Table({"mag_lo": rcnn["mag_bins"][:-1], "mag_hi": rcnn["mag_bins"][1:]})
        for name, r in (("maskrcnn", rcnn), ("sep", sep_scores)):
            curves[f"{name}_completeness"] = r["completeness_vs_mag"]
            curves[f"{name}_purity"] = r["purity_vs_mag"]
        curves["n_truth"] = rcnn["n_truth_vs_mag"]
        save_table(curves, out / "completeness.ecsv")
        detection_figure({"Mask R-CNN": rcnn, "sep": sep_scores}, out / "completeness.png")
        k = int(np.argmax([len(t) for t in truth_t]))  # the most crowded field
        shown = kept[k]
        save_figure(outline_figure(images[k], {
            "truth": (truth_s[k], _segmap_ids(truth_t[k][np.asarray(truth_t[k]["npix"]) > 0])),
            f"Mask R-CNN (score >= {score_threshold:g})": (np.where(np.isin(segmaps[k], shown["id"]), segmaps[k], 0),
                                                          shown),
            "sep": (sep_s[k], sep_t[k]),
        }, float(attrs["sky_sigma"]), title=f"field {int(chosen[k])} of {data.name}", classes=det.classes),
            out / "overlay.png")
    return result


def _segmap_ids(truth):
    """A truth table whose ``id`` is its segmap value (row ``k`` is segmap ``k + 1`` in a field file)."""
    truth = truth.copy()
    truth["id"] = np.asarray(truth["id"]) + 1
    return truth


#: Columns of ``detection_table.ecsv``.
_TABLE_KEYS = ("n_fields", "n_truth", "n_pred", "completeness", "purity", "mag_limit", "ap50_box", "ap50_mask",
               "galaxy_accuracy", "galaxy_accuracy_bright", "classification_accuracy", "flux_rel_error_nmad",
               "blend_split_fraction",
               "blend_split_fraction_bright", "seconds_per_field")


def outline_figure(image, panels: dict, sky_sigma: float, title: str = "", classes=None):
    """One panel per method: the image (asinh at the sky noise) with each object's segment outlined.

    ``panels`` maps a name to ``(segmap, table)``, the table's ``id`` being the object's segmap
    value; outlines are coloured by the table's ``label`` (galaxy classes, stars) when it has one,
    named by ``classes`` in a legend. The panel's title gives the number of objects.
    """
    from matplotlib import colors as mcolors
    from matplotlib.lines import Line2D

    from deepmorph.measure.plots import _figure

    stretched = np.arcsinh(np.nan_to_num(np.asarray(image, dtype=float)) / sky_sigma)
    fig = _figure((3.6 * len(panels), 3.9))
    axes = np.atleast_1d(fig.subplots(1, len(panels), sharex=True, sharey=True))
    palette = np.array([mcolors.to_rgba(c) for c in mcolors.TABLEAU_COLORS.values()])
    for ax, (name, (segmap, table)) in zip(axes, panels.items(), strict=True):
        ax.imshow(stretched, origin="lower", cmap="gray_r", vmin=-1, vmax=float(np.percentile(stretched, 99.7)))
        seg = np.asarray(segmap, dtype=np.int64)
        colour_of = np.zeros(int(seg.max()) + 1, dtype=np.int64)
        unclassified = len(palette) - 1  # a detector without classes (sep): the last colour
        labels = (np.asarray(table["label"], int) if "label" in table.colnames
                  else np.full(len(table), unclassified))
        ids = np.asarray(table["id"], int)
        inside = (ids > 0) & (ids < len(colour_of))
        colour_of[ids[inside]] = labels[inside] % len(palette)
        edge = np.zeros(seg.shape, dtype=bool)  # pixels of a segment with a neighbour outside it
        edge[1:] |= seg[1:] != seg[:-1]
        edge[:-1] |= seg[:-1] != seg[1:]
        edge[:, 1:] |= seg[:, 1:] != seg[:, :-1]
        edge[:, :-1] |= seg[:, :-1] != seg[:, 1:]
        edge &= seg > 0
        overlay = np.zeros(seg.shape + (4,))
        overlay[edge] = palette[colour_of[seg[edge]]]
        ax.imshow(overlay, origin="lower", interpolation="nearest")
        ax.set_title(f"{name}: {len(table)}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    if classes:
        handles = [Line2D([], [], color=palette[i % len(palette)], label=c) for i, c in enumerate(classes)]
        handles.append(Line2D([], [], color=palette[-1], label="no class"))
        fig.legend(handles=handles, fontsize=7, loc="outside lower center", ncol=len(handles), frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


# -- real images -------------------------------------------------------------------------------------

def real_image(name: str) -> tuple[np.ndarray, dict]:
    """A real image the project can detect on: ``"ntt"`` (../shared/data's NTT/EMMI R-band frame, with
    SExtractor's catalogue) or ``"hdf"`` (scikit-image's Hubble Deep Field: an 8-bit RGB display image,
    whose three channels are averaged and flipped so that north is up with ``origin="lower"``).

    Returns the (H, W) float32 image and a dict (``reference``: SExtractor's catalogue path or None).
    Raises :class:`DeepmorphIOError` when the NTT frame is not on this machine.
    """
    from deepmorph.workflows.runs import shared_data_file

    if name == "ntt":
        path, cat = shared_data_file("ntt_emmi_field/image.fits"), shared_data_file("ntt_emmi_field/image.cat")
        if path is None or cat is None:
            raise DeepmorphIOError("the NTT/EMMI frame is not in ../shared/data on this machine")
        return read_image_file(path)[0].astype(np.float32), {"path": str(path), "reference": str(cat)}
    if name == "hdf":
        from skimage import data as skdata

        rgb = skdata.hubble_deep_field().astype(np.float32)
        return rgb.mean(axis=-1)[::-1].copy(), {"path": "skimage.data.hubble_deep_field()", "reference": None}
    raise DeepmorphValueError(f"unknown real image {name!r}; known: ntt, hdf")


def detect_real(run, name: str, out: str | Path, score_threshold: float = 0.5, zeropoint: float | None = None,
                match_radius: float = 2.0, device: str = "cpu", tta: bool = False) -> dict:
    """Mask R-CNN (trained on simulations) on a real image, against SExtractor's catalogue or sep.

    The image is sky-subtracted and divided by its own sky noise (sep's background mesh) and not
    resampled: the NTT frame's PSF (FWHM ~2.1 px) is close to the training survey's 3 px in pixels.
    Detections are matched one to one within ``match_radius`` pixels to SExtractor's catalogue
    (the NTT frame) or to sep's detections with SExtractor's settings (the Hubble Deep Field).
    ``tta``: test-time augmentation (:func:`detect_image`).

    Writes ``<name>_catalog.ecsv``, ``<name>_segmap.fits``, ``<name>.json`` and ``<name>_overlay.png``
    into ``out``.

    Returns
    -------
    dict
        ``n_detected``, ``n_reference``, ``n_matched``, ``matched_fraction`` (of the reference's
        sources), ``median_offset_pix``, ``class_counts``, ``sky_sigma``, ``seconds``.
    """
    from astropy.table import Table

    from deepmorph.measure.detection import sep_catalog
    from deepmorph.workflows.field import match_sources, read_sextractor_catalog

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    image, info = real_image(name)
    det = load_detector(run, device)
    start = time.perf_counter()
    table, segmap = detect_image(det, image, score_threshold=score_threshold, zeropoint=zeropoint, device=device,
                                 name=name, tta=tta)
    seconds = time.perf_counter() - start
    sep_table, sep_seg = sep_catalog(image)
    if info["reference"] is not None:
        reference = read_sextractor_catalog(info["reference"])
        ref_name = "SExtractor"
        ref_xy = np.c_[np.asarray(reference["X_IMAGE"], float) - 1, np.asarray(reference["Y_IMAGE"], float) - 1]
    else:
        reference = Table({"X_IMAGE": np.asarray(sep_table["x"]) + 1, "Y_IMAGE": np.asarray(sep_table["y"]) + 1})
        ref_name = "sep"
        ref_xy = np.c_[np.asarray(sep_table["x"]), np.asarray(sep_table["y"])]
    ri, ci, dist = match_sources(table, reference, match_radius)
    names, counts = np.unique(np.asarray(table["class_name"]), return_counts=True)
    result = {
        "image": info["path"], "reference": ref_name, "n_detected": len(table), "n_reference": len(reference),
        "n_sep": len(sep_table), "n_matched": int(len(ri)),
        "matched_fraction": float(len(ri) / len(reference)) if len(reference) else float("nan"),
        "median_offset_pix": float(np.median(dist)) if len(dist) else float("nan"),
        "match_radius_pix": float(match_radius), "class_counts": {str(k): int(v) for k, v in zip(names, counts,
                                                                                                 strict=True)},
        "sky_sigma": float(table.meta["sky_sigma"]), "seconds": seconds, "shape": list(image.shape),
    }
    save_table(table, out / f"{name}_catalog.ecsv")
    _write_segmaps(out / f"{name}_segmap.fits", [segmap], [Path(name)])
    write_json(out / f"{name}.json", result)
    fig = outline_figure(image - np.median(image), {f"Mask R-CNN (score >= {score_threshold:g})": (segmap, table),
                                                    "sep (SExtractor's algorithm)": (sep_seg, sep_table)},
                         result["sky_sigma"], title=f"{name}: {len(ri)} of {len(reference)} {ref_name} sources "
                         f"matched within {match_radius:g} px", classes=det.classes)
    for ax in fig.axes[:1]:
        ax.scatter(ref_xy[:, 0], ref_xy[:, 1], s=30, facecolor="none", edgecolor="C3", lw=0.6)
    save_figure(fig, out / f"{name}_overlay.png")
    return result


__all__ = ["AP_SCORE", "DEFAULT_MODEL", "DETECT_FLAGS", "MASK_THRESHOLDS", "Detector", "FieldSet",
           "calibrate_masks", "choose_threshold", "default_config", "detect_files", "detect_image",
           "detect_real", "evaluate_detector", "load_detector", "merge_duplicates", "normalize", "outline_figure",
           "real_image", "run_mask_threshold", "tile_starts", "train_detector"]
