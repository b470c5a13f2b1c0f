"""``rclip pretrain``: RegionCLIP region-text pretraining, and CLIP image-text training.

Entry point: :func:`run_pretraining` (one process, or one torchrun worker; the process group
is joined from torchrun's environment). It never prints: progress goes to the ``progress``
callback (:class:`StepReport` per step) and one-line notes to ``notify``.

**regionclip mode** (spec section 4). Per forward pass and process (``batch.images_per_process``
images, paper 3):

1. images are resized (short side from ``data.short_sides``, bicubic, long side <= max_size),
   flipped at random, CLIP-normalised and padded into one canvas [B, 3, H_pad, W_pad];
2. regions per image: ``regions.per_image`` (100) sampled at random from the offline RPN's
   300 proposals (NMS 0.5), or random grid boxes, or jittered ground-truth boxes, or the boxes
   of pseudo-label shards;
3. student: trunk -> res4 -> RoIAlign of the regions AND of one whole-canvas box
   [0, 0, W_pad, H_pad] per image (the image embedding of eq. 4; spec note 8.5) -> res5 +
   attnpool, in one pass;
4. teacher (frozen, no grad): trunk on the same normalised canvas, RoIAlign of the regions,
   res5 + attnpool; pseudo labels = argmax of softmax(cos / 0.01) over the concept pool, kept
   when the max probability > 0.1 (or read from shards);
5. text: the frozen text tower's EOT feature of one caption per image;
6. loss = eq. 5 (:func:`rclip_core.losses.pretraining_loss`); the image-text term is gathered
   over all processes with gradient flow.

The student starts from the teacher's weights unless ``model.student`` names others; its text
tower, stem and res2 (``model.freeze_at`` 2) are frozen and every BN is a FrozenBN. The
attention pool's key bias is frozen too: it adds the same number to every attention logit of a
query, so it never changes the output and never gets a gradient (DDP would otherwise wait for
it forever).

**image_text mode** trains a CLIP (``model.architecture``) from scratch, both towers, on whole
images resized to its native square resolution, with the standard symmetric CLIP loss over
the gathered batch and CLIP's learned logit scale (init 1/0.07, clamped at 100) - it trains
CLIP itself, so it uses CLIP's temperature, not RegionCLIP's fixed 0.01. The visual tower has
ordinary, trainable BatchNorm layers (a tower built from scratch cannot learn with frozen
statistics); the saved file converts them to FrozenBN (running statistics become the frozen
buffers), the form every rclip model has, so ``load_model(weights=final.safetensors)`` loads
it as a teacher.

**Checkpoints** (``OUTPUT_DIR/checkpoints``, every ``checkpoint_every`` steps and at the end):
the trained model's weights (safetensors), optimizer, scheduler and - per process - the data
position, the region sampler's generator and the Python / NumPy / torch RNG states, written
atomically by rank 0. ``resume=True`` continues from the newest one; on CPU with a fixed seed
the resumed run ends with exactly the weights of an uninterrupted run (same number of
processes; the data order does not depend on ``data.num_workers``). SIGTERM makes every
process finish its step, save a checkpoint and return with ``stopped=True``.

**Outputs**: ``recipe.yaml`` (resolved), ``metrics.jsonl`` (one line per ``logging.log_every``
steps: step, lr, loss terms, images/s, time), ``tensorboard/`` when TensorBoard is installed,
``final.safetensors`` (the student as an rclip model file: visual + text tower, and the RPN if
one was used), ``eval.json`` when ``eval.instances`` is set.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LRScheduler

from rclip_core.engine.data import PretrainData, ShortSideResize, SquareResize, TrainSample
from rclip_core.engine.pretrain_recipe import (ModelSource, PretrainRecipe, check_recipe_inputs,
                                               resolve_data_path)
from rclip_core.errors import InputError, RuntimeFailure

__all__ = [
    "StepReport",
    "PretrainResult",
    "WarmupCosineLR",
    "RegionCLIPTask",
    "ImageTextTask",
    "run_pretraining",
    "FINAL_WEIGHTS",
    "METRICS_FILE",
    "STOPPED_FILE",
]

FINAL_WEIGHTS = "final.safetensors"
METRICS_FILE = "metrics.jsonl"
RECIPE_FILE = "recipe.yaml"
EVAL_FILE = "eval.json"
#: Written by rank 0 when SIGTERM stopped the run (removed when a run starts): {"step": N}.
STOPPED_FILE = "stopped.json"
CHECKPOINT_DIR = "checkpoints"
#: Test hook: sleep this long after the given step (so a test can kill -9 the process there).
SLEEP_HOOK_ENV = "RCLIP_TEST_SLEEP_AFTER_STEP"


@dataclass
class StepReport:
    """What the progress callback receives after every optimizer step (rank 0 only).

    losses: this process's loss terms of the step (at ``logged`` steps: averaged over processes
    and over the steps since the last log line, the values written to metrics.jsonl).
    """

    step: int
    max_steps: int
    losses: dict[str, float]
    lr: float
    images_per_s: float
    elapsed_s: float
    epoch: int
    logged: bool


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


# --------------------------------------------------------------------------------------------
# schedules


class WarmupCosineLR(LRScheduler):
    """Linear warm-up (from ``warmup_factor``) over ``warmup_iters``, then cosine decay from the
    base rate to ``base * min_factor`` at ``max_iters``. ``step()`` once per optimizer step."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_iters: int, warmup_iters: int = 0,
                 warmup_factor: float = 0.001, min_factor: float = 0.0, last_epoch: int = -1):
        self.max_iters = int(max_iters)
        self.warmup_iters = int(warmup_iters)
        self.warmup_factor = float(warmup_factor)
        self.min_factor = float(min_factor)
        super().__init__(optimizer, last_epoch)

    def factor(self, it: int) -> float:
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            return self.warmup_factor * (1 - alpha) + alpha
        span = max(1, self.max_iters - self.warmup_iters)
        progress = min(1.0, (it - self.warmup_iters) / span)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self) -> list[float]:
        return self.get_lr()


# --------------------------------------------------------------------------------------------
# model loading helpers


def _load_source(src: ModelSource, role: str, device: torch.device, seed: int, with_rpn: bool = True):
    from rclip_core.models.regionclip import load_model

    try:
        return load_model(weights=src.weights, model=src.model, pretrained=src.pretrained,
                          random_init=src.random_init, device=device, seed=seed, with_rpn=with_rpn)
    except InputError as e:
        raise type(e)(f"model.{role}: {e}", hint=e.hint) from None


def _concept_names(recipe: PretrainRecipe, shard_concepts: Sequence[str] | None) -> list[str]:
    """The concept pool named by ``concepts.pool`` (see :class:`ConceptsConfig`)."""
    pool = recipe.concepts.pool
    if not pool:
        if shard_concepts is not None:
            return list(shard_concepts)
        raise InputError("concepts.pool is not set", hint="e.g. concepts.pool=coco-nouns")
    from rclip_core.data.vocab import VOCABULARIES, get_vocabulary, read_classes_file

    if pool.lower() in VOCABULARIES and not os.path.exists(resolve_data_path(recipe, pool)):
        return list(get_vocabulary(pool).names)
    path = resolve_data_path(recipe, pool)
    if path.endswith(".json"):
        from rclip_core.fileio import read_json

        data = read_json(path, what="concept pool (COCO instances JSON)")
        cats = data.get("categories") if isinstance(data, dict) else None
        if not isinstance(cats, list) or not cats:
            raise InputError(f"concepts.pool {path} has no COCO 'categories'",
                             hint="give a COCO instances JSON or a text file with one concept per line")
        return [str(c["name"]) for c in sorted(cats, key=lambda c: c["id"])]
    return list(read_classes_file(path).names)


def _load_embeddings(recipe: PretrainRecipe, value: str, key: str) -> Tensor:
    from rclip_core.models.registry import REGISTRY, fetch_named
    from rclip_core.models.regionclip import load_class_embeddings

    path = fetch_named(value) if value in REGISTRY else resolve_data_path(recipe, value)
    try:
        emb, _ = load_class_embeddings(path)
    except InputError as e:
        raise type(e)(f"{key}: {e}", hint=e.hint) from None
    return emb.float()


def _embed_concepts(model, names: list[str], recipe: PretrainRecipe) -> Tensor:
    """[N, D] prompt-ensemble embeddings with ``model``'s frozen text tower (cached on disk for
    weights that come from a file, as ``rclip detect`` does)."""
    from rclip_core.models.text import EmbeddingCache, class_embeddings, get_tokenizer

    tok = get_tokenizer(model.arch.context_length)
    cache = None if model.info.source_format == "random" else EmbeddingCache()
    return class_embeddings(model.clip, tok, names, templates=recipe.concepts.templates,
                            average=recipe.concepts.average, cache=cache,
                            model_id=model.identity() if cache is not None else None).float()


def _open_shards(path: str):
    """The pseudo-label shard reader of ``rclip pseudo-label`` (``rclip_core.pseudo_labels``)."""
    try:
        from rclip_core.pseudo_labels import PseudoLabelShards
    except ImportError:
        raise RuntimeFailure("reading pseudo-label shards needs rclip_core.pseudo_labels, which this "
                             "installation lacks", hint="use regions.source rpn or random") from None
    return PseudoLabelShards(path)


def _freeze_student(student, freeze_at: int) -> None:
    """Text tower frozen; visual stages below ``freeze_at`` frozen (Detectron2 FREEZE_AT)."""
    student.requires_grad_(False)
    v = student.clip.visual
    stages = [[v.conv1, v.bn1, v.conv2, v.bn2, v.conv3, v.bn3], [v.layer1], [v.layer2], [v.layer3], [v.layer4]]
    for i, modules in enumerate(stages):
        if i >= freeze_at:
            for m in modules:
                m.requires_grad_(True)
    v.attnpool.requires_grad_(True)
    # no effect on any output (see the module docstring)
    v.attnpool.k_proj.bias.requires_grad_(False)


def _to_resized(boxes: np.ndarray | Tensor, sample: TrainSample) -> Tensor:
    """Original-pixel XYXY boxes -> the sample's resized (and flipped) pixels, clipped."""
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float64)).reshape(-1, 4).clone()
    (oh, ow), (h, w) = sample.orig_size, sample.size
    b[:, 0::2] *= w / ow
    b[:, 1::2] *= h / oh
    if sample.flipped:
        b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    b[:, 0::2] = b[:, 0::2].clamp(0, w)
    b[:, 1::2] = b[:, 1::2].clamp(0, h)
    return b.float()


# --------------------------------------------------------------------------------------------
# the two training tasks (the module DDP wraps: forward(batch) -> loss dict)


class RegionCLIPTask(nn.Module):
    """Teacher + student + regions + losses of RegionCLIP pretraining (see the module docstring)."""

    def __init__(self, recipe: PretrainRecipe, device: torch.device, rank: int = 0,
                 notify: Callable[[str], None] | None = None):
        super().__init__()
        from rclip_core.models.text import get_tokenizer

        self.recipe = recipe
        self.device_ = device
        r = recipe.regions
        self.region_terms = recipe.losses.region_terms
        self.image_text = recipe.losses.image_text_contrastive > 0
        self.source = r.source
        teacher_src = recipe.model.teacher
        student_src = recipe.model.student if recipe.model.student.given else teacher_src
        self.student = _load_source(student_src, "student" if recipe.model.student.given else "teacher",
                                    device, recipe.seed)
        if not self.student.has_text:
            raise InputError(f"the student ({student_src.describe()}) has no text tower",
                             hint="pretraining embeds captions and concepts with it: use a CLIP checkpoint "
                                  "with its text tower")
        _freeze_student(self.student, recipe.model.freeze_at)

        # ---- regions
        self.shards = None
        shard_concepts = None
        if r.source == "shards" and self.region_terms:
            self.shards = _open_shards(resolve_data_path(recipe, r.shards or ""))
            shard_concepts = list(self.shards.concepts)
        self.gt_boxes = None
        if r.source == "gt_jitter" and self.region_terms:
            from rclip_core.models.proposals import load_boxes_file

            self.gt_boxes = load_boxes_file(resolve_data_path(recipe, r.gt_boxes or ""))

        teacher = None
        needs_teacher = self.region_terms and r.source != "shards"
        if needs_teacher:
            # the teacher's RPN (official files carry one) is needed only as the proposal source
            teacher = _load_source(teacher_src, "teacher", device, recipe.seed,
                                   with_rpn=r.source == "rpn" and not r.rpn.weights and self.student.rpn is None)
            teacher.requires_grad_(False)
            teacher.eval()
        self.teacher_encoder = teacher.encoder if teacher is not None else None

        if r.source == "rpn" and self.region_terms:
            self._attach_rpn(teacher)

        # ---- concepts
        if self.region_terms:
            names = _concept_names(recipe, shard_concepts)
            if shard_concepts is not None and names != shard_concepts:
                raise InputError("concepts.pool differs from the concept pool of the pseudo-label shards",
                                 hint="leave concepts.pool empty to use the shards' pool")
            self.concept_names = names
            student_emb = (_load_embeddings(recipe, recipe.concepts.embeddings, "concepts.embeddings")
                           if recipe.concepts.embeddings else _embed_concepts(self.student, names, recipe))
            if student_emb.shape != (len(names), self.student.embed_dim):
                raise InputError(f"concepts.embeddings has shape {list(student_emb.shape)}, expected "
                                 f"[{len(names)}, {self.student.embed_dim}] (concepts x student embedding width)")
            self.register_buffer("concept_emb", student_emb.to(device), persistent=False)
            teacher_emb = None
            if teacher is not None:
                if recipe.concepts.teacher_embeddings:
                    teacher_emb = _load_embeddings(recipe, recipe.concepts.teacher_embeddings,
                                                   "concepts.teacher_embeddings")
                elif not recipe.model.student.given or (recipe.concepts.embeddings
                                                        and student_emb.shape[1] == teacher.embed_dim):
                    # the student's text tower is the teacher's; or, as the official code without
                    # TEACHER_CONCEPT_POOL_EMB, the one given file serves both
                    teacher_emb = student_emb
                else:
                    teacher_emb = _embed_concepts(teacher, names, recipe)
                if teacher_emb.shape != (len(names), teacher.embed_dim):
                    raise InputError(f"teacher concept embeddings have shape {list(teacher_emb.shape)}, "
                                     f"expected [{len(names)}, {teacher.embed_dim}]")
                self.register_buffer("teacher_concept_emb", teacher_emb.to(device), persistent=False)
        self.tokenizer = get_tokenizer(self.student.arch.context_length)
        # the text tower is frozen: nothing but encode_text needs it; the teacher's text tower
        # is dropped once the concept pool is embedded
        del teacher
        self.generator = torch.Generator().manual_seed(recipe.seed * 1000 + rank + 1)
        d = recipe.data
        self.transform = ShortSideResize(tuple(d.short_sides), d.max_size, d.interpolation, d.flip)

    def _attach_rpn(self, teacher) -> None:
        from rclip_core.models.proposals import RPNSettings
        from rclip_core.models.regionclip import attach_rpn, load_rpn_file
        from rclip_core.models.registry import REGISTRY, fetch_named

        rpn_cfg = self.recipe.regions.rpn
        if rpn_cfg.weights:
            path = fetch_named(rpn_cfg.weights) if rpn_cfg.weights in REGISTRY else rpn_cfg.weights
            load_rpn_file(self.student, path)
        elif self.student.rpn is None and teacher is not None and teacher.rpn is not None:
            attach_rpn(self.student, teacher.rpn.state_dict())
        if self.student.rpn is None:
            raise InputError("regions.source rpn needs an offline RPN, and neither the student's nor the "
                             "teacher's weights carry one",
                             hint="set regions.rpn.weights (rpn_lvis_866.pth or rpn-lvis-866), or use "
                                  "regions.source random")
        self.student.rpn.settings = RPNSettings(pre_nms_topk=rpn_cfg.pre_nms_topk,
                                                post_nms_topk=rpn_cfg.post_nms_topk,
                                                nms_thresh=rpn_cfg.nms_thresh)

    # ---- state

    def trainable_state(self) -> dict[str, Tensor]:
        return self.student.clip.state_dict()

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        self.student.clip.load_state_dict(state, strict=True)

    def rng_state(self) -> dict[str, Any]:
        return {"regions": self.generator.get_state()}

    def load_rng_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["regions"])

    def trainable_module(self) -> nn.Module:
        return self.student.clip

    def after_step(self) -> None:
        pass

    # ---- regions

    def _sample(self, n: int, k: int) -> Tensor:
        return torch.randperm(n, generator=self.generator)[:k]

    def _jittered_gt(self, sample: TrainSample) -> Tensor:
        from rclip_core.models.proposals import lookup_boxes, random_boxes

        r = self.recipe.regions
        h, w = sample.size
        try:
            gt = lookup_boxes(self.gt_boxes, sample.image_key)
        except InputError:
            gt = np.zeros((0, 4))
        if len(gt) == 0:  # an image without labelled objects still gets regions
            return random_boxes((h, w), r.per_image, generator=self.generator, grid_length=r.random_grid)
        boxes = _to_resized(gt, sample)
        idx = torch.randint(0, boxes.shape[0], (r.per_image,), generator=self.generator)
        b = boxes[idx]
        wh = torch.cat([b[:, 2:] - b[:, :2]] * 2, dim=1)
        b = b + (torch.rand(b.shape, generator=self.generator) * 2 - 1) * r.jitter * wh
        b[:, 0::2] = b[:, 0::2].clamp(0, w)
        b[:, 1::2] = b[:, 1::2].clamp(0, h)
        b[:, 2] = torch.maximum(b[:, 2], (b[:, 0] + 1).clamp(max=w))
        b[:, 3] = torch.maximum(b[:, 3], (b[:, 1] + 1).clamp(max=h))
        return b

    def _shard_regions(self, sample: TrainSample) -> dict[str, Tensor]:
        entry = None
        # the key as written in the caption file, else the file itself (the shards also know
        # images by their absolute path under the labelled data root)
        for key in (sample.image_key, os.path.abspath(sample.path) if sample.path else None):
            if key is None:
                continue
            try:
                entry = self.shards.lookup(key)
                break
            except (KeyError, LookupError):
                entry = None
        if entry is None:
            raise InputError(f"image {sample.image_key} has no pseudo labels in {self.recipe.regions.shards}",
                             hint="pseudo-label the same caption files (rclip pseudo-label), or use "
                                  "regions.source random / rpn")
        boxes = _to_resized(torch.as_tensor(entry["boxes"]), sample)
        keep_idx = self._sample(boxes.shape[0], self.recipe.regions.per_image)
        out = {"boxes": boxes[keep_idx], "target": torch.as_tensor(entry["target"]).long()[keep_idx],
               "keep": torch.as_tensor(entry["keep"]).bool()[keep_idx]}
        if entry.get("topk_inds") is not None and entry.get("topk_logits") is not None:
            out["topk_inds"] = torch.as_tensor(entry["topk_inds"]).long()[keep_idx]
            out["topk_logits"] = torch.as_tensor(entry["topk_logits"]).float()[keep_idx]
        return out

    def region_boxes(self, batch: list[TrainSample], images: list[Tensor]) -> tuple[list[Tensor], list[dict]]:
        """Per image: [R_i, 4] boxes in resized pixels (and shard labels for ``shards``)."""
        from rclip_core.models.proposals import random_boxes

        r = self.recipe.regions
        extras: list[dict] = []
        if self.source == "rpn":
            props = self.student.rpn([im.float() for im in images])
            out = []
            for p in props:
                boxes = p.boxes.detach().cpu()
                out.append(boxes[self._sample(boxes.shape[0], r.per_image)])
            return out, extras
        if self.source == "random":
            return [random_boxes(s.size, r.per_image, generator=self.generator, min_size=r.random_min_size,
                                 grid_length=r.random_grid) for s in batch], extras
        if self.source == "gt_jitter":
            return [self._jittered_gt(s) for s in batch], extras
        extras = [self._shard_regions(s) for s in batch]
        return [e["boxes"] for e in extras], extras

    # ---- forward

    def forward(self, batch: list[TrainSample]) -> dict[str, Tensor]:
        from rclip_core.losses import PseudoLabels, pretraining_loss, pseudo_label_regions

        dev = self.device_
        images = [s.image.to(dev, non_blocking=True) for s in batch]
        enc = self.student.encoder
        x = enc.batch_images(images)  # [B, 3, H_pad, W_pad], CLIP-normalised
        h_pad, w_pad = int(x.shape[-2]), int(x.shape[-1])
        boxes, extras = self.region_boxes(batch, images) if self.region_terms else ([], [])
        per_image: list[Tensor] = []
        for i in range(len(batch)):
            parts = []
            if self.region_terms:
                parts.append(boxes[i].to(dev, torch.float32))
            if self.image_text:
                parts.append(torch.tensor([[0.0, 0.0, w_pad, h_pad]], device=dev))
            per_image.append(torch.cat(parts) if parts else torch.zeros((0, 4), device=dev))
        res4 = enc.trunk(x)
        feats = enc.forward_features(res4, per_image).float()  # [sum_i (R_i + 1), D]
        n_regions = [int(b.shape[0]) for b in boxes] if self.region_terms else [0] * len(batch)
        chunks = feats.split([n + (1 if self.image_text else 0) for n in n_regions])
        region_emb = torch.cat([c[:n] for c, n in zip(chunks, n_regions)]) if self.region_terms else None
        image_emb = torch.stack([c[n] for c, n in zip(chunks, n_regions)]) if self.image_text else None

        kw: dict[str, Any] = {}
        stats: dict[str, Tensor] = {}
        if self.region_terms:
            if self.source == "shards":
                keep = torch.cat([e["keep"] for e in extras]).to(dev)
                target = torch.cat([e["target"] for e in extras]).to(dev)
                if keep.numel() and not bool(keep.any()):
                    keep = torch.ones_like(keep)  # the official fallback (spec 4.3 step 5)
                pl = PseudoLabels(target[keep], keep, None)
                if all("topk_inds" in e for e in extras):
                    kw["teacher_topk"] = (torch.cat([e["topk_inds"] for e in extras]).to(dev),
                                          torch.cat([e["topk_logits"] for e in extras]).to(dev))
                elif self.recipe.losses.concept_distillation > 0:
                    raise InputError("the pseudo-label shards store no top-k teacher logits, which "
                                     "concept_distillation needs",
                                     hint="re-run rclip pseudo-label with top-k logits, or set "
                                          "losses.concept_distillation=0")
            else:
                with torch.no_grad():
                    t_res4 = self.teacher_encoder.trunk(x)
                    t_feats = self.teacher_encoder.forward_features(
                        t_res4, [b.to(dev, torch.float32) for b in boxes]).float()
                pl = pseudo_label_regions(t_feats, self.teacher_concept_emb,
                                          temperature=self.recipe.losses.teacher_temperature,
                                          threshold=self.recipe.concepts.threshold)
            kw["pseudo_labels"] = pl
            stats["regions_kept"] = pl.keep_mask.float().mean() if pl.keep_mask.numel() else feats.new_zeros(())
        if self.image_text:
            tokens = self.tokenizer([s.caption for s in batch]).to(dev)
            with torch.no_grad():
                kw["text_emb"] = self.student.clip.encode_text(tokens).float()
            kw["image_emb"] = image_emb
        with torch.autocast(dev.type, enabled=False):  # the losses in fp32, also under AMP
            losses = pretraining_loss(region_emb, self.concept_emb if self.region_terms else None,
                                      weights=self.recipe.losses.weights(),
                                      temperature=self.recipe.losses.temperature, gather=True, **kw)
        losses.update({k: v.detach() for k, v in stats.items()})
        return losses

    # ---- outputs

    def save_final(self, path: Path, meta: dict[str, Any]) -> Path:
        return self.student.save(path, kind="regionclip", extra={"pretrain": meta})


class ImageTextTask(nn.Module):
    """A CLIP trained from scratch with the CLIP loss (see the module docstring)."""

    def __init__(self, recipe: PretrainRecipe, device: torch.device, rank: int = 0,
                 notify: Callable[[str], None] | None = None):
        super().__init__()
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        from rclip_core.models.clip import get_architecture
        from rclip_core.models.region_encoder import CLIP_PIXEL_MEAN, CLIP_PIXEL_STD
        from rclip_core.models.text import get_tokenizer

        self.recipe = recipe
        self.device_ = device
        self.arch = get_architecture(recipe.model.architecture or "")
        cfg = self.arch.config
        torch.manual_seed(recipe.seed)  # the same initial weights on every process
        self.clip = CLIP(embed_dim=int(cfg["embed_dim"]), vision_cfg=CLIPVisionCfg(**cfg["vision_cfg"]),
                         text_cfg=CLIPTextCfg(**cfg["text_cfg"]), quick_gelu=bool(cfg.get("quick_gelu", False)),
                         init_logit_scale=math.log(recipe.model.init_logit_scale)).to(device)
        self.clip.train()
        self.max_log_scale = math.log(recipe.model.max_logit_scale)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_PIXEL_MEAN, device=device).view(1, 3, 1, 1) * 255,
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_PIXEL_STD, device=device).view(1, 3, 1, 1) * 255,
                             persistent=False)
        self.tokenizer = get_tokenizer(self.arch.context_length)
        d = recipe.data
        self.transform = SquareResize(d.image_size or self.arch.image_size, d.interpolation, d.flip)
        self.generator = torch.Generator().manual_seed(recipe.seed * 1000 + rank + 1)

    def trainable_state(self) -> dict[str, Tensor]:
        return self.clip.state_dict()

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        self.clip.load_state_dict(state, strict=True)

    def rng_state(self) -> dict[str, Any]:
        return {"regions": self.generator.get_state()}

    def load_rng_state(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["regions"])

    def trainable_module(self) -> nn.Module:
        return self.clip

    def after_step(self) -> None:
        with torch.no_grad():
            self.clip.logit_scale.clamp_(0, self.max_log_scale)

    def forward(self, batch: list[TrainSample]) -> dict[str, Tensor]:
        from rclip_core.losses import image_text_contrastive

        dev = self.device_
        x = torch.stack([s.image for s in batch]).to(dev, non_blocking=True).float()
        x = (x - self.pixel_mean) / self.pixel_std
        tokens = self.tokenizer([s.caption for s in batch]).to(dev)
        img = self.clip.encode_image(x).float()
        txt = self.clip.encode_text(tokens).float()
        with torch.autocast(dev.type, enabled=False):  # the loss in fp32, also under AMP
            scale = self.clip.logit_scale.float().exp()
            loss = image_text_contrastive(img, txt, temperature=1.0 / scale, gather=True)
        return {"image_text_contrastive": loss, "total": loss, "logit_scale": scale.detach()}

    def to_regionclip(self):
        """The trained CLIP as a :class:`RegionCLIP` with frozen BN (running stats frozen)."""
        from rclip_core.models.regionclip import ModelInfo, RegionCLIP, load_clip_state

        model = RegionCLIP(self.arch, with_text=True)
        state = {k: v.detach().cpu() for k, v in self.clip.state_dict().items()}
        load_clip_state(model, state, require_text=True)
        model.info = ModelInfo(source="rclip-pretrain:image_text", source_format="rclip", text_loaded=True)
        return model.eval()

    def save_final(self, path: Path, meta: dict[str, Any]) -> Path:
        return self.to_regionclip().save(path, kind="clip", extra={"pretrain": meta})


# --------------------------------------------------------------------------------------------
# the loop


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)


def _build_optimizer(recipe: PretrainRecipe, module: nn.Module) -> torch.optim.Optimizer:
    o = recipe.optim
    if o.name == "sgd":
        from rclip_core.engine.optim import build_sgd

        return build_sgd(module, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    decay, no_decay = [], []
    for _, p in module.named_parameters():
        if not p.requires_grad:
            continue
        # CLIP's rule: no weight decay on gains, biases and the logit scale (1-D / 0-D tensors)
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": o.weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def _build_scheduler(recipe: PretrainRecipe, optimizer: torch.optim.Optimizer) -> LRScheduler:
    o = recipe.optim
    if o.schedule == "cosine":
        return WarmupCosineLR(optimizer, recipe.max_steps, o.warmup_iters, o.warmup_factor, o.min_lr_factor)
    from rclip_core.engine.optim import WarmupMultiStepLR

    return WarmupMultiStepLR(optimizer, o.steps, o.gamma, o.warmup_iters, o.warmup_factor)


def _gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _any_process(flag: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    dev = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class _TensorBoard:
    def __init__(self, log_dir: Path, purge_step: int | None):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # optional (pip install rclip-toolkit[viz])
            return
        self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)

    def log(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def run_pretraining(
    recipe: PretrainRecipe,
    *,
    resume: bool = False,
    device: str | torch.device | None = None,
    progress: Callable[[StepReport], None] | None = None,
    notify: Callable[[str], None] | None = None,
) -> PretrainResult:
    """Run a pretraining recipe in this process (or this torchrun worker); see the module docstring.

    Args:
        recipe: a validated :class:`PretrainRecipe`.
        resume: continue from the newest checkpoint in ``OUTPUT_DIR/checkpoints`` (a fresh start
            when there is none). Without it, an output directory that already holds a run is
            refused before any work.
        device: "cpu", "cuda", None = CUDA when available (each torchrun worker takes
            cuda:LOCAL_RANK).
        progress: called on rank 0 after every optimizer step with a :class:`StepReport`.
        notify: called on rank 0 with one-line notes (resumed from ..., evaluation ...).

    Returns:
        :class:`PretrainResult` (``stopped`` when SIGTERM ended the run early; the checkpoint
        to resume from is then saved).
    """
    from rclip_core.engine.distributed import cleanup, init_distributed

    check_recipe_inputs(recipe)
    dev_arg = None if device is None or str(device) == "auto" else device
    info = init_distributed(device=dev_arg)
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        if info.device.type == "cpu":
            # exact resume needs bit-reproducible kernels
            torch.use_deterministic_algorithms(True, warn_only=True)
        return _run(recipe, info, resume, progress, notify)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
        cleanup()


def _run(recipe: PretrainRecipe, info, resume: bool, progress, notify) -> PretrainResult:
    from rclip_core.config import dump_recipe, recipe_to_dict
    from rclip_core.engine.checkpoint import (install_sigterm_handler, list_checkpoints, load_latest,
                                              restore_rng, restore_training_state, rng_state,
                                              save_checkpoint, trim_metrics_log)
    from rclip_core.engine.distributed import all_reduce_mean, barrier
    from rclip_core.engine.optim import clip_grad_per_parameter
    from rclip_core.fileio import atomic_write_json, atomic_write_text, ensure_output_dir

    t_start = time.perf_counter()
    rank, world, device = info.rank, info.world_size, info.device
    main = rank == 0
    say = (lambda msg: notify(msg)) if (notify is not None and main) else (lambda msg: None)
    accum = recipe.batch.accumulation(world)
    ipp = recipe.batch.images_per_process
    out = Path(os.path.expanduser(recipe.output_dir))
    ckpt_dir = out / CHECKPOINT_DIR
    existing = list_checkpoints(ckpt_dir)
    if not resume and (existing or (out / FINAL_WEIGHTS).exists()):
        raise InputError(f"output_dir {out} already holds a run",
                         hint="pass --resume to continue it, or choose another output_dir=...")

    _seed_everything(recipe.seed + rank)
    task: RegionCLIPTask | ImageTextTask
    if recipe.mode == "image_text":
        task = ImageTextTask(recipe, device, rank, notify)
    else:
        task = RegionCLIPTask(recipe, device, rank, notify)
    data = PretrainData([resolve_data_path(recipe, c) for c in recipe.data.captions], task.transform,
                        fmt=recipe.data.format,
                        images_root=resolve_data_path(recipe, recipe.data.images_root) if recipe.data.images_root
                        else None,
                        seed=recipe.seed, rank=rank, world_size=world, num_workers=recipe.data.num_workers,
                        caption_choice=recipe.data.caption_choice, max_images=recipe.data.max_images)
    trainable = task.trainable_module()
    optimizer = _build_optimizer(recipe, trainable)
    scheduler = _build_scheduler(recipe, optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"]]

    start_step, resumed_from = 0, None
    if resume:
        ckpt = load_latest(ckpt_dir, map_location="cpu")
        if ckpt is None:
            say(f"no checkpoint in {ckpt_dir}: starting from step 0")
        else:
            task.load_trainable_state({k: v.to(device) for k, v in ckpt.model_state.items()})
            start_step = restore_training_state(ckpt, optimizer, scheduler, rng=False)
            ranks = ckpt.extra.get("ranks") or []
            if len(ranks) == world:
                mine = ranks[rank]
                restore_rng(mine["rng"])
                data.load_state_dict(mine["data"])
                task.load_rng_state(mine["generator"])
            else:
                say(f"the checkpoint was written by {len(ranks)} process(es), this run has {world}: the data "
                    "order restarts at the next epoch (the run is not an exact continuation)")
                data.load_state_dict({"epoch": int(ranks[0]["data"]["epoch"]) if ranks else 0,
                                      "world_size": -1})
            resumed_from = start_step
            say(f"resumed from {ckpt.path} (step {start_step})")
    if start_step >= recipe.max_steps:
        say(f"the run already reached max_steps={recipe.max_steps}")

    metrics_path = out / METRICS_FILE
    tb = None
    if main:
        ensure_output_dir(out)
        (out / STOPPED_FILE).unlink(missing_ok=True)
        atomic_write_text(out / RECIPE_FILE, dump_recipe(recipe))
        trim_metrics_log(metrics_path, start_step if resumed_from is not None else 0)
        if recipe.logging.tensorboard:
            tb = _TensorBoard(out / "tensorboard", purge_step=start_step + 1 if resumed_from else None)
    barrier()

    module: nn.Module = task
    ddp = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        import inspect

        # BN statistics (image_text mode only) follow rank 0; frozen buffers never need syncing
        sync = recipe.mode == "image_text"
        key = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
            else "broadcast_buffers"
        ddp = DDP(task, device_ids=None, find_unused_parameters=False, **{key: sync})
        module = ddp
    use_amp = recipe.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if (use_amp and torch.cuda.is_bf16_supported()) else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    stop = install_sigterm_handler() if threading.current_thread() is threading.main_thread() else None
    sleep_after = int(os.environ.get(SLEEP_HOOK_ENV, "0") or 0)

    def save(step: int) -> None:
        mine = {"rng": rng_state(), "data": data.state_dict(), "generator": task.rng_state()}
        ranks = _gather_objects(mine)
        if main:
            save_checkpoint(ckpt_dir, step, task.trainable_state(), optimizer, scheduler,
                            extra={"ranks": ranks, "world_size": world, "recipe": recipe_to_dict(recipe)},
                            rng=False, keep_last=recipe.logging.keep_checkpoints)
        barrier()

    images_per_step = ipp * accum * world
    window: dict[str, float] = {}
    window_steps = 0
    t_window = time.perf_counter()
    last_metrics: dict[str, float] = {}
    stopped = False
    step = start_step
    last_saved = start_step if resumed_from is not None else -1
    log_file = open(metrics_path, "a", encoding="utf-8") if main else None
    try:
        while step < recipe.max_steps:
            optimizer.zero_grad(set_to_none=True)
            step_values: dict[str, float] = {}
            for micro in range(accum):
                batch = data.next_batch(ipp)
                sync = contextlib.nullcontext() if (ddp is None or micro == accum - 1) else ddp.no_sync()
                with sync:
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        losses = module(batch)
                    total = losses["total"]
                    scaler.scale(total / accum).backward()
                for k, v in losses.items():
                    step_values[k] = step_values.get(k, 0.0) + float(v.detach()) / accum
            if not math.isfinite(step_values["total"]):
                raise RuntimeFailure(f"the loss is {step_values['total']} at step {step + 1}",
                                     hint="lower optim.lr, or check the data")
            lr = float(optimizer.param_groups[0]["lr"])
            if recipe.optim.clip_norm is not None:
                scaler.unscale_(optimizer)
                clip_grad_per_parameter(params, recipe.optim.clip_norm)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            task.after_step()
            step += 1
            for k, v in step_values.items():
                window[k] = window.get(k, 0.0) + v
            window_steps += 1
            logged = step % recipe.logging.log_every == 0 or step == recipe.max_steps
            now = time.perf_counter()
            shown = step_values
            ips = images_per_step * window_steps / max(now - t_window, 1e-9)
            if logged:
                shown = all_reduce_mean({k: v / window_steps for k, v in window.items()})
                last_metrics = {"step": step, "lr": lr, **shown, "images_per_s": ips,
                                "time": now - t_start, "epoch": data.epoch}
                if log_file is not None:
                    log_file.write(json.dumps(last_metrics) + "\n")
                    log_file.flush()
                if tb is not None:
                    tb.log(step, {"lr": lr, "images_per_s": ips, **{f"loss/{k}": v for k, v in shown.items()}})
                window, window_steps, t_window = {}, 0, now
            if progress is not None and main:
                progress(StepReport(step=step, max_steps=recipe.max_steps, losses=dict(shown), lr=lr,
                                    images_per_s=ips, elapsed_s=now - t_start, epoch=data.epoch, logged=logged))
            if recipe.checkpoint_every and step % recipe.checkpoint_every == 0 and step < recipe.max_steps:
                save(step)
                last_saved = step
            if sleep_after and step == sleep_after:
                time.sleep(600)
            if _any_process(bool(stop), device) and step < recipe.max_steps:
                if last_saved != step:
                    save(step)
                    last_saved = step
                stopped = True
                if main:
                    atomic_write_json(out / STOPPED_FILE, {"step": step, "checkpoint": str(ckpt_dir)})
                say(f"stopped by SIGTERM after step {step}; checkpoint saved, continue with --resume")
                break
        if not stopped and last_saved != step:
            save(step)
    finally:
        if log_file is not None:
            log_file.close()
        if tb is not None:
            tb.close()
        if stop is not None:
            stop.uninstall()
        data.close()

    final = None
    evaluation = None
    if not stopped:
        meta = {"mode": recipe.mode, "steps": step, "seed": recipe.seed, "world_size": world}
        if main:
            final = task.save_final(out / FINAL_WEIGHTS, meta)
            if recipe.eval.instances:
                from rclip_core.engine.quick_eval import evaluate_run

                evaluation = evaluate_run(recipe, task, final, device)
                atomic_write_json(out / EVAL_FILE, evaluation, indent=1)
        barrier()
    return PretrainResult(output_dir=out, final_weights=final, steps=step, stopped=stopped,
                          resumed_from=resumed_from, world_size=world, seconds=time.perf_counter() - t_start,
                          last_metrics=last_metrics, evaluation=evaluation)
