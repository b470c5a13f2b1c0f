"""The two non-maximum suppressions of the exported graphs, as torch custom ops with an ONNX
translation onto ``NonMaxSuppression`` (opset 10+).

``torch.export`` cannot see through torchvision's ``batched_nms`` (its coordinate trick and the
(box, class) pair expansion produce data-dependent shapes at every step), and ONNX has a
per-class NMS of its own: ``NonMaxSuppression`` takes class-agnostic boxes [1, N, 4] and
per-class scores [1, C, N] and suppresses within each class, which is exactly
``fast_rcnn_inference_single_image`` (class-agnostic boxes, one NMS per class). So each op runs
torchvision's code in PyTorch (the reference, what ``rclip detect`` runs) and becomes one
``NonMaxSuppression`` in the ONNX graph:

* :func:`class_nms`: boxes [N, 4], scores [N, K] -> kept (box, class) pairs [M, 2], in
  decreasing score order: strict ``score > score_thresh``, then NMS per class
  (``torchvision.ops.batched_nms`` with the class as group).
* :func:`group_nms`: boxes [N, 4], scores [N], groups [N] in 0..G-1, valid [N] -> kept indices
  in decreasing score order (the RPN's NMS per feature level, invalid boxes dropped first).

Both suppress a box when its IoU with a kept box of its class is > ``iou`` (torchvision and
onnxruntime alike); ties between equal scores may be ordered differently.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

__all__ = ["class_nms", "group_nms", "onnx_translations"]

# scores of excluded entries in the ONNX form: below every real score, above the threshold -inf
_EXCLUDED = -3.0e38


@torch.library.custom_op("rclip_export::class_nms", mutates_args=())
def class_nms(boxes: Tensor, scores: Tensor, score_thresh: float, iou: float) -> Tensor:
    mask = scores > score_thresh
    inds = mask.nonzero()
    keep = batched_nms(boxes[inds[:, 0]], scores[mask], inds[:, 1], iou)
    return inds[keep]


@class_nms.register_fake
def _(boxes: Tensor, scores: Tensor, score_thresh: float, iou: float) -> Tensor:
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n, 2), dtype=torch.int64)


@torch.library.custom_op("rclip_export::group_nms", mutates_args=())
def group_nms(boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor, num_groups: int, iou: float) -> Tensor:
    idx = valid.nonzero()[:, 0]
    keep = batched_nms(boxes[idx], scores[idx], groups[idx], iou)
    return idx[keep]


@group_nms.register_fake
def _(boxes: Tensor, scores: Tensor, groups: Tensor, valid: Tensor, num_groups: int, iou: float) -> Tensor:
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.int64)


def onnx_translations() -> dict:
    """``custom_translation_table`` for ``torch.onnx.export(dynamo=True)``."""
    from onnxscript import opset18 as op

    def _sorted_by_score(selected_scores):
        n = op.Shape(selected_scores)
        _, order = op.TopK(selected_scores, n, axis=0, largest=1, sorted=1)
        return order

    def class_nms_onnx(boxes, scores, score_thresh: float, iou: float):
        sel = op.NonMaxSuppression(op.Unsqueeze(boxes, [0]), op.Unsqueeze(op.Transpose(scores, perm=[1, 0]), [0]),
                                   [2 ** 62], [float(iou)], [float(score_thresh)])
        pairs = op.Concat(op.Slice(sel, [2], [3], [1]), op.Slice(sel, [1], [2], [1]), axis=1)  # (box, class)
        picked = op.GatherND(scores, pairs)
        return op.Gather(pairs, _sorted_by_score(picked), axis=0)

    def group_nms_onnx(boxes, scores, groups, valid, num_groups: int, iou: float):
        g = op.Constant(value_ints=list(range(int(num_groups))))
        member = op.And(op.Equal(op.Unsqueeze(g, [1]), op.Unsqueeze(groups, [0])), op.Unsqueeze(valid, [0]))
        mat = op.Where(member, op.Unsqueeze(scores, [0]), op.CastLike(_EXCLUDED, scores))
        sel = op.NonMaxSuppression(op.Unsqueeze(boxes, [0]), op.Unsqueeze(mat, [0]), [2 ** 62],
                                   [float(iou)], [-1.0e38])
        idx = op.Reshape(op.Slice(sel, [2], [3], [1]), [-1])
        picked = op.Gather(scores, idx, axis=0)
        return op.Gather(idx, _sorted_by_score(picked), axis=0)

    return {torch.ops.rclip_export.class_nms.default: class_nms_onnx,
            torch.ops.rclip_export.group_nms.default: group_nms_onnx}
