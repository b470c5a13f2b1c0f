"""Boxes files: ground-truth / user boxes per image for detection with given boxes and for
pretraining regions (``{"image.jpg": [[x1, y1, x2, y2], ...]}`` or a COCO instances JSON),
their lookup by image path and their validation against the image size."""

from __future__ import annotations

import math
import os
from pathlib import Path, PurePath
from typing import Any, Mapping, Sequence

import numpy as np

from rclip_core.errors import InputError
from rclip_core.fileio import read_json

__all__ = ["BoxesMapping", "load_boxes_file", "validate_boxes", "lookup_boxes"]

_BOXES_HINT = ('expected {"image.jpg": [[x1, y1, x2, y2], ...], ...} or a COCO instances '
               'JSON with "images" and "annotations"')


class BoxesMapping(dict):
    """``{image name: float64 [N, 4] XYXY}`` that also finds images by basename and stem
    (see :func:`lookup_boxes`); the indices are built once, on first lookup."""

    _by_basename: dict[str, list[str]] | None = None
    _by_stem: dict[str, list[str]] | None = None

    def indices(self) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
        if self._by_basename is None or self._by_stem is None:
            self._by_basename, self._by_stem = _build_name_indices(self)
        return self._by_basename, self._by_stem

    def __setitem__(self, key: str, value: Any) -> None:
        self._by_basename = self._by_stem = None
        super().__setitem__(key, value)

    def __delitem__(self, key: str) -> None:
        self._by_basename = self._by_stem = None
        super().__delitem__(key)


def _build_name_indices(mapping: Mapping[str, Any]) -> tuple[dict, dict]:
    by_basename: dict[str, list[str]] = {}
    by_stem: dict[str, list[str]] = {}
    for key in mapping:
        name = PurePath(str(key).replace("\\", "/")).name
        by_basename.setdefault(name, []).append(key)
        by_stem.setdefault(PurePath(name).stem, []).append(key)
    return by_basename, by_stem


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _parse_box(value: Any, where: str, path: Path) -> list[float]:
    if not isinstance(value, list):
        raise InputError(f"boxes file {path}: {where} must be a list of 4 numbers, got "
                         f"{type(value).__name__}", hint=_BOXES_HINT)
    if len(value) != 4:
        raise InputError(f"boxes file {path}: {where} must have 4 numbers, got {len(value)}",
                         hint=_BOXES_HINT)
    for v in value:
        if not _is_number(v):
            raise InputError(f"boxes file {path}: {where} has a non-numeric value {v!r}",
                             hint=_BOXES_HINT)
        if not math.isfinite(v):
            raise InputError(f"boxes file {path}: {where} has a non-finite value {v!r}")
    return [float(v) for v in value]


def load_boxes_file(path: str | os.PathLike) -> BoxesMapping:
    """Read ground-truth / user boxes for the "GT boxes" mode (the official ``CROP_REGION_TYPE GT``).

    Two formats:

    - ``{"<file name or stem>": [[x1, y1, x2, y2], ...], ...}`` (XYXY, original-image pixels);
    - a COCO instances JSON (``images`` + ``annotations``): ``bbox`` [x, y, w, h] becomes
      [x, y, x + w, y + h]; crowd annotations (``iscrowd`` 1) are excluded, as in RegionCLIP's
      GT mode; keys are the images' ``file_name`` (every listed image appears, possibly with
      zero boxes).

    Returns a :class:`BoxesMapping` of float64 [N, 4] arrays. Every problem (not JSON, wrong
    structure, non-numeric/non-finite numbers, wrong length, x2 <= x1 or y2 <= y1) raises a
    one-line InputError naming the file and the entry.
    """
    p = Path(path)
    data = read_json(p, what="boxes file")
    if isinstance(data, dict) and ("annotations" in data or "images" in data):
        return _load_coco_boxes(data, p)
    if not isinstance(data, dict):
        raise InputError(f"boxes file {p}: top level must be a JSON object, got "
                         f"{type(data).__name__}", hint=_BOXES_HINT)
    result = BoxesMapping()
    for name, boxes in data.items():
        if not isinstance(boxes, list):
            raise InputError(f"boxes file {p}: entry {name!r} must be a list of "
                             f"[x1, y1, x2, y2] boxes, got {type(boxes).__name__}",
                             hint=_BOXES_HINT)
        parsed = []
        for i, box in enumerate(boxes):
            x1, y1, x2, y2 = _parse_box(box, f"{name!r} box {i}", p)
            if not (x2 > x1 and y2 > y1):
                raise InputError(f"boxes file {p}: {name!r} box {i} {box} is degenerate "
                                 "(needs x2 > x1 and y2 > y1)")
            parsed.append([x1, y1, x2, y2])
        result[name] = np.asarray(parsed, dtype=np.float64).reshape(-1, 4)
    return result


def _load_coco_boxes(data: dict, p: Path) -> BoxesMapping:
    images, annotations = data.get("images"), data.get("annotations")
    if not isinstance(images, list) or not isinstance(annotations, list):
        raise InputError(f"boxes file {p}: a COCO instances file needs lists \"images\" and "
                         "\"annotations\"", hint=_BOXES_HINT)
    file_names: dict[Any, str] = {}
    per_image: dict[str, list[list[float]]] = {}
    for i, image in enumerate(images):
        if not isinstance(image, dict) or "id" not in image or \
                not isinstance(image.get("file_name"), str):
            raise InputError(f"boxes file {p}: images[{i}] needs an \"id\" and a string "
                             "\"file_name\"")
        file_names[image["id"]] = image["file_name"]
        per_image.setdefault(image["file_name"], [])
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise InputError(f"boxes file {p}: annotations[{i}] must be an object")
        ann_name = f"annotation {ann.get('id', i)!r}"
        if ann.get("image_id") not in file_names:
            raise InputError(f"boxes file {p}: {ann_name} refers to image_id "
                             f"{ann.get('image_id')!r}, which is not in \"images\"")
        if ann.get("iscrowd", 0):
            continue
        if "bbox" not in ann:
            raise InputError(f"boxes file {p}: {ann_name} has no \"bbox\"")
        x, y, w, h = _parse_box(ann["bbox"], f"{ann_name} bbox", p)
        if not (w > 0 and h > 0):
            raise InputError(f"boxes file {p}: {ann_name} bbox {ann['bbox']} is degenerate "
                             "(needs width > 0 and height > 0)")
        per_image[file_names[ann["image_id"]]].append([x, y, x + w, y + h])
    result = BoxesMapping()
    for name, boxes in per_image.items():
        result[name] = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return result


def validate_boxes(boxes: np.ndarray | Sequence[Sequence[float]], image_w: int, image_h: int,
                   name: str) -> np.ndarray:
    """Check the boxes of one image against its size (original-image pixels).

    A box lying entirely outside the ``image_w`` x ``image_h`` image raises an InputError
    naming the image and the box index; boxes partly outside are clipped to the image.

    boxes [N, 4] XYXY -> float64 [N, 4] XYXY inside the image.
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise InputError(f"boxes for image {name} must have shape [N, 4], got {list(arr.shape)}")
    bad = ~np.isfinite(arr).all(axis=1)
    if bad.any():
        raise InputError(f"image {name}: box {int(np.argmax(bad))} has a non-finite value")
    degenerate = (arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])
    if degenerate.any():
        i = int(np.argmax(degenerate))
        raise InputError(f"image {name}: box {i} {arr[i].tolist()} is degenerate "
                         "(needs x2 > x1 and y2 > y1)")
    outside = (arr[:, 0] >= image_w) | (arr[:, 1] >= image_h) | (arr[:, 2] <= 0) | \
        (arr[:, 3] <= 0)
    if outside.any():
        i = int(np.argmax(outside))
        raise InputError(f"image {name}: box {i} {arr[i].tolist()} lies entirely outside the "
                         f"{image_w}x{image_h} image",
                         hint="boxes are XYXY in the original image's pixels")
    out = arr.copy()
    np.clip(out[:, 0::2], 0, image_w, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, image_h, out=out[:, 1::2])
    return out


def lookup_boxes(mapping: Mapping[str, np.ndarray], image_path: str | os.PathLike) -> np.ndarray:
    """The boxes of ``image_path`` in a mapping from :func:`load_boxes_file`.

    Tries, in order: the path as given, its basename and its stem as keys; then keys whose
    basename (or stem) equals the image's basename (or stem). When several keys match, the
    one whose path is a suffix of ``image_path`` wins; otherwise the match is ambiguous.
    Raises InputError when nothing matches.
    """
    given = str(image_path)
    pure = PurePath(given.replace("\\", "/"))
    for candidate in (given, pure.name, pure.stem):
        if candidate in mapping:
            return mapping[candidate]
    if isinstance(mapping, BoxesMapping):
        by_basename, by_stem = mapping.indices()
    else:
        by_basename, by_stem = _build_name_indices(mapping)
    for index, key in ((by_basename, pure.name), (by_stem, pure.stem)):
        matches = index.get(key, [])
        if len(matches) == 1:
            return mapping[matches[0]]
        if len(matches) > 1:
            norm = given.replace("\\", "/")
            suffix = [m for m in matches if norm.endswith("/" + m.replace("\\", "/").lstrip("/"))
                      or norm == m]
            if len(suffix) == 1:
                return mapping[suffix[0]]
            raise InputError(f"image {given} matches several entries of the boxes file: "
                             f"{', '.join(sorted(matches)[:3])}",
                             hint="key the boxes file by the images' relative paths")
    raise InputError(f"no boxes for image {given} in the boxes file",
                     hint="key the boxes file by file name, basename or stem of each image")
