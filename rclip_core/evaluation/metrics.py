"""COCO and LVIS box and mask AP, with the open-vocabulary (novel/base/all) split metrics,
under the standard protocol or LVIS Fixed AP.

One entry point, :func:`evaluate_detections`, three interchangeable backends:

- ``"faster"`` (default): faster-coco-eval's C++ COCOeval, in COCO mode or LVIS mode
  (``lvis_style=True``: federated negatives / not-exhaustive lists, r/c/f groups);
- ``"pycocotools"``: the COCO reference (COCO mode only);
- ``"lvis"``: the LVIS reference, ``lvis`` 0.5.3 through :mod:`.lvis_compat` (LVIS mode only).

All metrics are on a 0-100 scale (detectron2's convention); NaN where a metric is undefined
(no ground truth for it), where the backends say -1.

**How the numbers are formed.** Every backend produces the same accumulated precision array
``P[T, R, K, A]`` (T=10 IoU thresholds 0.50:0.95, R=101 recall thresholds, K categories in
ascending id order, A=4 area ranges all/small/medium/large) at the largest max-detections
setting; entries are -1 where a category has no (non-ignored) ground truth. Each metric is
the mean of the valid (> -1) entries of a slab of ``P``, which is exactly how COCOeval's and
LVISEval's ``summarize`` compute AP, AP50, AP75, APs/m/l and APr/c/f.

The OVD split metrics follow RegionCLIP's ``COCOEvaluator._derive_coco_results``
(detectron2/evaluation/coco_evaluation.py, after OVR-CNN): ``AP50_split_<s>`` is
``mean(s[s > -1])`` with ``s = precision[t=IoU 0.5, :, cats_of_split, area "all", maxDets 100]``:
one mean over the whole [R, K_split] slab, *not* a mean of per-class APs computed separately.
The two coincide whenever every class of the split has ground truth, because COCOeval fills a
category's column either entirely with valid values (0 where recall is not reached) or
entirely with -1 (no ground truth); so a class without ground truth simply drops out. Here
the split metrics are ``AP50_<name>`` (and ``AP_<name>`` over IoU 0.50:0.95), plus
``AP50_all`` over the union of the splits (the 65 OVD classes for COCO), unless a split is
itself named ``all``. The headline COCO OVD numbers are ``AP50_novel`` and ``AP50_all``; to
reproduce the paper, evaluate on the 65-class ground truth
(``filter_categories(dataset, novel | base)``), as the official split json does.

Per-category values come as ``"AP/<category id>"`` and ``"AP50/<category id>"`` keys
(see :func:`per_category`).

**Protocols** (:data:`PROTOCOLS`). ``"standard"``: COCOeval's 100 detections per image and
category (COCO) or ``LVISResults``' 300 top-scoring detections per image (LVIS). ``"fixed-ap"``
(LVIS only; Dave et al. 2021, "Evaluating Large-Vocabulary Object Detectors: The Devil is in
the Details", ``large-vocab-devil/scripts/evaluate_ap_fixed.py``): the top
``per_class_budget`` (10,000) detections of each category over the whole split, ties in input
order (a stable sort, as the reference's ``sorted``), taken *before* the federated filter, and
no per-image cap (``LVISResults(max_dets=-1)``, ``params.max_dets = -1``); everything else is
LVISEval's. A category with fewer than the budget is scored on what it has (the reference
warns; :func:`evaluate_detections` reports the count as ``classes_under_budget``).

**Masks** (``iou_type="segm"``): each detection carries a compressed RLE (COCO results
``segmentation``); IoU is mask IoU and a detection's area is its mask's area: the result's
``bbox`` is not used for the size ranges, as ``detectron2/evaluation/coco_evaluation.py:
_evaluate_predictions_on_coco`` and ``lvis_evaluation.py: _evaluate_predictions_on_lvis`` drop
it (pycocotools' ``loadRes`` and ``LVISResults`` would otherwise take the box area). Ground
truth needs ``segmentation`` (polygons or RLE) on every annotation; its ``area`` is used as
given, as every backend does.

**Memory.** COCO/LVIS AP is not decomposable over images: accumulation ranks one category's
detections over all images. It *is* decomposable over categories: column k of ``P`` depends
only on category k's detections and ground truth (the per-(image, category) matching, the
max-detections cap per (image, category), and LVIS's federated rules, which ask only whether
category k is positive, negative or not exhaustive in an image). So evaluation runs in chunks
of categories, and the slabs are concatenated; the result is identical to a single run (up
to floating-point summation order in the final means). Detections are held as NumPy arrays
(about 56 bytes each) and turned into the dicts the backends need (about 0.7 kB each) one
chunk at a time, at most ``max_chunk_detections`` of them, on at most ``max_chunk_pairs``
(image, category) pairs: faster-coco-eval allocates about 1.1 kB for every pair of the image x
category grid it is given, so LVIS val in one piece (19.8k x 1203 = 23.8M pairs) needs about
28 GB; in chunks the whole evaluation peaks at 1.7 GB (``benchmarks/eval_scale.py``). Only the images
that have ground truth or detections of a chunk's categories are given to the backend, which
is exact too: an (image, category) pair with neither contributes nothing. Cross-category
rules are applied once, before chunking: LVIS's cap of ``max_dets`` top-scoring detections
per image, and its federated filter (a detection of a category that is neither annotated in
nor negative for its image is dropped, as LVISEval does).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np

from rclip_core.data.coco import DetectionSet, load_instances
from rclip_core.errors import InputError, RuntimeFailure
from rclip_core.fileio import read_json

Backend = Literal["faster", "pycocotools", "lvis"]
BACKENDS: tuple[str, ...] = ("faster", "pycocotools", "lvis")
PROTOCOLS: tuple[str, ...] = ("standard", "fixed-ap")
IOU_TYPES: tuple[str, ...] = ("bbox", "segm")
#: Fixed AP's detections per category over the split (Dave et al. 2021, K = 10,000 for LVIS)
FIXED_AP_BUDGET = 10_000
_BACKEND_KINDS = {"faster": ("coco", "lvis"), "pycocotools": ("coco",), "lvis": ("lvis",)}

COCO_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
LVIS_METRICS = COCO_METRICS + ("APr", "APc", "APf")

# COCOeval / LVISEval parameters (identical in all three packages)
_IOU_THRS = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
_NUM_RECALLS = 101
_AREA_LABELS = ("all", "small", "medium", "large")
_RESULTS_FORMAT = "COCO results format: [{image_id, category_id, bbox: [x, y, w, h], score}, ...]"


class _Detections:
    """Detections as parallel arrays: image ids, category ids, boxes [x, y, w, h], scores, and
    for mask AP the RLEs (an object array) and their areas."""

    def __init__(self, image_id: np.ndarray, category_id: np.ndarray, box: np.ndarray, score: np.ndarray,
                 segm: np.ndarray | None = None, segm_area: np.ndarray | None = None):
        self.image_id, self.category_id, self.box, self.score = image_id, category_id, box, score
        self.segm, self.segm_area = segm, segm_area

    def __len__(self) -> int:
        return len(self.score)

    def take(self, index: np.ndarray) -> "_Detections":
        return _Detections(self.image_id[index], self.category_id[index], self.box[index], self.score[index],
                           None if self.segm is None else self.segm[index],
                           None if self.segm_area is None else self.segm_area[index])

    def area(self) -> np.ndarray:
        """What the backends rank by size: the mask area for mask AP, else the box area."""
        return self.segm_area if self.segm is not None else self.box[:, 2] * self.box[:, 3]


def _attach_masks(dets: _Detections, segmentations: Any, images: Mapping[int, dict]) -> _Detections:
    """Check ``segmentations`` (one compressed RLE ``{"size": [h, w], "counts": str}`` per
    detection, the size of its image) and attach them with their areas."""
    n = len(dets)
    if segmentations is None:
        raise InputError("mask AP needs a segmentation (RLE) for every detection")
    segm = np.empty(n, dtype=object)
    if len(segmentations) != n:
        raise InputError(f"{len(segmentations)} segmentations for {n} detections")
    for i, rle in enumerate(segmentations):
        if not (isinstance(rle, Mapping) and isinstance(rle.get("counts"), (str, bytes))
                and isinstance(rle.get("size"), (list, tuple)) and len(rle["size"]) == 2):
            raise InputError(f"detection #{i} has no compressed RLE segmentation ({{size: [h, w], counts: str}})",
                             hint="encode masks with pycocotools.mask.encode")
        img = images.get(int(dets.image_id[i]))
        if img is not None and [int(v) for v in rle["size"]] != [int(img["height"]), int(img["width"])]:
            raise InputError(f"detection #{i}: its mask is {rle['size'][1]}x{rle['size'][0]} but image "
                             f"{int(dets.image_id[i])} is {img['width']}x{img['height']}")
        segm[i] = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"]}
    from pycocotools import mask as mask_utils

    # pycocotools 2.0.11's area() overflows a uint8 counter past 255 masks: 255 at a time
    area = np.zeros(n, dtype=np.float64)
    for a in range(0, n, 255):
        area[a:a + 255] = mask_utils.area(list(segm[a:a + 255]))
    return _Detections(dets.image_id, dets.category_id, dets.box, dets.score, segm, area)


def _as_detections(detections: Any) -> _Detections:
    if isinstance(detections, (str, os.PathLike)):
        detections = read_json(Path(detections), what="detections file")
        if isinstance(detections, dict):
            raise InputError("the detections file is a JSON object, expected a list of detections",
                             hint=_RESULTS_FORMAT)
    if isinstance(detections, np.ndarray):
        if detections.ndim != 2 or detections.shape[1] != 7:
            raise InputError(f"a detections array must be (N, 7) [image_id, x, y, w, h, score, category_id], "
                             f"got shape {tuple(detections.shape)}")
        a = np.asarray(detections, dtype=np.float64)
        dets = _Detections(a[:, 0].astype(np.int64), a[:, 6].astype(np.int64), a[:, 1:5].copy(),
                           a[:, 5].copy())
    else:
        if not isinstance(detections, Sequence):
            raise InputError(f"detections must be a list of dicts, an (N, 7) array or a JSON path, "
                             f"not {type(detections).__name__}")
        n = len(detections)
        try:
            image_id = np.fromiter((d["image_id"] for d in detections), dtype=np.int64, count=n)
            category_id = np.fromiter((d["category_id"] for d in detections), dtype=np.int64, count=n)
            score = np.fromiter((d["score"] for d in detections), dtype=np.float64, count=n)
            box = np.array([d["bbox"] for d in detections], dtype=np.float64).reshape(n, 4)
        except (KeyError, TypeError, ValueError, IndexError):
            raise InputError(_first_bad_detection(detections), hint=_RESULTS_FORMAT) from None
        dets = _Detections(image_id, category_id, box, score)
    if not (np.isfinite(dets.box).all() and np.isfinite(dets.score).all()):
        raise InputError("detections contain NaN or infinite boxes or scores")
    if (dets.box[:, 2:] < 0).any():
        raise InputError("detections contain boxes with negative width or height",
                         hint="boxes are [x, y, width, height] (COCO results format), not [x1, y1, x2, y2]")
    return dets


def _first_bad_detection(detections: Sequence) -> str:
    for i, d in enumerate(detections):
        if not isinstance(d, Mapping):
            return f"detection #{i} is not an object"
        for key in ("image_id", "category_id", "bbox", "score"):
            if key not in d:
                return f"detection #{i} has no '{key}'"
        box = d["bbox"]
        if not isinstance(box, (list, tuple)) or len(box) != 4:
            return f"detection #{i} has a bad bbox {box!r} (expected [x, y, w, h])"
        for key in ("image_id", "category_id", "score"):
            if not isinstance(d[key], (int, float)) or isinstance(d[key], bool):
                return f"detection #{i} has a non-numeric '{key}' {d[key]!r}"
    return "detections are not in the COCO results format"


def _per_image_top_k(dets: _Detections, k: int) -> np.ndarray:
    """Indices (in input order) of each image's ``k`` top-scoring detections; ties keep input
    order, as ``lvis.LVISResults.limit_dets_per_image`` (a stable sort) does."""
    return _top_k_per_group(dets.image_id, dets.score, k)


def _top_k_per_group(group: np.ndarray, score: np.ndarray, k: int) -> np.ndarray:
    """Indices (in input order) of the ``k`` top-scoring entries of each group, ties in input
    order (per image: ``LVISResults.limit_dets_per_image``; per category: Fixed AP's
    ``sorted(cat_anns, key=score, reverse=True)[:K]``, both stable)."""
    n = len(score)
    order = np.argsort(-score, kind="stable")
    order = order[np.argsort(group[order], kind="stable")]
    g = group[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    rank = np.arange(n) - np.repeat(starts, np.diff(np.r_[starts, n]))
    return np.sort(order[rank < k])


class _Engine:
    """Runs one backend on chunks of categories. ``run`` returns ``P[T, R, Kc, A]``."""

    def __init__(self, backend: str, kind: str, gt: dict, max_dets: int, iou_type: str = "bbox",
                 lvis_max_dets: int | None = None):
        # max_dets: the backends' per-(image, category) cap (COCOeval's maxDets); lvis_max_dets:
        # LVISEval's params.max_dets (-1 under Fixed AP, as the reference sets it)
        self.backend, self.kind, self.gt, self.max_dets = backend, kind, gt, max_dets
        self.iou_type = iou_type
        self.lvis_max_dets = max_dets if lvis_max_dets is None else lvis_max_dets
        with contextlib.redirect_stdout(io.StringIO()):
            if backend == "faster":
                from faster_coco_eval import COCO

                self.gt_api = COCO(gt, print_function=_silent)
            elif backend == "pycocotools":
                from pycocotools.coco import COCO

                self.gt_api = COCO()
                self.gt_api.dataset = gt
                self.gt_api.createIndex()
            else:
                from rclip_core.evaluation.lvis_compat import lvis_from_dict

                self.gt_api = lvis_from_dict(gt)

    def run(self, cat_ids: list[int], img_ids: list[int], dt_anns: list[dict]) -> np.ndarray:
        dt = {"images": self.gt["images"], "categories": self.gt["categories"], "annotations": dt_anns}
        with contextlib.redirect_stdout(io.StringIO()):
            if self.backend == "faster":
                from faster_coco_eval import COCO, COCOeval_faster

                dt_api = COCO(dt, print_function=_silent)
                ev = COCOeval_faster(self.gt_api, dt_api, self.iou_type, print_function=_silent,
                                     lvis_style=self.kind == "lvis")
                ev.params.imgIds, ev.params.catIds, ev.params.maxDets = img_ids, cat_ids, [self.max_dets]
                ev.evaluate()
                ev.accumulate()
                precision = np.asarray(ev.eval["precision"])[..., -1]
            elif self.backend == "pycocotools":
                from pycocotools.coco import COCO
                from pycocotools.cocoeval import COCOeval

                dt_api = COCO()
                dt_api.dataset = dt
                dt_api.createIndex()
                ev = COCOeval(self.gt_api, dt_api, self.iou_type)
                ev.params.imgIds, ev.params.catIds, ev.params.maxDets = img_ids, cat_ids, [self.max_dets]
                ev.evaluate()
                ev.accumulate()
                precision = ev.eval["precision"][..., -1]
            else:
                from rclip_core.evaluation.lvis_compat import lvis_api, lvis_results

                _, _, LVISEval = lvis_api()
                ev = LVISEval(self.gt_api, lvis_results(self.gt_api, dt_anns), self.iou_type)
                ev.params.img_ids, ev.params.cat_ids = img_ids, cat_ids
                ev.params.max_dets = self.lvis_max_dets
                ev.evaluate()
                ev.accumulate()
                precision = ev.eval["precision"]
        expected = (len(_IOU_THRS), _NUM_RECALLS, len(cat_ids), len(_AREA_LABELS))
        if precision.shape != expected:  # a backend with other parameters would change every number
            raise RuntimeFailure(f"the {self.backend} backend returned precision of shape {precision.shape}, "
                                 f"expected {expected}",
                                 hint="an unsupported version of the evaluation package?")
        return precision


def _silent(*args, **kwargs) -> None:
    return None


def _mean_valid(s: np.ndarray) -> float:
    valid = s[s > -1]
    return float(np.mean(valid) * 100) if valid.size else float("nan")


def evaluate_detections(
    gt: str | os.PathLike | dict | DetectionSet,
    detections: Sequence[Mapping] | np.ndarray | str | os.PathLike,
    kind: Literal["auto", "coco", "lvis"] = "auto",
    backend: Backend = "faster",
    splits: Mapping[str, Iterable[int]] | None = None,
    max_dets: int | None = None,
    image_ids: Iterable[int] | None = None,
    *,
    protocol: str = "standard",
    per_class_budget: int | None = None,
    iou_type: str = "bbox",
    segmentations: Sequence[Mapping] | None = None,
    max_chunk_detections: int = 500_000,
    max_chunk_pairs: int = 250_000,
    progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Box or mask AP of ``detections`` against the ground truth ``gt`` (0-100 scale).

    Args:
        gt: instances file path, dict, or a loaded :class:`DetectionSet`.
        detections: COCO results format: a list of ``{image_id, category_id, bbox: [x, y, w, h],
            score}`` (dataset category ids; for LVIS, class index + 1), a JSON file of that
            list, or an ``(N, 7)`` array of rows ``[image_id, x, y, w, h, score, category_id]``.
        kind: ``"coco"`` (standard COCOeval) or ``"lvis"`` (federated LVIS rules, APr/c/f);
            ``"auto"`` follows the ground truth.
        backend: ``"faster"`` (both kinds), ``"pycocotools"`` (COCO), ``"lvis"`` (LVIS).
        splits: optional category-id sets, e.g. ``{"novel": {...}, "base": {...}}``; adds
            ``AP50_<name>``, ``AP_<name>`` and ``AP50_all``/``AP_all`` (union of the splits).
        max_dets: detections per image: COCOeval's maxDets (per image and category; default 100)
            for COCO, the per-image cap for LVIS (default 300). Not with ``fixed-ap``.
        image_ids: evaluate on these images only (default: all images of ``gt``).
        protocol: ``"standard"`` or ``"fixed-ap"`` (LVIS; see the module docstring).
        per_class_budget: Fixed AP's detections per category over the split (default
            :data:`FIXED_AP_BUDGET`).
        iou_type: ``"bbox"`` (box AP) or ``"segm"`` (mask AP: ``segmentations`` gives one
            compressed RLE per detection, in the same order; a detection's ``segmentation`` key
            when ``detections`` is a list of dicts or a results file).
        max_chunk_detections, max_chunk_pairs: memory bounds for one chunk of categories
            (see the module docstring); they do not change the result.
        progress: called with the number of categories finished after each chunk.

    Returns:
        ``AP, AP50, AP75, APs, APm, APl`` (+ ``APr, APc, APf`` for LVIS), the split metrics if
        ``splits`` is given, and per-category ``"AP/<id>"``, ``"AP50/<id>"``. NaN = undefined.
        Under ``fixed-ap`` also ``classes_under_budget``: categories with fewer detections
        than the budget (their AP is lower than the detector could reach with more).
    """
    if backend not in BACKENDS:
        raise InputError(f"unknown evaluation backend {backend!r}", hint=f"use one of: {', '.join(BACKENDS)}")
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown evaluation protocol {protocol!r}", hint=f"use one of: {', '.join(PROTOCOLS)}")
    if iou_type not in IOU_TYPES:
        raise InputError(f"unknown IoU type {iou_type!r}", hint="use bbox or segm")
    if isinstance(gt, DetectionSet):
        dataset = gt
        if kind != "auto" and dataset.kind != kind:
            raise InputError(f"the ground truth is a {dataset.kind.upper()} dataset, not {kind.upper()}")
    else:
        dataset = load_instances(gt, kind=kind)
    kind = dataset.kind
    if kind not in _BACKEND_KINDS[backend]:
        other = "lvis" if kind == "lvis" else "pycocotools"
        raise InputError(f"the {backend} backend cannot evaluate {kind.upper()} (federated rules differ)",
                         hint=f"use --backend faster or --backend {other}")
    fixed = protocol == "fixed-ap"
    if fixed:
        if kind != "lvis":
            raise InputError("Fixed AP is an LVIS protocol (federated, 10,000 detections per class); "
                             f"this ground truth is {kind.upper()}", hint="use the standard protocol")
        if max_dets is not None:
            raise InputError("Fixed AP has no per-image cap: give a per-class budget, not max_dets")
        budget = int(per_class_budget) if per_class_budget is not None else FIXED_AP_BUDGET
        if budget < 1:
            raise InputError(f"the per-class detection budget must be at least 1, got {budget}")
        max_dets = budget  # the backends' per-(image, category) cap: never binds under the class budget
    else:
        if per_class_budget is not None:
            raise InputError("a per-class detection budget belongs to the fixed-ap protocol")
        max_dets = int(max_dets) if max_dets is not None else (300 if kind == "lvis" else 100)
        if max_dets < 1:
            raise InputError(f"max_dets must be at least 1, got {max_dets}")

    # ---- ground truth as compact arrays and dicts (fresh annotation ids 1..N: COCOeval marks
    # matches with ids and treats id 0 as "unmatched")
    cat_ids = np.array(dataset.category_ids, dtype=np.int64)
    cat_index = {int(c): k for k, c in enumerate(cat_ids)}
    all_image_ids = np.array(sorted(dataset.image_ids), dtype=np.int64)
    if image_ids is not None:
        eval_images = np.unique(np.fromiter((int(i) for i in image_ids), dtype=np.int64))
        unknown = np.setdiff1d(eval_images, all_image_ids)
        if unknown.size:
            raise InputError(f"{unknown.size} requested image id(s) are not in the ground truth "
                             f"(e.g. {unknown[0]})")
    else:
        eval_images = all_image_ids
    eval_image_set = set(eval_images.tolist())

    gt_anns = [a for a in dataset.annotations if a["image_id"] in eval_image_set]
    gt_img = np.fromiter((a["image_id"] for a in gt_anns), dtype=np.int64, count=len(gt_anns))
    gt_cat = np.fromiter((a["category_id"] for a in gt_anns), dtype=np.int64, count=len(gt_anns))
    images_by_id = {img["id"]: img for img in dataset.images}
    gt_images = []
    for i in eval_images.tolist():
        img = images_by_id[i]
        entry = {"id": i, "width": img["width"], "height": img["height"]}
        if kind == "lvis":
            entry["neg_category_ids"] = list(img["neg_category_ids"])
            entry["not_exhaustive_category_ids"] = list(img["not_exhaustive_category_ids"])
        gt_images.append(entry)
    gt_categories = [{"id": c["id"], "name": c["name"],
                      **({"frequency": c["frequency"]} if kind == "lvis" else {})}
                     for c in sorted(dataset.categories, key=lambda c: c["id"])]
    segm = iou_type == "segm"
    if segm:
        bare = next((a for a in gt_anns if not a.get("segmentation")), None)
        if bare is not None:
            raise InputError(f"mask AP needs ground-truth masks, but annotation {bare.get('id')} of image "
                             f"{bare['image_id']} has no 'segmentation'",
                             hint="use instances with polygons or RLE (ShapesWorld writes them since this version: "
                                  "regenerate it with rclip data shapes)")
    gt_dict = {"images": gt_images, "categories": gt_categories, "annotations": [
        {"id": n + 1, "image_id": a["image_id"], "category_id": a["category_id"], "bbox": list(a["bbox"]),
         "area": a["area"], "iscrowd": int(a.get("iscrowd", 0)),
         **({"segmentation": a["segmentation"]} if segm else {})} for n, a in enumerate(gt_anns)]}

    # ---- detections
    dets = _as_detections(detections)
    if segm:
        if segmentations is None and isinstance(detections, (str, os.PathLike, list, tuple)):
            listed = read_json(Path(detections), what="detections file") \
                if isinstance(detections, (str, os.PathLike)) else detections
            segmentations = [d.get("segmentation") if isinstance(d, Mapping) else None for d in listed]
        dets = _attach_masks(dets, segmentations, images_by_id)
    elif segmentations is not None:
        raise InputError("segmentations are scored with iou_type='segm'")
    bad_img = np.setdiff1d(np.unique(dets.image_id), all_image_ids)
    if bad_img.size:
        raise InputError(f"{bad_img.size} image id(s) of the detections are not in the ground truth "
                         f"(e.g. {bad_img[0]})")
    bad_cat = np.setdiff1d(np.unique(dets.category_id), cat_ids)
    if bad_cat.size:
        raise InputError(f"detections use category id(s) {bad_cat[:5].tolist()} that the ground truth lacks",
                         hint="use dataset category ids (LVIS: class index + 1; "
                              "COCO: the real ids, not 0..79)")
    if image_ids is not None:
        dets = dets.take(np.flatnonzero(np.isin(dets.image_id, eval_images)))
    under_budget = None
    if fixed:
        per_class = np.bincount(np.searchsorted(cat_ids, dets.category_id), minlength=len(cat_ids))
        under_budget = int((per_class < max_dets).sum())
        dets = dets.take(_top_k_per_group(dets.category_id, dets.score, max_dets))
    if kind == "lvis":
        dets = _lvis_prefilter(dets, None if fixed else max_dets, gt_img, gt_cat, gt_images, cat_ids)

    # ---- splits
    split_index: dict[str, np.ndarray] = {}
    if splits:
        union: set[int] = set()
        for name, ids in splits.items():
            ids = {int(i) for i in ids}
            unknown = sorted(ids - set(cat_index))
            if unknown:
                raise InputError(f"split {name!r} has category ids {unknown[:5]} that the ground truth lacks")
            union |= ids
            split_index[str(name)] = np.array(sorted(cat_index[i] for i in ids), dtype=np.int64)
        if "all" not in split_index:
            split_index["all"] = np.array(sorted(cat_index[i] for i in union), dtype=np.int64)

    engine = _Engine(backend, kind, gt_dict, max_dets, iou_type, lvis_max_dets=-1 if fixed else None)
    precision = _accumulate_in_chunks(engine, dets, gt_img, gt_cat, cat_ids, max_chunk_detections,
                                      max_chunk_pairs, progress)
    out = _summarize(precision, kind, cat_ids, gt_categories, split_index)
    if under_budget is not None:
        out["classes_under_budget"] = float(under_budget)
    return out


def _lvis_prefilter(dets: _Detections, max_dets: int | None, gt_img: np.ndarray, gt_cat: np.ndarray,
                    gt_images: list[dict], cat_ids: np.ndarray) -> _Detections:
    """LVIS rules that look across categories, applied before chunking: top ``max_dets`` per
    image (``LVISResults``; None = no cap, Fixed AP), detections of zero area dropped
    (``LVIS.get_ann_ids`` keeps only area > 0: box area, mask area for mask AP), and the
    federated filter of ``LVISEval._prepare``."""
    if max_dets is not None:
        dets = dets.take(_per_image_top_k(dets, max_dets))
    dets = dets.take(np.flatnonzero(dets.area() > 0))
    k = np.int64(len(cat_ids))
    image_ids = np.array([img["id"] for img in gt_images], dtype=np.int64)  # sorted

    def keys(img: np.ndarray, cat: np.ndarray) -> np.ndarray:
        return np.searchsorted(image_ids, img) * k + np.searchsorted(cat_ids, cat)

    neg_img = [img["id"] for img in gt_images for _ in img["neg_category_ids"]]
    neg_cat = [c for img in gt_images for c in img["neg_category_ids"]]
    neg_cat_arr = np.array(neg_cat, dtype=np.int64)
    known = np.isin(neg_cat_arr, cat_ids)  # negatives outside the category list can match nothing
    allowed = np.union1d(keys(gt_img, gt_cat),
                         keys(np.array(neg_img, dtype=np.int64)[known], neg_cat_arr[known]))
    return dets.take(np.flatnonzero(np.isin(keys(dets.image_id, dets.category_id), allowed)))


def _accumulate_in_chunks(engine: _Engine, dets: _Detections, gt_img: np.ndarray, gt_cat: np.ndarray,
                          cat_ids: np.ndarray, max_chunk_detections: int, max_chunk_pairs: int,
                          progress: Callable[[int], None] | None) -> np.ndarray:
    num_cats = len(cat_ids)
    precision = -np.ones((len(_IOU_THRS), _NUM_RECALLS, num_cats, len(_AREA_LABELS)))

    # detections grouped by category; the stable sort keeps their order within an
    # (image, category) pair, which decides ties in the backends' score sorts
    det_k = np.searchsorted(cat_ids, dets.category_id)
    order = np.argsort(det_k, kind="stable")
    dets, det_k = dets.take(order), det_k[order]
    det_start = np.searchsorted(det_k, np.arange(num_cats + 1))

    # images that matter for each category: ground truth or detections of it
    image_ids = np.unique(np.concatenate([gt_img, dets.image_id]))
    img_row = np.searchsorted(image_ids, np.concatenate([gt_img, dets.image_id]))
    pair_k = np.concatenate([np.searchsorted(cat_ids, gt_cat), det_k])
    pair = np.unique(pair_k * np.int64(max(len(image_ids), 1)) + img_row)
    pair_k, pair_row = np.divmod(pair, np.int64(max(len(image_ids), 1)))
    pair_start = np.searchsorted(pair_k, np.arange(num_cats + 1))

    k0 = 0
    while k0 < num_cats:
        used = np.zeros(len(image_ids), dtype=bool)
        k1 = k0
        while k1 < num_cats:
            rows = pair_row[pair_start[k1]:pair_start[k1 + 1]]
            was = used[rows].copy()
            used[rows] = True
            n_dets = det_start[k1 + 1] - det_start[k0]
            if k1 > k0 and (n_dets > max_chunk_detections or used.sum() * (k1 + 1 - k0) > max_chunk_pairs):
                used[rows] = was
                break
            k1 += 1
        chunk_imgs = image_ids[used].tolist()
        if chunk_imgs:
            lo, hi = int(det_start[k0]), int(det_start[k1])
            part = dets.take(np.arange(lo, hi))
            dt_anns = [{"id": lo + n + 1, "image_id": i, "category_id": c, "bbox": b, "score": s, "area": a,
                        "iscrowd": 0}
                       for n, (i, c, b, s, a) in enumerate(zip(part.image_id.tolist(), part.category_id.tolist(),
                                                               part.box.tolist(), part.score.tolist(),
                                                               part.area().tolist()))]
            if part.segm is not None:
                for d, rle in zip(dt_anns, part.segm):
                    d["segmentation"] = rle
            precision[:, :, k0:k1, :] = engine.run(cat_ids[k0:k1].tolist(), chunk_imgs, dt_anns)
            del dt_anns
        if progress is not None:
            progress(k1 - k0)
        k0 = k1
    return precision


def _summarize(precision: np.ndarray, kind: str, cat_ids: np.ndarray, categories: list[dict],
               split_index: Mapping[str, np.ndarray]) -> dict[str, float]:
    t50 = int(np.flatnonzero(np.isclose(_IOU_THRS, 0.5))[0])
    t75 = int(np.flatnonzero(np.isclose(_IOU_THRS, 0.75))[0])
    out = {
        "AP": _mean_valid(precision[:, :, :, 0]),
        "AP50": _mean_valid(precision[t50, :, :, 0]),
        "AP75": _mean_valid(precision[t75, :, :, 0]),
        "APs": _mean_valid(precision[:, :, :, 1]),
        "APm": _mean_valid(precision[:, :, :, 2]),
        "APl": _mean_valid(precision[:, :, :, 3]),
    }
    if kind == "lvis":
        freq = np.array([c["frequency"] for c in categories])
        for f in ("r", "c", "f"):
            out[f"AP{f}"] = _mean_valid(precision[:, :, freq == f, 0])
    for name, idx in split_index.items():
        out[f"AP50_{name}"] = _mean_valid(precision[t50][:, idx, 0])
        out[f"AP_{name}"] = _mean_valid(precision[:, :, idx, 0])
    for k, cid in enumerate(cat_ids.tolist()):
        out[f"AP/{cid}"] = _mean_valid(precision[:, :, k, 0])
        out[f"AP50/{cid}"] = _mean_valid(precision[t50, :, k, 0])
    return out


def per_category(metrics: Mapping[str, float], metric: Literal["AP", "AP50"] = "AP50") -> dict[int, float]:
    """``{category id: value}`` from the ``"AP50/<id>"`` (or ``"AP/<id>"``) keys of a result."""
    prefix = metric + "/"
    return {int(k[len(prefix):]): v for k, v in metrics.items() if k.startswith(prefix)}


def summary_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """The result without its per-category keys (what a report table shows)."""
    return {k: v for k, v in metrics.items() if "/" not in k}
