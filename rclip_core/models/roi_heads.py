"""The RoI stage of Fast R-CNN: sampling proposals for training, the box losses, box decoding,
mask targets and gaussian soft-NMS (torchvision ``roi_heads.py`` style: one stage, its losses beside it).

* :func:`sample_rois`: ``detectron2/modeling/roi_heads/roi_heads.py: ROIHeads.label_and_sample_proposals``
  with torchvision's ``Matcher`` (IoU >= 0.5, one threshold, no ignore band) and
  ``BalancedPositiveNegativeSampler`` (512 RoIs per image, <= 25 % foreground), ground truth
  appended (``PROPOSAL_APPEND_GT``); targets 0..K-1 for foreground and K for background.
* :func:`fast_rcnn_losses`: the classification loss of ``fast_rcnn.py: FastRCNNOutputLayers.losses``
  (COCO: focal-scaled CE, ``FOCAL_SCALED_LOSS`` 0.5 with background x ``BG_CLS_LOSS_WEIGHT`` 0.2;
  LVIS: class-weighted CE, background weight 0.8; :mod:`rclip_core.losses`) and the
  class-agnostic L1 box loss normalised by the number of sampled RoIs.
* :func:`decode_box_deltas`: ``detectron2/modeling/box_regression.py: Box2BoxTransform``
  (weights (10, 10, 5, 5), dw/dh clamped at log(1000/16)).
* :func:`rasterize_polygons_within_box`: mask targets of ``mask_head.py: mask_rcnn_loss``.
* :func:`soft_nms_gaussian`, :func:`batched_soft_nms_gaussian`: Detectron2's ``soft_nms`` /
  ``batched_soft_nms`` (method "gaussian", ``detectron2/layers/soft_nms.py`` of the official
  fork) as ``test_transfer_learning.sh`` enables it (``SOFT_NMS_ENABLED``), with the official
  numbers (IoU on class-shifted boxes, first-iteration pruning, global pick order).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.ops import box_iou

from rclip_core.losses import focal_scaled_cross_entropy, weighted_cross_entropy

__all__ = ["BOX_REG_WEIGHTS", "SCALE_CLAMP", "SampledRoIs", "sample_rois", "fast_rcnn_losses",
           "rasterize_polygons_within_box", "decode_box_deltas", "pairwise_iou", "soft_nms_gaussian",
           "batched_soft_nms_gaussian"]

BOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SCALE_CLAMP = math.log(1000.0 / 16)


class SampledRoIs(NamedTuple):
    """The sampled RoIs of one image."""

    boxes: Tensor  # [S, 4] proposal boxes, image pixels
    labels: Tensor  # [S] int64 in 0..K (K = background)
    gt_index: Tensor  # [S] int64 index of the matched ground truth (-1 for background)
    gt_boxes: Tensor  # [S, 4] the matched ground-truth box (zeros for background)


def sample_rois(proposals: Sequence[Tensor], gt_boxes: Sequence[Tensor], gt_labels: Sequence[Tensor],
                num_classes: int, matcher: Matcher, sampler: BalancedPositiveNegativeSampler,
                append_gt: bool = True) -> list[SampledRoIs]:
    """Detectron2's ``label_and_sample_proposals`` with torchvision's matcher and sampler.

    Args:
        proposals: per image, [N_i, 4] boxes (detached).
        gt_boxes, gt_labels: per image, [G_i, 4] boxes and [G_i] labels in 0..K-1.
        num_classes: K; background RoIs get label K.
        matcher: ``Matcher(0.5, 0.5)``: IoU >= 0.5 foreground, below background.
        sampler: ``BalancedPositiveNegativeSampler(512, 0.25)``.
        append_gt: add the ground-truth boxes to the proposals first (``PROPOSAL_APPEND_GT``).
    """
    out = []
    for props, boxes, labels in zip(proposals, gt_boxes, gt_labels):
        boxes = boxes.to(props.device, torch.float32)
        labels = labels.to(props.device, torch.int64)
        if append_gt and boxes.numel():
            props = torch.cat([props, boxes])
        if boxes.numel() == 0 or props.shape[0] == 0:
            matched = torch.full((props.shape[0],), -1, dtype=torch.int64, device=props.device)
        else:
            matched = matcher(box_iou(boxes, props))  # [N]: gt index, or -1 below the threshold
        fg = matched >= 0
        roi_labels = torch.full_like(matched, num_classes)
        roi_labels[fg] = labels[matched[fg]]
        # the sampler reads >= 1 as positive and 0 as negative
        pos_mask, neg_mask = sampler([fg.to(torch.int64)])
        keep = torch.where((pos_mask[0] | neg_mask[0]).bool())[0]
        gt_index = torch.where(fg, matched, torch.full_like(matched, -1))[keep]
        matched_boxes = boxes[gt_index.clamp(min=0)] if boxes.numel() else props.new_zeros((keep.numel(), 4))
        matched_boxes = torch.where((gt_index >= 0)[:, None], matched_boxes, torch.zeros_like(matched_boxes))
        out.append(SampledRoIs(props[keep], roi_labels[keep], gt_index, matched_boxes))
    return out


def fast_rcnn_losses(logits: Tensor, deltas: Tensor, labels: Tensor, box_targets: Tensor,
                     focal_gamma: float | None, bg_weight: float | None, box_loss_weight: float = 1.0
                     ) -> dict[str, Tensor]:
    """Classification and box losses of the sampled RoIs of a batch (``fast_rcnn.py:
    FastRCNNOutputLayers.losses`` with ``FOCAL_SCALED_LOSS`` / ``BG_CLS_LOSS_WEIGHT``).

    Args:
        logits: [N, K+1], background last; deltas: [N, 4] class-agnostic.
        labels: [N] in 0..K; box_targets: [N, 4] encoded targets (used for foreground rows).
        focal_gamma: not None -> ``focal_scaled_cross_entropy`` (COCO: 0.5, background x
            ``bg_weight``, mean over N); None -> ``weighted_cross_entropy`` (LVIS: background
            class weight ``bg_weight``, divided by the sum of weights).

    Returns ``{"loss_cls", "loss_box_reg"}``; the box loss is the L1 sum over foreground rows
    divided by N (``smooth_l1`` with beta 0, normalised by all sampled RoIs).
    """
    if focal_gamma is not None:
        loss_cls = focal_scaled_cross_entropy(logits, labels, gamma=focal_gamma, bg_weight=bg_weight)
    else:
        loss_cls = weighted_cross_entropy(logits, labels, bg_weight=bg_weight)
    fg = labels < logits.shape[1] - 1
    loss_box = F.l1_loss(deltas[fg], box_targets[fg].to(deltas.dtype), reduction="sum") / max(labels.numel(), 1)
    return {"loss_cls": loss_cls, "loss_box_reg": loss_box * box_loss_weight}


def rasterize_polygons_within_box(polygons: Sequence[np.ndarray], box: np.ndarray, size: int) -> np.ndarray:
    """Detectron2's ``rasterize_polygons_within_box``: the polygons (flat [x0, y0, x1, ...] in
    image pixels) cropped to ``box`` (XYXY) and scaled to a ``size`` x ``size`` bool mask."""
    from pycocotools import mask as mask_utils

    x0, y0, x1, y1 = (float(v) for v in box)
    ratio_w = size / max(x1 - x0, 0.1)
    ratio_h = size / max(y1 - y0, 0.1)
    polys = []
    for p in polygons:
        q = np.asarray(p, dtype=np.float64).copy()
        q[0::2] = (q[0::2] - x0) * ratio_w
        q[1::2] = (q[1::2] - y0) * ratio_h
        if q.size >= 6:
            polys.append(q.tolist())
    if not polys:
        return np.zeros((size, size), dtype=bool)
    import warnings

    with warnings.catch_warnings():  # pycocotools' NumPy 2 copy-keyword deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        rles = mask_utils.frPyObjects(polys, size, size)
        return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def decode_box_deltas(deltas: Tensor, proposals: Tensor,
                      weights: Sequence[float] = BOX_REG_WEIGHTS) -> Tensor:
    """Class-agnostic Box2BoxTransform: [R, 4] deltas on [R, 4] XYXY proposals -> [R, 4] boxes
    (weights (10, 10, 5, 5), dw/dh clamped at log(1000/16), widths x2 - x1)."""
    coder = BoxCoder(weights=tuple(float(w) for w in weights), bbox_xform_clip=SCALE_CLAMP)
    return coder.decode_single(deltas.float(), proposals.float())


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """[N, 4] x [M, 4] XYXY -> [N, M] IoU as ``detectron2/structures/boxes.py: pairwise_iou``:
    exactly 0 where the boxes do not intersect, so an empty box never gives 0/0 (torchvision's
    ``box_iou`` returns NaN for two empty boxes)."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.min(a[:, None, 2:], b[:, 2:]) - torch.max(a[:, None, :2], b[:, :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return torch.where(inter > 0, inter / (area_a[:, None] + area_b - inter), inter.new_zeros(()))


def soft_nms_gaussian(boxes: Tensor, scores: Tensor, sigma: float = 0.5, prune: float = 0.001
                      ) -> tuple[Tensor, Tensor]:
    """Gaussian soft-NMS of one group of boxes (``detectron2/layers/soft_nms.py: _soft_nms``,
    method "gaussian").

    Repeatedly takes the best remaining box (the first one on ties), multiplies every remaining
    score (the picked box's included, which is then removed) by exp(-IoU^2 / sigma), IoU of
    :func:`pairwise_iou`, and drops scores <= ``prune``. The first pick is kept whatever its
    score; from then on only scores > ``prune`` survive.

    Returns (indices into ``boxes`` in pick order, their decayed scores at pick time).
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), scores.new_zeros(0)
    iou = pairwise_iou(boxes, boxes)
    scores = scores.clone()
    alive = torch.ones_like(scores, dtype=torch.bool)
    neg_inf = torch.full_like(scores, -math.inf)
    picked, picked_scores = [], []
    while bool(alive.any()):
        top = int(torch.where(alive, scores, neg_inf).argmax())  # first maximum, as torch.argmax
        picked.append(top)
        picked_scores.append(scores[top])
        scores = scores * torch.exp(-torch.pow(iou[top], 2) / sigma)
        alive &= scores > prune
        alive[top] = False
    idx = torch.tensor(picked, dtype=torch.int64, device=boxes.device)
    return idx, torch.stack(picked_scores)


def batched_soft_nms_gaussian(boxes: Tensor, scores: Tensor, groups: Tensor, sigma: float = 0.5,
                              prune: float = 0.001) -> tuple[Tensor, Tensor]:
    """Gaussian soft-NMS within each group (class), with the numbers of
    ``detectron2/layers/soft_nms.py: batched_soft_nms`` as ``fast_rcnn.py:
    fast_rcnn_inference_single_image`` calls it (``SOFT_NMS_ENABLED``).

    The official code runs ONE soft-NMS loop over all classes, on boxes shifted by
    ``class * (boxes.max() + 1)`` so that classes never overlap. Three consequences are
    reproduced here, while the loop itself runs per class (cross-class IoUs are exactly 0, so
    the decays are the same):

    * IoUs are computed on the shifted float32 boxes; the shift rounds the coordinates (an
      ulp of 0.125 px at 1e6), which moves the decayed scores by up to ~1e-3 relative;
    * the first iteration prunes every box of every class with score <= ``prune`` except the
      global best (with a score threshold below ``prune``, a class's low best box is dropped);
    * the output is the global pick order: decayed score descending, ties to the lower input
      index.

    Args:
        boxes: [N, 4] XYXY (clipped: non-negative coordinates); scores: [N]; groups: [N] int64.
    Returns:
        (keep [M] indices into the inputs, their decayed scores [M]), best first.
    """
    n = int(scores.shape[0])
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), scores.new_zeros(0)
    shifted = boxes + (groups.to(boxes) * (boxes.max() + 1))[:, None]
    first = int(scores.argmax())
    live = scores > prune
    live[first] = True
    keep_all, score_all = [], []
    for g in torch.unique(groups[live]).tolist():
        sel = torch.where((groups == g) & live)[0]
        k, s = soft_nms_gaussian(shifted[sel], scores[sel], sigma, prune)
        keep_all.append(sel[k])
        score_all.append(s)
    keep = torch.cat(keep_all)
    final = torch.cat(score_all)
    order = torch.sort(keep, stable=True).indices  # ties: the lower input index first
    order = order[torch.sort(final[order], descending=True, stable=True).indices]
    return keep[order], final[order]
