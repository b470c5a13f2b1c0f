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
4. **RoIAlign as two small matrix products** (CPU). ``torchvision.ops.roi_align``
   (aligned=True, adaptive sampling) is separable: every sample's bilinear weight is a product
   of a row weight and a column weight, and its validity test and the ``1/count`` normalisation
   factor into rows and columns too. So ``pooled[:, :, c] = A_y @ F[:, :, c] @ A_x^T`` with
   ``A_y`` [P, H] and ``A_x`` [P, W] holding the summed sample weights. Restricted to the rows
   and columns a box touches, this is two GEMMs per box instead of ``4 * P^2 * samples``
   scalar gathers per channel, and it writes channels_last output directly. The averaged 2x2
   bins of item 3 are ``(A_y rows paired) @ F @ (A_x rows paired)^T``.
5. **Attention pooling of token 0 only** (:func:`rclip_core.models.region_encoder.attnpool_token0`).

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

from contextlib import contextmanager
from typing import Iterable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CL = torch.channels_last
# bf16 convolutions keep a float32 bias: the folded bias b - m * s can be large and cancel
# against the convolution sum, so rounding it to bf16 would cost accuracy for nothing.
BIAS_DTYPE = {torch.bfloat16: torch.float32}

__all__ = ["fold_conv_bn", "conv2d", "FastResNet", "FoldedConv", "roi_align_weights", "roi_align_separable",
           "roi_align_matmul", "foldable_norm", "compute_dtype", "tensor_versions"]


# --------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------


class FoldedConv(NamedTuple):
    """A convolution with its BN folded in: weight [O, I, k, k] (channels_last), bias [O]."""

    weight: Tensor
    bias: Tensor
    stride: int
    padding: int


def foldable_norm(norm: nn.Module) -> bool:
    """Frozen BN, or a BatchNorm in eval mode (an affine map per channel)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    if isinstance(norm, FrozenBatchNorm2d):
        return True
    return (isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training
            and norm.track_running_stats and norm.running_mean is not None)


def fold_conv_bn(conv: nn.Conv2d | Tensor, norm: nn.Module | None, dtype: torch.dtype | None = None,
                 conv_bias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(W * s, b - m * s + s * conv_bias) with s = w / sqrt(v + eps); float32 arithmetic, as
    torchvision's FrozenBatchNorm2d, then cast to ``dtype``. ``norm`` None: the conv as is."""
    weight = conv.weight if isinstance(conv, nn.Module) else conv
    if isinstance(conv, nn.Module) and conv_bias is None:
        conv_bias = conv.bias
    dtype = dtype or weight.dtype
    w = weight.detach().float()
    if norm is None:
        b = None if conv_bias is None else conv_bias.detach().float()
    else:
        var = norm.running_var.detach().float()
        nw = norm.weight.detach().float() if norm.weight is not None else torch.ones_like(var)
        nb = norm.bias.detach().float() if norm.bias is not None else torch.zeros_like(var)
        scale = nw * (var + norm.eps).rsqrt()
        b = nb - norm.running_mean.detach().float() * scale
        if conv_bias is not None:
            b = b + conv_bias.detach().float() * scale
        w = w * scale.view(-1, 1, 1, 1)
    w = w.to(dtype).contiguous(memory_format=CL)
    return w, (None if b is None else b.to(BIAS_DTYPE.get(dtype, dtype)))


_MKLDNN_OK: dict[torch.dtype, bool] = {}


def _mkldnn_ok(dtype: torch.dtype) -> bool:
    """Whether ``torch.mkldnn_convolution`` runs in ``dtype`` on this CPU and agrees with
    ``F.conv2d`` (checked once per dtype; bf16 needs AVX512-BF16/AMX or AVX-NE-CONVERT)."""
    if dtype not in _MKLDNN_OK:
        try:
            g = torch.Generator().manual_seed(0)
            x = torch.randn(1, 8, 5, 6, generator=g).contiguous(memory_format=CL)
            w = torch.randn(4, 8, 3, 3, generator=g).contiguous(memory_format=CL)
            b = torch.randn(4, generator=g)
            with torch.inference_mode(), torch.autocast("cpu", enabled=False):
                y = torch.mkldnn_convolution(x.to(dtype), w.to(dtype), b.to(BIAS_DTYPE.get(dtype, dtype)),
                                             (1, 1), (2, 2), (1, 1), 1)
                ref = F.conv2d(x, w, b, stride=2, padding=1)
            tol = 1e-4 if dtype == torch.float32 else 0.1
            _MKLDNN_OK[dtype] = bool(torch.backends.mkldnn.is_available() and y.shape == ref.shape
                                     and torch.allclose(y.float(), ref, atol=tol))
        except Exception:  # noqa: BLE001 - any failure means "use F.conv2d"
            _MKLDNN_OK[dtype] = False
    return _MKLDNN_OK[dtype]


def conv2d(x: Tensor, w: Tensor, b: Tensor | None, stride: int = 1, padding: int = 0) -> Tensor:
    """``F.conv2d`` (groups 1, dilation 1); on CPU straight to oneDNN, channels_last in and out."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and _mkldnn_ok(x.dtype):
        return torch.mkldnn_convolution(x, w, b, (padding, padding), (stride, stride), (1, 1), 1)
    return F.conv2d(x, w, None if b is None else b.to(x.dtype), stride=stride, padding=padding)


def compute_dtype(device: torch.device, param_dtype: torch.dtype) -> torch.dtype:
    """The dtype convolutions run in: autocast's when it is on for ``device``, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return param_dtype


def tensor_versions(tensors: Iterable[Tensor]) -> tuple:
    """A key that changes when any tensor is modified in place, replaced, moved or recast."""
    key = []
    for t in tensors:
        try:
            v = t._version
        except RuntimeError:  # inference tensors have no version counter (and cannot change outside it)
            v = -1
        key.append((t.data_ptr(), v, t.dtype, t.device))
    return tuple(key)


# --------------------------------------------------------------------------------------------
# RoIAlign, separable
# --------------------------------------------------------------------------------------------


def _axis_weights(start: Tensor, end: Tensor, bins: int, size: int) -> Tensor:
    """Summed bilinear sample weights along one axis: [R, bins, size], already divided by the
    number of samples per bin on this axis (torchvision roi_align, aligned, adaptive sampling)."""
    R = start.shape[0]
    length = end - start
    bin_size = length / bins
    grid = torch.ceil(length / bins)  # samples per bin (<= 0 for empty boxes: no samples)
    g_max = max(int(grid.max().item()) if R else 1, 1)
    ph = torch.arange(bins, device=start.device, dtype=start.dtype)
    it = torch.arange(g_max, device=start.device, dtype=start.dtype)
    # torchvision: y = roi_start + ph * bin_size + (iy + .5) * bin_size / grid (same evaluation order)
    base = start[:, None, None] + ph[None, :, None] * bin_size[:, None, None]
    pos = base + (it[None, None, :] + 0.5) * bin_size[:, None, None] / grid.clamp(min=1)[:, None, None]
    valid = (it[None, None, :] < grid[:, None, None]) & (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor()
    at_end = low >= size - 1
    low = torch.where(at_end, torch.full_like(low, size - 1), low)
    pos = torch.where(at_end, low, pos)
    high = torch.where(at_end, low, low + 1)
    frac = pos - low
    norm = valid.to(start.dtype) / grid.clamp(min=1)[:, None, None]
    out = start.new_zeros((R, bins, size))
    out.scatter_add_(2, low.long().view(R, bins, -1), ((1.0 - frac) * norm).view(R, bins, -1))
    out.scatter_add_(2, high.long().view(R, bins, -1), (frac * norm).view(R, bins, -1))
    return out


class RoIWeights(NamedTuple):
    """Row / column weights of each RoI ([R, P, H], [R, P, W]) and the rows/columns they touch."""

    batch: list[int]
    ay: Tensor
    ax: Tensor
    y0: list[int]
    y1: list[int]
    x0: list[int]
    x1: list[int]

    def pooled(self, factor: int) -> "RoIWeights":
        """The weights of ``avg_pool2d(factor)`` applied after RoIAlign: bins averaged in groups."""
        R, P, H = self.ay.shape
        ay = self.ay.view(R, P // factor, factor, H).mean(dim=2)
        ax = self.ax.view(R, P // factor, factor, self.ax.shape[2]).mean(dim=2)
        return RoIWeights(self.batch, ay, ax, self.y0, self.y1, self.x0, self.x1)


def _support(w: Tensor) -> tuple[list[int], list[int]]:
    """First and one-past-last index with a nonzero weight per RoI ([R, P, N] -> two [R] lists)."""
    nz = (w != 0).any(dim=1)  # [R, N]
    n = nz.shape[1]
    some = nz.any(1)
    zero = torch.zeros_like(some, dtype=torch.long)
    first = torch.where(some, nz.float().argmax(1), zero)  # argmax: the first maximum
    last = torch.where(some, n - nz.flip(1).float().argmax(1), zero)
    return first.tolist(), last.tolist()


def roi_align_weights(rois: Tensor, output_size: int, spatial_scale: float, height: int,
                      width: int) -> RoIWeights:
    """Separable form of ``roi_align(..., aligned=True, sampling_ratio=0)`` for rois [R, 5]
    ``(batch_idx, x1, y1, x2, y2)`` on a [*, *, height, width] feature map."""
    r = rois.float()
    start_x = r[:, 1] * spatial_scale - 0.5
    start_y = r[:, 2] * spatial_scale - 0.5
    end_x = r[:, 3] * spatial_scale - 0.5
    end_y = r[:, 4] * spatial_scale - 0.5
    ay = _axis_weights(start_y, end_y, output_size, height)
    ax = _axis_weights(start_x, end_x, output_size, width)
    y0, y1 = _support(ay)
    x0, x1 = _support(ax)
    return RoIWeights(r[:, 0].long().tolist(), ay, ax, y0, y1, x0, x1)


def roi_align_separable(feat_nhwc: Tensor, w: RoIWeights, out: Tensor | None = None) -> Tensor:
    """RoIAlign of a [B, H, W, C] (contiguous) map with precomputed weights -> [R, P, P, C]
    (which is the channels_last layout of [R, C, P, P]: ``out.permute(0, 3, 1, 2)``)."""
    R, P = w.ay.shape[0], w.ay.shape[1]
    C = feat_nhwc.shape[-1]
    if out is None:
        out = feat_nhwc.new_empty((R, P, P, C))
    ay = w.ay.to(feat_nhwc.dtype)
    ax = w.ax.to(feat_nhwc.dtype)
    with _one_thread():
        _roi_loop(feat_nhwc, w, ay, ax, out)
    return out


class _RoIAlignMatmulBackward(torch.autograd.Function):
    """torchvision's RoIAlign forward; backward as matrix products with the separable weights."""

    @staticmethod
    def forward(ctx, features: Tensor, rois: Tensor, output_size: int, spatial_scale: float) -> Tensor:
        from torchvision.ops import roi_align

        ctx.save_for_backward(rois)
        ctx.shape, ctx.output_size, ctx.spatial_scale = features.shape, int(output_size), float(spatial_scale)
        return roi_align(features, rois, (output_size, output_size), spatial_scale, 0, True)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (rois,) = ctx.saved_tensors
        B, C, H, W = ctx.shape
        P = ctx.output_size
        w = roi_align_weights(rois, P, ctx.spatial_scale, H, W)
        ay, ax = w.ay.to(grad.dtype), w.ax.to(grad.dtype)
        batch = rois[:, 0].long()
        out = grad.new_zeros((B, C, H, W))
        for b in range(B):
            idx = (batch == b).nonzero().squeeze(1)
            r = int(idx.numel())
            if r == 0:
                continue
            # rows: [r, 1, H, P] @ [r, C, P, P] -> [r, C, H, P]; columns, summed over the boxes:
            # [C*H, r*P] @ [r*P, W] -> [C, H, W]
            t = torch.matmul(ay[idx].transpose(1, 2).unsqueeze(1), grad[idx])
            t = t.permute(1, 2, 0, 3).reshape(C * H, r * P)
            out[b] = torch.matmul(t, ax[idx].reshape(r * P, W)).view(C, H, W)
        return out, None, None, None


def roi_align_matmul(features: Tensor, rois: Tensor, output_size: int, spatial_scale: float) -> Tensor:
    """``roi_align(features, rois, output_size, spatial_scale, sampling_ratio=0, aligned=True)``
    of a [B, C, H, W] map and rois [R, 5], with its backward as matrix products: for each
    image, ``dF = sum_boxes A_y^T @ dOut @ A_x`` with the separable weights of item 4.

    The training path on CPU, where torchvision's RoIAlign backward is a single-threaded
    scatter (30 % of a ShapesWorld fine-tuning step, measured with py-spy; 3x slower than this
    on 512 boxes). The forward is torchvision's itself; the gradient equals torchvision's up to
    float rounding (the sums run in another order), which ``tests/test_speed_parity.py`` checks.
    """
    return _RoIAlignMatmulBackward.apply(features, rois, output_size, spatial_scale)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run the block with one intra-op thread. The per-box GEMMs are small: spread over several
    threads, each is a parallel region whose barrier waits for every thread, and on a shared host
    (another process on the other core) a descheduled thread stalls every region for a whole
    scheduler slice: measured 100x slower with 2 threads on a busy 2-core host, against a few
    percent gained on an idle one."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _roi_loop(feat_nhwc: Tensor, w: RoIWeights, ay: Tensor, ax: Tensor, out: Tensor) -> None:
    R, P = ay.shape[0], ay.shape[1]
    C = feat_nhwc.shape[-1]
    for r in range(R):
        y0, y1, x0, x1 = w.y0[r], w.y1[r], w.x0[r], w.x1[r]
        hs, ws = y1 - y0, x1 - x0
        if hs <= 0 or ws <= 0:
            out[r].zero_()
            continue
        fs = feat_nhwc[w.batch[r], y0:y1, x0:x1]  # [hs, ws, C], rows strided
        if ws <= hs:  # rows first: [P, hs] @ [hs, ws*C], then per row [P, ws] @ [ws, C]
            t = torch.matmul(ay[r, :, y0:y1], fs.reshape(hs, ws * C)).view(P, ws, C)
            torch.matmul(ax[r, :, x0:x1], t, out=out[r])
        else:  # columns first: per row [P, ws] @ [ws, C] -> [hs, P, C], then [P, hs] @ [hs, P*C]
            t = torch.matmul(ax[r, :, x0:x1], fs)
            torch.matmul(ay[r, :, y0:y1], t.view(hs, P * C), out=out[r].view(P, P * C))


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
        from rclip_core.models.region_encoder import attnpool_token0

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
