"""ShapesWorld: a seeded synthetic world of coloured shapes for running RegionCLIP offline.

Every image shows 1-4 (configurable) filled shapes on a textured, noisy background; the class
of an object is ``"<colour> <shape>"`` (default 5 colours x 6 shapes = 30 classes). A world on
disk is a COCO-style detection data set with a base/novel class split and captions that, like
real captions, mention only some of the objects::

    OUT/train/000001.jpg ...          images (file name = 6-digit image id)
    OUT/val/000001.jpg ...
    OUT/instances_train.json          COCO instances (file_name is relative to OUT/<split>/)
    OUT/instances_val.json
    OUT/split.json                    base/novel classes, same form as coco_ovd_split.json
    OUT/captions_train.jsonl          {"image": "train/000001.jpg", "caption": ..., "concepts": ...}
    OUT/captions_val.jsonl
    OUT/world.json                    generator settings + version; written last

Design decisions (see also ``reference/shapesworld-notes.md``):

* **Determinism.** Each image draws from its own generator seeded by ``(seed, split, index,
  stream)``, so files do not depend on the number of workers and image ``i`` of a world with
  ``train=100`` is the same as image ``i`` of one with ``train=5000``. Regenerating with the same
  arguments gives byte-identical files (no timestamps or absolute paths are written).
* **Categories.** ids ``1..K`` in colour-major order: ``id = 1 + c * len(shapes) + s`` for
  colour index ``c`` in ``config.colours`` and shape index ``s`` in ``config.shapes``; with the
  defaults 1 = "red circle", 2 = "red square", ..., 30 = "purple diamond". The supercategory is
  the shape.
* **Boxes.** ``bbox = [x, y, w, h]`` is the full (amodal) extent of the shape's polygon, also
  when a later shape covers part of it; ``area = w * h``.
* **Occlusion.** Shapes are drawn in order; a later shape may cover earlier ones. Placement
  retries up to ``placement_tries`` positions to keep every earlier object at least
  ``1 - max_occlusion`` visible; when no position works the object is drawn anyway and every
  object whose visible fraction of its own pixels fell below ``1 - max_occlusion`` (default:
  more than half hidden) is dropped from the annotations *and* the captions, so labels stay
  truthful. Visible fractions use the pixels the shape covers by at least half.
* **Close-ups.** A fraction ``closeup_frac`` of *training* images show one large, centred
  object; a teacher CLIP trained with them recognises object crops much better (the
  feasibility study: image-level accuracy 66 -> 91 %). Validation images are never close-ups.
* **Captions.** Each caption mentions every class present with probability ``mention_prob``
  (at least one class, with its true count: "two red circles"), in varied templates with size
  words, spatial relations computed from the geometry, and distractor phrases. The shape noun
  is the canonical class noun with probability ``1 - synonym_prob``, else a synonym from
  :data:`SHAPE_SYNONYMS`. Colour words are omitted with probability ``colour_drop_prob``.
  Every record lists what it mentions (``concepts``, ``classes``, ``category_ids``, ``nouns``)
  so a concept extractor can be scored. Relations and background words are truthful.
* **Base/novel split.** Seeded; ``round(K * base_frac)`` base classes (default 2/3: 20 of 30),
  drawn so that every shape and every colour occurs in at least one base class (a novel class
  is a new combination of seen words), whenever that is possible.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw

from rclip_core.errors import InputError

SHAPESWORLD_VERSION = 1
GENERATOR_NAME = "shapesworld"

#: Fill colours (RGB). Backgrounds are low-saturation greys, so these stay distinguishable.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (35, 170, 55),
    "blue": (40, 80, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 45, 190),
    "orange": (240, 135, 30),
    "pink": (240, 125, 185),
    "cyan": (40, 195, 205),
}

#: Shape kinds that can be drawn, with their canonical (singular, plural) class noun.
SHAPE_NOUNS: dict[str, tuple[str, str]] = {
    "circle": ("circle", "circles"),
    "square": ("square", "squares"),
    "triangle": ("triangle", "triangles"),
    "star": ("star", "stars"),
    "cross": ("cross", "crosses"),
    "diamond": ("diamond", "diamonds"),
    "hexagon": ("hexagon", "hexagons"),
    "pentagon": ("pentagon", "pentagons"),
    "heart": ("heart", "hearts"),
    "crescent": ("crescent", "crescents"),
}

#: Synonyms used in captions with probability ``synonym_prob`` instead of the canonical noun,
#: as (singular, plural). They do *not* lemmatise to the class noun, so a noun-phrase concept
#: extractor misses them (recall) or extracts an unrelated concept (precision): "plus sign" ->
#: "sign", "hexagonal tile" -> "tile".
SHAPE_SYNONYMS: dict[str, tuple[tuple[str, str], ...]] = {
    "circle": (("disc", "discs"), ("dot", "dots")),
    "square": (("box", "boxes"), ("block", "blocks")),
    "triangle": (("wedge", "wedges"),),
    "star": (("starburst", "starbursts"),),
    "cross": (("plus sign", "plus signs"),),
    "diamond": (("rhombus", "rhombuses"), ("lozenge", "lozenges")),
    "hexagon": (("hexagonal tile", "hexagonal tiles"),),
    "pentagon": (("pentagonal tile", "pentagonal tiles"),),
    "heart": (("valentine", "valentines"),),
    "crescent": (("moon", "moons"),),
}

DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond")
DEFAULT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")

SPLITS = ("train", "val")
_SPLIT_CODE = {"train": 0, "val": 1}
# independent random streams per image: changing one kind of choice leaves the others alone
_STREAM_SCENE, _STREAM_CAPTIONS, _STREAM_CLOSEUP = 0, 1, 2
_SUPERSAMPLE = 4  # polygon anti-aliasing factor
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
                 9: "nine", 10: "ten"}

# the files of a world, in the order they are committed (world.json last)
WORLD_FILES = ("train", "val", "instances_train.json", "instances_val.json", "split.json",
               "captions_train.jsonl", "captions_val.jsonl", "world.json")
_TMP_PREFIX = ".shapesworld-tmp-"


@dataclass(frozen=True)
class ShapesConfig:
    """Everything that decides what a ShapesWorld looks like (saved in ``world.json``).

    Sizes are fractions of the image side; ``min_size``/``max_size`` bound an object's nominal
    diameter.
    """

    image_size: int = 128
    min_objects: int = 1
    max_objects: int = 4
    shapes: tuple[str, ...] = DEFAULT_SHAPES
    colours: tuple[str, ...] = DEFAULT_COLOURS
    min_size: float = 0.15
    max_size: float = 0.40
    closeup_frac: float = 0.2  # fraction of *train* images with one large centred object
    closeup_min_size: float = 0.55
    closeup_max_size: float = 0.80
    max_occlusion: float = 0.5  # objects hidden more than this are dropped from the labels
    placement_tries: int = 10
    noise_level: float = 0.04  # std of per-pixel Gaussian noise, as a fraction of 255
    texture_strength: float = 1.0  # 0 = plain gradient backgrounds
    colour_jitter: float = 12.0  # std of the per-object RGB offset
    captions_per_image: int = 2
    mention_prob: float = 0.6
    synonym_prob: float = 0.15
    colour_drop_prob: float = 0.1
    size_word_prob: float = 0.3
    relation_prob: float = 0.4
    base_frac: float = 2 / 3
    image_format: str = "jpg"  # "jpg" (quality 92, no chroma subsampling) or "png"

    def __post_init__(self) -> None:
        # tuples, also when built from JSON lists or "a,b" strings, so that configs compare and hash
        for name in ("shapes", "colours"):
            v = getattr(self, name)
            if isinstance(v, str):
                v = [p.strip() for p in v.split(",") if p.strip()]
            object.__setattr__(self, name, tuple(v))

    def validate(self) -> "ShapesConfig":
        """Raise :class:`InputError` (one line) for any unusable setting; return self."""

        def frac(name: str, lo: float = 0.0, hi: float = 1.0) -> None:
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not (lo <= v <= hi):
                raise InputError(f"{name.replace('_', '-')} must be in [{lo:g}, {hi:g}], got {v!r}")

        if not isinstance(self.image_size, int) or not (32 <= self.image_size <= 2048):
            raise InputError(f"image size must be an integer in [32, 2048] pixels, got {self.image_size!r}")
        if not isinstance(self.min_objects, int) or not isinstance(self.max_objects, int) \
                or not (1 <= self.min_objects <= self.max_objects <= 20):
            raise InputError(f"objects per image must satisfy 1 <= min <= max <= 20, "
                             f"got {self.min_objects!r}..{self.max_objects!r}")
        for kind, given, known in (("shape", self.shapes, SHAPE_NOUNS), ("colour", self.colours, COLOURS)):
            if not given:
                raise InputError(f"at least one {kind} is needed")
            bad = [g for g in given if g not in known]
            if bad:
                raise InputError(f"unknown {kind} {bad[0]!r}", f"choose from: {', '.join(known)}")
            if len(set(given)) != len(given):
                raise InputError(f"{kind}s are listed twice: {', '.join(given)}")
        frac("min_size", 0.02, 0.9)
        frac("max_size", 0.02, 0.9)
        frac("closeup_min_size", 0.02, 0.9)
        frac("closeup_max_size", 0.02, 0.9)
        if self.min_size > self.max_size or self.closeup_min_size > self.closeup_max_size:
            raise InputError("object size range is empty (min-size > max-size)")
        for name in ("closeup_frac", "max_occlusion", "noise_level", "mention_prob", "synonym_prob",
                     "colour_drop_prob", "size_word_prob", "relation_prob", "base_frac"):
            frac(name)
        frac("texture_strength", 0.0, 4.0)
        frac("colour_jitter", 0.0, 64.0)
        if not isinstance(self.placement_tries, int) or self.placement_tries < 1:
            raise InputError(f"placement-tries must be >= 1, got {self.placement_tries!r}")
        if not isinstance(self.captions_per_image, int) or not (1 <= self.captions_per_image <= 20):
            raise InputError(f"captions per image must be in [1, 20], got {self.captions_per_image!r}")
        if self.image_format not in ("jpg", "png"):
            raise InputError(f"image format must be jpg or png, got {self.image_format!r}")
        return self

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ShapesConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise InputError(f"unknown ShapesWorld setting {unknown[0]!r}",
                             f"known settings: {', '.join(sorted(names))}")
        return cls(**d)


@dataclass
class ShapeObject:
    """One drawn shape. ``bbox`` is ``(x, y, w, h)`` in pixels: the full polygon extent."""

    shape: str
    colour: str
    category_id: int
    bbox: tuple[float, float, float, float]
    size: float  # nominal diameter / image side
    rotation: float  # degrees
    order: int  # draw order, 0 = bottom
    area_px: int  # pixels covered (coverage >= 1/2) before any occlusion
    visible_px: int  # of those, still on top after all later shapes
    occluded_by: list[int] = field(default_factory=list)  # draw orders of the shapes covering it

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def visible_fraction(self) -> float:
        return self.visible_px / max(self.area_px, 1)

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.bbox
        return x + w / 2, y + h / 2


@dataclass
class Scene:
    """A rendered image. ``image`` is ``[H, W, 3]`` uint8 RGB; ``objects`` are the labelled shapes
    (draw order), ``hidden`` the ones dropped for occlusion (drawn, but not annotated)."""

    image: np.ndarray
    objects: list[ShapeObject]
    hidden: list[ShapeObject]
    background: str  # "plain", "stripes", "blotches" or "stripes+blotches"
    closeup: bool

    def to_pil(self) -> Image.Image:
        return Image.fromarray(self.image, "RGB")


# ----------------------------------------------------------------------------- categories


def shapes_categories(config: ShapesConfig | None = None) -> list[dict]:
    """COCO ``categories`` for a world: ``[{"id", "name", "supercategory"}]`` with ids 1..K in
    colour-major order (id = 1 + colour_index * len(shapes) + shape_index)."""
    cfg = config or ShapesConfig()
    return [{"id": 1 + ci * len(cfg.shapes) + si, "name": f"{c} {s}", "supercategory": s}
            for ci, c in enumerate(cfg.colours) for si, s in enumerate(cfg.shapes)]


def _category_id(cfg: ShapesConfig, shape_idx: int, colour_idx: int) -> int:
    return 1 + colour_idx * len(cfg.shapes) + shape_idx


def shapes_split(config: ShapesConfig | None = None, seed: int = 0) -> dict:
    """The seeded base/novel split, in the form of ``coco_ovd_split.json``:
    ``{"description", "base": [{id, name}], "novel": [...], "all_K": [{id, name, split}]}``.

    ``round(K * base_frac)`` classes are base (at least 1 and, when K >= 2, at most K - 1). The
    draw is repeated until every shape and every colour occurs among the base classes, so novel
    classes are new combinations of words the detector saw; when the base set is too small for
    that, the first draw is kept.
    """
    cfg = config or ShapesConfig()
    cats = shapes_categories(cfg)
    k = len(cats)
    n_base = min(max(int(round(k * cfg.base_frac)), 1), max(k - 1, 1))
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5B117]))
    feasible = n_base >= max(len(cfg.shapes), len(cfg.colours))
    chosen: set[int] | None = None
    for _ in range(10_000):
        perm = rng.permutation(k)[:n_base]
        base_ids = {cats[i]["id"] for i in perm}
        if chosen is None:
            chosen = base_ids
        names = [c["name"].split(" ", 1) for c in cats if c["id"] in base_ids]
        covers = {s for _, s in names} == set(cfg.shapes) and {c for c, _ in names} == set(cfg.colours)
        if not feasible or covers:
            chosen = base_ids
            break
    assert chosen is not None
    base = [{"id": c["id"], "name": c["name"]} for c in cats if c["id"] in chosen]
    novel = [{"id": c["id"], "name": c["name"]} for c in cats if c["id"] not in chosen]
    return {
        "description": (f"ShapesWorld base/novel split (seed {seed}): {len(base)} base + {len(novel)} novel "
                        f"= {k} classes. ids are the ShapesWorld category ids; list order = ascending id "
                        f"= contiguous class index order."),
        "source": f"rclip_core.data.shapes v{SHAPESWORLD_VERSION}",
        "base": base,
        "novel": novel,
        f"all_{k}": [{"id": c["id"], "name": c["name"], "split": "base" if c["id"] in chosen else "novel"}
                     for c in cats],
    }


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


# ----------------------------------------------------------------------------- rendering


def _image_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_CODE[split], int(index), stream]))


def is_closeup(config: ShapesConfig, seed: int, split: str, index: int) -> bool:
    """Whether image ``index`` of ``split`` is a close-up (only train images can be)."""
    if split != "train" or config.closeup_frac <= 0:
        return False
    return bool(_image_rng(seed, split, index, _STREAM_CLOSEUP).random() < config.closeup_frac)


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
    if split not in _SPLIT_CODE:
        raise InputError(f"unknown split {split!r}", "use train or val")
    if closeup is None:
        closeup = is_closeup(cfg, seed, split, index)
    rng = _image_rng(seed, split, index, _STREAM_SCENE)
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
            shape=shape, colour=colour, category_id=_category_id(cfg, si, ci),
            bbox=(round(px0, 2), round(py0, 2), round(px1 - px0, 2), round(py1 - py0, 2)),
            size=round(size_frac, 4), rotation=round(rotation, 2), order=order, area_px=n_px,
            visible_px=n_px))
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


# ----------------------------------------------------------------------------- captions


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _relation(a: ShapeObject, b: ShapeObject, image_size: int, rng: np.random.Generator) -> str | None:
    """A spatial phrase that is true of ``a`` relative to ``b``, or None when none is clear."""
    if b.order in a.occluded_by:
        return str(rng.choice(["behind", "partly hidden by"]))
    if a.order in b.occluded_by:
        return str(rng.choice(["in front of", "partly covering", "overlapping"]))
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = bx - ax, by - ay
    options = []
    if abs(dy) > 1.5 * abs(dx):
        options.append("above" if dy > 0 else "below")
    elif abs(dx) > 1.5 * abs(dy):
        options.append("to the left of" if dx > 0 else "to the right of")
    gap_x = max(a.bbox[0], b.bbox[0]) - min(a.bbox[0] + a.bbox[2], b.bbox[0] + b.bbox[2])
    gap_y = max(a.bbox[1], b.bbox[1]) - min(a.bbox[1] + a.bbox[3], b.bbox[1] + b.bbox[3])
    if max(gap_x, gap_y) < 0.15 * image_size:
        options.append("next to")
    return str(rng.choice(options)) if options else None


_TEMPLATES = (
    "{np}", "a picture of {np}", "an image of {np}", "a photo of {np}", "a drawing of {np}",
    "{np} on a {bg} background", "an image of {np} on a {bg} background", "{np} against a {bg} backdrop",
    "{there} {np} in this picture", "{np} in the scene", "we can see {np}", "a synthetic scene with {np}",
    "a {bg} background with {np}",
)


def make_captions(scene: Scene, config: ShapesConfig, rng: np.random.Generator) -> list[dict]:
    """``config.captions_per_image`` caption records for a scene (``image`` not filled in).

    Each record: ``caption`` (text), ``concepts`` (canonical shape nouns and colour words
    mentioned, in order), ``classes`` / ``category_ids`` (classes of the objects referred to),
    ``nouns`` (the surface nouns used, e.g. "disc" for a circle). Only labelled objects are
    mentioned; each class present is mentioned with probability ``mention_prob`` (at least one)
    and with its exact count.
    """
    cfg = config
    size = cfg.image_size
    groups: dict[int, list[ShapeObject]] = {}
    for o in scene.objects:
        groups.setdefault(o.category_id, []).append(o)
    if not groups:
        return []
    bg_words = ["noisy", "grainy"] + {"plain": ["plain", "smooth"], "stripes": ["striped"],
                                      "blotches": ["blotchy", "mottled"],
                                      "stripes+blotches": ["striped", "mottled"]}[scene.background]
    lo_third = cfg.min_size + (cfg.max_size - cfg.min_size) / 3
    hi_third = cfg.max_size - (cfg.max_size - cfg.min_size) / 3
    records = []
    for _ in range(cfg.captions_per_image):
        ids = list(groups)
        rng.shuffle(ids)
        chosen = [cid for cid in ids if rng.random() < cfg.mention_prob] or [ids[int(rng.integers(len(ids)))]]
        phrases, concepts, nouns, plural_first = [], [], [], False
        for j, cid in enumerate(chosen):
            objs = groups[cid]
            shape, colour, n = objs[0].shape, objs[0].colour, len(objs)
            if rng.random() < cfg.synonym_prob:
                syns = SHAPE_SYNONYMS[shape]
                noun_sg, noun_pl = syns[int(rng.integers(len(syns)))]
            else:
                noun_sg, noun_pl = SHAPE_NOUNS[shape]
            words = []
            if rng.random() < cfg.size_word_prob:
                if scene.closeup or all(o.size >= hi_third for o in objs):
                    words.append(str(rng.choice(["large", "big"])))
                elif all(o.size <= lo_third for o in objs):
                    words.append(str(rng.choice(["small", "tiny"])))
            # the colour may go only when no other class shares the shape, so counts stay true
            shape_unique = sum(g[0].shape == shape for g in groups.values()) == 1
            with_colour = not shape_unique or rng.random() >= cfg.colour_drop_prob
            if with_colour:
                words.append(colour)
            words.append(noun_sg if n == 1 else noun_pl)
            body = " ".join(words)
            if n == 1:
                det = "one" if rng.random() < 0.1 else _article(body)
            else:
                det = "several" if n >= 3 and rng.random() < 0.1 else _NUMBER_WORDS.get(n, str(n))
            phrases.append(f"{det} {body}")
            concepts += [shape] + ([colour] if with_colour else [])
            nouns.append(noun_sg)
            if j == 0:
                plural_first = n > 1
        text = None
        if len(chosen) >= 2 and len(groups[chosen[0]]) == 1 and len(groups[chosen[1]]) == 1 \
                and rng.random() < cfg.relation_prob:
            rel = _relation(groups[chosen[0]][0], groups[chosen[1]][0], size, rng)
            if rel is not None:
                rest = phrases[2:]
                text = f"{phrases[0]} {rel} {phrases[1]}" + ("".join(f", {p}" for p in rest[:-1])
                                                             + (f" and {rest[-1]}" if rest else ""))
        if text is None:
            text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
        caption = template.format(np=text, bg=str(rng.choice(bg_words)),
                                  there="there are" if plural_first else "there is")
        if rng.random() < 0.7:
            caption = caption[0].upper() + caption[1:] + "."
        records.append({
            "caption": caption,
            "concepts": list(dict.fromkeys(concepts)),
            "classes": [groups[cid][0].name for cid in chosen],
            "category_ids": [int(cid) for cid in chosen],
            "nouns": nouns,
        })
    return records


def scene_captions(scene: Scene, config: ShapesConfig | None = None, seed: int = 0, split: str = "train",
                   index: int = 0) -> list[dict]:
    """The captions :func:`generate_shapes_world` writes for image ``index`` of ``split``."""
    cfg = config or ShapesConfig()
    return make_captions(scene, cfg, _image_rng(seed, split, index, _STREAM_CAPTIONS))


# ----------------------------------------------------------------------------- writing a world


def image_file_name(index: int, config: ShapesConfig) -> str:
    """File name of image ``index`` (0-based) inside ``OUT/<split>/``; the image id is index + 1."""
    return f"{index + 1:06d}.{config.image_format}"


def _encode(image: np.ndarray, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    pil = Image.fromarray(image, "RGB")
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=6)
    else:
        # no chroma subsampling: the colour of small shapes is the class signal
        pil.save(buf, format="JPEG", quality=92, subsampling=0)
    return buf.getvalue()


def _render_chunk(args: tuple) -> list[dict]:
    """Worker: render, encode and write images ``indices`` of ``split``; return their records."""
    cfg_dict, seed, split, indices, split_dir = args
    cfg = ShapesConfig.from_dict(cfg_dict)
    out = []
    for index in indices:
        scene = render_scene(cfg, seed, split, index)
        name = image_file_name(index, cfg)
        with open(os.path.join(split_dir, name), "wb") as f:
            f.write(_encode(scene.image, cfg.image_format))
        caps = scene_captions(scene, cfg, seed, split, index)
        out.append({
            "index": index, "file_name": name, "closeup": scene.closeup, "hidden": len(scene.hidden),
            "objects": [(o.category_id, o.bbox, round(o.visible_fraction, 3)) for o in scene.objects],
            "captions": caps,
        })
    return out


def _check_out_dir(out: Path) -> None:
    """Accept a missing or empty directory, a previous ShapesWorld (``world.json`` from this
    generator) or the leftovers of a killed run (only ``.shapesworld-tmp-*`` entries)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory", "choose another OUT directory")
    if not out.exists():
        return
    try:
        entries = [p.name for p in out.iterdir()]
    except OSError as e:
        raise InputError(f"cannot read output directory {out}: {e.strerror or e}") from None
    if not entries or all(e.startswith(_TMP_PREFIX) for e in entries):
        return
    world = out / "world.json"
    if world.is_file():
        try:
            meta = json.loads(world.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and meta.get("generator") == GENERATOR_NAME:
            return
    raise InputError(f"output directory {out} is not empty and is not a ShapesWorld directory",
                     "choose an empty or new OUT directory (an existing ShapesWorld is regenerated in place)")


def _chunks(indices: range, n: int) -> Iterable[range]:
    for i in range(0, len(indices), n):
        yield indices[i:i + n]


def _coco_json(cfg: ShapesConfig, seed: int, split: str, records: list[dict]) -> dict:
    images, anns = [], []
    size = cfg.image_size
    for r in records:
        image_id = r["index"] + 1
        images.append({"id": image_id, "file_name": r["file_name"], "width": size, "height": size,
                       "closeup": r["closeup"]})
        for cid, bbox, vis in r["objects"]:
            x, y, w, h = bbox
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cid, "bbox": [x, y, w, h],
                         "area": round(w * h, 4), "iscrowd": 0, "visible_fraction": vis})
    return {
        "info": {"description": f"ShapesWorld {split} (seed {seed})", "version": str(SHAPESWORLD_VERSION),
                 "contributor": "rclip_core.data.shapes"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": shapes_categories(cfg),
    }


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def generate_shapes_world(out_dir: str | os.PathLike, train: int = 2000, val: int = 500, seed: int = 0,
                          config: ShapesConfig | None = None, workers: int | None = None,
                          progress: Callable[[int], None] | None = None, **options: Any) -> dict:
    """Generate a ShapesWorld in ``out_dir`` (see the module docstring for the layout).

    ``options`` override fields of ``config`` (e.g. ``image_size=256, closeup_frac=0.3``).
    ``workers`` processes render in parallel (default: the usable CPUs, at most 8; forked on
    Linux, spawned elsewhere, where the calling script needs the usual ``if __name__ ==
    "__main__"`` guard); the output does not depend on it. ``progress(n)`` is called with the
    number of images just finished.

    Everything is written to a hidden temporary directory inside ``out_dir`` and moved into
    place at the end, ``world.json`` last, so a killed run never leaves a directory that looks
    complete; on an error the temporary files are removed. An existing ShapesWorld in
    ``out_dir`` is replaced; any other non-empty directory is refused (:class:`InputError`).

    Returns a summary: ``{"out_dir", "images": {split: n}, "objects": {split: n},
    "hidden_objects", "closeups", "captions": {split: n}, "classes", "base", "novel",
    "seconds", "images_per_second", "workers"}``.
    """
    for name, v in (("train", train), ("val", val), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"--{name} must be a non-negative integer, got {v!r}")
    if train + val == 0:
        raise InputError("nothing to generate: --train and --val are both 0")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError(f"--workers must be a positive integer, got {workers!r}")
    cfg = config or ShapesConfig()
    if options:
        cfg = ShapesConfig.from_dict({**asdict(cfg), **options})
    cfg.validate()
    out = Path(out_dir)
    _check_out_dir(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out))
    except OSError as e:
        raise InputError(f"cannot write to output directory {out}: {e.strerror or e}",
                         "choose a writable OUT directory") from None
    t0 = time.perf_counter()
    n_workers = workers or _default_workers()
    try:
        records: dict[str, list[dict]] = {}
        cfg_dict = asdict(cfg)
        total = train + val
        chunk = max(4, min(64, total // (n_workers * 8) or 1))
        tasks = []
        for split, n in (("train", train), ("val", val)):
            (tmp / split).mkdir()
            records[split] = []
            tasks += [(cfg_dict, seed, split, list(r), str(tmp / split)) for r in _chunks(range(n), chunk)]
        if n_workers > 1 and len(tasks) > 1:
            # fork on Linux: workers use only numpy and PIL, and unlike spawn/forkserver it does not
            # re-run the caller's __main__ (an unguarded script would generate recursively)
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(min(n_workers, len(tasks))) as pool:
                results = pool.imap(_render_chunk, tasks)
                for task, res in zip(tasks, results):
                    records[task[2]] += res
                    if progress:
                        progress(len(res))
        else:
            for task in tasks:
                res = _render_chunk(task)
                records[task[2]] += res
                if progress:
                    progress(len(res))

        split_info = shapes_split(cfg, seed)
        for split in SPLITS:
            coco = _coco_json(cfg, seed, split, records[split])
            (tmp / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")) + "\n",
                                                         encoding="utf-8")
            with open(tmp / f"captions_{split}.jsonl", "w", encoding="utf-8") as f:
                for r in records[split]:
                    for cap in r["captions"]:
                        f.write(json.dumps({"image": f"{split}/{r['file_name']}", "image_id": r["index"] + 1,
                                            **cap}) + "\n")
        (tmp / "split.json").write_text(json.dumps(split_info, indent=1) + "\n", encoding="utf-8")
        counts = {
            "images": {s: len(records[s]) for s in SPLITS},
            "objects": {s: sum(len(r["objects"]) for r in records[s]) for s in SPLITS},
            "hidden_objects": sum(r["hidden"] for s in SPLITS for r in records[s]),
            "closeups": sum(r["closeup"] for r in records["train"]),
            "captions": {s: sum(len(r["captions"]) for r in records[s]) for s in SPLITS},
            "classes": len(shapes_categories(cfg)),
            "base": len(split_info["base"]),
            "novel": len(split_info["novel"]),
        }
        world = {"generator": GENERATOR_NAME, "version": SHAPESWORLD_VERSION, "seed": seed, "train": train,
                 "val": val, "config": cfg_dict, "counts": counts,
                 "files": {"images": {s: s for s in SPLITS},
                           "instances": {s: f"instances_{s}.json" for s in SPLITS},
                           "captions": {s: f"captions_{s}.jsonl" for s in SPLITS},
                           "split": "split.json"}}
        (tmp / "world.json").write_text(json.dumps(world, indent=1) + "\n", encoding="utf-8")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    for stale in out.glob(_TMP_PREFIX + "*"):  # leftovers of killed runs
        shutil.rmtree(stale, ignore_errors=True)
    seconds = time.perf_counter() - t0
    return {"out_dir": str(out), **counts, "seconds": round(seconds, 3),
            "images_per_second": round((train + val) / max(seconds, 1e-9), 1), "workers": n_workers}


def _commit(tmp: Path, out: Path) -> None:
    """Move a finished world from ``tmp`` into ``out``. The old ``world.json`` goes first and the
    new one last, so at no moment does ``out`` hold a ``world.json`` beside mismatched files."""
    old_world = out / "world.json"
    if old_world.exists():
        old_world.unlink()
    for name in WORLD_FILES:
        target = out / name
        if name != "world.json" and (target.exists() or target.is_symlink()):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        os.replace(tmp / name, target)
    tmp.rmdir()


def read_shapes_world(path: str | os.PathLike) -> dict:
    """``world.json`` of a complete ShapesWorld directory, with ``"root"`` (absolute path) and
    ``"config"`` as a :class:`ShapesConfig`. Raises :class:`InputError` otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"ShapesWorld directory not found: {root}", "make one with: rclip data shapes DIR")
    world_file = root / "world.json"
    if not world_file.is_file():
        raise InputError(f"{root} is not a complete ShapesWorld directory (no world.json)",
                         "(re)generate it with: rclip data shapes DIR")
    try:
        meta = json.loads(world_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {world_file}: {e}") from None
    if not isinstance(meta, dict) or meta.get("generator") != GENERATOR_NAME:
        raise InputError(f"{world_file} was not written by the ShapesWorld generator")
    if meta.get("version") != SHAPESWORLD_VERSION:
        raise InputError(f"{root} is ShapesWorld version {meta.get('version')}, this rclip reads "
                         f"version {SHAPESWORLD_VERSION}", "regenerate it with: rclip data shapes DIR")
    missing = [n for n in WORLD_FILES if not (root / n).exists()]
    if missing:
        raise InputError(f"{root} is missing {missing[0]}", "regenerate it with: rclip data shapes DIR")
    meta = dict(meta)
    meta["root"] = str(root.resolve())
    meta["config"] = ShapesConfig.from_dict(meta["config"])
    return meta


__all__ = [
    "SHAPESWORLD_VERSION", "COLOURS", "SHAPE_NOUNS", "SHAPE_SYNONYMS", "DEFAULT_SHAPES", "DEFAULT_COLOURS",
    "ShapesConfig", "ShapeObject", "Scene", "shapes_categories", "shapes_split", "render_scene",
    "make_captions", "scene_captions", "is_closeup", "image_file_name", "generate_shapes_world",
    "read_shapes_world",
]
