"""THE detection evaluation protocol: one loop for every model that turns images into
detections (zero-shot RegionCLIP with ground-truth boxes or RPN proposals, a fine-tuned
detector), used by ``rclip eval`` and by fine-tuning's evaluations.

:func:`evaluate` runs a :data:`Predictor` over a data set's images (official
``detectron2/evaluation/evaluator.py: inference_on_dataset``):

- images in image-id order, the first ``max_images`` of them; under torchrun each process takes
  ``images[rank::world]``, the rows are gathered, rank 0 computes the metrics and broadcasts
  them, so every process returns the same result;
- images decoded and resized (``ResizeShortestEdge``) in DataLoader workers while the model runs,
  with the loader's own generator (evaluating between training steps does not move the global
  RNG, so a resumed run stays exact);
- ONE policy for images that cannot be evaluated: missing on disk (``missing``), unreadable or
  of a size that contradicts the annotations (``failed``, with the reason) are counted and
  reported, and the metrics cover exactly the images that were evaluated (never counted as
  misses, never guessed);
- detections mapped from class index to category id, rounded as the saved file
  (:func:`rclip_core.evaluation.results.round_detections`; fine-tuning scores them unrounded,
  as it always has), scored with
  :func:`rclip_core.evaluation.metrics.evaluate_detections` (COCO / LVIS box AP, the OVD split
  metrics of ``coco_evaluation.py: COCOEvaluator._derive_coco_results``);
- under one protocol (``protocol``): ``standard`` (100 detections per image and class for COCO,
  300 per image for LVIS) or LVIS ``fixed-ap`` (10,000 per class over the split, no per-image
  cap; :mod:`rclip_core.evaluation.metrics`), recorded in ``EvalResult.protocol`` so that every
  number a report carries names it;
- with masks when the predictor returns them (a detector with a mask head): mask AP
  (``segm_AP``, ``segm_APr``, ...) beside box AP, from compressed RLEs of the masks pasted into
  the original image (``detectron2/evaluation/coco_evaluation.py: instances_to_coco_json``),
  when the ground truth has segmentations (else ``notes`` says why there is none).

In GT-box mode (zero-shot, official ``CROP_REGION_TYPE GT``) each image's non-crowd ground-truth
boxes (at most 500 for LVIS, ``lvis.py: clip_gt_crop``) are given to the predictor, which also
returns their class probabilities: region accuracy (``region_acc``, ``region_acc_<split>``) is
the fraction of boxes whose most probable class is their own, the region-recognition number of
the ShapesWorld experiments.

:func:`run_evaluation` is the loop over an ``EvalDataset`` (``rclip eval``),
:func:`evaluate_detector` over a ground truth and an image folder (fine-tuning; its data are
checked for missing images before training starts).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from torch import Tensor

from rclip_core.data.coco import DetectionSet, ResolvedImage, resolve_images
from rclip_core.data.datasets import LVIS_MAX_GT_BOXES, EvalDataset
from rclip_core.data.images import MAX_SIZE, TEST_SHORT_SIDE, PreparedImage, xywh_to_xyxy
from rclip_core.errors import InputError, RuntimeFailure
from rclip_core.evaluation.metrics import evaluate_detections, per_category, summary_metrics
from rclip_core.evaluation.results import detections_to_rows, round_detections
from rclip_core.inference import ZeroShotPipeline, detect_images, load_image_batches

__all__ = ["ImageOutput", "BatchItem", "Predictor", "EvalResult", "zero_shot_predictor",
           "detector_predictor", "describe_protocol", "evaluate", "run_evaluation", "evaluate_detector"]



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
    masks: list[dict] | None = None  # [M] compressed RLEs in the original image (mask head)


BatchItem = tuple[PreparedImage, str, "np.ndarray | None"]
#: ``predict(items) -> outputs``: items are ``(resized image, path, given boxes [G, 4] XYXY in
#: original pixels or None)``, one output per item.
Predictor = Callable[[Sequence[BatchItem]], list[ImageOutput]]


def zero_shot_predictor(pipeline: ZeroShotPipeline) -> Predictor:
    """RegionCLIP zero-shot inference (official ``clip_rcnn.py: CLIPFastRCNN.inference``): given
    (ground-truth) boxes or the pipeline's proposals, region embeddings, classification against
    the class embeddings and the official post-processing. With given boxes the output also
    carries their class probabilities, for region accuracy."""
    if pipeline.class_embeddings is None:
        raise InputError("zero-shot evaluation needs class embeddings")
    from rclip_core.models.classifier import region_class_probs

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
    box regression and post-processing through :func:`rclip_core.inference.detect_images` (boxes
    in original pixels, class indices into its eval-mode vocabulary: set it to the dataset's
    classes first)."""

    from rclip_core.evaluation.results import masks_to_rle

    def predict(items: Sequence[BatchItem]) -> list[ImageOutput]:
        dets = detect_images(detector, [prep for prep, _, _ in items])
        outs = []
        for (prep, _, _), d in zip(items, dets):
            masks = None
            if getattr(d, "masks", None) is not None:  # a mask head: paste and encode (threshold 0.5)
                masks = masks_to_rle(d.paste_masks((int(prep.orig_size[0]), int(prep.orig_size[1]))))
            outs.append(ImageOutput(d.boxes, d.scores, d.classes, masks=masks))
        return outs

    return predict


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Metrics (0-100 scale; ``region_acc*`` are fractions) and what they cover."""

    metrics: dict[str, float]
    per_category: dict[str, dict[int, float]]  # {"AP": {category id: value}, "AP50": {...}}
    detections: np.ndarray  # [N, 7] rows [image_id, x, y, w, h, score, category_id] as scored
    image_ids: list[int]  # the images the metrics cover
    num_images: int  # images of the ground truth
    missing: list[str]  # files not on disk
    failed: list[tuple[str, str]]  # (file, reason): unreadable, or a size that contradicts the annotations
    region_counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # split -> (correct, boxes)
    seconds_inference: float = 0.0
    seconds_metrics: float = 0.0
    all_metrics: dict[str, float] = field(default_factory=dict)  # evaluate_detections' full output
    protocol: dict[str, Any] = field(default_factory=dict)  # name, detections per image / per class, text
    segmentations: list[dict] | None = None  # one RLE per row of ``detections`` (mask head)
    notes: list[str] = field(default_factory=list)  # e.g. why there is no mask AP

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
    xyxy = xywh_to_xyxy([a["bbox"] for a in anns])
    return xyxy, np.array([index[a["category_id"]] for a in anns], dtype=np.int64)


def _rank_world() -> tuple[int, int]:
    from rclip_core.dist import get_rank, get_world_size

    return get_rank(), get_world_size()


def _gather(obj: Any, world: int) -> list[Any]:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, obj)
    return parts


def evaluate(gt: DetectionSet, images: Sequence[ResolvedImage], predict: Predictor, *,
             category_ids: Sequence[int], splits: Mapping[str, Any] | None = None,
             missing: Sequence[str] = (), gt_boxes: bool = False, short_side: int = TEST_SHORT_SIDE,
             max_size: int = MAX_SIZE, backend: str = "faster", batch_size: int = 1, workers: int = 0,
             max_images: int | None = None, max_dets: int | None = None, score_as_saved: bool = True,
             protocol: str = "standard", per_class_budget: int | None = None,
             progress: Callable[[int], None] | None = None,
             metrics_progress: Callable[[int], None] | None = None) -> EvalResult:
    """Run ``predict`` over ``images`` (those of ``gt`` found on disk) and score the detections.

    Args:
        category_ids: the dataset category id of each class index the predictor returns.
        splits: e.g. ``{"novel": ids, "base": ids}`` -> ``AP50_novel``, ``AP50_base``,
            ``AP50_all`` (COCO OVD, ``coco_evaluation.py: COCOEvaluator._derive_coco_results``).
        missing: file names of the images not on disk (reported, not evaluated).
        gt_boxes: give each image's non-crowd ground-truth boxes to ``predict`` (GT-box mode)
            and measure region accuracy.
        short_side, max_size: the test-time resize (``ResizeShortestEdge``).
        batch_size: images per ``predict`` call; ``workers``: DataLoader processes decoding
            ahead of the model (0 = in this process).
        max_images: evaluate only the first N images (by image id), for quick checks.
        max_dets: detections per image the metrics count (default: 100 COCO, 300 LVIS;
            standard protocol only).
        protocol: ``standard`` or ``fixed-ap`` (LVIS: the top ``per_class_budget``, default
            10,000, detections of each class over the images, no per-image cap).
        score_as_saved: round the detections as the results file does before scoring them
            (``rclip eval``: evaluating the saved file reproduces the numbers exactly); False
            scores them as computed (fine-tuning's evaluations, whose numbers predate the
            rounding; the difference is in the 4th decimal of an AP at most).
        progress: called on rank 0 with the number of images finished (all processes
            together); ``metrics_progress`` with the number of categories scored.

    See the module docstring for sharding and the policy on images that cannot be evaluated.
    """
    if max_images is not None and max_images < 1:
        raise InputError("--max-images must be >= 1")
    protocol_info = describe_protocol(protocol, gt.kind, max_dets, per_class_budget)
    images = sorted(images, key=lambda r: r.image["id"])
    if max_images:
        images = images[:max_images]
    rank, world = _rank_world()
    mine = images[rank::world]
    by_image: dict[int, list[dict]] = {}
    for a in gt.annotations:
        by_image.setdefault(a["image_id"], []).append(a)
    cat_ids = np.array(list(category_ids), dtype=np.int64)
    class_index = {int(c): i for i, c in enumerate(cat_ids)}
    lvis = gt.kind == "lvis"
    class_split: dict[str, np.ndarray] = {}
    if splits:
        for s, ids in splits.items():
            class_split[s] = np.isin(cat_ids, np.array(sorted(ids), dtype=np.int64))

    rows: list[np.ndarray] = []
    segs: list[dict] = []
    with_masks: list[bool] = []  # per image that produced detections: did the predictor give masks
    evaluated: list[int] = []
    failed: list[tuple[str, str]] = []
    correct, total = 0, 0
    split_counts = {s: [0, 0] for s in class_split}
    t0 = time.perf_counter()
    paths = [str(r.path) for r in mine]
    for batch in load_image_batches(paths, short_side, max_size, batch_size=batch_size, workers=workers):
        todo: list[BatchItem] = []
        todo_meta: list[tuple[int, np.ndarray]] = []
        done_now = 0
        for i, prep, err in batch:
            img = mine[i].image
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
                rows.append(detections_to_rows(image_id, out.boxes, out.scores,
                                               cat_ids[out.classes.detach().cpu().numpy()]))
                with_masks.append(out.masks is not None)
                if out.masks is not None:
                    if len(out.masks) != len(out.scores):
                        raise RuntimeFailure(f"the predictor returned {len(out.masks)} masks for "
                                             f"{len(out.scores)} detections")
                    segs.extend(out.masks)
            if gt_boxes and out.gt_probs is not None and len(classes):
                hit = out.gt_probs.argmax(dim=1).cpu().numpy() == classes
                correct += int(hit.sum())
                total += int(len(hit))
                for s, in_split in class_split.items():
                    m = in_split[classes]
                    split_counts[s][0] += int(hit[m].sum())
                    split_counts[s][1] += int(m.sum())
        done_now += len(todo)
        if progress is not None and done_now and rank == 0:
            progress(done_now * world)
    t1 = time.perf_counter()

    local = (np.concatenate(rows) if rows else np.zeros((0, 7)), evaluated, failed, correct, total, split_counts,
             segs, with_masks)
    parts = _gather(local, world)
    dets = np.concatenate([p[0] for p in parts]).reshape(-1, 7)
    flags = [f for p in parts for f in p[7]]
    if any(flags) and not all(flags):
        raise RuntimeFailure("the predictor returned masks for some images and not for others")
    seg_all = [r for p in parts for r in p[6]] if flags and all(flags) else None
    evaluated = [i for p in parts for i in p[1]]
    failed = [f for p in parts for f in p[2]]
    correct, total = sum(p[3] for p in parts), sum(p[4] for p in parts)
    split_counts = {s: [sum(p[5][s][0] for p in parts), sum(p[5][s][1] for p in parts)] for s in class_split}
    if not evaluated:
        first = failed[0][1] if failed else "no images"
        raise InputError(f"none of the {len(images)} images could be evaluated; first problem: {first}")
    if score_as_saved:
        dets = round_detections(dets)
    notes: list[str] = []
    score_masks = seg_all is not None
    if score_masks:
        bare = sum(1 for a in gt.annotations if not a.get("segmentation"))
        if bare:
            notes.append(f"no mask AP: {bare} of the {len(gt.annotations)} ground-truth annotations have no "
                         "segmentation (masks are still saved with the detections)")
            score_masks = False
    budget: dict[str, Any] = ({"protocol": "fixed-ap", "per_class_budget": protocol_info["per_class"]}
                              if protocol == "fixed-ap" else {"max_dets": max_dets})
    full: dict[str, float] = {}
    if rank == 0:
        full = evaluate_detections(gt, dets, backend=backend, splits=splits, image_ids=evaluated,
                                   progress=metrics_progress, **budget)
        if score_masks:
            segm = evaluate_detections(gt, dets, backend=backend, splits=splits, image_ids=evaluated,
                                       iou_type="segm", segmentations=seg_all, **budget)
            full.update({f"segm_{k}": v for k, v in segm.items() if k != "classes_under_budget"})
    if world > 1:
        import torch.distributed as dist

        box = [full]
        dist.broadcast_object_list(box, src=0)
        full = box[0]
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
    per_cat = {"AP": per_category(full, "AP"), "AP50": per_category(full, "AP50")}
    if score_masks:
        per_cat.update({"segm_AP": per_category(full, "segm_AP"), "segm_AP50": per_category(full, "segm_AP50")})
    return EvalResult(metrics=metrics, per_category=per_cat,
                      detections=dets, image_ids=sorted(evaluated), num_images=len(gt.images),
                      missing=[str(m) for m in missing], failed=failed, region_counts=region_counts,
                      seconds_inference=t1 - t0, seconds_metrics=time.perf_counter() - t1, all_metrics=full,
                      protocol=protocol_info, segmentations=seg_all, notes=notes)


def describe_protocol(protocol: str, kind: str, max_dets: int | None = None,
                      per_class_budget: int | None = None) -> dict[str, Any]:
    """What a number under ``protocol`` means, checked before any work: ``{"name",
    "per_image", "per_class", "text"}`` (detections counted per image / per class over the
    split; None = no cap). Fixed AP is LVIS-only and takes no per-image cap."""
    from rclip_core.evaluation.metrics import FIXED_AP_BUDGET, PROTOCOLS

    if protocol not in PROTOCOLS:
        raise InputError(f"unknown --protocol {protocol!r}", hint=f"use one of: {', '.join(PROTOCOLS)}")
    if protocol == "fixed-ap":
        if kind != "lvis":
            raise InputError(f"--protocol fixed-ap is an LVIS protocol; this data set is {kind.upper()}",
                             hint="use --protocol standard, or --dataset lvis / lvis-minival")
        if max_dets is not None:
            raise InputError("--protocol fixed-ap counts detections per class, not per image")
        k = int(per_class_budget) if per_class_budget is not None else FIXED_AP_BUDGET
        if k < 1:
            raise InputError(f"the per-class detection budget must be >= 1, got {k}")
        return {"name": "fixed-ap", "per_image": None, "per_class": k,
                "text": f"Fixed AP: top {k} detections per class over the split, no per-image cap"}
    if per_class_budget is not None:
        raise InputError("a per-class detection budget belongs to --protocol fixed-ap")
    n = int(max_dets) if max_dets is not None else (300 if kind == "lvis" else 100)
    text = (f"standard LVIS AP: top {n} detections per image" if kind == "lvis"
            else f"standard COCO AP: {n} detections per image and class (maxDets)")
    return {"name": "standard", "per_image": n, "per_class": None, "text": text}


def run_evaluation(dataset: EvalDataset, predict: Predictor, *, gt_boxes: bool, short_side: int = TEST_SHORT_SIDE,
                   max_size: int = MAX_SIZE, backend: str = "faster", batch_size: int = 1, workers: int = 0,
                   max_images: int | None = None, protocol: str = "standard",
                   per_class_budget: int | None = None, progress: Callable[[int], None] | None = None,
                   metrics_progress: Callable[[int], None] | None = None) -> EvalResult:
    """:func:`evaluate` over an ``EvalDataset`` (``rclip eval``): its images on disk, its
    vocabulary's category ids and splits; its missing images are reported."""
    return evaluate(dataset.gt, dataset.present, predict, category_ids=dataset.vocabulary.category_ids,
                    splits=dataset.splits, missing=[m["file_name"] for m in dataset.missing], gt_boxes=gt_boxes,
                    short_side=short_side, max_size=max_size, backend=backend, batch_size=batch_size,
                    workers=workers, max_images=max_images, protocol=protocol, per_class_budget=per_class_budget,
                    progress=progress, metrics_progress=metrics_progress)


def evaluate_detector(detector, dataset: DetectionSet, images_dir: str | os.PathLike, *,
                      category_ids: Sequence[int] | None = None, splits: Mapping[str, Any] | None = None,
                      short_side: int = TEST_SHORT_SIDE, max_size: int = MAX_SIZE, max_images: int | None = None,
                      num_workers: int = 0, backend: str = "faster", max_dets: int | None = None,
                      results_path: str | os.PathLike | None = None,
                      progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """COCO / LVIS box AP of a fine-tuned ``detector`` on ``dataset`` (fine-tuning's evaluations;
    :func:`evaluate` with :func:`detector_predictor`, one image per call).

    Args:
        detector: its eval-mode vocabulary must be the rows of ``category_ids``.
        dataset: the ground truth (e.g. COCO val filtered to the 65 OVD classes, LVIS val).
        images_dir: the folder of its images (LVIS: the COCO root works).
        category_ids: dataset category id of each classifier row (default: the dataset's
            categories in ascending id).
        splits: e.g. ``{"novel": ids, "base": ids}`` -> ``AP50_novel``, ``AP50_base``, ``AP50_all``.
        max_images: only the first N images (by id).
        results_path: also write the detections there (COCO results JSON, on rank 0).
        progress: called on rank 0 with the number of images finished.

    Returns every metric of :func:`rclip_core.evaluation.metrics.evaluate_detections` (the same
    on every process under torchrun). Images missing on disk or unreadable are left out of the
    metrics and counted as ``images_missing`` / ``images_failed`` (keys present only when
    non-zero); fine-tuning refuses missing validation images before training starts.
    """
    cats = list(category_ids) if category_ids is not None else dataset.category_ids
    k = int(detector.test_embeddings.shape[0])
    if len(cats) != k:
        raise InputError(f"the detector classifies {k} classes but {len(cats)} category ids were given",
                         "set the detector's classes to the data set's with set_detector_classes")
    present, missing = resolve_images(dataset, images_dir)
    was_training = detector.training
    detector.eval()
    try:
        result = evaluate(dataset, present, detector_predictor(detector), category_ids=cats, splits=splits,
                          missing=[m["file_name"] for m in missing], short_side=short_side, max_size=max_size,
                          backend=backend, batch_size=1, workers=num_workers, max_images=max_images,
                          max_dets=max_dets, score_as_saved=False, progress=progress)
    finally:
        detector.train(was_training)
    if results_path is not None and _rank_world()[0] == 0:
        from rclip_core.evaluation import results  # the one COCO-results writer

        results.write_results(results_path, result.detections, segmentations=result.segmentations)
    metrics = dict(result.all_metrics)
    if result.missing:
        metrics["images_missing"] = float(len(result.missing))
    if result.failed:
        metrics["images_failed"] = float(len(result.failed))
    return metrics
