"""``rclip finetune``: transfer a RegionCLIP model to an open-vocabulary detector (spec 6).

The recipe (:class:`FinetuneRecipe`) names every hyper-parameter of spec 6.2/6.3 with the COCO
OVD values as defaults; the paper recipes in ``recipes/finetune_*.yaml`` spell them out.

One run (:func:`finetune`), on one process or under torchrun (DDP, gloo on CPU, nccl on GPU):

1. resolve the data (:func:`resolve_data`): COCO OVD (48 base classes for training, 65 for
   test), LVIS (866 base = common + frequent, 1203 for test), a ShapesWorld directory (its
   ``split.json``), or any COCO-format JSON with ``data.novel_classes`` (open vocabulary) or
   without (all classes: fully supervised, Table 3);
2. load the init weights (anything :func:`rclip_core.models.regionclip.load_model` reads) and
   the proposal source (the offline RPN of the weights or ``init.rpn_weights``, or a torchvision
   RPN trained with the detector), embed the class names with the init model's text tower and
   the prompt ensemble (or read ``text.*_embeddings`` files);
3. SGD with linear warm-up and steps (Detectron2 ``WarmupMultiStepLR``), AMP on CUDA,
   gradient accumulation when a GPU cannot hold its share of the global batch, multi-scale
   short side and horizontal flips, repeat-factor sampling for LVIS;
4. checkpoints every ``checkpoint_every`` steps (model, optimizer, scheduler, grad scaler, every
   rank's RNG): a killed run resumed with ``resume=True`` ends with the same weights as an
   uninterrupted one (the data stream is a pure function of the seed and the step, see
   :mod:`rclip_core.engine.detection_data`);
5. evaluation every ``test.eval_every`` steps and at the end (:func:`evaluate_detector`: COCO
   AP / AP50 with novel/base/all AP50, or LVIS APr/c/f), and the exported detector
   ``OUTPUT_DIR/detector.safetensors`` (vocabulary and embeddings inside).

Outputs in ``output_dir``: ``recipe.yaml`` (resolved), ``metrics.jsonl`` (losses, learning rate,
seconds per step, evaluations), ``checkpoints/``, ``detector.safetensors``, ``metrics.json``
(final evaluation), ``eval/detections_<step>.json`` (COCO results of each evaluation).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

import numpy as np
import torch

from rclip_core.config import RunConfig, dump_recipe, load_recipe, recipe_to_dict
from rclip_core.data.coco import DetectionSet, filter_categories, load_instances, resolve_images, split_from_names
from rclip_core.data.transforms import MAX_SIZE, TEST_SHORT_SIDE, TRAIN_SHORT_SIDES
from rclip_core.errors import InputError, RuntimeFailure
from rclip_core.models.detector import Detector, DetectorSettings

__all__ = [
    "InitConfig",
    "DataConfig",
    "TextConfig",
    "RPNConfig",
    "OfflineRPNConfig",
    "DetectorConfig",
    "OptimConfig",
    "BatchConfig",
    "TestConfig",
    "LoggingConfig",
    "ExportConfig",
    "FinetuneRecipe",
    "load_finetune_recipe",
    "ResolvedData",
    "resolve_data",
    "prompt_names",
    "class_embeddings_for",
    "build_detector",
    "detector_settings",
    "evaluate_detector",
    "set_detector_classes",
    "FinetuneResult",
    "finetune",
]

Progress = Callable[[str, dict], None]


# ============================================================================================
# Recipe
# ============================================================================================


@dataclass(kw_only=True)
class InitConfig:
    """The weights the detector starts from (spec 6.1: ``regionclip_pretrained-cc_rn50[x4].pth``).

    weights: any file ``rclip detect --weights`` reads (official RegionCLIP ``.pth``, rclip
        ``.safetensors`` from ``rclip pretrain``, OpenAI / open_clip checkpoints).
    model / pretrained: an open_clip architecture and tag (or a named model) instead of a file;
        with ``random_init`` an untrained model (tests and benchmarks only).
    rpn_weights: the offline RPN (``rpn_coco_48.pth`` for COCO, ``rpn_lvis_866_lsj.pth`` for
        LVIS); empty = the RPN inside ``weights`` (pretrained files carry the LVIS-866 FPN).
    freeze_at: 2 = stem and layer1 frozen (the paper); BN is always frozen.
    """

    weights: str | None = None
    model: str | None = None
    pretrained: str | None = None
    random_init: bool = False
    rpn_weights: str | None = None
    freeze_at: int = 2

    def __post_init__(self) -> None:
        if self.weights and self.random_init:
            raise ValueError("init.random_init and init.weights exclude each other")
        if self.random_init and not self.model:
            raise ValueError("init.random_init needs init.model (an architecture name)")
        if not 0 <= self.freeze_at <= 4:
            raise ValueError(f"init.freeze_at must be in 0..4, got {self.freeze_at}")


@dataclass(kw_only=True)
class DataConfig:
    """dataset: ``coco`` (``images`` = the COCO root with ``annotations/``, ``train2017/``,
        ``val2017/``), ``lvis`` (``images`` = the COCO root; ``annotations/lvis_v1_{train,val}.json``
        there or in ``val_dataset``), a ShapesWorld directory (``rclip data shapes``), or a
        COCO-format instances JSON (with ``images`` = its image folder).
    val_dataset / val_images: the evaluation set of a custom JSON (default: none, no evaluation).
    novel_classes: names or ids of the classes held out of training (custom JSON; overrides the
        split of a ShapesWorld). mode: ``ovd`` = train on base classes and test on all, ``fully``
        = train and test on all classes (Table 3), ``auto`` = ovd when a split is known.
    train_short_sides / max_size: multi-scale training (640..800 step 32, max 1333); flip_prob:
        horizontal flips; test_short_side / test_max_size: evaluation resize (800 / 1333).
    max_gt_per_image: keep the first N boxes of an image (LVIS loads: 500).
    sampler: ``uniform`` or ``repeat_factor`` (LVIS, threshold ``repeat_threshold`` 0.001).
    num_workers: DataLoader processes for decoding; 0 = in the training process.
    """

    dataset: str | None = None
    images: str | None = None
    val_dataset: str | None = None
    val_images: str | None = None
    novel_classes: list[str | int] | None = None
    mode: Literal["auto", "ovd", "fully"] = "auto"
    train_short_sides: list[int] = field(default_factory=lambda: list(TRAIN_SHORT_SIDES))
    max_size: int = MAX_SIZE
    flip_prob: float = 0.5
    test_short_side: int = TEST_SHORT_SIDE
    test_max_size: int = MAX_SIZE
    max_gt_per_image: int | None = None
    sampler: Literal["uniform", "repeat_factor"] = "uniform"
    repeat_threshold: float = 0.001
    num_workers: int = 4

    def __post_init__(self) -> None:
        if not self.train_short_sides or any(s < 16 for s in self.train_short_sides):
            raise ValueError("data.train_short_sides must list sizes of at least 16 pixels")
        if self.max_size < max(self.train_short_sides) or self.test_max_size < self.test_short_side:
            raise ValueError("data.max_size must be at least the largest short side")
        if self.test_short_side < 16:
            raise ValueError("data.test_short_side must be at least 16")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError("data.flip_prob must be in [0, 1]")
        if self.repeat_threshold <= 0:
            raise ValueError("data.repeat_threshold must be positive")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if self.max_gt_per_image is not None and self.max_gt_per_image < 1:
            raise ValueError("data.max_gt_per_image must be >= 1")


@dataclass(kw_only=True)
class TextConfig:
    """Class embeddings (the classifier, spec 1.6). Computed with the init model's text tower
    and ``templates`` (``clip81``: the 81-template ensemble; ``single``; a file; a list) averaged
    ``raw`` (the released files) or ``normalized``; or read from ``test_embeddings`` (rows = the
    test classes in ascending category id, e.g. ``coco_65_cls_emb.pth``) and ``train_embeddings``
    (rows = the training classes, e.g. ``coco_48_base_cls_emb.pth``; default: the test rows of
    the training classes)."""

    templates: str | list[str] = "clip81"
    average: Literal["raw", "normalized"] = "raw"
    train_embeddings: str | None = None
    test_embeddings: str | None = None


@dataclass(kw_only=True)
class RPNConfig:
    """The torchvision RPN trained with the detector (``detector.proposals: trained``); Detectron2's
    C4 defaults."""

    anchor_sizes: list[float] = field(default_factory=lambda: [32.0, 64.0, 128.0, 256.0, 512.0])
    anchor_ratios: list[float] = field(default_factory=lambda: [0.5, 1.0, 2.0])
    fg_iou: float = 0.7
    bg_iou: float = 0.3
    batch_per_image: int = 256
    positive_fraction: float = 0.5
    pre_nms_topk_train: int = 12000
    post_nms_topk_train: int = 2000
    pre_nms_topk_test: int = 6000
    post_nms_topk_test: int = 1000
    nms: float = 0.7


@dataclass(kw_only=True)
class OfflineRPNConfig:
    """The frozen offline RPN (spec 1.9, 6.1): NMS 0.7, 1000 proposals in training and test;
    ``pre_nms_topk`` null = the RPN config's own (6000 for C4, 1000 per level for FPN).
    ``kind``: the RPN the recipe expects (``coco_c4``, ``lvis_866_lsj_fpn``); a different one
    is refused, so a forgotten ``init.rpn_weights`` cannot silently train on the wrong proposals."""

    kind: str | None = None
    pre_nms_topk: int | None = None
    post_nms_topk: int = 1000
    nms: float = 0.7


@dataclass(kw_only=True)
class DetectorConfig:
    """Spec 6.2: 512 RoIs per image, <= 25 % foreground at IoU >= 0.5, ground truth appended to
    the proposals; COCO loss: focal-scaled CE (``focal_gamma`` 0.5) with background RoIs x
    ``bg_weight`` 0.2; LVIS: ``focal_gamma: null`` (class-weighted CE) and ``bg_weight`` 0.8;
    class-agnostic box regression with weights (10, 10, 5, 5), L1 loss; ``mask_head`` (LVIS).
    ``proposals``: ``offline`` (official) or ``trained`` (torchvision RPN on res4, ``rpn.*``)."""

    proposals: Literal["offline", "trained"] = "offline"
    offline_rpn: OfflineRPNConfig = field(default_factory=OfflineRPNConfig)
    rpn: RPNConfig = field(default_factory=RPNConfig)
    rois_per_image: int = 512
    positive_fraction: float = 0.25
    fg_iou: float = 0.5
    append_gt: bool = True
    focal_gamma: float | None = 0.5
    bg_weight: float | None = 0.2
    box_reg_weights: list[float] = field(default_factory=lambda: [10.0, 10.0, 5.0, 5.0])
    box_loss_weight: float = 1.0
    mask_head: bool = False
    mask_loss_weight: float = 1.0
    temperature: float = 0.01


@dataclass(kw_only=True)
class OptimConfig:
    """Spec 6.3: SGD lr 0.002, momentum 0.9, wd 1e-4 (none on norm layers), linear warm-up 5000
    iterations from 0.001, x0.1 at ``steps`` (COCO 60k/80k of 90k; LVIS 120k/160k of 180k).
    ``clip_norm``: per-parameter gradient clipping (null = off, as the official transfer)."""

    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_iters: int = 5000
    warmup_factor: float = 0.001
    steps: list[int] = field(default_factory=lambda: [60_000, 80_000])
    gamma: float = 0.1
    clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("optim.lr must be positive")
        if self.weight_decay < 0 or self.warmup_iters < 0:
            raise ValueError("optim.weight_decay and optim.warmup_iters must be >= 0")
        if list(self.steps) != sorted(self.steps):
            raise ValueError("optim.steps must be increasing")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError("optim.clip_norm must be positive (or null)")


@dataclass(kw_only=True)
class BatchConfig:
    """global_batch: images per optimizer step over all processes (the paper: 16).
    images_per_process: images per process and forward pass; null = global_batch / processes.
    When set smaller, gradients are accumulated over global_batch / (images_per_process x
    processes) passes."""

    global_batch: int = 16
    images_per_process: int | None = None

    def __post_init__(self) -> None:
        if self.global_batch < 1:
            raise ValueError("batch.global_batch must be >= 1")
        if self.images_per_process is not None and self.images_per_process < 1:
            raise ValueError("batch.images_per_process must be >= 1")

    def layout(self, world_size: int) -> tuple[int, int]:
        """(images per pass and process, accumulation passes) for ``world_size`` processes."""
        per = self.images_per_process or self.global_batch // world_size
        if per < 1 or per * world_size > self.global_batch or self.global_batch % (per * world_size):
            raise InputError(f"batch.global_batch {self.global_batch} cannot be split over {world_size} process(es) "
                             f"x {self.images_per_process or 'auto'} image(s)",
                             "make batch.global_batch a multiple of processes x batch.images_per_process")
        return per, self.global_batch // (per * world_size)


@dataclass(kw_only=True)
class TestConfig:
    """Spec 6.3: COCO score threshold 0.001 / 100 detections / no fusion; LVIS 0.02 / 300 /
    ``fusion: official`` (sqrt(prob x raw RPN logit)); per-class NMS 0.5 or gaussian
    ``soft_nms`` (sigma 0.5, prune 0.001; the official test script). ``eval_every``: steps
    between evaluations during training (0 = only at the end); ``max_images``: periodic
    evaluations use the first N images only (the final one uses all); ``final_eval``: evaluate
    after the last step; ``backend``: faster | pycocotools | lvis."""

    score_thresh: float = 0.001
    nms: float = 0.5
    max_dets: int = 100
    fusion: Literal["none", "official", "sigmoid"] = "none"
    soft_nms: bool = False
    soft_nms_sigma: float = 0.5
    soft_nms_prune: float = 0.001
    chunk_size: int = 256
    eval_every: int = 0
    max_images: int | None = None
    final_eval: bool = True
    backend: Literal["faster", "pycocotools", "lvis"] = "faster"

    def __post_init__(self) -> None:
        if self.eval_every < 0:
            raise ValueError("test.eval_every must be >= 0")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError("test.max_images must be >= 1")


@dataclass(kw_only=True)
class LoggingConfig:
    log_every: int = 20
    keep_checkpoints: int | None = 3

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError("logging.log_every must be >= 1")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError("logging.keep_checkpoints must be >= 1 (or null)")


@dataclass(kw_only=True)
class ExportConfig:
    """include_text: keep the text tower in ``detector.safetensors`` so that ``rclip detect
    --classes`` can embed new class names (RN50: +255 MB); false = like the official files."""

    include_text: bool = True


@dataclass(kw_only=True)
class FinetuneRecipe(RunConfig):
    """The whole recipe of ``rclip finetune`` (defaults: COCO OVD, RN50, 1x; spec 6)."""

    output_dir: str = "runs/finetune"
    max_steps: int = 90_000
    checkpoint_every: int = 5000
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    test: TestConfig = field(default_factory=TestConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    amp: bool = True


def load_finetune_recipe(path: str | os.PathLike | None, overrides: Mapping[str, str] | None = None
                         ) -> FinetuneRecipe:
    """Read and validate a recipe (or the defaults when ``path`` is None) with dotted overrides."""
    if path is None:
        from rclip_core.config import build_recipe

        return build_recipe({}, FinetuneRecipe, overrides)
    return load_recipe(path, FinetuneRecipe, overrides)


def detector_settings(recipe: FinetuneRecipe) -> DetectorSettings:
    """The recipe's detector and test sections as :class:`DetectorSettings`."""
    d, t = recipe.detector, recipe.test
    return DetectorSettings(
        temperature=d.temperature, rois_per_image=d.rois_per_image, positive_fraction=d.positive_fraction,
        fg_iou=d.fg_iou, append_gt=d.append_gt, focal_gamma=d.focal_gamma, bg_weight=d.bg_weight,
        box_reg_weights=tuple(d.box_reg_weights), box_loss_weight=d.box_loss_weight, mask_head=d.mask_head,
        mask_loss_weight=d.mask_loss_weight, proposals=d.proposals,
        offline_rpn_pre_nms_topk=d.offline_rpn.pre_nms_topk, offline_rpn_post_nms_topk=d.offline_rpn.post_nms_topk,
        offline_rpn_nms=d.offline_rpn.nms, anchor_sizes=tuple(d.rpn.anchor_sizes),
        anchor_ratios=tuple(d.rpn.anchor_ratios), rpn_fg_iou=d.rpn.fg_iou, rpn_bg_iou=d.rpn.bg_iou,
        rpn_batch_per_image=d.rpn.batch_per_image, rpn_positive_fraction=d.rpn.positive_fraction,
        rpn_pre_nms_topk_train=d.rpn.pre_nms_topk_train, rpn_post_nms_topk_train=d.rpn.post_nms_topk_train,
        rpn_pre_nms_topk_test=d.rpn.pre_nms_topk_test, rpn_post_nms_topk_test=d.rpn.post_nms_topk_test,
        rpn_nms=d.rpn.nms, score_thresh=t.score_thresh, nms_thresh=t.nms, max_dets=t.max_dets, fusion=t.fusion,
        soft_nms=t.soft_nms, soft_nms_sigma=t.soft_nms_sigma, soft_nms_prune=t.soft_nms_prune,
        chunk_size=t.chunk_size,
    ).validate()


# ============================================================================================
# Data
# ============================================================================================


@dataclass
class ResolvedData:
    """What a run trains and evaluates on. Class lists are in ascending category id (the
    embedding row order, spec 2.4)."""

    train: DetectionSet
    train_images: Path
    val: DetectionSet | None
    val_images: Path | None
    train_category_ids: list[int]
    train_names: list[str]
    test_category_ids: list[int]
    test_names: list[str]
    splits: dict[str, set[int]] | None
    mode: str
    description: str

    @property
    def kind(self) -> str:
        return self.train.kind


def _first_existing(candidates: Sequence[Path], what: str, hint: str) -> Path:
    for c in candidates:
        if c.is_file():
            return c
    raise InputError(f"{what} not found (looked for {', '.join(str(c) for c in candidates[:3])})", hint)


def prompt_names(dataset: DetectionSet) -> dict[int, str]:
    """Category id -> the name put into the prompts (LVIS names cleaned, spec 2.4)."""
    from rclip_core.data.vocab import clean_lvis_name

    names = dataset.category_names()
    if dataset.kind == "lvis":  # the names put into the prompts (spec 2.4)
        return {k: clean_lvis_name(v) for k, v in names.items()}
    return names


def resolve_data(recipe: FinetuneRecipe) -> ResolvedData:
    """Load and split the data sets the recipe names (see :class:`DataConfig`). Every problem
    is an InputError naming the file or key, raised before any training work."""
    d = recipe.data
    if not d.dataset:
        raise InputError("no data set given", "pass --dataset coco|lvis|DIR|train.json (data.dataset)")
    ds = d.dataset
    val_path: Path | None = Path(d.val_dataset).expanduser() if d.val_dataset else None
    val_images: Path | None = Path(d.val_images).expanduser() if d.val_images else None
    split_ids: dict[str, set[int]] | None = None
    if ds.lower() in ("coco", "lvis"):
        if not d.images:
            raise InputError(f"--dataset {ds} needs --images COCO_ROOT (the folder with annotations/, "
                             "train2017/ and val2017/)")
        root = Path(d.images).expanduser()
        if not root.is_dir():
            raise InputError(f"images folder not found: {root}")
        if ds.lower() == "coco":
            train_path = _first_existing([root / "annotations" / "instances_train2017.json"], "COCO train annotations",
                                         "download COCO 2017 annotations into COCO_ROOT/annotations/")
            val_path = val_path or _first_existing([root / "annotations" / "instances_val2017.json"],
                                                   "COCO val annotations", "set data.val_dataset=PATH")
            train_images, val_images = root / "train2017", val_images or root / "val2017"
        else:
            train_path = _first_existing([root / "annotations" / "lvis_v1_train.json", root / "lvis_v1_train.json",
                                          root / "lvis" / "lvis_v1_train.json"], "LVIS v1 train annotations",
                                         "put lvis_v1_train.json into COCO_ROOT/annotations/")
            val_path = val_path or _first_existing(
                [root / "annotations" / "lvis_v1_val.json", root / "lvis_v1_val.json", root / "lvis" / "lvis_v1_val.json"],
                "LVIS v1 val annotations", "set data.val_dataset=PATH")
            # LVIS images name their COCO folder: the COCO root serves train and val
            train_images, val_images = root, val_images or root
    elif Path(ds).expanduser().is_dir():
        from rclip_core.data.shapes import read_shapes_world

        world = read_shapes_world(Path(ds).expanduser())
        root = Path(world["root"])
        train_path, train_images = root / "instances_train.json", Path(d.images).expanduser() if d.images else root / "train"
        val_path, val_images = val_path or root / "instances_val.json", val_images or root / "val"
        split_json = json.loads((root / "split.json").read_text(encoding="utf-8"))
        split_ids = {"novel": {int(c["id"]) for c in split_json["novel"]},
                     "base": {int(c["id"]) for c in split_json["base"]}}
    else:
        train_path = Path(ds).expanduser()
        if not train_path.is_file():
            raise InputError(f"data set not found: {ds}",
                             "pass coco, lvis, a ShapesWorld directory or a COCO-format instances JSON")
        if not d.images:
            raise InputError("--images DIR (the folder of the training images) is required with an instances JSON")
        train_images = Path(d.images).expanduser()
        if val_path is not None and val_images is None:
            val_images = train_images
    if not train_images.is_dir():
        raise InputError(f"images folder not found: {train_images}", "pass the image folder with --images")
    if val_path is not None and not val_path.is_file():
        raise InputError(f"validation instances file not found: {val_path}")
    if val_images is not None and val_path is not None and not val_images.is_dir():
        raise InputError(f"validation images folder not found: {val_images}")

    train = load_instances(train_path)
    val = load_instances(val_path) if val_path is not None else None
    all_ids = set(train.category_ids)
    if ds.lower() == "coco" and d.mode != "fully" and not d.novel_classes:
        from rclip_core.data.vocab import get_vocabulary

        v = get_vocabulary("coco-ovd")
        split_ids = {"novel": {c for c, s in zip(v.category_ids, v.split) if s == "novel"},
                     "base": {c for c, s in zip(v.category_ids, v.split) if s == "base"}}
    elif train.kind == "lvis" and d.mode != "fully" and not d.novel_classes:
        split_ids = {"novel": {c["id"] for c in train.categories if c.get("frequency") == "r"},
                     "base": {c["id"] for c in train.categories if c.get("frequency") in ("c", "f")}}
    if d.novel_classes:
        split_ids = split_from_names(train, d.novel_classes)
    mode = d.mode
    if mode == "auto":
        mode = "ovd" if split_ids is not None else "fully"
    if mode == "ovd" and split_ids is None:
        raise InputError("open-vocabulary mode needs a base/novel split",
                         "name the held-out classes with --novel-classes, or use data.mode=fully")
    if split_ids is not None:
        unknown = (split_ids["novel"] | split_ids["base"]) - all_ids
        if unknown:
            raise InputError(f"split classes {sorted(unknown)[:5]} are not categories of {train_path}")
    names = prompt_names(train)
    if mode == "ovd":
        assert split_ids is not None
        train_ids = sorted(split_ids["base"])
        test_ids = sorted(split_ids["novel"] | split_ids["base"])
        if not train_ids:
            raise InputError("no base classes to train on")
        train = filter_categories(train, train_ids, drop_empty_images=True)
    else:
        train_ids = test_ids = sorted(all_ids)
        split_ids = None
    if val is not None:
        if set(val.category_ids) != all_ids and not set(test_ids) <= set(val.category_ids):
            missing = sorted(set(test_ids) - set(val.category_ids))
            raise InputError(f"the validation set lacks categories {missing[:5]} of the training set",
                             "both instances files must share their category ids")
        if set(test_ids) != set(val.category_ids):  # e.g. the 65-class COCO OVD test set
            val = filter_categories(val, test_ids, drop_empty_images=True)
    desc = (f"{train.source}: {len(train_ids)} training classes, {len(test_ids)} test classes ({mode})")
    return ResolvedData(train=train, train_images=train_images, val=val, val_images=val_images,
                        train_category_ids=train_ids, train_names=[names[c] for c in train_ids],
                        test_category_ids=test_ids, test_names=[names[c] for c in test_ids],
                        splits=split_ids, mode=mode, description=desc)


# ============================================================================================
# Model
# ============================================================================================


def _load_init_model(recipe: FinetuneRecipe, device: torch.device):
    from rclip_core.models.regionclip import load_model, load_rpn_file

    i = recipe.init
    if not (i.weights or i.model):
        raise InputError("no init weights given", "pass --init WEIGHTS (e.g. regionclip_pretrained-cc_rn50.pth)")
    model = load_model(weights=i.weights, model=i.model, pretrained=i.pretrained, random_init=i.random_init,
                       device=device, with_rpn=recipe.detector.proposals == "offline", seed=recipe.seed)
    if recipe.detector.proposals == "offline":
        if i.rpn_weights:
            load_rpn_file(model, i.rpn_weights)
        if model.rpn is None:
            raise InputError("detector.proposals is offline but the init weights carry no offline RPN",
                             "pass --rpn-weights (rpn_coco_48.pth for COCO, rpn_lvis_866_lsj.pth for LVIS), "
                             "or train an RPN with detector.proposals=trained")
        want = recipe.detector.offline_rpn.kind
        if want and model.rpn.kind != want:
            raise InputError(f"the offline RPN is a {model.rpn.kind} RPN but the recipe expects {want}",
                             "pass the matching --rpn-weights (COCO: rpn_coco_48.pth, LVIS: rpn_lvis_866_lsj.pth) "
                             "or set detector.offline_rpn.kind=null")
    return model


def class_embeddings_for(model, names: Sequence[str], templates: Any = "clip81", average: str = "raw",
                         progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """[K, D] prompt-ensemble embeddings of ``names`` with ``model``'s text tower (cached on disk
    for trained weights; never for random ones)."""
    from rclip_core.models.text import EmbeddingCache, class_embeddings, get_tokenizer

    if not model.has_text:
        raise InputError("the init weights have no text encoder, so the class names cannot be embedded",
                         "pass text.test_embeddings=FILE (an official *_cls_emb.pth or `rclip embed` output)")
    cache = None if model.info.source_format == "random" else EmbeddingCache()
    return class_embeddings(model.clip, get_tokenizer(model.arch.context_length), list(names), templates=templates,
                            average=average, cache=cache, model_id=model.identity() if cache else None,
                            progress=progress)


def _embeddings(recipe: FinetuneRecipe, model, data: ResolvedData) -> tuple[torch.Tensor, torch.Tensor]:
    from rclip_core.models.regionclip import load_class_embeddings

    t = recipe.text
    if t.test_embeddings:
        test, _ = load_class_embeddings(t.test_embeddings)
        if test.shape[0] != len(data.test_names):
            raise InputError(f"text.test_embeddings has {test.shape[0]} rows but there are {len(data.test_names)} "
                             "test classes", "the rows must be the test classes in ascending category id")
    else:
        test = class_embeddings_for(model, data.test_names, t.templates, t.average)
    if t.train_embeddings:
        train, _ = load_class_embeddings(t.train_embeddings)
        if train.shape[0] != len(data.train_names):
            raise InputError(f"text.train_embeddings has {train.shape[0]} rows but there are "
                             f"{len(data.train_names)} training classes")
    else:
        row = {c: i for i, c in enumerate(data.test_category_ids)}
        train = test[[row[c] for c in data.train_category_ids]]
    for what, emb in (("test", test), ("train", train)):
        if emb.shape[1] != model.embed_dim:
            raise InputError(f"the {what} class embeddings have dimension {emb.shape[1]}, the model {model.embed_dim}",
                             "use embeddings made with the same architecture")
    return train.float(), test.float()


def build_detector(recipe: FinetuneRecipe, data: ResolvedData, device: torch.device | str = "cpu") -> Detector:
    """The detector of a recipe at its initialisation (before any training step)."""
    device = torch.device(device)
    model = _load_init_model(recipe, device)
    train_emb, test_emb = _embeddings(recipe, model, data)
    return Detector(model, train_emb, test_emb, class_names=data.test_names, train_class_names=data.train_names,
                    settings=detector_settings(recipe), freeze_at=recipe.init.freeze_at)


def set_detector_classes(detector: Detector, names: Sequence[str], embeddings: torch.Tensor | None = None,
                         templates: Any = "clip81", average: str = "raw") -> None:
    """Make ``detector`` detect ``names`` (for ``rclip eval --detector`` on a data set or
    ``rclip detect --classes``): kept as they are when they equal its stored vocabulary; else
    ``embeddings`` [K, D] when given, else embedded with the detector's text tower."""
    names = list(names)
    if embeddings is None and detector.class_names == names:
        return
    if embeddings is None:
        if not detector.regionclip.has_text:
            raise InputError("this detector has no text encoder, so new class names cannot be embedded",
                             "pass --class-embeddings FILE, or export the detector with export.include_text=true")
        embeddings = class_embeddings_for(detector.regionclip, names, templates, average)
    detector.set_vocabulary(names, embeddings.to(detector.device))


# ============================================================================================
# Evaluation
# ============================================================================================


def _dist_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def evaluate_detector(detector: Detector, dataset: DetectionSet, images_dir: str | os.PathLike, *,
                      category_ids: Sequence[int] | None = None, splits: Mapping[str, Any] | None = None,
                      short_side: int = TEST_SHORT_SIDE, max_size: int = MAX_SIZE, max_images: int | None = None,
                      num_workers: int = 0, backend: str = "faster", max_dets: int | None = None,
                      results_path: str | os.PathLike | None = None,
                      progress: Callable[[int], None] | None = None) -> dict[str, float]:
    """COCO / LVIS box AP of ``detector`` on ``dataset`` (the ``rclip eval --detector`` path).

    Args:
        detector: its eval-mode vocabulary must be the rows of ``category_ids`` (see
            :func:`set_detector_classes`).
        dataset: the ground truth (e.g. COCO val filtered to the 65 OVD classes, LVIS val).
        images_dir: the folder of its images (LVIS: the COCO root works).
        category_ids: dataset category id of each classifier row (default: the dataset's
            categories in ascending id).
        splits: e.g. ``{"novel": ids, "base": ids}`` -> ``AP50_novel``, ``AP50_base``,
            ``AP50_all`` (spec 6.4).
        max_images: only the first N images (by id).
        results_path: also write the detections (COCO results JSON) there.
        progress: called with the number of images finished (on rank 0).

    Under torchrun each process runs a share of the images; every process returns the metrics.
    Unreadable images raise an InputError (the metric would silently count them as misses).
    """
    from rclip_core.evaluation.metrics import evaluate_detections
    from rclip_core.engine.detection_data import EvalImages, collate_list

    cats = list(category_ids) if category_ids is not None else dataset.category_ids
    k = int(detector.test_embeddings.shape[0])
    if len(cats) != k:
        raise InputError(f"the detector classifies {k} classes but {len(cats)} category ids were given",
                         "set the detector's classes to the data set's with set_detector_classes")
    present, missing = resolve_images(dataset, images_dir)
    if missing:
        raise InputError(f"{len(missing)} of {len(dataset.images)} evaluation images are not in {images_dir} "
                         f"(e.g. {missing[0]['file_name']})", "pass the folder of the evaluation images")
    present = sorted(present, key=lambda r: r.image["id"])
    if max_images is not None:
        present = present[:max_images]
    rank, world = 0, 1
    if _dist_ready():
        import torch.distributed as dist

        rank, world = dist.get_rank(), dist.get_world_size()
    mine = present[rank::world]
    # own generator: evaluating between training steps must not move the global RNG (exact resume)
    loader = torch.utils.data.DataLoader(EvalImages([r.path for r in mine], short_side, max_size), batch_size=1,
                                         shuffle=False, num_workers=num_workers, collate_fn=collate_list,
                                         generator=torch.Generator().manual_seed(0))
    results: list[list[float]] = []
    was_training = detector.training
    detector.eval()
    try:
        for batch in loader:
            for i, prep, err in batch:
                if err is not None:
                    raise InputError(f"evaluation image unreadable: {err}")
                det = detector.detect([prep])[0]
                image_id = mine[i].image["id"]
                b = det.boxes.double().numpy()
                for (x1, y1, x2, y2), s, c in zip(b, det.scores.tolist(), det.classes.tolist()):
                    results.append([image_id, x1, y1, x2 - x1, y2 - y1, s, cats[c]])
                if progress is not None and rank == 0:
                    progress(world)
    finally:
        detector.train(was_training)
    if world > 1:
        import torch.distributed as dist

        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, results)
        results = [r for part in gathered for r in part]
    metrics: dict[str, float] = {}
    if rank == 0:
        array = np.asarray(results, dtype=np.float64).reshape(-1, 7)
        if results_path is not None:
            from rclip_core.fileio import atomic_write_json

            atomic_write_json(results_path, [{"image_id": int(r[0]), "category_id": int(r[6]),
                                              "bbox": [round(float(v), 3) for v in r[1:5]], "score": round(float(r[5]), 6)}
                                             for r in array])
        metrics = evaluate_detections(dataset, array, backend=backend, splits=splits, max_dets=max_dets,
                                      image_ids=[r.image["id"] for r in present])
    if world > 1:
        import torch.distributed as dist

        box = [metrics]
        dist.broadcast_object_list(box, src=0)
        metrics = box[0]
    return metrics


# ============================================================================================
# Training
# ============================================================================================


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


_RESUME_KEYS = ("init", "data", "text", "detector", "optim", "batch", "seed", "amp")


def _resume_mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    for key in _RESUME_KEYS:
        a, b = saved.get(key), current.get(key)
        if key == "data" and isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k != "num_workers"}
            b = {k: v for k, v in b.items() if k != "num_workers"}
        if a != b:
            return key
    return None


def _headline(metrics: Mapping[str, float]) -> dict[str, float]:
    keys = ("AP50_novel", "AP50_base", "AP50_all", "AP", "AP50", "APr", "APc", "APf")
    return {k: metrics[k] for k in keys if k in metrics}


def _json_safe(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def finetune(recipe: FinetuneRecipe, *, device: str | torch.device | None = None, resume: bool = False,
             progress: Progress | None = None, stop: Any | None = None) -> FinetuneResult:
    """Run a fine-tuning recipe (module docstring). Call in every torchrun worker or once.

    Args:
        device: "cpu", "cuda", "auto"/None (CUDA when available).
        resume: continue from the newest checkpoint in ``output_dir/checkpoints`` (a fresh start
            when there is none). Without it an existing checkpoint is an InputError, so a run
            is never overwritten by accident.
        progress: ``progress(event, info)`` on rank 0 with events ``data`` {description,
            train_images, val_images}, ``start`` {start_step, max_steps, world_size, per_pass,
            accumulation}, ``step`` {step, lr, losses, seconds}, ``checkpoint`` {step, path},
            ``eval_start`` {step, images}, ``eval_image`` {n}, ``eval`` {step, metrics},
            ``export`` {path}, ``stopped`` {step}.
        stop: an object whose truth means "save and stop" (e.g. a SIGTERM
            :class:`rclip_core.engine.checkpoint.StopFlag`).
    """
    from rclip_core.device import resolve_device
    from rclip_core.engine import checkpoint as ckpt
    from rclip_core.engine.distributed import all_reduce_mean, barrier, cleanup, init_distributed
    from rclip_core.engine.detection_data import DetectionTrainSet, StepSampler, TrainStream, build_train_records, \
        collate_list, repeat_factors
    from rclip_core.engine.optim import WarmupMultiStepLR, build_sgd, clip_grad_per_parameter
    from rclip_core.fileio import atomic_write_json, atomic_write_text

    emit: Progress = progress or (lambda event, info: None)
    t_start = time.perf_counter()
    requested = resolve_device(str(device) if device is not None else None)
    info = init_distributed(device=requested)
    try:
        dev = info.device
        rank, world = info.rank, info.world_size
        main = info.is_main

        def say(event: str, payload: dict) -> None:
            if main:
                emit(event, payload)

        per_pass, accum = recipe.batch.layout(world)
        detector_settings(recipe)  # every detector and test value checked before any work
        out = Path(recipe.output_dir).expanduser()
        ckpt_dir = out / "checkpoints"
        latest = ckpt.load_latest(ckpt_dir) if resume else None
        if not resume and ckpt.list_checkpoints(ckpt_dir):
            raise InputError(f"{out} already holds a fine-tuning run (checkpoints/)",
                             "pass --resume to continue it, or choose another --out")
        recipe_dict = recipe_to_dict(recipe)
        if latest is not None:
            saved = latest.extra.get("recipe", {})
            diff = _resume_mismatch(saved, recipe_dict)
            if diff is not None:
                raise InputError(f"cannot resume: the recipe's {diff!r} section differs from the run in {out}",
                                 "resume with the same recipe and options (only max_steps, checkpoint_every, "
                                 "test.* and logging.* may change)")

        # -- data and model (validated before anything is written) ---------------------------
        data = resolve_data(recipe)
        class_index = {c: i for i, c in enumerate(data.train_category_ids)}
        records = build_train_records(data.train, data.train_images, class_index, recipe.data.max_gt_per_image,
                                      with_polygons=recipe.detector.mask_head)
        if data.val is not None:
            _, missing = resolve_images(data.val, data.val_images)
            if missing:
                raise InputError(f"{len(missing)} of {len(data.val.images)} validation images are not in "
                                 f"{data.val_images} (e.g. {missing[0]['file_name']})")
        say("data", {"description": data.description, "train_images": len(records),
                     "val_images": len(data.val.images) if data.val is not None else 0, "mode": data.mode})
        import random

        random.seed(recipe.seed + rank)
        np.random.seed((recipe.seed + rank) % 2 ** 32)
        torch.manual_seed(recipe.seed + rank)
        detector = build_detector(recipe, data, dev)
        detector.train()

        factors = None
        if recipe.data.sampler == "repeat_factor":
            factors = repeat_factors([r.category_ids for r in records], recipe.data.repeat_threshold)
        stream = TrainStream(len(records), recipe.seed, factors)

        optimizer = build_sgd(detector, recipe.optim.lr, recipe.optim.momentum, recipe.optim.weight_decay)
        scheduler = WarmupMultiStepLR(optimizer, recipe.optim.steps, recipe.optim.gamma, recipe.optim.warmup_iters,
                                      recipe.optim.warmup_factor)
        use_amp = bool(recipe.amp and dev.type == "cuda")
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

        start_step = 0
        if latest is not None:
            detector.load_checkpoint_state({k: v.to(dev) for k, v in latest.model_state.items()})
            ckpt.restore_training_state(latest, optimizer, scheduler, rng=False)
            if use_amp and "scaler" in latest.extra:
                scaler.load_state_dict(latest.extra["scaler"])
            start_step = latest.step
        train_model: torch.nn.Module = detector
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(
                detector, device_ids=[dev.index] if dev.type == "cuda" else None, broadcast_buffers=False,
                find_unused_parameters=detector.mask_head is not None)

        max_steps = recipe.max_steps
        sampler = StepSampler(recipe.batch.global_batch, per_pass, accum, rank, world, start_step, max_steps)
        dataset = DetectionTrainSet(records, stream, recipe.data.train_short_sides, recipe.data.max_size,
                                    recipe.data.flip_prob)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=per_pass, sampler=sampler, num_workers=recipe.data.num_workers,
            collate_fn=collate_list, generator=torch.Generator().manual_seed(recipe.seed),
            persistent_workers=False, prefetch_factor=4 if recipe.data.num_workers > 0 else None)
        batches = iter(loader)
        # after the loader exists: its creation must not move the generators being restored
        if latest is not None:
            states = latest.extra.get("rng_ranks")
            if states and len(states) == world:
                ckpt.restore_rng(states[rank])
            elif "rng" in latest.state:
                ckpt.restore_rng(latest.state["rng"])

        # -- outputs --------------------------------------------------------------------------
        if main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "recipe.yaml", dump_recipe(recipe))
            ckpt.trim_metrics_log(out / "metrics.jsonl", start_step)
        barrier()
        say("start", {"start_step": start_step, "max_steps": max_steps, "world_size": world, "per_pass": per_pass,
                      "accumulation": accum, "device": str(dev), "amp": use_amp,
                      "trainable_parameters": sum(p.numel() for _, p in detector.trainable_parameters())})

        last_saved = [start_step if latest is not None else -1]

        def save(step: int) -> Path | None:
            last_saved[0] = step
            states: list[Any] = [ckpt.rng_state()]
            if world > 1:
                import torch.distributed as dist

                gathered: list[Any] = [None] * world
                dist.all_gather_object(gathered, states[0])
                states = gathered
            path = None
            if main:
                extra = {"recipe": recipe_dict, "rng_ranks": states, "world_size": world}
                if use_amp:
                    extra["scaler"] = scaler.state_dict()
                path = ckpt.save_checkpoint(ckpt_dir, step, detector.checkpoint_state(), optimizer, scheduler,
                                            extra=extra, rng=True, keep_last=recipe.logging.keep_checkpoints)
                say("checkpoint", {"step": step, "path": str(path)})
            barrier()
            return path

        history: list[dict] = []

        def run_eval(step: int, final: bool) -> dict[str, float]:
            if data.val is None:
                return {}
            limit = None if final else recipe.test.max_images  # the final evaluation sees every image
            n = len(data.val.images) if limit is None else min(limit, len(data.val.images))
            say("eval_start", {"step": step, "images": n})
            results_path = out / "eval" / f"detections_{step:08d}.json" if main else None
            if main:
                (out / "eval").mkdir(exist_ok=True)
            metrics = evaluate_detector(
                detector, data.val, data.val_images, category_ids=data.test_category_ids, splits=data.splits,
                short_side=recipe.data.test_short_side, max_size=recipe.data.test_max_size,
                max_images=limit, num_workers=min(recipe.data.num_workers, 2),
                backend=recipe.test.backend, results_path=results_path,
                progress=(lambda k: emit("eval_image", {"n": k})) if main else None)
            if main:
                line = {"step": step, "eval": _json_safe(_headline(metrics)), "final": final}
                _append_log(out / "metrics.jsonl", line)
                history.append(line)
            say("eval", {"step": step, "metrics": metrics, "final": final})
            return metrics

        # -- the loop -------------------------------------------------------------------------
        step = start_step
        interrupted = False
        timed_steps, timed_seconds = 0, 0.0
        window: dict[str, float] = {}
        window_n = 0
        while step < max_steps:
            t0 = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            totals: dict[str, float] = {}
            for a in range(accum):
                batch = next(batches)
                images = [b["image"] for b in batch]
                targets = [{"boxes": b["boxes"], "labels": b["labels"], "polygons": b["polygons"]} for b in batch]
                sync_ctx = train_model.no_sync() if (world > 1 and a < accum - 1) else contextlib.nullcontext()
                with sync_ctx:
                    with torch.autocast(device_type=dev.type, dtype=torch.float16, enabled=use_amp):
                        losses = train_model(images, targets)
                    loss = sum(losses.values()) / accum
                    if not torch.isfinite(loss.detach()):
                        raise RuntimeFailure(f"the loss became {float(loss.detach())} at step {step}",
                                             "lower optim.lr or check the annotations (degenerate boxes?)")
                    scaler.scale(loss).backward()
                for k, v in losses.items():
                    totals[k] = totals.get(k, 0.0) + float(v.detach()) / accum
            if recipe.optim.clip_norm is not None:
                scaler.unscale_(optimizer)
                clip_grad_per_parameter([p for _, p in detector.trainable_parameters()], recipe.optim.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            seconds = time.perf_counter() - t0
            if step - start_step > 1:  # the first step pays for warm-up (allocations, workers)
                timed_steps += 1
                timed_seconds += seconds
            for k, v in totals.items():
                window[k] = window.get(k, 0.0) + v
            window["loss"] = window.get("loss", 0.0) + sum(totals.values())
            window["seconds"] = window.get("seconds", 0.0) + seconds
            window_n += 1
            if step % recipe.logging.log_every == 0 or step == max_steps or step == start_step + 1:
                mean = all_reduce_mean({k: v / window_n for k, v in window.items()})
                line = {"step": step, "lr": lr, **{k: round(v, 6) for k, v in mean.items()}}
                if main:
                    _append_log(out / "metrics.jsonl", line)
                say("step", {"step": step, "lr": lr, "losses": mean, "seconds": mean["seconds"]})
                window, window_n = {}, 0
            want_stop = bool(stop) if stop is not None else False
            if world > 1:
                want_stop = float(all_reduce_mean(torch.tensor([float(want_stop)]))[0]) > 0
            if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and step < max_steps:
                save(step)
            elif want_stop:
                save(step)
            if want_stop:
                interrupted = True
                say("stopped", {"step": step})
                break
            if recipe.test.eval_every and step % recipe.test.eval_every == 0 and step < max_steps:
                run_eval(step, final=False)

        elapsed = time.perf_counter() - t_start
        speed = timed_steps / timed_seconds if timed_seconds > 0 else None
        if interrupted:
            return FinetuneResult(out, None, {}, start_step, step, elapsed, speed, True, history)
        if last_saved[0] != step:
            save(step)
        detector_path = out / "detector.safetensors"
        if main:
            detector.save(detector_path, include_text=recipe.export.include_text,
                          extra={"recipe": recipe_dict, "steps": step, "splits":
                                 {k: sorted(v) for k, v in data.splits.items()} if data.splits else None,
                                 "category_ids": data.test_category_ids})
            say("export", {"path": str(detector_path)})
        barrier()
        metrics = run_eval(step, final=True) if recipe.test.final_eval else {}
        if main:
            atomic_write_json(out / "metrics.json", {
                "step": step, "mode": data.mode, "classes": {"train": len(data.train_names),
                                                             "test": len(data.test_names)},
                "headline": _json_safe(_headline(metrics)), "metrics": _json_safe(metrics),
                "steps_per_second": speed, "world_size": world}, indent=1)
        return FinetuneResult(out, detector_path, metrics, start_step, step, time.perf_counter() - t_start, speed,
                              False, history)
    finally:
        cleanup()


def _append_log(path: Path, line: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


