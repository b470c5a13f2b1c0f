"""Offline Detectron2 RPN port, fallback boxes (rclip_core.models.proposals) and boxes files
(rclip_core.data.boxes)."""

from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

from rclip_core.errors import InputError, WeightsError
from rclip_core.data.boxes import load_boxes_file, lookup_boxes, validate_boxes
from rclip_core.models.proposals.boxes import grid_boxes, random_boxes
from rclip_core.models.proposals.offline import (
    AnchorGenerator,
    OfflineRPN,
    OfflineRPNConfig,
    RPNSettings,
    build_offline_rpn,
    cell_anchors,
    decode_boxes,
    find_top_rpn_proposals,
    rpn_settings,
)

# --------------------------------------------------------------------------------------------
# State-dict names of the released rpn_*.pth files, written out independently of the module code
# --------------------------------------------------------------------------------------------

FROZEN_BN = ("weight", "bias", "running_mean", "running_var")
SYNC_BN = FROZEN_BN + ("num_batches_tracked",)


def _expected_keys(kind: str) -> set[str]:
    bn = SYNC_BN if kind == "lvis_866_lsj_fpn" else FROZEN_BN
    trunk = "backbone.bottom_up." if kind != "coco_c4" else "backbone."
    keys = {trunk + "stem.conv1.weight"} | {f"{trunk}stem.conv1.norm.{n}" for n in bn}
    stages = [("res2", 3), ("res3", 4), ("res4", 6), ("res5", 3)]
    if kind == "coco_c4":
        stages = stages[:3]
    for stage, blocks in stages:
        for i in range(blocks):
            convs = ["conv1", "conv2", "conv3"] + (["shortcut"] if i == 0 else [])
            for conv in convs:
                keys.add(f"{trunk}{stage}.{i}.{conv}.weight")
                keys |= {f"{trunk}{stage}.{i}.{conv}.norm.{n}" for n in bn}
    if kind != "coco_c4":
        for level in range(2, 6):
            for conv in (f"fpn_lateral{level}", f"fpn_output{level}"):
                keys.add(f"backbone.{conv}.weight")
                if kind == "lvis_866_lsj_fpn":
                    keys |= {f"backbone.{conv}.norm.{n}" for n in bn}
                else:
                    keys.add(f"backbone.{conv}.bias")
    head = "proposal_generator.rpn_head."
    convs = ["conv.conv0", "conv.conv1"] if kind == "lvis_866_lsj_fpn" else ["conv"]
    for conv in convs + ["objectness_logits", "anchor_deltas"]:
        keys |= {f"{head}{conv}.weight", f"{head}{conv}.bias"}
    return keys


@pytest.fixture(scope="module")
def rpns() -> dict[str, OfflineRPN]:
    torch.manual_seed(0)
    return {kind: build_offline_rpn(kind) for kind in
            ("lvis_866_fpn", "lvis_866_lsj_fpn", "coco_c4")}


@pytest.mark.parametrize("kind", ["lvis_866_fpn", "lvis_866_lsj_fpn", "coco_c4"])
def test_state_dict_keys_match_the_released_files(rpns, kind):
    sd = rpns[kind].state_dict()
    assert set(sd) == _expected_keys(kind)


def test_state_dict_shapes_and_sizes(rpns):
    a = rpns["lvis_866_fpn"].state_dict()
    assert a["backbone.bottom_up.stem.conv1.weight"].shape == (64, 3, 7, 7)
    assert a["backbone.bottom_up.res2.0.shortcut.weight"].shape == (256, 64, 1, 1)
    # STRIDE_IN_1X1: the first 1x1 of res3 maps 256 -> 128 (stride lives there)
    assert a["backbone.bottom_up.res3.0.conv1.weight"].shape == (128, 256, 1, 1)
    assert rpns["lvis_866_fpn"].backbone.bottom_up.res3[0].conv1.stride == (2, 2)
    assert rpns["lvis_866_fpn"].backbone.bottom_up.res3[0].conv2.stride == (1, 1)
    assert a["backbone.fpn_lateral5.weight"].shape == (256, 2048, 1, 1)
    assert a["backbone.fpn_output2.bias"].shape == (256,)
    assert a["proposal_generator.rpn_head.conv.weight"].shape == (256, 256, 3, 3)
    assert a["proposal_generator.rpn_head.objectness_logits.weight"].shape == (3, 256, 1, 1)
    assert a["proposal_generator.rpn_head.anchor_deltas.weight"].shape == (12, 256, 1, 1)
    c4 = rpns["coco_c4"].state_dict()
    assert c4["proposal_generator.rpn_head.conv.weight"].shape == (1024, 1024, 3, 3)
    assert c4["proposal_generator.rpn_head.objectness_logits.weight"].shape == (15, 1024, 1, 1)
    assert c4["proposal_generator.rpn_head.anchor_deltas.weight"].shape == (60, 1024, 1, 1)
    lsj = rpns["lvis_866_lsj_fpn"].state_dict()
    assert lsj["backbone.fpn_lateral3.norm.num_batches_tracked"].dtype == torch.int64
    assert lsj["proposal_generator.rpn_head.conv.conv1.weight"].shape == (256, 256, 3, 3)
    # the released files' sizes: R50-FPN + RPN head 27.50 M values (110.0 MB fp32); R50-C4 + RPN 18.09 M
    assert sum(v.numel() for v in a.values()) == 27_499_471
    assert sum(v.numel() for v in c4.values()) == 18_088_971
    assert abs(sum(v.numel() for v in a.values()) / 1e6 - 27.50) < 0.005
    assert abs(sum(v.numel() for v in c4.values()) / 1e6 - 18.09) < 0.005


def test_strict_load_of_renamed_checkpoint(rpns):
    rpn = rpns["lvis_866_fpn"]
    source = build_offline_rpn("lvis_866_fpn")
    with torch.no_grad():
        source.proposal_generator.rpn_head.objectness_logits.bias.fill_(1.25)
    # as stored inside a RegionCLIP checkpoint: offline_* prefixes
    stored = {k.replace("backbone.", "offline_backbone.", 1)
              .replace("proposal_generator.", "offline_proposal_generator.", 1): v
              for k, v in source.state_dict().items()}
    renamed = {k.replace("offline_backbone.", "backbone.", 1)
               .replace("offline_proposal_generator.", "proposal_generator.", 1): v
               for k, v in stored.items()}
    # early Detectron2 versions stored the cell anchors; they are dropped, not unexpected
    renamed["proposal_generator.anchor_generator.cell_anchors.0"] = torch.zeros(3, 4)
    fresh = build_offline_rpn("lvis_866_fpn")
    fresh.load_state_dict(renamed, strict=True)
    assert fresh.proposal_generator.rpn_head.objectness_logits.bias.tolist() == [1.25] * 3
    assert torch.equal(fresh.proposal_generator.anchor_generator.cell_anchors_0,
                       cell_anchors([32], [0.5, 1.0, 2.0]))
    missing = dict(renamed)
    del missing["backbone.bottom_up.res4.5.conv3.norm.running_var"]
    with pytest.raises(RuntimeError, match="running_var"):
        rpn.load_state_dict(missing, strict=True)


def test_detect_kind(rpns):
    for kind, rpn in rpns.items():
        keys = list(rpn.state_dict())
        assert OfflineRPN.detect_kind(keys) == kind
        assert OfflineRPN.detect_kind("module." + k for k in keys) == kind
        # inside a RegionCLIP file, next to the CLIP trunk that owns the plain backbone. prefix
        in_regionclip = ["backbone.layer1.0.conv1.weight", "backbone.attnpool.c_proj.weight"] + [
            "offline_" + k for k in keys]
        assert OfflineRPN.detect_kind(in_regionclip) == kind
    clip_fpn = ["backbone.bottom_up.conv1.weight", "backbone.bottom_up.layer1.0.conv1.weight",
                "proposal_generator.rpn_head.objectness_logits.weight"]
    with pytest.raises(WeightsError, match="CLIP-ResNet"):
        OfflineRPN.detect_kind(clip_fpn)
    with pytest.raises(WeightsError, match="no offline RPN"):
        OfflineRPN.detect_kind(["backbone.layer1.0.conv1.weight", "lang_encoder.ln_final.bias"])


# --------------------------------------------------------------------------------------------
# Anchors and decoding
# --------------------------------------------------------------------------------------------


def test_cell_anchors_match_detectron2():
    s = math.sqrt(2.0)
    expected = torch.tensor([[-16 * s, -8 * s, 16 * s, 8 * s],  # size 32, ratio 0.5
                             [-16.0, -16.0, 16.0, 16.0],  # size 32, ratio 1
                             [-8 * s, -16 * s, 8 * s, 16 * s]])  # size 32, ratio 2
    got = cell_anchors([32], [0.5, 1.0, 2.0])
    assert torch.allclose(got, expected, atol=1e-4)
    assert torch.allclose(got[0], torch.tensor([-22.6274, -11.3137, 22.6274, 11.3137]),
                          atol=1e-4)
    # C4: 15 anchors, size-major then ratio; index 3 = size 64, ratio 0.5 (not rounded)
    c4 = cell_anchors([32, 64, 128, 256, 512], [0.5, 1.0, 2.0])
    assert c4.shape == (15, 4)
    w = math.sqrt(64 ** 2 / 0.5)
    assert torch.allclose(c4[3], torch.tensor([-w / 2, -w / 4, w / 2, w / 4]), atol=1e-4)
    assert torch.allclose(c4[14], torch.tensor([-128 * s, -256 * s, 128 * s, 256 * s]),
                          atol=1e-3)


def test_grid_anchors_location_major_offset_zero():
    gen = AnchorGenerator([[32], [64]], strides=[4, 8])
    level0 = gen.grid_anchors(0, height=2, width=3)
    base = cell_anchors([32], [0.5, 1.0, 2.0])
    assert level0.shape == (2 * 3 * 3, 4)
    # index = (y * W + x) * A + a; location (y=1, x=2) has its anchors centred at (8, 4)
    for a in range(3):
        shift = torch.tensor([8.0, 4.0, 8.0, 4.0])
        assert torch.allclose(level0[(1 * 3 + 2) * 3 + a], base[a] + shift)
    assert torch.allclose(level0[0], base[0])  # offset 0.0: the first centre is (0, 0)
    feats = [torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 1, 2)]
    level1 = gen(feats)[1]
    # level 1 (stride 8), location (y=0, x=1): centre (8, 0)
    assert torch.allclose(level1[3:6], cell_anchors([64], [0.5, 1.0, 2.0])
                          + torch.tensor([8.0, 0.0, 8.0, 0.0]))


def test_decode_boxes_hand_computed():
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [0.0, 0.0, 10.0, 20.0]])
    deltas = torch.tensor([[0.1, 0.2, math.log(2.0), 0.0],
                           [0.0, 0.0, 10.0, -1.0]])  # dw clamped at log(1000/16)
    out = decode_boxes(deltas, anchors)
    # centre (5, 10) -> (5 + 0.1*10, 10 + 0.2*20) = (6, 14); size (20, 20)
    assert torch.allclose(out[0], torch.tensor([-4.0, 4.0, 16.0, 24.0]), atol=1e-5)
    w = 10 * 62.5  # exp(log(1000/16)) = 62.5
    h = 20 * math.exp(-1.0)
    assert torch.allclose(out[1], torch.tensor([5 - w / 2, 10 - h / 2, 5 + w / 2, 10 + h / 2]),
                          atol=1e-3)


# --------------------------------------------------------------------------------------------
# find_top_rpn_proposals
# --------------------------------------------------------------------------------------------


def test_find_top_rpn_proposals_hand_case():
    level0 = torch.tensor([[[0., 0., 10., 10.],      # 9.0 keeps
                            [0., 0., 10., 11.],      # 8.0 IoU 0.91 with the first: suppressed
                            [-5., -5., 20., 30.],    # 7.0 clipped to (0, 0, 18, 25)
                            [30., 30., 40., 40.],    # 6.0 outside the 25x18 image: empty
                            [1., 1., float("inf"), 5.],  # 5.0 non-finite box: dropped
                            [2., 2., 4., 4.]]])      # 0.5 below the per-level top-k (5)
    logits0 = torch.tensor([[9.0, 8.0, 7.0, 6.0, 5.0, 0.5]])
    level1 = torch.tensor([[[0., 0., 10., 10.5],     # 8.5 same place, other level: survives
                            [12., 0., 17., 4.],      # nan logit: dropped
                            [12., 1., 17., 5.]]])    # -3.0 keeps (raw logit, no sigmoid)
    logits1 = torch.tensor([[8.5, float("nan"), -3.0]])
    (res,) = find_top_rpn_proposals([level0, level1], [logits0, logits1], [(25, 18)],
                                    nms=0.7, pre_nms_topk=5, post_nms_topk=10)
    assert res.objectness_logits.tolist() == [9.0, 8.5, 7.0, -3.0]
    expected = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 10.5],
                             [0., 0., 18., 25.], [12., 1., 17., 5.]])
    assert torch.equal(res.boxes, expected)
    assert res.boxes.dtype == torch.float32
    (short,) = find_top_rpn_proposals([level0, level1], [logits0, logits1], [(25, 18)],
                                      nms=0.7, pre_nms_topk=5, post_nms_topk=2)
    assert short.objectness_logits.tolist() == [9.0, 8.5]
    # min_box_size: both sides must be strictly larger (10 x 10.5 is dropped at 10)
    (big,) = find_top_rpn_proposals([level0, level1], [logits0, logits1], [(25, 18)],
                                    nms=0.7, pre_nms_topk=5, post_nms_topk=10,
                                    min_box_size=10.0)
    assert big.objectness_logits.tolist() == [7.0]


def test_find_top_rpn_proposals_batch_uses_each_image_size():
    boxes = torch.tensor([[[0., 0., 50., 50.]], [[0., 0., 50., 50.]]])
    logits = torch.tensor([[1.0], [2.0]])
    res = find_top_rpn_proposals([boxes], [logits], [(40, 30), (20, 60)], 0.7, 10, 10)
    assert res[0].boxes.tolist() == [[0., 0., 30., 40.]]
    assert res[1].boxes.tolist() == [[0., 0., 50., 20.]]
    assert res[1].objectness_logits.tolist() == [2.0]


def test_settings_presets():
    assert rpn_settings("zero-shot") == RPNSettings(1000, 1000, 0.9, 0.0)
    assert rpn_settings("pretraining") == RPNSettings(1000, 300, 0.5, 0.0)
    assert rpn_settings("transfer") == RPNSettings(1000, 1000, 0.7, 0.0)
    assert rpn_settings("transfer", "coco_c4") == RPNSettings(6000, 1000, 0.7, 0.0)
    assert build_offline_rpn("coco_c4", "zero-shot").settings.pre_nms_topk == 6000
    with pytest.raises(InputError, match="preset"):
        rpn_settings("fast")
    with pytest.raises(InputError, match="kind"):
        build_offline_rpn("r101_fpn")
    with pytest.raises(InputError):
        RPNSettings(nms=0.0)


# --------------------------------------------------------------------------------------------
# Preprocessing and end-to-end forward
# --------------------------------------------------------------------------------------------


def test_preprocess_bgr_mean_and_padding(rpns):
    image = torch.zeros(3, 2, 3)
    image[0] = 200.0  # R
    image[1] = 100.0  # G
    image[2] = 10.0  # B
    image[0, 1, 2] = 0.0
    batch, sizes = rpns["lvis_866_fpn"].preprocess([image, torch.full((3, 33, 5), 255.0)])
    assert sizes == [(2, 3), (33, 5)]
    assert batch.shape == (2, 3, 64, 32)  # max (33, 5) rounded up to multiples of 32
    assert torch.allclose(batch[0, :, 0, 0], torch.tensor([10 - 103.530, 100 - 116.280,
                                                           200 - 123.675]))
    assert batch[0, 2, 1, 2].item() == pytest.approx(-123.675)
    assert torch.count_nonzero(batch[0, :, 2:, :]) == 0  # padding is 0 after normalisation
    assert torch.count_nonzero(batch[0, :, :, 3:]) == 0
    c4_batch, _ = rpns["coco_c4"].preprocess([image, torch.full((3, 33, 5), 255.0)])
    assert c4_batch.shape == (2, 3, 33, 5)  # C4: size_divisibility 0
    with pytest.raises(InputError, match=r"\[3, H, W\]"):
        rpns["coco_c4"].preprocess([torch.zeros(2, 3)])


@pytest.fixture(scope="module")
def tame_fpn() -> OfflineRPN:
    """Random-weight FPN RPN whose box deltas are zero: proposals are the clipped anchors, so
    the result can be checked exactly. (Random deltas on unnormalised random features move every
    box off the image.)"""
    torch.manual_seed(1)
    rpn = build_offline_rpn("lvis_866_fpn", RPNSettings(1000, 50, 0.7, 0.0))
    with torch.no_grad():
        rpn.proposal_generator.rpn_head.anchor_deltas.weight.zero_()
        rpn.proposal_generator.rpn_head.anchor_deltas.bias.zero_()
    return rpn


def test_forward_end_to_end(tame_fpn):
    torch.manual_seed(2)
    image = torch.rand(3, 200, 300) * 255
    tame_fpn.train()  # must stay in eval mode
    assert not tame_fpn.training and not tame_fpn.backbone.bottom_up.training
    (res,) = tame_fpn([image])
    boxes, logits = res
    assert boxes.dtype == torch.float32 and not boxes.requires_grad
    assert 0 < len(boxes) <= 50 and logits.shape == (len(boxes),)
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 200).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert torch.all(logits[:-1] >= logits[1:])
    # the best proposal carries the largest raw logit of all levels (no sigmoid)
    batch, _ = tame_fpn.preprocess([image])
    with torch.no_grad():
        features = tame_fpn.backbone(batch)
        head_logits, _ = tame_fpn.proposal_generator.rpn_head(features)
        anchors = tame_fpn.proposal_generator.anchor_generator(features)
    flat = [x.permute(0, 2, 3, 1).flatten() for x in head_logits]
    level = int(torch.stack([f.max() for f in flat]).argmax())
    idx = int(flat[level].argmax())
    assert logits[0].item() == pytest.approx(flat[level][idx].item())
    top_anchor = anchors[level][idx].clone()
    top_anchor[0::2] = top_anchor[0::2].clamp(0, 300)
    top_anchor[1::2] = top_anchor[1::2].clamp(0, 200)
    assert torch.allclose(boxes[0], top_anchor)
    # a second, smaller image in the same (padded) batch is clipped to its own size
    _, small = tame_fpn([image, image[:, :90, :120]])
    assert len(small.boxes) > 0
    assert (small.boxes[:, 2] <= 120).all() and (small.boxes[:, 3] <= 90).all()


def test_lsj_batchnorm_statistics_never_update(rpns):
    rpn = rpns["lvis_866_lsj_fpn"]
    rpn.train()
    norm = rpn.backbone.bottom_up.stem.conv1.norm
    before = norm.running_mean.clone()
    rpn([torch.rand(3, 64, 64) * 255])
    assert torch.equal(norm.running_mean, before) and norm.num_batches_tracked.item() == 0


# --------------------------------------------------------------------------------------------
# Fallback boxes
# --------------------------------------------------------------------------------------------


def test_random_boxes_seeded_grid_aligned_inside():
    boxes = random_boxes((100, 150), 64, torch.Generator().manual_seed(3))
    again = random_boxes((100, 150), 64, torch.Generator().manual_seed(3))
    assert boxes.dtype == torch.float32 and boxes.shape == (64, 4)
    assert torch.equal(boxes, again)
    assert torch.all(boxes % 8 == 0)
    assert (boxes[:, 2] <= 144).all() and (boxes[:, 3] <= 96).all()  # whole 8-px cells only
    assert (boxes[:, 2] - boxes[:, 0] >= 8).all() and (boxes[:, 3] - boxes[:, 1] >= 8).all()
    large = random_boxes((100, 150), 64, torch.Generator().manual_seed(3), min_size=30)
    assert (large[:, 2] - large[:, 0] >= 32).all() and (large[:, 3] - large[:, 1] >= 32).all()
    assert random_boxes((100, 150), 0).shape == (0, 4)
    with pytest.raises(InputError, match="too small"):
        random_boxes((100, 20), 4, min_size=40)


def test_random_boxes_distribution():
    # Two cells per axis: first cell 0 or 1 (1/2 each); last cell uniform from the first on,
    # so the spans [0, 8], [0, 16], [8, 16] have probabilities 1/4, 1/4, 1/2.
    boxes = random_boxes((16, 16), 4000, torch.Generator().manual_seed(0))
    spans = Counter(map(tuple, boxes[:, 0::2].tolist()))
    assert set(spans) == {(0.0, 8.0), (0.0, 16.0), (8.0, 16.0)}
    assert spans[(0.0, 8.0)] / 4000 == pytest.approx(0.25, abs=0.03)
    assert spans[(0.0, 16.0)] / 4000 == pytest.approx(0.25, abs=0.03)
    assert spans[(8.0, 16.0)] / 4000 == pytest.approx(0.5, abs=0.03)


def test_grid_boxes():
    boxes = grid_boxes((100, 200), scales=(0.5,), aspect_ratios=(1.0,))
    # 50x50 windows, step <= 25: x0 in 0, 25, ..., 150 (7), y0 in 0, 25, 50 (3)
    assert boxes.dtype == torch.float32 and boxes.shape == (21, 4)
    assert boxes[0].tolist() == [0.0, 0.0, 50.0, 50.0]
    assert boxes[6].tolist() == [150.0, 0.0, 200.0, 50.0]
    assert boxes[-1].tolist() == [150.0, 50.0, 200.0, 100.0]
    tall = grid_boxes((100, 200), scales=(0.5,), aspect_ratios=(2.0,))
    w, h = 50 / math.sqrt(2), 50 * math.sqrt(2)
    assert tall[0].tolist() == pytest.approx([0.0, 0.0, w, h])
    default = grid_boxes((120, 90))
    assert (default[:, :2] >= 0).all() and (default[:, 2] <= 90).all()
    assert (default[:, 3] <= 120).all()
    assert len(torch.unique(default, dim=0)) == len(default)
    # windows larger than the image collapse to the single full-image box
    assert grid_boxes((100, 100), scales=(2.0, 3.0), aspect_ratios=(1.0,)).tolist() == [
        [0.0, 0.0, 100.0, 100.0]]


# --------------------------------------------------------------------------------------------
# Boxes files
# --------------------------------------------------------------------------------------------


def _write(tmp_path, obj, name="boxes.json"):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def test_load_simple_boxes_file(tmp_path):
    p = _write(tmp_path, {"a.jpg": [[1, 2, 3, 4], [0.5, 0.5, 10, 20.25]], "b": []})
    boxes = load_boxes_file(p)
    assert set(boxes) == {"a.jpg", "b"}
    assert boxes["a.jpg"].dtype == np.float64
    assert boxes["a.jpg"].tolist() == [[1, 2, 3, 4], [0.5, 0.5, 10, 20.25]]
    assert boxes["b"].shape == (0, 4)


def test_load_coco_boxes_file(tmp_path):
    coco = {
        "images": [{"id": 1, "file_name": "val/000001.jpg", "width": 50, "height": 40},
                   {"id": 2, "file_name": "000002.jpg", "width": 50, "height": 40}],
        "annotations": [
            {"id": 10, "image_id": 1, "bbox": [1.5, 2.0, 10.0, 5.25], "iscrowd": 0},
            {"id": 11, "image_id": 1, "bbox": [0, 0, 50, 40], "iscrowd": 1},
            {"id": 12, "image_id": 1, "bbox": [3, 4, 1, 1]},
        ],
        "categories": [{"id": 1, "name": "thing"}],
    }
    boxes = load_boxes_file(_write(tmp_path, coco))
    assert boxes["val/000001.jpg"].tolist() == [[1.5, 2.0, 11.5, 7.25], [3, 4, 4, 5]]
    assert boxes["000002.jpg"].shape == (0, 4)
    assert lookup_boxes(boxes, "/data/coco/val/000001.jpg").shape == (2, 4)
    assert lookup_boxes(boxes, "000001.png").shape == (2, 4)  # by stem
    assert lookup_boxes(boxes, "000002").shape == (0, 4)


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ([[1, 2, 3, 4]], "top level must be a JSON object"),
    ({"a.jpg": [1, 2, 3, 4]}, "must be a list of 4 numbers"),
    ({"a.jpg": {"box": [1, 2, 3, 4]}}, "must be a list of"),
    ({"a.jpg": [[1, 2, 3]]}, "must have 4 numbers, got 3"),
    ({"a.jpg": [[1, 2, 3, 4, 5]]}, "must have 4 numbers, got 5"),
    ({"a.jpg": [[1, "2", 3, 4]]}, "non-numeric"),
    ({"a.jpg": [[1, True, 3, 4]]}, "non-numeric"),
    ({"a.jpg": [[1, None, 3, 4]]}, "non-numeric"),
    ('{"a.jpg": [[1, 2, NaN, 4]]}', "non-finite"),
    ('{"a.jpg": [[1, 2, Infinity, 4]]}', "non-finite"),
    ({"a.jpg": [[5, 2, 5, 4]]}, "degenerate"),
    ({"a.jpg": [[1, 9, 3, 4]]}, "degenerate"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}]}, "needs lists"),
    ({"images": [{"id": 1}], "annotations": []}, "file_name"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}],
      "annotations": [{"id": 7, "image_id": 2, "bbox": [0, 0, 1, 1]}]}, "image_id 2"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}],
      "annotations": [{"id": 7, "image_id": 1, "bbox": [0, 0, 0, 1]}]}, "annotation 7.*degenerate"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}],
      "annotations": [{"id": 7, "image_id": 1, "bbox": [0, 0, 1]}]}, "annotation 7 bbox"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}],
      "annotations": [{"id": 7, "image_id": 1}]}, "no \"bbox\""),
])
def test_bad_boxes_files(tmp_path, content, match):
    p = _write(tmp_path, content)
    with pytest.raises(InputError, match=match) as info:
        load_boxes_file(p)
    assert "\n" not in str(info.value)
    assert str(p) in str(info.value)


def test_missing_boxes_file(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_boxes_file(tmp_path / "nope.json")


def test_validate_boxes():
    boxes = np.array([[-5.0, 2.0, 20.0, 50.0], [1.0, 1.0, 2.0, 2.0]])
    out = validate_boxes(boxes, image_w=10, image_h=40, name="cat.jpg")
    assert out.tolist() == [[0.0, 2.0, 10.0, 40.0], [1.0, 1.0, 2.0, 2.0]]
    assert boxes[0, 0] == -5.0  # input untouched
    with pytest.raises(InputError, match=r"image cat.jpg: box 1 .*entirely outside the 10x40"):
        validate_boxes([[0, 0, 5, 5], [10, 0, 12, 5]], 10, 40, "cat.jpg")
    with pytest.raises(InputError, match="box 0 .*entirely outside"):
        validate_boxes([[-8, 0, 0, 5]], 10, 40, "cat.jpg")
    with pytest.raises(InputError, match="degenerate"):
        validate_boxes([[3, 3, 3, 5]], 10, 40, "cat.jpg")
    assert validate_boxes(np.zeros((0, 4)), 10, 40, "cat.jpg").shape == (0, 4)


def test_lookup_boxes(tmp_path):
    mapping = load_boxes_file(_write(tmp_path, {
        "x/a.jpg": [[0, 0, 1, 1]], "y/a.jpg": [[0, 0, 2, 2]], "b.png": [[0, 0, 3, 3]],
        "c": [[0, 0, 4, 4]]}))
    assert lookup_boxes(mapping, "x/a.jpg")[0, 2] == 1  # full name
    assert lookup_boxes(mapping, "/data/y/a.jpg")[0, 2] == 2  # path suffix breaks the tie
    assert lookup_boxes(mapping, "/elsewhere/b.png")[0, 2] == 3  # basename
    assert lookup_boxes(mapping, "imgs/c.jpg")[0, 2] == 4  # stem
    assert lookup_boxes({"b.png": np.ones((1, 4))}, "q/b.jpg").shape == (1, 4)  # plain dict
    with pytest.raises(InputError, match="several entries"):
        lookup_boxes(mapping, "/z/a.jpg")
    with pytest.raises(InputError, match="no boxes for image d.jpg"):
        lookup_boxes(mapping, "d.jpg")


def test_offline_rpn_config_gives_the_transfer_settings():
    assert OfflineRPNConfig().settings_for("coco_c4") == RPNSettings(pre_nms_topk=6000, post_nms_topk=1000, nms=0.7)
    assert OfflineRPNConfig(pre_nms_topk=300, nms=0.6).settings_for("lvis_866_fpn") == \
        RPNSettings(pre_nms_topk=300, post_nms_topk=1000, nms=0.6)
    with pytest.raises(ValueError, match="post_nms_topk"):
        OfflineRPNConfig(post_nms_topk=0)
    with pytest.raises(ValueError, match="nms"):
        OfflineRPNConfig(nms=0.0)
