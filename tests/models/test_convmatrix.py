"""The convolution matrix reproduces torch's conv2d, and its transpose torch's conv_transpose2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deepmorph.errors import DeepmorphValueError
from deepmorph.models.convmatrix import conv_matrix, conv_output_size, convolve, transposed_convolve


def test_the_classic_example_is_4_by_16():
    kernel = torch.arange(1.0, 10.0).reshape(3, 3)
    c = conv_matrix(kernel, (4, 4))
    assert c.shape == (4, 16)
    # Each row holds the 9 kernel values once, the rest zeros; the first row starts at pixel 0.
    assert ((c != 0).sum(dim=1) == 9).all()
    assert c[0, :3].tolist() == [1.0, 2.0, 3.0] and c[0, 4:7].tolist() == [4.0, 5.0, 6.0]


@pytest.mark.parametrize("size", [(4, 4), (5, 6), (7, 5)])
@pytest.mark.parametrize("k", [(3, 3), (2, 3), (1, 1)])
@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("padding", [0, 1])
def test_matches_torch_conv_and_transposed_conv(size, k, stride, padding):
    gen = torch.Generator().manual_seed(hash((size, k, stride, padding)) % 2**31)
    kernel = torch.randn(*k, generator=gen, dtype=torch.float64)
    x = torch.randn(*size, generator=gen, dtype=torch.float64)
    try:
        ho = conv_output_size(size[0], k[0], stride, padding)
        wo = conv_output_size(size[1], k[1], stride, padding)
    except DeepmorphValueError:
        pytest.skip("kernel larger than the padded input")
    c = conv_matrix(kernel, size, stride, padding)
    ref = F.conv2d(x[None, None], kernel[None, None], stride=stride, padding=padding)[0, 0]
    torch.testing.assert_close(convolve(c, x, (ho, wo)), ref)
    y = torch.randn(ho, wo, generator=gen, dtype=torch.float64)
    extra = ((size[0] + 2 * padding - k[0]) % stride, (size[1] + 2 * padding - k[1]) % stride)
    ref_t = F.conv_transpose2d(y[None, None], kernel[None, None], stride=stride, padding=padding,
                               output_padding=extra)[0, 0]
    torch.testing.assert_close(transposed_convolve(c, y, size), ref_t)


def test_bad_shapes_are_refused():
    with pytest.raises(DeepmorphValueError, match="does not fit"):
        conv_matrix(torch.ones(5, 5), (3, 3))
    with pytest.raises(DeepmorphValueError, match="2-D"):
        conv_matrix(torch.ones(3), (4, 4))
