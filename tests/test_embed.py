"""``rclip embed``: prompt-ensemble embeddings written in the official [N, D] float32 .pth
format and in rclip's safetensors (names inside); both round-trip through
``load_class_embeddings`` and ``rclip detect --class-embeddings``; bad input is one line, exit 2,
and writes nothing."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rclip_cli.main import cli
from rclip_core.data.vocab import get_vocabulary
from rclip_core.weights.loaders import load_class_embeddings, load_model
from rclip_core.models.text import class_embeddings, get_tokenizer
from rclip_core.weights.io import read_weights
from rclip_core.weights.native import save_model

NAMES = ["kite", "boy", "surfboard"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("embed")
    torch.manual_seed(0)
    model = load_model(model="test-micro", random_init=True)
    save_model(model, d / "micro.safetensors")
    save_model(model, d / "micro_visual.safetensors", include_text=False)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(d / "a.png")
    (d / "boxes.json").write_text(json.dumps({"a.png": [[5, 5, 40, 30], [10, 20, 70, 55]]}))
    (d / "pool.txt").write_text("kite,12\nboy,7\nsurf board,3")  # official pools: no final newline
    return {"dir": d, "weights": d / "micro.safetensors", "visual": d / "micro_visual.safetensors",
            "model": load_model(weights=d / "micro.safetensors"), "image": d / "a.png",
            "boxes": d / "boxes.json", "pool": d / "pool.txt"}


def embed(*args):
    return CliRunner().invoke(cli, ["embed", *map(str, args), "--device", "cpu"])


def expected(assets, names, templates="single", average="raw") -> torch.Tensor:
    m = assets["model"]
    return class_embeddings(m.clip, get_tokenizer(m.arch.context_length), names, templates=templates, average=average)


def test_official_format_round_trips(assets, tmp_path):
    out = tmp_path / "coco_3_cls_emb.pth"
    r = embed("kite,boy,surfboard", "--weights", assets["weights"], "--templates", "single", "--out", out)
    assert r.exit_code == 0, r.output
    t = torch.load(out, weights_only=True)  # a bare tensor, as the official files
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.shape == (3, 32)
    assert torch.equal(t, expected(assets, NAMES))
    # row 0 is "a photo of a kite." through the text tower, unnormalised
    m = assets["model"]
    with torch.no_grad():
        row0 = m.encode_text(get_tokenizer(m.arch.context_length)(["a photo of a kite."]))[0]
    assert torch.allclose(t[0], row0, atol=1e-6) and abs(float(t[0].norm()) - 1.0) > 0.1
    emb, names = load_class_embeddings(out)
    assert torch.equal(emb, t) and names is None
    # the same container as torch.save(t, "coco_3_cls_emb.pth"): one N*D*4-byte storage
    with zipfile.ZipFile(out) as z:
        sizes = {i.filename: i.file_size for i in z.infolist()}
    assert sizes["coco_3_cls_emb/data/0"] == 3 * 32 * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["coco_3_cls_emb.pth", "rclip-cache"]


def test_rclip_format_keeps_names_and_settings(assets, tmp_path):
    out = tmp_path / "pool.safetensors"
    r = embed(assets["pool"], "--weights", assets["weights"], "--out", out)  # clip81, raw
    assert r.exit_code == 0, r.output
    wf = read_weights(out)
    names = ["kite", "boy", "surf board"]  # the part before the comma, in file order
    assert {k: wf.metadata[k] for k in ("format", "kind", "names", "templates", "average", "model",
                                        "architecture", "embed_dim")} == {
        "format": "rclip", "kind": "embeddings", "names": names, "templates": "clip81", "average": "raw",
        "model": str(assets["weights"]), "architecture": "test-micro", "embed_dim": 32}
    emb, got_names = load_class_embeddings(out)
    assert got_names == names and torch.equal(emb, expected(assets, names, "clip81"))

    norm = tmp_path / "norm.safetensors"
    assert embed(assets["pool"], "--weights", assets["weights"], "--average", "normalized", "--out", norm).exit_code == 0
    emb_n, _ = load_class_embeddings(norm)
    assert torch.allclose(emb_n.norm(dim=1), torch.ones(3), atol=1e-6)
    assert torch.allclose(emb_n, expected(assets, names, "clip81", "normalized"), atol=1e-6)
    assert read_weights(norm).metadata["average"] == "normalized"


def test_one_name_keeps_its_row_dimension_unless_squeezed(assets, tmp_path):
    args = ("kite", "--weights", assets["weights"], "--templates", "single")
    assert embed(*args, "--out", tmp_path / "a.pth").exit_code == 0
    assert embed(*args, "--squeeze", "--out", tmp_path / "b.pth").exit_code == 0
    assert embed(*args, "--out", tmp_path / "c.safetensors").exit_code == 0
    assert torch.load(tmp_path / "a.pth", weights_only=True).shape == (1, 32)
    assert torch.load(tmp_path / "b.pth", weights_only=True).shape == (32,)  # like the official tool
    rows = [load_class_embeddings(tmp_path / n)[0] for n in ("a.pth", "b.pth", "c.safetensors")]
    assert all(r.shape == (1, 32) and torch.equal(r, rows[0]) for r in rows)
    assert load_class_embeddings(tmp_path / "c.safetensors")[1] == ["kite"]


def test_vocabulary_and_format_from_the_suffix(assets, tmp_path):
    r = embed("--vocabulary", "coco-ovd-novel", "--weights", assets["weights"], "--templates", "single",
              "--out", tmp_path / "novel.emb")
    assert r.exit_code == 0, r.output
    vocab = get_vocabulary("coco-ovd-novel")
    meta = read_weights(tmp_path / "novel.emb").metadata  # not .pth: rclip format
    assert meta["names"] == list(vocab.names) and len(meta["names"]) == 17
    assert meta["category_ids"] == list(vocab.category_ids) and meta["vocabulary"] == "coco-ovd-novel"
    r = embed("kite,boy", "--weights", assets["weights"], "--templates", "single", "--out", tmp_path / "x.pt")
    assert r.exit_code == 0, r.output
    assert torch.load(tmp_path / "x.pt", weights_only=True).shape == (2, 32)


def test_detect_reads_both_formats(assets, tmp_path):
    official, ours = tmp_path / "e.pth", tmp_path / "e.safetensors"
    for out in (official, ours):
        assert embed("kite,boy,surfboard", "--weights", assets["weights"], "--out", out).exit_code == 0
    runs = {}
    for name, extra in (("official", ["--class-embeddings", official, "--classes", "kite,boy,surfboard"]),
                        ("ours", ["--class-embeddings", ours])):  # names come from the file
        out = tmp_path / name
        r = CliRunner().invoke(cli, ["detect", str(assets["image"]), "--weights", str(assets["weights"]),
                                     "--boxes", str(assets["boxes"]), "--score-thresh", "0", "--no-images",
                                     "--device", "cpu", "--out", str(out), *map(str, extra)])
        assert r.exit_code == 0, r.output
        cats = json.loads((out / "categories.json").read_text())
        assert [c["name"] for c in cats] == NAMES
        runs[name] = json.loads((out / "predictions.json").read_text())
    assert runs["official"] == runs["ours"] and len(runs["ours"]) == 2


@pytest.mark.parametrize("case", [
    "no-names", "missing-file", "duplicate", "empty-entry", "names-and-vocabulary", "unknown-vocabulary",
    "format-conflict", "squeeze-rclip", "no-model", "random-init-alone", "no-text-tower", "bad-templates",
    "out-is-dir", "missing-weights",
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(assets, tmp_path, case):
    out = tmp_path / "new" / "e.safetensors"
    w = ["--weights", assets["weights"]]
    (tmp_path / "adir").mkdir()
    args, match = {
        "no-names": ([*w, "--out", out], "no names given"),
        "missing-file": (["classes.txt", *w, "--out", out], "names file not found"),
        "duplicate": (["kite,Kite", *w, "--out", out], "duplicate class name"),
        "empty-entry": (["kite,,boy", *w, "--out", out], "empty class name"),
        "names-and-vocabulary": (["kite", "--vocabulary", "coco", *w, "--out", out], "not both"),
        "unknown-vocabulary": (["--vocabulary", "imagenet", *w, "--out", out], "unknown vocabulary"),
        "format-conflict": (["kite", *w, "--format", "official", "--out", out], "writes a torch .pth"),
        "squeeze-rclip": (["kite", *w, "--squeeze", "--out", out], "--squeeze applies to --format official"),
        "no-model": (["kite", "--out", out], "no model given"),
        "random-init-alone": (["kite", "--random-init", "--out", out], "--random-init needs --model"),
        "no-text-tower": (["kite", "--weights", assets["visual"], "--out", out], "has no text encoder"),
        "bad-templates": (["kite", *w, "--templates", "nope", "--out", out], "unknown template set"),
        "out-is-dir": (["kite", *w, "--out", tmp_path / "adir"], "is a directory"),
        "missing-weights": (["kite", "--weights", tmp_path / "nope.pth", "--out", out], "weights file not found"),
    }[case]
    r = embed(*args)
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert [ln for ln in lines if ln.startswith("error:")] == lines[:1] and match in lines[0], r.output
    assert all(ln.startswith(("error:", "hint:")) for ln in lines), r.output
    assert not (tmp_path / "new").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "rclip-cache") == ["adir"]
    assert list((tmp_path / "adir").iterdir()) == []


def test_help_has_an_example():
    r = CliRunner().invoke(cli, ["embed", "--help"])
    assert r.exit_code == 0 and "rclip embed coco_nouns_4764.txt" in r.output
    r = CliRunner().invoke(cli, ["pseudo-label", "--help"])
    assert r.exit_code == 0 and "rclip pseudo-label --inspect" in r.output
