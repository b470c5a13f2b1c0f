"""`rclip quickstart`: the plan of public commands, the report arithmetic, and one tiny run of
every stage end to end (each stage a real subprocess), then a rerun that skips them all."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from rclip_cli.main import cli
from rclip_cli.quickstart import plan as P
from rclip_cli.quickstart import report as R
from rclip_core.errors import InputError


def test_plan_names_every_stage_once_per_seed(tmp_path):
    s = P.QuickstartSettings(out=tmp_path, seed=5, seeds=2, ablations=("losses",)).validate()
    names = [st.name for st in P.plan(s)]
    # the first seed's teacher-initialised detector carries the RPN that proposes the regions
    assert names[:7] == ["world", "teacher", "concepts", "ft_teacher@5", "pseudo_labels", "zs_gt_teacher",
                         "zs_rpn_teacher"]
    assert names[-1] == "detect"
    for seed in (5, 6):
        for n in ("student", "control", "contrastive_only", "distillation_only", "ft_teacher", "ft_student",
                  "zs_gt_student", "zs_gt_control", "zs_gt_contrastive_only", "zs_rpn_student"):
            assert names.count(f"{n}@{seed}") == 1
    assert len(names) == len(set(names)) == 7 + 10 + 11 + 1  # shared, seed 5, seed 6 (+ ft_teacher), detect
    cmds = {st.name: st.command() for st in P.plan(s)}
    # the world and the teacher use --seed; pretraining seeds differ; the control has no region loss
    assert "--seed 5" in cmds["world"] and "seed=5" in cmds["teacher"]
    assert "seed=6" in cmds["student@6"] and "regions.source=shards" in cmds["student@6"]
    assert f"--proposals rpn --rpn-weights {tmp_path}/seed5/finetune_teacher/detector.safetensors" \
        in cmds["pseudo_labels"]
    assert "losses.region_concept_contrastive=0.0" in cmds["control@5"]
    # only the images one pretraining run reads are labelled (200 steps x 8 images x 2 processes),
    # and every pretraining run, the control's included, trains on exactly those
    assert s.pretrain_images == 3200 and "--max-images 3200" in cmds["pseudo_labels"]
    for name in ("student@5", "control@6", "contrastive_only@6"):
        assert "data.max_images=3200" in cmds[name] and "batch.images_per_process=8" in cmds[name]
    small = P.QuickstartSettings(out=tmp_path, train_images=1000, nproc=1).validate()
    assert small.pretrain_images == 1000  # never more than the world has
    # the teacher labels at its own 128 px; --ablation labels adds the official setting (labels on
    # the student's 256-px input), which --ablation regions brings along as its reference
    assert "--short-side 128 --max-size 256" in cmds["pseudo_labels"]
    # 100 RPN proposals at test, for the zero-shot RPN evaluation and the fine-tuned detectors
    assert "--rpn-topk 100" in cmds["zs_rpn_student@6"] and "--rpn-topk 100" in cmds["zs_rpn_teacher"]
    assert "detector.rpn.post_nms_topk_test=100" in cmds["ft_student@5"]
    assert "pseudo_labels_student_res" not in cmds
    r = P.QuickstartSettings(out=tmp_path, ablations=("regions",)).validate()
    assert r.ablations == ("regions", "labels")
    rc = {st.name: st.command() for st in P.plan(r)}
    assert "--short-side 256 --max-size 512" in rc["pseudo_labels_student_res"]
    assert f"regions.shards={tmp_path}/pseudo_labels_student_res" in rc["labels_at_student_resolution@0"]
    assert f"regions.shards={tmp_path}/pseudo_labels " in rc["student@0"] + " "
    assert "regions.source=random" in rc["random_boxes@0"]
    assert "losses.concept_distillation=0.0" in cmds["contrastive_only@5"]
    # --min-freq: 2.5 % of the 2 captions per training image
    assert "--min-freq 400" in cmds["concepts"] and "--attributes colour" in cmds["concepts"]
    assert f"--rpn-weights {tmp_path}/seed5/finetune_teacher/detector.safetensors" in cmds["zs_rpn_student@6"]


@pytest.mark.parametrize("change, message", [({"seeds": 0}, "--seeds"), ({"nproc": 0}, "--nproc"),
                                             ({"ablations": ("tables",)}, "unknown ablation")])
def test_bad_settings(tmp_path, change, message):
    with pytest.raises(InputError, match=message):
        P.QuickstartSettings(out=tmp_path, **change).validate()


def test_aggregate_mean_and_sample_std():
    per_seed = [{"a": 10.0, "b": None}, {"a": 14.0, "b": 1.0}, {"a": 12.0, "b": 2.0}]
    agg = R.aggregate(per_seed)
    assert agg["a"] == {"mean": 12.0, "std": 2.0} and agg["b"] is None
    assert R.aggregate(per_seed[:1]) == per_seed[0]
    assert R._fmt(agg["a"]) == "12.0 ± 2.0" and R._fmt(None) == "n/a"


def test_effects_and_markdown(tmp_path):
    v = R._add_effects({"zero_shot_gt_ap50_student": 70.0, "zero_shot_gt_ap50_teacher": 62.5,
                        "zero_shot_gt_ap50_control": 69.0, "zero_shot_gt_acc_student": 48.0,
                        "zero_shot_gt_acc_teacher": 44.0, "zero_shot_rpn_ap50_student": None,
                        "zero_shot_rpn_ap50_teacher": 10.0, "finetune_ap50_novel_student_init": 31.4,
                        "finetune_ap50_novel_teacher_init": 14.2})
    assert v["effect_gt_ap50_student_minus_teacher"] == 7.5
    assert v["effect_gt_ap50_student_minus_control"] == 1.0
    assert v["effect_rpn_ap50_student_minus_teacher"] is None
    assert v["effect_finetune_novel_student_minus_teacher"] == pytest.approx(17.2)
    s = P.QuickstartSettings(out=tmp_path)
    report = {**v, "seeds": [0], "effects": [{"key": k, "claim": c, "margin": m, "value": v[k],
                                              "holds": v[k] >= m if m else v[k] > 0} for k, m, c in R.EFFECTS],
              "ablations": [], "stage_seconds": {"world": 5.0}, "total_seconds": 5.0, "commands": ["rclip x"],
              "settings": R._settings_dict(s)}
    md = R.render_markdown(report, ["figures/a.png"])
    assert "| teacher (image-text CLIP, 128 px) | 62.5 | n/a | 44.0 | 10.0 | n/a |" in md
    assert "(measured" not in md and "| 7.5 | yes |" in md and "| 1.0 | yes |" in md
    assert "![a](figures/a.png)" in md


def test_diagnosis_follows_the_signs_of_the_region_accuracy_gaps(tmp_path):
    q = {"regions": 10, "share_on_objects": 2.0, "accuracy_on_objects": 23.4}
    ft_fails = [{"key": "effect_finetune_novel_student_minus_teacher", "holds": False}]
    text = " ".join(R._diagnosis({"effects": ft_fails}, -2.9, -5.5, q))
    assert "does not classify ground-truth regions better than its teacher" in text and "23.4 %" in text
    assert "better than the student (5.5 points)" in text and "nothing for it to keep" in text
    # the student recognises more regions than both: said, with both gaps and the labels' accuracy
    text = " ".join(R._diagnosis({"effects": []}, 4.0, 1.0, q))
    assert "better than its teacher (4.0 points) and than the control (1.0 points)" in text and "23.4 %" in text
    assert "does not" not in text and "nothing for it to keep" not in text
    # fine-tuning effect holds: no sentence about it
    text = " ".join(R._diagnosis({"effects": [{**ft_fails[0], "holds": True}]}, -1.0, 2.0, None))
    assert "nothing for it to keep" not in text and "control" not in text and "right on" not in text


def test_one_seed_time_counts_shared_stages_and_the_first_seed(tmp_path, monkeypatch):
    s = P.QuickstartSettings(out=tmp_path, seed=3, seeds=2)
    monkeypatch.setattr(R, "pseudo_label_quality", lambda *a, **k: None)
    r = R.build_report(s, {"world": 5.0, "teacher": 200.0, "student@3": 80.0, "student@4": 90.0,
                           "ft_student@3": 150.0, "ft_student@4": 155.0, "detect": 3.0}, ["rclip x"])
    assert r["total_seconds"] == 683.0 and r["one_seed_seconds"] == 438.0
    md = R.render_markdown(r)
    assert "| one seed (shared stages and seed 3) | 438 |" in md


def test_plot_curves_draws_each_series(tmp_path):
    path = R.plot_curves({"a": [(0, 3.0), (10, 1.0)], "b": [(0, 2.0), (10, 2.5)], "empty": []}, "loss",
                         tmp_path / "c.png")
    img = Image.open(path)
    assert img.size == (640, 360)
    colours = {img.getpixel((x, y)) for x in range(0, 640, 2) for y in range(0, 360, 2)}
    assert len(colours) > 3  # lines in two class colours besides black and white
    assert R.plot_curves({"a": [(0, 1.0)]}, "t", tmp_path / "none.png") is None


def test_read_metrics_skips_other_lines(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "total": 2.5}\n{"step": 2, "eval": {}}\nnot json\n{"step": 3, "total": 1.5}\n')
    assert R.read_metrics(p, "total") == [(1, 2.5), (3, 1.5)]
    assert R.read_metrics(tmp_path / "missing.jsonl", "total") == []


def test_tiny_run_end_to_end_then_everything_is_skipped(tmp_path):
    """Every stage runs as its public command on a tiny world (minutes of work shrunk to a few
    steps), the report has every key, and a second run skips all stages."""
    out = tmp_path / "qs"
    args = ["quickstart", "--out", str(out), "--train-images", "120", "--val-images", "12", "--teacher-steps", "2",
            "--pretrain-steps", "2", "--finetune-steps", "2", "--nproc", "1", "--device", "cpu"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output + "".join(
        p.read_text()[-3000:] for p in sorted((out / "logs").glob("*.log"))[-2:]) if (out / "logs").exists() else ""
    report = json.loads((out / "report.json").read_text())
    for key in ("zero_shot_gt_ap50_teacher", "zero_shot_gt_ap50_student", "zero_shot_gt_ap50_control",
                "zero_shot_gt_acc_teacher", "zero_shot_gt_acc_student", "zero_shot_rpn_ap50_teacher",
                "zero_shot_rpn_ap50_student", "finetune_ap50_novel_teacher_init", "finetune_ap50_novel_student_init",
                "finetune_ap50_base_teacher_init", "finetune_ap50_all_student_init", "image_level_acc_teacher",
                "image_level_acc_student"):
        assert isinstance(report[key], float), key
        assert 0.0 <= report[key] <= 100.0, key
    assert report["seeds"] == [0] and len(report["commands"]) == 14
    assert {e["key"] for e in report["effects"]} == {k for k, _, _ in R.EFFECTS}
    md = (out / "report.md").read_text()
    assert "## Zero-shot region recognition" in md and "rclip pretrain" in md
    # curves need two logged points (2 steps log one); every figure listed exists
    assert all((out / f).is_file() for f in report["figures"]["curves"] + report["figures"]["examples"])
    assert len(report["figures"]["examples"]) == 4
    assert len(list((out / "detect").glob("*.jpg"))) == 4
    # the concept pool came from the captions (colour + shape pairs)
    pool = [line.split(",")[0] for line in (out / "concepts.txt").read_text().splitlines()]
    assert pool and all(len(c.split()) >= 1 for c in pool)

    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("done earlier, skipped") == 14

    # a recipe that is no longer the one a stage ran with (a new rclip version): that stage runs
    # again from scratch, and so does the stage that reads its output (detect)
    marker = out / "stages" / "ft_student@0.json"
    rec = json.loads(marker.read_text())
    assert set(rec["inputs"]) == {str(out / "recipes" / "shapes_finetune.yaml")}
    rec["inputs"] = {k: "0" * 64 for k in rec["inputs"]}
    marker.write_text(json.dumps(rec))
    (out / "seed0" / "finetune_student" / "stale.txt").write_text("from the old recipe")
    third = CliRunner().invoke(cli, args)
    assert third.exit_code == 0, third.output
    assert third.output.count("done earlier, skipped") == 12
    assert "ft_student@0" in third.output and not (out / "seed0" / "finetune_student" / "stale.txt").exists()


def test_a_stage_started_or_finished_as_another_command_has_changed(tmp_path):
    """An interrupted stage resumes only the command that started it: one whose command or
    recipe changed since (a new quickstart version) is stale, so its workdir is cleared."""
    rec = tmp_path / "recipes" / "r.yaml"
    rec.parent.mkdir()
    rec.write_text("a: 1\n")
    st = P.Stage("ft@0", ["finetune", str(rec), "max_steps=10"], [tmp_path / "out.txt"])
    assert not st.changed(tmp_path)  # never ran
    st.mark_started(tmp_path)
    assert not st.changed(tmp_path)  # interrupted, same command: resume it
    assert P.Stage("ft@0", ["finetune", str(rec), "max_steps=20"], []).changed(tmp_path)
    rec.write_text("a: 2\n")
    assert st.changed(tmp_path)  # the recipe it read is another one now


def test_failed_stage_is_one_line_and_resumable(tmp_path):
    out = tmp_path / "qs"
    (out / "world").mkdir(parents=True)
    (out / "world" / "junk.txt").write_text("not a world")  # rclip data shapes refuses a non-empty folder
    res = CliRunner().invoke(cli, ["quickstart", "--out", str(out), "--train-images", "100", "--val-images", "10"])
    assert res.exit_code == 1
    assert "stage world failed" in res.output and "Traceback" not in res.output
    assert not (out / "stages" / "world.json").exists() and not (out / "report.json").exists()


def test_dry_run_prints_the_commands(tmp_path):
    res = CliRunner().invoke(cli, ["quickstart", "--out", str(tmp_path / "q"), "--dry-run", "--seeds", "2"])
    assert res.exit_code == 0
    lines = res.output.strip().splitlines()
    assert len(lines) == 7 + 6 + 7 + 1 and all(line.startswith("rclip ") for line in lines)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("args, message", [
    (["--out", "FILE"], "is a file"),
    (["--seeds", "0"], "--seeds"),
    (["--ablation", "tables"], "--ablation"),
])
def test_bad_inputs_exit_2_in_one_line_and_write_nothing(tmp_path, args, message):
    f = tmp_path / "FILE"
    f.write_text("x")
    before = sorted(tmp_path.rglob("*"))
    res = CliRunner().invoke(cli, ["quickstart", *[str(f) if a == "FILE" else a for a in args]])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert sorted(tmp_path.rglob("*")) == before and f.read_text() == "x"
