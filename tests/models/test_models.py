"""Every registered model: shapes, gradients, no NaN; the CNN's options; the Gaussian-noise layer."""

from __future__ import annotations

import pytest
import torch

from deepmorph.errors import DeepmorphValueError
from deepmorph.models import GaussianNoise, SimpleCNN, create_model, list_models, register_model

VECTOR_MODELS = [n for n in list_models()  # U-Nets (dense outputs) and generative models have their own tests
                 if not any(getattr(create_model(n), flag, False) for flag in ("dense_output", "generative"))]


@pytest.mark.parametrize("name", VECTOR_MODELS)
def test_registered_model_interface(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=2, num_outputs=3)
    x = torch.randn(4, 2, 32, 32)
    out = model(x)  # training mode: batch norm uses the batch, dropout and noise are on
    assert out.shape == (4, 3)
    assert torch.isfinite(out).all()
    (out**2).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"no gradient reaches {param_name}"
        assert torch.isfinite(param.grad).all(), param_name
        assert param.grad.abs().sum() > 0, f"zero gradient for {param_name}"
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.ndim == 4 and features.shape[:2] == (4, model.num_features)
        torch.testing.assert_close(model.forward_head(features), model(x))
    assert isinstance(model.blocks, torch.nn.ModuleList) and isinstance(model.head, torch.nn.Module)


@pytest.mark.parametrize("activation", ["relu", "leakyrelu", "prelu"])
@pytest.mark.parametrize("blocks_per_stage, batchnorm", [(1, True), (2, False)])
def test_cnn_feature_shapes(activation, blocks_per_stage, batchnorm):
    model = SimpleCNN(3, 5, widths=(4, 6, 8), blocks_per_stage=blocks_per_stage, batchnorm=batchnorm,
                      activation=activation, kernel_size=5)
    x = torch.randn(2, 3, 24, 16)
    assert len(model.blocks) == 3
    assert model.forward_features(x).shape == (2, 8, 3, 2)  # each stage halves the image
    assert model(x).shape == (2, 5)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert n_convs == 3 * blocks_per_stage
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == batchnorm


@pytest.mark.parametrize("blocks_per_stage", [1, 2])
def test_cnn_strided_stages_halve_the_image_without_pooling(blocks_per_stage):
    model = SimpleCNN(1, 3, widths=(4, 8, 16), blocks_per_stage=blocks_per_stage, downsample="stride",
                      head="flatten", hidden=8, image_size=32)
    x = torch.randn(2, 1, 32, 32)
    assert model.forward_features(x).shape == (2, 16, 4, 4)
    assert model(x).shape == (2, 3)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in model.modules())
    strides = [m.stride[0] for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert strides == ([2] + [1] * (blocks_per_stage - 1)) * 3  # the first convolution of each stage
    with pytest.raises(DeepmorphValueError, match="downsample"):
        SimpleCNN(downsample="avgpool")


def test_cnn_eval_is_deterministic_with_noise_and_dropout():
    model = SimpleCNN(1, 2, widths=(4, 8), dropout=0.5, noise_sigma=1.0).eval()
    x = torch.randn(3, 1, 16, 16)
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_cnn_bad_input_and_options():
    model = SimpleCNN(1, 2, widths=(4, 8, 16))
    with pytest.raises(DeepmorphValueError, match="H, W >= 8"):
        model(torch.randn(1, 1, 4, 16))
    with pytest.raises(DeepmorphValueError, match=r"\(B, 1, H, W\)"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(DeepmorphValueError, match="activation"):
        SimpleCNN(activation="tanh")
    with pytest.raises(DeepmorphValueError, match="kernel_size"):
        SimpleCNN(kernel_size=4)
    with pytest.raises(DeepmorphValueError, match="dropout"):
        SimpleCNN(dropout=1.0)


def test_registry_errors():
    with pytest.raises(DeepmorphValueError, match="unknown model 'vgg'; known models: .*cnn"):
        create_model("vgg")
    with pytest.raises(DeepmorphValueError, match="model 'cnn'.*width"):
        create_model("cnn", width=3)
    with pytest.raises(DeepmorphValueError, match="already registered"):
        register_model("cnn")(SimpleCNN)


def test_gaussian_noise_is_identity_in_eval():
    layer = GaussianNoise(0.3).eval()
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(layer(x), x)
    assert torch.equal(GaussianNoise(0.0).train()(x), x)


def test_gaussian_noise_has_sigma_in_train():
    torch.manual_seed(1)
    x = torch.full((200_000,), 5.0)
    noise = GaussianNoise(0.3).train()(x) - x
    # standard errors: 0.3 / sqrt(N) = 7e-4 on the mean, 0.3 / sqrt(2N) = 5e-4 on sigma
    assert abs(noise.mean().item()) < 4e-3
    assert noise.std().item() == pytest.approx(0.3, abs=3e-3)
    with pytest.raises(DeepmorphValueError, match="sigma"):
        GaussianNoise(-1.0)
