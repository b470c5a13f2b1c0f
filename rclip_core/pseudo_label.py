"""Teacher pseudo labels for region-text pretraining, written as sharded, resumable shards
(:mod:`rclip_core.data.shards`) that pretraining reads with ``PseudoLabelShards``.

The labels are the official code's ``clip_rcnn.py: PretrainFastRCNN.get_psuedo_concept_labels``
(paper Sec. 3.1, region-text pairs from the teacher), computed once offline instead of at every
training step. For every image: proposals (``PretrainFastRCNN.get_region_proposals``: the
offline RPN with the PRETRAINING settings - NMS 0.5 (``OFFLINE_RPN_NMS_THRESH``), ``rpn_topk``
(300, ``PRETRAIN_RPN_REGIONS``) after NMS - then ``regions_per_image`` (100,
``PRETRAIN_SAMPLE_REGIONS``) drawn with a seeded ``randperm``; or random grid-aligned boxes,
``CROP_REGION_TYPE RANDOM``), the teacher's region embeddings (trunk once, RoIAlign + res5 +
attention pool per box), p = softmax(cos(region, concept) / T) over the whole concept pool
(T = 0.01, ``s_temp``), the argmax concept as the label, kept when max p > threshold (0.1,
``CONCEPT_THRES``, strict) - or every region of the image when none passes - and optionally the
teacher's top-k logits (cos / T) for distillation.

Determinism: each image is processed on its own (never padded into a batch with others) and its
random draws are seeded by ``(seed, image key)``, so an image's labels do not depend on the
shard size, the number of processes, or on whether the run was interrupted and resumed.

A rerun with the same settings skips valid shards; with other settings it is refused
(``overwrite=True`` starts over). With ``world_size`` W > 1, rank r labels shards r, r+W, ...;
rank 0 writes the final index after a barrier.

Note on the keep fallback: the official code keeps every region when none of the regions of the
whole per-GPU batch (3 images) passes; here the fallback is per image (the shards do not know the
trainer's batches). ``max_prob`` is stored, so a trainer can apply a batch-level rule instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from rclip_core import __version__
from rclip_core.data.images import MAX_SIZE, TEST_SHORT_SIDE, PreparedImage, boxes_to_original
from rclip_core.data.shards import (FORMAT, INDEX_FILE, VERSION, ImageItem, ImageList, index_record, is_shard_file,
                                    read_shard_meta, relative_key, shard_name, write_shard)
from rclip_core.dist import barrier, get_rank, get_world_size
from rclip_core.errors import InputError, RuntimeFailure
from rclip_core.fileio import atomic_write_json, read_json
from rclip_core.losses import pseudo_label_regions, teacher_concept_logits, topk_teacher

__all__ = [
    "PROPOSAL_MODES",
    "LabelSettings",
    "collect_label_images",
    "dataset_label_images",
    "image_seed",
    "image_proposals",
    "label_image",
    "PseudoLabeler",
    "LabelPlan",
    "LabelSummary",
]

PROPOSAL_MODES = ("rpn", "random")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

Progress = Callable[[int], None]


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class LabelSettings:
    """What decides the labels (all but ``chunk_size`` and ``workers`` are part of the settings
    a resumed run must share). Defaults are the official pretraining values
    (``configs/pretrain/RegionCLIP_RN50.yaml``, ``clip_rcnn.py: PretrainFastRCNN``)."""

    proposals: str = "rpn"  # rpn | random
    regions_per_image: int = 100  # PRETRAIN_SAMPLE_REGIONS
    rpn_topk: int = 300  # RPN proposals kept after NMS 0.5, before sampling (PRETRAIN_RPN_REGIONS)
    threshold: float = 0.1  # CONCEPT_THRES, strict
    temperature: float = 0.01  # s_temp
    topk: int = 0  # teacher logits kept per region for distillation (0: none)
    short_side: int = TEST_SHORT_SIDE
    max_size: int = MAX_SIZE
    shard_size: int = 1000
    seed: int = 0
    save_embeddings: bool = False
    precision: str = "fp32"  # fp32 | bf16
    chunk_size: int = 256  # regions per head call (memory only)
    workers: int = 2  # image decoding threads (speed only)

    def validate(self) -> "LabelSettings":
        if self.proposals not in PROPOSAL_MODES:
            raise InputError(f"unknown proposal mode {self.proposals!r}", "use rpn or random")
        if self.regions_per_image < 1:
            raise InputError(f"regions per image must be >= 1, got {self.regions_per_image}")
        if self.rpn_topk < 1:
            raise InputError(f"RPN top-k must be >= 1, got {self.rpn_topk}")
        if not 0.0 <= self.threshold < 1.0:
            raise InputError(f"threshold must be in [0, 1), got {self.threshold}")
        if not self.temperature > 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if self.topk < 0:
            raise InputError(f"topk must be >= 0, got {self.topk}")
        if self.short_side < 1 or self.max_size < self.short_side:
            raise InputError(f"short side {self.short_side} / max size {self.max_size}: need "
                             "1 <= short side <= max size")
        if self.shard_size < 1:
            raise InputError(f"shard size must be >= 1, got {self.shard_size}")
        if self.precision not in ("fp32", "bf16"):
            raise InputError(f"unknown precision {self.precision!r}", "use fp32 or bf16")
        if self.chunk_size < 1 or self.workers < 1:
            raise InputError("chunk size and workers must be >= 1")
        return self


# --------------------------------------------------------------------------------------------
# the images to label


def _keyed(paths_and_ids: list[tuple[str, str | None]], root: str | None, source: str,
           max_images: int | None) -> ImageList:
    """Deduplicate by file, pick the data root (``root`` unless some image lies outside it, then
    the images' common folder) and make the keys relative to it."""
    seen: set[str] = set()
    uniq: list[tuple[str, str | None]] = []
    for p, rk in paths_and_ids:
        ap = os.path.abspath(p)
        if ap not in seen:
            seen.add(ap)
            uniq.append((ap, rk))
            if max_images is not None and len(uniq) >= max_images:
                break
    if not uniq:
        raise InputError(f"no images in {source.split(':', 1)[-1]}")
    base = os.path.abspath(root) if root is not None else None
    if base is None or any(relative_key(p, base).startswith("../") for p, _ in uniq):
        base = os.path.commonpath([os.path.dirname(p) for p, _ in uniq])
    items = [ImageItem(relative_key(p, base), p, rk) for p, rk in uniq]
    first = [it.path for it in items[:16]]
    if not any(os.path.isfile(p) for p in first):
        raise InputError(f"none of the first {len(first)} images of {source.split(':', 1)[-1]} exist "
                         f"(e.g. {first[0]})", "check the data path, or pass the image folder with --images")
    return ImageList(items, base, source)


def _looks_like_instances(data: Any) -> bool:
    return isinstance(data, dict) and "images" in data and "categories" in data


def collect_label_images(data: str | os.PathLike, images: str | os.PathLike | None = None,
                         fmt: str | None = None, max_images: int | None = None) -> ImageList:
    """The images to label, in data order, from

    - a folder: every image file under it (recursively, sorted); keys relative to it;
    - a COCO / LVIS instances JSON (``images`` + ``categories``): its images under ``images``
      (default: the JSON's folder); keys = ``file_name`` (relative to the images folder);
    - a caption file of any :mod:`rclip_core.data.captions` format with image paths (JSONL,
      COCO captions, CSV/TSV): each distinct image once, in first-mention order; keys = the
      image path as written (relative to ``images`` or the caption file's folder).

    ``max_images`` keeps the first N images. Text-only caption formats and tar shards are
    refused (their images are not addressable files).
    """
    p = Path(data)
    if max_images is not None and max_images < 1:
        raise InputError(f"--max-images must be >= 1, got {max_images}")
    if not p.exists():
        raise InputError(f"data not found: {p}")
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix.lower() in _IMAGE_EXTENSIONS
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
        if not files:
            raise InputError(f"folder {p} contains no images ({', '.join(_IMAGE_EXTENSIONS[:4])}, ...)")
        return _keyed([(f, None) for f in files], str(p), f"folder:{p.resolve()}", max_images)
    if images is not None and not Path(images).is_dir():
        raise InputError(f"images folder not found: {images}")
    if p.suffix.lower() == ".json" and fmt in (None, "json"):
        raw = read_json(p, what="data file")
        if _looks_like_instances(raw):
            from rclip_core.data.coco import load_instances

            ds = load_instances(raw)
            root = Path(images) if images is not None else p.parent
            pairs = []
            for img in ds.images:
                cand = root / img["file_name"]
                if not cand.is_file() and img.get("coco_folder"):
                    alt = root / img["coco_folder"] / img["file_name"]
                    cand = alt if alt.is_file() else cand
                pairs.append((str(cand), str(img["id"])))
            return _keyed(pairs, str(root), f"coco:{p.resolve()}", max_images)
    from rclip_core.data.captions import iter_records, resolve_sources

    (src,) = resolve_sources([str(p)], fmt)
    if src.text_only or src.fmt == "tar":
        raise InputError(f"{p} ({src.fmt}) has no image files to label",
                         "use a JSONL/CSV/COCO caption file with image paths, a COCO instances file "
                         "or an image folder")
    pairs = []
    seen: set[str] = set()
    for rec in iter_records(src, images_root=images):
        if rec.image is None:
            raise InputError(f"{p}: record {rec.key!r} has no image path",
                             "the caption file needs an image column (image / filepath)")
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]+://", rec.image):
            raise InputError(f"{p}: image {rec.image} is a URL", "download the images first")
        if rec.image not in seen:  # an image with several captions is labelled once
            seen.add(rec.image)
            pairs.append((rec.image, rec.key))
            if max_images is not None and len(pairs) >= max_images:
                break
    root = str(images) if images is not None else str(p.parent)
    return _keyed(pairs, root, f"captions:{p.resolve()}", max_images)


def dataset_label_images(dataset: str, images: str | os.PathLike | None = None, split: str = "train",
                         max_images: int | None = None) -> ImageList:
    """The images of ``split`` of a named data set, by the names ``rclip eval`` and ``rclip
    finetune`` take (``coco``, ``coco-ovd``, ``lvis``, ``shapes:DIR``, ``PATH.json``; see
    :func:`rclip_core.data.datasets.dataset_images`), in the instances file's order; keys =
    ``file_name`` under the images folder, record keys = the image ids. Images the data set
    lists but that are not on disk are left out and counted in ``ImageList.missing``."""
    from dataclasses import replace

    from rclip_core.data.datasets import dataset_images

    if max_images is not None and max_images < 1:
        raise InputError(f"--max-images must be >= 1, got {max_images}")
    ds = dataset_images(dataset, images, split)
    pairs = [(str(r.path), str(r.image["id"])) for r in ds.present]
    found = _keyed(pairs, str(ds.images_dir), f"{ds.name}:{split}:{Path(ds.annotations).resolve()}", max_images)
    return replace(found, missing=len(ds.missing))


# --------------------------------------------------------------------------------------------
# labelling one image


def image_seed(seed: int, key: str) -> int:
    """A 63-bit seed for ``key``'s random draws (independent of sharding and process count)."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _rpn_settings_for(kind: str, topk: int):
    from dataclasses import replace

    from rclip_core.models.proposals.offline import RPN_KINDS, rpn_settings

    # NMS 0.5, `topk` kept after NMS (PRETRAIN_RPN_REGIONS: 300); a detector's trained RPN (one
    # level) takes the FPN values
    s = rpn_settings("pretraining", kind if kind in RPN_KINDS else "lvis_866_fpn")
    return replace(s, post_nms_topk=int(topk))


def image_proposals(model, prep: PreparedImage, key: str, settings: LabelSettings) -> Tensor:
    """Proposals of one image in RESIZED pixels, [R, 4] float32 XYXY, R <= regions_per_image.

    ``rpn``: the model's offline RPN (its ``settings`` must be the pretraining preset, see
    :class:`PseudoLabeler`), then ``randperm(len)[:n]`` as ``PRETRAIN_SAMPLE_REGIONS``; fewer
    proposals than n are all kept. ``random``: n grid-aligned random boxes
    (:func:`rclip_core.models.proposals.boxes.random_boxes`). Both draw from a generator seeded with
    :func:`image_seed`.
    """
    g = torch.Generator().manual_seed(image_seed(settings.seed, key))
    n = settings.regions_per_image
    if settings.proposals == "random":
        from rclip_core.models.proposals.boxes import random_boxes

        return random_boxes(prep.size, n, g).float()
    if model.rpn is None:
        raise InputError("RPN proposals need an offline RPN, and the teacher carries none",
                         "pass --rpn-weights rpn_lvis_866.pth, or use --proposals random")
    with torch.inference_mode():
        out = model.rpn([prep.tensor.to(model.device)])
    boxes = out[0].boxes.float().cpu()
    if boxes.shape[0] > n:
        boxes = boxes[torch.randperm(boxes.shape[0], generator=g)[:n]]
    return boxes.clone()


def _autocast(device: torch.device, precision: str):
    from contextlib import nullcontext

    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


def label_image(model, prep: PreparedImage, key: str, concept_emb: Tensor, settings: LabelSettings
                ) -> dict[str, Tensor]:
    """Pseudo labels of one image (``clip_rcnn.py: PretrainFastRCNN.get_psuedo_concept_labels``
    on one image's proposals).

    Args:
        model: the teacher :class:`~rclip_core.models.regionclip.RegionCLIP` (eval mode).
        prep: the resized image (``short_side`` / ``max_size``).
        key: the image key (seeds the proposal draws).
        concept_emb: [N, D] the teacher's concept embeddings (unnormalised), on the model's device.
        settings: see :class:`LabelSettings`.

    Returns (CPU tensors, R regions): ``boxes`` [R, 4] float32 in original pixels, ``target``
    [R] int64, ``max_prob`` [R] float32, ``keep`` [R] bool, and ``topk_inds`` [R, k] int64 +
    ``topk_logits`` [R, k] float32 when ``topk`` > 0, ``embeddings`` [R, D] float16 with
    ``save_embeddings``.
    """
    boxes = image_proposals(model, prep, key, settings)
    enc = model.encoder
    dev = model.device
    with torch.inference_mode(), _autocast(dev, settings.precision):
        res4 = enc.trunk(enc.batch_images([prep.tensor]))
        emb = enc.forward_features(res4, [boxes.to(dev)], chunk_size=settings.chunk_size).float()
    labels = pseudo_label_regions(emb, concept_emb, settings.temperature, settings.threshold)
    assert labels.teacher_probs is not None
    max_prob, target = labels.teacher_probs.max(dim=1)
    out = {"boxes": boxes_to_original(boxes, prep).float(), "target": target.long().cpu(),
           "max_prob": max_prob.float().cpu(), "keep": labels.keep_mask.bool().cpu()}
    if settings.topk > 0:
        k = min(settings.topk, concept_emb.shape[0])
        if emb.shape[0]:
            inds, logits = topk_teacher(teacher_concept_logits(emb, concept_emb, settings.temperature), k)
        else:
            inds, logits = torch.zeros(0, k, dtype=torch.long), torch.zeros(0, k)
        out["topk_inds"] = inds.long().cpu()
        out["topk_logits"] = logits.float().cpu()
    if settings.save_embeddings:
        out["embeddings"] = emb.to(torch.float16).cpu()
    return {k: v.clone() for k, v in out.items()}  # plain tensors, not inference-mode ones


def _empty_image(settings: LabelSettings, k: int, dim: int) -> dict[str, Tensor]:
    out = {"boxes": torch.zeros(0, 4), "target": torch.zeros(0, dtype=torch.long), "max_prob": torch.zeros(0),
           "keep": torch.zeros(0, dtype=torch.bool)}
    if settings.topk > 0:
        out["topk_inds"] = torch.zeros(0, k, dtype=torch.long)
        out["topk_logits"] = torch.zeros(0, k)
    if settings.save_embeddings:
        out["embeddings"] = torch.zeros(0, dim, dtype=torch.float16)
    return out


# --------------------------------------------------------------------------------------------
# a labelling run


@dataclass
class LabelPlan:
    """What a run (this process) will do: ``shards`` to label, the images in them; shards
    already valid on disk (all processes) and invalid files that will be rewritten."""

    shards: list[int]
    images: int
    shards_total: int
    shards_done: int
    invalid: list[str] = field(default_factory=list)


@dataclass
class LabelSummary:
    images: int  # images labelled by this process in this run
    regions: int
    kept: int
    failed: list[tuple[str, str]]  # (image key, message) of this run
    seconds: float
    complete: bool  # every shard of the data set is on disk (as seen by this process)
    shards_done: int
    shards_total: int
    index: dict[str, Any]

    @property
    def images_per_second(self) -> float:
        return self.images / max(self.seconds, 1e-9)


class PseudoLabeler:
    """Label an :class:`ImageList` with a teacher into ``out_dir`` (see the module docstring).

    ``model``: the teacher RegionCLIP; with ``proposals="rpn"`` its offline RPN's settings are
    set to the pretraining preset (NMS 0.5, max(300, n) after NMS) here. ``concept_emb`` [N, D]
    are the teacher's concept embeddings in ``concept_names`` order. ``info`` adds fields to the
    index (templates, average, ...); the fields in ``COMPARE`` must match on resume.
    ``rank`` / ``world_size`` default to the initialised process group (1 process otherwise).
    Usage: ``plan = labeler.prepare(overwrite)`` then ``labeler.run(plan, progress)``.
    """

    def __init__(self, model, concept_names: Sequence[str], concept_emb: Tensor, images: ImageList,
                 out_dir: str | os.PathLike, settings: LabelSettings, *, concept_pool_sha256: str,
                 info: dict[str, Any] | None = None, rank: int | None = None, world_size: int | None = None):
        self.settings = settings.validate()
        self.model = model
        self.names = list(concept_names)
        if concept_emb.dim() != 2 or concept_emb.shape[0] != len(self.names):
            raise InputError(f"concept embeddings have shape {list(concept_emb.shape)} but there are "
                             f"{len(self.names)} concept names", "the rows must be the concepts in pool order")
        if concept_emb.shape[1] != model.embed_dim:
            raise InputError(f"concept embeddings have dimension {concept_emb.shape[1]} but the teacher's "
                             f"region embeddings have {model.embed_dim}",
                             "embed the concepts with the teacher's text tower")
        self.concept_emb = concept_emb.float().to(model.device)
        self.images = images
        self.out = Path(out_dir)
        if settings.proposals == "rpn":
            if model.rpn is None:
                raise InputError("--proposals rpn needs an offline RPN, and the teacher carries none",
                                 "pass --rpn-weights rpn_lvis_866.pth, or use --proposals random")
            model.rpn.settings = _rpn_settings_for(model.rpn.kind, settings.rpn_topk)
        if rank is None or world_size is None:
            rank, world_size = get_rank(), get_world_size()
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_shards = (len(images) + settings.shard_size - 1) // settings.shard_size
        self.header = self._header(concept_pool_sha256, info or {})
        self._meta_cache: dict[str, tuple[tuple[int, int], dict | None]] = {}

    # -- index ------------------------------------------------------------------------------
    COMPARE = ("format", "version", "teacher", "architecture", "concepts", "concept_pool_sha256", "templates",
               "average", "proposals", "rpn", "regions_per_image", "threshold", "temperature", "topk",
               "short_side", "max_size", "shard_size", "seed", "save_embeddings", "precision", "images_total",
               "images_sha256")

    def _header(self, pool_sha: str, info: dict[str, Any]) -> dict[str, Any]:
        s = self.settings
        m = self.model
        rpn = None
        if s.proposals == "rpn":
            st = m.rpn.settings
            rpn = {"kind": m.rpn.kind, "nms_thresh": st.nms, "pre_nms_topk": st.pre_nms_topk,
                   "post_nms_topk": st.post_nms_topk}
        h: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "teacher": m.info.source, "architecture": m.arch.name,
            "concepts": self.names, "concept_pool_sha256": pool_sha, "templates": info.get("templates"),
            "average": info.get("average"), "proposals": s.proposals, "rpn": rpn,
            "regions_per_image": s.regions_per_image, "threshold": s.threshold, "temperature": s.temperature,
            "topk": min(s.topk, len(self.names)), "short_side": s.short_side, "max_size": s.max_size,
            "shard_size": s.shard_size, "seed": s.seed, "save_embeddings": s.save_embeddings,
            "precision": s.precision, "images_total": len(self.images), "images_sha256": self.images.sha256(),
        }
        h["settings_sha256"] = hashlib.sha256(json.dumps({k: h[k] for k in self.COMPARE}, sort_keys=True)
                                              .encode("utf-8")).hexdigest()
        h.update({"embed_dim": m.embed_dim, "data": self.images.source, "data_root": self.images.data_root,
                  "num_shards": self.num_shards, "rclip_version": __version__,
                  **{k: v for k, v in info.items() if k not in ("templates", "average")}})
        return h

    def _check_existing(self) -> None:
        """Refuse an output directory written with other settings (one line naming the field)."""
        idx_path = self.out / INDEX_FILE
        if not idx_path.exists():
            return
        try:
            old = json.loads(idx_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise InputError(f"{idx_path} exists but is not readable JSON",
                             "pass --overwrite to start over, or choose another --out") from None
        if not isinstance(old, dict) or old.get("format") != FORMAT:
            raise InputError(f"{self.out} holds an index.json that is not a pseudo-label index",
                             "choose another --out")
        for k in self.COMPARE:
            if old.get(k) != self.header[k]:
                was, now = old.get(k), self.header[k]
                if isinstance(was, list) or isinstance(now, list):
                    was = f"{len(was)} entries" if isinstance(was, list) else was
                    now = f"{len(now)} entries" if isinstance(now, list) else now
                    if was == now:
                        was, now = "one list", "a different one"
                raise InputError(f"{self.out} was labelled with other settings ({k}: {was} there, {now} now)",
                                 "rerun with the same settings to resume, pass --overwrite to start over, "
                                 "or choose another --out")

    def _valid_meta(self, i: int) -> dict | None:
        """Metadata of shard ``i`` if its file is a complete shard of THIS run, else None."""
        path = self.out / shard_name(i)
        try:
            st = path.stat()
        except OSError:
            return None
        sig = (st.st_size, st.st_mtime_ns)
        cached = self._meta_cache.get(path.name)
        if cached is not None and cached[0] == sig:
            return cached[1]
        meta = read_shard_meta(path)
        if meta is not None:
            expected = [it.key for it in self._shard_items(i)]
            if (meta["shard"] != i or meta["settings_sha256"] != self.header["settings_sha256"]
                    or meta["images"] != expected or len(meta["offsets"]) != len(expected) + 1):
                meta = None
        self._meta_cache[path.name] = (sig, meta)
        return meta

    def _shard_items(self, i: int) -> list[ImageItem]:
        s = self.settings.shard_size
        return self.images.items[i * s:(i + 1) * s]

    def _scan(self) -> dict[int, dict]:
        return {i: m for i in range(self.num_shards) if (m := self._valid_meta(i)) is not None}

    def write_index(self, complete: bool | None = None) -> dict[str, Any]:
        """Rewrite ``index.json`` from the valid shards on disk (atomic)."""
        index = index_record(self.header, self._scan(), self.num_shards, complete)
        atomic_write_json(self.out / INDEX_FILE, index, indent=1)
        return index

    # -- running ------------------------------------------------------------------------------
    def prepare(self, overwrite: bool = False) -> LabelPlan:
        """Check the output directory (refuse other settings unless ``overwrite``), remove what a
        killed run left (temporary files; with ``overwrite`` every shard and the index), write
        the initial index (rank 0), wait for every process, and plan this process's shards."""
        if not overwrite:
            self._check_existing()
            for i in range(self.num_shards):
                path = self.out / shard_name(i)
                if path.exists() and self._valid_meta(i) is None:
                    meta = read_shard_meta(path)
                    if meta is not None and meta["settings_sha256"] != self.header["settings_sha256"]:
                        raise InputError(f"{self.out} holds shards labelled with other settings "
                                         f"(e.g. {path.name})",
                                         "pass --overwrite to start over, or choose another --out")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            for f in self.out.iterdir():
                if f.name.startswith((".shard-", f".{INDEX_FILE}.")) and f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)  # what a killed run was writing
                elif overwrite and (is_shard_file(f.name) or f.name == INDEX_FILE):
                    f.unlink(missing_ok=True)
            self._meta_cache.clear()
            self.write_index(complete=False)
        barrier()
        done = self._scan()
        # files that exist but are no valid shard of this run (corrupt): labelled again
        invalid = [shard_name(i) for i in range(self.num_shards)
                   if i not in done and (self.out / shard_name(i)).exists()]
        mine = [i for i in range(self.num_shards) if i % self.world_size == self.rank and i not in done]
        n_images = sum(len(self._shard_items(i)) for i in mine)
        return LabelPlan(mine, n_images, self.num_shards, len(done), invalid)

    def label_shard(self, i: int, progress: Progress | None = None) -> tuple[int, int, list[tuple[str, str]]]:
        """Label the images of shard ``i`` and write it. Returns (regions, kept, failures)."""
        from rclip_core.inference import prefetch_images

        items = self._shard_items(i)
        s = self.settings
        k = min(s.topk, len(self.names))
        results, sizes, failed = [], [], {}
        paths = [it.path for it in items]
        for pos, (it, (_, prep, err)) in enumerate(zip(items, prefetch_images(paths, s.short_side, s.max_size,
                                                                               workers=s.workers))):
            if err is None:
                try:
                    results.append(label_image(self.model, prep, it.key, self.concept_emb, s))
                    sizes.append(prep.orig_size)
                except InputError as e:  # e.g. an image too small for random boxes
                    err = e
            if err is not None:
                failed[pos] = str(err)
                results.append(_empty_image(s, k, self.model.embed_dim))
                sizes.append((0, 0))
            if progress is not None:
                progress(1)
        regions = write_shard(self.out / shard_name(i), i, [it.key for it in items],
                              [it.record_key for it in items], results, sizes, failed,
                              self.header["settings_sha256"])
        kept = sum(int(r["keep"].sum()) for r in results)
        return regions, kept, [(items[p].key, m) for p, m in failed.items()]

    def run(self, plan: LabelPlan, progress: Progress | None = None,
            on_shard: Callable[[int], None] | None = None) -> LabelSummary:
        """Label ``plan.shards``, rewriting the index after each; then (after a barrier) rank 0
        writes the final index. ``progress(n)`` counts images, ``on_shard(i)`` follows each
        finished shard."""
        t0 = time.perf_counter()
        images = regions = kept = 0
        failed: list[tuple[str, str]] = []
        try:
            for i in plan.shards:
                r, k, f = self.label_shard(i, progress)
                images += len(self._shard_items(i))
                regions += r
                kept += k
                failed += f
                self.write_index()
                if on_shard is not None:
                    on_shard(i)
        except torch.cuda.OutOfMemoryError:
            raise RuntimeFailure("out of GPU memory while labelling",
                                 "use --chunk-size 64 (fewer regions per head call)") from None
        seconds = time.perf_counter() - t0
        barrier()
        index = self.write_index() if self.rank == 0 else {**self.header, "shards": []}
        done = self._scan()
        return LabelSummary(images, regions, kept, failed, seconds, len(done) == self.num_shards, len(done),
                            self.num_shards, index)


