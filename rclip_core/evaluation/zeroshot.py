"""Zero-shot evaluation (spec 5.1, 5.2, 6.4) on COCO, COCO OVD, LVIS v1, ShapesWorld and any
COCO-format data set; the same loop evaluates any model that turns images into detections.

Three steps, each usable on its own:

1. :func:`resolve_dataset` turns ``--dataset`` / ``--images`` / ``--annotations`` into an
   :class:`EvalDataset`: the ground truth, the vocabulary (row ``i`` = class index ``i`` =
   category ``vocabulary.category_ids[i]``), the category splits and which images are on disk.

   ===================  ===============================================================
   ``coco-ovd``         COCO val2017 restricted to the 65 OVD classes (48 base + 17 novel,
                        spec 3.1); images left without any of them are dropped (4836 of
                        5000). Metrics: ``AP50_novel``, ``AP50_base``, ``AP50_all`` (spec 6.4).
   ``coco``             COCO val2017, 80 classes, all 5000 images: ``AP``, ``AP50``, ...
   ``lvis``             LVIS v1 val, 1203 classes: ``AP``, ``APr``, ``APc``, ``APf`` (300
                        detections per image, federated rules).
   ``shapes:DIR``/DIR   a ShapesWorld (``rclip data shapes``): its val split, novel/base from
                        its ``split.json``.
   ``PATH.json``        any COCO (or LVIS) instances file; the vocabulary is its categories
                        (names cleaned like LVIS names), a split from ``novel``/``base`` names.
   ===================  ===============================================================

   ``coco-ovd``/``coco`` read ``instances_val2017.json`` and ``lvis`` reads
   ``lvis_v1_val.json``, by default from ``<images>/../annotations/`` (or
   ``<images>/annotations/`` when ``images`` is the COCO root).

2. A :data:`Predictor` maps a batch of decoded images to detections. :func:`zero_shot_predictor`
   is the RegionCLIP zero-shot one (ground-truth boxes or RPN proposals, spec 5.1/5.2); a
   fine-tuned detector plugs in by providing another.

3. :func:`run_evaluation` decodes the images in DataLoader workers while the model runs, feeds
   the predictor in batches, collects the detections and computes the metrics with
   :func:`rclip_core.evaluation.metrics.evaluate_detections` on exactly the images that were
   evaluated (missing or unreadable images are counted, not guessed).

Region accuracy (GT-box mode only): the fraction of ground-truth boxes whose highest class
probability is their own class (``region_acc``; ``region_acc_<split>`` per split), the
region-recognition number of the ShapesWorld experiments.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import Tensor

from rclip_core.data.coco import DetectionSet, ResolvedImage, filter_categories, load_instances, \
    resolve_images, split_from_names
from rclip_core.data.transforms import PreparedImage
from rclip_core.data.vocab import Vocabulary, clean_lvis_name, get_vocabulary
from rclip_core.errors import InputError
from rclip_core.evaluation.metrics import evaluate_detections, per_category, summary_metrics
from rclip_core.pipeline import DetectOptions, ZeroShotPipeline, load_image_batches

__all__ = [
    "STANDARD_DATASETS", "LVIS_MAX_GT_BOXES", "EvalDataset", "ImageOutput", "Predictor", "EvalResult",
    "resolve_dataset", "default_options", "dataset_class_embeddings", "zero_shot_predictor",
    "detector_predictor",
    "run_evaluation", "same_class_names", "detections_to_results", "write_results_json", "make_report",
]

STANDARD_DATASETS: dict[str, tuple[str, str]] = {
    # name -> (shipped vocabulary, default annotations file name)
    "coco-ovd": ("coco-ovd", "instances_val2017.json"),
    "coco": ("coco", "instances_val2017.json"),
    "lvis": ("lvis", "lvis_v1_val.json"),
}

#: detectron2's LVIS loader keeps at most 500 ground-truth boxes per image (``clip_gt_crop``,
#: spec 3.2); in GT-box mode these are the regions the model sees.
LVIS_MAX_GT_BOXES = 500

# Coordinates are rounded before evaluation *and* in the saved results, so that evaluating the
# saved file reproduces the reported numbers exactly.
_BOX_DECIMALS = 3
_SCORE_DECIMALS = 8


# --------------------------------------------------------------------------------------------
# Data sets
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


def _norm(name: str) -> str:
    return " ".join(clean_lvis_name(str(name)).lower().split())


def same_class_names(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two class lists are the same classes in the same order (case, ``_`` and
    parentheses ignored, as in LVIS name cleaning)."""
    return len(a) == len(b) and all(_norm(x) == _norm(y) for x, y in zip(a, b))


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
        if _norm(names[cid]) != _norm(vocab.names[i]):
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


def _shapes_split(root: Path, gt: DetectionSet) -> dict[str, set[int]]:
    from rclip_core.fileio import read_json

    split = read_json(root / "split.json", what="ShapesWorld split file")
    try:
        out = {s: {int(c["id"]) for c in split[s]} for s in ("novel", "base")}
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{root / 'split.json'} has no 'novel'/'base' lists of {{id, name}}") from None
    unknown = (out["novel"] | out["base"]) - set(gt.category_ids)
    if unknown:
        raise InputError(f"{root / 'split.json'} names category ids {sorted(unknown)[:5]} that "
                         f"the annotations lack")
    return out


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
        raise InputError("no --dataset given", hint="coco-ovd, coco, lvis, shapes:DIR or PATH.json")
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
        if name == "lvis" and full.kind != "lvis":
            raise InputError(f"{ann} is a COCO instances file, not LVIS v1 (no r/c/f frequencies)",
                             hint="use lvis_v1_val.json, or --dataset coco / PATH.json for this file")
        if name != "lvis" and full.kind == "lvis":
            raise InputError(f"{ann} is an LVIS file, not COCO instances", hint="use --dataset lvis")
        vocab = get_vocabulary(vocab_name)
        _check_categories(full, vocab, ann, name)
        if novel is not None and name != "coco":
            raise InputError(f"--dataset {name} has its fixed split; --novel-classes works with "
                             "--dataset coco, shapes:DIR or PATH.json")
        if name == "coco-ovd":
            gt = filter_categories(full, vocab.category_ids)  # drops images without any of the 65
            splits = {s: {c for c, t in zip(vocab.category_ids, vocab.split or ()) if t == s}
                      for s in ("novel", "base")}
            description = "COCO OVD (65 classes: 17 novel + 48 base, generalized setting)"
        else:
            gt = full if len(full.categories) == len(vocab) else \
                filter_categories(full, vocab.category_ids, drop_empty_images=False)
            splits = split_from_names(gt, novel, base) if novel is not None else None
            description = "COCO (80 classes)" if name == "coco" else "LVIS v1 (1203 classes: r/c/f)"
    else:
        world_root: Path | None = None
        if key.startswith("shapes:") or Path(key).expanduser().is_dir():
            from rclip_core.data.shapes import read_shapes_world

            folder = Path(key[len("shapes:"):] if key.startswith("shapes:") else key).expanduser()
            world_root = Path(read_shapes_world(folder)["root"])
            ann = Path(annotations).expanduser() if annotations else world_root / "instances_val.json"
            default_images: Path | None = world_root / "val"
            name = "shapes"
        else:
            ann = Path(key).expanduser()
            if not ann.exists():
                raise InputError(f"--dataset {key}: not one of {', '.join(STANDARD_DATASETS)}, shapes:DIR, "
                                 "nor an existing instances file")
            if annotations:
                raise InputError("--annotations goes with --dataset coco-ovd|coco|lvis; "
                                 "with --dataset PATH.json the file is the annotations")
            default_images = None
            name = "custom"
            if (ann.parent / "world.json").is_file() and ann.name.startswith("instances_"):
                from rclip_core.data.shapes import read_shapes_world

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
    present.sort(key=lambda r: r.image["id"])
    return EvalDataset(name=name, gt=gt, vocabulary=vocab, splits=splits, annotations=ann,
                       images_dir=images_dir, present=present, missing=missing, description=description)


# --------------------------------------------------------------------------------------------
# Settings and class embeddings
# --------------------------------------------------------------------------------------------


def default_options(kind: str, boxes: str) -> DetectOptions:
    """The official zero-shot settings (spec 5.1 table) for ``kind`` (coco | lvis) and ``boxes``
    (gt | rpn): COCO score > 0.001, 100 detections; LVIS score > 0.02 (RPN) / 0.0001 (GT), 300
    detections; per-class NMS 0.5; every (box, class) pair may become a detection; RPN scores
    fused as the released code (``official``), GT boxes unfused."""
    if boxes not in ("gt", "rpn"):
        raise InputError(f"unknown --boxes {boxes!r}", hint="use gt or rpn")
    lvis = kind == "lvis"
    score = (0.0001 if boxes == "gt" else 0.02) if lvis else 0.001
    return DetectOptions(proposals="boxes" if boxes == "gt" else "rpn", score_thresh=score, nms_thresh=0.5,
                         max_dets=300 if lvis else 100, fusion="none" if boxes == "gt" else "official",
                         topk_labels=0)


def dataset_class_embeddings(model, vocab: Vocabulary, class_embeddings: str | os.PathLike | None = None,
                             templates: str = "clip81", average: str = "raw") -> Tensor:
    """[K, D] embeddings of the vocabulary's classes, rows in vocabulary order: read from
    ``class_embeddings`` (an official ``*_emb.pth`` or rclip embeddings file; its row count, and
    its class names when it has them, must match) or computed with the model's text tower and
    the prompt ensemble (cached on disk for trained weights)."""
    from rclip_core.models.regionclip import load_class_embeddings

    if class_embeddings:
        emb, names = load_class_embeddings(class_embeddings)
        if emb.dim() != 2 or emb.shape[0] != len(vocab):
            raise InputError(f"--class-embeddings has {emb.shape[0]} rows but the dataset has "
                             f"{len(vocab)} classes",
                             hint="the rows must be the dataset's classes in category-id order "
                                  "(e.g. coco_65_cls_emb.pth for coco-ovd, lvis_1203_cls_emb.pth for lvis)")
        if names:
            for i, (a, b) in enumerate(zip(names, vocab.names)):
                if _norm(a) != _norm(b):
                    raise InputError(f"--class-embeddings row {i} is {a!r} but the dataset's class {i} "
                                     f"is {b!r}",
                                     hint="the rows must be the dataset's classes in category-id order")
        if emb.shape[1] != model.embed_dim:
            raise InputError(f"--class-embeddings have dimension {emb.shape[1]} but the model's region "
                             f"embeddings have {model.embed_dim}",
                             hint="use embeddings made with the same architecture")
        return emb.float()
    if not model.has_text:
        raise InputError("these weights have no text encoder, so the class names cannot be embedded",
                         hint="pass --class-embeddings FILE (an official *_emb.pth or `rclip embed` output)")
    from rclip_core.models.text import EmbeddingCache, get_tokenizer, load_templates
    from rclip_core.models.text import class_embeddings as embed_names

    tmpl = load_templates(templates or "clip81")
    cache = None if model.info.source_format == "random" else EmbeddingCache()
    return embed_names(model.clip, get_tokenizer(model.arch.context_length), list(vocab.names),
                       templates=tmpl, average=average or "raw", cache=cache,
                       model_id=model.identity() if cache else None)


# --------------------------------------------------------------------------------------------
# Predictors
# --------------------------------------------------------------------------------------------


@dataclass
class ImageOutput:
    """Detections of one image, in original-image pixels."""

    boxes: Tensor  # [M, 4] XYXY
    scores: Tensor  # [M]
    classes: Tensor  # [M] int64 class index (vocabulary row)
    gt_probs: Tensor | None = None  # [G, K] class probabilities of the given boxes (GT-box mode)


BatchItem = tuple[PreparedImage, str, "np.ndarray | None"]
#: ``predict(items) -> outputs``: items are ``(resized image, path, given boxes [G, 4] XYXY in
#: original pixels or None)``, one output per item. A fine-tuned detector plugs in here.
Predictor = Callable[[Sequence[BatchItem]], list[ImageOutput]]


def zero_shot_predictor(pipeline: ZeroShotPipeline) -> Predictor:
    """RegionCLIP zero-shot inference: given (ground-truth) boxes or the pipeline's proposals
    (spec 5.1/5.2), region embeddings, classification against the class embeddings and the
    official post-processing. With given boxes the output also carries their class
    probabilities, for region accuracy."""
    if pipeline.class_embeddings is None:
        raise InputError("zero-shot evaluation needs class embeddings")
    from rclip_core.models.zeroshot import region_class_probs

    class_emb = pipeline.class_embeddings.cpu()  # region embeddings come back on the CPU

    def predict(items: Sequence[BatchItem]) -> list[ImageOutput]:
        outs = []
        for (prep, path, given), res in zip(items, pipeline.run_batch(items)):
            d = res.detections
            probs = None
            if given is not None:
                probs = region_class_probs(res.embeddings, class_emb)
            outs.append(ImageOutput(d.boxes, d.scores, d.classes, probs))
        return outs

    return predict


def detector_predictor(detector) -> Predictor:
    """A fine-tuned detector (:class:`rclip_core.models.detector.Detector`): its own proposals,
    box regression and post-processing; ``detector.detect`` returns boxes in original pixels
    and class indices into its eval-mode vocabulary (set it to the dataset's first)."""

    def predict(items: Sequence[BatchItem]) -> list[ImageOutput]:
        dets = detector.detect([prep for prep, _, _ in items])
        return [ImageOutput(d.boxes, d.scores, d.classes) for d in dets]

    return predict


# --------------------------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Metrics (0-100 scale; ``region_acc*`` are fractions) and what they cover."""

    metrics: dict[str, float]
    per_category: dict[str, dict[int, float]]  # {"AP": {category id: value}, "AP50": {...}}
    detections: np.ndarray  # [N, 7] rows [image_id, x, y, w, h, score, category_id]
    image_ids: list[int]  # the images the metrics cover
    num_images: int  # images of the ground truth
    missing: list[str]  # files not on disk
    failed: list[tuple[str, str]]  # (file, reason): unreadable, or a size that contradicts the annotations
    region_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (correct, boxes)
    seconds_inference: float = 0.0
    seconds_metrics: float = 0.0

    @property
    def coverage(self) -> str:
        return f"{len(self.image_ids)}/{self.num_images}"


def _gt_boxes(anns: Sequence[dict], index: Mapping[int, int], lvis: bool) -> tuple[np.ndarray, np.ndarray]:
    """Non-crowd ground-truth boxes of an image: ([G, 4] XYXY float64, [G] class index)."""
    anns = [a for a in anns if not a.get("iscrowd", 0)]
    if lvis:
        anns = anns[:LVIS_MAX_GT_BOXES]
    if not anns:
        return np.zeros((0, 4)), np.zeros((0,), dtype=np.int64)
    b = np.array([a["bbox"] for a in anns], dtype=np.float64)
    xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
    return xyxy, np.array([index[a["category_id"]] for a in anns], dtype=np.int64)


def run_evaluation(dataset: EvalDataset, predict: Predictor, *, gt_boxes: bool, short_side: int = 800,
                   max_size: int = 1333, backend: str = "faster", batch_size: int = 1, workers: int = 0,
                   max_images: int | None = None, progress: Callable[[int], None] | None = None,
                   metrics_progress: Callable[[int], None] | None = None) -> EvalResult:
    """Run ``predict`` over the data set's images on disk and score the detections.

    Args:
        gt_boxes: give each image's non-crowd ground-truth boxes to ``predict`` (GT-box mode)
            and measure region accuracy.
        short_side, max_size: the test-time resize (spec 1.5).
        batch_size: images per ``predict`` call; ``workers``: DataLoader processes decoding
            ahead of the model (0 = in this process).
        max_images: evaluate only the first N images on disk (by image id), for quick checks.
        progress: called with the number of images finished; ``metrics_progress`` with the
            number of categories scored.

    An image that cannot be read, or whose size contradicts the annotations (its boxes would
    not fit), is reported in ``failed`` and left out of the metrics, like a missing one.
    """
    if max_images is not None and max_images < 1:
        raise InputError("--max-images must be >= 1")
    images = dataset.present[:max_images] if max_images else list(dataset.present)
    by_image: dict[int, list[dict]] = {}
    for a in dataset.gt.annotations:
        by_image.setdefault(a["image_id"], []).append(a)
    cat_ids = np.array(dataset.vocabulary.category_ids, dtype=np.int64)
    class_index = dataset.vocabulary.index_of_category
    lvis = dataset.kind == "lvis"
    class_split: dict[str, np.ndarray] = {}
    if dataset.splits:
        for s, ids in dataset.splits.items():
            class_split[s] = np.isin(cat_ids, np.array(sorted(ids), dtype=np.int64))

    rows: list[np.ndarray] = []
    evaluated: list[int] = []
    failed: list[tuple[str, str]] = []
    correct, total = 0, 0
    split_counts = {s: [0, 0] for s in class_split}
    t0 = time.perf_counter()
    paths = [str(r.path) for r in images]
    for batch in load_image_batches(paths, short_side, max_size, batch_size=batch_size, workers=workers):
        todo: list[BatchItem] = []
        todo_meta: list[tuple[int, np.ndarray]] = []
        done_now = 0
        for i, prep, err in batch:
            img = images[i].image
            if err is None and tuple(prep.orig_size) != (int(img["height"]), int(img["width"])):
                err = (f"image is {prep.orig_size[1]}x{prep.orig_size[0]} but the annotations say "
                       f"{img['width']}x{img['height']}")
            if err is not None:
                failed.append((paths[i], err))
                done_now += 1
                continue
            evaluated.append(int(img["id"]))
            given, classes = None, np.zeros(0, dtype=np.int64)
            if gt_boxes:
                given, classes = _gt_boxes(by_image.get(int(img["id"]), ()), class_index, lvis)
                if len(given) == 0:  # nothing to classify: no detections, still evaluated
                    done_now += 1
                    continue
            todo.append((prep, paths[i], given))
            todo_meta.append((int(img["id"]), classes))
        outputs = predict(todo) if todo else []
        for (image_id, classes), out in zip(todo_meta, outputs):
            if len(out.scores):
                b = out.boxes.detach().cpu().double().numpy().reshape(-1, 4)
                r = np.empty((len(b), 7), dtype=np.float64)
                r[:, 0] = image_id
                r[:, 1:3] = b[:, :2]
                r[:, 3:5] = b[:, 2:] - b[:, :2]
                r[:, 5] = out.scores.detach().cpu().double().numpy()
                r[:, 6] = cat_ids[out.classes.detach().cpu().numpy()]
                rows.append(r)
            if gt_boxes and out.gt_probs is not None and len(classes):
                hit = out.gt_probs.argmax(dim=1).cpu().numpy() == classes
                correct += int(hit.sum())
                total += int(len(hit))
                for s, in_split in class_split.items():
                    m = in_split[classes]
                    split_counts[s][0] += int(hit[m].sum())
                    split_counts[s][1] += int(m.sum())
        done_now += len(todo)
        if progress is not None and done_now:
            progress(done_now)
    t1 = time.perf_counter()

    if not evaluated:
        first = failed[0][1] if failed else "no images"
        raise InputError(f"none of the {len(images)} images could be evaluated; first problem: {first}")
    dets = np.concatenate(rows) if rows else np.zeros((0, 7))
    dets[:, 1:5] = np.round(dets[:, 1:5], _BOX_DECIMALS)
    dets[:, 5] = np.round(dets[:, 5], _SCORE_DECIMALS)
    full = evaluate_detections(dataset.gt, dets, backend=backend, splits=dataset.splits, image_ids=evaluated,
                               progress=metrics_progress)
    metrics = summary_metrics(full)
    region_counts: dict[str, tuple[int, int]] = {}
    if gt_boxes:
        metrics["region_acc"] = correct / total if total else float("nan")
        region_counts["all"] = (correct, total)
        for s, (c, n) in split_counts.items():
            if s == "all":
                continue
            metrics[f"region_acc_{s}"] = c / n if n else float("nan")
            region_counts[s] = (c, n)
    return EvalResult(metrics=metrics,
                      per_category={"AP": per_category(full, "AP"), "AP50": per_category(full, "AP50")},
                      detections=dets, image_ids=sorted(evaluated), num_images=dataset.num_images,
                      missing=[str(m["file_name"]) for m in dataset.missing], failed=failed,
                      region_counts=region_counts, seconds_inference=t1 - t0,
                      seconds_metrics=time.perf_counter() - t1)


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------


def detections_to_results(dets: np.ndarray) -> list[dict]:
    """[N, 7] rows -> COCO results format ``[{image_id, category_id, bbox: [x, y, w, h], score}]``."""
    return [{"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [float(v) for v in r[1:5]],
             "score": float(r[5])} for r in dets]


def write_results_json(path: str | os.PathLike, dets: np.ndarray, chunk: int = 100_000) -> Path:
    """Write the detections as a COCO results JSON, atomically and in chunks (LVIS runs have
    millions of detections)."""
    import json

    from rclip_core.fileio import atomic_write

    def write(p: Path) -> None:
        with open(p, "w", encoding="utf-8") as f:
            f.write("[")
            for start in range(0, len(dets), chunk):
                part = detections_to_results(dets[start:start + chunk])
                text = ",\n".join(json.dumps(d, separators=(",", ":")) for d in part)
                f.write(("," if start else "") + "\n" + text)
            f.write("\n]\n")

    return atomic_write(path, write)


def _finite(x: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def make_report(result: EvalResult, dataset: EvalDataset, *, mode: str, model: dict[str, Any],
                settings: dict[str, Any], files: Mapping[str, str | None]) -> dict[str, Any]:
    """The JSON report: metrics, per-category AP, what they cover, model, dataset, split,
    settings and sha256 of the input files. Undefined metrics (no ground truth) are null."""
    from rclip_core import __version__

    names = dataset.gt.category_names()
    n_dets = len(result.detections)
    report = {
        "rclip_version": __version__,
        "mode": mode,
        "metrics": result.metrics,
        "coverage": {
            "images_evaluated": len(result.image_ids), "images_total": result.num_images,
            "text": f"{result.coverage} images", "images_missing": len(result.missing),
            "images_failed": len(result.failed), "missing_examples": result.missing[:20],
            "failed_examples": [{"file": f, "reason": r} for f, r in result.failed[:20]],
        },
        "region_accuracy_counts": {k: {"correct": c, "boxes": n}
                                   for k, (c, n) in result.region_counts.items()},
        "detections": n_dets,
        "model": model,
        "dataset": {
            "name": dataset.name, "description": dataset.description, "kind": dataset.kind,
            "annotations": str(dataset.annotations), "images": str(dataset.images_dir),
            "num_images": dataset.num_images, "num_classes": len(dataset.vocabulary),
            "num_annotations": len(dataset.gt.annotations),
        },
        "split": None if not dataset.splits else {
            s: [{"id": i, "name": names[i]} for i in sorted(ids)] for s, ids in dataset.splits.items()},
        "settings": settings,
        "files": dict(files),
        "timing": {"inference_seconds": round(result.seconds_inference, 3),
                   "metrics_seconds": round(result.seconds_metrics, 3),
                   "images_per_second": round(len(result.image_ids) / max(result.seconds_inference, 1e-9),
                                              3)},
        "per_category": {m: {str(k): v for k, v in vals.items()} for m, vals in result.per_category.items()},
    }
    return _finite(report)
