"""Wall time and peak memory of the box-AP, LVIS Fixed AP and mask-AP backends at COCO-val
and LVIS-val scale.

Builds synthetic ground truth and detections of the real sizes:

- COCO val2017: 5000 images, the 80 COCO classes, ~7 objects per image, 100 detections/image;
- LVIS v1 val: 19809 images, the 1203 LVIS classes with their r/c/f frequencies, ~12.5 objects
  per image, federated negative / not-exhaustive lists, 300 detections per image (~5.9M).

Each backend runs in a fresh subprocess (so peak RSS is its own: VmHWM from /proc/self/status)
under an address-space limit (``--mem-limit-gb``) so that a backend that needs too much fails
with MemoryError instead of taking the machine down. Rows:

- ``faster`` / ``pycocotools`` / ``lvis``: ``rclip_core.evaluation.metrics.evaluate_detections`` with
  that backend, detections given as an (N, 7) array (category chunks, default bounds);
- ``faster, dicts``: the same with detections as a list of dicts (the COCO results format);
- ``faster, 1 chunk``: chunking off (one chunk with every category);
- ``faster-coco-eval direct``: faster-coco-eval used as its README shows
  (``loadRes(list)`` + ``COCOeval_faster``), without rclip in between (the baseline);
- ``..., fixed-ap`` (LVIS): the same detections under Fixed AP (top 10,000 per class over the
  split, no per-image cap);
- ``..., segm``: mask AP. Ground-truth masks are 16-point polygons of the ellipse inscribed in
  each box, detection masks compressed RLEs of the ellipse inscribed in each detection box
  (one RLE per detection: 5.9M at LVIS scale), read from a JSON list beside the (N, 7) array.

Then the backends' summary metrics are compared (they must agree to 1e-6 on the 0-100 scale).

    nice -n 10 python benchmarks/eval_scale.py                 # full scale (minutes)
    python benchmarks/eval_scale.py --scale 0.05               # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ASSETS = Path(__file__).resolve().parents[1] / "rclip_core" / "assets"


# --------------------------------------------------------------------------- synthetic data
def _boxes(rng: np.random.Generator, n: int, w: int, h: int) -> np.ndarray:
    """n boxes [x, y, w, h] whose sqrt(area) is log-uniform in [6, 400]: a COCO-like mix of
    small (< 32^2), medium and large objects."""
    side = np.exp(rng.uniform(np.log(6), np.log(400), n))
    aspect = np.exp(rng.uniform(-0.8, 0.8, n))
    bw = np.minimum(side * aspect, w - 1)
    bh = np.minimum(side / aspect, h - 1)
    x = rng.uniform(0, w - bw)
    y = rng.uniform(0, h - bh)
    return np.stack([x, y, bw, bh], 1)


def _jitter(rng: np.random.Generator, boxes: np.ndarray, w: int, h: int, sigma: float = 0.12) -> np.ndarray:
    out = boxes.copy()
    out[:, 0] += rng.normal(0, sigma, len(out)) * boxes[:, 2]
    out[:, 1] += rng.normal(0, sigma, len(out)) * boxes[:, 3]
    out[:, 2] *= np.exp(rng.normal(0, sigma, len(out)))
    out[:, 3] *= np.exp(rng.normal(0, sigma, len(out)))
    out[:, 0] = np.clip(out[:, 0], 0, w - 1)
    out[:, 1] = np.clip(out[:, 1], 0, h - 1)
    out[:, 2] = np.minimum(out[:, 2], w - out[:, 0])
    out[:, 3] = np.minimum(out[:, 3], h - out[:, 1])
    return np.round(out, 2)


def synthesize(kind: str, scale: float, seed: int = 0) -> tuple[dict, np.ndarray]:
    """Ground truth (a COCO/LVIS dict) and detections as an (N, 7) array
    [image_id, x, y, w, h, score, category_id]."""
    rng = np.random.default_rng(seed)
    W, H = 640, 480
    if kind == "coco":
        cats = [{"id": c["id"], "name": c["name"]} for c in
                json.loads((ASSETS / "coco_ovd_split.json").read_text())["coco_80"]]
        n_img, gt_per_img, dets_per_img = max(1, round(5000 * scale)), 7.3, 100
        weight = 1.0 / np.arange(1, len(cats) + 1) ** 0.8  # a few frequent classes, as in COCO
    else:
        lvis = json.loads((ASSETS / "lvis_v1_categories.json").read_text())
        cats = [{"id": c["id"], "name": c["name"], "frequency": c["frequency"]} for c in lvis]
        n_img, gt_per_img, dets_per_img = max(1, round(19809 * scale)), 12.5, 300
        weight = np.array([{"r": 1.0, "c": 8.0, "f": 60.0}[c["frequency"]] for c in cats])
    cat_ids = np.array([c["id"] for c in cats])
    weight = weight / weight.sum()

    images, anns, det_rows = [], [], []
    ann_id = 1
    for i in range(n_img):
        img_id = 100000 + 7 * i
        img = {"id": img_id, "file_name": f"{img_id:012d}.jpg", "width": W, "height": H}
        n_gt = rng.poisson(gt_per_img)
        # objects concentrate in a few classes per image
        n_classes = min(len(cats), 1 + rng.poisson(2.5))
        present = rng.choice(cat_ids, size=n_classes, replace=False, p=weight)
        labels = rng.choice(present, size=n_gt)
        boxes = _boxes(rng, n_gt, W, H)
        area = boxes[:, 2] * boxes[:, 3] * rng.uniform(0.5, 0.9, n_gt)  # mask area < box area
        crowd = (rng.random(n_gt) < 0.01) if kind == "coco" else np.zeros(n_gt, bool)
        for b, c, a, cr in zip(boxes.tolist(), labels.tolist(), area.tolist(), crowd.tolist()):
            # no random draw here: the detections (and so the box numbers) do not depend on masks
            anns.append({"id": ann_id, "image_id": img_id, "category_id": c, "bbox": b, "area": a,
                         "iscrowd": int(cr), "segmentation": [_ellipse(b)]})
            ann_id += 1
        if kind == "lvis":
            absent = np.setdiff1d(cat_ids, present)
            neg = rng.choice(absent, size=min(len(absent), rng.poisson(14)), replace=False,
                             p=weight[np.isin(cat_ids, absent)] / weight[np.isin(cat_ids, absent)].sum())
            img["neg_category_ids"] = sorted(neg.tolist())
            img["not_exhaustive_category_ids"] = sorted(c for c in set(labels.tolist()) if rng.random() < 0.1)
        images.append(img)

        # detections: ~3 noisy copies per object (mostly the right class), confusions with the
        # image's negative classes, and background boxes of random classes
        copies = np.repeat(np.arange(n_gt), 3)
        hit_boxes = _jitter(rng, boxes[copies], W, H) if n_gt else np.zeros((0, 4))
        hit_labels = np.where(rng.random(len(copies)) < 0.8, labels[copies],
                              rng.choice(cat_ids, len(copies), p=weight))
        hit_scores = rng.beta(4, 2, len(copies))
        n_rest = max(0, dets_per_img - len(copies))
        rest_boxes = _boxes(rng, n_rest, W, H)
        pool = np.array(img.get("neg_category_ids") or present)
        rest_labels = np.where(rng.random(n_rest) < 0.15, rng.choice(pool, n_rest),
                               rng.choice(cat_ids, n_rest, p=weight))
        rest_scores = rng.beta(1.2, 5, n_rest)
        b = np.concatenate([hit_boxes, rest_boxes])[:dets_per_img]
        lab = np.concatenate([hit_labels, rest_labels])[:dets_per_img]
        # rounded scores make ties, as real (fp16-ish) scores have
        sc = np.round(np.concatenate([hit_scores, rest_scores])[:dets_per_img], 4)
        det_rows.append(np.column_stack([np.full(len(b), img_id), b, sc, lab]))
    gt = {"images": images, "annotations": anns, "categories": cats}
    return gt, np.concatenate(det_rows).astype(np.float64)


_ANGLES = np.linspace(0, 2 * np.pi, 16, endpoint=False)


def _ellipse(b: list[float]) -> list[float]:
    """16-point polygon of the ellipse inscribed in box [x, y, w, h]."""
    x, y, w, h = b
    return np.round(np.stack([x + w / 2 * (1 + np.cos(_ANGLES)), y + h / 2 * (1 + np.sin(_ANGLES))], 1),
                    2).ravel().tolist()


def detection_masks(gt: dict, dets: np.ndarray) -> list[dict]:
    """A compressed RLE per detection: the ellipse inscribed in its box, in its image."""
    from pycocotools import mask as mask_utils

    size = {img["id"]: (img["height"], img["width"]) for img in gt["images"]}
    out: list[dict] = []
    img_col = dets[:, 0].astype(np.int64)
    starts = np.flatnonzero(np.r_[True, img_col[1:] != img_col[:-1], True])
    for a, b in zip(starts[:-1], starts[1:]):
        h, w = size[int(img_col[a])]
        rles = mask_utils.frPyObjects([_ellipse(r) for r in dets[a:b, 1:5].tolist()], h, w)
        out += [{"size": r["size"], "counts": r["counts"].decode("ascii")} for r in rles]
    return out


# --------------------------------------------------------------------------- worker
def _vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _as_dicts(rows: np.ndarray) -> list[dict]:
    """(N, 7) rows -> the COCO results format."""
    return [{"image_id": int(r[0]), "bbox": r[1:5].tolist(), "score": float(r[5]), "category_id": int(r[6])}
            for r in rows]


def _worker(args: argparse.Namespace) -> None:
    t0 = time.perf_counter()
    dets_array = np.load(args.dets)
    out: dict = {}
    try:
        if args.mode == "direct":
            from faster_coco_eval import COCO, COCOeval_faster

            with open(args.gt) as f:
                gt = json.load(f)
            dets = _as_dicts(dets_array)
            del dets_array
            t1 = time.perf_counter()
            silent = lambda *a, **k: None  # noqa: E731
            coco_gt = COCO(gt, print_function=silent)
            coco_dt = coco_gt.loadRes(dets)
            ev = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=silent,
                                 lvis_style=args.kind == "lvis")
            if args.kind == "lvis":
                ev.params.maxDets = [300]
            ev.run()
            s = ev.stats_as_dict
            names = {"AP_all": "AP", "AP_50": "AP50", "AP_75": "AP75", "AP_small": "APs", "AP_medium": "APm",
                     "AP_large": "APl", "APr": "APr", "APc": "APc", "APf": "APf"}
            out["metrics"] = {v: s[k] * 100 for k, v in names.items() if k in s}
        else:
            from rclip_core.data.coco import load_instances
            from rclip_core.evaluation.metrics import evaluate_detections, summary_metrics

            gt = load_instances(args.gt)
            kw: dict = {}
            if args.mode == "dicts":
                dets = _as_dicts(dets_array)
                del dets_array
            else:
                dets = dets_array
            if args.mode == "segm":
                with open(args.dets.replace(".npy", "_masks.json")) as f:
                    kw = {"iou_type": "segm", "segmentations": json.load(f)}
            elif args.mode == "fixed-ap":
                kw = {"protocol": "fixed-ap"}
            elif args.mode == "one-chunk":
                kw = {"max_chunk_detections": 10**12, "max_chunk_pairs": 10**12}
            t1 = time.perf_counter()
            m = evaluate_detections(gt, dets, backend=args.backend, **kw)
            out["metrics"] = summary_metrics(m)
        out["load_s"] = t1 - t0
        out["eval_s"] = time.perf_counter() - t1
    except MemoryError:
        out["error"] = "MemoryError"
    out["peak_rss_mb"] = _vm_hwm_mb()
    Path(args.out).write_text(json.dumps(out))


# --------------------------------------------------------------------------- driver
ROWS = {
    "coco": [("faster", "array"), ("faster", "dicts"), ("faster", "one-chunk"), ("pycocotools", "array"),
             ("faster", "direct"), ("faster", "segm"), ("pycocotools", "segm")],
    "lvis": [("faster", "array"), ("faster", "dicts"), ("faster", "one-chunk"), ("lvis", "array"),
             ("faster", "direct"), ("faster", "fixed-ap"), ("lvis", "fixed-ap"), ("faster", "segm"),
             ("lvis", "segm")],
}
LABELS = {"array": "", "dicts": ", dicts", "one-chunk": ", 1 chunk", "direct": "", "fixed-ap": ", fixed-ap",
          "segm": ", segm"}
#: rows whose numbers are a different metric (not compared with the box rows)
OWN_METRIC = ("fixed-ap", "segm")


def _run_row(kind: str, backend: str, mode: str, gt: Path, dets: Path, tmp: Path, mem_gb: float,
             timeout: float) -> dict:
    out = tmp / f"{kind}-{backend}-{mode}.json"
    cmd = [sys.executable, __file__, "_worker", "--kind", kind, "--backend", backend, "--mode", mode,
           "--gt", str(gt), "--dets", str(dets), "--out", str(out)]
    limit = int(mem_gb * 2**30)

    def _limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, preexec_fn=_limit, env=env, timeout=timeout, capture_output=True,
                              text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout > {timeout:.0f}s"}
    wall = time.perf_counter() - t0
    if not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        return {"error": f"exit {proc.returncode}: {tail[0][:80]}"}
    res = json.loads(out.read_text())
    res["wall_s"] = wall
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of the real dataset sizes (default 1)")
    ap.add_argument("--kinds", default="coco,lvis", help="comma list of coco, lvis")
    ap.add_argument("--mem-limit-gb", type=float, default=16.0,
                    help="address-space limit per backend process")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per backend process")
    ap.add_argument("--skip", default="",
                    help="rows to skip, as kind:backend or kind:mode, e.g. 'lvis:lvis,coco:direct'")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    print(f"scale {args.scale}, memory limit {args.mem_limit_gb:g} GB per process, {os.cpu_count()} CPUs")
    header = (f"{'dataset':<6} {'backend':<26} {'dets':>9} {'load s':>7} {'eval s':>7} {'total s':>8} "
              f"{'peak RSS MB':>12}  AP / AP50 / APr")
    with tempfile.TemporaryDirectory(prefix="rclip-eval-scale-") as d:
        tmp = Path(d)
        for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
            t0 = time.perf_counter()
            gt, dets = synthesize(kind, args.scale, args.seed)
            gt_path, det_path = tmp / f"{kind}_gt.json", tmp / f"{kind}_dets.npy"
            gt_path.write_text(json.dumps(gt))
            np.save(det_path, dets)
            wanted = {m for b, m in ROWS[kind] if f"{kind}:{b}" not in skip and f"{kind}:{m}" not in skip}
            if "segm" in wanted:
                t_m = time.perf_counter()
                (tmp / f"{kind}_dets_masks.json").write_text(json.dumps(detection_masks(gt, dets)))
                print(f"{kind}: {len(dets)} detection masks encoded in {time.perf_counter() - t_m:.0f}s")
            n_img, n_ann, n_det = len(gt["images"]), len(gt["annotations"]), len(dets)
            del gt, dets
            print(f"\n{kind.upper()}: {n_img} images, {n_ann} objects ({n_ann / n_img:.1f}/image), "
                  f"{n_det} detections; synthesized in {time.perf_counter() - t0:.0f}s")
            print(header)
            results = {}
            for backend, mode in ROWS[kind]:
                name = "faster-coco-eval direct" if mode == "direct" else backend + LABELS[mode]
                if f"{kind}:{backend}" in skip or f"{kind}:{mode}" in skip:
                    continue
                r = _run_row(kind, backend, mode, gt_path, det_path, tmp, args.mem_limit_gb, args.timeout)
                results[name] = r
                if "error" in r:
                    print(f"{kind:<6} {name:<26} {n_det:>9} {'':>7} {'':>7} {'':>8} "
                          f"{r.get('peak_rss_mb', float('nan')):>12.0f}  FAILED: {r['error']}")
                    continue
                m = r["metrics"]
                extra = f" / {m['APr']:.3f}" if "APr" in m else ""
                print(f"{kind:<6} {name:<26} {n_det:>9} {r['load_s']:>7.1f} {r['eval_s']:>7.1f} "
                      f"{r['wall_s']:>8.1f} "
                      f"{r['peak_rss_mb']:>12.0f}  {m['AP']:.3f} / {m['AP50']:.3f}{extra}", flush=True)
            for group in ("box",) + OWN_METRIC:
                ok = {k: v["metrics"] for k, v in results.items() if "metrics" in v
                      and (k.endswith(", " + group) if group != "box" else not k.endswith(OWN_METRIC))}
                if len(ok) > 1:
                    ref_name, ref = next(iter(ok.items()))
                    worst = max(abs(m[key] - ref[key]) for m in ok.values() for key in ref
                                if key in m and np.isfinite(ref[key]))
                    verdict = "agree" if worst <= 1e-6 else "DISAGREE"
                    print(f"{group}: backends {verdict}: max |difference| of summary metrics vs {ref_name} "
                          f"= {worst:.2e}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_worker":
        p = argparse.ArgumentParser()
        for flag in ("--kind", "--backend", "--mode", "--gt", "--dets", "--out"):
            p.add_argument(flag, required=True)
        _worker(p.parse_args(sys.argv[2:]))
    else:
        main()
