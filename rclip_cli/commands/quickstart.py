"""``rclip quickstart``: every stage of RegionCLIP on ShapesWorld, offline, ending in a report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
from rich.table import Table

from rclip_cli._common import console, rclip_command
from rclip_cli.quickstart.plan import ABLATIONS
from rclip_core.errors import RuntimeFailure


def _run_stage(argv: list[str], log: Path) -> tuple[int, float]:
    """Run ``python -m rclip_cli ARGV`` with its output in ``log``; (exit code, seconds)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    env = {**os.environ, "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ rclip " + " ".join(argv) + "\n")
        f.flush()
        proc = subprocess.Popen([sys.executable, "-m", "rclip_cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)  # pretrain/finetune save a checkpoint on SIGTERM
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    return code, time.perf_counter() - t0


def _last_error(log: Path) -> str:
    """The first error line of a stage's log (the root cause; torchrun repeats it), else its last line."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith("error:"):
            return ln[len("error:"):].strip()
    return lines[-1] if lines else "no output"


@rclip_command("quickstart", short_help="The whole method on ShapesWorld, offline, with a report.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("rclip-quickstart"),
              show_default=True, help="Output directory (a rerun skips the stages finished there).")
@click.option("--seed", type=int, default=0, show_default=True, help="World, teacher and first pretraining seed.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Repeat the measured stages (pretraining, fine-tuning, evaluation) with K seeds: mean ± std.")
@click.option("--nproc", type=click.IntRange(min=1), default=2, show_default=True,
              help="torchrun processes for region pretraining.")
@click.option("--ablation", "ablations", multiple=True, type=click.Choice(list(ABLATIONS)),
              help="Also run the pretraining ablations of paper Tables 5 (image-text), 6 (regions), 7 (losses), "
                   "and pseudo labels made on the student's input as the official code does (labels).")
@click.option("--train-images", type=click.IntRange(min=100), default=8000, show_default=True,
              help="ShapesWorld training images.")
@click.option("--val-images", type=click.IntRange(min=10), default=1000, show_default=True,
              help="ShapesWorld validation images (all metrics).")
@click.option("--teacher-steps", type=click.IntRange(min=1), default=400, show_default=True,
              help="Teacher CLIP steps (batch 128).")
@click.option("--pretrain-steps", type=click.IntRange(min=1), default=200, show_default=True,
              help="Region pretraining steps (8 images per process).")
@click.option("--finetune-steps", type=click.IntRange(min=1), default=240, show_default=True,
              help="Detector fine-tuning steps (batch 4).")
@click.option("--dry-run", is_flag=True, help="Print the commands and exit.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
def quickstart(out: Path, seed: int, seeds: int, nproc: int, ablations: tuple[str, ...], train_images: int,
               val_images: int, teacher_steps: int, pretrain_steps: int, finetune_steps: int, dry_run: bool,
               device: str, debug: bool) -> None:
    """Run RegionCLIP end to end on ShapesWorld, offline, and write OUT/report.md + report.json.

    Stages, each the public command it prints: generate a ShapesWorld; train the teacher CLIP
    on its captions; extract the concept pool; fine-tune a detector from the teacher on the base
    classes (its RPN proposes the regions); pseudo-label RPN regions with the teacher at its own
    resolution; region-text pretraining (torchrun) and an image-text-only control; zero-shot
    evaluation with ground-truth and RPN boxes; fine-tuning from the student; `rclip detect` on
    val images. A rerun skips the finished stages (OUT/stages/) and starts over those whose
    inputs were remade or whose command or recipe changed; logs are in OUT/logs/. One seed takes
    about 12 minutes on 2 CPU cores.

    \b
    Examples:
      rclip quickstart                                   # one seed, into rclip-quickstart/
      rclip quickstart --seeds 3                         # mean ± std over 3 pretraining seeds
      rclip quickstart --seeds 3 --ablation losses --ablation image-text --ablation regions
      rclip quickstart --dry-run                         # only print the commands
    """
    from rclip_cli.quickstart import plan as P
    from rclip_cli.quickstart import report as R
    from rclip_core.fileio import atomic_write_json, ensure_output_dir

    settings = P.QuickstartSettings(out=out.resolve(), seed=seed, seeds=seeds, nproc=nproc,
                                    train_images=train_images, val_images=val_images, teacher_steps=teacher_steps,
                                    pretrain_steps=pretrain_steps, finetune_steps=finetune_steps,
                                    ablations=tuple(dict.fromkeys(ablations)), device=device).validate()
    P.recipes_dir()  # fail before any work when the recipes are not there
    stages = P.plan(settings)
    if dry_run:
        for st in stages:
            click.echo(st.command())
        return
    ensure_output_dir(settings.out)
    P.write_recipes(settings)

    timings: dict[str, float] = {}
    n = len(stages)
    t_all = time.perf_counter()
    deps = P.dependencies(stages)
    ran: set[str] = set()  # a stage whose input stage ran again runs again too
    for i, st in enumerate(stages, 1):
        marker = st.marker(settings.out)
        # an input stage ran again, its command changed or a recipe it reads changed: its old
        # outputs cannot be resumed
        stale = bool(deps[st.name] & ran) or st.changed(settings.out)
        if not stale and st.done(settings.out):
            timings[st.name] = float(json.loads(marker.read_text()).get("seconds", 0.0))
            console.print(f"[dim][{i}/{n}] {st.name}: done earlier, skipped[/]")
            continue
        marker.unlink(missing_ok=True)
        if stale and st.workdir is not None and st.workdir.exists():
            shutil.rmtree(st.workdir)  # made from the old inputs: nothing to resume
        ran.add(st.name)
        st.mark_started(settings.out)
        console.print(f"[bold][{i}/{n}] {st.name}[/]  [cyan]{st.command()}[/]")
        log = settings.out / "logs" / f"{st.name.replace('@', '_seed')}.log"
        with console.status(f"{st.name} (log: {log})"):
            code, seconds = _run_stage(st.argv, log)
        if code != 0:
            raise RuntimeFailure(f"stage {st.name} failed (exit {code}): {_last_error(log)}",
                                 f"full log: {log}; fix it and rerun the same quickstart command to continue")
        missing = [p for p in st.outputs if not p.exists()]
        if missing:
            raise RuntimeFailure(f"stage {st.name} finished without writing {missing[0]}", f"full log: {log}")
        timings[st.name] = round(seconds, 1)
        atomic_write_json(marker, {"command": st.command(), "inputs": st.inputs(), "seconds": round(seconds, 1),
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        console.print(f"      done in {seconds:.0f} s")

    report = R.write_report(settings, stages, timings)

    table = Table(title="RegionCLIP on ShapesWorld", title_justify="left")
    table.add_column("measure")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    table.add_column("control", justify="right")
    for label, key in (("zero-shot GT AP50", "zero_shot_gt_ap50_{}"), ("zero-shot GT region acc %", "zero_shot_gt_acc_{}"),
                       ("zero-shot RPN AP50", "zero_shot_rpn_ap50_{}"), ("image-level acc %", "image_level_acc_{}"),
                       ("fine-tuned novel AP50", "finetune_ap50_novel_{}_init"),
                       ("fine-tuned all AP50", "finetune_ap50_all_{}_init")):
        table.add_row(label, *(R._fmt(report.get(key.format(w))) for w in ("teacher", "student", "control")))
    console.print(table)
    for e in report["effects"]:
        mark = {True: "[green]holds[/]", False: "[red]does not hold[/]", None: "n/a"}[e["holds"]]
        console.print(f"{mark}: {e['claim']} (measured {R._fmt(report.get(e['key']))})")
    console.print(f"total {time.perf_counter() - t_all:.0f} s this run; wrote {settings.out / 'report.md'} "
                  f"and {settings.out / 'report.json'}")
