"""Zero-shot classification of regions and the official post-processing (spec 1.6, 5.1-5.3).

* :func:`region_class_probs`: cosine similarity of L2-normalised region and text embeddings
  divided by a fixed temperature 0.01, a background logit of exactly 0 (zero embedding),
  softmax over K+1, background column dropped, no renormalisation.
* :func:`postprocess_detections`: score fusion with the RPN objectness, non-finite rows dropped,
  boxes clipped, strict score threshold, per-class NMS (class index as group), top-k, as
  ``fast_rcnn_inference_single_image``.

Fusion modes (``--fusion``):

``official``  ``sqrt(prob * raw_logit)`` on all K+1 columns, as the released code
              (``MULTIPLY_RPN_SCORE``); a negative logit gives NaN and the proposal is dropped by
              the finiteness filter; scores may exceed 1. Reproduces the released RPN numbers.
``sigmoid``   ``sqrt(prob * sigmoid(logit))``: the paper's geometric mean of objectness and
              class confidence (sec. 3.2); scores stay in [0, 1].
``none``      class probability only (GT-box mode always uses this).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import batched_nms, clip_boxes_to_image

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
    """Combine [R, K+1] class probabilities with RPN objectness logits [R] (spec 5.3)."""
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


def postprocess_detections(boxes: Tensor, probs_with_bg: Tensor, image_size: tuple[int, int],
                           objectness_logits: Tensor | None = None, fusion: str = "none",
                           score_thresh: float = 0.05, nms_thresh: float = 0.5, max_dets: int = 100,
                           topk_labels: int = 0) -> Detections:
    """``fast_rcnn_inference_single_image`` for class-agnostic boxes.

    Args:
        boxes: [R, 4] XYXY proposals / given boxes in the image of ``image_size`` (h, w).
        probs_with_bg: [R, K+1] softmax probabilities including the background column.
        objectness_logits: [R] raw RPN logits, required for fusion "official"/"sigmoid".
        topk_labels: if > 0, only the K best classes of each box can become detections.
    """
    scores = fuse_scores(probs_with_bg, objectness_logits, fusion)
    raw_probs = probs_with_bg
    idx = torch.arange(boxes.shape[0], device=boxes.device)
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    if not bool(valid.all()):
        boxes, scores, raw_probs, idx = boxes[valid], scores[valid], raw_probs[valid], idx[valid]
    scores = scores[:, :-1]
    raw_probs = raw_probs[:, :-1]
    boxes = clip_boxes_to_image(boxes, image_size)
    mask = scores > score_thresh  # strict, before NMS and top-k
    if topk_labels and topk_labels > 0 and scores.shape[1] > topk_labels:
        top = scores.topk(topk_labels, dim=1).indices
        allowed = torch.zeros_like(mask)
        allowed.scatter_(1, top, True)
        mask &= allowed
    inds = mask.nonzero()
    det_boxes = boxes[inds[:, 0]]
    det_scores = scores[mask]
    det_probs = raw_probs[mask]
    keep = batched_nms(det_boxes, det_scores, inds[:, 1], nms_thresh)
    if max_dets >= 0:
        keep = keep[:max_dets]
    return Detections(boxes=det_boxes[keep], scores=det_scores[keep], classes=inds[keep, 1],
                      box_index=idx[inds[keep, 0]], probs=det_probs[keep])
