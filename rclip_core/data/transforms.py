"""Image reading and the test-time resize, exactly as the official Detectron2 mapper (spec 1.5).

* read with PIL, EXIF orientation applied, converted to RGB (``detection_utils.read_image``);
* ``ResizeShortestEdge``: scale the short side to ``short`` unless the long side would exceed
  ``max_size``; sizes rounded with ``int(x + 0.5)``; PIL BILINEAR on uint8
  (``ResizeTransform.apply_image``);
* boxes in original pixels are scaled by (new_w / w, new_h / h) in float64 and clipped to the
  resized image (``transform_instance_annotations``), then cast to float32.

Example: 1920x1080 -> 1333x750 (W x H).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from rclip_core.errors import InputError

TEST_SHORT_SIDE = 800
MAX_SIZE = 1333
TRAIN_SHORT_SIDES = (640, 672, 704, 736, 768, 800)

# Refuse decompression bombs with a clear message rather than PIL's warning/exception text.
MAX_PIXELS = 178_956_970


def read_image(path: str | os.PathLike) -> Image.Image:
    """Open an image file as an RGB PIL image with EXIF orientation applied.

    Raises InputError (one line) for missing, unreadable, truncated or non-image files.
    """
    p = os.fspath(path)
    if not os.path.exists(p):
        raise InputError(f"image not found: {p}")
    if os.path.isdir(p):
        raise InputError(f"{p} is a directory, expected an image file")
    try:
        with Image.open(p) as im:
            if im.width * im.height > MAX_PIXELS:
                raise InputError(f"image {p} is too large ({im.width}x{im.height} pixels)")
            im.load()
            im = ImageOps.exif_transpose(im)
            return im.convert("RGB")
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"cannot read image {p}: not an image file or an unsupported format") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {p}: corrupt or truncated ({' '.join(str(e).split())})") from None


def resized_shape(h: int, w: int, short: int = TEST_SHORT_SIDE, max_size: int = MAX_SIZE) -> tuple[int, int]:
    """(new_h, new_w) with Detectron2's ``ResizeShortestEdge.get_output_shape`` arithmetic."""
    scale = short * 1.0 / min(h, w)
    if h < w:
        newh, neww = short, scale * w
    else:
        newh, neww = scale * h, short
    if max(newh, neww) > max_size:
        scale = max_size * 1.0 / max(newh, neww)
        newh = newh * scale
        neww = neww * scale
    return int(newh + 0.5), int(neww + 0.5)


@dataclass
class PreparedImage:
    """A resized image ready for the network, and how it relates to the original."""

    tensor: torch.Tensor  # [3, H, W] float32 RGB in 0..255 (resized)
    orig_size: tuple[int, int]  # (h, w) of the original (after EXIF orientation)
    size: tuple[int, int]  # (h, w) resized

    @property
    def scale_xy(self) -> tuple[float, float]:
        """Factors original -> resized: (new_w / w, new_h / h)."""
        return self.size[1] / self.orig_size[1], self.size[0] / self.orig_size[0]


def resize_image(img: Image.Image, short: int = TEST_SHORT_SIDE, max_size: int = MAX_SIZE) -> PreparedImage:
    """PIL RGB image -> :class:`PreparedImage` (PIL BILINEAR on uint8, as Detectron2)."""
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError("image has zero size")
    nh, nw = resized_shape(h, w, short, max_size)
    if (nh, nw) != (h, w):
        resized = img.resize((nw, nh), Image.BILINEAR)
    else:
        resized = img
    arr = np.asarray(resized, dtype=np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()
    return PreparedImage(tensor=t, orig_size=(h, w), size=(nh, nw))


def load_image(path: str | os.PathLike, short: int = TEST_SHORT_SIDE, max_size: int = MAX_SIZE) -> PreparedImage:
    return resize_image(read_image(path), short, max_size)


def boxes_to_resized(boxes: np.ndarray | Sequence[Sequence[float]], prep: PreparedImage) -> torch.Tensor:
    """XYXY boxes in original-image pixels -> float32 boxes in the resized image, clipped to it
    (``apply_box`` in float64, ``clip(min=0)`` then ``minimum(..., [W, H, W, H])``)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    sx = prep.size[1] * 1.0 / prep.orig_size[1]
    sy = prep.size[0] * 1.0 / prep.orig_size[0]
    b[:, 0::2] *= sx
    b[:, 1::2] *= sy
    b = b.clip(min=0)
    H, W = prep.size
    b = np.minimum(b, np.array([W, H, W, H], dtype=np.float64))
    return torch.as_tensor(b, dtype=torch.float32)


def boxes_to_original(boxes: torch.Tensor, prep: PreparedImage) -> torch.Tensor:
    """Boxes in resized pixels -> original pixels (``detector_postprocess``: scale, then clip)."""
    h, w = prep.orig_size
    sx = w / prep.size[1]
    sy = h / prep.size[0]
    out = boxes.clone().float()
    out[:, 0::2] *= sx
    out[:, 1::2] *= sy
    out[:, 0::2] = out[:, 0::2].clamp(min=0, max=w)
    out[:, 1::2] = out[:, 1::2].clamp(min=0, max=h)
    return out
