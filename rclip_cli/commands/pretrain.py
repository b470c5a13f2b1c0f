"""``rclip pretrain``: RegionCLIP region-text pretraining (or CLIP image-text training) from a recipe."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click

from rclip_cli._common import console, device_option, err_console, progress_bar, rclip_command
from rclip_cli._model_options import trust_option

_SHORT = {"region_concept_contrastive": "contrast", "concept_distillation": "distill",
          "image_text_contrastive": "img-txt", "regions_kept": "kept", "logit_scale": "scale"}


def _loss_text(losses: dict[str, float], lr: float, ips: float) -> str:
    parts = [f"loss {losses.get('total', float('nan')):.3f}"]
    parts += [f"{_SHORT[k]} {v:.3f}" for k, v in losses.items() if k in _SHORT]
    parts += [f"lr {lr:.2e}", f"{ips:.1f} img/s"]
    return "  ".join(parts)


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _print_evaluation(ev: dict) -> None:
    if "image_level" in ev:
        il = ev["image_level"]
        console.print(f"zero-shot image-level top-1 on {ev['eval_images']} held-out images: "
                      f"[bold]{_fmt_pct(il['top1'])}[/] (chance {_fmt_pct(il['chance'])}; "
                      f"single-object images {_fmt_pct(il['single_object_top1'])} of {il['single_object_images']}; "
                      f"any object of the image {_fmt_pct(il['any_object_top1'])})")
    if "region" in ev:
        console.print(f"zero-shot region top-1 (ground-truth boxes): {_fmt_pct(ev['region']['top1'])} "
                      f"of {ev['region']['regions']} regions")
    for who in ("student", "teacher"):
        if who in ev:
            r = ev[who]
            line = (f"{who}: region top-1 {_fmt_pct(r['region']['top1'])} ({r['region']['regions']} GT boxes, "
                    f"short side {ev.get('short_side')})")
            if "image_level" in r:
                line += f", image-level top-1 {_fmt_pct(r['image_level']['top1'])}"
            console.print(line)


@rclip_command("pretrain", short_help="Region-text pretraining (or image-text CLIP training) from a recipe.")
@click.argument("recipe", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--resume", is_flag=True,
              help="Continue from the newest checkpoint in OUTPUT_DIR/checkpoints (start fresh if there is none).")
@click.option("--nproc", type=int, default=None,
              help="Launch this many processes on this machine through torchrun (gloo on CPU, nccl on CUDA).")
@click.option("--print-recipe", is_flag=True, help="Print the resolved recipe (defaults filled in) and exit.")
@trust_option
@device_option
def pretrain(recipe: Path, overrides: tuple[str, ...], resume: bool, nproc: int | None, print_recipe: bool,
             trust_weights: bool, device: str, debug: bool) -> None:
    """Train from a YAML RECIPE, with KEY=VALUE overrides of any recipe key (dotted).

    \b
    mode: regionclip  a frozen teacher CLIP pseudo-labels image regions (RPN / random /
                      ground-truth boxes, or `rclip pseudo-label` shards) with a concept pool;
                      the student learns region-concept contrast + distillation + image-text
                      contrast (RegionCLIP, paper eq. 5)
    mode: image_text  trains a CLIP (both towers) from scratch with the CLIP loss
                      (how ShapesWorld gets its teacher)

    \b
    Writes OUTPUT_DIR/recipe.yaml, metrics.jsonl (+ tensorboard/ when installed),
    checkpoints/ (every checkpoint_every steps, atomic, with optimizer, schedule, data order
    and RNG state), final.safetensors (an rclip model file: --weights of detect/eval), and
    eval.json when the recipe has eval.instances.
    SIGTERM saves a checkpoint and exits with code 143; --resume continues the newest
    checkpoint exactly (optimizer and schedule state come from the checkpoint).

    \b
    Examples:
      rclip data shapes shapes/ --train 2000 --val 500
      rclip pretrain recipes/shapes_teacher.yaml data.root=shapes
      rclip pretrain recipes/shapes_regionclip.yaml data.root=shapes --nproc 2
      rclip pretrain recipes/regionclip_rn50_cc3m.yaml data.root=/data/cc3m --nproc 8
      rclip pretrain recipes/shapes_teacher.yaml data.root=shapes --resume    # after kill / SIGTERM

    \b
    Multi-node: run the same command on every node through torchrun's rendezvous, e.g.
      torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
               --rdzv_endpoint HOST:29500 -m rclip_cli pretrain recipe.yaml
    (--nproc only launches processes on this machine.)
    """
    from rclip_core.config import dump_recipe, parse_override_args
    from rclip_core.config.pretrain import check_recipe_inputs, load_pretrain_recipe
    from rclip_core.dist import launched_by_torchrun
    from rclip_core.errors import InputError, RuntimeFailure

    warnings: list[str] = []
    parsed = parse_override_args(list(overrides))
    if trust_weights:  # the recipe key trust_weights
        parsed["trust_weights"] = "true"
    recipe_obj = load_pretrain_recipe(recipe, parsed, warnings=warnings)
    if int(os.environ.get("RANK", "0")) == 0:
        for w in warnings:
            err_console.print(f"[bold yellow]warning:[/] {w}", soft_wrap=True, highlight=False)
    if print_recipe:
        click.echo(dump_recipe(recipe_obj), nl=False)
        return
    if nproc is not None and not launched_by_torchrun():
        if nproc < 1:
            raise InputError(f"--nproc must be at least 1, got {nproc}")
        # fail here, before any worker starts, on everything that can be checked up front
        check_recipe_inputs(recipe_obj)
        recipe_obj.batch.layout(nproc)
        from rclip_cli._torchrun import launch_torchrun

        args = ["pretrain", str(recipe), *overrides, "--device", device]
        if resume:
            args.append("--resume")
        if trust_weights:
            args.append("--trust-weights")
        if debug:
            args.append("--debug")
        import time

        from rclip_core.engine.trainer import STOPPED_FILE

        stopped = Path(os.path.expanduser(recipe_obj.output_dir)) / STOPPED_FILE
        t0 = time.time()
        rc = launch_torchrun(nproc, args)
        if rc != 0 and stopped.is_file() and stopped.stat().st_mtime >= t0 - 1:
            # torchrun reports its own SIGTERM as a failure; the workers saved a checkpoint
            err_console.print(f"[yellow]stopped by SIGTERM[/]; checkpoint saved, continue with: "
                              f"rclip pretrain {recipe} --resume --nproc {nproc}")
            sys.exit(143)
        if rc != 0:
            raise RuntimeFailure(f"pretraining failed: torchrun exited with code {rc}",
                                 hint="see the workers' messages above")
        return
    _run(recipe, recipe_obj, resume, device)


def _run(recipe_path: Path, recipe, resume: bool, device: str) -> None:
    from rclip_core.engine.pretrain import run_pretraining

    main = int(os.environ.get("RANK", "0")) == 0
    stack = contextlib.ExitStack()
    state: dict = {"advance": None, "last": 0}

    def progress(report) -> None:
        if state["advance"] is None:
            state["last"] = report.step - 1
            state["advance"] = stack.enter_context(
                progress_bar(f"pretrain ({recipe.mode})", total=report.max_steps - state["last"], unit="step"))
        state["advance"](report.step - state["last"], extra=_loss_text(report.losses, report.lr,
                                                                        report.images_per_s))
        state["last"] = report.step

    def notify(msg: str) -> None:
        err_console.print(f"[dim]{msg}[/]", soft_wrap=True)

    with stack:
        result = run_pretraining(recipe, resume=resume, device=device, progress=progress, notify=notify)
    if not main:
        return
    if result.stopped:
        err_console.print(f"[yellow]stopped by SIGTERM after step {result.steps}[/]; continue with: "
                          f"rclip pretrain {recipe_path} --resume")
        sys.exit(143)
    m = result.last_metrics
    console.print(f"{result.steps} steps in {result.seconds / 60:.1f} min on {result.world_size} process(es)"
                  + (f", resumed from step {result.resumed_from}" if result.resumed_from is not None else "")
                  + (f"; last loss {m['total']:.4f}, {m['images_per_s']:.1f} images/s" if "total" in m else ""))
    if result.final_weights is not None:
        console.print(f"weights: {result.final_weights}")
    console.print(f"metrics: {result.output_dir / 'metrics.jsonl'}")
    rep = result.data_report or {}
    if rep.get("bad_items"):
        from rich.markup import escape

        err_console.print(f"[yellow]skipped {rep['bad_items']} unreadable training item(s)[/]"
                          + (f" (e.g. {escape(', '.join(rep['bad_examples']))})" if rep.get("bad_examples") else ""),
                          soft_wrap=True)
    if rep.get("gt_box_misses"):
        err_console.print(f"[yellow]{rep['gt_box_misses']} training image(s) had no entry in regions.gt_boxes and "
                          "got random regions[/]", soft_wrap=True)
    if result.evaluation:
        _print_evaluation(result.evaluation)
