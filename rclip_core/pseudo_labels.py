"""Teacher pseudo labels for region-text pretraining (spec 4.3), written as sharded, resumable
safetensors files that the pretraining engine reads with :class:`PseudoLabelShards`.

For every image: proposals (the offline RPN with the PRETRAINING settings - NMS 0.5, ``rpn_topk``
(300) after NMS - then ``regions_per_image`` (100) drawn with a seeded ``randperm``; or random
grid-aligned boxes), the teacher's region embeddings (trunk once, RoIAlign + res5 + attention
pool per box), p = softmax(cos(region, concept) / T) over the whole concept pool (T = 0.01), the argmax concept
as the label, kept when max p > threshold (0.1, strict) - or every region of the image when none
passes - and optionally the teacher's top-k logits (cos / T) for distillation.

Determinism: each image is processed on its own (never padded into a batch with others) and its
random draws are seeded by ``(seed, image key)``, so an image's labels do not depend on the
shard size, the number of processes, or on whether the run was interrupted and resumed.

Output directory layout (format ``rclip-pseudo-labels``, version 1)::

    OUT/index.json              settings, concept names, finished shards, "complete"
    OUT/shard-00000.safetensors images 0 .. S-1 of the data (S = shard size), in data order
    OUT/shard-00001.safetensors ...

Shard tensors (R = regions of all images of the shard, rows grouped by image in image order):

    image_index  [R] int64    row -> position in the shard's image list
    boxes        [R, 4] f32   XYXY in ORIGINAL image pixels
    target       [R] int64    argmax concept index (for every region, kept or not)
    max_prob     [R] f32      the teacher's top probability
    keep         [R] bool     max_prob > threshold; all True for an image where none passes
    topk_inds    [R, k] int64 (topk > 0) the teacher's k best concepts, best first
    topk_logits  [R, k] f32   (topk > 0) their logits cos / T
    embeddings   [R, D] f16   (save_embeddings) unnormalised teacher region embeddings

Shard safetensors metadata (strings): ``images`` (JSON list of image keys: the image path
relative to the data root, as written in the captions / COCO file), ``shard`` (its number),
``offsets`` (JSON, n+1 row offsets), ``sizes`` (JSON [[h, w], ...] original sizes),
``record_keys`` (JSON, the data records' own keys, e.g. the image id, usable as aliases),
``failed`` (JSON {position: message} for images that could not be read: they have no rows) and
``settings_sha256``.

Writes are atomic (temporary file + rename): a shard file with its final name is complete. The
index is rewritten after every shard. A rerun with the same settings skips valid shards; with
other settings it is refused (``overwrite=True`` starts over). With ``world_size`` W > 1, rank r
labels shards r, r+W, ...; rank 0 writes the final index after a barrier.

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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from rclip_core import __version__
from rclip_core.data.transforms import MAX_SIZE, TEST_SHORT_SIDE, PreparedImage, boxes_to_original
from rclip_core.errors import InputError, RuntimeFailure
from rclip_core.fileio import atomic_write, atomic_write_json, read_json
from rclip_core.losses import pseudo_label_regions, teacher_concept_logits, topk_teacher

__all__ = [
    "FORMAT",
    "VERSION",
    "PROPOSAL_MODES",
    "INDEX_FILE",
    "LabelSettings",
    "ImageItem",
    "ImageList",
    "collect_label_images",
    "image_seed",
    "image_proposals",
    "label_image",
    "PseudoLabeler",
    "LabelPlan",
    "LabelSummary",
    "PseudoLabelShards",
    "shard_statistics",
    "render_image_labels",
    "shard_name",
]

FORMAT = "rclip-pseudo-labels"
SHARD_FORMAT = "rclip-pseudo-labels-shard"
VERSION = 1
PROPOSAL_MODES = ("rpn", "random")
INDEX_FILE = "index.json"
PRETRAIN_RPN_REGIONS = 300  # PRETRAIN_RPN_REGIONS: proposals kept after NMS before sampling
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")

Progress = Callable[[int], None]


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class LabelSettings:
    """What decides the labels (all but ``chunk_size`` and ``workers`` are part of the settings
    a resumed run must share). Defaults are the official pretraining values (spec 4.3)."""

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


@dataclass(frozen=True)
class ImageItem:
    """One image: ``key`` = its path relative to the data root (the shards' key), ``path`` = the
    file to read, ``record_key`` = the data record's own key (image id), an alias for lookups."""

    key: str
    path: str
    record_key: str | None = None


@dataclass
class ImageList:
    items: list[ImageItem]
    data_root: str  # absolute; keys are relative to it
    source: str  # e.g. "captions:/data/cc.jsonl"

    def __len__(self) -> int:
        return len(self.items)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(it.key.encode("utf-8") + b"\n")
        return h.hexdigest()


def _rel_key(path: str, root: str) -> str:
    return os.path.relpath(path, root).replace(os.sep, "/")


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
    if base is None or any(_rel_key(p, base).startswith("../") for p, _ in uniq):
        base = os.path.commonpath([os.path.dirname(p) for p, _ in uniq])
    items = [ImageItem(_rel_key(p, base), p, rk) for p, rk in uniq]
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


# --------------------------------------------------------------------------------------------
# labelling one image


def image_seed(seed: int, key: str) -> int:
    """A 63-bit seed for ``key``'s random draws (independent of sharding and process count)."""
    digest = hashlib.sha256(f"{int(seed)}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _rpn_settings_for(kind: str, topk: int):
    from dataclasses import replace

    from rclip_core.models.proposals import RPN_KINDS, rpn_settings

    # NMS 0.5, `topk` kept after NMS (spec 4.3: 300); a detector's trained RPN (one level) takes the
    # FPN values
    s = rpn_settings("pretraining", kind if kind in RPN_KINDS else "lvis_866_fpn")
    return replace(s, post_nms_topk=int(topk))


def image_proposals(model, prep: PreparedImage, key: str, settings: LabelSettings) -> Tensor:
    """Proposals of one image in RESIZED pixels, [R, 4] float32 XYXY, R <= regions_per_image.

    ``rpn``: the model's offline RPN (its ``settings`` must be the pretraining preset, see
    :class:`PseudoLabeler`), then ``randperm(len)[:n]`` as ``PRETRAIN_SAMPLE_REGIONS``; fewer
    proposals than n are all kept. ``random``: n grid-aligned random boxes
    (:func:`rclip_core.models.proposals.random_boxes`). Both draw from a generator seeded with
    :func:`image_seed`.
    """
    g = torch.Generator().manual_seed(image_seed(settings.seed, key))
    n = settings.regions_per_image
    if settings.proposals == "random":
        from rclip_core.models.proposals import random_boxes

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
    """Pseudo labels of one image (spec 4.3 steps 1, 3-5).

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
# shards on disk


def _shard_meta(path: Path) -> dict[str, Any] | None:
    """The parsed metadata of a shard file, or None when it is unreadable / not a shard."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
        if meta.get("format") != SHARD_FORMAT:
            return None
        out = {"shard": int(meta["shard"]), "images": json.loads(meta["images"]),
               "offsets": json.loads(meta["offsets"]), "sizes": json.loads(meta["sizes"]),
               "record_keys": json.loads(meta.get("record_keys", "null")),
               "failed": {int(k): v for k, v in json.loads(meta.get("failed", "{}")).items()},
               "settings_sha256": meta.get("settings_sha256", ""), "tensors": keys}
        out["num_regions"] = int(out["offsets"][-1]) if out["offsets"] else 0
        return out
    except Exception:  # noqa: BLE001 - a corrupt or foreign file is simply not a valid shard
        return None


def _write_shard(path: Path, i: int, items: Sequence[ImageItem], results: Sequence[dict[str, Tensor]],
                 sizes: Sequence[tuple[int, int]], failed: dict[int, str], settings_sha: str) -> int:
    from safetensors.torch import save_file

    counts = [int(r["target"].shape[0]) for r in results]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    tensors = {name: torch.cat([r[name] for r in results]).contiguous() for name in results[0]}
    tensors["image_index"] = torch.repeat_interleave(torch.arange(len(results), dtype=torch.long),
                                                     torch.tensor(counts, dtype=torch.long))
    meta = {"format": SHARD_FORMAT, "version": str(VERSION), "shard": str(i),
            "images": json.dumps([it.key for it in items], ensure_ascii=False),
            "record_keys": json.dumps([it.record_key for it in items], ensure_ascii=False),
            "offsets": json.dumps(offsets), "sizes": json.dumps([list(s) for s in sizes]),
            "failed": json.dumps({str(k): v for k, v in failed.items()}, ensure_ascii=False),
            "settings_sha256": settings_sha}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return offsets[-1]


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
            from rclip_core.engine.distributed import get_rank, get_world_size

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
            rpn = {"kind": m.rpn.kind, "nms_thresh": st.nms_thresh, "pre_nms_topk": st.pre_nms_topk,
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
        meta = _shard_meta(path)
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
        done = self._scan()
        shards = [{"file": shard_name(i), "shard": i, "num_images": len(m["images"]),
                   "num_regions": m["num_regions"]} for i, m in sorted(done.items())]
        index = {**self.header, "complete": len(done) == self.num_shards if complete is None else complete,
                 "shards": shards, "images_done": sum(s["num_images"] for s in shards),
                 "images_failed": sum(len(m["failed"]) for m in done.values()),
                 "regions_total": sum(s["num_regions"] for s in shards)}
        atomic_write_json(self.out / INDEX_FILE, index, indent=1)
        return index

    # -- running ------------------------------------------------------------------------------
    def prepare(self, overwrite: bool = False) -> LabelPlan:
        """Check the output directory (refuse other settings unless ``overwrite``), remove what a
        killed run left (temporary files; with ``overwrite`` every shard and the index), write
        the initial index (rank 0), wait for every process, and plan this process's shards."""
        from rclip_core.engine.distributed import barrier

        if not overwrite:
            self._check_existing()
            for i in range(self.num_shards):
                path = self.out / shard_name(i)
                if path.exists() and self._valid_meta(i) is None:
                    meta = _shard_meta(path)
                    if meta is not None and meta["settings_sha256"] != self.header["settings_sha256"]:
                        raise InputError(f"{self.out} holds shards labelled with other settings "
                                         f"(e.g. {path.name})",
                                         "pass --overwrite to start over, or choose another --out")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            for f in self.out.iterdir():
                if f.name.startswith((".shard-", f".{INDEX_FILE}.")) and f.name.endswith(".tmp"):
                    f.unlink(missing_ok=True)  # what a killed run was writing
                elif overwrite and (_SHARD_RE.match(f.name) or f.name == INDEX_FILE):
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
        from rclip_core.pipeline import prefetch_images

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
        regions = _write_shard(self.out / shard_name(i), i, items, results, sizes, failed,
                               self.header["settings_sha256"])
        kept = sum(int(r["keep"].sum()) for r in results)
        return regions, kept, [(items[p].key, m) for p, m in failed.items()]

    def run(self, plan: LabelPlan, progress: Progress | None = None,
            on_shard: Callable[[int], None] | None = None) -> LabelSummary:
        """Label ``plan.shards``, rewriting the index after each; then (after a barrier) rank 0
        writes the final index. ``progress(n)`` counts images, ``on_shard(i)`` follows each
        finished shard."""
        from rclip_core.engine.distributed import barrier

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


# --------------------------------------------------------------------------------------------
# reading (the pretraining engine's side)


class PseudoLabelShards:
    """Read a pseudo-label directory: ``lookup(image_key)`` -> that image's tensors.

    Keys are the image keys of the index (the path relative to the data root, e.g.
    ``"train/000001.jpg"``); :meth:`lookup` also accepts the data records' own keys (e.g. the
    image id a caption file gives, when unambiguous) and absolute paths under the data root.

    ``lookup`` returns ``boxes`` [n, 4] float32 (original pixels), ``target`` [n] int64,
    ``max_prob`` [n] float32, ``keep`` [n] bool, ``image_size`` [2] int64 (original h, w; 0, 0
    for an image that failed to load, which has n = 0), and ``topk_inds`` / ``topk_logits``
    [n, k] and ``embeddings`` [n, D] float16 when the run stored them. Rows are read lazily
    from the memory-mapped shard (cheap per image; safe in DataLoader workers).

    ``require_complete``: refuse a directory whose run has not finished (default).
    """

    def __init__(self, root: str | os.PathLike, require_complete: bool = True):
        self.root = Path(root)
        idx_path = self.root / INDEX_FILE
        if not self.root.is_dir():
            raise InputError(f"pseudo-label directory not found: {self.root}")
        if not idx_path.is_file():
            raise InputError(f"{self.root} has no {INDEX_FILE}: not a pseudo-label directory",
                             "make one with: rclip pseudo-label DATA --out DIR")
        index = read_json(idx_path, what="pseudo-label index")
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise InputError(f"{idx_path} is not a pseudo-label index (format {index.get('format')!r})"
                             if isinstance(index, dict) else f"{idx_path} is not a pseudo-label index")
        if index.get("version") != VERSION:
            raise InputError(f"{self.root} is pseudo-label format version {index.get('version')}, "
                             f"this rclip reads version {VERSION}")
        if require_complete and not index.get("complete"):
            raise InputError(f"{self.root} is incomplete ({len(index.get('shards', []))} of "
                             f"{index.get('num_shards', '?')} shards)",
                             "rerun the same `rclip pseudo-label` command to finish it")
        self.index = index
        self.concepts: list[str] = list(index["concepts"])
        self.topk: int = int(index.get("topk", 0))
        self.data_root: str | None = index.get("data_root")
        self.shard_files = [self.root / s["file"] for s in index.get("shards", [])]
        self._metas: list[dict] | None = None
        self._where: dict[str, tuple[int, int]] = {}
        self._alias: dict[str, str] = {}
        self._handles: dict[int, tuple[int, Any]] = {}

    # -- metadata ---------------------------------------------------------------------------
    def _load(self) -> list[dict]:
        if self._metas is None:
            metas = []
            alias_count: Counter[str] = Counter()
            aliases: dict[str, str] = {}
            for s, path in enumerate(self.shard_files):
                meta = _shard_meta(path)
                if meta is None:
                    raise InputError(f"pseudo-label shard {path} is missing or corrupt",
                                     "rerun the `rclip pseudo-label` command to rewrite it")
                metas.append(meta)
                rks = meta["record_keys"] or [None] * len(meta["images"])
                for j, (key, rk) in enumerate(zip(meta["images"], rks)):
                    self._where[key] = (s, j)
                    if rk is not None and rk != key:
                        alias_count[rk] += 1
                        aliases[rk] = key
            self._alias = {a: k for a, k in aliases.items() if alias_count[a] == 1 and a not in self._where}
            self._metas = metas
        return self._metas

    @property
    def keys(self) -> list[str]:
        """Image keys in data order."""
        return [k for m in self._load() for k in m["images"]]

    @property
    def failed(self) -> dict[str, str]:
        """Images that could not be read when labelling: key -> message."""
        return {m["images"][p]: msg for m in self._load() for p, msg in m["failed"].items()}

    def __len__(self) -> int:
        return sum(len(m["images"]) for m in self._load())

    def resolve(self, key: str | os.PathLike) -> str | None:
        """The image key that ``key`` (image key, record key or path) names, or None."""
        self._load()
        k = os.fspath(key)
        if k in self._where:
            return k
        if k in self._alias:
            return self._alias[k]
        if self.data_root and os.path.isabs(k):
            rel = _rel_key(k, self.data_root)
            if rel in self._where:
                return rel
        return None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, (str, os.PathLike)) and self.resolve(key) is not None

    # -- tensors ------------------------------------------------------------------------------
    def _handle(self, s: int):
        from safetensors import safe_open

        pid = os.getpid()
        h = self._handles.get(s)
        if h is None or h[0] != pid:  # a forked DataLoader worker opens its own
            if len(self._handles) > 16:
                self._handles.clear()
            h = (pid, safe_open(str(self.shard_files[s]), framework="pt"))
            self._handles[s] = h
        return h[1]

    def lookup(self, key: str | os.PathLike) -> dict[str, Tensor]:
        """The labels of one image (see the class docstring); KeyError if it is not labelled."""
        k = self.resolve(key)
        if k is None:
            raise KeyError(f"image {os.fspath(key)!r} has no pseudo labels in {self.root}")
        s, j = self._where[k]
        meta = self._load()[s]
        a, b = int(meta["offsets"][j]), int(meta["offsets"][j + 1])
        f = self._handle(s)
        out = {name: f.get_slice(name)[a:b] for name in sorted(meta["tensors"]) if name != "image_index"}
        out["image_size"] = torch.tensor(meta["sizes"][j], dtype=torch.long)
        return out

    def load_shard(self, s: int) -> tuple[list[str], dict[str, Tensor]]:
        """All tensors of the ``s``-th finished shard and its image keys."""
        from safetensors.torch import load_file

        meta = self._load()[s]
        return list(meta["images"]), load_file(str(self.shard_files[s]))

    def __iter__(self) -> Iterator[tuple[str, dict[str, Tensor]]]:
        """(image key, labels) in data order, one shard in memory at a time."""
        for s, meta in enumerate(self._load()):
            keys, t = self.load_shard(s)
            offsets = meta["offsets"]
            for j, key in enumerate(keys):
                a, b = offsets[j], offsets[j + 1]
                out = {n: v[a:b] for n, v in t.items() if n != "image_index"}
                out["image_size"] = torch.tensor(meta["sizes"][j], dtype=torch.long)
                yield key, out


# --------------------------------------------------------------------------------------------
# inspection


def shard_statistics(shards: PseudoLabelShards, top: int = 15) -> dict[str, Any]:
    """Summary of a pseudo-label directory: images, regions per image, kept fraction, mean top
    probability (all / kept regions), the ``top`` most frequent concepts among kept regions."""
    n_images = n_regions = n_kept = 0
    sum_p = sum_p_kept = 0.0
    fallback = 0
    per_image: list[int] = []
    counts: Counter[int] = Counter()
    for s, meta in enumerate(shards._load()):
        _, t = shards.load_shard(s)
        n_images += len(meta["images"])
        offsets = meta["offsets"]
        per_image += [offsets[j + 1] - offsets[j] for j in range(len(meta["images"])) if j not in meta["failed"]]
        keep, p = t["keep"], t["max_prob"]
        n_regions += int(keep.shape[0])
        n_kept += int(keep.sum())
        sum_p += float(p.double().sum())
        sum_p_kept += float(p[keep].double().sum())
        counts.update(t["target"][keep].tolist())
        thr = float(shards.index.get("threshold", 0.1))
        for j in range(len(meta["images"])):
            a, b = offsets[j], offsets[j + 1]
            if b > a and not bool((p[a:b] > thr).any()):
                fallback += 1
    names = shards.concepts
    return {
        "images": n_images, "images_failed": len(shards.failed), "regions": n_regions, "kept": n_kept,
        "kept_fraction": n_kept / n_regions if n_regions else 0.0,
        "regions_per_image": {"mean": sum(per_image) / len(per_image) if per_image else 0.0,
                              "min": min(per_image, default=0), "max": max(per_image, default=0)},
        "mean_max_prob": sum_p / n_regions if n_regions else 0.0,
        "mean_max_prob_kept": sum_p_kept / n_kept if n_kept else 0.0,
        "images_all_kept_fallback": fallback,
        "concepts_used": len(counts), "concepts_total": len(names),
        "top_concepts": [(names[c], n) for c, n in counts.most_common(top)],
        "complete": bool(shards.index.get("complete")),
        "shards": len(shards.shard_files), "num_shards": shards.index.get("num_shards"),
    }


def render_image_labels(shards: PseudoLabelShards, key: str, max_boxes: int = 8, image_path: str | None = None,
                        min_side: int = 384):
    """The image ``key`` with its labels drawn: for each concept among its kept regions, the
    most confident region (so that one frequent concept does not hide the others), at most
    ``max_boxes``, best first, tagged "concept probability". Images smaller than ``min_side``
    are enlarged so the tags stay legible. Returns a PIL image; raises InputError when the image
    file (under the index's data root, or ``image_path``) cannot be read."""
    from PIL import Image

    from rclip_core.data.transforms import read_image
    from rclip_core.viz import draw_detections

    labels = shards.lookup(key)
    if image_path is None:
        k = shards.resolve(key) or os.fspath(key)
        image_path = k if os.path.isabs(k) else os.path.join(shards.data_root or "", k)
    img = read_image(image_path)
    keep = labels["keep"]
    boxes, target, prob = labels["boxes"][keep], labels["target"][keep], labels["max_prob"][keep]
    best: dict[int, int] = {}
    for i in prob.argsort(descending=True).tolist():
        best.setdefault(int(target[i]), i)
    order = torch.tensor(list(best.values())[:max_boxes], dtype=torch.long)
    scale = max(1.0, min_side / max(1, min(img.size)))
    if scale > 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    return draw_detections(img, (boxes[order] * scale).tolist(), [shards.concepts[c] for c in target[order].tolist()],
                           prob[order].tolist(), target[order].tolist())
