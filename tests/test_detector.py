"""The open-vocabulary detector (``fast_rcnn.py: FastRCNNOutputLayers``, ``box_regression.py``,
``mask_head.py``, ``roi_heads.py: ROIHeads``, the transfer configs): classifier, RoI sampling,
box targets and decoding, losses as assembled by the detector, soft-NMS, freezing, masks,
export / import (rclip files and the official fine-tuned layout)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, Matcher
from torchvision.ops import FrozenBatchNorm2d

from rclip_core.data.images import load_image
from rclip_core.errors import InputError, WeightsError
from rclip_core.inference import detect_images
from rclip_core.models.classifier import InferenceConfig, postprocess
from rclip_core.models.detector import Detector, DetectorConfig
from rclip_core.models.heads import BoxPredictor
from rclip_core.models.proposals.trainable import TrainableRPNConfig
from rclip_core.models.roi_heads import (BOX_REG_WEIGHTS, decode_box_deltas, fast_rcnn_losses,
                                         rasterize_polygons_within_box, sample_rois, soft_nms_gaussian)
from rclip_core.weights.loaders import is_detector_file, load_detector, load_model
from rclip_core.weights.native import save_detector, save_model

K_TRAIN, K_TEST = 3, 5


def _micro_detector(seed: int = 0, **settings) -> Detector:
    torch.manual_seed(seed)
    model = load_model(model="test-micro", random_init=True, seed=seed)
    emb = torch.randn(K_TEST, model.embed_dim)
    rpn = TrainableRPNConfig(anchor_sizes=[8.0, 16.0, 32.0], pre_nms_topk_train=200, post_nms_topk_train=50,
                             pre_nms_topk_test=200, post_nms_topk_test=50)
    s = DetectorConfig(proposals="trained", rpn=rpn, rois_per_image=16, **settings)
    return Detector(model, emb[:K_TRAIN], emb, class_names=[f"c{i}" for i in range(K_TEST)],
                    train_class_names=[f"c{i}" for i in range(K_TRAIN)], config=s)


def _batch(n: int = 2):
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 64, 80), generator=g, dtype=torch.uint8) for _ in range(n)]
    targets = [{"boxes": torch.tensor([[4.0, 6.0, 30.0, 40.0], [30.0, 10.0, 70.0, 50.0]]),
                "labels": torch.tensor([0, 2])} for _ in range(n)]
    return images, targets


# ------------------------------------------------------------------------------------------- classifier

def test_box_predictor_cosine_logits_zero_background_and_test_classes():
    train = torch.tensor([[3.0, 0.0], [0.0, 0.5]])  # unnormalised on purpose
    test = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, -1.0]])
    bp = BoxPredictor(train, test, temperature=0.01)
    x = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    bp.train()
    logits, deltas = bp(x)
    s = 1 / math.sqrt(2)
    torch.testing.assert_close(logits, torch.tensor([[100.0, 0.0, 0.0], [100 * s, 100 * s, 0.0]]))
    assert deltas.shape == (2, 4)
    bp.eval()  # eval mode: the test classifier (all classes), background still last and 0
    logits, _ = bp(x)
    torch.testing.assert_close(logits, torch.tensor([[100 * s, 100.0, 0.0, 0.0], [100.0, 100 * s, -100 * s, 0.0]]))
    assert bp.num_classes == 3
    assert set(dict(bp.named_parameters())) == {"cls_score.weight", "cls_bg_score.weight", "test_cls_score.weight",
                                                "bbox_pred.weight", "bbox_pred.bias"}
    assert float(bp.bbox_pred.weight.detach().std()) < 0.01 and float(bp.bbox_pred.bias.detach().abs().max()) == 0.0


# ------------------------------------------------------------------------------------------- RoI sampling

def test_sample_rois_single_threshold_background_label_and_gt_appended():
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    props = torch.tensor([
        [0.0, 0.0, 10.0, 20.0],    # IoU 0.5 exactly: foreground (>= 0.5)
        [0.0, 0.0, 10.0, 20.5],    # IoU 0.4878: background (no ignore band)
        [50.0, 50.0, 60.0, 60.0],  # IoU 0: background
    ])
    out = sample_rois([props], [gt], [torch.tensor([1])], num_classes=4, matcher=Matcher(0.5, 0.5),
                      sampler=BalancedPositiveNegativeSampler(512, 0.25), append_gt=True)[0]
    # 3 proposals + the appended GT box; all kept (fewer than 512)
    assert out.boxes.shape == (4, 4)
    by_box = {tuple(b.tolist()): (int(lab), int(g)) for b, lab, g in zip(out.boxes, out.labels, out.gt_index)}
    assert by_box[(0.0, 0.0, 10.0, 20.0)] == (1, 0)
    assert by_box[(0.0, 0.0, 10.0, 20.5)] == (4, -1)  # K = background
    assert by_box[(50.0, 50.0, 60.0, 60.0)] == (4, -1)
    assert by_box[(0.0, 0.0, 10.0, 10.0)] == (1, 0)  # the GT itself
    fg = out.gt_index >= 0
    assert torch.equal(out.gt_boxes[fg], gt.expand(2, 4))
    assert float(out.gt_boxes[~fg].abs().sum()) == 0.0


def test_sample_rois_512_per_image_at_most_25_percent_foreground():
    torch.manual_seed(0)
    gt = torch.tensor([[100.0, 100.0, 200.0, 200.0]])
    jitter = torch.rand(600, 4) * 8 - 4
    fg_props = gt + jitter  # IoU > 0.5 with the GT
    bg_props = torch.tensor([[300.0, 300.0, 340.0, 350.0]]) + torch.rand(900, 4) * 20
    props = torch.cat([fg_props, bg_props])
    out = sample_rois([props], [gt], [torch.tensor([0])], 7, Matcher(0.5, 0.5),
                      BalancedPositiveNegativeSampler(512, 0.25))[0]
    assert out.boxes.shape[0] == 512
    assert int((out.labels == 0).sum()) == 128 and int((out.labels == 7).sum()) == 384
    # few positives: all of them, the rest background, still 512 in all
    out = sample_rois([bg_props], [gt], [torch.tensor([0])], 7, Matcher(0.5, 0.5),
                      BalancedPositiveNegativeSampler(512, 0.25))[0]
    assert int((out.labels == 0).sum()) == 1 and out.boxes.shape[0] == 512  # only the appended GT
    # an image without ground truth: everything background
    out = sample_rois([bg_props[:10]], [torch.zeros(0, 4)], [torch.zeros(0, dtype=torch.long)], 7,
                      Matcher(0.5, 0.5), BalancedPositiveNegativeSampler(512, 0.25))[0]
    assert out.labels.tolist() == [7] * 10


# ------------------------------------------------------------------------------------------- boxes

def test_box_regression_targets_weights_and_class_agnostic_decoding():
    det = _micro_detector()
    proposal = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    gt = torch.tensor([[1.0, 2.0, 13.0, 12.0]])
    # centres (5, 5) -> (7, 7); sizes (10, 10) -> (12, 10); weights (10, 10, 5, 5)
    t = det.box_coder.encode_single(gt, proposal)
    torch.testing.assert_close(t, torch.tensor([[10 * 2 / 10, 10 * 2 / 10, 5 * math.log(1.2), 0.0]]))
    assert tuple(det.config.box_reg_weights) == BOX_REG_WEIGHTS == (10.0, 10.0, 5.0, 5.0)
    torch.testing.assert_close(decode_box_deltas(t, proposal), gt)
    # dw/dh clamp at log(1000/16): a huge delta gives a 62.5x wide box, not an overflow
    big = decode_box_deltas(torch.tensor([[0.0, 0.0, 5 * 100.0, 0.0]]), proposal)
    torch.testing.assert_close(big, torch.tensor([[5 - 312.5, 0.0, 5 + 312.5, 10.0]]))


def test_postprocess_threshold_nms_topk_and_soft_nms_values():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 20.0], [30.0, 30.0, 40.0, 40.0]])
    # K = 2 classes + background; box 1 overlaps box 0 with IoU 0.5
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.8, 0.1, 0.1], [0.001, 0.6, 0.399]])
    hard = postprocess(boxes, probs, (50, 50), None, InferenceConfig(score_thresh=0.001, nms=0.5))
    # class 0: box 1 suppressed by box 0 (IoU 0.5 > 0.5? no: NMS drops IoU > thresh) -> both stay
    assert hard.classes.tolist() == [0, 0, 1, 1, 1] and hard.box_index.tolist() == [0, 1, 2, 1, 0]
    assert hard.scores.tolist() == pytest.approx([0.9, 0.8, 0.6, 0.1, 0.05])  # 0.001 is not > 0.001
    hard = postprocess(boxes, probs, (50, 50), None, InferenceConfig(nms=0.4, max_dets=2))
    assert hard.box_index.tolist() == [0, 2] and hard.classes.tolist() == [0, 1]
    soft = postprocess(boxes, probs, (50, 50), None, InferenceConfig(soft_nms=True, soft_nms_sigma=0.5))
    got = {(int(b), int(c)): float(s) for b, c, s in zip(soft.box_index, soft.classes, soft.scores)}
    decay = math.exp(-(0.5 ** 2) / 0.5)
    assert got[(0, 0)] == pytest.approx(0.9)
    assert got[(1, 0)] == pytest.approx(0.8 * decay)
    assert got[(2, 1)] == pytest.approx(0.6)
    assert got[(1, 1)] == pytest.approx(0.1)  # the higher-scoring box of class 1 does not overlap it
    assert got[(0, 1)] == pytest.approx(0.05 * decay)
    assert soft.scores.tolist() == sorted(soft.scores.tolist(), reverse=True)
    idx, sc = soft_nms_gaussian(boxes[:2], torch.tensor([0.002, 0.0015]), 0.5, 0.001)
    assert idx.tolist() == [0] and sc.tolist() == pytest.approx([0.002])  # 0.0015 x 0.61 <= 0.001: pruned
    idx, sc = soft_nms_gaussian(boxes[:2], torch.tensor([0.002, 0.0017]), 0.5, 0.001)
    assert idx.tolist() == [0, 1] and sc.tolist() == pytest.approx([0.002, 0.0017 * decay])


def test_fusion_with_rpn_logits_raw_form():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    logits = torch.tensor([4.0, -1.0])  # a negative raw logit -> NaN -> dropped (CLIPFastRCNN.inference)
    s = InferenceConfig(fusion="official", score_thresh=0.0)
    dets = postprocess(boxes, probs, (50, 50), logits, s)
    assert dets.box_index.tolist() == [0] and dets.scores.tolist() == pytest.approx([math.sqrt(0.5 * 4.0)])
    assert dets.probs.tolist() == pytest.approx([0.5])


# ------------------------------------------------------------------------------------------- losses

def test_detector_loss_assembly_hand_values():
    # two foreground RoIs (classes 0, 1) and one background (K = 2)
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 3.0]], requires_grad=True)
    labels = torch.tensor([0, 1, 2])
    deltas = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 2.0], [9.0, 9.0, 9.0, 9.0]])
    targets = torch.zeros(3, 4)

    def ce_p(row, t):
        z = sum(math.exp(v) for v in row)
        p = math.exp(row[t]) / z
        return -math.log(p), p

    rows = logits.tolist()
    focal = []
    for i, t in enumerate(labels.tolist()):
        ce, p = ce_p(rows[i], t)
        focal.append(ce * (1 - p) ** 0.5 * (0.2 if t == 2 else 1.0))
    out = fast_rcnn_losses(logits, deltas, labels, targets, focal_gamma=0.5, bg_weight=0.2)
    assert float(out["loss_cls"].detach()) == pytest.approx(sum(focal) / 3, rel=1e-6)
    assert float(out["loss_box_reg"]) == pytest.approx((0.5 + 1.0 + 2.0) / 3)  # background rows ignored, / N
    weighted = [ce_p(rows[i], t)[0] * (0.8 if t == 2 else 1.0) for i, t in enumerate(labels.tolist())]
    out = fast_rcnn_losses(logits, deltas, labels, targets, focal_gamma=None, bg_weight=0.8)
    assert float(out["loss_cls"].detach()) == pytest.approx(sum(weighted) / 2.8, rel=1e-6)  # / sum of weights


def test_focal_loss_saturated_rows_give_finite_gradients():
    # p_target == 1 in float32: CE x 0^0.5 = 0, but the plain backward is 0 x inf = NaN
    logits = torch.tensor([[-100.0, -100.0, 0.0], [1.0, 0.0, 0.0]], requires_grad=True)
    labels = torch.tensor([2, 0])
    out = fast_rcnn_losses(logits, torch.zeros(2, 4), labels, torch.zeros(2, 4), 0.5, 0.2)
    out["loss_cls"].backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad[0].abs().sum()) == 0.0
    z = math.exp(1) + 2
    p = math.exp(1) / z
    assert float(out["loss_cls"].detach()) == pytest.approx(-math.log(p) * (1 - p) ** 0.5 / 2, rel=1e-6)


def test_training_forward_losses_and_frozen_parameter_sets():
    det = _micro_detector()
    v = det.regionclip.clip.visual
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in det.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in v.modules()) > 10
    trainable = {n for n, _ in det.trainable_parameters()}
    prefixes = {n.split(".")[3] if n.startswith("regionclip.clip.visual.") else n.split(".")[0] for n in trainable}
    assert prefixes == {"layer2", "layer3", "layer4", "attnpool", "box_predictor", "proposal_generator"}
    assert {n for n in trainable if n.startswith("box_predictor")} == {"box_predictor.bbox_pred.weight",
                                                                       "box_predictor.bbox_pred.bias"}
    assert "regionclip.clip.visual.attnpool.k_proj.bias" not in trainable  # cancels in the softmax
    assert not any(p.requires_grad for p in det.regionclip.clip.transformer.parameters())
    frozen = {n: p.detach().clone() for n, p in det.named_parameters() if not p.requires_grad}
    assert "regionclip.clip.visual.conv1.weight" in frozen and "regionclip.clip.visual.layer1.0.conv1.weight" in frozen
    before = {n: p.detach().clone() for n, p in det.trainable_parameters()}
    det.train()
    images, targets = _batch()
    losses = det(images, targets)
    assert set(losses) == {"loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    from rclip_core.engine.optim import build_sgd

    opt = build_sgd(det, lr=0.5)
    sum(losses.values()).backward()
    opt.step()
    for n, p in det.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    changed = [n for n, p in det.trainable_parameters() if not torch.equal(p, before[n])]
    assert "box_predictor.bbox_pred.weight" in changed and "regionclip.clip.visual.layer2.0.conv1.weight" in changed
    with pytest.raises(RuntimeError):
        det.eval()(images, targets)


def test_freeze_visual_freeze_at_stages():
    from rclip_core.models.clip import freeze_visual

    v = load_model(model="test-micro", random_init=True).clip.visual
    stages = [{"conv1", "conv2", "conv3"}, {"layer1"}, {"layer2"}, {"layer3"}, {"layer4"}]

    def trainable() -> set[str]:
        return {n.split(".")[0] for n, p in v.named_parameters() if p.requires_grad}

    for freeze_at in range(6):
        freeze_visual(v, freeze_at)
        assert trainable() == set().union(*stages[freeze_at:]) | {"attnpool"}
        assert not v.attnpool.k_proj.bias.requires_grad
    with pytest.raises(InputError, match="freeze_at"):
        freeze_visual(v, 6)


def test_set_test_proposals_trained_rpn():
    det = _micro_detector()
    det.set_test_proposals(post_nms_topk=7, nms=0.6)
    rpn = det.proposal_generator
    assert (rpn._pre_nms_top_n["testing"], rpn._post_nms_top_n["testing"], rpn.nms_thresh) == (200, 7, 0.6)
    assert (det.config.rpn.pre_nms_topk_test, det.config.rpn.post_nms_topk_test, det.config.rpn.nms) == (200, 7, 0.6)
    with pytest.raises(InputError, match="nms"):
        det.set_test_proposals(nms=1.5)


def test_settings_validation():
    with pytest.raises(ValueError, match="fusion"):
        InferenceConfig(fusion="max")
    with pytest.raises(ValueError, match="proposals"):
        DetectorConfig(proposals="grid")
    with pytest.raises(ValueError, match="rois_per_image"):
        DetectorConfig(rois_per_image=0)
    with pytest.raises(ValueError, match="nms"):
        TrainableRPNConfig(nms=0.0)
    assert InferenceConfig.lvis().to_dict()["max_dets"] == 300
    assert DetectorConfig.lvis().to_dict()["bg_weight"] == 0.8
    assert InferenceConfig.from_dict({**InferenceConfig().to_dict(), "future_key": 1}) == InferenceConfig()
    assert DetectorConfig.from_dict({**DetectorConfig().to_dict(), "future_key": 1}) == DetectorConfig()


# ------------------------------------------------------------------------------------------- masks

def test_rasterize_polygon_within_box():
    square = [np.array([2.0, 2.0, 6.0, 2.0, 6.0, 6.0, 2.0, 6.0])]
    m = rasterize_polygons_within_box(square, np.array([2.0, 2.0, 10.0, 10.0]), 4)
    # the box spans 8 px, the mask 4 cells of 2 px: the square fills the top-left 2 x 2 cells
    assert m.astype(int).tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_mask_head_loss_and_inference_masks():
    det = _micro_detector(mask_head=True)
    images, targets = _batch(1)
    targets[0]["polygons"] = [[np.array([4.0, 6.0, 30.0, 6.0, 30.0, 40.0, 4.0, 40.0])],
                              [np.array([30.0, 10.0, 70.0, 10.0, 50.0, 50.0])]]
    det.train()
    losses = det(images, targets)
    assert "loss_mask" in losses and torch.isfinite(losses["loss_mask"])
    assert float(losses["loss_mask"].detach()) == pytest.approx(math.log(2), abs=0.05)  # logits start near 0
    sum(losses.values()).backward()
    assert det.mask_head.deconv.weight.grad is not None
    det.eval()
    dets = det.inference([images[0]])[0]
    P = det.encoder.pooler_resolution
    assert dets.masks.shape == (len(dets), 1, P, P)
    pasted = dets.paste_masks((64, 80))
    assert pasted.shape == (len(dets), 64, 80) and pasted.dtype == torch.uint8


# ------------------------------------------------------------------------------------------- export

def _image(path, w=80, h=60):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_export_import_round_trip_detects_alone_and_with_new_classes(tmp_path):
    det = _micro_detector()
    det.eval()
    prep = load_image(_image(tmp_path / "img.png"), short=64, max_size=128)
    want = detect_images(det, [prep])[0]
    assert len(want) > 0 and want.boxes[:, 2].max() <= 80 and want.boxes[:, 3].max() <= 60  # original pixels
    path = save_detector(det, tmp_path / "detector.safetensors")
    assert is_detector_file(path)
    loaded = load_detector(path)
    assert loaded.class_names == [f"c{i}" for i in range(K_TEST)] and loaded.train_class_names == ["c0", "c1", "c2"]
    assert loaded.config == det.config and loaded.inference_config == det.inference_config
    assert loaded.proposal_generator is not None
    got = detect_images(loaded, [prep])[0]
    torch.testing.assert_close(got.boxes, want.boxes)
    torch.testing.assert_close(got.scores, want.scores)
    assert torch.equal(got.classes, want.classes)
    loaded.update_inference(max_dets=2, score_thresh=0.0)  # --max-dets / --score-thresh at detection time
    assert len(detect_images(loaded, [prep])[0]) == 2
    with pytest.raises(InputError, match="after training"):
        loaded.update_inference(rois_per_image=4)
    with pytest.raises(InputError, match="fusion"):
        loaded.update_inference(fusion="max")
    loaded.update_inference(max_dets=det.inference_config.max_dets, score_thresh=det.inference_config.score_thresh)
    # a new vocabulary at detection time, embedded with the text tower inside the file
    from rclip_core.engine.tasks.detection import set_detector_classes

    set_detector_classes(loaded, ["red circle", "blue square"], templates="single")
    assert loaded.class_names == ["red circle", "blue square"] and loaded.test_embeddings.shape == (2, 32)
    out = detect_images(loaded, [prep])[0]
    assert len(out) > 0 and set(out.classes.tolist()) <= {0, 1}
    # without the text tower new names cannot be embedded, but the stored vocabulary still works
    small = save_detector(det, tmp_path / "notext.safetensors", include_text=False)
    assert small.stat().st_size < path.stat().st_size
    bare = load_detector(small)
    torch.testing.assert_close(detect_images(bare, [prep])[0].scores, want.scores)
    with pytest.raises(InputError, match="no text encoder"):
        set_detector_classes(bare, ["x"])
    # a plain model file is not a detector
    save_model(det.regionclip, tmp_path / "plain.safetensors")
    assert not is_detector_file(tmp_path / "plain.safetensors")
    with pytest.raises(WeightsError, match="not a detector"):
        load_detector(tmp_path / "plain.safetensors")


def test_official_finetuned_layout_loads_by_name(tmp_path):
    torch.manual_seed(0)
    model = load_model(model="test-micro", random_init=True)
    sd = {"backbone." + k[len("visual."):]: v for k, v in model.clip.state_dict().items() if k.startswith("visual.")}
    D = model.embed_dim
    sd.update({"roi_heads.box_predictor.cls_score.weight": torch.randn(48, D),
               "roi_heads.box_predictor.test_cls_score.weight": torch.randn(65, D),
               "roi_heads.box_predictor.cls_bg_score.weight": torch.zeros(1, D),
               "roi_heads.box_predictor.bbox_pred.weight": torch.randn(4, D),
               "roi_heads.box_predictor.bbox_pred.bias": torch.randn(4)})
    torch.save({"model": sd}, tmp_path / "regionclip_finetuned-coco_micro.pth")
    assert is_detector_file(tmp_path / "regionclip_finetuned-coco_micro.pth")
    det = load_detector(tmp_path / "regionclip_finetuned-coco_micro.pth")
    assert det.num_train_classes == 48 and det.test_embeddings.shape == (65, D)
    assert det.class_names[:3] == ["person", "bicycle", "car"] and det.class_names[4] == "airplane"
    torch.testing.assert_close(det.box_predictor.bbox_pred.bias, sd["roi_heads.box_predictor.bbox_pred.bias"])
    assert det.inference_config.max_dets == 100 and det.inference_config.fusion == "none"  # the COCO test settings
    with pytest.raises(InputError, match="no offline RPN"):  # this file carries no RPN
        det.inference([torch.zeros(3, 64, 64)])
    del sd["roi_heads.box_predictor.bbox_pred.weight"]
    torch.save({"model": sd}, tmp_path / "pretrained.pth")
    with pytest.raises(WeightsError, match="not a fine-tuned detector"):
        load_detector(tmp_path / "pretrained.pth")


def test_offline_rpn_detector_frozen_transfer_settings_and_export(tmp_path):
    from rclip_core.models.proposals.offline import RPNSettings, build_offline_rpn
    from rclip_core.weights.loaders import attach_rpn

    torch.manual_seed(0)
    model = load_model(model="test-micro", random_init=True)
    attach_rpn(model, build_offline_rpn("coco_c4").state_dict())
    assert model.rpn.settings.nms == 0.9  # load_model's zero-shot preset ...
    emb = torch.randn(K_TEST, model.embed_dim)
    det = Detector(model, emb[:K_TRAIN], emb, config=DetectorConfig(rois_per_image=8))
    # ... becomes the transfer one: NMS 0.7, 1000 proposals, C4 pre-NMS 6000 (Base-RCNN-C4.yaml)
    assert model.rpn.settings == RPNSettings(pre_nms_topk=6000, post_nms_topk=1000, nms=0.7)
    assert det.proposal_generator is None
    assert not any(p.requires_grad for p in model.rpn.parameters())
    det.train()
    assert not model.rpn.training  # always in eval mode
    images, targets = _batch(1)
    losses = det(images, targets)
    assert set(losses) == {"loss_cls", "loss_box_reg"}
    path = save_detector(det, tmp_path / "det.safetensors", include_text=False)
    loaded = load_detector(path)
    assert loaded.regionclip.rpn.kind == "coco_c4" and loaded.config.proposals == "offline"
    for k, v in model.rpn.state_dict().items():
        assert torch.equal(loaded.regionclip.rpn.state_dict()[k], v), k
    loaded.eval()
    a = loaded.inference([images[0]])[0]
    det.eval()
    b = det.inference([images[0]])[0]
    torch.testing.assert_close(a.boxes, b.boxes)
    torch.testing.assert_close(a.scores, b.scores)
