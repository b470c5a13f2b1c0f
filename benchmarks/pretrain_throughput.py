"""Pretraining throughput: images/s of ``rclip pretrain`` on CPU with 1 and 2 torchrun processes,
and of the training data loaders alone.

Settings (regionclip mode, random teacher/student weights - weights do not change the speed):

``tiny``  shapes-tiny (ModifiedResNet [1,1,1,1] width 16), images resized to a 256-px short
          side, 8 images per process, 100 random boxes per image (shapes_regionclip.yaml's model
          and resolution);
``rn50``  RN50-quickgelu at the paper's 800-px short side, ``--rn50-images`` images per process
          (paper: 3 per GPU), 100 regions per image (random boxes, or the offline LVIS-866
          R50-FPN RPN with random weights and the pretraining settings with ``--regions rpn``).

Every measurement is a real ``python -m rclip_cli pretrain`` run (``--nproc 2`` for two
processes: torchrun, gloo) on a ShapesWorld made for the purpose; images/s is the median of
the per-step rates in ``metrics.jsonl`` after the first (warm-up) step, counted over all
processes. With 2 processes each uses ``OMP_NUM_THREADS = cores / 2``.

Loader: images/s of :class:`rclip_core.engine.data.PretrainData` alone (decode, 800-px bicubic
resize, flip) reading the same images from a JSONL caption file and from webdataset tar
shards (img2dataset layout), with 0 and 2 DataLoader workers.

    OMP_NUM_THREADS=2 python benchmarks/pretrain_throughput.py            # everything (~5-10 min on 2 cores)
    python benchmarks/pretrain_throughput.py --quick                      # tiny + loader only
    python benchmarks/pretrain_throughput.py --settings rn50 --procs 1 --rn50-images 1

The host may be shared with other jobs: compare only numbers from one run, and look at the
load average printed with them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def make_world(root: Path, n: int) -> Path:
    from rclip_core.data.shapes import generate_shapes_world

    out = root / "world"
    generate_shapes_world(out, train=n, val=0, seed=0, workers=1)
    return out


def write_shards(world: Path, out: Path, per_shard: int = 64) -> list[str]:
    """The world's training images as img2dataset-style tar shards (KEY.jpg + KEY.txt)."""
    out.mkdir(parents=True, exist_ok=True)
    records = [json.loads(line) for line in (world / "captions_train.jsonl").read_text().splitlines()]
    first: dict[str, str] = {}
    for r in records:
        first.setdefault(r["image"], r["caption"])
    items = sorted(first.items())
    paths = []
    for s in range(0, len(items), per_shard):
        p = out / f"{s // per_shard:05d}.tar"
        with tarfile.open(p, "w") as tar:
            for image, caption in items[s:s + per_shard]:
                key = Path(image).stem
                for name, data in ((f"{key}.jpg", (world / image).read_bytes()), (f"{key}.txt", caption.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(p))
    return paths


def random_rpn_file(path: Path) -> Path:
    """An LVIS-866 R50-FPN offline RPN with random weights, saved as a standalone rpn_*.pth."""
    import torch

    from rclip_core.models.proposals.offline import build_offline_rpn

    torch.manual_seed(0)
    torch.save(build_offline_rpn("lvis_866_fpn").state_dict(), path)
    return path


def recipe_for(setting: str, world: Path, out: Path, steps: int, rn50_images: int, regions: str,
               rpn_file: Path | None) -> dict:
    arch, short, ipp = ("shapes-tiny", 256, 8) if setting == "tiny" else ("RN50-quickgelu", 800, rn50_images)
    return {
        "mode": "regionclip", "output_dir": str(out), "seed": 0, "max_steps": steps, "checkpoint_every": 0,
        "model": {"teacher": {"model": arch, "random_init": True}},
        "data": {"root": str(world), "captions": ["captions_train.jsonl"], "short_sides": [short],
                 "max_size": max(1333, short), "flip": True, "num_workers": 0},
        "regions": {"source": regions if setting == "rn50" else "random", "per_image": 100,
                    "rpn": {"weights": str(rpn_file) if rpn_file else None}},
        "concepts": {"pool": "instances_train.json", "templates": "single"},
        "optim": {"warmup_iters": 1},
        "batch": {"images_per_process": ipp, "grad_accum": 1},
        "amp": False,
        "logging": {"log_every": 1, "tensorboard": False, "keep_checkpoints": 1},
    }


def run_training(recipe: dict, procs: int, tmp: Path, cores: int) -> dict:
    path = tmp / f"recipe-{time.monotonic_ns()}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // procs)), RCLIP_CACHE=str(tmp / "cache"))
    cmd = [sys.executable, "-m", "rclip_cli", "pretrain", str(path), "--device", "cpu"]
    if procs > 1:
        cmd += ["--nproc", str(procs)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"training failed:\n{proc.stdout}\n{proc.stderr}")
    lines = [json.loads(x) for x in (Path(recipe["output_dir"]) / "metrics.jsonl").read_text().splitlines()]
    rates = [m["images_per_s"] for m in lines[1:]] or [lines[0]["images_per_s"]]
    ips = statistics.median(rates)
    per_step = recipe["batch"]["images_per_process"] * procs
    return {"images_per_s": ips, "s_per_step": per_step / ips, "wall_s": wall, "steps": len(lines)}


def loader_rate(sources: list[str], workers: int, n: int, short: int = 800) -> float:
    from rclip_core.engine.data import PretrainData, ShortSideResize

    data = PretrainData(sources, ShortSideResize((short,), 1333, flip=True), seed=0, num_workers=workers)
    data.next_batch(4)  # start the workers
    t0 = time.perf_counter()
    done = 0
    while done < n:
        done += len(data.next_batch(8))
    rate = done / (time.perf_counter() - t0)
    data.close()
    return rate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="tiny,rn50", help="comma list of tiny, rn50")
    ap.add_argument("--procs", default="1,2", help="comma list of process counts")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is a warm-up)")
    ap.add_argument("--rn50-images", type=int, default=2, help="images per process for rn50 (paper: 3)")
    ap.add_argument("--regions", choices=["random", "rpn"], default="random", help="rn50 region source")
    ap.add_argument("--loader-images", type=int, default=256, help="images per loader measurement")
    ap.add_argument("--no-loader", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny setting only, 3 steps, smaller loader run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if args.quick:
        args.settings, args.steps, args.loader_images = "tiny", 3, 96
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    settings = [s for s in args.settings.split(",") if s]
    procs = [int(p) for p in args.procs.split(",") if p]
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="rclip-bench-") as td:
        tmp = Path(td)
        world = make_world(tmp, 64)
        rpn = random_rpn_file(tmp / "rpn_random.pth") if "rn50" in settings and args.regions == "rpn" else None
        for setting in settings:
            for n in procs:
                out = tmp / f"run-{setting}-{n}"
                r = run_training(recipe_for(setting, world, out, args.steps, args.rn50_images, args.regions, rpn),
                                 n, tmp, cores)
                results.append({"what": f"pretrain {setting}", "procs": n, **r})
                print(f"  {setting} x{n}: {r['images_per_s']:.2f} images/s", file=sys.stderr)
        if not args.no_loader:
            shards = write_shards(world, tmp / "shards")
            loaders = (("loader jsonl", [str(world / "captions_train.jsonl")]), ("loader webdataset", shards))
            for name, sources in loaders:
                for w in (0, 2):
                    rate = loader_rate(sources, w, args.loader_images)
                    results.append({"what": name, "procs": 1, "workers": w, "images_per_s": rate})
                    print(f"  {name} workers={w}: {rate:.1f} images/s", file=sys.stderr)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\nCPU, {cores} cores, torch {__import__('torch').__version__}, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (the host may be shared)\n")
    print("| what | processes | DataLoader workers | images/s | s/step |")
    print("|---|---|---|---|---|")
    for r in results:
        workers = r.get("workers", 0)
        step = f"{r['s_per_step']:.2f}" if "s_per_step" in r else ""
        print(f"| {r['what']} | {r['procs']} | {workers} | {r['images_per_s']:.2f} | {step} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
