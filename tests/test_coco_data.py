"""COCO / LVIS instance readers: validation, LVIS coco_url file names, image resolution, OVD splits."""

from __future__ import annotations

import json

import pytest

from rclip_core.data.coco import (
    DetectionSet,
    filter_categories,
    load_instances,
    resolve_images,
    split_from_names,
)
from rclip_core.errors import InputError


def coco_dict() -> dict:
    return {
        "images": [
            {"id": 1, "file_name": "000000000001.jpg", "width": 640, "height": 480,
             "coco_url": "http://images.cocodataset.org/val2017/000000000001.jpg"},
            {"id": 2, "file_name": "000000000002.jpg", "width": 320, "height": 240},
            {"id": 3, "file_name": "000000000003.jpg", "width": 320, "height": 240},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 20], "area": 150.0, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 5, "bbox": [5, 5, 4, 4]},  # no area / iscrowd
            {"id": 12, "image_id": 2, "category_id": 5, "bbox": [1, 1, 2, 2], "area": 4.0, "iscrowd": 0},
            {"id": 13, "image_id": 3, "category_id": 18, "bbox": [1, 1, 3, 3], "area": 9.0, "iscrowd": 0},
        ],
        "categories": [{"id": 1, "name": "person"}, {"id": 5, "name": "airplane"}, {"id": 18, "name": "dog"},
                       {"id": 44, "name": "bottle"}],
    }


def lvis_dict() -> dict:
    return {
        "images": [
            {"id": 397133, "coco_url": "http://images.cocodataset.org/val2017/000000397133.jpg",
             "width": 640, "height": 427, "neg_category_ids": [2, 3], "not_exhaustive_category_ids": [1]},
            {"id": 9, "coco_url": "http://images.cocodataset.org/train2017/000000000009.jpg",
             "width": 640, "height": 480, "neg_category_ids": [1], "not_exhaustive_category_ids": []},
        ],
        "annotations": [
            {"id": 1, "image_id": 397133, "category_id": 1, "bbox": [1, 2, 30, 40], "area": 1000.0},
            {"id": 2, "image_id": 9, "category_id": 3, "bbox": [5, 5, 20, 20], "area": 300.0},
        ],
        "categories": [
            {"id": 1, "name": "aerosol_can", "synonyms": ["aerosol_can", "spray_can"], "frequency": "c"},
            {"id": 2, "name": "bull", "synonyms": ["horned_cow"], "frequency": "r"},
            {"id": 3, "name": "teddy_bear", "synonyms": ["teddy_bear"], "frequency": "f"},
        ],
    }


def write(tmp_path, obj, name="ann.json"):
    p = tmp_path / name
    p.write_text(json.dumps(obj))
    return p


def test_load_coco_file_normalises_area_and_iscrowd(tmp_path):
    ds = load_instances(write(tmp_path, coco_dict()))
    assert isinstance(ds, DetectionSet) and ds.kind == "coco" and len(ds) == 3
    assert ds.source == tmp_path / "ann.json"
    ann = {a["id"]: a for a in ds.annotations}[11]
    assert ann["area"] == 16.0 and ann["iscrowd"] == 0
    assert ds.category_ids == [1, 5, 18, 44]
    assert ds.category_names()[18] == "dog"
    assert ds.images[0]["coco_folder"] == "val2017"  # from coco_url, so --images may be the COCO root


def test_load_lvis_resolves_file_names_from_coco_url(tmp_path):
    ds = load_instances(write(tmp_path, lvis_dict()))
    assert ds.kind == "lvis"
    by_id = {img["id"]: img for img in ds.images}
    assert by_id[397133]["file_name"] == "000000397133.jpg"
    assert by_id[397133]["coco_folder"] == "val2017"
    assert by_id[9]["file_name"] == "000000000009.jpg"
    assert by_id[9]["coco_folder"] == "train2017"
    assert ds.annotations[0]["iscrowd"] == 0


def test_resolve_images_in_split_folder_or_coco_root(tmp_path):
    ds = load_instances(lvis_dict())
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "train2017").mkdir()
    (root / "val2017" / "000000397133.jpg").write_bytes(b"x")

    # --images pointing at val2017/: the val image is there, the train one is missing
    present, missing = resolve_images(ds, root / "val2017")
    assert [(r.image["id"], r.path) for r in present] == [(397133, root / "val2017" / "000000397133.jpg")]
    assert [m["id"] for m in missing] == [9]

    # --images pointing at the COCO root finds both folders
    (root / "train2017" / "000000000009.jpg").write_bytes(b"x")
    present, missing = resolve_images(ds, root)
    assert sorted(r.image["id"] for r in present) == [9, 397133] and missing == []

    with pytest.raises(InputError, match="images folder not found"):
        resolve_images(ds, tmp_path / "nope")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("categories"), "missing the key(s) 'categories'"),
    (lambda d: d["annotations"].append({"id": 99, "image_id": 1, "category_id": 7, "bbox": [0, 0, 1, 1]}),
     "refer to unknown category ids [7]"),
    (lambda d: d["annotations"].append({"id": 99, "image_id": 42, "category_id": 1, "bbox": [0, 0, 1, 1]}),
     "refer to unknown image ids (e.g. 42)"),
    (lambda d: d["annotations"].append({"id": 10, "image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1]}),
     "annotation id 10 appears twice"),
    (lambda d: d["annotations"][0].update(bbox=[0, 0, -1, 3]), "bad bbox"),
    (lambda d: d["annotations"][0].pop("bbox"), "has no 'bbox'"),
    (lambda d: d["images"][1].pop("width"), "image 2 needs a positive 'width'"),
    (lambda d: d["images"][1].pop("file_name"), "neither 'file_name' nor 'coco_url'"),
    (lambda d: d["categories"].append({"id": 1, "name": "again"}), "category id 1 appears twice"),
])
def test_bad_instances_files_are_one_line_input_errors(tmp_path, mutate, message):
    d = coco_dict()
    mutate(d)
    with pytest.raises(InputError) as e:
        load_instances(write(tmp_path, d))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_captions_results_and_non_json_files_are_named(tmp_path):
    captions = {"images": coco_dict()["images"],
                "annotations": [{"id": 1, "image_id": 1, "caption": "a man riding a horse"}]}
    with pytest.raises(InputError, match="is a captions file, not an instances file"):
        load_instances(write(tmp_path, captions))
    results = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]
    with pytest.raises(InputError, match=r"is a detections \(results\) file"):
        load_instances(write(tmp_path, results))
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(InputError, match="is not valid JSON"):
        load_instances(tmp_path / "broken.json")
    with pytest.raises(InputError, match="not found"):
        load_instances(tmp_path / "missing.json")


def test_lvis_kind_requires_federated_lists_and_frequencies():
    d = lvis_dict()
    d["images"][0].pop("neg_category_ids")
    with pytest.raises(InputError, match="has no 'neg_category_ids' list"):
        load_instances(d)
    with pytest.raises(InputError, match="has no frequency r/c/f"):
        load_instances(coco_dict(), kind="lvis")


def test_filter_categories_keeps_base_annotations_and_drops_empty_images():
    ds = load_instances(coco_dict())
    base = filter_categories(ds, {1, 18})  # person, dog
    assert [c["id"] for c in base.categories] == [1, 18]
    assert sorted(a["id"] for a in base.annotations) == [10, 13]
    assert base.image_ids == [1, 3]  # image 2 had only an airplane: dropped
    assert len(ds.annotations) == 4 and len(ds.images) == 3  # the input is untouched
    assert filter_categories(ds, {1, 18}, drop_empty_images=False).image_ids == [1, 2, 3]
    with pytest.raises(InputError, match=r"category ids \[99\]"):
        filter_categories(ds, {1, 99})


def test_filter_categories_lvis_removes_rare_and_narrows_federated_lists():
    ds = load_instances(lvis_dict())
    train = filter_categories(ds, {1, 3})  # c + f, as lvis_v1_train with filter_open_cls
    by_id = {img["id"]: img for img in train.images}
    assert by_id[397133]["neg_category_ids"] == [3]  # 2 (rare) is gone
    assert {a["category_id"] for a in train.annotations} == {1, 3}
    assert ds.images[0]["neg_category_ids"] == [2, 3]


def test_split_from_names_accepts_names_ids_and_synonyms():
    ds = load_instances(coco_dict())
    split = split_from_names(ds, novel=["Dog", "airplane"])
    assert split == {"novel": {18, 5}, "base": {1, 44}}
    assert split_from_names(ds, novel=[18], base=["person", "44"]) == {"novel": {18}, "base": {1, 44}}
    lvis = load_instances(lvis_dict())
    assert split_from_names(lvis, novel=["horned cow"])["novel"] == {2}  # LVIS synonym, spaces for _


def test_split_from_names_errors_suggest_close_matches():
    ds = load_instances(coco_dict())
    with pytest.raises(InputError) as e:
        split_from_names(ds, novel=["airplan"])
    assert "'airplan' is not a category" in str(e.value) and "airplane" in e.value.hint
    with pytest.raises(InputError, match="both novel and base: dog"):
        split_from_names(ds, novel=["dog"], base=["dog", "person"])
    with pytest.raises(InputError, match="class id 7 is not a category"):
        split_from_names(ds, novel=[7])
