"""Training throughput of ``rclip finetune`` on the CPU: iterations/s and images/s for the
ShapesWorld recipe and the paper's RN50 setting, with 1 and 2 processes (torchrun, gloo).

Settings (random weights: speed does not depend on them):

- ``shapes``: ``recipes/shapes_finetune.yaml`` as is: shapes-tiny, a torchvision RPN trained on
  res4, short side 224-288, 128 RoIs per image, 4 images per step (split over the processes);
  a 64-image ShapesWorld is generated in a temporary directory.
- ``rn50``: ``recipes/finetune_coco_ovd_rn50.yaml``: RN50-quickgelu, the frozen offline R50-C4
  RPN (random weights in the official key layout), short side 640-800 / max 1333, 512 RoIs per
  image, one image per process and step (the paper's 16 per step would be 16 x slower per
  step); the two demo photos (1920x1080) with a few boxes as the data set.

Each run is a fresh ``python -m rclip_cli finetune`` subprocess with a given number of steps;
the rate is the run's own ``steps_per_second`` (``metrics.json``), which leaves out the first
step (allocations, DataLoader start-up), evaluation and checkpointing. With 2 processes each
gets half of the threads.

    python benchmarks/finetune_throughput.py                       # both settings, 1 and 2 processes
    python benchmarks/finetune_throughput.py --settings shapes --nproc 1 --steps 10
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHOTOS = [REPO / "tests" / "data" / "sample_img1.jpg", REPO / "tests" / "data" / "sample_img2.jpg"]


def _shapes_data(tmp: Path) -> list[str]:
    from rclip_core.data.shapes import generate_shapes_world

    world = tmp / "shapes"
    generate_shapes_world(world, train=64, val=8, seed=0, workers=1)
    return ["--dataset", str(world)]


def _rn50_data(tmp: Path) -> list[str]:
    """The demo photos as a 2-image COCO data set (3 boxes each) and a random C4 RPN file."""
    import torch

    from rclip_core.models.proposals.offline import build_offline_rpn

    images = tmp / "photos"
    images.mkdir()
    for p in PHOTOS:
        shutil.copy(p, images / p.name)
    boxes = [[100, 200, 400, 300], [900, 300, 500, 600], [1400, 100, 300, 250]]
    inst = {"images": [{"id": i + 1, "file_name": p.name, "width": 1920, "height": 1080} for i, p in enumerate(PHOTOS)],
            "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "car"}, {"id": 3, "name": "kite"}],
            "annotations": [{"id": 3 * i + j + 1, "image_id": i + 1, "category_id": j + 1, "bbox": b, "iscrowd": 0,
                             "area": b[2] * b[3]} for i in range(len(PHOTOS)) for j, b in enumerate(boxes)]}
    (tmp / "photos.json").write_text(json.dumps(inst))
    torch.manual_seed(0)
    rpn = build_offline_rpn("coco_c4")
    torch.save({"model": rpn.state_dict()}, tmp / "rpn_c4_random.pth")
    return ["--dataset", str(tmp / "photos.json"), "--images", str(images), "--rpn-weights",
            str(tmp / "rpn_c4_random.pth")]


SETTINGS = {
    "shapes": {"recipe": "recipes/shapes_finetune.yaml", "model": "shapes-tiny", "data": _shapes_data,
               "images_per_step": lambda nproc: 4, "overrides": []},
    "rn50": {"recipe": "recipes/finetune_coco_ovd_rn50.yaml", "model": "RN50-quickgelu", "data": _rn50_data,
             "images_per_step": lambda nproc: nproc,
             "overrides": ["detector.offline_rpn.kind=coco_c4", "data.mode=fully", "text.templates=single"]},
}


def run(setting: str, nproc: int, steps: int, threads: int, tmp: Path, data_args: list[str]) -> dict:
    cfg = SETTINGS[setting]
    out = tmp / f"{setting}-{nproc}"
    per_step = cfg["images_per_step"](nproc)
    args = [sys.executable, "-m", "rclip_cli", "finetune", str(REPO / cfg["recipe"]), *data_args,
            "--model", cfg["model"], "--random-init", "--device", "cpu", "--out", str(out), "--nproc", str(nproc),
            f"max_steps={steps}", "checkpoint_every=0", "test.eval_every=0", "test.final_eval=false",
            "data.num_workers=1", "optim.warmup_iters=1", f"batch.global_batch={per_step}", *cfg["overrides"]]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // nproc)), "RCLIP_CACHE": str(tmp / "cache")}
    t0 = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{setting} x{nproc} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    its = metrics["steps_per_second"]
    return {"setting": setting, "nproc": nproc, "threads_per_process": max(1, threads // nproc),
            "images_per_step": per_step, "steps": steps, "it_per_s": its,
            "images_per_s": its * per_step if its else None, "wall_s": wall}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--settings", default="shapes,rn50")
    ap.add_argument("--nproc", default="1,2")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: shapes 12, rn50 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="threads in total")
    ap.add_argument("--json", help="also write the rows to this file")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rclip-ft-bench-") as d:
        tmp = Path(d)
        for setting in args.settings.split(","):
            data_args = SETTINGS[setting]["data"](tmp)
            for n in (int(x) for x in args.nproc.split(",")):
                steps = args.steps or (12 if setting == "shapes" else 3)
                rows.append(run(setting, n, steps, args.threads, tmp, data_args))
                print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs, {args.threads} threads")
    print("| setting | processes | threads/process | images/step | it/s | images/s | s/it |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        its = r["it_per_s"]
        print(f"| {r['setting']} | {r['nproc']} | {r['threads_per_process']} | {r['images_per_step']} | "
              f"{its:.3f} | {r['images_per_s']:.2f} | {1 / its:.2f} |" if its else f"| {r['setting']} | {r['nproc']} | - |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
