"""Box AP: hand-computed values, OVD split metrics as detectron2 computes them, LVIS federated
rules, agreement of the three backends, chunking, and the lvis NumPy shim."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest

from rclip_core.data.coco import load_instances
from rclip_core.errors import InputError
from rclip_core.evaluation.metrics import evaluate_detections, per_category, summary_metrics

# ----------------------------------------------------------------------------- fixtures
# Medium-sized boxes (32^2 < area < 96^2), so APm is defined and APs / APl are not.
A1, A2, A_FP = [10, 10, 50, 50], [100, 100, 50, 50], [300, 300, 50, 50]
B1, B3 = [200, 50, 60, 60], [20, 200, 60, 60]


def box_area(b):
    return float(b[2] * b[3])


def coco_gt() -> dict:
    """3 images, 4 categories: cat (2 objects), dog (2 objects), car and bus (no objects)."""
    anns = [(1, 1, 1, A1), (2, 2, 1, A2), (3, 1, 2, B1), (4, 3, 2, B3)]  # (id, image, category, box)
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 640, "height": 480} for i in (1, 2, 3)],
        "annotations": [{"id": aid, "image_id": img, "category_id": cat, "bbox": b, "area": box_area(b),
                         "iscrowd": 0} for aid, img, cat, b in anns],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}, {"id": 3, "name": "car"},
                       {"id": 4, "name": "bus"}],
    }


def det(image_id, category_id, bbox, score):
    return {"image_id": image_id, "category_id": category_id, "bbox": list(bbox), "score": score}


def perfect(gt: dict) -> list[dict]:
    return [det(a["image_id"], a["category_id"], a["bbox"], 0.9) for a in gt["annotations"]]


def imperfect() -> list[dict]:
    return [
        det(1, 1, A1, 0.9),    # cat: true positive
        det(3, 1, A_FP, 0.8),  # cat: false positive ranked between the two true positives
        det(2, 1, A2, 0.7),    # cat: true positive
        det(1, 2, B1, 0.6),    # dog: one of two objects found, the other (image 3) missed
    ]


# COCOeval's AP is the mean of the interpolated precision at 101 recall thresholds
# r = 0.00, 0.01, ..., 1.00; at each r it takes the precision of the first ranked detection
# whose recall reaches r, after replacing every precision by the maximum to its right.
#
# cat, ranked TP (0.9), FP (0.8), TP (0.7) over 2 objects:
#   recall    0.5, 0.5, 1.0
#   precision 1/1, 1/2, 2/3  -> interpolated 1, 2/3, 2/3
#   r in [0.00, 0.50] (51 thresholds) -> 1;  r in [0.51, 1.00] (50 thresholds) -> 2/3
#   AP50(cat) = (51 * 1 + 50 * 2/3) / 101 = 84.333.../101 = 0.834983...
# dog, ranked TP (0.6) over 2 objects:
#   recall 0.5, precision 1 -> r in [0, 0.5] (51) -> 1; r > 0.5 is never reached (50) -> 0
#   AP50(dog) = 51 / 101 = 0.504950...
# car, bus: no objects -> -1 in COCOeval's precision array -> excluded from every mean.
AP50_CAT = (51 + 50 * 2 / 3) / 101 * 100
AP50_DOG = 51 / 101 * 100


def lvis_gt() -> dict:
    """3 images, 3 categories r/c/f; federated lists chosen per test."""
    cats = [{"id": 1, "name": "bull", "frequency": "r"}, {"id": 2, "name": "aerosol_can", "frequency": "c"},
            {"id": 3, "name": "teddy_bear", "frequency": "f"}]
    anns = [(1, 1, 1, A1), (2, 2, 1, A2), (3, 1, 2, B1), (4, 3, 3, B3)]
    return {
        "images": [{"id": i, "coco_url": f"http://images.cocodataset.org/val2017/{i:012d}.jpg", "width": 640,
                    "height": 480, "neg_category_ids": [], "not_exhaustive_category_ids": []}
                   for i in (1, 2, 3)],
        "annotations": [{"id": aid, "image_id": img, "category_id": cat, "bbox": b, "area": box_area(b)}
                        for aid, img, cat, b in anns],
        "categories": cats,
    }


def random_dataset(seed: int, lvis: bool, n_img: int = 30, n_cat: int = 8):
    """A random but realistic fixture: jittered copies of objects, wrong labels, background
    boxes, tied scores, crowd regions (COCO) and federated lists (LVIS)."""
    rng = np.random.default_rng(seed)
    cats = [{"id": 3 * c, "name": f"c{c}", **({"frequency": "rcf"[c % 3]} if lvis else {})}
            for c in range(1, n_cat + 1)]
    cids = [c["id"] for c in cats]
    images, anns, dets = [], [], []
    for i in range(1, n_img + 1):
        img = {"id": 7 * i, "file_name": f"{i}.jpg", "width": 640, "height": 480}
        present = set()
        for _ in range(rng.integers(0, 7)):
            c = int(rng.choice(cids))
            present.add(c)
            w, h = rng.uniform(8, 200, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h * 0.8, "iscrowd": int(not lvis and rng.random() < 0.08)})
            for _ in range(rng.integers(0, 3)):
                j = rng.normal(0, 6, 4)
                dets.append(det(img["id"], c if rng.random() < 0.8 else int(rng.choice(cids)),
                                [x + j[0], y + j[1], max(1.0, w + j[2]), max(1.0, h + j[3])],
                                float(np.round(rng.random(), 1))))
        for _ in range(rng.integers(0, 8)):
            w, h = rng.uniform(8, 200, 2)
            box = [rng.uniform(0, 400), rng.uniform(0, 300), w, h]
            dets.append(det(img["id"], int(rng.choice(cids)), box,
                            float(np.round(rng.random(), 1))))
        if lvis:
            others = [c for c in cids if c not in present]
            img["neg_category_ids"] = [int(c) for c in rng.permutation(others)[:3]]
            img["not_exhaustive_category_ids"] = [c for c in sorted(present) if rng.random() < 0.3]
        images.append(img)
    return {"images": images, "annotations": anns, "categories": cats}, dets


def pycocotools_reference(gt: dict, dets: list[dict]):
    """pycocotools run the standard way (loadRes + evaluate + accumulate + summarize)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def lvis_reference(gt: dict, dets: list[dict], max_dets: int = 300) -> dict:
    """The official LVISEval run the standard way (LVISResults caps detections per image)."""
    from rclip_core.evaluation.lvis_compat import lvis_api, lvis_from_dict

    _, LVISResults, LVISEval = lvis_api()
    lvis_gt = lvis_from_dict(copy.deepcopy(gt))
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, copy.deepcopy(dets), max_dets=max_dets), "bbox")
    ev.run()
    return {k: v * 100 for k, v in ev.results.items() if k.startswith("AP")}


# ----------------------------------------------------------------------------- COCO mode
@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_perfect_predictions_give_100(backend):
    gt = coco_gt()
    m = evaluate_detections(gt, perfect(gt), backend=backend)
    assert (m["AP"], m["AP50"], m["AP75"]) == pytest.approx((100, 100, 100))
    assert m["APm"] == pytest.approx(100)
    assert math.isnan(m["APs"]) and math.isnan(m["APl"])  # no small / large objects
    assert math.isnan(m["AP50/3"]) and m["AP50/1"] == pytest.approx(100)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_imperfect_predictions_match_hand_computed_ap50(backend):
    m = evaluate_detections(coco_gt(), imperfect(), backend=backend)
    assert m["AP50/1"] == pytest.approx(AP50_CAT, abs=1e-9)  # 83.498...
    assert m["AP50/2"] == pytest.approx(AP50_DOG, abs=1e-9)  # 50.495...
    assert m["AP50"] == pytest.approx((AP50_CAT + AP50_DOG) / 2, abs=1e-9)  # 66.997...
    assert m["AP"] == pytest.approx(m["AP50"], abs=1e-9)  # exact boxes: the same at every IoU
    assert per_category(m) == pytest.approx({1: AP50_CAT, 2: AP50_DOG, 3: math.nan, 4: math.nan}, nan_ok=True)
    assert set(summary_metrics(m)) == {"AP", "AP50", "AP75", "APs", "APm", "APl"}


def test_ovd_split_metrics_follow_detectron2_exactly():
    gt, dets = coco_gt(), imperfect()
    splits = {"novel": {1}, "base": {2, 3}}  # car (3) has no objects: it drops out
    ours = {b: evaluate_detections(gt, dets, backend=b, splits=splits) for b in ("faster", "pycocotools")}
    for m in ours.values():
        assert m["AP50_novel"] == pytest.approx(AP50_CAT, abs=1e-9)
        assert m["AP50_base"] == pytest.approx(AP50_DOG, abs=1e-9)
        assert m["AP50_all"] == pytest.approx((AP50_CAT + AP50_DOG) / 2, abs=1e-9)

    # RegionCLIP's COCOEvaluator._derive_coco_results, transcribed, on a plain pycocotools run
    coco_eval = pycocotools_reference(gt, dets)
    p = coco_eval.params
    max_dets = p.maxDets[2]
    aind = [i for i, a in enumerate(p.areaRngLbl) if a == "all"]
    mind = [i for i, d in enumerate(p.maxDets) if d == max_dets]
    t = np.where(0.5 == p.iouThrs)[0]
    s = coco_eval.eval["precision"][t, :, :, aind, mind]
    for split, cid_list in [("novel", [1]), ("base", [2, 3]), ("all", [1, 2, 3])]:
        cinds = [i for cid in cid_list for i, c in enumerate(p.catIds) if c == cid]
        s_split = s[:, :, cinds]
        expected = np.mean(s_split[s_split > -1]) * 100
        assert ours["faster"][f"AP50_{split}"] == pytest.approx(expected, abs=1e-9)
        assert ours["pycocotools"][f"AP50_{split}"] == pytest.approx(expected, abs=1e-9)


def test_split_metrics_differ_when_novel_is_perfect_and_base_is_missed():
    gt = coco_gt()
    dets = [d for d in perfect(gt) if d["category_id"] == 1]  # every cat found, no dog
    m = evaluate_detections(gt, dets, splits={"novel": [1], "base": [2]})
    assert m["AP50_novel"] == pytest.approx(100) and m["AP50_base"] == pytest.approx(0)
    assert m["AP50_all"] == pytest.approx(50) and m["AP_novel"] == pytest.approx(100)


def test_backends_agree_with_reference_pycocotools_on_random_coco_data():
    gt, dets = random_dataset(seed=1, lvis=False)
    ref = pycocotools_reference(gt, dets)
    ref_stats = dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), ref.stats[:6] * 100))
    assert 5 < ref_stats["AP50"] < 95  # a fixture where matching really decides something
    for backend in ("faster", "pycocotools"):
        for chunks in ({}, {"max_chunk_detections": 15, "max_chunk_pairs": 40}):
            m = evaluate_detections(gt, dets, backend=backend, **chunks)
            for k, v in ref_stats.items():
                assert m[k] == pytest.approx(v, abs=1e-6), (backend, chunks, k)


def test_detection_inputs_array_json_and_dicts_agree(tmp_path):
    gt, dets = random_dataset(seed=2, lvis=False, n_img=10)
    arr = np.array([[d["image_id"], *d["bbox"], d["score"], d["category_id"]] for d in dets])
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(dets))
    a = evaluate_detections(gt, dets)
    assert evaluate_detections(gt, arr) == pytest.approx(a, nan_ok=True)
    assert evaluate_detections(gt, path) == pytest.approx(a, nan_ok=True)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_no_detections_is_zero_not_a_crash(backend):
    m = evaluate_detections(coco_gt(), [], backend=backend)
    assert m["AP"] == 0 and m["AP50"] == 0


def test_image_subset_equals_ground_truth_restricted_to_it():
    gt, dets = random_dataset(seed=3, lvis=False, n_img=12)
    keep = [img["id"] for img in gt["images"][:5]]
    sub = {"images": [i for i in gt["images"] if i["id"] in keep],
           "annotations": [a for a in gt["annotations"] if a["image_id"] in keep],
           "categories": gt["categories"]}
    expected = evaluate_detections(sub, [d for d in dets if d["image_id"] in keep])
    assert evaluate_detections(gt, dets, image_ids=keep) == pytest.approx(expected, nan_ok=True)


def test_max_dets_is_cocoeval_maxdets_per_image_and_category():
    gt = coco_gt()
    # two detections on the same object: the better-scored duplicate is a false positive
    dets = [det(1, 1, A_FP, 0.95), det(1, 1, A1, 0.9), det(2, 1, A2, 0.9)]
    for backend in ("faster", "pycocotools"):
        m100 = evaluate_detections(gt, dets, backend=backend, max_dets=100)
        m1 = evaluate_detections(gt, dets, backend=backend, max_dets=1)
        # 100: FP, TP, TP -> recall 0, .5, 1, precision 0, 1/2, 2/3 -> 2/3 at every threshold
        assert m100["AP50/1"] == pytest.approx(200 / 3)
        # 1: image 1 keeps only its 0.95 FP -> FP, TP: recall 0, .5, precision 0, 1/2
        #    -> 1/2 at the 51 thresholds r <= .5, 0 above: 51 * 0.5 / 101
        assert m1["AP50/1"] == pytest.approx(51 * 0.5 / 101 * 100)


@pytest.mark.parametrize("dets, message", [
    ([det(1, 7, A1, 0.9)], "category id(s) [7] that the ground truth lacks"),
    ([det(99, 1, A1, 0.9)], "not in the ground truth (e.g. 99)"),
    ([{"image_id": 1, "category_id": 1, "bbox": A1}], "detection #0 has no 'score'"),
    ([det(1, 1, [0, 0, 5], 0.9)], "bad bbox"),
    ([det(1, 1, [10, 10, -5, 5], 0.9)], "negative width or height"),
    ([det(1, 1, A1, float("nan"))], "NaN or infinite"),
])
def test_bad_detections_are_input_errors(dets, message):
    with pytest.raises(InputError) as e:
        evaluate_detections(coco_gt(), dets)
    assert message in str(e.value)


def test_backend_and_kind_must_fit():
    with pytest.raises(InputError, match="pycocotools backend cannot evaluate LVIS"):
        evaluate_detections(lvis_gt(), [], backend="pycocotools")
    with pytest.raises(InputError, match="lvis backend cannot evaluate COCO"):
        evaluate_detections(coco_gt(), [], backend="lvis")
    with pytest.raises(InputError, match="unknown evaluation backend"):
        evaluate_detections(coco_gt(), [], backend="detectron2")
    with pytest.raises(InputError, match="ground truth is a COCO dataset, not LVIS"):
        evaluate_detections(load_instances(coco_gt()), [], kind="lvis")
    with pytest.raises(InputError, match="split 'novel' has category ids \\[77\\]"):
        evaluate_detections(coco_gt(), [], splits={"novel": [77]})


# ----------------------------------------------------------------------------- LVIS mode
@pytest.mark.parametrize("backend", ["faster", "lvis"])
def test_lvis_perfect_predictions_give_100_in_every_frequency_group(backend):
    gt = lvis_gt()
    m = evaluate_detections(gt, perfect(gt), backend=backend)
    for k in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert m[k] == pytest.approx(100), k


@pytest.mark.parametrize("backend", ["faster", "lvis"])
def test_lvis_frequency_groups_are_means_over_their_categories(backend):
    gt = lvis_gt()
    dets = [d for d in perfect(gt) if d["category_id"] != 2]  # the common class is never detected
    m = evaluate_detections(gt, dets, backend=backend)
    assert (m["APr"], m["APc"], m["APf"]) == pytest.approx((100, 0, 100))
    assert m["AP"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("backend", ["faster", "lvis"])
def test_lvis_federated_rules(backend):
    # bull (1) has objects in images 1 and 2; an extra bull detection in image 3 ranks first
    extra_fp = det(3, 1, A_FP, 0.95)
    dets = [det(1, 1, A1, 0.9), det(2, 1, A2, 0.8), extra_fp]

    # image 3 says nothing about bulls: the detection is not evaluated at all
    assert evaluate_detections(lvis_gt(), dets, backend=backend)["AP50/1"] == pytest.approx(100)

    # image 3 is verified bull-free (negative): FP, TP, TP -> 2/3 at every recall threshold
    gt = lvis_gt()
    gt["images"][2]["neg_category_ids"] = [1]
    assert evaluate_detections(gt, dets, backend=backend)["AP50/1"] == pytest.approx(200 / 3)

    # an unmatched bull detection in image 2, where bulls are not exhaustively annotated, is ignored
    gt = lvis_gt()
    gt["images"][1]["not_exhaustive_category_ids"] = [1]
    dets2 = [det(1, 1, A1, 0.9), det(2, 1, A2, 0.8), det(2, 1, A_FP, 0.95)]
    assert evaluate_detections(gt, dets2, backend=backend)["AP50/1"] == pytest.approx(100)
    gt["images"][1]["not_exhaustive_category_ids"] = []
    assert evaluate_detections(gt, dets2, backend=backend)["AP50/1"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("backend", ["faster", "lvis"])
def test_lvis_caps_detections_per_image_across_categories(backend):
    gt = lvis_gt()
    # image 1: the teddy-bear FP (0.95) outranks the bull TP (0.9); with 1 detection per image
    # only the FP stays, so bull's object in image 1 is missed
    gt["images"][0]["neg_category_ids"] = [3]
    dets = [det(1, 3, A_FP, 0.95), det(1, 1, A1, 0.9), det(2, 1, A2, 0.9)]
    assert evaluate_detections(gt, dets, backend=backend, max_dets=300)["AP50/1"] == pytest.approx(100)
    m1 = evaluate_detections(gt, dets, backend=backend, max_dets=1)
    assert m1["AP50/1"] == pytest.approx(51 / 101 * 100)


@pytest.mark.filterwarnings("ignore:The 'warn' method is deprecated")  # inside the reference LVISResults
def test_lvis_backends_agree_with_reference_lvis_eval_on_random_data():
    gt, dets = random_dataset(seed=4, lvis=True)
    for max_dets in (300, 4):
        ref = lvis_reference(gt, dets, max_dets=max_dets)
        assert 5 < ref["AP50"] < 95
        for backend in ("faster", "lvis"):
            for chunks in ({}, {"max_chunk_detections": 15, "max_chunk_pairs": 40}):
                m = evaluate_detections(gt, dets, backend=backend, max_dets=max_dets, **chunks)
                for k, v in ref.items():
                    assert m[k] == pytest.approx(v, abs=1e-6, nan_ok=True), (backend, max_dets, chunks, k)


def test_chunking_reports_progress_over_all_categories():
    gt, dets = random_dataset(seed=5, lvis=True)
    seen = []
    evaluate_detections(gt, dets, max_chunk_detections=10, progress=seen.append)
    assert len(seen) > 1 and sum(seen) == len(gt["categories"])


# ----------------------------------------------------------------------------- lvis shim
def test_lvis_shim_is_needed_and_stays_local():
    # NumPy >= 1.24 removed np.float, which lvis 0.5.3's accumulate() calls
    assert not hasattr(np, "float")
    code = (
        "import logging, numpy as np\n"
        "from rclip_core.evaluation.lvis_compat import lvis_api\n"
        "LVIS, LVISResults, LVISEval = lvis_api()\n"
        "import lvis.eval\n"
        "assert lvis.eval.np.float is float and lvis.eval.np.cumsum is np.cumsum\n"
        "assert not hasattr(np, 'float')\n"
        "assert logging.getLogger().handlers == [], logging.getLogger().handlers\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_core_evaluation_prints_nothing(capsys):
    gt, dets = random_dataset(seed=6, lvis=True, n_img=8)
    for backend in ("faster", "lvis"):
        evaluate_detections(gt, dets, backend=backend)
    cgt, cdets = random_dataset(seed=6, lvis=False, n_img=8)
    evaluate_detections(cgt, cdets, backend="pycocotools")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
