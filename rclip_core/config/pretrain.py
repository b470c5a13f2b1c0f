"""The recipe of ``rclip pretrain``: every key, its type, its default, and the checks made
before any work starts.

Two modes share one schema:

``regionclip``  RegionCLIP region-text pretraining (paper sec. 3.1-3.3; official
                ``clip_rcnn.py: PretrainFastRCNN``): a frozen teacher CLIP, a
                student initialised from it (stem + res2 frozen, BN frozen, text tower frozen),
                regions from an offline RPN / random boxes / jittered ground-truth boxes /
                pseudo-label shards, and the three losses of paper eq. 5.
``image_text``  a CLIP trained from scratch, both towers, with the standard CLIP loss and a
                learned logit scale (how ShapesWorld gets its teacher).

The paper recipes (``recipes/regionclip_*.yaml``) set the paper's values explicitly; the
defaults here are the same values where the paper names one (official
``configs/pretrain/RegionCLIP_RN50.yaml``), so that a recipe only
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

from rclip_core.config.loader import load_recipe
from rclip_core.config.sections import ModelSource, TrainRecipe
from rclip_core.errors import ConfigError, InputError
from rclip_core.models.clip import FREEZE_AT_MAX

__all__ = [
    "ModelConfig",
    "DataConfig",
    "RPNConfig",
    "RegionsConfig",
    "ConceptsConfig",
    "LossesConfig",
    "EvalConfig",
    "PretrainRecipe",
    "load_pretrain_recipe",
    "check_recipe_inputs",
    "resolve_data_path",
]


@dataclass(kw_only=True)
class ModelConfig:
    """teacher: the frozen CLIP that pseudo-labels regions (official ``teacher_backbone``; paper: OpenAI CLIP).
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
        if not 0 <= self.freeze_at <= FREEZE_AT_MAX:
            raise ValueError(f"model.freeze_at must be in 0..{FREEZE_AT_MAX}, got {self.freeze_at}")
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
    input_path: region mode: how a training image reaches the model.
        ``rclip`` (default): Detectron2 ``ResizeShortestEdge`` sizes (``int(x + 0.5)``, the
        sizes of inference: 1920x1080 -> 1333x750), the RPN branch gets the 0-255 pixel
        values, and the image-text loss boxes each image's own extent [0, 0, w_i, h_i], so an
        image's embedding does not depend on the other images of its batch.
        ``official``: the released pretraining code (``detectron2/data/transforms/build.py:
        build_clip_transforms`` with the vendored torchvision ``Resize``, ``clip_rcnn.py:
        PretrainFastRCNN``): truncated sizes (1920x1080 -> 1333x749; an image whose short side
        already equals the target is not resized), the RPN branch gets ``ToTensor(x) * 255``
        in BGR (in float32 the same numbers as the pixel values), and the whole-image box is the padded batch canvas [0, 0, W_pad, H_pad] for
        every image. Use it to reproduce the official pretraining step for step.
    image_size: image_text mode: the square the whole image is resized to; it must be the
        architecture's native resolution (the default), whose attention pool has a fixed grid.
    num_workers: DataLoader worker processes (decoding); 0 = in the training process.
    max_images: train on the first N distinct images of the caption files only (in file order,
        the order in which ``rclip pseudo-label --max-images N`` labels them); caption files only.
    max_bad_items: training items that may be skipped on each process before the run stops
        (unreadable or missing images, a text file named .jpg, shard samples without a caption,
        shards that break off); the first few are named, and the counts are in the result.
        0 = stop at the first; null = never stop.
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
    input_path: Literal["rclip", "official"] = "rclip"
    image_size: int | None = None
    num_workers: int = 4
    max_images: int | None = None
    max_bad_items: int | None = 100

    def __post_init__(self) -> None:
        if self.max_bad_items is not None and self.max_bad_items < 0:
            raise ValueError(f"data.max_bad_items must be >= 0 (or null), got {self.max_bad_items}")
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
    """The offline RPN of ``regions.source: rpn`` (official ``OFFLINE_RPN_NMS_THRESH`` 0.5,
    ``PRETRAIN_RPN_REGIONS`` 300).

    weights: an ``rpn_*.pth`` file, a named RPN (``rpn-lvis-866``), or empty = the RPN stored in
        the student's (else the teacher's) weights file (official pretrained files carry one).
    """

    weights: str | None = None
    pre_nms_topk: int = 1000
    post_nms_topk: int = 300
    nms: float = 0.5

    def __post_init__(self) -> None:
        if self.pre_nms_topk < 1 or self.post_nms_topk < 1:
            raise ValueError("regions.rpn top-k values must be positive")
        if not 0.0 < self.nms <= 1.0:
            raise ValueError("regions.rpn.nms must be in (0, 1]")


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
    """The concept pool regions are labelled with (official ``MODEL.CLIP.CONCEPT_POOL_EMB``,
    ``CONCEPT_THRES``).

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
class PretrainRecipe(TrainRecipe):
    """The whole recipe of ``rclip pretrain`` (see the module docstring and each section; the
    shared ``optim``, ``batch``, ``logging``, ``amp`` keys are :mod:`rclip_core.config.sections`)."""

    mode: Literal["regionclip", "image_text"] = "regionclip"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    regions: RegionsConfig = field(default_factory=RegionsConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    losses: LossesConfig = field(default_factory=LossesConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    #: old spellings, accepted for one release with a warning
    RENAMED_KEYS = {"regions.rpn.nms_thresh": "regions.rpn.nms"}

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


def load_pretrain_recipe(path: str | os.PathLike, overrides: dict[str, str] | None = None,
                         warnings: list[str] | None = None) -> PretrainRecipe:
    """Read and validate a recipe (ConfigError naming the key for unknown keys, wrong types);
    deprecated key spellings add a line to ``warnings``."""
    return load_recipe(path, PretrainRecipe, overrides, warnings)


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
            from rclip_core.weights.registry import REGISTRY

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
            from rclip_core.weights.registry import REGISTRY

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
