"""Drawing detections and pseudo labels: boxes with "label score" tags, legible at any size."""

from __future__ import annotations

import colorsys
import os
from typing import TYPE_CHECKING, Sequence

from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:
    from rclip_core.data.shards import PseudoLabelShards


def class_color(index: int) -> tuple[int, int, int]:
    """A stable, well-separated colour per class index (golden-ratio hues)."""
    h = (index * 0.618033988749895) % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1: scalable bundled font
    except TypeError:  # pragma: no cover - older Pillow
        return ImageFont.load_default()


def draw_detections(image: Image.Image, boxes: Sequence[Sequence[float]], labels: Sequence[str],
                    scores: Sequence[float] | None = None, classes: Sequence[int] | None = None,
                    masks=None) -> Image.Image:
    """Return a copy of ``image`` with XYXY ``boxes`` (original pixels) and their labels drawn.

    ``masks``: optional binary masks [M, H, W] of the image's size, one per box, filled
    translucently in the box's colour under the boxes (a detector with a mask head).
    Line width and font size scale with the image (legible from 64 px thumbnails to 4k photos);
    tags are kept inside the image.
    """
    img = image.convert("RGB").copy()
    if masks is not None and len(masks):
        import numpy as np

        px = np.asarray(img, dtype=np.float32)
        for i, m in enumerate(masks):
            color = np.asarray(class_color(int(classes[i]) if classes is not None else i), dtype=np.float32)
            on = np.asarray(m, dtype=bool)
            px[on] = 0.55 * px[on] + 0.45 * color
        img = Image.fromarray(px.round().astype(np.uint8), "RGB")
    W, H = img.size
    short = min(W, H)
    lw = max(1, round(short / 300))
    fsize = max(9, round(short / 45))
    font = _font(fsize)
    draw = ImageDraw.Draw(img)
    for i, box in enumerate(boxes):
        x1, y1, x2, y2 = (float(v) for v in box)
        cls = int(classes[i]) if classes is not None else i
        color = class_color(cls)
        draw.rectangle([x1, y1, x2, y2], outline=color, width=lw)
        text = labels[i] if scores is None else f"{labels[i]} {100 * float(scores[i]):.0f}%"
        l, t, r, b = draw.textbbox((0, 0), text, font=font)
        tw, th = r - l, b - t
        pad = max(1, fsize // 6)
        tx = min(max(0.0, x1), max(0.0, W - tw - 2 * pad))
        ty = y1 - th - 2 * pad
        if ty < 0:
            ty = min(y1 + lw, H - th - 2 * pad)
        draw.rectangle([tx, ty, tx + tw + 2 * pad, ty + th + 2 * pad], fill=color)
        lum = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        draw.text((tx + pad - l, ty + pad - t), text, fill=(0, 0, 0) if lum > 140 else (255, 255, 255), font=font)
    return img


def render_image_labels(shards: PseudoLabelShards, key: str, max_boxes: int = 8, image_path: str | None = None,
                        min_side: int = 384):
    """The image ``key`` with its labels drawn: for each concept among its kept regions, the
    most confident region (so that one frequent concept does not hide the others), at most
    ``max_boxes``, best first, tagged "concept probability". Images smaller than ``min_side``
    are enlarged so the tags stay legible. Returns a PIL image; raises InputError when the image
    file (under the index's data root, or ``image_path``) cannot be read."""
    import torch

    from rclip_core.data.images import read_image

    labels = shards.lookup(key)
    if image_path is None:
        k = shards.resolve(key) or os.fspath(key)
        image_path = k if os.path.isabs(k) else os.path.join(shards.data_root or "", k)
    img = read_image(image_path)
    keep = labels["keep"]
    boxes, target, prob = labels["boxes"][keep], labels["target"][keep], labels["max_prob"][keep]
    best: dict[int, int] = {}
    for i in prob.argsort(descending=True).tolist():
        best.setdefault(int(target[i]), i)
    order = torch.tensor(list(best.values())[:max_boxes], dtype=torch.long)
    scale = max(1.0, min_side / max(1, min(img.size)))
    if scale > 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    return draw_detections(img, (boxes[order] * scale).tolist(), [shards.concepts[c] for c in target[order].tolist()],
                           prob[order].tolist(), target[order].tolist())
