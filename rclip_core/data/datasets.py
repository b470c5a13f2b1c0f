"""The one dataset resolver: the ``--dataset`` names of ``rclip eval``, ``rclip finetune`` and
``rclip pseudo-label``, and what each means for evaluation and for training.

=====================  ==========================================================================
``coco``               COCO 2017, 80 classes. Evaluation: val2017, all 5000 images (``AP``,
                       ``AP50``, ...). Training: train2017 on all 80 classes, tested on val2017
                       (fully supervised, paper Table 3), or an open-vocabulary split of your own
                       with novel classes.
``coco-ovd``           The COCO open-vocabulary split (``coco_zeroshot_categories.py``, after
                       OVR-CNN): 48 base classes for training, 65 (48 base + 17 novel) for test;
                       images without any of them are dropped (4836 of val2017's 5000).
                       Metrics: ``AP50_novel``, ``AP50_base``, ``AP50_all``
                       (``detectron2/evaluation/coco_evaluation.py``).
``lvis``               LVIS v1, 1203 classes; rare = novel (``lvis_v1_categories.py``).
                       Evaluation: val, ``AP``, ``APr``, ``APc``, ``APf``. Training: the 866
                       common + frequent classes (``detectron2/data/datasets/lvis.py``,
                       ``filter_open_cls``), tested on all 1203.
``lvis-minival``       LVIS v1 minival (evaluation only): the ~5k-image subset of LVIS val
                       (images not in COCO train2017) on which GLIP, YOLO-World and
                       MM-Grounding-DINO report (MDETR's ``lvis_v1_minival*.json``), read from
                       the annotation file the user gives (``--annotations``, default
                       ``IMAGES/../annotations/lvis_v1_minival.json``); the same 1203 classes.
``shapes:DIR`` / DIR   A ShapesWorld (``rclip data shapes``; a bare DIR must hold ``world.json``):
                       base/novel from its ``split.json``. Evaluation: its val split. Training:
                       train on the base classes of train, test on all classes of val.
``PATH.json``          Any COCO (or LVIS) instances file; its categories are the classes, a split
                       from novel/base class names (else training is fully supervised).
=====================  ==========================================================================

Where ``--images`` points: for evaluation, the folder of the images (COCO's ``val2017/``; the
annotations are found in ``../annotations/`` or ``./annotations/``); for training, the COCO root
(``annotations/``, ``train2017/``, ``val2017/``). :func:`dataset_images` accepts either.

- :func:`resolve_dataset`: the evaluation split -> :class:`EvalDataset`;
- :func:`resolve_training_data`: the training and validation sets -> :class:`ResolvedData`;
- :func:`dataset_images`: the images of one split (what pseudo-labelling labels).

Every problem is a one-line :class:`InputError`, raised before any model work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from rclip_core.data.coco import DetectionSet, ResolvedImage, filter_categories, load_instances, \
    resolve_images, size_mismatch_error, size_mismatches, split_from_names
from rclip_core.data.shapes.world import read_shapes_world
from rclip_core.data.vocab import Vocabulary, class_name_key, get_vocabulary
from rclip_core.errors import InputError
from rclip_core.fileio import read_json
from rclip_core.models.text import clean_lvis_name

__all__ = [
    "DATASET_NAMES", "STANDARD_DATASETS", "LVIS_MAX_GT_BOXES", "EvalDataset", "ResolvedData", "DatasetImages",
    "resolve_dataset", "resolve_training_data", "dataset_images", "prompt_names",
]

#: The ``--dataset`` names (besides ``shapes:DIR``, a ShapesWorld DIR and ``PATH.json``).
DATASET_NAMES = ("coco", "coco-ovd", "lvis")

STANDARD_DATASETS: dict[str, tuple[str, str]] = {
    # name -> (shipped vocabulary, default evaluation annotations file name)
    "coco-ovd": ("coco-ovd", "instances_val2017.json"),
    "coco": ("coco", "instances_val2017.json"),
    "lvis": ("lvis", "lvis_v1_val.json"),
    "lvis-minival": ("lvis", "lvis_v1_minival.json"),
}

#: detectron2's LVIS loader keeps at most 500 ground-truth boxes per image
#: (``detectron2/data/datasets/lvis.py``, ``clip_gt_crop``); in GT-box mode these are the
#: regions the model sees.
LVIS_MAX_GT_BOXES = 500
#: images whose size evaluation checks against the annotations before any work (all disagreeing = wrong file)
SIZE_PROBE = 20

_HINT_NAMES = "coco, coco-ovd, lvis, lvis-minival, shapes:DIR or PATH.json"
DATASET_NAMES_EVAL_ORDER = tuple(n for n in STANDARD_DATASETS if n != "lvis-minival")


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class EvalDataset:
    """Ground truth, vocabulary, splits and the images found on disk (``present``, in image-id
    order) or not (``missing``)."""

    name: str  # coco-ovd | coco | lvis | shapes | custom
    gt: DetectionSet
    vocabulary: Vocabulary
    splits: dict[str, set[int]] | None
    annotations: Path
    images_dir: Path
    present: list[ResolvedImage]
    missing: list[dict]
    description: str = ""

    @property
    def kind(self) -> str:
        return self.gt.kind

    @property
    def num_images(self) -> int:
        return len(self.gt.images)


def _check_images_dir(images: str | os.PathLike | None, what: str) -> Path:
    if images is None:
        raise InputError(f"--dataset {what} needs --images DIR (the folder holding its image files)")
    p = Path(images).expanduser()
    if not p.exists():
        raise InputError(f"images folder not found: {p}")
    if not p.is_dir():
        raise InputError(f"--images {p} is a file, expected the folder that holds the images")
    return p


def _default_annotations(images_dir: Path, file_name: str, dataset: str) -> Path:
    candidates = [images_dir.parent / "annotations" / file_name, images_dir / "annotations" / file_name]
    for c in candidates:
        if c.is_file():
            return c
    raise InputError(f"no annotations for --dataset {dataset}: looked for {candidates[0]} and "
                     f"{candidates[1]}",
                     hint=f"pass --annotations PATH/{file_name}")


def _check_categories(gt: DetectionSet, vocab: Vocabulary, where: Path, dataset: str) -> None:
    """The annotations must carry every category of the shipped vocabulary, under the same id
    and name (a LVIS file given as COCO, or a custom file, fails here, before any work)."""
    names = gt.category_names()
    missing = [i for i, cid in enumerate(vocab.category_ids) if cid not in names]
    hint = ("use COCO's instances_val2017.json (lvis_v1_val.json for --dataset lvis), "
            "or --dataset PATH.json for other data")
    if missing:
        i = missing[0]
        raise InputError(f"the categories of {where} do not match --dataset {dataset}: {len(missing)} of its "
                         f"{len(vocab)} classes are missing (e.g. id {vocab.category_ids[i]} "
                         f"{vocab.names[i]!r})", hint=hint)
    for i, cid in enumerate(vocab.category_ids):
        if class_name_key(names[cid]) != class_name_key(vocab.names[i]):
            raise InputError(f"the categories of {where} do not match --dataset {dataset}: id {cid} is "
                             f"{names[cid]!r} there but {vocab.names[i]!r} in the {vocab.name} vocabulary",
                             hint=hint)


def _custom_vocabulary(gt: DetectionSet, name: str) -> Vocabulary:
    cats = sorted(gt.categories, key=lambda c: c["id"])
    freq = [c.get("frequency") for c in cats]
    return Vocabulary(name=name, names=tuple(clean_lvis_name(str(c["name"])).strip() for c in cats),
                      display_names=tuple(str(c["name"]) for c in cats),
                      category_ids=tuple(int(c["id"]) for c in cats),
                      split=tuple(freq) if gt.kind == "lvis" and all(freq) else None)


def _as_refs(value: str | Sequence[int | str] | None) -> list[int | str] | None:
    """``"a, b"`` or a file with one class per line, or a list -> list of names/ids."""
    if value is None:
        return None
    if isinstance(value, str):
        p = Path(value).expanduser()
        if "," not in value and p.is_file():
            lines = p.read_text(encoding="utf-8").splitlines()
            refs = [ln.split(",", 1)[0].strip() for ln in lines
                    if ln.strip() and not ln.strip().startswith("#")]
        else:
            refs = [r.strip() for r in value.split(",")]
        if any(not r for r in refs) or not refs:
            raise InputError(f"empty class name in {value!r}", hint="separate class names with commas")
        return list(refs)
    return list(value)


def _shapes_split(root: Path, gt: DetectionSet | None = None) -> dict[str, set[int]]:
    """The base/novel category ids of a ShapesWorld (its ``split.json``), checked against ``gt``."""
    split = read_json(root / "split.json", what="ShapesWorld split file")
    try:
        out = {s: {int(c["id"]) for c in split[s]} for s in ("novel", "base")}
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{root / 'split.json'} has no 'novel'/'base' lists of {{id, name}}") from None
    if gt is not None:
        unknown = (out["novel"] | out["base"]) - set(gt.category_ids)
        if unknown:
            raise InputError(f"{root / 'split.json'} names category ids {sorted(unknown)[:5]} that "
                             f"the annotations lack")
    return out


def _coco_ovd_split() -> dict[str, set[int]]:
    """The COCO OVD split (``coco_zeroshot_categories.py``): 48 base and 17 novel COCO ids."""
    v = get_vocabulary("coco-ovd")
    return {s: {c for c, t in zip(v.category_ids, v.split or (), strict=True) if t == s} for s in ("novel", "base")}


def _shapes_folder(key: str) -> Path | None:
    """The folder of ``shapes:DIR``, or of a bare DIR; None for any other name."""
    if key.startswith("shapes:"):
        return Path(key[len("shapes:"):]).expanduser()
    p = Path(key).expanduser()
    return p if p.is_dir() else None


def resolve_dataset(dataset: str, images: str | os.PathLike | None = None,
                    annotations: str | os.PathLike | None = None,
                    novel_classes: str | Sequence[int | str] | None = None,
                    base_classes: str | Sequence[int | str] | None = None) -> EvalDataset:
    """Read and check everything about the data before any model work (see the module
    docstring for the accepted ``dataset`` values).

    ``novel_classes``/``base_classes``: names or ids (a comma-separated string, a file with one
    per line, or a list) defining a novel/base split for ``coco``, ShapesWorld and custom data;
    base defaults to every class that is not novel. Every problem is a one-line InputError:
    missing folder or file, a captions/results file instead of instances, categories that do not
    match the named data set, none of the images on disk.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise InputError("no --dataset given", hint=_HINT_NAMES)
    key = dataset.strip()
    novel, base = _as_refs(novel_classes), _as_refs(base_classes)
    if base is not None and novel is None:
        raise InputError("--base-classes needs --novel-classes")

    if key.lower() in STANDARD_DATASETS:
        name = key.lower()
        vocab_name, file_name = STANDARD_DATASETS[name]
        images_dir = _check_images_dir(images, name)
        ann = Path(annotations).expanduser() if annotations else \
            _default_annotations(images_dir, file_name, name)
        full = load_instances(ann)
        is_lvis = vocab_name == "lvis"
        if is_lvis and full.kind != "lvis":
            raise InputError(f"{ann} is a COCO instances file, not LVIS v1 (no r/c/f frequencies)",
                             hint=f"use {file_name}, or --dataset coco / PATH.json for this file")
        if not is_lvis and full.kind == "lvis":
            raise InputError(f"{ann} is an LVIS file, not COCO instances", hint="use --dataset lvis or lvis-minival")
        vocab = get_vocabulary(vocab_name)
        _check_categories(full, vocab, ann, name)
        if novel is not None and name != "coco":
            raise InputError(f"--dataset {name} has its fixed split; --novel-classes works with "
                             "--dataset coco, shapes:DIR or PATH.json")
        if name == "coco-ovd":
            gt = filter_categories(full, vocab.category_ids)  # drops images without any of the 65
            splits = _coco_ovd_split()
            description = "COCO OVD (65 classes: 17 novel + 48 base, generalized setting)"
        else:
            gt = full if len(full.categories) == len(vocab) else \
                filter_categories(full, vocab.category_ids, drop_empty_images=False)
            splits = split_from_names(gt, novel, base) if novel is not None else None
            description = {"coco": "COCO (80 classes)", "lvis": "LVIS v1 val (1203 classes: r/c/f)",
                           "lvis-minival": f"LVIS v1 minival ({len(gt.images)} images, 1203 classes: r/c/f)"}[name]
    else:
        world_root: Path | None = None
        folder = _shapes_folder(key)
        if folder is not None:
            world_root = Path(read_shapes_world(folder)["root"])
            ann = Path(annotations).expanduser() if annotations else world_root / "instances_val.json"
            default_images: Path | None = world_root / "val"
            name = "shapes"
        else:
            ann = Path(key).expanduser()
            if not ann.exists():
                raise InputError(f"--dataset {key}: not one of {', '.join(DATASET_NAMES_EVAL_ORDER)}, shapes:DIR, "
                                 "lvis-minival (evaluation only), nor an existing instances file")
            if annotations:
                raise InputError("--annotations goes with --dataset coco-ovd|coco|lvis; "
                                 "with --dataset PATH.json the file is the annotations")
            default_images = None
            name = "custom"
            if (ann.parent / "world.json").is_file() and ann.name.startswith("instances_"):
                world_root = Path(read_shapes_world(ann.parent)["root"])
                default_images = world_root / ann.stem[len("instances_"):]
                name = "shapes"
        images_dir = _check_images_dir(images if images is not None else default_images, key)
        gt = load_instances(ann)
        vocab = _custom_vocabulary(gt, name if name != "custom" else ann.stem)
        if novel is not None:
            splits = split_from_names(gt, novel, base)
        elif world_root is not None:
            splits = _shapes_split(world_root, gt)
        else:
            splits = None
        part = ann.stem[len("instances_"):] if ann.stem.startswith("instances_") else ann.stem
        description = (f"ShapesWorld {part}" if name == "shapes" else
                       f"custom {gt.kind.upper()}-format data") \
            + f" ({len(vocab)} classes)"

    if not gt.images:
        raise InputError(f"{ann} lists no images"
                         + (" with any of the 65 OVD classes" if name == "coco-ovd" else ""))
    present, missing = resolve_images(gt, images_dir)
    if not present:
        example = gt.images[0]["file_name"]
        raise InputError(f"none of the {len(gt.images)} images of {ann} is in {images_dir} (e.g. {example})",
                         hint="--images must be the folder that holds the files named in the annotations "
                              "(e.g. COCO's val2017/)")
    # a file that disagrees with every image is the wrong file for this folder: refused here,
    # before any header is printed (single disagreeing images are counted as failed by the protocol)
    probe = min(len(present), SIZE_PROBE)
    bad = size_mismatches(present, probe)
    if probe and len(bad) == probe:
        raise size_mismatch_error(bad, probe, str(ann))
    present.sort(key=lambda r: r.image["id"])
    return EvalDataset(name=name, gt=gt, vocabulary=vocab, splits=splits, annotations=ann,
                       images_dir=images_dir, present=present, missing=missing, description=description)



# --------------------------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------------------------


@dataclass
class ResolvedData:
    """What a run trains and evaluates on. Class lists are in ascending category id (the
    embedding row order of the official ``*_cls_emb.pth`` files).

    ``notes``: one-line messages for the user (deprecated names); the library never prints them.
    """

    train: DetectionSet
    train_images: Path
    val: DetectionSet | None
    val_images: Path | None
    train_category_ids: list[int]
    train_names: list[str]
    test_category_ids: list[int]
    test_names: list[str]
    splits: dict[str, set[int]] | None
    mode: str
    description: str
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.train.kind


#: ``--dataset coco`` without novel classes and without ``data.mode=fully`` trains the OVD split,
#: as it did before ``coco-ovd`` had a name.
COCO_OVD_COMPAT_NOTE = ("--dataset coco trains the COCO OVD split (48 base, 65 test classes) here only for "
                        "compatibility: name it --dataset coco-ovd; --dataset coco with data.mode=fully "
                        "trains all 80 classes")


def _first_existing(candidates: Sequence[Path], what: str, hint: str) -> Path:
    for c in candidates:
        if c.is_file():
            return c
    raise InputError(f"{what} not found (looked for {', '.join(str(c) for c in candidates[:3])})", hint)


def prompt_names(dataset: DetectionSet) -> dict[int, str]:
    """Category id -> the name put into the prompts (LVIS names cleaned as the official
    ``get_cls_names`` does; COCO and custom names as they are)."""
    names = dataset.category_names()
    if dataset.kind == "lvis":
        return {k: clean_lvis_name(v) for k, v in names.items()}
    return names


def _coco_root(ds: str, images: str | os.PathLike | None) -> Path:
    if not images:
        raise InputError(f"--dataset {ds} needs --images COCO_ROOT (the folder with annotations/, "
                         "train2017/ and val2017/)")
    root = Path(images).expanduser()
    if not root.is_dir():
        raise InputError(f"images folder not found: {root}")
    return root


def _lvis_annotations(root: Path, split: str, what: str, hint: str) -> Path:
    name = f"lvis_v1_{split}.json"
    return _first_existing([root / "annotations" / name, root / name, root / "lvis" / name], what, hint)


def resolve_training_data(dataset: str | None, *, images: str | os.PathLike | None = None,
                          val_dataset: str | os.PathLike | None = None,
                          val_images: str | os.PathLike | None = None,
                          novel_classes: Sequence[int | str] | None = None,
                          mode: str = "auto") -> ResolvedData:
    """Load and split the training and validation sets of ``dataset`` (the names of the module
    docstring; ``images`` is the COCO root for ``coco``/``coco-ovd``/``lvis``, the image folder
    of a ``PATH.json``, and overrides a ShapesWorld's ``train/``).

    ``val_dataset`` / ``val_images``: the evaluation set (default: the named set's val split; a
    ``PATH.json`` has none unless given, and its images default to ``images``).
    ``novel_classes``: names or ids held out of training (``coco``, ``lvis``, ShapesWorld and
    ``PATH.json``; they replace a ShapesWorld's split). ``mode``: ``ovd`` = train on base classes
    and test on all, ``fully`` = train and test on all classes (paper Table 3), ``auto`` = ovd
    when a split is known. Every problem is an InputError naming the file or key.
    """
    if mode not in ("auto", "ovd", "fully"):
        raise InputError(f"unknown data.mode {mode!r}", "use auto, ovd or fully")
    if not dataset:
        raise InputError("no data set given", "pass --dataset coco|coco-ovd|lvis|shapes:DIR|train.json (data.dataset)")
    ds = str(dataset)
    key = ds.strip().lower()
    val_path: Path | None = Path(val_dataset).expanduser() if val_dataset else None
    val_dir: Path | None = Path(val_images).expanduser() if val_images else None
    split_ids: dict[str, set[int]] | None = None
    notes: list[str] = []
    if key in ("coco", "coco-ovd"):
        root = _coco_root(ds, images)
        train_path = _first_existing([root / "annotations" / "instances_train2017.json"], "COCO train annotations",
                                     "download COCO 2017 annotations into COCO_ROOT/annotations/")
        val_path = val_path or _first_existing([root / "annotations" / "instances_val2017.json"],
                                               "COCO val annotations", "set data.val_dataset=PATH")
        train_images, val_dir = root / "train2017", val_dir or root / "val2017"
    elif key == "lvis":
        root = _coco_root(ds, images)
        train_path = _lvis_annotations(root, "train", "LVIS v1 train annotations",
                                       "put lvis_v1_train.json into COCO_ROOT/annotations/")
        val_path = val_path or _lvis_annotations(root, "val", "LVIS v1 val annotations", "set data.val_dataset=PATH")
        # LVIS images name their COCO folder: the COCO root serves train and val
        train_images, val_dir = root, val_dir or root
    elif (folder := _shapes_folder(ds.strip())) is not None:
        world_root = Path(read_shapes_world(folder)["root"])
        train_path = world_root / "instances_train.json"
        train_images = Path(images).expanduser() if images else world_root / "train"
        val_path, val_dir = val_path or world_root / "instances_val.json", val_dir or world_root / "val"
        split_ids = _shapes_split(world_root)
    else:
        train_path = Path(ds).expanduser()
        if not train_path.is_file():
            raise InputError(f"data set not found: {ds}",
                             "pass coco, coco-ovd, lvis, shapes:DIR (a ShapesWorld) or a COCO-format "
                             "instances JSON")
        if not images:
            raise InputError("--images DIR (the folder of the training images) is required with an instances JSON")
        train_images = Path(images).expanduser()
        if val_path is not None and val_dir is None:
            val_dir = train_images
    if not train_images.is_dir():
        raise InputError(f"images folder not found: {train_images}", "pass the image folder with --images")
    if val_path is not None and not val_path.is_file():
        raise InputError(f"validation instances file not found: {val_path}")
    if val_dir is not None and val_path is not None and not val_dir.is_dir():
        raise InputError(f"validation images folder not found: {val_dir}")

    train = load_instances(train_path)
    val = load_instances(val_path) if val_path is not None else None
    all_ids = set(train.category_ids)
    if key == "coco-ovd":
        if novel_classes:
            raise InputError("--dataset coco-ovd has its fixed split; --novel-classes works with "
                             "--dataset coco, lvis, shapes:DIR or PATH.json")
        if mode == "fully":
            raise InputError("--dataset coco-ovd is the open-vocabulary split (48 base classes)",
                             "for all 80 classes use --dataset coco with data.mode=fully")
        split_ids = _coco_ovd_split()
    elif key == "coco" and mode != "fully" and not novel_classes:
        split_ids = _coco_ovd_split()
        notes.append(COCO_OVD_COMPAT_NOTE)
    elif train.kind == "lvis" and mode != "fully" and not novel_classes:
        split_ids = {"novel": {c["id"] for c in train.categories if c.get("frequency") == "r"},
                     "base": {c["id"] for c in train.categories if c.get("frequency") in ("c", "f")}}
    if novel_classes:
        split_ids = split_from_names(train, novel_classes)
    if mode == "auto":
        mode = "ovd" if split_ids is not None else "fully"
    if mode == "ovd" and split_ids is None:
        raise InputError("open-vocabulary mode needs a base/novel split",
                         "name the held-out classes with --novel-classes, or use data.mode=fully")
    if split_ids is not None:
        unknown = (split_ids["novel"] | split_ids["base"]) - all_ids
        if unknown:
            raise InputError(f"split classes {sorted(unknown)[:5]} are not categories of {train_path}")
    names = prompt_names(train)
    if mode == "ovd":
        assert split_ids is not None
        train_ids = sorted(split_ids["base"])
        test_ids = sorted(split_ids["novel"] | split_ids["base"])
        if not train_ids:
            raise InputError("no base classes to train on")
        train = filter_categories(train, train_ids, drop_empty_images=True)
    else:
        train_ids = test_ids = sorted(all_ids)
        split_ids = None
    if val is not None:
        if set(val.category_ids) != all_ids and not set(test_ids) <= set(val.category_ids):
            missing = sorted(set(test_ids) - set(val.category_ids))
            raise InputError(f"the validation set lacks categories {missing[:5]} of the training set",
                             "both instances files must share their category ids")
        if set(test_ids) != set(val.category_ids):  # e.g. the 65-class COCO OVD test set
            val = filter_categories(val, test_ids, drop_empty_images=True)
    desc = (f"{train.source}: {len(train_ids)} training classes, {len(test_ids)} test classes ({mode})")
    return ResolvedData(train=train, train_images=train_images, val=val, val_images=val_dir,
                        train_category_ids=train_ids, train_names=[names[c] for c in train_ids],
                        test_category_ids=test_ids, test_names=[names[c] for c in test_ids],
                        splits=split_ids, mode=mode, description=desc, notes=notes)


# --------------------------------------------------------------------------------------------
# the images of a split (pseudo-labelling)
# --------------------------------------------------------------------------------------------


@dataclass
class DatasetImages:
    """The images of one split of a named data set, in the instances file's order: ``present``
    (found under ``images_dir``) and ``missing``. ``name``: coco | coco-ovd | lvis | shapes | custom."""

    name: str
    split: str
    annotations: Path
    images_dir: Path
    present: list[ResolvedImage]
    missing: list[dict]


def _standard_split_files(key: str, images: Path, split: str) -> tuple[Path, Path]:
    """(annotations, images folder) of a COCO / LVIS split; ``images`` is the COCO root or the
    split's image folder (``train2017/``)."""
    file_name = f"lvis_v1_{split}.json" if key == "lvis" else f"instances_{split}2017.json"
    candidates = [images / "annotations" / file_name, images.parent / "annotations" / file_name]
    if key == "lvis":
        candidates += [images / file_name, images / "lvis" / file_name]
    ann = _first_existing(candidates, f"{file_name} for --dataset {key}",
                          f"pass the COCO root (with annotations/{file_name}) as --images")
    if key != "lvis" and ann.parent.parent == images and (images / f"{split}2017").is_dir():
        return ann, images / f"{split}2017"  # the COCO root
    return ann, images  # LVIS images know their COCO folder; else the split folder itself


def dataset_images(dataset: str, images: str | os.PathLike | None = None, split: str = "train") -> DatasetImages:
    """The images of ``split`` (``train`` or ``val``) of a named data set (module docstring):
    ``coco`` (every image of ``instances_<split>2017.json``), ``coco-ovd`` (the images with an
    annotation of the split's classes: 48 base for train, 65 for val), ``lvis``, ``shapes:DIR``
    / DIR (its ``<split>/``) or ``PATH.json`` (``split`` is ignored; images under ``images``,
    default the file's folder). For the COCO names ``images`` is the COCO root or the split's
    image folder. Raises InputError when nothing is found.
    """
    if split not in ("train", "val"):
        raise InputError(f"unknown split {split!r}", "use train or val")
    if not isinstance(dataset, str) or not dataset.strip():
        raise InputError("no --dataset given", hint=_HINT_NAMES)
    key = dataset.strip()
    name = key.lower()
    if name in DATASET_NAMES:
        images_dir = _check_images_dir(images, name)
        ann, images_dir = _standard_split_files(name, images_dir, split)
        gt = load_instances(ann)
        if name == "lvis" and gt.kind != "lvis":
            raise InputError(f"{ann} is a COCO instances file, not LVIS v1 (no r/c/f frequencies)")
        if name == "coco-ovd":
            ovd = _coco_ovd_split()
            keep = ovd["base"] if split == "train" else ovd["base"] | ovd["novel"]
            gt = filter_categories(gt, sorted(keep & set(gt.category_ids)))
    elif (folder := _shapes_folder(key)) is not None:
        root = Path(read_shapes_world(folder)["root"])
        name, ann = "shapes", root / f"instances_{split}.json"
        images_dir = _check_images_dir(images if images is not None else root / split, key)
        gt = load_instances(ann)
    else:
        ann = Path(key).expanduser()
        if not ann.is_file():
            raise InputError(f"--dataset {key}: not one of {', '.join(DATASET_NAMES)}, shapes:DIR, "
                             "nor an existing instances file")
        name = "custom"
        images_dir = _check_images_dir(images if images is not None else ann.parent, key)
        gt = load_instances(ann)
    if not gt.images:
        raise InputError(f"{ann} lists no images")
    present, missing = resolve_images(gt, images_dir)
    if not present:
        raise InputError(f"none of the {len(gt.images)} images of {ann} is in {images_dir} "
                         f"(e.g. {gt.images[0]['file_name']})",
                         hint="--images must be the folder that holds the files named in the annotations")
    return DatasetImages(name=name, split=split, annotations=ann, images_dir=images_dir, present=present,
                         missing=missing)
