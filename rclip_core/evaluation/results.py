"""Evaluation outputs: THE one COCO-results writer and the JSON report.

COCO results format (``detectron2/evaluation/coco_evaluation.py: instances_to_coco_json``):
``[{image_id, category_id, bbox: [x, y, w, h], score}]`` in original-image pixels, the
category id being the dataset's (for LVIS: class index + 1). Every file of detections rclip
writes goes through :func:`write_results`: ``rclip eval --save-predictions``, fine-tuning's
``eval/detections_<step>.json`` and ``rclip detect``'s ``predictions.json``.

With masks (a detector with a mask head) each detection also carries ``segmentation``: a
compressed RLE ``{"size": [h, w], "counts": str}`` of its binary mask in the original image
(:func:`masks_to_rle`, pycocotools' encoding, as detectron2's ``instances_to_coco_json``).

Detections travel as ``[N, 7]`` float64 rows ``[image_id, x, y, w, h, score, category_id]``
(:func:`detections_to_rows` builds them from XYXY boxes). Coordinates are rounded to
:data:`BOX_DECIMALS` and scores to :data:`SCORE_DECIMALS` (:func:`round_detections`) before
evaluation *and* in the saved file, so that evaluating the saved file reproduces the reported
numbers exactly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["BOX_DECIMALS", "SCORE_DECIMALS", "detections_to_rows", "round_detections", "detections_to_results",
           "masks_to_rle", "write_results", "make_report", "protocol_block"]

BOX_DECIMALS = 3
SCORE_DECIMALS = 8


def detections_to_rows(image_id: int, boxes_xyxy: Any, scores: Any, category_ids: Any) -> np.ndarray:
    """One image's detections -> ``[M, 7]`` rows ``[image_id, x, y, w, h, score, category_id]``
    (float64; width and height computed in float64 from the XYXY corners)."""
    b = np.asarray(_numpy(boxes_xyxy), dtype=np.float64).reshape(-1, 4)
    r = np.empty((len(b), 7), dtype=np.float64)
    r[:, 0] = image_id
    r[:, 1:3] = b[:, :2]
    r[:, 3:5] = b[:, 2:] - b[:, :2]
    r[:, 5] = np.asarray(_numpy(scores), dtype=np.float64).reshape(-1)
    r[:, 6] = np.asarray(_numpy(category_ids)).reshape(-1)
    return r


def _numpy(x: Any) -> Any:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu()
        return x.double().numpy() if x.is_floating_point() else x.numpy()
    return x


def round_detections(dets: np.ndarray) -> np.ndarray:
    """``[N, 7]`` rows with boxes rounded to :data:`BOX_DECIMALS` and scores to
    :data:`SCORE_DECIMALS` (a new array; rounding twice changes nothing)."""
    out = np.array(dets, dtype=np.float64).reshape(-1, 7)
    out[:, 1:5] = np.round(out[:, 1:5], BOX_DECIMALS)
    out[:, 5] = np.round(out[:, 5], SCORE_DECIMALS)
    return out


def detections_to_results(dets: np.ndarray, segmentations: Sequence[Mapping] | None = None) -> list[dict]:
    """[N, 7] rows -> COCO results format ``[{image_id, category_id, bbox: [x, y, w, h], score}]``
    (+ ``segmentation`` from ``segmentations``, one RLE per row; values as they are: round
    with :func:`round_detections` first)."""
    out = [{"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [float(v) for v in r[1:5]],
            "score": float(r[5])} for r in dets]
    if segmentations is not None:
        for d, rle in zip(out, segmentations, strict=True):
            d["segmentation"] = {"size": list(rle["size"]), "counts": rle["counts"]}
    return out


def masks_to_rle(masks: Any) -> list[dict]:
    """Binary masks ``[M, H, W]`` (tensor or array) -> compressed RLEs ``{"size": [H, W],
    "counts": str}`` (pycocotools ``mask.encode``; counts decoded to text for JSON)."""
    from pycocotools import mask as mask_utils

    m = np.asarray(_numpy(masks), dtype=np.uint8)
    if m.ndim != 3:
        raise ValueError(f"masks must be [M, H, W], got shape {m.shape}")
    if len(m) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(m.transpose(1, 2, 0)))
    return [{"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def write_results(path: str | os.PathLike, dets: np.ndarray | Sequence[Sequence[float]],
                  chunk: int = 100_000, segmentations: Sequence[Mapping] | None = None) -> Path:
    """Write ``[N, 7]`` detection rows as a COCO results JSON (rounded as
    :func:`round_detections`; with ``segmentations``, one RLE per row, as ``segmentation``),
    atomically and in chunks (LVIS runs have millions of detections). One detection per line."""
    from rclip_core.fileio import atomic_write

    rows = round_detections(np.asarray(dets, dtype=np.float64).reshape(-1, 7))
    if segmentations is not None and len(segmentations) != len(rows):
        raise ValueError(f"{len(segmentations)} segmentations for {len(rows)} detections")

    def write(p: Path) -> None:
        with open(p, "w", encoding="utf-8") as f:
            f.write("[")
            for start in range(0, len(rows), chunk):
                part = detections_to_results(rows[start:start + chunk], None if segmentations is None else
                                             segmentations[start:start + chunk])
                text = ",\n".join(json.dumps(d, separators=(",", ":")) for d in part)
                f.write(("," if start else "") + "\n" + text)
            f.write("\n]\n")

    return atomic_write(path, write)


def protocol_block(protocol: Mapping[str, Any], dataset: Any) -> dict[str, Any]:
    """``{"name", "split", "detection_budget", "per_image", "per_class", "text"}`` of a result's
    protocol (:func:`rclip_core.evaluation.protocol.describe_protocol`) on ``dataset``: the
    split is the data set's name and annotation file (e.g. ``lvis-minival:
    lvis_v1_minival.json``)."""
    per_image, per_class = protocol.get("per_image"), protocol.get("per_class")
    if per_class is not None:
        budget = f"{per_class} per class, no per-image cap"
    elif dataset.kind == "lvis":
        budget = f"{per_image} per image"
    else:
        budget = f"{per_image} per image and class"
    return {"name": protocol.get("name", "standard"), "split": f"{dataset.name}: {Path(str(dataset.annotations)).name}",
            "detection_budget": budget, "per_image": per_image, "per_class": per_class,
            "text": protocol.get("text", "")}


def _finite(x: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def make_report(result: Any, dataset: Any, *, mode: str, model: dict[str, Any],
                settings: dict[str, Any], files: Mapping[str, str | None]) -> dict[str, Any]:
    """The JSON report of ``rclip eval`` for a :class:`rclip_core.evaluation.protocol.EvalResult`:
    metrics, per-category AP, what they cover, model, dataset (an ``EvalDataset``), split, settings and sha256 of the input files.
    ``protocol`` and every row of ``results`` name the protocol, the evaluation split and the
    detection budget, so that a table built from reports cannot mix protocols silently.
    Undefined metrics (no ground truth) are null."""
    from rclip_core import __version__

    names = dataset.gt.category_names()
    n_dets = len(result.detections)
    block = protocol_block(result.protocol, dataset)
    report = {
        "rclip_version": __version__,
        "mode": mode,
        "protocol": block,
        "metrics": result.metrics,
        "results": [{"metric": k, "iou_type": "segm" if k.startswith("segm_") else "bbox", "value": v,
                     "protocol": block["name"], "split": block["split"],
                     "detection_budget": block["detection_budget"]}
                    for k, v in result.metrics.items() if k != "classes_under_budget"],
        "notes": list(getattr(result, "notes", [])),
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
