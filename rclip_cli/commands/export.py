"""``rclip export``: a deployable ONNX detector whose vocabulary is an input."""

from __future__ import annotations

from pathlib import Path

import click

from rclip_cli._common import console, rclip_command
from rclip_cli._model_options import model_options


@rclip_command("export", short_help="Export a detector to ONNX (vocabulary as an input).")
@model_options
@click.option("--format", "fmt", type=click.Choice(["onnx"]), default="onnx", show_default=True,
              help="Export format.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="New output directory (must not exist).")
@click.option("--score-thresh", type=float, default=0.05, show_default=True,
              help="Baked-in score threshold (a fine-tuned detector: its stored value unless given).")
@click.option("--nms", "nms", type=float, default=0.5, show_default=True, help="Baked-in per-class NMS IoU threshold.")
@click.option("--max-dets", type=int, default=100, show_default=True, help="Baked-in detections per image.")
@click.option("--fusion", type=click.Choice(["official", "sigmoid", "none"]), default="official", show_default=True,
              help="Baked-in RPN score fusion (as `rclip detect --fusion`).")
@click.option("--topk-labels", type=int, default=1, show_default=True,
              help="Best K classes per box that may become detections (0 = all pairs).")
@click.option("--short-side", type=click.IntRange(min=16), default=800, show_default=True,
              help="Test resize recorded in export.json and applied by the runtime helper.")
@click.option("--max-size", type=click.IntRange(min=16), default=1333, show_default=True,
              help="Longest image side at most this after resizing.")
def export(fmt, out_dir, score_thresh, nms, max_dets, fusion, topk_labels, short_side, max_size, debug, **kw):
    """Export zero-shot RegionCLIP weights (with their offline RPN) or a fine-tuned detector to
    ONNX: OUT/detector.onnx (image + class_embeddings -> boxes, scores, classes, region
    embeddings), OUT/detector_boxes.onnx (zero-shot: image + given boxes + class_embeddings),
    OUT/text_encoder.onnx with the tokenizer's BPE file (when the text tower is in the
    weights), OUT/export.json (settings, IO names and shapes, preprocessing, source sha256).

    The class embeddings are a graph input [K, D] with any K: export once, detect with any
    vocabulary (`rclip embed` output) through onnxruntime alone (`rclip detect --engine onnx`,
    or rclip_core.export.OnnxDetector). Needs `pip install 'rclip-toolkit[export]'`.

    \b
    Examples:
      rclip export --weights regionclip_pretrained-cc_rn50.pth --rpn-weights rpn_lvis_866.pth --out rn50-onnx
      rclip export --weights runs/shapes/detector.safetensors --out det-onnx --short-side 256
      rclip detect img.jpg --engine onnx --weights rn50-onnx/export.json --class-embeddings lvis.safetensors
    """
    from click.core import ParameterSource

    from rclip_core.device import resolve_device
    from rclip_core.errors import InputError
    from rclip_core.fileio import sha256_file
    from rclip_core.inference import DetectOptions
    from rclip_core.weights.loaders import is_detector_file

    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            raise InputError(f"{mod} is not installed", "pip install 'rclip-toolkit[export]'") from None
    out = Path(out_dir)
    if out.exists() or out.is_symlink():
        raise InputError(f"--out {out} already exists", "choose a new directory; export never overwrites")
    if not kw.get("weights"):
        raise InputError("--weights is required", "pass the weights file to export")
    max_size = max(max_size, short_side)
    trust = bool(kw.get("trust_weights"))
    dev = resolve_device("cpu")
    if is_detector_file(kw["weights"], trust=trust):
        if kw.get("rpn_weights") or kw.get("random_init"):
            raise InputError("--rpn-weights and --random-init do not apply to a fine-tuned detector")
        from rclip_core.weights.loaders import load_detector

        det = load_detector(kw["weights"], dev, trust=trust)
        ctx = click.get_current_context()
        explicit = {n: ctx.params[n] for n in ("score_thresh", "nms", "max_dets", "fusion", "topk_labels")
                    if ctx.get_parameter_source(n) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)}
        if explicit:
            det.update_inference(**explicit)
        target, settings = det, det.inference_config
    else:
        from rclip_cli._model_options import resolve_model

        target = resolve_model(kw, dev)
        settings = DetectOptions(proposals="rpn", score_thresh=score_thresh, nms=nms, max_dets=max_dets,
                                 fusion=fusion, topk_labels=topk_labels, short_side=short_side, max_size=max_size)
    from rclip_core.export.build import export_onnx

    with console.status("exporting (torch.export + ONNX conversion: minutes on a CPU)") as status:
        meta = export_onnx(target, out, settings=settings, short_side=short_side, max_size=max_size,
                           source=str(Path(kw["weights"]).resolve()), sha256=sha256_file(kw["weights"]),
                           progress=lambda msg: status.update(f"exporting {msg}"))
    files = ", ".join(g["file"] for g in meta["graphs"].values())
    console.print(f"wrote {out}/: {files}, export.json ({meta['kind']}, {meta['source']['architecture']}, "
                  f"opset {meta['opset']}, {meta['export_seconds']} s)")
