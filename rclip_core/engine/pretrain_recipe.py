"""The recipe of ``rclip pretrain``: every key, its type, its default, and the checks made
before any work starts.

Two modes share one schema:

``regionclip``  RegionCLIP region-text pretraining (spec section 4): a frozen teacher CLIP, a
                student initialised from it (stem + res2 frozen, BN frozen, text tower frozen),
                regions from an offline RPN / random boxes / jittered ground-truth boxes /
                pseudo-label shards, and the three losses of paper eq. 5.
``image_text``  a CLIP trained from scratch, both towers, with the standard CLIP loss and a
                learned logit scale (how ShapesWorld gets its teacher).

The paper recipes (``recipes/regionclip_*.yaml``) set the paper's values explicitly; the
defaults here are the same values where the paper names one (spec 4.5), so that a recipe only
has to name what differs. Ablation switches (Tables 5-7, 9) are keys, not code paths:
``losses.image_text_contrastive: 0`` (Table 5), ``regions.source: random`` (Table 6),
``losses.region_concept_contrastive: 0`` / ``losses.concept_distillation: 0`` (Table 7),
``model.teacher`` / ``model.student`` (Table 9).

Relative data paths (``data.captions``, ``data.images_root``, ``regions.gt_boxes``,
``regions.shards``, ``concepts.pool`` / ``embeddings`` when they name files, ``eval.*``) are
resolved against ``data.root`` when it is set, else against the current directory; model
weight paths and ``output_dir`` always against the current directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from rclip_core.config import RunConfig, load_recipe
from rclip_core.errors import ConfigError, InputError

__all__ = [
    "ModelSource",
    "ModelConfig",
    "DataConfig",
    "RPNConfig",
    "RegionsConfig",
    "ConceptsConfig",
    "LossesConfig",
    "OptimConfig",
    "BatchConfig",
    "LoggingConfig",
    "EvalConfig",
    "PretrainRecipe",
    "load_pretrain_recipe",
    "check_recipe_inputs",
    "resolve_data_path",
]


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
class ModelConfig:
    """teacher: the frozen CLIP that pseudo-labels regions (spec 4.1; paper: OpenAI CLIP).
    student: the model being trained; when empty it starts from the teacher's weights (paper).
    architecture: image_text mode only: the CLIP architecture trained from scratch
        (``shapes-tiny``, ``test-micro``, ``RN50-quickgelu``, ...).
    freeze_at: Detectron2 ``FREEZE_AT``: 0 = nothing frozen, 1 = stem, 2 = stem + res2 (paper),
        ... 5 = everything up to res5. BN statistics are always frozen (FrozenBN).
    init_logit_scale, max_logit_scale: image_text mode: CLIP's learned temperature starts at
        1/0.07 and is clamped at 100, as in CLIP.
    """

    teacher: ModelSource = field(default_factory=ModelSource)
    student: ModelSource = field(default_factory=ModelSource)
    architecture: str | None = None
    freeze_at: int = 2
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        if not 0 <= self.freeze_at <= 5:
            raise ValueError(f"model.freeze_at must be in 0..5, got {self.freeze_at}")
        if self.init_logit_scale <= 0 or self.max_logit_scale <= 0:
            raise ValueError("model.init_logit_scale and model.max_logit_scale must be positive")


@dataclass(kw_only=True)
class DataConfig:
    """root: base directory of the relative data paths below.
    captions: caption files or shards (``rclip_core.data.captions`` formats: JSONL, COCO captions
        JSON, CSV/TSV with an image column, webdataset ``.tar`` shards, brace patterns).
    format: force one caption format (default: from each file's extension).
    images_root: base of relative image paths in the caption files (default: each file's folder).
    caption_choice: ``random`` = one caption per image and epoch (paper); ``first``.
    short_sides: region mode: the short side is drawn from these per image (paper: [800]);
        ``max_size`` caps the long side (paper 1333); ``interpolation`` bicubic as the paper's
        ``INTERPOLATION 3``.
    flip: random horizontal flip (paper: yes; off for ShapesWorld, whose captions say
        "left of" / "right of").
    image_size: image_text mode: the square the whole image is resized to; it must be the
        architecture's native resolution (the default), whose attention pool has a fixed grid.
    num_workers: DataLoader worker processes (decoding); 0 = in the training process.
    max_images: train on the first N distinct images of the caption files only (in file order,
        the order in which ``rclip pseudo-label --max-images N`` labels them); caption files only.
    """

    root: str | None = None
    captions: list[str] = field(default_factory=list)
    format: str | None = None
    images_root: str | None = None
    caption_choice: Literal["random", "first"] = "random"
    short_sides: list[int] = field(default_factory=lambda: [800])
    max_size: int = 1333
    interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    flip: bool = True
    image_size: int | None = None
    num_workers: int = 4
    max_images: int | None = None

    def __post_init__(self) -> None:
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"data.max_images must be >= 1, got {self.max_images}")
        if not self.short_sides or any(s < 16 for s in self.short_sides):
            raise ValueError("data.short_sides must list sizes of at least 16 pixels")
        if self.max_size < max(self.short_sides):
            raise ValueError("data.max_size must be at least the largest of data.short_sides")
        if self.image_size is not None and self.image_size < 32:
            raise ValueError("data.image_size must be at least 32")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")


@dataclass(kw_only=True)
class RPNConfig:
    """The offline RPN of ``regions.source: rpn`` (spec 4.3: NMS 0.5, 300 proposals).

    weights: an ``rpn_*.pth`` file, a named RPN (``rpn-lvis-866``), or empty = the RPN stored in
        the student's (else the teacher's) weights file (official pretrained files carry one).
    """

    weights: str | None = None
    pre_nms_topk: int = 1000
    post_nms_topk: int = 300
    nms_thresh: float = 0.5

    def __post_init__(self) -> None:
        if self.pre_nms_topk < 1 or self.post_nms_topk < 1:
            raise ValueError("regions.rpn top-k values must be positive")
        if not 0.0 < self.nms_thresh <= 1.0:
            raise ValueError("regions.rpn.nms_thresh must be in (0, 1]")


@dataclass(kw_only=True)
class RegionsConfig:
    """source:
        ``rpn``: offline RPN proposals (paper), ``per_image`` sampled at random from them;
        ``random``: random grid-aligned boxes (official ``CROP_REGION_TYPE RANDOM``; Table 6);
        ``gt_jitter``: ground-truth boxes from ``gt_boxes`` (COCO instances JSON or boxes JSON),
            each drawn with replacement and jittered by up to ``jitter`` of its size - for
            synthetic data, where no trained RPN exists;
        ``shards``: boxes and pseudo labels precomputed by ``rclip pseudo-label`` in ``shards``.
    per_image: regions per image (paper: 100 of 300 proposals).
    """

    source: Literal["rpn", "random", "gt_jitter", "shards"] = "rpn"
    per_image: int = 100
    rpn: RPNConfig = field(default_factory=RPNConfig)
    random_min_size: float = 0.0
    random_grid: int = 8
    gt_boxes: str | None = None
    jitter: float = 0.1
    shards: str | None = None

    def __post_init__(self) -> None:
        if self.per_image < 1:
            raise ValueError("regions.per_image must be at least 1")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError("regions.jitter must be in [0, 1)")
        if self.random_grid < 1:
            raise ValueError("regions.random_grid must be at least 1")
        if self.source == "gt_jitter" and not self.gt_boxes:
            raise ValueError("regions.gt_boxes is required with regions.source gt_jitter")
        if self.source == "shards" and not self.shards:
            raise ValueError("regions.shards is required with regions.source shards")


@dataclass(kw_only=True)
class ConceptsConfig:
    """The concept pool regions are labelled with (spec 4.1, 4.3).

    pool: a built-in list (``coco-nouns``: the paper's 4764 COCO-caption nouns,
        ``googlecc-nouns``, ``coco``, ``lvis``, ...), a text file (one concept per line or
        ``noun,count``), or a COCO instances JSON (its category names in id order; ShapesWorld's
        ``instances_train.json``). With ``regions.source: shards`` it defaults to the shards' pool.
    embeddings: the student's pool embeddings [N, D]: an official ``*_emb.pth``, an rclip
        embeddings file or a named one (``emb-coco-nouns-4764-emb``); empty = computed with the
        student's text tower and the prompt ensemble below (the official tool's recipe).
    teacher_embeddings: the teacher's pool (``TEACHER_CONCEPT_POOL_EMB``); empty = computed with
        the teacher's text tower (the same as the student's unless the backbones differ).
    threshold: pseudo labels are kept when the teacher's max probability is > threshold (0.1).
    """

    pool: str | None = None
    embeddings: str | None = None
    teacher_embeddings: str | None = None
    templates: str | list[str] = "clip81"
    average: Literal["raw", "normalized"] = "raw"
    threshold: float = 0.1

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError("concepts.threshold must be in [0, 1)")


@dataclass(kw_only=True)
class LossesConfig:
    """Weights of paper eq. 5; 0 switches a term off (not computed). temperature: the fixed
    CLSS_TEMP 0.01 of the student's losses; teacher_temperature: of the teacher softmax."""

    region_concept_contrastive: float = 1.0
    concept_distillation: float = 1.0
    image_text_contrastive: float = 1.0
    temperature: float = 0.01
    teacher_temperature: float = 0.01

    def __post_init__(self) -> None:
        for name in ("region_concept_contrastive", "concept_distillation", "image_text_contrastive"):
            if getattr(self, name) < 0:
                raise ValueError(f"losses.{name} must be >= 0")
        if self.temperature <= 0 or self.teacher_temperature <= 0:
            raise ValueError("loss temperatures must be positive")

    def weights(self) -> dict[str, float]:
        return {"region_concept_contrastive": self.region_concept_contrastive,
                "concept_distillation": self.concept_distillation,
                "image_text_contrastive": self.image_text_contrastive}

    @property
    def region_terms(self) -> bool:
        return self.region_concept_contrastive > 0 or self.concept_distillation > 0


@dataclass(kw_only=True)
class OptimConfig:
    """Spec 4.5: SGD, lr 0.002, momentum 0.9, wd 1e-4 (none on norm layers), linear warmup
    1000 iterations from 0.001, x0.1 at 300k and 525k, each parameter's gradient clipped to
    L2 norm 5.0 separately (``clip_norm: null`` = no clipping).

    ``name: adamw`` (betas, eps) and ``schedule: cosine`` (warmup, then cosine decay to
    ``lr * min_lr_factor`` at max_steps) are for training a CLIP from scratch (image_text).
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
        if self.lr <= 0:
            raise ValueError("optim.lr must be positive")
        if self.weight_decay < 0:
            raise ValueError("optim.weight_decay must be >= 0")
        if self.warmup_iters < 0:
            raise ValueError("optim.warmup_iters must be >= 0")
        if list(self.steps) != sorted(self.steps):
            raise ValueError("optim.steps must be increasing")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError("optim.clip_norm must be positive (or null for no clipping)")


@dataclass(kw_only=True)
class BatchConfig:
    """images_per_process: images per process and forward pass (paper: 3 per GPU).
    grad_accum: forward passes per optimizer step (default 1, or derived from global_batch).
    global_batch: images per optimizer step over all processes (paper: 96 = 32 GPUs x 3); when
        set, ``images_per_process * grad_accum * processes`` must equal it, and a missing
        grad_accum is derived from it.

    Accumulation reproduces the summed gradient of the region losses, but the image-text
    contrast of each forward pass only sees that pass's (gathered) images: 32 GPUs x 3
    contrast 96 captions per step, 1 GPU x 3 x 32 accumulations contrast 3.
    """

    images_per_process: int = 3
    grad_accum: int | None = None
    global_batch: int | None = None

    def __post_init__(self) -> None:
        if self.images_per_process < 1:
            raise ValueError("batch.images_per_process must be at least 1")
        if self.grad_accum is not None and self.grad_accum < 1:
            raise ValueError("batch.grad_accum must be at least 1")
        if self.global_batch is not None and self.global_batch < 1:
            raise ValueError("batch.global_batch must be at least 1")

    def accumulation(self, world_size: int) -> int:
        """Forward passes per step for ``world_size`` processes; InputError when inconsistent."""
        per_pass = self.images_per_process * world_size
        if self.global_batch is None:
            return self.grad_accum or 1
        if self.grad_accum is None:
            if self.global_batch % per_pass:
                raise InputError(
                    f"batch.global_batch {self.global_batch} is not a multiple of batch.images_per_process "
                    f"{self.images_per_process} x {world_size} process(es)",
                    hint="override batch.images_per_process or batch.global_batch")
            return self.global_batch // per_pass
        if per_pass * self.grad_accum != self.global_batch:
            raise InputError(
                f"batch.global_batch {self.global_batch} != batch.images_per_process {self.images_per_process} "
                f"x batch.grad_accum {self.grad_accum} x {world_size} process(es)",
                hint="drop batch.grad_accum to derive it, or set batch.global_batch=null")
        return self.grad_accum


@dataclass(kw_only=True)
class LoggingConfig:
    """log_every: steps between metrics.jsonl lines (and progress updates of the loss text).
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
class EvalConfig:
    """A quick zero-shot check at the end of training, on a COCO-format held-out set (the
    ShapesWorld val split): image_text mode reports image-level top-1 (each image labelled with
    its largest object's class), regionclip mode region top-1 on ground-truth boxes for the
    student and the teacher. ``instances`` empty = no check. Class names: the instances file's
    categories, embedded with ``concepts.templates``."""

    instances: str | None = None
    images: str | None = None
    max_images: int | None = None
    short_side: int | None = None

    def __post_init__(self) -> None:
        if self.instances and not self.images:
            raise ValueError("eval.images (the folder of the eval images) is required with eval.instances")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError("eval.max_images must be at least 1")


@dataclass(kw_only=True)
class PretrainRecipe(RunConfig):
    """The whole recipe of ``rclip pretrain`` (see the module docstring and each section)."""

    mode: Literal["regionclip", "image_text"] = "regionclip"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    amp: bool = True
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data.captions:
            raise ValueError("data.captions must name at least one caption file or shard")
        if self.mode == "image_text":
            if not self.model.architecture:
                raise ValueError("model.architecture (e.g. shapes-tiny) is required in image_text mode")
            if self.model.teacher.given or self.model.student.given:
                raise ValueError("model.teacher / model.student are not used in image_text mode, which "
                                 "trains model.architecture from scratch")
        else:
            if not self.model.teacher.given and not self.model.student.given:
                raise ValueError("model.teacher (weights or model) is required in regionclip mode")
            if self.losses.region_terms and self.regions.source != "shards" and not self.model.teacher.given:
                raise ValueError("model.teacher is required to pseudo-label regions online "
                                 "(or use regions.source shards)")
            if self.losses.region_terms and self.regions.source != "shards" and not self.concepts.pool \
                    and not self.concepts.embeddings:
                raise ValueError("concepts.pool is required for the region losses")
            if not (self.losses.region_terms or self.losses.image_text_contrastive > 0):
                raise ValueError("every loss term is switched off (losses.*)")


def load_pretrain_recipe(path: str | os.PathLike, overrides: dict[str, str] | None = None) -> PretrainRecipe:
    """Read and validate a recipe (ConfigError naming the key for unknown keys, wrong types)."""
    return load_recipe(path, PretrainRecipe, overrides)


def resolve_data_path(recipe: PretrainRecipe, path: str) -> str:
    """A data path as the run will use it: relative ones start at ``data.root`` when set.
    URLs (``pipe:``, ``http://``) and brace patterns are left alone apart from the prefix."""
    if "://" in path or path.startswith("pipe:") or os.path.isabs(path) or not recipe.data.root:
        return os.path.expanduser(path)
    return str(Path(os.path.expanduser(recipe.data.root)) / path)


def _looks_like_file(value: str) -> bool:
    return os.sep in value or "/" in value or value.endswith((".txt", ".json", ".pth", ".pt", ".safetensors"))


def check_recipe_inputs(recipe: PretrainRecipe) -> None:
    """Check that the files a recipe names exist, before any model is built or data read.

    Raises InputError naming the recipe key and the path. Caption files are checked by
    :func:`rclip_core.data.captions.resolve_sources` (formats, brace patterns, shard folders).
    """
    from rclip_core.data.captions import resolve_sources

    if recipe.data.root and not Path(os.path.expanduser(recipe.data.root)).is_dir():
        raise InputError(f"data.root {recipe.data.root} is not a directory",
                         hint="generate ShapesWorld with `rclip data shapes DIR` and pass data.root=DIR")
    try:
        resolve_sources([resolve_data_path(recipe, c) for c in recipe.data.captions], recipe.data.format)
    except InputError as e:
        raise InputError(f"data.captions: {e}", hint=e.hint) from None
    if recipe.data.images_root and not Path(resolve_data_path(recipe, recipe.data.images_root)).is_dir():
        raise InputError(f"data.images_root {resolve_data_path(recipe, recipe.data.images_root)} is not a directory")

    def must_exist(key: str, value: str | None, data_relative: bool = True) -> None:
        if not value:
            return
        p = resolve_data_path(recipe, value) if data_relative else os.path.expanduser(value)
        if not os.path.exists(p):
            raise InputError(f"{key}: {p} not found")

    for role in ("teacher", "student"):
        src: ModelSource = getattr(recipe.model, role)
        must_exist(f"model.{role}.weights", src.weights, data_relative=False)
    if recipe.mode == "image_text":
        from rclip_core.models.clip import get_architecture

        try:
            arch = get_architecture(recipe.model.architecture or "")
        except InputError as e:
            raise InputError(f"model.architecture: {e}", hint=e.hint) from None
        if recipe.data.image_size is not None and recipe.data.image_size != arch.image_size:
            raise InputError(f"data.image_size {recipe.data.image_size} differs from {arch.name}'s input size "
                             f"{arch.image_size}", hint="the attention pool has a fixed grid: leave data.image_size "
                                                        "empty or set it to the architecture's size")
    else:
        if recipe.regions.source == "gt_jitter":
            must_exist("regions.gt_boxes", recipe.regions.gt_boxes)
        if recipe.regions.source == "shards":
            must_exist("regions.shards", recipe.regions.shards)
        if recipe.regions.source == "rpn" and recipe.regions.rpn.weights:
            from rclip_core.models.registry import REGISTRY

            if recipe.regions.rpn.weights not in REGISTRY:
                must_exist("regions.rpn.weights", recipe.regions.rpn.weights, data_relative=False)
        pool = recipe.concepts.pool
        if pool and _looks_like_file(pool):
            must_exist("concepts.pool", pool)
        elif pool:
            from rclip_core.data.vocab import VOCABULARIES

            if pool.lower() not in VOCABULARIES and not os.path.exists(resolve_data_path(recipe, pool)):
                raise InputError(f"concepts.pool {pool!r} is neither a built-in list nor a file",
                                 hint="built-in: " + ", ".join(VOCABULARIES))
        for key in ("embeddings", "teacher_embeddings"):
            value = getattr(recipe.concepts, key)
            from rclip_core.models.registry import REGISTRY

            if value and value not in REGISTRY:
                must_exist(f"concepts.{key}", value)
    if recipe.eval.instances:
        must_exist("eval.instances", recipe.eval.instances)
        must_exist("eval.images", recipe.eval.images)
    try:
        from rclip_core.models.text import load_templates

        load_templates(recipe.concepts.templates)
    except InputError as e:
        raise InputError(f"concepts.templates: {e}", hint=e.hint) from None


def recipe_error(key: str, message: str) -> ConfigError:
    """A ConfigError about one key (for checks that need the run's context)."""
    return ConfigError(f"recipe key {key!r} {message}")
