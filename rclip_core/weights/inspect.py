"""What a weights file holds, as plain JSON-able data (``rclip weights info``).

Works on every format :func:`rclip_core.weights.io.read_weights` reads: native files are split by
the prefix table of :mod:`rclip_core.weights.native`, foreign ones (official RegionCLIP /
Detectron2 ``.pth``, OpenAI / open_clip checkpoints, ``rpn_*.pth``, ``*_emb.pth``) by
:func:`rclip_core.weights.official.convert_checkpoint`; both give the same part names.
"""

from __future__ import annotations

import os
from typing import Any

from rclip_core.errors import WeightsError
from rclip_core.weights.io import read_weights
from rclip_core.weights.native import PARTS, part_of
from rclip_core.weights.official import (convert_checkpoint, infer_text_config, infer_visual_config,
                                         known_architecture_name)

__all__ = ["INFO_PARTS", "describe_weights", "info_parts"]

# The parts `rclip weights info` reports, in its order (native parts with info=None are listed
# among the ignored keys).
INFO_PARTS: tuple[str, ...] = tuple(dict.fromkeys(p.info for p in PARTS if p.info is not None))


def _count(tensors: dict) -> dict[str, int]:
    return {"tensors": len(tensors), "parameters": int(sum(int(t.numel()) for t in tensors.values()))}


def _visual_arch(state: dict, prefix: str) -> dict[str, Any] | None:
    try:
        cfg = infer_visual_config(state, prefix=prefix)
    except WeightsError:
        return None
    v = cfg["vision_cfg"]
    grid = int(v["image_size"]) // 32
    return {"name": known_architecture_name(cfg), "layers": list(v["layers"]), "width": int(v["width"]),
            "embed_dim": int(cfg["embed_dim"]), "image_size": int(v["image_size"]), "attnpool_grid": grid,
            "pooler_resolution": 2 * grid}


def _rpn_kind(keys: list[str]) -> str:
    from rclip_core.models.proposals.offline import OfflineRPN

    try:
        return OfflineRPN.detect_kind(keys)
    except WeightsError as e:
        return f"unsupported ({e})"


def _box_predictor_info(bp: dict) -> dict[str, Any]:
    """Class counts from the box predictor tensors (the names of Detectron2's
    ``detectron2/modeling/roi_heads/fast_rcnn.py: FastRCNNOutputLayers`` with RegionCLIP's
    ``cls_bg_score`` / ``test_cls_score``)."""
    out: dict[str, Any] = {}
    if "cls_score.weight" in bp:
        out["train_classes"] = int(bp["cls_score.weight"].shape[0])
    if "test_cls_score.weight" in bp:
        out["test_classes"] = int(bp["test_cls_score.weight"].shape[0])
    if "bbox_pred.weight" in bp:
        c = int(bp["bbox_pred.weight"].shape[0]) // 4
        out["box_regression"] = "class-agnostic" if c == 1 else f"per class ({c})"
    out["background_embedding"] = "cls_bg_score.weight" in bp
    return out


def info_parts(tensors: dict) -> tuple[dict[str, dict], list[str]]:
    """A native file's tensors -> the parts of :data:`INFO_PARTS` (by the prefix table) + the
    keys info lists as ignored (outside the layout, or in a part info does not describe)."""
    parts: dict[str, dict] = {name: {} for name in INFO_PARTS}
    ignored: list[str] = []
    for k, v in tensors.items():
        p = part_of(k)
        if p is None or p.info is None:
            ignored.append(k)
        else:
            parts[p.info][p.local(k)] = v
    return parts, ignored


def describe_weights(path: str | os.PathLike, trust: bool = False) -> dict[str, Any]:
    """Everything `rclip weights info` reports about a weights file, as plain JSON-able data.

    Reads the file once (never executing pickled code). Raises InputError / WeightsError for
    missing, unreadable or unrecognised files.
    """
    wf = read_weights(path, trust=trust)  # trust: see read_weights (TorchScript, code pickles)
    meta = dict(wf.metadata)
    native = meta.get("format") == "rclip"
    if native:
        parts, ignored = info_parts(wf.tensors)
        fmt = "rclip"
        kind = meta.get("kind") or ("embeddings" if parts["embeddings"] and not parts["visual"] else "model")
    else:
        conv = convert_checkpoint(wf.tensors)
        fmt = conv.source_format
        parts = {
            "visual": {k: v for k, v in conv.clip_state.items() if k.startswith("visual.")},
            "text": {k: v for k, v in conv.clip_state.items() if not k.startswith("visual.")},
            "teacher": conv.teacher_visual_state,
            "rpn": conv.rpn_state,
            "box_predictor": conv.box_predictor,
            "mask_head": conv.mask_head,
            "embeddings": {} if conv.embeddings is None else {"embeddings": conv.embeddings},
        }
        ignored = list(conv.ignored)
        kind = {"embeddings": "embeddings", "rpn": "rpn", "oai_clip": "clip", "open_clip": "clip"}.get(fmt)
        if kind is None:
            kind = "detector" if conv.box_predictor else "regionclip"

    info: dict[str, Any] = {
        "path": str(wf.path),
        "file_size_bytes": wf.path.stat().st_size,
        "container": wf.container,
        "format": fmt,
        "kind": kind,
        "architecture": _visual_arch(parts["visual"], "visual.") if parts["visual"] else None,
        "text_tower": None,
        "teacher": None,
        "offline_rpn": None,
        "box_predictor": None,
        "mask_head": None,
        "embeddings": None,
        **_count(wf.tensors),
        "parts": {name: _count(p) for name, p in parts.items() if p},
        "ignored_keys": sorted(ignored),
    }
    if native:
        info["rclip_metadata"] = {k: meta[k] for k in ("format_version", "rclip_version", "kind") if k in meta}
        arch_meta = meta.get("architecture")
        arch_name = arch_meta.get("name") if isinstance(arch_meta, dict) else arch_meta
        if info["architecture"] is not None and arch_name:
            info["architecture"]["name"] = arch_name  # the name recorded at save time wins
    text = parts["text"]
    if "token_embedding.weight" in text:
        info["text_tower"] = infer_text_config(text)
    if parts["teacher"]:
        info["teacher"] = _visual_arch(parts["teacher"], "")
    if parts["rpn"]:
        info["offline_rpn"] = {"kind": _rpn_kind(list(parts["rpn"]))}
    if parts["box_predictor"]:
        info["box_predictor"] = _box_predictor_info(parts["box_predictor"])
    if parts["mask_head"]:
        mh = parts["mask_head"]
        deconv = mh.get("deconv.weight")
        info["mask_head"] = {"in_channels": int(deconv.shape[0]) if deconv is not None else None}
    if parts["embeddings"]:
        emb = next(iter(parts["embeddings"].values()))
        emb2 = emb.unsqueeze(0) if emb.ndim == 1 else emb
        names = meta.get("names") or meta.get("class_names") if native else None
        info["embeddings"] = {"rows": int(emb2.shape[0]), "dim": int(emb2.shape[-1]),
                              "names": list(names)[:5] if names else None,
                              "normalised": bool(((emb2.float().norm(dim=-1) - 1).abs() < 1e-3).all())}
    return info
