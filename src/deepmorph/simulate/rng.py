"""Counter-based random numbers: every draw is a pure function of (seed, item, stream, slot).

Why not ``torch.Generator``: the design requires item ``i`` of a simulated dataset to be
identical whatever the batch size, the device or the number of workers. A counter-based
generator gives that for free: the random numbers of item ``i`` are computed from
``(seed, i)`` alone, in integer arithmetic that is bit-identical on CPU and GPU.

The hash is the 32-bit finaliser of MurmurHash3 (Appleby 2011) applied to a
combination of the four counters, evaluated in int64 with explicit 32-bit masks so
that no signed overflow or arithmetic shift can occur.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    """``(h * c) mod 2**32`` without int64 overflow (c split into 16-bit halves)."""
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    h = h ^ (h >> 16)
    return h


def _mix(h: torch.Tensor, value: torch.Tensor | int) -> torch.Tensor:
    """Combine one more counter into the running hash (boost::hash_combine style)."""
    h = h ^ ((value & _MASK32) + _GOLDEN + ((h << 6) & _MASK32) + (h >> 2))
    return _fmix32(h & _MASK32)


def random_bits(
    seed: int, index: torch.Tensor, stream: int, slots: torch.Tensor | int = 0
) -> torch.Tensor:
    """32-bit random integers (int64 tensor) from counters.

    Parameters
    ----------
    seed : int
        Dataset seed (any non-negative integer; only its low 32 bits and the next 32
        bits are used).
    index : torch.Tensor
        Item indices, int64, shape ``(B,)``.
    stream : int
        Which quantity is drawn (one number per catalogue column or noise field), so that
        different quantities of the same item are independent.
    slots : torch.Tensor or int
        Extra counter, e.g. the pixel number for noise fields; broadcast against
        ``index[:, None]`` when a tensor of shape ``(K,)``.

    Returns
    -------
    torch.Tensor
        int64 values in ``[0, 2**32)``, shape ``(B,)`` or ``(B, K)``.
    """
    index = index.to(torch.int64)
    h = torch.full_like(index, (seed & _MASK32) ^ 0x5BD1E995)
    h = _mix(h, (seed >> 32) & _MASK32)
    h = _mix(h, index)
    h = _mix(h, (index >> 32) & _MASK32)
    h = _mix(h, stream)
    if isinstance(slots, torch.Tensor):
        h = _mix(h[:, None], slots.to(device=index.device, dtype=torch.int64)[None, :])
    else:
        h = _mix(h, slots)
    return h


def uniform(
    seed: int,
    index: torch.Tensor,
    stream: int,
    slots: torch.Tensor | int = 0,
    low: float = 0.0,
    high: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Uniform deviates in ``[low, high)`` from counters (see :func:`random_bits`).

    The 32-bit integer is mapped to ``(k + 0.5) / 2**32``, which never returns exactly 0
    or 1 (safe for logarithms).
    """
    bits = random_bits(seed, index, stream, slots)
    u = (bits.to(torch.float64) + 0.5) * (1.0 / 4294967296.0)
    return (low + (high - low) * u).to(dtype)


def normal(
    seed: int,
    index: torch.Tensor,
    stream: int,
    count: int,
    dtype: torch.dtype = torch.float32,
    chunk: int = 128,
) -> torch.Tensor:
    """``count`` standard normal deviates per item from counters, by the Box-Muller transform.

    One 32-bit hash per pair of deviates gives both uniforms (the second through one more
    finaliser round), and both Box-Muller outputs (``r cos t``, ``r sin t``) are used. Items
    are processed ``chunk`` at a time so the integer work stays in cache.

    Returns
    -------
    torch.Tensor
        ``(B, count)`` deviates.
    """
    pairs = torch.arange((count + 1) // 2, device=index.device)
    out = torch.empty(len(index), 2 * len(pairs), dtype=torch.float32, device=index.device)
    for start in range(0, len(index), chunk):
        h1 = random_bits(seed, index[start:start + chunk], stream, pairs)
        h2 = _fmix32(h1 ^ 0x68E31DA4)
        u1 = (h1.float() + 0.5) * (1.0 / 4294967296.0)
        u2 = h2.float() * (2.0 * math.pi / 4294967296.0)
        r = torch.sqrt(-2.0 * torch.log(u1))
        block = out[start:start + chunk].view(-1, len(pairs), 2)
        block[..., 0] = r * torch.cos(u2)
        block[..., 1] = r * torch.sin(u2)
    return out[:, :count].to(dtype)
