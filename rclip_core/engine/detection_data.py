"""Detection training data: records from a COCO/LVIS instances file, the sample stream
(uniform or repeat-factor), augmentation and the per-rank step sampler.

Design for exact resume and any number of processes:

* One **global stream** of image indices, cut into epochs. Epoch ``e`` is a permutation drawn
  from a generator seeded with ``(seed, e)`` - of all images (Detectron2's ``TrainingSampler``)
  or, for repeat-factor sampling (LVIS), of every image repeated ``floor(r_i)`` times plus one
  more with probability ``frac(r_i)`` (stochastic rounding, Detectron2's
  ``RepeatFactorTrainingSampler``). Position ``p`` of the stream is therefore a pure function of
  the seed: nothing about it has to be saved to resume.
* Optimizer step ``s`` consumes positions ``[s*G, (s+1)*G)`` (``G`` = global batch); of those,
  rank ``r`` takes for accumulation pass ``a`` the slice ``a*P*W + r*P`` .. ``+P`` (``P``
  images per pass and rank, ``W`` ranks). So the images of a step do not depend on the number of
  processes, and resuming at step ``s`` means starting the sampler at ``s``.
* The augmentation of position ``p`` (short side from the list, horizontal flip with p = 0.5)
  is drawn from its own generator seeded with ``(seed, p)``, so it does not depend on the
  DataLoader's worker processes either.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from rclip_core.data.coco import DetectionSet, resolve_images
from rclip_core.data.images import MAX_SIZE, TRAIN_SHORT_SIDES, read_image, resize_image, xywh_to_xyxy
from rclip_core.errors import InputError, RclipError

__all__ = [
    "TrainRecord",
    "build_train_records",
    "repeat_factors",
    "TrainStream",
    "DetectionTrainSet",
    "StepSampler",
    "collate_list",
]


@dataclass
class TrainRecord:
    """One training image: boxes XYXY in original pixels, contiguous labels, optional polygons."""

    path: str
    image_id: int
    width: int
    height: int
    boxes: np.ndarray  # [G, 4] float64
    labels: np.ndarray  # [G] int64, 0..K-1
    polygons: list[list[np.ndarray]] | None = None  # per box, flat [x0, y0, x1, y1, ...] arrays
    category_ids: tuple[int, ...] = field(default_factory=tuple)


def _polygons_of(ann: dict) -> list[np.ndarray] | None:
    seg = ann.get("segmentation")
    if isinstance(seg, list) and seg and all(isinstance(p, list) for p in seg):
        return [np.asarray(p, dtype=np.float64) for p in seg if len(p) >= 6]
    return None


def build_train_records(dataset: DetectionSet, images_dir: str | os.PathLike, class_index: dict[int, int],
                        max_gt_per_image: int | None = None, with_polygons: bool = False) -> list[TrainRecord]:
    """The training images of ``dataset`` (Detectron2's ``FILTER_EMPTY_ANNOTATIONS``).

    Crowd annotations and annotations of categories outside ``class_index`` (category id ->
    contiguous class) are dropped, boxes with no area too; images left without annotations are
    dropped. ``max_gt_per_image`` keeps the first N annotations (LVIS loads cap at 500).
    With ``with_polygons`` every kept annotation must carry polygon ``segmentation`` (mask
    head). Images missing under ``images_dir`` are an InputError (they mean a wrong folder).
    """
    from rclip_core.data.coco import size_mismatch_error, size_mismatches

    present, missing = resolve_images(dataset, images_dir)
    if missing:
        raise InputError(f"{len(missing)} of {len(dataset.images)} training images are not in {images_dir} "
                         f"(e.g. {missing[0]['file_name']})",
                         "pass the folder that holds the images of the instances file with --images")
    bad = size_mismatches(present)
    if bad:
        raise size_mismatch_error(bad, len(present), str(dataset.source or "the instances file"))
    per_image: dict[int, list[dict]] = {}
    for ann in dataset.annotations:
        if ann.get("iscrowd", 0) or ann["category_id"] not in class_index:
            continue
        x, y, w, h = ann["bbox"]
        if w <= 0 or h <= 0:
            continue
        per_image.setdefault(ann["image_id"], []).append(ann)
    records = []
    for img, path in present:
        anns = per_image.get(img["id"], [])
        if max_gt_per_image is not None:
            anns = anns[:max_gt_per_image]
        if not anns:
            continue
        boxes = xywh_to_xyxy([a["bbox"] for a in anns])
        labels = np.array([class_index[a["category_id"]] for a in anns], dtype=np.int64)
        polygons = None
        if with_polygons:
            polygons = []
            for a in anns:
                polys = _polygons_of(a)
                if polys is None:
                    raise InputError(f"annotation {a['id']} of image {img['file_name']} has no polygon "
                                     "'segmentation'; the mask head needs polygons",
                                     "switch the mask head off (detector.mask_head=false)")
                polygons.append(polys)
        records.append(TrainRecord(path=str(path), image_id=int(img["id"]), width=int(img["width"]),
                                   height=int(img["height"]), boxes=boxes, labels=labels, polygons=polygons,
                                   category_ids=tuple(sorted({int(a["category_id"]) for a in anns}))))
    if not records:
        raise InputError(f"no training images with annotations of the training classes in {dataset.source or 'the data set'}",
                         "check the class split (--novel-classes) and the instances file")
    return records


def repeat_factors(image_categories: Sequence[Sequence[int]], threshold: float) -> np.ndarray:
    """LVIS repeat factors (Detectron2 ``repeat_factors_from_category_frequency``, the LVIS configs' ``REPEAT_THRESHOLD`` 0.001).

    f_c = fraction of images that contain category c; r_c = max(1, sqrt(t / f_c));
    r_i = max over the categories of image i (1 for an image without categories).
    Returns float64 [N].
    """
    if threshold <= 0:
        raise InputError(f"the repeat-factor threshold must be positive, got {threshold}")
    n = len(image_categories)
    counts: dict[int, int] = {}
    for cats in image_categories:
        for c in set(cats):
            counts[c] = counts.get(c, 0) + 1
    r_cat = {c: max(1.0, math.sqrt(threshold / (k / n))) for c, k in counts.items()}
    return np.array([max((r_cat[c] for c in set(cats)), default=1.0) for cats in image_categories],
                    dtype=np.float64)


class TrainStream:
    """The global, seed-determined sequence of image indices (see the module docstring)."""

    def __init__(self, num_images: int, seed: int, factors: np.ndarray | None = None):
        if num_images < 1:
            raise InputError("no training images")
        self.num_images = int(num_images)
        self.seed = int(seed)
        self.factors = None if factors is None else np.asarray(factors, dtype=np.float64)
        if self.factors is not None and len(self.factors) != self.num_images:
            raise ValueError("one repeat factor per image expected")
        self._epochs: list[np.ndarray] = []
        self._starts: list[int] = [0]

    def _generator(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 63))

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """Image indices of one epoch, in order."""
        g = self._generator(epoch)
        if self.factors is None:
            return torch.randperm(self.num_images, generator=g).numpy()
        whole = np.floor(self.factors)
        frac = self.factors - whole
        reps = whole + (torch.rand(self.num_images, generator=g, dtype=torch.float64).numpy() < frac)
        indices = np.repeat(np.arange(self.num_images), reps.astype(np.int64))
        return indices[torch.randperm(len(indices), generator=g).numpy()]

    def _locate(self, position: int) -> tuple[int, int]:
        while self._starts[-1] <= position:
            epoch = len(self._epochs)
            self._epochs.append(self.epoch_indices(epoch))
            self._starts.append(self._starts[-1] + len(self._epochs[-1]))
            if len(self._epochs[-1]) == 0:
                raise RuntimeError("an epoch without images")
        epoch = int(np.searchsorted(self._starts, position, side="right")) - 1
        return epoch, position - self._starts[epoch]

    def index_at(self, position: int) -> int:
        epoch, offset = self._locate(int(position))
        return int(self._epochs[epoch][offset])

    def epoch_of(self, position: int) -> int:
        return self._locate(int(position))[0]

    def __getstate__(self) -> dict:
        # workers rebuild the epochs they need; the cache may be large after long runs
        return {"num_images": self.num_images, "seed": self.seed, "factors": self.factors}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["num_images"], state["seed"], state["factors"])


def augmentation_rng(seed: int, position: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(position), 0xA06]))


class DetectionTrainSet(Dataset):
    """Item ``position`` (of the global stream) -> a dict with ``image`` uint8 [3, H, W] (resized,
    maybe flipped), ``boxes`` float32 [G, 4] XYXY in its pixels, ``labels`` int64 [G],
    ``polygons`` (or None), ``image_id`` and ``position``.

    Resize: Detectron2 ``ResizeShortestEdge`` with the short side chosen from ``short_sides``
    (the paper: 640..800 step 32, max 1333), PIL bilinear; boxes scaled in float64 and clipped;
    flip with probability ``flip_prob``; boxes with a side <= 1e-5 after that are dropped
    (``filter_empty_instances``)."""

    def __init__(self, records: Sequence[TrainRecord], stream: TrainStream,
                 short_sides: Sequence[int] = TRAIN_SHORT_SIDES, max_size: int = MAX_SIZE, flip_prob: float = 0.5):
        self.records = list(records)
        self.stream = stream
        self.short_sides = [int(s) for s in short_sides]
        self.max_size = int(max_size)
        self.flip_prob = float(flip_prob)

    def __len__(self) -> int:  # the stream is infinite; the sampler decides what is read
        return 2 ** 62

    def __getitem__(self, position: int) -> dict[str, Any]:
        rec = self.records[self.stream.index_at(position)]
        rng = augmentation_rng(self.stream.seed, position)
        short = self.short_sides[int(rng.integers(len(self.short_sides)))]
        flip = bool(rng.random() < self.flip_prob)
        try:
            img = read_image(rec.path)
        except RclipError as e:
            # a training image that vanished or broke mid-run: the stream stops with the reason in
            # the training process (raised in a DataLoader worker, torch would re-wrap it with the
            # worker's traceback in its message)
            return {BROKEN_KEY: f"a training image broke during the run: {e}"}
        prep = resize_image(img, short, self.max_size)
        H, W = prep.size
        sx, sy = W / img.width, H / img.height
        boxes = rec.boxes.copy()
        boxes[:, 0::2] *= sx
        boxes[:, 1::2] *= sy
        boxes = np.minimum(boxes.clip(min=0), np.array([W, H, W, H], dtype=np.float64))
        image = prep.tensor.to(torch.uint8)
        polygons = None
        if rec.polygons is not None:
            polygons = []
            for polys in rec.polygons:
                scaled = []
                for p in polys:
                    q = p.copy()
                    q[0::2] *= sx
                    q[1::2] *= sy
                    if flip:
                        q[0::2] = W - q[0::2]
                    scaled.append(q)
                polygons.append(scaled)
        if flip:
            image = image.flip(-1)
            boxes = np.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], axis=1)
        keep = ((boxes[:, 2] - boxes[:, 0]) > 1e-5) & ((boxes[:, 3] - boxes[:, 1]) > 1e-5)
        labels = rec.labels[keep]
        if polygons is not None:
            polygons = [p for p, k in zip(polygons, keep) if k]
        return {"image": image, "boxes": torch.as_tensor(boxes[keep], dtype=torch.float32),
                "labels": torch.as_tensor(labels, dtype=torch.int64), "polygons": polygons,
                "image_id": rec.image_id, "position": int(position)}


class StepSampler(Sampler[int]):
    """Stream positions for one rank, from ``start_step`` to ``max_steps`` (see the module
    docstring): per step, per accumulation pass, ``per_pass`` consecutive positions."""

    def __init__(self, global_batch: int, per_pass: int, accumulation: int, rank: int, world_size: int,
                 start_step: int, max_steps: int):
        if per_pass * accumulation * world_size != global_batch:
            raise ValueError("per_pass x accumulation x world_size must equal the global batch")
        self.global_batch, self.per_pass, self.accumulation = global_batch, per_pass, accumulation
        self.rank, self.world_size = rank, world_size
        self.start_step, self.max_steps = start_step, max_steps

    def positions(self, step: int) -> list[int]:
        """This rank's positions of one optimizer step, in pass order."""
        out = []
        for a in range(self.accumulation):
            base = step * self.global_batch + a * self.per_pass * self.world_size + self.rank * self.per_pass
            out.extend(range(base, base + self.per_pass))
        return out

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start_step, self.max_steps):
            yield from self.positions(step)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start_step) * self.per_pass * self.accumulation


#: the item a training image that cannot be read becomes (see :func:`raise_broken`)
BROKEN_KEY = "__broken__"


def raise_broken(batch: list) -> list:
    """``batch``, or the one-line InputError of its first unreadable image."""
    for item in batch:
        if isinstance(item, dict) and BROKEN_KEY in item:
            raise InputError(item[BROKEN_KEY], "fix or remove it (the output folder keeps only checkpoints "
                                               "already written)")
    return batch


def collate_list(batch: list) -> list:
    return batch
