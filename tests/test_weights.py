"""Weights: the rclip safetensors format, the official RegionCLIP / OpenAI layouts (the state
dicts of ``clip_rcnn.py: CLIPFastRCNN`` and open_clip ``CLIP``), strict key checks (the official
``detectron2/checkpoint/clip_model_loading.py`` loads non-strictly), the offline RPN really applied
(RegionCLIP issues #67, #81, #98), safe unpickling (``torch.load(weights_only=True)``), downloads
with checksums and a fast offline failure."""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import pytest
import torch

from rclip_core.errors import InputError, OfflineError, RclipError, RuntimeFailure, WeightsError
from rclip_core.models.classifier import InferenceConfig
from rclip_core.models.clip import build_clip, get_architecture
from rclip_core.models.detector import Detector, DetectorConfig
from rclip_core.models.proposals.offline import OfflineRPNConfig, build_offline_rpn
from rclip_core.models.proposals.trainable import TrainableRPNConfig
from rclip_core.weights.inspect import describe_weights
from rclip_core.weights.io import download, network_reachable, read_weights, save_safetensors
from rclip_core.weights.loaders import (_arch_from_checkpoint, attach_rpn, load_class_embeddings, load_detector,
                                        load_model, load_rpn_file)
from rclip_core.weights.native import (PARTS, detector_sections, detector_tensors, join_native, native_key,
                                       nest_detector_settings, save_detector, save_model, split_native)
from rclip_core.weights.official import (convert_checkpoint, infer_text_config, infer_visual_config,
                                         known_architecture_name)

RPN_MARKER_KEY = "proposal_generator.rpn_head.objectness_logits.weight"  # [3, 256, 1, 1]
BOX_PREDICTOR = {  # fast_rcnn.py: FastRCNNOutputLayers names, with D = 32 (test-micro) and 3 / 5 classes
    "cls_score.weight": torch.arange(3 * 32, dtype=torch.float32).reshape(3, 32),
    "cls_bg_score.weight": torch.zeros(1, 32),
    "test_cls_score.weight": torch.ones(5, 32),
    "bbox_pred.weight": torch.full((4, 32), 0.5),
    "bbox_pred.bias": torch.tensor([1.0, 2.0, 3.0, 4.0]),
}


@pytest.fixture(scope="module")
def micro_state() -> dict[str, torch.Tensor]:
    """A test-micro open_clip state dict with random values everywhere (a fresh model has
    constant BN/LayerNorm tensors, which would make "loaded" indistinguishable from "built")."""
    g = torch.Generator().manual_seed(0)
    sd = build_clip("test-micro").state_dict()
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()}


@pytest.fixture(scope="module")
def rpn_state() -> dict[str, torch.Tensor]:
    """LVIS-866 FPN RPN weights (standalone names) with one recognisable tensor."""
    sd = dict(build_offline_rpn("lvis_866_fpn").state_dict())
    sd[RPN_MARKER_KEY] = torch.linspace(-1, 1, sd[RPN_MARKER_KEY].numel()).reshape(sd[RPN_MARKER_KEY].shape)
    return sd


def _visual(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.startswith("visual.")}


def _text(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # RegionCLIP files carry no logit_scale (the language encoder of clip_rcnn.py has none)
    return {k: v for k, v in state.items() if not k.startswith("visual.") and k != "logit_scale"}


def _official(micro_state, rpn_state=None, text=True, teacher=True, box_predictor=True) -> dict:
    model: dict[str, torch.Tensor] = {}
    for k, v in _visual(micro_state).items():
        model["backbone." + k[len("visual."):]] = v
        if teacher:
            model["teacher_backbone." + k[len("visual."):]] = -v
    if text:
        model.update({"lang_encoder." + k: v for k, v in _text(micro_state).items()})
    if rpn_state is not None:
        model.update({"offline_" + k: v for k, v in rpn_state.items()})
    if box_predictor:
        model.update({"roi_heads.box_predictor." + k: v for k, v in BOX_PREDICTOR.items()})
    # Detectron2 checkpoints carry non-tensor metadata next to "model"
    return {"model": model, "iteration": 12345, "__author__": "test"}


def _save(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def official_file(tmp_path_factory, micro_state, rpn_state) -> Path:
    """A full regionclip_pretrained-cc-style file (student, teacher, text, offline RPN) plus a
    box predictor, in test-micro shapes."""
    return _save(_official(micro_state, rpn_state), tmp_path_factory.mktemp("w") / "regionclip_micro.pth")


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for k, v in expected.items():
        assert actual[k].dtype == torch.float32 or not v.is_floating_point(), k
        assert torch.equal(actual[k], v.to(actual[k].dtype)), k


# ------------------------------------------------------------------------------------------
# Official RegionCLIP / Detectron2 files
# ------------------------------------------------------------------------------------------

def test_official_regionclip_file_loads_every_part(official_file, micro_state, rpn_state):
    m = load_model(weights=official_file)
    assert m.arch.name == "test-micro"
    assert m.info.source_format == "regionclip"
    assert m.info.extra["ignored_keys"] == 0  # the teacher is split off, nothing is ignored
    sd = m.clip.state_dict()
    _assert_same(_visual(sd), _visual(micro_state))
    _assert_same({k: v for k, v in sd.items() if not k.startswith("visual.") and k != "logit_scale"},
                 _text(micro_state))
    assert m.has_text
    # logit_scale is not in RegionCLIP files: it keeps CLIP's init ln(1/0.07) and is never used
    assert m.clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    # the offline RPN is attached with its weights really applied (RegionCLIP issues #67, #81, #98)
    assert m.rpn is not None and m.info.rpn_kind == "lvis_866_fpn"
    assert torch.equal(m.rpn.state_dict()[RPN_MARKER_KEY], rpn_state[RPN_MARKER_KEY])
    assert torch.equal(m.rpn.state_dict()[RPN_MARKER_KEY][0, :3, 0, 0],
                       torch.linspace(-1, 1, 3 * 256)[:3])
    _assert_same(m.rpn.state_dict(), rpn_state)
    _assert_same(m.box_predictor, BOX_PREDICTOR)
    # the text tower really runs with the loaded weights: [2, 16] tokens -> [2, 32]
    tokens = torch.zeros(2, 16, dtype=torch.long)
    tokens[:, 0], tokens[:, 1] = 49406, 49407
    with torch.no_grad():
        assert m.encode_text(tokens).shape == (2, 32)


def test_official_file_without_rpn_when_not_wanted(official_file):
    m = load_model(weights=official_file, with_rpn=False)
    assert m.rpn is None and m.info.rpn_kind is None


def test_convert_regionclip_splits_student_teacher_rpn_and_heads(micro_state, rpn_state):
    tensors = _official(micro_state, rpn_state)["model"]
    tensors["roi_heads.mask_head.deconv.bias"] = torch.ones(256)
    tensors["some.unknown.key"] = torch.zeros(1)
    conv = convert_checkpoint(tensors)
    assert conv.source_format == "regionclip"
    assert conv.has_visual and conv.has_text
    _assert_same(conv.clip_state, {**_visual(micro_state), **_text(micro_state)})
    _assert_same(conv.teacher_visual_state, {k[len("visual."):]: -v for k, v in _visual(micro_state).items()})
    _assert_same(conv.rpn_state, rpn_state)
    _assert_same(conv.box_predictor, BOX_PREDICTOR)
    assert list(conv.mask_head) == ["deconv.bias"]
    assert conv.ignored == ["some.unknown.key"]


def test_detector_file_without_text_loads_visual_only(tmp_path, micro_state):
    path = _save(_official(micro_state, text=False, teacher=False), tmp_path / "finetuned.pth")
    m = load_model(weights=path)
    assert not m.has_text
    assert m.clip.transformer is None
    _assert_same(_visual(m.clip.state_dict()), _visual(micro_state))
    _assert_same(m.box_predictor, BOX_PREDICTOR)
    assert m.rpn is None
    with pytest.raises(InputError, match="no text encoder"):
        m.encode_text(torch.zeros(1, 16, dtype=torch.long))


def test_standalone_rpn_file(tmp_path, micro_state, rpn_state):
    rpn_path = _save({"model": rpn_state, "roi_heads.box_predictor.cls_score.weight": torch.zeros(2)},
                     tmp_path / "rpn_lvis_866.pth")
    conv = convert_checkpoint(read_weights(rpn_path).tensors)
    assert conv.source_format == "rpn"
    _assert_same(conv.rpn_state, rpn_state)
    # an RPN file is not a model ...
    with pytest.raises(WeightsError, match="offline RPN checkpoint"):
        load_model(weights=rpn_path)
    # ... but attaches to one (--rpn-weights) with every weight applied
    det = _save(_official(micro_state, text=False, teacher=False), tmp_path / "det.pth")
    m = load_model(weights=det)
    load_rpn_file(m, rpn_path)
    assert m.info.rpn_kind == "lvis_866_fpn"
    _assert_same(m.rpn.state_dict(), rpn_state)
    # a file without RPN weights is refused with a one-line reason
    with pytest.raises(WeightsError, match="offline RPN"):
        load_rpn_file(m, det)


def test_attach_rpn_refuses_incomplete_rpn(rpn_state):
    m = load_model(model="test-micro", random_init=True)
    partial = {k: v for k, v in rpn_state.items() if k != "backbone.fpn_output3.weight"}
    with pytest.raises(WeightsError, match=r"missing backbone\.fpn_output3\.weight"):
        attach_rpn(m, partial)
    assert m.rpn is None


# ------------------------------------------------------------------------------------------
# OpenAI / open_clip layout and the teacher/student OAI_CLIP file
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("teacher_prefix", ["teacher_backbone.", "teacher_visual.", "teacher.visual."])
def test_oai_clip_teacher_student_split(tmp_path, micro_state, teacher_prefix):
    tensors = dict(micro_state)  # student: plain OpenAI names, logit_scale included
    for k, v in _visual(micro_state).items():
        tensors[teacher_prefix + k[len("visual."):]] = v + 100.0
    for k, v in _text(micro_state).items():
        tensors["teacher." + k] = v + 100.0  # the duplicated teacher text tower is never used
    for k in ("input_resolution", "context_length", "vocab_size"):  # OpenAI JIT constants
        tensors[k] = torch.tensor(64)
    conv = convert_checkpoint(tensors)
    assert conv.source_format == "oai_clip"
    _assert_same(conv.clip_state, micro_state)
    _assert_same(conv.teacher_visual_state,
                 {k[len("visual."):]: v + 100.0 for k, v in _visual(micro_state).items()})
    assert sorted(conv.ignored) == sorted("teacher." + k for k in _text(micro_state))
    assert not conv.rpn_state and not conv.box_predictor and conv.embeddings is None

    m = load_model(weights=_save(tensors, tmp_path / "teacher_X_student_X_OAI_CLIP.pth"))
    assert m.info.source_format == "oai_clip" and m.has_text
    _assert_same(m.clip.state_dict(), micro_state)


def test_open_clip_file_fp16_and_bn_counters(tmp_path, micro_state):
    """OpenAI weights are fp16 (upcast: RegionCLIP runs fp32); open_clip's BatchNorm2d adds
    num_batches_tracked, which FrozenBN (detectron2/layers/batch_norm.py) does not have."""
    tensors = {k: v.half() if v.is_floating_point() else v for k, v in micro_state.items()}
    tensors["visual.bn1.num_batches_tracked"] = torch.tensor(7)
    tensors["visual.layer1.0.bn2.num_batches_tracked"] = torch.tensor(7)
    m = load_model(weights=_save({"state_dict": {"module." + k: v for k, v in tensors.items()}},
                                 tmp_path / "open_clip.pt"))
    assert m.info.source_format == "open_clip"
    sd = m.clip.state_dict()
    assert all(v.dtype == torch.float32 for v in sd.values())
    for k, v in micro_state.items():
        assert torch.equal(sd[k], v.half().float()), k


# ------------------------------------------------------------------------------------------
# Architecture inference from shapes
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,layers,width,image_size,embed_dim,grid_rows", [
    ("RN50-quickgelu", [3, 4, 6, 3], 64, 224, 1024, 50),
    ("RN50x4-quickgelu", [4, 6, 10, 6], 80, 288, 640, 82),
])
def test_architecture_inferred_from_shapes(name, layers, width, image_size, embed_dim, grid_rows):
    visual = _visual(build_clip(name, with_text=False).state_dict())  # real RN50 / RN50x4 shapes
    assert visual["visual.attnpool.positional_embedding"].shape == (grid_rows, 32 * width)
    cfg = infer_visual_config(visual)
    assert cfg == {"embed_dim": embed_dim,
                   "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": None}}
    assert known_architecture_name(cfg) == name
    # through the official layout: a detector file (no text) builds the known config
    conv = convert_checkpoint({"backbone." + k[len("visual."):]: v for k, v in visual.items()})
    arch = _arch_from_checkpoint(conv, None)
    assert arch.name == name
    assert dict(arch.config) == dict(get_architecture(name).config)
    other = "RN50x4" if name == "RN50-quickgelu" else "RN50"
    with pytest.raises(WeightsError, match=f"--model {other} was asked for"):
        _arch_from_checkpoint(conv, other)
    assert _arch_from_checkpoint(conv, name).name == name


def test_text_config_inferred_and_heads_taken_from_known_config(micro_state):
    text = infer_text_config(micro_state)
    # heads are not in any shape; width // 64 would be 0 for the 32-wide micro tower
    assert text == {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 1}
    conv = convert_checkpoint(dict(micro_state))
    arch = _arch_from_checkpoint(conv, None)
    assert arch.name == "test-micro" and arch.text_cfg["heads"] == 2
    assert infer_text_config(_visual(micro_state)) is None


def test_unknown_grid_is_not_a_known_architecture(micro_state):
    sd = _visual(micro_state)
    sd["visual.attnpool.positional_embedding"] = torch.zeros(5 * 5 + 1, 256)  # grid 5 -> 160 px
    cfg = infer_visual_config(sd)
    assert cfg["vision_cfg"]["image_size"] == 160 and known_architecture_name(cfg) is None
    bad = dict(sd, **{"visual.attnpool.positional_embedding": torch.zeros(20, 256)})
    with pytest.raises(WeightsError, match="not a square grid"):
        infer_visual_config(bad)


# ------------------------------------------------------------------------------------------
# Strict loading: never drop backbone keys silently (the official loader skips mismatches)
# ------------------------------------------------------------------------------------------

def _one_line(e: RclipError) -> str:
    s = str(e)
    assert "\n" not in s and s
    return s


def test_missing_backbone_key_is_listed(tmp_path, micro_state):
    obj = _official(micro_state, teacher=False)
    del obj["model"]["backbone.layer3.0.conv2.weight"]
    with pytest.raises(WeightsError) as ei:
        load_model(weights=_save(obj, tmp_path / "missing.pth"))
    msg = _one_line(ei.value)
    assert "missing keys: visual.layer3.0.conv2.weight" in msg
    assert "never drops backbone keys" in ei.value.hint


def test_unexpected_backbone_key_is_listed(tmp_path, micro_state):
    obj = _official(micro_state, teacher=False)
    obj["model"]["backbone.layer4.0.extra_conv.weight"] = torch.zeros(3)
    with pytest.raises(WeightsError) as ei:
        load_model(weights=_save(obj, tmp_path / "extra.pth"))
    assert "unexpected keys: visual.layer4.0.extra_conv.weight" in _one_line(ei.value)


def test_partial_text_tower_is_not_dropped_silently(tmp_path, micro_state):
    obj = _official(micro_state, teacher=False)
    del obj["model"]["lang_encoder.transformer.resblocks.0.mlp.c_fc.weight"]
    with pytest.raises(WeightsError) as ei:
        load_model(weights=_save(obj, tmp_path / "half_text.pth"))
    assert "missing keys: transformer.resblocks.0.mlp.c_fc.weight" in _one_line(ei.value)


def test_shape_mismatch_is_reported(tmp_path, micro_state):
    obj = _official(micro_state, teacher=False)
    obj["model"]["backbone.layer2.0.conv1.weight"] = torch.zeros(16, 32, 3, 3)
    with pytest.raises(WeightsError) as ei:
        load_model(weights=_save(obj, tmp_path / "shape.pth"))
    assert "shape mismatch visual.layer2.0.conv1.weight [16, 32, 3, 3] vs [16, 32, 1, 1]" in _one_line(ei.value)


def test_requested_architecture_must_match_the_file(tmp_path, official_file):
    with pytest.raises(WeightsError) as ei:
        load_model(weights=official_file, model="RN50x4")
    assert "test-micro" in _one_line(ei.value) and "--model RN50x4" in str(ei.value)
    native = save_model(load_model(weights=official_file, with_rpn=False), tmp_path / "micro.safetensors")
    with pytest.raises(WeightsError, match="--model RN50-quickgelu was asked for"):
        load_model(weights=native, model="RN50-quickgelu")
    # the right name (or its registry alias) is accepted
    assert load_model(weights=official_file, model="test-micro", with_rpn=False).arch.name == "test-micro"
    with pytest.raises(WeightsError, match="RN50-quickgelu"):
        load_model(weights=official_file, model="regionclip-rn50-cc", with_rpn=False)


# ------------------------------------------------------------------------------------------
# Native safetensors format
# ------------------------------------------------------------------------------------------

def test_native_roundtrip_keeps_everything(tmp_path, official_file, rpn_state):
    m = load_model(weights=official_file)
    m.class_names = ["kite", "boy"]
    m.class_embeddings = torch.tensor([[1.0] * 32, [-2.0] * 32])
    path = save_model(m, tmp_path / "model.safetensors", extra={"templates": ["a photo of a {}."]})
    wf = read_weights(path)
    meta = wf.metadata
    assert wf.container == "safetensors"
    assert meta["format"] == "rclip" and meta["kind"] == "regionclip"
    assert meta["architecture"]["name"] == "test-micro"
    assert meta["architecture"]["config"] == dict(get_architecture("test-micro").config)
    assert meta["embed_dim"] == 32 and meta["has_text"] is True
    assert meta["rpn_kind"] == "lvis_866_fpn" and meta["class_names"] == ["kite", "boy"]
    assert meta["templates"] == ["a photo of a {}."] and meta["rclip_version"]

    m2 = load_model(weights=path)
    assert m2.info.source_format == "rclip" and m2.has_text
    _assert_same(m2.clip.state_dict(), m.clip.state_dict())
    _assert_same(m2.rpn.state_dict(), rpn_state)
    _assert_same(m2.box_predictor, BOX_PREDICTOR)
    assert m2.class_names == ["kite", "boy"]
    assert torch.equal(m2.class_embeddings, m.class_embeddings)


def test_native_without_text(tmp_path, micro_state):
    m = load_model(model="test-micro", random_init=True)
    path = save_model(m, tmp_path / "visual.safetensors", include_text=False)
    wf = read_weights(path)
    assert wf.metadata["has_text"] is False
    assert all(k.startswith("visual.") for k in wf.tensors)
    m2 = load_model(weights=path)
    assert not m2.has_text and m2.clip.transformer is None
    _assert_same(_visual(m2.clip.state_dict()), _visual(m.clip.state_dict()))


def test_native_file_of_other_kind_is_not_a_model(tmp_path):
    emb = save_safetensors(tmp_path / "emb.safetensors", {"embeddings": torch.ones(2, 32)},
                           {"kind": "embeddings", "names": ["a", "b"]})
    with pytest.raises(WeightsError, match="class embeddings, not a model"):
        load_model(weights=emb)
    regions = save_safetensors(tmp_path / "regions.safetensors", {"boxes": torch.ones(2, 4)},
                               {"kind": "region_embeddings"})
    with pytest.raises(WeightsError) as ei:
        load_model(weights=regions)
    _one_line(ei.value)


def _check_split_agrees_with_info(path: Path) -> dict:
    """Every key of a native file is in exactly one part of the prefix table, `rclip weights
    info` counts the same parts, and join_native inverts split_native."""
    tensors = read_weights(path).tensors
    parts, unknown = split_native(tensors)
    assert unknown == []
    assert sum(len(p) for p in parts.values()) == len(tensors)
    assert sorted(join_native(parts)) == sorted(tensors)
    info = describe_weights(path)
    described = {}
    for p in PARTS:
        if p.info is not None and parts[p.name]:
            described.setdefault(p.info, 0)
            described[p.info] += len(parts[p.name])
    assert {k: v["tensors"] for k, v in info["parts"].items()} == described
    # a part info does not describe (the trained RPN) is listed as ignored keys, as before
    assert info["ignored_keys"] == sorted(native_key("trained_rpn", k) for k in parts["trained_rpn"])
    return parts


def test_one_prefix_table_for_save_load_and_info(tmp_path, official_file, rpn_state):
    """save_model / save_detector, split_native, describe_weights and the loaders agree on every
    key of the native layout."""
    m = load_model(weights=official_file)  # visual + text + offline RPN + box predictor
    m.class_names = ["kite", "boy"]
    m.class_embeddings = torch.tensor([[1.0] * 32, [-2.0] * 32])
    path = save_model(m, tmp_path / "model.safetensors")
    parts = _check_split_agrees_with_info(path)
    assert {name for name, p in parts.items() if p} == {"visual", "text", "rpn", "box_predictor", "class_embeddings"}
    m2 = load_model(weights=path)
    _assert_same(parts["visual"], _visual(m2.clip.state_dict()))
    _assert_same({**parts["visual"], **parts["text"]}, m2.clip.state_dict())
    _assert_same(parts["rpn"], m2.rpn.state_dict())
    _assert_same(parts["box_predictor"], m2.box_predictor)
    assert torch.equal(parts["class_embeddings"]["class_embeddings"], m2.class_embeddings)

    torch.manual_seed(0)
    emb = torch.randn(3, 32)
    config = DetectorConfig(proposals="trained", mask_head=True, rpn=TrainableRPNConfig(anchor_sizes=[8.0, 16.0], nms=0.6))
    inference = InferenceConfig(score_thresh=0.1, nms=0.4, soft_nms=True)
    det = Detector(load_model(model="test-micro", random_init=True), emb[:2], emb, class_names=["a", "b", "c"],
                   train_class_names=["a", "b"], config=config, inference=inference, freeze_at=3)
    path = save_detector(det, tmp_path / "det.safetensors", extra={"note": "x"})
    parts = _check_split_agrees_with_info(path)
    assert {name for name, p in parts.items() if p} == {"visual", "text", "trained_rpn", "box_predictor", "mask_head",
                                                         "class_embeddings"}
    meta = read_weights(path).metadata
    assert meta["kind"] == "detector" and meta["note"] == "x" and meta["freeze_at"] == 3
    assert "detector_settings" not in meta
    assert meta["detector"] == config.to_dict() and meta["inference"] == inference.to_dict()
    loaded = load_detector(path)
    assert loaded.config == config and loaded.inference_config == inference
    _assert_same(detector_tensors(loaded), read_weights(path).tensors)
    _assert_same(parts["trained_rpn"], loaded.proposal_generator.state_dict())
    _assert_same(parts["mask_head"], loaded.mask_head.state_dict())

    det = Detector(m, emb[:2], None)  # the offline RPN of the model
    path = save_detector(det, tmp_path / "offline.safetensors", include_text=False)
    parts = _check_split_agrees_with_info(path)
    assert {name for name, p in parts.items() if p} == {"visual", "rpn", "box_predictor", "class_embeddings"}
    loaded = load_detector(path)
    _assert_same(detector_tensors(loaded, include_text=False), read_weights(path).tensors)
    _assert_same(parts["rpn"], rpn_state)


# The flat `detector_settings` of detector files written before DetectorConfig / InferenceConfig
# (DetectorSettings.lvis(proposals="trained", offline_rpn_pre_nms_topk=300).to_dict()).
LEGACY_LVIS_SETTINGS = {
    "temperature": 0.01, "rois_per_image": 512, "positive_fraction": 0.25, "fg_iou": 0.5, "append_gt": True,
    "focal_gamma": None, "bg_weight": 0.8, "box_reg_weights": [10.0, 10.0, 5.0, 5.0], "box_loss_weight": 1.0,
    "mask_head": True, "mask_loss_weight": 1.0, "proposals": "trained", "offline_rpn_pre_nms_topk": 300,
    "offline_rpn_post_nms_topk": 1000, "offline_rpn_nms": 0.7, "anchor_sizes": [32.0, 64.0, 128.0, 256.0, 512.0],
    "anchor_ratios": [0.5, 1.0, 2.0], "rpn_fg_iou": 0.7, "rpn_bg_iou": 0.3, "rpn_batch_per_image": 256,
    "rpn_positive_fraction": 0.5, "rpn_pre_nms_topk_train": 12000, "rpn_post_nms_topk_train": 2000,
    "rpn_pre_nms_topk_test": 6000, "rpn_post_nms_topk_test": 1000, "rpn_nms": 0.7, "score_thresh": 0.02,
    "nms_thresh": 0.5, "max_dets": 300, "fusion": "official", "soft_nms": False, "soft_nms_sigma": 0.5,
    "soft_nms_prune": 0.001, "chunk_size": 256,
}


def _leaves(d: dict, prefix: str = "") -> set[str]:
    return {n for k, v in d.items() for n in (_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k})}


def test_legacy_detector_settings_map_to_sections(tmp_path):
    """The one table from the flat `detector_settings` metadata to the detector / inference
    sections covers every field the two types had then, and legacy files load with it."""
    nested = nest_detector_settings(LEGACY_LVIS_SETTINGS)
    assert nested["inference"]["nms"] == 0.5 and "nms_thresh" not in nested["inference"]
    assert nested["detector"]["offline_rpn"] == {"pre_nms_topk": 300, "post_nms_topk": 1000, "nms": 0.7}
    assert nested["detector"]["rpn"]["fg_iou"] == 0.7 and nested["detector"]["rpn"]["nms"] == 0.7
    # every field of the new types has a legacy key, but those that did not exist then
    assert _leaves(nested["detector"]) == _leaves(DetectorConfig().to_dict()) - {"offline_rpn.kind"}
    assert _leaves(nested["inference"]) == _leaves(InferenceConfig().to_dict()) - {"topk_labels"}
    expected = DetectorConfig.lvis(proposals="trained", offline_rpn=OfflineRPNConfig(pre_nms_topk=300))
    sections = detector_sections({"detector_settings": LEGACY_LVIS_SETTINGS})
    assert DetectorConfig.from_dict(sections["detector"]) == expected
    assert InferenceConfig.from_dict(sections["inference"]) == InferenceConfig.lvis()
    assert detector_sections({"detector": expected.to_dict(), "inference": InferenceConfig.lvis().to_dict()}) == \
        {"detector": expected.to_dict(), "inference": InferenceConfig.lvis().to_dict()}
    assert detector_sections({}) == {"detector": {}, "inference": {}}

    # a detector file written with the flat settings loads with the mapped ones
    torch.manual_seed(0)
    emb = torch.randn(3, 32)
    det = Detector(load_model(model="test-micro", random_init=True), emb[:2], emb, config=expected,
                   inference=InferenceConfig.lvis())
    meta = {k: v for k, v in read_weights(save_detector(det, tmp_path / "new.safetensors")).metadata.items()
            if k not in ("detector", "inference", "format", "format_version", "rclip_version")}
    legacy = save_safetensors(tmp_path / "legacy.safetensors", detector_tensors(det),
                              {**meta, "detector_settings": LEGACY_LVIS_SETTINGS})
    loaded = load_detector(legacy)
    assert loaded.config == expected and loaded.inference_config == InferenceConfig.lvis()
    _assert_same(detector_tensors(loaded), detector_tensors(det))


# ------------------------------------------------------------------------------------------
# Concept / class embedding files (the official *_cls_emb*.pth: one float32 [N, D] tensor)
# ------------------------------------------------------------------------------------------

def test_official_embedding_files(tmp_path):
    emb = torch.arange(3 * 32, dtype=torch.float32).reshape(3, 32)
    e, names = load_class_embeddings(_save(emb, tmp_path / "coco_3_cls_emb.pth"))
    assert torch.equal(e, emb) and names is None
    # the official tool squeezes a single-concept file to [D]
    e, names = load_class_embeddings(_save(emb[1].clone(), tmp_path / "one_emb.pth"))
    assert e.shape == (1, 32) and torch.equal(e[0], emb[1])
    with pytest.raises(WeightsError, match="holds a \\[N, D\\] embedding tensor, not a model"):
        load_model(weights=tmp_path / "coco_3_cls_emb.pth")


def test_rclip_embedding_file_carries_names(tmp_path):
    path = save_safetensors(tmp_path / "emb.safetensors", {"embeddings": torch.eye(2, 32)},
                            {"kind": "embeddings", "names": ["kite", "boy"]})
    e, names = load_class_embeddings(path)
    assert names == ["kite", "boy"] and torch.equal(e, torch.eye(2, 32))


@pytest.mark.parametrize("tensor,match", [
    (torch.zeros(2, 3, 4), r"shape \[2, 3, 4\]"),
    (torch.zeros(2, 4, dtype=torch.long), "expected \\[N, D\\] floats"),
])
def test_bad_embedding_tensors(tmp_path, tensor, match):
    with pytest.raises(WeightsError, match=match):
        load_class_embeddings(_save(tensor, tmp_path / "bad_emb.pth"))


def test_model_file_is_not_an_embedding_file(official_file):
    with pytest.raises(WeightsError, match="model checkpoint, not class embeddings"):
        load_class_embeddings(official_file)


# ------------------------------------------------------------------------------------------
# Unsafe and broken files
# ------------------------------------------------------------------------------------------

class _TouchMarker:
    """Unpickling this runs ``os.system("touch MARKER")``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _ExecMarker:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("payload", [_TouchMarker, _ExecMarker])
def test_pickle_that_runs_code_is_refused(tmp_path, payload):
    marker = tmp_path / "marker"
    path = _save({"model": {"backbone.conv1.weight": torch.zeros(1)}, "x": payload(marker)}, tmp_path / "evil.pth")
    for load in (read_weights, load_model, load_class_embeddings):
        with pytest.raises(WeightsError) as ei:
            load(path) if load is not load_model else load_model(weights=path)
        assert "would run code" in _one_line(ei.value)
        assert not marker.exists()
    # control: the payload is real, an unsafe torch.load would have run it
    torch.load(path, weights_only=False)
    assert marker.exists()


def _garbage(tmp_path: Path, kind: str) -> Path:
    p = tmp_path / f"{kind}.pth"
    if kind == "empty":
        p.write_bytes(b"")
    elif kind in ("truncated", "truncated_head"):
        good = _save({"model": {"a": torch.randn(64, 64)}}, tmp_path / "good.pth").read_bytes()
        p.write_bytes(good[: len(good) // 2] if kind == "truncated" else good[:100])
    elif kind == "random":
        p.write_bytes(bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(1),
                                          dtype=torch.uint8).tolist()))
    elif kind == "text":
        p.write_text("hello world\n")
    elif kind == "truncated_safetensors":
        p = tmp_path / "t.safetensors"
        full = save_safetensors(tmp_path / "full.safetensors", {"a": torch.randn(64, 64)}, {"kind": "x"})
        p.write_bytes(full.read_bytes()[:-100])
    elif kind == "not_a_dict":
        _save([torch.zeros(2)], p)
    elif kind == "no_tensors":
        _save({"model": {"iteration": 3}}, p)
    return p


@pytest.mark.parametrize("kind,match", [
    ("empty", "is empty"),
    ("truncated", "corrupt or not a PyTorch checkpoint"),
    ("truncated_head", "corrupt or not a PyTorch checkpoint"),
    ("random", "corrupt or not a PyTorch checkpoint"),
    ("text", "corrupt or not a PyTorch checkpoint"),
    ("truncated_safetensors", "is corrupt"),
    ("not_a_dict", "holds a list, not a state_dict"),
    ("no_tensors", "contains no tensors"),
])
def test_broken_files_give_one_line_weights_errors(tmp_path, kind, match):
    path = _garbage(tmp_path, kind)
    with pytest.raises(WeightsError, match=match) as ei:
        load_model(weights=path)
    msg = _one_line(ei.value)
    assert str(path) in msg
    assert "would run code" not in msg  # garbage is not called malicious


def test_missing_weights_path(tmp_path):
    with pytest.raises(InputError, match="weights file not found"):
        load_model(weights=tmp_path / "nope.pth")
    with pytest.raises(InputError, match="is a directory"):
        load_model(weights=tmp_path)
    with pytest.raises(InputError, match="no model given"):
        load_model()


# ------------------------------------------------------------------------------------------
# Downloads and the offline world
# ------------------------------------------------------------------------------------------

def _no_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("RCLIP_CACHE", str(tmp_path / "home" / "rclip"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home" / "hf"))
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "home" / "hf" / "hub"))


@pytest.mark.parametrize("model", ["RN50-quickgelu", "regionclip-rn50-cc"])
def test_offline_pretrained_fails_fast_with_weights_hint(tmp_path, monkeypatch, model):
    _no_caches(tmp_path, monkeypatch)
    monkeypatch.setenv("RCLIP_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(OfflineError) as ei:
        load_model(model=model, pretrained="openai" if model.startswith("RN") else None)
    assert time.perf_counter() - t0 < 10
    assert "--weights PATH" in ei.value.hint
    assert ei.value.exit_code == 1
    _one_line(ei.value)


def test_unknown_pretrained_tag_lists_the_known_ones(tmp_path, monkeypatch):
    _no_caches(tmp_path, monkeypatch)
    with pytest.raises(InputError) as ei:
        load_model(model="RN50-quickgelu", pretrained="no-such-tag")
    assert "openai" in ei.value.hint


def test_network_reachable(monkeypatch):
    monkeypatch.delenv("RCLIP_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def refuse(*args, **kwargs):
        raise OSError("unreachable")

    monkeypatch.setattr("socket.create_connection", refuse)
    assert network_reachable("https://example.org/x.pth") is False
    assert network_reachable("file:///tmp/x.pth") is True
    monkeypatch.setenv("RCLIP_OFFLINE", "1")
    assert network_reachable("file:///tmp/x.pth") is True  # a local mirror needs no network


def test_download_verifies_sha256(tmp_path, monkeypatch):
    monkeypatch.setenv("RCLIP_OFFLINE", "1")  # file:// works offline
    data = b"regionclip" * 1000
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    seen: list[tuple[int, int | None]] = []
    dest = download(src.as_uri(), tmp_path / "cache" / "w.bin", sha256=sha, progress=lambda d, t: seen.append((d, t)))
    assert dest.read_bytes() == data
    assert seen[-1] == (10000, 10000)
    # a cached file with the right checksum is reused, not fetched again
    src.write_bytes(b"changed upstream")
    assert download(src.as_uri(), dest, sha256=sha).read_bytes() == data

    with pytest.raises(RuntimeFailure, match="checksum mismatch"):
        download(src.as_uri(), tmp_path / "cache" / "bad.bin", sha256="0" * 64)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["w.bin"]  # no bad or .part file


def test_download_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("RCLIP_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(OfflineError) as ei:
        download("https://example.org/model.pth", tmp_path / "m.pth", sha256="0" * 64)
    assert time.perf_counter() - t0 < 10
    assert "--weights PATH" in ei.value.hint
    assert not (tmp_path / "m.pth").exists()
