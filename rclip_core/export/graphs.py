"""The exported computations as ``nn.Module``'s that ``torch.export`` can trace with a dynamic
image size and a dynamic number of classes K: the same modules and functions as ``rclip
detect`` (open_clip's tower run as plain modules, the offline RPN's convolutions unfolded), with
the data-dependent steps written as shape-polymorphic tensor code and the NMS steps as
:mod:`rclip_core.export.nms` ops.

Graph inputs (all graphs): ``image`` uint8 [H, W, 3] RGB, already resized
(``ResizeShortestEdge``, done by the caller with :func:`rclip_core.data.images.resize_array`),
``orig_size`` int64 [2] (h, w) of the original image, ``class_embeddings`` float32 [K, D]
(unnormalised is fine); the box graph adds ``given_boxes`` float32 [N, 4] XYXY in original pixels.

Graph outputs: ``boxes`` [M, 4] (original pixels), ``scores`` [M], ``classes`` [M] int64,
``box_index`` [M] int64 (row of ``region_boxes``), ``region_boxes`` [N, 4] (original pixels),
``region_embeddings`` [N, D] (unnormalised), ``objectness`` [N] (raw RPN logits; zeros in box
mode). Detections are ordered by decreasing score.

Steps, each as in the PyTorch path: the offline RPN (``OfflineRPN.preprocess`` BGR branch, FPN
or C4, ``find_top_rpn_proposals``) or the detector's trained RPN (torchvision
``RegionProposalNetwork.filter_proposals``); CLIP normalisation, trunk, RoIAlign (aligned,
adaptive sampling), res5, token-0 attention pool (``RegionEncoder``); the cosine classifier
(:func:`rclip_core.models.classifier.region_class_logits`), score fusion, and
:func:`rclip_core.models.classifier.postprocess` (finiteness filter, clipping, strict score
threshold, top-k labels, per-class NMS, max detections), boxes back to original pixels and
empty ones dropped as ``rclip_core.inference``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import clip_boxes_to_image, roi_align

from rclip_core.export.nms import class_nms, group_nms
from rclip_core.models.classifier import InferenceConfig, fuse_scores, region_class_logits
from rclip_core.models.proposals.offline import OfflineRPN, decode_boxes
from rclip_core.models.roi_heads import decode_box_deltas

__all__ = ["OUTPUT_NAMES", "DetectorGraph", "ZeroShotBoxGraph", "ZeroShotGraph", "ZeroShotRPNGraph"]

OUTPUT_NAMES = ("boxes", "scores", "classes", "box_index", "region_boxes", "region_embeddings", "objectness")


def _to_chw(image: Tensor) -> Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in 0..255 (``PreparedImage.tensor``)."""
    return image.permute(2, 0, 1).to(torch.float32)


def _to_original(boxes: Tensor, image: Tensor, orig_size: Tensor) -> Tensor:
    """:func:`rclip_core.data.images.boxes_to_original`: scale by (w/W, h/H), clamp to the original."""
    o = orig_size.to(torch.float64)
    h, w = o[0], o[1]
    sx = (w / image.shape[1]).to(torch.float32)
    sy = (h / image.shape[0]).to(torch.float32)
    scale = torch.stack([sx, sy, sx, sy])
    out = boxes * scale
    hi = torch.stack([w, h, w, h]).to(torch.float32)
    return torch.minimum(out.clamp(min=0), hi)


def _to_resized(boxes: Tensor, image: Tensor, orig_size: Tensor) -> Tensor:
    """:func:`rclip_core.data.images.boxes_to_resized` in float64: scale, clip to [0, W] x [0, H]."""
    o = orig_size.to(torch.float64)
    H = o.new_tensor(0) + image.shape[0]
    W = o.new_tensor(0) + image.shape[1]
    sx = W / o[1]
    sy = H / o[0]
    b = boxes.to(torch.float64) * torch.stack([sx, sy, sx, sy])
    b = torch.minimum(b.clamp(min=0), torch.stack([W, H, W, H]))
    return b.to(torch.float32)


def _drop_empty(boxes: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return (boxes[keep], *(o[keep] for o in others))


def postprocess_graph(boxes: Tensor, probs_with_bg: Tensor, image_hw: tuple, objectness: Tensor | None,
                      cfg: InferenceConfig) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`rclip_core.models.classifier.postprocess` (hard NMS) without data-dependent Python:
    rows that the original drops (non-finite), classes outside a box's top-k and scores not above
    the threshold are excluded from :func:`class_nms` instead of being cut out first.
    Returns (boxes, scores, classes, box_index), by decreasing score."""
    scores = fuse_scores(probs_with_bg, objectness, cfg.fusion)
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores).all(dim=1)
    scores = scores[:, :-1]
    boxes = clip_boxes_to_image(torch.where(valid[:, None], boxes, torch.zeros_like(boxes)), image_hw)
    allowed = valid[:, None].expand_as(scores)
    if cfg.topk_labels > 0:
        k = torch.sym_min(scores.shape[1], cfg.topk_labels)
        top = torch.where(allowed, scores, torch.full_like(scores, -1.0)).topk(k, dim=1).indices
        allowed = allowed & torch.zeros_like(allowed).scatter(1, top, True)
    scores = torch.where(allowed, scores, torch.full_like(scores, -1.0))  # -1: below every threshold
    pairs = class_nms(boxes, scores, float(cfg.score_thresh), float(cfg.nms))
    pairs = pairs[: cfg.max_dets]
    rows, cls = pairs[:, 0], pairs[:, 1]
    return boxes[rows], scores[rows, cls], cls, rows


class _RegionHead(nn.Module):
    """RegionEncoder's plain path: CLIP normalisation, trunk, RoIAlign, res5, attention pool."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def trunk(self, img: Tensor) -> Tensor:
        enc = self.encoder
        return enc.trunk(enc.normalize(img).unsqueeze(0))

    def regions(self, res4: Tensor, boxes: Tensor) -> Tensor:
        enc = self.encoder
        rois = torch.cat([boxes.new_zeros((boxes.shape[0], 1)), boxes], dim=1)
        P = enc.pooler_resolution
        pooled = roi_align(res4, rois, output_size=(P, P), spatial_scale=enc.spatial_scale, sampling_ratio=0,
                           aligned=True)
        return enc.attnpool(enc.res5(pooled))


def offline_rpn_proposals(rpn: OfflineRPN, img: Tensor) -> tuple[Tensor, Tensor]:
    """``OfflineRPN.forward`` for one image [3, H, W] (RGB 0..255): BGR, mean subtracted, padded
    to the size divisibility; backbone, head, anchors, decoding, ``find_top_rpn_proposals``.
    Returns (boxes [N, 4] in image pixels, raw logits [N]) by decreasing logit."""
    s = rpn.settings
    H, W = img.shape[1], img.shape[2]
    x = (img[[2, 1, 0]] - rpn.pixel_mean) / rpn.pixel_std
    d = rpn.size_divisibility
    if d > 1:
        x = F.pad(x, (0, (W + d - 1) // d * d - W, 0, (H + d - 1) // d * d - H))
    features = rpn.backbone(x.unsqueeze(0))
    if isinstance(features, dict):
        features = [features["res4"]]
    gen = rpn.proposal_generator
    logits, deltas = gen.rpn_head(features)
    all_boxes, all_scores, all_levels = [], [], []
    for level, (f, lg, dl) in enumerate(zip(features, logits, deltas)):
        h, w = f.shape[-2], f.shape[-1]
        anchors = gen.anchor_generator.grid_anchors(level, h, w)
        lg = lg.permute(0, 2, 3, 1).reshape(-1)
        dl = dl.view(1, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        props = decode_boxes(dl, anchors)
        k = torch.sym_min(lg.shape[0], s.pre_nms_topk)
        sc, idx = lg.topk(k)
        all_boxes.append(props[idx])
        all_scores.append(sc)
        all_levels.append(torch.full_like(idx, level))
    boxes, scores, levels = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_levels)
    valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
    boxes = clip_boxes_to_image(torch.where(valid[:, None], boxes, torch.zeros_like(boxes)), (H, W))
    valid = valid & (boxes[:, 2] - boxes[:, 0] > s.min_box_size) & (boxes[:, 3] - boxes[:, 1] > s.min_box_size)
    keep = group_nms(boxes, scores, levels, valid, len(features), float(s.nms))[: s.post_nms_topk]
    return boxes[keep], scores[keep]


def trained_rpn_proposals(rpn: nn.Module, res4: Tensor, img_hw: tuple) -> tuple[Tensor, Tensor]:
    """:class:`rclip_core.models.proposals.trainable.TrainableRPN` at test for one image:
    torchvision's head, anchors (stride 16), ``box_coder.decode`` and ``filter_proposals``
    (top-k, sigmoid, clip, ``remove_small_boxes(1e-3)``, score >= ``score_thresh``, NMS,
    post-NMS top-k); logits back from the probabilities as TrainableRPN does."""
    objectness, deltas = rpn.head([res4])
    obj, dl = objectness[0], deltas[0]
    h, w = res4.shape[-2], res4.shape[-1]
    base = rpn.anchor_generator.cell_anchors[0].to(res4.device, torch.float32)
    sx = torch.arange(0, w, dtype=torch.int32, device=res4.device) * 16
    sy = torch.arange(0, h, dtype=torch.int32, device=res4.device) * 16
    yy, xx = torch.meshgrid(sy, sx, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack((xx, yy, xx, yy), dim=1)
    anchors = (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)
    obj = obj.permute(0, 2, 3, 1).reshape(-1).float()
    dl = dl.view(1, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 4).float()
    props = rpn.box_coder.decode_single(dl, anchors)
    k = torch.sym_min(obj.shape[0], rpn._pre_nms_top_n["testing"])
    top, idx = obj.topk(k)
    boxes = clip_boxes_to_image(props[idx], img_hw)
    prob = torch.sigmoid(top)
    ws, hs = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    valid = (ws >= rpn.min_size) & (hs >= rpn.min_size) & (prob >= rpn.score_thresh)
    keep = group_nms(boxes, prob, torch.zeros_like(idx), valid, 1, float(rpn.nms_thresh))
    keep = keep[: rpn._post_nms_top_n["testing"]]
    return boxes[keep], torch.logit(prob[keep], eps=1e-7)


class ZeroShotGraph(nn.Module):
    """A RegionCLIP model (region encoder + offline RPN) as a zero-shot detector
    (``rclip_core.inference.ZeroShotPipeline``). ``with_boxes``: the given-box graph
    (``image``, ``orig_size``, ``given_boxes``, ``class_embeddings``; no fusion); otherwise RPN mode."""

    def __init__(self, model: nn.Module, cfg: InferenceConfig, with_boxes: bool):
        super().__init__()
        self.head = _RegionHead(model.encoder)
        self.rpn = None if with_boxes else model.rpn
        self.cfg = cfg
        self.with_boxes = with_boxes

    def _run(self, image: Tensor, orig_size: Tensor, boxes: Tensor | None, class_embeddings: Tensor):
        img = _to_chw(image)
        hw = (image.shape[0], image.shape[1])
        if boxes is None:
            props, logits = offline_rpn_proposals(self.rpn, img)
            region_boxes = _to_original(props, image, orig_size)
        else:
            props, logits = _to_resized(boxes, image, orig_size), None
            region_boxes = boxes
        emb = self.head.regions(self.head.trunk(img), props).float()
        probs = region_class_logits(emb, class_embeddings).softmax(dim=-1)
        b, s, c, i = postprocess_graph(props, probs, hw, logits, self.cfg)
        b, s, c, i = _drop_empty(_to_original(b, image, orig_size), s, c, i)
        obj = logits if logits is not None else emb.new_zeros(emb.shape[0])
        return b, s, c, i, region_boxes, emb, obj


class ZeroShotRPNGraph(ZeroShotGraph):
    def forward(self, image: Tensor, orig_size: Tensor, class_embeddings: Tensor):
        return self._run(image, orig_size, None, class_embeddings)


class ZeroShotBoxGraph(ZeroShotGraph):
    def forward(self, image: Tensor, orig_size: Tensor, given_boxes: Tensor, class_embeddings: Tensor):
        return self._run(image, orig_size, given_boxes, class_embeddings)


class DetectorGraph(nn.Module):
    """A fine-tuned :class:`rclip_core.models.detector.Detector` (``Detector.inference`` +
    ``detect_images``): its own proposals (offline or trained RPN), the box regressor on the
    region embeddings, the classifier on ``class_embeddings`` with the detector's background
    embedding and temperature, its stored post-processing."""

    def __init__(self, detector: nn.Module, cfg: InferenceConfig):
        super().__init__()
        self.detector = detector
        self.head = _RegionHead(detector.encoder)
        self.cfg = cfg

    def forward(self, image: Tensor, orig_size: Tensor, class_embeddings: Tensor):
        det = self.detector
        img = _to_chw(image)
        hw = (image.shape[0], image.shape[1])
        res4 = self.head.trunk(img)
        if det.proposal_generator is not None:
            props, logits = trained_rpn_proposals(det.proposal_generator, res4, hw)
        else:
            props, logits = offline_rpn_proposals(det.regionclip.rpn, img)
        emb = self.head.regions(res4, props)
        bp = det.box_predictor
        x_hat = F.normalize(emb.float(), p=2.0, dim=1)
        w_hat = F.normalize(class_embeddings.float(), p=2.0, dim=1)
        lg = torch.cat([x_hat @ w_hat.t(), x_hat @ bp.cls_bg_score.weight.float().t()], dim=1) / bp.temperature
        deltas = bp.bbox_pred(emb).float()
        decoded = decode_box_deltas(deltas, props, det.config.box_reg_weights)
        b, s, c, i = postprocess_graph(decoded, lg.softmax(dim=-1), hw, logits, self.cfg)
        b, s, c, i = _drop_empty(_to_original(b, image, orig_size), s, c, i)
        return b, s, c, i, _to_original(props, image, orig_size), emb.float(), logits
