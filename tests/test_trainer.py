"""The one training loop: every task (region pretraining, image-text training, detector
fine-tuning) resumes exactly after ``kill -9`` under torchrun with two processes and DataLoader
workers, and the loop's own rules (AMP policy, resume checks, old checkpoint layouts)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from rclip_core.engine.trainer import _legacy_ranks, amp_policy, resume_mismatch
from test_pretrain import _label_shards, image_text_tiny, regionclip_tiny, world  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parents[1]


def _metrics(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.is_file() else []


def _regionclip(world: Path, out: Path) -> dict:
    return regionclip_tiny(world, out, seed=5, max_steps=5, **{"data.num_workers": 1})


def _image_text(world: Path, out: Path) -> dict:
    d = image_text_tiny(world, out)
    d.update(max_steps=5, checkpoint_every=2)
    d["data"].update(num_workers=1, flip=True)
    d["optim"]["clip_norm"] = 1.0
    d.pop("eval")
    return d


def _finetune_args(world: Path, out: Path) -> list[str]:
    over = {
        "max_steps": 5, "checkpoint_every": 2, "data.train_short_sides": "[64, 80]", "data.max_size": 160,
        "data.num_workers": 1, "detector.rpn.anchor_sizes": "[8, 16, 32]", "detector.rpn.pre_nms_topk_train": 200,
        "detector.rpn.post_nms_topk_train": 50, "detector.rois_per_image": 32, "batch.global_batch": 4,
        "optim.warmup_iters": 2, "optim.steps": "[3]", "optim.lr": 0.02, "logging.log_every": 1,
        "text.templates": "single", "test.eval_every": 0, "test.final_eval": "false",
    }
    return ["finetune", str(REPO / "recipes" / "shapes_finetune.yaml"), "--dataset", str(world), "--model",
            "test-micro", "--random-init", "--out", str(out), *[f"{k}={v}" for k, v in over.items()]]


def _regionclip_shards(world: Path, out: Path, shards: Path) -> dict:
    """Regions and their labels from `rclip pseudo-label` shards (a random student, no teacher)."""
    d = _regionclip(world, out)
    d["regions"] = {"source": "shards", "shards": str(shards), "per_image": 4}
    d["concepts"] = {"templates": "single"}  # the pool comes from the shards
    d["model"] = {"student": {"model": "test-micro", "random_init": True}}
    return d


def _command(kind: str, world: Path, out: Path, tmp: Path) -> list[str]:
    if kind == "detection":
        return _finetune_args(world, out)
    recipe = tmp / f"{out.name}.yaml"
    if kind == "regionclip_shards":
        shards = tmp / "labels"
        if not shards.exists():
            _label_shards(world, shards, topk=5)
        d = _regionclip_shards(world, out, shards)
    else:
        d = (_regionclip if kind == "regionclip" else _image_text)(world, out)
    recipe.write_text(yaml.safe_dump(d))
    return ["pretrain", str(recipe)]


def _run(argv: list[str], env: dict, extra: list[str] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rclip_cli", *argv, *extra, "--nproc", "2", "--device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=400)


def _kill_run(launcher: subprocess.Popen, out: Path) -> None:
    """SIGKILL the launcher's process group and every process whose command line names the run
    (torchrun starts each worker in a session of its own, and its DataLoader workers with it)."""
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
    tokens = (str(out), str(out.parent / f"{out.name}.yaml"))
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(t in cmdline for t in tokens):
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass
    launcher.wait(timeout=60)


def _weights(kind: str, out: Path) -> dict[str, torch.Tensor]:
    # the last checkpoint holds every trained tensor of each task (final files hold constants too)
    last = sorted((out / "checkpoints").glob("ckpt_*"))[-1]
    return load_file(str(last / "model.safetensors"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["regionclip", "regionclip_shards", "image_text", "detection"])
def test_kill_9_under_torchrun_with_workers_resumes_bit_identical(kind, world, tmp_path):
    """Two processes, one DataLoader worker each: a run killed (SIGKILL to torchrun and its
    workers) after step 3, with checkpoints at 2 and 4, resumed with --resume --nproc 2, ends with
    exactly the weights (and logged losses) of an uninterrupted run. ``regionclip`` labels random
    boxes online with the teacher; ``regionclip_shards`` reads `rclip pseudo-label` shards."""
    env = dict(os.environ, OMP_NUM_THREADS="1", RCLIP_CACHE=str(tmp_path / "cache"))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    proc = _run(_command(kind, world, straight, tmp_path), env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    argv = _command(kind, world, killed, tmp_path)
    child = subprocess.Popen([sys.executable, "-m", "rclip_cli", *argv, "--nproc", "2", "--device", "cpu"],
                             env=dict(env, RCLIP_TEST_SLEEP_AFTER_STEP="3"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not any(m.get("step") == 3 for m in _metrics(killed)):
            assert child.poll() is None, f"the {kind} run ended before step 3"
            assert time.time() < deadline, "the run did not reach step 3"
            time.sleep(0.2)
        _kill_run(child, killed)  # the launcher, torchrun and both workers: no handler runs
    finally:
        _kill_run(child, killed)
    assert sorted(p.name for p in (killed / "checkpoints").glob("ckpt_*")) == ["ckpt_00000002"]

    proc = _run(argv, env, ["--resume"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = _weights(kind, straight), _weights(kind, killed)
    assert a.keys() == b.keys() and len(a) > 10
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    objective = "loss" if kind == "detection" else "total"
    steps = [m["step"] for m in _metrics(killed) if objective in m]
    assert steps == [1, 2, 3, 4, 5]  # step 3 was done again and logged once
    assert [m[objective] for m in _metrics(killed) if objective in m] == \
        [m[objective] for m in _metrics(straight) if objective in m]
    ck = torch.load(sorted((killed / "checkpoints").glob("ckpt_*"))[-1] / "state.pt", weights_only=True)
    assert ck["extra"]["world_size"] == 2 and len(ck["extra"]["ranks"]) == 2
    assert set(ck["extra"]["ranks"][0]) == {"rng", "data", "task"}


# ------------------------------------------------------------------------------------ the loop's rules


def test_amp_policy():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert amp_policy(True, "auto", cpu) == (False, torch.float32)  # never on the CPU
    assert amp_policy(False, "bf16", cuda) == (False, torch.float32)
    assert amp_policy(True, "fp16", cuda) == (True, torch.float16)
    assert amp_policy(True, "bf16", cuda) == (True, torch.bfloat16)


def test_resume_mismatch_names_the_changed_section():
    saved = {"optim": {"lr": 0.1}, "data": {"root": "a", "num_workers": 4}, "max_steps": 10, "logging": {"x": 1}}
    assert resume_mismatch(saved, {**saved, "max_steps": 20, "logging": {"x": 2}}, ("max_steps", "logging")) is None
    assert resume_mismatch(saved, {**saved, "data": {"root": "a", "num_workers": 0}}, ()) is None
    assert resume_mismatch(saved, {**saved, "optim": {"lr": 0.2}}, ()) == "optim"
    # a checkpoint of rclip 0.1 has no amp_dtype: that is not a difference
    assert resume_mismatch(saved, {**saved, "amp_dtype": "auto"}, ()) is None


def test_checkpoints_of_rclip_0_1_are_read():
    rng = {"torch": torch.zeros(3)}
    gen = torch.Generator().get_state()
    pre = _legacy_ranks({"ranks": [{"rng": rng, "data": {"epoch": 1}, "generator": gen}]}, {})
    assert pre == [{"rng": rng, "data": {"epoch": 1}, "task": {"regions": gen}}]
    ft = _legacy_ranks({"rng_ranks": [rng, rng]}, {})
    assert len(ft) == 2 and ft[1] == {"rng": rng, "data": {}, "task": {}}
    assert _legacy_ranks({}, {"rng": rng}) == [{"rng": rng, "data": {}, "task": {}}]
