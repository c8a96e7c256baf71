"""Image-to-image tasks: a U-Net learns clump masks and bulge/disk images of simulated galaxies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmorph.data import PRESETS
from deepmorph.errors import DeepmorphValueError
from deepmorph.models import UNet
from deepmorph.simulate import Priors, Simulator
from deepmorph.tasks import Decomposer, DecomposeTask, SegmentTask, bulge_to_total, peak_scale
from deepmorph.training import RunConfig, build_model, fit

CONFIG = RunConfig(model={"name": "unet", "kwargs": {"depth": 2, "width": 8}}, optimizer={"lr": 3e-3},
                   epochs=15, batch_size=16, progress_bar=False, accelerator="cpu", normalization={"kind": "none"})


def _loader(batch: dict, batch_size: int, shuffle: bool):
    n = len(batch["image"])
    items = [{k: v[i] for k, v in batch.items()} for i in range(n)]
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=shuffle, generator=g)


def _clumpy(n: int, seed: int) -> dict:
    sim = Simulator("candels-f160w", stamp_size=32, clumps=True)
    out = sim.simulate(np.arange(n), seed=seed)
    scale = sim.noise.sky_sigma
    return {"image": torch.asinh(torch.from_numpy(out["images"]) / scale),
            "clump_mask": torch.from_numpy(out["clump_mask"]).float(), "index": torch.arange(n)}


def test_segment_task_learns_clump_masks(tmp_path):
    torch.manual_seed(0)
    train, val = _clumpy(384, seed=1), _clumpy(96, seed=2)
    task = SegmentTask(build_model(CONFIG, num_outputs=1), CONFIG, "clump_mask", pos_weight=3.0,
                       augmentation=PRESETS["flips"])
    history = fit(task, _loader(train, 16, True), _loader(val, 96, False), CONFIG, tmp_path)
    assert {"loss", "val_loss", "f1", "val_f1"} <= set(history.keys())
    assert history["loss"][-1] < 0.7 * history["loss"][0]
    task.eval()
    with torch.no_grad():
        prob = task.predict_step(val, 0)
    assert prob.shape == val["clump_mask"].shape and 0 <= prob.min() and prob.max() <= 1
    mask = val["clump_mask"].bool()
    # Clump pixels get clearly higher probabilities than the rest after a few epochs on 384 stamps.
    assert prob[mask].mean() > 3 * prob[~mask].mean()
    assert max(history["val_f1"]) > 0.3


def test_segment_task_augments_image_and_mask_alike():
    task = SegmentTask(UNet(1, 1, depth=1, width=2), CONFIG, "clump_mask", augmentation=PRESETS["flips"])
    torch.manual_seed(3)
    image = torch.zeros(16, 1, 8, 8)
    image[:, 0, 1, 2] = 1.0
    batch = {"image": image, "clump_mask": image.clone()}
    out = task.augment(batch)
    assert torch.equal(out["image"], out["clump_mask"])
    assert not torch.equal(out["image"], image)  # some were flipped
    with pytest.raises(DeepmorphValueError, match="pos_weight"):
        SegmentTask(UNet(1, 1, depth=1, width=2), CONFIG, pos_weight=0)


def test_peak_scale_and_bulge_to_total():
    x = torch.zeros(2, 1, 9, 9)
    x[0, 0, 4, 4] = 9.0
    x[1] = 1.0
    assert peak_scale(x).flatten().tolist() == pytest.approx([1.0, 1.0])
    comps = torch.zeros(3, 2, 4, 4)
    comps[0, 0], comps[0, 1] = 1.0, 3.0  # B/T 0.25
    comps[1, 1] = 2.0  # pure disk
    comps[2, 0], comps[2, 1] = 1.0, -1.0  # a negative disk sum counts as zero
    assert bulge_to_total(comps).tolist() == pytest.approx([0.25, 0.0, 1.0])


def test_decomposer_is_scale_equivariant():
    """Scaling the input scales the components: the network only sees brightness-normalised images."""
    torch.manual_seed(4)
    dec = Decomposer(UNet(1, 2, depth=2, width=4)).eval()
    x = torch.rand(3, 1, 16, 16) + 0.1
    with torch.no_grad():
        torch.testing.assert_close(dec(1000.0 * x), 1000.0 * dec(x), rtol=1e-4, atol=1e-6)


def _components(n: int, seed: int) -> dict:
    # A bulge more compact and more concentrated than its disk (the default priors also draw
    # n ~ 1 bulges larger than their disks, which no method can tell from a disk).
    priors = Priors(mag=(18.0, 21.0), bulge_n=(2.0, 6.0), log10_bulge_hlr_pix=(0.0, 0.5),
                    log10_disk_hlr_pix=(0.5, 1.1))
    sim = Simulator("candels-f160w", stamp_size=32, components=True, priors=priors)
    out = sim.simulate(np.arange(n), seed=seed)
    return {"image": torch.from_numpy(out["images"]), "bulge": torch.from_numpy(out["bulge"]),
            "disk": torch.from_numpy(out["disk"]), "index": torch.arange(n),
            "bt": torch.from_numpy(np.asarray(out["catalog"]["bulge_to_total"], dtype=np.float32))}


def test_decompose_task_learns_bulge_to_total(tmp_path):
    torch.manual_seed(0)
    train, val = _components(512, seed=1), _components(128, seed=2)
    config = CONFIG.with_overrides({"epochs": 15, "model.kwargs.zero_init": True})
    task = DecomposeTask(build_model(config, num_outputs=2), config, ("bulge", "disk"), flux_weight=1.0,
                         augmentation=PRESETS["flips"])
    history = fit(task, _loader(train, 16, True), _loader(val, 128, False), config, tmp_path)
    assert {"loss", "val_loss", "bt_rmse", "val_bt_rmse"} <= set(history.keys())
    task.eval()
    with torch.no_grad():
        pred = task.predict_step(val, 0)
    assert pred.shape == (128, 2, 32, 32)
    bt = bulge_to_total(pred)
    rmse = float(((bt - val["bt"]) ** 2).mean().sqrt())
    baseline = float(((val["bt"] - train["bt"].mean()) ** 2).mean().sqrt())  # always guess the mean B/T
    assert rmse < 0.6 * baseline, (rmse, baseline)
    # Fluxes come back in counts: the two components add up to the galaxy's light.
    total = pred.sum(dim=(1, 2, 3))
    true_total = (val["bulge"] + val["disk"]).sum(dim=(1, 2, 3))
    assert float(torch.median((total / true_total - 1).abs())) < 0.1


def test_decompose_task_augments_targets_with_the_image():
    task = DecomposeTask(UNet(1, 2, depth=1, width=2), CONFIG, augmentation=PRESETS["flips"])
    torch.manual_seed(5)
    img = torch.rand(8, 1, 6, 6)
    out = task.augment({"image": img, "bulge": 2 * img, "disk": 3 * img})
    torch.testing.assert_close(out["bulge"], 2 * out["image"])
    torch.testing.assert_close(out["disk"], 3 * out["image"])
    with pytest.raises(DeepmorphValueError, match="flux_weight"):
        DecomposeTask(UNet(1, 2, depth=1, width=2), CONFIG, flux_weight=-1)
