"""Detector fine-tuning (paper sec. 3.4, Tables 1-4; official ``train_transfer_learning.sh`` and
``configs/COCO-InstanceSegmentation/CLIP_fast_rcnn_R_50_C4_ovd.yaml``) as a task of the one
training loop: a RegionCLIP model becomes a Faster R-CNN C4 detector with a text-embedding
classifier (:class:`rclip_core.models.detector.Detector`).

1. the data (:func:`rclip_core.data.datasets.resolve_training_data`): COCO OVD (48 base
   classes for training, 65 for test), LVIS (866 base = common + frequent, 1203 for test), a
   ShapesWorld (its ``split.json``), or any COCO-format JSON with ``data.novel_classes`` (open
   vocabulary) or without (all classes: fully supervised, Table 3);
2. the init weights (anything :func:`rclip_core.weights.loaders.load_model` reads) and the
   proposal source (the offline RPN of the weights or ``init.rpn_weights``, or a torchvision RPN
   trained with the detector); the class names embedded with the init model's text tower and the
   prompt ensemble (or ``text.*_embeddings`` files);
3. the stream: a pure function of the seed and the step (:mod:`rclip_core.engine.detection_data`),
   multi-scale short side and horizontal flips, repeat-factor sampling for LVIS;
4. evaluation every ``test.eval_every`` steps and at the end
   (:func:`rclip_core.evaluation.protocol.evaluate_detector`: COCO AP / AP50 with novel/base/all
   AP50, or LVIS APr/c/f), and the exported detector ``OUTPUT_DIR/detector.safetensors``
   (vocabulary and embeddings inside).

Outputs in ``output_dir`` besides the trainer's (``recipe.yaml``, ``metrics.jsonl``,
``checkpoints/``): ``detector.safetensors``, ``metrics.json`` (final evaluation),
``eval/detections_<step>.json`` (COCO results of each evaluation).
"""

from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from rclip_core.config.finetune import FinetuneRecipe
from rclip_core.data.datasets import ResolvedData
from rclip_core.engine.trainer import Task, append_jsonl
from rclip_core.errors import InputError
from rclip_core.models.classifier import InferenceConfig
from rclip_core.models.detector import Detector

__all__ = ["DETECTOR_FILE", "DetectionTask", "resolve_recipe_data", "build_detector", "inference_settings",
           "set_detector_classes", "headline"]

DETECTOR_FILE = "detector.safetensors"


def resolve_recipe_data(recipe: FinetuneRecipe) -> ResolvedData:
    """The data sets a recipe names (``data.*``), through the one dataset resolver."""
    from rclip_core.data.datasets import resolve_training_data

    d = recipe.data
    return resolve_training_data(d.dataset, images=d.images, val_dataset=d.val_dataset, val_images=d.val_images,
                                 novel_classes=d.novel_classes, mode=d.mode)


def _embed(model, names: Sequence[str], templates: Any, average: str) -> torch.Tensor:
    from rclip_core.models.text import embed_class_names

    if not model.has_text:
        raise InputError("the init weights have no text encoder, so the class names cannot be embedded",
                         "pass text.test_embeddings=FILE (an official *_cls_emb.pth or `rclip embed` output)")
    return embed_class_names(model, list(names), templates, average)


def _load_init_model(recipe: FinetuneRecipe, device: torch.device):
    from rclip_core.weights.loaders import load_model, load_rpn_file

    i = recipe.init
    if not (i.weights or i.model):
        raise InputError("no init weights given", "pass --init WEIGHTS (e.g. regionclip_pretrained-cc_rn50.pth)")
    model = load_model(weights=i.weights, model=i.model, pretrained=i.pretrained, random_init=i.random_init,
                       device=device, with_rpn=recipe.detector.proposals == "offline", seed=recipe.seed,
                       trust=recipe.trust_weights)
    if recipe.detector.proposals == "offline":
        if i.rpn_weights:
            load_rpn_file(model, i.rpn_weights, trust=recipe.trust_weights)
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


def _embeddings(recipe: FinetuneRecipe, model, data: ResolvedData) -> tuple[torch.Tensor, torch.Tensor]:
    from rclip_core.weights.loaders import load_class_embeddings

    t = recipe.text
    if t.test_embeddings:
        test, _ = load_class_embeddings(t.test_embeddings, trust=recipe.trust_weights)
        if test.shape[0] != len(data.test_names):
            raise InputError(f"text.test_embeddings has {test.shape[0]} rows but there are {len(data.test_names)} "
                             "test classes", "the rows must be the test classes in ascending category id")
    else:
        test = _embed(model, data.test_names, t.templates, t.average)
    if t.train_embeddings:
        train, _ = load_class_embeddings(t.train_embeddings, trust=recipe.trust_weights)
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
                    config=recipe.detector, inference=inference_settings(recipe), freeze_at=recipe.init.freeze_at)


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
        from rclip_core.models.text import embed_class_names

        embeddings = embed_class_names(detector.regionclip, names, templates, average)
    detector.set_vocabulary(names, embeddings.to(detector.device))


def inference_settings(recipe: FinetuneRecipe) -> InferenceConfig:
    """The recipe's ``test`` post-processing keys as the detector's :class:`InferenceConfig`."""
    t = recipe.test
    return InferenceConfig(**{f.name: getattr(t, f.name) for f in fields(InferenceConfig)})


class DetectionStream:
    """The stream positions of this process's passes (:class:`~rclip_core.engine.detection_data.StepSampler`)
    through a DataLoader: a pure function of the seed and the step, so there is no state to save
    and any number of DataLoader workers continues exactly (the trainer refuses a resume with
    another number of processes)."""

    def __init__(self, loader: torch.utils.data.DataLoader):
        self.loader = loader
        self._iter = iter(loader)

    def next_batch(self) -> list[dict[str, Any]]:
        from rclip_core.engine.detection_data import raise_broken

        return raise_broken(next(self._iter))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any], exact: bool) -> None:
        pass

    def close(self) -> None:
        self._iter = None  # type: ignore[assignment]


def headline(metrics: Mapping[str, float]) -> dict[str, float]:
    keys = ("AP50_novel", "AP50_base", "AP50_all", "AP", "AP50", "APr", "APc", "APf")
    return {k: metrics[k] for k in keys if k in metrics}


def _json_safe(metrics: Mapping[str, float]) -> dict[str, float | None]:
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


class DetectionTask(Task):
    """The detector, its training stream, its evaluations and its export (module docstring)."""

    objective = "loss"

    def __init__(self, recipe: FinetuneRecipe, data: ResolvedData, records: Sequence[Any], device: torch.device,
                 progress: Any = None):
        super().__init__()
        self.recipe = recipe
        self.data = data
        self.records = list(records)
        self.device_ = device
        self.emit = progress or (lambda event, info: None)
        self.detector = build_detector(recipe, data, device)
        self.detector.train()
        self.eval_every = int(recipe.test.eval_every)
        self.ddp_kwargs = {"broadcast_buffers": False, "find_unused_parameters": self.detector.mask_head is not None}
        self.history: list[dict] = []
        self.out = Path(recipe.output_dir).expanduser()

    # -- the trainer's interface -----------------------------------------------------------------
    def trainable_module(self) -> torch.nn.Module:
        return self.detector

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return self.detector.checkpoint_state()

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        self.detector.load_checkpoint_state(state)

    def stream(self, *, per_pass: int, accumulation: int, rank: int, world: int, start_step: int) -> DetectionStream:
        from rclip_core.engine.detection_data import (
            DetectionTrainSet,
            StepSampler,
            TrainStream,
            collate_list,
            repeat_factors,
        )

        r, d = self.recipe, self.recipe.data
        records = self.records
        factors = repeat_factors([x.category_ids for x in records], d.repeat_threshold) \
            if d.sampler == "repeat_factor" else None
        sampler = StepSampler(r.batch.global_batch or per_pass * accumulation * world, per_pass, accumulation, rank,
                              world, start_step, r.max_steps)
        dataset = DetectionTrainSet(records, TrainStream(len(records), r.seed, factors), d.train_short_sides,
                                    d.max_size, d.flip_prob)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=per_pass, sampler=sampler, num_workers=d.num_workers, collate_fn=collate_list,
            generator=torch.Generator().manual_seed(r.seed), persistent_workers=False,
            prefetch_factor=4 if d.num_workers > 0 else None)
        return DetectionStream(loader)

    def forward(self, batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [b["image"] for b in batch]
        targets = [{"boxes": b["boxes"], "labels": b["labels"], "polygons": b["polygons"]} for b in batch]
        losses = self.detector(images, targets)
        losses["loss"] = sum(losses.values())
        return losses

    def evaluate(self, step: int, final: bool) -> dict[str, float]:
        from rclip_core.dist import get_rank
        from rclip_core.evaluation.protocol import evaluate_detector

        data, recipe = self.data, self.recipe
        if data.val is None:
            return {}
        main = get_rank() == 0
        limit = None if final else recipe.test.max_images  # the final evaluation sees every image
        n = len(data.val.images) if limit is None else min(limit, len(data.val.images))
        if main:
            self.emit("eval_start", {"step": step, "images": n})
            (self.out / "eval").mkdir(exist_ok=True)
        metrics = evaluate_detector(
            self.detector, data.val, data.val_images, category_ids=data.test_category_ids, splits=data.splits,
            short_side=recipe.data.test_short_side, max_size=recipe.data.test_max_size, max_images=limit,
            num_workers=min(recipe.data.num_workers, 2), backend=recipe.test.backend,
            results_path=self.out / "eval" / f"detections_{step:08d}.json" if main else None,
            progress=(lambda k: self.emit("eval_image", {"n": k})) if main else None)
        if main:
            line = {"step": step, "eval": _json_safe(headline(metrics)), "final": final}
            append_jsonl(self.out / "metrics.jsonl", line)
            self.history.append(line)
            self.emit("eval", {"step": step, "metrics": metrics, "final": final})
        return metrics

    def finish(self, step: int, world: int, steps_per_second: float | None = None) -> tuple[Path, dict[str, float]]:
        """``detector.safetensors``, the final evaluation and ``metrics.json``."""
        from rclip_core.config.loader import recipe_to_dict
        from rclip_core.dist import barrier, get_rank
        from rclip_core.fileio import atomic_write_json
        from rclip_core.weights.native import save_detector

        data, recipe = self.data, self.recipe
        path = self.out / DETECTOR_FILE
        main = get_rank() == 0
        if main:
            save_detector(self.detector, path, include_text=recipe.export.include_text,
                          extra={"recipe": recipe_to_dict(recipe), "steps": step, "splits":
                                 {k: sorted(v) for k, v in data.splits.items()} if data.splits else None,
                                 "category_ids": data.test_category_ids})
            self.emit("export", {"path": str(path)})
        barrier()
        metrics = self.evaluate(step, final=True) if recipe.test.final_eval else {}
        if main:
            atomic_write_json(self.out / "metrics.json", {
                "step": step, "mode": data.mode, "classes": {"train": len(data.train_names),
                                                             "test": len(data.test_names)},
                "headline": _json_safe(headline(metrics)), "metrics": _json_safe(metrics),
                "steps_per_second": steps_per_second, "world_size": world}, indent=1)
        return path, metrics
