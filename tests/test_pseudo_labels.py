"""``rclip pseudo-label``, :mod:`rclip_core.pseudo_label` and :mod:`rclip_core.data.shards`: shard
format, labels against a direct computation with the teacher, resumability (simulated and a real
``kill -9``), settings checks, the process split, ``--inspect`` and the error contract.

World: 12 ShapesWorld training images of 64x64 px; teacher: ``test-micro`` with random weights,
saved to a file. Its region embeddings all point almost the same way u (cos > 0.9999), so the
concept embeddings are u plus unit vectors along the two main directions in which the regions
differ, and the runs use T = 0.0002 instead of 0.01: then the teacher's top probabilities
spread over (0.2, 1), the argmax varies, and with threshold 0.5 regions are kept and dropped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from rclip_cli.commands.pseudo_label import SHARD_DELAY_ENV, _args_without_nproc
from rclip_cli.main import cli
from rclip_core.data.images import load_image
from rclip_core.data.shapes import generate_shapes_world
from rclip_core.data.shards import PseudoLabelShards, shard_statistics
from rclip_core.errors import InputError
from rclip_core.models.proposals.boxes import random_boxes
from rclip_core.models.proposals.offline import build_offline_rpn
from rclip_core.pseudo_label import (LabelSettings, PseudoLabeler, collect_label_images, dataset_label_images,
                                     image_seed, label_image)
from rclip_core.weights.io import save_safetensors
from rclip_core.weights.loaders import attach_rpn, load_model
from rclip_core.weights.native import save_model

SIZE = 64
T = 0.0002
CONCEPTS = ["red circle", "blue square", "green triangle", "yellow star", "purple cross", "orange heart"]
TENSORS = {"image_index", "boxes", "target", "max_prob", "keep", "topk_inds", "topk_logits"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("pl")
    generate_shapes_world(d / "world", train=12, val=0, image_size=SIZE, workers=1)
    torch.manual_seed(0)
    model = load_model(model="test-micro", random_init=True)
    save_model(model, d / "teacher.safetensors")
    (d / "pool.txt").write_text("\n".join(f"{c},{10 - i}" for i, c in enumerate(CONCEPTS)))
    # concept embeddings around the teacher's common region direction u (see the docstring)
    prep = load_image(d / "world" / "train" / "000001.jpg", SIZE, 1333)
    with torch.no_grad():
        e = model.encoder([prep.tensor], [random_boxes(prep.size, 50, torch.Generator().manual_seed(0))])[0]
    e = F.normalize(e, dim=-1)
    u = F.normalize(e.mean(0), dim=0)
    v = torch.linalg.svd(e - (e @ u)[:, None] * u, full_matrices=False).Vh[:2]  # [2, D]
    emb = torch.stack([u + math.cos(2 * math.pi * k / 6) * v[0] + math.sin(2 * math.pi * k / 6) * v[1]
                       for k in range(len(CONCEPTS))]) * 4.0
    save_safetensors(d / "concepts.safetensors", {"embeddings": emb}, {"kind": "embeddings", "names": CONCEPTS})
    return {"dir": d, "data": d / "world" / "captions_train.jsonl", "teacher": d / "teacher.safetensors",
            "pool": d / "pool.txt", "emb_file": d / "concepts.safetensors", "emb": emb, "root": d / "world"}


def run_cli(*args, env: dict | None = None):
    return CliRunner().invoke(cli, ["pseudo-label", *map(str, args)], env=env)


def base_args(world, out, *extra) -> list:
    return [world["data"], "--teacher", world["teacher"], "--concepts", world["pool"],
            "--concept-embeddings", world["emb_file"], "--proposals", "random", "--short-side", SIZE,
            "--temperature", T, "--threshold", 0.5, "--topk", 3, "--out", out, *extra]


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> Path:
    """An uninterrupted run with shard size 4 (3 shards)."""
    out = tmp_path_factory.mktemp("ref") / "labels"
    r = run_cli(*base_args(world, out, "--shard-size", 4))
    assert r.exit_code == 0, r.output
    return out


def flat(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def shard_tensors(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(p) for p in sorted(out.glob("shard-*.safetensors"))}


def assert_same_labels(a: Path, b: Path) -> None:
    """Every image's labels are identical in two directories (whatever their sharding)."""
    sa, sb = PseudoLabelShards(a), PseudoLabelShards(b)
    assert sa.keys == sb.keys
    for key in sa.keys:
        la, lb = sa.lookup(key), sb.lookup(key)
        assert la.keys() == lb.keys()
        for name in la:
            assert torch.equal(la[name], lb[name]), (key, name)


def assert_error(result, out: Path | None, match: str, code: int = 2) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and match in errors[0], result.output
    assert all(ln.startswith(("error:", "hint:")) for ln in lines), result.output
    if out is not None:
        assert not out.exists()


# --------------------------------------------------------------------------------------------
# the output format


def test_index_and_shards(world, reference):
    index = json.loads((reference / "index.json").read_text())
    pool_sha = hashlib.sha256(world["pool"].read_bytes()).hexdigest()
    expected = {"format": "rclip-pseudo-labels", "version": 1, "teacher": str(world["teacher"].resolve()),
                "architecture": "test-micro", "concepts": CONCEPTS, "concept_pool_sha256": pool_sha,
                "proposals": "random", "regions_per_image": 100, "threshold": 0.5, "temperature": T, "topk": 3,
                "short_side": SIZE, "max_size": 1333, "complete": True, "images_total": 12, "num_shards": 3,
                "data_root": str(world["root"].resolve()), "images_done": 12, "images_failed": 0,
                "regions_total": 1200}
    assert {k: index[k] for k in expected} == expected
    assert index["shards"] == [{"file": f"shard-0000{i}.safetensors", "shard": i, "num_images": 4,
                                "num_regions": 400} for i in range(3)]
    for i, (name, t) in enumerate(shard_tensors(reference).items()):
        assert set(t) == TENSORS
        assert t["boxes"].shape == (400, 4) and t["boxes"].dtype == torch.float32
        assert t["target"].dtype == torch.int64 and t["keep"].dtype == torch.bool
        assert t["max_prob"].dtype == torch.float32 and t["topk_logits"].shape == (400, 3)
        # rows grouped by image, 100 each, in image order
        assert torch.equal(t["image_index"], torch.arange(4).repeat_interleave(100))
        # a 64 px image is not resized (short side 64): random boxes are on the 8 px grid, inside it
        assert torch.equal(t["boxes"] % 8, torch.zeros_like(t["boxes"]))
        assert float(t["boxes"].min()) >= 0 and float(t["boxes"].max()) <= SIZE
        assert bool((t["boxes"][:, 2:] > t["boxes"][:, :2]).all())
        # top-1 of the stored top-k is the label; logits are sorted
        assert torch.equal(t["topk_inds"][:, 0], t["target"])
        assert bool((t["topk_logits"][:, :-1] >= t["topk_logits"][:, 1:]).all())
        with safe_open(str(reference / name), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["images"]) == [f"train/{n:06d}.jpg" for n in range(4 * i + 1, 4 * i + 5)]
        assert json.loads(meta["record_keys"]) == [str(n) for n in range(4 * i + 1, 4 * i + 5)]
        assert meta["shard"] == str(i) and json.loads(meta["offsets"]) == [0, 100, 200, 300, 400]
        assert json.loads(meta["sizes"]) == [[SIZE, SIZE]] * 4


def test_reader_lookup_by_key_alias_and_path(world, reference):
    shards = PseudoLabelShards(reference)
    assert len(shards) == 12 and shards.concepts == CONCEPTS and shards.topk == 3
    t = load_file(reference / "shard-00001.safetensors")
    labels = shards.lookup("train/000006.jpg")  # second image of shard 1: rows 100..199
    for name in ("boxes", "target", "max_prob", "keep", "topk_inds", "topk_logits"):
        assert torch.equal(labels[name], t[name][100:200])
    assert labels["image_size"].tolist() == [SIZE, SIZE]
    assert torch.equal(shards.lookup("6")["boxes"], labels["boxes"])  # the caption record's image_id
    assert torch.equal(shards.lookup(world["root"] / "train" / "000006.jpg")["target"], labels["target"])
    assert "train/000006.jpg" in shards and "train/999999.jpg" not in shards
    with pytest.raises(KeyError):
        shards.lookup("train/999999.jpg")
    keys = [k for k, _ in shards]
    assert keys == shards.keys == [f"train/{n:06d}.jpg" for n in range(1, 13)]


def test_labels_match_a_direct_computation(world, tmp_path):
    """Teacher embeddings of the seeded random boxes, softmax(cos / T) over the concepts,
    argmax; keep = max p > threshold (STRICT), or everything when no region of the image passes."""
    model = load_model(weights=world["teacher"])
    emb = world["emb"]
    key = "train/000003.jpg"
    prep = load_image(world["root"] / key, SIZE, 1333)
    boxes = random_boxes(prep.size, 100, torch.Generator().manual_seed(image_seed(0, key)))
    with torch.no_grad():
        region = model.encoder([prep.tensor], [boxes])[0]
    logits = F.normalize(region, dim=-1) @ F.normalize(emb, dim=-1).t() / T
    p = logits.softmax(dim=1)
    max_p, target = p.max(dim=1)
    assert float(max_p.min()) < 0.5 < float(max_p.max()) and len(set(target.tolist())) >= 3

    # threshold = one region's own top probability: that region is NOT kept (strict >)
    thr = float(max_p.sort().values[50])
    images = collect_label_images(world["data"])
    labeler = PseudoLabeler(model, CONCEPTS, emb, images, tmp_path / "o", LabelSettings(
        proposals="random", short_side=SIZE, temperature=T, threshold=thr, topk=2), concept_pool_sha256="-",
        rank=0, world_size=1)
    labeler.run(labeler.prepare())
    got = PseudoLabelShards(tmp_path / "o").lookup(key)
    assert torch.equal(got["boxes"], boxes)
    assert torch.equal(got["target"], target)
    assert torch.allclose(got["max_prob"], max_p, atol=1e-6)
    assert torch.equal(got["keep"], max_p > thr) and int(got["keep"].sum()) == 49
    assert torch.allclose(got["topk_logits"], logits.topk(2, dim=1).values, rtol=1e-5)
    assert torch.equal(got["topk_inds"], logits.topk(2, dim=1).indices)

    # at the official T = 0.01 no region of this image reaches p = 0.5: it keeps all its regions
    direct = label_image(model, prep, key, emb, LabelSettings(proposals="random", short_side=SIZE, threshold=0.5))
    p01 = (logits * T / 0.01).softmax(dim=1)
    assert float(p01.max()) < 0.5
    assert bool(direct["keep"].all()) and torch.allclose(direct["max_prob"], p01.max(dim=1).values, atol=1e-6)


def test_rpn_proposals_use_the_pretraining_preset(world, tmp_path):
    """--proposals rpn: the offline RPN at NMS 0.5 / 300 after NMS, then N drawn with the
    image's seeded randperm (``clip_rcnn.py: PretrainFastRCNN.get_region_proposals``; N = 100
    there, 10 here because a random RPN finds only ~15 proposals in a 64 px image)."""
    model = load_model(weights=world["teacher"])
    torch.manual_seed(0)
    attach_rpn(model, build_offline_rpn("lvis_866_fpn").state_dict())
    assert model.rpn.settings.nms == 0.9  # zero-shot preset as loaded
    images = collect_label_images(world["data"], max_images=2)
    labeler = PseudoLabeler(model, CONCEPTS, world["emb"], images, tmp_path / "o",
                            LabelSettings(proposals="rpn", short_side=SIZE, regions_per_image=10),
                            concept_pool_sha256="-",
                            rank=0, world_size=1)
    s = model.rpn.settings
    assert (s.nms, s.post_nms_topk) == (0.5, 300)
    assert json.loads(json.dumps(labeler.header["rpn"])) == {"kind": "lvis_866_fpn", "nms_thresh": 0.5,
                                                             "pre_nms_topk": 1000, "post_nms_topk": 300}
    labeler.run(labeler.prepare())
    key = images.items[1].key
    prep = load_image(images.items[1].path, SIZE, 1333)
    proposals = model.rpn([prep.tensor])[0].boxes
    assert proposals.shape[0] > 10  # so that sampling happens
    perm = torch.randperm(proposals.shape[0], generator=torch.Generator().manual_seed(image_seed(0, key)))
    assert torch.equal(PseudoLabelShards(tmp_path / "o").lookup(key)["boxes"], proposals[perm[:10]])

    # --rpn-topk: fewer proposals kept after NMS (scenes with few objects), the draw from those
    few = PseudoLabeler(model, CONCEPTS, world["emb"], images, tmp_path / "o12",
                        LabelSettings(proposals="rpn", short_side=SIZE, regions_per_image=10, rpn_topk=12),
                        concept_pool_sha256="-", rank=0, world_size=1)
    assert model.rpn.settings.post_nms_topk == 12 and few.header["rpn"]["post_nms_topk"] == 12
    few.run(few.prepare())
    top = model.rpn([prep.tensor])[0].boxes
    assert torch.equal(top, proposals[:12])  # the same ranking, cut at 12
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(image_seed(0, key)))
    assert torch.equal(PseudoLabelShards(tmp_path / "o12").lookup(key)["boxes"], top[perm[:10]])
    with pytest.raises(InputError, match="RPN top-k"):
        LabelSettings(rpn_topk=0).validate()


# --------------------------------------------------------------------------------------------
# resuming


def test_resume_after_a_simulated_kill(world, reference, tmp_path):
    out = tmp_path / "labels"
    assert run_cli(*base_args(world, out, "--shard-size", 4)).exit_code == 0
    # what a kill leaves: the last shard missing, a half-written temporary file, a stale index;
    # and a shard file that was damaged later
    (out / "shard-00002.safetensors").unlink()
    (out / ".shard-00002.safetensors.x1y2.tmp").write_bytes(b"half a shard")
    shard1 = out / "shard-00001.safetensors"
    shard1.write_bytes(shard1.read_bytes()[:-100])
    index = json.loads((out / "index.json").read_text())
    index.update(complete=False, shards=index["shards"][:2])
    (out / "index.json").write_text(json.dumps(index))
    inode0 = (out / "shard-00000.safetensors").stat().st_ino

    r = run_cli(*base_args(world, out, "--shard-size", 4))
    assert r.exit_code == 0, r.output
    assert "3 shards; 1 already done; 1 unreadable shard file(s) will be rewritten" in flat(r)
    assert "labelled 8 images" in flat(r)
    assert (out / "shard-00000.safetensors").stat().st_ino == inode0  # not redone
    assert sorted(p.name for p in out.iterdir()) == ["index.json"] + [f"shard-0000{i}.safetensors" for i in range(3)]
    assert json.loads((out / "index.json").read_text())["complete"] is True
    assert_same_labels(out, reference)
    for name, t in shard_tensors(out).items():
        for k, v in shard_tensors(reference)[name].items():
            assert torch.equal(v, t[k])


def test_resume_after_kill_9(world, reference, tmp_path):
    """A real SIGKILL of a running `rclip pseudo-label` after its first shard, then a rerun."""
    out = tmp_path / "labels"
    env = dict(os.environ, OMP_NUM_THREADS="1", RCLIP_CACHE=str(tmp_path / "cache"), **{SHARD_DELAY_ENV: "60"})
    cmd = [sys.executable, "-m", "rclip_cli", "pseudo-label", *map(str, base_args(world, out, "--shard-size", 4))]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120

        def first_shard_indexed() -> bool:  # the shard, then the index rewrite that follows it
            try:
                return len(json.loads((out / "index.json").read_text())["shards"]) == 1
            except (OSError, ValueError, KeyError):
                return False

        while not first_shard_indexed():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.time() < deadline, "the first shard never appeared"
            time.sleep(0.1)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] is False and [s["file"] for s in index["shards"]] == ["shard-00000.safetensors"]
    assert not (out / "shard-00001.safetensors").exists()
    with pytest.raises(InputError, match="incomplete"):
        PseudoLabelShards(out)

    r = run_cli(*base_args(world, out, "--shard-size", 4))
    assert r.exit_code == 0, r.output
    assert "labelled 8 images" in flat(r)
    assert_same_labels(out, reference)  # every image exactly once, identical to an uninterrupted run


def test_other_shard_size_gives_the_same_labels(world, reference, tmp_path):
    out = tmp_path / "labels"
    assert run_cli(*base_args(world, out, "--shard-size", 5)).exit_code == 0
    assert [s["num_images"] for s in json.loads((out / "index.json").read_text())["shards"]] == [5, 5, 2]
    assert_same_labels(out, reference)


def test_processes_split_the_shards(world, reference, tmp_path):
    """World size 2 (simulated in one process; the barrier is a no-op): rank 1 labels shard 1,
    rank 0 shards 0 and 2 and writes the final index."""
    model = load_model(weights=world["teacher"])
    images = collect_label_images(world["data"])
    settings = LabelSettings(proposals="random", short_side=SIZE, temperature=T, threshold=0.5, topk=3, shard_size=4)

    def labeler(rank: int) -> PseudoLabeler:
        return PseudoLabeler(model, CONCEPTS, world["emb"], images, tmp_path / "o", settings,
                             concept_pool_sha256="-", rank=rank, world_size=2)

    one = labeler(1)
    plan = one.prepare()
    assert plan.shards == [1] and plan.images == 4
    assert one.run(plan).complete is False
    assert sorted(p.name for p in (tmp_path / "o").glob("shard-*")) == ["shard-00001.safetensors"]
    zero = labeler(0)
    plan = zero.prepare()
    assert plan.shards == [0, 2] and plan.shards_done == 1
    summary = zero.run(plan)
    assert summary.complete and summary.index["complete"] and summary.images == 8
    shards = PseudoLabelShards(tmp_path / "o")
    ref = PseudoLabelShards(reference)
    for key in ref.keys:
        assert torch.equal(shards.lookup(key)["target"], ref.lookup(key)["target"])
        assert torch.equal(shards.lookup(key)["boxes"], ref.lookup(key)["boxes"])


def test_other_settings_are_refused_until_overwrite(world, reference, tmp_path):
    out = tmp_path / "labels"
    assert run_cli(*base_args(world, out, "--shard-size", 4)).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = run_cli(*base_args(world, out, "--shard-size", 4, "--threshold", 0.6))
    assert_error(r, None, "was labelled with other settings (threshold: 0.5 there, 0.6 now)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = run_cli(*base_args(world, out, "--shard-size", 4, "--max-images", 5))
    assert_error(r, None, "images_total: 12 there, 5 now")
    r = run_cli(*base_args(world, out, "--shard-size", 4, "--threshold", 0.6, "--overwrite"))
    assert r.exit_code == 0, r.output
    index = json.loads((out / "index.json").read_text())
    assert index["threshold"] == 0.6 and index["complete"] and len(index["shards"]) == 3


def test_unreadable_images_are_recorded_not_lost(world, tmp_path):
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    for n in (1, 2):
        (root / "img" / f"{n}.jpg").write_bytes((world["root"] / "train" / f"00000{n}.jpg").read_bytes())
    (root / "img" / "bad.jpg").write_text("not an image")
    lines = [{"image": f"img/{n}.jpg", "caption": "a shape"} for n in ("1", "bad", "2", "1")]
    (root / "caps.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    out = tmp_path / "labels"
    r = run_cli(root / "caps.jsonl", "--teacher", world["teacher"], "--concept-embeddings", world["emb_file"],
                "--proposals", "random", "--short-side", SIZE, "--regions-per-image", 7, "--out", out)
    assert r.exit_code == 0, r.output
    assert "1 image(s) could not be read" in flat(r)
    shards = PseudoLabelShards(out)
    assert shards.keys == ["img/1.jpg", "img/bad.jpg", "img/2.jpg"]  # an image with two captions once
    assert list(shards.failed) == ["img/bad.jpg"]
    bad = shards.lookup("img/bad.jpg")
    assert bad["boxes"].shape == (0, 4) and bad["image_size"].tolist() == [0, 0]
    assert shards.lookup("img/2.jpg")["boxes"].shape == (7, 4)
    assert json.loads((out / "index.json").read_text())["images_failed"] == 1


def test_saved_embeddings_are_the_teachers(world, tmp_path):
    out = tmp_path / "labels"
    r = run_cli(*base_args(world, out, "--max-images", 2, "--save-embeddings"))
    assert r.exit_code == 0, r.output
    t = load_file(out / "shard-00000.safetensors")
    assert t["embeddings"].shape == (200, 32) and t["embeddings"].dtype == torch.float16
    model = load_model(weights=world["teacher"])
    key = "train/000002.jpg"
    prep = load_image(world["root"] / key, SIZE, 1333)
    boxes = random_boxes(prep.size, 100, torch.Generator().manual_seed(image_seed(0, key)))
    with torch.no_grad():
        region = model.encoder([prep.tensor], [boxes])[0]
    assert torch.equal(t["embeddings"][100:], region.half())  # unnormalised, float16
    assert json.loads((out / "index.json").read_text())["save_embeddings"] is True


# --------------------------------------------------------------------------------------------
# inputs


def test_coco_instances_and_folders_as_data(world):
    coco = collect_label_images(world["root"] / "instances_train.json", images=world["root"] / "train")
    assert [it.key for it in coco.items[:2]] == ["000001.jpg", "000002.jpg"]
    assert coco.items[0].record_key == "1" and coco.data_root == str((world["root"] / "train").resolve())
    folder = collect_label_images(world["root"], max_images=3)
    assert [it.key for it in folder.items] == ["train/000001.jpg", "train/000002.jpg", "train/000003.jpg"]
    assert len(collect_label_images(world["root"] / "train")) == 12
    with pytest.raises(InputError, match="none of the first"):
        collect_label_images(world["root"] / "instances_train.json", images=world["dir"])


def test_named_data_sets_as_data(world, tmp_path):
    """--dataset takes the names of `rclip eval` / `rclip finetune`; shapes:DIR labels the same
    images, with the same keys, as its instances file."""
    named = dataset_label_images(f"shapes:{world['root']}", max_images=3)
    coco = collect_label_images(world["root"] / "instances_train.json", images=world["root"] / "train", max_images=3)
    assert [it.key for it in named.items] == [it.key for it in coco.items] == ["000001.jpg", "000002.jpg",
                                                                               "000003.jpg"]
    assert [it.record_key for it in named.items] == [it.record_key for it in coco.items]
    assert named.data_root == coco.data_root and named.missing == 0
    out = tmp_path / "labels"
    r = run_cli("--dataset", f"shapes:{world['root']}", "--split", "train", "--max-images", 3, "--teacher",
                world["teacher"], "--concepts", world["pool"], "--concept-embeddings", world["emb_file"],
                "--proposals", "random", "--short-side", SIZE, "--temperature", T, "--threshold", 0.5, "--out", out)
    assert r.exit_code == 0, r.output
    shards = PseudoLabelShards(out)
    assert shards.keys == ["000001.jpg", "000002.jpg", "000003.jpg"] and "1" in shards
    assert shards.index["data"].startswith("shapes:train:")


def test_args_for_torchrun():
    argv = ["pseudo-label", "d.jsonl", "--nproc", "4", "--out", "o", "--nproc=2"]
    assert _args_without_nproc(argv) == ["pseudo-label", "d.jsonl", "--out", "o"]


@pytest.mark.parametrize("case", [
    "no-data", "missing-data", "no-out", "no-teacher", "no-concepts", "missing-pool", "random-init-alone",
    "rpn-without-rpn", "empty-folder", "bad-threshold", "text-only", "rows-vs-names", "builtin-pool-rows",
    "inspect-with-data", "data-and-dataset", "unknown-dataset",
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(world, tmp_path, case):
    out = tmp_path / "new" / "labels"
    (tmp_path / "empty").mkdir()
    (tmp_path / "caps.txt").write_text("a red circle\n")
    (tmp_path / "three.txt").write_text("a\nb\nc\n")
    common = ["--teacher", world["teacher"], "--concepts", world["pool"], "--out", out]
    args, match = {
        "no-data": (["--out", out], "no DATA given"),
        "missing-data": (["nope.jsonl", *common], "data not found"),
        "no-out": ([world["data"], "--teacher", world["teacher"], "--concepts", world["pool"]], "no --out"),
        "no-teacher": ([world["data"], "--concepts", world["pool"], "--out", out], "no teacher given"),
        "no-concepts": ([world["data"], "--teacher", world["teacher"], "--out", out], "no concepts given"),
        "missing-pool": ([world["data"], "--teacher", world["teacher"], "--concepts", "nope.txt", "--out", out],
                         "--concepts file not found"),
        "random-init-alone": ([world["data"], "--random-init", "--concepts", world["pool"], "--out", out],
                              "--random-init needs --model"),
        "rpn-without-rpn": ([world["data"], *common], "needs an offline RPN"),
        "empty-folder": ([tmp_path / "empty", *common], "contains no images"),
        "bad-threshold": ([world["data"], *common, "--proposals", "random", "--threshold", 1.5], "threshold"),
        "text-only": ([tmp_path / "caps.txt", *common], "has no image files"),
        "rows-vs-names": ([world["data"], "--teacher", world["teacher"], "--concepts", tmp_path / "three.txt",
                           "--concept-embeddings", world["emb_file"], "--proposals", "random", "--out", out],
                          "has 6 rows but the pool has 3"),
        # a built-in pool name is read like a file (here: the 80 COCO class names)
        "builtin-pool-rows": ([world["data"], "--teacher", world["teacher"], "--concepts", "coco",
                               "--concept-embeddings", world["emb_file"], "--proposals", "random", "--out", out],
                              "has 6 rows but the pool has 80"),
        "inspect-with-data": ([world["data"], "--inspect", tmp_path], "--inspect takes only"),
        "data-and-dataset": ([world["data"], "--dataset", "coco", *common], "exclude each other"),
        "unknown-dataset": (["--dataset", "nope", *common], "--dataset nope: not one of"),
    }[case]
    assert_error(run_cli(*args), out, match)
    assert not (tmp_path / "new").exists()


def test_rpn_topk_below_one_is_refused_by_the_option(world, tmp_path):
    r = run_cli(world["data"], "--teacher", world["teacher"], "--concepts", world["pool"], "--out",
                tmp_path / "o", "--rpn-topk", 0)
    assert r.exit_code == 2 and "Invalid value for '--rpn-topk'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------------------------
# inspecting


def test_inspect_prints_statistics_and_renders(world, reference, tmp_path):
    import shutil

    d = tmp_path / "labels"
    shutil.copytree(reference, d)
    r = run_cli("--inspect", d, "--render", 3)
    assert r.exit_code == 0, r.output
    stats = shard_statistics(PseudoLabelShards(d))
    assert stats["images"] == 12 and stats["regions"] == 1200
    assert stats["regions_per_image"] == {"mean": 100.0, "min": 100, "max": 100}
    kept = sum(int(t["keep"].sum()) for t in shard_tensors(d).values())
    p = torch.cat([t["max_prob"] for t in shard_tensors(d).values()])
    assert stats["kept"] == kept == int((p > 0.5).sum())  # every image has a region above 0.5
    assert 0 < kept < 1200
    assert stats["mean_max_prob"] == pytest.approx(float(p.double().mean()), abs=1e-9)
    top_name, top_n = stats["top_concepts"][0]
    targets = torch.cat([t["target"][t["keep"]] for t in shard_tensors(d).values()])
    assert top_n == int(torch.bincount(targets).max()) and top_name == CONCEPTS[int(torch.bincount(targets).argmax())]
    out = flat(r)
    assert "regions per image" in out and "100.0 (min 100, max 100)" in out and top_name in out
    assert f"{kept} of 1200" in out
    assert sorted(p.name for p in (d / "inspect").iterdir()) == ["train_000001.jpg", "train_000002.jpg",
                                                                 "train_000003.jpg"]
    with Image.open(d / "inspect" / "train_000001.jpg") as im:
        assert im.size == (384, 384) and im.format == "JPEG"  # small images are enlarged for legibility


def test_inspect_bad_directory(tmp_path):
    assert_error(run_cli("--inspect", tmp_path / "nope"), None, "pseudo-label directory not found")
    (tmp_path / "d").mkdir()
    assert_error(run_cli("--inspect", tmp_path / "d"), None, "has no index.json")
