"""Pseudo-labelling throughput of a teacher on CPU, and what it means for CC3M.

For each model it times :func:`rclip_core.pseudo_label.label_image` on one image - proposals,
trunk once, RoIAlign + res5 + attention pool for every box, softmax(cos / 0.01) over the concept
pool, argmax / threshold / top-k - and, separately, its stages; median of ``--repeats`` runs
after ``--warmup``. Decoding and resizing are timed apart (the CLI overlaps them with the model
in ``--workers`` threads). Models have random weights (weights do not change the speed):

- ``test-micro`` and ``shapes-tiny`` on a 128x128 ShapesWorld scene (the offline world);
- ``RN50-quickgelu`` on ``tests/data/sample_img1.jpg`` resized to 1333x750 (the network input
  of CC3M-like photos at short side 800 is about that size or smaller).

Boxes: ``--boxes`` (100) random grid-aligned boxes, as ``--proposals random``; the offline RPN
(``--proposals rpn``) adds an R50-FPN on top (137.8 GMAC at 1344x768, official-speed.md).
Concepts: ``--concepts`` (4764, the COCO noun pool) random embeddings.

It then prints the arithmetic for labelling CC3M (3.3 M images): at the measured CPU rate, and
on GPUs from the multiply-accumulate count (trunk 82.95 GMAC + per box res5 1.156 + token-0
attention pool ~0.02 GMAC at 1333x750) and an ASSUMED sustained GPU rate ``--gpu-tmacs``
(tera multiply-accumulates per second; the default 30 is an assumption, about 40 % of an
A100's TF32 tensor-core peak of 156 TFLOPS = 78 TMAC/s, not a measurement).

    OMP_NUM_THREADS=2 python benchmarks/pseudo_label_throughput.py
    python benchmarks/pseudo_label_throughput.py --models test-micro,shapes-tiny --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = REPO / "tests" / "data" / "sample_img1.jpg"
CC3M_IMAGES = 3_300_000
# multiply-accumulates per image for RN50 at 1333x750 (reference/official-speed.md)
TRUNK_GMAC = 82.95
RES5_GMAC_PER_BOX = 1.156
ATTNPOOL_TOKEN0_GMAC_PER_BOX = 0.02  # rclip's token-0 attention pool (open_clip's full module: 0.734)
RPN_GMAC = 137.8


def load_avg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover
        return "n/a"


def shapes_image(size: int):
    from rclip_core.data.shapes import ShapesConfig, render_scene
    from rclip_core.data.images import resize_image

    scene = render_scene(ShapesConfig(image_size=size), seed=0, split="val", index=0)
    return resize_image(scene.to_pil(), size, max(1333, size))


def timed(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(arch: str, prep, key: str, boxes: int, concepts: int, repeats: int, warmup: int,
                decode=None) -> dict:
    from rclip_core.losses import pseudo_label_regions
    from rclip_core.weights.loaders import load_model
    from rclip_core.pseudo_label import LabelSettings, image_proposals, label_image

    model = load_model(model=arch, random_init=True)
    g = torch.Generator().manual_seed(0)
    concept_emb = torch.randn(concepts, model.embed_dim, generator=g)
    s = LabelSettings(proposals="random", regions_per_image=boxes, short_side=min(prep.size),
                      max_size=max(1333, max(prep.size)), topk=20)
    enc = model.encoder
    box_t = image_proposals(model, prep, key, s)
    with torch.inference_mode():
        res4 = enc.trunk(enc.batch_images([prep.tensor]))
        emb = enc.forward_features(res4, [box_t])

    def trunk():
        with torch.inference_mode():
            enc.trunk(enc.batch_images([prep.tensor]))

    def head():
        with torch.inference_mode():
            enc.forward_features(res4, [box_t], chunk_size=s.chunk_size)

    def score():
        pseudo_label_regions(emb, concept_emb)

    # the stages first: they also warm up the kernels' caches for the whole-image timing
    out = {"model": arch, "input": f"{prep.size[1]}x{prep.size[0]}", "boxes": int(box_t.shape[0]),
           "concepts": concepts, "trunk_s": timed(trunk, repeats, warmup), "head_s": timed(head, repeats, warmup),
           "score_s": timed(score, repeats, warmup)}
    out["label_image_s"] = timed(lambda: label_image(model, prep, key, concept_emb, s), repeats, warmup)
    out["decode_resize_s"] = timed(decode, repeats, warmup) if decode is not None else None
    out["images_per_s"] = 1.0 / out["label_image_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="test-micro,shapes-tiny,RN50-quickgelu")
    ap.add_argument("--boxes", type=int, default=100)
    ap.add_argument("--concepts", type=int, default=4764)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--image", type=Path, default=DEFAULT_IMAGE)
    ap.add_argument("--shapes-size", type=int, default=128)
    ap.add_argument("--gpus", default="1,8,32", help="GPU counts for the CC3M arithmetic.")
    ap.add_argument("--gpu-tmacs", type=float, default=30.0,
                    help="ASSUMED sustained tera multiply-accumulates/s of one GPU for the estimate.")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from rclip_core.data.images import load_image

    rows = []
    for arch in [m.strip() for m in args.models.split(",") if m.strip()]:
        if arch.lower().startswith("rn"):
            prep = load_image(args.image, 800, 1333)
            row = bench_model(arch, prep, "sample_img1.jpg", args.boxes, args.concepts, args.repeats, args.warmup,
                              decode=lambda: load_image(args.image, 800, 1333))
        else:
            prep = shapes_image(args.shapes_size)
            row = bench_model(arch, prep, "shapes/000001.jpg", args.boxes, args.concepts, args.repeats, args.warmup)
        rows.append(row)
        print(f"  {arch}: {row['label_image_s']:.4f} s/image", file=sys.stderr, flush=True)

    print(f"\n## Pseudo-labelling throughput (CPU, {args.threads} threads, fp32, random weights)\n")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, load average {load_avg()} "
          f"(a shared host inflates the times)\n")
    print("| teacher | input | boxes | concepts | s / image | images / s | trunk (s) | 100-box head (s) "
          "| scoring (s) | decode + resize (s) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        dec = f"{r['decode_resize_s']:.3f}" if r["decode_resize_s"] is not None else "-"
        print(f"| {r['model']} | {r['input']} | {r['boxes']} | {r['concepts']} | {r['label_image_s']:.4f} | "
              f"{r['images_per_s']:.2f} | {r['trunk_s']:.4f} | {r['head_s']:.4f} | {r['score_s']:.4f} | {dec} |")

    gmac = TRUNK_GMAC + args.boxes * (RES5_GMAC_PER_BOX + ATTNPOOL_TOKEN0_GMAC_PER_BOX)
    print(f"\n## CC3M ({CC3M_IMAGES / 1e6:.1f} M images)\n")
    rn50 = next((r for r in rows if r["model"].lower().startswith("rn50")), None)
    if rn50 is not None:
        days = CC3M_IMAGES / rn50["images_per_s"] / 86400
        print(f"- measured CPU rate (RN50, {args.threads} threads): {rn50['images_per_s']:.2f} images/s -> "
              f"{days:.0f} days for CC3M on one such CPU process.")
        cpu_tmacs = gmac / 1000 / rn50["label_image_s"]
        print(f"  (that is {cpu_tmacs * 1000:.0f} GMAC/s sustained on this CPU.)")
    print(f"- work per image (RN50, 1333x750, {args.boxes} boxes): {TRUNK_GMAC} + {args.boxes} x "
          f"({RES5_GMAC_PER_BOX} + {ATTNPOOL_TOKEN0_GMAC_PER_BOX}) = {gmac:.1f} GMAC "
          f"(+ {RPN_GMAC} GMAC for the R50-FPN RPN with --proposals rpn = {gmac + RPN_GMAC:.1f} GMAC).")
    per_gpu = args.gpu_tmacs * 1000 / gmac
    per_gpu_rpn = args.gpu_tmacs * 1000 / (gmac + RPN_GMAC)
    print(f"- ASSUMED sustained GPU rate {args.gpu_tmacs:g} TMAC/s -> {per_gpu:.0f} images/s per GPU "
          f"({per_gpu_rpn:.0f} with the RPN).")
    print("\n| GPUs | random boxes | RPN proposals |")
    print("|---:|---:|---:|")
    for n in [int(x) for x in args.gpus.split(",") if x.strip()]:
        t1 = CC3M_IMAGES / (per_gpu * n)
        t2 = CC3M_IMAGES / (per_gpu_rpn * n)
        print(f"| {n} | {t1 / 3600:.1f} h | {t2 / 3600:.1f} h |")
    print("\nDecoding + resizing must keep up: at the rate above one GPU needs about "
          f"{per_gpu * (rn50['decode_resize_s'] if rn50 else 0.02):.0f} decoding threads (--workers).")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "gmac_per_image": gmac, "gpu_tmacs_assumed": args.gpu_tmacs},
                                        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
