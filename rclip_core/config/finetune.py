"""The recipe of ``rclip finetune``: every key, its type and its default (the COCO OVD transfer
of the paper, RN50, 1x; official ``configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd.yaml``
and ``test_transfer_learning.sh``). The paper recipes in ``recipes/finetune_*.yaml`` spell the values
out; ``optim``, ``batch``, ``logging`` and ``amp`` are the shared sections of
:mod:`rclip_core.config.sections` with the transfer defaults.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Mapping

from rclip_core.config.loader import build_recipe, load_recipe
from rclip_core.config.sections import BatchConfig, LoggingConfig, ModelSource, OptimConfig, TrainRecipe
from rclip_core.data.images import MAX_SIZE, TEST_SHORT_SIDE, TRAIN_SHORT_SIDES
from rclip_core.models.classifier import InferenceConfig
from rclip_core.models.detector import DetectorConfig
from rclip_core.models.clip import FREEZE_AT_MAX

__all__ = ["InitConfig", "DataConfig", "TextConfig",
           "FinetuneOptimConfig", "FinetuneBatchConfig", "FinetuneLoggingConfig", "TestConfig", "ExportConfig",
           "FinetuneRecipe", "load_finetune_recipe"]


@dataclass(kw_only=True)
class InitConfig(ModelSource):
    """The weights the detector starts from (official ``MODEL.WEIGHTS``:
    ``regionclip_pretrained-cc_rn50[x4].pth``).

    weights: any file ``rclip detect --weights`` reads (official RegionCLIP ``.pth``, rclip
        ``.safetensors`` from ``rclip pretrain``, OpenAI / open_clip checkpoints).
    model / pretrained: an open_clip architecture and tag (or a named model) instead of a file;
        with ``random_init`` an untrained model (tests and benchmarks only).
    rpn_weights: the offline RPN (``rpn_coco_48.pth`` for COCO, ``rpn_lvis_866_lsj.pth`` for
        LVIS); empty = the RPN inside ``weights`` (pretrained files carry the LVIS-866 FPN).
    freeze_at: Detectron2 ``FREEZE_AT`` (:func:`rclip_core.models.clip.freeze_visual`): 2 = stem and
        layer1 frozen (the paper), 0..5; BN is always frozen.
    """

    rpn_weights: str | None = None
    freeze_at: int = 2

    def __post_init__(self) -> None:
        if self.weights and self.random_init:
            raise ValueError("init.random_init and init.weights exclude each other")
        if self.random_init and not self.model:
            raise ValueError("init.random_init needs init.model (an architecture name)")
        if not 0 <= self.freeze_at <= FREEZE_AT_MAX:
            raise ValueError(f"init.freeze_at must be in 0..{FREEZE_AT_MAX}, got {self.freeze_at}")


@dataclass(kw_only=True)
class DataConfig:
    """dataset: one of the names of :mod:`rclip_core.data.datasets` (the same as ``rclip eval``):
        ``coco-ovd`` (the 48 base / 17 novel split; ``images`` = the COCO root with
        ``annotations/``, ``train2017/``, ``val2017/``), ``coco`` (80 classes: with
        ``mode: fully`` or ``novel_classes``; alone it still trains the OVD split, with a note),
        ``lvis`` (``images`` = the COCO root; ``annotations/lvis_v1_{train,val}.json`` there or in
        ``val_dataset``), ``shapes:DIR`` / a ShapesWorld directory (``rclip data shapes``), or a
        COCO-format instances ``PATH.json`` (with ``images`` = its image folder).
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
    """Class embeddings (the classifier: official ``MODEL.CLIP.TEXT_EMB_PATH``). Computed with the init model's text tower
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
class TestConfig(InferenceConfig):
    """The recipe's ``test`` section: the detector's post-processing
    (:class:`rclip_core.models.classifier.InferenceConfig`: score threshold, per-class NMS or
    gaussian soft-NMS, detections per image, RPN-score fusion) and the evaluations during and
    after training: ``eval_every`` steps between evaluations (0 = only at the end);
    ``max_images``: periodic evaluations use the first N images only (the final one uses all);
    ``final_eval``: evaluate after the last step; ``backend``: faster | pycocotools | lvis."""

    eval_every: int = 0
    max_images: int | None = None
    final_eval: bool = True
    backend: Literal["faster", "pycocotools", "lvis"] = "faster"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_every < 0:
            raise ValueError("test.eval_every must be >= 0")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError("test.max_images must be >= 1")


@dataclass(kw_only=True)
class ExportConfig:
    """include_text: keep the text tower in ``detector.safetensors`` so that ``rclip detect
    --classes`` can embed new class names (RN50: +255 MB); false = like the official files."""

    include_text: bool = True


@dataclass(kw_only=True)
class FinetuneOptimConfig(OptimConfig):
    """The transfer schedule (official ``CLIP_fast_rcnn_R_50_C4_ovd.yaml``): SGD lr 0.002, momentum
    0.9, weight decay 1e-4 (none on norm layers), linear warm-up over 5000 iterations from 0.001,
    x0.1 at ``steps`` (COCO 60k/80k of 90k; LVIS 120k/160k of 180k); no gradient clipping."""

    warmup_iters: int = 5000
    steps: list[int] = field(default_factory=lambda: [60_000, 80_000])
    clip_norm: float | None = None


@dataclass(kw_only=True)
class FinetuneBatchConfig(BatchConfig):
    """global_batch: images per optimizer step over all processes (the paper: 16);
    images_per_process: null = global_batch / processes; smaller values accumulate gradients."""

    images_per_process: int | None = None
    global_batch: int | None = 16


@dataclass(kw_only=True)
class FinetuneLoggingConfig(LoggingConfig):
    tensorboard: bool = False


@dataclass(kw_only=True)
class FinetuneRecipe(TrainRecipe):
    """The whole recipe of ``rclip finetune`` (defaults: COCO OVD, RN50, 1x; paper Table 1)."""

    output_dir: str = "runs/finetune"
    max_steps: int = 90_000
    checkpoint_every: int = 5000
    init: InitConfig = field(default_factory=InitConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    batch: FinetuneBatchConfig = field(default_factory=FinetuneBatchConfig)
    test: TestConfig = field(default_factory=TestConfig)
    logging: FinetuneLoggingConfig = field(default_factory=FinetuneLoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


def load_finetune_recipe(path: str | os.PathLike | None, overrides: Mapping[str, str] | None = None
                         ) -> FinetuneRecipe:
    """Read and validate a recipe (or the defaults when ``path`` is None) with dotted overrides."""
    if path is None:
        return build_recipe({}, FinetuneRecipe, overrides)
    return load_recipe(path, FinetuneRecipe, overrides)
