"""The inference fast path (rclip_core.models.fast) computes the same numbers as the plain modules.

Each rewrite is checked on its own against the plain computation: separable RoIAlign against
torchvision's roi_align (and a hand-computed case), BN folding against conv + BN, the folded
channels_last trunk and region head against open_clip's modules, each commutation plan of res5's
first block, chunking, the bf16 path (top-1 class and cosine distance), the switches back to the
plain path, training calls (gradients), the weight cache, and the offline RPN's folded backbone.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.ops.misc import FrozenBatchNorm2d

from rclip_core.models.clip import freeze_batch_norm
from rclip_core.models.ops import fold_conv_bn, roi_align_matmul, roi_align_separable, roi_align_weights
from rclip_core.models.region_encoder import RegionEncoder, boxes_to_rois


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest per-row relative difference ||a_i - b_i|| / ||b_i||."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    return float(((a - b).norm(dim=1) / b.norm(dim=1)).max())


# --------------------------------------------------------------------------------------------
# RoIAlign as two matrix products
# --------------------------------------------------------------------------------------------

def _boxes_with_edge_cases(W: int, H: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([W * 1.2, H * 1.2]) - 30
    wh = torch.rand(n, 2, generator=g) * torch.tensor([W * 0.8, H * 0.8])
    special = torch.tensor([
        [0, 0, W, H],                   # whole image
        [-16, -16, W + 16, H + 16],     # beyond every border
        [-50, -50, -10, -10],           # entirely outside (top-left)
        [W + 5, 0, W + 50, 20],         # entirely outside (right)
        [10, 10, 10, 10],               # empty
        [30, 30, 20, 20],               # inverted
        [0, 0, 1, 1],                   # tiny, at the corner
        [W - 3, H - 3, W, H],           # tiny, at the far corner
        [5.3, 7.1, 5.4, H * 0.9],       # a sliver
    ], dtype=torch.float32)
    return torch.cat([special, torch.cat([xy, xy + wh], 1)])


@pytest.mark.parametrize("P", [14, 7, 5])
def test_separable_roi_align_equals_torchvision(P):
    torch.manual_seed(0)
    B, C, H, W = 2, 24, 23, 37
    feat = torch.randn(B, C, H, W)
    boxes = _boxes_with_edge_cases(W * 16, H * 16, 150, seed=P)
    rois = torch.cat([torch.arange(len(boxes)).remainder(B).float()[:, None], boxes], 1)
    ref = roi_align(feat, rois, (P, P), 1 / 16, 0, aligned=True)
    w = roi_align_weights(rois, P, 1 / 16, H, W)
    out = roi_align_separable(feat.permute(0, 2, 3, 1).contiguous(), w).permute(0, 3, 1, 2)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < 2e-6 * ref.abs().max().item()
    dead = [2, 4, 5]  # outside (beyond the -1 sample margin), empty, inverted: zeros in both
    assert ref[dead].abs().max() == 0 and out[dead].abs().max() == 0
    if P % 2 == 0:  # averaged 2x2 bins = avg_pool2d after RoIAlign (res5's shortcut branch)
        out2 = roi_align_separable(feat.permute(0, 2, 3, 1).contiguous(), w.pooled(2)).permute(0, 3, 1, 2)
        assert (out2 - F.avg_pool2d(ref, 2)).abs().max().item() < 2e-6 * ref.abs().max().item()


@pytest.mark.parametrize("P", [8, 7])
def test_matmul_roi_align_backward_equals_torchvision(P):
    """The training path on CPU: torchvision's forward, and a gradient of the feature map (as
    matrix products with the separable weights) equal to torchvision's own backward, boxes
    beyond the borders, empty, inverted and in any image order included."""
    torch.manual_seed(1)
    B, C, H, W = 3, 16, 19, 29
    boxes = _boxes_with_edge_cases(W * 16, H * 16, 120, seed=P)
    order = torch.randperm(len(boxes))  # rois of the images interleaved, not grouped
    rois = torch.cat([torch.arange(len(boxes)).remainder(B).float()[order, None], boxes], 1)
    rois[rois[:, 0] == 1, 0] = 2  # image 1 has no boxes at all
    g = torch.randn(len(boxes), C, P, P)
    grads = []
    outs = []
    for fn in (lambda f: roi_align(f, rois, (P, P), 1 / 16, 0, aligned=True),
               lambda f: roi_align_matmul(f, rois, P, 1 / 16)):
        feat = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(7)).requires_grad_(True)
        out = fn(feat)
        (out * g).sum().backward()
        outs.append(out.detach())
        grads.append(feat.grad)
    assert torch.equal(outs[0], outs[1])
    assert grads[0].abs().max() > 1.0 and grads[0][1].abs().max() == 0
    assert (grads[1] - grads[0]).abs().max().item() < 1e-5 * grads[0].abs().max().item()
    assert torch.equal(grads[1][1], torch.zeros_like(grads[1][1]))
    # no boxes: an empty result, and no gradient
    feat = torch.randn(B, C, H, W, requires_grad=True)
    empty = roi_align_matmul(feat, rois[:0], P, 1 / 16)
    assert empty.shape == (0, C, P, P)


def test_separable_roi_align_hand_computed():
    """On a linear map f(y, x) = 10 y + x, bilinear sampling is exact, so each bin's value is f
    at the bin centre: for box (x1, y1, x2, y2) at scale 1, aligned (shift -0.5), P = 2 bins,
    bin (i, j) centre = (y1 - 0.5 + (i + 0.5) (y2 - y1) / 2, x1 - 0.5 + (j + 0.5) (x2 - x1) / 2)."""
    H, W = 6, 8
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32),
                            indexing="ij")
    feat = (10 * ys + xs)[None, :, :, None]  # [1, H, W, 1]
    rois = torch.tensor([[0.0, 1.0, 2.0, 5.0, 4.0]])  # x 1..5, y 2..4
    w = roi_align_weights(rois, 2, 1.0, H, W)
    out = roi_align_separable(feat, w)[0, :, :, 0]
    # y centres: 1.5 + 0.5 = 2.0, 1.5 + 1.5 = 3.0; x centres: 0.5 + 1 = 1.5, 0.5 + 3 = 3.5
    expected = torch.tensor([[21.5, 23.5], [31.5, 33.5]])
    assert torch.allclose(out, expected, atol=1e-5)
    tv = roi_align(feat.permute(0, 3, 1, 2), rois, 2, 1.0, 0, True)[0, 0]
    assert torch.allclose(tv, expected, atol=1e-5)


def test_fold_conv_bn_frozen_and_eval_batchnorm():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=False)
    x = torch.randn(2, 6, 7, 9)
    bn = torch.nn.BatchNorm2d(5)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.1, 3)
        bn.weight.uniform_(0.5, 2)
        bn.bias.normal_(0, 1)
    bn.eval()
    frozen = freeze_batch_norm(copy.deepcopy(bn))
    assert isinstance(frozen, FrozenBatchNorm2d)
    for norm in (bn, frozen):
        w, b = fold_conv_bn(conv, norm)
        with torch.no_grad():
            ref = norm(conv(x))
            out = F.conv2d(x, w, b, padding=1)
        assert (out - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
    # a conv bias is folded too
    conv_b = torch.nn.Conv2d(6, 5, 1)
    w, b = fold_conv_bn(conv_b, bn)
    with torch.no_grad():
        assert torch.allclose(F.conv2d(x, w, b), bn(conv_b(x)), atol=1e-5)


# --------------------------------------------------------------------------------------------
# A small calibrated ModifiedResNet: every rewrite against the plain modules
# --------------------------------------------------------------------------------------------

def _tiny_visual(seed: int = 0) -> torch.nn.Module:
    """open_clip ModifiedResNet [1, 2, 2, 2], width 16, 64 px (res4 256 ch, RoIAlign 4x4, res5
    512 ch, 4 heads), with BN statistics calibrated on an image so features stay informative."""
    from open_clip.modified_resnet import ModifiedResNet

    torch.manual_seed(seed)
    v = ModifiedResNet(layers=[1, 2, 2, 2], output_dim=48, heads=4, image_size=64, width=16)
    for name, m in v.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
            if name.endswith("bn3"):
                m.weight.data.fill_(0.5)
    x = torch.randn(2, 3, 96, 128)
    v.train()
    with torch.no_grad():
        res4 = v.layer3(v.layer2(v.layer1(v.stem(x))))
        rois = torch.tensor([[0, 0, 0, 128, 96], [1, 10, 20, 90, 80], [0, 40, 0, 128, 50],
                             [1, 0, 30, 60, 96]], dtype=torch.float32)
        v.layer4(roi_align(res4, rois, 4, 1 / 16, 0, True))
    v.eval()
    return freeze_batch_norm(v)


@pytest.fixture(scope="module")
def tiny():
    v = _tiny_visual()
    enc = RegionEncoder(v).eval()
    assert enc.pooler_resolution == 4
    images = [torch.rand(3, 96, 128, generator=torch.Generator().manual_seed(1)) * 255,
              torch.rand(3, 80, 112, generator=torch.Generator().manual_seed(2)) * 255]
    return enc, images


def _tiny_boxes(n: int, seed: int) -> list[torch.Tensor]:
    b = _boxes_with_edge_cases(128, 96, n, seed)
    return [b[: len(b) // 2], b[len(b) // 2:]]


def test_fast_trunk_equals_plain(tiny):
    enc, images = tiny
    x = enc.batch_images(images)
    with torch.no_grad():
        with enc.plain():
            assert not enc.uses_fast_path()
            ref = enc.trunk(x)
        assert enc.uses_fast_path()
        out = enc.trunk(x)
    with torch.inference_mode():
        out2 = enc.trunk(x)
    assert out.shape == ref.shape == (2, 256, 6, 8)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert _rel(out, ref) < 1e-5 and _rel(out2, ref) < 1e-5
    assert ref.std() > 0.1  # informative features


@pytest.mark.parametrize("per_image,plan", [(3, (False, False)), (6, (True, False)), (None, (True, True))])
def test_fast_regions_equal_plain_for_each_plan(tiny, per_image, plan):
    """res4 is 2 x 6 x 8 = 96 positions, P = 4: conv1 moves before RoIAlign above 6 boxes
    (16 positions each), the shortcut conv above 48 boxes (4 positions each, against twice the
    map)."""
    enc, images = tiny
    boxes = [b[:per_image] for b in _tiny_boxes(90, seed=per_image or 0)]
    n = sum(len(b) for b in boxes)
    assert enc._fast().plan(n, 4, 96) == plan
    with torch.no_grad():
        with enc.plain():
            res4 = enc.trunk(enc.batch_images(images))
            ref = enc.forward_features(res4, boxes)
        out = enc.forward_features(res4, boxes)
        chunked = enc.forward_features(res4, boxes, chunk_size=3)
        fast_impl = enc._fast()
        fast_impl.separable_roi = False  # torchvision's roi_align (the path on GPUs)
        try:
            tv = enc.forward_features(res4, boxes)
        finally:
            fast_impl.separable_roi = None
    assert out.shape == ref.shape == (n, 48)
    for o in (out, chunked, tv):
        assert _rel(o, ref) < 1e-5
    # boxes outside the image still get an embedding (of the zero features), as in the plain path
    assert torch.isfinite(out).all()
    assert (ref[: n // 2].std(0) > 1e-3).any()  # different boxes, different embeddings


def test_fast_head_and_res5_equal_plain(tiny):
    enc, images = tiny
    with torch.no_grad():
        with enc.plain():
            res4 = enc.trunk(enc.batch_images(images[:1]))
            pooled = enc.roi_pool(res4, _tiny_boxes(10, seed=3)[:1])
            ref5, ref = enc.res5(pooled), enc.head(pooled)
        out5, out = enc.res5(pooled), enc.head(pooled, chunk_size=4)
    assert _rel(out5, ref5) < 1e-5 and _rel(out, ref) < 1e-5


def test_switches_and_gradients_use_the_plain_modules(tiny):
    """fast=False, ``plain()`` and every gradient-enabled call (training) run open_clip's modules
    bit for bit, and gradients flow through them. The one difference in training: RoIAlign's
    backward on CPU is the separable matrix form, so gradients below RoIAlign (layer1) equal
    the plain ones up to float rounding, and those above it (layer4) exactly."""
    enc, images = tiny
    v = enc.visual
    x = enc.batch_images(images[:1])
    boxes = _tiny_boxes(6, seed=4)[:1]
    with torch.no_grad():
        direct = v.attnpool(v.layer4(roi_align(v.layer3(v.layer2(v.layer1(v.stem(x)))),
                                               boxes_to_rois(boxes, x), 4, 1 / 16, 0, True)))
        slow = RegionEncoder(v, fast=False, fast_attnpool=False)
        assert not slow.uses_fast_path()
        assert torch.equal(slow.forward_features(slow.trunk(x), boxes), direct)
    enc.train()
    try:
        params = [v.layer4[0].conv2.weight, v.layer1[0].conv1.weight]
        for p in params:
            p.requires_grad_(True)
        assert not enc.uses_fast_path()
        emb = enc.forward_features(enc.trunk(x), boxes)
        emb.square().sum().backward()
        grads = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        with enc.plain():
            ref = enc.forward_features(enc.trunk(x), boxes)
        ref.square().sum().backward()
        assert torch.equal(emb, ref)
        for g, p in zip(grads, params):
            assert g.abs().sum() > 0
        assert torch.equal(grads[0], params[0].grad)
        assert not torch.equal(grads[1], params[1].grad)  # the matrix-form backward did run
        assert (grads[1] - params[1].grad).abs().max() < 1e-5 * params[1].grad.abs().max()
    finally:
        enc.eval()
        for p in v.parameters():
            p.requires_grad_(False)
            p.grad = None


def test_weight_cache_follows_in_place_updates(tiny):
    enc, images = tiny
    v = copy.deepcopy(enc.visual)
    e = RegionEncoder(v).eval()
    x = e.batch_images(images[:1])
    boxes = _tiny_boxes(8, seed=5)[:1]
    with torch.no_grad():
        before = e.forward_features(e.trunk(x), boxes)
        v.layer4[0].conv2.weight.mul_(1.5)  # an optimizer step, in place
        v.layer2[0].bn2.running_var.mul_(2.0)
        after = e.forward_features(e.trunk(x), boxes)
        with e.plain():
            ref = e.forward_features(e.trunk(x), boxes)
    assert _rel(after, ref) < 1e-5
    assert _rel(after, before) > 1e-3


def test_bf16_autocast_keeps_top1_and_direction(tiny):
    enc, images = tiny
    boxes = _tiny_boxes(20, seed=6)
    with torch.inference_mode():
        with enc.plain():
            ref = enc.forward_features(enc.trunk(enc.batch_images(images)), boxes)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            res4 = enc.trunk(enc.batch_images(images))
            out = enc.forward_features(res4, boxes)
    assert out.dtype == torch.bfloat16  # as the plain path under autocast
    out = out.float()
    valid = ref.norm(dim=1) > 0
    assert (1 - F.cosine_similarity(out[valid], ref[valid])).max() < 1e-2
    classes = torch.cat([torch.randn(10, 48, generator=torch.Generator().manual_seed(0)), ref[:10]])
    scores_ref = F.normalize(ref) @ F.normalize(classes).T
    scores = F.normalize(out) @ F.normalize(classes).T
    # bf16 moves each cosine score by at most `err` (about 1e-2 here: 8 mantissa bits through
    # res5 and the attention pool): the top-1 class of every region whose reference margin
    # (best - second best) exceeds 2 x err cannot change, and must not. Near-ties of this
    # untrained encoder (margins of 0.003 against a bf16 error of 0.003 on some CPUs) can flip.
    err = float((scores - scores_ref).abs().max())
    assert err < 2e-2
    top2 = scores_ref.topk(2, dim=1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * err
    assert int(decided.sum()) >= 10  # of 29 regions: the check is not vacuous
    assert torch.equal(scores.argmax(1)[decided], scores_ref.argmax(1)[decided])


# --------------------------------------------------------------------------------------------
# RN50 on the fixture photos (realistic shapes, BN calibrated on the photo)
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rn50(sample_image):
    from test_region_encoder import _calibrated_rn50

    return RegionEncoder(_calibrated_rn50(sample_image).visual).eval()


@pytest.mark.parametrize("photo", ["sample_img1.jpg", "sample_img2.jpg"])
def test_rn50_photos_fp32_and_bf16(rn50, repo_root, photo):
    """fp32: the fast path within 1e-5 relative of the plain one for every box (measured: max
    6e-6 at 1 thread, 7e-6 at 2, median 3e-6; the plain float32 path is itself up to 5.5e-6 from
    a float64 run here, so that is about as close as two float32 computations get). bf16
    (autocast, the fast path's float32 stem): top-1 class of every box unchanged against fp32 and
    cosine distance below 1e-2, for 20 random class directions plus the embeddings of 10 other
    boxes."""
    from rclip_core.data.images import load_image
    from rclip_core.models.proposals.boxes import random_boxes

    enc = rn50
    prep = load_image(repo_root / "tests" / "data" / photo, short=320, max_size=576)
    h, w = prep.size
    boxes = torch.cat([random_boxes(prep.size, 24, torch.Generator().manual_seed(7)),
                       torch.tensor([[0.0, 0.0, w, h], [w - 40.0, h - 40.0, w + 20.0, h + 20.0]])])
    x = enc.batch_images([prep.tensor])
    with torch.inference_mode():
        with enc.plain():
            ref = enc.forward_features(enc.trunk(x), [boxes])
        out = enc.forward_features(enc.trunk(x), [boxes])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf = enc.forward_features(enc.trunk(x), [boxes]).float()
    rel = ((out - ref).norm(dim=1) / ref.norm(dim=1))
    assert rel.max() < 1e-5, rel
    assert ref.std(0).mean() > 0.1  # informative embeddings
    classes = torch.cat([torch.randn(20, 1024, generator=torch.Generator().manual_seed(1)), ref[-10:]])
    top_ref = (F.normalize(ref) @ F.normalize(classes).T).argmax(1)
    top_bf = (F.normalize(bf) @ F.normalize(classes).T).argmax(1)
    assert torch.equal(top_bf, top_ref)
    assert (1 - F.cosine_similarity(bf, ref)).max() < 1e-2


# --------------------------------------------------------------------------------------------
# Offline RPN: folded norms + channels_last
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lvis_866_fpn", "lvis_866_lsj_fpn"])
def test_rpn_folded_backbone_equals_plain(kind):
    from rclip_core.models.proposals.offline import build_offline_rpn

    torch.manual_seed(0)
    rpn = build_offline_rpn(kind, "zero-shot")
    with torch.no_grad():
        for m in rpn.modules():  # non-trivial norms, so folding has something to do
            if getattr(m, "running_var", None) is not None:
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.normal_(0, 0.1)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
        rpn.proposal_generator.rpn_head.anchor_deltas.weight.zero_()
        rpn.proposal_generator.rpn_head.anchor_deltas.bias.zero_()
    image = torch.rand(3, 70, 100, generator=torch.Generator().manual_seed(3)) * 255
    batch, _ = rpn.preprocess([image])
    with torch.no_grad():
        fast = rpn.backbone(batch)
        (boxes, logits), = rpn([image])
        with rpn.plain():
            ref = rpn.backbone(batch)
            (ref_boxes, ref_logits), = rpn([image])
    assert fast[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(fast, ref):
        assert (a - b).norm() / b.norm() < 1e-5
    assert len(boxes) == len(ref_boxes) > 0
    assert torch.allclose(logits, ref_logits, rtol=1e-4, atol=2e-5 * float(ref_logits.abs().max()))
    # near-equal logits may swap places: compare the proposals as sets
    def rows(t: torch.Tensor) -> list[tuple[float, ...]]:
        return sorted(tuple(round(v, 2) for v in r) for r in t.tolist())
    assert rows(boxes) == rows(ref_boxes)
