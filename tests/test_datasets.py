"""The one dataset resolver (rclip_core.data.datasets): every --dataset name for evaluation,
training and pseudo-labelling, and one-line errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rclip_core.data.datasets import (COCO_OVD_COMPAT_NOTE, dataset_images, resolve_dataset,
                                      resolve_training_data)
from rclip_core.data.vocab import get_vocabulary
from rclip_core.errors import InputError

ASSETS = Path(__file__).resolve().parents[1] / "rclip_core" / "assets"
OVD = get_vocabulary("coco-ovd")
BASE = sorted(c for c, s in zip(OVD.category_ids, OVD.split) if s == "base")
NOVEL = sorted(c for c, s in zip(OVD.category_ids, OVD.split) if s == "novel")
COCO80 = list(get_vocabulary("coco").category_ids)
# person (base), airplane (novel), traffic light (outside the OVD split)
PERSON, AIRPLANE, TRAFFIC_LIGHT = 1, 5, 10


def _coco_json(split: str) -> dict:
    cats = json.loads((ASSETS / "coco_ovd_split.json").read_text())["coco_80"]
    images, anns = [], []
    for i, cid in enumerate((PERSON, AIRPLANE, TRAFFIC_LIGHT), start=1):  # one class per image
        name = f"{split}_{i:03d}.jpg"
        images.append({"id": i, "file_name": name, "width": 64, "height": 48,
                       "coco_url": f"http://images.cocodataset.org/{split}2017/{name}"})
        anns.append({"id": i, "image_id": i, "category_id": cid, "bbox": [1, 2, 10, 20]})
    return {"images": images, "annotations": anns,
            "categories": [{"id": c["id"], "name": c["name"]} for c in cats]}


def _lvis_json(split: str) -> dict:
    cats = json.loads((ASSETS / "lvis_v1_categories.json").read_text())
    rare = next(c["id"] for c in cats if c["frequency"] == "r")
    freq = next(c["id"] for c in cats if c["frequency"] == "f")
    images = [{"id": i, "coco_url": f"http://images.cocodataset.org/{split}2017/{split}_{i:03d}.jpg",
               "width": 64, "height": 48, "neg_category_ids": [], "not_exhaustive_category_ids": []}
              for i in (1, 2)]
    anns = [{"id": 1, "image_id": 1, "category_id": freq, "bbox": [1, 1, 5, 5]},
            {"id": 2, "image_id": 2, "category_id": rare, "bbox": [1, 1, 5, 5]}]
    return {"images": images, "annotations": anns,
            "categories": [{k: c[k] for k in ("id", "name", "synonyms", "frequency")} for c in cats]}


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir()
        for i in (1, 2, 3):
            (root / f"{split}2017" / f"{split}_{i:03d}.jpg").write_bytes(b"jpeg")
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(_coco_json(split)))
        (root / "annotations" / f"lvis_v1_{split}.json").write_text(json.dumps(_lvis_json(split)))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from rclip_core.data.shapes import generate_shapes_world

    d = tmp_path_factory.mktemp("shapes") / "world"
    generate_shapes_world(d, train=6, val=4, image_size=32, workers=1)
    return d


def one_line_error(fn, *args, match: str, **kw) -> InputError:
    with pytest.raises(InputError, match=match) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return e.value


# ------------------------------------------------------------------------------------------- evaluation


def test_eval_names(coco_root, world):
    coco = resolve_dataset("coco", coco_root / "val2017")
    assert coco.name == "coco" and len(coco.vocabulary) == 80 and coco.splits is None
    assert [r.image["id"] for r in coco.present] == [1, 2, 3]
    mine = resolve_dataset("coco", coco_root / "val2017", novel_classes="airplane")
    assert mine.splits["novel"] == {AIRPLANE} and len(mine.splits["base"]) == 79
    ovd = resolve_dataset("COCO-OVD", coco_root / "val2017")
    assert len(ovd.vocabulary) == 65 and ovd.splits == {"novel": set(NOVEL), "base": set(BASE)}
    assert [r.image["id"] for r in ovd.present] == [1, 2]  # the traffic-light image is dropped
    lvis = resolve_dataset("lvis", coco_root, annotations=coco_root / "annotations" / "lvis_v1_val.json")
    assert lvis.kind == "lvis" and len(lvis.vocabulary) == 1203 and len(lvis.present) == 2
    split = json.loads((world / "split.json").read_text())
    for name in (f"shapes:{world}", str(world), str(world / "instances_val.json")):
        s = resolve_dataset(name)
        assert s.name == "shapes" and len(s.gt.images) == 4 and s.images_dir == world / "val"
        assert s.splits["novel"] == {c["id"] for c in split["novel"]}
    custom = resolve_dataset(str(coco_root / "annotations" / "instances_val2017.json"), coco_root / "val2017")
    assert custom.name == "custom" and len(custom.vocabulary) == 80 and custom.splits is None


def test_eval_bad_inputs(coco_root, tmp_path):
    one_line_error(resolve_dataset, "", match="no --dataset given")
    one_line_error(resolve_dataset, "coco", match="needs --images")
    one_line_error(resolve_dataset, "coco", tmp_path / "nowhere", match="images folder not found")
    one_line_error(resolve_dataset, "cocoa", match="not one of coco-ovd, coco, lvis, shapes:DIR")
    one_line_error(resolve_dataset, "coco-ovd", coco_root / "val2017", novel_classes="cat",
                   match="has its fixed split")
    one_line_error(resolve_dataset, f"shapes:{tmp_path}", match="not a complete ShapesWorld")
    one_line_error(resolve_dataset, "lvis", coco_root / "val2017",
                   annotations=coco_root / "annotations" / "instances_val2017.json", match="not LVIS v1")


# ------------------------------------------------------------------------------------------- training


def test_training_coco_means_80_classes_and_coco_ovd_the_split(coco_root):
    fully = resolve_training_data("coco", images=coco_root, mode="fully")
    assert fully.mode == "fully" and fully.train_category_ids == COCO80 == fully.test_category_ids
    assert fully.splits is None and fully.notes == [] and fully.train_images == coco_root / "train2017"
    assert len(fully.train.images) == 3 and len(fully.val.images) == 3
    ovd = resolve_training_data("coco-ovd", images=coco_root)
    assert ovd.mode == "ovd" and ovd.notes == []
    assert ovd.train_category_ids == BASE and ovd.test_category_ids == sorted(BASE + NOVEL)
    assert [im["id"] for im in ovd.train.images] == [1]  # only the person image has a base class
    assert [im["id"] for im in ovd.val.images] == [1, 2] and ovd.val_images == coco_root / "val2017"
    assert ovd.train_names[0] == "person" and ovd.test_names[:2] == ["person", "bicycle"]
    # compatibility: coco without data.mode=fully (or novel classes) still trains the OVD split
    for mode in ("auto", "ovd"):
        old = resolve_training_data("coco", images=coco_root, mode=mode)
        assert old.notes == [COCO_OVD_COMPAT_NOTE] and "coco-ovd" in old.notes[0] and "\n" not in old.notes[0]
        assert (old.train_category_ids, old.test_category_ids, old.splits) == \
            (ovd.train_category_ids, ovd.test_category_ids, ovd.splits)
    mine = resolve_training_data("coco", images=coco_root, novel_classes=["airplane", "traffic light"])
    assert mine.notes == [] and mine.splits["novel"] == {AIRPLANE, TRAFFIC_LIGHT}
    assert len(mine.train_category_ids) == 78 and mine.test_category_ids == COCO80


def test_training_lvis_shapes_and_custom(coco_root, world):
    lvis = resolve_training_data("lvis", images=coco_root)
    assert lvis.mode == "ovd" and len(lvis.train_category_ids) == 866 and len(lvis.test_category_ids) == 1203
    assert lvis.train_images == coco_root == lvis.val_images
    assert len(resolve_training_data("lvis", images=coco_root, mode="fully").train_category_ids) == 1203
    split = json.loads((world / "split.json").read_text())
    for name in (f"shapes:{world}", str(world)):  # `--dataset shapes:DIR` trains too
        s = resolve_training_data(name)
        assert s.mode == "ovd" and s.train_category_ids == sorted(c["id"] for c in split["base"])
        assert s.test_category_ids == list(range(1, 31)) and s.train_images == world / "train"
        assert s.val_images == world / "val" and s.notes == []
    assert resolve_training_data(f"shapes:{world}", mode="fully").train_category_ids == list(range(1, 31))
    custom = resolve_training_data(str(world / "instances_train.json"), images=world / "train",
                                   val_dataset=world / "instances_val.json")
    assert custom.mode == "fully" and custom.val_images == world / "train"


def test_training_bad_inputs(coco_root, world, tmp_path):
    one_line_error(resolve_training_data, None, match="no data set given")
    one_line_error(resolve_training_data, "coco", match="--dataset coco needs --images")
    one_line_error(resolve_training_data, "coco-ovd", match="--dataset coco-ovd needs --images")
    one_line_error(resolve_training_data, "coco", images=tmp_path, match="COCO train annotations not found")
    one_line_error(resolve_training_data, "coco-ovd", images=coco_root, mode="fully",
                   match="coco-ovd is the open-vocabulary split")
    one_line_error(resolve_training_data, "coco-ovd", images=coco_root, novel_classes=["cat"],
                   match="coco-ovd has its fixed split")
    one_line_error(resolve_training_data, "lvis", images=tmp_path, match="LVIS v1 train annotations not found")
    one_line_error(resolve_training_data, str(tmp_path / "none.json"), match="data set not found")
    one_line_error(resolve_training_data, f"shapes:{tmp_path}", match="not a complete ShapesWorld")
    one_line_error(resolve_training_data, str(world / "instances_train.json"), match="--images DIR")
    one_line_error(resolve_training_data, str(world / "instances_train.json"), images=world / "train",
                   mode="ovd", match="needs a base/novel split")
    one_line_error(resolve_training_data, "coco", images=coco_root, mode="sometimes", match="unknown data.mode")


# ------------------------------------------------------------------------------------------- images of a split


def test_dataset_images(coco_root, world):
    for images in (coco_root, coco_root / "train2017"):  # the COCO root or the split's folder
        d = dataset_images("coco", images)
        assert d.name == "coco" and d.images_dir == coco_root / "train2017" and len(d.present) == 3
    assert [r.image["id"] for r in dataset_images("coco-ovd", coco_root).present] == [1]
    assert [r.image["id"] for r in dataset_images("coco-ovd", coco_root, split="val").present] == [1, 2]
    lvis = dataset_images("lvis", coco_root, split="val")
    assert lvis.images_dir == coco_root and [r.path for r in lvis.present] == \
        [coco_root / "val2017" / "val_001.jpg", coco_root / "val2017" / "val_002.jpg"]
    s = dataset_images(f"shapes:{world}")
    assert s.name == "shapes" and len(s.present) == 6 and s.present[0].path == world / "train" / "000001.jpg"
    assert len(dataset_images(str(world), split="val").present) == 4
    custom = dataset_images(str(world / "instances_val.json"), world / "val")
    assert custom.name == "custom" and len(custom.present) == 4
    one_line_error(dataset_images, "coco", match="needs --images")
    one_line_error(dataset_images, "coco", coco_root, split="test", match="unknown split")
    one_line_error(dataset_images, str(world / "instances_val.json"), match="none of the 4 images")
    one_line_error(dataset_images, "nowhere.json", match="not one of coco, coco-ovd, lvis")
