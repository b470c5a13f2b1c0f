"""COCO and LVIS v1 instance files: loading, validation, image resolution and OVD splits.

One reader for both formats. LVIS v1 is COCO-shaped with three differences that matter here:

- images carry ``coco_url`` ("http://images.cocodataset.org/val2017/000000397133.jpg") and no
  ``file_name``; the file name is the URL's last part and the URL's folder (``val2017`` or
  ``train2017``: LVIS val draws from both) is kept as ``coco_folder`` so that ``--images`` may
  point at either COCO's image folder or its root;
- categories carry ``frequency`` (r/c/f; rare = novel: ``detectron2/data/datasets/lvis_v1_categories.py``);
- images carry ``neg_category_ids`` and ``not_exhaustive_category_ids`` (federated labels).

Category splits are plain sets of category ids; nothing here knows the COCO 48/17 or LVIS r/c/f
lists (those live in ``rclip_core/data/vocab.py``).
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal, NamedTuple, Sequence
from urllib.parse import urlparse

from rclip_core.errors import InputError
from rclip_core.fileio import read_json

Kind = Literal["coco", "lvis"]

_LVIS_IMAGE_KEYS = ("neg_category_ids", "not_exhaustive_category_ids")
_FREQUENCIES = ("r", "c", "f")


@dataclass
class DetectionSet:
    """A validated instances file.

    ``images``, ``annotations`` and ``categories`` are the lists of ``raw`` (not copies), with
    two normalisations applied in place: every image has ``file_name`` (from ``coco_url`` for
    LVIS) and every annotation has ``area`` (box area if missing) and ``iscrowd`` (0 if missing).
    ``source`` is the file it came from (None for a dict).
    """

    images: list[dict]
    annotations: list[dict]
    categories: list[dict]
    kind: Kind
    raw: dict = field(repr=False)
    source: Path | None = None

    @property
    def image_ids(self) -> list[int]:
        return [img["id"] for img in self.images]

    @property
    def category_ids(self) -> list[int]:
        """Category ids in ascending order (the evaluators' and embeddings' order)."""
        return sorted(c["id"] for c in self.categories)

    def category_names(self) -> dict[int, str]:
        return {c["id"]: c["name"] for c in self.categories}

    def to_dict(self) -> dict:
        """The COCO-format dict (the normalised ``raw``), e.g. to write with ``atomic_write_json``."""
        return self.raw

    def __len__(self) -> int:
        return len(self.images)


class ResolvedImage(NamedTuple):
    image: dict
    path: Path


def _where(source: Path | None) -> str:
    return str(source) if source is not None else "instances dict"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _file_name_from_url(url: str) -> tuple[str, str | None]:
    """"http://images.cocodataset.org/val2017/000000397133.jpg" -> ("000000397133.jpg", "val2017")."""
    parts = [p for p in urlparse(url).path.split("/") if p]
    if not parts:
        return "", None
    return parts[-1], (parts[-2] if len(parts) >= 2 else None)


def load_instances(path: str | os.PathLike | dict,
                   kind: Literal["auto", "coco", "lvis"] = "auto") -> DetectionSet:
    """Load and validate a COCO or LVIS v1 instances file (a path, or an already-loaded dict).

    ``kind="auto"`` picks LVIS when the categories carry ``frequency`` or the images carry the
    federated ``neg_category_ids`` lists, COCO otherwise. Every problem is a one-line
    :class:`InputError`: not JSON, a captions or results file, missing keys, duplicate ids, bad
    boxes, annotations that refer to unknown images or categories.
    """
    if kind not in ("auto", "coco", "lvis"):
        raise InputError(f"unknown dataset kind {kind!r}", hint="use one of: auto, coco, lvis")
    source: Path | None = None
    if isinstance(path, dict):
        data = path
    else:
        source = Path(path)
        data = read_json(source, what="instances file")
    where = _where(source)

    if isinstance(data, list):
        if data and isinstance(data[0], dict) and "score" in data[0]:
            raise InputError(f"{where} is a detections (results) file, not an instances file",
                             hint="pass the ground-truth annotations JSON here")
        raise InputError(f"{where} is not an instances file (the top level is a list, not an object)")
    if not isinstance(data, dict):
        raise InputError(f"{where} is not an instances file (the top level is not a JSON object)")

    anns = data.get("annotations")
    if isinstance(anns, list) and anns and isinstance(anns[0], dict) and "caption" in anns[0] \
            and "bbox" not in anns[0]:
        raise InputError(f"{where} is a captions file, not an instances file",
                         hint="use instances_*.json (COCO) or lvis_v1_*.json (LVIS)")
    missing = [k for k in ("images", "annotations", "categories") if k not in data]
    if missing:
        raise InputError(f"{where} is missing the key(s) {', '.join(repr(k) for k in missing)} "
                         "of an instances file")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data[key], list):
            raise InputError(f"{where}: {key!r} must be a list")

    images, annotations, categories = data["images"], data["annotations"], data["categories"]
    if kind == "auto":
        is_lvis = any("frequency" in c for c in categories[:1]) or \
            any(_LVIS_IMAGE_KEYS[0] in img for img in images[:1])
        kind = "lvis" if is_lvis else "coco"

    cat_ids = _validate_categories(categories, kind, where)
    image_ids = _validate_images(images, kind, where)
    _validate_annotations(annotations, image_ids, cat_ids, where)
    _check_boxes_inside(annotations, images, where)
    return DetectionSet(images=images, annotations=annotations, categories=categories,
                        kind=kind, raw=data, source=source)


def _validate_categories(categories: list, kind: str, where: str) -> set[int]:
    ids: set[int] = set()
    for i, c in enumerate(categories):
        if not isinstance(c, dict) or "id" not in c or "name" not in c:
            raise InputError(f"{where}: category #{i} needs 'id' and 'name'")
        if not isinstance(c["id"], int) or isinstance(c["id"], bool):
            raise InputError(f"{where}: category {c.get('name')!r} has a non-integer id {c['id']!r}")
        if c["id"] in ids:
            raise InputError(f"{where}: category id {c['id']} appears twice")
        ids.add(c["id"])
        if kind == "lvis" and c.get("frequency") not in _FREQUENCIES:
            raise InputError(f"{where}: LVIS category {c['id']} ({c['name']!r}) has no frequency r/c/f",
                             hint="LVIS v1 category lists carry 'frequency'; use --kind coco otherwise")
    if not ids:
        raise InputError(f"{where} has no categories")
    return ids


def _validate_images(images: list, kind: str, where: str) -> set[int]:
    ids: set[int] = set()
    for i, img in enumerate(images):
        if not isinstance(img, dict) or "id" not in img:
            raise InputError(f"{where}: image #{i} has no 'id'")
        iid = img["id"]
        if not isinstance(iid, int) or isinstance(iid, bool):
            raise InputError(f"{where}: image #{i} has a non-integer id {iid!r}")
        if iid in ids:
            raise InputError(f"{where}: image id {iid} appears twice")
        ids.add(iid)
        if "file_name" not in img:
            if "coco_url" not in img:
                raise InputError(f"{where}: image {iid} has neither 'file_name' nor 'coco_url'")
            name, folder = _file_name_from_url(str(img["coco_url"]))
            if not name:
                raise InputError(f"{where}: image {iid} has an unusable coco_url {img['coco_url']!r}")
            img["file_name"] = name
            if folder:
                img.setdefault("coco_folder", folder)
        elif "coco_url" in img and "coco_folder" not in img:
            # COCO's own files carry the URL too: lets --images point at the COCO root
            name, folder = _file_name_from_url(str(img["coco_url"]))
            if folder and name == Path(str(img["file_name"])).name:
                img["coco_folder"] = folder
        for key in ("width", "height"):
            if not _is_number(img.get(key)) or img[key] <= 0:
                raise InputError(f"{where}: image {iid} needs a positive '{key}'")
        if kind == "lvis":
            for key in _LVIS_IMAGE_KEYS:
                if not isinstance(img.get(key), list):
                    raise InputError(f"{where}: LVIS image {iid} has no '{key}' list",
                                     hint="LVIS evaluation needs the federated label lists "
                                          "of lvis_v1_val.json")
    return ids


def _validate_annotations(annotations: list, image_ids: set[int], cat_ids: set[int], where: str) -> None:
    seen: set = set()
    bad_images: list = []
    bad_cats: list = []
    for i, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise InputError(f"{where}: annotation #{i} is not an object")
        for key in ("id", "image_id", "category_id", "bbox"):
            if key not in ann:
                raise InputError(f"{where}: annotation #{i} has no '{key}'")
        if ann["id"] in seen:
            raise InputError(f"{where}: annotation id {ann['id']} appears twice")
        seen.add(ann["id"])
        box = ann["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)) \
                or box[2] < 0 or box[3] < 0:
            raise InputError(f"{where}: annotation {ann['id']} has a bad bbox {box!r}",
                             hint="boxes are [x, y, width, height] with width, height >= 0")
        if ann["image_id"] not in image_ids:
            bad_images.append(ann["image_id"])
        if ann["category_id"] not in cat_ids:
            bad_cats.append(ann["category_id"])
        if "area" not in ann:
            ann["area"] = float(box[2] * box[3])
        if "iscrowd" not in ann:
            ann["iscrowd"] = 0
    if bad_images:
        raise InputError(f"{where}: {len(bad_images)} annotation(s) refer to unknown image ids "
                         f"(e.g. {bad_images[0]})")
    if bad_cats:
        unknown = sorted(set(bad_cats))
        raise InputError(f"{where}: {len(bad_cats)} annotation(s) refer to unknown category ids "
                         f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''}")


def _check_boxes_inside(annotations: list, images: list, where: str) -> None:
    """Refuse a box that lies wholly outside its image (a box that crosses the border is
    clipped when it is used, as Detectron2 does): it names pixels of another image size."""
    size = {img["id"]: (img["width"], img["height"]) for img in images}
    for ann in annotations:
        x, y, w, h = ann["bbox"]
        iw, ih = size[ann["image_id"]]
        if x >= iw or y >= ih or x + w < 0 or y + h < 0:
            raise InputError(f"{where}: annotation {ann['id']} has bbox {ann['bbox']!r}, wholly outside its "
                             f"{iw}x{ih} image {ann['image_id']}",
                             hint="boxes are [x, y, width, height] in the pixels of the image's width x height")


def resolve_images(dataset: DetectionSet,
                   images_dir: str | os.PathLike) -> tuple[list[ResolvedImage], list[dict]]:
    """Find every image of ``dataset`` under ``images_dir``.

    ``images_dir`` may be the folder that holds the files (COCO's ``val2017/``) or, for LVIS
    images that know their COCO folder, the COCO root that holds ``train2017/`` and ``val2017/``.
    Returns ``(present, missing)``; missing images are the caller's to count or skip.
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise InputError(f"images folder not found: {root}")
    present: list[ResolvedImage] = []
    missing: list[dict] = []
    for img in dataset.images:
        candidates = [root / img["file_name"]]
        if img.get("coco_folder"):
            candidates.append(root / img["coco_folder"] / img["file_name"])
        for p in candidates:
            if p.is_file():
                present.append(ResolvedImage(img, p))
                break
        else:
            missing.append(img)
    return present, missing


def size_mismatches(present: Sequence[ResolvedImage], limit: int | None = None) -> list[tuple[ResolvedImage, tuple[int, int]]]:
    """The images whose file (EXIF orientation applied) has another size than its ``width`` x
    ``height`` entry, with the file's (width, height); the first ``limit`` images are checked
    (all when None). Images whose header cannot be read are not counted here (the decoder
    reports them). Boxes are in the annotated pixel grid, so a disagreeing file puts every box
    in the wrong place: fine-tuning refuses any, evaluation a file where all disagree."""
    from rclip_core.data.images import image_size

    out = []
    for r in present[:limit] if limit is not None else present:
        size = image_size(r.path)
        if size is not None and size != (int(r.image["width"]), int(r.image["height"])):
            out.append((r, size))
    return out


def size_mismatch_error(bad: list, checked: int, where: str) -> InputError:
    r, (w, h) = bad[0]
    return InputError(f"{len(bad)} of {checked} images have other sizes than {where} says (e.g. {r.path.name} is "
                      f"{w}x{h}, the annotations say {r.image['width']}x{r.image['height']})",
                      "the instances file belongs to other (resized?) images: pass the matching --images folder")


def filter_categories(dataset: DetectionSet, keep_ids: Iterable[int],
                      drop_empty_images: bool = True) -> DetectionSet:
    """Keep only the categories ``keep_ids``: their annotations, and the images that still have one.

    This builds the OVD sets (``coco_zeroshot_categories.py``, ``lvis.py: filter_open_cls``):
    COCO base-only training (48 classes), the 65-class COCO test set (4836 of val2017's
    images), LVIS training without rare classes. Images that
    are left without annotations are dropped, as in OVR-CNN's split script and detectron2's
    ``filter_open_cls``. LVIS federated lists are narrowed to the kept categories. Category ids
    are not renumbered (contiguous class indices are the model's business).
    """
    keep = set(keep_ids)
    unknown = keep - {c["id"] for c in dataset.categories}
    if unknown:
        raise InputError(f"category ids {sorted(unknown)[:5]} are not in {_where(dataset.source)}")
    categories = [c for c in dataset.categories if c["id"] in keep]
    annotations = [a for a in dataset.annotations if a["category_id"] in keep]
    if drop_empty_images:
        used = {a["image_id"] for a in annotations}
        images = [img for img in dataset.images if img["id"] in used]
    else:
        images = list(dataset.images)
    if dataset.kind == "lvis":
        images = [dict(img, **{k: [c for c in img[k] if c in keep] for k in _LVIS_IMAGE_KEYS})
                  for img in images]
    raw = dict(dataset.raw, images=images, annotations=annotations, categories=categories)
    return DetectionSet(images=images, annotations=annotations, categories=categories,
                        kind=dataset.kind, raw=raw, source=dataset.source)


def _norm_name(name: str) -> str:
    return " ".join(str(name).replace("_", " ").lower().split())


def _resolve_category_refs(dataset: DetectionSet, refs: Iterable[int | str], what: str) -> set[int]:
    by_name: dict[str, int] = {}
    for c in dataset.categories:
        by_name.setdefault(_norm_name(c["name"]), c["id"])
        for syn in c.get("synonyms", []) or []:
            by_name.setdefault(_norm_name(syn), c["id"])
    ids_present = {c["id"] for c in dataset.categories}
    out: set[int] = set()
    for ref in refs:
        is_id = isinstance(ref, int) and not isinstance(ref, bool)
        if is_id or (isinstance(ref, str) and ref.strip().isdigit()):
            cid = int(ref)
            if cid not in ids_present:
                raise InputError(f"{what} class id {cid} is not a category of {_where(dataset.source)}")
            out.add(cid)
            continue
        key = _norm_name(ref)
        if key not in by_name:
            close = difflib.get_close_matches(key, list(by_name), n=3, cutoff=0.6)
            raise InputError(f"{what} class {ref!r} is not a category of {_where(dataset.source)}",
                             hint=f"did you mean: {', '.join(close)}?" if close else
                             "use the names of the file's 'categories' list, or their ids")
        out.add(by_name[key])
    return out


def split_from_names(dataset: DetectionSet, novel: Iterable[int | str],
                     base: Iterable[int | str] | None = None) -> dict[str, set[int]]:
    """An OVD split for a custom dataset: ``{"novel": ids, "base": ids}``.

    Classes may be given by name (case, ``_`` and spaces are ignored; LVIS synonyms work) or by
    id. ``base=None`` means every category that is not novel. Unknown names raise an InputError
    that lists close matches; a class in both lists is an error too.
    """
    novel_ids = _resolve_category_refs(dataset, novel, "novel")
    if base is None:
        base_ids = {c["id"] for c in dataset.categories} - novel_ids
    else:
        base_ids = _resolve_category_refs(dataset, base, "base")
    both = novel_ids & base_ids
    if both:
        names = dataset.category_names()
        raise InputError(f"classes are both novel and base: {', '.join(names[i] for i in sorted(both))}")
    if not novel_ids:
        raise InputError("the novel split is empty")
    return {"novel": novel_ids, "base": base_ids}
