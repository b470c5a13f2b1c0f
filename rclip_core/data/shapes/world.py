"""Writing and reading a ShapesWorld directory (the layout is in :mod:`rclip_core.data.shapes`):
parallel rendering, COCO instances, captions, the split and ``world.json``, committed atomically."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from rclip_core.data.shapes.captions import scene_captions
from rclip_core.data.shapes.config import (GENERATOR_NAME, SHAPESWORLD_VERSION, SPLITS, ShapesConfig, shapes_categories,
                                           shapes_split)
from rclip_core.data.shapes.render import render_scene
from rclip_core.errors import InputError

# the files of a world, in the order they are committed (world.json last)
WORLD_FILES = ("train", "val", "instances_train.json", "instances_val.json", "split.json",
               "captions_train.jsonl", "captions_val.jsonl", "world.json")
_TMP_PREFIX = ".shapesworld-tmp-"


# ----------------------------------------------------------------------------- writing a world


def image_file_name(index: int, config: ShapesConfig) -> str:
    """File name of image ``index`` (0-based) inside ``OUT/<split>/``; the image id is index + 1."""
    return f"{index + 1:06d}.{config.image_format}"


def _encode(image: np.ndarray, fmt: str) -> bytes:
    import io

    buf = io.BytesIO()
    pil = Image.fromarray(image, "RGB")
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=6)
    else:
        # no chroma subsampling: the colour of small shapes is the class signal
        pil.save(buf, format="JPEG", quality=92, subsampling=0)
    return buf.getvalue()


def _render_chunk(args: tuple) -> list[dict]:
    """Worker: render, encode and write images ``indices`` of ``split``; return their records."""
    cfg_dict, seed, split, indices, split_dir = args
    cfg = ShapesConfig.from_dict(cfg_dict)
    out = []
    for index in indices:
        scene = render_scene(cfg, seed, split, index)
        name = image_file_name(index, cfg)
        with open(os.path.join(split_dir, name), "wb") as f:
            f.write(_encode(scene.image, cfg.image_format))
        caps = scene_captions(scene, cfg, seed, split, index)
        out.append({
            "index": index, "file_name": name, "closeup": scene.closeup, "hidden": len(scene.hidden),
            "objects": [(o.category_id, o.bbox, round(o.visible_fraction, 3), o.polygon) for o in scene.objects],
            "captions": caps,
        })
    return out


def _check_out_dir(out: Path) -> None:
    """Accept a missing or empty directory, a previous ShapesWorld (``world.json`` from this
    generator) or the leftovers of a killed run (only ``.shapesworld-tmp-*`` entries)."""
    if out.exists() and not out.is_dir():
        raise InputError(f"output path {out} exists and is not a directory", "choose another OUT directory")
    if not out.exists():
        return
    try:
        entries = [p.name for p in out.iterdir()]
    except OSError as e:
        raise InputError(f"cannot read output directory {out}: {e.strerror or e}") from None
    if not entries or all(e.startswith(_TMP_PREFIX) for e in entries):
        return
    world = out / "world.json"
    if world.is_file():
        try:
            meta = json.loads(world.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and meta.get("generator") == GENERATOR_NAME:
            return
    raise InputError(f"output directory {out} is not empty and is not a ShapesWorld directory",
                     "choose an empty or new OUT directory (an existing ShapesWorld is regenerated in place)")


def _chunks(indices: range, n: int) -> Iterable[range]:
    for i in range(0, len(indices), n):
        yield indices[i:i + n]


def _coco_json(cfg: ShapesConfig, seed: int, split: str, records: list[dict]) -> dict:
    images, anns = [], []
    size = cfg.image_size
    for r in records:
        image_id = r["index"] + 1
        images.append({"id": image_id, "file_name": r["file_name"], "width": size, "height": size,
                       "closeup": r["closeup"]})
        for cid, bbox, vis, polygon in r["objects"]:
            x, y, w, h = bbox
            # area stays the box area (as before polygons were written: AP's size ranges keep their
            # meaning); segmentation is the exact drawn polygon, amodal like the box
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cid, "bbox": [x, y, w, h],
                         "area": round(w * h, 4), "iscrowd": 0, "visible_fraction": vis,
                         "segmentation": [list(polygon)]})
    return {
        "info": {"description": f"ShapesWorld {split} (seed {seed})", "version": str(SHAPESWORLD_VERSION),
                 "contributor": "rclip_core.data.shapes"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": shapes_categories(cfg),
    }


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def generate_shapes_world(out_dir: str | os.PathLike, train: int = 2000, val: int = 500, seed: int = 0,
                          config: ShapesConfig | None = None, workers: int | None = None,
                          progress: Callable[[int], None] | None = None, **options: Any) -> dict:
    """Generate a ShapesWorld in ``out_dir`` (see the module docstring for the layout).

    ``options`` override fields of ``config`` (e.g. ``image_size=256, closeup_frac=0.3``).
    ``workers`` processes render in parallel (default: the usable CPUs, at most 8; forked on
    Linux, spawned elsewhere, where the calling script needs the usual ``if __name__ ==
    "__main__"`` guard); the output does not depend on it. ``progress(n)`` is called with the
    number of images just finished.

    Everything is written to a hidden temporary directory inside ``out_dir`` and moved into
    place at the end, ``world.json`` last, so a killed run never leaves a directory that looks
    complete; on an error the temporary files are removed. An existing ShapesWorld in
    ``out_dir`` is replaced; any other non-empty directory is refused (:class:`InputError`).

    Returns a summary: ``{"out_dir", "images": {split: n}, "objects": {split: n},
    "hidden_objects", "closeups", "captions": {split: n}, "classes", "base", "novel",
    "seconds", "images_per_second", "workers"}``.
    """
    for name, v in (("train", train), ("val", val), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise InputError(f"--{name} must be a non-negative integer, got {v!r}")
    if train + val == 0:
        raise InputError("nothing to generate: --train and --val are both 0")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise InputError(f"--workers must be a positive integer, got {workers!r}")
    cfg = config or ShapesConfig()
    if options:
        cfg = ShapesConfig.from_dict({**asdict(cfg), **options})
    cfg.validate()
    out = Path(out_dir)
    _check_out_dir(out)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=out))
    except OSError as e:
        raise InputError(f"cannot write to output directory {out}: {e.strerror or e}",
                         "choose a writable OUT directory") from None
    t0 = time.perf_counter()
    n_workers = workers or _default_workers()
    try:
        records: dict[str, list[dict]] = {}
        cfg_dict = asdict(cfg)
        total = train + val
        chunk = max(4, min(64, total // (n_workers * 8) or 1))
        tasks = []
        for split, n in (("train", train), ("val", val)):
            (tmp / split).mkdir()
            records[split] = []
            tasks += [(cfg_dict, seed, split, list(r), str(tmp / split)) for r in _chunks(range(n), chunk)]
        if n_workers > 1 and len(tasks) > 1:
            # fork on Linux: workers use only numpy and PIL, and unlike spawn/forkserver it does not
            # re-run the caller's __main__ (an unguarded script would generate recursively)
            ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
            with ctx.Pool(min(n_workers, len(tasks))) as pool:
                results = pool.imap(_render_chunk, tasks)
                for task, res in zip(tasks, results):
                    records[task[2]] += res
                    if progress:
                        progress(len(res))
        else:
            for task in tasks:
                res = _render_chunk(task)
                records[task[2]] += res
                if progress:
                    progress(len(res))

        split_info = shapes_split(cfg, seed)
        for split in SPLITS:
            coco = _coco_json(cfg, seed, split, records[split])
            (tmp / f"instances_{split}.json").write_text(json.dumps(coco, separators=(",", ":")) + "\n",
                                                         encoding="utf-8")
            with open(tmp / f"captions_{split}.jsonl", "w", encoding="utf-8") as f:
                for r in records[split]:
                    for cap in r["captions"]:
                        f.write(json.dumps({"image": f"{split}/{r['file_name']}", "image_id": r["index"] + 1,
                                            **cap}) + "\n")
        (tmp / "split.json").write_text(json.dumps(split_info, indent=1) + "\n", encoding="utf-8")
        counts = {
            "images": {s: len(records[s]) for s in SPLITS},
            "objects": {s: sum(len(r["objects"]) for r in records[s]) for s in SPLITS},
            "hidden_objects": sum(r["hidden"] for s in SPLITS for r in records[s]),
            "closeups": sum(r["closeup"] for r in records["train"]),
            "captions": {s: sum(len(r["captions"]) for r in records[s]) for s in SPLITS},
            "classes": len(shapes_categories(cfg)),
            "base": len(split_info["base"]),
            "novel": len(split_info["novel"]),
        }
        world = {"generator": GENERATOR_NAME, "version": SHAPESWORLD_VERSION, "seed": seed, "train": train,
                 "val": val, "config": cfg_dict, "counts": counts,
                 "files": {"images": {s: s for s in SPLITS},
                           "instances": {s: f"instances_{s}.json" for s in SPLITS},
                           "captions": {s: f"captions_{s}.jsonl" for s in SPLITS},
                           "split": "split.json"}}
        (tmp / "world.json").write_text(json.dumps(world, indent=1) + "\n", encoding="utf-8")
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    for stale in out.glob(_TMP_PREFIX + "*"):  # leftovers of killed runs
        shutil.rmtree(stale, ignore_errors=True)
    seconds = time.perf_counter() - t0
    return {"out_dir": str(out), **counts, "seconds": round(seconds, 3),
            "images_per_second": round((train + val) / max(seconds, 1e-9), 1), "workers": n_workers}


def _commit(tmp: Path, out: Path) -> None:
    """Move a finished world from ``tmp`` into ``out``. The old ``world.json`` goes first and the
    new one last, so at no moment does ``out`` hold a ``world.json`` beside mismatched files."""
    old_world = out / "world.json"
    if old_world.exists():
        old_world.unlink()
    for name in WORLD_FILES:
        target = out / name
        if name != "world.json" and (target.exists() or target.is_symlink()):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()
        os.replace(tmp / name, target)
    tmp.rmdir()


def read_shapes_world(path: str | os.PathLike) -> dict:
    """``world.json`` of a complete ShapesWorld directory, with ``"root"`` (absolute path) and
    ``"config"`` as a :class:`ShapesConfig`. Raises :class:`InputError` otherwise."""
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"ShapesWorld directory not found: {root}", "make one with: rclip data shapes DIR")
    world_file = root / "world.json"
    if not world_file.is_file():
        raise InputError(f"{root} is not a complete ShapesWorld directory (no world.json)",
                         "(re)generate it with: rclip data shapes DIR")
    try:
        meta = json.loads(world_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read {world_file}: {e}") from None
    if not isinstance(meta, dict) or meta.get("generator") != GENERATOR_NAME:
        raise InputError(f"{world_file} was not written by the ShapesWorld generator")
    if meta.get("version") != SHAPESWORLD_VERSION:
        raise InputError(f"{root} is ShapesWorld version {meta.get('version')}, this rclip reads "
                         f"version {SHAPESWORLD_VERSION}", "regenerate it with: rclip data shapes DIR")
    missing = [n for n in WORLD_FILES if not (root / n).exists()]
    if missing:
        raise InputError(f"{root} is missing {missing[0]}", "regenerate it with: rclip data shapes DIR")
    meta = dict(meta)
    meta["root"] = str(root.resolve())
    meta["config"] = ShapesConfig.from_dict(meta["config"])
    return meta
