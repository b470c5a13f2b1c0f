"""Evaluation protocols: LVIS Fixed AP, mask AP (segm), the protocol named beside every number,
ShapesWorld's exact polygons and the mask head trained and scored end to end."""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pycocotools import mask as mask_utils

from rclip_cli.main import cli
from rclip_core.errors import InputError
from rclip_core.evaluation.metrics import evaluate_detections, summary_metrics

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- synthetic LVIS


def _ellipse(x: float, y: float, w: float, h: float, n: int = 16) -> list[float]:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([x + w / 2 * (1 + np.cos(t)), y + h / 2 * (1 + np.sin(t))], 1).ravel().tolist()


def _rle(poly: list[float], h: int, w: int) -> dict:
    r = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    return {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}


def synthetic_lvis(seed: int = 0, n_images: int = 60, dets_per_object: int = 6):
    """A small federated LVIS-style set (r/c/f classes, negative and not-exhaustive lists) with
    masks, and many noisy detections per object (so that a per-class budget binds)."""
    rng = np.random.default_rng(seed)
    W, H = 80, 60
    cats = [{"id": i + 1, "name": f"class {i}", "frequency": "rcf"[i % 3]} for i in range(9)]
    images, anns, rows, segs = [], [], [], []
    for i in range(n_images):
        labels = rng.choice(np.arange(1, 10), int(rng.integers(1, 4)))
        present = sorted({int(c) for c in labels})
        absent = sorted(set(range(1, 10)) - set(present))
        img = {"id": 10 + i, "width": W, "height": H, "file_name": f"{i}.jpg",
               "neg_category_ids": [int(c) for c in rng.choice(absent, 3, replace=False)],
               "not_exhaustive_category_ids": present[:1] if rng.random() < 0.2 else []}
        images.append(img)
        for c in labels:
            w, h = rng.uniform(8, 40), rng.uniform(8, 30)
            x, y = rng.uniform(0, W - w), rng.uniform(0, H - h)
            poly = _ellipse(x, y, w, h)
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(c), "bbox": [x, y, w, h],
                         "area": float(mask_utils.area(_rle(poly, H, W))), "iscrowd": 0, "segmentation": [poly]})
            for _ in range(dets_per_object):
                jx = float(np.clip(x + rng.normal(0, 0.15 * w), 0, W - w))
                jy = float(np.clip(y + rng.normal(0, 0.15 * h), 0, H - h))
                cat = int(c) if rng.random() < 0.7 else int(rng.integers(1, 10))
                rows.append([img["id"], jx, jy, w, h, round(float(rng.random()), 2), cat])
                segs.append(_rle(_ellipse(jx, jy, w, h), H, W))
    gt = {"images": images, "annotations": anns, "categories": cats}
    return gt, np.array(rows, dtype=np.float64), segs


def reference_fixed_ap(gt: dict, results: list[dict], iou_type: str, budget: int, tmp_path: Path) -> dict:
    """Dave et al.'s ``scripts/evaluate_ap_fixed.py``, run on the lvis API directly: top
    ``budget`` per category (Python's stable ``sorted``), ``LVISResults(max_dets=-1)``,
    ``params.max_dets = -1``."""
    from rclip_core.evaluation.lvis_compat import lvis_api

    LVIS, LVISResults, LVISEval = lvis_api()
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(gt))
    by_cat: dict[int, list[dict]] = {}
    for ann in results:
        by_cat.setdefault(ann["category_id"], []).append(ann)
    capped = []
    for cat_anns in by_cat.values():
        capped.extend(sorted(cat_anns, key=lambda a: a["score"], reverse=True)[:budget])
    lvis_gt = LVIS(str(path))
    ev = LVISEval(lvis_gt, LVISResults(lvis_gt, copy.deepcopy(capped), max_dets=-1), iou_type=iou_type)
    ev.params.max_dets = -1
    ev.run()
    return {k: (v * 100 if v >= 0 else math.nan) for k, v in ev.results.items()}  # -1: undefined


def _results(rows: np.ndarray, segs=None) -> list[dict]:
    out = [{"image_id": int(r[0]), "bbox": [float(v) for v in r[1:5]], "score": float(r[5]),
            "category_id": int(r[6])} for r in rows]
    if segs is not None:
        for d, s in zip(out, segs):
            d["segmentation"] = s
    return out


@pytest.mark.parametrize("backend", ["faster", "lvis"])
def test_fixed_ap_matches_the_reference_script_on_synthetic_detections(backend, tmp_path):
    gt, rows, _ = synthetic_lvis()
    per_class = np.bincount(rows[:, 6].astype(int))[1:]
    budget = 40
    assert (per_class > budget).all()  # the budget binds for every class
    ours = summary_metrics(evaluate_detections(copy.deepcopy(gt), rows, backend=backend, protocol="fixed-ap",
                                               per_class_budget=budget))
    ref = reference_fixed_ap(gt, _results(rows), "bbox", budget, tmp_path)
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-9, nan_ok=True), k
    assert ours["classes_under_budget"] == 0
    # the budget is what changes the number: standard (300 per image never binds here) differs,
    # and a budget above every class's count equals the standard protocol
    standard = summary_metrics(evaluate_detections(copy.deepcopy(gt), rows, backend=backend))
    assert abs(standard["AP"] - ours["AP"]) > 1.0
    roomy = summary_metrics(evaluate_detections(copy.deepcopy(gt), rows, backend=backend, protocol="fixed-ap",
                                                per_class_budget=10_000))
    assert roomy["AP"] == pytest.approx(standard["AP"], abs=1e-9)
    assert roomy["classes_under_budget"] == 9


def test_fixed_ap_has_no_per_image_cap(tmp_path):
    """400 detections in one image: the standard protocol keeps 300 of them, Fixed AP all."""
    gt, rows, _ = synthetic_lvis(n_images=4, dets_per_object=150)
    one = rows[rows[:, 0] == rows[0, 0]]
    assert len(one) > 300
    ours = summary_metrics(evaluate_detections(copy.deepcopy(gt), rows, protocol="fixed-ap"))
    ref = reference_fixed_ap(gt, _results(rows), "bbox", 10_000, tmp_path)
    assert ours["AP"] == pytest.approx(ref["AP"], abs=1e-9)
    assert summary_metrics(evaluate_detections(copy.deepcopy(gt), rows))["AP"] != pytest.approx(ours["AP"])


@pytest.mark.parametrize("backend", ["faster", "lvis"])
def test_fixed_ap_mask_ap_matches_the_reference(backend, tmp_path):
    gt, rows, segs = synthetic_lvis(seed=1)
    ours = summary_metrics(evaluate_detections(copy.deepcopy(gt), rows, backend=backend, protocol="fixed-ap",
                                               per_class_budget=30, iou_type="segm", segmentations=segs))
    ref = reference_fixed_ap(gt, _results(rows, segs), "segm", 30, tmp_path)
    # the reference ranks sizes by the result's box area (it keeps "bbox"); the size-free
    # numbers must agree exactly
    for k in ("AP", "AP50", "AP75", "APr", "APc", "APf"):
        assert ours[k] == pytest.approx(ref[k], abs=1e-9, nan_ok=True), k
    box = summary_metrics(evaluate_detections(copy.deepcopy(gt), rows, backend=backend, protocol="fixed-ap",
                                              per_class_budget=30))
    assert ours["AP"] != pytest.approx(box["AP"])  # mask IoU, not box IoU


def test_mask_ap_of_ground_truth_masks_is_100_on_every_backend():
    gt, _, _ = synthetic_lvis(seed=2, n_images=20)
    rows = np.array([[a["image_id"], *a["bbox"], 1.0, a["category_id"]] for a in gt["annotations"]])
    segs = [_rle(a["segmentation"][0], 60, 80) for a in gt["annotations"]]
    for backend in ("faster", "lvis"):
        for protocol in ("standard", "fixed-ap"):
            m = evaluate_detections(copy.deepcopy(gt), rows, backend=backend, protocol=protocol, iou_type="segm",
                                    segmentations=segs)
            assert (m["AP"], m["APr"], m["APc"], m["APf"]) == (100.0, 100.0, 100.0, 100.0)
    coco = {"images": [{k: v for k, v in i.items() if "category_ids" not in k} for i in gt["images"]],
            "annotations": gt["annotations"], "categories": [{"id": c["id"], "name": c["name"]}
                                                             for c in gt["categories"]]}
    for backend in ("faster", "pycocotools"):
        assert evaluate_detections(copy.deepcopy(coco), rows, backend=backend, iou_type="segm",
                                   segmentations=segs)["AP"] == 100.0


def test_coco_mask_ap_agrees_with_pycocotools_used_directly():
    """Mask AP with the size ranges on mask area: pycocotools' own loadRes of results without
    "bbox" (what detectron2's evaluator passes), against both rclip backends."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt, rows, segs = synthetic_lvis(seed=3)
    coco = {"images": [{k: v for k, v in i.items() if "category_ids" not in k} for i in gt["images"]],
            "annotations": gt["annotations"], "categories": [{"id": c["id"], "name": c["name"]}
                                                             for c in gt["categories"]]}
    api = COCO()
    api.dataset = copy.deepcopy(coco)
    api.createIndex()
    dt = api.loadRes([{k: v for k, v in d.items() if k != "bbox"} for d in _results(rows, segs)])
    ev = COCOeval(api, dt, "segm")
    ev.evaluate(), ev.accumulate()
    p = ev.eval["precision"][..., -1]

    def mean(x):
        return float(np.mean(x[x > -1]) * 100)

    ref = {"AP": mean(p[:, :, :, 0]), "AP50": mean(p[0, :, :, 0]), "APs": mean(p[:, :, :, 1]),
           "APm": mean(p[:, :, :, 2]), "APl": mean(p[:, :, :, 3])}
    for backend in ("faster", "pycocotools"):
        m = evaluate_detections(copy.deepcopy(coco), rows, backend=backend, iou_type="segm", segmentations=segs)
        for k, v in ref.items():
            if math.isnan(v):
                assert math.isnan(m[k])
            else:
                assert m[k] == pytest.approx(v, abs=1e-9), (backend, k)


def test_bad_protocol_inputs_are_one_line_errors():
    gt, rows, segs = synthetic_lvis(n_images=3)
    coco = {"images": [{k: v for k, v in i.items() if "category_ids" not in k} for i in gt["images"]],
            "annotations": gt["annotations"], "categories": [{"id": c["id"], "name": c["name"]}
                                                             for c in gt["categories"]]}
    cases = [
        (coco, dict(protocol="fixed-ap"), "Fixed AP is an LVIS protocol"),
        (gt, dict(protocol="fixed-ap", max_dets=300), "no per-image cap"),
        (gt, dict(per_class_budget=10), "belongs to the fixed-ap protocol"),
        (gt, dict(protocol="pooled"), "unknown evaluation protocol"),
        (gt, dict(iou_type="segm"), "segmentation (RLE) for every detection"),
        (gt, dict(iou_type="segm", segmentations=segs[:-1]), "segmentations for"),
        (gt, dict(segmentations=segs), "iou_type='segm'"),
    ]
    for g, kw, text in cases:
        with pytest.raises(InputError, match=text.replace("(", r"\(").replace(")", r"\)")):
            evaluate_detections(copy.deepcopy(g), rows, **kw)
    bare = copy.deepcopy(gt)
    del bare["annotations"][0]["segmentation"]
    with pytest.raises(InputError, match="has no 'segmentation'"):
        evaluate_detections(bare, rows, iou_type="segm", segmentations=segs)
    wrong = [dict(s, size=[10, 10]) for s in segs]
    with pytest.raises(InputError, match="its mask is 10x10"):
        evaluate_detections(copy.deepcopy(gt), rows, iou_type="segm", segmentations=wrong)


# ----------------------------------------------------------------------------- ShapesWorld polygons

# sha256 over every file of `generate_shapes_world(train=30, val=10, seed=7)` (images, captions,
# split, world.json, and the instances without "segmentation"), computed with the generator as
# it was before polygons were written: polygons must change nothing else, for any seed.
SEED7_FILES_DIGEST = "a947e5d1a8fce99eef0c77988dbeb05a1b7e09608b531000c2488e4be7e750d6"


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if not p.is_file():
            continue
        b = p.read_bytes()
        if p.name.startswith("instances_"):
            j = json.loads(b)
            for a in j["annotations"]:
                a.pop("segmentation", None)
            b = json.dumps(j, separators=(",", ":")).encode()
        h.update(str(p.relative_to(root)).encode() + b"\0" + hashlib.sha256(b).digest())
    return h.hexdigest()


def test_shapes_polygons_are_the_drawn_shapes_and_change_nothing_else(tmp_path):
    from rclip_core.data.shapes import ShapesConfig, generate_shapes_world, render_scene
    from rclip_core.data.shapes.render import _polygon_alpha

    out = tmp_path / "w"
    generate_shapes_world(out, train=30, val=10, seed=7, workers=1)
    assert _digest(out) == SEED7_FILES_DIGEST
    coco = json.loads((out / "instances_val.json").read_text())
    cfg, size = ShapesConfig(), ShapesConfig().image_size
    ious = []
    for img in coco["images"]:
        scene = render_scene(cfg, 7, "val", img["id"] - 1)
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert len(anns) == len(scene.objects)
        for a, o in zip(anns, scene.objects):
            (poly,) = a["segmentation"]
            assert poly == list(o.polygon) and len(poly) >= 6
            xy = np.array(poly).reshape(-1, 2)
            x, y, w, h = a["bbox"]  # the box is the polygon's extent
            assert (xy[:, 0].min(), xy[:, 1].min()) == pytest.approx((x, y), abs=0.011)
            assert (xy[:, 0].max(), xy[:, 1].max()) == pytest.approx((x + w, y + h), abs=0.021)
            # rasterised as COCO does, the polygon covers the pixels the renderer filled
            x0, y0, alpha = _polygon_alpha(xy)
            drawn = np.zeros((size, size), bool)
            ah, aw = alpha.shape
            drawn[y0:y0 + ah, x0:x0 + aw] = (alpha >= 0.5)[:size - y0, :size - x0]
            coco_mask = mask_utils.decode(_rle(poly, size, size)).astype(bool)
            ious.append((coco_mask & drawn).sum() / (coco_mask | drawn).sum())
    assert min(ious) > 0.9 and np.mean(ious) > 0.96


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from rclip_core.data.shapes import generate_shapes_world

    d = tmp_path_factory.mktemp("segworld") / "shapes"
    generate_shapes_world(d, train=12, val=6, seed=0, workers=1, image_size=64, closeup_frac=0.0)
    return d


def test_ground_truth_masks_score_100_through_the_protocol(world):
    """An oracle predictor (ground-truth boxes, classes and polygon masks) through the one loop:
    box and mask AP 100 on ShapesWorld, its masks in the results."""
    from rclip_core.data.datasets import resolve_dataset
    from rclip_core.evaluation.protocol import ImageOutput, run_evaluation

    data = resolve_dataset(f"shapes:{world}")
    by_file = {r.image["file_name"]: r.image["id"] for r in data.present}
    anns: dict[int, list[dict]] = {}
    for a in data.gt.annotations:
        anns.setdefault(a["image_id"], []).append(a)
    index = {c: i for i, c in enumerate(data.vocabulary.category_ids)}

    def oracle(items):
        outs = []
        for prep, path, _ in items:
            a = anns.get(by_file[Path(path).name], [])
            boxes = torch.tensor([[b[0], b[1], b[0] + b[2], b[1] + b[3]] for b in (x["bbox"] for x in a)]).reshape(-1, 4)
            h, w = prep.orig_size
            outs.append(ImageOutput(boxes, torch.ones(len(a)), torch.tensor([index[x["category_id"]] for x in a]),
                                    masks=[_rle(x["segmentation"][0], h, w) for x in a]))
        return outs

    res = run_evaluation(data, oracle, gt_boxes=False, short_side=64, max_size=128)
    assert res.metrics["AP"] == 100.0 and res.metrics["segm_AP"] == 100.0
    assert res.metrics["segm_AP50_novel"] == 100.0
    assert len(res.segmentations) == len(res.detections) == len(data.gt.annotations)
    assert res.protocol["name"] == "standard" and res.protocol["per_image"] == 100


def test_mask_head_trains_on_shapes_polygons_and_is_scored_by_rclip_eval(world, tmp_path):
    from rclip_core.config.finetune import load_finetune_recipe
    from rclip_core.engine.finetune import finetune

    out = tmp_path / "run"
    over = {
        "data.dataset": str(world), "init.model": "test-micro", "init.random_init": "true", "output_dir": str(out),
        "max_steps": "6", "checkpoint_every": "6", "data.train_short_sides": "[64]", "data.max_size": "128",
        "data.test_short_side": "64", "data.test_max_size": "128", "data.num_workers": "0",
        "detector.rpn.anchor_sizes": "[8, 16, 32]", "detector.rpn.pre_nms_topk_train": "200",
        "detector.rpn.post_nms_topk_train": "50", "detector.rpn.pre_nms_topk_test": "200",
        "detector.rpn.post_nms_topk_test": "50", "detector.rois_per_image": "32", "batch.global_batch": "2",
        "optim.warmup_iters": "1", "optim.steps": "[5]", "optim.lr": "0.02", "logging.log_every": "1",
        "text.templates": "single", "test.eval_every": "0", "test.score_thresh": "0.0",
        "detector.mask_head": "true",
    }
    result = finetune(load_finetune_recipe(REPO / "recipes" / "shapes_finetune.yaml", over), device="cpu")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    mask_losses = [x["loss_mask"] for x in lines if "loss_mask" in x]  # the polygons reach the mask head
    assert len(mask_losses) == 6 and all(math.isfinite(v) and v > 0 for v in mask_losses)
    print("loss_mask per step:", [round(v, 5) for v in mask_losses])
    assert "segm_AP" in result.metrics  # fine-tuning's final evaluation scores the masks too

    report, preds = tmp_path / "r.json", tmp_path / "p.json"
    r = CliRunner().invoke(cli, ["eval", "--detector", "--dataset", f"shapes:{world}", "--weights",
                                 str(result.detector_path), "--short-side", "64", "--max-size", "128",
                                 "--workers", "0", "--score-thresh", "0", "--json", str(report),
                                 "--save-predictions", str(preds)])
    assert r.exit_code == 0, r.output
    assert "Mask AP, IoU 0.50:0.95" in r.stdout and "standard COCO AP: 100 detections" in r.stdout
    rep = json.loads(report.read_text())
    for k in ("segm_AP", "segm_AP50", "segm_AP50_novel", "AP"):
        assert rep["metrics"][k] is not None and 0.0 <= rep["metrics"][k] <= 100.0
    assert rep["protocol"]["name"] == "standard" and rep["protocol"]["detection_budget"] == "100 per image and class"
    rows = {(x["metric"], x["iou_type"]) for x in rep["results"]}
    assert ("segm_AP", "segm") in rows and ("AP", "bbox") in rows
    assert all(x["protocol"] == "standard" and x["split"] == "shapes: instances_val.json"
               and x["detection_budget"] == "100 per image and class" for x in rep["results"])
    saved = json.loads(preds.read_text())
    assert len(saved) == rep["detections"] > 0 and all("counts" in d["segmentation"] for d in saved)
    # the saved file reproduces the reported numbers
    again = evaluate_detections(world / "instances_val.json", str(preds), iou_type="segm")
    assert again["AP"] == pytest.approx(rep["metrics"]["segm_AP"], abs=1e-9)
    # rclip detect saves the masks: RLE in predictions.json, filled on the annotated image
    det_out = tmp_path / "det"
    image = world / "val" / "000001.jpg"
    r = CliRunner().invoke(cli, ["detect", str(image), "--weights", str(result.detector_path), "--out", str(det_out),
                                 "--score-thresh", "0", "--short-side", "64"])
    assert r.exit_code == 0, r.output
    det_preds = json.loads((det_out / "predictions.json").read_text())
    assert det_preds and all(d["segmentation"]["size"] == [64, 64] for d in det_preds)
    assert (det_out / "000001.jpg").is_file()
    print("mask head, 6 steps: box AP50 %.3f, mask AP %.3f, mask AP50 %.3f"
          % (rep["metrics"]["AP50"], rep["metrics"]["segm_AP"], rep["metrics"]["segm_AP50"]))


def test_cli_fixed_ap_on_coco_format_data_is_refused_before_any_work(world, tmp_path):
    report = tmp_path / "r.json"
    r = CliRunner().invoke(cli, ["eval", "--zero-shot", "--dataset", f"shapes:{world}", "--model", "test-micro",
                                 "--random-init", "--protocol", "fixed-ap", "--json", str(report)])
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "fixed-ap is an LVIS protocol" in r.output and "Traceback" not in r.output
    assert not report.exists()
