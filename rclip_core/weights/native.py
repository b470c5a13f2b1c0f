"""The native rclip weights layout: one safetensors file, one prefix table.

A native file holds tensors under open_clip names (``visual.*`` and the text tower's
``transformer.*``, ``token_embedding.weight``, ...) plus the parts listed in :data:`PARTS`
(``rpn.*`` the offline Detectron2 RPN, ``trained_rpn.*`` a detector's own RPN,
``box_predictor.*`` with the names of Detectron2's ``FastRCNNOutputLayers``, ``mask_head.*``,
``class_embeddings`` [K, D]; ``embeddings`` alone for an embeddings file) and JSON metadata
(:mod:`rclip_core.weights.io`). :func:`save_model`, :func:`save_detector`, the loaders
(:mod:`rclip_core.weights.loaders`) and ``rclip weights info``
(:mod:`rclip_core.weights.inspect`) all read the table through :func:`split_native` and
:func:`join_native`, so a prefix is spelled once.

Detector files also store the detector's settings: ``detector`` (its
:class:`~rclip_core.models.detector.DetectorConfig`) and ``inference`` (its
:class:`~rclip_core.models.classifier.InferenceConfig`). Files written by rclip 0.x before the
two types existed store one flat ``detector_settings`` dict; :data:`LEGACY_DETECTOR_SETTINGS`
maps each flat key to its place in the two sections (:func:`detector_sections`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from rclip_core.weights.io import save_safetensors
from rclip_core.weights.official import TEXT_KEYS_EXACT, TEXT_KEYS_PREFIXES

if TYPE_CHECKING:
    from rclip_core.models.detector import Detector
    from rclip_core.models.regionclip import RegionCLIP

__all__ = ["NativePart", "PARTS", "PART_NAMES", "part_of", "split_native", "join_native", "native_key",
           "save_model", "save_detector", "detector_tensors", "LEGACY_DETECTOR_SETTINGS", "nest_detector_settings",
           "detector_sections"]


@dataclass(frozen=True)
class NativePart:
    """One part of the native layout.

    ``prefixes`` / ``exact``: the keys of the part. With ``strip`` the part's own names are the
    keys without the (first matching) prefix, e.g. ``rpn.offline_backbone.stem.conv1.weight`` ->
    ``offline_backbone.stem.conv1.weight``; :func:`join_native` writes ``prefixes[0]`` back.
    ``info``: the part ``rclip weights info`` reports it under (None: listed as ignored keys).
    """

    name: str
    prefixes: tuple[str, ...] = ()
    exact: tuple[str, ...] = ()
    strip: bool = True
    info: str | None = None

    def owns(self, key: str) -> bool:
        return key in self.exact or key.startswith(self.prefixes)

    def local(self, key: str) -> str:
        """The part's own name of the file key ``key``."""
        if not self.strip or key in self.exact:
            return key
        for p in self.prefixes:
            if key.startswith(p):
                return key[len(p):]
        raise KeyError(key)

    def key(self, local: str) -> str:
        """The file key of the part's own name ``local`` (inverse of :meth:`local`)."""
        if not self.strip or local in self.exact:
            return local
        return self.prefixes[0] + local


# The order is the order of the parts in `rclip weights info`.
PARTS: tuple[NativePart, ...] = (
    NativePart("visual", ("visual.",), strip=False, info="visual"),  # open_clip ModifiedResNet names
    NativePart("text", TEXT_KEYS_PREFIXES, TEXT_KEYS_EXACT, strip=False, info="text"),  # open_clip CLIP text tower
    # a pretraining teacher: visual-tower names without "visual."
    NativePart("teacher", ("teacher.visual.", "teacher."), info="teacher"),
    NativePart("rpn", ("rpn.",), info="rpn"),  # the offline RPN, Detectron2 offline_* names
    NativePart("trained_rpn", ("trained_rpn.",), info=None),  # torchvision RPN trained with the detector
    NativePart("box_predictor", ("box_predictor.",), info="box_predictor"),  # roi_heads.box_predictor.*
    NativePart("mask_head", ("mask_head.",), info="mask_head"),  # roi_heads.mask_head.*
    NativePart("class_embeddings", exact=("class_embeddings",), info="embeddings"),  # a model's classes [K, D]
    NativePart("embeddings", exact=("embeddings",), info="embeddings"),  # an embeddings file [N, D]
)
PART_NAMES = tuple(p.name for p in PARTS)
_BY_NAME = {p.name: p for p in PARTS}


def part_of(key: str) -> NativePart | None:
    """The part a file key belongs to, or None for a key outside the layout."""
    for p in PARTS:
        if p.owns(key):
            return p
    return None


def split_native(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """File tensors -> ({part name: {own name: tensor}} with every part present, keys outside
    the layout)."""
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in PART_NAMES}
    unknown: list[str] = []
    for k, v in tensors.items():
        p = part_of(k)
        if p is None:
            unknown.append(k)
        else:
            parts[p.name][p.local(k)] = v
    return parts, unknown


def join_native(parts: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`split_native`: {part name: {own name: tensor}} -> file tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, state in parts.items():
        p = _BY_NAME[name]
        out.update({p.key(k): v for k, v in state.items()})
    return out


def native_key(part: str, local: str) -> str:
    """The file key of ``local`` in ``part`` (``native_key("rpn", "x")`` == ``"rpn.x"``)."""
    return _BY_NAME[part].key(local)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _clip_parts(clip_state: Mapping[str, torch.Tensor], include_text: bool) -> dict[str, dict[str, torch.Tensor]]:
    """The CLIP state as the visual part and (with ``include_text``) the text part."""
    visual = {k: v for k, v in clip_state.items() if k.startswith(_BY_NAME["visual"].prefixes)}
    text = {k: v for k, v in clip_state.items() if k not in visual} if include_text else {}
    return {"visual": visual, "text": text}


def _architecture_meta(model: RegionCLIP) -> dict[str, Any]:
    return {"architecture": {"name": model.arch.name, "config": model.arch.config}, "embed_dim": model.embed_dim}


def save_model(model: RegionCLIP, path: str | os.PathLike, kind: str = "regionclip", include_text: bool = True,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Write a :class:`~rclip_core.models.regionclip.RegionCLIP` as one native file (atomically).

    Tensors: the visual tower, the text tower (with ``include_text``, when the model has one),
    the offline RPN, the box predictor and the class embeddings the model carries. Metadata:
    ``kind``, the architecture, ``embed_dim``, ``has_text``, ``rpn_kind``, ``class_names`` and
    ``extra``.
    """
    keep_text = bool(include_text and model.has_text)
    parts = _clip_parts(model.clip.state_dict(), keep_text)
    if model.rpn is not None:
        parts["rpn"] = dict(model.rpn.state_dict())
    parts["box_predictor"] = dict(model.box_predictor)
    if model.class_embeddings is not None:
        parts["class_embeddings"] = {"class_embeddings": model.class_embeddings}
    meta = {
        "kind": kind,
        **_architecture_meta(model),
        "has_text": keep_text,
        "rpn_kind": model.info.rpn_kind if model.rpn is not None else None,
        "class_names": model.class_names,
        **(dict(extra) if extra else {}),
    }
    return save_safetensors(path, join_native(parts), meta)


def detector_tensors(detector: Detector, include_text: bool = True) -> dict[str, torch.Tensor]:
    """The native tensors of a :class:`~rclip_core.models.detector.Detector`: backbone, text
    tower (with ``include_text``), the offline RPN (unless the detector trained its own),
    the box predictor, ``class_embeddings`` (the test classes), the trained RPN and the mask head."""
    m = detector.regionclip
    parts = _clip_parts(m.clip.state_dict(), bool(include_text and m.has_text))
    if m.rpn is not None and detector.proposal_generator is None:
        parts["rpn"] = dict(m.rpn.state_dict())
    bp = detector.box_predictor
    parts["box_predictor"] = {"cls_score.weight": bp.cls_score.weight, "cls_bg_score.weight": bp.cls_bg_score.weight,
                              "bbox_pred.weight": bp.bbox_pred.weight, "bbox_pred.bias": bp.bbox_pred.bias}
    parts["class_embeddings"] = {"class_embeddings": detector.test_embeddings}
    if detector.proposal_generator is not None:
        parts["trained_rpn"] = dict(detector.proposal_generator.state_dict())
    if detector.mask_head is not None:
        parts["mask_head"] = dict(detector.mask_head.state_dict())
    return join_native(parts)


def save_detector(detector: Detector, path: str | os.PathLike, include_text: bool = True,
                  extra: Mapping[str, Any] | None = None) -> Path:
    """Write a detector as one native file (``kind: detector``), atomically.

    Metadata: the architecture, ``class_names`` (rows of ``class_embeddings``, the classes
    detected), ``train_class_names``, ``proposals`` (offline with ``rpn_kind``, or trained),
    ``detector`` (the DetectorConfig) and ``inference`` (the InferenceConfig), ``freeze_at``,
    ``mask_head`` and ``extra``. ``include_text`` keeps the text tower so ``--classes`` can
    embed new names at detection time.
    """
    m = detector.regionclip
    trained = detector.proposal_generator is not None
    meta = {
        "kind": "detector",
        **_architecture_meta(m),
        "has_text": bool(include_text and m.has_text),
        "rpn_kind": m.info.rpn_kind if (m.rpn is not None and not trained) else None,
        "proposals": detector.config.proposals if (trained or m.rpn is not None) else None,
        "class_names": detector.class_names,
        "train_class_names": detector.train_class_names,
        "detector": detector.config.to_dict(),
        "inference": detector.inference_config.to_dict(),
        "freeze_at": detector.freeze_at,
        "mask_head": detector.mask_head is not None,
        **(dict(extra) if extra else {}),
    }
    return save_safetensors(path, detector_tensors(detector, include_text), meta)


# --------------------------------------------------------------------------------------------
# Detector settings in the metadata
# --------------------------------------------------------------------------------------------

# flat `detector_settings` key -> (section, field[, sub-field]); keys not listed are
# `detector.<same name>` (temperature, rois_per_image, ..., proposals).
LEGACY_DETECTOR_SETTINGS: dict[str, tuple[str, ...]] = {
    "offline_rpn_pre_nms_topk": ("detector", "offline_rpn", "pre_nms_topk"),
    "offline_rpn_post_nms_topk": ("detector", "offline_rpn", "post_nms_topk"),
    "offline_rpn_nms": ("detector", "offline_rpn", "nms"),
    "anchor_sizes": ("detector", "rpn", "anchor_sizes"),
    "anchor_ratios": ("detector", "rpn", "anchor_ratios"),
    "rpn_fg_iou": ("detector", "rpn", "fg_iou"),
    "rpn_bg_iou": ("detector", "rpn", "bg_iou"),
    "rpn_batch_per_image": ("detector", "rpn", "batch_per_image"),
    "rpn_positive_fraction": ("detector", "rpn", "positive_fraction"),
    "rpn_pre_nms_topk_train": ("detector", "rpn", "pre_nms_topk_train"),
    "rpn_post_nms_topk_train": ("detector", "rpn", "post_nms_topk_train"),
    "rpn_pre_nms_topk_test": ("detector", "rpn", "pre_nms_topk_test"),
    "rpn_post_nms_topk_test": ("detector", "rpn", "post_nms_topk_test"),
    "rpn_nms": ("detector", "rpn", "nms"),
    "score_thresh": ("inference", "score_thresh"),
    "nms_thresh": ("inference", "nms"),
    "max_dets": ("inference", "max_dets"),
    "fusion": ("inference", "fusion"),
    "soft_nms": ("inference", "soft_nms"),
    "soft_nms_sigma": ("inference", "soft_nms_sigma"),
    "soft_nms_prune": ("inference", "soft_nms_prune"),
    "chunk_size": ("inference", "chunk_size"),
}
_SECTIONS = ("detector", "inference")


def _place(key: str) -> tuple[str, ...]:
    return LEGACY_DETECTOR_SETTINGS.get(key, ("detector", key))


def nest_detector_settings(flat: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Flat ``detector_settings`` -> ``{"detector": {..., "offline_rpn": {...}, "rpn": {...}},
    "inference": {...}}`` (only the keys given)."""
    out: dict[str, dict[str, Any]] = {s: {} for s in _SECTIONS}
    for k, v in flat.items():
        section, *path = _place(k)
        d = out[section]
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = list(v) if isinstance(v, tuple) else v
    return out


def detector_sections(meta: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``detector`` / ``inference`` sections stored in a detector file's metadata, or those
    of a legacy flat ``detector_settings`` dict (empty sections when neither is there)."""
    if isinstance(meta.get("detector"), Mapping) or isinstance(meta.get("inference"), Mapping):
        return {s: dict(meta.get(s) or {}) for s in _SECTIONS}
    return nest_detector_settings(meta.get("detector_settings") or {})
