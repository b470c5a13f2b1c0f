"""Video in ``rclip detect`` (PyAV): sampled frames through the image path, an annotated video
and per-frame JSON (index, time) out, ByteTrack ids with --track; unreadable videos and bad
flags are one-line errors that write nothing. Also ``Detections.to_supervision()``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("av", reason="the video extra (PyAV) is not installed")
sv = pytest.importorskip("supervision", reason="the supervision extra is not installed")
pytest.importorskip("trackers", reason="the video extra (trackers: ByteTrack) is not installed")

from rclip_cli.main import cli  # noqa: E402
from rclip_core.models.classifier import Detections  # noqa: E402
from rclip_core.video import VideoWriter, probe_video, sample_frames  # noqa: E402
from rclip_core.weights.loaders import load_model  # noqa: E402
from rclip_core.weights.native import save_model  # noqa: E402

FPS = 10
N = 12


@pytest.fixture(scope="module")
def V(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("video")
    torch.manual_seed(0)
    save_model(load_model(model="test-micro", random_init=True), d / "micro.safetensors")
    rng = np.random.default_rng(0)
    bg = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    with VideoWriter(d / "clip.mp4", FPS, 64, 48) as w:
        for i in range(N):  # a white square moving right
            f = bg.copy()
            f[10:30, 2 + 3 * i: 22 + 3 * i] = 255
            w.write(f)
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 4)
    Image.fromarray(bg).save(d / "still.png")
    ref = bg.copy()
    ref[10:30, 2:22] = 255
    Image.fromarray(ref).save(d / "ref.png")  # frame 0, for an exemplar prompt
    return {"dir": d, "weights": d / "micro.safetensors", "clip": d / "clip.mp4", "broken": d / "broken.mp4",
            "still": d / "still.png", "ref": d / "ref.png"}


def run(*args):
    return CliRunner().invoke(cli, ["detect", *map(str, args), "--device", "cpu"])


COMMON = ("--classes", "square,noise", "--proposals", "grid", "--short-side", "48", "--score-thresh", "0")


def test_writer_and_sampling(V):
    info = probe_video(V["clip"])
    assert (info.width, info.height, round(info.fps)) == (64, 48, FPS)
    every = [(i, round(t, 3)) for i, t, _ in sample_frames(V["clip"], every=4)]
    assert every == [(0, 0.0), (4, 0.4), (8, 0.8)]
    at = [i for i, _, _ in sample_frames(V["clip"], fps=5)]
    assert at == [0, 2, 4, 6, 8, 10]


def test_detect_video_writes_annotated_video_and_per_frame_json(V, tmp_path):
    out = tmp_path / "out"
    r = run(V["clip"], "--weights", V["weights"], *COMMON, "--every", "3", "--out", out)
    assert r.exit_code == 0, r.output
    js = json.loads((out / "clip.json").read_text())
    assert [f["frame"] for f in js["frames"]] == [0, 3, 6, 9]
    assert [round(f["time"], 2) for f in js["frames"]] == [0.0, 0.3, 0.6, 0.9]
    assert {c["name"] for c in js["categories"]} == {"square", "noise"}
    assert all(f["detections"] for f in js["frames"])
    det = js["frames"][1]["detections"][0]
    assert set(det) == {"bbox", "score", "category_id"} and len(det["bbox"]) == 4
    info = probe_video(out / "clip.mp4")
    assert (info.width, info.height) == (64, 48)
    assert len(list(sample_frames(out / "clip.mp4"))) == 4


def test_a_frame_gives_what_the_same_image_gives(V, tmp_path):
    """The video path is the image path: frame 3, saved losslessly, through `rclip detect` as a PNG."""
    frame = [im for i, _, im in sample_frames(V["clip"]) if i == 3][0]
    frame.save(tmp_path / "frame3.png")
    r = run(tmp_path / "frame3.png", "--weights", V["weights"], *COMMON, "--no-images", "--out", tmp_path / "img")
    assert r.exit_code == 0, r.output
    img = json.loads((tmp_path / "img" / "predictions.json").read_text())
    r = run(V["clip"], "--weights", V["weights"], *COMMON, "--no-images", "--out", tmp_path / "vid")
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "vid" / "clip.mp4").exists()  # --no-images
    vid = json.loads((tmp_path / "vid" / "clip.json").read_text())["frames"][3]["detections"]
    assert len(vid) == len(img)
    for a, b in zip(sorted(vid, key=lambda d: -d["score"]), sorted(img, key=lambda d: -d["score"])):
        assert np.allclose(a["bbox"], b["bbox"], atol=0.02) and abs(a["score"] - b["score"]) < 1e-4


def test_track_ids_follow_the_moving_square(V, tmp_path):
    out = tmp_path / "out"
    r = run(V["clip"], "--weights", V["weights"], "--classes", "noise", "--exemplar", f"{V['ref']}:2,10,22,30=square",
            "--proposals", "grid", "--short-side", "48", "--score-thresh", "0", "--track", "--out", out)
    assert r.exit_code == 0, r.output
    js = json.loads((out / "clip.json").read_text())
    assert js["tracking"] == "bytetrack"
    ids = [d["track_id"] for f in js["frames"] for d in f["detections"] if d["track_id"] is not None]
    assert ids and all(isinstance(i, int) and i >= 0 for i in ids)
    # ByteTrack keeps ids across frames: far fewer distinct ids than detections
    assert len(set(ids)) < len(ids)


@pytest.mark.parametrize("case,match", [
    ("broken", "cannot read video"),
    ("every0", "--every must be >= 1"),
    ("both", "--every or --fps, not both"),
    ("image_flags", "apply to videos only"),
    ("mixed", "either images or videos"),
    ("missing", "video not found"),
])
def test_bad_video_input_is_one_line_and_writes_nothing(V, tmp_path, case, match):
    out = tmp_path / "out"
    args = {"broken": [V["broken"]], "every0": [V["clip"], "--every", "0"],
            "both": [V["clip"], "--every", "2", "--fps", "3"], "image_flags": [V["still"], "--every", "2"],
            "mixed": [V["clip"], V["still"]], "missing": [tmp_path / "nothere.mp4"]}[case]
    r = run(*args, "--weights", V["weights"], *COMMON, "--out", out)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and match in lines[0] and len(lines) <= 2, r.output
    assert "Traceback" not in r.output and not out.exists()


# ------------------------------------------------------------------------------------------ supervision

def test_to_supervision_keeps_boxes_scores_classes_and_names():
    d = Detections(torch.tensor([[1.0, 2, 30, 40], [5, 5, 20, 25]]), torch.tensor([0.9, 0.4]), torch.tensor([1, 0]),
                   torch.tensor([3, 7]), torch.tensor([0.9, 0.4]))
    s = d.to_supervision(["cat", "dog"])
    assert isinstance(s, sv.Detections) and len(s) == 2
    assert np.array_equal(s.xyxy, d.boxes.numpy()) and np.allclose(s.confidence, [0.9, 0.4])
    assert s.class_id.tolist() == [1, 0] and s.data["class_name"].tolist() == ["dog", "cat"]
    assert s.data["box_index"].tolist() == [3, 7]
    assert s[s.confidence > 0.5].data["class_name"].tolist() == ["dog"]  # filters keep the names
    empty = Detections(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0).long(), torch.zeros(0).long(), torch.zeros(0))
    assert len(empty.to_supervision(["cat"])) == 0
    with pytest.raises(ValueError, match="only 1 class names"):
        d.to_supervision(["cat"])
    annotated = sv.BoxAnnotator().annotate(np.zeros((50, 50, 3), np.uint8), s)  # supervision draws it
    assert annotated.any()
