"""Parity with the official RegionCLIP code where it is easy to get a number slightly wrong:
soft-NMS scores (``detectron2/layers/soft_nms.py`` of the official fork, as
``detectron2/modeling/roi_heads/fast_rcnn.py: fast_rcnn_inference_single_image`` calls it),
separate offline-RPN files (``MODEL.CLIP.BB_RPN_WEIGHTS``), the pretraining input path
(``detectron2/data/transforms/build.py: build_clip_transforms`` with the vendored torchvision
``Resize``, ``clip_rcnn.py: PretrainFastRCNN``) and the protocol `rclip eval` runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from rclip_core.models.classifier import InferenceConfig, postprocess
from rclip_core.models.roi_heads import batched_soft_nms_gaussian, pairwise_iou, soft_nms_gaussian


# ------------------------------------------------------------------------------------------
# Soft-NMS: a reference written step by step from the official algorithm
# ------------------------------------------------------------------------------------------

def _reference_iou_row(top: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of one box with many, the way Detectron2's ``pairwise_iou`` computes it."""
    area_top = (top[2] - top[0]) * (top[3] - top[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    w = (torch.minimum(top[2], boxes[:, 2]) - torch.maximum(top[0], boxes[:, 0])).clamp(min=0)
    h = (torch.minimum(top[3], boxes[:, 3]) - torch.maximum(top[1], boxes[:, 1])).clamp(min=0)
    inter = w * h
    out = torch.zeros_like(inter)
    pos = inter > 0
    out[pos] = inter[pos] / (area_top + areas[pos] - inter[pos])
    return out


def reference_batched_soft_nms(boxes, scores, classes, sigma=0.5, prune=0.001):
    """One loop over ALL classes on class-shifted boxes (shift = class * (max coordinate + 1)):
    pick the global best remaining (first on ties), decay every remaining score by
    exp(-IoU^2 / sigma), drop the pick and every score <= prune; the picks in order."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    shift = classes.to(boxes.dtype) * (boxes.max() + 1)
    b = boxes + shift[:, None]
    s = scores.clone()
    ids = torch.arange(s.shape[0])
    out_ids, out_scores = [], []
    while s.numel():
        t = int(torch.argmax(s))
        out_ids.append(int(ids[t]))
        out_scores.append(float(s[t]))
        s = s * torch.exp(-_reference_iou_row(b[t], b) ** 2 / sigma)
        alive = s > prune
        alive[t] = False
        b, s, ids = b[alive], s[alive], ids[alive]
    return torch.tensor(out_ids, dtype=torch.int64), torch.tensor(out_scores, dtype=torch.float32)


def reference_postprocess_soft(boxes, probs_with_bg, image_size, cfg):
    """``fast_rcnn_inference_single_image`` with ``soft_nms_enabled`` (no fusion): threshold,
    batched soft-NMS with the class as group, the decayed scores, the first ``max_dets`` picks."""
    h, w = image_size
    b = boxes.clone()
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    scores = probs_with_bg[:, :-1]
    mask = scores > cfg.score_thresh
    inds = mask.nonzero()
    keep, new_scores = reference_batched_soft_nms(b[inds[:, 0]], scores[mask], inds[:, 1], cfg.soft_nms_sigma,
                                                  cfg.soft_nms_prune)
    keep, new_scores = keep[: cfg.max_dets], new_scores[: cfg.max_dets]
    return inds[keep, 0], inds[keep, 1], new_scores


def _clustered_case(n_classes: int, n_boxes: int, seed: int, image=(749, 1333)):
    """Overlapping clusters of boxes (many IoUs between 0.3 and 0.9) and softmax class scores."""
    g = torch.Generator().manual_seed(seed)
    h, w = image
    centres = torch.rand(max(2, n_boxes // 8), 2, generator=g) * torch.tensor([w, h])
    c = centres[torch.randint(0, centres.shape[0], (n_boxes,), generator=g)]
    c = c + torch.randn(n_boxes, 2, generator=g) * 6
    wh = 30 + torch.rand(n_boxes, 2, generator=g) * 150
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1)
    logits = torch.randn(n_boxes, n_classes + 1, generator=g) * 3
    agreed = sorted({0, n_classes // 2, n_classes - 2, n_classes - 1})  # high class indices: big shifts
    logits[:, agreed] += 4
    return boxes, logits.softmax(dim=1)


def _match(ours, ref_boxes, ref_classes, ref_scores):
    assert ours.box_index.tolist() == ref_boxes.tolist()
    assert ours.classes.tolist() == ref_classes.tolist()
    return float((ours.scores - ref_scores).abs().max()) if len(ref_scores) else 0.0


@pytest.mark.parametrize("n_classes,n_boxes,thresh,max_dets,seed", [
    (1203, 80, 0.02, 300, 0),  # LVIS: big class shifts round the coordinates
    (1203, 60, 0.01, 100, 6),
    (65, 80, 0.01, 100, 2),  # COCO transfer test (65 test classes)
    (3, 60, 0.0, 1000, 3),  # a threshold below the prune threshold
])
def test_soft_nms_scores_match_the_official_algorithm(n_classes, n_boxes, thresh, max_dets, seed):
    boxes, probs = _clustered_case(n_classes, n_boxes, seed)
    cfg = InferenceConfig(score_thresh=thresh, max_dets=max_dets, soft_nms=True)
    ours = postprocess(boxes, probs, (749, 1333), None, cfg)
    ref = reference_postprocess_soft(boxes, probs, (749, 1333), cfg)
    assert len(ours) == len(ref[0]) > 0
    assert _match(ours, *ref) <= 1e-6
    assert ours.scores.tolist() == sorted(ours.scores.tolist(), reverse=True)


def test_soft_nms_iou_is_computed_on_the_class_shifted_boxes():
    """Class 1202's boxes are shifted by 1202 * 1334 px: in float32 their coordinates round to
    1/8 px, and the official IoUs (so the decays) are those of the rounded boxes."""
    boxes = torch.tensor([[100.3, 200.7, 163.9, 251.1], [101.1, 204.2, 160.6, 255.9],
                          [0.0, 0.0, 1333.0, 749.0]])
    classes = torch.tensor([1202, 1202, 0])
    scores = torch.tensor([0.9, 0.8, 0.7])
    keep, new = batched_soft_nms_gaussian(boxes, scores, classes)
    rk, rs = reference_batched_soft_nms(boxes, scores, classes)
    assert keep.tolist() == rk.tolist() == [0, 2, 1]
    torch.testing.assert_close(new, rs, rtol=0, atol=1e-7)
    plain = 0.8 * math.exp(-float(pairwise_iou(boxes[:1], boxes[1:2])) ** 2 / 0.5)
    assert abs(float(new[2]) - plain) > 1e-5  # the unshifted IoU (the old rclip) is measurably off


def test_soft_nms_empty_box_is_kept_undecayed():
    """Boxes clipped to zero width: Detectron2's IoU is 0 (no intersection), so they neither
    decay nor are decayed; torchvision's box_iou gives 0/0 = NaN between two empty boxes, which
    used to drop the second one."""
    boxes = torch.tensor([[5.0, 5.0, 5.0, 30.0], [8.0, 2.0, 8.0, 40.0], [0.0, 0.0, 20.0, 20.0],
                          [1.0, 1.0, 21.0, 21.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    keep, new = soft_nms_gaussian(boxes, scores)
    assert keep.tolist() == [0, 1, 2, 3] and torch.isfinite(new).all()
    assert new[:3].tolist() == pytest.approx([0.9, 0.8, 0.7])
    rk, rs = reference_batched_soft_nms(boxes, scores, torch.zeros(4, dtype=torch.int64))
    assert keep.tolist() == rk.tolist()
    torch.testing.assert_close(new, rs, rtol=0, atol=1e-7)


def test_soft_nms_first_iteration_prunes_every_class():
    """Below-prune scores survive only as the very first pick of the whole image: a class whose
    best score is <= prune is dropped, as in the official single loop over all classes."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0], [70.0, 70.0, 80.0, 80.0]])
    scores = torch.tensor([0.5, 0.0008, 0.0009])
    classes = torch.tensor([0, 1, 2])
    keep, new = batched_soft_nms_gaussian(boxes, scores, classes, prune=0.001)
    assert keep.tolist() == reference_batched_soft_nms(boxes, scores, classes)[0].tolist() == [0]
    low = torch.tensor([0.0005, 0.0008, 0.0009])  # everything below prune: only the best is kept
    keep, new = batched_soft_nms_gaussian(boxes, low, classes, prune=0.001)
    assert keep.tolist() == [2] and new.tolist() == pytest.approx([0.0009])


def test_soft_nms_ties_across_classes_follow_the_global_pick_order():
    """Equal decayed scores in two classes: the official loop takes the lower input index first,
    which decides which one the max_dets cut keeps."""
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0]])
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.5, 0.2, 0.3]])  # box 0: class 1; box 1: class 0
    cfg = InferenceConfig(score_thresh=0.3, max_dets=1, soft_nms=True)
    ours = postprocess(boxes[:2], probs, (20, 20), None, cfg)
    ref = reference_postprocess_soft(boxes[:2], probs, (20, 20), cfg)
    assert ours.box_index.tolist() == ref[0].tolist() == [0] and ours.classes.tolist() == [1]


# ------------------------------------------------------------------------------------------
# Separate RPN files (MODEL.CLIP.BB_RPN_WEIGHTS) against the RPN inside a checkpoint
# ------------------------------------------------------------------------------------------

def _with_bn_stats(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A freshly built state dict with non-trivial frozen-BN statistics and affine terms (a
    built model has mean 0 / var 1, which would make "loaded" and "reset" look the same)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in state.items():
        if k.endswith("running_var"):
            v = 0.8 + 0.4 * torch.rand(v.shape, generator=g)
        elif k.endswith("running_mean"):
            v = 0.05 * torch.randn(v.shape, generator=g)
        elif k.endswith(("bn1.weight", "bn2.weight", "bn3.weight", "norm.weight")) or ".downsample.1.weight" in k:
            v = 0.9 + 0.2 * torch.rand(v.shape, generator=g)
        elif k.endswith("rpn_head.anchor_deltas.weight"):
            v = v * 1e-4  # boxes near the anchors: many valid proposals from a random RPN
        elif k.endswith("rpn_head.objectness_logits.weight"):
            v = v * 1e-3  # logits of a few units, both signs (the official fusion drops negative ones)
        out[k] = v.clone()
    return out


def _regionclip_file(clip_state, rpn_state=None, text=True, box_predictor=None) -> dict:
    """The layout of ``regionclip_pretrained-cc_rn50.pth`` / ``regionclip_finetuned-coco_rn50.pth``:
    ``backbone.*``, ``lang_encoder.*``, ``offline_backbone.*`` / ``offline_proposal_generator.*``,
    ``roi_heads.box_predictor.*``."""
    model = {"backbone." + k[len("visual."):]: v for k, v in clip_state.items() if k.startswith("visual.")}
    if text:
        model.update({"lang_encoder." + k: v for k, v in clip_state.items()
                      if not k.startswith("visual.") and k != "logit_scale"})
    if rpn_state is not None:
        model.update({"offline_" + k: v for k, v in rpn_state.items()})
    if box_predictor:
        model.update({"roi_heads.box_predictor." + k: v for k, v in box_predictor.items()})
    return {"model": model, "iteration": 0}


def _reset_backbone_bn(obj: dict) -> dict:
    """What the official BB_RPN_WEIGHTS path does to the CLIP backbone on current torch: every
    frozen-BN running mean / variance set to 0 / 1."""
    model = dict(obj["model"])
    for k, v in list(model.items()):
        if k.startswith("backbone.") and k.endswith("running_mean"):
            model[k] = torch.zeros_like(v)
        elif k.startswith("backbone.") and k.endswith("running_var"):
            model[k] = torch.ones_like(v)
    return {**obj, "model": model}


@pytest.fixture(scope="module")
def rpn_files(tmp_path_factory):
    from rclip_core.models.clip import build_clip
    from rclip_core.models.proposals.offline import build_offline_rpn

    d = tmp_path_factory.mktemp("rpn")
    torch.manual_seed(0)
    clip_state = _with_bn_stats(build_clip("test-micro").state_dict(), 1)
    torch.manual_seed(1)
    lvis = _with_bn_stats(build_offline_rpn("lvis_866_fpn").state_dict(), 2)
    torch.manual_seed(2)
    coco = _with_bn_stats(build_offline_rpn("coco_c4").state_dict(), 3)
    g = torch.Generator().manual_seed(4)
    D = int(clip_state["visual.attnpool.c_proj.weight"].shape[0])
    predictor = {"cls_score.weight": torch.randn(48, D, generator=g), "test_cls_score.weight": torch.randn(65, D, generator=g),
                 "cls_bg_score.weight": torch.zeros(1, D), "bbox_pred.weight": 0.01 * torch.randn(4, D, generator=g),
                 "bbox_pred.bias": torch.zeros(4)}
    files = {
        "pretrained": _regionclip_file(clip_state, lvis),
        "pretrained_norpn": _regionclip_file(clip_state),
        "pretrained_bnreset": _reset_backbone_bn(_regionclip_file(clip_state, lvis)),
        "rpn_lvis_866": {"model": lvis, "__author__": "test"},  # the Detectron2 layout of rpn_lvis_866.pth
        "finetuned": _regionclip_file(clip_state, coco, text=False, box_predictor=predictor),
        "finetuned_norpn": _regionclip_file(clip_state, text=False, box_predictor=predictor),
        "rpn_coco_48": {"model": coco},
    }
    paths = {}
    for name, obj in files.items():
        paths[name] = d / f"{name}.pth"
        torch.save(obj, paths[name])
    # class embeddings a random model agrees with: the region embeddings of five proposals
    # (an official *_cls_emb.pth is a bare [K, D] tensor)
    from rclip_core.data.images import load_image
    from rclip_core.weights.loaders import load_model

    m = load_model(weights=paths["pretrained"])
    prep = load_image(_photo(), 320, 560)
    with torch.no_grad():
        boxes = m.rpn([prep.tensor])[0].boxes[::97][:5]
        enc = m.encoder
        emb = enc.forward_features(enc.trunk(enc.batch_images([prep.tensor])), [boxes]).float()
    paths["class_emb"] = d / "micro_5_cls_emb.pth"
    torch.save(emb.clone(), paths["class_emb"])
    return {"dir": d, "clip_state": clip_state, "lvis": lvis, "coco": coco, **paths}


def _official_protocol_detect(tmp_path, files, name, *args):
    """`rclip detect` with the official zero-shot protocol flags (small images: a fast test)."""
    import json

    from click.testing import CliRunner

    from rclip_cli.main import cli

    out = tmp_path / name
    res = CliRunner().invoke(cli, ["detect", str(_photo()), "--classes", "cat,dog,kite,person,car", "--proposals", "rpn",
                                   "--score-thresh", "0.02", "--nms", "0.5", "--max-dets", "300", "--fusion",
                                   "official", "--topk-labels", "0", "--short-side", "320", "--max-size", "560",
                                   "--no-images", "--out", str(out), "--device", "cpu",
                                   "--class-embeddings", str(files["class_emb"]), *map(str, args)])
    assert res.exit_code == 0, res.output
    return json.loads((out / "predictions.json").read_text())


def _photo():
    from conftest import REPO

    return REPO / "tests" / "data" / "sample_img1.jpg"


def test_separate_lvis_rpn_file_gives_the_same_proposals_and_detections(rpn_files, tmp_path):
    from rclip_core.data.images import load_image
    from rclip_core.weights.loaders import load_model, load_rpn_file

    inside = load_model(weights=rpn_files["pretrained"])
    separate = load_model(weights=rpn_files["pretrained_norpn"])
    assert separate.rpn is None
    load_rpn_file(separate, rpn_files["rpn_lvis_866"])
    assert inside.info.rpn_kind == separate.info.rpn_kind == "lvis_866_fpn"
    assert inside.rpn.settings == separate.rpn.settings
    for k, v in rpn_files["lvis"].items():
        assert torch.equal(separate.rpn.state_dict()[k], v) and torch.equal(inside.rpn.state_dict()[k], v), k
    # the CLIP backbone's frozen-BN statistics stay those of the checkpoint
    for k, v in rpn_files["clip_state"].items():
        if k.startswith("visual.") and "running" in k:
            assert torch.equal(separate.clip.state_dict()[k], v), k
    prep = load_image(_photo(), 320, 560)
    a, b = inside.rpn([prep.tensor]), separate.rpn([prep.tensor])
    assert a[0].boxes.shape[0] > 100
    assert torch.equal(a[0].boxes, b[0].boxes) and torch.equal(a[0].objectness_logits, b[0].objectness_logits)

    base = _official_protocol_detect(tmp_path, rpn_files, "inside", "--weights", rpn_files["pretrained"])
    assert len(base) > 20
    assert _official_protocol_detect(tmp_path, rpn_files, "separate", "--weights", rpn_files["pretrained_norpn"],
                                     "--rpn-weights", rpn_files["rpn_lvis_866"]) == base
    assert _official_protocol_detect(tmp_path, rpn_files, "override", "--weights", rpn_files["pretrained"],
                                     "--rpn-weights", rpn_files["rpn_lvis_866"]) == base


def test_separate_coco_rpn_file_gives_the_same_detector_output(rpn_files, tmp_path):
    """`rclip eval --detector --weights regionclip_finetuned-coco_rn50.pth --rpn-weights rpn_coco_48.pth`
    (load_rpn_file + the transfer proposal settings) against the C4 RPN inside the file."""
    from rclip_core.data.images import load_image
    from rclip_core.weights.loaders import load_detector, load_rpn_file

    inside = load_detector(rpn_files["finetuned"])
    separate = load_detector(rpn_files["finetuned_norpn"])
    load_rpn_file(separate.regionclip, rpn_files["rpn_coco_48"])
    separate.set_test_proposals()  # what `rclip eval --detector --rpn-weights` does
    assert separate.regionclip.rpn.kind == inside.regionclip.rpn.kind == "coco_c4"
    assert separate.regionclip.rpn.settings == inside.regionclip.rpn.settings
    img = load_image(_photo(), 320, 560).tensor
    for soft in (False, True):
        inside.update_inference(soft_nms=soft)
        separate.update_inference(soft_nms=soft)
        a, b = inside.inference([img])[0], separate.inference([img])[0]
        assert a.boxes.shape[0] > 10
        assert torch.equal(a.boxes, b.boxes) and torch.equal(a.scores, b.scores) and torch.equal(a.classes, b.classes)


def _changed(base: list[dict], other: list[dict], tol: float = 1e-5) -> int:
    """Detections of ``base`` with no detection in ``other`` of the same category, box within
    0.01 px and score within ``tol``."""
    def key(d):
        return d["category_id"]
    rest = {}
    for d in other:
        rest.setdefault(key(d), []).append(d)
    n = 0
    for d in base:
        if not any(abs(o["score"] - d["score"]) <= tol and
                   max(abs(x - y) for x, y in zip(o["bbox"], d["bbox"])) <= 0.01 for o in rest.get(key(d), [])):
            n += 1
    return n


def test_official_bb_rpn_weights_bn_reset_would_change_most_detections(rpn_files, tmp_path):
    """rclip keeps the backbone's frozen-BN statistics when an RPN file is attached; the official
    BB_RPN_WEIGHTS path (on current torch) resets them to 0 / 1. This measures what that reset
    would do to the same detections (the README's "where the official code differs" table)."""
    base = _official_protocol_detect(tmp_path, rpn_files, "ours", "--weights", rpn_files["pretrained_norpn"],
                                     "--rpn-weights", rpn_files["rpn_lvis_866"])
    reset = _official_protocol_detect(tmp_path, rpn_files, "reset", "--weights", rpn_files["pretrained_bnreset"])
    changed = _changed(base, reset)
    assert changed >= 0.5 * len(base), (changed, len(base))


# ------------------------------------------------------------------------------------------
# The pretraining input path: data.input_path rclip | official
# ------------------------------------------------------------------------------------------

def _pil(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_pretraining_resize_sizes_of_both_input_paths():
    from torchvision.transforms import InterpolationMode, Resize

    from rclip_core.engine.data import ShortSideResize, torchvision_resized_shape

    rclip = ShortSideResize((800,), 1333, flip=False)
    official = ShortSideResize((800,), 1333, flip=False, size_rule="torchvision")
    rng = np.random.default_rng(0)
    img = _pil(1920, 1080)
    t_ours, size_ours, _ = rclip(img, rng)
    t_off, size_off, _ = official(img, rng)
    assert size_ours == (750, 1333) and tuple(t_ours.shape) == (3, 750, 1333)  # inference's size
    assert size_off == (749, 1333) and tuple(t_off.shape) == (3, 749, 1333)  # int() truncation
    # the same pixels as torchvision's own bicubic Resize(800, max_size=1333) of the PIL image
    ref = np.asarray(Resize(800, interpolation=InterpolationMode.BICUBIC, max_size=1333)(img))
    assert np.array_equal(t_off.permute(1, 2, 0).numpy(), ref)
    assert torchvision_resized_shape(1080, 1920, 800, 1333) == (749, 1333)
    assert torchvision_resized_shape(1920, 1080, 800, 1333) == (1333, 749)  # portrait
    assert torchvision_resized_shape(480, 640, 800, 1333) == (800, 1066)  # 1066.67 truncated (rclip: 1067)
    assert rclip(_pil(640, 480), rng)[1] == (800, 1067)
    # the vendored Resize leaves an image whose short side is already 800 alone, long side and all
    assert torchvision_resized_shape(800, 2000, 800, 1333) == (800, 2000)
    assert official(_pil(2000, 800), rng)[1] == (800, 2000)
    assert rclip(_pil(2000, 800), rng)[1] == (533, 1333)
    with pytest.raises(ValueError, match="size_rule"):
        ShortSideResize((800,), 1333, size_rule="nearest")


def _task(tmp_path, rpn_files, input_path: str):
    from rclip_core.config import build_recipe
    from rclip_core.config.pretrain import PretrainRecipe
    from rclip_core.engine.tasks.regionclip import RegionCLIPTask

    (tmp_path / "pool.txt").write_text("cat,3\ndog,2\nkite,1\n")
    d = {"mode": "regionclip", "output_dir": str(tmp_path / "out"), "seed": 0, "max_steps": 1,
         "model": {"teacher": {"weights": str(rpn_files["pretrained_norpn"])}},
         "data": {"root": str(tmp_path), "captions": ["c.jsonl"], "short_sides": [96], "max_size": 160,
                  "num_workers": 0, "input_path": input_path},
         "regions": {"source": "rpn", "per_image": 5, "rpn": {"weights": str(rpn_files["rpn_lvis_866"])}},
         "concepts": {"pool": "pool.txt", "templates": "single"},
         "batch": {"images_per_process": 2}, "logging": {"tensorboard": False}}
    return RegionCLIPTask(build_recipe(d, PretrainRecipe), torch.device("cpu"))


@pytest.mark.parametrize("input_path", ["rclip", "official"])
def test_pretraining_rpn_input_and_whole_image_box(tmp_path, rpn_files, input_path):
    from rclip_core.engine.data import TrainSample

    task = _task(tmp_path, rpn_files, input_path)
    assert task.transform.size_rule == ("torchvision" if input_path == "official" else "detectron2")
    rng = np.random.default_rng(1)
    samples = []
    for i, (w, h) in enumerate(((150, 96), (96, 128))):  # two shapes: the canvas is 128 x 150
        t, size, flipped = task.transform(_pil(w, h, seed=i), rng)
        samples.append(TrainSample(i, f"k{i}", f"k{i}", t, "a cat", (h, w), size, flipped))
    images = [s.image for s in samples]
    # RPN branch: the pixel values (rclip) or ToTensor * 255 (official), RGB 0-255 floats
    # that the offline RPN turns to BGR minus the Detectron2 mean
    inputs = task.rpn_inputs(images)
    exact = [im.float() for im in images]
    official = [(im.float() / 255.0) * 255.0 for im in images]
    for got, e, o in zip(inputs, exact, official):
        assert torch.equal(got, o if input_path == "official" else e)
    # float32 (k / 255) * 255 == k for every k in 0..255: the two RPN inputs are the same numbers
    assert torch.equal(torch.arange(256.0).div(255.0) * 255.0, torch.arange(256.0))
    batch, _ = task.student.rpn.preprocess(inputs)
    bgr = inputs[0][[2, 1, 0]] - torch.tensor([103.530, 116.280, 123.675]).view(3, 1, 1)
    assert torch.equal(batch[0, :, : images[0].shape[1], : images[0].shape[2]], bgr)
    # whole-image boxes: each image's own extent (rclip) or the padded canvas for all (official)
    seen = []
    real = task.student.encoder.forward_features

    def spy(res4, boxes, *a, **k):
        seen.append([b.clone() for b in boxes])
        return real(res4, boxes, *a, **k)

    task.student.encoder.forward_features = spy
    try:
        losses = task.forward(samples)
    finally:
        task.student.encoder.forward_features = real
    assert torch.isfinite(losses["total"])
    whole = [b[-1].tolist() for b in seen[0]]  # the student pass: regions, then the whole-image box
    canvas = [0.0, 0.0, 150.0, 128.0]
    if input_path == "official":
        assert whole == [canvas, canvas]
    else:
        assert whole == [[0.0, 0.0, float(s.size[1]), float(s.size[0])] for s in samples] != [canvas, canvas]


# ------------------------------------------------------------------------------------------
# `rclip eval` always runs the official protocol; `rclip detect --help` names it
# ------------------------------------------------------------------------------------------

def _tiny_coco(d):
    import json

    rng = np.random.default_rng(0)
    (d / "images").mkdir()
    images, anns = [], []
    for i in (1, 2):
        Image.fromarray(rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)).save(d / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": 80, "height": 64})
        anns.append({"id": i, "image_id": i, "category_id": i, "bbox": [5, 5, 30, 30], "area": 900, "iscrowd": 0})
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    (d / "gt.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    return d / "gt.json", d / "images"


def test_eval_detector_uses_every_pair_and_the_benchmark_settings(tmp_path):
    """A detector file that stores friendlier test settings (top-1 class per box, score > 0.3,
    7 detections) is still evaluated with the official protocol: every (box, class) pair,
    COCO score > 0.001, 100 detections per image."""
    import json

    from click.testing import CliRunner

    from rclip_cli.main import cli
    from rclip_core.models.detector import Detector, DetectorConfig
    from rclip_core.weights.loaders import load_model
    from rclip_core.weights.native import save_detector

    gt, images = _tiny_coco(tmp_path)
    torch.manual_seed(0)
    emb = torch.randn(1, 32).repeat(2, 1)
    emb[1] += 0.01 * torch.randn(32)  # two near-identical classes: every box scores both alike
    det = Detector(load_model(model="test-micro", random_init=True), emb, emb, class_names=["cat", "dog"],
                   train_class_names=["cat", "dog"], config=DetectorConfig(proposals="trained"),
                   inference=InferenceConfig(topk_labels=1, score_thresh=0.3, max_dets=7))
    path = save_detector(det, tmp_path / "det.safetensors")
    out, preds = tmp_path / "r.json", tmp_path / "p.json"
    r = CliRunner().invoke(cli, ["eval", "--detector", "--dataset", str(gt), "--images", str(images), "--weights",
                                 str(path), "--short-side", "64", "--workers", "0", "--json", str(out),
                                 "--save-predictions", str(preds), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    s = json.loads(out.read_text())["settings"]
    assert (s["topk_labels"], s["score_thresh"], s["max_dets"]) == (0, 0.001, 100)
    assert "all (box, class) pairs" in r.stdout
    rows = json.loads(preds.read_text())
    per_box: dict = {}
    for d in rows:
        per_box.setdefault((d["image_id"], tuple(d["bbox"])), set()).add(d["category_id"])
    assert any(len(c) == 2 for c in per_box.values())  # a box detected as both classes: every pair
    assert max(sum(d["image_id"] == i for d in rows) for i in (1, 2)) > 7  # not the stored 7


def test_detect_help_names_the_official_protocol():
    from click.testing import CliRunner

    from rclip_cli.main import cli

    text = CliRunner().invoke(cli, ["detect", "--help"], terminal_width=200).output
    flat = " ".join(text.split())
    assert ("--proposals rpn --score-thresh 0.02 --nms 0.5 --max-dets 300 --fusion official --topk-labels 0"
            in flat), text
    assert "--score-thresh 0.001 --max-dets 100" in flat
