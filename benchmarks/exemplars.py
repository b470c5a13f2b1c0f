"""Exemplar prompts against text prompts on ShapesWorld: GT-box AP50 and region top-1 on val.

For each model given (``--student``, ``--teacher``: any weights ``rclip`` reads), the classifier
rows of the world's 30 classes are made

* from text: the class names through the model's text tower and the ShapesWorld prompt
  templates (``a {}``, ``a photo of a {}``, ...; normalised averaging), as the quickstart's
  ``zs_gt_*`` stages do; and
* from K exemplars per class (K in ``--shots``, default 1, 5, 20): ground-truth boxes drawn at
  random from the TRAIN split's annotations of that class
  (:func:`rclip_core.exemplars.exemplar_embeddings`: region path of detection, unit rows
  averaged per class), ``--draws`` times with different seeds (mean and sample std reported);

then each set of rows is scored exactly as ``rclip eval --zero-shot --boxes gt`` scores text
rows (:func:`rclip_core.evaluation.protocol.run_evaluation`, the official zero-shot GT-box
settings: score > 0.001, every (box, class) pair, 100 detections per image): COCO AP50 over
the val images and region top-1 (the argmax class of each GT box).

    python benchmarks/exemplars.py --world shapes/ --student runs/student/final.safetensors \\
        --teacher runs/shapes_teacher/final.safetensors
    python benchmarks/exemplars.py --world shapes/ --teacher t.safetensors --shots 1,5 --draws 1 --max-images 100

Prints a markdown table (and ``--json FILE`` writes the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

SHAPES_TEMPLATES = ["a {}", "a photo of a {}", "an image of a {}", "a picture of a {}"]


def draw_exemplars(world: Path, k: int, seed: int, category_ids: list[int], names: dict[int, str]) -> list[tuple]:
    """K random train GT boxes per class (fewer where a class has fewer): (path, xyxy, name)."""
    from rclip_core.data.coco import load_instances

    gt = load_instances(world / "instances_train.json")
    files = {im["id"]: im["file_name"] for im in gt.images}
    per_cat: dict[int, list[dict]] = {c: [] for c in category_ids}
    for a in gt.annotations:
        if not a.get("iscrowd") and a["category_id"] in per_cat:
            per_cat[a["category_id"]].append(a)
    rng = np.random.default_rng(seed)
    rows = []
    for c in category_ids:
        anns = per_cat[c]
        pick = rng.choice(len(anns), size=min(k, len(anns)), replace=False)
        for i in pick:
            x, y, w, h = anns[int(i)]["bbox"]
            rows.append((str(world / "train" / files[anns[int(i)]["image_id"]]), (x, y, x + w, y + h), names[c]))
    return rows


def score(model, ds, class_emb, short_side: int, max_images: int | None) -> dict[str, float]:
    from rclip_core.evaluation.protocol import run_evaluation, zero_shot_predictor
    from rclip_core.evaluation.zeroshot import default_options
    from rclip_core.inference import ZeroShotPipeline

    opts = default_options("coco", "gt")
    opts.short_side, opts.max_size = short_side, 2 * short_side
    pipe = ZeroShotPipeline(model, class_emb, opts)
    res = run_evaluation(ds, zero_shot_predictor(pipe), gt_boxes=True, short_side=short_side,
                         max_size=2 * short_side, batch_size=16, max_images=max_images)
    return {"AP50": float(res.metrics["AP50"]), "top1": 100.0 * float(res.metrics["region_acc"])}


def measure(label: str, weights: str, world: Path, shots: list[int], draws: int, seed: int, short_side: int,
            max_images: int | None) -> list[dict]:
    from rclip_core.data.datasets import resolve_dataset
    from rclip_core.exemplars import average_per_name, exemplar_region_embeddings
    from rclip_core.models.text import embed_class_names
    from rclip_core.weights.loaders import load_model

    model = load_model(weights=weights)
    ds = resolve_dataset(f"shapes:{world}")
    vocab = ds.vocabulary
    names = dict(zip(vocab.category_ids, vocab.names))
    rows = []
    if model.has_text:
        t0 = time.perf_counter()
        text = embed_class_names(model, list(vocab.names), SHAPES_TEMPLATES, "normalized", use_cache=False)
        rows.append({"model": label, "prompts": "text (class names)", **score(model, ds, text, short_side, max_images),
                     "seconds": time.perf_counter() - t0})
    kmax = max(shots)
    runs: dict[int, list[dict]] = {k: [] for k in shots}
    for d in range(draws):
        t0 = time.perf_counter()
        ex = draw_exemplars(world, kmax, seed + d, list(vocab.category_ids), names)
        unit, ex_names = exemplar_region_embeddings(model, ex, short_side=short_side, max_size=2 * short_side)
        for k in shots:
            # the first k of each class's kmax draws: nested subsets, one region pass
            seen: dict[str, int] = {}
            keep = []
            for i, n in enumerate(ex_names):
                seen[n] = seen.get(n, 0) + 1
                if seen[n] <= k:
                    keep.append(i)
            emb, order = average_per_name(unit[keep], [ex_names[i] for i in keep])
            assert order == list(vocab.names)  # rows in vocabulary order
            runs[k].append(score(model, ds, emb, short_side, max_images))
        print(f"  {label}: draw {d + 1}/{draws} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    for k in shots:
        ap = [r["AP50"] for r in runs[k]]
        top = [r["top1"] for r in runs[k]]
        rows.append({"model": label, "prompts": f"{k} exemplar{'s' if k > 1 else ''} / class",
                     "AP50": statistics.mean(ap), "AP50_std": statistics.stdev(ap) if len(ap) > 1 else None,
                     "top1": statistics.mean(top), "top1_std": statistics.stdev(top) if len(top) > 1 else None})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", required=True, type=Path, help="a ShapesWorld directory (rclip data shapes)")
    ap.add_argument("--student", help="RegionCLIP student weights (rclip pretrain recipes/shapes_regionclip.yaml)")
    ap.add_argument("--teacher", help="teacher weights (rclip pretrain recipes/shapes_teacher.yaml)")
    ap.add_argument("--shots", default="1,5,20", help="exemplars per class, comma-separated")
    ap.add_argument("--draws", type=int, default=3, help="random exemplar draws per K (seeds seed..seed+draws-1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--short-side", type=int, default=256, help="test resize (the quickstart's zs_gt: 256)")
    ap.add_argument("--max-images", type=int, default=None, help="only the first N val images")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args(argv)
    models = [(n, w) for n, w in (("student", a.student), ("teacher", a.teacher)) if w]
    if not models:
        ap.error("give --student and/or --teacher")
    shots = sorted({int(s) for s in a.shots.split(",")})
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    t0 = time.perf_counter()
    rows = []
    for label, w in models:
        rows += measure(label, w, a.world, shots, a.draws, a.seed, a.short_side, a.max_images)
    gt = json.loads((a.world / "instances_val.json").read_text())
    n_img = len(gt["images"]) if a.max_images is None else min(a.max_images, len(gt["images"]))
    print(f"\nShapesWorld {a.world} val: {n_img} images, GT boxes, short side {a.short_side}; exemplars from train, "
          f"{a.draws} draw(s) per K (mean ± sample std); {time.perf_counter() - t0:.0f} s\n")
    print("| model | prompts | AP50 (GT boxes) | region top-1 % |")
    print("|---|---|---|---|")

    def fmt(v, s):
        return f"{v:.1f}" + (f" ± {s:.1f}" if s is not None else "")

    for r in rows:
        print(f"| {r['model']} | {r['prompts']} | {fmt(r['AP50'], r.get('AP50_std'))} | "
              f"{fmt(r['top1'], r.get('top1_std'))} |")
    if a.json:
        a.json.write_text(json.dumps({"world": str(a.world), "images": n_img, "short_side": a.short_side,
                                      "draws": a.draws, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
