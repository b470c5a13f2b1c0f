"""RegionCLIP region-text pretraining (paper sec. 3; official ``clip_rcnn.py: PretrainFastRCNN``
and ``clip_roi_heads.py: PretrainRes5ROIHeads``) as a task of the one training loop.

Per forward pass and process (``batch.images_per_process`` images; the paper: 3 per GPU):

1. images are resized (short side from ``data.short_sides``, bicubic, long side <= max_size;
   ``data.input_path`` picks Detectron2's or the official pretraining's size rounding),
   flipped at random, CLIP-normalised and padded into one canvas [B, 3, H_pad, W_pad];
2. regions per image: ``regions.per_image`` (100) sampled at random from the offline RPN's
   300 proposals (NMS 0.5), or random grid boxes, or jittered ground-truth boxes, or the boxes
   of pseudo-label shards;
3. student: trunk -> res4 -> RoIAlign of the regions AND of one whole-image box per image (the
   image embedding of paper eq. 4: the image's own extent, or with ``data.input_path:
   official`` the padded batch canvas [0, 0, W_pad, H_pad] as the official code) -> res5 +
   attnpool, in one pass;
4. teacher (frozen, no grad): trunk on the same normalised canvas, RoIAlign of the regions,
   res5 + attnpool; pseudo labels = argmax of softmax(cos / 0.01) over the concept pool, kept
   when the max probability > 0.1 (``CONCEPT_THRES``), or read from shards;
5. text: the frozen text tower's EOT feature of one caption per image;
6. loss = paper eq. 5 (:func:`rclip_core.losses.pretraining_loss`); the image-text term is
   gathered over all processes with gradient flow.

The student starts from the teacher's weights unless ``model.student`` names others; its text
tower, stem and res2 (``model.freeze_at`` 2) are frozen and every BN is a FrozenBN. The
attention pool's key bias is frozen too: it adds the same number to every attention logit of a
query, so it never changes the output and never gets a gradient (DDP would otherwise wait for
it forever).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from rclip_core.config.pretrain import PretrainRecipe, resolve_data_path
from rclip_core.config.sections import ModelSource
from rclip_core.data.shards import PseudoLabelShards
from rclip_core.engine.data import ShortSideResize, TrainSample
from rclip_core.engine.tasks.pretraining import PretrainTask, ddp_buffer_sync
from rclip_core.errors import InputError

__all__ = ["RegionCLIPTask", "load_source"]


def load_source(src: ModelSource, role: str, device: torch.device, seed: int, with_rpn: bool = True,
                trust: bool = False):
    from rclip_core.weights.loaders import load_model

    try:
        return load_model(weights=src.weights, model=src.model, pretrained=src.pretrained,
                          random_init=src.random_init, device=device, seed=seed, with_rpn=with_rpn, trust=trust)
    except InputError as e:
        raise type(e)(f"model.{role}: {e}", hint=e.hint) from None


def _concept_names(recipe: PretrainRecipe, shard_concepts: Sequence[str] | None) -> list[str]:
    """The concept pool named by ``concepts.pool`` (default: the pseudo-label shards' pool)."""
    from rclip_core.data.concepts.pool import load_concept_pool

    if not recipe.concepts.pool:
        if shard_concepts is not None:
            return list(shard_concepts)
        raise InputError("concepts.pool is not set", hint="e.g. concepts.pool=coco-nouns")
    try:
        return load_concept_pool(recipe.concepts.pool, root=recipe.data.root)
    except InputError as e:
        raise type(e)(f"concepts.pool: {e}", hint=e.hint) from None


def _load_embeddings(recipe: PretrainRecipe, value: str, key: str) -> Tensor:
    from rclip_core.weights.loaders import load_class_embeddings
    from rclip_core.weights.registry import REGISTRY, fetch_named

    path = fetch_named(value) if value in REGISTRY else resolve_data_path(recipe, value)
    try:
        emb, _ = load_class_embeddings(path, trust=recipe.trust_weights)
    except InputError as e:
        raise type(e)(f"{key}: {e}", hint=e.hint) from None
    return emb.float()


def _embed_concepts(model, names: list[str], recipe: PretrainRecipe) -> Tensor:
    """[N, D] prompt-ensemble embeddings with ``model``'s frozen text tower (the one rule:
    :func:`rclip_core.models.text.embed_class_names`)."""
    from rclip_core.models.text import embed_class_names

    return embed_class_names(model, names, templates=recipe.concepts.templates,
                             average=recipe.concepts.average).float()


def _freeze_student(student, freeze_at: int) -> None:
    """Text tower frozen; visual stages below ``freeze_at`` frozen (Detectron2 ``FREEZE_AT``)."""
    from rclip_core.models.clip import freeze_visual

    student.requires_grad_(False)
    freeze_visual(student.clip.visual, freeze_at)


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



class RegionCLIPTask(PretrainTask):
    """Teacher + student + regions + losses of RegionCLIP pretraining (see the module docstring)."""

    def __init__(self, recipe: PretrainRecipe, device: torch.device, rank: int = 0):
        super().__init__(recipe, device, rank)
        from rclip_core.models.text import get_tokenizer

        # broadcast_buffers / forward_sync_buffers: frozen buffers never need syncing
        self.ddp_kwargs = ddp_buffer_sync(False)
        r = recipe.regions
        self.region_terms = recipe.losses.region_terms
        self.image_text = recipe.losses.image_text_contrastive > 0
        self.source = r.source
        teacher_src = recipe.model.teacher
        student_src = recipe.model.student if recipe.model.student.given else teacher_src
        self.student = load_source(student_src, "student" if recipe.model.student.given else "teacher",
                                    device, recipe.seed, trust=recipe.trust_weights)
        if not self.student.has_text:
            raise InputError(f"the student ({student_src.describe()}) has no text tower",
                             hint="pretraining embeds captions and concepts with it: use a CLIP checkpoint "
                                  "with its text tower")
        _freeze_student(self.student, recipe.model.freeze_at)

        # ---- regions
        self.shards = None
        shard_concepts = None
        if r.source == "shards" and self.region_terms:
            self.shards = PseudoLabelShards(resolve_data_path(recipe, r.shards or ""))
            shard_concepts = list(self.shards.concepts)
        self.gt_boxes = None
        self.gt_misses = 0  # training images met that regions.gt_boxes does not list
        if r.source == "gt_jitter" and self.region_terms:
            from rclip_core.data.boxes import load_boxes_file

            self.gt_boxes = load_boxes_file(resolve_data_path(recipe, r.gt_boxes or ""))

        teacher = None
        needs_teacher = self.region_terms and r.source != "shards"
        if needs_teacher:
            # the teacher's RPN (official files carry one) is needed only as the proposal source
            teacher = load_source(teacher_src, "teacher", device, recipe.seed,
                                   with_rpn=r.source == "rpn" and not r.rpn.weights and self.student.rpn is None,
                                   trust=recipe.trust_weights)
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
        d = recipe.data
        self.official_input = d.input_path == "official"  # see DataConfig.input_path
        self.transform = ShortSideResize(tuple(d.short_sides), d.max_size, d.interpolation, d.flip,
                                         size_rule="torchvision" if self.official_input else "detectron2")

    def _attach_rpn(self, teacher) -> None:
        from rclip_core.models.proposals.offline import RPNSettings
        from rclip_core.weights.loaders import attach_rpn, load_rpn_file
        from rclip_core.weights.registry import REGISTRY, fetch_named

        rpn_cfg = self.recipe.regions.rpn
        if rpn_cfg.weights:
            path = fetch_named(rpn_cfg.weights) if rpn_cfg.weights in REGISTRY else rpn_cfg.weights
            load_rpn_file(self.student, path, trust=self.recipe.trust_weights)
        elif self.student.rpn is None and teacher is not None and teacher.rpn is not None:
            attach_rpn(self.student, teacher.rpn.state_dict())
        if self.student.rpn is None:
            raise InputError("regions.source rpn needs an offline RPN, and neither the student's nor the "
                             "teacher's weights carry one",
                             hint="set regions.rpn.weights (rpn_lvis_866.pth or rpn-lvis-866), or use "
                                  "regions.source random")
        self.student.rpn.settings = RPNSettings(pre_nms_topk=rpn_cfg.pre_nms_topk,
                                                post_nms_topk=rpn_cfg.post_nms_topk,
                                                nms=rpn_cfg.nms)

    # ---- state

    def trainable_state(self) -> dict[str, Tensor]:
        return self.student.clip.state_dict()

    def load_trainable_state(self, state: dict[str, Tensor]) -> None:
        self.student.clip.load_state_dict(state, strict=True)

    def trainable_module(self) -> nn.Module:
        return self.student.clip

    # ---- regions

    def _sample(self, n: int, k: int) -> Tensor:
        return torch.randperm(n, generator=self.generator)[:k]

    def stream(self, *, per_pass: int, accumulation: int, rank: int, world: int, start_step: int):
        stream = super().stream(per_pass=per_pass, accumulation=accumulation, rank=rank, world=world,
                                start_step=start_step)
        if self.gt_boxes is not None and stream.data.entries:
            self._check_gt_coverage([e.image_key for e in stream.data.entries])
        return stream

    def _check_gt_coverage(self, keys: list[str]) -> None:
        """regions.source gt_jitter: every training image must be in regions.gt_boxes (an image
        listed there without boxes is fine: it gets random regions, as in the official GT mode)."""
        from rclip_core.data.boxes import lookup_boxes

        missing = []
        for key in keys:
            try:
                lookup_boxes(self.gt_boxes, key)
            except InputError:
                missing.append(key)
        if missing:
            raise InputError(f"regions.source gt_jitter: {len(missing)} of {len(keys)} training images have no entry "
                             f"in regions.gt_boxes {self.recipe.regions.gt_boxes} (e.g. {missing[0]})",
                             hint="pass the instances / boxes file of the caption files' images, or use "
                                  "regions.source random")

    def data_report(self) -> dict[str, Any]:
        report = super().data_report()
        if self.gt_boxes is not None:
            report["gt_box_misses"] = self.gt_misses
        return report

    def _jittered_gt(self, sample: TrainSample) -> Tensor:
        from rclip_core.data.boxes import lookup_boxes
        from rclip_core.models.proposals.boxes import random_boxes

        r = self.recipe.regions
        h, w = sample.size
        try:
            gt = lookup_boxes(self.gt_boxes, sample.image_key)
        except InputError:  # not in the boxes file (indexed caption files were checked up front)
            self.gt_misses += 1
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
        from rclip_core.models.proposals.boxes import random_boxes

        r = self.recipe.regions
        extras: list[dict] = []
        if self.source == "rpn":
            props = self.student.rpn(self.rpn_inputs(images))
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

    def rpn_inputs(self, images: list[Tensor]) -> list[Tensor]:
        """[3, H, W] uint8 RGB -> the RPN branch's 0-255 float RGB: the pixel values (rclip), or
        ``ToTensor`` then ``x * 255`` as ``PretrainFastRCNN.offline_preprocess_image`` (official;
        in float32 (k / 255) * 255 == k for every k, so both give the same numbers)."""
        if self.official_input:
            return [im.float().div(255.0) * 255.0 for im in images]
        return [im.float() for im in images]

    def image_boxes(self, images: list[Tensor], canvas: tuple[int, int]) -> list[Tensor]:
        """The whole-image box of each image for the image-text loss: its own extent (rclip), or
        the padded batch canvas [0, 0, W_pad, H_pad] (official ``create_global_proposals``)."""
        h_pad, w_pad = canvas
        sizes = [(h_pad, w_pad) if self.official_input else (int(im.shape[-2]), int(im.shape[-1]))
                 for im in images]
        return [torch.tensor([[0.0, 0.0, float(w), float(h)]], device=self.device_) for h, w in sizes]

    # ---- forward

    def forward(self, batch: list[TrainSample]) -> dict[str, Tensor]:
        from rclip_core.losses import PseudoLabels, pretraining_loss, pseudo_label_regions

        dev = self.device_
        images = [s.image.to(dev, non_blocking=True) for s in batch]
        enc = self.student.encoder
        x = enc.batch_images(images)  # [B, 3, H_pad, W_pad], CLIP-normalised
        whole = self.image_boxes(images, (int(x.shape[-2]), int(x.shape[-1])))
        boxes, extras = self.region_boxes(batch, images) if self.region_terms else ([], [])
        per_image: list[Tensor] = []
        for i in range(len(batch)):
            parts = []
            if self.region_terms:
                parts.append(boxes[i].to(dev, torch.float32))
            if self.image_text:
                parts.append(whole[i])
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
                    keep = torch.ones_like(keep)  # the official fallback: keep all when none passes
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
        from rclip_core.weights.native import save_model

        return save_model(self.student, path, kind="regionclip", extra={"pretrain": meta})


