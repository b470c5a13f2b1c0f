"""The official offline Detectron2 RPNs, ported with their checkpoint keys; long because it is one
port of four Detectron2 modules (R-50, FPN, RPN head, anchors) that torchvision does not match.

RegionCLIP never trains its proposal network: it runs a frozen
Detectron2 GeneralizedRCNN backbone + RPN on a BGR copy of the resized image. This module ports
those networks on plain PyTorch + torchvision, with module attribute names chosen so that
``OfflineRPN.state_dict()`` has exactly the keys of the released standalone ``rpn_*.pth`` files
(``backbone.bottom_up.stem.conv1.weight``, ``proposal_generator.rpn_head.conv.weight``, ...).
A loader only has to strip ``module.`` / rename ``offline_backbone`` -> ``backbone`` and
``offline_proposal_generator`` -> ``proposal_generator`` and call
``load_state_dict(strict=True)``.

Three variants (``kind``):

- ``"lvis_866_fpn"`` (A, ``rpn_lvis_866.pth``): R-50 (stride in the first 1x1 conv, FrozenBN),
  FPN P2-P6, one 3x3 conv RPN head, 3 anchors per location. Pretraining and zero-shot.
- ``"lvis_866_lsj_fpn"`` (C, ``rpn_lvis_866_lsj.pth``): as A, but every norm is (Sync)BN in eval
  form with ``num_batches_tracked``, the FPN convs have no bias and carry ``.norm``, and the
  RPN head has two 3x3 convs (``rpn_head.conv.conv0``/``conv1``). LVIS transfer.
- ``"coco_c4"`` (B, ``rpn_coco_{48,65,80}.pth``): R50-C4 trunk to res4, RPN on res4 with a
  1024-channel 3x3 conv and 15 anchors per location. COCO transfer.

Where torchvision matches Detectron2 numerically it is used (FrozenBatchNorm2d, BoxCoder,
batched_nms, clip_boxes_to_image). Two parts are written here because torchvision differs:
``AnchorGenerator`` rounds its cell anchors and orders them ratio-major, and
``remove_small_boxes`` keeps boxes with side == min_size where Detectron2's ``nonempty`` drops
them (with min size 0 that would keep empty boxes).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import FrozenBatchNorm2d, batched_nms, clip_boxes_to_image

from rclip_core.errors import InputError, WeightsError
from rclip_core.models.ops import conv2d as fast_conv2d
from rclip_core.models.ops import fold_conv_bn, foldable_norm, tensor_versions

__all__ = [
    "RPN_KINDS",
    "RPNSettings",
    "OfflineRPNConfig",
    "RPNProposals",
    "OfflineRPN",
    "build_offline_rpn",
    "rpn_settings",
    "cell_anchors",
    "AnchorGenerator",
    "decode_boxes",
    "find_top_rpn_proposals",
]

RPN_KINDS = ("lvis_866_fpn", "lvis_866_lsj_fpn", "coco_c4")

# Detectron2 MSRA R-50 input convention, BGR order (``clip_rcnn.py: CLIPFastRCNN.offline_preprocess_image``).
RPN_PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)
RPN_PIXEL_STD_BGR = (1.0, 1.0, 1.0)

ANCHOR_SIZES = (32, 64, 128, 256, 512)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)  # h / w
# Box2BoxTransform of the RPN: weights (1, 1, 1, 1), dw/dh clamped at log(1000 / 16).
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
SCALE_CLAMP = math.log(1000.0 / 16)


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RPNSettings:
    """Test-time proposal selection (Detectron2 ``MODEL.RPN.*_TEST``; the offline RPN is always
    in eval mode, so these apply in training too).

    ``pre_nms_topk`` is per feature level, ``post_nms_topk`` per image.
    """

    pre_nms_topk: int = 1000
    post_nms_topk: int = 1000
    nms: float = 0.7
    min_box_size: float = 0.0

    def __post_init__(self) -> None:
        if self.pre_nms_topk <= 0 or self.post_nms_topk <= 0:
            raise InputError(
                f"RPN top-k must be positive (pre {self.pre_nms_topk}, post {self.post_nms_topk})")
        if not 0.0 < self.nms <= 1.0:
            raise InputError(f"RPN NMS threshold must be in (0, 1], got {self.nms}")
        if self.min_box_size < 0:
            raise InputError(f"RPN min box size must be >= 0, got {self.min_box_size}")


RPN_PRESETS = ("zero-shot", "pretraining", "transfer")


def rpn_settings(preset: str = "transfer", kind: str = "lvis_866_fpn") -> RPNSettings:
    """Settings the official code uses for ``preset`` with an RPN of ``kind`` (``clip_rcnn.py: CLIPFastRCNN.from_config``,
    ``MODEL.CLIP.OFFLINE_RPN_NMS_THRESH`` / ``PRETRAIN_RPN_REGIONS`` and the RPN configs).

    - ``transfer``: the RPN config's own values: NMS 0.7, 1000 post; pre-NMS 1000 per level for
      FPN, 6000 for C4 (``Base-RCNN-C4``).
    - ``zero-shot``: NMS 0.9, 1000 post (``OFFLINE_RPN_NMS_THRESH``).
    - ``pretraining``: NMS 0.5, 300 post (``PRETRAIN_RPN_REGIONS``).
    """
    _check_kind(kind)
    base = RPNSettings(pre_nms_topk=6000 if kind == "coco_c4" else 1000, post_nms_topk=1000,
                       nms=0.7)
    if preset == "transfer":
        return base
    if preset == "zero-shot":
        return replace(base, nms=0.9)
    if preset == "pretraining":
        return replace(base, nms=0.5, post_nms_topk=300)
    raise InputError(f"unknown RPN settings preset {preset!r}",
                     hint=f"choose one of: {', '.join(RPN_PRESETS)}")


@dataclass(kw_only=True)
class OfflineRPNConfig:
    """The fine-tuning recipe section ``detector.offline_rpn``: how a detector uses a frozen
    offline RPN. The official transfer (``clip_rcnn.py: CLIPFastRCNN.from_config``, the RPN
    configs' ``*_TEST`` values, in training and test since the RPN stays in eval mode): NMS 0.7,
    1000 proposals; ``pre_nms_topk`` None = the RPN config's own (6000 for C4, 1000 per level for
    FPN). ``kind``: the RPN the recipe expects (``coco_c4``, ``lvis_866_lsj_fpn``; None = any)."""

    kind: str | None = None
    pre_nms_topk: int | None = None
    post_nms_topk: int = 1000
    nms: float = 0.7

    def __post_init__(self) -> None:
        if self.pre_nms_topk is not None and self.pre_nms_topk < 1:
            raise ValueError(f"pre_nms_topk must be >= 1 (or null), got {self.pre_nms_topk}")
        if self.post_nms_topk < 1:
            raise ValueError(f"post_nms_topk must be >= 1, got {self.post_nms_topk}")
        if not 0.0 < self.nms <= 1.0:
            raise ValueError(f"nms must be in (0, 1], got {self.nms}")

    def settings_for(self, kind: str) -> RPNSettings:
        """The :class:`RPNSettings` of an RPN of ``kind`` used this way."""
        base = rpn_settings("transfer", kind)
        return RPNSettings(pre_nms_topk=self.pre_nms_topk or base.pre_nms_topk, post_nms_topk=self.post_nms_topk,
                           nms=self.nms, min_box_size=base.min_box_size)


def _check_kind(kind: str) -> None:
    if kind not in RPN_KINDS:
        raise InputError(f"unknown offline RPN kind {kind!r}",
                         hint=f"choose one of: {', '.join(RPN_KINDS)}")


class RPNProposals(NamedTuple):
    """Proposals of one image, sorted by decreasing objectness."""

    boxes: Tensor  # [N, 4] float32 XYXY in resized-image pixels, inside the unpadded image
    objectness_logits: Tensor  # [N] RAW logits (no sigmoid; fused raw by CLIPFastRCNN.inference)


# --------------------------------------------------------------------------------------------
# Detectron2 building blocks (names match Detectron2 so state_dict keys match the files)
# --------------------------------------------------------------------------------------------


def _make_norm(norm: str, channels: int) -> nn.Module | None:
    if norm == "":
        return None
    if norm == "FrozenBN":
        return FrozenBatchNorm2d(channels, eps=1e-5)
    if norm == "BN":
        # SyncBN in eval form: same arithmetic as BatchNorm2d.eval(), and the same keys
        # (including num_batches_tracked) as the released LSJ file.
        return nn.BatchNorm2d(channels, eps=1e-5)
    raise ValueError(f"unknown norm {norm!r}")


class NormConv2d(nn.Conv2d):
    """Detectron2's ``layers.Conv2d``: conv, then optional ``norm`` submodule, then optional
    activation. The norm being a child named ``norm`` gives keys ``<conv>.norm.weight``."""

    fast = True  # gradient-free calls fold the norm into the weights (OfflineRPN.plain() turns it off)

    def __init__(self, *args: Any, norm: nn.Module | None = None, relu: bool = False,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        if self.fast and not torch.is_grad_enabled() and self.groups == 1 and self.dilation == (1, 1) \
                and self.stride[0] == self.stride[1] and self.padding[0] == self.padding[1] \
                and (self.norm is None or foldable_norm(self.norm)):
            # Inference: the norm folded into the weights (cached), channels_last, oneDNN.
            w, b = self._folded(x.dtype)
            x = fast_conv2d(x.contiguous(memory_format=torch.channels_last), w, b,
                            self.stride[0], self.padding[0])
            return x.relu_() if self.relu else x
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.relu:
            x = F.relu(x)
        return x

    def _folded(self, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        tensors = [self.weight] + ([self.bias] if self.bias is not None else [])
        if self.norm is not None:
            tensors += list(self.norm.parameters()) + list(self.norm.buffers())
        key = (tensor_versions(tensors), dtype)
        cached = self.__dict__.get("_folded_cache")
        if cached is None or cached[0] != key:
            with torch.inference_mode(False), torch.no_grad():
                cached = (key, fold_conv_bn(self, self.norm, dtype))
            self.__dict__["_folded_cache"] = cached
        return cached[1]


def _c2_msra_fill(conv: nn.Conv2d) -> None:
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


def _c2_xavier_fill(conv: nn.Conv2d) -> None:
    nn.init.kaiming_uniform_(conv.weight, a=1)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)


class BasicStem(nn.Module):
    """7x7/2 conv + norm + ReLU, then 3x3/2 max pool: [B,3,H,W] -> [B,64,H/4,W/4]."""

    def __init__(self, norm: str):
        super().__init__()
        self.conv1 = NormConv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False,
                                norm=_make_norm(norm, 64))
        _c2_msra_fill(self.conv1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class BottleneckBlock(nn.Module):
    """Detectron2 bottleneck with ``STRIDE_IN_1X1=True``: the stride sits in ``conv1`` (1x1),
    not in the 3x3 conv as in torchvision's ResNet (``detectron2/modeling/backbone/resnet.py:
    BottleneckBlock``, ``STRIDE_IN_1X1``)."""

    def __init__(self, in_channels: int, out_channels: int, bottleneck_channels: int,
                 stride: int, norm: str):
        super().__init__()
        if in_channels != out_channels:
            self.shortcut = NormConv2d(in_channels, out_channels, kernel_size=1, stride=stride,
                                       bias=False, norm=_make_norm(norm, out_channels))
        else:
            self.shortcut = None
        self.conv1 = NormConv2d(in_channels, bottleneck_channels, kernel_size=1, stride=stride,
                                bias=False, norm=_make_norm(norm, bottleneck_channels))
        self.conv2 = NormConv2d(bottleneck_channels, bottleneck_channels, kernel_size=3,
                                stride=1, padding=1, bias=False,
                                norm=_make_norm(norm, bottleneck_channels))
        self.conv3 = NormConv2d(bottleneck_channels, out_channels, kernel_size=1, bias=False,
                                norm=_make_norm(norm, out_channels))
        for conv in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if conv is not None:
                _c2_msra_fill(conv)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = x if self.shortcut is None else self.shortcut(x)
        return F.relu(out + shortcut)


# (name, number of blocks, bottleneck channels, out channels, first stride) for R-50
_R50_STAGES = (("res2", 3, 64, 256, 1), ("res3", 4, 128, 512, 2),
               ("res4", 6, 256, 1024, 2), ("res5", 3, 512, 2048, 2))
_STAGE_STRIDES = {"res2": 4, "res3": 8, "res4": 16, "res5": 32}


class ResNet(nn.Module):
    """Detectron2 ResNet-50 up to the last stage in ``out_features``.

    forward: [B,3,H,W] -> {name: feature} for the names in ``out_features``
    (res2 [B,256,H/4,W/4] ... res5 [B,2048,H/32,W/32]).
    """

    def __init__(self, norm: str, out_features: Sequence[str]):
        super().__init__()
        self.out_features = tuple(out_features)
        self.stem = BasicStem(norm)
        last = max(int(name[3:]) for name in self.out_features)
        self.stage_names: list[str] = []
        in_channels = 64
        for name, blocks, bottleneck, out_channels, stride in _R50_STAGES:
            if int(name[3:]) > last:
                break
            layers = []
            for i in range(blocks):
                layers.append(BottleneckBlock(in_channels, out_channels, bottleneck,
                                              stride if i == 0 else 1, norm))
                in_channels = out_channels
            self.add_module(name, nn.Sequential(*layers))
            self.stage_names.append(name)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        x = self.stem(x)
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                outputs[name] = x
        return outputs


class FPN(nn.Module):
    """Detectron2 FPN on res2-res5 with 256 channels, sum fusion, nearest x2 upsampling and
    P6 = max_pool(k=1, s=2)(P5).

    forward: [B,3,H,W] (H, W multiples of 32) -> [P2, P3, P4, P5, P6], strides 4..64.
    """

    size_divisibility = 32

    def __init__(self, bottom_up: ResNet, norm: str, out_channels: int = 256):
        super().__init__()
        in_channels = {"res2": 256, "res3": 512, "res4": 1024, "res5": 2048}
        use_bias = norm == ""
        for stage in range(2, 6):
            lateral = NormConv2d(in_channels[f"res{stage}"], out_channels, kernel_size=1,
                                 bias=use_bias, norm=_make_norm(norm, out_channels))
            output = NormConv2d(out_channels, out_channels, kernel_size=3, padding=1,
                                bias=use_bias, norm=_make_norm(norm, out_channels))
            _c2_xavier_fill(lateral)
            _c2_xavier_fill(output)
            self.add_module(f"fpn_lateral{stage}", lateral)
            self.add_module(f"fpn_output{stage}", output)
        self.bottom_up = bottom_up

    def forward(self, x: Tensor) -> list[Tensor]:
        features = self.bottom_up(x)
        prev = self.fpn_lateral5(features["res5"])
        results = [self.fpn_output5(prev)]
        for stage in (4, 3, 2):
            top_down = F.interpolate(prev, scale_factor=2.0, mode="nearest")
            prev = getattr(self, f"fpn_lateral{stage}")(features[f"res{stage}"]) + top_down
            results.insert(0, getattr(self, f"fpn_output{stage}")(prev))
        results.append(F.max_pool2d(results[-1], kernel_size=1, stride=2, padding=0))
        return results


class StandardRPNHead(nn.Module):
    """Shared RPN head: 3x3 conv(s) + ReLU, then 1x1 objectness (A) and 1x1 deltas (4A).

    forward: list of [B,C,Hi,Wi] -> (list of [B,A,Hi,Wi], list of [B,4A,Hi,Wi]).
    """

    def __init__(self, in_channels: int, num_anchors: int, num_convs: int = 1):
        super().__init__()
        if num_convs == 1:
            self.conv: nn.Module = NormConv2d(in_channels, in_channels, kernel_size=3, padding=1,
                                              relu=True)
        else:
            self.conv = nn.Sequential()
            for k in range(num_convs):
                self.conv.add_module(f"conv{k}", NormConv2d(in_channels, in_channels,
                                                            kernel_size=3, padding=1, relu=True))
        self.objectness_logits = nn.Conv2d(in_channels, num_anchors, kernel_size=1)
        self.anchor_deltas = nn.Conv2d(in_channels, num_anchors * 4, kernel_size=1)
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, features: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        logits, deltas = [], []
        for x in features:
            t = self.conv(x)
            logits.append(self.objectness_logits(t))
            deltas.append(self.anchor_deltas(t))
        return logits, deltas


# --------------------------------------------------------------------------------------------
# Anchors and box decoding
# --------------------------------------------------------------------------------------------


def cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
    """Detectron2 ``DefaultAnchorGenerator.generate_cell_anchors``: anchors centred on (0, 0)
    with w = sqrt(s^2 / a), h = a * w; size loop outer, ratio loop inner; not rounded.

    Returns [len(sizes) * len(aspect_ratios), 4] float32 XYXY.
    """
    anchors = []
    for size in sizes:
        area = float(size) ** 2.0
        for ratio in aspect_ratios:
            w = math.sqrt(area / ratio)
            h = ratio * w
            anchors.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(anchors, dtype=torch.float32)


class AnchorGenerator(nn.Module):
    """Detectron2 ``DefaultAnchorGenerator`` with offset 0.0.

    forward: list of [B,C,Hi,Wi] feature maps -> list of [Hi*Wi*A, 4] anchors per level,
    location-major (row-major over (y, x)), then anchor index.
    """

    def __init__(self, sizes_per_level: Sequence[Sequence[float]], strides: Sequence[int],
                 aspect_ratios: Sequence[float] = ANCHOR_RATIOS, offset: float = 0.0):
        super().__init__()
        if len(sizes_per_level) != len(strides):
            raise ValueError("one size list per stride expected")
        self.strides = tuple(int(s) for s in strides)
        self.offset = float(offset)
        self.num_levels = len(self.strides)
        for i, sizes in enumerate(sizes_per_level):
            # non-persistent: Detectron2 files do not store them, and they follow .to(device)
            self.register_buffer(f"cell_anchors_{i}", cell_anchors(sizes, aspect_ratios),
                                 persistent=False)
        self.num_anchors = len(sizes_per_level[0]) * len(aspect_ratios)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any) -> None:
        # Files written by early Detectron2 versions stored the cell anchors as persistent
        # buffers (``anchor_generator.cell_anchors.0``). They are fixed by the config and
        # rebuilt here, so such keys are dropped instead of being reported as unexpected.
        for key in [k for k in state_dict if k.startswith(prefix + "cell_anchors.")]:
            del state_dict[key]
        super()._load_from_state_dict(state_dict, prefix, *args)

    def grid_anchors(self, level: int, height: int, width: int) -> Tensor:
        """Anchors of one level on a [height, width] grid: [height*width*A, 4]."""
        base = getattr(self, f"cell_anchors_{level}")
        stride = self.strides[level]
        shifts_x = torch.arange(self.offset * stride, width * stride, step=stride,
                                dtype=torch.float32, device=base.device)
        shifts_y = torch.arange(self.offset * stride, height * stride, step=stride,
                                dtype=torch.float32, device=base.device)
        shift_y, shift_x = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        shift_x, shift_y = shift_x.reshape(-1), shift_y.reshape(-1)
        shifts = torch.stack((shift_x, shift_y, shift_x, shift_y), dim=1)
        return (shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4)

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        return [self.grid_anchors(i, f.shape[-2], f.shape[-1]) for i, f in enumerate(features)]


_BOX_CODER = BoxCoder(weights=RPN_BOX_WEIGHTS, bbox_xform_clip=SCALE_CLAMP)


def decode_boxes(deltas: Tensor, anchors: Tensor) -> Tensor:
    """Detectron2 ``Box2BoxTransform.apply_deltas`` with weights (1, 1, 1, 1) and dw/dh clamped
    at log(1000/16); torchvision's ``BoxCoder.decode_single`` does the same arithmetic.

    deltas [N, 4] (dx, dy, dw, dh), anchors [N, 4] XYXY -> boxes [N, 4] XYXY float32.
    """
    return _BOX_CODER.decode_single(deltas.float(), anchors)


# --------------------------------------------------------------------------------------------
# Proposal selection
# --------------------------------------------------------------------------------------------


def _nonempty(boxes: Tensor, threshold: float) -> Tensor:
    # Detectron2 Boxes.nonempty: strictly larger than the threshold (torchvision's
    # remove_small_boxes uses >=, which would keep zero-size boxes at threshold 0).
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    return (widths > threshold) & (heights > threshold)


def find_top_rpn_proposals(
    proposals: Sequence[Tensor],
    pred_objectness_logits: Sequence[Tensor],
    image_sizes: Sequence[tuple[int, int]],
    nms: float,
    pre_nms_topk: int,
    post_nms_topk: int,
    min_box_size: float = 0.0,
) -> list[RPNProposals]:
    """Detectron2 ``find_top_rpn_proposals`` in eval mode
    (``detectron2/modeling/proposal_generator/proposal_utils.py``).

    Args:
        proposals: per level, [B, Hi*Wi*A, 4] decoded boxes.
        pred_objectness_logits: per level, [B, Hi*Wi*A] raw logits.
        image_sizes: per image, the unpadded (height, width) to clip to.

    Per image: top ``pre_nms_topk`` per level by logit, concatenated; non-finite boxes/logits
    dropped; boxes clipped; boxes with a side <= ``min_box_size`` dropped; NMS separately per
    level (level index as the batched_nms group); the first ``post_nms_topk`` by logit kept.
    """
    num_images = len(image_sizes)
    device = proposals[0].device
    batch_idx = torch.arange(num_images, device=device)
    topk_scores, topk_proposals, level_ids = [], [], []
    for level, (proposals_i, logits_i) in enumerate(zip(proposals, pred_objectness_logits)):
        k = min(logits_i.shape[1], pre_nms_topk)
        scores_i, idx = logits_i.topk(k, dim=1)
        topk_scores.append(scores_i)
        topk_proposals.append(proposals_i[batch_idx[:, None], idx])  # [B, k, 4]
        level_ids.append(torch.full((k,), level, dtype=torch.int64, device=device))
    scores_all = torch.cat(topk_scores, dim=1)
    boxes_all = torch.cat(topk_proposals, dim=1)
    levels_all = torch.cat(level_ids, dim=0)

    results = []
    for n, (height, width) in enumerate(image_sizes):
        boxes, scores, levels = boxes_all[n], scores_all[n], levels_all
        valid = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        if not bool(valid.all()):
            boxes, scores, levels = boxes[valid], scores[valid], levels[valid]
        boxes = clip_boxes_to_image(boxes, (int(height), int(width)))
        keep = _nonempty(boxes, min_box_size)
        if not bool(keep.all()):
            boxes, scores, levels = boxes[keep], scores[keep], levels[keep]
        keep = batched_nms(boxes, scores, levels, nms)[:post_nms_topk]
        results.append(RPNProposals(boxes[keep], scores[keep]))
    return results


class RPN(nn.Module):
    """Detectron2 ``RPN`` (inference path): head + anchors + decoding + selection.

    forward: features (list of [B,C,Hi,Wi]), image_sizes [(h, w)] -> list[RPNProposals].
    """

    def __init__(self, in_channels: int, sizes_per_level: Sequence[Sequence[float]],
                 strides: Sequence[int], num_convs: int = 1):
        super().__init__()
        self.anchor_generator = AnchorGenerator(sizes_per_level, strides)
        self.rpn_head = StandardRPNHead(in_channels, self.anchor_generator.num_anchors,
                                        num_convs=num_convs)

    def forward(self, features: list[Tensor], image_sizes: Sequence[tuple[int, int]],
                settings: RPNSettings) -> list[RPNProposals]:
        anchors = self.anchor_generator(features)
        logits, deltas = self.rpn_head(features)
        # [B, A, Hi, Wi] -> [B, Hi*Wi*A], matching the location-major anchor order
        logits = [x.permute(0, 2, 3, 1).flatten(1) for x in logits]
        proposals = []
        for anchors_i, deltas_i in zip(anchors, deltas):
            b, _, h, w = deltas_i.shape
            # [B, A*4, Hi, Wi] -> [B, Hi*Wi*A, 4]
            deltas_i = deltas_i.view(b, -1, 4, h, w).permute(0, 3, 4, 1, 2).reshape(-1, 4)
            anchors_b = anchors_i.unsqueeze(0).expand(b, -1, -1).reshape(-1, 4)
            proposals.append(decode_boxes(deltas_i, anchors_b).view(b, -1, 4))
        return find_top_rpn_proposals(proposals, logits, image_sizes, settings.nms,
                                      settings.pre_nms_topk, settings.post_nms_topk,
                                      settings.min_box_size)


# --------------------------------------------------------------------------------------------
# The offline RPN
# --------------------------------------------------------------------------------------------


class OfflineRPN(nn.Module):
    """A frozen Detectron2 backbone + RPN, always in eval mode and run under ``no_grad``.

    ``state_dict()`` keys are those of the standalone ``rpn_*.pth`` files (prefixes
    ``backbone.`` and ``proposal_generator.``). Non-persistent buffers (pixel mean/std, cell
    anchors) are not in it.

    forward(images): list of RESIZED images, each [3, H, W] float RGB in 0-255 (the same resized
    image the CLIP branch sees) -> list of :class:`RPNProposals` in those images' pixels.
    """

    def __init__(self, kind: str, settings: RPNSettings | None = None):
        super().__init__()
        _check_kind(kind)
        self.kind = kind
        self.settings = settings if settings is not None else rpn_settings("transfer", kind)
        if kind == "coco_c4":
            self.backbone: nn.Module = ResNet("FrozenBN", out_features=("res4",))
            self.proposal_generator = RPN(1024, [ANCHOR_SIZES], [16], num_convs=1)
            # A plain Detectron2 ResNet backbone has size_divisibility 0: pad to the batch max.
            self.size_divisibility = 0
        else:
            lsj = kind == "lvis_866_lsj_fpn"
            norm = "BN" if lsj else "FrozenBN"
            bottom_up = ResNet(norm, out_features=("res2", "res3", "res4", "res5"))
            self.backbone = FPN(bottom_up, norm="BN" if lsj else "")
            self.proposal_generator = RPN(256, [[s] for s in ANCHOR_SIZES], [4, 8, 16, 32, 64],
                                          num_convs=2 if lsj else 1)
            self.size_divisibility = FPN.size_divisibility
        self.register_buffer("pixel_mean", torch.tensor(RPN_PIXEL_MEAN_BGR).view(3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(RPN_PIXEL_STD_BGR).view(3, 1, 1),
                             persistent=False)
        self.requires_grad_(False)
        super().train(False)

    @contextmanager
    def plain(self) -> Iterator["OfflineRPN"]:
        """Inside the block, convolutions run unfolded (conv, then norm), as in training code;
        outside, inference folds each norm into its convolution and uses channels_last, which
        gives the same proposals up to float rounding, faster."""
        convs = [m for m in self.modules() if isinstance(m, NormConv2d)]
        before = [m.fast for m in convs]
        for m in convs:
            m.fast = False
        try:
            yield self
        finally:
            for m, flag in zip(convs, before):
                m.fast = flag

    def train(self, mode: bool = True) -> "OfflineRPN":
        # The official code keeps the offline RPN frozen and in eval mode even while the detector
        # trains (clip_rcnn.py: CLIPFastRCNN); the LSJ variant's BatchNorm must never update its
        # statistics.
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def preprocess(self, images: Sequence[Tensor]) -> tuple[Tensor, list[tuple[int, int]]]:
        """RPN-branch preprocessing (``clip_rcnn.py: CLIPFastRCNN.offline_preprocess_image``): RGB -> BGR, subtract the BGR mean, divide by
        std 1, then pad bottom/right with 0 (after normalisation) to a common size rounded up
        to ``size_divisibility``.

        images: list of [3, H_i, W_i] RGB 0-255 -> ([B, 3, H_pad, W_pad] float32,
        [(H_i, W_i)]).
        """
        if len(images) == 0:
            raise InputError("no images given to the offline RPN")
        normalised, sizes = [], []
        for i, image in enumerate(images):
            if image.dim() != 3 or image.shape[0] != 3:
                raise InputError(f"image {i} must be a [3, H, W] RGB tensor, got shape "
                                 f"{list(image.shape)}")
            x = image.to(device=self.device, dtype=torch.float32)[[2, 1, 0]]
            normalised.append((x - self.pixel_mean) / self.pixel_std)
            sizes.append((int(image.shape[1]), int(image.shape[2])))
        max_h = max(h for h, _ in sizes)
        max_w = max(w for _, w in sizes)
        if self.size_divisibility > 1:
            d = self.size_divisibility
            max_h = (max_h + d - 1) // d * d
            max_w = (max_w + d - 1) // d * d
        batch = normalised[0].new_zeros((len(images), 3, max_h, max_w))
        for x, out in zip(normalised, batch):
            out[:, : x.shape[1], : x.shape[2]].copy_(x)
        return batch, sizes

    @torch.no_grad()
    def forward(self, images: Sequence[Tensor]) -> list[RPNProposals]:
        if self.training:  # e.g. a caller bypassed train() with direct attribute edits
            super().train(False)
        batch, sizes = self.preprocess(images)
        features = self.backbone(batch)
        if isinstance(features, dict):  # C4: the ResNet returns {"res4": ...}
            features = [features["res4"]]
        return self.proposal_generator(features, sizes, self.settings)

    @staticmethod
    def detect_kind(state_dict_keys: Iterable[str]) -> str:
        """Which RPN variant a checkpoint holds, from its key names.

        Accepts standalone ``rpn_*.pth`` keys (``backbone.*`` / ``proposal_generator.*``) or
        the ``offline_backbone.*`` / ``offline_proposal_generator.*`` keys inside RegionCLIP
        files (a leading ``module.`` is ignored). Raises WeightsError when no supported RPN is
        found.
        """
        keys = [k[len("module."):] if k.startswith("module.") else k for k in state_dict_keys]
        if any(k.startswith("offline_backbone.") for k in keys):
            backbone_prefix, rpn_prefix = "offline_backbone.", "offline_proposal_generator."
        else:
            backbone_prefix, rpn_prefix = "backbone.", "proposal_generator."
        backbone = {k[len(backbone_prefix):] for k in keys if k.startswith(backbone_prefix)}
        rpn = {k[len(rpn_prefix):] for k in keys if k.startswith(rpn_prefix)}
        if "rpn_head.objectness_logits.weight" not in rpn:
            raise WeightsError("no offline RPN in this checkpoint "
                               f"(no {rpn_prefix}rpn_head.objectness_logits.weight)",
                               hint="give an rpn_*.pth file or a RegionCLIP checkpoint "
                                    "that contains offline_* RPN weights")
        if "bottom_up.stem.conv1.weight" in backbone:
            return "lvis_866_lsj_fpn" if "rpn_head.conv.conv0.weight" in rpn else "lvis_866_fpn"
        if any(k.startswith("bottom_up.") for k in backbone):
            raise WeightsError("this RPN uses a CLIP-ResNet FPN backbone "
                               "(rpn_lvis_1203_clipbackbone), which is not supported",
                               hint="use rpn_lvis_866.pth, rpn_lvis_866_lsj.pth or "
                                    "rpn_coco_*.pth")
        if "stem.conv1.weight" in backbone and any(k.startswith("res4.") for k in backbone):
            return "coco_c4"
        raise WeightsError("unrecognised offline RPN layout "
                           f"(no {backbone_prefix}bottom_up.* or {backbone_prefix}stem.* keys)")


def build_offline_rpn(kind: str, settings: RPNSettings | str | None = None) -> OfflineRPN:
    """Build an offline RPN of ``kind`` (one of :data:`RPN_KINDS`) with random weights, in eval
    mode and frozen. ``settings`` is an :class:`RPNSettings`, a preset name ("zero-shot",
    "pretraining", "transfer"), or None for the RPN config's own values ("transfer")."""
    _check_kind(kind)
    if isinstance(settings, str):
        settings = rpn_settings(settings, kind)
    return OfflineRPN(kind, settings)
