"""Mask R-CNN for fields: torchvision's output format, no resizing, a loss that falls, exact augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.ops import masks_to_boxes

from deepmorph.errors import DeepmorphValueError
from deepmorph.models import list_models
from deepmorph.models.maskrcnn import maskrcnn
from deepmorph.tasks.detect import collate_fields, dihedral, map_inputs

#: A narrow detector that trains in seconds on a CPU.
TINY = {"fpn_channels": 16, "mask_channels": 16, "mask_layers": 1, "box_head_size": 32,
        "rpn_pre_nms_top_n": (200, 200), "rpn_post_nms_top_n": (100, 100), "box_batch_size_per_image": 64,
        "detections_per_img": 50}


def _tiny(**kwargs):
    torch.manual_seed(0)
    return maskrcnn(**{**TINY, **kwargs})


def _field_targets(n: int, size: int = 64):
    """``n`` simulated fields (normalised images) and their targets, from the field simulator."""
    from deepmorph.simulate.fields import FieldSimulator

    sim = FieldSimulator("candels-f160w", size=size, density=25.0)
    images, targets = [], []
    for i in range(n):
        f = sim.simulate_field(i, seed=1)
        o = f["objects"]
        keep = np.flatnonzero(o["npix"] > 0)
        boxes = np.stack([o[c][keep] for c in ("x0", "y0", "x1", "y1")], axis=1) + 0.5  # torchvision's convention
        masks = f["segmap"][None] == (keep[:, None, None] + 1)
        images.append(torch.from_numpy(np.arcsinh(f["image"] / sim.sky_sigma).astype(np.float32))[None])
        targets.append({"boxes": torch.as_tensor(boxes, dtype=torch.float32),
                        "labels": torch.as_tensor(o["label"][keep] + 1),
                        "masks": torch.as_tensor(masks, dtype=torch.uint8)})
    return images, targets


def test_eval_output_is_torchvisions_format_at_the_input_size():
    model = _tiny(num_classes=5).eval()
    with torch.no_grad():
        out = model([torch.randn(1, 80, 96), torch.randn(1, 64, 64)])
    assert len(out) == 2
    for d, (h, w) in zip(out, [(80, 96), (64, 64)], strict=True):
        assert set(d) == {"boxes", "labels", "scores", "masks", "class_probs"}
        n = len(d["boxes"])
        assert d["boxes"].shape == (n, 4) and d["boxes"].dtype == torch.float32
        assert d["labels"].dtype == torch.int64 and d["scores"].shape == (n,)
        assert d["masks"].shape == (n, 1, h, w)  # pasted at the input's own size: nothing was resized
        if n:
            assert int(d["labels"].min()) >= 1 and int(d["labels"].max()) <= 5  # 0 is the background
            assert float(d["masks"].min()) >= 0 and float(d["masks"].max()) <= 1
            assert (d["boxes"][:, 2] <= w).all() and (d["boxes"][:, 3] <= h).all()
            # one detection per object: a score for "object", and its class probabilities
            assert d["class_probs"].shape == (n, 5)
            torch.testing.assert_close(d["class_probs"].sum(1), torch.ones(n))
            assert (d["labels"] == d["class_probs"].argmax(1) + 1).all()
        assert n <= TINY["detections_per_img"]


def test_images_reach_the_backbone_unscaled():
    model = _tiny()
    x = torch.randn(1, 70, 50) * 7.0
    batch, _ = model.transform([x])
    assert batch.image_sizes == [(70, 50)]
    assert batch.tensors.shape[-2:] == (96, 64)  # padded to a multiple of 32, not resized
    torch.testing.assert_close(batch.tensors[0, :, :70, :50], x)  # no ImageNet mean/std either
    assert float(batch.tensors[0, :, 70:, :].abs().max()) == 0.0


@pytest.mark.parametrize("options", [{"in_channels": 3}, {"backbone": "mobilenet"}, {"stem_stride": 2}],
                         ids=["3-bands", "mobilenet", "stem-stride-2"])
def test_training_mode_returns_the_five_finite_losses(options):
    model = _tiny(num_classes=2, **options).train()
    c = options.get("in_channels", 1)
    images = [torch.randn(c, 64, 64) for _ in range(2)]
    masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
    masks[0, 20:30, 10:18] = 1
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 18.0, 30.0]]), "labels": torch.tensor([1]), "masks": masks}] * 2
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.conv1.weight.grad is not None if "backbone" not in options else True


def test_loss_falls_on_simulated_fields():
    images, targets = _field_targets(3)
    assert sum(len(t["boxes"]) for t in targets) >= 6
    model = _tiny(num_classes=5).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    torch.manual_seed(0)
    history = []
    for _ in range(15):
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    assert np.isfinite(history).all()
    assert np.mean(history[-3:]) < 0.6 * history[0], history


def test_bad_options_are_clear_errors():
    with pytest.raises(DeepmorphValueError, match="nothing is downloaded"):
        maskrcnn(weights_backbone="DEFAULT")
    with pytest.raises(DeepmorphValueError, match="backbone"):
        maskrcnn(backbone="vgg")
    with pytest.raises(DeepmorphValueError, match="num_classes"):
        maskrcnn(num_classes=0)
    with pytest.raises(DeepmorphValueError, match="one tuple per FPN level"):
        maskrcnn(anchor_sizes=((8,), (16,)))


def test_not_in_the_classifier_registry():
    # The registry's models are classifiers/regressors with blocks and a head; the detector is built
    # by deepmorph.models.maskrcnn.maskrcnn and saved with its options in the run.
    assert "maskrcnn" not in list_models()


@pytest.mark.parametrize("k", [0, 1, 2, 3])
@pytest.mark.parametrize("flip", [False, True])
def test_dihedral_moves_boxes_with_the_masks(k, flip):
    h, w = 20, 28
    masks = torch.zeros(3, h, w, dtype=torch.uint8)
    masks[0, 2:5, 3:10] = 1
    masks[1, 12:19, 20:27] = 1
    masks[2, 0:1, 0:28] = 1  # touches three edges
    boxes = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # pixel corners: x1 = last + 1
    image = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
    out_image, out = dihedral(image, {"boxes": boxes, "masks": masks, "labels": torch.tensor([1, 2, 3])}, k, flip)
    expected = masks_to_boxes(out["masks"]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
    torch.testing.assert_close(out["boxes"], expected)
    assert out_image.shape[-2:] == out["masks"].shape[-2:] == ((h, w) if k % 2 == 0 else (w, h))
    # the image moved exactly as the masks did
    for m_in, m_out in zip(masks, out["masks"], strict=True):
        assert sorted(image[0][m_in.bool()].tolist()) == sorted(out_image[0][m_out.bool()].tolist())


def test_collate_and_metric_inputs():
    items = [{"image": torch.zeros(1, 8, 8), "boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
              "masks": torch.zeros(0, 8, 8, dtype=torch.uint8), "index": i} for i in (4, 7)]
    batch = collate_fields(items)
    assert batch["image"].shape == (2, 1, 8, 8) and batch["index"].tolist() == [4, 7]
    pred = [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.ones(1, dtype=torch.int64),
             "masks": torch.full((1, 1, 8, 8), 0.7)}] * 2
    p, t = map_inputs(pred, batch["targets"])
    assert p[0]["masks"].dtype == torch.bool and p[0]["masks"].shape == (1, 8, 8) and bool(p[0]["masks"].all())
    assert t[1]["masks"].dtype == torch.bool


def test_validation_losses_leave_training_state_alone():
    from deepmorph.tasks.detect import DetectTask
    from deepmorph.training import RunConfig

    images, targets = _field_targets(2)
    task = DetectTask(_tiny(num_classes=5), RunConfig(augmentation="dihedral"))
    task.eval()
    bn = task.model.backbone.body.bn1
    before = bn.running_mean.clone()
    state = torch.get_rng_state()
    with torch.no_grad():
        losses = task._losses_without_training(torch.stack(images), targets)
    assert set(losses) >= {"loss_mask", "loss_objectness"} and all(torch.isfinite(v) for v in losses.values())
    torch.testing.assert_close(bn.running_mean, before)  # batch norm statistics not updated by validation
    assert torch.equal(torch.get_rng_state(), state)  # proposal sampling drew from a forked random state
    assert not task.model.training  # back in eval mode
    with pytest.raises(DeepmorphValueError, match="none, flips or dihedral"):
        DetectTask(_tiny(), RunConfig(augmentation="keras"))


def _random_rois(n: int, n_img: int, side: float, gen: torch.Generator) -> torch.Tensor:
    """RoIs of 0.1-40 px, some hanging over (or entirely off) the image's edges."""
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * side * 1.3 - 0.15 * side
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 40 + 0.1
    image = torch.randint(0, n_img, (n, 1), generator=gen).double()
    return torch.cat([image, xy, xy + wh], 1)


@pytest.mark.parametrize(("shape", "scale", "out"), [((3, 8, 16, 20), 0.25, 7), ((2, 5, 9, 7), 0.5, 14),
                                                     ((1, 4, 1, 6), 0.125, 7)])
def test_sparse_roi_align_equals_torchvisions_values_and_gradients(shape, scale, out):
    from torchvision.ops import roi_align

    from deepmorph.models.maskrcnn import sparse_roi_align

    gen = torch.Generator().manual_seed(3)
    features = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    rois = _random_rois(60, shape[0], shape[3] / scale, gen)
    weights = torch.randn(60, shape[1], out, out, generator=gen, dtype=torch.float64)
    for ratio in (1, 2):
        ref = roi_align(features, rois, (out, out), scale, ratio)
        ours = sparse_roi_align(features, rois, (out, out), scale, ratio)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours.detach(), ref.detach(), atol=1e-12)
        g_ref, = torch.autograd.grad((ref * weights).sum(), features)
        g_ours, = torch.autograd.grad((ours * weights).sum(), features)
        np.testing.assert_allclose(g_ours, g_ref, atol=1e-11)
    assert sparse_roi_align(features, rois[:0], (out, out), scale, 2).shape == (0, shape[1], out, out)


def test_sparse_multiscale_pool_equals_torchvisions():
    from collections import OrderedDict

    from torchvision.ops import MultiScaleRoIAlign

    from deepmorph.models.maskrcnn import SparseRoIAlign

    gen = torch.Generator().manual_seed(4)
    feats = OrderedDict((str(i), torch.randn(2, 6, 128 >> i, 192 >> i, generator=gen, dtype=torch.float64,
                                             requires_grad=True)) for i in range(4))
    boxes = []
    for n in (40, 25):  # sides 1-500 px: RoIs on every level
        xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 500
        side = torch.exp(torch.rand(n, 2, generator=gen, dtype=torch.float64) * np.log(500))
        boxes.append(torch.cat([xy, xy + side], 1))
    shapes = [(512, 768), (512, 768)]
    ref = MultiScaleRoIAlign(list(feats), 14, 2)(feats, boxes, shapes)
    ours = SparseRoIAlign(list(feats), 14, 2)(feats, boxes, shapes)
    np.testing.assert_allclose(ours.detach(), ref.detach(), atol=1e-12)
    g_ref = torch.autograd.grad(ref.pow(2).sum(), list(feats.values()), allow_unused=True)
    g_ours = torch.autograd.grad(ours.pow(2).sum(), list(feats.values()), allow_unused=True)
    used = [g is not None and bool(g.abs().sum() > 0) for g in g_ref]
    assert sum(used) >= 3
    for a, b, f in zip(g_ours, g_ref, feats.values(), strict=True):  # a level without RoIs: no gradient (None) or zeros
        np.testing.assert_allclose(torch.zeros_like(f) if a is None else a, torch.zeros_like(f) if b is None else b,
                                   atol=1e-11)
