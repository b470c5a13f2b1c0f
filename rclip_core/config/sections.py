"""Recipe sections that every training recipe shares: where a model comes from, the optimizer
and its schedule, the batch layout over processes, logging and checkpoints, and the AMP policy.

One type per section, one name per hyper-parameter: ``rclip pretrain`` and ``rclip finetune``
read the same keys, and only their defaults differ (the paper's pretraining values here,
the transfer values in :mod:`rclip_core.config.finetune`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rclip_core.config.loader import RunConfig
from rclip_core.errors import InputError

__all__ = ["ModelSource", "OptimConfig", "BatchConfig", "LoggingConfig", "TrainRecipe", "AMP_DTYPES", "non_finite_field"]

AMP_DTYPES = ("auto", "bf16", "fp16")


@dataclass(kw_only=True)
class ModelSource:
    """Where a CLIP comes from (the same choices as ``--weights`` / ``--model`` / ``--pretrained``).

    weights: a file: rclip ``.safetensors``, an official RegionCLIP / Detectron2 ``.pth`` (the
        ``teacher_RN50_student_RN50_OAI_CLIP.pth`` pretraining init included), an OpenAI or
        open_clip checkpoint.
    model: an architecture (``RN50-quickgelu``) with ``pretrained`` (open_clip tag, default
        openai), or a named model from ``rclip weights list`` (``clip-rn50-teacher-student``),
        downloaded with its checksum into the cache.
    random_init: untrained ``model`` (smoke tests only).
    """

    weights: str | None = None
    model: str | None = None
    pretrained: str | None = None
    random_init: bool = False

    @property
    def given(self) -> bool:
        return bool(self.weights or self.model)

    def describe(self) -> str:
        if self.weights:
            return self.weights
        if self.random_init:
            return f"random:{self.model}"
        return f"{self.model}/{self.pretrained or 'openai'}"

    def __post_init__(self) -> None:
        if self.weights and self.random_init:
            raise ValueError("random_init and weights exclude each other")
        if self.random_init and not self.model:
            raise ValueError("random_init needs model (an architecture name)")


@dataclass(kw_only=True)
class OptimConfig:
    """The optimizer and its schedule (defaults: the paper's pretraining, official
    ``pretrain/RegionCLIP_RN50.yaml``: SGD lr 0.002, momentum 0.9, weight decay 1e-4 (none on
    norm layers), linear warm-up over 1000 iterations from 0.001, x0.1 at 300k and 525k, each
    parameter's gradient clipped to L2 norm 5.0 separately; ``clip_norm: null`` = no clipping).

    ``name: adamw`` (``betas``, ``eps``; no decay on 1-D tensors) and ``schedule: cosine``
    (warm-up, then cosine decay to ``lr * min_lr_factor`` at max_steps) train a CLIP from scratch.
    """

    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    schedule: Literal["step", "cosine"] = "step"
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    steps: list[int] = field(default_factory=lambda: [300_000, 525_000])
    gamma: float = 0.1
    min_lr_factor: float = 0.0
    clip_norm: float | None = 5.0

    def __post_init__(self) -> None:
        if not self.lr > 0 or self.lr == float("inf"):
            raise ValueError("optim.lr must be a positive finite number")
        if not self.weight_decay >= 0:
            raise ValueError("optim.weight_decay must be >= 0")
        if self.warmup_iters < 0:
            raise ValueError("optim.warmup_iters must be >= 0")
        if list(self.steps) != sorted(self.steps):
            raise ValueError("optim.steps must be increasing")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError("optim.clip_norm must be positive (or null for no clipping)")


@dataclass(kw_only=True)
class BatchConfig:
    """images_per_process: images per process and forward pass (pretraining paper: 3 per GPU);
    null = global_batch / processes.
    grad_accum: forward passes per optimizer step (default 1, or derived from global_batch).
    global_batch: images per optimizer step over all processes; when set,
    ``images_per_process * grad_accum * processes`` must equal it, and a missing grad_accum is
    derived from it.

    Accumulation reproduces the summed gradient of the region and detection losses, but the
    image-text contrast of each forward pass only sees that pass's (gathered) images: 32 GPUs x 3
    contrast 96 captions per step, 1 GPU x 3 x 32 accumulations contrast 3.
    """

    images_per_process: int | None = 3
    grad_accum: int | None = None
    global_batch: int | None = None

    def __post_init__(self) -> None:
        if self.images_per_process is not None and self.images_per_process < 1:
            raise ValueError("batch.images_per_process must be at least 1")
        if self.grad_accum is not None and self.grad_accum < 1:
            raise ValueError("batch.grad_accum must be at least 1")
        if self.global_batch is not None and self.global_batch < 1:
            raise ValueError("batch.global_batch must be at least 1")
        if self.images_per_process is None and self.global_batch is None:
            raise ValueError("batch.images_per_process or batch.global_batch must be set")

    def layout(self, world_size: int) -> tuple[int, int]:
        """(images per pass and process, forward passes per step) for ``world_size`` processes;
        InputError when the numbers do not fit together."""
        per = self.images_per_process
        if per is None:
            per = int(self.global_batch or 0) // world_size
            if per < 1:
                raise InputError(f"batch.global_batch {self.global_batch} cannot be split over {world_size} "
                                 "process(es)", hint="make batch.global_batch a multiple of the processes")
        if self.global_batch is None:
            return per, self.grad_accum or 1
        per_pass = per * world_size
        if self.grad_accum is None:
            if self.global_batch % per_pass:
                raise InputError(
                    f"batch.global_batch {self.global_batch} is not a multiple of batch.images_per_process "
                    f"{per} x {world_size} process(es)",
                    hint="override batch.images_per_process or batch.global_batch")
            return per, self.global_batch // per_pass
        if per_pass * self.grad_accum != self.global_batch:
            raise InputError(
                f"batch.global_batch {self.global_batch} != batch.images_per_process {per} "
                f"x batch.grad_accum {self.grad_accum} x {world_size} process(es)",
                hint="drop batch.grad_accum to derive it, or set batch.global_batch=null")
        return per, self.grad_accum


@dataclass(kw_only=True)
class LoggingConfig:
    """log_every: steps between metrics.jsonl lines (also the first step of a run and the last).
    tensorboard: also write TensorBoard events to OUTPUT_DIR/tensorboard when it is installed.
    keep_checkpoints: keep only the newest N checkpoints (null = all)."""

    log_every: int = 20
    tensorboard: bool = True
    keep_checkpoints: int | None = 3

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError("logging.log_every must be at least 1")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError("logging.keep_checkpoints must be at least 1 (or null)")


@dataclass(kw_only=True)
class TrainRecipe(RunConfig):
    """Keys of every training recipe on top of :class:`RunConfig`.

    amp: mixed precision on CUDA (never on the CPU). amp_dtype: ``auto`` = bf16 where the GPU
    supports it, else fp16 with a gradient scaler; ``bf16`` / ``fp16`` force one (the losses and
    the cosine classifier always run in fp32). The official code trains in fp32: ``amp: false``.
    trust_weights: also read weights files that run code when loaded (pickles that need
    ``weights_only=False``, TorchScript whose state its own ``__setstate__`` builds; OpenAI's
    ``RN50.pt`` is read as data without it) wherever the recipe names weights (the CLI's
    ``--trust-weights``); refused by default.
    """

    amp: bool = True
    trust_weights: bool = False
    amp_dtype: Literal["auto", "bf16", "fp16"] = "auto"
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    #: top-level keys that may change when a run is resumed (everything else must be equal)
    RESUMABLE_CHANGES = ("output_dir", "max_steps", "checkpoint_every", "logging", "test", "eval", "trust_weights")

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = non_finite_field(self)
        if bad is not None:  # recipes built in Python skip the loader's check
            raise ValueError(f"{bad} must be a finite number")


def non_finite_field(obj: object, prefix: str = "") -> str | None:
    """The dotted name of the first NaN or infinite float in a recipe dataclass tree, or None."""
    import dataclasses
    import math

    values = ([(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj)
              else list(obj.items()) if isinstance(obj, dict)
              else [(str(i), v) for i, v in enumerate(obj)] if isinstance(obj, (list, tuple)) else [])
    for name, v in values:
        key = f"{prefix}{name}" if not isinstance(obj, (list, tuple)) else f"{prefix[:-1]}[{name}]"
        if isinstance(v, float) and not math.isfinite(v):
            return key
        if dataclasses.is_dataclass(v) or isinstance(v, (dict, list, tuple)):
            found = non_finite_field(v, key + ".")
            if found is not None:
                return found
    return None
