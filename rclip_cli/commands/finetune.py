"""``rclip finetune``: fine-tune an open-vocabulary detector (COCO, LVIS, ShapesWorld, your data)."""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import click

from rclip_cli._common import console, device_option, err_console, progress_bar, rclip_command
from rclip_cli._model_options import trust_option

# option name -> recipe key
_OPTION_KEYS = {
    "dataset": "data.dataset",
    "images": "data.images",
    "val_dataset": "data.val_dataset",
    "val_images": "data.val_images",
    "init": "init.weights",
    "model_name": "init.model",
    "pretrained": "init.pretrained",
    "rpn_weights": "init.rpn_weights",
    "out_dir": "output_dir",
}


def _split_args(args: tuple[str, ...]) -> tuple[str | None, list[str]]:
    """``[RECIPE.yaml] [key=value ...]`` -> (recipe path or None, overrides)."""
    from rclip_core.errors import InputError

    recipe, overrides = None, []
    for a in args:
        if "=" in a and not a.lower().endswith((".yaml", ".yml")):
            overrides.append(a)
        elif recipe is None:
            recipe = a
        else:
            raise InputError(f"unexpected argument {a!r}",
                             "give at most one RECIPE.yaml and key=value overrides (e.g. optim.lr=0.01)")
    if recipe is not None:
        p = Path(recipe)
        if not p.exists():
            raise InputError(f"recipe not found: {recipe}", "see recipes/finetune_*.yaml")
        if p.is_dir():
            raise InputError(f"recipe {recipe} is a directory, expected a YAML file")
    return recipe, overrides


@rclip_command("finetune", short_help="Fine-tune an open-vocabulary detector (COCO, LVIS, your data).")
@click.argument("args", nargs=-1, metavar="[RECIPE.yaml] [KEY=VALUE ...]")
@click.option("--dataset", metavar="NAME|PATH",
              help="The names of `rclip eval`: coco-ovd (48 base / 17 novel classes), coco (80 classes, with "
                   "--fully-supervised or --novel-classes), lvis (866 base / 337 rare), shapes:DIR (a ShapesWorld), "
                   "or a COCO-format instances PATH.json.")
@click.option("--images", type=click.Path(), help="Image folder of --dataset (COCO root for coco/coco-ovd/lvis).")
@click.option("--val-dataset", help="Evaluation instances JSON (custom data; coco/lvis/ShapesWorld find their own).")
@click.option("--val-images", type=click.Path(), help="Image folder of --val-dataset (default: --images).")
@click.option("--novel-classes", help='Classes held out of training (open vocabulary), e.g. "cat,dog"; ids work too.')
@click.option("--fully-supervised", is_flag=True, help="Train and test on all classes (paper Table 3).")
@click.option("--init", type=click.Path(dir_okay=False),
              help="Initial weights: regionclip_pretrained-cc_rn50.pth, an rclip .safetensors, a CLIP checkpoint.")
@click.option("--model", "model_name", help="Architecture / named model instead of --init (with --pretrained or --random-init).")
@click.option("--pretrained", default=None, help="open_clip pretrained tag for --model.")
@click.option("--random-init", is_flag=True, help="Untrained --model weights (smoke tests only).")
@click.option("--rpn-weights", type=click.Path(dir_okay=False),
              help="Offline RPN: rpn_coco_48.pth (COCO), rpn_lvis_866_lsj.pth (LVIS).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Output directory (recipe output_dir).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its newest checkpoint.")
@click.option("--nproc", type=int, default=1, show_default=True,
              help="Processes on this machine (relaunches itself with torchrun; one per GPU).")
@click.option("--dry-run", is_flag=True, help="Check the inputs and print the resolved recipe; train nothing.")
@trust_option
@device_option
def finetune(args, dataset, images, val_dataset, val_images, novel_classes, fully_supervised, init, model_name,
             pretrained, random_init, rpn_weights, out_dir, resume, nproc, dry_run, trust_weights, device, debug):
    """Fine-tune a RegionCLIP model into an open-vocabulary detector (Faster R-CNN C4 on the
    CLIP trunk, text-embedding classifier) and evaluate it.

    Trains on the base classes (or all with --fully-supervised), evaluates novel / base / all
    AP50 (COCO) or APr/c/f (LVIS), and writes OUT/detector.safetensors (weights, class names
    and embeddings inside: `rclip detect --weights OUT/detector.safetensors img.jpg`),
    OUT/metrics.json, OUT/metrics.jsonl, OUT/recipe.yaml and OUT/checkpoints/.

    \b
    Examples:
      rclip finetune recipes/finetune_coco_ovd_rn50.yaml --dataset coco-ovd --images datasets/coco \\
          --init regionclip_pretrained-cc_rn50.pth --rpn-weights rpn_coco_48.pth --nproc 8
      rclip finetune recipes/finetune_lvis_ovd_rn50.yaml --dataset lvis --images datasets/coco \\
          --init regionclip_pretrained-cc_rn50.pth --rpn-weights rpn_lvis_866_lsj.pth --nproc 8
      rclip finetune recipes/shapes_finetune.yaml --dataset shapes:world --init student.safetensors
      rclip finetune recipes/shapes_finetune.yaml --dataset my_train.json --images imgs/ \\
          --val-dataset my_val.json --novel-classes "zebra,giraffe" --init regionclip.safetensors
      rclip finetune ... --resume                      # continue after a crash or preemption
      rclip finetune ... optim.lr=0.01 max_steps=2000  # any recipe key
    """
    from rclip_cli._torchrun import launch_torchrun
    from rclip_core.config.finetune import load_finetune_recipe
    from rclip_core.dist import launched_by_torchrun
    from rclip_core.errors import InputError

    recipe_path, override_items = _split_args(args)
    if nproc < 1:
        raise InputError(f"--nproc must be at least 1, got {nproc}")
    if random_init and init:
        raise InputError("--random-init and --init exclude each other")
    if random_init and not model_name:
        raise InputError("--random-init needs --model ARCH", "e.g. --model shapes-tiny --random-init")
    from rclip_core.config import parse_override_args

    overrides = parse_override_args(override_items)
    local = locals()
    for opt, key in _OPTION_KEYS.items():
        if local[opt] is not None:
            overrides[key] = str(local[opt])
    if init:  # a file on the command line replaces the recipe's model source
        overrides["init.random_init"] = "false"
        if not model_name:
            overrides["init.model"] = "null"
    elif model_name:
        overrides["init.weights"] = "null"
        overrides["init.random_init"] = "false"
    if random_init:
        overrides["init.random_init"] = "true"
        overrides["init.weights"] = "null"
    if novel_classes is not None:
        names = [n.strip() for n in novel_classes.split(",")]
        if not names or any(not n for n in names):
            raise InputError(f"--novel-classes {novel_classes!r} has an empty entry", 'e.g. --novel-classes "cat,dog"')
        overrides["data.novel_classes"] = "[" + ", ".join(_yaml_str(n) for n in names) + "]"
    if trust_weights:  # the recipe key trust_weights
        overrides["trust_weights"] = "true"
    if fully_supervised:
        if novel_classes:
            raise InputError("--fully-supervised and --novel-classes exclude each other")
        overrides["data.mode"] = "fully"
    recipe = load_finetune_recipe(recipe_path, overrides)
    _check_files(recipe)

    if dry_run:
        from rclip_core.config import dump_recipe
        from rclip_core.engine.tasks.detection import resolve_recipe_data

        data = resolve_recipe_data(recipe)
        for note in data.notes:
            err_console.print(f"[bold yellow]note:[/] {note}", soft_wrap=True, highlight=False)
        console.print(dump_recipe(recipe), markup=False, highlight=False)
        console.print(f"[bold]data:[/] {data.description}; {len(data.train.images)} training images"
                      + (f", {len(data.val.images)} evaluation images" if data.val is not None else ", no evaluation set"))
        return

    if nproc > 1 and not launched_by_torchrun():
        module_args = ["finetune", *args, *_forward_options(local)]
        console.print(f"launching {nproc} processes with torchrun")
        code = launch_torchrun(nproc, module_args)
        if code != 0:
            from rclip_core.errors import RuntimeFailure

            raise RuntimeFailure(f"torchrun exited with code {code}", "see the workers' messages above")
        return
    _run(recipe, device, resume)


def _yaml_str(s: str) -> str:
    import json

    return json.dumps(s)  # a JSON string is a YAML flow scalar


def _check_files(recipe) -> None:
    """Missing files named by options fail at once, before a model or data set is loaded."""
    from rclip_core.errors import InputError

    for key, value in (("--init", recipe.init.weights), ("--rpn-weights", recipe.init.rpn_weights),
                       ("text.train_embeddings", recipe.text.train_embeddings),
                       ("text.test_embeddings", recipe.text.test_embeddings)):
        if value and not Path(value).expanduser().is_file():
            raise InputError(f"{key}: file not found: {value}")
    if not recipe.data.dataset:
        raise InputError("no data set given", "pass --dataset coco-ovd|coco|lvis|shapes:DIR|train.json")
    if not (recipe.init.weights or recipe.init.model):
        raise InputError("no initial weights given",
                         "pass --init regionclip_pretrained-cc_rn50.pth (or --model ARCH --random-init for a smoke test)")


def _forward_options(local: dict[str, Any]) -> list[str]:
    """The options of this call, for the torchrun workers (without --nproc and --dry-run)."""
    out: list[str] = []
    flags = {"fully_supervised": "--fully-supervised", "random_init": "--random-init", "resume": "--resume",
             "debug": "--debug", "trust_weights": "--trust-weights"}
    for name, flag in flags.items():
        if local.get(name):
            out.append(flag)
    values = {"dataset": "--dataset", "images": "--images", "val_dataset": "--val-dataset",
              "val_images": "--val-images", "novel_classes": "--novel-classes", "init": "--init",
              "model_name": "--model", "pretrained": "--pretrained", "rpn_weights": "--rpn-weights",
              "out_dir": "--out", "device": "--device"}
    for name, opt in values.items():
        if local.get(name) is not None:
            out += [opt, str(local[name])]
    return out


def _run(recipe, device: str, resume: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    from rclip_core.engine.finetune import finetune as run_finetune

    state: dict[str, Any] = {}
    with ExitStack() as stack:

        def on_event(event: str, info: dict) -> None:
            if event == "data":  # shown with "start": an error building the model comes first
                state["data"] = info
            elif event == "start":
                data = state.pop("data", None)
                if data is not None:
                    for note in data.get("notes", ()):
                        err_console.print(f"[bold yellow]note:[/] {escape(note)}", soft_wrap=True)
                    console.print(f"[bold]data:[/] {escape(data['description'])}; {data['train_images']} training "
                                  f"images, {data['val_images']} evaluation images")
                amp = f", AMP {info['amp_dtype']}" if info["amp"] else ""
                console.print(f"[bold]training:[/] steps {info['start_step']} -> {info['max_steps']} on "
                              f"{info['world_size']} process(es) ({info['device']}{amp}), "
                              f"{info['per_pass']} image(s) per pass x {info['accumulation']} pass(es), "
                              f"{info['trainable_parameters'] / 1e6:.2f} M trainable parameters")
                state["bar"] = stack.enter_context(progress_bar("finetune", total=info["max_steps"] - info["start_step"],
                                                                unit="step"))
                state["last"] = info["start_step"]
            elif event == "step" and "bar" in state:
                losses = info["losses"]
                state["bar"](info["step"] - state["last"],
                             extra=f"loss {losses.get('loss', float('nan')):.3f} lr {info['lr']:.2e}")
                state["last"] = info["step"]
            elif event == "checkpoint":
                err_console.print(f"[dim]checkpoint {escape(info['path'])}[/]")
            elif event == "eval_start":
                err_console.print(f"evaluating at step {info['step']} on {info['images']} images ...")
            elif event == "eval":
                head = {k: v for k, v in info["metrics"].items()
                        if k in ("AP50_novel", "AP50_base", "AP50_all", "AP", "AP50", "APr", "APc", "APf")}
                console.print(f"[bold]eval[/] step {info['step']}: "
                              + ", ".join(f"{k} {v:.1f}" for k, v in head.items()))
            elif event == "export":
                console.print(f"[bold]detector:[/] {escape(info['path'])}")
            elif event == "stopped":
                err_console.print(f"[yellow]stopped at step {info['step']} (checkpoint saved); continue with --resume[/]")
            elif event == "note":
                err_console.print(f"[dim]{escape(info['message'])}[/]", soft_wrap=True)

        result = run_finetune(recipe, device=device, resume=resume, progress=on_event)
    if result.interrupted:
        sys.exit(143)
    if os.environ.get("RANK", "0") != "0":
        return
    table = Table(title="fine-tuning result", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k in ("AP50_novel", "AP50_base", "AP50_all", "AP", "AP50", "APr", "APc", "APf"):
        if k in result.metrics:
            table.add_row(k, f"{result.metrics[k]:.2f}")
    if result.steps_per_second:
        table.add_row("steps / s", f"{result.steps_per_second:.3f}")
    console.print(table)
    console.print(f"outputs in {escape(str(result.output_dir))}")
