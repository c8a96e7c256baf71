"""Apply an image-to-image network to an image of any size, tile by tile, in constant memory.

The image is cut into overlapping tiles; each tile's central part (all but ``overlap`` pixels on
every side) goes into the output, so every output pixel comes from a tile in which it had at
least ``overlap`` pixels of context, and no seams show where a fully convolutional network's
receptive field is under ``2 * overlap``. The image is mirrored beyond its edges. Only one batch
of tiles is in memory besides the image and the output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from deepmorph.errors import DeepmorphValueError


def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Top-left corners (in an image padded by ``overlap`` before) of the tiles covering ``size`` pixels."""
    core = tile - 2 * overlap
    return [i * core for i in range(max(1, math.ceil(size / core)))]


@torch.no_grad()
def predict_tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    image,
    tile: int = 256,
    overlap: int = 48,
    multiple: int = 1,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Maps of ``fn`` over a large image, tiled with overlap.

    Parameters
    ----------
    fn : callable
        ``(B, C, t, t) -> (B, K, t, t)`` float tensors (e.g. a U-Net in eval mode, applied to
        normalised images).
    image : array or tensor
        ``(C, H, W)`` or ``(H, W)`` image; it must be finite.
    tile : int
        Tile side, pixels (rounded up to a multiple of ``multiple``; shrunk for small images).
    overlap : int
        Context kept on each side of a tile's core, pixels; rounded up to a multiple of
        ``multiple`` so that every tile sits on the whole image's pooling grid. It should cover
        the network's reach (a depth-3 U-Net of 3 x 3 convolutions sees ~42 px to each side:
        48 makes the tiled map equal to the untiled one away from the image's edges).
    multiple : int
        The network's size constraint (a U-Net of depth d: ``2 ** d``).
    batch_size : int
        Tiles per forward pass.
    device : str or torch.device
        Where ``fn`` runs.
    progress : bool
        Show a progress bar over the batches of tiles.

    Returns
    -------
    numpy.ndarray
        ``(K, H, W)`` float32 maps.
    """
    x = torch.as_tensor(np.asarray(image) if not isinstance(image, torch.Tensor) else image, dtype=torch.float32)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or min(x.shape[-2:]) < 1:
        raise DeepmorphValueError(f"tiled prediction needs a (C, H, W) or (H, W) image, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise DeepmorphValueError(f"the image has {int((~torch.isfinite(x)).sum())} NaN/inf pixel(s); "
                                  "replace or mask them before running the network")
    if overlap < 0 or tile < 1 or multiple < 1 or batch_size < 1:
        raise DeepmorphValueError("tile, multiple and batch_size must be positive and overlap non-negative")
    _, h, w = x.shape
    overlap = multiple * math.ceil(overlap / multiple)
    tile = min(tile, max(h, w) + 2 * overlap)
    tile = multiple * math.ceil(tile / multiple)
    core = tile - 2 * overlap
    if core < 1:
        raise DeepmorphValueError(f"tile ({tile} px) must be larger than twice the overlap ({overlap} px)")
    ys, xs = tile_origins(h, tile, overlap), tile_origins(w, tile, overlap)
    # Mirror the image beyond its edges: ``overlap`` before, up to the last tile's end after.
    iy = _mirror(np.arange(-overlap, ys[-1] + tile - overlap), h)
    ix = _mirror(np.arange(-overlap, xs[-1] + tile - overlap), w)
    padded = x[:, torch.from_numpy(iy)][:, :, torch.from_numpy(ix)]
    corners = [(y, x0) for y in ys for x0 in xs]
    out = None
    batches = range(0, len(corners), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="tiles", unit="batch")
    for start in batches:
        chunk = corners[start:start + batch_size]
        tiles = torch.stack([padded[:, y:y + tile, x0:x0 + tile] for y, x0 in chunk]).to(device)
        pred = fn(tiles).float().cpu()  # (b, K, tile, tile)
        if out is None:
            out = np.zeros((pred.shape[1], h, w), dtype=np.float32)
        for (y, x0), p in zip(chunk, pred, strict=True):
            hh, ww = min(core, h - y), min(core, w - x0)
            out[:, y:y + hh, x0:x0 + ww] = p[:, overlap:overlap + hh, overlap:overlap + ww].numpy()
    return out


def _mirror(i: np.ndarray, n: int) -> np.ndarray:
    """Indices ``i`` (any integers) folded into ``[0, n)`` by mirroring about the edge pixels."""
    if n == 1:
        return np.zeros_like(i)
    period = 2 * (n - 1)
    j = np.mod(i, period)
    return np.where(j < n, j, period - j)
