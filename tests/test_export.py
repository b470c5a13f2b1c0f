"""``rclip export`` and the onnxruntime engine: parity with ``rclip detect`` (region embeddings,
boxes, scores, classes) for K = 3, 65 and 1203 from one exported file, on the sample photos and
ShapesWorld val images; the runtime path imports no torch; bad input leaves nothing behind.

The models are test-micro CLIP towers and a full-size LVIS-866 FPN offline RPN with random
weights whose BN statistics are calibrated on a photo (so activations look like a trained
network's rather than exploding) - export is slow on a CPU (minutes), so one module-scoped
export of each kind serves every test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from rclip_cli.main import cli
from rclip_core.data.images import load_image
from rclip_core.inference import DetectOptions, ZeroShotPipeline, detect_images
from rclip_core.weights.loaders import load_detector, load_model

DATA = Path(__file__).parent / "data"
PHOTOS = [DATA / "sample_img1.jpg", DATA / "sample_img2.jpg"]
SHORT = 256  # the test size of the exports (ShapesWorld's); the photos are resized to it too
# Boxes: 0.01 px in the network's (resized) pixels, i.e. 0.01 x the resize factor in original
# pixels (the photos are shrunk 4.2x to the 256 px test size; rclip detect's own fast and plain
# PyTorch paths differ by up to 0.004 resized px on this random full-size RPN).
# Scores: 1e-3 - the classifier divides cosines by 0.01, so an embedding difference of relative
# size r moves a logit by up to ~r/0.01 and a probability p by p(1-p) times that: the 1e-4
# embedding bound allows 2.5e-3. Measured: <= 2e-5 on the photos (embeddings agree to ~7e-7),
# <= 4e-4 on ShapesWorld's 128 px images (embeddings to ~5e-5).
BOX_TOL, SCORE_TOL, EMB_TOL = 0.01, 1e-3, 1e-4


def _box_tol(prep) -> float:
    return BOX_TOL * max(1.0, prep.orig_size[0] / prep.size[0], prep.orig_size[1] / prep.size[1])

pytestmark = pytest.mark.slow


def _calibrate(module: nn.Module, run) -> None:
    """BN statistics := the batch statistics of one forward pass (activations of unit scale)."""
    def pre(m, args):
        x = args[0].detach()
        m.running_mean.copy_(x.mean((0, 2, 3)))
        m.running_var.copy_(x.var((0, 2, 3), unbiased=False) + 1e-3)

    hooks = [m.register_forward_pre_hook(pre) for m in module.modules()
             if isinstance(m, (nn.BatchNorm2d, FrozenBatchNorm2d))]
    with torch.no_grad():
        run()
    for h in hooks:
        h.remove()


def _official_file(path: Path, with_rpn: bool = True) -> Path:
    """A regionclip_pretrained-style .pth (backbone., lang_encoder., offline_*) in test-micro shapes."""
    from rclip_core.models.clip import build_clip
    from rclip_core.models.proposals.offline import build_offline_rpn

    g = torch.Generator().manual_seed(0)
    clip = build_clip("test-micro")
    with torch.no_grad():
        for k, p in clip.named_parameters():
            if k.startswith("visual.") and p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    clip.eval()
    img = load_image(PHOTOS[0], SHORT).tensor
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    x = torch.nn.functional.interpolate(((img / 255 - mean) / std)[None], size=(64, 64))
    _calibrate(clip.visual, lambda: clip.visual(x))
    model = {}
    for k, v in clip.state_dict().items():
        if k.startswith("visual."):
            model["backbone." + k[len("visual."):]] = v
        elif k != "logit_scale":
            model["lang_encoder." + k] = v
    if with_rpn:
        rpn = build_offline_rpn("lvis_866_fpn")
        with rpn.plain():
            _calibrate(rpn, lambda: rpn([img]))
        st = rpn.state_dict()
        key = "proposal_generator.rpn_head.objectness_logits.weight"
        st[key] = st[key] * 30  # objectness logits of a few units, as a trained RPN's
        model.update({"offline_" + k: v for k, v in st.items()})
    torch.save({"model": model}, path)
    return path


def _detector_file(path: Path, soft_nms: bool = False) -> Path:
    from rclip_core.models.classifier import InferenceConfig
    from rclip_core.models.detector import Detector, DetectorConfig
    from rclip_core.models.proposals.trainable import TrainableRPNConfig
    from rclip_core.weights.native import save_detector

    torch.manual_seed(0)
    model = load_model(model="test-micro", random_init=True)
    emb = torch.randn(3, model.embed_dim)
    config = DetectorConfig(proposals="trained", rois_per_image=16,
                            rpn=TrainableRPNConfig(anchor_sizes=[16.0, 32.0, 64.0], pre_nms_topk_test=300,
                                                   post_nms_topk_test=100))
    det = Detector(model, emb[:2], emb, class_names=["kite", "boy", "dog"], train_class_names=["kite", "boy"],
                   config=config, inference=InferenceConfig(score_thresh=0.01, max_dets=50, soft_nms=soft_nms))
    with torch.no_grad():
        det.box_predictor.bbox_pred.weight.normal_(0, 0.01)
    save_detector(det, path)
    return path


def _shapes_val(root: Path, n: int = 3) -> list[Path]:
    r = CliRunner().invoke(cli, ["data", "shapes", str(root), "--train", "1", "--val", str(n), "--image-size", "128",
                                 "--workers", "1"])
    assert r.exit_code == 0, r.output
    return sorted((root / "val").glob("*.jpg"))[:n]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("export")
    weights = _official_file(d / "regionclip_micro.pth")
    out = d / "zs"
    r = CliRunner().invoke(cli, ["export", "--weights", str(weights), "--out", str(out), "--short-side", str(SHORT)])
    assert r.exit_code == 0, r.output
    det_file = _detector_file(d / "detector.safetensors")
    det_out = d / "det"
    r = CliRunner().invoke(cli, ["export", "--weights", str(det_file), "--out", str(det_out), "--short-side", str(SHORT)])
    assert r.exit_code == 0, r.output
    g = torch.Generator().manual_seed(3)
    vocab = {k: torch.randn(k, 32, generator=g) for k in (3, 65, 1203)}
    return {"dir": d, "weights": weights, "zs": out, "det_file": det_file, "det": det_out, "vocab": vocab,
            "images": PHOTOS + _shapes_val(d / "shapes")}


# ------------------------------------------------------------------------------------ matching

def _match_rows(ref_boxes: np.ndarray, got_boxes: np.ndarray, tol: float) -> np.ndarray:
    """For each reference box, the index of the exported box equal to it (max |diff| < tol),
    each used once (the two may order near-tied proposals differently)."""
    assert got_boxes.shape == ref_boxes.shape, (got_boxes.shape, ref_boxes.shape)
    used = np.zeros(len(got_boxes), dtype=bool)
    out = np.empty(len(ref_boxes), dtype=np.int64)
    for i, b in enumerate(ref_boxes):
        d = np.abs(got_boxes - b).max(axis=1)
        d[used] = np.inf
        j = int(np.argmin(d))
        assert d[j] < tol, f"box {i} {b} has no match (closest {got_boxes[j]}, {d[j]:.4g} px)"
        used[j] = True
        out[i] = j
    return out


def _assert_same_detections(ref, got: dict, tol: float) -> None:
    rb, rs, rc = ref.boxes.numpy(), ref.scores.numpy(), ref.classes.numpy()
    assert len(got["scores"]) == len(rs), (len(got["scores"]), len(rs))
    used = np.zeros(len(rs), dtype=bool)
    for b, s, c in zip(got["boxes"], got["scores"], got["classes"]):
        cand = np.where(~used & (rc == c) & (np.abs(rb - b).max(axis=1) < tol) & (np.abs(rs - s) < SCORE_TOL))[0]
        assert len(cand), f"exported detection {b} class {c} score {s} is not among rclip detect's"
        used[cand[0]] = True
    assert np.all(np.diff(got["scores"]) <= 0)  # by decreasing score


def _assert_embeddings(ref: np.ndarray, got: np.ndarray) -> float:
    rel = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
    assert rel.max() < EMB_TOL, rel.max()
    return float(rel.max())


# --------------------------------------------------------------------------------------- tests

def test_export_directory_and_description(world):
    meta = json.loads((world["zs"] / "export.json").read_text())
    assert sorted(p.name for p in world["zs"].iterdir()) == sorted(
        ["detector.onnx", "detector_boxes.onnx", "text_encoder.onnx", "bpe_simple_vocab_16e6.txt.gz", "export.json"])
    from rclip_core.fileio import sha256_file

    assert meta["source"]["sha256"] == sha256_file(world["weights"])
    assert meta["opset"] == 18 and meta["kind"] == "zero-shot" and meta["embed_dim"] == 32
    assert meta["settings"] == {"score_thresh": 0.05, "nms": 0.5, "max_dets": 100, "fusion": "official",
                                "topk_labels": 1}
    io = meta["graphs"]["detector"]
    assert [i["name"] for i in io["inputs"]] == ["image", "orig_size", "class_embeddings"]
    assert io["inputs"][0]["dtype"] == "uint8" and isinstance(io["inputs"][2]["shape"][0], str)  # dynamic K
    assert io["inputs"][2]["shape"][1] == 32
    assert [o["name"] for o in io["outputs"]][:4] == ["boxes", "scores", "classes", "box_index"]
    assert meta["preprocessing"]["short_side"] == SHORT
    assert not list(world["dir"].glob(".zs.*"))  # no temporary directory left


def test_runtime_preprocessing_is_bit_identical(world):
    from rclip_core.export import OnnxDetector

    det = OnnxDetector(world["zs"])
    for p in world["images"]:
        prep = load_image(p, SHORT, 1333)
        arr = det.prepare(p)
        assert arr.orig_size == prep.orig_size and arr.size == prep.size
        assert torch.equal(torch.from_numpy(arr.array).permute(2, 0, 1).float(), prep.tensor)


def test_runtime_imports_no_torch(world):
    code = f"""
import sys
from rclip_core.export import OnnxDetector
import numpy as np
det = OnnxDetector({str(world['zs'])!r})
emb = np.random.default_rng(0).standard_normal((7, 32)).astype(np.float32)
out = det.detect({str(PHOTOS[0])!r}, emb)
assert out['boxes'].shape[1] == 4 and out['region_embeddings'].shape[1] == 32
assert 'torch' not in sys.modules, 'torch was imported'
print('ok', len(out['scores']))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("ok")


def test_zero_shot_box_mode_parity_three_vocabularies_one_file(world):
    """Given boxes: the same region embeddings (1e-4 relative) and detections as rclip detect."""
    from rclip_core.export import OnnxDetector

    model = load_model(weights=world["weights"])
    onnx_det = OnnxDetector(world["zs"])
    n_dets = 0
    for emb in world["vocab"].values():
        pipe = ZeroShotPipeline(model, emb, DetectOptions(proposals="rpn", short_side=SHORT))
        for p in world["images"]:
            prep = load_image(p, SHORT, 1333)
            h, w = prep.orig_size
            given = np.array([[0, 0, w, h], [w * 0.1, h * 0.2, w * 0.6, h * 0.9], [w * 0.5, h * 0.3, w, h * 0.7],
                              [2.5, 3.25, w * 0.3, h * 0.4], [w * 0.2, h * 0.1, w * 0.45, h * 0.5]])
            ref = pipe.run(prep, str(p), given)
            got = onnx_det.detect(p, emb.numpy(), boxes=given)
            np.testing.assert_allclose(got["region_boxes"], ref.boxes.numpy(), atol=1e-4)
            _assert_embeddings(ref.embeddings.numpy(), got["region_embeddings"])
            _assert_same_detections(ref.detections, got, _box_tol(prep))
            n_dets += len(got["scores"])
    assert n_dets > 0


def test_zero_shot_rpn_mode_parity(world):
    """RPN proposals: the same proposal boxes and objectness as rclip detect; region embeddings
    and detections of this random-weight tower are compared in bulk (see the module notes: a few
    boxes' embeddings move by up to 5e-3 with the proposals' 0.004 px float rounding)."""
    from rclip_core.export import OnnxDetector

    model = load_model(weights=world["weights"])
    onnx_det = OnnxDetector(world["zs"])
    rels, matched, total = [], 0, 0
    for emb in world["vocab"].values():
        pipe = ZeroShotPipeline(model, emb, DetectOptions(proposals="rpn", short_side=SHORT))
        for p in world["images"]:
            prep = load_image(p, SHORT, 1333)
            ref = pipe.run(prep, str(p))
            got = onnx_det.detect(p, emb.numpy())
            rows = _match_rows(ref.boxes.numpy(), got["region_boxes"], _box_tol(prep))
            np.testing.assert_allclose(got["objectness"][rows], ref.objectness.numpy(), rtol=1e-3, atol=1e-3)
            e = got["region_embeddings"][rows]
            rels.append(np.linalg.norm(e - ref.embeddings.numpy(), axis=1) / np.linalg.norm(ref.embeddings.numpy(), axis=1))
            rb, rc = ref.detections.boxes.numpy(), ref.detections.classes.numpy()
            for b, c in zip(got["boxes"], got["classes"]):
                matched += bool(((rc == c) & (np.abs(rb - b).max(axis=1) < _box_tol(prep))).any())
            total += len(got["scores"])
    rel = np.concatenate(rels)
    assert np.median(rel) < EMB_TOL and np.mean(rel < EMB_TOL) > 0.97, (np.median(rel), np.mean(rel < EMB_TOL))
    assert total > 0 and matched / total > 0.9, (matched, total)


def test_detector_parity(world):
    """A fine-tuned detector (trained RPN, box regressor) against ``detect_images``. Its random
    tower scores many boxes nearly alike, so near-tied detections at the max_dets cut may swap:
    the same number of detections, >= 90 % of them matched (class, box, score)."""
    from rclip_core.data.images import load_image as load
    from rclip_core.export import OnnxDetector

    det = load_detector(world["det_file"])
    onnx_det = OnnxDetector(world["det"])
    names, own = onnx_det.default_class_embeddings()
    assert names == ["kite", "boy", "dog"] and np.allclose(own, det.test_embeddings.numpy())
    matched = total = 0
    for emb in [torch.from_numpy(own), *world["vocab"].values()]:
        det.set_vocabulary(None, emb)
        for p in world["images"]:
            prep = load(p, SHORT, 1333)
            with torch.inference_mode():
                ref = detect_images(det, [prep])[0]
            got = onnx_det.detect(p, emb.numpy())
            assert len(got["scores"]) == len(ref)
            rb, rs, rc = ref.boxes.numpy(), ref.scores.numpy(), ref.classes.numpy()
            tol = _box_tol(prep)
            for b, s, c in zip(got["boxes"], got["scores"], got["classes"]):
                matched += bool(((rc == c) & (np.abs(rb - b).max(axis=1) < tol) & (np.abs(rs - s) < SCORE_TOL)).any())
            total += len(ref)
    assert total > 0 and matched / total > 0.9, (matched, total)


def test_detect_engine_onnx_matches_torch_engine(world, tmp_path):
    from rclip_core.weights.io import save_safetensors

    emb_file = tmp_path / "emb.safetensors"
    names = [f"c{i}" for i in range(65)]
    save_safetensors(emb_file, {"embeddings": world["vocab"][65]}, {"kind": "embeddings", "names": names})
    imgs = [str(p) for p in world["images"]]
    boxes = tmp_path / "boxes.json"  # given boxes: the exact path (RPN mode: test above)
    boxes.write_text(json.dumps({os.path.basename(p): [[0, 0, 60, 50], [10, 5, 120, 100], [30, 40, 90, 128]]
                                 for p in imgs}))
    r1 = CliRunner().invoke(cli, ["detect", *imgs, "--weights", str(world["weights"]), "--class-embeddings",
                                  str(emb_file), "--short-side", str(SHORT), "--out", str(tmp_path / "t"),
                                  "--device", "cpu", "--no-images", "--boxes", str(boxes)])
    assert r1.exit_code == 0, r1.output
    r2 = CliRunner().invoke(cli, ["detect", *imgs, "--engine", "onnx", "--weights", str(world["zs"] / "export.json"),
                                  "--class-embeddings", str(emb_file), "--out", str(tmp_path / "o"),
                                  "--boxes", str(boxes)])
    assert r2.exit_code == 0, r2.output
    a = json.loads((tmp_path / "t" / "predictions.json").read_text())
    b = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert len(a) == len(b) > 0
    key = lambda d: (d["image_id"], d["category_id"], round(d["bbox"][0]), round(d["bbox"][1]))
    for x, y in zip(sorted(a, key=key), sorted(b, key=key)):
        assert (x["image_id"], x["category_id"]) == (y["image_id"], y["category_id"])
        assert np.abs(np.array(x["bbox"]) - np.array(y["bbox"])).max() < 0.02  # xywh: w = x2 - x1
        assert abs(x["score"] - y["score"]) < SCORE_TOL
    cats = json.loads((tmp_path / "o" / "categories.json").read_text())
    assert [c["name"] for c in cats] == names


# ------------------------------------------------------------------------------------ bad input

def _assert_error(r, match: str, code: int = 2) -> None:
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1 and match in lines[0], r.output
    assert all(ln.startswith(("error:", "hint:")) for ln in lines), r.output
    assert "Traceback" not in r.output


def test_export_refuses_an_existing_out(world):
    before = sorted(p.name for p in world["zs"].iterdir())
    r = CliRunner().invoke(cli, ["export", "--weights", str(world["weights"]), "--out", str(world["zs"])])
    _assert_error(r, "already exists")
    assert sorted(p.name for p in world["zs"].iterdir()) == before


def test_export_refuses_unexportable_checkpoints(world, tmp_path):
    no_rpn = _official_file(tmp_path / "no_rpn.pth", with_rpn=False)
    out = tmp_path / "out"
    r = CliRunner().invoke(cli, ["export", "--weights", str(no_rpn), "--out", str(out)])
    _assert_error(r, "no offline RPN")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    emb = tmp_path / "emb.pth"
    torch.save(torch.randn(4, 32), emb)
    r = CliRunner().invoke(cli, ["export", "--weights", str(emb), "--out", str(out)])
    _assert_error(r, "not a model")
    assert not out.exists()
    soft = _detector_file(tmp_path / "soft.safetensors", soft_nms=True)
    r = CliRunner().invoke(cli, ["export", "--weights", str(soft), "--out", str(out)])
    _assert_error(r, "soft-NMS")
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_wrong_class_embedding_width(world, tmp_path):
    from rclip_core.errors import InputError
    from rclip_core.export import OnnxDetector

    det = OnnxDetector(world["zs"])
    with pytest.raises(InputError, match=r"must be \[K, 32\]"):
        det.detect(PHOTOS[0], np.zeros((3, 64), np.float32))
    np.save(tmp_path / "e.npy", np.zeros((3, 64), np.float32))
    out = tmp_path / "o"
    r = CliRunner().invoke(cli, ["detect", str(PHOTOS[0]), "--engine", "onnx", "--weights", str(world["zs"] / "export.json"),
                                 "--class-embeddings", str(tmp_path / "e.npy"), "--out", str(out)])
    _assert_error(r, "must be [K, 32]")
    assert not out.exists()
