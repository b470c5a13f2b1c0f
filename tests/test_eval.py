"""``rclip eval`` (rclip_core.evaluation.protocol, .zeroshot, .results): zero-shot GT-box and RPN evaluation on a
tiny COCO-format fixture, a tiny ShapesWorld and COCO-OVD / LVIS-shaped files; metrics that
are exactly 100 when classification is made perfect; the three AP backends agreeing; batching
and worker processes not changing results; missing images counted; every bad input a one-line
error with nothing written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from rclip_cli.main import cli
from rclip_core.data.images import load_image
from rclip_core.evaluation.metrics import evaluate_detections, summary_metrics
from rclip_core.inference import DetectOptions, ZeroShotPipeline, detect_images
from rclip_core.weights.loaders import load_model
from rclip_core.weights.native import save_detector, save_model

W, H = 64, 48
SHORT = "96"  # test-time resize (the protocol's 800 is not needed to exercise the path)
CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "kite"}]
# (image id, category id, [x, y, w, h]); boxes of one image do not overlap, so per-class NMS
# never removes a correct detection
GT = [(10, 1, [2, 2, 20, 16]), (10, 3, [34, 20, 26, 24]), (11, 7, [5, 5, 30, 30]), (12, 3, [0, 0, 30, 40]),
      (12, 1, [36, 10, 24, 30]), (13, 7, [10, 8, 20, 20]), (13, 3, [36, 24, 20, 20])]
CROWD = (11, 1, [40, 0, 20, 20])
IMAGE_IDS = (10, 11, 12, 13, 14)  # 14 has no annotations


def _write_images(folder: Path, ids=IMAGE_IDS, seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in ids:
        a = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
        Image.fromarray(a).save(folder / f"{i:012d}.png")


def _instances(lvis: bool = False) -> dict:
    anns = [{"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (i, c, b) in enumerate(GT)]
    images = [{"id": i, "file_name": f"{i:012d}.png", "width": W, "height": H} for i in IMAGE_IDS]
    cats = [dict(c) for c in CATEGORIES]
    if lvis:
        for c, f in zip(cats, "rcf"):
            c["frequency"] = f
        for n, img in enumerate(images):
            img["neg_category_ids"] = [7] if n == 0 else []
            img["not_exhaustive_category_ids"] = [3] if n == 2 else []
    else:
        i, c, b = CROWD
        anns.append({"id": 100, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
                     "iscrowd": 1})
    return {"images": images, "annotations": anns, "categories": cats}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    save_model(load_model(model="test-micro", random_init=True), d / "micro.safetensors")
    _write_images(d / "images")
    (d / "gt.json").write_text(json.dumps(_instances()))
    (d / "lvis_gt.json").write_text(json.dumps(_instances(lvis=True)))
    (d / "captions.json").write_text(json.dumps({
        "images": [{"id": 10, "file_name": "000000000010.png", "width": W, "height": H}],
        "annotations": [{"id": 1, "image_id": 10, "caption": "a cat and a dog"}]}))
    from rclip_core.data.shapes import generate_shapes_world

    generate_shapes_world(d / "world", train=0, val=6, image_size=64, workers=1)
    return {"dir": d, "weights": d / "micro.safetensors", "images": d / "images", "gt": d / "gt.json",
            "lvis_gt": d / "lvis_gt.json", "captions": d / "captions.json", "world": d / "world"}


def run_eval(*args, env=None):
    return CliRunner().invoke(cli, ["eval", *map(str, args), "--device", "cpu"], env=env)


def base_args(assets, *extra):
    return ["--zero-shot", "--dataset", assets["gt"], "--images", assets["images"], "--weights",
            assets["weights"], "--short-side", SHORT, "--workers", "0", *extra]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# GT-box mode on the COCO-format fixture
# --------------------------------------------------------------------------------------------


def test_gt_boxes_table_json_and_coco_results(assets, tmp_path):
    out, preds = tmp_path / "report.json", tmp_path / "preds.json"
    r = run_eval("--zero-shot", "--boxes", "gt", "--dataset", assets["gt"], "--images", assets["images"],
                 "--novel-classes", "kite", "--model", "test-micro", "--random-init", "--short-side", SHORT,
                 "--workers", "0", "--json", out, "--save-predictions", preds)
    assert r.exit_code == 0, r.output
    for text in ("Novel AP50 (1 class)", "Base AP50 (2 classes)", "All AP50 (3 classes)", "AP50_novel",
                 "Region accuracy", "metrics cover 5/5 images", "score > 0.001", "per-class NMS 0.5",
                 "100 detections/image", "fusion none", "all (box, class) pairs"):
        assert text in r.stdout, text
    rep = json.loads(out.read_text())
    assert {"AP", "AP50", "AP75", "AP50_novel", "AP50_base", "AP50_all", "region_acc", "region_acc_novel",
            "region_acc_base"} <= set(rep["metrics"])
    assert rep["coverage"]["text"] == "5/5 images" and rep["coverage"]["images_missing"] == 0
    assert rep["dataset"]["num_images"] == 5 and rep["dataset"]["num_classes"] == 3
    assert rep["split"] == {"novel": [{"id": 7, "name": "kite"}],
                            "base": [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}]}
    s = rep["settings"]
    assert (s["boxes"], s["score_thresh"], s["nms_thresh"], s["max_dets"], s["fusion"], s["topk_labels"]) == \
        ("gt", 0.001, 0.5, 100, "none", 0)
    assert rep["files"]["annotations"] == sha256(assets["gt"])
    assert rep["model"]["random_init"] is True and rep["model"]["architecture"] == "test-micro"
    # the crowd box is never a region: 7 of the 8 annotations are classified
    assert rep["region_accuracy_counts"]["all"]["boxes"] == 7
    assert rep["region_accuracy_counts"]["novel"]["boxes"] == 2

    results = json.loads(preds.read_text())
    assert rep["detections"] == len(results) > 0
    gt_boxes = {(i, tuple(b)) for i, _, b in GT}
    for d in results:
        assert set(d) == {"image_id", "category_id", "bbox", "score"}
        assert d["category_id"] in (1, 3, 7) and d["score"] > 0.001
        # GT-box mode never regresses boxes: each detection is a (non-crowd) GT box
        assert (d["image_id"], tuple(round(v, 2) for v in d["bbox"])) in gt_boxes
    # evaluating the saved file reproduces the reported numbers exactly
    again = summary_metrics(evaluate_detections(assets["gt"], results, splits={"novel": {7}, "base": {1, 3}}))
    for k, v in again.items():
        assert rep["metrics"][k] == (None if np.isnan(v) else pytest.approx(v, abs=1e-12)), k


def _perfect_class_embeddings(assets, short: int) -> torch.Tensor:
    """Class embeddings that classify every GT box correctly, from the model's own region
    embeddings of the boxes (through the pipeline): with E the L2-normalised region embeddings
    [G, D] (G <= D), W^T = pinv(E) L where L[g, k] = +1 for the box's class, -1 otherwise. Then
    cos(e_g, w_k) = L[g, k] / |w_k| has the sign of L; every box of class c has the same class
    probabilities, a correct pair always outscores a wrong one, so AP50 = 100 and accuracy = 1."""
    model = load_model(weights=assets["weights"])
    pipe = ZeroShotPipeline(model, None, DetectOptions(proposals="boxes", short_side=short))
    cat_ids = [c["id"] for c in CATEGORIES]
    emb, labels = [], []
    for image_id in IMAGE_IDS:
        anns = [(c, b) for i, c, b in GT if i == image_id]
        if not anns:
            continue
        boxes = np.array([b for _, b in anns], dtype=np.float64)
        boxes[:, 2:] += boxes[:, :2]
        path = assets["images"] / f"{image_id:012d}.png"
        res = pipe.run(load_image(path, short), str(path), boxes)
        emb.append(res.embeddings)
        labels += [cat_ids.index(c) for c, _ in anns]
    e = torch.nn.functional.normalize(torch.cat(emb).double(), dim=1)
    target = -torch.ones(len(labels), len(cat_ids), dtype=torch.float64)
    target[torch.arange(len(labels)), torch.tensor(labels)] = 1.0
    w = (torch.linalg.pinv(e) @ target).t()
    assert torch.equal(torch.sign(e @ w.t()), target)  # the construction is exact
    return w.float()


def test_perfect_classification_gives_ap50_100(assets, tmp_path):
    w = _perfect_class_embeddings(assets, int(SHORT))
    torch.save(w, tmp_path / "perfect_emb.pth")
    r = run_eval(*base_args(assets, "--novel-classes", "kite", "--class-embeddings",
                            tmp_path / "perfect_emb.pth", "--json", tmp_path / "r.json"))
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    for k in ("AP50_novel", "AP50_base", "AP50_all", "AP50", "AP"):
        assert m[k] == pytest.approx(100.0), k
    assert m["region_acc"] == m["region_acc_novel"] == m["region_acc_base"] == 1.0

    # rows rotated by one class: every box gets a wrong label
    torch.save(w.roll(1, dims=0), tmp_path / "rotated_emb.pth")
    r = run_eval(*base_args(assets, "--class-embeddings", tmp_path / "rotated_emb.pth", "--json",
                            tmp_path / "x.json"))
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "x.json").read_text())["metrics"]
    assert m["region_acc"] == 0.0
    assert m["AP50"] < 100.0


def test_missing_and_unreadable_images_are_counted(assets, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(assets["images"], images)
    (images / "000000000013.png").unlink()  # missing on disk
    (images / "000000000014.png").write_bytes(b"not a png")  # unreadable
    Image.new("RGB", (W // 2, H // 2)).save(images / "000000000011.png")  # contradicts the annotations
    out = tmp_path / "r.json"
    r = run_eval("--zero-shot", "--dataset", assets["gt"], "--images", images, "--weights", assets["weights"],
                 "--short-side", SHORT, "--workers", "0", "--json", out, "--save-predictions",
                 tmp_path / "p.json")
    assert r.exit_code == 0, r.output
    assert "metrics cover 2/5 images (1 missing on disk, 2 failed)" in r.stdout
    assert "1 of the 5 images are not in" in r.stderr and "2 image(s) could not be evaluated" in r.stderr
    rep = json.loads(out.read_text())
    cov = rep["coverage"]
    assert (cov["images_evaluated"], cov["images_total"]) == (2, 5)
    assert (cov["images_missing"], cov["images_failed"]) == (1, 2)
    assert cov["missing_examples"] == ["000000000013.png"]
    reasons = {Path(f["file"]).name: f["reason"] for f in cov["failed_examples"]}
    assert "32x24 but the annotations say 64x48" in reasons["000000000011.png"]
    assert "cannot read image" in reasons["000000000014.png"]
    # the metrics are those of images 10 and 12 alone
    results = json.loads((tmp_path / "p.json").read_text())
    assert {d["image_id"] for d in results} <= {10, 12}
    expected = summary_metrics(evaluate_detections(assets["gt"], results, image_ids=[10, 12]))
    assert rep["metrics"]["AP50"] == pytest.approx(expected["AP50"], abs=1e-12)
    assert rep["region_accuracy_counts"]["all"]["boxes"] == 4


def test_batches_and_workers_do_not_change_results(assets, tmp_path):
    one, many = tmp_path / "one.json", tmp_path / "many.json"
    r = run_eval(*base_args(assets, "--score-thresh", "0", "--batch-size", "1", "--save-predictions", one))
    assert r.exit_code == 0, r.output
    args = base_args(assets, "--score-thresh", "0", "--batch-size", "3", "--save-predictions", many)
    args[args.index("--workers") + 1] = "2"
    r = run_eval(*args)
    assert r.exit_code == 0, r.output
    a, b = json.loads(one.read_text()), json.loads(many.read_text())
    assert len(a) == len(b) == 7 * 3  # threshold 0: every (GT box, class) pair
    for x, y in zip(a, b):
        assert (x["image_id"], x["category_id"], x["bbox"]) == (y["image_id"], y["category_id"], y["bbox"])
        assert x["score"] == pytest.approx(y["score"], rel=1e-4, abs=1e-7)


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gt_key, backends", [("gt", ("faster", "pycocotools")),
                                              ("lvis_gt", ("faster", "lvis"))])
def test_backends_agree(assets, tmp_path, gt_key, backends):
    reports = []
    for b in backends:
        out = tmp_path / f"{b}.json"
        r = run_eval("--zero-shot", "--dataset", assets[gt_key], "--images", assets["images"], "--weights",
                     assets["weights"], "--short-side", SHORT, "--workers", "0", "--score-thresh", "0",
                     "--backend", b, "--json", out)
        assert r.exit_code == 0, r.output
        reports.append(json.loads(out.read_text()))
    a, b = reports
    assert a["settings"]["backend"] == backends[0] and b["settings"]["backend"] == backends[1]
    assert set(a["metrics"]) == set(b["metrics"])
    if gt_key == "lvis_gt":
        assert {"APr", "APc", "APf"} <= set(a["metrics"]) and a["settings"]["max_dets"] == 300
        assert a["settings"]["eval_max_dets"] == 300
    assert 0 < a["metrics"]["AP50"] < 100  # an informative case: neither empty nor perfect
    for k, v in a["metrics"].items():
        assert b["metrics"][k] == (None if v is None else pytest.approx(v, abs=1e-9)), k
    for m in ("AP", "AP50"):
        for cid, v in a["per_category"][m].items():
            assert b["per_category"][m][cid] == (None if v is None else pytest.approx(v, abs=1e-9))


# --------------------------------------------------------------------------------------------
# ShapesWorld, RPN mode
# --------------------------------------------------------------------------------------------


def test_shapes_world_gt_boxes(assets, tmp_path):
    out = tmp_path / "r.json"
    r = run_eval("--zero-shot", "--boxes", "gt", "--dataset", f"shapes:{assets['world']}", "--weights",
                 assets["weights"], "--short-side", "64", "--workers", "0", "--json", out)
    assert r.exit_code == 0, r.output
    assert "Novel AP50 (10 classes)" in r.stdout and "metrics cover 6/6 images" in r.stdout
    rep = json.loads(out.read_text())
    split = json.loads((assets["world"] / "split.json").read_text())
    assert [c["id"] for c in rep["split"]["novel"]] == [c["id"] for c in split["novel"]]
    assert [c["id"] for c in rep["split"]["base"]] == [c["id"] for c in split["base"]]
    n_boxes = len(json.loads((assets["world"] / "instances_val.json").read_text())["annotations"])
    assert rep["region_accuracy_counts"]["all"]["boxes"] == n_boxes
    assert 0.0 <= rep["metrics"]["region_acc"] <= 1.0
    assert {"AP50_novel", "AP50_base", "AP50_all", "region_acc_novel", "region_acc_base"} \
        <= set(rep["metrics"])

    # the world's folder and its instances file name the same data set
    out2 = tmp_path / "r2.json"
    r = run_eval("--zero-shot", "--dataset", assets["world"] / "instances_val.json", "--weights",
                 assets["weights"], "--short-side", "64", "--workers", "0", "--json", out2)
    assert r.exit_code == 0, r.output
    rep2 = json.loads(out2.read_text())
    assert rep2["metrics"] == rep["metrics"] and rep2["split"] == rep["split"]

    # --max-images: a quick check on the first images, stated in the coverage; the progress bar
    # (forced on without a terminal) counts images with a rate and then the AP classes
    r = run_eval("--zero-shot", "--dataset", f"shapes:{assets['world']}", "--weights", assets["weights"],
                 "--short-side", "64", "--workers", "0", "--max-images", "2", "--json", out2,
                 env={"RCLIP_PROGRESS": "1"})
    assert r.exit_code == 0, r.output
    assert json.loads(out2.read_text())["coverage"]["text"] == "2/6 images"
    assert "evaluating the first 2 of 6 images" in r.stderr
    assert "2/2" in r.stderr and "img/s" in r.stderr and "AP: 30/30 classes" in r.stderr


@pytest.fixture(scope="module")
def rpn_file(tmp_path_factory) -> Path:
    """A random LVIS-866 FPN RPN with zero box deltas (proposals = clipped anchors, inside the
    image; see tests/test_proposals.py)."""
    from rclip_core.models.proposals.offline import build_offline_rpn

    torch.manual_seed(1)
    rpn = build_offline_rpn("lvis_866_fpn")
    with torch.no_grad():
        rpn.proposal_generator.rpn_head.anchor_deltas.weight.zero_()
        rpn.proposal_generator.rpn_head.anchor_deltas.bias.zero_()
    path = tmp_path_factory.mktemp("rpn") / "rpn_lvis_866.pth"
    torch.save(rpn.state_dict(), path)
    return path


def test_rpn_boxes(assets, rpn_file, tmp_path):
    out, preds = tmp_path / "r.json", tmp_path / "p.json"
    r = run_eval("--zero-shot", "--boxes", "rpn", "--dataset", f"shapes:{assets['world']}", "--weights",
                 assets["weights"], "--rpn-weights", rpn_file, "--short-side", "64", "--workers", "0",
                 "--fusion", "sigmoid", "--json", out, "--save-predictions", preds)
    assert r.exit_code == 0, r.output
    assert "RPN proposals (NMS 0.9, 1000 per image)" in r.stdout and "fusion sigmoid" in r.stdout
    rep = json.loads(out.read_text())
    s = rep["settings"]
    assert (s["boxes"], s["fusion"], s["score_thresh"], s["max_dets"]) == ("rpn", "sigmoid", 0.001, 100)
    rpn = s["rpn"]
    assert (rpn["nms_thresh"], rpn["post_nms_topk"], rpn["kind"]) == (0.9, 1000, "lvis_866_fpn")
    assert rep["files"]["rpn_weights"] == sha256(rpn_file)
    assert "region_acc" not in rep["metrics"] and "AP50_all" in rep["metrics"]
    results = json.loads(preds.read_text())
    per_image = {}
    for d in results:
        per_image[d["image_id"]] = per_image.get(d["image_id"], 0) + 1
        x, y, w, h = d["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 64.001 and y + h <= 64.001
        assert 0 < d["score"] <= 1  # sigmoid fusion stays in [0, 1]
    assert per_image and max(per_image.values()) <= 100
    assert rep["detections"] == len(results)

    # the RPN overrides reach the RPN; the official fusion runs too
    r = run_eval("--zero-shot", "--boxes", "rpn", "--dataset", f"shapes:{assets['world']}", "--weights",
                 assets["weights"], "--rpn-weights", rpn_file, "--short-side", "64", "--workers", "0",
                 "--rpn-nms", "0.7", "--rpn-topk", "50", "--json", out)
    assert r.exit_code == 0, r.output
    s = json.loads(out.read_text())["settings"]
    assert (s["fusion"], s["rpn"]["nms_thresh"], s["rpn"]["post_nms_topk"]) == ("official", 0.7, 50)


# --------------------------------------------------------------------------------------------
# A fine-tuned detector
# --------------------------------------------------------------------------------------------


def test_detector_evaluation_matches_its_own_detections(assets, tmp_path):
    """``--detector``: the metrics are exactly those of ``Detector.detect`` on the images, with
    class index k mapped to the dataset's k-th category id (1, 3, 7)."""
    from rclip_core.models.detector import Detector, DetectorConfig
    from rclip_core.weights.loaders import load_detector

    torch.manual_seed(0)
    emb = torch.randn(3, 32)
    det = Detector(load_model(weights=assets["weights"]), emb[:2], emb, class_names=["cat", "dog", "kite"],
                   train_class_names=["cat", "dog"], config=DetectorConfig(proposals="trained"))
    save_detector(det, tmp_path / "det.safetensors")
    out, preds = tmp_path / "r.json", tmp_path / "p.json"
    r = run_eval("--detector", "--dataset", assets["gt"], "--images", assets["images"], "--weights",
                 tmp_path / "det.safetensors", "--short-side", SHORT, "--workers", "0", "--json", out,
                 "--save-predictions", preds)
    assert r.exit_code == 0, r.output
    assert "rclip eval: detector, custom (5/5 images)" in r.stdout and "trained RPN" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["mode"] == "detector" and rep["settings"]["class_embeddings"] == "the detector file's"
    assert (rep["settings"]["score_thresh"], rep["settings"]["max_dets"]) == (0.001, 100)

    loaded = load_detector(tmp_path / "det.safetensors")
    cat_ids = [1, 3, 7]
    expected = []
    for image_id in IMAGE_IDS:
        (d,) = detect_images(loaded, [load_image(assets["images"] / f"{image_id:012d}.png", int(SHORT))])
        for b, s, c in zip(d.boxes.tolist(), d.scores.tolist(), d.classes.tolist()):
            xywh = [b[0], b[1], b[2] - b[0], b[3] - b[1]]
            expected.append({"image_id": image_id, "category_id": cat_ids[c], "score": round(s, 8),
                             "bbox": [round(v, 3) for v in xywh]})
    got = json.loads(preds.read_text())
    assert len(got) == len(expected) > 0
    for g, e in zip(got, expected):
        assert (g["image_id"], g["category_id"]) == (e["image_id"], e["category_id"])
        assert g["bbox"] == pytest.approx(e["bbox"], abs=2e-3)
        assert g["score"] == pytest.approx(e["score"], abs=1e-6)
    ref = summary_metrics(evaluate_detections(assets["gt"], expected))
    assert rep["metrics"]["AP50"] == pytest.approx(ref["AP50"], abs=1e-6)


# --------------------------------------------------------------------------------------------
# The named data sets: COCO OVD, COCO, LVIS (tiny files with the real category lists)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory) -> Path:
    """root/val2017 + root/annotations/{instances_val2017,lvis_v1_val}.json. Image 1 has a person
    (base) and a bus (novel); image 2 only a traffic light (outside the OVD split); image 3 a cat
    (novel) and a chair (base)."""
    root = tmp_path_factory.mktemp("coco")
    _write_images(root / "val2017", ids=(1, 2, 3), seed=1)
    assets_dir = Path(__file__).resolve().parents[1] / "rclip_core" / "assets"
    coco80 = json.loads((assets_dir / "coco_ovd_split.json").read_text())["coco_80"]
    images = [{"id": i, "file_name": f"{i:012d}.png", "width": W, "height": H,
               "coco_url": f"http://images.cocodataset.org/val2017/{i:012d}.png"} for i in (1, 2, 3)]
    anns = [(1, 1, [2, 2, 20, 16]), (1, 6, [34, 20, 26, 24]), (2, 10, [5, 5, 30, 30]),
            (3, 17, [0, 0, 30, 40]), (3, 62, [36, 10, 24, 30])]
    coco = {"images": images, "categories": [{"id": c["id"], "name": c["name"]} for c in coco80],
            "annotations": [{"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3],
                             "iscrowd": 0} for n, (i, c, b) in enumerate(anns)]}
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_val2017.json").write_text(json.dumps(coco))
    lvis_cats = json.loads((assets_dir / "lvis_v1_categories.json").read_text())
    lvis_images = [{"id": i, "coco_url": f"http://images.cocodataset.org/val2017/{i:012d}.png", "width": W,
                    "height": H, "neg_category_ids": [5], "not_exhaustive_category_ids": []} for i in (1, 3)]
    lvis_anns = [(1, 1, [2, 2, 20, 16]), (1, 3, [34, 20, 26, 24]), (3, 12, [5, 5, 30, 30])]
    lvis = {"images": lvis_images, "categories": lvis_cats,
            "annotations": [{"id": n + 1, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3]}
                            for n, (i, c, b) in enumerate(lvis_anns)]}
    (root / "annotations" / "lvis_v1_val.json").write_text(json.dumps(lvis))
    return root


def test_coco_ovd_and_coco(assets, coco_root, tmp_path):
    out = tmp_path / "ovd.json"

    def report(dataset: str) -> dict:
        r = run_eval("--zero-shot", "--dataset", dataset, "--images", coco_root / "val2017", "--weights",
                     assets["weights"], "--templates", "single", "--short-side", SHORT, "--workers", "0",
                     "--json", out)
        assert r.exit_code == 0, r.output
        return json.loads(out.read_text())

    rep = report("coco-ovd")
    # the traffic-light image has none of the 65 classes and is dropped, as in the OVD split json
    assert rep["dataset"]["num_images"] == 2 and rep["dataset"]["num_classes"] == 65
    assert rep["dataset"]["annotations"] == str(coco_root / "annotations" / "instances_val2017.json")
    assert len(rep["split"]["novel"]) == 17 and len(rep["split"]["base"]) == 48
    counts = rep["region_accuracy_counts"]
    assert (counts["novel"]["boxes"], counts["base"]["boxes"], counts["all"]["boxes"]) == (2, 2, 4)
    assert {"AP50_novel", "AP50_base", "AP50_all"} <= set(rep["metrics"])

    rep = report("coco")
    assert rep["dataset"]["num_images"] == 3 and rep["dataset"]["num_classes"] == 80
    assert rep["split"] is None and "AP50_novel" not in rep["metrics"]
    assert rep["region_accuracy_counts"]["all"]["boxes"] == 5


def test_lvis_from_the_coco_root(assets, coco_root, tmp_path):
    out = tmp_path / "lvis.json"
    r = run_eval("--zero-shot", "--dataset", "lvis", "--images", coco_root, "--weights", assets["weights"],
                 "--templates", "single", "--short-side", SHORT, "--workers", "0", "--json", out)
    assert r.exit_code == 0, r.output
    assert "AP of rare classes" in r.stdout
    rep = json.loads(out.read_text())
    assert rep["dataset"]["num_classes"] == 1203 and rep["coverage"]["text"] == "2/2 images"
    assert (rep["settings"]["score_thresh"], rep["settings"]["max_dets"]) == (0.0001, 300)
    assert {"AP", "APr", "APc", "APf"} <= set(rep["metrics"])
    assert rep["metrics"]["APr"] is None  # no rare class has ground truth here


# --------------------------------------------------------------------------------------------
# Bad input: one error line, exit 2, nothing written
# --------------------------------------------------------------------------------------------


def test_help_has_an_example():
    r = CliRunner().invoke(cli, ["eval", "--help"])
    assert r.exit_code == 0 and "rclip eval --zero-shot --boxes gt --dataset coco-ovd" in r.output


def _bad_cases(a: dict[str, Path], tmp: Path) -> dict[str, tuple[list, str]]:
    (tmp / "empty").mkdir()
    torch.save(torch.ones(2, 32), tmp / "two_rows.pth")
    (tmp / "a_dir.json").mkdir()
    common = ["--weights", a["weights"], "--workers", "0"]
    return {
        "no images folder": (["--zero-shot", "--dataset", a["gt"], "--images", tmp / "nope", *common],
                             "images folder not found"),
        "captions json": (["--zero-shot", "--dataset", a["captions"], "--images", a["images"], *common],
                          "is a captions file, not an instances file"),
        "categories do not match": (["--zero-shot", "--dataset", "coco-ovd", "--images", a["images"],
                                     "--annotations", a["gt"], *common], "do not match --dataset coco-ovd"),
        "embedding rows": (["--zero-shot", "--dataset", a["gt"], "--images", a["images"],
                            "--class-embeddings", tmp / "two_rows.pth", *common],
                           "has 2 rows but the dataset has 3 classes"),
        "no image on disk": (["--zero-shot", "--dataset", a["gt"], "--images", tmp / "empty", *common],
                             "none of the 5 images"),
        "detector without a detector file": (["--detector", "--dataset", a["gt"], "--images", a["images"],
                                              *common], "not a detector"),
        "detector with --boxes": (["--detector", "--boxes", "gt", "--dataset", a["gt"], "--images",
                                   a["images"], *common], "--boxes applies to --zero-shot only"),
        "no mode": (["--dataset", a["gt"], "--images", a["images"], *common], "--zero-shot or --detector"),
        "unknown novel class": (["--zero-shot", "--dataset", a["gt"], "--images", a["images"],
                                 "--novel-classes", "kitten", *common],
                                "novel class 'kitten' is not a category"),
        "json is a folder": (["--zero-shot", "--dataset", a["gt"], "--images", a["images"], "--json",
                              tmp / "a_dir.json", *common], "is a directory"),
        "no such dataset": (["--zero-shot", "--dataset", tmp / "nope.json", "--images", a["images"], *common],
                            "nor an existing instances file"),
        "fusion with gt": (["--zero-shot", "--dataset", a["gt"], "--images", a["images"], "--fusion",
                            "official", *common], "--fusion applies to --boxes rpn only"),
        "rpn without rpn": (["--zero-shot", "--boxes", "rpn", "--dataset", a["gt"], "--images", a["images"],
                             *common], "RPN proposals need an offline RPN"),
        "lvis backend on coco": (["--zero-shot", "--dataset", a["gt"], "--images", a["images"], "--backend",
                                  "lvis", *common], "the lvis backend evaluates LVIS only"),
        "coco without images": (["--zero-shot", "--dataset", "coco", *common],
                                "--dataset coco needs --images"),
        "no annotations found": (["--zero-shot", "--dataset", "lvis", "--images", a["images"], *common],
                                 "no annotations for --dataset lvis"),
    }


CASES = ["no images folder", "captions json", "categories do not match", "embedding rows", "no image on disk",
         "detector without a detector file", "detector with --boxes", "no mode", "unknown novel class",
         "json is a folder", "no such dataset", "fusion with gt", "rpn without rpn", "lvis backend on coco",
         "coco without images", "no annotations found"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_and_writes_nothing(assets, tmp_path, case):
    args, match = _bad_cases(assets, tmp_path)[case]
    out = tmp_path / "out"
    before = sorted(p for p in tmp_path.rglob("*") if "rclip-cache" not in p.parts)
    outputs = ["--save-predictions", out / "p.json"]
    if "--json" not in args:
        outputs += ["--json", out / "r.json"]
    r = run_eval(*args, *outputs)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], r.output
    assert [ln for ln in lines if not ln.startswith(("error:", "hint:"))] == [], r.output
    assert "Traceback" not in r.output
    after = sorted(p for p in tmp_path.rglob("*") if "rclip-cache" not in p.parts)
    assert after == before and not out.exists()


# --------------------------------------------------------------------------------------------
# One protocol (zero-shot, detector, fine-tuning), one COCO-results writer
# --------------------------------------------------------------------------------------------


def _detector_file(assets, path: Path) -> Path:
    from rclip_core.models.detector import Detector, DetectorConfig

    torch.manual_seed(0)
    emb = torch.randn(3, 32)
    det = Detector(load_model(weights=assets["weights"]), emb[:2], emb, class_names=["cat", "dog", "kite"],
                   train_class_names=["cat", "dog"], config=DetectorConfig(proposals="trained"))
    save_detector(det, path)
    return path


def test_zero_shot_detector_and_finetune_evaluations_share_one_loop_and_policy(assets, tmp_path, monkeypatch):
    """``--zero-shot``, ``--detector`` and fine-tuning's evaluate_detector run the one loop
    (protocol.evaluate), and count a missing and an unreadable image the same way: left out
    of the metrics, reported."""
    from rclip_core.data.coco import load_instances
    from rclip_core.evaluation import protocol
    from rclip_core.weights.loaders import load_detector

    calls = []
    real = protocol.evaluate

    def spy(*args, **kwargs):
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(protocol, "evaluate", spy)
    images = tmp_path / "images"
    shutil.copytree(assets["images"], images)
    (images / "000000000013.png").unlink()  # missing on disk
    (images / "000000000014.png").write_bytes(b"not a png")  # unreadable
    det = _detector_file(assets, tmp_path / "det.safetensors")
    seen = {}
    for mode, weights in (("--zero-shot", assets["weights"]), ("--detector", det)):
        out = tmp_path / f"{mode[2:]}.json"
        r = run_eval(mode, "--dataset", assets["gt"], "--images", images, "--weights", weights, "--short-side",
                     SHORT, "--workers", "0", "--json", out)
        assert r.exit_code == 0, r.output
        assert "metrics cover 3/5 images (1 missing on disk, 1 failed)" in r.stdout, mode
        cov = json.loads(out.read_text())["coverage"]
        seen[mode] = (cov["images_evaluated"], cov["images_total"], cov["images_missing"], cov["images_failed"],
                      cov["missing_examples"], [Path(f["file"]).name for f in cov["failed_examples"]])
    assert seen["--zero-shot"] == seen["--detector"] == (3, 5, 1, 1, ["000000000013.png"], ["000000000014.png"])

    metrics = protocol.evaluate_detector(load_detector(det), load_instances(assets["gt"]), images,
                                         category_ids=[1, 3, 7], short_side=int(SHORT))
    assert (metrics["images_missing"], metrics["images_failed"]) == (1.0, 1.0)
    assert len(calls) == 3
    assert [c.image_ids for c in calls] == [[10, 11, 12]] * 3
    assert [(c.missing, [Path(f).name for f, _ in c.failed]) for c in calls] == \
        [(["000000000013.png"], ["000000000014.png"])] * 3


def test_finetune_evaluation_scores_what_the_detector_detects(assets, tmp_path):
    """evaluate_detector = detect_images on every image, class k -> category_ids[k], scored as
    computed; the results file holds the same rows, rounded as every results file."""
    from rclip_core.data.coco import load_instances
    from rclip_core.evaluation.protocol import evaluate_detector
    from rclip_core.weights.loaders import load_detector

    det = load_detector(_detector_file(assets, tmp_path / "det.safetensors"))
    rows = []
    for image_id in IMAGE_IDS:
        (d,) = detect_images(det, [load_image(assets["images"] / f"{image_id:012d}.png", int(SHORT))])
        for (x1, y1, x2, y2), s, c in zip(d.boxes.double().numpy(), d.scores.tolist(), d.classes.tolist()):
            rows.append([image_id, x1, y1, x2 - x1, y2 - y1, s, [1, 3, 7][c]])
    splits = {"novel": {7}, "base": {1, 3}}
    want = evaluate_detections(assets["gt"], np.array(rows).reshape(-1, 7), splits=splits)
    det.train()
    got = evaluate_detector(det, load_instances(assets["gt"]), assets["images"], category_ids=[1, 3, 7],
                            splits=splits, short_side=int(SHORT), results_path=tmp_path / "d.json")
    assert det.training  # the mode is restored
    assert set(got) == set(want)
    for k, v in want.items():
        assert got[k] == v or (np.isnan(v) and np.isnan(got[k])), k
    saved = json.loads((tmp_path / "d.json").read_text())
    assert len(saved) == len(rows) > 0
    assert saved[0] == {"image_id": rows[0][0], "category_id": rows[0][6],
                        "bbox": [round(v, 3) for v in rows[0][1:5]], "score": round(rows[0][5], 8)}


def test_the_three_results_files_come_from_one_writer(assets, tmp_path, monkeypatch):
    """``rclip eval --save-predictions``, fine-tuning's ``eval/detections_<step>.json`` and
    ``rclip detect``'s ``predictions.json``: one writer, one layout (a compact detection per
    line), one rounding (boxes 3 decimals, scores 8)."""
    from rclip_core.data.coco import load_instances
    from rclip_core.evaluation import results
    from rclip_core.evaluation.protocol import evaluate_detector
    from rclip_core.weights.loaders import load_detector

    written = []
    real = results.write_results

    def spy(path, dets, *args, **kwargs):
        written.append(Path(path))
        return real(path, dets, *args, **kwargs)

    monkeypatch.setattr(results, "write_results", spy)
    r = run_eval(*base_args(assets, "--save-predictions", tmp_path / "eval.json"))
    assert r.exit_code == 0, r.output
    det = load_detector(_detector_file(assets, tmp_path / "det.safetensors"))
    evaluate_detector(det, load_instances(assets["gt"]), assets["images"], category_ids=[1, 3, 7],
                      short_side=int(SHORT), results_path=tmp_path / "eval" / "detections_00000005.json")
    r = CliRunner().invoke(cli, ["detect", str(assets["images"] / "000000000010.png"), "--classes", "cat,dog",
                                 "--weights", str(assets["weights"]), "--proposals", "grid", "--score-thresh", "0",
                                 "--short-side", SHORT, "--no-images", "--out", str(tmp_path / "detect"),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert [p.relative_to(tmp_path).as_posix() for p in written] == [
        "eval.json", "eval/detections_00000005.json", "detect/predictions.json"]
    for p in written:
        lines = p.read_text().splitlines()
        assert lines[0] == "[" and lines[-1] == "]" and len(lines) > 2, p
        for ln in lines[1:-1]:
            d = json.loads(ln.rstrip(","))
            assert list(d) == ["image_id", "category_id", "bbox", "score"], p
            assert all(round(v, 3) == v for v in d["bbox"]) and round(d["score"], 8) == d["score"], p


_SHARDED = '''
import json, os, sys
from pathlib import Path

import torch

from rclip_core.data.coco import load_instances, resolve_images
from rclip_core.evaluation.protocol import ImageOutput, evaluate

if "RANK" in os.environ:
    import torch.distributed as dist

    dist.init_process_group("gloo")
rank = int(os.environ.get("RANK", 0))
gt = load_instances(sys.argv[1])
present, missing = resolve_images(gt, sys.argv[2])


def predict(items):  # deterministic, no model: two boxes per image scored from its pixels
    outs = []
    for prep, path, given in items:
        h, w = prep.orig_size
        s = float(prep.tensor.float().mean()) / 255.0
        outs.append(ImageOutput(torch.tensor([[2.0, 2.0, w / 2, h / 2], [w / 3, h / 3, w - 1.0, h - 1.0]]),
                                torch.tensor([s, 1.0 - s]), torch.tensor([0, int(10 * s) % 3])))
    return outs


seen = []
r = evaluate(gt, present, predict, category_ids=[1, 3, 7], missing=[m["file_name"] for m in missing],
             short_side=96, progress=seen.append)
Path(sys.argv[3], f"rank{rank}.json").write_text(json.dumps({
    "world": int(os.environ.get("WORLD_SIZE", 1)), "metrics": r.metrics, "image_ids": r.image_ids, "failed": sorted(Path(f).name for f, _ in r.failed),
    "missing": r.missing, "rows": sorted(r.detections.tolist()), "progress": seen}))
'''


def test_sharded_over_processes_equals_one_process(assets, tmp_path):
    """Under torchrun each process evaluates images[rank::world]; rows, coverage and metrics are
    gathered, so every process returns what one process alone computes."""
    import os
    import subprocess
    import sys

    images = tmp_path / "images"
    shutil.copytree(assets["images"], images)
    (images / "000000000013.png").unlink()
    (images / "000000000011.png").write_bytes(b"not a png")
    script = tmp_path / "sharded.py"
    script.write_text(_SHARDED)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    args = [str(script), str(assets["gt"]), str(images)]
    subprocess.run([sys.executable, *args, str(one)], check=True, env=env, timeout=300)
    torchrun = Path(sys.executable).with_name("torchrun")
    subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", *args, str(two)], check=True, env=env,
                   timeout=300, capture_output=True)
    ref = json.loads((one / "rank0.json").read_text())
    assert ref["image_ids"] == [10, 12, 14] and ref["failed"] == ["000000000011.png"]
    assert ref["missing"] == ["000000000013.png"] and len(ref["rows"]) == 6
    for rank in (0, 1):
        got = json.loads((two / f"rank{rank}.json").read_text())
        assert got["world"] == 2
        for key in ("metrics", "image_ids", "failed", "missing", "rows"):
            assert got[key] == ref[key], (rank, key)
    assert json.loads((two / "rank1.json").read_text())["progress"] == []  # progress is reported on rank 0


def test_detector_test_time_overrides(assets, tmp_path):
    det = _detector_file(assets, tmp_path / "det.safetensors")
    out = tmp_path / "r.json"
    r = run_eval("--detector", "--dataset", assets["gt"], "--images", assets["images"], "--weights", det,
                 "--short-side", SHORT, "--workers", "0", "--nms", "0.4", "--soft-nms", "--score-thresh", "0.01",
                 "--max-dets", "50", "--max-images", "2", "--json", out)
    assert r.exit_code == 0, r.output
    assert "soft-NMS 0.4" in r.stdout and "score > 0.01" in r.stdout
    s = json.loads(out.read_text())["settings"]
    assert (s["nms_thresh"], s["soft_nms"], s["score_thresh"], s["max_dets"]) == (0.4, True, 0.01, 50)
