"""Exemplar prompts as data: ``(image, box, name)`` rows from a CSV / JSON file or from the
``rclip detect --exemplar "ref.jpg:x1,y1,x2,y2=name"`` spec, checked before any model work.

File formats (boxes XYXY in the original image's pixels; a relative image path is relative to
the exemplars file's own directory, as COCO ``file_name`` entries are to their image root):

* CSV: rows ``image,x1,y1,x2,y2,name``; an optional first row that is exactly that header.
  Commas inside the name need CSV quoting (``"a, b"``).
* JSON: a list of ``{"image": ..., "box": [x1, y1, x2, y2], "name": ...}`` objects (or
  ``{"image", "x1", "y1", "x2", "y2", "name"}``), or of ``[image, x1, y1, x2, y2, name]`` lists.

:func:`check_exemplar_images` opens every image once and refuses a box that is degenerate or
reaches outside its image: an exemplar is the crop the user meant, so it is never clipped
(``rclip detect --boxes`` clips boxes partly outside; for a prompt that would silently change it).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from rclip_core.errors import InputError

HEADER = ("image", "x1", "y1", "x2", "y2", "name")


@dataclass(frozen=True)
class Exemplar:
    """One example box: ``image`` (a path), ``box`` XYXY in original pixels, class ``name``."""

    image: str
    box: tuple[float, float, float, float]
    name: str


def _make(image: Any, coords: Sequence[Any], name: Any, where: str) -> Exemplar:
    if not isinstance(image, str) or not image.strip():
        raise InputError(f"{where}: the image path is missing", "rows are image,x1,y1,x2,y2,name")
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"{where}: the class name is missing", "rows are image,x1,y1,x2,y2,name")
    try:
        box = tuple(float(c) for c in coords)
    except (TypeError, ValueError):
        raise InputError(f"{where}: box {list(coords)} is not four numbers", "rows are image,x1,y1,x2,y2,name") from None
    if len(box) != 4 or not all(math.isfinite(c) for c in box):
        raise InputError(f"{where}: box {list(coords)} is not four finite numbers", "rows are image,x1,y1,x2,y2,name")
    if box[2] <= box[0] or box[3] <= box[1]:
        raise InputError(f"{where}: box {list(box)} is degenerate (needs x2 > x1 and y2 > y1)",
                         "boxes are XYXY in the original image's pixels")
    return Exemplar(image.strip(), box, " ".join(name.split()))  # type: ignore[arg-type]


def parse_exemplar_spec(spec: str) -> Exemplar:
    """``"ref.jpg:x1,y1,x2,y2=name"`` (``rclip detect --exemplar``) -> :class:`Exemplar`.

    The name is what follows the last ``=``, the box what follows the last ``:`` before it, so
    image paths may hold ``:`` (``C:/ref.jpg``) and ``=``."""
    where = f"--exemplar {spec!r}"
    head, eq, name = spec.rpartition("=")
    image, colon, box = head.rpartition(":")
    if not eq or not colon or not image:
        raise InputError(f"{where} is not IMAGE:x1,y1,x2,y2=NAME", 'e.g. --exemplar "ref.jpg:10,20,110,90=red star"')
    parts = [p.strip() for p in box.split(",")]
    if len(parts) != 4:
        raise InputError(f"{where}: the box needs 4 numbers x1,y1,x2,y2, got {len(parts)}",
                         'e.g. --exemplar "ref.jpg:10,20,110,90=red star"')
    return _make(image, parts, name, where)


def read_exemplars_file(path: str | os.PathLike) -> list[Exemplar]:
    """A CSV or JSON exemplars file (module docstring) -> rows in file order. The format is the
    suffix's (``.json`` / ``.csv``); another suffix is read as JSON if it starts with ``[``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"exemplars file not found: {p}")
    if p.is_dir():
        raise InputError(f"exemplars path {p} is a directory, expected a CSV or JSON file")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read exemplars file {p}: {' '.join(str(e).split())}") from None
    if not text.strip():
        raise InputError(f"exemplars file {p} is empty", "rows are image,x1,y1,x2,y2,name")
    as_json = p.suffix.lower() == ".json" or (p.suffix.lower() != ".csv" and text.lstrip().startswith("["))
    rows = _json_rows(text, p) if as_json else _csv_rows(text, p)
    if not rows:
        raise InputError(f"exemplars file {p} has no rows", "rows are image,x1,y1,x2,y2,name")
    base = p.parent
    return [Exemplar(e.image if os.path.isabs(e.image) else str(base / e.image), e.box, e.name) for e in rows]


def _csv_rows(text: str, p: Path) -> list[Exemplar]:
    out = []
    for n, row in enumerate(csv.reader(io.StringIO(text)), start=1):
        if not row or all(not c.strip() for c in row):
            continue
        cells = [c.strip() for c in row]
        if n == 1 and tuple(c.lower() for c in cells) == HEADER:
            continue
        where = f"{p} line {n}"
        if len(cells) != 6:
            raise InputError(f"{where} has {len(cells)} fields, expected 6 (image,x1,y1,x2,y2,name)",
                             'quote names that contain commas: "a, b"')
        out.append(_make(cells[0], cells[1:5], cells[5], where))
    return out


def _json_rows(text: str, p: Path) -> list[Exemplar]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"exemplars file {p} is not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(data, list):
        raise InputError(f"exemplars file {p}: expected a JSON list of rows, got {type(data).__name__}")
    out = []
    for i, row in enumerate(data):
        where = f"{p} row {i}"
        if isinstance(row, list):
            if len(row) != 6:
                raise InputError(f"{where} has {len(row)} fields, expected 6 [image, x1, y1, x2, y2, name]")
            out.append(_make(row[0], row[1:5], row[5], where))
        elif isinstance(row, dict):
            box = row["box"] if "box" in row else [row.get(k) for k in ("x1", "y1", "x2", "y2")]
            if not isinstance(box, list) or len(box) != 4:
                raise InputError(f"{where}: needs \"box\": [x1, y1, x2, y2] (or x1, y1, x2, y2 keys)")
            out.append(_make(row.get("image"), box, row.get("name"), where))
        else:
            raise InputError(f"{where} is a {type(row).__name__}, expected an object or a list")
    return out


def check_exemplar_images(exemplars: Iterable[Exemplar]) -> dict[str, tuple[int, int]]:
    """Open every image of ``exemplars`` once (the one decoder,
    :func:`rclip_core.data.images.read_image`: EXIF orientation applied) and check each box lies
    inside its image. Returns ``{image: (h, w)}``. Raises a one-line InputError otherwise."""
    from rclip_core.data.images import read_image

    sizes: dict[str, tuple[int, int]] = {}
    for e in exemplars:
        if e.image not in sizes:
            im = read_image(e.image)
            sizes[e.image] = (im.height, im.width)
        h, w = sizes[e.image]
        x1, y1, x2, y2 = e.box
        if x1 < 0 or y1 < 0 or x2 > w or y2 > h:
            raise InputError(f"exemplar {e.name!r}: box {list(e.box)} reaches outside the {w}x{h} image {e.image}",
                             "boxes are XYXY in the original image's pixels, inside the image")
    return sizes
