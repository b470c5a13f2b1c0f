"""``rclip weights``: list, info, convert (round trip) and download, and their error contract.

The official-format files are built here in the layout of RegionCLIP's ``clip_rcnn.py`` state
dicts (``{"model": {...}}`` with ``backbone.*``, ``lang_encoder.*``, ``teacher_backbone.*``,
``roi_heads.box_predictor.*``, ``roi_heads.mask_head.*``) from the tiny ``test-micro`` architecture, so every expected number
below follows from that config: ModifiedResNet layers [1, 1, 1, 1], width 8, embed dim 32,
image size 64 -> attnpool grid 2, pooler resolution 4; text tower 1 layer, width 32, context 16.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rclip_cli.main import cli
from rclip_core.models.clip import build_clip
from rclip_core.weights.registry import REGISTRY


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _official_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A test-micro RegionCLIP detector/pretrained checkpoint under the official names.

    The weights are perturbed away from open_clip's init (which zeroes every bn3 scale, making
    each residual block an identity and all regions look alike) so region embeddings depend on
    the box and a conversion that changed any tensor would show.
    """
    torch.manual_seed(seed)
    clip = build_clip("test-micro")
    model: dict[str, torch.Tensor] = {}
    for k, v in clip.state_dict().items():
        v = v.clone()
        if k.startswith("visual.") and v.is_floating_point() and not k.endswith("running_var"):
            v += 0.3 * torch.randn_like(v)
        model[("backbone." + k[len("visual."):]) if k.startswith("visual.") else ("lang_encoder." + k)] = v
    model.pop("lang_encoder.logit_scale")  # RegionCLIP files have none
    for k in [k for k in model if k.startswith("backbone.")]:
        model["teacher_backbone." + k[len("backbone."):]] = model[k].clone()
    model["roi_heads.box_predictor.cls_score.weight"] = torch.randn(3, 32)
    model["roi_heads.box_predictor.cls_bg_score.weight"] = torch.zeros(1, 32)
    model["roi_heads.box_predictor.test_cls_score.weight"] = torch.randn(5, 32)
    model["roi_heads.box_predictor.bbox_pred.weight"] = torch.randn(4, 32)
    model["roi_heads.box_predictor.bbox_pred.bias"] = torch.zeros(4)
    model["roi_heads.mask_head.deconv.weight"] = torch.randn(256, 8, 2, 2)  # res5 has 32 * 8 channels
    model["roi_heads.mask_head.deconv.bias"] = torch.zeros(8)
    model["roi_heads.unused.weight"] = torch.zeros(2)
    return model


@pytest.fixture(scope="module")
def official_pth(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    state = _official_state()
    p = tmp_path_factory.mktemp("w") / "micro_official.pth"
    torch.save({"model": state, "iteration": 7, "__author__": "test"}, p)
    return p, state


def test_list_shows_every_named_model():
    r = CliRunner().invoke(cli, ["weights", "list"])
    assert r.exit_code == 0, r.output
    for name in REGISTRY:
        assert name in r.output
    assert "672.1" in r.output  # regionclip-rn50-cc: 672111099 bytes

    r = CliRunner().invoke(cli, ["weights", "list", "--json"])
    rows = json.loads(r.output)
    assert [row["name"] for row in rows] == list(REGISTRY)
    assert rows[0]["size_bytes"] == 672111099 and rows[0]["cached"] is False


def test_info_official_detector(official_pth, tmp_path):
    path, state = official_pth
    # Add offline C4 RPN names (offline_backbone.* / offline_proposal_generator.*): `info` recognises the RPN kind from key names alone.
    with_rpn = dict(state)
    for k in ("offline_backbone.stem.conv1.weight", "offline_backbone.res4.0.conv1.weight",
              "offline_proposal_generator.rpn_head.objectness_logits.weight"):
        with_rpn[k] = torch.zeros(2)
    p = tmp_path / "with_rpn.pth"
    torch.save({"model": with_rpn}, p)

    r = CliRunner().invoke(cli, ["weights", "info", str(p), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["format"] == "regionclip" and info["container"] == "pickle" and info["kind"] == "detector"
    assert info["architecture"] == {"name": "test-micro", "layers": [1, 1, 1, 1], "width": 8, "embed_dim": 32,
                                    "image_size": 64, "attnpool_grid": 2, "pooler_resolution": 4}
    tt = info["text_tower"]
    assert (tt["layers"], tt["width"], tt["context_length"], tt["vocab_size"]) == (1, 32, 16, 49408)
    assert info["teacher"]["name"] == "test-micro" and info["teacher"]["pooler_resolution"] == 4
    assert info["offline_rpn"] == {"kind": "coco_c4"}
    assert info["box_predictor"] == {"train_classes": 3, "test_classes": 5, "box_regression": "class-agnostic",
                                     "background_embedding": True}
    assert info["mask_head"] == {"in_channels": 256}
    assert info["tensors"] == len(with_rpn)
    assert info["parameters"] == sum(v.numel() for v in with_rpn.values())
    assert info["ignored_keys"] == ["roi_heads.unused.weight"]
    n_visual = sum(1 for k in state if k.startswith("backbone."))
    assert info["parts"]["visual"]["tensors"] == n_visual and info["parts"]["teacher"]["tensors"] == n_visual
    assert info["parts"]["rpn"] == {"tensors": 3, "parameters": 6}

    r = CliRunner().invoke(cli, ["weights", "info", str(path)])  # the human-readable table
    assert r.exit_code == 0, r.output
    assert "test-micro" in r.output and "pooler resolution 4" in r.output
    assert "3 training classes, 5 test classes" in r.output and "roi_heads.unused.weight" in r.output


def test_info_embedding_file(tmp_path):
    emb = torch.zeros(7, 32)
    emb[:, 0] = 2.0  # every row has norm 2: unnormalised, as the official files
    p = tmp_path / "coco_7_cls_emb.pth"
    torch.save(emb, p)
    r = CliRunner().invoke(cli, ["weights", "info", str(p), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.output)
    assert info["format"] == "embeddings" and info["kind"] == "embeddings" and info["architecture"] is None
    assert info["embeddings"] == {"rows": 7, "dim": 32, "names": None, "normalised": False}
    assert info["tensors"] == 1 and info["parameters"] == 224
    assert info["text_tower"] is None and info["box_predictor"] is None and info["offline_rpn"] is None


def test_convert_round_trip(official_pth, tmp_path):
    from rclip_core.weights.loaders import load_model

    src, state = official_pth
    out = tmp_path / "sub" / "micro.safetensors"
    r = CliRunner().invoke(cli, ["weights", "convert", str(src), str(out)])
    assert r.exit_code == 0, r.output
    assert out.is_file() and "teacher visual tower" in r.output and "mask head" in r.output

    a = load_model(weights=src)
    b = load_model(weights=out)
    assert b.arch.name == "test-micro" and b.has_text and b.info.source_format == "rclip"
    torch.manual_seed(1)
    image = torch.rand(3, 96, 128) * 255
    boxes = torch.tensor([[0.0, 0.0, 128.0, 96.0], [10.0, 20.0, 60.0, 90.0], [70.0, 5.0, 120.0, 40.0]])
    ea = a.encoder([image], [boxes])[0]
    eb = b.encoder([image], [boxes])[0]
    assert ea.shape == (3, 32)
    assert torch.equal(ea, eb)
    assert (ea[0] - ea[1]).abs().max() > 1e-3  # the embeddings do depend on the box
    assert set(b.box_predictor) == {"cls_score.weight", "cls_bg_score.weight", "test_cls_score.weight",
                                    "bbox_pred.weight", "bbox_pred.bias"}
    assert torch.equal(b.box_predictor["test_cls_score.weight"], state["roi_heads.box_predictor.test_cls_score.weight"])
    tokens = torch.randint(0, 49408, (2, 16))
    assert torch.equal(a.encode_text(tokens), b.encode_text(tokens))

    r = CliRunner().invoke(cli, ["weights", "info", str(out), "--json"])
    info = json.loads(r.output)
    assert info["format"] == "rclip" and info["kind"] == "detector" and info["teacher"] is None
    assert info["box_predictor"]["test_classes"] == 5 and info["mask_head"] is None


def test_download_offline_fails_fast(tmp_path):
    t0 = time.perf_counter()
    r = CliRunner().invoke(cli, ["weights", "download", "emb-coco-65-cls-emb", "--out", str(tmp_path / "dl")],
                           env={"RCLIP_OFFLINE": "1", "RCLIP_CACHE": str(tmp_path / "cache")})
    elapsed = time.perf_counter() - t0
    assert r.exit_code == 1, r.output
    errors = [ln for ln in _lines(r.output) if ln.startswith("error:")]
    assert len(errors) == 1 and "no network" in errors[0]
    assert "Traceback" not in r.output
    assert elapsed < 5.0
    assert not (tmp_path / "dl").exists() and not (tmp_path / "cache").exists()


def _assert_bad_input(args: list[str], must_not_exist: Path | None = None) -> str:
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2, r.output
    errors = [ln for ln in _lines(r.output) if ln.startswith("error:")]
    assert len(errors) == 1, r.output
    assert "Traceback" not in r.output
    if must_not_exist is not None:
        assert not must_not_exist.exists()
        assert not list(must_not_exist.parent.glob(f".{must_not_exist.name}*"))  # no temp file left
    return errors[0]


def test_bad_inputs(official_pth, tmp_path):
    src, _ = official_pth
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint" * 10)
    out = tmp_path / "out.safetensors"

    assert "not found" in _assert_bad_input(["weights", "info", str(tmp_path / "missing.pth")])
    assert "directory" in _assert_bad_input(["weights", "info", str(tmp_path)])
    assert "corrupt" in _assert_bad_input(["weights", "info", str(corrupt)])

    assert "not found" in _assert_bad_input(["weights", "convert", str(tmp_path / "missing.pth"), str(out)], out)
    assert "directory" in _assert_bad_input(["weights", "convert", str(tmp_path), str(out)], out)
    assert "corrupt" in _assert_bad_input(["weights", "convert", str(corrupt), str(out)], out)
    assert ".safetensors" in _assert_bad_input(["weights", "convert", str(src), str(tmp_path / "out.pt")],
                                               tmp_path / "out.pt")
    assert "directory" in _assert_bad_input(["weights", "convert", str(src), str(tmp_path)])
    assert "not found" in _assert_bad_input(["weights", "convert", str(src), str(out), "--rpn-weights",
                                             str(tmp_path / "rpn.pth")], out)
    emb = tmp_path / "emb.pth"
    torch.save(torch.randn(4, 32), emb)
    assert "embeddings" in _assert_bad_input(["weights", "convert", str(emb), str(out)], out)
    rpn = tmp_path / "rpn_coco.pth"
    torch.save({"model": {"backbone.stem.conv1.weight": torch.zeros(1),
                          "proposal_generator.rpn_head.objectness_logits.weight": torch.zeros(1)}}, rpn)
    assert "RPN" in _assert_bad_input(["weights", "convert", str(rpn), str(out)], out)
    assert "unknown model name" in _assert_bad_input(["weights", "download", "regionclip-rn51"])


def test_convert_trust_for_pickles_with_objects(official_pth, tmp_path):
    """Detectron2 files may pickle config objects: the safe loader refuses them (exit 2, the
    hint names --trust); ``convert --trust`` unpickles them and converts the tensors."""
    import argparse

    _, state = official_pth
    src = tmp_path / "with_cfg.pth"
    torch.save({"model": state, "cfg": argparse.Namespace(lr=0.002)}, src)
    out = tmp_path / "trusted.safetensors"
    r = CliRunner().invoke(cli, ["weights", "convert", str(src), str(out)])
    assert r.exit_code == 2 and "refusing" in r.output and "--trust" in r.output, r.output
    assert not out.exists()

    r = CliRunner().invoke(cli, ["weights", "convert", str(src), str(out), "--trust"])
    assert r.exit_code == 0, r.output
    info = json.loads(CliRunner().invoke(cli, ["weights", "info", str(out), "--json"]).output)
    assert info["format"] == "rclip" and info["architecture"]["name"] == "test-micro"
    assert info["parts"]["visual"]["tensors"] == sum(1 for k in state if k.startswith("backbone."))
