"""Region embeddings: image -> res4 feature map; boxes -> RoIAlign -> res5 + attention pool.

Every region feature of rclip is pooled here (its exact rewrites live in
:mod:`rclip_core.models.ops`). It reproduces the official
``detectron2/modeling/roi_heads/clip_roi_heads.py: CLIPRes5ROIHeads`` path (with
``clip_rcnn.py: CLIPFastRCNN.preprocess_image`` and ``detectron2/modeling/poolers.py: ROIPooler``,
``ROIAlignV2``):

1. CLIP normalisation of the resized RGB image (``(x/255 - mean)/std``), padding bottom/right
   with zeros to the largest image of the batch (``size_divisibility`` 0);
2. trunk ``stem .. layer3`` -> ``res4`` [B, 16w, H/16, W/16] (floored sizes, scale still 1/16);
3. ``torchvision.ops.roi_align(res4, rois, P, 1/16, sampling_ratio=0, aligned=True)`` with boxes
   in resized-image pixels -> [R, 16w, P, P];
4. ``layer4`` -> [R, 32w, P/2, P/2] and attention pooling -> [R, D] region embeddings.

Attention pooling returns only the output of token 0 (the mean token).
:func:`rclip_core.models.ops.attnpool_token0` computes exactly that and nothing else: a single
query, and keys/values folded into the query and the attention-weighted average of the inputs. It is the same mathematics as the full
multi-head attention over all 50 (82) tokens followed by ``[0]``, with ~1/30 of the work;
``fast_attnpool=False`` runs open_clip's module as is (used by the tests to prove equality).

Inference (gradients disabled: ``torch.no_grad`` / ``torch.inference_mode``) takes the fast path
of :mod:`rclip_core.models.fast`: frozen BN folded into the convolutions, channels_last,
res5's first convolutions moved before RoIAlign where that is less work, and RoIAlign as two
small matrix products - the same mathematics, float rounding apart. With gradients enabled
(training), and with ``fast=False`` or inside ``with encoder.plain():``, every call runs the
plain modules above, except that (unless ``fast=False``) RoIAlign of a map that needs
gradients on CPU backpropagates through its separable matrix form
(:func:`rclip_core.models.ops.roi_align_matmul`: the same forward, a faster backward).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import roi_align

from rclip_core.models.fast import FastResNet
from rclip_core.models.ops import attnpool_token0, roi_align_matmul

CLIP_PIXEL_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_PIXEL_STD = (0.26862954, 0.26130258, 0.27577711)


class RegionEncoder(nn.Module):
    """The CLIP ResNet visual tower split for region recognition.

    Shares its parameters with ``visual`` (an open_clip ``ModifiedResNet`` with frozen BN).
    ``fast`` (default True) lets gradient-free calls use :mod:`rclip_core.models.fast`;
    ``fast=False`` (or ``with encoder.plain():``) always runs the plain modules.
    """

    def __init__(self, visual: nn.Module, pooler_resolution: int | None = None, fast_attnpool: bool = True,
                 fast: bool = True):
        super().__init__()
        self.visual = visual
        grid = int(visual.attnpool.positional_embedding.shape[0] - 1) ** 0.5
        self.pooler_resolution = int(pooler_resolution or 2 * round(grid))
        self.fast_attnpool = fast_attnpool
        self.fast = fast
        self._fast_impl = None  # rclip_core.models.fast.FastResNet, built on first use
        self.register_buffer("pixel_mean", torch.tensor(CLIP_PIXEL_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_PIXEL_STD).view(3, 1, 1), persistent=False)

    # -- fast path switch ------------------------------------------------------------------------
    def uses_fast_path(self) -> bool:
        """True when the next call runs the fast path: ``fast`` set, gradients disabled, and a
        visual tower the fast path supports (ModifiedResNet with frozen / eval-mode BN)."""
        if not self.fast or torch.is_grad_enabled():
            return False
        return FastResNet.supported(self.visual)

    def _fast(self) -> FastResNet:
        if self._fast_impl is None or self._fast_impl.visual is not self.visual:
            self._fast_impl = FastResNet(self.visual, token0=self.fast_attnpool)
        self._fast_impl.token0 = self.fast_attnpool
        return self._fast_impl

    @contextmanager
    def plain(self) -> Iterator["RegionEncoder"]:
        """Run the plain modules inside the block (reference for tests and benchmarks)."""
        old = self.fast
        self.fast = False
        try:
            yield self
        finally:
            self.fast = old

    @property
    def spatial_scale(self) -> float:
        return 1.0 / 16.0

    @property
    def embed_dim(self) -> int:
        return int(self.visual.attnpool.c_proj.out_features)

    # -- stage 1: pixels -> normalised, padded batch ------------------------------------------
    def normalize(self, image: Tensor) -> Tensor:
        """[3, H, W] RGB in 0..255 (uint8 or float) -> CLIP-normalised float32 [3, H, W]."""
        return ((image / 255.0) - self.pixel_mean) / self.pixel_std

    def batch_images(self, images: Sequence[Tensor]) -> Tensor:
        """Normalise and pad (bottom/right, zeros after normalisation) to the largest image."""
        normed = [self.normalize(img.to(self.pixel_mean.device)) for img in images]
        if len(normed) == 1:
            return normed[0].unsqueeze(0)
        H = max(t.shape[-2] for t in normed)
        W = max(t.shape[-1] for t in normed)
        batch = normed[0].new_zeros((len(normed), 3, H, W))
        for i, t in enumerate(normed):
            batch[i, :, : t.shape[-2], : t.shape[-1]].copy_(t)
        return batch

    # -- stage 2: trunk -----------------------------------------------------------------------
    def trunk(self, x: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> res4 [B, 16w, floor(H/16), floor(W/16)]
        (channels_last memory, and the autocast dtype, on the fast path)."""
        if self.uses_fast_path():
            return self._fast().trunk(x)
        v = self.visual
        x = x.to(v.conv1.weight.dtype)
        x = v.stem(x)
        x = v.layer1(x)
        x = v.layer2(x)
        return v.layer3(x)

    # -- stage 3: RoIAlign --------------------------------------------------------------------
    def roi_pool(self, res4: Tensor, boxes: Sequence[Tensor]) -> Tensor:
        """RoIAlign (aligned=True, sampling_ratio 0, scale 1/16) of XYXY boxes given in
        resized-image pixels, one [N_i, 4] tensor per image -> [sum N_i, 16w, P, P]."""
        return self._roi_align(res4, boxes_to_rois(boxes, res4))

    def _roi_align(self, res4: Tensor, rois: Tensor) -> Tensor:
        """torchvision's RoIAlign; when training on CPU (and ``fast``) its separable matrix form,
        whose backward is matrix products instead of torchvision's single-threaded scatter."""
        P = self.pooler_resolution
        if self.fast and torch.is_grad_enabled() and res4.requires_grad and res4.device.type == "cpu":
            return roi_align_matmul(res4, rois, P, self.spatial_scale)
        return roi_align(res4, rois, output_size=(P, P), spatial_scale=self.spatial_scale,
                         sampling_ratio=0, aligned=True)

    # -- stage 4: region head -----------------------------------------------------------------
    def res5(self, pooled: Tensor) -> Tensor:
        """RoIAlign output [R, 16w, P, P] -> [R, 32w, P/2, P/2]."""
        if self.uses_fast_path():
            return self._fast().res5_from_pooled(pooled)
        return self.visual.layer4(pooled)

    def attnpool(self, res5: Tensor) -> Tensor:
        if self.fast_attnpool:
            return attnpool_token0(self.visual.attnpool, res5)
        return self.visual.attnpool(res5)

    def head(self, pooled: Tensor, chunk_size: int | None = None) -> Tensor:
        """Pooled res4 features [R, 16w, P, P] -> region embeddings [R, D] (unnormalised).

        ``chunk_size`` bounds peak memory by running at most that many regions at once.
        """
        if self.uses_fast_path():
            return self._fast().head_from_pooled(pooled, chunk_size)
        if chunk_size is None or pooled.shape[0] <= chunk_size:
            return self.attnpool(self.res5(pooled))
        outs = [self.attnpool(self.res5(c)) for c in pooled.split(chunk_size)]
        return torch.cat(outs)

    def forward_features(self, res4: Tensor, boxes: Sequence[Tensor], chunk_size: int | None = None) -> Tensor:
        """res4 + boxes per image -> region embeddings [sum N_i, D] in input order."""
        if sum(int(b.shape[0]) for b in boxes) == 0:
            return res4.new_zeros((0, self.embed_dim))
        if self.uses_fast_path():
            rois = boxes_to_rois(boxes, torch.empty(0, device=res4.device))  # float32 [R, 5]
            return self._fast().regions(res4, rois, self.pooler_resolution, self.spatial_scale, chunk_size)
        if chunk_size is None:
            return self.head(self.roi_pool(res4, boxes))
        # RoIAlign per chunk too, so pooled features of all regions never coexist in memory.
        rois = boxes_to_rois(boxes, res4)
        outs = [self.head(self._roi_align(res4, r)) for r in rois.split(chunk_size)]
        return torch.cat(outs)

    def forward(self, images: Sequence[Tensor], boxes: Sequence[Tensor], chunk_size: int | None = None
                ) -> list[Tensor]:
        """Resized RGB images (0..255, [3, H_i, W_i]) and boxes in their pixels ([N_i, 4] XYXY)
        -> list of region embeddings [N_i, D]."""
        res4 = self.trunk(self.batch_images(images))
        feats = self.forward_features(res4, [b.to(res4.device, torch.float32) for b in boxes], chunk_size)
        return list(feats.split([int(b.shape[0]) for b in boxes]))


def boxes_to_rois(boxes: Sequence[Tensor], like: Tensor) -> Tensor:
    """List of [N_i, 4] boxes -> [sum N_i, 5] rows ``(batch_idx, x1, y1, x2, y2)``
    (Detectron2's ``convert_boxes_to_pooler_format``)."""
    rois = []
    for i, b in enumerate(boxes):
        b = b.to(device=like.device, dtype=like.dtype)
        rois.append(torch.cat([b.new_full((b.shape[0], 1), float(i)), b], dim=1))
    return torch.cat(rois, dim=0) if rois else like.new_zeros((0, 5))
