"""Cosine classifier of regions, score fusion and the one post-processing of detections.

* :func:`region_class_probs`: cosine similarity of L2-normalised region and text embeddings
  divided by a fixed temperature 0.01, a background logit of exactly 0 (zero embedding),
  softmax over K+1, background column dropped, no renormalisation
  (``detectron2/modeling/roi_heads/fast_rcnn.py: FastRCNNOutputLayers`` with
  ``USE_CLIP_CLS_EMB``, ``CLSS_TEMP`` 0.01).
* :func:`postprocess`: score fusion with the RPN objectness, non-finite rows dropped, boxes
  clipped, strict score threshold, per-class NMS (class index as group) or gaussian soft-NMS,
  top-k, as ``detectron2/modeling/roi_heads/fast_rcnn.py: fast_rcnn_inference_single_image``;
  one function for zero-shot detection and for the fine-tuned detector, shaped by
  :class:`InferenceConfig`.

Fusion modes (``--fusion``):

``official``  ``sqrt(prob * raw_logit)`` on all K+1 columns, as the released code
              (``clip_rcnn.py: CLIPFastRCNN.inference`` with ``MULTIPLY_RPN_SCORE``); a negative logit gives NaN and the proposal is dropped by
              the finiteness filter; scores may exceed 1. Reproduces the released RPN numbers.
``sigmoid``   ``sqrt(prob * sigmoid(logit))``: the paper's geometric mean of objectness and
              class confidence (sec. 3.2); scores stay in [0, 1].
``none``      class probability only (GT-box mode always uses this).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

from rclip_core.models.roi_heads import batched_soft_nms_gaussian

CLASSIFIER_TEMPERATURE = 0.01
FUSION_MODES = ("official", "sigmoid", "none")


def region_class_logits(region_emb: Tensor, class_emb: Tensor, temperature: float = CLASSIFIER_TEMPERATURE
                        ) -> Tensor:
    """[R, D] x [K, D] -> [R, K+1] logits; the last column is the background (always 0)."""
    x = F.normalize(region_emb.float(), p=2.0, dim=1)
    w = F.normalize(class_emb.float().to(x.device), p=2.0, dim=1)
    cls = x @ w.t()
    bg = x.new_zeros((x.shape[0], 1))  # the frozen all-zero background embedding
    return torch.cat([cls, bg], dim=1) / temperature


def region_class_probs(region_emb: Tensor, class_emb: Tensor, temperature: float = CLASSIFIER_TEMPERATURE,
                       keep_background: bool = False) -> Tensor:
    """Softmax over K+1; returns [R, K] (background dropped, not renormalised) or [R, K+1]."""
    probs = region_class_logits(region_emb, class_emb, temperature).softmax(dim=-1)
    return probs if keep_background else probs[:, :-1]


def fuse_scores(probs_with_bg: Tensor, objectness_logits: Tensor | None, mode: str) -> Tensor:
    """Combine [R, K+1] class probabilities with RPN objectness logits [R] (the modes of the
    module docstring; ``official`` is ``clip_rcnn.py: CLIPFastRCNN.inference``)."""
    if mode == "none" or objectness_logits is None:
        return probs_with_bg
    lg = objectness_logits.to(probs_with_bg.dtype)[:, None]
    if mode == "official":
        return (probs_with_bg * lg) ** 0.5  # NaN where the raw logit is negative
    if mode == "sigmoid":
        return (probs_with_bg * lg.sigmoid()) ** 0.5
    raise ValueError(f"unknown fusion mode {mode!r}")


@dataclass
class Detections:
    """Detections of one image, sorted by score. Boxes in the pixels they were given in."""

    boxes: Tensor  # [M, 4] XYXY float32
    scores: Tensor  # [M]
    classes: Tensor  # [M] int64, 0-based class index
    box_index: Tensor  # [M] int64, index of the input box / proposal each detection came from
    probs: Tensor  # [M] class probability before fusion (the official VIS score)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to_supervision(self, class_names: Sequence[str] | None = None):
        """These detections as a ``supervision.Detections`` (the optional extra
        ``rclip-toolkit[supervision]``): ``xyxy``, ``confidence`` = scores, ``class_id`` = class
        indices; ``data["class_name"]`` from ``class_names`` (the vocabulary, row order) when
        given, and ``data["box_index"]``. Masks, when present, are not converted."""
        try:
            import supervision as sv
        except ImportError:
            raise ImportError("to_supervision needs the supervision package: "
                              "pip install 'rclip-toolkit[supervision]'") from None
        import numpy as np

        classes = self.classes.detach().cpu().numpy().astype(int)
        data = {"box_index": self.box_index.detach().cpu().numpy().astype(int)}
        if class_names is not None:
            names = list(class_names)
            if len(classes) and int(classes.max()) >= len(names):
                raise ValueError(f"class index {int(classes.max())} but only {len(names)} class names")
            data["class_name"] = np.array([names[c] for c in classes], dtype=object).astype(str) \
                if len(classes) else np.array([], dtype=str)
        return sv.Detections(xyxy=self.boxes.detach().cpu().float().numpy().reshape(-1, 4),
                             confidence=self.scores.detach().cpu().float().numpy(), class_id=classes, data=data)


@dataclass(kw_only=True)
class InferenceConfig:
    """How detections are post-processed; the fields are the fine-tuning recipe's ``test``
    inference keys (``test.score_thresh`` ...) and the detection CLI's flags.

    Defaults: the COCO transfer test (``configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd.yaml``:
    threshold 0.001, 100 detections, per-class NMS 0.5, no fusion); LVIS
    (``configs/LVISv1-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4.yaml``) uses 0.02 / 300 /
    ``fusion: official`` (``MULTIPLY_RPN_SCORE``); ``test_transfer_learning.sh`` enables gaussian
    ``soft_nms`` (``SOFT_NMS_ENABLED``: sigma 0.5, prune 0.001). ``score_thresh`` is strict. ``topk_labels`` > 0 lets only the best K classes
    of each box become detections (zero-shot visualisation; 0 = every (box, class) pair, the
    official protocol). ``chunk_size``: regions per region-head call (bounds peak memory).
    """

    score_thresh: float = 0.001
    nms: float = 0.5
    max_dets: int = 100
    fusion: Literal["none", "official", "sigmoid"] = "none"
    soft_nms: bool = False
    soft_nms_sigma: float = 0.5
    soft_nms_prune: float = 0.001
    chunk_size: int = 256
    topk_labels: int = 0

    def __post_init__(self) -> None:
        if not self.score_thresh >= 0:
            raise ValueError(f"score_thresh must be >= 0, got {self.score_thresh}")
        if not 0.0 < self.nms <= 1.0:
            raise ValueError(f"nms must be in (0, 1], got {self.nms}")
        for name in ("max_dets", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion must be one of {', '.join(FUSION_MODES)}, got {self.fusion!r}")
        if not self.soft_nms_sigma > 0:
            raise ValueError(f"soft_nms_sigma must be positive, got {self.soft_nms_sigma}")
        if not self.soft_nms_prune >= 0:
            raise ValueError(f"soft_nms_prune must be >= 0, got {self.soft_nms_prune}")
        if self.topk_labels < 0:
            raise ValueError(f"topk_labels must be >= 0, got {self.topk_labels}")

    @classmethod
    def lvis(cls, **changes: Any) -> "InferenceConfig":
        """The LVIS transfer test (``CLIP_fast_rcnn_R_50_C4.yaml``): score threshold 0.02, 300
        detections, RPN-score fusion (``MULTIPLY_RPN_SCORE``)."""
        return cls(**{"score_thresh": 0.02, "max_dets": 300, "fusion": "official", **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "InferenceConfig":
        """Known keys only (files written by a newer rclip may carry more)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def postprocess(boxes: Tensor, probs_with_bg: Tensor, image_size: tuple[int, int],
                objectness_logits: Tensor | None = None, cfg: InferenceConfig | None = None) -> Detections:
    """``fast_rcnn_inference_single_image`` for class-agnostic boxes, with hard per-class NMS
    or gaussian soft-NMS (``cfg.soft_nms``).

    Args:
        boxes: [R, 4] XYXY proposals / given / decoded boxes in the image of ``image_size`` (h, w).
        probs_with_bg: [R, K+1] softmax probabilities including the background column.
        objectness_logits: [R] raw RPN logits, needed for fusion "official"/"sigmoid" (None: no
            fusion, whatever ``cfg.fusion`` says).
        cfg: :class:`InferenceConfig` (None: its defaults).
    """
    cfg = cfg or InferenceConfig()
    scores = fuse_scores(probs_with_bg, objectness_logits, cfg.fusion)
    raw_probs = probs_with_bg
    idx = torch.arange(boxes.shape[0], device=boxes.device)
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if not bool(valid.all()):
        boxes, scores, raw_probs, idx = boxes[valid], scores[valid], raw_probs[valid], idx[valid]
    scores = scores[:, :-1]
    raw_probs = raw_probs[:, :-1]
    boxes = clip_boxes_to_image(boxes, image_size)
    mask = scores > cfg.score_thresh  # strict, before NMS and top-k
    topk = cfg.topk_labels
    if topk and topk > 0 and scores.shape[1] > topk:
        top = scores.topk(topk, dim=1).indices
        allowed = torch.zeros_like(mask)
        allowed.scatter_(1, top, True)
        mask &= allowed
    inds = mask.nonzero()
    det_boxes = boxes[inds[:, 0]]
    det_scores = scores[mask]
    det_probs = raw_probs[mask]
    if cfg.soft_nms:
        keep, final_scores = _soft_nms_per_class(det_boxes, det_scores, inds[:, 1], cfg)
    else:
        keep = batched_nms(det_boxes, det_scores, inds[:, 1], cfg.nms)
        if cfg.max_dets >= 0:
            keep = keep[:cfg.max_dets]
        final_scores = det_scores[keep]
    return Detections(boxes=det_boxes[keep], scores=final_scores, classes=inds[keep, 1],
                      box_index=idx[inds[keep, 0]], probs=det_probs[keep])


def _soft_nms_per_class(boxes: Tensor, scores: Tensor, classes: Tensor, cfg: InferenceConfig
                        ) -> tuple[Tensor, Tensor]:
    """Gaussian soft-NMS within each class (``detectron2/layers/soft_nms.py: batched_soft_nms``
    as ``fast_rcnn_inference_single_image`` calls it), then the first ``max_dets`` in the
    official pick order -> (keep, decayed scores)."""
    keep, final_scores = batched_soft_nms_gaussian(boxes, scores, classes, cfg.soft_nms_sigma, cfg.soft_nms_prune)
    return keep[: cfg.max_dets], final_scores[: cfg.max_dets]
