"""Inference-only fast path of the CLIP ResNet region encoder: the same mathematics, less work.

:class:`RegionEncoder` uses this module when gradients are disabled (``torch.no_grad`` /
``torch.inference_mode``); with gradients it always runs open_clip's modules unchanged, so
training and autograd see the plain computation. Every rewrite here is exact algebra; results
differ from the plain modules by float rounding only (``tests/test_speed_parity.py`` checks each
one against the plain computation). The rewrites:

1. **Frozen BN folded into the convolutions** (but see "Not rewritten" below):
   ``bn(conv(x, W)) = conv(x, W * s) + (b - m * s)`` with ``s = w / sqrt(v + eps)``. Removes two
   full passes over every activation. The folded weights are cached and rebuilt whenever a
   parameter or BN buffer changes (its version counter, storage, device or the compute dtype).
2. **channels_last** activations and weights: oneDNN's native layout (no reorders around each
   convolution; fast average pooling), and on CPU the convolutions call oneDNN directly
   (``torch.mkldnn_convolution``), which PyTorch otherwise bypasses for 1x1 convolutions of a
   single image when it runs on one thread.
3. **The first 1x1 convolution of res5 commutes with RoIAlign.** Both are linear maps, and
   RoIAlign's out-of-range samples are zeros, which a bias-free linear map keeps at zero, so
   ``conv1(RoIAlign(res4)) = RoIAlign(conv1(res4))``: conv1 runs once on the whole res4 map
   (``H*W`` positions) instead of on ``P*P`` positions per box, and RoIAlign then pools 512
   instead of 1024 channels. The folded BN bias is added after pooling, as in the plain order.
   Likewise the shortcut branch of that block, ``conv_d(avgpool_2(RoIAlign_P(res4)))``, equals
   ``RoIAlign'_{P/2}(conv_d(res4))`` where ``RoIAlign'`` averages the 2x2 bins - one linear map.
   Each is used only where it is less work (:meth:`FastResNet.plan`: many boxes).
4. **RoIAlign as two small matrix products** (CPU): the separable RoIAlign of
   :mod:`rclip_core.models.ops` (``pooled[:, :, c] = A_y @ F[:, :, c] @ A_x^T``, two GEMMs per
   box restricted to the rows and columns it touches, channels_last output). The averaged 2x2
   bins of item 3 are ``(A_y rows paired) @ F @ (A_x rows paired)^T``.
5. **Attention pooling of token 0 only** (:func:`rclip_core.models.ops.attnpool_token0`).

**Not rewritten: the stem's first convolution in float32.** It runs as the plain modules
(``relu(bn1(conv1(x)))`` on the NCHW image), so its rounding is the plain path's, bit for bit.
The network amplifies rounding in its first layer most: on the BN-calibrated RN50 and photos of
the tests (maxima over the boxes), that layer's float32 rounding alone (every other op in
float64) moves the embeddings by 5e-6 relative, against 5.4e-6 for the whole plain float32 path;
sharing it cut the fast path's difference from the plain one from 7.5e-6 to 6.0e-6, while
switching off the RoIAlign, conv-order or attention-pool rewrites changed it by under 4 % and
plain-layout convolutions by under 10 %. It costs ~25 ms per 1333x750 image (3 % of the trunk).
Under autocast the folded conv is used (bf16 parity is looser by far).

Under ``torch.autocast`` (``--precision bf16``) the convolutions run in the autocast dtype with
cached weights in that dtype, except the stem's three, which stay in float32: rounding the input
image and the first activations to bf16 is amplified by every later layer (on the test photos
with a calibrated RN50, 10x the final error, for 8.6 % of the trunk's work). Folded biases,
RoIAlign, the residual sums of res5 and the attention softmax stay in float32 (as autocast keeps
roi_align, FrozenBN outputs and softmax); layer1-3 keep their residual stream in bf16, which
measured faster there and as accurate (in res5 a float32 stream measured faster).
"""


from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rclip_core.models.ops import (CL, FoldedConv, attnpool_token0, compute_dtype, conv2d, fold_conv_bn,
                                   foldable_norm, roi_align_separable, roi_align_weights, tensor_versions)

__all__ = ["FastResNet"]


# --------------------------------------------------------------------------------------------
# The folded ResNet
# --------------------------------------------------------------------------------------------


class _Block(NamedTuple):
    c1: FoldedConv
    c2: FoldedConv
    c3: FoldedConv
    down: FoldedConv | None
    stride: int


class _Folded(NamedTuple):
    stem: list[FoldedConv]
    layers: list[list[_Block]]  # layer1..layer4


def _fold_block(blk: nn.Module, dtype: torch.dtype) -> _Block:
    def fc(conv: nn.Conv2d, bn: nn.Module) -> FoldedConv:
        w, b = fold_conv_bn(conv, bn, dtype)
        return FoldedConv(w, b, int(conv.stride[0]), int(conv.padding[0]))

    down = None
    if blk.downsample is not None:
        down = fc(blk.downsample[1], blk.downsample[2])  # [AvgPool2d, Conv2d, BN]
    return _Block(fc(blk.conv1, blk.bn1), fc(blk.conv2, blk.bn2), fc(blk.conv3, blk.bn3), down,
                  int(blk.stride))


def _run_conv(x: Tensor, c: FoldedConv) -> Tensor:
    return conv2d(x, c.weight, c.bias, c.stride, c.padding)


def _block(x: Tensor, b: _Block) -> Tensor:
    """Bottleneck on ``x`` (the residual stream, float32 or the weights' dtype); convolutions run
    in the weights' dtype, the residual sum in ``x``'s dtype (as autocast does: FrozenBN
    promotes every bf16 convolution output back to float32)."""
    dtype = b.c1.weight.dtype
    xc = x.to(dtype)
    out = _run_conv(xc, b.c1).relu_()
    out = _run_conv(out, b.c2).relu_()
    if b.stride > 1:
        out = F.avg_pool2d(out, b.stride)
    out = _run_conv(out, b.c3).to(x.dtype)
    if b.down is None:
        identity = x
    else:
        identity = _run_conv(F.avg_pool2d(xc, b.stride) if b.stride > 1 else xc, b.down)
    out += identity
    return out.relu_()


class FastResNet:
    """Folded, channels_last inference forward of an open_clip ``ModifiedResNet`` (``visual``).

    Holds no parameters of its own: the folded copies are rebuilt from ``visual`` whenever
    :func:`tensor_versions` of its parameters/buffers changes, and one copy is kept per dtype.
    ``separable_roi=False`` pools with ``torchvision.ops.roi_align`` instead (the default on
    devices other than CPU).
    """

    def __init__(self, visual: nn.Module, separable_roi: bool | None = None, token0: bool = True):
        self.visual = visual
        self.separable_roi = separable_roi
        self.token0 = token0
        self._key: tuple | None = None
        self._folded: dict[torch.dtype, _Folded] = {}

    @staticmethod
    def supported(visual: nn.Module) -> bool:
        """A ModifiedResNet whose norms are all foldable (frozen or eval-mode BN)."""
        needed = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "layer1", "layer4", "attnpool")
        if not all(hasattr(visual, n) for n in needed):
            return False
        norms = [m for m in visual.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                 or type(m).__name__ == "FrozenBatchNorm2d"]
        return all(foldable_norm(m) for m in norms)

    # -- folded weights ------------------------------------------------------------------------
    def folded(self, dtype: torch.dtype) -> _Folded:
        v = self.visual
        key = tensor_versions(list(v.parameters()) + list(v.buffers()))
        if key != self._key:
            self._folded.clear()
            self._key = key
        if dtype not in self._folded:
            # ordinary tensors even when called under inference_mode, usable in any later mode
            with torch.inference_mode(False), torch.no_grad():
                stem = []
                for conv, bn in ((v.conv1, v.bn1), (v.conv2, v.bn2), (v.conv3, v.bn3)):
                    # the stem stays in the parameters' dtype under bf16 autocast (module docstring)
                    w, b = fold_conv_bn(conv, bn, self._stream_dtype)
                    stem.append(FoldedConv(w, b, int(conv.stride[0]), int(conv.padding[0])))
                layers = [[_fold_block(blk, dtype) for blk in layer]
                          for layer in (v.layer1, v.layer2, v.layer3, v.layer4)]
            self._folded[dtype] = _Folded(stem, layers)
        return self._folded[dtype]

    def _dtype(self, device: torch.device) -> torch.dtype:
        return compute_dtype(device, self.visual.conv1.weight.dtype)

    @property
    def _stream_dtype(self) -> torch.dtype:
        """The parameters' dtype (float32): stem, res5 residual stream, pooled features."""
        return self.visual.conv1.weight.dtype

    # -- trunk -----------------------------------------------------------------------------------
    def trunk(self, x: Tensor) -> Tensor:
        """Normalised images [B, 3, H, W] -> res4 [B, 16w, H/16, W/16] (channels_last memory,
        compute dtype)."""
        dtype = self._dtype(x.device)
        f = self.folded(dtype)
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(self._stream_dtype)
            stem = f.stem
            if dtype == self._stream_dtype:
                # the same ops on the same input as the plain path: its rounding, which the rest of
                # the network amplifies most ("Not rewritten" in the module docstring)
                v = self.visual
                x = v.bn1(v.conv1(x)).relu_()
                stem = stem[1:]
            x = x.contiguous(memory_format=CL)
            for c in stem:
                x = _run_conv(x, c).relu_()
            # layer1-3 carry their residual stream in the compute dtype: under bf16 that measured
            # 16 % faster than a float32 stream (half the memory traffic, no casts) and as accurate
            x = F.avg_pool2d(x, 2).to(dtype)
            for layer in f.layers[:3]:
                for blk in layer:
                    x = _block(x, blk)
        return x

    # -- region head -------------------------------------------------------------------------------
    def res5_from_pooled(self, pooled: Tensor) -> Tensor:
        """layer4 on RoIAlign output [R, 16w, P, P] -> [R, 32w, P/2, P/2] (channels_last)."""
        dtype = self._dtype(pooled.device)
        f = self.folded(dtype)
        with torch.autocast(pooled.device.type, enabled=False):
            x = pooled.to(self._stream_dtype).contiguous(memory_format=CL)
            for blk in f.layers[3]:
                x = _block(x, blk)
        return x

    def attnpool(self, res5: Tensor) -> Tensor:
        if self.token0:
            return attnpool_token0(self.visual.attnpool, res5)
        return self.visual.attnpool(res5)

    def head_from_pooled(self, pooled: Tensor, chunk_size: int | None = None) -> Tensor:
        if chunk_size is None or pooled.shape[0] <= chunk_size:
            return self.attnpool(self.res5_from_pooled(pooled))
        return torch.cat([self.attnpool(self.res5_from_pooled(c)) for c in pooled.split(chunk_size)])

    def plan(self, num_rois: int, output_size: int, map_positions: int) -> tuple[bool, bool]:
        """Whether res5's conv1 and its shortcut conv run on the whole map (before RoIAlign).

        conv1: when ``num_rois * P^2`` (the positions it sees on the pooled boxes) exceeds the
        map's positions; pooling its 512 channels instead of res4's 1024 is cheaper too. The
        shortcut: when ``num_rois * (P/stride)^2`` exceeds twice the map's positions, since it
        then pools 2048 channels per box instead of 1024 (measured on RN50 at 1333x750: 10 %
        less head time from conv1 at 300 boxes, 3-4 % more from the shortcut at 1000 boxes,
        none at 300)."""
        b0 = self.visual.layer4[0]
        s = int(b0.stride)
        commute1 = num_rois * output_size ** 2 > map_positions
        commute_d = (b0.downsample is not None and output_size % s == 0
                     and num_rois * (output_size // s) ** 2 > 2 * map_positions)
        return commute1, commute_d

    def regions(self, res4: Tensor, rois: Tensor, output_size: int, spatial_scale: float,
                chunk_size: int | None = None) -> Tensor:
        """res4 [B, C, H, W] and rois [R, 5] (batch_idx, XYXY in image pixels) -> [R, D]:
        RoIAlign (aligned, adaptive sampling) + layer4 + attention pool, rewritten as described
        in the module docstring. ``chunk_size`` bounds how many regions go through layer4 at once."""
        device = res4.device
        dtype = self._dtype(device)
        f = self.folded(dtype)
        b0 = f.layers[3][0]
        P, R = output_size, rois.shape[0]
        B, _, H, W = res4.shape
        separable = self.separable_roi if self.separable_roi is not None else device.type == "cpu"
        commute1, commute_d = self.plan(R, P, B * H * W)
        with torch.autocast(device.type, enabled=False):
            x = res4.contiguous(memory_format=CL)
            xc = x.to(dtype)
            maps = {}
            if not (commute1 and commute_d):
                maps["res4"] = _roi_input(x, separable)
            if commute1:
                maps["m1"] = _roi_input(conv2d(xc, b0.c1.weight, None), separable)
            if commute_d:
                maps["md"] = _roi_input(conv2d(xc, b0.down.weight, None), separable)
            del x, xc
        outs = []
        for chunk in (rois.split(chunk_size) if chunk_size else (rois,)):
            with torch.autocast(device.type, enabled=False):
                r5 = self._res5_chunk(maps, chunk, f.layers[3], P, spatial_scale, commute1, commute_d,
                                      self._stream_dtype, separable)
            outs.append(self.attnpool(r5))  # under the caller's autocast, as the plain path
            del r5
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    @staticmethod
    def _res5_chunk(maps: dict[str, Tensor], rois: Tensor, blocks: list[_Block], P: int, spatial_scale: float,
                    commute1: bool, commute_d: bool, stream: torch.dtype, separable: bool) -> Tensor:
        b0 = blocks[0]
        dtype = b0.c1.weight.dtype
        s = b0.stride
        first = next(iter(maps.values()))
        H, W = (first.shape[1], first.shape[2]) if separable else (first.shape[2], first.shape[3])
        weights = roi_align_weights(rois, P, spatial_scale, H, W) if separable else None

        def pool(name: str, avg: bool) -> Tensor:
            """RoIAlign at P of a map, then avg_pool(s) if ``avg`` -> [R, C, p, p] channels_last."""
            fm = maps[name]
            if separable:
                out = roi_align_separable(fm, weights.pooled(s) if avg else weights).permute(0, 3, 1, 2)
            else:
                from torchvision.ops import roi_align

                out = roi_align(fm, rois.to(fm.dtype), (P, P), spatial_scale, 0, True)
                if avg:
                    out = F.avg_pool2d(out, s)
                out = out.contiguous(memory_format=CL)
            return out.to(stream)

        pooled = None
        if commute1:
            out = pool("m1", False)
            if b0.c1.bias is not None:
                out += b0.c1.bias.view(1, -1, 1, 1)
            out = out.relu_().to(dtype)
        else:
            pooled = pool("res4", False)
            out = _run_conv(pooled.to(dtype), b0.c1).relu_()
        out = _run_conv(out, b0.c2).relu_()
        if s > 1:
            out = F.avg_pool2d(out, s)
        out = _run_conv(out, b0.c3).to(stream)
        if b0.down is None:
            identity = pooled if pooled is not None else pool("res4", False)
        elif commute_d:
            identity = pool("md", True)
            if b0.down.bias is not None:
                identity += b0.down.bias.view(1, -1, 1, 1)
        else:
            if pooled is not None:
                small = F.avg_pool2d(pooled, s) if s > 1 else pooled
            else:
                small = pool("res4", s > 1)
            identity = _run_conv(small.to(dtype), b0.down)
        del pooled
        out += identity
        x = out.relu_()
        for blk in blocks[1:]:
            x = _block(x, blk)
        return x


def _roi_input(fm: Tensor, separable: bool) -> Tensor:
    """A feature map in the form the pooling wants: float32, [B, H, W, C] contiguous (separable)
    or [B, C, H, W] contiguous (torchvision)."""
    fm = fm.float()
    if separable:
        return fm.permute(0, 2, 3, 1).contiguous()
    return fm.contiguous()
