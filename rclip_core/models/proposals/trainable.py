"""A region proposal network trained with the detector: torchvision's RPN on the single res4 map
(a Detectron2-style C4 RPN, ``Base-RCNN-C4.yaml`` defaults), for data without an offline RPN
(ShapesWorld, custom data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead, concat_box_prediction_layers

__all__ = ["TrainableRPNConfig", "TrainableRPN"]


@dataclass(kw_only=True)
class TrainableRPNConfig:
    """The fine-tuning recipe section ``detector.rpn`` (used with ``detector.proposals: trained``):
    Detectron2's C4 defaults (``detectron2/config/defaults.py`` ``MODEL.RPN.*`` and
    ``ANCHOR_GENERATOR``): anchors 32..512 x ratios (h/w) 0.5/1/2, IoU 0.3/0.7, 256 anchors per
    image at 50 % positive, 12000/2000 proposals before/after NMS in training and 6000/1000 at
    test, NMS 0.7."""

    anchor_sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    batch_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_topk_train: int = 12000
    post_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 6000
    post_nms_topk_test: int = 1000
    nms: float = 0.7

    def __post_init__(self) -> None:
        self.anchor_sizes = [float(v) for v in self.anchor_sizes]
        self.anchor_ratios = [float(v) for v in self.anchor_ratios]
        if not (len(self.anchor_sizes) >= 1 and all(s > 0 for s in self.anchor_sizes)):
            raise ValueError("anchor_sizes must list positive sizes")
        if not (len(self.anchor_ratios) >= 1 and all(r > 0 for r in self.anchor_ratios)):
            raise ValueError("anchor_ratios must list positive ratios")
        if not 0.0 <= self.bg_iou <= self.fg_iou <= 1.0:
            raise ValueError(f"bg_iou / fg_iou must satisfy 0 <= bg_iou <= fg_iou <= 1, got {self.bg_iou} / "
                             f"{self.fg_iou}")
        for name in ("batch_per_image", "pre_nms_topk_train", "post_nms_topk_train", "pre_nms_topk_test",
                     "post_nms_topk_test"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in (0, 1], got {self.positive_fraction}")
        if not 0.0 < self.nms <= 1.0:
            raise ValueError(f"nms must be in (0, 1], got {self.nms}")


class TrainableRPN(RegionProposalNetwork):
    """torchvision's RPN on the single res4 map (a Detectron2-style C4 RPN), trained with the
    detector where no offline RPN exists (ShapesWorld, custom data).

    Only ``forward`` is ours: torchvision's discards the objectness scores, which the detector
    needs for RPN-score fusion. Everything else (``RPNHead``, ``AnchorGenerator``, box coder,
    matcher, sampler, ``filter_proposals``, ``compute_loss``) is torchvision's.

    forward(res4 [B, C, h, w], image_sizes [(H, W)], targets=None) ->
    (list of (boxes [N, 4] in image pixels, objectness logits [N]), losses dict).
    """

    def __init__(self, in_channels: int, config: TrainableRPNConfig | None = None):
        c = config or TrainableRPNConfig()
        anchors = AnchorGenerator(sizes=(tuple(c.anchor_sizes),), aspect_ratios=(tuple(c.anchor_ratios),))
        head = RPNHead(in_channels, anchors.num_anchors_per_location()[0])
        super().__init__(
            anchors, head,
            fg_iou_thresh=c.fg_iou, bg_iou_thresh=c.bg_iou,
            batch_size_per_image=c.batch_per_image, positive_fraction=c.positive_fraction,
            pre_nms_top_n={"training": c.pre_nms_topk_train, "testing": c.pre_nms_topk_test},
            post_nms_top_n={"training": c.post_nms_topk_train, "testing": c.post_nms_topk_test},
            nms_thresh=c.nms,
        )

    def set_test_topk(self, pre_nms_topk: int | None = None, post_nms_topk: int | None = None,
                      nms: float | None = None) -> None:
        """Change the test-time proposal counts / NMS (``--rpn-pre-nms-topk`` ...)."""
        if pre_nms_topk is not None:
            self._pre_nms_top_n["testing"] = int(pre_nms_topk)
        if post_nms_topk is not None:
            self._post_nms_top_n["testing"] = int(post_nms_topk)
        if nms is not None:
            self.nms_thresh = float(nms)

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
        # filter_proposals returns sigmoid probabilities; fusion wants the raw logit
        # (clip_rcnn.py: CLIPFastRCNN.inference multiplies by the raw objectness logit)
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
