"""Faults made visible: bad training items counted, named and limited (``data.max_bad_items``);
jittered-GT regions that refuse data without GT boxes and count misses; a fresh run that fails
before its first checkpoint leaves nothing behind; resume refuses another number of processes
and continues exactly with another number of DataLoader workers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from rclip_cli.main import cli
from rclip_core.errors import InputError
from test_pretrain import caption_shards, regionclip_tiny, run, world  # noqa: F401 - the fixture


def _tiny(world: Path, out: Path, **over) -> dict:
    return regionclip_tiny(world, out, **{"max_steps": 2, "checkpoint_every": 0, **over})


def _damaged_world(world: Path, tmp: Path) -> Path:
    """A copy of the world with one truncated training image and one text file named .jpg."""
    w = tmp / "damaged"
    shutil.copytree(world, w)
    (w / "train" / "000003.jpg").write_bytes((w / "train" / "000003.jpg").read_bytes()[:300])
    (w / "train" / "000005.jpg").write_text("this is not an image")
    return w


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def test_bad_training_items_are_counted_named_and_limited(world, tmp_path):
    damaged = _damaged_world(world, tmp_path)
    # 4 steps x 4 images: every image is met; the command line names them and the result counts them
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(_tiny(damaged, tmp_path / "cli", max_steps=4)))
    r = CliRunner().invoke(cli, ["pretrain", str(recipe), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "unreadable training item(s)" in r.stderr, r.output
    assert "000003.jpg" in r.stderr and "000005.jpg" in r.stderr
    recipe.write_text(yaml.safe_dump(_tiny(damaged, tmp_path / "strict", max_steps=4,
                                           **{"data.max_bad_items": 0})))
    r = CliRunner().invoke(cli, ["pretrain", str(recipe), "--device", "cpu"])
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.exit_code == 2 and len(lines) <= 2 and "data.max_bad_items=0" in lines[0], r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "strict").exists()  # the failed fresh run left nothing


def test_truncated_shard_among_good_ones_is_counted(world, tmp_path):
    from rclip_core.engine.data import PretrainData, ShortSideResize

    shards, _ = caption_shards(world, tmp_path)
    Path(shards[1]).write_bytes(Path(shards[1]).read_bytes()[:3000])  # breaks off in its first member
    data = PretrainData(shards, ShortSideResize((64,), 128), seed=2)
    data.next_batch(12)  # more than the good shard holds: the broken one is met
    bad = data.bad_items()
    assert bad["shard_items"] >= 1 and bad["count"] == bad["images"] + bad["shard_items"]
    strict = PretrainData(shards, ShortSideResize((64,), 128), seed=2, max_bad_items=0)
    with pytest.raises(InputError, match="max_bad_items=0"):
        strict.next_batch(12)


def test_gt_jitter_refuses_data_without_gt_and_counts_misses(world, tmp_path):
    d = _tiny(world, tmp_path / "bad", **{"regions.source": "gt_jitter",
                                         "regions.gt_boxes": str(world / "instances_val.json")})
    # val's file names 000000-000005.jpg match train images by name (lookup_boxes): the other 6 miss
    with pytest.raises(InputError, match=r"gt_jitter: 6 of 12 training images have no entry"):
        run(d)
    assert not (tmp_path / "bad").exists()
    res = run(_tiny(world, tmp_path / "good", **{"regions.source": "gt_jitter",
                                                "regions.gt_boxes": "instances_train.json"}))
    assert res.data_report["gt_box_misses"] == 0 and res.data_report["bad_items"] == 0


def test_nan_loss_before_the_first_checkpoint_leaves_nothing(world, tmp_path):
    from rclip_core.errors import RuntimeFailure

    out = tmp_path / "a" / "b"
    with pytest.raises(RuntimeFailure, match="the loss is"):
        run(_tiny(world, out, max_steps=4, **{"optim.lr": 1e30, "optim.clip_norm": None}))
    assert not (tmp_path / "a").exists()
    # an existing folder keeps what the user had there; only the run's own files go
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeFailure):
        run(_tiny(world, keep, max_steps=4, **{"optim.lr": 1e30, "optim.clip_norm": None}))
    assert _files(keep) == ["notes.txt"]


def _ranks_of(ckpt_dir: Path) -> int:
    st = torch.load(sorted(ckpt_dir.glob("ckpt_*"))[-1] / "state.pt", weights_only=True)
    return len(st["extra"]["ranks"])


def test_resume_with_another_number_of_processes_is_refused(world, tmp_path):
    out = tmp_path / "run"
    run(_tiny(world, out, max_steps=2, checkpoint_every=1))
    last = sorted((out / "checkpoints").glob("ckpt_*"))[-1] / "state.pt"
    st = torch.load(last, weights_only=True)
    st["extra"]["ranks"] = st["extra"]["ranks"] * 2  # as a run of two processes writes it
    st["extra"]["world_size"] = 2
    torch.save(st, last)
    before = _files(out)
    with pytest.raises(InputError, match=r"written by 2 process\(es\), this run has 1") as e:
        run(_tiny(world, out, max_steps=4, checkpoint_every=1), resume=True)
    assert "--nproc 2" in e.value.hint
    assert _files(out) == before


def test_resume_with_another_number_of_workers_is_exact(world, tmp_path):
    """num_workers 0 for steps 1-2, 1 worker for steps 3-4: the weights of a straight 0-worker run."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(_tiny(world, straight, max_steps=4, checkpoint_every=2))
    run(_tiny(world, resumed, max_steps=2, checkpoint_every=2))
    run(_tiny(world, resumed, max_steps=4, checkpoint_every=2, **{"data.num_workers": 1}), resume=True)
    a = load_file(str(sorted((straight / "checkpoints").glob("ckpt_*"))[-1] / "model.safetensors"))
    b = load_file(str(sorted((resumed / "checkpoints").glob("ckpt_*"))[-1] / "model.safetensors"))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
