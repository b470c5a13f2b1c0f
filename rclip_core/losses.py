"""Losses of RegionCLIP pretraining (paper eq. 2-5) and of its detector transfer (official
``fast_rcnn.py: FastRCNNOutputLayers.losses``).

Every loss is a pure function of tensors. Equation numbers refer to the paper
(arXiv:2112.09106): eq. 2 region-concept contrastive, eq. 3 concept distillation (KL),
eq. 4 image-text contrastive, eq. 5 the total pretraining loss. The official code is
``clip_roi_heads.py: PretrainRes5ROIHeads`` (region losses) and ``clip_rcnn.py: PretrainFastRCNN``
(image-text loss, ``detectron2/utils/comm.py: gather_tensors``).

Conventions shared by the pretraining losses (``PretrainRes5ROIHeads.forward``):

- embeddings are passed in *unnormalised*; every function L2-normalises what it compares,
  as the official code does, so callers can hand over raw attnpool outputs and the stored
  (unnormalised) concept embeddings;
- the temperature is a fixed constant (``CLSS_TEMP`` = 0.01), never CLIP's learned scale;
- R = number of regions, N = number of concepts, D = embedding width, B = images per process.

Official loss names: ``loss_concept_contrastive`` = :func:`region_concept_contrastive`,
``loss_region_distill`` = :func:`concept_distillation`, ``loss_img_txt_level`` =
:func:`image_text_contrastive`.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PseudoLabels",
    "LOSS_TERMS",
    "teacher_concept_logits",
    "topk_teacher",
    "pseudo_label_regions",
    "region_concept_contrastive",
    "concept_distillation",
    "image_text_contrastive",
    "focal_scaled_cross_entropy",
    "weighted_cross_entropy",
    "pretraining_loss",
]

#: Names of the pretraining terms, in the order :func:`pretraining_loss` reports them.
LOSS_TERMS = ("region_concept_contrastive", "concept_distillation", "image_text_contrastive")

#: ``MODEL.CLIP.CLSS_TEMP`` of the official configs: a constant, not CLIP's learned scale.
DEFAULT_TEMPERATURE = 0.01


class PseudoLabels(NamedTuple):
    """Teacher pseudo labels of one process's regions (``CONCEPT_THRES`` selection of ``PretrainRes5ROIHeads``).

    target_inds:   [R'] long, concept index of every kept region (R' = keep_mask.sum()).
    keep_mask:     [R] bool, which regions passed the confidence threshold.
    teacher_probs: [R, N] the teacher's softmax(cos / T) over all concepts for ALL regions
                   (index it with ``keep_mask`` for the kept ones), or None when the teacher
                   distribution comes from top-k shards instead (see :func:`concept_distillation`).
    """

    target_inds: Tensor
    keep_mask: Tensor
    teacher_probs: Tensor | None


def _zero_like_graph(*tensors: Tensor) -> Tensor:
    """A zero scalar that is still connected to the autograd graph of ``tensors``.

    Returned when a batch has nothing to compare (no regions), so that ``backward()`` and
    DDP's gradient bucketing see every parameter, like Detectron2's empty-input losses.
    """
    out = tensors[0].sum() * 0.0
    for t in tensors[1:]:
        out = out + t.sum() * 0.0
    return out


def teacher_concept_logits(
    teacher_region_emb: Tensor, concept_emb: Tensor, temperature: float = DEFAULT_TEMPERATURE
) -> Tensor:
    """cos(teacher_region_i, concept_n) / T (the teacher's ``s_temp``); no gradient.

    Args:
        teacher_region_emb: [R, D] teacher region features (unnormalised).
        concept_emb: [N, D] the TEACHER's concept embeddings (unnormalised).
        temperature: T; the official code hard-codes 0.01 (``s_temp``).

    Returns:
        [R, N] logits; ``softmax(dim=1)`` of them is the teacher distribution p.
    """
    if teacher_region_emb.dim() != 2 or concept_emb.dim() != 2:
        raise ValueError("teacher_region_emb must be [R, D] and concept_emb [N, D]")
    if teacher_region_emb.shape[1] != concept_emb.shape[1]:
        raise ValueError(
            f"embedding widths differ: regions {teacher_region_emb.shape[1]}, concepts {concept_emb.shape[1]}"
        )
    with torch.no_grad():
        r = F.normalize(teacher_region_emb.float(), dim=-1)
        c = F.normalize(concept_emb.float(), dim=-1)
        return r @ c.t() / temperature


def topk_teacher(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The sparse form of the teacher that pseudo-label shards store: the k largest logits.

    Args:
        teacher_logits: [R, N] from :func:`teacher_concept_logits` (cos / T).
        k: number of concepts kept per region (clamped to N).

    Returns:
        (indices [R, k] long, logits [R, k] float), sorted by decreasing logit.
    """
    k = min(int(k), teacher_logits.shape[1])
    logits, inds = teacher_logits.topk(k, dim=1)
    return inds, logits


def pseudo_label_regions(
    teacher_region_emb: Tensor,
    concept_emb: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    threshold: float = 0.1,
) -> PseudoLabels:
    """Pseudo-label regions with the teacher (``PretrainRes5ROIHeads``: argmax label kept when its
    probability > ``CONCEPT_THRES``, all kept when none passes; input of paper eq. 2 and 3).

    p = softmax(cos(teacher_region, teacher_concept) / T) over all N concepts; the label of a
    region is argmax_n p; the region is kept only if max_n p > ``threshold`` (strictly, as
    ``CONCEPT_THRES`` in the official code). If no region of the batch passes, all regions are
    kept (the official fallback ``max_scores > 0``). No gradient flows.

    Args:
        teacher_region_emb: [R, D] teacher region features (unnormalised).
        concept_emb: [N, D] the teacher's concept pool (unnormalised).
        temperature: T of the teacher softmax (official: 0.01, hard-coded).
        threshold: confidence threshold (official ``CONCEPT_THRES`` 0.1).

    Returns:
        :class:`PseudoLabels` ``(target_inds [R'], keep_mask [R], teacher_probs [R, N])``.
    """
    probs = teacher_concept_logits(teacher_region_emb, concept_emb, temperature).softmax(dim=1)
    if probs.shape[0] == 0:
        empty = torch.zeros(0, dtype=torch.long, device=probs.device)
        return PseudoLabels(empty, torch.zeros(0, dtype=torch.bool, device=probs.device), probs)
    max_p, max_inds = probs.max(dim=1)
    keep = max_p > threshold
    if not bool(keep.any()):
        keep = torch.ones_like(keep)
    return PseudoLabels(max_inds[keep], keep, probs)


def region_concept_contrastive(
    student_region_emb: Tensor,
    target_inds: Tensor,
    concept_emb: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
) -> Tensor:
    """Region-concept contrastive loss, paper eq. 2, exactly as the official code
    (``loss_concept_contrastive``: ``MILCrossEntropy`` over the per-process R x R matrix).

    For the R kept regions of this process, column j of the score matrix is the (student pool)
    embedding of the concept assigned to region j, so S is R x R:

        S_ij = cos(s_i, concept[target_j]) / T
        label_ij = 1 iff target_i == target_j      (i's own column included)
        loss = mean_i  -log sum_j label_ij * softmax_j(S_i.)

    Several regions with the same concept give several identical columns: they all count in
    the numerator and also inflate the denominator (official ``MILCrossEntropy`` with
    ``avg_positives=False``). Region-to-text direction only; never gathered across processes.

    Args:
        student_region_emb: [R, D] student features of the KEPT regions (unnormalised).
        target_inds: [R] long, their concept indices (``PseudoLabels.target_inds``).
        concept_emb: [N, D] the STUDENT's concept pool (unnormalised).
        temperature: T (``CLSS_TEMP``, 0.01).

    Returns:
        scalar loss; a graph-connected zero when R == 0.
    """
    if student_region_emb.shape[0] != target_inds.shape[0]:
        raise ValueError(
            f"{student_region_emb.shape[0]} region embeddings but {target_inds.shape[0]} target indices"
        )
    if student_region_emb.shape[0] == 0:
        return _zero_like_graph(student_region_emb)
    s = F.normalize(student_region_emb, dim=-1)
    t = F.normalize(concept_emb[target_inds], dim=-1).to(s.dtype)
    scores = s @ t.t() / temperature  # [R, R]
    positives = target_inds.view(-1, 1) == target_inds.view(1, -1)  # [R, R], diagonal True
    # -log(sum_pos softmax) = logsumexp_all - logsumexp_pos: same value as the official
    # exp/sum/log, without its overflow and log(0) risks.
    pos_lse = scores.masked_fill(~positives, float("-inf")).logsumexp(dim=1)
    return (scores.logsumexp(dim=1) - pos_lse).mean()


def concept_distillation(
    student_region_emb: Tensor,
    concept_emb: Tensor,
    teacher_probs: Tensor | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    *,
    teacher_topk_inds: Tensor | None = None,
    teacher_topk_logits: Tensor | None = None,
) -> Tensor:
    """Concept distillation, paper eq. 3: KL(p_teacher || q_student) (``loss_region_distill``, ``batchmean``).

    q = softmax(cos(s_i, concept_n) / T) over ALL N concepts of the student pool;
    loss = sum_i sum_n p_in (log p_in - log q_in) / R  (``kl_div(..., reduction='batchmean')``
    over the kept regions). The official code takes ``log(softmax(.))``; we use
    ``log_softmax``, which is the same value without underflow.

    Teacher distribution, two forms:

    - dense (the exact official path): ``teacher_probs`` [R, N], rows summing to 1;
    - sparse, for pseudo-label shards that store only the teacher's top-k per region:
      ``teacher_topk_inds`` [R, k] and ``teacher_topk_logits`` [R, k] (the teacher's
      cos / T_teacher at those concepts, see :func:`topk_teacher`). The teacher distribution is
      then ``softmax`` over the k stored logits only, i.e. the dense distribution truncated to
      its top-k and renormalised; every other concept gets p = 0 and contributes nothing. The
      student side stays the full softmax over all N. With T = 0.01 the mass outside the
      top few concepts is usually negligible, so a moderate k matches the dense loss closely;
      with k = N it equals the dense loss exactly.

    Args:
        student_region_emb: [R, D] student features of the KEPT regions (unnormalised).
        concept_emb: [N, D] the STUDENT's concept pool (unnormalised).
        teacher_probs: [R, N] dense teacher probabilities of the same regions, or None.
        temperature: T of the student softmax (``CLSS_TEMP``, 0.01).
        teacher_topk_inds, teacher_topk_logits: [R, k] sparse teacher (both or neither).

    Returns:
        scalar loss; a graph-connected zero when R == 0.
    """
    sparse = teacher_topk_inds is not None or teacher_topk_logits is not None
    if sparse == (teacher_probs is not None):
        raise ValueError("pass either teacher_probs or (teacher_topk_inds, teacher_topk_logits)")
    if sparse and (teacher_topk_inds is None or teacher_topk_logits is None):
        raise ValueError("teacher_topk_inds and teacher_topk_logits go together")
    num_regions = student_region_emb.shape[0]
    if num_regions == 0:
        return _zero_like_graph(student_region_emb)
    s = F.normalize(student_region_emb, dim=-1)
    c = F.normalize(concept_emb, dim=-1).to(s.dtype)
    log_q = F.log_softmax(s @ c.t() / temperature, dim=1)  # [R, N]
    if not sparse:
        assert teacher_probs is not None
        if teacher_probs.shape != log_q.shape:
            raise ValueError(
                f"teacher_probs has shape {tuple(teacher_probs.shape)}, expected {tuple(log_q.shape)}"
            )
        return F.kl_div(log_q, teacher_probs.to(log_q.dtype), reduction="batchmean")
    assert teacher_topk_inds is not None and teacher_topk_logits is not None
    if teacher_topk_inds.shape != teacher_topk_logits.shape or teacher_topk_inds.shape[0] != num_regions:
        raise ValueError("teacher_topk_inds and teacher_topk_logits must both be [R, k]")
    log_p = F.log_softmax(teacher_topk_logits.to(log_q.dtype), dim=1)  # [R, k]
    p = log_p.exp()
    log_q_k = log_q.gather(1, teacher_topk_inds.long())
    # p * (log p - log q), with 0 * (anything) = 0 as kl_div does for p = 0
    terms = torch.where(p > 0, p * (log_p - log_q_k), torch.zeros_like(p))
    return terms.sum() / num_regions


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def image_text_contrastive(
    image_emb: Tensor,
    text_emb: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    gather: bool = True,
) -> Tensor:
    """Image-text contrastive loss, paper eq. 4, over the GLOBAL batch (``loss_img_txt_level``,
    gathered with gradient flow over processes).

        S = norm(img) . norm(txt)^T / T            [G, G], G = global batch
        loss = (CE(S, diag) + CE(S^T, diag)) / 2

    When ``torch.distributed`` is initialised and ``gather`` is True, both embeddings are
    L2-normalised, every process's batch is first cut to the smallest per-process batch (as the
    official ``gather_tensors``), and then all-gathered WITH gradient flow
    (:class:`_AllGather`, the counterpart of the official diffdist gather). Every process then computes the full G x G matrix and the same loss value, which
    is the official variant (labels are the global diagonal ``arange(G)``).

    Gradients: the backward of the gathering sums, over all processes, the gradient each one
    sends to a process's rows. Each process holds the same loss L, so a process's local
    embeddings receive ``world_size * dL/d(rows)``; DDP's gradient averaging divides by
    ``world_size`` again, so parameters get exactly the gradient of the global loss - the same
    as one process holding the whole global batch (and as the official code). Without DDP,
    average gradients over processes yourself.

    Args:
        image_emb: [B, D] image embeddings of this process (unnormalised).
        text_emb: [B, D] caption embeddings, row i describes image i (unnormalised).
        temperature: T (``CLSS_TEMP``, 0.01).
        gather: gather across processes when distributed (``GATHER_GPUS``).

    Returns:
        scalar loss; a graph-connected zero when the (global) batch is empty.
    """
    if image_emb.shape != text_emb.shape or image_emb.dim() != 2:
        raise ValueError(
            f"image_emb {tuple(image_emb.shape)} and text_emb {tuple(text_emb.shape)} must both be [B, D]"
        )
    img = F.normalize(image_emb, dim=-1)
    txt = F.normalize(text_emb, dim=-1).to(img.dtype)
    if gather and _dist_ready() and torch.distributed.get_world_size() > 1:
        img, txt = _gather_with_grad(img, txt)
    if img.shape[0] == 0:
        return _zero_like_graph(image_emb, text_emb)
    scores = img @ txt.t() / temperature
    labels = torch.arange(scores.shape[0], device=scores.device)
    return (F.cross_entropy(scores, labels) + F.cross_entropy(scores.t(), labels)) / 2


class _AllGather(torch.autograd.Function):
    """All-gather of equally shaped tensors with gradient flow: forward concatenates every
    process's tensor along dim 0; backward sums the gradients all processes computed for that
    concatenation and returns this process's slice (diffdist's and
    ``torch.distributed.nn.functional.all_gather``'s semantics, whose API is deprecated)."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        ctx.rank, ctx.n = dist.get_rank(), t.shape[0]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def _gather_with_grad(*tensors: Tensor) -> tuple[Tensor, ...]:
    """All-gather [B, D] tensors along dim 0 after cutting each process to the smallest B."""
    import torch.distributed as dist

    world = dist.get_world_size()
    device = tensors[0].device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError("NCCL gathering needs CUDA tensors")
    local = torch.tensor([tensors[0].shape[0]], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(local) for _ in range(world)]
    dist.all_gather(sizes, local)
    min_bs = int(min(int(s.item()) for s in sizes))
    out = []
    for t in tensors:
        out.append(_AllGather.apply(t[:min_bs].contiguous()))
    return tuple(out)


def focal_scaled_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    gamma: float = 0.5,
    bg_weight: float | None = 0.2,
) -> Tensor:
    """Focal-scaled softmax cross-entropy of the COCO transfer (official
    ``fast_rcnn.py: FastRCNNOutputs.softmax_cross_entropy_loss`` with ``USE_FOCAL_CE``; mean over N).

    Per RoI: ``CE_i * (1 - p_i,target)^gamma`` (p from the softmax over all K+1 logits; the
    scaling factor is NOT detached, as in the official code), background RoIs (target == K,
    the last column) are multiplied by ``bg_weight``, and the result is averaged over ALL RoIs
    (divide by N, not by the sum of weights). Official: ``FOCAL_SCALED_LOSS 0.5``,
    ``BG_CLS_LOSS_WEIGHT 0.2``.

    Args:
        logits: [N, K+1] classification logits, background last.
        targets: [N] long in 0..K (K = background).
        gamma: focal exponent.
        bg_weight: multiplier of background RoIs; None = no background weighting.

    Returns:
        scalar loss; a graph-connected zero when N == 0.
    """
    if logits.shape[0] == 0:
        return _zero_like_graph(logits)
    ce = F.cross_entropy(logits, targets, reduction="none")
    p_t = logits.softmax(dim=1).gather(1, targets.view(-1, 1)).squeeze(1)
    # Where p_t == 1 in floating point (easy with logits spanning +-100 at T = 0.01), the loss is
    # CE x 0^gamma = 0 but d(x^gamma)/dx is infinite for gamma < 1, so the backward pass would be
    # 0 x inf = NaN. Clamping 1 - p_t at 1e-12 keeps the value (to < 1e-6 x CE) and gives those
    # rows their true limit gradient, 0.
    loss = ce * (1.0 - p_t).clamp_min(1e-12) ** gamma
    if bg_weight is not None:
        bg = targets == logits.shape[1] - 1
        loss = torch.where(bg, loss * bg_weight, loss)
    return loss.mean()


def weighted_cross_entropy(logits: Tensor, targets: Tensor, bg_weight: float | None = 0.8) -> Tensor:
    """Class-weighted softmax cross-entropy of the LVIS transfer (official
    ``fast_rcnn.py``, ``CLSS_WEIGHTS``; divided by the sum of weights).

    ``F.cross_entropy(logits, targets, weight=w, reduction='mean')`` with w = 1 for every
    foreground class and ``bg_weight`` for the background (last) class. PyTorch's "mean"
    divides by the SUM of the targets' weights, not by N:
    loss = sum_i w_{t_i} CE_i / sum_i w_{t_i}. Official: ``BG_CLS_LOSS_WEIGHT 0.8``.

    Args:
        logits: [N, K+1] classification logits, background last.
        targets: [N] long in 0..K (K = background).
        bg_weight: weight of the background class; None = plain cross-entropy.

    Returns:
        scalar loss; a graph-connected zero when N == 0.
    """
    if logits.shape[0] == 0:
        return _zero_like_graph(logits)
    weight = None
    if bg_weight is not None:
        weight = torch.ones(logits.shape[1], dtype=logits.dtype, device=logits.device)
        weight[-1] = bg_weight
    return F.cross_entropy(logits, targets, weight=weight, reduction="mean")


def _term_weights(weights: Mapping[str, Any] | None) -> dict[str, float]:
    """Normalise the on/off-and-weight dict of :func:`pretraining_loss`."""
    out = {name: 1.0 for name in LOSS_TERMS}
    for name, value in (weights or {}).items():
        if name not in out:
            raise ValueError(f"unknown pretraining loss term {name!r}; known: {', '.join(LOSS_TERMS)}")
        if value is None or value is False:
            out[name] = 0.0
        elif value is True:
            out[name] = 1.0
        else:
            out[name] = float(value)
    return out


def pretraining_loss(
    student_region_emb: Tensor | None = None,
    concept_emb: Tensor | None = None,
    *,
    teacher_region_emb: Tensor | None = None,
    teacher_concept_emb: Tensor | None = None,
    pseudo_labels: PseudoLabels | None = None,
    teacher_topk: tuple[Tensor, Tensor] | None = None,
    image_emb: Tensor | None = None,
    text_emb: Tensor | None = None,
    weights: Mapping[str, Any] | None = None,
    temperature: float = DEFAULT_TEMPERATURE,
    teacher_temperature: float = DEFAULT_TEMPERATURE,
    concept_threshold: float = 0.1,
    gather: bool = True,
) -> dict[str, Tensor]:
    """Total RegionCLIP pretraining loss, paper eq. 5 (the three official terms summed with weight 1):

        total = w_c * L_region_concept_contrastive (eq. 2)
              + w_d * L_concept_distillation       (eq. 3)
              + w_i * L_image_text_contrastive     (eq. 4)

    ``weights`` maps term names (:data:`LOSS_TERMS`) to a weight, True (= 1.0) or
    False / 0 / None (= off: the term is not computed at all and not reported). Missing
    terms default to 1.0, the paper's setting. The ablations of Tables 5 and 7 are these
    switches.

    Region terms need ``student_region_emb`` [R, D] (ALL R regions of this process) and the
    student pool ``concept_emb`` [N, D], plus the teacher in one of three forms:

    - ``teacher_region_emb`` [R, D'] (+ ``teacher_concept_emb`` [N, D'], default
      ``concept_emb``): pseudo labels are computed here (:func:`pseudo_label_regions`);
    - ``pseudo_labels``: precomputed :class:`PseudoLabels` over the same R regions;
    - ``pseudo_labels`` with ``teacher_probs=None`` and ``teacher_topk`` =
      (indices [R, k], logits [R, k]) over all R regions (pseudo-label shards).

    The image-text term needs ``image_emb`` and ``text_emb`` [B, D].

    Returns:
        dict with one unweighted scalar per enabled term (keys from :data:`LOSS_TERMS`) and
        ``"total"``, the weighted sum.
    """
    w = _term_weights(weights)
    out: dict[str, Tensor] = {}
    need_regions = w["region_concept_contrastive"] != 0.0 or w["concept_distillation"] != 0.0
    if need_regions:
        if student_region_emb is None or concept_emb is None:
            raise ValueError("region loss terms need student_region_emb and concept_emb")
        if pseudo_labels is None:
            if teacher_region_emb is None:
                raise ValueError("region loss terms need teacher_region_emb or pseudo_labels")
            pseudo_labels = pseudo_label_regions(
                teacher_region_emb,
                concept_emb if teacher_concept_emb is None else teacher_concept_emb,
                temperature=teacher_temperature,
                threshold=concept_threshold,
            )
        keep = pseudo_labels.keep_mask
        if keep.shape[0] != student_region_emb.shape[0]:
            raise ValueError(
                f"pseudo labels cover {keep.shape[0]} regions, student has {student_region_emb.shape[0]}"
            )
        kept = student_region_emb[keep]
        if w["region_concept_contrastive"] != 0.0:
            out["region_concept_contrastive"] = region_concept_contrastive(
                kept, pseudo_labels.target_inds, concept_emb, temperature
            )
        if w["concept_distillation"] != 0.0:
            if pseudo_labels.teacher_probs is not None:
                out["concept_distillation"] = concept_distillation(
                    kept, concept_emb, pseudo_labels.teacher_probs[keep], temperature
                )
            elif teacher_topk is not None:
                inds, logits = teacher_topk
                out["concept_distillation"] = concept_distillation(
                    kept, concept_emb, None, temperature,
                    teacher_topk_inds=inds[keep], teacher_topk_logits=logits[keep],
                )
            else:
                raise ValueError("concept distillation needs teacher_probs or teacher_topk")
    if w["image_text_contrastive"] != 0.0:
        if image_emb is None or text_emb is None:
            raise ValueError("the image-text term needs image_emb and text_emb")
        out["image_text_contrastive"] = image_text_contrastive(image_emb, text_emb, temperature, gather)
    if not out:
        raise ValueError("every pretraining loss term is switched off")
    total = None
    for name, value in out.items():
        term = value * w[name]
        total = term if total is None else total + term
    assert total is not None
    out["total"] = total
    return out
