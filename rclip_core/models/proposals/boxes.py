"""Proposals without a network: random grid-aligned boxes (the official ``CROP_REGION_TYPE
RANDOM``, ``create_rand_boxes``) and sliding-window boxes."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from rclip_core.errors import InputError
from rclip_core.models.proposals.offline import ANCHOR_RATIOS

__all__ = ["random_boxes", "grid_boxes"]


def random_boxes(image_size: tuple[int, int], n: int, generator: torch.Generator | None = None,
                 min_size: float = 0.0, grid_length: int = 8) -> Tensor:
    """Random grid-aligned boxes inside an image (RegionCLIP ``CROP_REGION_TYPE RANDOM``).

    The image is cut into ``grid_length``-pixel cells (a partial last row/column is not used).
    Per axis, independently: the first cell is drawn uniformly among the cells, and the last
    cell uniformly among the cells from the first one to the image edge; the box spans them.
    With ``min_size`` > 0 both draws are restricted so each side spans at least
    ceil(min_size / grid_length) cells. With the defaults this is exactly the distribution of
    the official ``create_rand_boxes``. Boxes are therefore at least ``grid_length`` pixels
    on a side.

    Args:
        image_size: (height, width) in pixels.
        n: number of boxes.
        generator: seeds the draws (``torch.Generator().manual_seed(s)``).

    Returns: [n, 4] float32 XYXY.
    """
    height, width = int(image_size[0]), int(image_size[1])
    if n < 0:
        raise InputError(f"number of random boxes must be >= 0, got {n}")
    if grid_length <= 0:
        raise InputError(f"grid_length must be positive, got {grid_length}")
    cells = max(1, math.ceil(min_size / grid_length))

    def axis(length: int) -> tuple[Tensor, Tensor]:
        count = length // grid_length
        if count < cells:
            raise InputError(f"image of {width}x{height} pixels is too small for random boxes of "
                             f"at least {max(min_size, grid_length):g} pixels")
        first = torch.randint(0, count - cells + 1, (n,), generator=generator)
        lowest_last = first + cells - 1
        span = count - lowest_last  # number of admissible last cells
        last = lowest_last + (torch.rand(n, generator=generator) * span).long().clamp(
            max=span - 1)
        return first * grid_length, (last + 1) * grid_length

    x1, x2 = axis(width)
    y1, y2 = axis(height)
    return torch.stack((x1, y1, x2, y2), dim=1).to(torch.float32)


def grid_boxes(image_size: tuple[int, int], scales: Sequence[float] = (0.25, 0.5, 1.0),
               aspect_ratios: Sequence[float] = ANCHOR_RATIOS, overlap: float = 0.5) -> Tensor:
    """Sliding-window boxes at a few scales and aspect ratios.

    For scale ``f`` and aspect ratio ``a`` (h / w) the window has the area of a square of side
    ``f * min(height, width)``: w = side / sqrt(a), h = side * sqrt(a), each capped at the
    image size. Windows slide with a step of at most ``(1 - overlap)`` times their size and
    are spread evenly so the first touches the left/top edge and the last the right/bottom
    edge. Exact duplicates are dropped (first occurrence kept). Order: scale, ratio, then
    row-major position.

    Args:
        image_size: (height, width) in pixels.

    Returns: [N, 4] float32 XYXY, all inside the image.
    """
    height, width = float(image_size[0]), float(image_size[1])
    if height <= 0 or width <= 0:
        raise InputError(f"image size must be positive, got {int(width)}x{int(height)}")
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}")
    short = min(height, width)
    boxes = []
    for scale in scales:
        if scale <= 0:
            raise InputError(f"grid box scales must be positive, got {scale}")
        side = scale * short
        for ratio in aspect_ratios:
            w = min(side / math.sqrt(ratio), width)
            h = min(side * math.sqrt(ratio), height)
            xs = _window_starts(width, w, overlap)
            ys = _window_starts(height, h, overlap)
            y0, x0 = torch.meshgrid(ys, xs, indexing="ij")
            x0, y0 = x0.reshape(-1), y0.reshape(-1)
            boxes.append(torch.stack((x0, y0, x0 + w, y0 + h), dim=1))
    if not boxes:
        return torch.zeros((0, 4), dtype=torch.float32)
    out = torch.cat(boxes).to(torch.float32)
    out[:, 2].clamp_(max=width)  # float rounding of x0 + w at the far edge
    out[:, 3].clamp_(max=height)
    _, inverse = torch.unique(out, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(out), dtype=torch.long)
    first.scatter_reduce_(0, inverse, torch.arange(len(out)), reduce="amin")
    return out[first.sort().values]


def _window_starts(length: float, window: float, overlap: float) -> Tensor:
    free = length - window
    if free <= 1e-6:
        return torch.zeros(1, dtype=torch.float64)
    count = math.ceil(free / (window * (1.0 - overlap)) - 1e-9) + 1
    return torch.linspace(0.0, free, count, dtype=torch.float64)
