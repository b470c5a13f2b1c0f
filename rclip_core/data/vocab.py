"""Class vocabularies: the shipped COCO / COCO-OVD / LVIS category lists and user class lists.

A :class:`Vocabulary` ties together, row by row, what the text encoder sees (``names``), what
a user sees (``display_names``) and the dataset's category ids (``category_ids``). Row ``i`` of
a vocabulary is row ``i`` of its class-embedding matrix and class index ``i`` of a detector
built on it, which is also the row order of the official ``*_cls_emb.pth`` files
(``tools/extract_concept_features.py``; ``detectron2/data/datasets/coco_zeroshot_categories.py``,
``lvis_v1_categories.py``): ascending COCO id for the COCO vocabularies, LVIS id order for LVIS.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from rclip_core.errors import InputError
from rclip_core.fileio import read_text
from rclip_core.models.text import clean_lvis_name

__all__ = [
    "Vocabulary",
    "VOCABULARIES",
    "get_vocabulary",
    "parse_classes",
    "read_classes_file",
    "class_name_key",
    "same_class_names",
]

_ASSETS = Path(__file__).resolve().parents[1] / "assets"

VOCABULARIES: dict[str, str] = {
    "coco": "80 COCO classes, ascending COCO id (split = OVD base/novel/unused)",
    "coco-ovd": "65 COCO open-vocabulary classes: 48 base + 17 novel, ascending COCO id",
    "coco-ovd-base": "48 COCO OVD base classes (transfer training)",
    "coco-ovd-novel": "17 COCO OVD novel ('target') classes",
    "lvis": "1203 LVIS v1 classes in id order (split = frequency r/c/f)",
    "lvis-base": "866 LVIS v1 common + frequent classes (rare removed), id order",
    "coco-nouns": "4764-concept pool parsed from COCO Captions (RegionCLIP)",
    "googlecc-nouns": "6250-concept pool parsed from Conceptual Captions (RegionCLIP)",
}

_CONCEPT_POOLS = {"coco-nouns": "coco_nouns_4764.txt", "googlecc-nouns": "googlecc_nouns_6250.txt"}


def class_name_key(name: str) -> str:
    """A class name compared loosely: LVIS cleanup (``_``, parentheses), lower case, one space."""
    return " ".join(clean_lvis_name(str(name)).lower().split())


def same_class_names(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two class lists are the same classes in the same order (case, ``_`` and
    parentheses ignored, as in LVIS name cleaning)."""
    return len(a) == len(b) and all(class_name_key(x) == class_name_key(y) for x, y in zip(a, b))


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of K classes.

    - ``names``: the names put into the prompt templates (already cleaned), length K;
    - ``display_names``: the names to show (LVIS: ``synonyms[0]``), length K;
    - ``category_ids``: the dataset's category id of each row (COCO ids, LVIS ids, or 1..K
      for user lists), length K;
    - ``split``: optional per-class tag: ``"base"``/``"novel"`` (``"unused"`` for the 15 COCO
      classes outside the OVD split) or LVIS frequency ``"r"``/``"c"``/``"f"``;
    - ``name``: the vocabulary's name (``"coco-ovd"``, a file stem, ``"custom"``).
    """

    name: str
    names: tuple[str, ...]
    display_names: tuple[str, ...]
    category_ids: tuple[int, ...]
    split: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for field in ("names", "display_names", "category_ids", "split"):
            value = getattr(self, field)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, field, tuple(value))
        k = len(self.names)
        lengths = {"display_names": len(self.display_names), "category_ids": len(self.category_ids)}
        if self.split is not None:
            lengths["split"] = len(self.split)
        bad = {f: n for f, n in lengths.items() if n != k}
        if bad:
            raise ValueError(f"vocabulary {self.name!r}: {k} names but {bad}")
        if len(set(self.category_ids)) != k:
            raise ValueError(f"vocabulary {self.name!r}: category ids are not unique")

    def __len__(self) -> int:
        return len(self.names)

    @property
    def index_of_category(self) -> dict[int, int]:
        """Dataset category id -> row index."""
        return {c: i for i, c in enumerate(self.category_ids)}

    def subset(self, *splits: str, name: str | None = None) -> "Vocabulary":
        """The rows whose ``split`` is one of ``splits``, in the same order."""
        if self.split is None:
            raise InputError(f"vocabulary {self.name!r} has no base/novel or frequency split")
        keep = [i for i, s in enumerate(self.split) if s in splits]
        return Vocabulary(
            name=name or f"{self.name}[{','.join(splits)}]",
            names=tuple(self.names[i] for i in keep),
            display_names=tuple(self.display_names[i] for i in keep),
            category_ids=tuple(self.category_ids[i] for i in keep),
            split=tuple(self.split[i] for i in keep),
        )


# --------------------------------------------------------------------------- shipped lists


@lru_cache(maxsize=None)
def _asset_json(filename: str) -> Any:
    with open(_ASSETS / filename, "r", encoding="utf-8") as f:
        return json.load(f)


def _coco(name: str) -> Vocabulary:
    data = _asset_json("coco_ovd_split.json")
    if name == "coco":
        cats = sorted(data["coco_80"], key=lambda c: c["id"])
        splits = [c["ovd_split"] for c in cats]
    else:
        wanted = {"coco-ovd": ("base", "novel"), "coco-ovd-base": ("base",),
                  "coco-ovd-novel": ("novel",)}[name]
        cats = sorted([dict(c, split=s) for s in wanted for c in data[s]], key=lambda c: c["id"])
        splits = [c["split"] for c in cats]
    names = tuple(c["name"] for c in cats)
    return Vocabulary(name=name, names=names, display_names=names,
                      category_ids=tuple(int(c["id"]) for c in cats), split=tuple(splits))


def _lvis(name: str) -> Vocabulary:
    cats = sorted(_asset_json("lvis_v1_categories.json"), key=lambda c: c["id"])
    if name == "lvis-base":
        cats = [c for c in cats if c["frequency"] != "r"]
    return Vocabulary(
        name=name,
        names=tuple(clean_lvis_name(c["name"]) for c in cats),
        display_names=tuple(c["synonyms"][0] for c in cats),
        category_ids=tuple(int(c["id"]) for c in cats),
        split=tuple(c["frequency"] for c in cats),
    )


@lru_cache(maxsize=None)
def _shipped(key: str) -> Vocabulary:
    if key in ("coco", "coco-ovd", "coco-ovd-base", "coco-ovd-novel"):
        return _coco(key)
    if key in ("lvis", "lvis-base"):
        return _lvis(key)
    v = read_classes_file(_ASSETS / "concepts" / _CONCEPT_POOLS[key])
    return Vocabulary(name=key, names=v.names, display_names=v.display_names, category_ids=v.category_ids)


def get_vocabulary(name: str) -> Vocabulary:
    """A shipped vocabulary by name (see :data:`VOCABULARIES`).

    ``coco`` (80), ``coco-ovd`` (65), ``coco-ovd-base`` (48), ``coco-ovd-novel`` (17): COCO
    names as-is, real COCO ids ascending. ``lvis`` (1203), ``lvis-base`` (866): embedding name
    = cleaned ``name``, display name = ``synonyms[0]`` (they differ in words only for id 162,
    ``bull`` / ``horned_cow``), split = frequency. ``coco-nouns`` / ``googlecc-nouns``: the
    released concept pools in file order, ids 1..K.
    Unknown names raise InputError listing the choices.
    """
    key = name.strip().lower() if isinstance(name, str) else None
    if key in VOCABULARIES:
        return _shipped(key)
    raise InputError(f"unknown vocabulary {name!r}; choices: {', '.join(VOCABULARIES)}",
                     hint="or pass your own classes (--classes 'a,b' or a file with one class per line)")


# --------------------------------------------------------------------------- user lists


def _from_names(names: Sequence[tuple[str, str]], name: str) -> Vocabulary:
    """``names``: (class name, where it came from) pairs; checks emptiness and duplicates."""
    if not names:
        raise InputError(f"no class names in {name}")
    seen: dict[str, str] = {}
    out: list[str] = []
    for n, where in names:
        if not n:
            raise InputError(f"empty class name at {where}", hint="remove the stray comma or line")
        # Case and spacing do not reach the text encoder (the tokenizer lower-cases and
        # collapses whitespace), so "Kite" and "kite" would be two identical rows.
        norm = " ".join(n.lower().split())
        if norm in seen:
            raise InputError(f"duplicate class name {n!r} at {where} (first at {seen[norm]})")
        seen[norm] = where
        out.append(n)
    return Vocabulary(name=name, names=tuple(out), display_names=tuple(out),
                      category_ids=tuple(range(1, len(out) + 1)))


def parse_classes(text: str, name: str = "custom") -> Vocabulary:
    """Parse ``--classes "kite,boy"``: comma separated, whitespace stripped, ids 1..K.

    Empty entries (``"kite,,boy"``, a trailing comma) and duplicates (ignoring case and
    spacing) raise a one-line InputError. Names are used verbatim as embedding and display names.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError("no classes given",
                         hint='list them separated by commas, e.g. --classes "kite,person"')
    parts = text.split(",")
    return _from_names([(p.strip(), f"position {i}") for i, p in enumerate(parts, start=1)], name)


def read_classes_file(path: str | os.PathLike) -> Vocabulary:
    """Read a class list: one class per line, ids 1..K in line order.

    Blank lines and lines starting with ``#`` are skipped. Like the official
    ``get_cls_names(from_file=...)``, only the part before the first comma is the class name,
    so the ``noun,count`` concept-pool files (``coco_nouns_4764.txt``) load directly; a class
    name therefore cannot contain a comma. The vocabulary is named after the file stem.
    """
    p = Path(path).expanduser()
    text = read_text(p, "class file")
    entries: list[tuple[str, str]] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        entries.append((s.split(",", 1)[0].strip(), f"{p.name} line {lineno}"))
    if not entries:
        raise InputError(f"class file {p} lists no classes", hint="write one class name per line")
    return _from_names(entries, p.stem)
