"""``rclip detect``: outputs on a tiny model, and the error contract for every kind of bad input
(one ``error:`` line + hint, exit 2 for input errors and 1 for runtime failures, no traceback
unless --debug, no partial output files; in a batch the good images are still processed)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from rclip_cli.main import cli
from rclip_core.errors import WeightsError
from rclip_core.weights.loaders import load_model
from rclip_core.weights.native import save_detector, save_model

W, H = 80, 60  # original image size; the model sees it resized to 1067x800 (ResizeShortestEdge 800/1333)
BOXES = [[5, 5, 40, 30], [10, 20, 70, 55], [0, 0, 80, 60], [60, 40, 100, 90]]  # the last is clipped
BOXES_XYWH = [[5, 5, 35, 25], [10, 20, 60, 35], [0, 0, 80, 60], [60, 40, 20, 20]]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("detect")
    torch.manual_seed(0)
    save_model(load_model(model="test-micro", random_init=True), d / "micro.safetensors")
    rng = np.random.default_rng(0)
    img = np.zeros((H, W, 3), dtype=np.uint8)
    img[: H // 2, : W // 2] = (180, 20, 20)
    img[H // 2:, W // 2:] = (20, 20, 180)
    img = img + rng.integers(0, 60, (H, W, 3), dtype=np.uint8)
    Image.fromarray(img).save(d / "a.jpg", quality=95)
    Image.fromarray(img[:48, :64]).save(d / "b.png")
    good = (d / "a.jpg").read_bytes()
    (d / "corrupt.jpg").write_bytes(good[: len(good) // 2])  # a truncated JPEG
    (d / "text.jpg").write_text("this is not an image\n")
    (d / "boxes.json").write_text(json.dumps({"a.jpg": BOXES, "b.png": [[1, 1, 30, 30]],
                                              "corrupt.jpg": [[1, 1, 30, 30]]}))
    (d / "boxes_reversed.json").write_text(json.dumps({"a.jpg": BOXES[::-1]}))
    return {"dir": d, "weights": d / "micro.safetensors", "a": d / "a.jpg", "b": d / "b.png",
            "corrupt": d / "corrupt.jpg", "text": d / "text.jpg", "boxes": d / "boxes.json",
            "boxes_reversed": d / "boxes_reversed.json"}


def detect(*args: str | os.PathLike, env: dict[str, str] | None = None):
    return CliRunner().invoke(cli, ["detect", *map(str, args), "--device", "cpu"], env=env)


def files_under(path: Path) -> list[Path]:
    """Files below ``path``, except the class-embedding cache (a cache, not an output)."""
    if not path.exists():
        return []
    return [p for p in path.rglob("*") if p.is_file() and "rclip-cache" not in p.parts]


def assert_error(result, out: Path, match: str, code: int = 2) -> None:
    """The error contract: exit code, one `error:` line (plus an optional `hint:` line), no
    traceback, no output files."""
    assert result.exit_code == code, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    assert match in errors[0], result.output
    assert [ln for ln in lines if not ln.startswith(("error:", "hint:"))] == [], result.output
    assert sum(ln.startswith("hint:") for ln in lines) <= 1
    assert "Traceback" not in result.output
    assert not out.exists()  # not even an empty --out directory is left behind


# ------------------------------------------------------------------------------------------
# Happy path
# ------------------------------------------------------------------------------------------

def test_detect_writes_coco_results_and_embeddings(assets, tmp_path):
    out = tmp_path / "out"
    r = detect(assets["a"], "--classes", "kite,boy", "--weights", assets["weights"], "--boxes", assets["boxes"],
               "--score-thresh", "0", "--save-embeddings", "--out", out)
    assert r.exit_code == 0, r.output
    assert "rclip detect: 1 image(s), 4 detections" in r.stdout
    assert r.stderr == ""
    assert sorted(p.relative_to(out).as_posix() for p in files_under(out)) == [
        "a.jpg", "categories.json", "embeddings/a.safetensors", "images.json", "predictions.json"]

    assert json.loads((out / "categories.json").read_text()) == [
        {"id": 1, "name": "kite", "display_name": "kite"}, {"id": 2, "name": "boy", "display_name": "boy"}]
    assert json.loads((out / "images.json").read_text()) == [
        {"id": 1, "file_name": str(assets["a"].resolve()), "width": W, "height": H}]
    preds = json.loads((out / "predictions.json").read_text())
    # GT-box mode: one detection per box (top-1 label, threshold 0), boxes not regressed, in
    # ORIGINAL pixels as COCO [x, y, w, h]; the partly outside box is clipped to the image
    assert sorted(p["bbox"] for p in preds) == sorted(BOXES_XYWH)
    assert all(p["image_id"] == 1 and p["category_id"] in (1, 2) and 0 < p["score"] <= 1 for p in preds)
    assert [p["score"] for p in preds] == sorted((p["score"] for p in preds), reverse=True)

    with Image.open(out / "a.jpg") as im:
        assert im.format == "JPEG" and im.size == (W, H)

    emb = load_file(out / "embeddings" / "a.safetensors")
    assert emb["boxes"].tolist() == [[5, 5, 40, 30], [10, 20, 70, 55], [0, 0, 80, 60], [60, 40, 80, 60]]
    assert emb["embeddings"].shape == (4, 32) and emb["embeddings"].dtype == torch.float32
    assert (emb["embeddings"][0] - emb["embeddings"][1]).abs().max() > 1e-4  # rows are distinguishable

    # the same boxes in reverse order give the same rows in reverse order
    out2 = tmp_path / "out2"
    r = detect(assets["a"], "--classes", "kite,boy", "--weights", assets["weights"], "--no-images",
               "--boxes", assets["boxes_reversed"], "--score-thresh", "0", "--save-embeddings", "--out", out2)
    assert r.exit_code == 0, r.output
    emb2 = load_file(out2 / "embeddings" / "a.safetensors")
    assert torch.equal(emb2["boxes"], emb["boxes"].flip(0))
    assert torch.allclose(emb2["embeddings"], emb["embeddings"].flip(0), atol=1e-6)
    assert not (out2 / "a.jpg").exists()


def test_class_embedding_rows_map_to_category_ids(assets, tmp_path):
    """Row k of --class-embeddings is category id k+1. The micro model's region embeddings all
    point almost the same way u, so rows [-u, u] put every box in class 2 with probability
    exp(100 cos) / (exp(100 cos) + e^0 + exp(-100 cos)) = 1.0 (T = 0.01, background logit 0)."""
    first = tmp_path / "first"
    r = detect(assets["a"], "--classes", "kite,boy", "--weights", assets["weights"], "--boxes", assets["boxes"],
               "--save-embeddings", "--no-images", "--out", first)
    assert r.exit_code == 0, r.output
    e = torch.nn.functional.normalize(load_file(first / "embeddings" / "a.safetensors")["embeddings"], dim=-1)
    u = torch.nn.functional.normalize(e.mean(0), dim=0)
    assert float((e @ u).min()) > 0.99
    emb_path = tmp_path / "two_cls_emb.pth"
    torch.save(torch.stack([-u, u]) * 3.0, emb_path)  # unnormalised, like the official files
    out = tmp_path / "out"
    r = detect(assets["a"], "--classes", "kite,boy", "--class-embeddings", emb_path, "--weights", assets["weights"],
               "--boxes", assets["boxes"], "--no-images", "--out", out)
    assert r.exit_code == 0, r.output
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds) == 4
    assert {p["category_id"] for p in preds} == {2}
    assert all(p["score"] == pytest.approx(1.0, abs=1e-5) for p in preds)


def test_grid_proposals_come_back_in_original_pixels(assets, tmp_path):
    out = tmp_path / "out"
    r = detect(assets["a"], "--classes", "kite,boy", "--weights", assets["weights"], "--proposals", "grid",
               "--score-thresh", "0", "--max-dets", "1000", "--save-embeddings", "--no-images", "--out", out)
    assert r.exit_code == 0, r.output
    boxes = load_file(out / "embeddings" / "a.safetensors")["boxes"]
    assert boxes.shape[0] > 10
    assert float(boxes[:, 0::2].min()) >= 0 and float(boxes[:, 2].max()) <= W + 1e-3
    assert float(boxes[:, 1::2].min()) >= 0 and float(boxes[:, 3].max()) <= H + 1e-3
    # the scale-1.0 square window is 800 px in the 1067x800 resized image, i.e. 60 px here
    assert any(abs(b[2] - b[0] - 60) < 0.1 and abs(b[3] - b[1] - 60) < 0.1 for b in boxes.tolist())
    for p in json.loads((out / "predictions.json").read_text()):
        x, y, w, h = p["bbox"]
        assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= W + 0.01 and y + h <= H + 0.01


# ------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written
# ------------------------------------------------------------------------------------------

def _bad_cases(a: dict[str, Path], tmp: Path) -> dict[str, tuple[list, str]]:
    """name -> (arguments, expected text in the error line)."""
    w = ["--weights", a["weights"]]
    degenerate = tmp / "degenerate.json"
    degenerate.write_text(json.dumps({"a.jpg": [[10, 10, 10, 30]]}))
    outside = tmp / "outside.json"
    outside.write_text(json.dumps({"a.jpg": [[5, 5, 20, 20], [100, 70, 150, 90]]}))
    evil = tmp / "evil.pth"
    torch.save({"model": {"backbone.conv1.weight": torch.zeros(1)}, "x": _Touch(tmp / "pwned")}, evil)
    rows3 = tmp / "three_rows.pth"
    torch.save(torch.ones(3, 32), rows3)
    dim16 = tmp / "dim16.pth"
    torch.save(torch.ones(2, 16), dim16)
    a_file = tmp / "a_file"
    a_file.write_text("x")
    return {
        "missing image": ([tmp / "nope.jpg", "--classes", "a,b", *w], "image not found"),
        "corrupt image": ([a["corrupt"], "--classes", "a,b", *w, "--proposals", "grid"], "cannot read image"),
        "not an image": ([a["text"], "--classes", "a,b", *w, "--proposals", "grid"], "not an image file"),
        "empty class name": ([a["a"], "--classes", "kite,,boy", *w, "--boxes", a["boxes"]],
                             "empty class name at position 2"),
        "duplicate class names": ([a["a"], "--classes", "kite,boy,Kite", *w, "--boxes", a["boxes"]],
                                  "duplicate class name 'Kite'"),
        "degenerate box": ([a["a"], "--classes", "a,b", *w, "--boxes", degenerate], "is degenerate"),
        "box outside the image": ([a["a"], "--classes", "a,b", *w, "--boxes", outside],
                                  "box 1 [100.0, 70.0, 150.0, 90.0] lies entirely outside the 80x60 image"),
        "weights of another architecture": ([a["a"], "--classes", "a,b", *w, "--model", "RN50-quickgelu",
                                             "--boxes", a["boxes"]], "--model RN50-quickgelu was asked for"),
        "pickle that runs code": ([a["a"], "--classes", "a,b", "--weights", evil, "--boxes", a["boxes"]],
                                  "would run code"),
        "unwritable output": ([a["a"], "--classes", "a,b", *w, "--boxes", a["boxes"], "--out", a_file / "sub"],
                              "cannot write to output directory"),
        "random init without model": ([a["a"], "--classes", "a,b", "--random-init"], "--random-init needs --model"),
        "no model": ([a["a"], "--classes", "a,b"], "no model given"),
        "no classes": ([a["a"], *w, "--boxes", a["boxes"]], "no classes given"),
        "embedding rows": ([a["a"], "--classes", "a,b", "--class-embeddings", rows3, *w, "--boxes", a["boxes"]],
                           "--class-embeddings has 3 rows but the vocabulary has 2 classes"),
        "embedding dimension": ([a["a"], "--classes", "a,b", "--class-embeddings", dim16, *w, "--boxes", a["boxes"]],
                                "class embeddings have dimension 16 but the model's region embeddings have 32"),
        "no proposals": ([a["a"], "--classes", "a,b", *w], "these weights carry no offline RPN"),
        "garbage weights file": ([a["a"], "--classes", "a,b", "--weights", a_file, "--boxes", a["boxes"]],
                               "corrupt or not a PyTorch checkpoint"),
    }


class _Touch:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


BAD_CASES = ["missing image", "corrupt image", "not an image", "empty class name", "duplicate class names",
             "degenerate box", "box outside the image", "weights of another architecture", "pickle that runs code",
             "unwritable output", "random init without model", "no model", "no classes", "embedding rows",
             "embedding dimension", "no proposals", "garbage weights file"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(assets, tmp_path, case):
    cases = _bad_cases(assets, tmp_path)
    assert sorted(cases) == sorted(BAD_CASES)
    args, match = cases[case]
    out = tmp_path / "out"
    if "--out" not in args:
        args = [*args, "--out", out]
    before = sorted(files_under(tmp_path))
    r = detect(*args)
    assert_error(r, out, match)
    assert sorted(files_under(tmp_path)) == before  # nothing written anywhere (no marker, no probe)


def test_failed_run_removes_only_the_directories_it_created(assets, tmp_path):
    args = [assets["a"], "--classes", "kite,,boy", "--weights", assets["weights"], "--boxes", assets["boxes"]]
    assert_error(detect(*args, "--out", tmp_path / "new" / "deep" / "out"), tmp_path / "new", "empty class name")
    existing = tmp_path / "existing"
    existing.mkdir()
    assert_error(detect(*args, "--out", existing / "sub"), existing / "sub", "empty class name")
    assert existing.is_dir()
    (existing / "keep.txt").write_text("x")
    r = detect(*args, "--out", existing)
    assert r.exit_code == 2 and (existing / "keep.txt").read_text() == "x"
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]


def test_output_path_that_is_a_file(assets, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    r = detect(assets["a"], "--classes", "a,b", "--weights", assets["weights"], "--boxes", assets["boxes"],
               "--out", target)
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert "is a file" in r.output
    assert target.read_text() == "keep me"


def test_batch_keeps_going_and_lists_failures(assets, tmp_path):
    out = tmp_path / "out"
    r = detect(assets["corrupt"], assets["a"], assets["b"], "--classes", "kite,boy", "--weights", assets["weights"],
               "--boxes", assets["boxes"], "--score-thresh", "0", "--out", out)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    assert "1 image(s) failed:" in r.stderr
    failed = [ln for ln in r.stderr.splitlines() if str(assets["corrupt"]) in ln]
    assert len(failed) == 1 and "cannot read image" in failed[0]
    assert sorted(p.name for p in files_under(out)) == ["a.jpg", "b.jpg", "categories.json", "images.json",
                                                         "predictions.json"]
    images = json.loads((out / "images.json").read_text())
    # ids follow the input order, the failed image's id 1 is not reused
    assert [(i["id"], Path(i["file_name"]).name, i["width"], i["height"]) for i in images] == [
        (2, "a.jpg", W, H), (3, "b.png", 64, 48)]
    preds = json.loads((out / "predictions.json").read_text())
    assert sorted(p["image_id"] for p in preds) == [2, 2, 2, 2, 3]
    assert [p["bbox"] for p in preds if p["image_id"] == 3] == [[1, 1, 29, 29]]


def test_all_images_failing_is_an_error(assets, tmp_path):
    out = tmp_path / "out"
    r = detect(assets["corrupt"], assets["text"], "--classes", "a,b", "--weights", assets["weights"],
               "--proposals", "grid", "--out", out)
    assert_error(r, out, "all 2 images failed; first: cannot read image")


def test_debug_shows_the_exception(assets, tmp_path):
    evil = tmp_path / "evil.pth"
    torch.save({"x": _Touch(tmp_path / "pwned")}, evil)
    r = detect(assets["a"], "--classes", "a,b", "--weights", evil, "--boxes", assets["boxes"], "--debug",
               "--out", tmp_path / "out")
    assert isinstance(r.exception, WeightsError)
    assert "would run code" in str(r.exception)
    assert not (tmp_path / "pwned").exists()
    assert not any(ln.startswith("error:") for ln in r.output.splitlines())


def test_offline_pretrained_fails_fast_with_weights_hint(assets, tmp_path, monkeypatch):
    home = tmp_path / "home"
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(home / "hf" / "hub"))
    env = {"RCLIP_OFFLINE": "1", "HOME": str(home), "RCLIP_CACHE": str(home / "rclip"), "HF_HOME": str(home / "hf")}
    out = tmp_path / "out"
    t0 = time.perf_counter()
    r = detect(assets["a"], "--classes", "a,b", "--model", "RN50-quickgelu", "--out", out, env=env)
    assert time.perf_counter() - t0 < 10
    assert_error(r, out, "not cached and there is no network", code=1)
    hint = [ln for ln in r.output.splitlines() if ln.startswith("hint:")]
    assert len(hint) == 1 and "--weights PATH" in hint[0]


# ----------------------------------------------------------------------- fine-tuned detector files

def _detector_file(tmp_path):
    from rclip_core.models.classifier import InferenceConfig
    from rclip_core.models.detector import Detector, DetectorConfig
    from rclip_core.models.proposals.trainable import TrainableRPNConfig

    torch.manual_seed(0)
    model = load_model(model="test-micro", random_init=True)
    emb = torch.randn(3, model.embed_dim)
    config = DetectorConfig(proposals="trained", rois_per_image=16,
                            rpn=TrainableRPNConfig(anchor_sizes=[8.0, 16.0, 32.0], pre_nms_topk_test=200,
                                                   post_nms_topk_test=50))
    det = Detector(model, emb[:2], emb, class_names=["kite", "boy", "dog"], train_class_names=["kite", "boy"],
                   config=config, inference=InferenceConfig(score_thresh=0.0))
    path = tmp_path / "det.safetensors"
    save_detector(det, path)
    return path


def test_detect_with_an_exported_detector_alone(tmp_path):
    det = _detector_file(tmp_path)
    img = tmp_path / "a.jpg"
    Image.new("RGB", (80, 60), (120, 30, 200)).save(img)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["detect", str(img), "--weights", str(det), "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    cats = json.loads((out / "categories.json").read_text())
    assert [c["name"] for c in cats] == ["kite", "boy", "dog"]  # the vocabulary stored in the file
    preds = json.loads((out / "predictions.json").read_text())
    assert all(p["category_id"] in (1, 2, 3) for p in preds)
    # --classes replaces the vocabulary at detection time (embedded with the file's text tower)
    out2 = tmp_path / "out2"
    r = CliRunner().invoke(cli, ["detect", str(img), "--weights", str(det), "--classes", "cat,okapi",
                                 "--out", str(out2), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert [c["name"] for c in json.loads((out2 / "categories.json").read_text())] == ["cat", "okapi"]
    # given boxes do not apply to a detector: one line, nothing written
    boxes = tmp_path / "b.json"
    boxes.write_text(json.dumps({"a.jpg": [[1, 1, 20, 20]]}))
    out3 = tmp_path / "out3"
    r = CliRunner().invoke(cli, ["detect", str(img), "--weights", str(det), "--boxes", str(boxes),
                                 "--out", str(out3), "--device", "cpu"])
    assert r.exit_code == 2 and "do not apply" in r.output and not out3.exists()


def test_short_side_below_range_is_refused_before_any_output(tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["detect", str(Path(__file__).parent / "data" / "sample_img1.jpg"),
                                   "--short-side", "8", "--classes", "a", "--model", "test-micro",
                                   "--random-init", "--proposals", "grid", "--out", str(out)])
    assert res.exit_code == 2 and "--short-side" in res.output and "Traceback" not in res.output
    assert not out.exists()
