"""``rclip finetune``: transfer a RegionCLIP model to an open-vocabulary detector
(:mod:`rclip_core.engine.tasks.detection`), run by the one training loop
(:class:`rclip_core.engine.trainer.Trainer`) on one process or under torchrun (DDP, gloo on CPU,
nccl on GPU). The recipe is :class:`rclip_core.config.finetune.FinetuneRecipe`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rclip_core.config.finetune import FinetuneRecipe
from rclip_core.engine.tasks.detection import DETECTOR_FILE, DetectionTask, resolve_recipe_data
from rclip_core.engine.trainer import Progress, Trainer
from rclip_core.errors import InputError

__all__ = ["FinetuneResult", "finetune"]


@dataclass
class FinetuneResult:
    output_dir: Path
    detector_path: Path | None
    metrics: dict[str, float]
    start_step: int
    end_step: int
    seconds: float
    steps_per_second: float | None
    interrupted: bool = False
    history: list[dict] = field(default_factory=list)


def finetune(recipe: FinetuneRecipe, *, device: str | torch.device | None = None, resume: bool = False,
             progress: Progress | None = None, stop: Any | None = None) -> FinetuneResult:
    """Run a fine-tuning recipe. Call in every torchrun worker or once.

    Args:
        device: "cpu", "cuda", "auto"/None (CUDA when available).
        resume: continue from the newest checkpoint in ``output_dir/checkpoints`` (a fresh start
            when there is none). Without it an existing checkpoint is an InputError, so a run
            is never overwritten by accident.
        progress: ``progress(event, info)`` on rank 0 with events ``data`` {description,
            train_images, val_images, mode, notes}, ``start`` {start_step, max_steps, world_size,
            per_pass, accumulation, device, amp, trainable_parameters}, ``step`` (a
            :class:`~rclip_core.engine.trainer.StepReport`: step, lr, losses, seconds),
            ``checkpoint`` {step, path}, ``eval_start`` {step, images}, ``eval_image`` {n},
            ``eval`` {step, metrics, final}, ``export`` {path}, ``stopped`` {step}, ``note``.
        stop: an object whose truth means "save and stop" (default: SIGTERM, see the trainer).
    """
    from rclip_core.data.coco import resolve_images, size_mismatch_error, size_mismatches
    from rclip_core.engine.detection_data import build_train_records

    main = int(os.environ.get("RANK", "0")) == 0  # before the process group exists
    emit: Progress = progress if (progress is not None and main) else (lambda event, info: None)
    # -- data (validated before anything is written) -----------------------------------------
    data = resolve_recipe_data(recipe)
    class_index = {c: i for i, c in enumerate(data.train_category_ids)}
    records = build_train_records(data.train, data.train_images, class_index, recipe.data.max_gt_per_image,
                                  with_polygons=recipe.detector.mask_head)
    if data.val is not None:
        present, missing = resolve_images(data.val, data.val_images)
        if missing:
            raise InputError(f"{len(missing)} of {len(data.val.images)} validation images are not in "
                             f"{data.val_images} (e.g. {missing[0]['file_name']})")
        bad = size_mismatches(present)
        if bad:
            raise size_mismatch_error(bad, len(present), str(data.val.source or "the validation file"))
    emit("data", {"description": data.description, "train_images": len(records),
                  "val_images": len(data.val.images) if data.val is not None else 0, "mode": data.mode,
                  "notes": list(data.notes)})

    tasks: list[DetectionTask] = []

    def build(dev: torch.device, rank: int) -> DetectionTask:
        tasks.append(DetectionTask(recipe, data, records, dev, progress=emit))
        return tasks[0]

    outcome = Trainer(recipe, build, run_name="fine-tuning", final_file=DETECTOR_FILE, resume=resume,
                      device=device, progress=emit, stop=stop).run()
    history = tasks[0].history if tasks else []
    if outcome.stopped:
        return FinetuneResult(outcome.output_dir, None, {}, outcome.start_step, outcome.steps, outcome.seconds,
                              outcome.steps_per_second, True, history)
    path, metrics = outcome.result
    return FinetuneResult(outcome.output_dir, path, metrics, outcome.start_step, outcome.steps, outcome.seconds,
                          outcome.steps_per_second, False, history)
