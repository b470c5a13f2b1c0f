"""The pseudo-label shard format: the directory ``rclip pseudo-label`` writes and pretraining reads.

Directory layout (format ``rclip-pseudo-labels``, version 1)::

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
labeller (:mod:`rclip_core.pseudo_label`) rewrites the index after every shard; its fields
besides those of :func:`index_record` are the labelling settings.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import Tensor

from rclip_core.errors import InputError
from rclip_core.fileio import atomic_write, read_json

__all__ = [
    "FORMAT",
    "SHARD_FORMAT",
    "VERSION",
    "INDEX_FILE",
    "ImageItem",
    "ImageList",
    "shard_name",
    "is_shard_file",
    "relative_key",
    "read_shard_meta",
    "write_shard",
    "index_record",
    "PseudoLabelShards",
    "shard_statistics",
]

FORMAT = "rclip-pseudo-labels"
SHARD_FORMAT = "rclip-pseudo-labels-shard"
VERSION = 1
INDEX_FILE = "index.json"
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def is_shard_file(name: str) -> bool:
    """True for a file name :func:`shard_name` makes."""
    return _SHARD_RE.match(name) is not None


def relative_key(path: str, root: str) -> str:
    """The image key of ``path`` under the data root ``root`` ("/" separated)."""
    return os.path.relpath(path, root).replace(os.sep, "/")


# --------------------------------------------------------------------------------------------
# the images a directory covers (its keys)


@dataclass(frozen=True)
class ImageItem:
    """One image: ``key`` = its path relative to the data root (the shards' key), ``path`` = the
    file to read, ``record_key`` = the data record's own key (image id), an alias for lookups."""

    key: str
    path: str
    record_key: str | None = None


@dataclass
class ImageList:
    """The images of a labelling run in data order; the index records ``data_root``, ``source``
    (as ``data``) and :meth:`sha256` (as ``images_sha256``)."""

    items: list[ImageItem]
    data_root: str  # absolute; keys are relative to it
    source: str  # e.g. "captions:/data/cc.jsonl"
    missing: int = 0  # images a named data set lists that are not on disk (not labelled)

    def __len__(self) -> int:
        return len(self.items)

    def sha256(self) -> str:
        h = hashlib.sha256()
        for it in self.items:
            h.update(it.key.encode("utf-8") + b"\n")
        return h.hexdigest()


# --------------------------------------------------------------------------------------------
# writing


def read_shard_meta(path: str | os.PathLike) -> dict[str, Any] | None:
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


def write_shard(path: str | os.PathLike, i: int, keys: Sequence[str], record_keys: Sequence[str | None],
                results: Sequence[Mapping[str, Tensor]], sizes: Sequence[tuple[int, int]],
                failed: Mapping[int, str], settings_sha: str) -> int:
    """Write shard ``i`` atomically: per image (in ``keys`` order) its labels ``results`` (the
    tensors of the module docstring but ``image_index``), original size and, for an image that
    could not be read, its message in ``failed`` (by position; it has no rows). Returns the
    number of regions written."""
    from safetensors.torch import save_file

    counts = [int(r["target"].shape[0]) for r in results]
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    tensors = {name: torch.cat([r[name] for r in results]).contiguous() for name in results[0]}
    tensors["image_index"] = torch.repeat_interleave(torch.arange(len(results), dtype=torch.long),
                                                     torch.tensor(counts, dtype=torch.long))
    meta = {"format": SHARD_FORMAT, "version": str(VERSION), "shard": str(i),
            "images": json.dumps(list(keys), ensure_ascii=False),
            "record_keys": json.dumps(list(record_keys), ensure_ascii=False),
            "offsets": json.dumps(offsets), "sizes": json.dumps([list(s) for s in sizes]),
            "failed": json.dumps({str(k): v for k, v in failed.items()}, ensure_ascii=False),
            "settings_sha256": settings_sha}
    atomic_write(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return offsets[-1]


def index_record(header: Mapping[str, Any], done: Mapping[int, Mapping[str, Any]], num_shards: int,
                 complete: bool | None = None) -> dict[str, Any]:
    """The ``index.json`` content: ``header`` (settings, concepts, ...) plus the finished shards
    ``done`` (shard number -> :func:`read_shard_meta`) and the totals; ``complete`` defaults to
    "every one of ``num_shards`` is done"."""
    shards = [{"file": shard_name(i), "shard": i, "num_images": len(m["images"]),
               "num_regions": m["num_regions"]} for i, m in sorted(done.items())]
    return {**header, "complete": len(done) == num_shards if complete is None else complete,
            "shards": shards, "images_done": sum(s["num_images"] for s in shards),
            "images_failed": sum(len(m["failed"]) for m in done.values()),
            "regions_total": sum(s["num_regions"] for s in shards)}


# --------------------------------------------------------------------------------------------
# reading (the pretraining side)


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
                meta = read_shard_meta(path)
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
            rel = relative_key(k, self.data_root)
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
