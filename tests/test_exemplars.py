"""Exemplar prompts: ``exemplar_embeddings`` (the region path of detection, unit rows averaged
per name), ``rclip embed --exemplars FILE`` (CSV / JSON -> an embeddings file that
``--class-embeddings`` takes) and ``rclip detect --exemplar`` (mixed with text classes); bad
input is one line, exit 2, and writes nothing."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from rclip_cli.main import cli
from rclip_core.data.exemplars import parse_exemplar_spec, read_exemplars_file
from rclip_core.errors import InputError
from rclip_core.exemplars import exemplar_embeddings, exemplar_region_embeddings
from rclip_core.weights.loaders import load_class_embeddings, load_model
from rclip_core.weights.native import save_model

BOX_A = [4, 6, 40, 34]
BOX_B = [30, 20, 78, 58]


@pytest.fixture(scope="module")
def A(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("exemplars")
    torch.manual_seed(0)
    save_model(load_model(model="test-micro", random_init=True), d / "micro.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(d / "ref.png")
    Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(d / "ref2.png")
    (d / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (d / "boxes.json").write_text(json.dumps({"ref.png": [BOX_A, BOX_B]}))
    return {"dir": d, "weights": d / "micro.safetensors", "model": load_model(weights=d / "micro.safetensors"),
            "ref": d / "ref.png", "ref2": d / "ref2.png", "broken": d / "broken.jpg", "boxes": d / "boxes.json"}


def run(*args):
    return CliRunner().invoke(cli, [*map(str, args), "--device", "cpu"])


def assert_one_line_error(r, match: str, *paths: Path) -> None:
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len([ln for ln in lines if ln.startswith("error:")]) == 1, r.output
    assert [ln for ln in lines if not ln.startswith(("error:", "hint:"))] == [], r.output
    assert match in r.output, r.output
    for p in paths:
        assert not p.exists(), p


# ------------------------------------------------------------------------------------------ library

def test_exemplar_is_the_detect_region_embedding_normalised_and_averaged(A, tmp_path):
    """The exemplar row of a box is the unit region embedding `rclip detect --boxes` writes for it."""
    out = tmp_path / "det"
    r = run("detect", A["ref"], "--boxes", A["boxes"], "--weights", A["weights"], "--classes", "x",
            "--short-side", "64", "--save-embeddings", "--no-images", "--out", out)
    assert r.exit_code == 0, r.output
    from rclip_core.weights.io import read_weights

    saved = read_weights(out / "embeddings" / "ref.safetensors").tensors["embeddings"]
    emb, names = exemplar_embeddings(A["model"], [(A["ref"], BOX_A, "a"), (A["ref"], BOX_B, "b")], short_side=64)
    assert names == ["a", "b"]
    assert torch.allclose(emb, F.normalize(saved, dim=1), atol=1e-5)
    # two boxes of one name: the renormalised mean of their unit rows
    both, names = exemplar_embeddings(A["model"], [(A["ref"], BOX_A, "a"), (A["ref"], BOX_B, "a")], short_side=64)
    assert names == ["a"] and both.shape == (1, 32)
    want = F.normalize(F.normalize(saved, dim=1).mean(0, keepdim=True), dim=1)
    assert torch.allclose(both, want, atol=1e-5) and abs(float(both.norm()) - 1) < 1e-5
    # a PIL image gives what its file gives
    pil, _ = exemplar_embeddings(A["model"], [(Image.open(A["ref"]), BOX_A, "a")], short_side=64)
    assert torch.allclose(pil[0], emb[0], atol=1e-6)


def test_rows_are_grouped_per_image_but_returned_in_input_order(A):
    rows = [(A["ref2"], [0, 0, 50, 40], "c"), (A["ref"], BOX_A, "a"), (A["ref2"], [10, 10, 90, 60], "c")]
    unit, names = exemplar_region_embeddings(A["model"], rows, short_side=64)
    assert names == ["c", "a", "c"]
    for i in range(3):
        single, _ = exemplar_region_embeddings(A["model"], [rows[i]], short_side=64)
        assert torch.allclose(unit[i], single[0], atol=1e-6)
    assert float((unit[0] - unit[2]).abs().max()) > 1e-4  # two boxes of one image, two rows


def test_library_refuses_box_outside_and_empty(A):
    with pytest.raises(InputError, match="reaches outside the 80x60 image"):
        exemplar_embeddings(A["model"], [(A["ref"], [10, 10, 81, 30], "a")])
    with pytest.raises(InputError, match="no exemplars"):
        exemplar_embeddings(A["model"], [])


def test_spec_parsing():
    e = parse_exemplar_spec("C:/refs/a=b.jpg:1,2,30.5,40=red  star")
    assert (e.image, e.box, e.name) == ("C:/refs/a=b.jpg", (1.0, 2.0, 30.5, 40.0), "red star")
    for bad, msg in [("ref.jpg=cat", "IMAGE:x1,y1,x2,y2=NAME"), ("ref.jpg:1,2,3=cat", "needs 4 numbers"),
                     ("ref.jpg:1,2,a,4=cat", "not four numbers"), ("ref.jpg:5,5,5,9=cat", "degenerate"),
                     ("ref.jpg:1,2,3,4=", "name is missing")]:
        with pytest.raises(InputError, match=msg):
            parse_exemplar_spec(bad)


# ------------------------------------------------------------------------------------------ rclip embed

def test_embed_exemplars_csv_and_json_give_the_library_result(A, tmp_path):
    csv = tmp_path / "refs.csv"
    os.symlink(A["ref"], tmp_path / "ref.png")
    csv.write_text(f"image,x1,y1,x2,y2,name\nref.png,{','.join(map(str, BOX_A))},blue star\n"
                   f"{A['ref2']},0,0,50,40,\"red, big\"\nref.png,{','.join(map(str, BOX_B))},blue star\n")
    out = tmp_path / "refs.safetensors"
    r = run("embed", "--exemplars", csv, "--weights", A["weights"], "--short-side", "64", "--out", out)
    assert r.exit_code == 0, r.output
    emb, names = load_class_embeddings(out)
    assert names == ["blue star", "red, big"]
    want, _ = exemplar_embeddings(A["model"], [(A["ref"], BOX_A, "blue star"), (A["ref2"], [0, 0, 50, 40], "red, big"),
                                               (A["ref"], BOX_B, "blue star")], short_side=64)
    assert torch.allclose(emb, want, atol=1e-6)
    from rclip_core.weights.io import read_weights

    meta = read_weights(out).metadata
    assert meta["source"] == "exemplars" and meta["exemplars"] == [2, 1] and meta["short_side"] == 64
    js = tmp_path / "refs.json"
    js.write_text(json.dumps([{"image": "ref.png", "box": BOX_A, "name": "blue star"},
                              [str(A["ref2"]), 0, 0, 50, 40, "red, big"],
                              {"image": "ref.png", "x1": BOX_B[0], "y1": BOX_B[1], "x2": BOX_B[2], "y2": BOX_B[3],
                               "name": "blue star"}]))
    out2 = tmp_path / "refs_official.pth"
    r = run("embed", "--exemplars", js, "--weights", A["weights"], "--short-side", "64", "--out", out2)
    assert r.exit_code == 0, r.output
    assert torch.allclose(torch.load(out2, weights_only=True), want, atol=1e-6)


def test_embedded_exemplars_drive_detect(A, tmp_path):
    """Each given box is recognised as the exemplar made from it: the file goes into --class-embeddings."""
    csv = tmp_path / "refs.csv"
    csv.write_text(f"{A['ref']},{','.join(map(str, BOX_A))},first\n{A['ref']},{','.join(map(str, BOX_B))},second\n")
    emb = tmp_path / "refs.safetensors"
    assert run("embed", "--exemplars", csv, "--weights", A["weights"], "--short-side", "64", "--out", emb).exit_code == 0
    out = tmp_path / "det"
    r = run("detect", A["ref"], "--boxes", A["boxes"], "--weights", A["weights"], "--class-embeddings", emb,
            "--short-side", "64", "--score-thresh", "0", "--no-images", "--out", out)
    assert r.exit_code == 0, r.output
    preds = json.loads((out / "predictions.json").read_text())
    cats = {c["id"]: c["name"] for c in json.loads((out / "categories.json").read_text())}
    best = {}
    for p in preds:  # top-1 per box, boxes told apart by their x
        key = round(p["bbox"][0])
        if key not in best or p["score"] > best[key]["score"]:
            best[key] = p
    assert {k: cats[v["category_id"]] for k, v in best.items()} == {BOX_A[0]: "first", BOX_B[0]: "second"}


def test_detect_mixes_text_and_exemplar_classes(A, tmp_path):
    out = tmp_path / "det"
    r = run("detect", A["ref"], "--boxes", A["boxes"], "--weights", A["weights"], "--classes", "kite,boy",
            "--exemplar", f"{A['ref']}:{','.join(map(str, BOX_B))}=second", "--short-side", "64",
            "--score-thresh", "0", "--out", out)
    assert r.exit_code == 0, r.output
    cats = json.loads((out / "categories.json").read_text())
    assert [(c["id"], c["name"]) for c in cats] == [(1, "kite"), (2, "boy"), (3, "second")]
    preds = json.loads((out / "predictions.json").read_text())
    box_b = max((p for p in preds if round(p["bbox"][0]) == BOX_B[0]), key=lambda p: p["score"])
    assert box_b["category_id"] == 3 and box_b["score"] > 0.5  # itself, at cosine 1
    assert (out / "ref.jpg").is_file()


# ------------------------------------------------------------------------------------------ bad input

def _bad_files(A, d: Path) -> dict[str, tuple[str, str]]:
    (d / "empty.csv").write_text("")
    (d / "header_only.csv").write_text("image,x1,y1,x2,y2,name\n")
    (d / "five.csv").write_text(f"{A['ref']},1,2,3,cat\n")
    (d / "nan.csv").write_text(f"{A['ref']},1,2,x,4,cat\n")
    (d / "outside.csv").write_text(f"{A['ref']},10,10,90,30,cat\n")
    (d / "broken.csv").write_text(f"{A['broken']},1,1,5,5,cat\n")
    (d / "missing.csv").write_text("nothere.png,1,1,5,5,cat\n")
    (d / "bad.json").write_text('{"image": "a"}')
    (d / "trunc.json").write_text('[{"image": "a"')
    return {"empty.csv": ("is empty", ""), "header_only.csv": ("has no rows", ""), "five.csv": ("5 fields", ""),
            "nan.csv": ("not four numbers", ""), "outside.csv": ("reaches outside the 80x60 image", ""),
            "broken.csv": ("cannot read image", ""), "missing.csv": ("image not found", ""),
            "bad.json": ("expected a JSON list", ""), "trunc.json": ("not valid JSON", ""),
            "nofile.csv": ("exemplars file not found", "")}


@pytest.mark.parametrize("name", ["empty.csv", "header_only.csv", "five.csv", "nan.csv", "outside.csv", "broken.csv",
                                  "missing.csv", "bad.json", "trunc.json", "nofile.csv"])
def test_embed_bad_exemplars_file(A, tmp_path, name):
    match = _bad_files(A, tmp_path)[name][0]
    out = tmp_path / "out" / "e.safetensors"
    r = run("embed", "--exemplars", tmp_path / name, "--weights", A["weights"], "--out", out)
    assert_one_line_error(r, match, out, out.parent)


@pytest.mark.parametrize("spec,match", [
    ("{ref}:10,10,90,30=cat", "reaches outside the 80x60 image"),
    ("{broken}:1,1,5,5=cat", "cannot read image"),
    ("{ref}:1,1,5=cat", "needs 4 numbers"),
    ("{ref}=cat", "IMAGE:x1,y1,x2,y2=NAME"),
    ("{ref}:1,1,20,20=kite", "both by name and by --exemplar"),
])
def test_detect_bad_exemplar(A, tmp_path, spec, match):
    out = tmp_path / "det"
    r = run("detect", A["ref"], "--boxes", A["boxes"], "--weights", A["weights"], "--classes", "kite",
            "--exemplar", spec.format(ref=A["ref"], broken=A["broken"]), "--out", out)
    assert_one_line_error(r, match, out)


def test_exemplars_file_paths_are_relative_to_the_file(A, tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "r.csv").write_text("pic.png,1,2,3,4,cat\n")
    assert read_exemplars_file(sub / "r.csv")[0].image == str(sub / "pic.png")
