"""The U-Net: shapes for every option, skip connections, its size rule, and tiled inference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmorph.errors import DeepmorphValueError
from deepmorph.models import UNet, create_model, predict_tiled
from deepmorph.training import freeze


@pytest.mark.parametrize("upsample", ["transpose", "bilinear", "nearest"])
@pytest.mark.parametrize("depth, size", [(1, 16), (3, 32), (4, 48)])
def test_unet_maps_images_to_maps_of_the_same_size(upsample, depth, size):
    torch.manual_seed(0)
    model = UNet(in_channels=2, num_outputs=3, depth=depth, width=4, upsample=upsample, dropout=0.1)
    x = torch.randn(2, 2, size, size + 2**depth)
    assert UNet(2, 3, depth=depth, width=4, zero_init=True)(x).abs().max() == 0  # empty maps to start with
    out = model(x)
    assert out.shape == (2, 3, size, size + 2**depth)
    (out**2).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_unet_widths_interface_and_registry():
    model = create_model("unet", in_channels=1, num_outputs=2, depth=3, width=8, max_width=16)
    assert model.widths == [8, 16, 16, 16]
    assert len(model.blocks) == 4 and model.multiple == 8 and model.dense_output
    x = torch.randn(1, 1, 32, 32)
    feats = model.eval().forward_features(x)
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 32, 32), (16, 16, 16), (16, 8, 8), (16, 4, 4)]
    torch.testing.assert_close(model.forward_head(feats), model(x))
    # Fine-tuning freezes encoder stages like the CNN's blocks.
    freeze(model, "blocks:2")
    assert not any(p.requires_grad for p in model.blocks[1].parameters())
    assert all(p.requires_grad for p in model.blocks[2].parameters())


def test_unet_skip_connections_carry_fine_detail():
    """A one-pixel spike changes the output at that pixel, with full-resolution structure around it
    (without the skips, the response would be an upsampled coarse map, the same across each 8x8 cell)."""
    torch.manual_seed(1)
    model = UNet(1, 1, depth=3, width=4, batchnorm=False).eval()
    x = torch.zeros(1, 1, 32, 32)
    y = x.clone()
    y[0, 0, 10, 13] = 1.0
    diff = (model(y) - model(x)).abs()[0, 0]
    assert diff[10, 13] > 0
    cell = diff[8:16, 8:16]
    assert cell.std() > 0.1 * cell.mean()


def test_unet_bad_input_and_options():
    model = UNet(1, 1, depth=3, width=4)
    with pytest.raises(DeepmorphValueError, match="multiples of 8"):
        model(torch.randn(1, 1, 36, 32))
    with pytest.raises(DeepmorphValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 2, 32, 32))
    for kwargs, match in (({"upsample": "cubic"}, "upsample"), ({"kernel_size": 4}, "odd"),
                          ({"dropout": 1.0}, "dropout"), ({"depth": 0}, "positive"), ({"max_width": 2}, "max_width")):
        with pytest.raises(DeepmorphValueError, match=match):
            UNet(1, 1, width=4, **kwargs)


def test_tiled_prediction_equals_whole_image_inside_and_covers_any_size():
    torch.manual_seed(2)
    model = UNet(1, 2, depth=3, width=4).eval()
    image = torch.randn(1, 192, 264)
    whole = model(image[None])[0].detach().numpy()
    tiled = predict_tiled(model, image, tile=128, overlap=48, multiple=8, batch_size=3)
    assert tiled.shape == (2, 192, 264)
    # Away from the image edges (where tiles mirror and the whole image zero-pads) they agree:
    # 48 px of overlap covers the network's reach, so the tile seams do not show.
    np.testing.assert_allclose(tiled[:, 48:-48, 48:-48], whole[:, 48:-48, 48:-48], atol=1e-5)
    # An overlap off the pooling grid is rounded up onto it.
    again = predict_tiled(model, image, tile=128, overlap=41, multiple=8, batch_size=3)
    np.testing.assert_array_equal(again, tiled)
    small = predict_tiled(model, torch.randn(1, 5, 7), tile=64, overlap=8, multiple=8)
    assert small.shape == (2, 5, 7) and np.isfinite(small).all()


def test_tiled_prediction_errors():
    model = UNet(1, 1, depth=2, width=4).eval()
    bad = np.zeros((20, 20), dtype=np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(DeepmorphValueError, match="NaN"):
        predict_tiled(model, bad, multiple=4)
    with pytest.raises(DeepmorphValueError, match="overlap"):
        predict_tiled(model, np.zeros((64, 64)), tile=16, overlap=8, multiple=4)
    with pytest.raises(DeepmorphValueError, match="image"):
        predict_tiled(model, np.zeros((1, 1, 8, 8)), multiple=4)
