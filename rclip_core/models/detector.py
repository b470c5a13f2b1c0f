"""The open-vocabulary detector: Faster R-CNN C4 on the CLIP trunk, a composition of injected
stages (torchvision ``generalized_rcnn.py`` style; the official ``clip_rcnn.py: CLIPFastRCNN`` with
``clip_roi_heads.py: CLIPRes5ROIHeads``).

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

* **Stages**: proposals (:mod:`rclip_core.models.proposals`), the region encoder
  (:mod:`rclip_core.models.region_encoder`), the heads (:mod:`rclip_core.models.heads`: the
  text-embedding classifier with its zero background and the class-agnostic box regressor, the
  mask head) and the RoI stage (:mod:`rclip_core.models.roi_heads`: sampling, losses, decoding).
* **Training** (``ROIHeads.label_and_sample_proposals``, ``FastRCNNOutputLayers.losses``):
  proposals + ground-truth boxes, matched at IoU >= 0.5 (one threshold, no ignore band; torchvision ``Matcher``), 512 RoIs per image with at most 25 %
  foreground (torchvision ``BalancedPositiveNegativeSampler``), targets 0..K-1 for foreground
  and K for background. Classification loss: focal-scaled CE (COCO: gamma 0.5, background RoIs
  x 0.2, mean over RoIs) or class-weighted CE (LVIS: background weight 0.8, mean over the sum of
  weights) from :mod:`rclip_core.losses`; box loss: L1 on foreground deltas divided by the number
  of sampled RoIs; optional class-agnostic mask loss (BCE, ``mask_head.py: mask_rcnn_loss``).
* **Freezing** (``BACKBONE.FREEZE_AT``, :func:`rclip_core.models.clip.freeze_visual`): stem +
  layer1 (``freeze_at`` 2), every BN (FrozenBN in the whole visual tower), the classifier embeddings and the background, the offline RPN and the text
  tower (kept only to embed new class names at detection time).
* **Inference** (``fast_rcnn.py: fast_rcnn_inference_single_image``,
  :func:`rclip_core.models.classifier.postprocess`): box deltas applied, optional fusion with the
  RPN objectness (raw logit form, LVIS), strict score threshold, per-class NMS (or gaussian
  soft-NMS), top-k, in resized-image pixels; :func:`rclip_core.inference.detect_images` maps the
  boxes back to original pixels.
* **Settings**: :class:`DetectorConfig` (training; the recipe's ``detector`` section) and
  :class:`~rclip_core.models.classifier.InferenceConfig` (post-processing; the recipe's ``test``
  keys and the detection CLI's flags).

Files: :func:`rclip_core.weights.native.save_detector` writes a detector as one rclip
safetensors file and :func:`rclip_core.weights.loaders.load_detector` reads it back, or an
official ``regionclip_finetuned-*`` ``.pth``; this module reads and writes no file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher

from rclip_core.errors import InputError, WeightsError
from rclip_core.models.clip import freeze_visual
from rclip_core.models.classifier import CLASSIFIER_TEMPERATURE, Detections, InferenceConfig, postprocess
from rclip_core.models.heads import BoxPredictor, MaskHead
from rclip_core.models.proposals.offline import OfflineRPNConfig, RPNSettings
from rclip_core.models.proposals.trainable import TrainableRPN, TrainableRPNConfig
from rclip_core.models.regionclip import RegionCLIP
from rclip_core.models.roi_heads import BOX_REG_WEIGHTS, SCALE_CLAMP, SampledRoIs, decode_box_deltas, \
    rasterize_polygons_within_box, sample_rois, fast_rcnn_losses

__all__ = [
    "PROPOSAL_SOURCES",
    "DetectorConfig",
    "Detector",
    "DetectorDetections",
    "DetectorRPN",
    "DetectorProposals",
]

PROPOSAL_SOURCES = ("offline", "trained")


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class DetectorConfig:
    """Everything that shapes the detector's training computation; the fields ARE the
    fine-tuning recipe section ``detector`` (``detector.rois_per_image`` ...). Defaults: the COCO
    OVD transfer (``configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd.yaml``);
    :meth:`lvis` gives the LVIS values (``CLIP_fast_rcnn_R_50_C4.yaml``).

    * ``proposals``: ``offline`` (a frozen Detectron2 RPN, ``offline_rpn``: the official setup)
      or ``trained`` (torchvision RPN on res4, ``rpn``).
    * RoI sampling (``ROIHeads.label_and_sample_proposals``): ``rois_per_image`` 512 with at
      most ``positive_fraction`` 25 % foreground at IoU >= ``fg_iou`` 0.5, ground truth
      appended (``append_gt``, ``PROPOSAL_APPEND_GT``).
    * Classification loss: focal-scaled CE with ``focal_gamma`` 0.5 and background RoIs x
      ``bg_weight`` 0.2 (COCO: ``FOCAL_SCALED_LOSS``, ``BG_CLS_LOSS_WEIGHT``), or with
      ``focal_gamma`` None class-weighted CE with background weight ``bg_weight`` (LVIS: 0.8).
    * Boxes: class-agnostic regression with ``box_reg_weights`` (10, 10, 5, 5) and an L1 loss x
      ``box_loss_weight``; ``mask_head`` (LVIS) with loss weight ``mask_loss_weight``.
    * ``temperature``: the cosine classifier's fixed temperature (``CLSS_TEMP`` 0.01).
    """

    proposals: Literal["offline", "trained"] = "offline"
    offline_rpn: OfflineRPNConfig = field(default_factory=OfflineRPNConfig)
    rpn: TrainableRPNConfig = field(default_factory=TrainableRPNConfig)
    rois_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou: float = 0.5
    append_gt: bool = True
    focal_gamma: float | None = 0.5
    bg_weight: float | None = 0.2
    box_reg_weights: list[float] = field(default_factory=lambda: list(BOX_REG_WEIGHTS))
    box_loss_weight: float = 1.0
    mask_head: bool = False
    mask_loss_weight: float = 1.0
    temperature: float = CLASSIFIER_TEMPERATURE

    def __post_init__(self) -> None:
        self.box_reg_weights = [float(w) for w in self.box_reg_weights]

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)

        need(self.proposals in PROPOSAL_SOURCES,
             f"proposals must be one of {', '.join(PROPOSAL_SOURCES)}, got {self.proposals!r}")
        need(self.temperature > 0, f"temperature must be positive, got {self.temperature}")
        need(self.rois_per_image >= 1, f"rois_per_image must be >= 1, got {self.rois_per_image}")
        need(0.0 < self.positive_fraction <= 1.0, f"positive_fraction must be in (0, 1], got {self.positive_fraction}")
        need(0.0 < self.fg_iou <= 1.0, f"fg_iou must be in (0, 1], got {self.fg_iou}")
        need(self.focal_gamma is None or self.focal_gamma >= 0, f"focal_gamma must be >= 0, got {self.focal_gamma}")
        need(self.bg_weight is None or self.bg_weight >= 0, f"bg_weight must be >= 0, got {self.bg_weight}")
        need(len(self.box_reg_weights) == 4 and all(w > 0 for w in self.box_reg_weights),
             f"box_reg_weights must be 4 positive numbers, got {self.box_reg_weights}")

    @classmethod
    def lvis(cls, **changes: Any) -> "DetectorConfig":
        """The LVIS transfer values: class-weighted CE with background 0.8, no focal scaling,
        mask head on (with :meth:`InferenceConfig.lvis` at test)."""
        return cls(**{"focal_gamma": None, "bg_weight": 0.8, "mask_head": True, **changes})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DetectorConfig":
        """Known keys only, nested sections too (files written by a newer rclip may carry more)."""
        def known(kind: type, m: Mapping[str, Any]) -> dict[str, Any]:
            names = {f.name for f in fields(kind)}
            return {k: v for k, v in m.items() if k in names}

        kw = known(cls, d)
        if isinstance(kw.get("offline_rpn"), Mapping):
            kw["offline_rpn"] = OfflineRPNConfig(**known(OfflineRPNConfig, kw["offline_rpn"]))
        if isinstance(kw.get("rpn"), Mapping):
            kw["rpn"] = TrainableRPNConfig(**known(TrainableRPNConfig, kw["rpn"]))
        return cls(**kw)


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
        config: :class:`DetectorConfig` (the recipe's ``detector`` section), fixed once trained.
        inference: :class:`~rclip_core.models.classifier.InferenceConfig` (the recipe's ``test``
            post-processing keys); :meth:`update_inference` changes it at detection time.
        freeze_at: Detectron2 ``FREEZE_AT`` (:func:`rclip_core.models.clip.freeze_visual`; the
            paper: 2).
    """

    def __init__(self, model: RegionCLIP, train_embeddings: Tensor, test_embeddings: Tensor | None = None, *,
                 class_names: Sequence[str] | None = None, train_class_names: Sequence[str] | None = None,
                 config: DetectorConfig | None = None, inference: InferenceConfig | None = None,
                 freeze_at: int = 2):
        super().__init__()
        self.config = config if config is not None else DetectorConfig()
        self.inference_config = inference if inference is not None else InferenceConfig()
        s = self.config
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
            self.proposal_generator = TrainableRPN(model.arch.res4_channels, s.rpn)
        elif model.rpn is not None:
            self._configure_offline_rpn()
        self.mask_head: MaskHead | None = MaskHead(model.arch.res5_channels) if s.mask_head else None
        self.roi_matcher = Matcher(s.fg_iou, s.fg_iou, allow_low_quality_matches=False)
        self.roi_sampler = BalancedPositiveNegativeSampler(s.rois_per_image, s.positive_fraction)
        self.box_coder = BoxCoder(weights=tuple(s.box_reg_weights), bbox_xform_clip=SCALE_CLAMP)
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
        # the transfer values (clip_rcnn.py: CLIPFastRCNN.from_config): NMS 0.7, 1000 proposals,
        # in training and test alike
        rpn = self.regionclip.rpn
        rpn.settings = self.config.offline_rpn.settings_for(rpn.kind)

    def freeze(self) -> None:
        """Make exactly the official transfer's parameters trainable (``FREEZE_AT`` 2: layer2..4,
        attnpool, ``bbox_pred``, the mask head; the trained RPN when there is one)."""
        self.regionclip.requires_grad_(False)
        visual = self.regionclip.clip.visual
        freeze_visual(visual, self.freeze_at)
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

    def update_inference(self, **changes: Any) -> None:
        """Change the test-time post-processing (:class:`InferenceConfig` fields: ``--score-thresh``,
        ``--nms``, ``--max-dets``, ``--fusion``, soft-NMS, ``chunk_size``); the training-time
        :attr:`config` is fixed by the weights."""
        names = [f.name for f in fields(InferenceConfig)]
        bad = sorted(set(changes) - set(names))
        if bad:
            raise InputError(f"cannot change detector setting(s) {', '.join(bad)} after training",
                             "changeable: " + ", ".join(names))
        try:
            self.inference_config = replace(self.inference_config, **changes)
        except ValueError as e:
            raise InputError(f"detector setting {e}") from None

    def set_test_proposals(self, pre_nms_topk: int | None = None, post_nms_topk: int | None = None,
                           nms: float | None = None) -> None:
        """Change the test-time proposals of the detector's source (None keeps a value): the
        trained RPN's ``rpn.pre_nms_topk_test`` / ``post_nms_topk_test`` / ``nms``, or the
        offline RPN's ``offline_rpn.pre_nms_topk`` / ``post_nms_topk`` / ``nms``; with no
        argument, (re)applies them (e.g. after attaching another offline RPN)."""
        c = self.config
        try:
            if self.proposal_generator is not None or c.proposals == "trained":
                rpn = replace(c.rpn, **{k: v for k, v in (("pre_nms_topk_test", pre_nms_topk),
                                                          ("post_nms_topk_test", post_nms_topk), ("nms", nms))
                                        if v is not None})
                self.config = replace(c, rpn=rpn)
            else:
                off = replace(c.offline_rpn, **{k: v for k, v in (("pre_nms_topk", pre_nms_topk),
                                                                  ("post_nms_topk", post_nms_topk), ("nms", nms))
                                                if v is not None})
                self.config = replace(c, offline_rpn=off)
        except ValueError as e:
            raise InputError(f"detector setting {e}") from None
        if self.proposal_generator is not None:
            r = self.config.rpn
            self.proposal_generator.set_test_topk(r.pre_nms_topk_test, r.post_nms_topk_test, r.nms)
        elif self.regionclip.rpn is not None:
            self._configure_offline_rpn()

    def train(self, mode: bool = True) -> "Detector":
        super().train(mode)
        if self.regionclip.rpn is not None:
            self.regionclip.rpn.train(False)  # the offline RPN always runs in eval mode (clip_rcnn.py)
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
                               "or use inference() / rclip_core.inference.detect_images()")
        s = self.config
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
        inference = self.inference_config
        enc = self.encoder
        image_sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        res4 = enc.trunk(enc.batch_images(images))
        props, _ = self._proposals(images, res4, image_sizes)
        emb = enc.forward_features(res4, [p[0] for p in props], chunk_size=inference.chunk_size)
        logits, deltas = self.box_predictor(emb)
        probs = logits.softmax(dim=-1)
        counts = [int(p[0].shape[0]) for p in props]
        results = []
        for (boxes, objectness), pr, dl, size in zip(props, probs.split(counts), deltas.split(counts), image_sizes):
            decoded = decode_box_deltas(dl, boxes, self.config.box_reg_weights)
            dets = postprocess(decoded, pr, size, objectness, inference)
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


class DetectorProposals(NamedTuple):
    boxes: Tensor  # [R, 4] XYXY in the input image's pixels
    objectness_logits: Tensor  # [R]


class DetectorRPN(nn.Module):
    """The RPN trained inside an rclip detector (``detector.proposals: trained``, on the
    detector's own res4), used as a class-agnostic proposal source for another model: zero-shot
    RPN mode and pseudo-labelling on data that has no offline RPN (ShapesWorld), as the paper
    uses an RPN trained on base-class boxes. Called like the offline RPNs: a list of images
    [3, H, W] (RGB 0..255) -> per image ``.boxes`` [R, 4] and ``.objectness_logits`` [R];
    ``settings`` (an :class:`~rclip_core.models.proposals.offline.RPNSettings`) reads and sets its
    test-time top-k and NMS (the detector's own: NMS 0.7, its post-NMS top-k)."""

    kind = "detector"

    def __init__(self, detector: nn.Module):
        super().__init__()
        if getattr(detector, "proposal_generator", None) is None:
            raise WeightsError("the detector file has no trained RPN",
                               "train the detector with detector.proposals=trained, or pass an rpn_*.pth")
        self.detector = detector.eval()

    @property
    def settings(self) -> RPNSettings:
        r = self.detector.config.rpn
        return RPNSettings(pre_nms_topk=r.pre_nms_topk_test, post_nms_topk=r.post_nms_topk_test, nms=r.nms)

    @settings.setter
    def settings(self, value: RPNSettings) -> None:
        self.detector.set_test_proposals(int(value.pre_nms_topk), int(value.post_nms_topk), float(value.nms))

    @torch.no_grad()
    def forward(self, images: list[Tensor]) -> list[DetectorProposals]:
        det = self.detector
        enc = det.encoder
        sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        with torch.autocast(device_type=det.device.type, enabled=False):
            res4 = enc.trunk(enc.batch_images([i.to(det.device, torch.float32) for i in images]))
            out, _ = det.proposal_generator(res4, sizes, None)
        return [DetectorProposals(b.float(), lg.float()) for b, lg in out]
