"""Augmentation: geometry in deepmorph's conventions, labels transformed with the images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from deepmorph.data import KERAS_PRESET, PRESETS, Augmentation, get_augmentation, transform_pa
from deepmorph.errors import DeepmorphValueError
from deepmorph.simulate import Priors, Simulator

SIZE = 32
# Bright, compact, disk-dominated galaxies, centred, without noise: their moments are exact.
EDGE_ON = Priors(bulge_to_total=(0.0, 0.05), disk_ellipticity=(0.8, 0.85), log10_disk_hlr_pix=(0.65, 0.75),
                 mag=(18.0, 18.5), max_offset_pix=0.0)


def moments(img: np.ndarray) -> tuple[float, float]:
    """Position angle (deg CCW from +x, x = column, y = row) and axis ratio from second moments."""
    img = np.clip(np.asarray(img, dtype=np.float64), 0, None)
    y, x = np.mgrid[: img.shape[-2], : img.shape[-1]]
    f = img.sum()
    xc, yc = (img * x).sum() / f, (img * y).sum() / f
    mxx = (img * (x - xc) ** 2).sum() / f
    myy = (img * (y - yc) ** 2).sum() / f
    mxy = (img * (x - xc) * (y - yc)).sum() / f
    pa = 0.5 * np.degrees(np.arctan2(2 * mxy, mxx - myy)) % 180
    half_diff = np.hypot((mxx - myy) / 2, mxy)
    return pa, float(np.sqrt(((mxx + myy) / 2 - half_diff) / ((mxx + myy) / 2 + half_diff)))


def angle_diff(a, b) -> np.ndarray:
    """Distance between axial angles (mod 180), degrees."""
    d = (np.asarray(a) - np.asarray(b)) % 180
    return np.minimum(d, 180 - d)


@pytest.fixture(scope="module")
def edge_on():
    sim = Simulator("candels-f160w", stamp_size=SIZE, psf="gaussian:0.12", priors=EDGE_ON, noise="none")
    b = sim.simulate(range(16), 0)
    assert (b["catalog"]["label"] == 2).all()  # all edge-on by the truth
    return torch.from_numpy(b["noiseless"]), b["catalog"]["pa_deg"]


@pytest.fixture(scope="module")
def clumpy():
    priors = Priors(clumpy_fraction=1.0, log10_disk_hlr_pix=(0.5, 0.8), log10_bulge_hlr_pix=(0.2, 0.4),
                    mag=(19.0, 20.0), clump_flux_fraction=(0.1, 0.15))
    sim = Simulator("candels-f160w", stamp_size=SIZE, psf="gaussian:0.12", priors=priors, clumps=True, noise="none")
    return sim.simulate(range(8), 1)


def test_measured_pa_matches_the_catalogue(edge_on):
    images, pa = edge_on
    measured = np.array([moments(im[0])[0] for im in images.numpy()])
    assert angle_diff(measured, pa).max() < 0.5


@pytest.mark.parametrize("t", [30.0, 90.0, -60.0, 135.0])
def test_rotation_by_t_adds_t_to_the_measured_pa(edge_on, t):
    images, pa = edge_on
    aug = Augmentation(rotation_deg=(t, t), padding_mode="zeros")
    out, _, new_pa = aug(images, pa_deg=pa)
    assert isinstance(new_pa, np.ndarray) and (new_pa >= 0).all() and (new_pa < 180).all()
    assert angle_diff(new_pa, pa + t).max() < 1e-9
    measured = np.array([moments(im[0])[0] for im in out.numpy()])
    assert angle_diff(measured, pa + t).max() < 1.0


def test_flips_map_pa_to_180_minus_pa(edge_on):
    images, pa = edge_on
    for hflip, vflip in ((True, False), (False, True), (True, True)):
        aug = Augmentation(hflip=hflip, vflip=vflip)
        params = aug.sample(len(pa), torch.Generator().manual_seed(0))
        params["hflip"][:] = hflip
        params["vflip"][:] = vflip
        out, _, new_pa = aug.apply(images, params, pa_deg=torch.from_numpy(pa))
        want = pa if hflip and vflip else 180 - pa
        assert angle_diff(new_pa.numpy(), want).max() < 1e-9
        measured = np.array([moments(im[0])[0] for im in out.numpy()])
        assert angle_diff(measured, want).max() < 0.5
        flipped = images.flip(-1) if hflip else images
        flipped = flipped.flip(-2) if vflip else flipped
        assert torch.equal(out, flipped)  # flips alone are exact


def test_keras_augmented_edge_on_disks_stay_edge_on(edge_on):
    images, pa = edge_on
    g = torch.Generator().manual_seed(3)
    for _ in range(3):
        out, _, new_pa = KERAS_PRESET(images, pa_deg=torch.from_numpy(pa), generator=g)
        m = [moments(im[0]) for im in out.numpy()]
        q = np.array([x[1] for x in m])
        assert q.max() < 0.35  # still edge-on
        assert angle_diff([x[0] for x in m], new_pa.numpy()).max() < 1.5  # the PA label follows the image


def test_mask_rotates_with_the_image_and_covers_the_clumps(clumpy):
    images = torch.from_numpy(clumpy["noiseless"])
    masks = torch.from_numpy(clumpy["clump_mask"])
    table = clumpy["clump_table"]
    t = 50.0
    aug = Augmentation(rotation_deg=(t, t), padding_mode="zeros")
    out, out_masks, _ = aug(images, masks)
    assert out_masks.dtype == torch.uint8 and set(out_masks.unique().tolist()) <= {0, 1}
    c = (SIZE - 1) / 2
    th = np.radians(t)
    checked = 0
    for gal, x, y in zip(table["id"], table["x_pix"], table["y_pix"], strict=True):
        xr, yr = x * np.cos(th) - y * np.sin(th), x * np.sin(th) + y * np.cos(th)
        col, row = int(round(c + xr)), int(round(c + yr))
        if 1 <= col < SIZE - 1 and 1 <= row < SIZE - 1:
            assert out_masks[gal, 0, row, col] == 1, (gal, x, y)
            # the rotated image has the clump there: a local light excess over the smooth galaxy's
            # mirror point (clumps break the galaxy's point symmetry)
            checked += 1
    assert checked >= 8
    # the mask area is kept (nearest resampling of a rotation), and it still holds the clumps' light:
    # far more of it than the unrotated mask does
    area_in, area_out = masks.sum(dim=(1, 2, 3)).float(), out_masks.sum(dim=(1, 2, 3)).float()
    assert torch.allclose(area_out, area_in, rtol=0.25)

    def light_in(img, m):
        return ((img * m).sum(dim=(1, 2, 3)) / img.sum(dim=(1, 2, 3))).numpy()

    before, after, stale = light_in(images, masks), light_in(out, out_masks), light_in(out, masks)
    assert (after > 0.6 * before).all()
    assert after.mean() > 1.8 * stale.mean() and (after >= stale).all()


def test_flux_is_conserved_under_rotation_and_shift(edge_on):
    images, _ = edge_on
    aug = Augmentation(rotation_deg=180.0, shift_frac=0.05, padding_mode="zeros")
    out, _, _ = aug(images, generator=torch.Generator().manual_seed(0))
    ratio = out.sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3))
    assert (ratio - 1).abs().max() < 0.02
    zoom = Augmentation(zoom=(0.8, 1.2), conserve_flux=True, padding_mode="zeros")
    out, _, _ = zoom(images, generator=torch.Generator().manual_seed(0))
    assert ((out.sum(dim=(1, 2, 3)) / images.sum(dim=(1, 2, 3))) - 1).abs().max() < 0.03


@pytest.mark.parametrize("k", [1, 2, 3])
def test_rotation_by_multiples_of_90_is_rot90(k):
    x = torch.rand(4, 2, SIZE, SIZE, generator=torch.Generator().manual_seed(k))
    masks = (x[:, :1] > 0.5).to(torch.uint8)
    aug = Augmentation(rotation_deg=(90.0 * k, 90.0 * k))
    out, out_masks, _ = aug(x, masks)
    # CCW in [y, x] with y up: content at +x goes to +y, i.e. rot90 from the x axis towards the y axis
    torch.testing.assert_close(out, torch.rot90(x, k, dims=(-1, -2)), atol=1e-5, rtol=0)
    assert torch.equal(out_masks, torch.rot90(masks, k, dims=(-1, -2)))


def test_keras_preset_ranges_are_respected():
    assert KERAS_PRESET.rotation_deg == (-45.0, 45.0)
    assert KERAS_PRESET.shift_frac == 0.05 and KERAS_PRESET.zoom == (0.75, 1.3)
    assert KERAS_PRESET.hflip and KERAS_PRESET.vflip
    p = KERAS_PRESET.sample(20000, torch.Generator().manual_seed(0))
    a = p["angle_deg"]
    assert a.min() >= -45 and a.max() <= 45 and a.min() < -44.5 and a.max() > 44.5
    for key in ("shift_x", "shift_y"):
        assert p[key].abs().max() <= 0.05 and p[key].abs().max() > 0.049
    assert p["zoom"].min() >= 0.75 and p["zoom"].max() <= 1.3
    assert p["zoom"].min() < 0.76 and p["zoom"].max() > 1.29
    for key in ("hflip", "vflip"):
        assert 0.48 < p[key].float().mean() < 0.52
    # a single bright pixel is moved by at most the largest shift and zoom of its offset
    x = torch.zeros(500, 1, SIZE, SIZE)
    x[:, 0, 15, 15] = 1.0  # 0.5 px from the centre (15.5, 15.5)
    out, _, _ = KERAS_PRESET(x, generator=torch.Generator().manual_seed(1))
    peak = out.flatten(1).argmax(1)
    rows, cols = peak // SIZE, peak % SIZE
    reach = 0.05 * SIZE + 1.3 * np.hypot(0.5, 0.5) + 1
    assert (rows - 15.5).abs().max() <= reach and (cols - 15.5).abs().max() <= reach
    assert PRESETS["keras"] is KERAS_PRESET and set(PRESETS) == {"none", "keras", "flips", "rotate"}


def test_noise_and_generator_reproducibility():
    x = torch.zeros(8, 1, SIZE, SIZE)
    aug = Augmentation(rotation_deg=30.0, noise_sigma=0.5)
    a, _, _ = aug(x, generator=torch.Generator().manual_seed(5))
    b, _, _ = aug(x, generator=torch.Generator().manual_seed(5))
    c, _, _ = aug(x, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.std()) == pytest.approx(0.5, rel=0.05) and abs(float(a.mean())) < 0.03
    assert PRESETS["none"](x)[0] is x  # the identity does nothing, not even a copy


def test_pa_shapes_and_serialisation():
    params = {"angle_deg": torch.tensor([10.0, -20.0]), "hflip": torch.tensor([True, False]),
              "vflip": torch.tensor([False, False])}
    pa = torch.tensor([[30.0, 170.0], [5.0, 90.0]])
    out = transform_pa(pa, params["angle_deg"], params["hflip"], params["vflip"])
    torch.testing.assert_close(out, torch.tensor([[160.0, 20.0], [165.0, 70.0]]), rtol=0, atol=1e-5)
    for name, aug in PRESETS.items():
        again = Augmentation.from_dict(json.loads(json.dumps(aug.to_dict())))
        assert again == aug and get_augmentation(name) == aug and get_augmentation(aug.to_dict()) == aug
    assert get_augmentation(None).is_identity
    with pytest.raises(DeepmorphValueError, match="unknown augmentation"):
        get_augmentation("imgaug")
    with pytest.raises(DeepmorphValueError, match="zoom"):
        Augmentation(zoom=(0.0, 1.0))
    with pytest.raises(DeepmorphValueError, match="shift_frac"):
        Augmentation(shift_frac=1.5)
    with pytest.raises(DeepmorphValueError, match="rotation_deg"):
        Augmentation(rotation_deg=-5)
    with pytest.raises(DeepmorphValueError, match="masks"):
        KERAS_PRESET(torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8))
    with pytest.raises(DeepmorphValueError, match="B, C, H, W"):
        KERAS_PRESET(torch.zeros(1, 8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_matches_cpu(edge_on):
    images, pa = edge_on
    params = KERAS_PRESET.sample(len(pa), torch.Generator().manual_seed(0))
    cpu, _, pa_cpu = KERAS_PRESET.apply(images, params, pa_deg=torch.from_numpy(pa))
    gpu, _, pa_gpu = KERAS_PRESET.apply(images.cuda(), params, pa_deg=torch.from_numpy(pa).cuda())
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pa_gpu.cpu(), pa_cpu)
    noisy, _, _ = Augmentation(noise_sigma=1.0)(images.cuda(), generator=torch.Generator().manual_seed(0))
    assert noisy.device.type == "cuda"


def test_noise_padding_looks_like_the_sky():
    sky = 2.0 * torch.randn(64, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) + 5.0
    aug = Augmentation(rotation_deg=(45.0, 45.0), zoom=(0.75, 0.75))
    out, _, _ = aug(sky, generator=torch.Generator().manual_seed(1))
    corner = out[..., :4, :4]  # entirely outside the input after this rotation and zoom
    assert float(corner.mean()) == pytest.approx(5.0, abs=0.1)
    assert float(corner.std()) == pytest.approx(2.0, rel=0.1)
    zeros, _, _ = Augmentation(rotation_deg=(45.0, 45.0), zoom=(0.75, 0.75), padding_mode="zeros")(sky)
    assert float(zeros[..., :4, :4].abs().max()) == 0.0
