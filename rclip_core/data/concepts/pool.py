"""Concept pool files: the official ``noun,count`` format, and the one reader of every pool source.

A concept pool is an ordered list of concept names; row ``i`` of its embedding matrix is concept
``i``. The released pools (``coco_nouns_4764.txt``, ``googlecc_nouns_6250.txt``) are
``noun,count`` lines sorted by count, the last one without a newline; only the part before the
first comma is the concept (``detectron2/data/datasets/clip_prompt_utils.py: get_cls_names``).

:func:`load_concept_pool` is what pseudo-labelling (``rclip pseudo-label --concepts``) and
pretraining (``concepts.pool``) read: a built-in name, a pool text file or the categories of a
COCO instances JSON.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from rclip_core.data.vocab import VOCABULARIES, get_vocabulary
from rclip_core.errors import InputError
from rclip_core.fileio import atomic_write_text, read_json, read_text

__all__ = ["write_concept_pool", "read_concept_pool", "load_concept_pool"]


def write_concept_pool(path: str | os.PathLike, concepts: Sequence[tuple[str, int]]) -> Path:
    """Write ``noun,count`` lines in the official format (no newline after the last line),
    atomically. Concept names must not contain commas or line breaks."""
    lines = []
    for name, count in concepts:
        if not name or "," in name or "\n" in name or "\r" in name:
            raise InputError(f"concept name {name!r} cannot be written to a pool file "
                             "(empty, comma or newline)")
        lines.append(f"{name},{int(count)}")
    return atomic_write_text(path, "\n".join(lines))


def read_concept_pool(path: str | os.PathLike, with_counts: bool = False
                      ) -> list[str] | list[tuple[str, int | None]]:
    """Read a concept pool text file: ``noun,count`` lines (official format) or one name per line.

    As in the official ``get_cls_names``, only the part before the first comma is the name; a
    count after it must be an integer. Returns the names in file order, or ``(name, count)``
    pairs with ``with_counts`` (count is ``None`` on lines without one). Blank lines are ignored.
    A name that appears twice (case and spacing ignored: the tokenizer sees one text) is an
    error, as are empty names and an empty file; every error is one line naming the file.
    """
    p = Path(path).expanduser()
    text = read_text(p, "concept pool")
    out: list[tuple[str, int | None]] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        name, sep, rest = line.partition(",")
        name = name.strip()
        if not name:
            raise InputError(f"concept pool {p} line {lineno}: empty concept name")
        count: int | None = None
        if sep:
            field = rest.strip()
            try:
                count = int(field)
            except ValueError:
                raise InputError(f"concept pool {p} line {lineno}: count {field!r} "
                                 "is not an integer") from None
        norm = " ".join(name.lower().split())
        if norm in first_line:
            raise InputError(f"concept pool {p} line {lineno}: duplicate concept {name!r} "
                             f"(first at line {first_line[norm]})")
        first_line[norm] = lineno
        out.append((name, count))
    if not out:
        raise InputError(f"concept pool {p} is empty")
    return out if with_counts else [n for n, _ in out]


def _resolve(value: str, root: str | os.PathLike | None) -> str:
    """``value`` as a path: relative paths start at ``root`` when given (a recipe's ``data.root``)."""
    if root is None or os.path.isabs(value) or value.startswith("~"):
        return os.path.expanduser(value)
    return str(Path(os.path.expanduser(os.fspath(root))) / value)


def _coco_categories(path: str) -> list[str]:
    data = read_json(path, what="concept pool (COCO instances JSON)")
    cats = data.get("categories") if isinstance(data, dict) else None
    if not isinstance(cats, list) or not cats:
        raise InputError(f"concept pool {path} has no COCO 'categories'",
                         hint="give a COCO instances JSON or a text file with one concept per line")
    if not all(isinstance(c, dict) and "id" in c and "name" in c for c in cats):
        raise InputError(f"concept pool {path}: every category needs 'id' and 'name'")
    return [str(c["name"]) for c in sorted(cats, key=lambda c: c["id"])]


def load_concept_pool(value: str | os.PathLike, root: str | os.PathLike | None = None) -> list[str]:
    """The concept names of a pool, in row order, from

    - a built-in name (:data:`rclip_core.data.vocab.VOCABULARIES`: ``coco-nouns``,
      ``googlecc-nouns``, ``coco``, ``lvis``, ...) when no file of that name exists;
    - a COCO instances JSON (``.json``): its category names in ascending id;
    - a text file: :func:`read_concept_pool` (``noun,count`` lines or one concept per line).

    ``root``: the folder relative paths start at (default: the working directory). Every
    problem is a one-line InputError.
    """
    text = os.fspath(value)
    if not text.strip():
        raise InputError("no concept pool given",
                         hint="a built-in name (coco-nouns), a pool text file or a COCO instances JSON")
    path = _resolve(text, root)
    if text.strip().lower() in VOCABULARIES and not os.path.exists(path):
        return list(get_vocabulary(text).names)
    if path.lower().endswith(".json"):
        return _coco_categories(path)
    if not os.path.exists(path):
        raise InputError(f"concept pool not found: {path}",
                         hint=f"a file, or one of the built-in names: {', '.join(VOCABULARIES)}")
    return read_concept_pool(path)
