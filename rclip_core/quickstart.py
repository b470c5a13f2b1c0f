"""The whole RegionCLIP method on ShapesWorld, as a plan of public ``rclip`` commands, and the
report that compares its models (``rclip quickstart``).

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
import math
import shlex
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rclip_core.errors import InputError, RclipError

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

ABLATION_TITLES = {
    "image-text": "Table 5 in miniature: pretraining pairs",
    "regions": "Table 6 in miniature: regions for pretraining",
    "losses": "Table 7 in miniature: region losses",
    "labels": "The teacher's resolution for the pseudo labels (official code: the student's input)",
}


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
        if self.seeds < 1:
            raise InputError(f"--seeds must be >= 1, got {self.seeds}")
        if self.nproc < 1:
            raise InputError(f"--nproc must be >= 1, got {self.nproc}")
        for name in ("train_images", "val_images", "teacher_steps", "pretrain_steps", "finetune_steps"):
            if getattr(self, name) < 1:
                raise InputError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
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
    d = Path(__file__).resolve().parents[1] / "recipes"
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


# --------------------------------------------------------------------------------------------
# the report


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _zs(path: Path) -> dict[str, float | None]:
    d = _read(path) or {}
    m = d.get("metrics", {})
    acc = m.get("region_acc")
    return {"ap50": m.get("AP50_all", m.get("AP50")), "ap50_novel": m.get("AP50_novel"),
            "ap50_base": m.get("AP50_base"), "acc": None if acc is None else 100.0 * acc,
            "acc_novel": None if m.get("region_acc_novel") is None else 100.0 * m["region_acc_novel"]}


def _ft(path: Path) -> dict[str, float | None]:
    m = (_read(path) or {}).get("metrics", {})
    return {k: m.get(f"AP50_{k}") for k in ("novel", "base", "all")}


def _image_level(path: Path, who: str | None) -> float | None:
    d = _read(path) or {}
    if who:
        d = d.get(who, {})
    top1 = d.get("image_level", {}).get("top1")
    return None if top1 is None else 100.0 * top1


def seed_values(s: QuickstartSettings, seed: int) -> dict[str, float | None]:
    """The report keys of one seed (AP50 and accuracies in percent)."""
    out, sd = s.out, s.out / f"seed{seed}"
    t_gt, st_gt, c_gt = _zs(out / "eval" / "zs_gt_teacher.json"), _zs(sd / "eval" / "zs_gt_student.json"), \
        _zs(sd / "eval" / "zs_gt_control.json")
    t_rpn, st_rpn = _zs(out / "eval" / "zs_rpn_teacher.json"), _zs(sd / "eval" / "zs_rpn_student.json")
    ft_t, ft_s = _ft(sd / "finetune_teacher" / "metrics.json"), _ft(sd / "finetune_student" / "metrics.json")
    v: dict[str, float | None] = {
        "zero_shot_gt_ap50_teacher": t_gt["ap50"], "zero_shot_gt_ap50_student": st_gt["ap50"],
        "zero_shot_gt_ap50_control": c_gt["ap50"],
        "zero_shot_gt_ap50_novel_teacher": t_gt["ap50_novel"], "zero_shot_gt_ap50_novel_student": st_gt["ap50_novel"],
        "zero_shot_gt_ap50_novel_control": c_gt["ap50_novel"],
        "zero_shot_gt_acc_teacher": t_gt["acc"], "zero_shot_gt_acc_student": st_gt["acc"],
        "zero_shot_gt_acc_control": c_gt["acc"],
        "zero_shot_rpn_ap50_teacher": t_rpn["ap50"], "zero_shot_rpn_ap50_student": st_rpn["ap50"],
        "image_level_acc_teacher": _image_level(out / "teacher" / "eval.json", None),
        "image_level_acc_student": _image_level(sd / "student" / "eval.json", "student"),
        "image_level_acc_control": _image_level(sd / "control" / "eval.json", "student"),
    }
    for split in ("novel", "base", "all"):
        v[f"finetune_ap50_{split}_teacher_init"] = ft_t[split]
        v[f"finetune_ap50_{split}_student_init"] = ft_s[split]
    for ab in s.ablations:
        for variant in ABLATIONS[ab]:
            z = _zs(sd / "eval" / f"zs_gt_{variant}.json")
            v[f"ablation_{variant}_gt_ap50"] = z["ap50"]
            v[f"ablation_{variant}_gt_acc"] = z["acc"]
    return v


def pseudo_label_quality(shards_dir: Path, instances: Path, iou: float = 0.5) -> dict[str, float | int] | None:
    """How right the teacher's pseudo labels are where the truth is known: regions whose best
    ground-truth match has IoU >= ``iou`` count as that object; accuracy = label equals the
    object's class name (the concept pool holds the class names). Also the share of regions
    that cover an object at all. None when either input is missing."""
    import torch
    from torchvision.ops import box_iou

    from rclip_core.pseudo_labels import PseudoLabelShards

    gt = _read(instances)
    if gt is None or not (shards_dir / "index.json").is_file():
        return None
    try:
        shards = PseudoLabelShards(shards_dir)
    except RclipError:  # an unreadable directory: no report line rather than no report
        return None
    names = {c["id"]: c["name"] for c in gt.get("categories", [])}
    by_file = {im["file_name"]: im["id"] for im in gt.get("images", [])}
    anns: dict[int, list[tuple[list[float], str]]] = {}
    for a in gt.get("annotations", []):
        x, y, w, h = a["bbox"]
        anns.setdefault(a["image_id"], []).append(([x, y, x + w, y + h], names.get(a["category_id"], "")))
    regions = matched = correct = 0
    for key, e in shards:
        image_id = by_file.get(key) or by_file.get(Path(key).name)
        objs = anns.get(image_id, []) if image_id is not None else []
        n = int(e["boxes"].shape[0])
        regions += n
        if not objs or not n:
            continue
        ious = box_iou(e["boxes"].float(), torch.tensor([b for b, _ in objs], dtype=torch.float32))
        best, which = ious.max(dim=1)
        for r in torch.nonzero(best >= iou).flatten().tolist():
            matched += 1
            correct += int(shards.concepts[int(e["target"][r])] == objs[int(which[r])][1])
    if not regions:
        return None
    return {"regions": regions, "regions_on_objects": matched, "share_on_objects": 100.0 * matched / regions,
            "accuracy_on_objects": 100.0 * correct / matched if matched else float("nan")}


def _diff(v: Mapping[str, float | None], a: str, b: str) -> float | None:
    return None if v.get(a) is None or v.get(b) is None else v[a] - v[b]  # type: ignore[operator]


def _add_effects(v: dict[str, float | None]) -> dict[str, float | None]:
    v["effect_gt_ap50_student_minus_teacher"] = _diff(v, "zero_shot_gt_ap50_student", "zero_shot_gt_ap50_teacher")
    v["effect_gt_ap50_student_minus_control"] = _diff(v, "zero_shot_gt_ap50_student", "zero_shot_gt_ap50_control")
    v["effect_gt_acc_student_minus_teacher"] = _diff(v, "zero_shot_gt_acc_student", "zero_shot_gt_acc_teacher")
    v["effect_gt_acc_student_minus_control"] = _diff(v, "zero_shot_gt_acc_student", "zero_shot_gt_acc_control")
    v["effect_rpn_ap50_student_minus_teacher"] = _diff(v, "zero_shot_rpn_ap50_student", "zero_shot_rpn_ap50_teacher")
    v["effect_finetune_novel_student_minus_teacher"] = _diff(v, "finetune_ap50_novel_student_init",
                                                             "finetune_ap50_novel_teacher_init")
    return v


def aggregate(per_seed: Sequence[Mapping[str, float | None]]) -> dict[str, Any]:
    """One seed: the values; several: ``{"mean": m, "std": s}`` per key (None when missing)."""
    if len(per_seed) == 1:
        return dict(per_seed[0])
    out: dict[str, Any] = {}
    for k in per_seed[0]:
        xs = [p.get(k) for p in per_seed]
        if any(x is None for x in xs):
            out[k] = None
            continue
        out[k] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs)}  # type: ignore[arg-type]
    return out


def _m(x: Any) -> float | None:
    return x["mean"] if isinstance(x, dict) else x


# (key, margin, what it reproduces)
EFFECTS = (
    ("effect_gt_ap50_student_minus_teacher", 5.0,
     "student beats its teacher on zero-shot region recognition with GT boxes by >= 5 AP50 (paper Table 4)"),
    ("effect_gt_ap50_student_minus_control", 0.0,
     "student beats the image-text-only control trained for the same steps (paper Table 5)"),
    ("effect_finetune_novel_student_minus_teacher", 0.0,
     "fine-tuning from the student beats fine-tuning from the teacher on novel classes (paper Table 1)"),
)


def build_report(s: QuickstartSettings, timings: Mapping[str, float], commands: Sequence[str]) -> dict[str, Any]:
    per_seed = [_add_effects(seed_values(s, seed)) for seed in s.seed_list]
    values = aggregate(per_seed)
    effects = []
    for key, margin, text in EFFECTS:
        val = _m(values.get(key))
        effects.append({"key": key, "claim": text, "margin": margin, "value": val,
                        "holds": None if val is None else bool(val >= margin if margin else val > 0)})
    quality = pseudo_label_quality(s.out / "pseudo_labels", s.out / "world" / "instances_train.json")
    return {**values, "pseudo_labels": quality,
            "seeds": s.seed_list, "per_seed": {str(sd): v for sd, v in zip(s.seed_list, per_seed)},
            "effects": effects, "ablations": list(s.ablations), "settings": _settings_dict(s),
            "stage_seconds": dict(timings), "total_seconds": round(sum(timings.values()), 1),
            # what `rclip quickstart` with one seed takes: the shared stages and the first seed's
            "one_seed_seconds": round(sum(t for k, t in timings.items()
                                          if "@" not in k or k.endswith(f"@{s.seed}")), 1),
            "commands": list(commands)}


def _settings_dict(s: QuickstartSettings) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else (list(v) if isinstance(v, tuple) else v))
            for k, v in s.__dict__.items()}


def _fmt(x: Any, digits: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, dict):
        return f"{x['mean']:.{digits}f} ± {x['std']:.{digits}f}"
    if isinstance(x, float) and not math.isfinite(x):
        return "n/a"
    return f"{x:.{digits}f}"


def _diagnosis(r: Mapping[str, Any], acc_t: float | None, acc_c: float | None,
               q: Mapping[str, Any] | None) -> list[str]:
    """What the diagnostics say, in sentences that follow the measured signs."""
    out: list[str] = []
    right = f" (right on {_fmt(q['accuracy_on_objects'])} % of the regions that cover an object)" if q else ""
    if acc_t is not None and acc_t <= 0:
        out.append("The student does not classify ground-truth regions better than its teacher, so its AP50 gain "
                   "is in how its scores rank boxes across images, not in recognising more regions: it cannot "
                   f"learn better region labels than the teacher's pseudo labels{right}.")
    if acc_c is not None and acc_c < 0:
        out.append("The control, trained on the captions alone at the higher resolution, classifies regions "
                   f"better than the student ({_fmt(-acc_c)} points): the region-concept targets hold the "
                   "student near its teacher, which pays only when the teacher is right on regions.")
    if acc_t is not None and acc_t > 0 and acc_c is not None and acc_c > 0:
        out.append(f"The student classifies ground-truth regions better than its teacher ({_fmt(acc_t)} points) "
                   f"and than the control ({_fmt(acc_c)} points): the region-concept targets{right} carry "
                   "region knowledge that the captions alone do not teach at the higher resolution.")
    ft = next((e for e in r.get("effects", []) if e["key"] == "effect_finetune_novel_student_minus_teacher"), None)
    if ft is not None and ft["holds"] is False and acc_t is not None and acc_t <= 0:
        out.append("Fine-tuning retrains the region head on the base classes, so without better recognition of "
                   "novel regions there is nothing for it to keep from the student.")
    return ["", " ".join(out)] if out else []


def render_markdown(report: Mapping[str, Any], curves: Iterable[str] = (), examples: Iterable[str] = ()) -> str:
    r = report
    n = len(r["seeds"])
    seeds = f"{n} seed{'s' if n > 1 else ''} ({', '.join(map(str, r['seeds']))})" + (", mean ± std" if n > 1 else "")
    L = ["# RegionCLIP on ShapesWorld: quickstart report", "",
         f"{seeds}; every number from the stage outputs under this directory. AP50 on the val split "
         "(0-100), accuracy = top-1 region classification of ground-truth boxes (%).", "",
         "## Zero-shot region recognition (paper Table 4)", "",
         "| model | GT boxes AP50 | GT boxes novel AP50 | GT region acc | RPN boxes AP50 | image-level acc |",
         "|---|---|---|---|---|---|"]
    for who, label in (("teacher", "teacher (image-text CLIP, 128 px)"),
                       ("student", "RegionCLIP student (region-text pretraining)"),
                       ("control", "control: image-text loss only, same steps")):
        L.append(f"| {label} | {_fmt(r.get(f'zero_shot_gt_ap50_{who}'))} | "
                 f"{_fmt(r.get(f'zero_shot_gt_ap50_novel_{who}'))} | {_fmt(r.get(f'zero_shot_gt_acc_{who}'))} | "
                 f"{_fmt(r.get(f'zero_shot_rpn_ap50_{who}'))} | {_fmt(r.get(f'image_level_acc_{who}'))} |")
    L += ["", "## Open-vocabulary detection after fine-tuning on base classes (paper Table 1)", "",
          "| initialisation | novel AP50 | base AP50 | all AP50 |", "|---|---|---|---|"]
    for who in ("teacher", "student"):
        L.append(f"| {who} | {_fmt(r.get(f'finetune_ap50_novel_{who}_init'))} | "
                 f"{_fmt(r.get(f'finetune_ap50_base_{who}_init'))} | {_fmt(r.get(f'finetune_ap50_all_{who}_init'))} |")
    q = r.get("pseudo_labels")
    if q:
        L += ["", "## Pseudo labels", "",
              f"{q['regions']} RPN regions labelled by the teacher; {_fmt(q['share_on_objects'])} % of them "
              f"cover an object (IoU >= 0.5 with a training box), and on those the teacher's concept is the "
              f"object's class {_fmt(q['accuracy_on_objects'])} % of the time (the teacher's ceiling for the "
              "student's region-concept targets)."]
    L += ["", "## The paper's effects, measured", "", "| claim | measured | holds |", "|---|---|---|"]
    for e in r["effects"]:
        val = r.get(e["key"])
        holds = "n/a" if e["holds"] is None else ("yes" if e["holds"] else "no")
        L.append(f"| {e['claim']} | {_fmt(val)} | {holds} |")
    acc_t, acc_c = _m(r.get("effect_gt_acc_student_minus_teacher")), _m(r.get("effect_gt_acc_student_minus_control"))
    L += ["", "What lies under them (region recognition, not ranking):", "",
          "| diagnostic | measured |", "|---|---|",
          f"| student - teacher, GT region top-1 (points) | {_fmt(r.get('effect_gt_acc_student_minus_teacher'))} |",
          f"| student - control, GT region top-1 (points) | {_fmt(r.get('effect_gt_acc_student_minus_control'))} |",
          f"| teacher's pseudo labels right on regions that cover an object (%) | "
          f"{_fmt(q['accuracy_on_objects']) if q else 'n/a'} |"]
    L += _diagnosis(r, acc_t, acc_c, q)
    for ab in r.get("ablations", []):
        L += ["", f"## {ABLATION_TITLES[ab]}", "", "| pretraining | GT boxes AP50 | GT region acc |", "|---|---|---|",
              f"| full (eq. 5, RPN-box shards labelled at the teacher's resolution) | "
              f"{_fmt(r.get('zero_shot_gt_ap50_student'))} | {_fmt(r.get('zero_shot_gt_acc_student'))} |"]
        if ab == "regions":  # random / GT-jitter boxes are labelled online on the student's input
            L.append(f"| RPN-box shards labelled at the student's resolution | "
                     f"{_fmt(r.get('ablation_labels_at_student_resolution_gt_ap50'))} | "
                     f"{_fmt(r.get('ablation_labels_at_student_resolution_gt_acc'))} |")
        if ab == "image-text":
            L.append(f"| image-text only (control) | {_fmt(r.get('zero_shot_gt_ap50_control'))} | "
                     f"{_fmt(r.get('zero_shot_gt_acc_control'))} |")
        for variant in ABLATIONS[ab]:
            L.append(f"| {variant.replace('_', ' ')} | {_fmt(r.get(f'ablation_{variant}_gt_ap50'))} | "
                     f"{_fmt(r.get(f'ablation_{variant}_gt_acc'))} |")
    curves, examples = list(curves), list(examples)
    if curves:
        L += ["", "## Training curves", ""] + [f"![{Path(c).stem}]({c})" for c in curves]
    if examples:
        L += ["", "## Example detections (student-initialised detector, val images)", ""] + \
             [f"![{Path(e).stem}]({e})" for e in examples]
    L += ["", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {k} | {v:.0f} |" for k, v in r["stage_seconds"].items()]
    L += [f"| **total** | **{r['total_seconds']:.0f}** |"]
    if n > 1 and r.get("one_seed_seconds") is not None:
        L += [f"| one seed (shared stages and seed {r['seeds'][0]}) | {r['one_seed_seconds']:.0f} |"]
    L += ["", "## Commands", "", "```"] + list(r["commands"]) + ["```", ""]
    return "\n".join(L)


# --------------------------------------------------------------------------------------------
# curves (PIL only: matplotlib is an optional extra)


def read_metrics(path: Path, key: str) -> list[tuple[int, float]]:
    pts = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return pts
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d.get("step"), int) and isinstance(d.get(key), (int, float)) and math.isfinite(d[key]):
            pts.append((d["step"], float(d[key])))
    return pts


def plot_curves(series: Mapping[str, Sequence[tuple[int, float]]], title: str, path: Path,
                size: tuple[int, int] = (640, 360)) -> Path | None:
    """A line chart of ``{label: [(step, value), ...]}`` as a PNG; None when there is no data."""
    from PIL import Image, ImageDraw

    from rclip_core.viz import _font, class_color

    data = {k: v for k, v in series.items() if len(v) >= 2}
    if not data:
        return None
    W, H = size
    left, right, top, bottom = 60, 20, 30, 40
    xs = [p[0] for v in data.values() for p in v]
    ys = [p[1] for v in data.values() for p in v]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font = _font(12)
    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    d.text((left, 8), title, fill=(0, 0, 0), font=font)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (W - left - right), H - bottom - (y - y0) / (y1 - y0) * (H - top - bottom))

    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        d.text((4, px(x0, yv)[1] - 6), f"{yv:.2f}", fill=(0, 0, 0), font=font)
        xv = x0 + frac * (x1 - x0)
        d.text((px(xv, y0)[0] - 10, H - bottom + 6), f"{xv:.0f}", fill=(0, 0, 0), font=font)
    for i, (label, pts) in enumerate(data.items()):
        colour = class_color(i)
        d.line([px(x, y) for x, y in pts], fill=colour, width=2)
        d.text((W - right - 200, top + 6 + 14 * i), label, fill=colour, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
