"""The quickstart report: the numbers of every stage's outputs, per seed and aggregated, the
paper's effects measured on them, the markdown page and the training curves (``rclip quickstart``)."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from rclip_cli.quickstart.plan import ABLATIONS, QuickstartSettings, Stage
from rclip_core.errors import RclipError

ABLATION_TITLES = {
    "image-text": "Table 5 in miniature: pretraining pairs",
    "regions": "Table 6 in miniature: regions for pretraining",
    "losses": "Table 7 in miniature: region losses",
    "labels": "The teacher's resolution for the pseudo labels (official code: the student's input)",
}


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

    from rclip_core.data.shards import PseudoLabelShards

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


# --------------------------------------------------------------------------------------------
# the files


def write_report(s: QuickstartSettings, stages: Sequence[Stage], timings: Mapping[str, float]) -> dict[str, Any]:
    """Draw the training curves into ``OUT/figures/``, pick the example detections and write
    ``OUT/report.json`` and ``OUT/report.md``; returns the report."""
    from rclip_core.fileio import atomic_write_json, atomic_write_text

    figs = s.out / "figures"
    curves = []
    s0 = s.out / f"seed{s.seed}"
    for path, title, series in (
        (figs / "teacher_loss.png", "teacher: image-text loss",
         {"teacher": read_metrics(s.out / "teacher" / "metrics.jsonl", "total")}),
        (figs / "pretrain_loss.png", f"region pretraining (seed {s.seed}): total loss",
         {"student": read_metrics(s0 / "student" / "metrics.jsonl", "total"),
          "control": read_metrics(s0 / "control" / "metrics.jsonl", "total")}),
        (figs / "finetune_loss.png", f"fine-tuning (seed {s.seed}): total loss",
         {"from teacher": read_metrics(s0 / "finetune_teacher" / "metrics.jsonl", "loss"),
          "from student": read_metrics(s0 / "finetune_student" / "metrics.jsonl", "loss")}),
    ):
        if plot_curves(series, title, path):
            curves.append(str(path.relative_to(s.out)))
    examples = [str(img.relative_to(s.out)) for img in sorted((s.out / "detect").glob("*.jpg"))[:s.detect_images]]
    report = build_report(s, timings, [st.command() for st in stages])
    report["figures"] = {"curves": curves, "examples": examples}
    atomic_write_json(s.out / "report.json", report, indent=1)
    atomic_write_text(s.out / "report.md", render_markdown(report, curves, examples))
    return report
