"""The training stream of decoded image-caption pairs: :class:`ImageTextDataset`.

Reads the caption files and shards of :mod:`rclip_core.data.captions`, decodes images with the
one decoder (:func:`rclip_core.data.images.read_image`) and, instead of failing, skips and counts
missing and corrupt images, captionless shard samples and shards that break off.
"""

from __future__ import annotations

import os
import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from rclip_core.data.captions import (CaptionSource, ShardError, is_url, iter_records, iter_shard_samples,
                                      resolve_sources, sample_captions, sample_image)
from rclip_core.data.images import read_image
from rclip_core.errors import InputError

__all__ = ["ImageTextSample", "ImageTextDataset", "distributed_rank_world"]


class ImageTextSample(NamedTuple):
    """One training sample. ``image``: RGB PIL image, or whatever ``transform`` made of it (e.g.
    a float tensor [3, H, W]); ``caption``: the string, or ``text_transform``'s output."""

    key: str
    image: Any
    caption: Any


class _Missing(Exception):
    pass


class _Corrupt(Exception):
    pass


def _decode(source: str | os.PathLike | bytes) -> Image.Image:
    """:func:`read_image`, with its InputError split into the two skip counters: ``_Missing``
    (no such local file, or a URL) and ``_Corrupt`` (anything the decoder refuses)."""
    if not isinstance(source, (bytes, bytearray)):
        name = os.fspath(source)
        if is_url(name) or not os.path.isfile(name):
            raise _Missing(name)
    try:
        return read_image(source)
    except InputError as e:
        raise _Corrupt(str(e)) from None


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size): from ``torch.distributed`` when initialised, else from the ``RANK`` /
    ``WORLD_SIZE`` variables torchrun sets, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        return int(os.environ.get("RANK", 0)), max(int(os.environ.get("WORLD_SIZE", 1)), 1)
    except ValueError:
        return 0, 1


_STAT_NAMES = ("ok", "skipped_missing", "skipped_corrupt", "skipped_no_caption", "bad_shards")
_STAT_ROWS = 257  # row 0: the process that owns the data set; row 1 + w: DataLoader worker w


@dataclass
class _ImageEntry:
    key: str
    image: str | None
    captions: list[str]


class ImageTextDataset(IterableDataset):
    """Decoded image-caption pairs from caption files and/or tar shards, for training.

    Yields ``ImageTextSample(key, image, caption)`` with ``image = transform(RGB PIL image)``
    (the PIL image when ``transform`` is None) and ``caption = text_transform(caption)``.

    - Captions per image: ``caption_choice="random"`` picks one per image and epoch (RegionCLIP
      does this: ``clip_img_txt_pair_tsv.py``), deterministically from ``(seed, epoch, key)``; ``"first"`` takes the
      first; ``"all"`` yields one sample per caption (the image is decoded once).
    - Missing or corrupt images, and shard samples without a caption, are skipped and counted in
      :attr:`stats` (``ok``, ``skipped_missing``, ``skipped_corrupt``, ``skipped_no_caption``,
      ``bad_shards``: shards that broke off mid-stream). Never fatal. Counts from DataLoader
      workers are summed through a small shared-memory tensor, so ``stats`` in the main process
      includes them (one row per worker id, up to 256 workers). Counts accumulate over epochs;
      :meth:`reset_stats` clears them. Each distributed rank counts its own share.
    - Work splitting: the global worker index is ``rank * num_workers + worker_id`` out of
      ``world_size * num_workers`` (rank/world size from ``torch.distributed`` or the torchrun
      variables unless given). Caption files: images ``g, g + G, ...`` of the (optionally
      shuffled) image list. Shards: shards ``g, g + G, ...`` when there are at least G shards;
      with fewer shards every worker streams all of them and keeps every G-th sample, so no
      sample is seen twice in an epoch either way.
    - ``shuffle``: a permutation of images / shard order drawn from ``seed + epoch``, the same
      on every worker and rank; call :meth:`set_epoch` each epoch. Samples inside a shard keep
      their order.

    File formats are indexed when the data set is made (their records are held in memory:
    keys, paths and captions only); shards are streamed. Text-only formats are refused.
    Raises InputError for missing paths, unknown formats, text-only sources and a caption file
    whose first images are all missing (a wrong ``images_root``).
    """

    def __init__(self, sources: str | os.PathLike | Iterable[str | os.PathLike], *,
                 fmt: str | None = None, images_root: str | os.PathLike | None = None,
                 transform: Callable[[Image.Image], Any] | None = None,
                 text_transform: Callable[[str], Any] | None = None,
                 caption_choice: str = "random", shuffle: bool = False, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        if caption_choice not in ("random", "first", "all"):
            raise InputError(f"caption_choice must be random, first or all, got {caption_choice!r}")
        if (rank is None) != (world_size is None):
            raise InputError("give both rank and world_size, or neither")
        if world_size is not None and not (0 <= rank < world_size):  # type: ignore[operator]
            raise InputError(f"rank {rank} is not in [0, {world_size})")
        resolved = resolve_sources(sources, fmt)
        self.transform = transform
        self.text_transform = text_transform
        self.caption_choice = caption_choice
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = rank, world_size
        self.images: list[_ImageEntry] = []
        self.shards: list[str] = []
        for src in resolved:
            if src.text_only:
                raise InputError(f"{src.path} has captions only ({src.fmt}); training needs images",
                                 "use JSONL/CSV with an image column, COCO captions or tar shards")
            if src.fmt == "tar":
                self.shards.append(src.path)
            else:
                self.images.extend(self._index(src, images_root))
        self._counts = torch.zeros(_STAT_ROWS, len(_STAT_NAMES), dtype=torch.int64).share_memory_()

    @staticmethod
    def _index(src: CaptionSource, images_root: str | os.PathLike | None) -> list[_ImageEntry]:
        entries: dict[str, _ImageEntry] = {}
        n_records = 0
        for rec in iter_records(src, images_root=images_root):
            n_records += 1
            if rec.image is None:
                raise InputError(f"{src.path}: record {rec.key!r} has no image path",
                                 "training needs an image column (image / filepath)")
            entry = entries.get(rec.image)
            if entry is None:
                entries[rec.image] = _ImageEntry(rec.key, rec.image, [rec.caption])
            else:
                entry.captions.append(rec.caption)
        if n_records == 0:
            raise InputError(f"{src.path} has no captions")
        first = [e.image for e in list(entries.values())[:16] if e.image and not is_url(e.image)]
        if first and not any(os.path.isfile(p) for p in first):
            raise InputError(f"{src.path}: none of its first {len(first)} images exist (e.g. {first[0]})",
                             "relative image paths start at the caption file's folder unless "
                             "images_root is given; check it")
        return list(entries.values())

    # ---- bookkeeping

    @property
    def num_images(self) -> int:
        """Images indexed from caption files (shards are not counted: they are streamed)."""
        return len(self.images)

    @property
    def stats(self) -> dict[str, int]:
        totals = self._counts.sum(dim=0).tolist()
        return dict(zip(_STAT_NAMES, (int(t) for t in totals), strict=True))

    def reset_stats(self) -> None:
        self._counts.zero_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _count(self, row: int, name: str, n: int = 1) -> None:
        self._counts[row, _STAT_NAMES.index(name)] += n

    def _split(self) -> tuple[int, int, int]:
        """(global worker index g, number of global workers G, stats row)."""
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.world_size is not None:
            rank, world = self.rank or 0, self.world_size
        else:
            rank, world = distributed_rank_world()
        row = (wid + 1) % _STAT_ROWS if info is not None else 0
        return rank * nw + wid, world * nw, row

    def _order(self, n: int) -> list[int]:
        order = list(range(n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def _pick(self, key: str, captions: list[str]) -> list[str]:
        if self.caption_choice == "all" or len(captions) <= 1:
            return captions
        if self.caption_choice == "first":
            return captions[:1]
        h = zlib.crc32(f"{self.seed}:{self.epoch}:{key}".encode())
        return [captions[h % len(captions)]]

    def _emit(self, key: str, image: Image.Image, captions: list[str], row: int) -> Iterator[ImageTextSample]:
        chosen = self._pick(key, captions)
        self._count(row, "ok", len(chosen))
        for c in chosen:
            img = self.transform(image) if self.transform is not None else image
            cap = self.text_transform(c) if self.text_transform is not None else c
            yield ImageTextSample(key, img, cap)

    # ---- iteration

    def __iter__(self) -> Iterator[ImageTextSample]:
        g, big_g, row = self._split()
        for idx in self._order(len(self.images))[g::big_g]:
            entry = self.images[idx]
            try:
                image = _decode(entry.image)  # type: ignore[arg-type]
            except _Missing:
                self._count(row, "skipped_missing")
                continue
            except _Corrupt:
                self._count(row, "skipped_corrupt")
                continue
            yield from self._emit(entry.key, image, entry.captions, row)
        if self.shards:
            yield from self._iter_shards(g, big_g, row)

    def _iter_shards(self, g: int, big_g: int, row: int) -> Iterator[ImageTextSample]:
        shards = [self.shards[i] for i in self._order(len(self.shards))]
        by_shard = len(shards) >= big_g
        mine = shards[g::big_g] if by_shard else shards
        index = -1
        for url in mine:
            try:
                for sample in iter_shard_samples(url, with_images=True):
                    index += 1
                    if not by_shard and index % big_g != g:
                        continue
                    captions = sample_captions(sample)
                    img = sample_image(sample)
                    if img is None:
                        self._count(row, "skipped_missing")
                        continue
                    if not captions:
                        self._count(row, "skipped_no_caption")
                        continue
                    try:
                        image = _decode(img[1])
                    except _Corrupt:
                        self._count(row, "skipped_corrupt")
                        continue
                    yield from self._emit(sample["__key__"], image, captions, row)
            except ShardError:
                self._count(row, "bad_shards")
