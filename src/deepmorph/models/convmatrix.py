"""Convolution as a matrix product, and the transposed convolution as its transpose (the lecture's part IV).

A 2-D convolution (PyTorch's cross-correlation) of an ``H x W`` input with a ``kh x kw`` kernel,
stride ``s`` and zero padding ``p`` is linear in the input, so it is a matrix ``C`` of shape
``(Ho * Wo, H * W)`` acting on the flattened input: ``conv(x) = C @ flatten(x)``. The transposed
convolution ("going backward" from ``Ho x Wo`` to ``H x W``, used by decoders and U-Nets to
upsample) is ``C^T @ flatten(y)``. The classic example: a 3x3 kernel on a 4x4 input gives a 4x16
``C`` (Dumoulin & Visin 2016, "A guide to convolution arithmetic for deep learning").
"""

from __future__ import annotations

import torch

from deepmorph.errors import DeepmorphValueError


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
    """Output length of a convolution along one axis: ``floor((size + 2p - k) / s) + 1``."""
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise DeepmorphValueError(f"kernel {kernel} with padding {padding} does not fit an input of {size}")
    return out


def conv_matrix(kernel: torch.Tensor, input_shape: tuple[int, int], stride: int = 1, padding: int = 0) -> torch.Tensor:
    """The matrix ``C`` with ``conv2d(x, kernel) = C @ x.flatten()`` (single channel).

    Built entry by entry: output pixel ``(i, j)`` sees input pixel ``(i s - p + a, j s - p + b)``
    through kernel tap ``(a, b)``; taps that fall in the zero padding contribute nothing.

    Parameters
    ----------
    kernel : torch.Tensor
        ``(kh, kw)`` kernel.
    input_shape : (int, int)
        ``(H, W)`` of the input.
    stride, padding : int
        As in :func:`torch.nn.functional.conv2d`.

    Returns
    -------
    torch.Tensor
        ``(Ho * Wo, H * W)`` matrix, the kernel's dtype.
    """
    if kernel.ndim != 2:
        raise DeepmorphValueError(f"kernel must be 2-D (kh, kw), got shape {tuple(kernel.shape)}")
    if stride < 1 or padding < 0:
        raise DeepmorphValueError(f"stride must be >= 1 and padding >= 0, got {stride}, {padding}")
    h, w = input_shape
    kh, kw = kernel.shape
    ho, wo = conv_output_size(h, kh, stride, padding), conv_output_size(w, kw, stride, padding)
    c = torch.zeros(ho * wo, h * w, dtype=kernel.dtype)
    for i in range(ho):
        for j in range(wo):
            for a in range(kh):
                y = i * stride - padding + a
                if not 0 <= y < h:
                    continue
                for b in range(kw):
                    x = j * stride - padding + b
                    if 0 <= x < w:
                        c[i * wo + j, y * w + x] = kernel[a, b]
    return c


def convolve(c: torch.Tensor, x: torch.Tensor, output_shape: tuple[int, int]) -> torch.Tensor:
    """``conv(x)`` as ``C @ flatten(x)``, reshaped to ``output_shape`` (``(Ho, Wo)``)."""
    return (c @ x.reshape(-1)).reshape(output_shape)


def transposed_convolve(c: torch.Tensor, y: torch.Tensor, input_shape: tuple[int, int]) -> torch.Tensor:
    """The transposed convolution of ``y`` (``(Ho, Wo)``) as ``C^T @ flatten(y)``, shaped ``(H, W)``.

    Equals ``conv_transpose2d(y, kernel, stride, padding, output_padding=(H + 2p - kh) % s)``.
    """
    return (c.T @ y.reshape(-1)).reshape(input_shape)
