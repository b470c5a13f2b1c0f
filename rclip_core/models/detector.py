"""The open-vocabulary detector: Faster R-CNN C4 on the CLIP trunk (spec 1.6, 1.7, 1.9, 1.10, 6).

::

    image ─▶ trunk (stem..res4) ─▶ res4 [B, 16w, H/16, W/16]
                    │                    │
        proposals: offline Detectron2 RPN (frozen, own BGR branch; the official setup)
                   or a torchvision RPN on res4 (trained with the detector, e.g. ShapesWorld)
                    │                    │
                    └──▶ RoIAlign (14/18) ─▶ res5 ─▶ attnpool ─▶ region embedding x [R, D]
                                                │                 │
                                   mask head (optional)     box predictor:
                                                              logits = [x̂·ŵ_k, x̂·0] / 0.01  (K+1)
                                                              deltas = bbox_pred(x)          (4)

* **Classifier** (:class:`BoxPredictor`): frozen class text embeddings ``cls_score`` (the base
  classes while training) and optional ``test_cls_score`` (all classes, used in eval mode), a
  frozen all-zero background embedding ``cls_bg_score``, fixed temperature 0.01; the region
  embedding and the class embeddings are L2-normalised at use time, so the stored embeddings
  may be unnormalised (spec 1.6). Submodule names equal the official ones, so
  ``roi_heads.box_predictor.*`` of a released detector loads by name.
* **Box regression**: one class-agnostic ``bbox_pred = Linear(D, 4)`` on the *unnormalised*
  embedding, Box2BoxTransform weights (10, 10, 5, 5), dw/dh clamped at log(1000/16) (spec 1.7).
* **Training** (spec 6.2): proposals + ground-truth boxes, matched at IoU >= 0.5 (one
  threshold, no ignore band; torchvision ``Matcher``), 512 RoIs per image with at most 25 %
  foreground (torchvision ``BalancedPositiveNegativeSampler``), targets 0..K-1 for foreground
  and K for background. Classification loss: focal-scaled CE (COCO: gamma 0.5, background RoIs
  x 0.2, mean over RoIs) or class-weighted CE (LVIS: background weight 0.8, mean over the sum of
  weights) from :mod:`rclip_core.losses`; box loss: L1 on foreground deltas divided by the number
  of sampled RoIs; optional class-agnostic mask loss (BCE, spec 1.10).
* **Freezing** (spec 6.1): stem + layer1 (``freeze_at`` 2), every BN (FrozenBN in the whole
  visual tower), the classifier embeddings and the background, the offline RPN and the text
  tower (kept only to embed new class names at detection time).
* **Inference** (spec 6.3): box deltas applied, optional fusion with the RPN objectness (raw
  logit form, LVIS), strict score threshold, per-class NMS (or gaussian soft-NMS), top-k; boxes
  mapped back to original pixels with :func:`rclip_core.data.transforms.boxes_to_original`.

Export: :meth:`Detector.save` writes one rclip safetensors file (``kind: detector``) with the
backbone, the text tower (when present), the box predictor, ``class_embeddings`` [K, D] and the
class names, the offline RPN (``rpn.*``) or the trained one (``trained_rpn.*``) and the mask head
(``mask_head.*``); :func:`load_detector` reads it back, or an official ``regionclip_finetuned-*``
``.pth``, so that detection needs nothing else.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers
from torchvision.ops import box_iou, clip_boxes_to_image

from rclip_core.data.transforms import PreparedImage, boxes_to_original
from rclip_core.errors import InputError, WeightsError
from rclip_core.losses import focal_scaled_cross_entropy, weighted_cross_entropy
from rclip_core.models.regionclip import RegionCLIP
from rclip_core.models.zeroshot import CLASSIFIER_TEMPERATURE, FUSION_MODES, Detections, fuse_scores, \
    postprocess_detections

__all__ = [
    "BOX_REG_WEIGHTS",
    "PROPOSAL_SOURCES",
    "DetectorSettings",
    "BoxPredictor",
    "TrainableRPN",
    "MaskHead",
    "SampledRoIs",
    "Detector",
    "DetectorDetections",
    "sample_rois",
    "fast_rcnn_losses",
    "decode_box_deltas",
    "soft_nms_gaussian",
    "postprocess_detector",
    "rasterize_polygons_within_box",
    "freeze_trunk",
    "load_detector",
    "is_detector_file",
    "vocabulary_for_rows",
]

BOX_REG_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SCALE_CLAMP = math.log(1000.0 / 16)
PROPOSAL_SOURCES = ("offline", "trained")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DetectorSettings:
    """Everything that shapes the detector's computation. Defaults: the COCO OVD transfer
    (spec 6.2, 6.3); :meth:`lvis` gives the LVIS values. Stored in exported detector files.

    Training: ``rois_per_image`` / ``positive_fraction`` / ``fg_iou`` (RoI sampling),
    ``append_gt`` (``PROPOSAL_APPEND_GT``), ``focal_gamma`` (None = class-weighted CE, the LVIS
    path), ``bg_weight`` (background multiplier / class weight), ``box_loss_weight``,
    ``mask_loss_weight``.
    Proposals: ``proposals`` "offline" (frozen Detectron2 RPN, eval mode, NMS 0.7, 1000 per image,
    spec 1.9) or "trained" (torchvision RPN on res4, Detectron2 C4 defaults: anchors 32..512 x
    ratios 0.5/1/2, IoU 0.3/0.7, 256 anchors per image at 50 % positive, 12000/2000 proposals
    before/after NMS in training and 6000/1000 at test).
    Inference: ``score_thresh`` (strict), ``nms_thresh``, ``max_dets``, ``fusion`` with the RPN
    score (``official`` = sqrt(prob x raw logit), the LVIS setting), ``soft_nms`` (gaussian,
    ``soft_nms_sigma``, ``soft_nms_prune``), ``chunk_size`` (regions per head call).
    """

    temperature: float = CLASSIFIER_TEMPERATURE
    rois_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou: float = 0.5
    append_gt: bool = True
    focal_gamma: float | None = 0.5
    bg_weight: float | None = 0.2
    box_reg_weights: tuple[float, float, float, float] = BOX_REG_WEIGHTS
    box_loss_weight: float = 1.0
    mask_head: bool = False
    mask_loss_weight: float = 1.0
    proposals: Literal["offline", "trained"] = "offline"
    offline_rpn_pre_nms_topk: int | None = None  # None: the RPN config's own (6000 C4, 1000 FPN)
    offline_rpn_post_nms_topk: int = 1000
    offline_rpn_nms: float = 0.7
    anchor_sizes: tuple[float, ...] = (32.0, 64.0, 128.0, 256.0, 512.0)
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    rpn_fg_iou: float = 0.7
    rpn_bg_iou: float = 0.3
    rpn_batch_per_image: int = 256
    rpn_positive_fraction: float = 0.5
    rpn_pre_nms_topk_train: int = 12000
    rpn_post_nms_topk_train: int = 2000
    rpn_pre_nms_topk_test: int = 6000
    rpn_post_nms_topk_test: int = 1000
    rpn_nms: float = 0.7
    score_thresh: float = 0.001
    nms_thresh: float = 0.5
    max_dets: int = 100
    fusion: str = "none"
    soft_nms: bool = False
    soft_nms_sigma: float = 0.5
    soft_nms_prune: float = 0.001
    chunk_size: int = 256

    def __post_init__(self) -> None:
        for name in ("box_reg_weights", "anchor_sizes", "anchor_ratios"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    @classmethod
    def lvis(cls, **changes: Any) -> "DetectorSettings":
        """The LVIS transfer values (spec 6.2, 6.3): weighted CE with background 0.8, no focal
        scaling, score threshold 0.02, 300 detections, RPN-score fusion, mask head on."""
        base = cls(focal_gamma=None, bg_weight=0.8, score_thresh=0.02, max_dets=300, fusion="official",
                   mask_head=True)
        return replace(base, **changes)

    def validate(self) -> "DetectorSettings":
        """Raise InputError (one line, naming the setting) for an unusable value."""

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise InputError(f"detector setting {msg}")

        need(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        need(self.rois_per_image >= 1, f"rois_per_image must be >= 1, got {self.rois_per_image}")
        need(0.0 < self.positive_fraction <= 1.0, f"positive_fraction must be in (0, 1], got {self.positive_fraction}")
        need(0.0 < self.fg_iou <= 1.0, f"fg_iou must be in (0, 1], got {self.fg_iou}")
        need(self.focal_gamma is None or self.focal_gamma >= 0, f"focal_gamma must be >= 0, got {self.focal_gamma}")
        need(self.bg_weight is None or self.bg_weight >= 0, f"bg_weight must be >= 0, got {self.bg_weight}")
        need(len(self.box_reg_weights) == 4 and all(w > 0 for w in self.box_reg_weights),
             f"box_reg_weights must be 4 positive numbers, got {list(self.box_reg_weights)}")
        need(self.proposals in PROPOSAL_SOURCES,
             f"proposals must be one of {', '.join(PROPOSAL_SOURCES)}, got {self.proposals!r}")
        need(len(self.anchor_sizes) >= 1 and all(s > 0 for s in self.anchor_sizes),
             "anchor_sizes must list positive sizes")
        need(len(self.anchor_ratios) >= 1 and all(r > 0 for r in self.anchor_ratios),
             "anchor_ratios must list positive ratios")
        need(0.0 <= self.rpn_bg_iou <= self.rpn_fg_iou <= 1.0, "rpn IoU thresholds must satisfy 0 <= bg <= fg <= 1")
        for name in ("rpn_batch_per_image", "rpn_pre_nms_topk_train", "rpn_post_nms_topk_train",
                     "rpn_pre_nms_topk_test", "rpn_post_nms_topk_test", "offline_rpn_post_nms_topk",
                     "max_dets", "chunk_size"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        need(self.offline_rpn_pre_nms_topk is None or self.offline_rpn_pre_nms_topk >= 1,
             "offline_rpn_pre_nms_topk must be >= 1")
        for name in ("rpn_nms", "offline_rpn_nms", "nms_thresh"):
            need(0.0 < getattr(self, name) <= 1.0, f"{name} must be in (0, 1], got {getattr(self, name)}")
        need(0.0 < self.rpn_positive_fraction <= 1.0, "rpn_positive_fraction must be in (0, 1]")
        need(self.score_thresh >= 0, f"score_thresh must be >= 0, got {self.score_thresh}")
        need(self.fusion in FUSION_MODES, f"fusion must be one of {', '.join(FUSION_MODES)}, got {self.fusion!r}")
        need(self.soft_nms_sigma > 0, "soft_nms_sigma must be positive")
        need(self.soft_nms_prune >= 0, "soft_nms_prune must be >= 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DetectorSettings":
        """Known keys only (files written by a newer rclip may carry more)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# --------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------


def _frozen_linear(weight: Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight.float())
    layer.weight.requires_grad_(False)
    return layer


class BoxPredictor(nn.Module):
    """Text-embedding classifier, zero background and class-agnostic box regressor
    (RegionCLIP's ``FastRCNNOutputLayers`` with ``USE_CLIP_CLS_EMB``; spec 1.6, 1.7).

    State-dict keys: ``cls_score.weight`` [K, D], ``cls_bg_score.weight`` [1, D] (zeros),
    ``test_cls_score.weight`` [K_test, D] (optional), ``bbox_pred.weight`` [4, D],
    ``bbox_pred.bias`` [4]: the official names. Only ``bbox_pred`` is trainable.

    forward: region embeddings [R, D] -> (logits [R, K+1] with the background last, box deltas
    [R, 4]). In eval mode the test classifier is used when there is one.
    """

    def __init__(self, train_embeddings: Tensor, test_embeddings: Tensor | None = None,
                 temperature: float = CLASSIFIER_TEMPERATURE):
        super().__init__()
        if train_embeddings.ndim != 2:
            raise InputError(f"class embeddings must be [K, D], got shape {list(train_embeddings.shape)}")
        dim = int(train_embeddings.shape[1])
        self.temperature = float(temperature)
        self.cls_score = _frozen_linear(train_embeddings)
        self.cls_bg_score = _frozen_linear(torch.zeros(1, dim))
        self.test_cls_score: nn.Linear | None = None
        if test_embeddings is not None:
            self.set_test_embeddings(test_embeddings)
        self.bbox_pred = nn.Linear(dim, 4)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.bbox_pred.bias)

    @property
    def embed_dim(self) -> int:
        return int(self.cls_score.weight.shape[1])

    def set_test_embeddings(self, embeddings: Tensor | None) -> None:
        """Replace the eval-time classifier (None: use the training classes at test too)."""
        if embeddings is None:
            self.test_cls_score = None
            return
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embed_dim:
            raise InputError(f"class embeddings have shape {list(embeddings.shape)}, expected [K, {self.embed_dim}]",
                             "use embeddings made with the detector's own architecture")
        layer = _frozen_linear(embeddings.detach().to("cpu"))
        self.test_cls_score = layer.to(self.cls_score.weight.device)

    def classifier_weight(self) -> Tensor:
        if not self.training and self.test_cls_score is not None:
            return self.test_cls_score.weight
        return self.cls_score.weight

    @property
    def num_classes(self) -> int:
        """K of the classifier the current mode uses."""
        return int(self.classifier_weight().shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # fp32 for the cosine classifier: a 0.01 temperature magnifies half-precision rounding 100x
        x32 = x.float()
        x_hat = F.normalize(x32, p=2.0, dim=1)
        w_hat = F.normalize(self.classifier_weight().float(), p=2.0, dim=1)
        cls = x_hat @ w_hat.t()
        bg = x_hat @ self.cls_bg_score.weight.float().t()  # zero embedding: always 0
        logits = torch.cat([cls, bg], dim=1) / self.temperature
        deltas = self.bbox_pred(x)
        return logits, deltas.float()


class MaskHead(nn.Module):
    """Class-agnostic ``MaskRCNNConvUpsampleHead`` with no convs (spec 1.10): res5 RoI features
    [R, C, h, w] -> ConvTranspose2d(C, 256, 2, 2) + ReLU -> 1x1 conv -> mask logits [R, 1, 2h, 2w]
    (14 x 14 for RN50). Keys ``deconv.*`` and ``predictor.*`` as the official files."""

    def __init__(self, in_channels: int, conv_dim: int = 256):
        super().__init__()
        self.deconv = nn.ConvTranspose2d(in_channels, conv_dim, kernel_size=2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, 1, kernel_size=1)
        nn.init.kaiming_normal_(self.deconv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.deconv.bias)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.predictor(F.relu(self.deconv(x)))


class TrainableRPN(RegionProposalNetwork):
    """torchvision's RPN on the single res4 map (a Detectron2-style C4 RPN), trained with the
    detector where no offline RPN exists (ShapesWorld, custom data).

    Only ``forward`` is ours: torchvision's discards the objectness scores, which the detector
    needs for RPN-score fusion. Everything else (``RPNHead``, ``AnchorGenerator``, box coder,
    matcher, sampler, ``filter_proposals``, ``compute_loss``) is torchvision's.

    forward(res4 [B, C, h, w], image_sizes [(H, W)], targets=None) ->
    (list of (boxes [N, 4] in image pixels, objectness logits [N]), losses dict).
    """

    def __init__(self, in_channels: int, settings: DetectorSettings):
        anchors = AnchorGenerator(sizes=(tuple(settings.anchor_sizes),), aspect_ratios=(tuple(settings.anchor_ratios),))
        head = RPNHead(in_channels, anchors.num_anchors_per_location()[0])
        super().__init__(
            anchors, head,
            fg_iou_thresh=settings.rpn_fg_iou, bg_iou_thresh=settings.rpn_bg_iou,
            batch_size_per_image=settings.rpn_batch_per_image, positive_fraction=settings.rpn_positive_fraction,
            pre_nms_top_n={"training": settings.rpn_pre_nms_topk_train, "testing": settings.rpn_pre_nms_topk_test},
            post_nms_top_n={"training": settings.rpn_post_nms_topk_train, "testing": settings.rpn_post_nms_topk_test},
            nms_thresh=settings.rpn_nms,
        )

    def forward(self, res4: Tensor, image_sizes: Sequence[tuple[int, int]],  # type: ignore[override]
                targets: Sequence[Mapping[str, Tensor]] | None = None
                ) -> tuple[list[tuple[Tensor, Tensor]], dict[str, Tensor]]:
        B, _, h, w = res4.shape
        # The anchor generator derives the stride from padded size // feature size; with floored
        # feature sizes (750 // 46) that is 16 only by luck, so give it exactly 16 x the map.
        fake = ImageList(res4.new_empty((B, 0, h * 16, w * 16)), [tuple(s) for s in image_sizes])
        features = [res4]
        objectness, deltas = self.head(features)
        # fp32 anchors also under autocast (fp16 has a 1-pixel step above 1024); an empty map
        # carries the shape without a copy of res4
        anchors = self.anchor_generator(fake, [res4.new_empty((B, 0, h, w), dtype=torch.float32)])
        num_anchors_per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        objectness, deltas = objectness.float(), deltas.float()
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(B, -1, 4)
        boxes, probs = self.filter_proposals(proposals, objectness, list(fake.image_sizes), num_anchors_per_level)
        # filter_proposals returns sigmoid probabilities; fusion wants the raw logit (spec 5.3)
        out = [(b, torch.logit(p.float(), eps=1e-7)) for b, p in zip(boxes, probs)]
        losses: dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("targets are needed to train the RPN")
            labels, matched = self.assign_targets_to_anchors(anchors, [{"boxes": t["boxes"]} for t in targets])
            regression_targets = self.box_coder.encode(matched, anchors)
            loss_obj, loss_box = self.compute_loss(objectness, deltas, labels, regression_targets)
            losses = {"loss_rpn_cls": loss_obj, "loss_rpn_loc": loss_box}
        return out, losses


# --------------------------------------------------------------------------------------------
# RoI sampling and losses (spec 6.2)
# --------------------------------------------------------------------------------------------


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
    """Classification and box losses of the sampled RoIs of a batch (spec 6.2).

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


# --------------------------------------------------------------------------------------------
# Inference (spec 6.3)
# --------------------------------------------------------------------------------------------


def decode_box_deltas(deltas: Tensor, proposals: Tensor,
                      weights: Sequence[float] = BOX_REG_WEIGHTS) -> Tensor:
    """Class-agnostic Box2BoxTransform: [R, 4] deltas on [R, 4] XYXY proposals -> [R, 4] boxes
    (weights (10, 10, 5, 5), dw/dh clamped at log(1000/16), widths x2 - x1)."""
    coder = BoxCoder(weights=tuple(float(w) for w in weights), bbox_xform_clip=SCALE_CLAMP)
    return coder.decode_single(deltas.float(), proposals.float())


def soft_nms_gaussian(boxes: Tensor, scores: Tensor, sigma: float = 0.5, prune: float = 0.001
                      ) -> tuple[Tensor, Tensor]:
    """Gaussian soft-NMS of one class (Detectron2's ``soft_nms``, method "gaussian").

    Repeatedly takes the best remaining box, multiplies every remaining score (the picked box's
    included, which is then removed) by exp(-IoU^2 / sigma) and drops scores <= ``prune``.

    Returns (indices into ``boxes`` in pick order, their decayed scores at pick time).
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device), scores.new_zeros(0)
    iou = box_iou(boxes, boxes)
    scores = scores.clone()
    alive = torch.ones_like(scores, dtype=torch.bool)
    picked, picked_scores = [], []
    while bool(alive.any()):
        masked = torch.where(alive, scores, torch.full_like(scores, -math.inf))
        top = int(masked.argmax())
        picked.append(top)
        picked_scores.append(scores[top])
        scores = scores * torch.exp(-(iou[top] ** 2) / sigma)
        alive &= scores > prune
        alive[top] = False
    idx = torch.tensor(picked, dtype=torch.int64, device=boxes.device)
    return idx, torch.stack(picked_scores)


def postprocess_detector(boxes: Tensor, probs_with_bg: Tensor, image_size: tuple[int, int],
                         objectness_logits: Tensor | None, settings: DetectorSettings) -> Detections:
    """``fast_rcnn_inference_single_image`` for class-agnostic decoded boxes [R, 4], with hard
    NMS (:func:`rclip_core.models.zeroshot.postprocess_detections`) or gaussian soft-NMS."""
    fusion = settings.fusion if objectness_logits is not None else "none"
    if not settings.soft_nms:
        return postprocess_detections(boxes, probs_with_bg, image_size, objectness_logits, fusion,
                                      settings.score_thresh, settings.nms_thresh, settings.max_dets, topk_labels=0)
    scores = fuse_scores(probs_with_bg, objectness_logits, fusion)
    idx = torch.arange(boxes.shape[0], device=boxes.device)
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    boxes, scores, raw, idx = boxes[valid], scores[valid][:, :-1], probs_with_bg[valid][:, :-1], idx[valid]
    boxes = clip_boxes_to_image(boxes, image_size)
    mask = scores > settings.score_thresh
    inds = mask.nonzero()
    det_boxes, det_scores, det_probs = boxes[inds[:, 0]], scores[mask], raw[mask]
    keep_all, new_scores = [], []
    for c in torch.unique(inds[:, 1]).tolist():
        sel = torch.where(inds[:, 1] == c)[0]
        k, s = soft_nms_gaussian(det_boxes[sel], det_scores[sel], settings.soft_nms_sigma, settings.soft_nms_prune)
        keep_all.append(sel[k])
        new_scores.append(s)
    if keep_all:
        keep = torch.cat(keep_all)
        final_scores = torch.cat(new_scores)
        order = torch.sort(final_scores, descending=True, stable=True).indices[: settings.max_dets]
        keep, final_scores = keep[order], final_scores[order]
    else:
        keep = torch.zeros(0, dtype=torch.int64, device=boxes.device)
        final_scores = scores.new_zeros(0)
    return Detections(boxes=det_boxes[keep], scores=final_scores, classes=inds[keep, 1],
                      box_index=idx[inds[keep, 0]], probs=det_probs[keep])


class DetectorDetections(Detections):
    """:class:`Detections` plus optional mask probabilities [M, 1, P, P] (inside each box)."""

    masks: Tensor | None

    def __init__(self, boxes: Tensor, scores: Tensor, classes: Tensor, box_index: Tensor, probs: Tensor,
                 masks: Tensor | None = None):
        super().__init__(boxes=boxes, scores=scores, classes=classes, box_index=box_index, probs=probs)
        self.masks = masks

    def select(self, keep: Tensor) -> "DetectorDetections":
        return DetectorDetections(self.boxes[keep], self.scores[keep], self.classes[keep], self.box_index[keep],
                                  self.probs[keep], None if self.masks is None else self.masks[keep])

    def to(self, device: str | torch.device) -> "DetectorDetections":
        return DetectorDetections(self.boxes.to(device), self.scores.to(device), self.classes.to(device),
                                  self.box_index.to(device), self.probs.to(device),
                                  None if self.masks is None else self.masks.to(device))

    def paste_masks(self, image_size: tuple[int, int], threshold: float = 0.5) -> Tensor:
        """Binary masks [M, H, W] (uint8) in an image of ``image_size`` whose pixels the boxes are
        in (Detectron2's ``paste_masks_in_image`` + threshold 0.5)."""
        from torchvision.models.detection.roi_heads import paste_masks_in_image

        if self.masks is None:
            raise InputError("these detections have no masks (the detector has no mask head)")
        if len(self) == 0:
            return torch.zeros((0, *image_size), dtype=torch.uint8)
        pasted = paste_masks_in_image(self.masks.float(), self.boxes.float(), image_size, padding=1)
        return (pasted[:, 0] > threshold).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# The detector
# --------------------------------------------------------------------------------------------


def freeze_trunk(visual: nn.Module, freeze_at: int = 2) -> None:
    """Detectron2 ``FREEZE_AT``: 1 = the stem, 2 = stem + layer1 (res2, the paper), 3 and 4 add
    layer2 and layer3. layer4 and attnpool (the region head) stay trainable. BN is FrozenBN in
    the whole tower already (:func:`rclip_core.models.clip.build_clip`)."""
    if not 0 <= freeze_at <= 4:
        raise InputError(f"freeze_at must be in 0..4, got {freeze_at}")
    stem = [visual.conv1, visual.bn1, visual.conv2, visual.bn2, visual.conv3, visual.bn3]
    stages = [stem, [visual.layer1], [visual.layer2], [visual.layer3]]
    for group in stages[:freeze_at]:
        for module in group:
            module.requires_grad_(False)


class Detector(nn.Module):
    """Faster R-CNN C4 on a :class:`RegionCLIP` (see the module docstring).

    Args:
        model: the RegionCLIP whose visual tower becomes the trunk and region head (its text
            tower, when loaded, is kept frozen to embed new class names; its offline RPN, when
            present, gives the proposals in ``proposals: offline`` mode).
        train_embeddings: [K, D] text embeddings of the training classes (``cls_score``).
        test_embeddings: [K_test, D] embeddings used in eval mode (``test_cls_score``); None =
            the training classes.
        class_names / train_class_names: the names of the test / training rows.
        settings: :class:`DetectorSettings`.
        freeze_at: see :func:`freeze_trunk`.
    """

    def __init__(self, model: RegionCLIP, train_embeddings: Tensor, test_embeddings: Tensor | None = None, *,
                 class_names: Sequence[str] | None = None, train_class_names: Sequence[str] | None = None,
                 settings: DetectorSettings | None = None, freeze_at: int = 2):
        super().__init__()
        self.settings = (settings or DetectorSettings()).validate()
        s = self.settings
        if train_embeddings.shape[-1] != model.embed_dim:
            raise InputError(f"class embeddings have dimension {train_embeddings.shape[-1]} but the model's region "
                             f"embeddings have {model.embed_dim}",
                             "use embeddings made with the same architecture (e.g. *_rn50x4 files for RN50x4)")
        self.regionclip = model
        self.freeze_at = int(freeze_at)
        self.box_predictor = BoxPredictor(train_embeddings, test_embeddings, s.temperature)
        self.train_class_names = list(train_class_names) if train_class_names is not None else None
        self.class_names = list(class_names) if class_names is not None else None
        self._check_names()
        self.proposal_generator: TrainableRPN | None = None
        if s.proposals == "trained":
            self.proposal_generator = TrainableRPN(model.arch.res4_channels, s)
        elif model.rpn is not None:
            self._configure_offline_rpn()
        self.mask_head: MaskHead | None = MaskHead(model.arch.res5_channels) if s.mask_head else None
        self.roi_matcher = Matcher(s.fg_iou, s.fg_iou, allow_low_quality_matches=False)
        self.roi_sampler = BalancedPositiveNegativeSampler(s.rois_per_image, s.positive_fraction)
        self.box_coder = BoxCoder(weights=s.box_reg_weights, bbox_xform_clip=SCALE_CLAMP)
        self.freeze()
        self.to(model.device)

    # -- set-up ---------------------------------------------------------------------------------
    def _check_names(self) -> None:
        bp = self.box_predictor
        if self.train_class_names is not None and len(self.train_class_names) != bp.cls_score.weight.shape[0]:
            raise InputError(f"{len(self.train_class_names)} training class names for "
                             f"{bp.cls_score.weight.shape[0]} embedding rows")
        test_rows = (bp.test_cls_score if bp.test_cls_score is not None else bp.cls_score).weight.shape[0]
        if self.class_names is not None and len(self.class_names) != test_rows:
            raise InputError(f"{len(self.class_names)} class names for {test_rows} embedding rows")

    def _configure_offline_rpn(self) -> None:
        from rclip_core.models.proposals import RPNSettings, rpn_settings

        rpn = self.regionclip.rpn
        base = rpn_settings("transfer", rpn.kind)  # spec 6.1: NMS 0.7, 1000 proposals, in train and test
        s = self.settings
        rpn.settings = RPNSettings(pre_nms_topk=s.offline_rpn_pre_nms_topk or base.pre_nms_topk,
                                   post_nms_topk=s.offline_rpn_post_nms_topk, nms_thresh=s.offline_rpn_nms,
                                   min_box_size=base.min_box_size)

    def freeze(self) -> None:
        """Make exactly the paper's parameters trainable (spec 6.1)."""
        self.regionclip.requires_grad_(False)
        visual = self.regionclip.clip.visual
        visual.requires_grad_(True)
        freeze_trunk(visual, self.freeze_at)
        # The key bias adds the same q.b_k to every token's attention score, so softmax cancels it:
        # it never gets a gradient (token-0 attention pooling does not even compute it), which
        # DDP would report as an unused parameter.
        visual.attnpool.k_proj.bias.requires_grad_(False)
        for name in ("cls_score", "cls_bg_score", "test_cls_score"):
            layer = getattr(self.box_predictor, name)
            if layer is not None:
                layer.requires_grad_(False)
        self.box_predictor.bbox_pred.requires_grad_(True)
        if self.proposal_generator is not None:
            self.proposal_generator.requires_grad_(True)
        if self.mask_head is not None:
            self.mask_head.requires_grad_(True)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything the optimizer updates."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    @property
    def device(self) -> torch.device:
        return self.regionclip.device

    @property
    def encoder(self):
        return self.regionclip.encoder

    @property
    def num_train_classes(self) -> int:
        return int(self.box_predictor.cls_score.weight.shape[0])

    @property
    def test_embeddings(self) -> Tensor:
        bp = self.box_predictor
        return (bp.test_cls_score if bp.test_cls_score is not None else bp.cls_score).weight.detach()

    def set_vocabulary(self, names: Sequence[str] | None, embeddings: Tensor) -> None:
        """Replace the classes detected in eval mode (``--classes`` at detection time):
        ``embeddings`` [K, D] (unnormalised is fine), ``names`` their K names."""
        if names is not None and len(names) != embeddings.shape[0]:
            raise InputError(f"{len(names)} class names for {embeddings.shape[0]} embedding rows")
        self.box_predictor.set_test_embeddings(embeddings)
        self.class_names = list(names) if names is not None else None

    INFERENCE_SETTINGS = ("score_thresh", "nms_thresh", "max_dets", "fusion", "soft_nms", "soft_nms_sigma",
                          "soft_nms_prune", "chunk_size", "rpn_pre_nms_topk_test", "rpn_post_nms_topk_test",
                          "offline_rpn_pre_nms_topk", "offline_rpn_post_nms_topk", "offline_rpn_nms", "rpn_nms")

    def update_settings(self, **changes: Any) -> None:
        """Change test-time settings (``--score-thresh``, ``--nms``, ``--max-dets``, ``--fusion``,
        soft-NMS, proposal counts); training-time settings are fixed by the weights."""
        bad = sorted(set(changes) - set(self.INFERENCE_SETTINGS))
        if bad:
            raise InputError(f"cannot change detector setting(s) {', '.join(bad)} after training",
                             "changeable: " + ", ".join(self.INFERENCE_SETTINGS))
        self.settings = replace(self.settings, **changes).validate()
        if self.proposal_generator is not None:
            self.proposal_generator._pre_nms_top_n["testing"] = self.settings.rpn_pre_nms_topk_test
            self.proposal_generator._post_nms_top_n["testing"] = self.settings.rpn_post_nms_topk_test
            self.proposal_generator.nms_thresh = self.settings.rpn_nms
        elif self.regionclip.rpn is not None:
            self._configure_offline_rpn()

    def train(self, mode: bool = True) -> "Detector":
        super().train(mode)
        if self.regionclip.rpn is not None:
            self.regionclip.rpn.train(False)  # the offline RPN always runs in eval mode (spec 1.9)
        return self

    # -- proposals ------------------------------------------------------------------------------
    def _proposals(self, images: Sequence[Tensor], res4: Tensor, image_sizes: Sequence[tuple[int, int]],
                   targets: Sequence[Mapping[str, Tensor]] | None = None
                   ) -> tuple[list[tuple[Tensor, Tensor]], dict[str, Tensor]]:
        if self.proposal_generator is not None:
            return self.proposal_generator(res4, image_sizes, targets if self.training else None)
        if self.regionclip.rpn is None:
            raise InputError("the detector has no proposal source: these weights carry no offline RPN",
                             "pass --rpn-weights (rpn_coco_48.pth for COCO, rpn_lvis_866_lsj.pth for LVIS) "
                             "or train an RPN with detector.proposals=trained")
        # frozen and fp32 like the official one, also inside an autocast (AMP) region
        with torch.no_grad(), torch.autocast(device_type=self.device.type, enabled=False):
            out = self.regionclip.rpn([img.to(self.device, torch.float32) for img in images])
        return [(p.boxes.float(), p.objectness_logits.float()) for p in out], {}

    # -- training -------------------------------------------------------------------------------
    def forward(self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Any]]) -> dict[str, Tensor]:
        """Training losses of a batch.

        Args:
            images: resized images, [3, H_i, W_i] RGB 0..255 (uint8 or float).
            targets: per image ``{"boxes": [G, 4] XYXY in the resized image's pixels, "labels":
                [G] in 0..K-1}`` (+ ``"polygons"``: per box a list of flat polygon arrays in
                the same pixels, needed with a mask head).

        Returns ``loss_cls``, ``loss_box_reg`` (+ ``loss_rpn_cls``, ``loss_rpn_loc`` with a
        trained RPN, ``loss_mask`` with a mask head).
        """
        if not self.training:
            raise RuntimeError("Detector.forward computes training losses; call .train() first, "
                               "or use inference() / detect()")
        s = self.settings
        enc = self.encoder
        image_sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        res4 = enc.trunk(enc.batch_images(images))
        gt_boxes = [t["boxes"].to(self.device, torch.float32) for t in targets]
        gt_labels = [t["labels"].to(self.device, torch.int64) for t in targets]
        props, losses = self._proposals(images, res4, image_sizes, [{"boxes": b} for b in gt_boxes])
        sampled = sample_rois([p[0].detach() for p in props], gt_boxes, gt_labels, self.num_train_classes,
                              self.roi_matcher, self.roi_sampler, s.append_gt)
        # RoIAlign on fp32 features: under autocast the boxes would otherwise be cast to fp16
        pooled = enc.roi_pool(res4.float(), [r.boxes for r in sampled])
        res5 = enc.res5(pooled)
        emb = enc.attnpool(res5)
        logits, deltas = self.box_predictor(emb)
        labels = torch.cat([r.labels for r in sampled])
        box_targets = self.box_coder.encode_single(torch.cat([r.gt_boxes for r in sampled]),
                                                   torch.cat([r.boxes for r in sampled]))
        losses.update(fast_rcnn_losses(logits, deltas, labels, box_targets, s.focal_gamma, s.bg_weight,
                                       s.box_loss_weight))
        if self.mask_head is not None:
            losses["loss_mask"] = self._mask_loss(res5, sampled, targets) * s.mask_loss_weight
        return losses

    def _mask_loss(self, res5: Tensor, sampled: Sequence[SampledRoIs], targets: Sequence[Mapping[str, Any]]
                   ) -> Tensor:
        fg = torch.cat([r.gt_index >= 0 for r in sampled])
        logits = self.mask_head(res5[fg])  # [F, 1, M, M]
        if logits.shape[0] == 0:
            return logits.sum() * 0.0
        size = int(logits.shape[-1])
        masks = []
        for r, t in zip(sampled, targets):
            polygons = t.get("polygons")
            if polygons is None:
                raise InputError("the mask head needs instance polygons (COCO 'segmentation') in the training data")
            keep = torch.where(r.gt_index >= 0)[0]
            boxes = r.boxes[keep].detach().cpu().numpy()
            for b, g in zip(boxes, r.gt_index[keep].tolist()):
                masks.append(rasterize_polygons_within_box(polygons[g], b, size))
        target = torch.from_numpy(np.stack(masks)).to(logits.device, torch.float32)
        return F.binary_cross_entropy_with_logits(logits[:, 0].float(), target, reduction="mean")

    # -- inference ------------------------------------------------------------------------------
    @torch.no_grad()
    def inference(self, images: Sequence[Tensor]) -> list[DetectorDetections]:
        """Detections of resized images ([3, H_i, W_i] RGB 0..255; padded together, so pass
        images of one size for results independent of the batch), boxes in those images'
        pixels. Uses the eval-mode classifier; call ``.eval()`` first."""
        s = self.settings
        enc = self.encoder
        image_sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        res4 = enc.trunk(enc.batch_images(images))
        props, _ = self._proposals(images, res4, image_sizes)
        emb = enc.forward_features(res4, [p[0] for p in props], chunk_size=s.chunk_size)
        logits, deltas = self.box_predictor(emb)
        probs = logits.softmax(dim=-1)
        counts = [int(p[0].shape[0]) for p in props]
        results = []
        for (boxes, objectness), pr, dl, size in zip(props, probs.split(counts), deltas.split(counts), image_sizes):
            decoded = decode_box_deltas(dl, boxes, s.box_reg_weights)
            dets = postprocess_detector(decoded, pr, size, objectness, s)
            results.append(DetectorDetections(dets.boxes, dets.scores, dets.classes, dets.box_index, dets.probs))
        if self.mask_head is not None:
            pooled_boxes = [d.boxes for d in results]
            if sum(int(b.shape[0]) for b in pooled_boxes):
                res5 = enc.res5(enc.roi_pool(res4, pooled_boxes))
                mask_probs = self.mask_head(res5).sigmoid().split([int(b.shape[0]) for b in pooled_boxes])
            else:
                P = enc.pooler_resolution  # res5 halves the pooled grid, the deconv doubles it back
                mask_probs = [res4.new_zeros((0, 1, P, P))] * len(results)
            for d, m in zip(results, mask_probs):
                d.masks = m
        return results

    def detect(self, images: Sequence[PreparedImage]) -> list[DetectorDetections]:
        """Detect in prepared images (:func:`rclip_core.data.transforms.load_image`); boxes come
        back in ORIGINAL pixels, on the CPU, in input order. Images of equal resized size share
        one trunk call; images are never padded together (so a result does not depend on the
        other images). Runs in eval mode and restores the previous mode."""
        was_training = self.training
        self.eval()
        try:
            out: list[DetectorDetections | None] = [None] * len(images)
            groups: dict[tuple[int, int], list[int]] = {}
            for i, prep in enumerate(images):
                groups.setdefault(tuple(prep.size), []).append(i)
            for idx in groups.values():
                dets = self.inference([images[i].tensor for i in idx])
                for i, d in zip(idx, dets):
                    d = d.to("cpu")
                    d.boxes = boxes_to_original(d.boxes, images[i])
                    nonempty = (d.boxes[:, 2] > d.boxes[:, 0]) & (d.boxes[:, 3] > d.boxes[:, 1])
                    out[i] = d if bool(nonempty.all()) else d.select(nonempty)
            return out  # type: ignore[return-value]
        finally:
            self.train(was_training)

    # -- state ----------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Tensor]:
        """What training changes: the visual tower, the box regressor, the trained RPN and the
        mask head (the text tower, the offline RPN and the class embeddings are constants)."""
        state = {"visual." + k: v for k, v in self.regionclip.clip.visual.state_dict().items()}
        state.update({"box_predictor.bbox_pred." + k: v for k, v in self.box_predictor.bbox_pred.state_dict().items()})
        if self.proposal_generator is not None:
            state.update({"trained_rpn." + k: v for k, v in self.proposal_generator.state_dict().items()})
        if self.mask_head is not None:
            state.update({"mask_head." + k: v for k, v in self.mask_head.state_dict().items()})
        return state

    def load_checkpoint_state(self, state: Mapping[str, Tensor]) -> None:
        """Inverse of :meth:`checkpoint_state`; every key must be present and fit."""
        expected = self.checkpoint_state()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise WeightsError(f"checkpoint does not fit this detector: missing {missing[:4]}, unexpected {unexpected[:4]}",
                               "resume with the recipe the run was started with")
        with torch.no_grad():
            for k, v in expected.items():
                if tuple(v.shape) != tuple(state[k].shape):
                    raise WeightsError(f"checkpoint tensor {k} has shape {list(state[k].shape)}, expected {list(v.shape)}")
                v.copy_(state[k].to(v.device, v.dtype))

    def export_tensors(self, include_text: bool = True) -> dict[str, Tensor]:
        m = self.regionclip
        keep_text = include_text and m.has_text
        tensors = {k: v for k, v in m.clip.state_dict().items() if keep_text or k.startswith("visual.")}
        if m.rpn is not None and self.proposal_generator is None:
            tensors.update({"rpn." + k: v for k, v in m.rpn.state_dict().items()})
        bp = self.box_predictor
        tensors["box_predictor.cls_score.weight"] = bp.cls_score.weight
        tensors["box_predictor.cls_bg_score.weight"] = bp.cls_bg_score.weight
        tensors["box_predictor.bbox_pred.weight"] = bp.bbox_pred.weight
        tensors["box_predictor.bbox_pred.bias"] = bp.bbox_pred.bias
        tensors["class_embeddings"] = self.test_embeddings
        if self.proposal_generator is not None:
            tensors.update({"trained_rpn." + k: v for k, v in self.proposal_generator.state_dict().items()})
        if self.mask_head is not None:
            tensors.update({"mask_head." + k: v for k, v in self.mask_head.state_dict().items()})
        return tensors

    def save(self, path: str | os.PathLike, include_text: bool = True, extra: Mapping[str, Any] | None = None) -> Path:
        """Write the detector as one rclip safetensors file (``kind: detector``), written
        atomically. Metadata: the architecture, ``class_names`` (rows of ``class_embeddings``,
        the classes detected), ``train_class_names``, ``proposals`` (offline with ``rpn_kind``,
        or trained), ``detector_settings``, ``freeze_at`` and ``extra``. ``include_text`` keeps
        the text tower so ``--classes`` can embed new names at detection time."""
        from rclip_core.weights.io import save_safetensors

        m = self.regionclip
        meta = {
            "kind": "detector",
            "architecture": {"name": m.arch.name, "config": m.arch.config},
            "embed_dim": m.embed_dim,
            "has_text": bool(include_text and m.has_text),
            "rpn_kind": m.info.rpn_kind if (m.rpn is not None and self.proposal_generator is None) else None,
            "proposals": self.settings.proposals if (self.proposal_generator is not None or m.rpn is not None)
            else None,
            "class_names": self.class_names,
            "train_class_names": self.train_class_names,
            "detector_settings": self.settings.to_dict(),
            "freeze_at": self.freeze_at,
            "mask_head": self.mask_head is not None,
            **(dict(extra) if extra else {}),
        }
        return save_safetensors(path, self.export_tensors(include_text), meta)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

_OWN_PREFIXES = ("trained_rpn.", "mask_head.")


def is_detector_file(path: str | os.PathLike) -> bool:
    """True for an rclip detector file or an official fine-tuned RegionCLIP detector (one with
    ``roi_heads.box_predictor`` and ``bbox_pred``), without building anything."""
    import json

    from rclip_core.weights.io import METADATA_KEY, _is_safetensors, read_weights

    p = Path(path)
    if p.is_file() and p.stat().st_size > 0 and _is_safetensors(p):
        from safetensors import safe_open

        try:  # the header only: no tensor is read
            with safe_open(str(p), "pt") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
            meta = json.loads(raw) if raw else {}
        except Exception:  # noqa: BLE001 - corrupt files are reported by the real loader
            return False
        return meta.get("kind") == "detector"
    wf = read_weights(path)
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


def load_detector(path: str | os.PathLike, device: torch.device | str = "cpu",
                  settings: DetectorSettings | None = None, **setting_changes: Any) -> Detector:
    """Load a detector written by :meth:`Detector.save` or an official fine-tuned RegionCLIP
    detector (``regionclip_finetuned-{coco,lvis}_rn50[x4].pth``: backbone + offline RPN +
    ``roi_heads.box_predictor`` (+ mask head)).

    Official files get the settings of their benchmark (COCO: C4 RPN, threshold 0.001, 100
    detections; LVIS: LSJ FPN RPN, 0.02, 300 detections, RPN-score fusion) and class names from
    the shipped vocabularies when their row count identifies one (65 -> coco-ovd, 1203 -> lvis,
    ...). ``settings`` replaces the stored settings; ``setting_changes`` (e.g. ``score_thresh=0.05,
    soft_nms=True``) adjust them.
    """
    from rclip_core.models.regionclip import _from_weights_file
    from rclip_core.weights.io import WeightsFile, read_weights
    from rclip_core.weights.official import convert_checkpoint

    wf = read_weights(path)
    meta = wf.metadata
    own: dict[str, Tensor] = {}
    if meta.get("format") == "rclip":
        if meta.get("kind") != "detector":
            raise WeightsError(f"{wf.path} is an rclip {meta.get('kind', 'model')} file, not a detector",
                               "fine-tune one with `rclip finetune`, or use these weights for zero-shot detection")
        own = {k: v for k, v in wf.tensors.items() if k.startswith(_OWN_PREFIXES)}
        rest = WeightsFile(path=wf.path, tensors={k: v for k, v in wf.tensors.items() if k not in own},
                           metadata=meta, container=wf.container)
        model = _from_weights_file(rest, requested=None, fast_attnpool=True, with_rpn=True)
        stored = DetectorSettings.from_dict(meta.get("detector_settings") or {})
        names = meta.get("class_names")
        train_names = meta.get("train_class_names")
        test_emb = wf.tensors.get("class_embeddings")
        freeze_at = int(meta.get("freeze_at", 2))
        mask_state = {k[len("mask_head."):]: v for k, v in own.items() if k.startswith("mask_head.")}
    else:
        conv = convert_checkpoint(wf.tensors)
        if "bbox_pred.weight" not in conv.box_predictor or "cls_score.weight" not in conv.box_predictor:
            raise WeightsError(f"{wf.path} is not a fine-tuned detector (no roi_heads.box_predictor.bbox_pred)",
                               "fine-tune it with `rclip finetune --init`, or use it for zero-shot detection")
        model = _from_weights_file(wf, requested=None, fast_attnpool=True, with_rpn=True)
        mask_state = dict(conv.mask_head)
        lvis_like = bool(mask_state) or (model.info.rpn_kind or "").startswith("lvis")
        stored = DetectorSettings.lvis(mask_head=bool(mask_state)) if lvis_like else DetectorSettings()
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
    s = settings or stored
    has_trained_rpn = any(k.startswith("trained_rpn.") for k in own)
    s = replace(s, proposals="trained" if has_trained_rpn else "offline", mask_head=bool(mask_state),
                **setting_changes)
    det = Detector(model, bp["cls_score.weight"], test_emb, class_names=names, train_class_names=train_names,
                   settings=s, freeze_at=freeze_at)
    with torch.no_grad():
        bg = bp.get("cls_bg_score.weight")
        if bg is not None:
            det.box_predictor.cls_bg_score.weight.copy_(bg.float())
        det.box_predictor.bbox_pred.weight.copy_(bp["bbox_pred.weight"].float())
        det.box_predictor.bbox_pred.bias.copy_(bp["bbox_pred.bias"].float())
    if has_trained_rpn:
        _load_strict(det.proposal_generator, {k[len("trained_rpn."):]: v for k, v in own.items()
                                              if k.startswith("trained_rpn.")}, "trained RPN", wf.path)
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
