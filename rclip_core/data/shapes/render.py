"""ShapesWorld rendering: shape polygons, anti-aliased rasterising, textured backgrounds and
:func:`render_scene` (one image with its objects, occlusion bookkeeping included)."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from rclip_core.data.shapes.config import (COLOURS, SPLIT_CODE, STREAM_CLOSEUP, STREAM_SCENE, Scene, ShapeObject,
                                           ShapesConfig, category_id, image_rng)
from rclip_core.errors import InputError

_SUPERSAMPLE = 4  # polygon anti-aliasing factor


# ----------------------------------------------------------------------------- geometry


def _regular_polygon(n: int, radius: float, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + np.arange(n) * (2 * math.pi / n)
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _star(points: int = 5, outer: float = 1.1, inner: float = 0.45) -> np.ndarray:
    a = -math.pi / 2 + np.arange(2 * points) * (math.pi / points)
    r = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def _cross(arm: float = 1.0, half_width: float = 0.33) -> np.ndarray:
    a, w = arm, half_width
    return np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w], [w, a], [-w, a], [-w, w],
                     [-a, w], [-a, -w], [-w, -w]], dtype=np.float64)


def _heart(n: int = 48) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    return np.stack([x / 16, (y - 2.5) / 14.5], axis=1)


def _crescent(n: int = 24, offset: float = 0.45, inner: float = 0.85) -> np.ndarray:
    # outer unit circle minus a circle of radius `inner` centred at (offset, 0)
    x_int = (1 + offset ** 2 - inner ** 2) / (2 * offset)
    y_int = math.sqrt(1 - x_int ** 2)
    th0 = math.atan2(y_int, x_int)
    ph0 = math.atan2(y_int, x_int - offset)
    th = np.linspace(th0, 2 * math.pi - th0, n)
    ph = np.linspace(2 * math.pi - ph0, ph0, n)
    outer_arc = np.stack([np.cos(th), np.sin(th)], axis=1)
    inner_arc = np.stack([offset + inner * np.cos(ph), inner * np.sin(ph)], axis=1)
    return np.concatenate([outer_arc, inner_arc]) + np.array([0.2, 0.0])


# Unit polygons (about [-1, 1]^2, y down) with comparable visual size, and the rotation range
# in degrees (the symmetry period; the heart only tilts so that it stays a heart).
_SHAPE_POLYGONS: dict[str, np.ndarray] = {
    "circle": _regular_polygon(64, 1.0),
    "square": np.array([[-0.85, -0.85], [0.85, -0.85], [0.85, 0.85], [-0.85, 0.85]]),
    "triangle": _regular_polygon(3, 1.1) + np.array([0.0, 0.15]),
    "star": _star(),
    "cross": _cross(),
    "diamond": np.array([[0.0, -1.05], [0.6, 0.0], [0.0, 1.05], [-0.6, 0.0]]),
    "hexagon": _regular_polygon(6, 1.0),
    "pentagon": _regular_polygon(5, 1.0),
    "heart": _heart(),
    "crescent": _crescent(),
}
_ROTATION_RANGE: dict[str, tuple[float, float]] = {
    "circle": (0, 0), "square": (0, 90), "triangle": (0, 120), "star": (0, 72), "cross": (0, 90),
    "diamond": (0, 180), "hexagon": (0, 60), "pentagon": (0, 72), "heart": (-35, 35), "crescent": (0, 360),
}


def _rotated(shape: str, radius_px: float, degrees: float) -> np.ndarray:
    """Polygon of ``shape`` scaled to ``radius_px`` and rotated, centred at the origin. [N, 2]."""
    t = math.radians(degrees)
    rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])
    return (_SHAPE_POLYGONS[shape] @ rot) * radius_px


def _polygon_alpha(poly: np.ndarray) -> tuple[int, int, np.ndarray]:
    """Anti-aliased coverage of a polygon (image pixel coordinates, pixel i spans [i, i+1)).

    Returns ``(x0, y0, alpha)`` with ``alpha`` ``[h, w]`` float32 in [0, 1] for the pixels from
    ``(x0, y0)``; only the polygon's bounding box is rasterised, at ``_SUPERSAMPLE`` x.
    """
    x0, y0 = int(math.floor(poly[:, 0].min())), int(math.floor(poly[:, 1].min()))
    x1, y1 = int(math.ceil(poly[:, 0].max())), int(math.ceil(poly[:, 1].max()))
    w, h = max(x1 - x0, 1), max(y1 - y0, 1)
    s = _SUPERSAMPLE
    canvas = Image.new("L", (w * s, h * s), 0)
    pts = ((poly - np.array([x0, y0])) * s).ravel().tolist()
    ImageDraw.Draw(canvas).polygon(pts, fill=255)
    alpha = np.asarray(canvas.reduce(s), dtype=np.float32) * (1.0 / 255.0)
    return x0, y0, alpha


def _flat_polygon(poly: np.ndarray, size: int) -> tuple[float, ...]:
    """The drawn polygon as COCO writes it: flat ``(x0, y0, x1, y1, ...)``, inside the image,
    rounded as the boxes are. Pure arithmetic on the polygon already drawn: no random draw."""
    return tuple(round(min(max(float(v), 0.0), float(size)), 2) for v in poly.ravel())


# ----------------------------------------------------------------------------- rendering


def is_closeup(config: ShapesConfig, seed: int, split: str, index: int) -> bool:
    """Whether image ``index`` of ``split`` is a close-up (only train images can be)."""
    if split != "train" or config.closeup_frac <= 0:
        return False
    return bool(image_rng(seed, split, index, STREAM_CLOSEUP).random() < config.closeup_frac)


def _background(rng: np.random.Generator, size: int, cfg: ShapesConfig) -> tuple[np.ndarray, str]:
    """A low-saturation gradient with optional stripes / blotches. ``[3, S, S]`` float32 (channels
    first: per-channel arithmetic on whole planes is several times faster than on RGB triples)."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5

    def plane(angle: float) -> np.ndarray:  # [S, S], in [-0.71, 0.71]
        return coords[None, :] * math.cos(angle) + coords[:, None] * math.sin(angle)

    def grey() -> np.ndarray:
        return np.clip(rng.uniform(45, 210) + rng.uniform(-22, 22, 3), 0, 255).astype(np.float32)

    c0, c1 = grey(), grey()
    t = plane(rng.uniform(0, 2 * math.pi)) * 0.7071 + 0.5
    img = c0[:, None, None] + (c1 - c0)[:, None, None] * t[None]
    strength = cfg.texture_strength
    kind = str(rng.choice(["plain", "stripes", "blotches", "stripes+blotches"], p=[0.15, 0.3, 0.35, 0.2]))
    if strength <= 0:
        kind = "plain"
    if "stripes" in kind:
        freq = rng.uniform(2, 12)  # cycles per image
        wave = np.sin(2 * math.pi * freq * plane(rng.uniform(0, math.pi)) + rng.uniform(0, 2 * math.pi))
        if rng.random() < 0.3:  # hard-edged stripes: edges that are not objects
            wave = np.sign(wave)
        tint = 1.0 + rng.uniform(-0.15, 0.15, 3).astype(np.float32)
        amp = np.float32(rng.uniform(6, 28) * strength) * tint  # [3]
        img += amp[:, None, None] * wave[None].astype(np.float32)
    if "blotches" in kind:
        g = int(rng.integers(3, 9))
        amp = rng.uniform(10, 30) * strength
        low = rng.normal(0, amp, (g, g, 1)) + rng.normal(0, amp * 0.3, (g, g, 3))  # mostly luminance
        low8 = np.clip(low + 128, 0, 255).astype(np.uint8)
        up = np.asarray(Image.fromarray(low8, "RGB").resize((size, size), Image.BICUBIC), dtype=np.float32)
        img += up.transpose(2, 0, 1) - np.float32(128.0)
    return img, kind


def render_scene(config: ShapesConfig | None = None, seed: int = 0, split: str = "train", index: int = 0,
                 closeup: bool | None = None) -> Scene:
    """Render image ``index`` of ``split`` in memory, exactly as :func:`generate_shapes_world`
    writes it (before image encoding). ``closeup=None`` follows the world's rule
    (:func:`is_closeup`); True/False forces it."""
    cfg = (config or ShapesConfig()).validate()
    if split not in SPLIT_CODE:
        raise InputError(f"unknown split {split!r}", "use train or val")
    if closeup is None:
        closeup = is_closeup(cfg, seed, split, index)
    rng = image_rng(seed, split, index, STREAM_SCENE)
    size = cfg.image_size
    img, bg_kind = _background(rng, size, cfg)
    owner = np.full((size, size), -1, dtype=np.int16)  # topmost object per pixel
    objects: list[ShapeObject] = []
    n_obj = 1 if closeup else int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    min_visible = 1.0 - cfg.max_occlusion
    for order in range(n_obj):
        si, ci = int(rng.integers(len(cfg.shapes))), int(rng.integers(len(cfg.colours)))
        shape, colour = cfg.shapes[si], cfg.colours[ci]
        lo_rot, hi_rot = _ROTATION_RANGE[shape]
        rotation = float(rng.uniform(lo_rot, hi_rot)) if hi_rot > lo_rot else 0.0
        if closeup:
            size_frac = float(rng.uniform(cfg.closeup_min_size, cfg.closeup_max_size))
        else:
            size_frac = float(rng.uniform(cfg.min_size, cfg.max_size))
        unit = _rotated(shape, size_frac * size / 2, rotation)
        mins, maxs = unit.min(axis=0), unit.max(axis=0)
        # keep the whole polygon inside the image, shrinking the shape if it cannot fit
        overflow = float(np.max(maxs - mins)) / (size - 1)
        if overflow > 1:
            unit, mins, maxs = unit / overflow, mins / overflow, maxs / overflow
            size_frac /= overflow
        lo, hi = -mins, size - maxs
        for _ in range(1 if closeup else cfg.placement_tries):
            if closeup:
                centre = np.clip(size / 2 - (mins + maxs) / 2 + rng.normal(0, 0.04 * size, 2), lo, hi)
            else:
                centre = rng.uniform(lo, hi)
            poly = unit + centre
            x0, y0, alpha = _polygon_alpha(poly)
            h, w = alpha.shape
            solid = alpha >= 0.5
            below = owner[y0:y0 + h, x0:x0 + w][solid]
            hidden_now = np.bincount(below[below >= 0], minlength=order)[:order]  # pixels each would lose
            ok = all(objects[i].visible_px - int(hidden_now[i]) >= min_visible * objects[i].area_px
                     for i in range(order) if hidden_now[i] and objects[i].visible_fraction >= min_visible)
            if ok:
                break
        for i in np.nonzero(hidden_now)[0]:
            objects[i].visible_px -= int(hidden_now[i])
            objects[i].occluded_by.append(order)
        owner[y0:y0 + h, x0:x0 + w][solid] = order
        # flat colour with a per-object offset and a gentle linear shading
        fill = np.asarray(COLOURS[colour], dtype=np.float32)
        fill += rng.normal(0, cfg.colour_jitter, 3).astype(np.float32)
        ys = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
        xs = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
        ang = rng.uniform(0, 2 * math.pi)
        shade = 1.0 + rng.uniform(0, 0.15) * (xs * math.cos(ang) + ys * math.sin(ang))
        region = img[:, y0:y0 + h, x0:x0 + w]
        region *= 1.0 - alpha
        region += (alpha * shade)[None] * fill[:, None, None]
        px0, py0 = max(float(poly[:, 0].min()), 0.0), max(float(poly[:, 1].min()), 0.0)
        px1, py1 = min(float(poly[:, 0].max()), float(size)), min(float(poly[:, 1].max()), float(size))
        n_px = int(solid.sum())
        objects.append(ShapeObject(
            shape=shape, colour=colour, category_id=category_id(cfg, si, ci),
            bbox=(round(px0, 2), round(py0, 2), round(px1 - px0, 2), round(py1 - py0, 2)),
            size=round(size_frac, 4), rotation=round(rotation, 2), order=order, area_px=n_px,
            visible_px=n_px, polygon=_flat_polygon(poly, size)))
    if cfg.noise_level > 0:
        # triangular noise (sum of two uniform bytes, std 104.5 before scaling): ~10x cheaper than
        # Gaussian draws, and the exact distribution does not matter
        u = rng.integers(0, 256, (2,) + img.shape, dtype=np.uint8)
        noise = u[0].astype(np.float32) + u[1] - np.float32(255.0)
        img += noise * np.float32(cfg.noise_level * 255 / 104.5)
    image = np.ascontiguousarray(np.clip(img + 0.5, 0, 255).astype(np.uint8).transpose(1, 2, 0))
    kept = [o for o in objects if o.visible_fraction >= min_visible]
    hidden = [o for o in objects if o.visible_fraction < min_visible]
    return Scene(image=image, objects=kept, hidden=hidden, background=bg_kind, closeup=bool(closeup))
