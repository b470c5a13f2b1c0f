"""Training data for ``rclip pretrain``: image-caption samples in a seeded order that a
checkpoint can resume exactly.

Order. Every epoch draws a permutation of all indexed images from ``(seed, epoch)`` (the same
on every process); process ``r`` of ``W`` takes ``perm[r::W]``. The state is
``(epoch, position)``: how far this process has consumed its share, counted in the training
process, not in the DataLoader workers. Resuming starts a new DataLoader at ``position``, so
the sample sequence is the same with any number of workers, before and after a restart.

Randomness per sample (which caption, which short side, the flip) comes from a generator
seeded with ``(seed, epoch, image index)``, never from global RNG state, so it does not depend
on worker processes or on where a run was interrupted either.

Missing or corrupt images are skipped (counted in ``stats``), deterministically.

Caption files (JSONL, COCO captions JSON, CSV/TSV) are indexed up front through
:class:`rclip_core.data.streams.ImageTextDataset`; webdataset ``.tar`` shards cannot be
indexed without reading them, so they are streamed in a seeded shard order and a resume
re-reads (and skips) the part of the epoch already consumed; with shards, resume exactly only
with the same ``num_workers`` and number of processes (the stream's interleaving depends on
them).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from rclip_core.errors import InputError

__all__ = [
    "TrainSample",
    "ShortSideResize",
    "SquareResize",
    "torchvision_resized_shape",
    "PretrainData",
    "image_key_of",
]

_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


class TrainSample(NamedTuple):
    """One transformed training image.

    image: [3, H, W] uint8 RGB (0..255) after resize and flip.
    image_key: the image path relative to its caption file's base folder, as written in the
        caption file (the key of pseudo-label shards); the shard key for tar shards.
    orig_size / size: (h, w) before / after the resize; ``flipped``: horizontally flipped.
    path: the image file ("" for images inside tar shards).
    """

    index: int
    key: str
    image_key: str
    image: torch.Tensor
    caption: str
    orig_size: tuple[int, int]
    size: tuple[int, int]
    flipped: bool
    path: str = ""


def _to_tensor(img: Image.Image) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def torchvision_resized_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    """(h, w) after the official pretraining resize (``detectron2/data/transforms/build.py:
    build_clip_transforms`` with the vendored ``torchvision_transforms/functional_pil.py: resize``):
    the long side is ``int(short * long / short_side)``, truncated; when it exceeds
    ``max_size`` the short side becomes ``int(max_size * short / that_long)``, again truncated,
    and the long side ``max_size``; an image whose short side already equals ``short`` is not
    resized at all, whatever its long side. 1920x1080 -> 1333x749 (inference: 1333x750)."""
    lo, hi = (w, h) if w <= h else (h, w)
    if lo == short:
        return h, w
    new_short, new_long = short, int(short * hi / lo)
    if new_long > max_size:
        new_short, new_long = int(max_size * new_short / new_long), max_size
    return (new_long, new_short) if w <= h else (new_short, new_long)


SIZE_RULES = ("detectron2", "torchvision")


@dataclass(frozen=True)
class ShortSideResize:
    """Short side drawn from ``short_sides``, long side <= ``max_size``, bicubic by default (the
    pretraining's ``AUG.TRAIN.IMAGE_SIZE``, ``INTERPOLATION 3``), then a horizontal flip with
    probability 1/2 when ``flip``.

    ``size_rule``: ``detectron2`` = ``ResizeShortestEdge`` sizes (``int(x + 0.5)``, the sizes
    inference uses); ``torchvision`` = the official pretraining's vendored ``Resize``
    (:func:`torchvision_resized_shape`: truncated sizes)."""

    short_sides: tuple[int, ...]
    max_size: int
    interpolation: str = "bicubic"
    flip: bool = True
    size_rule: str = "detectron2"

    def __post_init__(self) -> None:
        if self.size_rule not in SIZE_RULES:
            raise ValueError(f"size_rule must be one of {', '.join(SIZE_RULES)}, got {self.size_rule!r}")

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> tuple[torch.Tensor, tuple[int, int], bool]:
        from rclip_core.data.images import resized_shape

        short = int(self.short_sides[int(rng.integers(len(self.short_sides)))]) if len(self.short_sides) > 1 \
            else int(self.short_sides[0])
        flipped = bool(self.flip and rng.random() < 0.5)
        w, h = img.size
        shape = torchvision_resized_shape if self.size_rule == "torchvision" else resized_shape
        nh, nw = shape(h, w, short, self.max_size)
        if (nh, nw) != (h, w):
            img = img.resize((nw, nh), _INTERPOLATION[self.interpolation])
        if flipped:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(img), (nh, nw), flipped


@dataclass(frozen=True)
class SquareResize:
    """The whole image resized to ``size x size`` (a CLIP's native input; image_text mode)."""

    size: int
    interpolation: str = "bicubic"
    flip: bool = False

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> tuple[torch.Tensor, tuple[int, int], bool]:
        flipped = bool(self.flip and rng.random() < 0.5)
        if img.size != (self.size, self.size):
            img = img.resize((self.size, self.size), _INTERPOLATION[self.interpolation])
        if flipped:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return _to_tensor(img), (self.size, self.size), flipped


def image_key_of(image_path: str, base: str | os.PathLike) -> str:
    """The image path as written in the caption file: ``image_path`` relative to ``base``
    (the caption file's folder or images_root), with ``/`` separators; paths outside ``base``
    (absolute ones in the caption file) are returned as they are."""
    root = os.path.abspath(os.fspath(base))
    full = os.path.abspath(image_path)
    if full.startswith(root + os.sep):
        return os.path.relpath(full, root).replace(os.sep, "/")
    return image_path.replace(os.sep, "/")


@dataclass
class _Entry:
    key: str
    path: str
    image_key: str
    captions: list[str]


def _sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(index), 0x9E7]))


class _IndexedImages(Dataset):
    """Map-style view of the indexed images; item ``(epoch, index)`` -> TrainSample or
    ``(index, None)`` for an unreadable image."""

    def __init__(self, entries: list[_Entry], transform: Any, seed: int, caption_choice: str):
        self.entries = entries
        self.transform = transform
        self.seed = seed
        self.caption_choice = caption_choice

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, item: tuple[int, int]) -> TrainSample | tuple[int, None]:
        from rclip_core.data.images import read_image
        from rclip_core.errors import RclipError

        epoch, index = item
        entry = self.entries[index]
        try:
            img = read_image(entry.path)
        except RclipError:  # missing or unreadable: counted as skipped by PretrainData
            return index, None
        rng = _sample_rng(self.seed, epoch, index)
        caps = entry.captions
        caption = caps[int(rng.integers(len(caps)))] if (self.caption_choice == "random" and len(caps) > 1) else caps[0]
        tensor, size, flipped = self.transform(img, rng)
        return TrainSample(index, entry.key, entry.image_key, tensor, caption, (img.height, img.width), size, flipped,
                           entry.path)


def _identity(x: Any) -> Any:
    return x


def _stable_index(key: str) -> int:
    import zlib

    return zlib.crc32(key.encode("utf-8"))


class PretrainData:
    """Batches of :class:`TrainSample` for one process, with exact resume.

    Args:
        sources: caption files / shards (already resolved against the data root).
        transform: :class:`ShortSideResize` or :class:`SquareResize`.
        fmt, images_root: as for :class:`rclip_core.data.streams.ImageTextDataset`.
        seed: the run's seed (the order is the same on every process).
        rank, world_size: this process and the number of processes.
        num_workers: DataLoader workers (decoding and resizing happen there).
        caption_choice: ``random`` (one caption per image and epoch, seeded) or ``first``.
        max_images: keep only the first N distinct images of the caption files (in order).
        max_bad_items: skipped items (unreadable images, broken shard samples or shards) this
            process tolerates before an InputError that names the first few; None = no limit.
            :meth:`bad_items` counts them.
    """

    #: skipped items named in messages and reports
    NAMED_BAD = 5

    def __init__(self, sources: Sequence[str], transform: Any, *, fmt: str | None = None,
                 images_root: str | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, caption_choice: str = "random", max_images: int | None = None,
                 max_bad_items: int | None = None) -> None:
        from rclip_core.data.captions import resolve_sources
        from rclip_core.data.streams import ImageTextDataset

        self.transform = transform
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers = int(num_workers)
        self.caption_choice = caption_choice
        self.entries: list[_Entry] = []
        self.shards: list[str] = []
        self._fmt, self._images_root = fmt, images_root
        for src in resolve_sources(list(sources), fmt):
            ds = ImageTextDataset([src], images_root=images_root)
            base = images_root if images_root is not None else os.path.dirname(src.path)
            for e in ds.images:
                self.entries.append(_Entry(e.key, str(e.image), image_key_of(str(e.image), base), list(e.captions)))
            self.shards.extend(ds.shards)
        if self.entries and self.shards:
            raise InputError("data.captions mixes caption files and tar shards",
                             hint="use one kind per run (convert the files into shards, or the reverse)")
        if max_images is not None:
            if self.shards:
                raise InputError("data.max_images needs caption files; tar shards are streamed, not indexed")
            self.entries = self.entries[:max_images]
        if self.entries and len(self.entries) < self.world_size:
            raise InputError(f"only {len(self.entries)} images for {self.world_size} processes")
        self.epoch = 0
        self.position = 0
        self.skipped = 0
        self.max_bad_items = max_bad_items
        self.bad_examples: list[str] = []  # the first NAMED_BAD skipped images of this process
        self._shard_bad = 0  # skipped shard items of the epochs streamed before the current one
        self._shard_ds: Any = None
        self._read_in_epoch = 0
        self._iter: Iterator[Any] | None = None
        self._loader: DataLoader | None = None

    # ---- state

    @property
    def num_images(self) -> int:
        """Indexed images (0 for shard streams)."""
        return len(self.entries)

    def bad_items(self) -> dict[str, Any]:
        """Items this process skipped so far: ``{"count", "images", "shard_items", "examples"}``
        (shard items: missing / corrupt images, samples without a caption and shards that broke
        off, as :attr:`rclip_core.data.streams.ImageTextDataset.stats` counts them)."""
        shard = self._shard_bad + self._current_shard_bad()
        return {"count": self.skipped + shard, "images": self.skipped, "shard_items": shard,
                "examples": list(self.bad_examples)}

    def _current_shard_bad(self) -> int:
        if self._shard_ds is None:
            return 0
        st = self._shard_ds.stats
        return int(st["skipped_missing"] + st["skipped_corrupt"] + st["skipped_no_caption"] + st["bad_shards"])

    def _check_bad(self) -> None:
        if self.max_bad_items is None:
            return
        n = self.bad_items()["count"]
        if n > self.max_bad_items:
            named = f" (e.g. {', '.join(self.bad_examples)})" if self.bad_examples else ""
            raise InputError(f"{n} training items could not be read, more than data.max_bad_items="
                             f"{self.max_bad_items}{named}",
                             hint="fix or remove them, or raise data.max_bad_items (null = no limit)")

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "skipped": self.skipped,
                "world_size": self.world_size, "num_images": len(self.entries),
                "bad_examples": list(self.bad_examples), "shard_bad": self._shard_bad + self._current_shard_bad()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` (from :meth:`state_dict`) stopped. A state saved with another
        number of processes or another data set starts the stored epoch's successor instead
        (the old split cannot be continued exactly)."""
        self.close()
        same = int(state.get("world_size", 1)) == self.world_size and \
            int(state.get("num_images", -1)) == len(self.entries)
        if same:
            self.epoch, self.position = int(state["epoch"]), int(state["position"])
        else:
            self.epoch, self.position = int(state.get("epoch", 0)) + 1, 0
        self.skipped = int(state.get("skipped", 0))
        self.bad_examples = [str(x) for x in state.get("bad_examples", [])]
        self._shard_bad = int(state.get("shard_bad", 0))

    def close(self) -> None:
        self._iter = None
        self._loader = None
        if self._shard_ds is not None:
            self._shard_bad += self._current_shard_bad()
            self._shard_ds = None

    # ---- iteration

    def epoch_order(self, epoch: int) -> list[int]:
        """This process's image indices for ``epoch``, in order."""
        perm = np.random.default_rng(np.random.SeedSequence([self.seed & 0xFFFFFFFF, int(epoch), 0x5EED])
                                     ).permutation(len(self.entries))
        return perm[self.rank::self.world_size].tolist()

    def _loader_kwargs(self) -> dict[str, Any]:
        kw: dict[str, Any] = {"batch_size": None, "num_workers": self.num_workers, "collate_fn": _identity}
        if self.num_workers > 0:
            kw["prefetch_factor"] = 4
        return kw

    def _start(self) -> None:
        if self.entries:
            order = self.epoch_order(self.epoch)
            items = [(self.epoch, i) for i in order[self.position:]]
            ds = _IndexedImages(self.entries, self.transform, self.seed, self.caption_choice)
            self._loader = DataLoader(ds, sampler=items, **self._loader_kwargs())
            self._iter = iter(self._loader)
        else:
            self._iter = self._stream(self.epoch, self.position)

    def _stream(self, epoch: int, skip: int) -> Iterator[TrainSample | tuple[int, None]]:
        from rclip_core.data.streams import ImageTextDataset

        ds = ImageTextDataset(self.shards, fmt=self._fmt, images_root=self._images_root,
                              caption_choice=self.caption_choice, shuffle=True, seed=self.seed,
                              rank=self.rank, world_size=self.world_size)
        ds.set_epoch(epoch)
        if self._shard_ds is not None:
            self._shard_bad += self._current_shard_bad()
        self._shard_ds = ds
        self._loader = DataLoader(ds, **self._loader_kwargs())
        n = 0
        for sample in self._loader:
            self._check_bad()
            n += 1
            if n <= skip:
                continue
            index = _stable_index(sample.key)
            rng = _sample_rng(self.seed, epoch, index)
            tensor, size, flipped = self.transform(sample.image, rng)
            yield TrainSample(index, sample.key, sample.key, tensor, sample.caption,
                              (sample.image.height, sample.image.width), size, flipped)

    def next_batch(self, n: int) -> list[TrainSample]:
        """The next ``n`` readable samples of this process (crossing epochs as needed)."""
        batch: list[TrainSample] = []
        empty_epochs = 0
        while len(batch) < n:
            if self._iter is None:
                self._start()
            assert self._iter is not None
            try:
                item = next(self._iter)
            except StopIteration:
                self._check_bad()
                if self._read_in_epoch == 0:  # a whole epoch without one readable image
                    empty_epochs += 1
                    if empty_epochs > 1:
                        named = f" (e.g. {', '.join(self.bad_examples)})" if self.bad_examples else ""
                        raise InputError(f"the training data yields no readable image{named}",
                                         hint="check the caption files and image paths") from None
                self.epoch += 1
                self.position = 0
                self._read_in_epoch = 0
                self._iter = None
                continue
            self.position += 1
            if isinstance(item, tuple) and len(item) == 2 and item[1] is None:
                self.skipped += 1
                path = self.entries[item[0]].path
                if len(self.bad_examples) < self.NAMED_BAD and path not in self.bad_examples:
                    self.bad_examples.append(path)
                self._check_bad()
                continue
            batch.append(item)
            self._read_in_epoch += 1
            empty_epochs = 0
        return batch
