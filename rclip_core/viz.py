"""Drawing detections: boxes with "label score" tags, legible on small and large images."""

from __future__ import annotations

import colorsys
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


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
                    scores: Sequence[float] | None = None, classes: Sequence[int] | None = None) -> Image.Image:
    """Return a copy of ``image`` with XYXY ``boxes`` (original pixels) and their labels drawn.

    Line width and font size scale with the image (legible from 64 px thumbnails to 4k photos);
    tags are kept inside the image.
    """
    img = image.convert("RGB").copy()
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
