"""The one training loop of rclip: region pretraining, image-text training and detector
fine-tuning are tasks (:mod:`rclip_core.engine.tasks`) that this loop runs.

The loop owns everything that is the same for every objective (detectron2's
``engine/train_loop.py`` idea, with the hooks inlined): the process group, seeding, the batch
layout (passes x accumulation x processes), DDP, AMP (bf16 where the GPU supports it, fp16 with
a gradient scaler otherwise; never on the CPU), the non-finite check, per-parameter clipping,
the schedule, the metrics log (``metrics.jsonl``, TensorBoard), checkpoints (one layout), exact
resume, SIGTERM (save and stop), periodic evaluation and the final outputs.

A task is an ``nn.Module`` whose ``forward(batch)`` returns a dict of loss terms and statistics
with the objective under :attr:`Task.objective`; see :class:`Task` for the rest of its interface.

Checkpoint layout (``OUTPUT_DIR/checkpoints/ckpt_<step>/``, :mod:`rclip_core.engine.checkpoint`):
``model.safetensors`` = the task's trainable state; ``state.pt`` = optimizer, scheduler and
``extra = {"recipe", "world_size", "task", "ranks": [{"rng", "data", "task"} per process],
"scaler"}``. On the CPU with a fixed seed a killed run resumed with ``resume=True`` ends with
exactly the weights of an uninterrupted one; the data order does not depend on DataLoader
workers, so ``data.num_workers`` may change on resume. A resume with another number of processes
is refused with one line (each process's data position and random state are in the checkpoint,
and no other split continues them exactly). A fresh run that fails before its first checkpoint
(a NaN loss, unreadable data, Ctrl-C) removes what it wrote: the recipe, the metrics log and the
folders it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch
from torch import Tensor, nn

from rclip_core.errors import InputError, RuntimeFailure

__all__ = ["Task", "Stream", "StepReport", "TrainOutcome", "Trainer", "Progress", "CHECKPOINT_DIR",
           "METRICS_FILE", "RECIPE_FILE", "STOPPED_FILE", "SLEEP_HOOK_ENV"]

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"
#: Written by rank 0 when SIGTERM stopped the run (removed when a run starts): {"step": N}.
STOPPED_FILE = "stopped.json"
#: Test hook: sleep this long after the given step (so a test can kill -9 the process there).
SLEEP_HOOK_ENV = "RCLIP_TEST_SLEEP_AFTER_STEP"

#: ``progress(event, info)``: events ``start``, ``step`` (a :class:`StepReport`), ``checkpoint``
#: {step, path}, ``eval_start`` {step, images}, ``eval_image`` {n}, ``eval`` {step, metrics, final},
#: ``export`` {path}, ``stopped`` {step}, ``note`` {message}; on rank 0 only.
Progress = Callable[[str, Any], None]


class Stream(Protocol):
    """A task's training data for one process: ``next_batch()`` gives one forward pass."""

    def next_batch(self) -> Any: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any], exact: bool) -> None: ...

    def close(self) -> None: ...


class Task(nn.Module):
    """What a training objective provides to the :class:`Trainer` (an ``nn.Module``: DDP wraps it).

    objective: the key of ``forward``'s dict that is minimised (the others are logged).
    eval_every: steps between periodic evaluations (0 = none).
    ddp_kwargs: DistributedDataParallel options.
    """

    objective = "total"
    eval_every = 0
    ddp_kwargs: dict[str, Any] = {}

    def trainable_module(self) -> nn.Module:  # the optimizer's parameters (requires_grad ones)
        raise NotImplementedError

    def stream(self, *, per_pass: int, accumulation: int, rank: int, world: int, start_step: int) -> Stream:
        raise NotImplementedError

    def trainable_state(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def load_trainable_state(self, state: Mapping[str, Tensor]) -> None:
        raise NotImplementedError

    def rng_state(self) -> dict[str, Any]:
        return {}

    def load_rng_state(self, state: Mapping[str, Any]) -> None:
        pass

    def after_step(self) -> None:
        pass

    def evaluate(self, step: int, final: bool) -> dict[str, float]:
        return {}

    def finish(self, step: int, world: int, steps_per_second: float | None = None) -> Any:
        """After the last step (every process): write the final outputs; returns the task's result."""
        raise NotImplementedError


@dataclass
class StepReport:
    """What the progress callback receives after every optimizer step (rank 0 only); also readable
    as a mapping (``report["step"]``).

    losses: this process's loss terms of the step (at ``logged`` steps: averaged over processes
    and over the steps since the last log line, the values written to metrics.jsonl).
    """

    step: int
    max_steps: int
    losses: dict[str, float]
    lr: float
    images_per_s: float
    seconds: float
    elapsed_s: float
    epoch: int | None
    logged: bool

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


@dataclass
class TrainOutcome:
    output_dir: Path
    start_step: int
    steps: int
    stopped: bool
    resumed_from: int | None
    world_size: int
    seconds: float
    steps_per_second: float | None
    last_metrics: dict[str, float] = field(default_factory=dict)
    result: Any = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def _any_process(flag: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def amp_policy(enabled: bool, dtype: str, device: torch.device) -> tuple[bool, torch.dtype]:
    """(use AMP, its dtype): CUDA only; ``auto`` = bf16 where supported, else fp16."""
    if not enabled or device.type != "cuda":
        return False, torch.float32
    if dtype == "bf16" or (dtype == "auto" and torch.cuda.is_bf16_supported()):
        return True, torch.bfloat16
    return True, torch.float16


def resume_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any], allowed: tuple[str, ...]) -> str | None:
    """The first recipe section that differs between a checkpoint's recipe and this run's
    (``allowed`` sections and ``data.num_workers`` may change), or None."""
    for key in sorted(set(saved) | set(current)):
        if key in allowed:
            continue
        a, b = saved.get(key), current.get(key)
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k != "num_workers"}
            b = {k: v for k, v in b.items() if k != "num_workers"}
        if key == "amp_dtype" and a is None:  # checkpoints of rclip 0.1 have no amp_dtype
            continue
        if a != b:
            return key
    return None


def _legacy_ranks(extra: Mapping[str, Any], state: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per-process states of a checkpoint, also from the two layouts of rclip 0.1 (pretraining:
    ``ranks`` with ``generator``; fine-tuning: ``rng_ranks`` and ``rng``)."""
    ranks = extra.get("ranks")
    if ranks is not None:
        return [{"rng": r.get("rng"), "data": r.get("data", {}),
                 "task": r.get("task", {"regions": r["generator"]} if "generator" in r else {})} for r in ranks]
    if extra.get("rng_ranks"):
        return [{"rng": r, "data": {}, "task": {}} for r in extra["rng_ranks"]]
    if "rng" in state:
        return [{"rng": state["rng"], "data": {}, "task": {}}]
    return []


class _TensorBoard:
    def __init__(self, log_dir: Path, purge_step: int | None):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional (pip install rclip-toolkit[viz])
            return
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _remove_run_files(paths: list[Path], created: Path | None) -> None:
    """Remove ``paths`` (files or folders a failed run made) and then the folders it created,
    while they are empty."""
    import shutil

    from rclip_core.fileio import remove_empty_dirs

    out = None
    for p in paths:
        out = out or p.parent
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):  # never hide the failure that brought us here
                p.unlink(missing_ok=True)
    if out is not None:
        remove_empty_dirs(out, created)


def append_jsonl(path: Path, line: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


class Trainer:
    """Run ``recipe`` (a :class:`rclip_core.config.sections.TrainRecipe`) with the task that
    ``build_task(device, rank)`` makes, in this process (or this torchrun worker).

    Args:
        recipe: the validated recipe (``output_dir``, ``seed``, ``max_steps``,
            ``checkpoint_every``, ``optim``, ``batch``, ``logging``, ``amp``, ``amp_dtype``).
        build_task: called once after seeding with (device, rank); returns the :class:`Task`.
        run_name: "pretraining" / "fine-tuning", for messages and checkpoints.
        final_file: the run's final output under OUTPUT_DIR (a directory holding it or a
            checkpoint is refused without ``resume``).
        resume: continue from the newest checkpoint in ``OUTPUT_DIR/checkpoints`` (a fresh start
            when there is none). Without it, an output directory that already holds a run is
            refused before any work.
        device: "cpu", "cuda", None / "auto" = CUDA when available (each torchrun worker takes
            cuda:LOCAL_RANK).
        progress: ``progress(event, info)`` on rank 0 (see :data:`Progress`).
        stop: an object whose truth means "save and stop"; default: a SIGTERM handler installed
            for the run when called from the main thread.
    """

    def __init__(self, recipe: Any, build_task: Callable[[torch.device, int], Task], *, run_name: str,
                 final_file: str, resume: bool = False, device: str | torch.device | None = None,
                 progress: Progress | None = None, stop: Any = None):
        self.recipe = recipe
        self.run_name = run_name
        self.final_file = final_file
        self.build_task = build_task
        self.resume = resume
        self.device = None if device is None or str(device) == "auto" else device
        self.progress = progress
        self.stop = stop
        #: (files this fresh run made, outermost folder it made, last checkpoint step) on rank 0
        self._written: tuple[list[Path], Path | None, int] | None = None

    def run(self) -> TrainOutcome:
        from rclip_core.device import resolve_device
        from rclip_core.dist import cleanup, init_distributed

        info = init_distributed(device=None if self.device is None else resolve_device(str(self.device)))
        deterministic = (torch.are_deterministic_algorithms_enabled(),
                         torch.is_deterministic_algorithms_warn_only_enabled())
        try:
            if info.device.type == "cpu":  # exact resume needs bit-reproducible kernels
                torch.use_deterministic_algorithms(True, warn_only=True)
            return self._run(info)
        except BaseException:
            if self._written is not None and self._written[2] < 0:  # no checkpoint of this run yet
                _remove_run_files(*self._written[:2])
            raise
        finally:
            torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
            cleanup()

    # ------------------------------------------------------------------------------------------
    def _run(self, info) -> TrainOutcome:
        from rclip_core.config.loader import dump_recipe, recipe_to_dict
        from rclip_core.dist import all_reduce_mean, barrier
        from rclip_core.engine import checkpoint as ckpt
        from rclip_core.engine.optim import build_optimizer, build_scheduler, clip_grad_per_parameter
        from rclip_core.fileio import atomic_write_json, atomic_write_text, ensure_output_dir, first_missing_dir

        recipe = self.recipe
        t_start = time.perf_counter()
        rank, world, device = info.rank, info.world_size, info.device
        main = rank == 0
        emit = self.progress if (self.progress is not None and main) else (lambda event, payload: None)
        per_pass, accum = recipe.batch.layout(world)
        max_steps = int(recipe.max_steps)
        out = Path(os.path.expanduser(recipe.output_dir))
        ckpt_dir = out / CHECKPOINT_DIR
        recipe_dict = recipe_to_dict(recipe)

        if not self.resume and (ckpt.list_checkpoints(ckpt_dir) or (out / self.final_file).exists()):
            raise InputError(f"{out} already holds a {self.run_name} run",
                             hint="pass --resume to continue it, or choose another output directory")
        latest = ckpt.load_latest(ckpt_dir, map_location="cpu") if self.resume else None
        if latest is not None:
            diff = resume_mismatch(latest.extra.get("recipe", {}), recipe_dict,
                                   tuple(getattr(recipe, "RESUMABLE_CHANGES", ())))
            if diff is not None:
                raise InputError(f"cannot resume: the recipe's {diff!r} section differs from the run in {out}",
                                 hint="resume with the same recipe and options (only max_steps, checkpoint_every, "
                                      "logging.*, test.* and eval.* may change)")
            saved_world = len(_legacy_ranks(latest.extra, latest.state))
            if saved_world and saved_world != world:
                raise InputError(f"cannot resume: the checkpoint in {ckpt_dir} was written by {saved_world} "
                                 f"process(es), this run has {world}",
                                 hint=f"resume with --nproc {saved_world}: each process's data order and random "
                                      "state are in the checkpoint (DataLoader workers may change)")
        seed_everything(recipe.seed + rank)
        task = self.build_task(device, rank)
        trainable = task.trainable_module()
        optimizer = build_optimizer(recipe.optim, trainable)
        scheduler = build_scheduler(recipe.optim, optimizer, max_steps)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        use_amp, amp_dtype = amp_policy(bool(recipe.amp), getattr(recipe, "amp_dtype", "auto"), device)
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)

        start_step, resumed_from, ranks = 0, None, []
        if self.resume and latest is None:
            emit("note", {"message": f"no checkpoint in {ckpt_dir}: starting from step 0"})
        if latest is not None:
            task.load_trainable_state({k: v.to(device) for k, v in latest.model_state.items()})
            start_step = ckpt.restore_training_state(latest, optimizer, scheduler, rng=False)
            if scaler.is_enabled() and "scaler" in latest.extra:
                scaler.load_state_dict(latest.extra["scaler"])
            ranks = _legacy_ranks(latest.extra, latest.state)
            resumed_from = start_step
        stream = task.stream(per_pass=per_pass, accumulation=accum, rank=rank, world=world, start_step=start_step)
        # after the stream exists: making it (DataLoader workers) must not move the restored generators
        if latest is not None:
            if ranks:  # the same number of processes (checked above): an exact continuation
                mine = ranks[rank]
                if mine.get("rng") is not None:
                    ckpt.restore_rng(mine["rng"])
                stream.load_state_dict(mine.get("data") or {}, exact=True)
                task.load_rng_state(mine.get("task") or {})
            else:  # a checkpoint of rclip 0.1 without per-process states
                emit("note", {"message": "the checkpoint holds no per-process data state: the data order "
                                         "restarts (not an exact continuation)"})
                stream.load_state_dict({}, exact=False)
            emit("note", {"message": f"resumed from {latest.path} (step {start_step})"})
        if start_step >= max_steps:
            emit("note", {"message": f"the run already reached max_steps={max_steps}"})

        metrics_path = out / METRICS_FILE
        tb = None
        # a fresh run that fails before its first checkpoint removes what it wrote (the recipe,
        # the metrics log, TensorBoard events, folders it made): nothing is left to resume
        made_by_run: list[Path] = []
        created = first_missing_dir(out) if main else None
        if main and resumed_from is None:
            made_by_run = [p for p in (out / RECIPE_FILE, metrics_path, out / "tensorboard", ckpt_dir)
                           if not p.exists()]
        if main:
            ensure_output_dir(out)
            if resumed_from is None:
                self._written = (made_by_run, created, -1)
            (out / STOPPED_FILE).unlink(missing_ok=True)
            atomic_write_text(out / RECIPE_FILE, dump_recipe(recipe))
            ckpt.trim_metrics_log(metrics_path, start_step if resumed_from is not None else 0)
            if recipe.logging.tensorboard:
                tb = _TensorBoard(out / "tensorboard", purge_step=start_step + 1 if resumed_from else None)
        barrier()

        module: nn.Module = task
        ddp = None
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp = DDP(task, device_ids=[device.index] if device.type == "cuda" else None, **task.ddp_kwargs)
            module = ddp
        emit("start", {"start_step": start_step, "max_steps": max_steps, "world_size": world, "per_pass": per_pass,
                       "accumulation": accum, "device": str(device), "amp": use_amp,
                       "amp_dtype": str(amp_dtype).replace("torch.", "") if use_amp else None,
                       "trainable_parameters": sum(p.numel() for p in params)})

        stop = self.stop
        handler = None
        if stop is None and threading.current_thread() is threading.main_thread():
            handler = stop = ckpt.install_sigterm_handler()
        sleep_after = int(os.environ.get(SLEEP_HOOK_ENV, "0") or 0)
        last_saved = start_step if resumed_from is not None else -1

        def save(step: int) -> None:
            nonlocal last_saved
            mine = {"rng": ckpt.rng_state(), "data": stream.state_dict(), "task": task.rng_state()}
            gathered = _gather_objects(mine)
            if main:
                extra = {"recipe": recipe_dict, "world_size": world, "task": self.run_name, "ranks": gathered}
                if scaler.is_enabled():
                    extra["scaler"] = scaler.state_dict()
                path = ckpt.save_checkpoint(ckpt_dir, step, task.trainable_state(), optimizer, scheduler,
                                            extra=extra, rng=False, keep_last=recipe.logging.keep_checkpoints)
                emit("checkpoint", {"step": step, "path": str(path)})
            barrier()
            last_saved = step
            if self._written is not None:
                self._written = (*self._written[:2], step)

        images_per_step = per_pass * accum * world
        window: dict[str, float] = {}
        window_steps = 0
        t_window = time.perf_counter()
        timed_steps, timed_seconds = 0, 0.0
        last_metrics: dict[str, float] = {}
        stopped = False
        step = start_step
        objective = task.objective
        try:
            while step < max_steps:
                t0 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                step_values: dict[str, float] = {}
                for micro in range(accum):
                    batch = stream.next_batch()
                    sync = contextlib.nullcontext() if (ddp is None or micro == accum - 1) else ddp.no_sync()
                    with sync:
                        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                            losses = module(batch)
                        total = losses[objective]
                        if not torch.isfinite(total.detach()):
                            raise RuntimeFailure(f"the loss is {float(total.detach())} at step {step + 1}",
                                                 hint="lower optim.lr, or check the data (degenerate boxes?)")
                        scaler.scale(total / accum).backward()
                    for k, v in losses.items():
                        step_values[k] = step_values.get(k, 0.0) + float(v.detach()) / accum
                lr = float(optimizer.param_groups[0]["lr"])
                if recipe.optim.clip_norm is not None:
                    scaler.unscale_(optimizer)
                    clip_grad_per_parameter(params, recipe.optim.clip_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                task.after_step()
                step += 1
                now = time.perf_counter()
                seconds = now - t0
                if step - start_step > 1:  # the first step pays for warm-up (allocations, workers)
                    timed_steps += 1
                    timed_seconds += seconds
                for k, v in step_values.items():
                    window[k] = window.get(k, 0.0) + v
                window["seconds"] = window.get("seconds", 0.0) + seconds
                window_steps += 1
                logged = step % recipe.logging.log_every == 0 or step == max_steps or step == start_step + 1
                shown = dict(step_values)
                ips = images_per_step * window_steps / max(now - t_window, 1e-9)
                epoch = getattr(stream, "epoch", None)
                if logged:
                    shown = all_reduce_mean({k: v / window_steps for k, v in window.items()})
                    last_metrics = {"step": step, "lr": lr, **shown, "images_per_s": ips, "time": now - t_start}
                    if epoch is not None:
                        last_metrics["epoch"] = epoch
                    if main:
                        append_jsonl(metrics_path, last_metrics)
                    if tb is not None:
                        tb.log(step, {"lr": lr, "images_per_s": ips,
                                      **{f"loss/{k}": v for k, v in shown.items() if k != "seconds"}})
                    window, window_steps, t_window = {}, 0, now
                emit("step", StepReport(step=step, max_steps=max_steps, losses=shown, lr=lr, images_per_s=ips,
                                        seconds=shown.get("seconds", seconds), elapsed_s=now - t_start,
                                        epoch=epoch, logged=logged))
                if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and step < max_steps:
                    save(step)
                if sleep_after and step == sleep_after:
                    time.sleep(600)
                if _any_process(bool(stop), device) and step < max_steps:
                    if last_saved != step:
                        save(step)
                    stopped = True
                    if main:
                        atomic_write_json(out / STOPPED_FILE, {"step": step, "checkpoint": str(ckpt_dir)})
                    emit("stopped", {"step": step})
                    break
                if task.eval_every and step % task.eval_every == 0 and step < max_steps:
                    task.evaluate(step, final=False)
            if not stopped and last_saved != step:
                save(step)
        finally:
            if tb is not None:
                tb.close()
            if handler is not None:
                handler.uninstall()
            stream.close()

        speed = timed_steps / timed_seconds if timed_seconds > 0 else None
        result = None if stopped else task.finish(step, world, speed)
        return TrainOutcome(output_dir=out, start_step=start_step, steps=step, stopped=stopped,
                            resumed_from=resumed_from, world_size=world, seconds=time.perf_counter() - t_start,
                            steps_per_second=speed, last_metrics=last_metrics, result=result)

