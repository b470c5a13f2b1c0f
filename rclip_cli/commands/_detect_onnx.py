"""``rclip detect --engine onnx``: an ``rclip export`` directory run with onnxruntime, numpy and
Pillow only (this module imports no torch); the same output files as the torch engine."""

from __future__ import annotations

import glob
import os
from pathlib import Path

import click

from rclip_cli._common import console, err_console, progress_bar

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
_TORCH_ONLY = ("classes", "classes_file", "vocabulary", "model_name", "pretrained", "random_init", "rpn_weights")
_BAKED = ("score_thresh", "nms", "max_dets", "fusion", "topk_labels", "short_side", "max_size", "proposals")


def _collect(inputs) -> list[str]:
    """Files, directories and glob patterns (as ``rclip_core.inference.collect_images``)."""
    from rclip_core.errors import InputError

    out, seen = [], set()
    for item in inputs:
        if any(ch in item for ch in "*?[") and not os.path.exists(item):
            hits = [h for h in sorted(glob.glob(item, recursive=True)) if os.path.isfile(h)]
            if not hits:
                raise InputError(f"no files match {item!r}")
        elif os.path.isdir(item):
            hits = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not hits:
                raise InputError(f"directory {item} contains no images")
        elif os.path.exists(item):
            hits = [item]
        else:
            raise InputError(f"image not found: {item}")
        for h in hits:
            if os.path.abspath(h) not in seen:
                seen.add(os.path.abspath(h))
                out.append(h)
    return out


def detect_onnx(images, boxes_file, out_dir, draw: bool, save_embeddings: bool, precision: str, kw: dict) -> None:
    from click.core import ParameterSource
    from rich.markup import escape

    from rclip_core.errors import InputError, RclipError
    from rclip_core.evaluation.results import detections_to_rows, write_results
    from rclip_core.export.runtime import OnnxDetector
    from rclip_core.fileio import (
        atomic_write,
        atomic_write_json,
        ensure_output_dir,
        first_missing_dir,
        remove_empty_dirs,
    )

    ctx = click.get_current_context()
    given = [n for n in _BAKED if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)]
    if given:
        raise InputError(f"--{given[0].replace('_', '-')} is baked into the export (export.json)",
                         "re-export with `rclip export` to change it")
    bad = [n for n in _TORCH_ONLY if kw.get(n)]
    if bad:
        raise InputError(f"--{bad[0].replace('_', '-')} needs --engine torch",
                         "with --engine onnx give --class-embeddings (an `rclip embed` output)")
    if save_embeddings or precision != "fp32":
        raise InputError("--save-embeddings and --precision bf16 need --engine torch")
    w = kw.get("weights")
    if not w or os.path.basename(w) != "export.json" or not os.path.isfile(w):
        raise InputError("--engine onnx needs --weights DIR/export.json of an `rclip export` directory",
                         "e.g. --weights rn50-onnx/export.json")
    det = OnnxDetector(os.path.dirname(os.path.abspath(w)))
    if kw.get("class_embeddings"):
        names, emb = det.load_class_embeddings(kw["class_embeddings"])
        names = names or [f"class_{i}" for i in range(emb.shape[0])]
    else:
        names, emb = det.default_class_embeddings()
    paths = _collect(images)
    given_boxes = None
    if boxes_file:
        from rclip_core.data.boxes import load_boxes_file, lookup_boxes, validate_boxes

        given_boxes = load_boxes_file(boxes_file)
        for p in paths:
            lookup_boxes(given_boxes, p)
    import numpy as np

    created = first_missing_dir(Path(out_dir))
    out = ensure_output_dir(out_dir)
    try:
        predictions, meta, failures, stems = [], [], [], {}
        with progress_bar("detect (onnx)", total=len(paths), unit="img") as advance:
            for image_id, path in enumerate(paths, start=1):
                try:
                    prep = det.prepare(path)
                    boxes = None
                    if given_boxes is not None:
                        boxes = validate_boxes(np.asarray(lookup_boxes(given_boxes, path), dtype=np.float64),
                                               prep.orig_size[1], prep.orig_size[0], os.path.basename(path))
                    res = det.run(prep, emb, boxes, outputs=("boxes", "scores", "classes", "box_index"))
                except RclipError as e:
                    failures.append((path, str(e)))
                    advance(1)
                    continue
                h, w = prep.orig_size
                meta.append({"id": image_id, "file_name": os.path.abspath(path), "width": w, "height": h})
                predictions.append(detections_to_rows(image_id, res["boxes"], res["scores"], res["classes"] + 1))
                if draw:
                    stem = Path(path).stem
                    stems[stem] = stems.get(stem, -1) + 1
                    name = stem if stems[stem] == 0 else f"{stem}_{stems[stem]}"
                    _draw(path, res, names, out / f"{name}.jpg", atomic_write)
                advance(1)
        if not meta:
            raise InputError(failures[0][1] if len(failures) == 1 else f"all {len(failures)} images failed; first: {failures[0][1]}")
        atomic_write_json(out / "categories.json", [{"id": i + 1, "name": n, "display_name": n} for i, n in enumerate(names)],
                          indent=1)
        atomic_write_json(out / "images.json", meta, indent=1)
        dets = np.concatenate(predictions) if predictions else np.zeros((0, 7))
        write_results(out / "predictions.json", dets)
    except BaseException:
        remove_empty_dirs(out, created)
        raise
    console.print(f"rclip detect --engine onnx: {len(meta)} image(s), {len(dets)} detections; wrote "
                  f"{out / 'predictions.json'}, categories.json, images.json" + (", annotated images" if draw else ""))
    if failures:
        err_console.print(f"[bold red]{len(failures)} image(s) failed:[/]")
        for p, e in failures:
            err_console.print(f"  [red]{escape(p)}[/]: {escape(e)}", markup=True, highlight=False, soft_wrap=True)
        raise SystemExit(2)


def _draw(path, res, names, dest: Path, atomic_write) -> None:
    from rclip_core.data.images import read_image
    from rclip_core.viz import draw_detections

    seen, keep = set(), []
    for i, bi in enumerate(res["box_index"].tolist()):
        if bi not in seen:
            seen.add(bi)
            keep.append(i)
    keep = keep[:100]
    img = draw_detections(read_image(path), res["boxes"][keep].tolist(), [names[c] for c in res["classes"][keep].tolist()],
                          res["scores"][keep].tolist(), res["classes"][keep].tolist())
    atomic_write(dest, lambda p: img.save(p, format="JPEG", quality=92))
