"""Image reading and the test-time resize, exactly as the official Detectron2 mapper.

The one image decoder of the project: inference, evaluation, pseudo-labelling and every
training stream read images with :func:`read_image`.

* read with PIL, EXIF orientation applied, converted to RGB
  (``detectron2/data/detection_utils.py: read_image`` / ``_apply_exif_orientation``); an EXIF
  block that PIL cannot parse or re-write counts as "no orientation", as detectron2 does (the
  image is kept, its pixels are what the file holds);
* ``ResizeShortestEdge``: scale the short side to ``short`` unless the long side would exceed
  ``max_size``; sizes rounded with ``int(x + 0.5)``; PIL BILINEAR on uint8
  (``detectron2/data/transforms/augmentation_impl.py: ResizeShortestEdge``,
  ``transform.py: ResizeTransform.apply_image``);
* boxes in original pixels are scaled by (new_w / w, new_h / h) in float64 and clipped to the
  resized image (``detection_utils.py: transform_instance_annotations``), then cast to float32.

Example: 1920x1080 -> 1333x750 (W x H).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from rclip_core.errors import InputError

TEST_SHORT_SIDE = 800
MAX_SIZE = 1333
TRAIN_SHORT_SIDES = (640, 672, 704, 736, 768, 800)

# Refuse decompression bombs with a clear message rather than PIL's warning/exception text.
MAX_PIXELS = 178_956_970

_EXIF_ORIENTATION = 0x0112
# detectron2/data/detection_utils.py: _apply_exif_orientation (PIL's ImageOps.exif_transpose table)
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Rotate/flip ``im`` as its EXIF orientation tag says; any other image is returned as is.

    The pixels are those of ``ImageOps.exif_transpose``, but nothing else of the EXIF block is
    parsed or re-written, so a broken block (a tag PIL cannot read or serialise) never loses
    the image: an unreadable orientation is no orientation
    (``detectron2/data/detection_utils.py: _apply_exif_orientation``).
    """
    try:
        method = _ORIENTATION_TRANSPOSE.get(im.getexif().get(_EXIF_ORIENTATION))
    except Exception:  # noqa: BLE001 - any broken EXIF block means "no orientation"
        return im
    return im.transpose(method) if method is not None else im


def read_image(source: str | os.PathLike | bytes, name: str | None = None) -> Image.Image:
    """Decode an image file (path) or encoded bytes to an RGB PIL image, EXIF orientation applied.

    ``name`` names ``bytes`` input in messages (default ``<bytes>``). Raises InputError (one
    line) for missing, unreadable, truncated, oversized or non-image input.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        fp: Any = io.BytesIO(source)
        p = name or "<bytes>"
    else:
        p = os.fspath(source)
        if not os.path.exists(p):
            raise InputError(f"image not found: {p}")
        if os.path.isdir(p):
            raise InputError(f"{p} is a directory, expected an image file")
        fp = p
    try:
        with Image.open(fp) as im:
            if im.width * im.height > MAX_PIXELS:
                raise InputError(f"image {p} is too large ({im.width}x{im.height} pixels)")
            im.load()  # decode now, so truncated files fail here and not in a transform
            return apply_exif_orientation(im).convert("RGB")
    except InputError:
        raise
    except FileNotFoundError:  # removed between the check and the read
        raise InputError(f"image not found: {p}") from None
    except UnidentifiedImageError:
        raise InputError(f"cannot read image {p}: not an image file or an unsupported format") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read image {p}: corrupt or truncated ({' '.join(str(e).split())})") from None


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) of an image file as :func:`read_image` returns it (EXIF orientation
    applied), read from its header without decoding the pixels; None when the file cannot be
    opened as an image (the decoder then says why)."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            try:
                orientation = im.getexif().get(_EXIF_ORIENTATION)
            except Exception:  # noqa: BLE001 - a broken EXIF block is no orientation (as read_image)
                orientation = None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def xywh_to_xyxy(boxes: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """COCO ``[x, y, w, h]`` boxes -> ``[x0, y0, x1, y1]``: ``[N, 4]`` float64 (``[0, 4]`` for none)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


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


def resize_array(img: Image.Image, short: int = TEST_SHORT_SIDE, max_size: int = MAX_SIZE
                 ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """PIL RGB image -> (resized uint8 [H, W, 3], original (h, w), resized (h, w)) (PIL BILINEAR
    on uint8, as Detectron2). Needs no torch: the ONNX runtime helper
    (:class:`rclip_core.export.OnnxDetector`) resizes with it too."""
    w, h = img.size
    if w < 1 or h < 1:
        raise InputError("image has zero size")
    nh, nw = resized_shape(h, w, short, max_size)
    if (nh, nw) != (h, w):
        resized = img.resize((nw, nh), Image.BILINEAR)
    else:
        resized = img
    return np.asarray(resized, dtype=np.uint8), (h, w), (nh, nw)


def resize_image(img: Image.Image, short: int = TEST_SHORT_SIDE, max_size: int = MAX_SIZE) -> PreparedImage:
    """PIL RGB image -> :class:`PreparedImage` (:func:`resize_array`, as float32 [3, H, W])."""
    import torch

    arr, orig, size = resize_array(img, short, max_size)
    t = torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()
    return PreparedImage(tensor=t, orig_size=orig, size=size)


def load_image(path: str | os.PathLike, short: int = TEST_SHORT_SIDE, max_size: int = MAX_SIZE) -> PreparedImage:
    """:func:`read_image` then :func:`resize_image` (the test-time input of the network)."""
    return resize_image(read_image(path), short, max_size)


def boxes_to_resized(boxes: np.ndarray | Sequence[Sequence[float]], prep: PreparedImage) -> torch.Tensor:
    """XYXY boxes in original-image pixels -> float32 boxes in the resized image, clipped to it
    (``apply_box`` in float64, ``clip(min=0)`` then ``minimum(..., [W, H, W, H])``)."""
    import torch

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
