"""A corpus of bad inputs over every command: each is answered with one error line (plus at most
a hint line), exit 2 for bad input or 1 for a runtime failure, no traceback, no "internal
error", and nothing written or left behind (the directory tree is compared before and after).
Valid but unusual inputs (images or classes without annotations, unicode and spaces in file
names, CMYK, 16-bit, RGBA and EXIF-rotated images) are accepted.

Commands run in-process through click's CliRunner (fast); the working directory is the test's
own folder, so default outputs (``rclip-out``, ``rclip-quickstart``) would show in the tree.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from PIL import Image

from rclip_cli.main import cli

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------ assets

@pytest.fixture(scope="module")
def A(tmp_path_factory) -> dict[str, Path]:
    """A 64-px ShapesWorld (12 train / 6 val images) and a test-micro model file."""
    from rclip_core.data.shapes import generate_shapes_world
    from rclip_core.weights.loaders import load_model
    from rclip_core.weights.native import save_model

    d = tmp_path_factory.mktemp("corpus")
    world = d / "world"
    generate_shapes_world(world, train=12, val=6, image_size=64, workers=1, seed=0, closeup_frac=0.0)
    torch.manual_seed(0)
    save_model(load_model(model="test-micro", random_init=True), d / "micro.safetensors")
    return {"dir": d, "world": world, "weights": d / "micro.safetensors"}


def tree(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``roots``: path -> (size, mtime_ns) (folders: size -1)."""
    out: dict[str, tuple[int, int]] = {}
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames:
                out[os.path.join(dirpath, n)] = (-1, 0)
            for n in filenames:
                p = os.path.join(dirpath, n)
                st = os.lstat(p)
                out[p] = (st.st_size, st.st_mtime_ns)
    return out


def invoke(argv: list[str], cwd: Path):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return CliRunner().invoke(cli, [str(a) for a in argv], catch_exceptions=True)
    finally:
        os.chdir(old)


#: failures that only training meets (a NaN loss, an image that is broken past its header):
#: the progress lines printed before it may stand on stdout, the error is still one line
MID_RUN = {"pretrain/nan-loss", "finetune/truncated-image", "finetune/truncated-image-in-a-worker"}


def assert_refused(res, codes=(1, 2), mid_run: bool = False) -> None:
    out = res.output
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code in codes, f"exit {res.exit_code}: {out[-2000:]}"
    assert "Traceback" not in out and "internal error" not in out, out[-2000:]
    assert 1 <= len(err) <= 2, f"{len(err)} error lines: {out[-2000:]}"
    assert err[0].startswith("error:"), out[-2000:]
    if not mid_run:  # errors come first: nothing else was printed
        assert res.stdout.strip() == "", out[-2000:]


# ------------------------------------------------------------------------------------ builders

def pre_recipe(A, t: Path, **over) -> dict:
    """regionclip mode on test-micro (random teacher), random boxes, 2 steps."""
    d = {
        "mode": "regionclip", "output_dir": str(t / "out"), "seed": 3, "max_steps": 2, "checkpoint_every": 0,
        "model": {"teacher": {"model": "test-micro", "random_init": True}},
        "data": {"root": str(A["world"]), "captions": ["captions_train.jsonl"], "short_sides": [64],
                 "max_size": 128, "flip": False, "num_workers": 0},
        "regions": {"source": "random", "per_image": 4},
        "concepts": {"pool": "instances_train.json", "templates": "single"},
        "optim": {"lr": 0.05, "warmup_iters": 1, "steps": [4]},
        "batch": {"images_per_process": 2, "grad_accum": 1},
        "logging": {"log_every": 1, "tensorboard": False},
    }
    for dotted, value in over.items():
        node = d
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return d


def pre(A, t: Path, *extra: str, **over) -> list:
    p = t / "recipe.yaml"
    p.write_text(yaml.safe_dump(pre_recipe(A, t, **over)))
    return ["pretrain", p, *extra, "--device", "cpu"]


FT_OVER = {
    "max_steps": 2, "checkpoint_every": 0, "data.train_short_sides": "[64]", "data.max_size": 128,
    "data.test_short_side": 64, "data.test_max_size": 128, "data.num_workers": 0,
    "detector.rpn.anchor_sizes": "[8, 16, 32]", "detector.rpn.pre_nms_topk_train": 100,
    "detector.rpn.post_nms_topk_train": 20, "detector.rpn.pre_nms_topk_test": 100,
    "detector.rpn.post_nms_topk_test": 20, "detector.rois_per_image": 16, "batch.global_batch": 2,
    "optim.warmup_iters": 1, "optim.steps": "[3]", "optim.lr": 0.02, "logging.log_every": 1,
    "logging.tensorboard": "false", "text.templates": "single", "test.eval_every": 0, "test.final_eval": "false",
}


def ft(A, t: Path, *extra: str, dataset=None, init=None, out=None, **over) -> list:
    o = dict(FT_OVER, **over)
    src = ["--init", init] if init is not None else ["--model", "test-micro", "--random-init"]
    return ["finetune", REPO / "recipes" / "shapes_finetune.yaml", "--dataset", dataset or A["world"], *src,
            "--out", out or (t / "out"), *[f"{k}={v}" for k, v in o.items()], *extra, "--device", "cpu"]


def coco(A, split="train") -> dict:
    return json.loads((A["world"] / f"instances_{split}.json").read_text())


def write_json(p: Path, obj) -> Path:
    p.write_text(json.dumps(obj))
    return p


def bad_coco(A, t: Path, edit: Callable[[dict], object]) -> Path:
    """instances_train.json of the world, edited in place; images resolve to the world's train/ folder."""
    c = coco(A)
    edit(c)
    return write_json(t / "bad.json", c)


def ev(A, t: Path, *extra, weights=None, dataset=None, images=None) -> list:
    return ["eval", "--zero-shot", "--boxes", "gt", "--dataset", dataset or (A["world"] / "instances_val.json"),
            "--images", images or (A["world"] / "val"), "--weights", weights or A["weights"], "--short-side", 64,
            "--templates", "single", "--workers", 0, "--device", "cpu", *extra]


def pl(A, t: Path, *extra, teacher=None, data=None) -> list:
    return ["pseudo-label", data or (A["world"] / "captions_train.jsonl"),
            "--teacher", teacher or A["weights"], "--concepts", A["world"] / "instances_train.json",
            "--templates", "single", "--proposals", "random", "--regions-per-image", 4, "--short-side", 64,
            "--max-size", 128, "--workers", 1, "--out", t / "labels", "--device", "cpu", *extra]


def det(A, t: Path, *extra, image=None, weights=None) -> list:
    img = image or sorted((A["world"] / "val").iterdir())[0]
    return ["detect", img, "--weights", weights or A["weights"], "--classes", "red circle,blue square",
            "--templates", "single", "--proposals", "random", "--short-side", 64, "--out", t / "det",
            "--device", "cpu", *extra]


def truncated(src: Path, t: Path, name="trunc.safetensors") -> Path:
    b = src.read_bytes()
    p = t / name
    p.write_bytes(b[: len(b) // 2])
    return p


def corrupt_header(src: Path, t: Path) -> Path:
    b = bytearray(src.read_bytes())
    n = int.from_bytes(b[:8], "little")
    b[8:8 + min(n, 40)] = b"{" * min(n, 40)
    p = t / "corrupt.safetensors"
    p.write_bytes(bytes(b))
    return p


def absurd_arch(src: Path, t: Path) -> Path:
    """The model file with metadata naming a ResNet of width 10^6 (a multi-TB allocation)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["rclip"])
    info["architecture"]["config"]["vision_cfg"]["width"] = 1_000_000
    info["architecture"]["name"] = "huge"
    meta["rclip"] = json.dumps(info)
    p = t / "absurd.safetensors"
    save_file(tensors, str(p), metadata=meta)
    return p


def world_copy(A, t: Path) -> Path:
    w = t / "wcopy"
    shutil.copytree(A["world"], w)
    return w


def truncated_image(src: Path, dst: Path) -> None:
    b = src.read_bytes()
    dst.write_bytes(b[: max(len(b) // 3, 200)])


def captions_world(A, t: Path, lines: list[str] | bytes, name="caps.jsonl") -> Path:
    p = t / name
    p.write_bytes(lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode())
    return p


def resume_corrupt(A, t: Path, kind: str) -> list:
    ck = t / "out" / "checkpoints" / "ckpt_00000001"
    ck.mkdir(parents=True)
    (ck / "model.safetensors").write_bytes(b"garbage")
    (ck / "state.pt").write_bytes(b"garbage")
    (t / "out" / "checkpoints" / "latest").write_text("ckpt_00000001\n")
    return (pre(A, t, "--resume") if kind == "pretrain" else ft(A, t, "--resume"))


def unwritable(t: Path) -> Path:
    """A folder nobody may create: under a read-only folder, or under /sys as root (whom
    permissions do not stop)."""
    if os.geteuid() == 0:
        return Path("/sys/rclip-bad-input/sub")
    d = t / "ro"
    d.mkdir()
    d.chmod(0o555)
    return d / "sub"


# every case: name -> (argv builder(A, tmp) -> argv, allowed exit codes)
CASES: dict[str, tuple[Callable, tuple[int, ...]]] = {
    # ---------------------------------------------------------------- pretrain: recipes
    "pretrain/unknown-key": (lambda A, t: pre(A, t, "optim.lrr=0.1"), (2,)),
    "pretrain/unknown-recipe-key": (lambda A, t: pre(A, t, **{"optim.colour": 1}), (2,)),
    "pretrain/wrong-type": (lambda A, t: pre(A, t, "max_steps=abc"), (2,)),
    "pretrain/wrong-type-yaml": (lambda A, t: pre(A, t, **{"batch.images_per_process": "two"}), (2,)),
    "pretrain/yaml-error": (lambda A, t: ["pretrain", write_text(t / "r.yaml", "mode: [regionclip\n")], (2,)),
    "pretrain/yaml-list": (lambda A, t: ["pretrain", write_text(t / "r.yaml", "- a\n- b\n")], (2,)),
    "pretrain/recipe-missing": (lambda A, t: ["pretrain", t / "nope.yaml"], (2,)),
    "pretrain/recipe-folder": (lambda A, t: ["pretrain", t], (2,)),
    "pretrain/recipe-binary": (lambda A, t: ["pretrain", write_bytes(t / "r.yaml", b"\xff\xfe\x00\x81" * 20)], (2,)),
    "pretrain/zero-steps": (lambda A, t: pre(A, t, "max_steps=0"), (2,)),
    "pretrain/negative-steps": (lambda A, t: pre(A, t, "max_steps=-3"), (2,)),
    "pretrain/zero-batch": (lambda A, t: pre(A, t, "batch.images_per_process=0"), (2,)),
    "pretrain/negative-lr": (lambda A, t: pre(A, t, "optim.lr=-0.1"), (2,)),
    "pretrain/nan-lr": (lambda A, t: pre(A, t, "optim.lr=.nan"), (2,)),
    "pretrain/inf-lr": (lambda A, t: pre(A, t, "optim.lr=inf"), (2,)),
    "pretrain/inf-lr-yaml": (lambda A, t: pre(A, t, **{"optim.lr": float("inf")}), (2,)),
    "pretrain/nan-momentum": (lambda A, t: pre(A, t, "optim.momentum=.nan"), (2,)),
    "pretrain/nan-gamma": (lambda A, t: pre(A, t, "optim.gamma=.nan"), (2,)),
    "pretrain/nan-warmup-factor": (lambda A, t: pre(A, t, "optim.warmup_factor=.nan"), (2,)),
    "pretrain/inf-weight-decay": (lambda A, t: pre(A, t, "optim.weight_decay=.inf"), (2,)),
    "pretrain/nan-temperature": (lambda A, t: pre(A, t, "losses.temperature=.nan"), (2,)),
    "pretrain/nan-jitter": (lambda A, t: pre(A, t, "regions.jitter=.nan"), (2,)),
    "pretrain/nan-threshold": (lambda A, t: pre(A, t, "concepts.threshold=.nan"), (2,)),
    "pretrain/zero-regions": (lambda A, t: pre(A, t, "regions.per_image=0"), (2,)),
    "pretrain/zero-short-side": (lambda A, t: pre(A, t, "data.short_sides=[0]"), (2,)),
    "pretrain/negative-max-size": (lambda A, t: pre(A, t, "data.max_size=-1"), (2,)),
    "pretrain/negative-workers": (lambda A, t: pre(A, t, "data.num_workers=-1"), (2,)),
    "pretrain/override-no-equals": (lambda A, t: pre(A, t, "optim.lr"), (2,)),
    "pretrain/override-empty-key": (lambda A, t: pre(A, t, "=3"), (2,)),
    "pretrain/override-empty-value": (lambda A, t: pre(A, t, "optim.lr="), (2,)),
    "pretrain/override-sub-of-scalar": (lambda A, t: pre(A, t, "seed.x=1"), (2,)),
    "pretrain/bad-device": (lambda A, t: [*pre(A, t)[:-2], "--device", "banana"], (2,)),
    "pretrain/bad-device-index": (lambda A, t: [*pre(A, t)[:-2], "--device", "cpu:7x"], (2,)),
    "pretrain/nproc-zero": (lambda A, t: pre(A, t, "--nproc", "0"), (2,)),
    # ---------------------------------------------------------------- pretrain: data
    "pretrain/root-missing": (lambda A, t: pre(A, t, **{"data.root": str(t / "nope")}), (2,)),
    "pretrain/root-empty": (lambda A, t: pre(A, t, **{"data.root": str(mkdir(t / "empty"))}), (2,)),
    "pretrain/captions-missing": (lambda A, t: pre(A, t, **{"data.captions": ["nope.jsonl"]}), (2,)),
    "pretrain/captions-empty": (lambda A, t: pre(A, t, **{"data.captions": [str(captions_world(A, t, b""))]}), (2,)),
    "pretrain/captions-binary": (lambda A, t: pre(A, t, **{"data.captions": [str(captions_world(
        A, t, bytes(range(256)) * 8))]}), (2,)),
    "pretrain/captions-not-utf8": (lambda A, t: pre(A, t, **{"data.captions": [str(captions_world(
        A, t, '{"image": "train/000000.jpg", "caption": "caf\xe9"}\n'.encode("latin-1")))]}), (2,)),
    "pretrain/captions-csv-no-caption-column": (lambda A, t: pre(A, t, **{"data.captions": [str(captions_world(
        A, t, ["image,text", "train/000000.jpg,a red circle"], name="caps.csv"))]}), (2,)),
    "pretrain/captions-broken-jsonl": (lambda A, t: pre(A, t, **{"data.captions": [str(captions_world(
        A, t, ['{"image": "train/000000.jpg", "caption": "a"}', '{"image": "train/0000'], ))]}), (2,)),
    "pretrain/captions-folder": (lambda A, t: pre(A, t, **{"data.captions": [str(mkdir(t / "cdir"))]}), (2,)),
    "pretrain/no-readable-image": (lambda A, t: pre(A, t, **{"data.root": str(junk_images(t)),
                                                               "data.captions": ["caps.jsonl"]}), (1, 2)),
    "pretrain/gt-boxes-missing": (lambda A, t: pre(A, t, **{"regions.source": "gt_jitter",
                                                              "regions.gt_boxes": "nope.json"}), (2,)),
    "pretrain/gt-boxes-of-other-images": (lambda A, t: pre(A, t, **{"regions.source": "gt_jitter",
                                                                      "regions.gt_boxes": str(A["world"] / "instances_val.json")}), (2,)),
    "pretrain/out-is-file": (lambda A, t: pre(A, t, **{"output_dir": str(write_text(t / "f", "x"))}), (2,)),
    "pretrain/out-unwritable": (lambda A, t: pre(A, t, **{"output_dir": str(unwritable(t))}), (1, 2)),
    "pretrain/resume-corrupt": (lambda A, t: resume_corrupt(A, t, "pretrain"), (1, 2)),
    "pretrain/teacher-truncated": (lambda A, t: pre(A, t, **{"model.teacher": {"weights": str(truncated(A["weights"], t))}}), (2,)),
    "pretrain/teacher-corrupt-header": (lambda A, t: pre(A, t, **{"model.teacher": {"weights": str(corrupt_header(A["weights"], t))}}), (2,)),
    "pretrain/teacher-absurd-arch": (lambda A, t: pre(A, t, **{"model.teacher": {"weights": str(absurd_arch(A["weights"], t))}}), (2,)),
    "pretrain/teacher-missing": (lambda A, t: pre(A, t, **{"model.teacher": {"weights": str(t / "nope.safetensors")}}), (2,)),
    "pretrain/nan-loss": (lambda A, t: pre(A, t, "optim.lr=1e30", "max_steps=3", "optim.clip_norm=null"), (1, 2)),
    # ---------------------------------------------------------------- finetune
    "finetune/unknown-key": (lambda A, t: ft(A, t, "optim.lrr=1"), (2,)),
    "finetune/wrong-type": (lambda A, t: ft(A, t, "max_steps=x"), (2,)),
    "finetune/nan-lr": (lambda A, t: ft(A, t, **{"optim.lr": ".nan"}), (2,)),
    "finetune/inf-lr": (lambda A, t: ft(A, t, **{"optim.lr": "inf"}), (2,)),
    "finetune/nan-focal": (lambda A, t: ft(A, t, "detector.focal_gamma=.nan"), (2,)),
    "finetune/nan-score-thresh": (lambda A, t: ft(A, t, "test.score_thresh=.nan"), (2,)),
    "finetune/nan-flip": (lambda A, t: ft(A, t, "data.flip_prob=.nan"), (2,)),
    "finetune/zero-batch": (lambda A, t: ft(A, t, **{"batch.global_batch": 0}), (2,)),
    "finetune/zero-steps": (lambda A, t: ft(A, t, **{"max_steps": 0}), (2,)),
    "finetune/negative-rois": (lambda A, t: ft(A, t, **{"detector.rois_per_image": -1}), (2,)),
    "finetune/yaml-error": (lambda A, t: ["finetune", write_text(t / "r.yaml", "a: {b\n"), "--dataset", A["world"]], (2,)),
    "finetune/dataset-missing": (lambda A, t: ft(A, t, dataset=t / "nope.json"), (2,)),
    "finetune/dataset-folder": (lambda A, t: ft(A, t, dataset=mkdir(t / "d.json")), (2,)),
    "finetune/coco-0-byte": (lambda A, t: ft(A, t, "--images", A["world"] / "train", dataset=write_text(t / "c.json", "")), (2,)),
    "finetune/coco-list": (lambda A, t: ft(A, t, "--images", A["world"] / "train", dataset=write_json(t / "c.json", [1, 2])), (2,)),
    "finetune/coco-no-annotations-key": (lambda A, t: ft(A, t, "--images", A["world"] / "train",
                                                         dataset=bad_coco(A, t, lambda c: c.pop("annotations"))), (2,)),
    "finetune/coco-no-images-key": (lambda A, t: ft(A, t, "--images", A["world"] / "train",
                                                    dataset=bad_coco(A, t, lambda c: c.pop("images"))), (2,)),
    "finetune/coco-negative-box": (lambda A, t: ft(A, t, "--images", A["world"] / "train",
                                                   dataset=bad_coco(A, t, lambda c: c["annotations"][0].update(bbox=[5, 5, -3, 4]))), (2,)),
    "finetune/coco-box-outside": (lambda A, t: ft(A, t, "--images", A["world"] / "train",
                                                  dataset=bad_coco(A, t, lambda c: c["annotations"][0].update(bbox=[500, 500, 10, 10]))), (2,)),
    "finetune/coco-box-strings": (lambda A, t: ft(A, t, "--images", A["world"] / "train",
                                                  dataset=bad_coco(A, t, lambda c: c["annotations"][0].update(bbox="1,2,3,4"))), (2,)),
    "finetune/coco-unknown-image": (lambda A, t: ft(A, t, "--images", A["world"] / "train",
                                                    dataset=bad_coco(A, t, lambda c: c["annotations"][0].update(image_id=99999))), (2,)),
    "finetune/coco-unknown-category": (lambda A, t: ft(A, t, "--images", A["world"] / "train",
                                                       dataset=bad_coco(A, t, lambda c: c["annotations"][0].update(category_id=99999))), (2,)),
    "finetune/coco-duplicate-image-id": (lambda A, t: ft(A, t, "--images", A["world"] / "train",
                                                         dataset=bad_coco(A, t, lambda c: c["images"].append(dict(c["images"][0])))), (2,)),
    "finetune/coco-duplicate-ann-id": (lambda A, t: ft(A, t, "--images", A["world"] / "train",
                                                       dataset=bad_coco(A, t, lambda c: c["annotations"].append(dict(c["annotations"][0])))), (2,)),
    "finetune/coco-sizes-disagree": (lambda A, t: ft(A, t, "--images", A["world"] / "train",
                                                     dataset=bad_coco(A, t, lambda c: [im.update(width=640, height=480) for im in c["images"]])), (2,)),
    "finetune/images-missing": (lambda A, t: ft(A, t, "--images", t / "noimgs", dataset=A["world"] / "instances_train.json"), (2,)),
    "finetune/truncated-image": (lambda A, t: ft(A, t, dataset=trunc_world(A, t)), (1, 2)),
    "finetune/truncated-image-in-a-worker": (lambda A, t: ft(A, t, dataset=trunc_world(A, t), **{"data.num_workers": 1}), (1, 2)),
    "finetune/init-truncated": (lambda A, t: ft(A, t, init=truncated(A["weights"], t)), (2,)),
    "finetune/init-corrupt-header": (lambda A, t: ft(A, t, init=corrupt_header(A["weights"], t)), (2,)),
    "finetune/init-absurd-arch": (lambda A, t: ft(A, t, init=absurd_arch(A["weights"], t)), (2,)),
    "finetune/out-is-file": (lambda A, t: ft(A, t, out=write_text(t / "f", "x")), (2,)),
    "finetune/out-unwritable": (lambda A, t: ft(A, t, out=unwritable(t)), (1, 2)),
    "finetune/resume-corrupt": (lambda A, t: resume_corrupt(A, t, "finetune"), (1, 2)),
    "finetune/bad-device": (lambda A, t: [*ft(A, t)[:-2], "--device", "tpu:banana"], (2,)),
    "finetune/override-no-equals": (lambda A, t: ft(A, t, "optim.lr"), (2,)),
    # ---------------------------------------------------------------- eval
    "eval/weights-truncated": (lambda A, t: ev(A, t, weights=truncated(A["weights"], t)), (2,)),
    "eval/weights-corrupt-header": (lambda A, t: ev(A, t, weights=corrupt_header(A["weights"], t)), (2,)),
    "eval/weights-absurd-arch": (lambda A, t: ev(A, t, weights=absurd_arch(A["weights"], t)), (2,)),
    "eval/weights-text-file": (lambda A, t: ev(A, t, weights=write_text(t / "w.pth", "hello")), (2,)),
    "eval/coco-0-byte": (lambda A, t: ev(A, t, dataset=write_text(t / "c.json", "")), (2,)),
    "eval/coco-list": (lambda A, t: ev(A, t, dataset=write_json(t / "c.json", [])), (2,)),
    "eval/coco-folder": (lambda A, t: ev(A, t, dataset=mkdir(t / "c.json")), (2,)),
    "eval/coco-unknown-category": (lambda A, t: ev(A, t, dataset=bad_coco_val(A, t, lambda c: c["annotations"][0].update(category_id=777))), (2,)),
    "eval/coco-sizes-disagree": (lambda A, t: ev(A, t, dataset=bad_coco_val(A, t, lambda c: [im.update(width=640, height=480) for im in c["images"]])), (2,)),
    "eval/json-out-is-folder": (lambda A, t: ev(A, t, "--json", mkdir(t / "rep")), (2,)),
    "eval/json-out-unwritable": (lambda A, t: ev(A, t, "--json", unwritable(t) / "r.json"), (1, 2)),
    "eval/bad-device": (lambda A, t: [*ev(A, t), "--device", "gpu0"], (2,)),
    "eval/zero-short-side": (lambda A, t: [*ev(A, t), "--short-side", "0"], (2,)),
    # ---------------------------------------------------------------- pseudo-label
    "pseudo-label/teacher-truncated": (lambda A, t: pl(A, t, teacher=truncated(A["weights"], t)), (2,)),
    "pseudo-label/teacher-absurd-arch": (lambda A, t: pl(A, t, teacher=absurd_arch(A["weights"], t)), (2,)),
    "pseudo-label/data-missing": (lambda A, t: pl(A, t, data=t / "nope.jsonl"), (2,)),
    "pseudo-label/data-empty": (lambda A, t: pl(A, t, data=write_text(t / "c.jsonl", "")), (2,)),
    "pseudo-label/data-binary": (lambda A, t: pl(A, t, data=write_bytes(t / "c.jsonl", bytes(range(256)) * 4)), (2,)),
    "pseudo-label/out-is-file": (lambda A, t: [*pl(A, t), "--out", write_text(t / "f", "x")], (2,)),
    "pseudo-label/bad-device": (lambda A, t: [*pl(A, t), "--device", "cuda:x"], (2,)),
    # ---------------------------------------------------------------- concepts
    "concepts/missing": (lambda A, t: ["concepts", t / "nope.jsonl", "-o", t / "pool.csv"], (2,)),
    "concepts/empty": (lambda A, t: ["concepts", write_text(t / "c.jsonl", ""), "-o", t / "pool.csv"], (2,)),
    "concepts/binary": (lambda A, t: ["concepts", write_bytes(t / "c.jsonl", bytes(range(256)) * 4), "-o", t / "pool.csv"], (2,)),
    "concepts/not-utf8": (lambda A, t: ["concepts", write_bytes(t / "c.txt", "caf\xe9 au lait\n".encode("latin-1") * 3),
                                        "-o", t / "pool.csv"], (2,)),
    "concepts/csv-no-caption": (lambda A, t: ["concepts", write_text(t / "c.csv", "image,text\na.jpg,a dog\n"),
                                              "-o", t / "pool.csv"], (2,)),
    "concepts/broken-jsonl": (lambda A, t: ["concepts", write_text(t / "c.jsonl", '{"caption": "a dog"}\n{"capt'),
                                            "-o", t / "pool.csv"], (2,)),
    "concepts/out-is-folder": (lambda A, t: ["concepts", A["world"] / "captions_train.jsonl", "-o", mkdir(t / "pool")], (2,)),
    # ---------------------------------------------------------------- embed
    "embed/weights-truncated": (lambda A, t: ["embed", "a,b", "--weights", truncated(A["weights"], t), "-o", t / "e.safetensors",
                                              "--templates", "single", "--device", "cpu"], (2,)),
    "embed/weights-absurd-arch": (lambda A, t: ["embed", "a,b", "--weights", absurd_arch(A["weights"], t), "-o",
                                                t / "e.safetensors", "--templates", "single", "--device", "cpu"], (2,)),
    "embed/out-is-folder": (lambda A, t: ["embed", "a,b", "--weights", A["weights"], "-o", mkdir(t / "e.safetensors"),
                                          "--templates", "single", "--device", "cpu"], (2,)),
    "embed/bad-device": (lambda A, t: ["embed", "a,b", "--weights", A["weights"], "-o", t / "e.safetensors",
                                       "--device", "nonsense"], (2,)),
    # ---------------------------------------------------------------- data
    "data/unknown-subcommand": (lambda A, t: ["data", "nope"], (2,)),
    "weights/unknown-subcommand": (lambda A, t: ["weights", "nope", "x"], (2,)),
    "weights/info-no-argument": (lambda A, t: ["weights", "info"], (2,)),
    "data/inspect-missing": (lambda A, t: ["data", "inspect", t / "nope"], (2,)),
    "data/inspect-not-a-world": (lambda A, t: ["data", "inspect", mkdir(t / "x")], (2,)),
    "data/inspect-annotation-without-category": (lambda A, t: ["data", "inspect", edit_world(
        A, t, "instances_train.json", lambda c: c["annotations"][0].pop("category_id"))], (2,)),
    "data/inspect-captions-not-json": (lambda A, t: ["data", "inspect", edit_world_text(
        A, t, "captions_train.jsonl", "this is not json\n")], (2,)),
    "data/inspect-split-without-keys": (lambda A, t: ["data", "inspect", edit_world(
        A, t, "split.json", replace={})], (2,)),
    "data/inspect-instances-list": (lambda A, t: ["data", "inspect", edit_world(
        A, t, "instances_val.json", replace=[])], (2,)),
    "data/shapes-into-file": (lambda A, t: ["data", "shapes", write_text(t / "f", "x"), "--train", 2, "--val", 1], (2,)),
    "data/shapes-negative": (lambda A, t: ["data", "shapes", t / "w", "--train", -1, "--val", 1], (2,)),
    "data/shapes-zero-size": (lambda A, t: ["data", "shapes", t / "w", "--train", 2, "--val", 1, "--image-size", 0], (2,)),
    "data/shapes-bad-set": (lambda A, t: ["data", "shapes", t / "w", "--train", 2, "--val", 1, "--set", "noise_level=x"], (2,)),
    "data/shapes-nan-set": (lambda A, t: ["data", "shapes", t / "w", "--train", 2, "--val", 1, "--set", "noise_level=nan"], (2,)),
    # ---------------------------------------------------------------- weights
    "weights/info-truncated": (lambda A, t: ["weights", "info", truncated(A["weights"], t)], (2,)),
    "weights/info-corrupt-header": (lambda A, t: ["weights", "info", corrupt_header(A["weights"], t)], (2,)),
    "weights/info-missing": (lambda A, t: ["weights", "info", t / "nope.pth"], (2,)),
    "weights/info-folder": (lambda A, t: ["weights", "info", mkdir(t / "w.pth")], (2,)),
    "weights/info-empty": (lambda A, t: ["weights", "info", write_bytes(t / "w.pth", b"")], (2,)),
    "weights/convert-truncated": (lambda A, t: ["weights", "convert", truncated(A["weights"], t, "t.pth"), t / "o.safetensors"], (2,)),
    "weights/convert-out-is-folder": (lambda A, t: ["weights", "convert", A["weights"], mkdir(t / "o.safetensors")], (2,)),
    "weights/download-unknown": (lambda A, t: ["weights", "download", "no-such-model", "--out", t / "dl"], (2,)),
    # ---------------------------------------------------------------- quickstart
    "quickstart/bad-device": (lambda A, t: ["quickstart", "--out", t / "qs", "--device", "banana"], (2,)),
    "quickstart/cuda-missing": (lambda A, t: ["quickstart", "--out", t / "qs", "--device", "cuda:5"], (2,)),
    "quickstart/negative-seed": (lambda A, t: ["quickstart", "--out", t / "qs", "--seed", "-1"], (2,)),
    "quickstart/huge-seed": (lambda A, t: ["quickstart", "--out", t / "qs", "--seed", str(2 ** 64)], (2,)),
    "quickstart/out-is-file": (lambda A, t: ["quickstart", "--out", write_text(t / "f", "x")], (2,)),
    "quickstart/out-unwritable": (lambda A, t: ["quickstart", "--out", unwritable(t)], (1, 2)),
    "quickstart/nproc-zero": (lambda A, t: ["quickstart", "--out", t / "qs", "--nproc", "0"], (2,)),
    # ---------------------------------------------------------------- detect
    "detect/image-missing": (lambda A, t: det(A, t, image=t / "nope.jpg"), (2,)),
    "detect/image-is-text": (lambda A, t: det(A, t, image=write_text(t / "x.jpg", "not an image")), (2,)),
    "detect/image-truncated": (lambda A, t: det(A, t, image=trunc_image(A, t)), (2,)),
    "detect/weights-truncated": (lambda A, t: det(A, t, weights=truncated(A["weights"], t)), (2,)),
    "detect/weights-corrupt-header": (lambda A, t: det(A, t, weights=corrupt_header(A["weights"], t)), (2,)),
    "detect/weights-absurd-arch": (lambda A, t: det(A, t, weights=absurd_arch(A["weights"], t)), (2,)),
    "detect/out-is-file": (lambda A, t: [*det(A, t), "--out", write_text(t / "f", "x")], (2,)),
    "detect/out-unwritable": (lambda A, t: [*det(A, t), "--out", unwritable(t)], (1, 2)),
    "detect/boxes-bad-json": (lambda A, t: [*det(A, t), "--boxes", write_text(t / "b.json", "{")], (2,)),
    "detect/boxes-negative": (lambda A, t: [*det(A, t), "--boxes", write_json(t / "b.json", [[10, 10, 5, 5]])], (2,)),
    "detect/empty-classes": (lambda A, t: [*det(A, t), "--classes", " , "], (2,)),
    "detect/bad-device": (lambda A, t: [*det(A, t), "--device", "quantum"], (2,)),
}


def write_text(p: Path, text: str) -> Path:
    p.write_text(text, encoding="utf-8")
    return p


def write_bytes(p: Path, b: bytes) -> Path:
    p.write_bytes(b)
    return p


def mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def bad_coco_val(A, t: Path, edit) -> Path:
    c = coco(A, "val")
    edit(c)
    return write_json(t / "bad_val.json", c)


def edit_world(A, t: Path, name: str, edit=None, replace=None) -> Path:
    """A copy of the world with file ``name`` edited in place by ``edit`` or replaced by ``replace``."""
    w = world_copy(A, t)
    c = json.loads((w / name).read_text())
    if edit is not None:
        edit(c)
    write_json(w / name, c if replace is None else replace)
    return w


def edit_world_text(A, t: Path, name: str, text: str) -> Path:
    w = world_copy(A, t)
    (w / name).write_text(text)
    return w


def junk_images(t: Path) -> Path:
    """A data root whose captions name four files that are not images."""
    root = mkdir(t / "junk")
    for i in range(4):
        (root / f"{i}.jpg").write_text("not an image")
    captions_world(A=None, t=root, lines=[json.dumps({"image": f"{i}.jpg", "caption": "a red circle"})
                                          for i in range(4)])
    return root


def trunc_world(A, t: Path) -> Path:
    """A world copy whose every training image but the first is truncated (met mid-training)."""
    w = world_copy(A, t)
    for p in sorted((w / "train").iterdir())[1:]:
        truncated_image(A["world"] / "train" / p.name, p)
    return w


def trunc_image(A, t: Path) -> Path:
    p = t / "trunc.jpg"
    truncated_image(sorted((A["world"] / "val").iterdir())[0], p)
    return p


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, A, tmp_path):
    build, codes = CASES[case]
    work = tmp_path / "w"
    work.mkdir()
    argv = build(A, work)
    before = tree(work, A["dir"])
    try:
        res = invoke(argv, work)
    finally:
        for p in work.rglob("ro"):
            p.chmod(0o755)
    assert_refused(res, codes, mid_run=case in MID_RUN)
    after = tree(work, A["dir"])
    assert sorted(set(after) - set(before)) == [], "left behind"
    assert sorted(k for k in before if k in after and before[k] != after[k] and before[k][0] != -1) == [], "changed"


# ------------------------------------------------------------------------------------ valid but unusual

def _unusual_images(folder: Path) -> dict[str, tuple[int, int]]:
    """Images of unusual kinds (name -> (width, height) as read, EXIF orientation applied)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(folder / "cmyk image.jpg")
    Image.fromarray((rng.integers(0, 65535, (48, 64))).astype(np.uint16)).save(folder / "grey16.png")
    Image.fromarray(np.dstack([rgb, np.full((48, 64), 128, np.uint8)])).save(folder / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display: stored 64x48, shown 48x64
    Image.fromarray(rgb).save(folder / "rotated.jpg", exif=exif)
    Image.fromarray(rgb).save(folder / "ünïcødé naïve ☃.png")
    Image.fromarray(rgb).save(folder / "no objects.png")
    sizes = {n: (64, 48) for n in ("cmyk image.jpg", "grey16.png", "rgba.png", "ünïcødé naïve ☃.png", "no objects.png")}
    sizes["rotated.jpg"] = (48, 64)
    return sizes


def test_valid_but_unusual_inputs_are_accepted(A, tmp_path):
    """CMYK, 16-bit grey, RGBA, EXIF-rotated images, unicode and spaces in file names, an image
    and a category without annotations: eval (GT boxes), the fine-tuning data layer and detect
    accept them."""
    from rclip_core.data.coco import load_instances
    from rclip_core.engine.detection_data import build_train_records

    sizes = _unusual_images(tmp_path / "imgs")
    images = [{"id": i + 1, "file_name": n, "width": w, "height": h} for i, (n, (w, h)) in enumerate(sizes.items())]
    cats = [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue square"}, {"id": 3, "name": "unseen thing"}]
    anns = [{"id": k + 1, "image_id": im["id"], "category_id": 1 + k % 2, "bbox": [4, 4, 20, 16], "area": 320,
             "iscrowd": 0} for k, im in enumerate(images) if im["file_name"] != "no objects.png"]
    gt = write_json(tmp_path / "unusual gt.json", {"images": images, "annotations": anns, "categories": cats})
    res = invoke(["eval", "--zero-shot", "--boxes", "gt", "--dataset", gt, "--images", tmp_path / "imgs",
                  "--weights", A["weights"], "--short-side", 64, "--templates", "single", "--workers", 0,
                  "--novel-classes", "blue square", "--device", "cpu", "--json", tmp_path / "r.json"], tmp_path)
    assert res.exit_code == 0, res.output[-3000:]
    cov = json.loads((tmp_path / "r.json").read_text())["coverage"]
    assert cov["images_evaluated"] == len(images) and cov.get("images_failed", 0) == 0, cov

    records = build_train_records(load_instances(gt), tmp_path / "imgs", {1: 0, 2: 1, 3: 2})
    assert len(records) == len(images) - 1  # the image without objects is not trained on

    res = invoke(["detect", *sorted((tmp_path / "imgs").iterdir()), "--weights", A["weights"], "--classes",
                  "red circle,blue square", "--templates", "single", "--proposals", "random", "--short-side", 64,
                  "--out", tmp_path / "det", "--device", "cpu"], tmp_path)
    assert res.exit_code == 0, res.output[-3000:]
    assert len(list((tmp_path / "det").rglob("*.json"))) >= 1
