"""The CUDA paths: AMP (bf16 and fp16 with a gradient scaler) training steps stay finite,
`rclip detect` on CUDA matches the CPU, and two-process nccl training resumes to the same
weights. Every test here is @pytest.mark.cuda: skipped (and listed by name) without a GPU;
`benchmarks/gpu_check.sh` runs them on one."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

pytestmark = pytest.mark.cuda

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    from rclip_core.data.shapes import generate_shapes_world

    d = tmp_path_factory.mktemp("cudaworld") / "shapes"
    generate_shapes_world(d, train=16, val=6, seed=0, workers=1, image_size=64, closeup_frac=0.0)
    return d


def _pretrain_recipe(world: Path, out: Path, **top) -> dict:
    d = {
        "mode": "regionclip", "output_dir": str(out), "seed": 3, "max_steps": 4, "checkpoint_every": 2,
        "model": {"teacher": {"model": "test-micro", "random_init": True}},
        "data": {"root": str(world), "captions": ["captions_train.jsonl"], "short_sides": [64, 96],
                 "max_size": 128, "flip": True, "num_workers": 0},
        "regions": {"source": "random", "per_image": 4},
        "concepts": {"pool": "instances_train.json", "templates": "single"},
        "optim": {"lr": 0.05, "warmup_iters": 2, "steps": [3]},
        "batch": {"images_per_process": 2},
        "logging": {"log_every": 1, "tensorboard": False},
    }
    d.update(top)
    return d


def _finetune_overrides(world: Path, out: Path, **extra) -> dict[str, str]:
    o = {
        "data.dataset": str(world), "init.model": "test-micro", "init.random_init": "true", "output_dir": str(out),
        "max_steps": "4", "checkpoint_every": "2", "data.train_short_sides": "[64, 80]", "data.max_size": "160",
        "data.test_short_side": "64", "data.test_max_size": "128", "data.num_workers": "0",
        "detector.rpn.anchor_sizes": "[8, 16, 32]", "detector.rpn.pre_nms_topk_train": "200",
        "detector.rpn.post_nms_topk_train": "50", "detector.rpn.pre_nms_topk_test": "200",
        "detector.rpn.post_nms_topk_test": "50", "detector.rois_per_image": "32", "batch.global_batch": "2",
        "optim.warmup_iters": "2", "optim.steps": "[3]", "optim.lr": "0.02", "logging.log_every": "1",
        "text.templates": "single", "test.eval_every": "0", "test.max_images": "3", "test.final_eval": "false",
    }
    o.update({k: str(v) for k, v in extra.items()})
    return o


def _all_finite(path: Path) -> bool:
    from rclip_core.weights.io import read_weights

    return all(bool(torch.isfinite(t.float()).all()) for t in read_weights(path).tensors.values()
               if t.is_floating_point())


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_amp_pretraining_steps_are_finite(world, tmp_path, dtype):
    from rclip_core.config import build_recipe
    from rclip_core.config.pretrain import PretrainRecipe
    from rclip_core.engine.pretrain import run_pretraining

    recipe = build_recipe(_pretrain_recipe(world, tmp_path / "out", amp=True, amp_dtype=dtype), PretrainRecipe)
    result = run_pretraining(recipe, device="cuda")
    assert result.steps == 4
    assert result.last_metrics and all(math.isfinite(v) for v in result.last_metrics.values()), result.last_metrics
    assert _all_finite(result.final_weights)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_amp_finetune_steps_are_finite(world, tmp_path, dtype):
    from rclip_core.config.finetune import load_finetune_recipe
    from rclip_core.engine.finetune import finetune as run_finetune

    recipe = load_finetune_recipe(str(REPO / "recipes" / "shapes_finetune.yaml"),
                                  _finetune_overrides(world, tmp_path / "out", amp="true", amp_dtype=dtype))
    result = run_finetune(recipe, device="cuda")
    assert result.end_step == 4
    import json

    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines() if line]
    losses = [v for row in rows for k, v in row.items() if k.startswith("loss")]
    assert [row["step"] for row in rows] == [1, 2, 3, 4] and losses and all(math.isfinite(v) for v in losses), rows
    assert _all_finite(result.detector_path)


def _detect(sample: Path, out: Path, device: str):
    from rclip_cli.main import cli

    r = CliRunner().invoke(cli, ["detect", str(sample), "--model", "test-micro", "--random-init", "--proposals",
                                 "grid", "--classes", "kite,boy,surfboard", "--short-side", "128", "--max-size",
                                 "256", "--save-embeddings", "--no-images", "--device", device, "--out", str(out)])
    assert r.exit_code == 0, r.output
    from rclip_core.weights.io import read_weights

    (emb_file,) = sorted((out / "embeddings").glob("*.safetensors"))
    return read_weights(emb_file).tensors


def test_detect_on_cuda_matches_cpu(sample_image, tmp_path):
    cpu = _detect(sample_image, tmp_path / "cpu", "cpu")
    gpu = _detect(sample_image, tmp_path / "cuda", "cuda")
    assert set(cpu) == set(gpu)
    for k in cpu:
        a, b = cpu[k].float(), gpu[k].float()
        assert a.shape == b.shape, k
        assert (a - b).abs().max().item() <= 1e-3, (k, (a - b).abs().max().item())


def _rclip(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.run([sys.executable, "-m", "rclip_cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _max_diff(a: Path, b: Path) -> float:
    from rclip_core.weights.io import read_weights

    ta, tb = read_weights(a).tensors, read_weights(b).tensors
    assert set(ta) == set(tb)
    return max(((ta[k].float() - tb[k].float()).abs().max().item() for k in ta if ta[k].numel()), default=0.0)


# RoIAlign's CUDA backward adds with atomics, so two identical CUDA runs can differ in the last
# bits; a resumed run must agree with an uninterrupted one to within that noise.
RESUME_TOL = 1e-4


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two-process nccl needs 2 GPUs")
def test_nccl_two_process_pretraining_resumes(world, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_pretrain_recipe(world, tmp_path / "unused", amp=False)))
    full, part = tmp_path / "full", tmp_path / "part"
    r = _rclip("pretrain", str(recipe), f"output_dir={full}", "--nproc", "2", "--device", "cuda")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _rclip("pretrain", str(recipe), f"output_dir={part}", "max_steps=2", "--nproc", "2", "--device", "cuda")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _rclip("pretrain", str(recipe), f"output_dir={part}", "--resume", "--nproc", "2", "--device", "cuda")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _max_diff(full / "final.safetensors", part / "final.safetensors") <= RESUME_TOL


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two-process nccl needs 2 GPUs")
def test_nccl_two_process_finetune_resumes(world, tmp_path):
    over = _finetune_overrides(world, tmp_path / "unused", amp="false")
    over.pop("output_dir")
    args = [f"{k}={v}" for k, v in over.items()]
    recipe = str(REPO / "recipes" / "shapes_finetune.yaml")
    full, part = tmp_path / "full", tmp_path / "part"
    r = _rclip("finetune", recipe, *args, "--out", str(full), "--nproc", "2", "--device", "cuda")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _rclip("finetune", recipe, *args, "max_steps=2", "--out", str(part), "--nproc", "2", "--device", "cuda")
    assert r.returncode == 0, r.stderr[-3000:]
    r = _rclip("finetune", recipe, *args, "--out", str(part), "--resume", "--nproc", "2", "--device", "cuda")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _max_diff(full / "detector.safetensors", part / "detector.safetensors") <= RESUME_TOL
