"""Loading models, offline RPNs, class embeddings and detectors from any supported weights source.

:func:`load_model` builds a :class:`~rclip_core.models.regionclip.RegionCLIP` from

* an rclip ``.safetensors`` file (architecture in its metadata; layout in
  :mod:`rclip_core.weights.native`),
* an official RegionCLIP / Detectron2 ``.pth`` (``regionclip_pretrained-cc_rn50.pth``,
  ``regionclip_finetuned-*.pth``), the teacher/student ``*_OAI_CLIP.pth``, an OpenAI or
  open_clip checkpoint (architecture inferred from tensor shapes),
* an open_clip architecture name with a pretrained tag (``--model RN50-quickgelu
  --pretrained openai``), downloaded into the usual cache, or
* an architecture name with ``random_init=True`` (untrained; smoke tests only).

:func:`load_detector` reads a detector written by
:func:`~rclip_core.weights.native.save_detector` or an official fine-tuned RegionCLIP detector.

Loading is strict for everything that is used: a file that does not fit the architecture fails
with the missing/unexpected keys listed; backbone keys are never silently dropped (the official
``detectron2/checkpoint/clip_model_loading.py: align_and_update_state_dicts_for_CLIP`` loads
non-strictly and skips mismatched tensors with a warning).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor, nn

from rclip_core.errors import InputError, WeightsError
from rclip_core.models.clip import Architecture, get_architecture
from rclip_core.models.classifier import InferenceConfig
from rclip_core.models.detector import Detector, DetectorConfig, DetectorRPN
from rclip_core.models.regionclip import ModelInfo, RegionCLIP
from rclip_core.weights.hub import read_safetensors_metadata, read_weights  # hf://OWNER/REPO paths too
from rclip_core.weights.io import WeightsFile
from rclip_core.weights.native import detector_sections, part_of, split_native
from rclip_core.weights.official import (ConvertedCheckpoint, convert_checkpoint, infer_text_config,
                                         infer_visual_config, known_architecture_name)
from rclip_core.weights.registry import REGISTRY, resolve_pretrained

__all__ = ["OPTIONAL_KEYS", "load_model", "load_clip_state", "attach_rpn", "load_rpn_file", "load_class_embeddings",
           "offline_hint", "load_detector", "is_detector_file", "vocabulary_for_rows"]

# Keys a checkpoint may lack without harm: CLIP's learned logit scale is never used (the
# classifier temperature is the fixed MODEL.CLIP.CLSS_TEMP = 0.01 of
# `detectron2/modeling/roi_heads/fast_rcnn.py: FastRCNNOutputLayers`), BN counters do not
# exist on FrozenBN.
OPTIONAL_KEYS = {"logit_scale"}

# Native parts a model file's CLIP state is not made of: read below or by load_detector, or
# (the pretraining teacher) not used. Everything else goes to the strict CLIP check, so a
# stray tensor is reported rather than dropped.
_NOT_CLIP = ("teacher", "rpn", "trained_rpn", "box_predictor", "mask_head", "class_embeddings")


def _format_keys(keys: list[str], n: int = 6) -> str:
    keys = sorted(keys)
    s = ", ".join(keys[:n])
    return s + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def load_model(weights: str | os.PathLike | None = None, model: str | None = None, pretrained: str | None = None,
               random_init: bool = False, device: torch.device | str = "cpu", with_rpn: bool = True,
               fast_attnpool: bool = True, seed: int = 0,
               download_progress: Callable[[int, int | None], None] | None = None,
               trust: bool = False) -> RegionCLIP:
    """Build a :class:`RegionCLIP` from one of the sources listed in the module docstring.

    ``trust``: also read formats that run code when loaded (TorchScript archives such as
    OpenAI's ``RN50.pt``, pickles that need ``weights_only=False``); refused by default
    (:func:`rclip_core.weights.io.read_weights`)."""
    if weights is None and model is None:
        raise InputError("no model given", "pass --weights PATH, or --model NAME with --pretrained TAG")
    # A named model (regionclip-rn50-cc, ...) stands for its architecture when checking a file.
    named = REGISTRY.get(model) if model else None
    requested = (named.architecture or None) if named else model
    if weights is not None:
        wf = read_weights(weights, trust=trust)
        m = _from_weights_file(wf, requested=requested, fast_attnpool=fast_attnpool, with_rpn=with_rpn)
    elif random_init:
        arch = get_architecture(requested or model)
        torch.manual_seed(seed)
        m = RegionCLIP(arch, with_text=True, fast_attnpool=fast_attnpool)
        m.info = ModelInfo(source=f"random:{arch.name}", source_format="random", text_loaded=True,
                           extra={"seed": seed})
    else:
        path = resolve_pretrained(model, pretrained, progress=download_progress)
        wf = read_weights(path, trust=trust)
        m = _from_weights_file(wf, requested=requested, fast_attnpool=fast_attnpool, with_rpn=with_rpn)
        m.info.source = (f"named:{model}" if named else
                         f"open_clip:{get_architecture(model).name}/{pretrained or 'openai'}")
    m.eval()
    return m.to(device)


def load_clip_state(model: RegionCLIP, state: dict[str, torch.Tensor], require_text: bool = False) -> bool:
    """Load open_clip-named tensors strictly. Returns whether the text tower was loaded."""
    # BatchNorm step counters (open_clip / OpenAI files) carry no weights; FrozenBN has none.
    state = {k: v for k, v in state.items() if not k.endswith(".num_batches_tracked")}
    expected = model.clip.state_dict()
    # A file that carries part of a text tower does not fit either: never drop it silently.
    require_text = require_text or any(not k.startswith("visual.") and k not in OPTIONAL_KEYS for k in state)
    missing = [k for k in expected if k not in state and k not in OPTIONAL_KEYS]
    unexpected = [k for k in state if k not in expected]
    text_missing = [k for k in missing if not k.startswith("visual.")]
    visual_missing = [k for k in missing if k.startswith("visual.")]
    has_text = not text_missing and any(not k.startswith("visual.") for k in state)
    if visual_missing or unexpected or (require_text and text_missing):
        parts = []
        if visual_missing or (require_text and text_missing):
            parts.append(f"missing keys: {_format_keys(visual_missing + (text_missing if require_text else []))}")
        if unexpected:
            parts.append(f"unexpected keys: {_format_keys(unexpected)}")
        raise WeightsError(f"weights do not fit architecture {model.arch.name}: " + "; ".join(parts),
                           "check --model / the weights file; rclip never drops backbone keys silently")
    bad_shapes = [f"{k} {list(v.shape)} vs {list(expected[k].shape)}" for k, v in state.items()
                  if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
    if bad_shapes:
        raise WeightsError(f"weights do not fit architecture {model.arch.name}: shape mismatch "
                           + "; ".join(bad_shapes[:3]) + (f" (+{len(bad_shapes) - 3} more)" if len(bad_shapes) > 3 else ""))
    to_load = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    if not has_text:
        to_load = {k: v for k, v in to_load.items() if k.startswith("visual.")}
    model.clip.load_state_dict(to_load, strict=False)
    return has_text


def _arch_from_checkpoint(conv: ConvertedCheckpoint, requested: str | None) -> Architecture:
    cfg = infer_visual_config(conv.clip_state)
    text = infer_text_config(conv.clip_state)
    name = known_architecture_name(cfg)
    if text is None:
        # No text tower in the file (detectors): use the standard tower of the matching config.
        base = get_architecture(name).config if name else None
        text = dict(base["text_cfg"]) if base else {"context_length": 77, "vocab_size": 49408,
                                                      "width": 512, "heads": 8, "layers": 12}
    full = {"embed_dim": cfg["embed_dim"], "quick_gelu": True, "vision_cfg": cfg["vision_cfg"], "text_cfg": text}
    if name:
        known = get_architecture(name)
        # The head count is not stored in any tensor shape: match on everything else.
        if {k: v for k, v in dict(known.text_cfg).items() if k != "heads"} == \
                {k: v for k, v in text.items() if k != "heads"}:
            full = dict(known.config)
    arch = Architecture(name=name or "custom-resnet", config=full)
    if requested:
        req = get_architecture(requested)
        if (list(req.vision_cfg["layers"]) != list(cfg["vision_cfg"]["layers"]) or req.width != cfg["vision_cfg"]["width"]
                or req.embed_dim != cfg["embed_dim"] or req.image_size != cfg["vision_cfg"]["image_size"]):
            raise WeightsError(
                f"weights are a {arch.name} model (layers {cfg['vision_cfg']['layers']}, width "
                f"{cfg['vision_cfg']['width']}, dim {cfg['embed_dim']}) but --model {requested} was asked for",
                "drop --model (the architecture is read from the file) or pass matching weights")
    return arch


def _check_meta_architecture(wf: WeightsFile, arch: Architecture) -> None:
    """The architecture a file's metadata names must be the one its tensors have, before anything
    is built from it (metadata naming a huge network would otherwise allocate it first)."""
    tensors = wf.tensors
    if not any(k.startswith("visual.") for k in tensors):
        return  # no visual tower in the file: nothing to build from the metadata alone
    found = infer_visual_config(tensors)
    said = {"embed_dim": arch.embed_dim, "layers": list(arch.vision_cfg.get("layers", [])), "width": arch.width,
            "image_size": arch.image_size}
    have = {"embed_dim": found["embed_dim"], "layers": list(found["vision_cfg"]["layers"]),
            "width": found["vision_cfg"]["width"], "image_size": found["vision_cfg"]["image_size"]}
    text = infer_text_config(tensors)
    if text is not None:
        for key in ("context_length", "vocab_size", "width", "layers"):
            said[f"text {key}"], have[f"text {key}"] = arch.text_cfg.get(key), text[key]
    diff = [k for k in said if said[k] != have[k]]
    if diff:
        k = diff[0]
        raise WeightsError(f"{wf.path}: its metadata names architecture {arch.name!r} ({k} {said[k]}) but its "
                           f"tensors have {k} {have[k]}", "the file is damaged or was edited: re-export it")


def _native_checkpoint(wf: WeightsFile, requested: str | None) -> tuple[ConvertedCheckpoint, Architecture]:
    meta = wf.metadata
    if meta.get("kind") == "embeddings":
        raise WeightsError(f"{wf.path} holds class embeddings, not a model",
                           "pass it with --class-embeddings and give the model with --weights")
    if "architecture" not in meta:  # e.g. the region embeddings `rclip detect` writes
        raise WeightsError(f"{wf.path} is an rclip {meta.get('kind', 'data')} file, not a model",
                           "pass a model file with --weights")
    arch = get_architecture(meta["architecture"])
    _check_meta_architecture(wf, arch)
    if requested:
        req = get_architecture(requested)
        if req.config["vision_cfg"] != arch.config["vision_cfg"] or req.embed_dim != arch.embed_dim:
            raise WeightsError(f"weights are a {arch.name} model but --model {requested} was asked for",
                               "drop --model (the architecture is read from the file)")
    parts, _ = split_native(wf.tensors)
    clip_state = {k: v for k, v in wf.tensors.items() if getattr(part_of(k), "name", None) not in _NOT_CLIP}
    conv = ConvertedCheckpoint("rclip", clip_state=clip_state,
                               rpn_state=parts["rpn"], box_predictor=parts["box_predictor"])
    if parts["class_embeddings"]:
        conv.embeddings = parts["class_embeddings"]["class_embeddings"]
    return conv, arch


def _from_weights_file(wf: WeightsFile, requested: str | None, fast_attnpool: bool, with_rpn: bool) -> RegionCLIP:
    meta = wf.metadata
    if meta.get("format") == "rclip":
        conv, arch = _native_checkpoint(wf, requested)
    else:
        conv = convert_checkpoint(wf.tensors)
        if conv.source_format == "embeddings":
            raise WeightsError(f"{wf.path} holds a [N, D] embedding tensor, not a model",
                               "pass it with --class-embeddings and give the model with --weights")
        if conv.source_format == "rpn":
            raise WeightsError(f"{wf.path} is an offline RPN checkpoint, not a CLIP model",
                               "pass it with --rpn-weights and give the model with --weights")
        arch = _arch_from_checkpoint(conv, requested)
    with_text = any(k == "token_embedding.weight" for k in conv.clip_state)
    m = RegionCLIP(arch, with_text=with_text, fast_attnpool=fast_attnpool)
    text_loaded = load_clip_state(m, conv.clip_state)
    from rclip_core.fileio import sha256_file

    m.info = ModelInfo(source=str(wf.path), source_format=conv.source_format, text_loaded=text_loaded,
                       extra={"ignored_keys": len(conv.ignored), "size": wf.path.stat().st_size})
    m.info.extra["sha256"] = sha256_file(wf.path) if wf.path.stat().st_size < (64 << 20) else ""
    if with_rpn and conv.rpn_state:
        attach_rpn(m, conv.rpn_state)
    if conv.box_predictor:
        m.box_predictor = {k: v.float() for k, v in conv.box_predictor.items()}
    if meta.get("class_names") and conv.embeddings is not None:
        m.class_names = list(meta["class_names"])
        m.class_embeddings = conv.embeddings.float()
    return m


# --------------------------------------------------------------------------------------------
# Offline RPNs and class embeddings
# --------------------------------------------------------------------------------------------


def attach_rpn(model: RegionCLIP, rpn_state: dict[str, torch.Tensor], settings: Any = "zero-shot") -> None:
    """Build the offline RPN matching ``rpn_state`` (Detectron2 names) and load it strictly,
    verifying that every RPN weight is applied: RegionCLIP's non-strict loading of
    ``MODEL.CLIP.BB_RPN_WEIGHTS`` (``detectron2/checkpoint/clip_model_loading.py``) can leave
    the RPN untrained without an error (RegionCLIP issues #67, #81, #98). ``settings``: an
    RPNSettings or a preset name; the default is the zero-shot one (``OFFLINE_RPN_NMS_THRESH``
    0.9, 1000 proposals, as ``configs/LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_zsinf.yaml``)."""
    from rclip_core.models.proposals.offline import OfflineRPN, build_offline_rpn

    kind = OfflineRPN.detect_kind(list(rpn_state))
    rpn = build_offline_rpn(kind, settings)
    expected = rpn.state_dict()
    missing = [k for k in expected if k not in rpn_state]
    unexpected = [k for k in rpn_state if k not in expected]
    if missing or unexpected:
        raise WeightsError(f"offline RPN weights ({kind}) do not fit: missing {_format_keys(missing)}; "
                           f"unexpected {_format_keys(unexpected)}")
    rpn.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in rpn_state.items()}, strict=True)
    rpn.eval()
    model.rpn = rpn.to(model.device)
    model.info.rpn_kind = kind


def load_rpn_file(model: RegionCLIP, path: str | os.PathLike, trust: bool = False) -> None:
    """``--rpn-weights``: a standalone ``rpn_*.pth``, any file carrying ``offline_*`` keys, or an
    rclip detector whose RPN was trained with it (:class:`DetectorRPN`)."""
    wf = read_weights(path, trust=trust)
    native = wf.metadata.get("format") == "rclip"
    parts = split_native(wf.tensors)[0] if native else None
    if parts is not None and parts["trained_rpn"]:
        model.rpn = DetectorRPN(load_detector(path, device=model.device, trust=trust)).to(model.device)
        model.info.rpn_kind = "trained (detector)"
        return
    state = parts["rpn"] if parts is not None else convert_checkpoint(wf.tensors).rpn_state
    if not state:
        raise WeightsError(f"{path} contains no offline RPN weights",
                           "expected an rpn_*.pth file or a RegionCLIP checkpoint with offline_* keys")
    attach_rpn(model, state)


def load_class_embeddings(path: str | os.PathLike, trust: bool = False) -> tuple[torch.Tensor, list[str] | None]:
    """An official ``*_emb.pth`` ([N, D] float32, rows in class order) or an rclip embeddings
    safetensors (names inside). Returns (embeddings [N, D], names or None)."""
    wf = read_weights(path, trust=trust)
    if wf.metadata.get("format") == "rclip":
        if "embeddings" not in wf.tensors:
            raise WeightsError(f"{path} is an rclip {wf.metadata.get('kind', 'model')} file, not class embeddings")
        names = wf.metadata.get("names") or wf.metadata.get("class_names")
        return wf.tensors["embeddings"].float(), (list(names) if names else None)
    conv = convert_checkpoint(wf.tensors)
    if conv.embeddings is None:
        raise WeightsError(f"{path} is a model checkpoint, not class embeddings",
                           "pass an official *_emb.pth [N, D] file or the output of `rclip embed`")
    return conv.embeddings, None


def offline_hint() -> str:
    return "pass local weights with --weights PATH (an official RegionCLIP .pth or an rclip .safetensors)"


# --------------------------------------------------------------------------------------------
# Detectors
# --------------------------------------------------------------------------------------------


def is_detector_file(path: str | os.PathLike, trust: bool = False) -> bool:
    """True for an rclip detector file or an official fine-tuned RegionCLIP detector (one with
    ``roi_heads.box_predictor`` and ``bbox_pred``), without building anything."""
    try:  # a native file: the header only, no tensor is read
        meta = read_safetensors_metadata(path)
    except WeightsError:  # corrupt files are reported by the real loader
        return False
    if meta is not None:
        return meta.get("kind") == "detector"
    wf = read_weights(path, trust=trust)
    if wf.metadata.get("format") == "rclip":
        return wf.metadata.get("kind") == "detector"
    return any(k.endswith("roi_heads.box_predictor.bbox_pred.weight") for k in wf.tensors)


def vocabulary_for_rows(rows: int) -> str | None:
    """The shipped vocabulary an official embedding matrix of ``rows`` classes stands for."""
    return {65: "coco-ovd", 48: "coco-ovd-base", 17: "coco-ovd-novel", 80: "coco", 1203: "lvis",
            866: "lvis-base"}.get(int(rows))


def _vocab_names(rows: int) -> list[str] | None:
    name = vocabulary_for_rows(rows)
    if name is None:
        return None
    from rclip_core.data.vocab import get_vocabulary

    return list(get_vocabulary(name).names)


def load_detector(path: str | os.PathLike, device: torch.device | str = "cpu", *,
                  config: DetectorConfig | None = None, inference: InferenceConfig | None = None,
                  trust: bool = False) -> Detector:
    """Load a detector written by :func:`~rclip_core.weights.native.save_detector` or an
    official fine-tuned RegionCLIP detector (``regionclip_finetuned-{coco,lvis}_rn50[x4].pth``:
    backbone + offline RPN + ``roi_heads.box_predictor`` (+ mask head)).

    Official files get the settings of their benchmark (COCO: C4 RPN, threshold 0.001, 100
    detections; LVIS: LSJ FPN RPN, 0.02, 300 detections, RPN-score fusion) and class names from
    the shipped vocabularies when their row count identifies one (65 -> coco-ovd, 1203 -> lvis,
    ...). ``config`` / ``inference`` replace the stored :class:`DetectorConfig` /
    :class:`InferenceConfig` (``Detector.update_inference`` adjusts the latter afterwards).
    """
    wf = read_weights(path, trust=trust)
    meta = wf.metadata
    trained_rpn: dict[str, Tensor] = {}
    if meta.get("format") == "rclip":
        if meta.get("kind") != "detector":
            raise WeightsError(f"{wf.path} is an rclip {meta.get('kind', 'model')} file, not a detector",
                               "fine-tune one with `rclip finetune`, or use these weights for zero-shot detection")
        model = _from_weights_file(wf, requested=None, fast_attnpool=True, with_rpn=True)
        parts, _ = split_native(wf.tensors)
        trained_rpn, mask_state = parts["trained_rpn"], parts["mask_head"]
        sections = detector_sections(meta)
        stored = DetectorConfig.from_dict(sections["detector"])
        stored_inference = InferenceConfig.from_dict(sections["inference"])
        names = meta.get("class_names")
        train_names = meta.get("train_class_names")
        test_emb = parts["class_embeddings"].get("class_embeddings")
        freeze_at = int(meta.get("freeze_at", 2))
    else:
        conv = convert_checkpoint(wf.tensors)
        if "bbox_pred.weight" not in conv.box_predictor or "cls_score.weight" not in conv.box_predictor:
            raise WeightsError(f"{wf.path} is not a fine-tuned detector (no roi_heads.box_predictor.bbox_pred)",
                               "fine-tune it with `rclip finetune --init`, or use it for zero-shot detection")
        model = _from_weights_file(wf, requested=None, fast_attnpool=True, with_rpn=True)
        mask_state = dict(conv.mask_head)
        lvis_like = bool(mask_state) or (model.info.rpn_kind or "").startswith("lvis")
        stored = DetectorConfig.lvis(mask_head=bool(mask_state)) if lvis_like else DetectorConfig()
        stored_inference = InferenceConfig.lvis() if lvis_like else InferenceConfig()
        test_emb = conv.box_predictor.get("test_cls_score.weight")
        rows = int((test_emb if test_emb is not None else conv.box_predictor["cls_score.weight"]).shape[0])
        names = _vocab_names(rows)
        train_names = _vocab_names(int(conv.box_predictor["cls_score.weight"].shape[0]))
        freeze_at = 2
    bp = model.box_predictor
    for key in ("cls_score.weight", "bbox_pred.weight", "bbox_pred.bias"):
        if key not in bp:
            raise WeightsError(f"{wf.path} has no box_predictor.{key}")
    if bool(bp["bbox_pred.weight"].shape[0] != 4):
        raise WeightsError(f"{wf.path}: bbox_pred has {bp['bbox_pred.weight'].shape[0]} outputs; only "
                           "class-agnostic box regression (4) is supported")
    cfg = replace(config or stored, proposals="trained" if trained_rpn else "offline", mask_head=bool(mask_state))
    det = Detector(model, bp["cls_score.weight"], test_emb, class_names=names, train_class_names=train_names,
                   config=cfg, inference=inference or stored_inference, freeze_at=freeze_at)
    with torch.no_grad():
        bg = bp.get("cls_bg_score.weight")
        if bg is not None:
            det.box_predictor.cls_bg_score.weight.copy_(bg.float())
        det.box_predictor.bbox_pred.weight.copy_(bp["bbox_pred.weight"].float())
        det.box_predictor.bbox_pred.bias.copy_(bp["bbox_pred.bias"].float())
    if trained_rpn:
        _load_strict(det.proposal_generator, trained_rpn, "trained RPN", wf.path)
    if mask_state:
        _load_strict(det.mask_head, mask_state, "mask head", wf.path)
    det.eval()
    return det.to(device)


def _load_strict(module: nn.Module, state: Mapping[str, Tensor], what: str, path: Path) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad:
        raise WeightsError(f"{path}: the {what} weights do not fit (missing {missing[:3]}, unexpected "
                           f"{unexpected[:3]}, shape mismatch {bad[:3]})")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
