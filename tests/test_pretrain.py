"""rclip pretrain: recipes, both modes, exact resume after kill -9, SIGTERM, torchrun, shards."""

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
from click.testing import CliRunner
from safetensors.torch import load_file

from rclip_cli.main import cli
from rclip_core.config import build_recipe
from rclip_core.config.pretrain import DataConfig, PretrainRecipe, load_pretrain_recipe
from rclip_core.errors import ConfigError, InputError

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A 64-px ShapesWorld: 12 training and 6 validation images (30 classes)."""
    from rclip_core.data.shapes import generate_shapes_world

    out = tmp_path_factory.mktemp("pretrain") / "world"
    generate_shapes_world(out, train=12, val=6, image_size=64, workers=1, seed=0)
    return out


def regionclip_tiny(world: Path, out: Path, **over) -> dict:
    """regionclip mode on test-micro (random teacher), random boxes, 2 images x 2 accumulations."""
    d = {
        "mode": "regionclip", "output_dir": str(out), "seed": 3, "max_steps": 6, "checkpoint_every": 2,
        "model": {"teacher": {"model": "test-micro", "random_init": True}},
        "data": {"root": str(world), "captions": ["captions_train.jsonl"], "short_sides": [64, 96],
                 "max_size": 128, "flip": True, "num_workers": 0},
        "regions": {"source": "random", "per_image": 4},
        "concepts": {"pool": "instances_train.json", "templates": "single"},
        "optim": {"lr": 0.05, "warmup_iters": 2, "steps": [4]},
        "batch": {"images_per_process": 2, "grad_accum": 2},
        "logging": {"log_every": 1, "tensorboard": False},
    }
    for dotted, value in over.items():
        node = d
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return d


def image_text_tiny(world: Path, out: Path) -> dict:
    return {
        "mode": "image_text", "output_dir": str(out), "seed": 1, "max_steps": 3, "checkpoint_every": 0,
        "model": {"architecture": "test-micro"},
        "data": {"root": str(world), "captions": ["captions_train.jsonl"], "flip": False, "num_workers": 0},
        "concepts": {"templates": "single"},
        "optim": {"name": "adamw", "lr": 1e-3, "weight_decay": 0.1, "schedule": "cosine", "warmup_iters": 1,
                  "clip_norm": None},
        "batch": {"images_per_process": 4},
        "logging": {"log_every": 1, "tensorboard": False},
        "eval": {"instances": "instances_val.json", "images": "val"},
    }


def run(d: dict, **kw):
    from rclip_core.engine.pretrain import run_pretraining

    return run_pretraining(build_recipe(d, PretrainRecipe), device="cpu", **kw)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ recipes


def test_paper_recipes_carry_the_paper_values():
    for name, arch, emb in (("regionclip_rn50_cc3m", "RN50-quickgelu", "emb-coco-nouns-4764-emb"),
                            ("regionclip_rn50x4_cc3m", "RN50x4-quickgelu", "emb-coco-nouns-4764-emb-rn50x4"),
                            ("regionclip_rn50_cococap", "RN50-quickgelu", "emb-coco-nouns-4764-emb")):
        r = load_pretrain_recipe(RECIPES / f"{name}.yaml")
        assert r.mode == "regionclip" and r.model.teacher.model == arch and not r.model.student.given
        assert r.max_steps == 600_000 and r.checkpoint_every == 5000 and r.model.freeze_at == 2
        assert (r.batch.global_batch, r.batch.images_per_process) == (96, 3)
        assert r.batch.layout(32)[1] == 1 and r.batch.layout(8)[1] == 4 and r.batch.layout(1)[1] == 32
        o = r.optim
        assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.002, 0.9, 1e-4)
        assert (o.warmup_iters, o.warmup_factor, o.steps, o.gamma, o.clip_norm) == (1000, 0.001, [300_000, 525_000],
                                                                                     0.1, 5.0)
        assert (r.regions.source, r.regions.per_image) == ("rpn", 100)
        assert (r.regions.rpn.post_nms_topk, r.regions.rpn.nms, r.regions.rpn.weights) == (300, 0.5,
                                                                                                   "rpn-lvis-866")
        assert (r.concepts.pool, r.concepts.embeddings, r.concepts.threshold) == ("coco-nouns", emb, 0.1)
        assert r.losses.weights() == {"region_concept_contrastive": 1.0, "concept_distillation": 1.0,
                                      "image_text_contrastive": 1.0}
        assert r.losses.temperature == 0.01 and r.losses.teacher_temperature == 0.01
        assert (r.data.short_sides, r.data.max_size, r.data.interpolation, r.data.flip) == ([800], 1333, "bicubic",
                                                                                            True)
    assert load_pretrain_recipe(RECIPES / "regionclip_rn50_cococap.yaml").data.captions == [
        "annotations/captions_train2017.json"]
    # ablations are overrides, e.g. Table 6 / Table 5
    r = load_pretrain_recipe(RECIPES / "regionclip_rn50_cc3m.yaml",
                             {"regions.source": "random", "losses.image_text_contrastive": "0"})
    assert r.regions.source == "random" and r.losses.weights()["image_text_contrastive"] == 0.0
    with pytest.raises(InputError, match="global_batch 96 is not a multiple"):
        r.batch.layout(5)


def test_shapes_recipes_load():
    t = load_pretrain_recipe(RECIPES / "shapes_teacher.yaml")
    assert t.mode == "image_text" and t.model.architecture == "shapes-tiny" and not t.data.flip
    s = load_pretrain_recipe(RECIPES / "shapes_regionclip.yaml")
    assert s.mode == "regionclip" and s.model.teacher.weights == "runs/shapes_teacher/final.safetensors"
    assert s.concepts.pool == "instances_train.json" and s.regions.source == "random"


@pytest.mark.parametrize("text, key", [
    ("optim:\n  lrr: 0.1\n", "optim.lrr"),
    ("max_steps: many\n", "max_steps"),
    ("regions:\n  source: boxes\n", "regions.source"),
    ("batch:\n  images_per_process: 2.5\n", "batch.images_per_process"),
])
def test_bad_recipe_fails_before_any_work_naming_the_key(tmp_path, world, text, key):
    base = yaml.safe_load(yaml.safe_dump(regionclip_tiny(world, tmp_path / "run")))
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(base) + text)
    res = CliRunner().invoke(cli, ["pretrain", str(p)])
    assert res.exit_code == 2, res.output
    assert repr(key) in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


def test_bad_override_and_missing_inputs_fail_early(tmp_path, world):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(regionclip_tiny(world, tmp_path / "run")))
    res = CliRunner().invoke(cli, ["pretrain", str(p), "optim.lr=fast"])
    assert res.exit_code == 2 and "'optim.lr'" in res.output
    res = CliRunner().invoke(cli, ["pretrain", str(p), "data.max_images=0"])
    assert res.exit_code == 2 and "data.max_images must be >= 1" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(cli, ["pretrain", str(p), "data.captions=[missing.jsonl]"])
    assert res.exit_code == 2 and "data.captions" in res.output and "missing.jsonl" in res.output
    res = CliRunner().invoke(cli, ["pretrain", str(p), "model.teacher.weights=nope.safetensors",
                                   "model.teacher.random_init=false"])
    assert res.exit_code == 2 and "model.teacher.weights" in res.output
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------ the two modes


def test_image_text_mode_trains_a_clip_that_loads_as_a_teacher(tmp_path, world):
    from rclip_core.weights.loaders import load_model

    out = tmp_path / "teacher"
    res = run(image_text_tiny(world, out))
    assert res.steps == 3 and not res.stopped and res.final_weights == out / "final.safetensors"
    lines = metrics(out)
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(m["image_text_contrastive"] > 0 and 0 < m["logit_scale"] <= 100 for m in lines)
    # the learning rate follows the warmup + cosine schedule: 0.001 x factor(0), factor(1) = 1
    assert lines[0]["lr"] == pytest.approx(1e-6) and lines[1]["lr"] == pytest.approx(1e-3)
    assert load_pretrain_recipe(out / "recipe.yaml").mode == "image_text"
    # the saved file is an rclip model with frozen BN and a text tower...
    model = load_model(weights=out / "final.safetensors")
    assert model.has_text and model.arch.name == "test-micro"
    assert type(model.clip.visual.bn1).__name__ == "FrozenBatchNorm2d"
    # ...that embeds images exactly as the trained CLIP does in eval mode (running BN statistics)
    from rclip_core.engine.tasks.image_text import ImageTextTask

    task = ImageTextTask(build_recipe(image_text_tiny(world, out), PretrainRecipe), torch.device("cpu"))
    task.load_trainable_state(load_file(str(out / "checkpoints" / "ckpt_00000003" / "model.safetensors")))
    task.clip.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(task.clip.encode_image(x), model.clip.encode_image(x), atol=1e-5)
    # the zero-shot check ran on the 6 val images (each has >= 1 object), chance 1/30
    ev = res.evaluation
    assert ev["eval_images"] == 6 and ev["image_level"]["images"] == 6
    assert ev["image_level"]["chance"] == pytest.approx(1 / 30)
    assert 0.0 <= ev["image_level"]["top1"] <= 1.0
    assert json.loads((out / "eval.json").read_text())["image_level"]["top1"] == ev["image_level"]["top1"]


def test_regionclip_mode_trains_only_the_unfrozen_student_parts(tmp_path, world):
    from rclip_core.weights.loaders import load_model

    out = tmp_path / "rc"
    res = run(regionclip_tiny(world, out, max_steps=2, checkpoint_every=0))
    assert res.steps == 2
    lines = metrics(out)
    for m in lines:
        for term in ("region_concept_contrastive", "concept_distillation", "image_text_contrastive"):
            assert m[term] == m[term] and m[term] >= -1e-6
        assert m["total"] == pytest.approx(m["region_concept_contrastive"] + m["concept_distillation"]
                                           + m["image_text_contrastive"], rel=1e-5)
        assert 0.0 < m["regions_kept"] <= 1.0
    init = load_model(model="test-micro", random_init=True, seed=3).clip.state_dict()
    final = load_file(str(out / "final.safetensors"))
    same = {k for k in init if torch.equal(init[k], final[k])}
    frozen_prefixes = ("visual.conv", "visual.bn", "visual.layer1.", "transformer.", "token_embedding",
                       "ln_final", "positional_embedding", "text_projection", "logit_scale")
    for k in init:
        if k.startswith(frozen_prefixes) or k == "visual.attnpool.k_proj.bias" or ".bn" in k \
                or k.endswith(("running_mean", "running_var")):
            assert k in same, f"{k} changed although frozen"
    for k in ("visual.layer2.0.conv1.weight", "visual.layer3.0.conv2.weight", "visual.layer4.0.conv3.weight",
              "visual.attnpool.q_proj.weight", "visual.attnpool.c_proj.bias"):
        assert k not in same, f"{k} did not train"


def test_no_region_terms_and_existing_output_dir(tmp_path, world):
    out = tmp_path / "it_only"
    # Table 5's control: image-text loss only; no teacher or concept pool is used
    d = regionclip_tiny(world, out, max_steps=1, checkpoint_every=0, **{
        "losses.region_concept_contrastive": 0, "losses.concept_distillation": 0})
    res = run(d)
    assert set(metrics(out)[0]) >= {"image_text_contrastive", "total"}
    assert "concept_distillation" not in metrics(out)[0]
    assert res.final_weights is not None
    with pytest.raises(InputError, match="already holds a pretraining run"):
        run(d)


def test_to_resized_boxes_with_flip():
    from rclip_core.engine.data import TrainSample
    from rclip_core.engine.tasks.regionclip import _to_resized

    s = TrainSample(0, "k", "k", torch.zeros(3, 50, 100, dtype=torch.uint8), "c", (100, 200), (50, 100), True)
    b = _to_resized([[20.0, 10.0, 60.0, 90.0], [180.0, 0.0, 260.0, 40.0]], s)
    # scale 0.5, then x -> 100 - x (and the second box clipped to the 100 px wide image)
    assert b.tolist() == [[70.0, 5.0, 90.0, 45.0], [0.0, 0.0, 10.0, 20.0]]


# ------------------------------------------------------------------------------------ data order


def test_data_order_resumes_exactly_and_ignores_workers(world):
    from rclip_core.engine.data import PretrainData, ShortSideResize

    tf = ShortSideResize((64, 96), 128, flip=True)
    src = [str(world / "captions_train.jsonl")]

    def keys(d, n):
        return [(s.image_key, s.caption, s.size, s.flipped) for s in d.next_batch(n)]

    a = PretrainData(src, tf, seed=5, num_workers=0)
    first = keys(a, 5)
    state = a.state_dict()
    rest = keys(a, 15)  # crosses into the next epoch (12 images)
    assert a.epoch == 1
    b = PretrainData(src, tf, seed=5, num_workers=0)
    b.load_state_dict(state)
    assert keys(b, 15) == rest
    c = PretrainData(src, tf, seed=5, num_workers=2)
    assert keys(c, 20) == first + rest
    c.close()
    # two processes split each epoch into disjoint halves
    r0 = PretrainData(src, tf, seed=5, rank=0, world_size=2)
    r1 = PretrainData(src, tf, seed=5, rank=1, world_size=2)
    k0, k1 = {x[0] for x in keys(r0, 6)}, {x[0] for x in keys(r1, 6)}
    assert len(k0) == len(k1) == 6 and not k0 & k1
    assert {x[0] for x in first + rest[:7]} == k0 | k1


def test_max_images_trains_on_the_first_images_pseudo_label_labels(tmp_path, world):
    """data.max_images keeps the first N images of the caption file, the same N images (and
    keys) that ``rclip pseudo-label --max-images N`` labels, so a run over shards of a subset
    finds every label; tar shards refuse it."""
    from rclip_core.engine.data import PretrainData, ShortSideResize
    from rclip_core.pseudo_label import collect_label_images

    tf = ShortSideResize((64,), 128, flip=False)
    src = [str(world / "captions_train.jsonl")]
    full = PretrainData(src, tf, seed=3)
    sub = PretrainData(src, tf, seed=3, max_images=5)
    assert full.num_images == 12 and sub.num_images == 5
    labelled = collect_label_images(world / "captions_train.jsonl", max_images=5)
    assert [e.image_key for e in sub.entries] == [it.key for it in labelled.items] == \
        [e.image_key for e in full.entries[:5]]
    seen = [s.image_key for s in sub.next_batch(10)]  # two epochs over the five
    assert sorted(seen[:5]) == sorted(seen[5:]) == sorted(e.image_key for e in sub.entries)
    with pytest.raises(ValueError, match="max_images"):
        DataConfig(max_images=0)


def caption_shards(world: Path, out: Path) -> tuple[list[str], dict[str, str]]:
    """The world's first caption per image as two webdataset tars (6 images, then the rest):
    (shard paths, {image: caption})."""
    import io
    import tarfile

    recs = {}
    for line in (world / "captions_train.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs.setdefault(r["image"], r["caption"])
    shards = []
    for s, chunk in enumerate((sorted(recs)[:6], sorted(recs)[6:])):
        p = out / f"{s:05d}.tar"
        with tarfile.open(p, "w") as tar:
            for image in chunk:
                for name, data in ((Path(image).stem + ".jpg", (world / image).read_bytes()),
                                   (Path(image).stem + ".txt", recs[image].encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(str(p))
    return shards, recs


def test_tar_shards_stream_and_resume(tmp_path, world):
    from rclip_core.engine.data import PretrainData, ShortSideResize

    shards, recs = caption_shards(world, tmp_path)
    tf = ShortSideResize((64,), 128, flip=True)
    a = PretrainData(shards, tf, seed=2)
    first = a.next_batch(4)
    assert all(s.caption == recs[f"train/{s.key}.jpg"] and s.image.shape[-2:] == (64, 64) for s in first)
    state = a.state_dict()
    rest = [s.key for s in a.next_batch(10)]  # 8 left in epoch 0, then 2 of epoch 1
    assert sorted({s.key for s in first} | set(rest[:8])) == sorted(Path(i).stem for i in recs)
    b = PretrainData(shards, tf, seed=2)
    b.load_state_dict(state)
    assert [s.key for s in b.next_batch(10)] == rest


# ------------------------------------------------------------------------------------ resume, signals


def test_kill_9_then_resume_ends_bit_identical(tmp_path, world):
    """A run killed with SIGKILL after step 5 (checkpoints at 2 and 4) and resumed with --resume
    ends with exactly the weights of an uninterrupted run."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(regionclip_tiny(world, tmp_path / "killed")))
    env = dict(os.environ, RCLIP_TEST_SLEEP_AFTER_STEP="5", OMP_NUM_THREADS=str(torch.get_num_threads()),
               RCLIP_CACHE=str(tmp_path / "cache"))
    proc = subprocess.Popen([sys.executable, "-m", "rclip_cli", "pretrain", str(recipe), "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    killed = tmp_path / "killed"
    try:
        deadline = time.time() + 300
        while time.time() < deadline:
            if (killed / "metrics.jsonl").exists() and any(
                    m["step"] == 5 for m in metrics(killed)):
                break
            assert proc.poll() is None, proc.stdout.read().decode()
            time.sleep(0.2)
        else:
            raise AssertionError("the run did not reach step 5")
        proc.kill()  # SIGKILL: no handler runs
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert sorted(p.name for p in (killed / "checkpoints").glob("ckpt_*")) == ["ckpt_00000002", "ckpt_00000004"]
    assert not (killed / "final.safetensors").exists()

    resumed = run(regionclip_tiny(world, killed), resume=True)
    assert resumed.resumed_from == 4 and resumed.steps == 6
    assert [m["step"] for m in metrics(killed)] == [1, 2, 3, 4, 5, 6]  # step 5 redone, logged once
    straight = run(regionclip_tiny(world, tmp_path / "straight"))
    a, b = load_file(str(killed / "final.safetensors")), load_file(str(tmp_path / "straight" / "final.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [m["total"] for m in metrics(killed)] == [m["total"] for m in metrics(tmp_path / "straight")]


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path, world):
    out = tmp_path / "term"

    def progress(report):
        if report.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    res = run(regionclip_tiny(world, out, checkpoint_every=0), progress=progress)
    assert res.stopped and res.steps == 3 and res.final_weights is None
    assert [p.name for p in (out / "checkpoints").glob("ckpt_*")] == ["ckpt_00000003"]
    assert json.loads((out / "stopped.json").read_text())["step"] == 3
    res = run(regionclip_tiny(world, out, checkpoint_every=0), resume=True)
    assert not res.stopped and res.resumed_from == 3 and res.steps == 6
    assert (out / "final.safetensors").exists() and not (out / "stopped.json").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is uninstalled again


def test_nproc_2_launches_torchrun(tmp_path, world):
    out = tmp_path / "ddp"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(regionclip_tiny(world, out, max_steps=2, checkpoint_every=0,
                                                     **{"batch.grad_accum": 1})))
    env = dict(os.environ, OMP_NUM_THREADS="1", RCLIP_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "rclip_cli", "pretrain", str(recipe), "--nproc", "2",
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on 2 process(es)" in proc.stdout
    from rclip_core.engine.checkpoint import load_latest

    ck = load_latest(out / "checkpoints")
    assert ck.step == 2 and ck.extra["world_size"] == 2
    # each process read its own half of the epoch: 2 steps x 2 images each
    assert [r["data"]["position"] for r in ck.extra["ranks"]] == [4, 4]
    assert (out / "final.safetensors").exists() and len(metrics(out)) == 2


def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, world):
    """Image-text loss only: 2 processes x 2 images (gathered, DDP-averaged) train the same
    weights as 1 process x 4 images - each step the two processes read the same 4 images."""
    over = {"losses.region_concept_contrastive": 0, "losses.concept_distillation": 0, "batch.grad_accum": 1,
            "max_steps": 2, "checkpoint_every": 0}
    recipe = tmp_path / "it.yaml"
    recipe.write_text(yaml.safe_dump(regionclip_tiny(world, tmp_path / "two", **over)))
    env = dict(os.environ, OMP_NUM_THREADS="1", RCLIP_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "rclip_cli", "pretrain", str(recipe), "--nproc", "2",
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run(regionclip_tiny(world, tmp_path / "one", **{**over, "batch.images_per_process": 4}))
    from rclip_core.weights.loaders import load_model

    a = load_file(str(tmp_path / "two" / "final.safetensors"))
    b = load_file(str(tmp_path / "one" / "final.safetensors"))
    init = load_model(model="test-micro", random_init=True, seed=3).clip.state_dict()
    trained = [k for k in a if not torch.equal(a[k], init[k])]
    assert "visual.layer4.0.conv2.weight" in trained and "visual.attnpool.c_proj.weight" in trained
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a), \
        [k for k in a if not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6)]
    assert metrics(tmp_path / "two")[-1]["total"] == pytest.approx(metrics(tmp_path / "one")[-1]["total"],
                                                                   rel=1e-5)


# ------------------------------------------------------------------------------------ shards


def _label_shards(world: Path, out: Path, topk: int) -> None:
    from rclip_core.weights.loaders import load_model
    from rclip_core.models.text import class_embeddings, get_tokenizer
    from rclip_core.pseudo_label import LabelSettings, PseudoLabeler, collect_label_images

    teacher = load_model(model="test-micro", random_init=True, seed=3)
    names = [c["name"] for c in json.loads((world / "instances_train.json").read_text())["categories"]]
    emb = class_embeddings(teacher.clip, get_tokenizer(16), names, templates="single")
    images = collect_label_images(world / "captions_train.jsonl")
    settings = LabelSettings(proposals="random", regions_per_image=6, topk=topk, short_side=64, max_size=128,
                             workers=1)
    labeler = PseudoLabeler(teacher, names, emb, images, out, settings, concept_pool_sha256="test")
    labeler.run(labeler.prepare())


def test_regions_from_pseudo_label_shards(tmp_path, world):
    shards = tmp_path / "labels"
    _label_shards(world, shards, topk=5)
    out = tmp_path / "from_shards"
    d = regionclip_tiny(world, out, max_steps=2, checkpoint_every=0,
                        **{"regions.source": "shards", "regions.shards": str(shards)})
    d["concepts"] = {"templates": "single"}  # the pool comes from the shards
    del d["model"]["teacher"]
    d["model"]["student"] = {"model": "test-micro", "random_init": True}
    res = run(d)
    m = metrics(out)[-1]
    assert res.steps == 2 and m["concept_distillation"] >= 0 and m["region_concept_contrastive"] >= 0

    no_topk = tmp_path / "labels0"
    _label_shards(world, no_topk, topk=0)
    d2 = dict(d, output_dir=str(tmp_path / "x"))
    d2["regions"] = dict(d["regions"], shards=str(no_topk))
    with pytest.raises(InputError, match="top-k"):
        run(d2)
    d2["losses"] = {"concept_distillation": 0}
    assert run(d2).steps == 2


def test_recipe_cross_checks():
    with pytest.raises(ConfigError, match="model.architecture"):
        build_recipe({"mode": "image_text", "data": {"captions": ["a.jsonl"]}}, PretrainRecipe)
    with pytest.raises(ConfigError, match="regions.gt_boxes"):
        build_recipe({"data": {"captions": ["a.jsonl"]}, "model": {"teacher": {"model": "RN50-quickgelu"}},
                      "concepts": {"pool": "coco-nouns"}, "regions": {"source": "gt_jitter"}}, PretrainRecipe)
    with pytest.raises(ConfigError, match="every loss term"):
        build_recipe({"data": {"captions": ["a.jsonl"]}, "model": {"teacher": {"model": "RN50-quickgelu"}},
                      "losses": {"region_concept_contrastive": 0, "concept_distillation": 0,
                                 "image_text_contrastive": 0}}, PretrainRecipe)


def test_renamed_key_is_accepted_with_a_warning(world, tmp_path):
    """``regions.rpn.nms_thresh`` (rclip 0.1) is ``regions.rpn.nms`` now: one name for the NMS
    threshold on the command line, in YAML and in Python; the old one still loads, with a warning."""
    warnings: list[str] = []
    d = regionclip_tiny(world, tmp_path / "x")
    d["regions"]["rpn"] = {"nms_thresh": 0.6}
    r = build_recipe(d, PretrainRecipe, {"regions.rpn.post_nms_topk": "50"}, warnings=warnings)
    assert r.regions.rpn.nms == 0.6 and r.regions.rpn.post_nms_topk == 50
    assert warnings == ["recipe key 'regions.rpn.nms_thresh' is now 'regions.rpn.nms' (the old name goes in the "
                        "next release)"]
    r = build_recipe(regionclip_tiny(world, tmp_path / "x"), PretrainRecipe, {"regions.rpn.nms_thresh": "0.4"})
    assert r.regions.rpn.nms == 0.4
