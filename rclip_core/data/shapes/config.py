"""ShapesWorld settings and vocabulary: the generator config, colours and shapes, categories,
the seeded base/novel split, and the per-image random streams (see :mod:`rclip_core.data.shapes`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from PIL import Image

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
SPLIT_CODE = {"train": 0, "val": 1}
# independent random streams per image: changing one kind of choice leaves the others alone
STREAM_SCENE, STREAM_CAPTIONS, STREAM_CLOSEUP = 0, 1, 2


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
    """One drawn shape. ``bbox`` is ``(x, y, w, h)`` in pixels: the full polygon extent;
    ``polygon`` the polygon itself."""

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
    # the drawn polygon, flat [x0, y0, x1, y1, ...] in pixels (2 decimals): the exact, amodal
    # outline of the shape, like ``bbox`` (occluders are not cut out); COCO ``segmentation``
    polygon: tuple[float, ...] = ()

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


def category_id(cfg: ShapesConfig, shape_idx: int, colour_idx: int) -> int:
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


def image_rng(seed: int, split: str, index: int, stream: int) -> np.random.Generator:
    """The random stream ``stream`` of image ``index`` of ``split``: a pure function of its arguments,
    so an image does not depend on the number of workers or on the size of the world."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLIT_CODE[split], int(index), stream]))
