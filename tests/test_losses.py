"""Losses against values worked out by hand on 2-3 regions with 2-D embeddings.

Notation in the comments: e = exp(1); with temperature T = 1 the logits are plain cosines.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rclip_core.losses import (
    LOSS_TERMS,
    PseudoLabels,
    concept_distillation,
    focal_scaled_cross_entropy,
    image_text_contrastive,
    pretraining_loss,
    pseudo_label_regions,
    region_concept_contrastive,
    teacher_concept_logits,
    topk_teacher,
    weighted_cross_entropy,
)

E = math.e
C2 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # concept 0 = x axis, concept 1 = y axis


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ----------------------------------------------------------------------------- pseudo labels

def test_pseudo_labels_threshold_is_strict_and_inputs_are_normalised():
    # r0 = x axis: logits (1, 0) -> p = (e/(e+1), 1/(e+1)) = (0.7311, 0.2689) -> concept 0
    # r1 = diagonal: logits (0.7071, 0.7071) -> p = (0.5, 0.5) exactly -> max p = 0.5, NOT > 0.5
    # r2 = (0, 2): normalised to the y axis -> p = (0.2689, 0.7311) -> concept 1
    teacher = t([1.0, 0.0], [1.0, 1.0], [0.0, 2.0])
    target, keep, probs = pseudo_label_regions(teacher, C2 * 5.0, temperature=1.0, threshold=0.5)
    assert keep.tolist() == [True, False, True]
    assert target.tolist() == [0, 1]
    p0 = E / (E + 1)
    torch.testing.assert_close(probs, t([p0, 1 - p0], [0.5, 0.5], [1 - p0, p0]))
    assert probs.shape == (3, 2) and not probs.requires_grad


def test_pseudo_labels_keep_all_when_none_passes():
    teacher = t([1.0, 0.0], [0.0, 1.0])
    target, keep, _ = pseudo_label_regions(teacher, C2, temperature=1.0, threshold=0.9)
    assert keep.tolist() == [True, True]  # 0.7311 < 0.9 everywhere -> fallback keeps all
    assert target.tolist() == [0, 1]


def test_pseudo_labels_official_temperature_is_sharp():
    # T = 0.01: logits (100, 0): p0 = 1/(1+e^-100) ~ 1
    target, keep, probs = pseudo_label_regions(t([1.0, 0.0]), C2)
    assert keep.tolist() == [True] and target.tolist() == [0]
    assert probs[0, 0].item() == pytest.approx(1.0) and probs[0, 1].item() < 1e-40


def test_teacher_topk_sorted():
    logits = teacher_concept_logits(t([1.0, 0.2]), t([0.0, 1.0], [1.0, 0.0], [1.0, 1.0]), temperature=1.0)
    inds, vals = topk_teacher(logits, 2)
    assert inds.tolist() == [[1, 2]]
    assert vals[0, 0] > vals[0, 1]
    assert topk_teacher(logits, 10)[0].shape == (1, 3)  # k clamped to N


# ----------------------------------------------------------------------------- eq. 2

def test_region_concept_contrastive_hand_values_with_duplicate_columns():
    # kept regions s0 = x, s1 = y, s2 = x with targets [0, 1, 0] -> columns c0, c1, c0
    # S (T = 1) = [[1, 0, 1], [0, 1, 0], [1, 0, 1]]
    # row 0: positives cols 0 and 2: -log(2e / (2e + 1)) = log(1 + 1/(2e)) = 0.168848
    # row 1: positive col 1 only:   -log(e / (e + 2))   = log(1 + 2/e)     = 0.551445
    # row 2 = row 0; mean = (2 * 0.168848 + 0.551445) / 3 = 0.296380
    s = t([1.0, 0.0], [0.0, 1.0], [3.0, 0.0])  # s2 unnormalised on purpose
    target = torch.tensor([0, 1, 0])
    loss = region_concept_contrastive(s, target, C2, temperature=1.0)
    row0 = math.log(1 + 1 / (2 * E))
    row1 = math.log(1 + 2 / E)
    assert loss.item() == pytest.approx((2 * row0 + row1) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(0.296380, abs=1e-6)
    # de-duplicated columns would give log(1 + 1/e) = 0.313262 for every row instead
    assert loss.item() != pytest.approx(math.log(1 + 1 / E), abs=1e-3)


def test_region_concept_contrastive_equals_official_mil_formula_at_t001():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(6, 8, generator=g)
    concepts = torch.randn(4, 8, generator=g)
    target = torch.tensor([0, 2, 2, 1, 0, 2])
    # the official MILCrossEntropy: exp / sum / log over the R x R matrix
    sn = s / s.norm(dim=-1, keepdim=True)
    te = concepts[target] / concepts[target].norm(dim=-1, keepdim=True)
    x = sn @ te.t() / 0.01
    x = x - x.max(dim=1, keepdim=True).values
    probs = x.exp() / x.exp().sum(dim=1, keepdim=True)
    label = (target.view(-1, 1) == target.view(1, -1)).float()
    official = -torch.log((label * probs).sum(dim=1)).mean()
    ours = region_concept_contrastive(s, target, concepts, temperature=0.01)
    torch.testing.assert_close(ours, official, rtol=1e-5, atol=1e-5)


def test_region_concept_contrastive_empty_is_zero_with_grad():
    s = torch.zeros(0, 2, requires_grad=True)
    loss = region_concept_contrastive(s, torch.zeros(0, dtype=torch.long), C2)
    assert loss.item() == 0.0
    loss.backward()
    assert s.grad is not None


# ----------------------------------------------------------------------------- eq. 3

def test_concept_distillation_hand_values_batchmean():
    # region 0 = x: q = (e/(e+1), 1/(e+1)) = (0.731059, 0.268941); teacher p = (0.5, 0.5)
    #   KL = 0.5 ln(0.5/0.731059) + 0.5 ln(0.5/0.268941) = 0.120115
    # region 1 = y: q = (0.268941, 0.731059); teacher p = (1, 0): KL = ln(1/0.268941) = 1.313262
    # batchmean = (0.120115 + 1.313262) / 2 = 0.716688
    s = t([1.0, 0.0], [0.0, 1.0])
    p = t([0.5, 0.5], [1.0, 0.0])
    q0 = E / (E + 1)
    kl0 = 0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / (1 - q0))
    kl1 = math.log(1 / (1 - q0))
    loss = concept_distillation(s, C2, p, temperature=1.0)
    assert loss.item() == pytest.approx((kl0 + kl1) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.716688, abs=1e-6)


def test_concept_distillation_zero_when_student_equals_teacher():
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(5, 6, generator=g)
    concepts = torch.randn(7, 6, generator=g)
    teacher_probs = teacher_concept_logits(emb, concepts, 0.01).softmax(dim=1)
    loss = concept_distillation(emb, concepts, teacher_probs, temperature=0.01)
    assert abs(loss.item()) < 1e-5
    # and it is positive for a different student
    assert concept_distillation(emb.flip(0), concepts, teacher_probs).item() > 0.1


def test_concept_distillation_sparse_topk():
    s = t([1.0, 0.0])
    q0 = E / (E + 1)  # student q = (q0, 1 - q0) at T = 1
    # k = 1: teacher puts all mass on concept 0 -> KL = -ln q0 = 0.313262
    one = concept_distillation(s, C2, None, 1.0, teacher_topk_inds=torch.tensor([[0]]),
                               teacher_topk_logits=t([5.0]))
    assert one.item() == pytest.approx(-math.log(q0), abs=1e-6)
    # k = 2 in order (concept 1, concept 0) with logits (ln 3, 0) -> p(c1) = 0.75, p(c0) = 0.25
    two = concept_distillation(s, C2, None, 1.0, teacher_topk_inds=torch.tensor([[1, 0]]),
                               teacher_topk_logits=t([math.log(3.0), 0.0]))
    expect = 0.25 * math.log(0.25 / q0) + 0.75 * math.log(0.75 / (1 - q0))
    assert two.item() == pytest.approx(expect, abs=1e-6)


def test_concept_distillation_sparse_with_all_concepts_equals_dense():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    concepts = torch.randn(5, 6, generator=g)
    logits = teacher_concept_logits(teacher, concepts, 0.01)
    dense = concept_distillation(student, concepts, logits.softmax(1))
    inds, vals = topk_teacher(logits, 5)
    sparse = concept_distillation(student, concepts, None, teacher_topk_inds=inds, teacher_topk_logits=vals)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError):
        concept_distillation(student, concepts)  # no teacher at all


# ----------------------------------------------------------------------------- eq. 4

def test_image_text_contrastive_hand_values():
    # img = [x, y], txt = [x, diag]; T = 1: S = [[1, c], [0, c]] with c = cos 45 = 0.707107
    # rows:  -ln softmax(1 | 1, c) = ln(1 + e^(c-1)),  -ln softmax(c | 0, c) = ln(1 + e^-c)
    # cols:  col 0 = (1, 0) label 0: ln(1 + e^-1);     col 1 = (c, c) label 1: ln 2
    # rows mean 0.479110, cols mean 0.503204 -> loss 0.491157
    img = t([1.0, 0.0], [0.0, 1.0])
    txt = t([2.0, 0.0], [1.0, 1.0])
    c = math.sqrt(0.5)
    rows = (math.log(1 + math.exp(c - 1)) + math.log(1 + math.exp(-c))) / 2
    cols = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    loss = image_text_contrastive(img, txt, temperature=1.0)
    assert loss.item() == pytest.approx((rows + cols) / 2, abs=1e-6)
    assert loss.item() == pytest.approx(0.491157, abs=1e-6)


def test_image_text_contrastive_not_distributed_is_local():
    img, txt = torch.randn(3, 4), torch.randn(3, 4)
    a = image_text_contrastive(img, txt, gather=True)
    b = image_text_contrastive(img, txt, gather=False)
    assert a.item() == b.item()
    with pytest.raises(ValueError):
        image_text_contrastive(img, txt[:2])


# ----------------------------------------------------------------------------- transfer losses

# logits [3, K+1 = 3], background = column 2
LOGITS = t([math.log(3.0), 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, math.log(2.0), 0.0])
TARGETS = torch.tensor([0, 2, 1])
# softmax rows: (0.6, 0.2, 0.2), (1/3, 1/3, 1/3), (0.25, 0.5, 0.25)
# p_t = 0.6, 1/3 (background row), 0.5;  CE = -ln p_t = 0.510826, 1.098612, 0.693147
CE = [-math.log(0.6), math.log(3.0), math.log(2.0)]


def test_focal_scaled_cross_entropy_hand_value():
    # per RoI CE * (1 - p_t)^0.5: 0.510826*0.632456, 1.098612*0.816497, 0.693147*0.707107
    #                           = 0.323074,          0.897013,          0.490129
    # background row x 0.2 -> 0.179403; mean over ALL 3 RoIs = 0.330869
    per = [CE[0] * 0.4 ** 0.5, CE[1] * (2 / 3) ** 0.5 * 0.2, CE[2] * 0.5 ** 0.5]
    loss = focal_scaled_cross_entropy(LOGITS, TARGETS, gamma=0.5, bg_weight=0.2)
    assert loss.item() == pytest.approx(sum(per) / 3, abs=1e-6)
    assert loss.item() == pytest.approx(0.330869, abs=1e-6)
    # gamma = 0 and no background weight is plain cross-entropy
    plain = focal_scaled_cross_entropy(LOGITS, TARGETS, gamma=0.0, bg_weight=None)
    torch.testing.assert_close(plain, F.cross_entropy(LOGITS, TARGETS))


def test_focal_scale_is_part_of_the_gradient():
    logits = LOGITS.clone().requires_grad_(True)
    focal_scaled_cross_entropy(logits, TARGETS, gamma=0.5, bg_weight=0.2).backward()
    detached = LOGITS.clone().requires_grad_(True)
    ce = F.cross_entropy(detached, TARGETS, reduction="none")
    p_t = detached.softmax(1).gather(1, TARGETS.view(-1, 1)).squeeze(1).detach()
    w = torch.tensor([1.0, 0.2, 1.0])
    (ce * (1 - p_t) ** 0.5 * w).mean().backward()
    assert not torch.allclose(logits.grad, detached.grad)  # the official code does not detach


def test_weighted_cross_entropy_divides_by_sum_of_weights():
    # sum w*CE = 0.510826 + 0.8*1.098612 + 0.693147 = 2.082863; sum w = 2.8 -> 0.743880
    loss = weighted_cross_entropy(LOGITS, TARGETS, bg_weight=0.8)
    assert loss.item() == pytest.approx((CE[0] + 0.8 * CE[1] + CE[2]) / 2.8, abs=1e-6)
    assert loss.item() == pytest.approx(0.743880, abs=1e-6)
    assert loss.item() != pytest.approx((CE[0] + 0.8 * CE[1] + CE[2]) / 3, abs=1e-3)  # not / N
    plain = weighted_cross_entropy(LOGITS, TARGETS, bg_weight=None)
    assert plain.item() == pytest.approx(sum(CE) / 3, abs=1e-6)


def test_transfer_losses_empty_batch():
    empty = torch.zeros(0, 3, requires_grad=True)
    none = torch.zeros(0, dtype=torch.long)
    assert focal_scaled_cross_entropy(empty, none).item() == 0.0
    assert weighted_cross_entropy(empty, none).item() == 0.0


# ----------------------------------------------------------------------------- eq. 5

def _pretrain_inputs(seed=3):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(6, 8, generator=g, requires_grad=True)
    teacher = student.detach() + 0.3 * torch.randn(6, 8, generator=g)
    concepts = torch.randn(5, 8, generator=g)
    img = torch.randn(3, 8, generator=g, requires_grad=True)
    txt = torch.randn(3, 8, generator=g)
    return student, teacher, concepts, img, txt


def test_pretraining_loss_composes_terms():
    student, teacher, concepts, img, txt = _pretrain_inputs()
    out = pretraining_loss(student, concepts, teacher_region_emb=teacher, image_emb=img, text_emb=txt,
                           concept_threshold=0.0)
    assert set(out) == set(LOSS_TERMS) | {"total"}
    labels = pseudo_label_regions(teacher, concepts, threshold=0.0)
    kept = student[labels.keep_mask]
    torch.testing.assert_close(out["region_concept_contrastive"],
                               region_concept_contrastive(kept, labels.target_inds, concepts))
    torch.testing.assert_close(out["concept_distillation"],
                               concept_distillation(kept, concepts, labels.teacher_probs[labels.keep_mask]))
    torch.testing.assert_close(out["image_text_contrastive"], image_text_contrastive(img, txt))
    torch.testing.assert_close(out["total"], out["region_concept_contrastive"] + out["concept_distillation"]
                               + out["image_text_contrastive"])
    out["total"].backward()
    assert student.grad is not None and img.grad is not None


def test_pretraining_loss_switches_and_weights():
    student, teacher, concepts, img, txt = _pretrain_inputs()
    full = pretraining_loss(student, concepts, teacher_region_emb=teacher, image_emb=img, text_emb=txt)
    only = pretraining_loss(student, concepts, teacher_region_emb=teacher,
                            weights={"region_concept_contrastive": False, "image_text_contrastive": 0,
                                     "concept_distillation": 2.5})
    assert set(only) == {"concept_distillation", "total"}  # image-text inputs not even needed
    torch.testing.assert_close(only["total"], 2.5 * full["concept_distillation"])
    with pytest.raises(ValueError, match="unknown pretraining loss term"):
        pretraining_loss(student, concepts, teacher_region_emb=teacher, weights={"distill": 1})
    with pytest.raises(ValueError):
        pretraining_loss(image_emb=img, text_emb=txt)  # region terms on but no regions


def test_pretraining_loss_from_shard_topk_labels():
    student, teacher, concepts, _, _ = _pretrain_inputs()
    logits = teacher_concept_logits(teacher, concepts)
    labels = pseudo_label_regions(teacher, concepts)
    region_only = {"image_text_contrastive": False}
    dense = pretraining_loss(student, concepts, pseudo_labels=labels, weights=region_only)
    sparse_labels = PseudoLabels(labels.target_inds, labels.keep_mask, None)
    sparse = pretraining_loss(student, concepts, pseudo_labels=sparse_labels,
                              teacher_topk=topk_teacher(logits, 5), weights=region_only)
    torch.testing.assert_close(sparse["total"], dense["total"], rtol=1e-5, atol=1e-5)


def test_focal_scaled_ce_is_finite_when_the_target_probability_is_one():
    # p_t == 1 in float32: the loss is CE x 0^0.5 = 0 and the true limit gradient is 0; a plain
    # (1 - p_t) ** 0.5 would give 0 x inf = NaN in the backward pass.
    from rclip_core.losses import focal_scaled_cross_entropy

    logits = torch.tensor([[-100.0, -100.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    loss = focal_scaled_cross_entropy(logits, torch.tensor([2, 0]), gamma=0.5, bg_weight=0.2)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert float(logits.grad[0].abs().max()) < 1e-30
    p = math.exp(1) / (math.exp(1) + 2)
    assert float(loss.detach()) == pytest.approx(-math.log(p) * (1 - p) ** 0.5 / 2, rel=1e-6)


def _gather_worker(rank: int, world: int, port: int, img: torch.Tensor, txt: torch.Tensor, q) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = img.shape[0] // world
        mine_i = img[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        mine_t = txt[rank * n:(rank + 1) * n].clone().requires_grad_(True)
        loss = image_text_contrastive(mine_i, mine_t, temperature=0.05, gather=True)
        loss.backward()
        q.put((rank, loss.item(), mine_i.grad.tolist(), mine_t.grad.tolist()))
    finally:
        dist.destroy_process_group()


def test_image_text_contrastive_gathered_over_two_processes_equals_one_global_batch():
    """Two gloo processes with 3 rows each: the same loss as one process holding all 6, and
    each process's rows get world_size x the global-batch gradient (DDP then averages)."""
    import socket

    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(3)
    img, txt = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    full_i, full_t = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
    ref = image_text_contrastive(full_i, full_t, temperature=0.05, gather=False)
    ref.backward()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # spawn, not fork: a fork after the parent's OpenMP pool has run can hang the child
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_gather_worker, args=(r, 2, port, img, txt, q)) for r in range(2)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for rank, loss, gi, gt in results:
        gi, gt = torch.tensor(gi), torch.tensor(gt)
        assert loss == pytest.approx(ref.item(), rel=1e-6)
        assert torch.allclose(gi, 2 * full_i.grad[rank * 3:(rank + 1) * 3], atol=1e-6)
        assert torch.allclose(gt, 2 * full_t.grad[rank * 3:(rank + 1) * 3], atol=1e-6)
