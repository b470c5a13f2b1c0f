"""``rclip finetune``: data stream and sampling, repeat factors, augmentation, data resolution,
an end-to-end run on a tiny ShapesWorld with novel / base / all AP50, exact resume after
``kill -9``, and the command line's bad inputs."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from rclip_cli.main import cli
from rclip_core.data.coco import load_instances
from rclip_core.engine.detection_data import (DetectionTrainSet, StepSampler, TrainRecord, TrainStream,
                                              build_train_records, repeat_factors)
from rclip_core.config.finetune import load_finetune_recipe
from rclip_core.engine.finetune import finetune
from rclip_core.engine.tasks.detection import resolve_recipe_data as resolve_data
from rclip_core.evaluation.protocol import evaluate_detector
from rclip_core.errors import InputError

REPO = Path(__file__).resolve().parents[1]
SHAPES_RECIPE = REPO / "recipes" / "shapes_finetune.yaml"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from rclip_core.data.shapes import generate_shapes_world

    d = tmp_path_factory.mktemp("ftworld") / "shapes"
    generate_shapes_world(d, train=12, val=6, seed=0, workers=1, image_size=64, closeup_frac=0.0)
    return d


def tiny_overrides(world: Path, out: Path, **extra) -> dict[str, str]:
    """The ShapesWorld recipe shrunk to a 64 px test-micro model and a handful of steps."""
    o = {
        "data.dataset": str(world), "init.model": "test-micro", "init.random_init": "true", "output_dir": str(out),
        "max_steps": "5", "checkpoint_every": "2", "data.train_short_sides": "[64, 80]", "data.max_size": "160",
        "data.test_short_side": "64", "data.test_max_size": "128", "data.num_workers": "0",
        "detector.rpn.anchor_sizes": "[8, 16, 32]", "detector.rpn.pre_nms_topk_train": "200",
        "detector.rpn.post_nms_topk_train": "50", "detector.rpn.pre_nms_topk_test": "200",
        "detector.rpn.post_nms_topk_test": "50", "detector.rois_per_image": "32", "batch.global_batch": "2",
        "optim.warmup_iters": "2", "optim.steps": "[3]", "optim.lr": "0.02", "logging.log_every": "1",
        "text.templates": "single", "test.eval_every": "2", "test.max_images": "3", "test.score_thresh": "0.0",
    }
    o.update({k: str(v) for k, v in extra.items()})
    return o


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in this process and in its subprocesses
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------- sampling

def test_repeat_factors_hand_fixture():
    # 4 images; f(1) = 3/4, f(2) = f(3) = 1/4; t = 0.5 -> r = max(1, sqrt(t / f))
    cats = [[1], [1, 2], [1, 1], [3]]
    r = repeat_factors(cats, 0.5)
    assert r.tolist() == pytest.approx([1.0, math.sqrt(2.0), 1.0, math.sqrt(2.0)])
    assert repeat_factors(cats, 0.001).tolist() == [1.0] * 4  # LVIS threshold: no class is that rare here
    assert repeat_factors([[1], []], 2.0).tolist() == pytest.approx([math.sqrt(4.0), 1.0])
    with pytest.raises(InputError):
        repeat_factors(cats, 0.0)


def test_train_stream_epochs_uniform_and_stochastic_rounding():
    s = TrainStream(5, seed=3)
    first = [s.index_at(p) for p in range(5)]
    assert sorted(first) == list(range(5))  # an epoch is a permutation
    again = TrainStream(5, seed=3)
    assert [again.index_at(p) for p in (7, 2, 11, 0)] == [s.index_at(p) for p in (7, 2, 11, 0)]  # random access
    assert first != [TrainStream(5, seed=4).index_at(p) for p in range(5)]
    rf = TrainStream(3, seed=0, factors=np.array([1.0, 2.5, 1.0]))
    for epoch in range(6):
        idx = rf.epoch_indices(epoch)
        counts = np.bincount(idx, minlength=3)
        assert counts[0] == 1 and counts[2] == 1 and counts[1] in (2, 3)
    ones = sum(int(np.bincount(rf.epoch_indices(e), minlength=3)[1] == 3) for e in range(200))
    assert 70 < ones < 130  # frac 0.5: about half the epochs round up


def test_step_sampler_partitions_each_step_over_ranks_and_passes():
    G = 8
    one = StepSampler(G, per_pass=8, accumulation=1, rank=0, world_size=1, start_step=0, max_steps=3)
    assert list(one) == list(range(24))
    parts = [StepSampler(G, per_pass=2, accumulation=2, rank=r, world_size=2, start_step=1, max_steps=2)
             for r in range(2)]
    assert parts[0].positions(1) == [8, 9, 12, 13] and parts[1].positions(1) == [10, 11, 14, 15]
    assert sorted(list(parts[0]) + list(parts[1])) == list(range(8, 16))  # the same images as one process
    assert len(parts[0]) == 4
    with pytest.raises(ValueError):
        StepSampler(G, per_pass=3, accumulation=1, rank=0, world_size=2, start_step=0, max_steps=1)


def test_augmentation_resize_flip_and_boxes(tmp_path):
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, :20] = 200  # left half bright
    Image.fromarray(img).save(tmp_path / "a.png")
    rec = TrainRecord(path=str(tmp_path / "a.png"), image_id=1, width=40, height=20,
                      boxes=np.array([[2.0, 3.0, 10.0, 8.0]]), labels=np.array([4]),
                      polygons=[[np.array([2.0, 3.0, 10.0, 3.0, 10.0, 8.0])]])
    stream = TrainStream(1, seed=0)
    plain = DetectionTrainSet([rec], stream, short_sides=[40], max_size=200, flip_prob=0.0)[0]
    assert plain["image"].shape == (3, 40, 80) and plain["image"].dtype == torch.uint8
    assert plain["boxes"].tolist() == [[4.0, 6.0, 20.0, 16.0]] and plain["labels"].tolist() == [4]
    flipped = DetectionTrainSet([rec], stream, short_sides=[40], max_size=200, flip_prob=1.0)[0]
    assert flipped["boxes"].tolist() == [[60.0, 6.0, 76.0, 16.0]]  # x -> 80 - x
    assert torch.equal(flipped["image"], plain["image"].flip(-1))
    assert flipped["polygons"][0][0].tolist() == [76.0, 6.0, 60.0, 6.0, 60.0, 16.0]
    # the scale of position p is drawn from (seed, p): the same in any process, varying with p
    multi = DetectionTrainSet([rec], stream, short_sides=[20, 40], max_size=200)
    heights = {int(multi[p]["image"].shape[1]) for p in range(12)}
    assert heights == {20, 40} and multi[5]["image"].shape == multi[5]["image"].shape


def test_build_train_records_filters(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        Image.new("RGB", (32, 24)).save(tmp_path / name)
    inst = {"images": [{"id": i, "file_name": n, "width": 32, "height": 24} for i, n in
                       enumerate(["a.jpg", "b.jpg", "c.jpg"], start=1)],
            "categories": [{"id": 5, "name": "cat"}, {"id": 9, "name": "dog"}],
            "annotations": [
                {"id": 1, "image_id": 1, "category_id": 5, "bbox": [1, 2, 10, 10]},
                {"id": 2, "image_id": 1, "category_id": 9, "bbox": [1, 2, 10, 10]},  # not a training class
                {"id": 3, "image_id": 2, "category_id": 5, "bbox": [0, 0, 5, 5], "iscrowd": 1},  # crowd
                {"id": 4, "image_id": 3, "category_id": 5, "bbox": [0, 0, 0, 5]},  # no area
            ]}
    ds = load_instances(inst)
    recs = build_train_records(ds, tmp_path, {5: 0})
    assert [r.image_id for r in recs] == [1] and recs[0].boxes.tolist() == [[1.0, 2.0, 11.0, 12.0]]
    assert recs[0].labels.tolist() == [0] and recs[0].category_ids == (5,)
    with pytest.raises(InputError, match="no polygon"):
        build_train_records(ds, tmp_path, {5: 0}, with_polygons=True)
    (tmp_path / "c.jpg").unlink()
    with pytest.raises(InputError, match="1 of 3 training images are not in"):
        build_train_records(ds, tmp_path, {5: 0})


# ------------------------------------------------------------------------------------------- data resolution

def test_resolve_data_shapes_custom_json_and_fully_supervised(world, tmp_path):
    r = load_finetune_recipe(SHAPES_RECIPE, {"data.dataset": str(world)})
    data = resolve_data(r)
    split = json.loads((world / "split.json").read_text())
    assert data.mode == "ovd" and data.train_category_ids == sorted(c["id"] for c in split["base"])
    assert data.test_category_ids == list(range(1, 31)) and data.test_names[0] == "red circle"
    assert data.splits["novel"] == {c["id"] for c in split["novel"]}
    train_ids = {a["category_id"] for a in data.train.annotations}
    assert train_ids <= set(data.train_category_ids)  # no novel box is ever seen in training
    # a plain COCO JSON: --novel-classes by name; without it, all classes (fully supervised)
    custom = {"data.dataset": str(world / "instances_train.json"), "data.images": str(world / "train"),
              "data.val_dataset": str(world / "instances_val.json"), "data.val_images": str(world / "val")}
    data = resolve_data(load_finetune_recipe(SHAPES_RECIPE, {**custom, "data.novel_classes": "[red circle, 2]"}))
    assert data.splits["novel"] == {1, 2} and data.train_category_ids == list(range(3, 31))
    data = resolve_data(load_finetune_recipe(SHAPES_RECIPE, custom))
    assert data.mode == "fully" and data.splits is None and data.train_category_ids == list(range(1, 31))
    with pytest.raises(InputError, match="not a category"):
        resolve_data(load_finetune_recipe(SHAPES_RECIPE, {**custom, "data.novel_classes": "[red hexagon]"}))
    with pytest.raises(InputError, match="needs a base/novel split"):
        resolve_data(load_finetune_recipe(SHAPES_RECIPE, {**custom, "data.mode": "ovd"}))
    with pytest.raises(InputError, match="--dataset coco needs --images"):
        resolve_data(load_finetune_recipe(SHAPES_RECIPE, {"data.dataset": "coco"}))
    with pytest.raises(InputError, match="COCO train annotations not found"):
        resolve_data(load_finetune_recipe(SHAPES_RECIPE, {"data.dataset": "coco", "data.images": str(tmp_path)}))


# ------------------------------------------------------------------------------------------- end to end

def test_finetune_cli_end_to_end_reports_novel_base_all(world, tmp_path):
    out = tmp_path / "run"
    over = tiny_overrides(world, out)
    args = ["finetune", str(SHAPES_RECIPE), "--dataset", str(world), "--model", "test-micro", "--random-init",
            "--out", str(out), "--device", "cpu"]
    args += [f"{k}={v}" for k, v in over.items() if not k.startswith(("data.dataset", "init.", "output_dir"))]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "AP50_novel" in res.output and "AP50_all" in res.output
    final = json.loads((out / "metrics.json").read_text())
    assert final["step"] == 5 and final["mode"] == "ovd" and final["classes"] == {"train": 20, "test": 30}
    for key in ("AP50_novel", "AP50_base", "AP50_all"):
        assert key in final["metrics"]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in log if "loss" in line] == [1, 2, 3, 4, 5]
    assert [line["step"] for line in log if "eval" in line] == [2, 4, 5]  # periodic and final
    # linear warm-up over 2 iterations from 0.001 x lr, then x0.1 at iteration 3 (0-based)
    lrs = [line["lr"] for line in log if "loss" in line]
    assert lrs == pytest.approx([0.02 * 0.001, 0.02 * (0.001 * 0.5 + 0.5), 0.02, 0.002, 0.002])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["ckpt_00000004", "ckpt_00000005", "latest"]
    dets = json.loads((out / "eval" / "detections_00000005.json").read_text())
    assert dets and {"image_id", "category_id", "bbox", "score"} <= set(dets[0])
    # the exported detector works alone, and `rclip eval --detector` gets the same numbers
    from rclip_core.weights.loaders import load_detector

    det = load_detector(out / "detector.safetensors")
    assert det.class_names[:2] == ["red circle", "red square"] and det.num_train_classes == 20
    data = resolve_data(load_finetune_recipe(SHAPES_RECIPE, {"data.dataset": str(world)}))
    again = evaluate_detector(det, data.val, data.val_images, category_ids=data.test_category_ids,
                              splits=data.splits, short_side=64, max_size=128)
    for key in ("AP50_novel", "AP50_base", "AP50_all"):
        a, b = again[key], final["metrics"][key]
        assert (a is None or math.isnan(a)) if b is None else a == pytest.approx(b, abs=1e-9)
    with pytest.raises(InputError, match="classifies 30 classes"):
        evaluate_detector(det, data.val, data.val_images, category_ids=[1, 2])


_KILLED_RUN = textwrap.dedent("""
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from rclip_core.config.finetune import load_finetune_recipe
    from rclip_core.engine.finetune import finetune

    recipe = load_finetune_recipe(sys.argv[1], json.loads(sys.argv[2]))

    def progress(event, info):
        if event == "step" and info["step"] == 3:  # after the step-2 checkpoint, before step 4's
            os.kill(os.getpid(), signal.SIGKILL)

    finetune(recipe, device="cpu", progress=progress)
""")


def test_killed_run_resumed_matches_uninterrupted_bit_exactly(world, tmp_path, one_thread):
    full = load_finetune_recipe(SHAPES_RECIPE, tiny_overrides(world, tmp_path / "full", **{"test.final_eval": "false"}))
    finetune(full, device="cpu")
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_RUN)
    over = tiny_overrides(world, tmp_path / "killed", **{"test.final_eval": "false"})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(SHAPES_RECIPE), json.dumps(over)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ckpts = tmp_path / "killed" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt_00000002", "latest"]
    with pytest.raises(InputError, match="already holds a fine-tuning run"):  # never overwritten by accident
        finetune(load_finetune_recipe(SHAPES_RECIPE, over), device="cpu")
    with pytest.raises(InputError, match="'optim' section differs"):
        finetune(load_finetune_recipe(SHAPES_RECIPE, {**over, "optim.lr": "0.5"}), device="cpu", resume=True)
    res = finetune(load_finetune_recipe(SHAPES_RECIPE, over), device="cpu", resume=True)
    assert (res.start_step, res.end_step) == (2, 5)
    a = load_file(str(tmp_path / "full" / "checkpoints" / "ckpt_00000005" / "model.safetensors"))
    b = load_file(str(ckpts / "ckpt_00000005" / "model.safetensors"))
    assert set(a) == set(b) and len(a) > 20
    for k in a:
        assert torch.equal(a[k], b[k]), k
    moved = [k for k in a if k.startswith("box_predictor") or k.startswith("trained_rpn")]
    init = load_file(str(tmp_path / "full" / "checkpoints" / "ckpt_00000004" / "model.safetensors"))
    assert any(not torch.equal(a[k], init[k]) for k in moved)  # the last step did change the weights
    steps = [json.loads(x)["step"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == [1, 2, 3, 4, 5]  # the killed run's step-3 line was replaced, not duplicated


@pytest.mark.slow
def test_two_processes_with_torchrun(world, tmp_path):
    out = tmp_path / "ddp"
    over = tiny_overrides(world, out, **{"max_steps": "3", "test.eval_every": "0"})
    args = ["finetune", str(SHAPES_RECIPE), "--dataset", str(world), "--model", "test-micro", "--random-init",
            "--out", str(out), "--device", "cpu", "--nproc", "2"]
    args += [f"{k}={v}" for k, v in over.items() if not k.startswith(("data.dataset", "init.", "output_dir"))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "rclip_cli", *args[0:]], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    final = json.loads((out / "metrics.json").read_text())
    assert final["world_size"] == 2 and final["step"] == 3 and "AP50_novel" in final["metrics"]
    assert (out / "detector.safetensors").is_file()


# ------------------------------------------------------------------------------------------- bad input

def run_cli(*args):
    return CliRunner().invoke(cli, ["finetune", *map(str, args)])


def _one_error(res, code: int, text: str) -> None:
    assert res.exit_code == code, res.output
    assert "error:" in res.output and text in " ".join(res.output.split()), res.output
    assert "Traceback" not in res.output


def test_cli_bad_inputs(world, tmp_path):
    base = ["--model", "test-micro", "--random-init", "--device", "cpu"]
    out = tmp_path / "never"
    _one_error(run_cli(*base), 2, "no data set given")
    _one_error(run_cli(tmp_path / "nope.yaml", "--dataset", world, *base), 2, "recipe not found")
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", world, "--random-init", "--device", "cpu"), 2, "needs --model")
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", world, *base, "--nproc", "0"), 2, "--nproc")
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", world, *base, "detector.rois_per_image=abc"), 2,
               "detector.rois_per_image")
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", world, *base, "detector.roi_per_image=3"), 2, "did you mean")
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", world, *base, "test.fusion=max"), 2, "test.fusion")
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", world, *base, "stray"), 2, "unexpected argument")
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", world, "--init", tmp_path / "missing.pth", "--device", "cpu"), 2,
               "file not found")
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", tmp_path / "missing.json", "--images", tmp_path, *base,
                       "--out", out), 2, "data set not found")
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", world / "instances_train.json", "--images", world / "train",
                       "--novel-classes", "red hexagon", *base, "--out", out), 2, "not a category")
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", world / "instances_train.json", "--images", world / "train",
                       "--novel-classes", "red circle,,", *base), 2, "empty entry")
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", world, "--images", tmp_path / "no-such-dir", *base, "--out", out),
               2, "images folder not found")
    assert not out.exists()  # nothing written by a failed run
    res = run_cli(SHAPES_RECIPE, "--dataset", world, *base, "--out", out, "--dry-run")
    text = " ".join(res.output.split())  # rich wraps long lines
    assert res.exit_code == 0 and "proposals: trained" in text and "20 training classes" in text
    assert not out.exists()
    # an existing run is not overwritten without --resume
    from rclip_core.engine.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "old" / "checkpoints", 2, {"x": torch.zeros(1)})
    _one_error(run_cli(SHAPES_RECIPE, "--dataset", world, *base, "--out", tmp_path / "old"), 2, "--resume")
    assert "--dataset" in run_cli("--help").output
