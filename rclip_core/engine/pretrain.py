"""``rclip pretrain``: RegionCLIP region-text pretraining (:mod:`rclip_core.engine.tasks.regionclip`)
or CLIP image-text training (:mod:`rclip_core.engine.tasks.image_text`), run by the one training
loop (:class:`rclip_core.engine.trainer.Trainer`).

Entry point: :func:`run_pretraining` (one process, or one torchrun worker; the process group
is joined from torchrun's environment). It never prints: progress goes to the ``progress``
callback (:class:`~rclip_core.engine.trainer.StepReport` per step) and one-line notes to
``notify``.

**Outputs**: ``recipe.yaml`` (resolved), ``metrics.jsonl`` (one line per ``logging.log_every``
steps, the first and the last: step, lr, loss terms, seconds per step, images/s, time, epoch),
``tensorboard/`` when TensorBoard is installed, ``checkpoints/`` (see the trainer),
``final.safetensors`` (the student as an rclip model file: visual + text tower, and the RPN if
one was used), ``eval.json`` when ``eval.instances`` is set, ``stopped.json`` after a SIGTERM.
Skipped training items (``data.max_bad_items``) and, for ``regions.source gt_jitter``, images
the boxes file lacks are counted in :attr:`PretrainResult.data_report`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from rclip_core.config.pretrain import PretrainRecipe, check_recipe_inputs
from rclip_core.engine.tasks.pretraining import EVAL_FILE, FINAL_WEIGHTS
from rclip_core.engine.trainer import METRICS_FILE, STOPPED_FILE, StepReport, Trainer

__all__ = ["StepReport", "PretrainResult", "run_pretraining", "FINAL_WEIGHTS", "METRICS_FILE", "STOPPED_FILE",
           "EVAL_FILE"]


@dataclass
class PretrainResult:
    output_dir: Path
    final_weights: Path | None
    steps: int
    stopped: bool
    resumed_from: int | None
    world_size: int
    seconds: float
    last_metrics: dict[str, float] = field(default_factory=dict)
    evaluation: dict[str, Any] | None = None
    #: over every process: ``bad_items`` (skipped training items), ``bad_examples`` (the first
    #: few), and ``gt_box_misses`` (regions.source gt_jitter: images met that the boxes file lacks)
    data_report: dict[str, Any] = field(default_factory=dict)


def run_pretraining(
    recipe: PretrainRecipe,
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: Callable[[StepReport], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> PretrainResult:
    """Run a pretraining recipe in this process (or this torchrun worker).

    Args:
        recipe: a validated :class:`PretrainRecipe`.
        resume: continue from the newest checkpoint in ``OUTPUT_DIR/checkpoints`` (a fresh start
            when there is none). Without it, an output directory that already holds a run is
            refused before any work.
        device: "cpu", "cuda", None = CUDA when available (each torchrun worker takes
            cuda:LOCAL_RANK).
        progress: called on rank 0 after every optimizer step with a :class:`StepReport`.
        notify: called on rank 0 with one-line notes (resumed from ..., stopped ...).

    Returns:
        :class:`PretrainResult` (``stopped`` when SIGTERM ended the run early; the checkpoint
        to resume from is then saved).
    """
    check_recipe_inputs(recipe)

    tasks: list[Any] = []

    def build(dev: torch.device, rank: int):
        if recipe.mode == "image_text":
            from rclip_core.engine.tasks.image_text import ImageTextTask

            tasks.append(ImageTextTask(recipe, dev, rank))
        else:
            from rclip_core.engine.tasks.regionclip import RegionCLIPTask

            tasks.append(RegionCLIPTask(recipe, dev, rank))
        return tasks[-1]

    def on_event(event: str, info: Any) -> None:
        if event == "step" and progress is not None:
            progress(info)
        elif notify is not None:
            if event == "note":
                notify(info["message"])
            elif event == "stopped":
                notify(f"stopped by SIGTERM after step {info['step']}; checkpoint saved, continue with --resume")

    outcome = Trainer(recipe, build, run_name="pretraining", final_file=FINAL_WEIGHTS, resume=resume, device=device,
                      progress=on_event).run()
    final, evaluation = outcome.result if outcome.result is not None else (None, None)
    return PretrainResult(output_dir=outcome.output_dir, final_weights=final, steps=outcome.steps,
                          stopped=outcome.stopped, resumed_from=outcome.resumed_from,
                          world_size=outcome.world_size, seconds=outcome.seconds,
                          last_metrics=outcome.last_metrics, evaluation=evaluation,
                          data_report=dict(getattr(tasks[-1], "report", {}) if tasks else {}))
