"""A quick zero-shot check of a pretraining run on a COCO-format held-out set (ShapesWorld val).

Two numbers, both argmax of cosine similarity against the prompt-ensemble embeddings of the
instances file's category names (the background column of the detector classifier cannot
change an argmax among the classes, so it is left out):

* **image-level top-1**: each image with at least one (non-crowd) object is labelled with the
  class of its largest object (by annotation area); the whole image, resized to the model's
  native square resolution, goes through the normal CLIP image tower. ``single_object_top1``
  is the same over the images that show exactly one object (no ambiguity about the label),
  ``any_object_top1`` counts a prediction as right when any object of the image has that class.
* **region top-1** (ground-truth boxes): every object box, at a test resolution (short side
  ``eval.short_side``, PIL bilinear, as at inference), through RoIAlign + res5 + attnpool.

These are sanity numbers for a run's log, not the evaluation protocol of the paper
(``rclip eval`` computes AP).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rclip_core.data.images import xywh_to_xyxy
from rclip_core.errors import InputError

__all__ = ["EvalImage", "load_eval_set", "image_level_top1", "region_top1", "evaluate_run"]


@dataclass
class EvalImage:
    path: Path
    boxes: np.ndarray  # [n, 4] XYXY original pixels
    labels: np.ndarray  # [n] contiguous class index
    areas: np.ndarray  # [n]

    @property
    def label(self) -> int:
        """Class of the largest object."""
        return int(self.labels[int(np.argmax(self.areas))])


def load_eval_set(instances: str | Path, images_dir: str | Path, max_images: int | None = None
                  ) -> tuple[list[str], list[EvalImage]]:
    """(class names in category-id order, images with at least one non-crowd object)."""
    from rclip_core.fileio import read_json

    data = read_json(instances, what="eval instances file")
    if not isinstance(data, dict) or not all(k in data for k in ("images", "annotations", "categories")):
        raise InputError(f"{instances} is not a COCO instances file (needs images, annotations, categories)")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    per_image: dict[Any, list[dict]] = {}
    for a in data["annotations"]:
        if not a.get("iscrowd", 0) and a.get("category_id") in index:
            per_image.setdefault(a["image_id"], []).append(a)
    out: list[EvalImage] = []
    for im in sorted(data["images"], key=lambda im: im["id"]):
        anns = per_image.get(im["id"])
        if not anns:
            continue
        boxes = xywh_to_xyxy([a["bbox"] for a in anns])
        out.append(EvalImage(Path(images_dir) / im["file_name"], boxes,
                             np.array([index[a["category_id"]] for a in anns], dtype=np.int64),
                             np.array([a.get("area", a["bbox"][2] * a["bbox"][3]) for a in anns], dtype=np.float64)))
        if max_images is not None and len(out) >= max_images:
            break
    if not out:
        raise InputError(f"{instances} has no image with a labelled object")
    return [str(c["name"]) for c in cats], out


@torch.no_grad()
def image_level_top1(clip_model: torch.nn.Module, class_emb: Tensor, images: Sequence[EvalImage], image_size: int,
                     device: torch.device | str = "cpu", batch_size: int = 64) -> dict[str, float]:
    """Image-level zero-shot top-1 (see the module docstring). ``clip_model``: an open_clip CLIP
    (``encode_image``) or its visual tower; ``class_emb``: [K, D]."""
    from PIL import Image

    from rclip_core.data.images import read_image
    from rclip_core.models.region_encoder import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD

    dev = torch.device(device)
    mean = torch.tensor(CLIP_PIXEL_MEAN, device=dev).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_PIXEL_STD, device=dev).view(1, 3, 1, 1)
    cls = F.normalize(class_emb.float().to(dev), dim=-1)
    was_training = clip_model.training
    clip_model.eval()
    preds: list[int] = []
    try:
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            arrs = [np.asarray(read_image(e.path).resize((image_size, image_size), Image.BICUBIC), dtype=np.float32)
                    for e in chunk]
            x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).to(dev) / 255.0
            x = (x - mean) / std
            emb = (clip_model.encode_image(x) if hasattr(clip_model, "encode_image") else clip_model(x)).float()
            preds += (F.normalize(emb, dim=-1) @ cls.t()).argmax(dim=1).tolist()
    finally:
        clip_model.train(was_training)
    labels = [e.label for e in images]
    correct = [p == y for p, y in zip(preds, labels)]
    single = [c for c, e in zip(correct, images) if len(e.labels) == 1]
    present = [p in set(e.labels.tolist()) for p, e in zip(preds, images)]
    return {"top1": float(np.mean(correct)), "images": len(images),
            "single_object_top1": float(np.mean(single)) if single else float("nan"),
            "single_object_images": len(single), "any_object_top1": float(np.mean(present)),
            "chance": 1.0 / class_emb.shape[0]}


@torch.no_grad()
def region_top1(encoder: torch.nn.Module, class_emb: Tensor, images: Sequence[EvalImage], short_side: int,
                max_size: int = 1333, device: torch.device | str = "cpu", batch_size: int = 16) -> dict[str, float]:
    """Region zero-shot top-1 on ground-truth boxes; ``encoder``: a RegionEncoder."""
    from rclip_core.data.images import boxes_to_resized, load_image

    dev = torch.device(device)
    cls = F.normalize(class_emb.float().to(dev), dim=-1)
    correct = 0
    total = 0
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        preps = [load_image(e.path, short_side, max_size) for e in chunk]
        boxes = [boxes_to_resized(e.boxes, p) for e, p in zip(chunk, preps)]
        feats = encoder([p.tensor.to(dev) for p in preps], [b.to(dev) for b in boxes])
        for f, e in zip(feats, chunk):
            pred = (F.normalize(f.float(), dim=-1) @ cls.t()).argmax(dim=1).cpu().numpy()
            correct += int((pred == e.labels).sum())
            total += len(e.labels)
    return {"top1": correct / max(total, 1), "regions": total, "chance": 1.0 / class_emb.shape[0]}


def evaluate_run(recipe: Any, task: Any, final_weights: Path, device: torch.device) -> dict[str, Any]:
    """The end-of-run check of ``rclip pretrain`` (``eval.*`` keys of the recipe).

    image_text mode: the saved ``final.safetensors`` is loaded back with ``load_model`` (so the
    check also proves the file works as a teacher) and scored image-level (and region-level
    when ``eval.short_side`` is set). regionclip mode: the student (and the teacher, when the
    student was initialised from it and so shares its text tower) region-level at
    ``eval.short_side`` (default: the largest training short side) and image-level.
    """
    from rclip_core.config.pretrain import resolve_data_path
    from rclip_core.models.text import embed_class_names
    from rclip_core.weights.loaders import load_model

    names, images = load_eval_set(resolve_data_path(recipe, recipe.eval.instances),
                                  resolve_data_path(recipe, recipe.eval.images), recipe.eval.max_images)

    def embed(model) -> Tensor:
        # no cache: the student was trained in memory, its weights are not the file it came from
        return embed_class_names(model, names, templates=recipe.concepts.templates, average=recipe.concepts.average,
                                 use_cache=False).float()

    result: dict[str, Any] = {"classes": len(names), "eval_images": len(images)}
    if recipe.mode == "image_text":
        model = load_model(weights=final_weights, device=device)
        emb = embed(model)
        size = recipe.data.image_size or model.arch.image_size
        result["image_level"] = image_level_top1(model.clip, emb, images, size, device)
        if recipe.eval.short_side:
            result["region"] = region_top1(model.encoder, emb, images, recipe.eval.short_side,
                                           recipe.data.max_size, device)
        return result
    student = task.student
    emb = embed(student)
    short = recipe.eval.short_side or max(recipe.data.short_sides)
    result["short_side"] = short
    result["student"] = {"region": region_top1(student.encoder, emb, images, short, recipe.data.max_size, device),
                         "image_level": image_level_top1(student.clip, emb, images, student.arch.image_size, device)}
    teacher = getattr(task, "teacher_encoder", None)
    if teacher is not None and not recipe.model.student.given:
        result["teacher"] = {"region": region_top1(teacher, emb, images, short, recipe.data.max_size, device),
                             "image_level": image_level_top1(teacher.visual, emb, images, student.arch.image_size,
                                                             device)}
    return result
