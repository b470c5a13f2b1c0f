"""Vocabularies and splits from the shipped category lists (the official ``*_cls_emb.pth`` row order,
``coco_zeroshot_categories.py``, ``lvis_v1_categories.py``, LVIS embedding vs display names)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from rclip_core.data.vocab import (VOCABULARIES, Vocabulary, class_name_key, get_vocabulary, parse_classes,
                                   read_classes_file, same_class_names)
from rclip_core.errors import InputError
from rclip_core.models.text import clean_lvis_name

ASSETS = Path(__file__).resolve().parents[1] / "rclip_core" / "assets"

COCO_BASE_IDS = [1, 2, 3, 4, 7, 8, 9, 15, 16, 19, 20, 23, 24, 25, 27, 31, 33, 34, 35, 38, 42, 44,
                 48, 50, 51, 52, 53, 54, 55, 56, 57, 59, 60, 62, 65, 70, 72, 73, 74, 75, 78, 79,
                 80, 82, 84, 85, 86, 90]
COCO_NOVEL_IDS = [5, 6, 17, 18, 21, 22, 28, 32, 36, 41, 47, 49, 61, 63, 76, 81, 87]
COCO_UNUSED_IDS = [10, 11, 13, 14, 37, 39, 40, 43, 46, 58, 64, 67, 77, 88, 89]


def test_counts():
    expected = {"coco": 80, "coco-ovd": 65, "coco-ovd-base": 48, "coco-ovd-novel": 17,
                "lvis": 1203, "lvis-base": 866, "coco-nouns": 4764, "googlecc-nouns": 6250}
    for name, k in expected.items():
        v = get_vocabulary(name)
        assert len(v) == k and len(v.names) == len(v.display_names) == len(v.category_ids) == k
        assert v.name == name
    assert set(expected) == set(VOCABULARIES)


def test_coco_ovd_ids_ascending_and_split():
    base, novel = get_vocabulary("coco-ovd-base"), get_vocabulary("coco-ovd-novel")
    assert list(base.category_ids) == COCO_BASE_IDS
    assert list(novel.category_ids) == COCO_NOVEL_IDS
    assert base.names[:4] == ("person", "bicycle", "car", "motorcycle")
    assert novel.names == ("airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie",
                           "snowboard", "skateboard", "cup", "knife", "cake", "couch", "keyboard",
                           "sink", "scissors")
    ovd = get_vocabulary("coco-ovd")
    assert list(ovd.category_ids) == sorted(COCO_BASE_IDS + COCO_NOVEL_IDS)
    # row 4 is airplane (id 5, novel) between motorcycle (4) and bus (6): interleaved, not base-then-novel
    assert ovd.names[3:6] == ("motorcycle", "airplane", "bus")
    assert ovd.split[3:6] == ("base", "novel", "novel")
    assert Counter(ovd.split) == {"base": 48, "novel": 17}
    assert ovd.subset("novel").names == novel.names
    assert ovd.subset("base").category_ids == base.category_ids


def test_coco80_uses_real_coco_ids():
    v = get_vocabulary("coco")
    assert v.category_ids[:12] == (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13)  # 12 is not a COCO id
    assert v.category_ids[-1] == 90
    assert v.names[v.category_ids.index(72)] == "tv"
    assert v.names[v.category_ids.index(89)] == "hair drier"
    unused = [c for c, s in zip(v.category_ids, v.split) if s == "unused"]
    assert unused == COCO_UNUSED_IDS
    assert v.index_of_category[90] == 79


def test_lvis_names_display_and_frequency():
    v = get_vocabulary("lvis")
    assert v.category_ids == tuple(range(1, 1204))
    assert Counter(v.split) == {"r": 337, "c": 461, "f": 405}
    assert v.names[0] == "aerosol can" and v.display_names[0] == "aerosol_can"
    # embedding name = cleaned `name`; display = synonyms[0]: the word differs only for id 162
    assert v.names[161] == "bull" and v.display_names[161] == "horned_cow"
    differ = [c for c, n, d in zip(v.category_ids, v.names, v.display_names)
              if n != clean_lvis_name(d)]
    assert differ == [162]
    i = v.names.index("window box for plants")
    raw = json.loads((ASSETS / "lvis_v1_categories.json").read_text())
    assert raw[i]["name"] == "window_box_(for_plants)"
    assert all("_" not in n and "(" not in n and ")" not in n for n in v.names)
    assert len(set(v.names)) == 1203


def test_lvis_base_removes_rare_keeps_id_order():
    full, base = get_vocabulary("lvis"), get_vocabulary("lvis-base")
    assert len(base) == 866 and set(base.split) == {"c", "f"}
    assert list(base.category_ids) == [c for c, s in zip(full.category_ids, full.split) if s != "r"]
    assert base.category_ids == full.subset("c", "f").category_ids
    rare = full.subset("r")
    assert len(rare) == 337 and not set(rare.category_ids) & set(base.category_ids)


def test_unknown_vocabulary_lists_choices():
    with pytest.raises(InputError) as e:
        get_vocabulary("coco65")
    assert "coco-ovd" in str(e.value) and "lvis-base" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(InputError):
        get_vocabulary(None)  # type: ignore[arg-type]
    assert get_vocabulary(" LVIS ") is get_vocabulary("lvis")


def test_parse_classes():
    v = parse_classes(" kite, boy ,traffic light")
    assert v.names == ("kite", "boy", "traffic light") == v.display_names
    assert v.category_ids == (1, 2, 3) and v.split is None and v.name == "custom"
    for bad, word in [("kite,,boy", "position 2"), ("kite,boy,", "position 3"), ("", "no classes"),
                      ("  ", "no classes"), ("kite,boy,Kite", "duplicate"), ("a b,a  b", "duplicate")]:
        with pytest.raises(InputError, match=word):
            parse_classes(bad)


def test_read_classes_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("# my classes\nkite\n\n  red ball  \nhot dog,123\n", encoding="utf-8")
    v = read_classes_file(f)
    assert v.names == ("kite", "red ball", "hot dog") and v.category_ids == (1, 2, 3)
    assert v.name == "mine"

    pool = read_classes_file(ASSETS / "concepts" / "coco_nouns_4764.txt")
    assert len(pool) == 4764 and pool.names[:3] == ("man", "people", "woman")

    dup = tmp_path / "dup.txt"
    dup.write_text("kite\nboy\nkite\n")
    with pytest.raises(InputError, match=r"duplicate class name 'kite' at dup.txt line 3"):
        read_classes_file(dup)
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(InputError, match="no classes"):
        read_classes_file(empty)
    with pytest.raises(InputError, match="not found"):
        read_classes_file(tmp_path / "missing.txt")
    blank_name = tmp_path / "blank.txt"
    blank_name.write_text("kite\n,12\n")
    with pytest.raises(InputError, match="line 2"):
        read_classes_file(blank_name)
    binary = tmp_path / "bin.txt"
    binary.write_bytes(b"\xff\xfe\x00kite")
    with pytest.raises(InputError, match="UTF-8"):
        read_classes_file(binary)


def test_vocabulary_checks_lengths():
    with pytest.raises(ValueError):
        Vocabulary(name="x", names=("a", "b"), display_names=("a",), category_ids=(1, 2))
    with pytest.raises(ValueError):
        Vocabulary(name="x", names=("a", "b"), display_names=("a", "b"), category_ids=(1, 1))
    v = Vocabulary(name="x", names=["a"], display_names=["A"], category_ids=[7])
    assert v.names == ("a",) and v.category_ids == (7,)
    with pytest.raises(InputError):
        v.subset("base")


def test_same_class_names_ignores_case_underscores_and_parentheses():
    assert class_name_key("Window_Box_(for_plants)") == "window box for plants"
    assert same_class_names(["Teddy_Bear", "kite"], ["teddy bear", "Kite "])
    assert not same_class_names(["kite", "teddy bear"], ["teddy bear", "kite"])  # order matters
    assert not same_class_names(["kite"], ["kite", "person"])
