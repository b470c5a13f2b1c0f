"""Exact rewrites shared by the region encoder, its fast path and the offline RPN: a leaf.

* :func:`attnpool_token0`: open_clip's ``AttentionPool2d`` for token 0 only (the output the
  region head uses), with keys and values folded into the query: the same mathematics as the
  full multi-head attention followed by ``[0]``, with ~1/30 of the work.
* Folded conv + BN (:func:`fold_conv_bn`, :func:`foldable_norm`, :class:`FoldedConv`,
  :func:`conv2d`): ``bn(conv(x, W)) = conv(x, W * s) + (b - m * s)`` with
  ``s = w / sqrt(v + eps)``, and convolutions straight to oneDNN on CPU.
* Separable RoIAlign (:func:`roi_align_weights`, :func:`roi_align_separable`,
  :func:`roi_align_matmul`). ``torchvision.ops.roi_align`` (aligned=True, adaptive sampling) is
  separable: every sample's bilinear weight is a product of a row weight and a column weight,
  and its validity test and the ``1/count`` normalisation factor into rows and columns too. So
  ``pooled[:, :, c] = A_y @ F[:, :, c] @ A_x^T`` with ``A_y`` [P, H] and ``A_x`` [P, W] holding
  the summed sample weights. Restricted to the rows and columns a box touches, this is two GEMMs
  per box instead of ``4 * P^2 * samples`` scalar gathers per channel, and it writes
  channels_last output directly. Averaged 2x2 bins are ``(A_y rows paired) @ F @ (A_x rows
  paired)^T`` (:meth:`RoIWeights.pooled`).

Every function here computes what the plain modules compute, float rounding apart
(``tests/test_speed_parity.py`` and ``tests/test_region_encoder.py`` check each one).
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

__all__ = ["attnpool_token0", "fold_conv_bn", "conv2d", "FoldedConv", "RoIWeights", "roi_align_weights",
           "roi_align_separable", "roi_align_matmul", "foldable_norm", "compute_dtype", "tensor_versions"]


# --------------------------------------------------------------------------------------------
# Attention pooling of token 0
# --------------------------------------------------------------------------------------------


def attnpool_token0(attnpool: nn.Module, x: Tensor) -> Tensor:
    """Output of open_clip/OpenAI ``AttentionPool2d`` for token 0 only.

    Args:
        attnpool: the ``AttentionPool2d`` module (q/k/v/c_proj, positional_embedding, num_heads).
        x: res5 features [R, C, h, w] with h*w+1 == positional_embedding rows.
    Returns:
        [R, D] embeddings (D = c_proj.out_features).

    With tokens t_l (l=0 is the mean token), head h, scale s = 1/sqrt(C/H):
        a_hl = softmax_l(s * (W_q t_0 + b_q)_h . (W_k t_l + b_k)_h)
             = softmax_l(s * t_l . (W_k,h^T q_h))        (q_h . b_k,h is the same for every l)
        out_h = sum_l a_hl (W_v t_l + b_v)_h = W_v,h (sum_l a_hl t_l) + b_v,h    (sum_l a_hl = 1)
    so neither keys nor values are ever projected for every token.
    """
    R, C, h, w = x.shape
    heads = attnpool.num_heads
    hd = C // heads
    pos = attnpool.positional_embedding.to(x.dtype)  # [L, C]
    tokens = x.flatten(2).transpose(1, 2)  # [R, HW, C] (a view when x is channels_last)
    t0 = tokens.mean(dim=1, keepdim=True)  # [R, 1, C]
    tokens = torch.cat([t0, tokens], dim=1) + pos  # [R, L, C]
    q = F.linear(tokens[:, 0], attnpool.q_proj.weight, attnpool.q_proj.bias)  # [R, C]
    q = q.view(R, heads, hd) * (hd ** -0.5)
    wk = attnpool.k_proj.weight.view(heads, hd, C)  # [H, hd, C]
    qk = torch.einsum("rhd,hdc->rhc", q, wk)  # [R, H, C]: the query seen in input space
    scores = torch.bmm(qk, tokens.transpose(1, 2))  # [R, H, L]
    attn = scores.softmax(dim=-1)
    mixed = torch.bmm(attn, tokens)  # [R, H, C]: attention-weighted inputs per head
    wv = attnpool.v_proj.weight.view(heads, hd, C)
    out = torch.einsum("rhc,hdc->rhd", mixed, wv).reshape(R, C) + attnpool.v_proj.bias
    return F.linear(out, attnpool.c_proj.weight, attnpool.c_proj.bias)


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
    image, ``dF = sum_boxes A_y^T @ dOut @ A_x`` with the separable weights
    (:func:`roi_align_weights`).

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
