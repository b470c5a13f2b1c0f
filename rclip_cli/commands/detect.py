"""``rclip detect``: open-vocabulary detection / region recognition on images."""

from __future__ import annotations

import os
from pathlib import Path

import click

from rclip_cli._common import console, device_option, err_console, progress_bar, rclip_command
from rclip_cli._model_options import model_options, resolve_model, resolve_vocabulary_and_embeddings, vocab_options


@rclip_command("detect", short_help="Detect any classes in images (open vocabulary).")
@click.argument("images", nargs=-1, required=True, metavar="IMAGES_OR_VIDEOS...")
@model_options
@vocab_options
@click.option("--boxes", "boxes_file", type=click.Path(dir_okay=False),
              help="Given boxes (ground-truth-box mode): JSON {image name: [[x1,y1,x2,y2], ...]} or a COCO instances file.")
@click.option("--exemplar", "exemplars", multiple=True, metavar='"IMAGE:x1,y1,x2,y2=NAME"',
              help="A class by example box (repeatable; boxes of one NAME are averaged); mixes with --classes etc.")
@click.option("--proposals", type=click.Choice(["auto", "rpn", "random", "grid"]), default="auto", show_default=True,
              help="Where boxes come from without --boxes: the offline RPN (from --weights or --rpn-weights), "
                   "random boxes, or a sliding-window grid.")
@click.option("--score-thresh", type=float, default=0.05, show_default=True, help="Keep (box, class) pairs scoring above this.")
@click.option("--nms", "nms", type=float, default=0.5, show_default=True, help="Per-class NMS IoU threshold.")
@click.option("--max-dets", type=int, default=100, show_default=True, help="Detections kept per image.")
@click.option("--fusion", type=click.Choice(["official", "sigmoid", "none"]), default="official", show_default=True,
              help="RPN score fusion: official = sqrt(prob x raw logit) as the released code; sigmoid = the paper's "
                   "geometric mean with sigmoid(logit); none = class probability.")
@click.option("--topk-labels", type=int, default=1, show_default=True,
              help="Best K classes per box that may become detections (0 = all pairs, the official protocol).")
@click.option("--out", "out_dir", default="rclip-out", show_default=True, type=click.Path(file_okay=False),
              help="Output directory.")
@click.option("--batch-size", type=int, default=1, show_default=True, help="Images decoded ahead of the model.")
@click.option("--save-embeddings", is_flag=True, help="Also write OUT/embeddings/<stem>.safetensors (boxes + embeddings).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
              help="bf16 autocast (CPU and CUDA) is faster; fp32 reproduces the official numbers.")
@click.option("--engine", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="onnx: run an `rclip export` directory (--weights DIR/export.json) with onnxruntime alone; its "
                   "post-processing settings and test size are those baked into the export.")
@click.option("--no-images", is_flag=True, help="Do not write annotated images (or videos).")
@click.option("--every", type=int, default=None, help="Videos: run every N-th frame [default: every frame].")
@click.option("--fps", "sample_fps", type=float, default=None, help="Videos: run frames at this rate instead.")
@click.option("--track", is_flag=True, help="Videos: track ids with supervision's ByteTrack (extra: video).")
@click.option("--short-side", type=click.IntRange(min=16), default=800, show_default=True,
              help="Resize the shortest image side to this (the official test size; ShapesWorld: 256).")
@click.option("--max-size", type=click.IntRange(min=16), default=1333, show_default=True,
              help="Longest image side at most this after resizing.")
@device_option
def detect(images, boxes_file, proposals, score_thresh, nms, max_dets, fusion, topk_labels, out_dir,
           batch_size, save_embeddings, precision, no_images, short_side, max_size, device, debug, engine="torch", **kw):
    """Detect or recognise any classes in IMAGES (files, folders or glob patterns) or in videos.

    Writes OUT/<stem>.jpg (boxes with label and score), OUT/predictions.json (COCO results:
    image_id, category_id, bbox [x, y, w, h], score), OUT/categories.json, OUT/images.json and,
    with --save-embeddings, OUT/embeddings/<stem>.safetensors (boxes [N,4] in original pixels and
    unnormalised embeddings [N,D] in input-box order).

    \b
    Examples:
      rclip detect photo.jpg --classes "kite,boy" --weights regionclip_pretrained-cc_rn50.pth
      rclip detect imgs/ --vocabulary lvis --weights regionclip_pretrained-cc_rn50x4.pth
      rclip detect img.jpg --boxes boxes.json --class-embeddings coco_65_cls_emb.pth \\
          --vocabulary coco-ovd --weights regionclip_pretrained-cc_rn50.pth --save-embeddings
      rclip detect img.jpg --boxes boxes.json --classes "cat,dog" --model RN50-quickgelu --random-init
      rclip detect scene.jpg --weights student.safetensors --classes "red circle" \\
          --exemplar "ref.jpg:10,20,110,90=blue star" --proposals grid
      rclip detect clip.mp4 --weights student.safetensors --classes "red circle" --proposals grid \\
          --every 5 --track

    Videos (.mp4, .mov, .mkv, ... or folders of them) give OUT/<stem>.mp4 (annotated) and
    OUT/<stem>.json (per frame: index, time in s, COCO-style detections, track ids with --track).

    The defaults are for looking at pictures (score > 0.05, the best class of each box, 100
    detections). The official zero-shot protocol (clip_rcnn.py: CLIPFastRCNN.inference with
    the LVIS zsinf config; what `rclip eval` always runs) is:

    \b
      --proposals rpn --score-thresh 0.02 --nms 0.5 --max-dets 300 --fusion official --topk-labels 0

    (COCO: --score-thresh 0.001 --max-dets 100; the custom-image demo: --nms 0.3).
    """
    if engine == "onnx" and kw.get("exemplars"):
        from rclip_core.errors import InputError

        raise InputError("--exemplar needs the torch engine (the export has no region path for exemplar images)",
                         "embed them once with `rclip embed --exemplars FILE` and pass --class-embeddings")
    if engine == "onnx":  # before any torch import: the onnx engine runs without torch
        from rclip_cli.commands._detect_onnx import detect_onnx

        return detect_onnx(images, boxes_file, out_dir, not no_images, save_embeddings, precision, kw)
    from rclip_core.device import resolve_device
    from rclip_core.errors import InputError
    from rclip_core.fileio import ensure_output_dir, first_missing_dir, remove_empty_dirs
    from rclip_core.inference import DetectOptions, collect_images
    from rclip_core.weights.loaders import is_detector_file

    if batch_size < 1:
        raise InputError("--batch-size must be >= 1")
    from rclip_cli.commands._detect_video import check_videos, video_inputs

    videos = video_inputs(images)
    video_kw = (kw.pop("every", None), kw.pop("sample_fps", None), bool(kw.pop("track", False)))
    if not videos and (video_kw[0] is not None or video_kw[1] is not None or video_kw[2]):
        raise InputError("--every, --fps and --track apply to videos only")
    if videos and boxes_file:
        raise InputError("--boxes does not apply to videos", "use --proposals rpn|random|grid")
    if videos and video_kw[2]:
        import importlib.util

        if importlib.util.find_spec("supervision") is None or importlib.util.find_spec("trackers") is None:
            raise InputError("--track needs supervision and trackers (ByteTrack)", "pip install 'rclip-toolkit[video]'")
    video_infos = check_videos(videos, video_kw[0], video_kw[1]) if videos else None
    paths = [] if videos else collect_images(images)
    exemplar_rows = _exemplar_rows(kw.get("exemplars") or ())  # parsed and their images checked now
    given = None
    if boxes_file:
        from rclip_core.data.boxes import load_boxes_file

        given = load_boxes_file(boxes_file)
    opts = DetectOptions(proposals="boxes" if given is not None else ("rpn" if proposals == "auto" else proposals),
                         score_thresh=score_thresh, nms=nms, max_dets=max_dets, fusion=fusion,
                         topk_labels=topk_labels, precision=precision, short_side=short_side,
                         max_size=max(max_size, short_side))
    dev = resolve_device(device)
    detector = bool(kw.get("weights")) and is_detector_file(kw["weights"], trust=bool(kw.get("trust_weights")))
    if detector and (given is not None or save_embeddings or proposals != "auto" or kw.get("rpn_weights")
                     or kw.get("random_init")):
        raise InputError("--boxes, --proposals, --rpn-weights, --random-init and --save-embeddings do not apply "
                         "to a fine-tuned detector", "use the pretrained region model for given boxes and embeddings")
    if detector and exemplar_rows:
        raise InputError("--exemplar does not apply to a fine-tuned detector",
                         "use the pretrained region model (its region embeddings are the prompts)")
    created = first_missing_dir(Path(out_dir))
    out = ensure_output_dir(out_dir)
    try:
        if detector:
            # A fine-tuned detector proposes and regresses its own boxes; only the options given
            # on the command line replace its stored test-time settings.
            vocab, runner = _detector_runner(kw, dev, precision)
            if videos:
                from rclip_cli.commands._detect_video import detect_videos

                return detect_videos(runner, vocab, opts, video_infos, out, not no_images, *video_kw)
            run_detection(runner, vocab, opts, paths, None, out, False, not no_images, batch_size)
            return
        model = resolve_model(kw, dev)
        vocab, class_emb = _vocabulary(model, kw, exemplar_rows, opts)
        if opts.proposals == "rpn" and model.rpn is None and proposals == "auto":
            raise InputError("no boxes to classify: these weights carry no offline RPN",
                             "pass --boxes FILE, --rpn-weights rpn_lvis_866.pth, or --proposals random|grid")
        from rclip_core.inference import ZeroShotPipeline

        pipe = ZeroShotPipeline(model, class_emb, opts)
        if videos:
            from rclip_cli.commands._detect_video import detect_videos

            return detect_videos(pipe.run, vocab, opts, video_infos, out, not no_images, *video_kw)
        run_detection(pipe.run, vocab, opts, paths, given, out, save_embeddings, not no_images, batch_size,
                      model_info=(model.info.source, model.arch.name))
    except BaseException:
        remove_empty_dirs(out, created)  # a failed run leaves nothing behind, not even --out
        raise


def _exemplar_rows(specs):
    from rclip_core.data.exemplars import check_exemplar_images, parse_exemplar_spec

    rows = [parse_exemplar_spec(s) for s in specs]
    check_exemplar_images(rows)
    return rows


def _vocabulary(model, kw, exemplar_rows, opts):
    """The text classes (if any) followed by the exemplar classes, and their [K, D] embeddings."""
    if not exemplar_rows:
        return resolve_vocabulary_and_embeddings(model, kw)
    import torch

    from rclip_core.data.vocab import Vocabulary
    from rclip_core.errors import InputError
    from rclip_core.exemplars import exemplar_embeddings

    text = any(kw.get(k) for k in ("classes", "classes_file", "vocabulary", "class_embeddings"))
    vocab, emb = resolve_vocabulary_and_embeddings(model, kw) if text else (None, None)
    ex_emb, ex_names = exemplar_embeddings(model, exemplar_rows, short_side=opts.short_side, max_size=opts.max_size,
                                           precision=opts.precision)
    names = list(vocab.names) if vocab else []
    clash = sorted(set(names) & set(ex_names))
    if clash:
        raise InputError(f"class {clash[0]!r} is given both by name and by --exemplar",
                         "give each class one way, or name the exemplar class differently")
    first_id = max(vocab.category_ids, default=0) + 1 if vocab else 1
    vocab = Vocabulary(name="exemplars" if vocab is None else f"{vocab.name}+exemplars", names=tuple(names + ex_names),
                       display_names=tuple((list(vocab.display_names) if vocab else []) + ex_names),
                       category_ids=tuple((list(vocab.category_ids) if vocab else [])
                                          + list(range(first_id, first_id + len(ex_names)))))
    rows = ex_emb if emb is None else torch.cat([emb.float().cpu(), ex_emb.float()])
    return vocab, rows


def _detector_runner(kw, dev, precision):
    """Load a fine-tuned detector file; returns (vocabulary, runner(prep, path, boxes) -> result)."""
    from click.core import ParameterSource

    from rclip_core.data.vocab import Vocabulary
    from rclip_core.inference import detector_runner
    from rclip_core.weights.loaders import load_detector

    ctx = click.get_current_context()
    explicit = {name: ctx.params[name] for name in ("score_thresh", "nms", "max_dets", "fusion")
                if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
    det = load_detector(kw["weights"], dev, trust=bool(kw.get("trust_weights")))
    if explicit:
        det.update_inference(**explicit)
    if any(kw.get(k) for k in ("classes", "classes_file", "vocabulary", "class_embeddings")):
        vocab, emb = resolve_vocabulary_and_embeddings(det.regionclip, kw)
        det.set_vocabulary(list(vocab.names), emb)
    else:
        names = tuple(det.class_names or ())
        vocab = Vocabulary(name="detector", names=names, display_names=names,
                           category_ids=tuple(range(1, len(names) + 1)))
    return vocab, detector_runner(det, precision)


def run_detection(runner, vocab, opts, paths, given, out: Path, save_embeddings: bool, draw: bool,
                  batch_size: int, model_info: tuple[str, str] = ("", "")) -> None:
    """:func:`rclip_core.inference.detect_files` with ``runner(prepared_image, path, boxes_or_None)
    -> ImageResult``, then the outputs. Failures of single images are collected and listed at
    the end (exit 2)."""
    import numpy as np
    from rich.markup import escape
    from rich.table import Table

    from rclip_core.errors import InputError
    from rclip_core.evaluation.results import detections_to_rows, masks_to_rle, write_results
    from rclip_core.fileio import atomic_write_json
    from rclip_core.inference import detect_files

    stems = _unique_stems(paths)
    predictions, images_meta, failures, rows = [], [], [], []
    segmentations: list[dict] | None = None  # RLEs, when the detector has a mask head
    cat_ids = np.asarray(vocab.category_ids, dtype=np.int64)
    with progress_bar("detect", total=len(paths), unit="img") as advance:
        results = detect_files(runner, paths, boxes=given, short_side=opts.short_side, max_size=opts.max_size,
                               workers=max(1, batch_size))
        for image_id, (path, res, err) in enumerate(results, start=1):
            if err is not None:
                failures.append((path, err))
                advance(1)
                continue
            stem = stems[path]
            h, w = res.orig_size
            images_meta.append({"id": image_id, "file_name": os.path.abspath(path), "width": w, "height": h})
            d = res.detections
            predictions.append(detections_to_rows(image_id, d.boxes, d.scores, cat_ids[d.classes.numpy()]))
            masks = d.paste_masks((h, w)) if getattr(d, "masks", None) is not None else None
            if masks is not None:
                segmentations = (segmentations or []) + masks_to_rle(masks)
            if draw:
                _draw(path, res, vocab, out / f"{stem}.jpg", masks)
            if save_embeddings:
                from rclip_core.weights.io import save_safetensors

                save_safetensors(out / "embeddings" / f"{stem}.safetensors",
                                 {"boxes": res.boxes.float(), "embeddings": res.embeddings.float()},
                                 {"kind": "region_embeddings", "image": os.path.abspath(path),
                                  "model": model_info[0], "architecture": model_info[1]})
            top = ", ".join(f"{vocab.display_names[c]} {s:.2f}" for c, s in
                            list(zip(d.classes.tolist(), d.scores.tolist()))[:3])
            rows.append((os.path.basename(path), f"{w}x{h}", str(int(res.boxes.shape[0])), str(len(d)), top))
            advance(1)
    if not images_meta:
        msg = failures[0][1] if len(failures) == 1 else f"all {len(failures)} images failed; first: {failures[0][1]}"
        raise InputError(msg)
    categories = [{"id": int(cid), "name": n, "display_name": dn}
                  for cid, n, dn in zip(vocab.category_ids, vocab.names, vocab.display_names)]
    atomic_write_json(out / "categories.json", categories, indent=1)
    atomic_write_json(out / "images.json", images_meta, indent=1)
    dets = np.concatenate(predictions) if predictions else np.zeros((0, 7))
    write_results(out / "predictions.json", dets, segmentations=segmentations)
    table = Table(title=f"rclip detect: {len(images_meta)} image(s), {len(dets)} detections", show_lines=False)
    for col in ("image", "size", "regions", "detections", "top labels"):
        table.add_column(col)
    for r in rows[:50]:
        table.add_row(*r)
    console.print(table)
    if len(rows) > 50:
        console.print(f"... and {len(rows) - 50} more images")
    console.print(f"wrote {out / 'predictions.json'} ({len(dets)} detections"
                  + (", with mask RLEs" if segmentations is not None else "") + "), categories.json, images.json"
                  + (f", {len(images_meta)} annotated images" if draw else "")
                  + (", embeddings/" if save_embeddings else ""))
    if failures:
        err_console.print(f"[bold red]{len(failures)} image(s) failed:[/]")
        for p, e in failures:
            err_console.print(f"  [red]{escape(p)}[/]: {escape(e)}", markup=True, highlight=False, soft_wrap=True)
        raise SystemExit(2)


def _unique_stems(paths: list[str]) -> dict[str, str]:
    seen: dict[str, int] = {}
    out: dict[str, str] = {}
    for p in paths:
        stem = Path(p).stem
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out[p] = stem if n == 0 else f"{stem}_{n}"
    return out


def _draw(path, res, vocab, dest: Path, masks=None) -> Path:
    from rclip_core.data.images import read_image
    from rclip_core.fileio import atomic_write
    from rclip_core.viz import draw_detections

    d = res.detections
    # one label per box (like the official visualiser's --show-unique-boxes), best first
    seen, keep = set(), []
    for i, bi in enumerate(d.box_index.tolist()):
        if bi not in seen:
            seen.add(bi)
            keep.append(i)
    keep = keep[:100]
    img = draw_detections(read_image(path), d.boxes[keep].tolist(), [vocab.display_names[c] for c in d.classes[keep].tolist()],
                          d.scores[keep].tolist(), d.classes[keep].tolist(),
                          masks=None if masks is None else masks[keep].numpy())
    return atomic_write(dest, lambda p: img.save(p, format="JPEG", quality=92))
