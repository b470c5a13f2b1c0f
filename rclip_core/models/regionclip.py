"""The RegionCLIP model container and its loading from any supported weights source.

``RegionCLIP`` holds an open_clip ``CLIP`` (visual tower with frozen BN, optional text tower),
the :class:`RegionEncoder` view of its visual tower, optionally the offline RPN and the class
embeddings a detector file carries. ``load_model`` builds it from

* an rclip ``.safetensors`` file (architecture in its metadata),
* an official RegionCLIP / Detectron2 ``.pth`` (``regionclip_pretrained-cc_rn50.pth``,
  ``regionclip_finetuned-*.pth``), the teacher/student ``*_OAI_CLIP.pth``, an OpenAI or
  open_clip checkpoint (architecture inferred from tensor shapes),
* an open_clip architecture name with a pretrained tag (``--model RN50-quickgelu
  --pretrained openai``), downloaded into the usual cache, or
* an architecture name with ``random_init=True`` (untrained; smoke tests only).

Loading is strict for everything that is used: a file that does not fit the architecture fails
with the missing/unexpected keys listed; backbone keys are never silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from rclip_core.errors import InputError, OfflineError, WeightsError
from rclip_core.models.clip import Architecture, build_clip, get_architecture
from rclip_core.models.region_encoder import RegionEncoder
from rclip_core.weights.io import WeightsFile, read_weights, save_safetensors
from rclip_core.weights.official import (ConvertedCheckpoint, convert_checkpoint, infer_text_config,
                                         infer_visual_config, known_architecture_name)

# Keys a checkpoint may lack without harm: CLIP's learned logit scale is never used (the
# temperature is a fixed 0.01, spec 1.6), BN counters do not exist on FrozenBN.
OPTIONAL_KEYS = {"logit_scale"}


@dataclass
class ModelInfo:
    """Where a model came from, for reports and metadata."""

    source: str  # path, "open_clip:RN50-quickgelu/openai" or "random:RN50-quickgelu"
    source_format: str
    text_loaded: bool
    rpn_kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class RegionCLIP(nn.Module):
    """CLIP ResNet split for regions, with optional text tower, offline RPN and class embeddings."""

    def __init__(self, arch: Architecture, with_text: bool = True, fast_attnpool: bool = True):
        super().__init__()
        self.arch = arch
        self.clip = build_clip(arch, with_text=with_text)
        self.encoder = RegionEncoder(self.clip.visual, arch.pooler_resolution, fast_attnpool=fast_attnpool)
        self.rpn: nn.Module | None = None
        self.class_names: list[str] | None = None
        self.class_embeddings: torch.Tensor | None = None  # [K, D], unnormalised
        self.box_predictor: dict[str, torch.Tensor] = {}
        self.info = ModelInfo(source="", source_format="", text_loaded=False)

    @property
    def embed_dim(self) -> int:
        return self.arch.embed_dim

    @property
    def has_text(self) -> bool:
        return self.clip.transformer is not None and self.info.text_loaded

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.clip.transformer is None:
            raise InputError("this model has no text encoder", "pass class embeddings with --class-embeddings")
        return self.clip.encode_text(tokens)

    def identity(self) -> str:
        """A string that identifies the weights (for caches)."""
        return f"{self.arch.name}|{self.info.source}|{self.info.extra.get('sha256', '')}"

    # -- saving ---------------------------------------------------------------------------
    def native_state(self, include_text: bool = True) -> dict[str, torch.Tensor]:
        sd = {k: v for k, v in self.clip.state_dict().items() if include_text or k.startswith("visual.")}
        if self.rpn is not None:
            sd.update({"rpn." + k: v for k, v in self.rpn.state_dict().items()})
        for k, v in self.box_predictor.items():
            sd["box_predictor." + k] = v
        if self.class_embeddings is not None:
            sd["class_embeddings"] = self.class_embeddings
        return sd

    def save(self, path: str | os.PathLike, kind: str = "regionclip", include_text: bool = True,
             extra: dict[str, Any] | None = None) -> Path:
        meta = {
            "kind": kind,
            "architecture": {"name": self.arch.name, "config": self.arch.config},
            "embed_dim": self.embed_dim,
            "has_text": bool(include_text and self.has_text),
            "rpn_kind": self.info.rpn_kind if self.rpn is not None else None,
            "class_names": self.class_names,
            **(extra or {}),
        }
        return save_safetensors(path, self.native_state(include_text and self.has_text), meta)


def _format_keys(keys: list[str], n: int = 6) -> str:
    keys = sorted(keys)
    s = ", ".join(keys[:n])
    return s + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


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


def load_model(weights: str | os.PathLike | None = None, model: str | None = None, pretrained: str | None = None,
               random_init: bool = False, device: torch.device | str = "cpu", with_rpn: bool = True,
               fast_attnpool: bool = True, seed: int = 0,
               download_progress: Callable[[int, int | None], None] | None = None) -> RegionCLIP:
    """Build a :class:`RegionCLIP` from one of the sources listed in the module docstring."""
    if weights is None and model is None:
        raise InputError("no model given", "pass --weights PATH, or --model NAME with --pretrained TAG")
    from rclip_core.models.registry import REGISTRY

    # A named model (regionclip-rn50-cc, ...) stands for its architecture when checking a file.
    named = REGISTRY.get(model) if model else None
    requested = (named.architecture or None) if named else model
    if weights is not None:
        wf = read_weights(weights)
        m = _from_weights_file(wf, requested=requested, fast_attnpool=fast_attnpool, with_rpn=with_rpn)
    elif random_init:
        arch = get_architecture(requested or model)
        torch.manual_seed(seed)
        m = RegionCLIP(arch, with_text=True, fast_attnpool=fast_attnpool)
        m.info = ModelInfo(source=f"random:{arch.name}", source_format="random", text_loaded=True,
                           extra={"seed": seed})
    else:
        from rclip_core.models.registry import resolve_pretrained

        path = resolve_pretrained(model, pretrained, progress=download_progress)
        wf = read_weights(path)
        m = _from_weights_file(wf, requested=requested, fast_attnpool=fast_attnpool, with_rpn=with_rpn)
        m.info.source = (f"named:{model}" if named else
                         f"open_clip:{get_architecture(model).name}/{pretrained or 'openai'}")
    m.eval()
    return m.to(device)


def _from_weights_file(wf: WeightsFile, requested: str | None, fast_attnpool: bool, with_rpn: bool) -> RegionCLIP:
    meta = wf.metadata
    if meta.get("format") == "rclip":
        if meta.get("kind") == "embeddings":
            raise WeightsError(f"{wf.path} holds class embeddings, not a model",
                               "pass it with --class-embeddings and give the model with --weights")
        if "architecture" not in meta:  # e.g. the region embeddings `rclip detect` writes
            raise WeightsError(f"{wf.path} is an rclip {meta.get('kind', 'data')} file, not a model",
                               "pass a model file with --weights")
        arch = get_architecture(meta["architecture"])
        if requested:
            req = get_architecture(requested)
            if req.config["vision_cfg"] != arch.config["vision_cfg"] or req.embed_dim != arch.embed_dim:
                raise WeightsError(f"weights are a {arch.name} model but --model {requested} was asked for",
                                   "drop --model (the architecture is read from the file)")
        clip_state = {k: v for k, v in wf.tensors.items()
                      if not k.startswith(("rpn.", "trained_rpn.", "box_predictor.", "mask_head.", "teacher."))
                      and k != "class_embeddings"}
        conv = ConvertedCheckpoint("rclip", clip_state=clip_state,
                                   rpn_state={k[4:]: v for k, v in wf.tensors.items() if k.startswith("rpn.")},
                                   box_predictor={k[len("box_predictor."):]: v for k, v in wf.tensors.items()
                                                  if k.startswith("box_predictor.")})
        if "class_embeddings" in wf.tensors:
            conv.embeddings = wf.tensors["class_embeddings"]
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


def attach_rpn(model: RegionCLIP, rpn_state: dict[str, torch.Tensor], settings: Any = "zero-shot") -> None:
    """Build the offline RPN matching ``rpn_state`` (Detectron2 names) and load it strictly,
    verifying that every RPN weight is applied (spec 7.17). ``settings``: an RPNSettings or a
    preset name; the default is the zero-shot one (NMS 0.9, 1000 proposals, spec 5.1)."""
    from rclip_core.models.proposals import OfflineRPN, build_offline_rpn

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


class DetectorProposals(NamedTuple):
    boxes: torch.Tensor  # [R, 4] XYXY in the input image's pixels
    objectness_logits: torch.Tensor  # [R]


class DetectorRPN(torch.nn.Module):
    """The RPN trained inside an rclip detector (``detector.proposals: trained``, on the
    detector's own res4), used as a class-agnostic proposal source for another model: zero-shot
    RPN mode and pseudo-labelling on data that has no offline RPN (ShapesWorld), as the paper
    uses an RPN trained on base-class boxes. Called like the offline RPNs: a list of images
    [3, H, W] (RGB 0..255) -> per image ``.boxes`` [R, 4] and ``.objectness_logits`` [R];
    ``settings`` (an :class:`~rclip_core.models.proposals.RPNSettings`) reads and sets its
    test-time top-k and NMS (the detector's own: NMS 0.7, its post-NMS top-k)."""

    kind = "detector"

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        if getattr(detector, "proposal_generator", None) is None:
            raise WeightsError("the detector file has no trained RPN",
                               "train the detector with detector.proposals=trained, or pass an rpn_*.pth")
        self.detector = detector.eval()

    @property
    def settings(self):
        from rclip_core.models.proposals import RPNSettings

        s = self.detector.settings
        return RPNSettings(pre_nms_topk=s.rpn_pre_nms_topk_test, post_nms_topk=s.rpn_post_nms_topk_test,
                           nms_thresh=s.rpn_nms)

    @settings.setter
    def settings(self, value) -> None:
        self.detector.update_settings(rpn_pre_nms_topk_test=int(value.pre_nms_topk),
                                      rpn_post_nms_topk_test=int(value.post_nms_topk),
                                      rpn_nms=float(value.nms_thresh))

    @torch.no_grad()
    def forward(self, images: list[torch.Tensor]) -> list[DetectorProposals]:
        det = self.detector
        enc = det.encoder
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        with torch.autocast(device_type=det.device.type, enabled=False):
            res4 = enc.trunk(enc.batch_images([i.to(det.device, torch.float32) for i in images]))
            out, _ = det.proposal_generator(res4, sizes, None)
        return [DetectorProposals(b.float(), lg.float()) for b, lg in out]


def load_rpn_file(model: RegionCLIP, path: str | os.PathLike) -> None:
    """``--rpn-weights``: a standalone ``rpn_*.pth``, any file carrying ``offline_*`` keys, or an
    rclip detector whose RPN was trained with it (:class:`DetectorRPN`)."""
    from rclip_core.models.detector import load_detector

    wf = read_weights(path)
    if wf.metadata.get("format") == "rclip" and any(k.startswith("trained_rpn.") for k in wf.tensors):
        model.rpn = DetectorRPN(load_detector(path, device=model.device)).to(model.device)
        model.info.rpn_kind = "trained (detector)"
        return
    if wf.metadata.get("format") == "rclip":
        state = {k[4:]: v for k, v in wf.tensors.items() if k.startswith("rpn.")}
    else:
        state = convert_checkpoint(wf.tensors).rpn_state
    if not state:
        raise WeightsError(f"{path} contains no offline RPN weights",
                           "expected an rpn_*.pth file or a RegionCLIP checkpoint with offline_* keys")
    attach_rpn(model, state)


def load_class_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, list[str] | None]:
    """An official ``*_emb.pth`` ([N, D] float32, rows in class order) or an rclip embeddings
    safetensors (names inside). Returns (embeddings [N, D], names or None)."""
    wf = read_weights(path)
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


__all__ = ["RegionCLIP", "load_model", "load_class_embeddings", "load_rpn_file", "attach_rpn", "OfflineError"]
