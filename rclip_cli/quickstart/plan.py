"""The whole RegionCLIP method on ShapesWorld as a plan of public ``rclip`` commands (``rclip quickstart``;
the report that compares its models is :mod:`rclip_cli.quickstart.report`).

Stages (each one public command, written to ``OUT/stages/<name>.json`` when it succeeds, so
that a rerun skips it):

======================  ==================================================================
``world``               ``rclip data shapes``: the synthetic world (train/val, captions, split)
``teacher``             ``rclip pretrain`` (image_text): a tiny CLIP trained on the captions
                        at the world's 128 px
``concepts``            ``rclip concepts --attributes colour``: the concept pool from captions
``ft_teacher@seed``     ``rclip finetune`` on the base classes from the teacher; its RPN,
                        trained on base-class boxes only, is the world's proposal network (the
                        paper's LVIS-866 RPN is trained on LVIS base classes)
``pseudo_labels``       ``rclip pseudo-label``: the teacher's concept for RPN regions (NMS 0.5,
                        300, sampled) of the training images a pretraining run reads (steps x
                        images per step: one epoch), at the teacher's own 128 px (the student
                        trains at 2x; ``--ablation labels``: labelled at 2x, as the official
                        code labels the student's input)
``zs_gt_teacher``       ``rclip eval --zero-shot --boxes gt`` of the teacher
``zs_rpn_teacher``      ... with the world's RPN boxes
per seed ``s``:
``student``             ``rclip pretrain`` (regionclip, ``--nproc``): region-text pretraining
                        from the shards (eq. 5: contrastive + distillation + image-text)
``control``             the same steps and images with the image-text loss alone
``ft_teacher``          ``rclip finetune`` on the base classes from the teacher (other seeds)
``ft_student``          ... and from the student; novel/base/all AP50
``zs_gt_*``             zero-shot with ground-truth boxes: student, control
``zs_rpn_student``      zero-shot with the world's RPN boxes
ablations (``--ablation``): extra pretraining runs + ``zs_gt`` (paper Tables 5-7)
``detect``              ``rclip detect`` with the student-initialised detector on val images
======================  ==================================================================

The teacher and the world are made once (``--seed``); ``--seeds K`` repeats every per-seed
stage with seeds ``seed .. seed+K-1`` and reports mean and standard deviation (sample std,
``ddof=1``).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from rclip_core.errors import InputError

#: Prompt templates in the style of ShapesWorld captions (the teacher never saw "a photo of a
#: {}." with a full stop; the shipped recipes use the same four).
SHAPES_TEMPLATES = ("a {}", "a photo of a {}", "an image of a {}", "a picture of a {}")

#: Placeholder in :data:`ABLATIONS` for the shards labelled at the student's resolution.
STUDENT_RES_LABELS = "pseudo_labels_student_res"

ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    # paper Table 5: which pretraining pairs (region-text from pseudo labels / image-text)
    "image-text": {
        "region_text_only": {"losses.image_text_contrastive": 0.0},
    },
    # paper Table 6: region proposals for pretraining: the RPN (default, from the shards) against
    # random boxes and, as an upper bound, jittered ground-truth boxes (teacher labels online)
    "regions": {
        "random_boxes": {"regions.source": "random"},
        "gt_jitter_boxes": {"regions.source": "gt_jitter"},
    },
    # paper Table 7: the two region losses
    "losses": {
        "contrastive_only": {"losses.concept_distillation": 0.0},
        "distillation_only": {"losses.region_concept_contrastive": 0.0},
    },
    # where the teacher sees the regions it labels: the official code runs it on the student's
    # input (2x its training resolution here); the quickstart's default is its own resolution
    "labels": {
        "labels_at_student_resolution": {"regions.shards": STUDENT_RES_LABELS},
    },
}

#: the largest seed every stage takes (ShapesWorld and the recipes: 0 .. 2**31 - 1; each torchrun
#: process adds its rank)
MAX_SEED = 2 ** 31 - 1


@dataclass(frozen=True)
class QuickstartSettings:
    """Sizes of one quickstart run (defaults: one seed in about 15 minutes on 2 CPU cores)."""

    out: Path
    seed: int = 0
    seeds: int = 1
    nproc: int = 2
    train_images: int = 8000
    val_images: int = 1000
    teacher_steps: int = 400
    pretrain_steps: int = 200
    pretrain_batch: int = 8  # images per process and step (shapes_regionclip.yaml)
    finetune_steps: int = 240
    region_short_side: int = 256  # 2x the teacher's 128 px (the paper: CLIP 224 -> detection 800)
    # the teacher labels regions at its own training resolution (the official code: on the
    # student's input, region_short_side; --ablation labels runs that too)
    label_short_side: int = 128
    test_proposals: int = 100  # RPN proposals at test (zero-shot RPN boxes, fine-tuned detectors)
    regions_per_image: int = 32
    min_freq_share: float = 0.025  # concept pool: mentioned in at least this share of captions
    detect_images: int = 4
    ablations: tuple[str, ...] = ()
    device: str = "auto"

    def validate(self) -> "QuickstartSettings":
        """Every argument checked before any stage runs or any file is written."""
        if not 0 <= self.seed <= MAX_SEED - self.seeds - self.nproc:
            raise InputError(f"--seed must be in 0..{MAX_SEED - self.seeds - self.nproc}, got {self.seed}")
        if self.seeds < 1:
            raise InputError(f"--seeds must be >= 1, got {self.seeds}")
        if self.nproc < 1:
            raise InputError(f"--nproc must be >= 1, got {self.nproc}")
        for name in ("train_images", "val_images", "teacher_steps", "pretrain_steps", "finetune_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if str(self.device).lower() != "auto":
            from rclip_core.device import resolve_device

            resolve_device(self.device)  # an unknown or absent device, before the first stage
        if self.out.exists() and not self.out.is_dir():
            raise InputError(f"--out {self.out} exists and is not a directory")
        bad = [a for a in self.ablations if a not in ABLATIONS]
        if bad:
            raise InputError(f"unknown ablation {bad[0]!r}", f"choose from: {', '.join(ABLATIONS)}")
        if "regions" in self.ablations and "labels" not in self.ablations:
            # random / GT-jitter boxes are labelled online on the student's input: their
            # reference is the RPN-box run labelled there too
            return replace(self, ablations=(*self.ablations, "labels"))
        return self

    @property
    def pretrain_images(self) -> int:
        """The training images one pretraining run reads: steps x images per step (one epoch).
        Only these are pseudo-labelled, as the official code labels each batch it trains on."""
        return min(self.train_images, self.pretrain_steps * self.pretrain_batch * self.nproc)

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + i for i in range(self.seeds)]


@dataclass
class Stage:
    """One public command. ``argv`` starts after ``rclip``; ``outputs`` must exist afterwards."""

    name: str
    argv: list[str]
    outputs: list[Path]
    seed: int | None = None
    #: the stage's own output directory: kept to resume an unfinished run, cleared when an earlier
    #: stage ran again (its inputs changed)
    workdir: Path | None = None

    def command(self) -> str:
        return "rclip " + " ".join(shlex.quote(a) for a in self.argv)

    def marker(self, out: Path) -> Path:
        return out / "stages" / f"{self.name}.json"

    def inputs(self) -> dict[str, str]:
        """SHA-256 of the recipe and template files (``OUT/recipes/``) the command reads: a new
        rclip version that ships changed recipes makes the stage run again."""
        from rclip_core.fileio import sha256_file

        files = sorted({a for a in self.argv if Path(a).parent.name == "recipes" and Path(a).is_file()})
        return {f: sha256_file(f) for f in files}

    def recorded(self, out: Path) -> dict[str, Any] | None:
        """The marker of an earlier successful run (None when there is none or it is unreadable)."""
        return _read_marker(self.marker(out))

    def started_marker(self, out: Path) -> Path:
        return out / "stages" / f"{self.name}.started.json"

    def mark_started(self, out: Path) -> None:
        """Record the command before it runs: an interrupted stage resumes only the same command."""
        from rclip_core.fileio import atomic_write_json

        atomic_write_json(self.started_marker(out), {"command": self.command(), "inputs": self.inputs()})

    def changed(self, out: Path) -> bool:
        """It ran before (finished or not) as another command, or a recipe or template file it
        reads is no longer the same: its old outputs cannot be resumed."""
        recs = [r for r in (self.recorded(out), _read_marker(self.started_marker(out))) if r is not None]
        if not recs:
            return False
        command, inputs = self.command(), self.inputs()
        return any(r.get("command") != command or r.get("inputs", {}) != inputs for r in recs)

    def done(self, out: Path) -> bool:
        rec = self.recorded(out)
        if rec is None or not all(p.exists() for p in self.outputs):
            return False
        return rec.get("command") == self.command() and rec.get("inputs", {}) == self.inputs()


def _read_marker(path: Path) -> dict[str, Any] | None:
    """A stage marker's record (None when there is none or it is unreadable)."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def dependencies(stages: Sequence[Stage]) -> dict[str, set[str]]:
    """For each stage, the earlier stages whose outputs (files or output directory) its command
    names: when one of them runs again, so must it."""
    deps: dict[str, set[str]] = {}
    made: list[tuple[str, list[str]]] = []
    for st in stages:
        deps[st.name] = {name for name, paths in made
                         if any(p in arg for arg in st.argv for p in paths)}
        made.append((st.name, [str(p) for p in [*st.outputs, *([st.workdir] if st.workdir else [])]]))
    return deps


def recipes_dir() -> Path:
    """The repository's ``recipes/`` (the quickstart runs from a source checkout: the README's
    ``pip install -e .``)."""
    d = Path(__file__).resolve().parents[2] / "recipes"
    if not (d / "shapes_teacher.yaml").is_file():
        raise InputError(f"the ShapesWorld recipes are not at {d}",
                         "run the quickstart from a source checkout installed with pip install -e .")
    return d


def _kv(overrides: Mapping[str, Any]) -> list[str]:
    out = []
    for k, v in overrides.items():
        if v is None:
            v = "null"
        elif isinstance(v, bool):
            v = str(v).lower()
        out.append(f"{k}={v}")
    return out


def plan(s: QuickstartSettings) -> list[Stage]:
    """Every stage of a quickstart run, in execution order."""
    out = s.out
    world, rec = out / "world", out / "recipes"
    teacher_w = out / "teacher" / "final.safetensors"
    templates = rec / "templates.txt"
    concepts = out / "concepts.txt"
    labels = out / "pseudo_labels"
    # the proposal network of the world: the RPN trained (on base-class boxes only) inside the
    # detector fine-tuned from the teacher, as the paper's RPN is trained on LVIS base classes
    rpn_w = out / f"seed{s.seed}" / "finetune_teacher" / "detector.safetensors"
    n_captions = s.train_images * 2  # captions_per_image of the default world
    min_freq = max(2, int(round(s.min_freq_share * n_captions)))
    eval_common = ["--dataset", f"shapes:{world}", "--short-side", str(s.region_short_side),
                   "--max-size", str(2 * s.region_short_side), "--templates", str(templates),
                   "--average", "normalized", "--workers", "0", "--batch-size", "16", "--device", s.device]
    # zero-shot RPN boxes: the same proposals (the world's RPN) for every model and seed, 100 of
    # them: scenes of 1-4 objects (recall at IoU 0.5: 0.95 at 100, 0.975 at 300). The official
    # zero-shot 1000 and 300 give the teacher the same AP50 here (3.71 at 100 and 300), 45 % slower.
    rpn_eval = ["--rpn-weights", str(rpn_w), "--rpn-topk", str(s.test_proposals)]
    stages = [
        Stage("world", ["data", "shapes", str(world), "--train", str(s.train_images), "--val", str(s.val_images),
                        "--seed", str(s.seed)], [world / "world.json"], workdir=world),
        Stage("teacher", ["pretrain", str(rec / "shapes_teacher.yaml"), f"data.root={world}",
                          f"output_dir={out / 'teacher'}", f"seed={s.seed}", f"max_steps={s.teacher_steps}",
                          f"checkpoint_every={s.teacher_steps}", f"eval.short_side={s.region_short_side}",
                          "--resume", "--device", s.device], [teacher_w, out / "teacher" / "eval.json"],
              workdir=out / "teacher"),
        Stage("concepts", ["concepts", str(world / "captions_train.jsonl"), "--attributes", "colour",
                           "--min-freq", str(min_freq), "--processes", "2", "--out", str(concepts)], [concepts]),
        finetune_stage(s, s.seed, "teacher", teacher_w),
        pseudo_label_stage(s, "pseudo_labels", labels, s.label_short_side, teacher_w, concepts, templates, rpn_w),
        Stage("zs_gt_teacher", ["eval", "--zero-shot", "--boxes", "gt", "--weights", str(teacher_w), *eval_common,
                                "--json", str(out / "eval" / "zs_gt_teacher.json")],
              [out / "eval" / "zs_gt_teacher.json"]),
        Stage("zs_rpn_teacher", ["eval", "--zero-shot", "--boxes", "rpn", "--weights", str(teacher_w), *rpn_eval,
                                 *eval_common,
                                 "--json", str(out / "eval" / "zs_rpn_teacher.json")],
              [out / "eval" / "zs_rpn_teacher.json"]),
    ]
    if "labels" in s.ablations:
        stages.append(pseudo_label_stage(s, "pseudo_labels_student_res", out / STUDENT_RES_LABELS,
                                         s.region_short_side, teacher_w, concepts, templates, rpn_w))
    for seed in s.seed_list:
        sd = out / f"seed{seed}"
        student_base = {"data.root": world, "model.teacher.weights": teacher_w, "seed": seed,
                        "concepts.pool": concepts,
                        "max_steps": s.pretrain_steps, "checkpoint_every": s.pretrain_steps,
                        "optim.steps": f"[{int(s.pretrain_steps * 0.75)}]",
                        "regions.per_image": s.regions_per_image,
                        "batch.images_per_process": s.pretrain_batch, "data.max_images": s.pretrain_images,
                        "data.short_sides": f"[{s.region_short_side}]", "data.max_size": 2 * s.region_short_side,
                        "eval.short_side": s.region_short_side}
        runs: dict[str, dict[str, Any]] = {
            "student": {"regions.source": "shards", "regions.shards": labels},
            "control": {"regions.source": "random", "losses.region_concept_contrastive": 0.0,
                        "losses.concept_distillation": 0.0},
        }
        for ab in s.ablations:
            for variant, ov in ABLATIONS[ab].items():
                ov = {k: (out / v if v == STUDENT_RES_LABELS else v) for k, v in ov.items()}
                runs[variant] = {"regions.source": "shards", "regions.shards": labels, **ov}
        for name, ov in runs.items():
            od = sd / name
            merged = {**student_base, **ov, "output_dir": od}
            if merged.get("regions.source") != "shards":
                merged.pop("regions.shards", None)
            stages.append(Stage(f"{name}@{seed}", ["pretrain", str(rec / "shapes_regionclip.yaml"), *_kv(merged),
                                                   "--nproc", str(s.nproc), "--resume", "--device", s.device],
                                [od / "final.safetensors", od / "eval.json"], seed, workdir=od))
        if seed != s.seed:
            stages.append(finetune_stage(s, seed, "teacher", teacher_w))
        stages.append(finetune_stage(s, seed, "student", sd / "student" / "final.safetensors"))
        for name in ("student", "control", *[v for ab in s.ablations for v in ABLATIONS[ab]]):
            j = sd / "eval" / f"zs_gt_{name}.json"
            stages.append(Stage(f"zs_gt_{name}@{seed}", ["eval", "--zero-shot", "--boxes", "gt", "--weights",
                                                         str(sd / name / "final.safetensors"), *eval_common,
                                                         "--json", str(j)], [j], seed))
        j = sd / "eval" / "zs_rpn_student.json"
        stages.append(Stage(f"zs_rpn_student@{seed}", ["eval", "--zero-shot", "--boxes", "rpn", "--weights",
                                                        str(sd / "student" / "final.safetensors"), *rpn_eval,
                                                        *eval_common, "--json", str(j)], [j], seed))
    val = sorted((world / "val").glob("*.jpg"))[: s.detect_images] if (world / "val").is_dir() else []
    val = val or [world / "val" / f"{i:06d}.jpg" for i in range(1, s.detect_images + 1)]
    stages.append(Stage("detect", ["detect", *map(str, val), "--weights",
                                   str(out / f"seed{s.seed}" / "finetune_student" / "detector.safetensors"),
                                   "--short-side", str(s.region_short_side), "--max-size",
                                   str(2 * s.region_short_side), "--score-thresh", "0.3", "--out",
                                   str(out / "detect"), "--device", s.device],
                        [out / "detect" / "predictions.json"], workdir=out / "detect"))
    return stages


def pseudo_label_stage(s: QuickstartSettings, name: str, labels: Path, short_side: int, teacher_w: Path,
                       concepts: Path, templates: Path, rpn_w: Path) -> Stage:
    """``rclip pseudo-label``: the teacher's concepts for RPN regions of the images one
    pretraining run reads, with the image resized to ``short_side`` (RPN and teacher)."""
    return Stage(name, ["pseudo-label", str(s.out / "world" / "captions_train.jsonl"), "--teacher", str(teacher_w),
                        "--concepts", str(concepts), "--templates", str(templates), "--average",
                        "normalized", "--topk", "100", "--proposals", "rpn", "--rpn-weights", str(rpn_w),
                        "--regions-per-image", str(s.regions_per_image), "--short-side",
                        str(short_side), "--max-size", str(2 * short_side),
                        "--seed", str(s.seed), "--max-images", str(s.pretrain_images),
                        "--out", str(labels), "--device", s.device],
                 [labels / "index.json"], workdir=labels)


def finetune_stage(s: QuickstartSettings, seed: int, init: str, weights: Path) -> Stage:
    """``rclip finetune`` of the ShapesWorld recipe on the base classes, scaled to ``finetune_steps``."""
    od = s.out / f"seed{seed}" / f"finetune_{init}"
    n = s.finetune_steps
    return Stage(f"ft_{init}@{seed}", [
        "finetune", str(s.out / "recipes" / "shapes_finetune.yaml"), "--dataset", str(s.out / "world"),
        "--init", str(weights), "--out", str(od), f"seed={seed}", f"max_steps={n}", f"checkpoint_every={n}",
        f"test.eval_every={n}", f"optim.warmup_iters={max(1, n // 6)}",
        f"optim.steps=[{int(n * 2 / 3)},{int(n * 0.87)}]", f"detector.rpn.post_nms_topk_test={s.test_proposals}",
        "--resume", "--device", s.device],
        [od / "detector.safetensors", od / "metrics.json"], seed, workdir=od)


def write_recipes(s: QuickstartSettings) -> None:
    """Copy the ShapesWorld recipes and the prompt templates into ``OUT/recipes`` so that the
    printed commands stay valid and the run is self-contained."""
    src = recipes_dir()
    dst = s.out / "recipes"
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("shapes_teacher.yaml", "shapes_regionclip.yaml", "shapes_finetune.yaml"):
        text = (src / name).read_text(encoding="utf-8")
        if not (dst / name).is_file() or (dst / name).read_text(encoding="utf-8") != text:
            (dst / name).write_text(text, encoding="utf-8")
    t = "\n".join(SHAPES_TEMPLATES) + "\n"
    if not (dst / "templates.txt").is_file() or (dst / "templates.txt").read_text() != t:
        (dst / "templates.txt").write_text(t, encoding="utf-8")
