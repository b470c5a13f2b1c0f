"""Speed and memory of region encoding on a real network input, against the official code.

Input: ``tests/data/sample_img1.jpg`` (1920x1080) resized as the detector does (1333x750),
with 20 / 100 / 300 random boxes (RegionCLIP's random-box distribution, seeded). Model:
RN50-quickgelu with random weights (weights do not change the speed). For each box count it
measures the median over ``--repeats`` runs (after ``--warmup`` runs) of

a. the region path: trunk (stem..res4) once, RoIAlign, res5, attention pool - each stage
   timed on its own - with rclip's token-0 attention pool and with open_clip's module;
b. crop-and-encode, the naive alternative: each box cropped from the original image, resized
   to 224x224 (bicubic), normalised, and the whole CLIP image tower run in batches of 20;
c. ``rclip detect`` end to end with the given boxes, via ``ZeroShotPipeline`` (65 random class
   embeddings): decode + resize, proposals, trunk, head, post-processing (the pipeline's own
   timings);

and prints a markdown table with the official figures (``shared/reference/official-speed.md``,
2-core CPU, fp32, 2 threads) and the ratio official / rclip (> 1: rclip is faster), plus peak
RSS. The host may be shared: compare only numbers taken in one run, and look at the load
average printed with them.

    OMP_NUM_THREADS=2 python benchmarks/region_encoding.py              # full run (several minutes)
    python benchmarks/region_encoding.py --quick                        # 1 repeat, 20 boxes
    python benchmarks/region_encoding.py --precision bf16 --boxes 100 --parts region,detect
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import cpu_name, peak_rss_gib  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO / "tests" / "data" / "sample_img1.jpg"

# official-speed.md: given boxes, RN50, fp32, 2 threads, medians of 7 runs after 2 warm-ups.
OFFICIAL_GIVEN = {20: {"e2e": 2.12, "trunk": 1.56, "head": 0.44},
                  100: {"e2e": 4.27, "trunk": 1.66, "head": 2.71},
                  300: {"e2e": 9.64, "trunk": 1.56, "head": 7.99}}
OFFICIAL_FIT = (1.59, 0.0268)  # t(N) = 1.59 s + 26.8 ms x N
OFFICIAL_PER_BOX = {"roi": 0.002, "res5": 0.0146, "attnpool": 0.0098}
OFFICIAL_CROP_PER_BOX = {"crop": 0.56 / 100, "encode": 9.9 / 100}  # 100 crops in batches of 20
OFFICIAL_PEAK_RSS_GIB = {300: 1.79}
CROP_BATCH = 20
CROP_SIZE = 224


def official(n: int) -> dict[str, float]:
    """Official seconds for ``n`` given boxes: the measured table where it has ``n``, else the fit."""
    if n in OFFICIAL_GIVEN:
        o = dict(OFFICIAL_GIVEN[n])
    else:
        o = {"e2e": OFFICIAL_FIT[0] + OFFICIAL_FIT[1] * n, "trunk": OFFICIAL_FIT[0],
             "head": n * sum(OFFICIAL_PER_BOX.values())}
    o.update({k: v * n for k, v in OFFICIAL_PER_BOX.items()})
    o["region_total"] = o["trunk"] + o["head"]
    o["crop"] = OFFICIAL_CROP_PER_BOX["crop"] * n
    o["crop_encode"] = OFFICIAL_CROP_PER_BOX["encode"] * n
    o["crop_total"] = o["crop"] + o["crop_encode"]
    return o


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


# --------------------------------------------------------------------------- the measured paths
def region_path(encoders: dict, image: torch.Tensor, boxes: torch.Tensor, precision: str
                ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Trunk once, then RoIAlign + res5 + attnpool with each encoder; seconds per stage."""
    t: dict[str, float] = {}
    out: dict[str, torch.Tensor] = {}
    first = next(iter(encoders.values()))
    with autocast(precision):
        t0 = time.perf_counter()
        res4 = first.trunk(first.batch_images([image]))
        t["trunk"] = time.perf_counter() - t0
        for name, enc in encoders.items():
            t0 = time.perf_counter()
            pooled = enc.roi_pool(res4, [boxes])
            t1 = time.perf_counter()
            r5 = enc.res5(pooled)
            t2 = time.perf_counter()
            emb = enc.attnpool(r5)
            t3 = time.perf_counter()
            t[f"roi/{name}"], t[f"res5/{name}"], t[f"attnpool/{name}"] = t1 - t0, t2 - t1, t3 - t2
            out[name] = emb.float()
            del pooled, r5
    return t, out


def crop_and_encode(model, pil_image, boxes_orig: torch.Tensor, precision: str, limit: int | None = None
                    ) -> dict[str, float]:
    """Each box cropped from the original image, resized to 224x224 (bicubic), normalised, and
    CLIP's whole image tower run in batches of 20."""
    from PIL import Image

    from rclip_core.models.region_encoder import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD

    mean = torch.tensor(CLIP_PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_PIXEL_STD).view(1, 3, 1, 1)
    boxes = boxes_orig.tolist()[:limit]
    t0 = time.perf_counter()
    crops = []
    for x1, y1, x2, y2 in boxes:
        c = pil_image.crop((x1, y1, x2, y2)).resize((CROP_SIZE, CROP_SIZE), Image.BICUBIC)
        crops.append(torch.from_numpy(np.asarray(c, dtype=np.uint8).transpose(2, 0, 1).copy()))
    batch = (torch.stack(crops).float() / 255.0 - mean) / std
    t1 = time.perf_counter()
    with autocast(precision):
        for chunk in batch.split(CROP_BATCH):
            model.clip.visual(chunk)
    t2 = time.perf_counter()
    return {"crop": t1 - t0, "crop_encode": t2 - t1}


def detect_path(pipe, image_path: Path, boxes_orig: np.ndarray) -> dict[str, float]:
    from rclip_core.data.images import load_image

    t0 = time.perf_counter()
    prep = load_image(image_path)
    t1 = time.perf_counter()
    res = pipe.run(prep, str(image_path), boxes_orig)
    t2 = time.perf_counter()
    return {"decode": t1 - t0, **{f"detect_{k}": v for k, v in res.timings.items()}, "detect_e2e": t2 - t0}


def measure(fn: Callable[[], dict[str, float]], repeats: int, samples: dict[str, list[float]]) -> None:
    for _ in range(repeats):
        for k, v in fn().items():
            samples.setdefault(k, []).append(v)


# --------------------------------------------------------------------------- reporting
def _fmt_s(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 10 else f"{x:.2f}"


def table_for(n: int, med: dict[str, float], rss: float) -> list[str]:
    o = official(n)
    rows: list[tuple[str, float | None, float | None, bool]] = []  # label, ours, official, per-box column

    def add(label: str, key: str | float | None, off: float | None, per_box: bool = False) -> None:
        ours = med.get(key) if isinstance(key, str) else key
        if ours is not None:
            rows.append((label, ours, off, per_box))

    if "trunk" in med:
        head_fast = med["roi/fast"] + med["res5/fast"] + med["attnpool/fast"]
        head_mod = med["roi/module"] + med["res5/module"] + med["attnpool/module"]
        add("(a) trunk: stem..res4, once", "trunk", o["trunk"])
        add("(a) RoIAlign", "roi/fast", o["roi"], True)
        add("(a) res5", "res5/fast", o["res5"], True)
        add("(a) attnpool, rclip token-0", "attnpool/fast", o["attnpool"], True)
        add("(a) attnpool, open_clip module", "attnpool/module", o["attnpool"], True)
        add("(a) head (RoIAlign + res5 + attnpool), rclip", head_fast, o["head"], True)
        add("(a) head, open_clip attnpool", head_mod, o["head"], True)
        add("(a) **region path, rclip** (trunk + head)", med["trunk"] + head_fast, o["region_total"])
        add("(a) region path, open_clip attnpool", med["trunk"] + head_mod, o["region_total"])
    if "crop_encode" in med:
        add("(b) crop + resize 224 + normalise", "crop", o["crop"], True)
        add(f"(b) CLIP image tower, batches of {CROP_BATCH}", "crop_encode", o["crop_encode"], True)
        add("(b) **crop-and-encode total**", med["crop"] + med["crop_encode"], o["crop_total"], True)
    if "detect_e2e" in med:
        add("(c) detect: decode + resize", "decode", None)
        add("(c) detect: proposals (given boxes)", "detect_proposals", None)
        add("(c) detect: trunk", "detect_trunk", o["trunk"])
        add("(c) detect: head (RoIAlign + res5 + attnpool)", "detect_head", o["head"], True)
        add("(c) detect: post-processing", "detect_post", None)
        add("(c) **detect end to end**", "detect_e2e", o["e2e"])
    lines = [f"### {n} boxes", "",
             "| stage | rclip median (s) | per box (ms) | official (s) | official / rclip |",
             "|---|---:|---:|---:|---:|"]
    for label, ours, off, per_box in rows:
        ratio = f"{off / ours:.2f}x" if off and ours > 0 else "-"
        pb = f"{1000 * ours / n:.2f}" if per_box else ""
        lines.append(f"| {label} | {_fmt_s(ours)} | {pb} | {_fmt_s(off)} | {ratio} |")
    off_rss = OFFICIAL_PEAK_RSS_GIB.get(n)
    lines.append(f"| peak RSS so far (GiB) | {rss:.2f} | | {off_rss if off_rss else '-'} | |")
    if "trunk" in med and "crop_encode" in med:
        region = med["trunk"] + med["roi/fast"] + med["res5/fast"] + med["attnpool/fast"]
        lines += ["", f"crop-and-encode / region path (rclip): {(med['crop'] + med['crop_encode']) / region:.2f}x"]
    return lines


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", default="20,100,300", help="Comma-separated box counts (default 20,100,300).")
    ap.add_argument("--repeats", type=int, default=5, help="Measured runs per box count (median reported).")
    ap.add_argument("--warmup", type=int, default=1, help="Unmeasured runs first (crop-and-encode: one batch).")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (the official figures used 2).")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                    help="bf16 = torch.autocast('cpu', torch.bfloat16); the official figures are fp32.")
    ap.add_argument("--parts", default="region,crop,detect", help="Which of region,crop,detect to run.")
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="Photo to resize to the network input.")
    ap.add_argument("--model", default="RN50-quickgelu", help="Architecture (random weights).")
    ap.add_argument("--seed", type=int, default=0, help="Seed of the random boxes and weights.")
    ap.add_argument("--quick", action="store_true", help="Short run: 1 repeat, 20 boxes.")
    ap.add_argument("--json", type=Path, help="Also write every sample and median to this JSON file.")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.boxes = 1, "20"
    counts = [int(x) for x in args.boxes.split(",") if x.strip()]
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not counts or min(counts) < 1 or args.repeats < 1 or args.warmup < 0 or not parts <= {"region", "crop", "detect"}:
        ap.error("need --boxes >= 1, --repeats >= 1, --warmup >= 0 and --parts from region,crop,detect")

    torch.set_num_threads(args.threads)
    from rclip_core.data.images import boxes_to_original, load_image, read_image
    from rclip_core.models.proposals.boxes import random_boxes
    from rclip_core.models.region_encoder import RegionEncoder
    from rclip_core.weights.loaders import load_model
    from rclip_core.inference import DetectOptions, ZeroShotPipeline

    load0 = os.getloadavg()
    model = load_model(model=args.model, random_init=True, seed=args.seed)
    encoders = {"fast": model.encoder,
                "module": RegionEncoder(model.clip.visual, model.arch.pooler_resolution, fast_attnpool=False).eval()}
    prep = load_image(args.image)
    pil = read_image(args.image)
    rss_model = peak_rss_gib()
    class_emb = torch.randn(65, model.embed_dim, generator=torch.Generator().manual_seed(args.seed))
    pipe = ZeroShotPipeline(model, class_emb, DetectOptions(proposals="boxes", precision=args.precision))

    print(f"# Region encoding benchmark ({args.model}, random weights)\n")
    print(f"- image: {args.image.name} {pil.width}x{pil.height} -> network input {prep.size[1]}x{prep.size[0]}")
    print(f"- torch {torch.__version__}, {torch.get_num_threads()} threads, {args.precision}, "
          f"{args.repeats} repeats after {args.warmup} warm-up(s), medians; CPU: {cpu_name()} "
          f"({os.cpu_count()} logical cores)")
    print(f"- load average at start: {load0[0]:.2f} / {load0[1]:.2f} / {load0[2]:.2f} (1/5/15 min)")
    print(f"- peak RSS after model load: {rss_model:.2f} GiB (official: 0.9 GiB)\n")
    sys.stdout.flush()

    results: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "torch": torch.__version__,
                     "cpu": cpu_name(), "load_start": load0, "rss_model_gib": rss_model, "boxes": {}}
    with torch.inference_mode():
        for n in counts:
            g = torch.Generator().manual_seed(args.seed + n)
            boxes = random_boxes(prep.size, n, g)  # resized-image pixels
            boxes_orig = boxes_to_original(boxes, prep)
            boxes_orig_np = boxes_orig.numpy().astype(np.float64)
            samples: dict[str, list[float]] = {}
            max_diff = None
            for _ in range(args.warmup):
                if "region" in parts:
                    region_path(encoders, prep.tensor, boxes, args.precision)
                if "crop" in parts:
                    crop_and_encode(model, pil, boxes_orig, args.precision, limit=CROP_BATCH)
                if "detect" in parts:
                    detect_path(pipe, args.image, boxes_orig_np)
            for _ in range(args.repeats):  # interleaved, so host drift hits every path alike
                if "region" in parts:
                    t, emb = region_path(encoders, prep.tensor, boxes, args.precision)
                    max_diff = float((emb["fast"] - emb["module"]).abs().max())
                    for k, v in t.items():
                        samples.setdefault(k, []).append(v)
                    del emb
                if "crop" in parts:
                    measure(lambda: crop_and_encode(model, pil, boxes_orig, args.precision), 1, samples)
                if "detect" in parts:
                    measure(lambda: detect_path(pipe, args.image, boxes_orig_np), 1, samples)
            gc.collect()
            med = {k: statistics.median(v) for k, v in samples.items()}
            rss = peak_rss_gib()
            print("\n".join(table_for(n, med, rss)))
            if max_diff is not None:
                print(f"\nmax |token-0 attnpool - open_clip attnpool| over the {n} region embeddings: {max_diff:.2e}")
            print()
            sys.stdout.flush()
            results["boxes"][n] = {"samples": samples, "medians": med, "peak_rss_gib": rss,
                                   "attnpool_max_abs_diff": max_diff, "official": official(n)}
    load1 = os.getloadavg()
    results["load_end"] = load1
    print(f"load average at end: {load1[0]:.2f} / {load1[1]:.2f} / {load1[2]:.2f}; "
          f"peak RSS {peak_rss_gib():.2f} GiB")
    if max(load0[0], load1[0]) > (os.cpu_count() or 1):
        print("warning: the host was busy (load average above the core count): the timings are contended")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
