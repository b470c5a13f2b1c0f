"""``rclip export --format onnx``: write the ONNX graphs of a zero-shot RegionCLIP model or of a
fine-tuned detector, their ``export.json`` and the class embeddings a detector carries.

Exporter: ``torch.onnx.export(dynamo=True)`` (``torch.export`` capture, the exporter PyTorch
2.9+ defaults to and keeps developing; the TorchScript one is deprecated), opset 18, with a
dynamic image size and a dynamic number of classes; the two NMS steps are custom ops translated
to ``NonMaxSuppression`` (:mod:`rclip_core.export.nms`). The modules are traced as their plain
PyTorch computation (``RegionEncoder.plain()``, ``OfflineRPN.plain()``), which equals the fast
path that ``rclip detect`` runs up to float rounding.

The output directory is written under a temporary name beside it and renamed at the end, so a
failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from rclip_core.errors import InputError, RuntimeFailure, WeightsError
from rclip_core.models.classifier import InferenceConfig

__all__ = ["EXPORT_FORMAT", "OPSET", "export_onnx"]

OPSET = 18
EXPORT_FORMAT = "rclip-onnx/1"

PREPROCESSING = {
    "decode": "PIL, EXIF orientation applied, converted to RGB (detectron2 read_image)",
    "resize": "ResizeShortestEdge: short side to short_side unless the long side would exceed max_size, "
              "sizes int(x + 0.5), PIL BILINEAR on uint8",
    "image": "uint8 [H, W, 3] RGB of the resized image (normalisation, BGR for the RPN and padding are in the graph)",
    "orig_size": "int64 [2]: (height, width) of the original image after EXIF orientation",
    "given_boxes": "float32 [N, 4] XYXY in original pixels (detector_boxes.onnx only)",
    "class_embeddings": "float32 [K, D], any K >= 1; unnormalised is fine (L2-normalised in the graph)",
}


def _check_out(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise InputError(f"--out {out} already exists", "choose a new directory; export never overwrites")
    if not out.parent.exists():
        raise InputError(f"the parent directory of --out ({out.parent}) does not exist")


def _io(model_proto) -> dict[str, Any]:
    def one(v):
        t = v.type.tensor_type
        import onnx

        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in t.shape.dim]
        return {"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}

    return {"inputs": [one(v) for v in model_proto.graph.input], "outputs": [one(v) for v in model_proto.graph.output]}


def _export_graph(module: torch.nn.Module, args: tuple, names: list[str], dynamic: dict, path: Path) -> dict:
    from rclip_core.export.graphs import OUTPUT_NAMES
    from rclip_core.export.nms import onnx_translations

    prog = torch.onnx.export(module, args, str(path), dynamo=True, input_names=names, output_names=list(OUTPUT_NAMES),
                             dynamic_shapes=dynamic, opset_version=OPSET, external_data=False,
                             custom_translation_table=onnx_translations(), verbose=False)
    return _io(prog.model_proto)


def _example_image(short_side: int, max_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A resized example (not square, so height and width stay separate dynamic dimensions)."""
    from rclip_core.data.images import resized_shape

    h, w = resized_shape(480, 640, short_side, max_size)
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8), torch.tensor([480, 640])


def _check_settings(cfg: InferenceConfig) -> None:
    if cfg.soft_nms:
        raise WeightsError("cannot export a detector that uses soft-NMS: the exported graph runs hard per-class NMS "
                           "(ONNX NonMaxSuppression)", "fine-tune or export with test.soft_nms=false")


def export_onnx(target: Any, out_dir: str | os.PathLike, *, settings: InferenceConfig, short_side: int,
                max_size: int, source: str, sha256: str, progress: Callable[[str], None] | None = None
                ) -> dict[str, Any]:
    """Export ``target`` (a :class:`rclip_core.models.regionclip.RegionCLIP` or a fine-tuned
    :class:`rclip_core.models.detector.Detector`) into the new directory ``out_dir``:
    ``detector.onnx`` (its proposals), ``detector_boxes.onnx`` (zero-shot: given boxes),
    ``text_encoder.onnx`` + tokenizer files when the text tower is loaded, ``export.json``
    (returned), and ``class_embeddings.npy`` when the weights carry a vocabulary."""
    import numpy as np

    from rclip_core.export import graphs
    from rclip_core.models.detector import Detector

    out = Path(out_dir)
    _check_out(out)
    _check_settings(settings)
    is_detector = isinstance(target, Detector)
    model = target.regionclip if is_detector else target
    if not is_detector and model.rpn is None:
        raise WeightsError("these weights carry no offline RPN, so there is no proposal graph to export",
                           "pass --rpn-weights rpn_lvis_866.pth (the zero-shot RPN)")
    if not is_detector and not hasattr(model.rpn, "backbone"):
        raise WeightsError("only the official offline RPNs (rpn_*.pth) export with zero-shot weights; "
                           "this RPN is a detector's trained RPN", "export the detector file itself")
    say = progress or (lambda _msg: None)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        img, orig = _example_image(short_side, max_size)
        D = model.embed_dim
        emb = torch.randn(5, D, generator=torch.Generator().manual_seed(0))
        Dim = torch.export.Dim
        image_dims = {"image": {0: Dim.DYNAMIC, 1: Dim.DYNAMIC}, "orig_size": None}
        files: dict[str, Any] = {}
        t0 = time.perf_counter()
        target.eval()
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(model.encoder.plain())
            if model.rpn is not None and hasattr(model.rpn, "plain"):
                stack.enter_context(model.rpn.plain())
            say("detector.onnx (image + class_embeddings)")
            if is_detector:
                g = graphs.DetectorGraph(target, settings).eval()
            else:
                g = graphs.ZeroShotRPNGraph(model, settings, with_boxes=False).eval()
            files["detector"] = {"file": "detector.onnx", "proposals": _proposal_kind(target, is_detector),
                                 **_export_graph(g, (img, orig, emb), ["image", "orig_size", "class_embeddings"],
                                                 {**image_dims, "class_embeddings": {0: Dim.DYNAMIC}},
                                                 tmp / "detector.onnx")}
            if not is_detector:
                say("detector_boxes.onnx (image + boxes + class_embeddings)")
                gb = graphs.ZeroShotBoxGraph(model, settings, with_boxes=True).eval()
                boxes = torch.tensor([[10.0, 20.0, 200.0, 300.0], [0.0, 0.0, 640.0, 480.0], [300.0, 100.0, 400.0, 380.0]])
                files["detector_boxes"] = {"file": "detector_boxes.onnx", "proposals": "given boxes",
                                           **_export_graph(gb, (img, orig, boxes, emb),
                                                           ["image", "orig_size", "given_boxes", "class_embeddings"],
                                                           {**image_dims, "given_boxes": {0: Dim.DYNAMIC},
                                                            "class_embeddings": {0: Dim.DYNAMIC}},
                                                           tmp / "detector_boxes.onnx")}
            if model.has_text:
                say("text_encoder.onnx (token ids -> embeddings)")
                files["text_encoder"] = _export_text(model, tmp)
        vocab = _vocabulary(target, is_detector)
        if vocab is not None:
            np.save(tmp / "class_embeddings.npy", vocab[1].numpy().astype(np.float32))
        meta = {
            "format": EXPORT_FORMAT,
            "kind": "detector" if is_detector else "zero-shot",
            "source": {"weights": source, "sha256": sha256, "architecture": model.arch.name,
                       "rpn": getattr(model.info, "rpn_kind", None)},
            "opset": OPSET,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "embed_dim": D,
            "graphs": files,
            "settings": {k: v for k, v in asdict(settings).items()
                         if k in ("score_thresh", "nms", "max_dets", "fusion", "topk_labels")},
            "settings_note": "baked into the graphs; fusion applies to RPN proposals only (given boxes: class probability)",
            "preprocessing": {"short_side": short_side, "max_size": max_size, **PREPROCESSING},
            "class_names": list(vocab[0]) if vocab is not None else None,
            "class_embeddings": "class_embeddings.npy" if vocab is not None else None,
            "export_seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / "export.json").write_text(json.dumps(meta, indent=1) + "\n")
        os.chmod(tmp, 0o777 & ~_umask())
        tmp.rename(out)
        return meta
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, (InputError, RuntimeFailure, KeyboardInterrupt)):
            raise
        if isinstance(e, Exception) and type(e).__module__.startswith(("torch", "onnx")):
            raise RuntimeFailure(f"ONNX export failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                                 "rerun with --debug for the exporter's report") from e
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _proposal_kind(target, is_detector: bool) -> str:
    if is_detector and target.proposal_generator is not None:
        return "trained RPN (the detector's)"
    rpn = target.regionclip.rpn if is_detector else target.rpn
    return f"offline RPN {rpn.kind} ({rpn.settings.post_nms_topk} proposals, NMS {rpn.settings.nms})"


def _vocabulary(target, is_detector: bool):
    if is_detector:
        names = target.class_names or [f"class_{i}" for i in range(target.test_embeddings.shape[0])]
        return names, target.test_embeddings.float().cpu()
    if getattr(target, "class_embeddings", None) is not None and getattr(target, "class_names", None):
        return list(target.class_names), target.class_embeddings.float().cpu()
    return None


class _TextGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens):
        return self.model.encode_text(tokens).float()


def _export_text(model, tmp: Path) -> dict[str, Any]:
    """``text_encoder.onnx``: token ids int64 [N, context_length] (open_clip's tokenizer: start
    49406, end 49407, zero padding) -> text embeddings [N, D] (EOT feature @ text_projection,
    unnormalised), plus the BPE vocabulary of the tokenizer."""
    import open_clip

    from rclip_core.models.text import get_tokenizer

    ctx = int(model.arch.text_cfg.get("context_length", 77)) if hasattr(model.arch, "text_cfg") else 77
    tok = get_tokenizer(ctx)
    tokens = tok(["a photo of a cat.", "a photo of a small red square."])
    prog = torch.onnx.export(_TextGraph(model).eval(), (tokens,), str(tmp / "text_encoder.onnx"), dynamo=True,
                             input_names=["token_ids"], output_names=["text_embeddings"],
                             dynamic_shapes={"tokens": {0: torch.export.Dim.DYNAMIC}}, opset_version=OPSET,
                             external_data=False, verbose=False)
    bpe = Path(open_clip.tokenizer.default_bpe())
    shutil.copyfile(bpe, tmp / bpe.name)
    return {"file": "text_encoder.onnx", "tokenizer": {"kind": "open_clip SimpleTokenizer (CLIP BPE)", "bpe": bpe.name,
                                                       "context_length": ctx, "sot": 49406, "eot": 49407},
            **_io(prog.model_proto)}
