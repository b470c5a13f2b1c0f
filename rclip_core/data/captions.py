"""Caption data: image-caption pairs in the usual on-disk formats, as text or decoded images.

Formats (picked by extension, ``.gz`` allowed for the text formats; ``fmt=`` overrides):

=============  ================================================================================
``jsonl``      ``.jsonl`` / ``.ndjson``: one object per line, ``{"image": ..., "caption": ...}``
               or ``{"image": ..., "captions": [...]}``; several lines may share an image.
               Also read: ``file_name``/``filepath``/``path`` for the image, ``text``/``title``
               for the caption, ``key``/``id`` for the key (ShapesWorld writes this format).
``json``       ``.json``: a COCO captions file (``captions_train2017.json``: ``images`` +
               ``annotations`` with ``image_id`` and ``caption``), a JSON list of the JSONL
               objects, or JSONL saved as ``.json``.
``csv``        ``.csv`` with a header: ``image,caption`` or ``filepath,title`` (img2dataset /
               open_clip), other names as for JSONL. One row per caption.
``tsv``        ``.tsv``: the same with tabs, or, without a header, RegionCLIP's text TSV rows
               ``key<TAB>caption`` / ``key<TAB>{"captions": [...]}`` (text only, spec 4.2).
``txt``        ``.txt``: one caption per line (text only).
``tar``        webdataset shards in the img2dataset layout: ``KEY.jpg`` (or png/jpeg/webp)
               with ``KEY.txt`` and/or ``KEY.json`` (``"caption"`` field). Read as a stream,
               never extracted. ``shards/{00000..00009}.tar`` brace patterns, ``a.tar::b.tar``
               lists and folders of ``.tar`` files are expanded. With the optional
               ``webdataset`` package, shard URLs it can open (``pipe:``, ``http://``, ...) work
               too; without it the standard ``tarfile`` module reads local shards.
=============  ================================================================================

Relative image paths are relative to ``images_root`` when given, else to the caption file's
folder (COCO: the file's folder or ``../<split>`` for ``annotations/captions_<split>.json``,
whichever holds the first image).

Three ways in:

* :func:`iter_records` / :func:`iter_caption_records`: ``CaptionRecord(key, image, caption)``,
  one per caption; ``image`` is a path or None (text-only formats and tar shards);
* :func:`iter_captions`: the caption strings of any mix of sources (``rclip concepts``);
* :class:`ImageTextDataset`: a torch ``IterableDataset`` of decoded images
  (``ImageTextSample(key, image, caption)``) for training, which skips missing and corrupt
  images and counts them instead of failing.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import random
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import IterableDataset, get_worker_info

from rclip_core.errors import InputError

__all__ = [
    "CAPTION_FORMATS",
    "CaptionRecord",
    "ImageTextSample",
    "ImageTextDataset",
    "CaptionSource",
    "detect_format",
    "expand_paths",
    "resolve_sources",
    "iter_records",
    "iter_caption_records",
    "iter_captions",
    "decode_image",
    "distributed_rank_world",
]

CAPTION_FORMATS: dict[str, str] = {
    "jsonl": "JSON lines with image + caption(s)",
    "json": "COCO captions JSON, or a JSON list of image + caption(s) records",
    "csv": "CSV with a header (image,caption / filepath,title)",
    "tsv": "TSV with a header, or RegionCLIP text TSV (key, caption)",
    "txt": "one caption per line (text only)",
    "tar": "webdataset / img2dataset tar shards (KEY.jpg + KEY.txt / KEY.json)",
}

_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
               ".txt": "txt", ".tar": "tar", ".tgz": "tar"}
_IMAGE_FIELDS = ("image", "filepath", "file_name", "filename", "image_path", "path", "img")
_CAPTION_FIELDS = ("caption", "title", "text", "captions")
_KEY_FIELDS = ("key", "id", "image_id")
_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")
_TEXT_ONLY = ("txt",)  # formats that never carry images
_URL = re.compile(r"^(pipe:|[a-zA-Z][a-zA-Z0-9+.-]+://)")  # http://, s3://, gs://, pipe:cmd


class CaptionRecord(NamedTuple):
    """One caption. ``image``: the image file's path, or None (text-only formats, and tar
    shards, whose images live inside the shard and are read by :class:`ImageTextDataset`)."""

    key: str
    image: str | None
    caption: str


class ImageTextSample(NamedTuple):
    """One training sample. ``image``: RGB PIL image, or whatever ``transform`` made of it (e.g.
    a float tensor [3, H, W]); ``caption``: the string, or ``text_transform``'s output."""

    key: str
    image: Any
    caption: Any


@dataclass(frozen=True)
class CaptionSource:
    """A resolved input: ``path`` (a local path or, for shards, a URL) and its ``fmt``."""

    path: str
    fmt: str

    @property
    def text_only(self) -> bool:
        return self.fmt in _TEXT_ONLY


# --------------------------------------------------------------------------------------------
# paths and formats


def _braceexpand(pattern: str) -> list[str]:
    """Expand the first ``{a,b}`` / ``{000..123}`` group, recursively. Zero padding of numeric
    ranges follows the first bound's width (``{00000..00009}`` -> 00000 ... 00009)."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        width = len(a) if a.lstrip("-").startswith("0") and len(a) > 1 else 0
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        options = [str(i).zfill(width) for i in range(lo, hi + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # a literal "{x}"
        return [head + "{" + body + "}" + t for t in _braceexpand(tail)]
    return [e for opt in options for e in _braceexpand(head + opt + tail)]


def _is_url(path: str) -> bool:
    return bool(_URL.match(path))


def _strip_gz(name: str) -> tuple[str, bool]:
    lower = name.lower()
    if lower.endswith(".gz") and not lower.endswith(".tar.gz"):
        return name[:-3], True
    return name, False


def detect_format(path: str | os.PathLike) -> str:
    """The format of ``path`` from its extension (``.gz`` stripped; ``.tar.gz`` is a shard).
    Raises InputError for an unknown extension."""
    name = os.fspath(path)
    if name.lower().endswith(".tar.gz"):
        return "tar"
    base, _ = _strip_gz(name)
    ext = os.path.splitext(base)[1].lower()
    if ext in _EXTENSIONS:
        return _EXTENSIONS[ext]
    raise InputError(f"unknown caption format for {name!r} (extension {ext or 'none'})",
                     "use .jsonl, .json (COCO captions), .csv, .tsv, .txt or .tar shards")


def expand_paths(specs: str | os.PathLike | Iterable[str | os.PathLike]) -> list[str]:
    """Expand brace patterns, ``::``-separated lists and folders of ``.tar`` shards into a flat,
    ordered list of paths/URLs. Nothing is opened."""
    if isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    out: list[str] = []
    for spec in specs:
        for part in os.fspath(spec).split("::"):
            if not part:
                continue
            for p in _braceexpand(part):
                if not _is_url(p) and os.path.isdir(p):
                    shards = sorted(str(Path(p) / f) for f in os.listdir(p)
                                    if f.lower().endswith((".tar", ".tar.gz", ".tgz")))
                    if not shards:
                        raise InputError(f"folder {p} has no .tar shards",
                                         "pass caption files or shards, not a folder")
                    out.extend(shards)
                else:
                    out.append(p)
    return out


def resolve_sources(specs: str | os.PathLike | CaptionSource | Iterable[str | os.PathLike | CaptionSource],
                    fmt: str | None = None) -> list[CaptionSource]:
    """Expand ``specs`` and check every path exists and has a known format, before any reading.
    Already resolved :class:`CaptionSource` lists are returned as they are.

    Remote shard URLs are accepted only when the ``webdataset`` package can open them.
    Raises a one-line InputError naming the first bad path.
    """
    if fmt is not None and fmt not in CAPTION_FORMATS:
        raise InputError(f"unknown caption format {fmt!r}", f"choose one of {', '.join(CAPTION_FORMATS)}")
    if isinstance(specs, CaptionSource):
        specs = [specs]
    elif isinstance(specs, (str, os.PathLike)):
        specs = [specs]
    specs = list(specs)
    ready = [s for s in specs if isinstance(s, CaptionSource)]
    if ready and len(ready) == len(specs):
        return ready
    if ready:
        raise InputError("mix of resolved sources and paths")  # pragma: no cover - programming error
    paths = expand_paths(specs)
    if not paths:
        raise InputError("no caption files given")
    sources = []
    for p in paths:
        f = fmt or detect_format(p)
        if _is_url(p):
            if f != "tar":
                raise InputError(f"{p}: only tar shards can be read from a URL", "download the file first")
            if _webdataset() is None:
                raise InputError(f"{p}: reading shards from URLs needs the webdataset package",
                                 'pip install "rclip-toolkit[webdataset]", or download the shards')
        elif not os.path.exists(p):
            raise InputError(f"caption file not found: {p}")
        elif os.path.isdir(p):
            raise InputError(f"{p} is a directory, expected a caption file")
        sources.append(CaptionSource(p, f))
    return sources


# --------------------------------------------------------------------------------------------
# readers


def _open_text(path: str) -> IO[str]:
    if path.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, "r", encoding="utf-8", newline="")


def _guard(path: str, records: Iterator[CaptionRecord]) -> Iterator[CaptionRecord]:
    """Turn decoding / IO failures while streaming into one-line InputErrors naming the file."""
    try:
        yield from records
    except UnicodeDecodeError:
        raise InputError(f"caption file {path} is not UTF-8 text") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"caption file {path} is truncated or not gzip ({e})") from None
    except OSError as e:
        raise InputError(f"cannot read caption file {path}: {e.strerror or e}") from None


def _field(obj: dict, names: Sequence[str]) -> Any:
    for n in names:
        if n in obj and obj[n] is not None:
            return obj[n]
    return None


def _captions_of(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)):
        return [c for c in value if isinstance(c, str)]
    return []


def _resolve_image(image: Any, root: Path) -> str | None:
    if image is None or image == "":
        return None
    image = str(image)
    if _is_url(image) or os.path.isabs(image):
        return image
    return str(root / image)


def _records_from_objects(objs: Iterable[tuple[int, Any]], path: str, root: Path) -> Iterator[CaptionRecord]:
    for lineno, obj in objs:
        if not isinstance(obj, dict):
            raise InputError(f"{path} record {lineno} is a JSON {type(obj).__name__}, expected an object "
                             "with image and caption fields")
        caps = _captions_of(_field(obj, _CAPTION_FIELDS))
        if not caps:
            fields = ", ".join(sorted(obj)) or "none"
            raise InputError(f"{path} record {lineno} has no caption (fields: {fields})",
                             "each record needs a 'caption' (or 'captions' list)")
        image = _field(obj, _IMAGE_FIELDS)
        key = _field(obj, _KEY_FIELDS)
        key = str(key) if key is not None else (str(image) if image is not None else str(lineno))
        img = _resolve_image(image, root)
        for c in caps:
            yield CaptionRecord(key, img, c)


def _base(path: str, images_root: str | os.PathLike | None) -> Path:
    return Path(images_root) if images_root is not None else Path(path).parent


def _read_jsonl(path: str, images_root: str | os.PathLike | None = None) -> Iterator[CaptionRecord]:
    root = _base(path, images_root)

    def objects() -> Iterator[tuple[int, Any]]:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path} line {lineno} is not valid JSON: {e.msg}") from None

    return _records_from_objects(objects(), path, root)


def _coco_images_root(path: str, images_root: str | os.PathLike | None, images: list[dict]) -> Path:
    if images_root is not None:
        return Path(images_root)
    here = Path(path).parent
    stem = Path(_strip_gz(path)[0]).stem  # captions_train2017
    candidates = [here]
    if "_" in stem:
        split = stem.split("_", 1)[1]
        candidates += [here.parent / split, here / split]
    first = next((im.get("file_name") for im in images if im.get("file_name")), None)
    for c in candidates:
        if first is not None and (c / str(first)).exists():
            return c
    return here


def _read_json(path: str, images_root: str | os.PathLike | None = None) -> Iterator[CaptionRecord]:
    try:
        with _open_text(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines saved as .json
            yield from _read_jsonl(path, images_root)
            return
        raise InputError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if isinstance(data, list):
        yield from _records_from_objects(enumerate(data, 1), path, _base(path, images_root))
        return
    if not isinstance(data, dict) or "annotations" not in data:
        kind = f"a JSON {type(data).__name__}"
        if isinstance(data, dict):
            kind += f" with keys {', '.join(list(data)[:6])}"
        raise InputError(f"{path} is {kind}, not a caption file",
                         "expected a COCO captions file (images + annotations with 'caption') "
                         "or a list of records")
    anns = data.get("annotations") or []
    if not isinstance(anns, list):
        raise InputError(f"{path}: 'annotations' is not a list")
    if anns and not any(isinstance(a, dict) and "caption" in a for a in anns[:100]):
        instances = any(isinstance(a, dict) and "bbox" in a for a in anns[:100])
        what = "a COCO instances file" if instances else "a COCO file"
        raise InputError(f"{path} is {what} without captions (annotations have no 'caption' field)",
                         "use the captions file, e.g. annotations/captions_train2017.json")
    images = data.get("images") or []
    files = {im.get("id"): im.get("file_name") for im in images if isinstance(im, dict)}
    root = _coco_images_root(path, images_root, images)
    # group the annotations by image so that an image's captions are consecutive
    by_image: dict[Any, list[str]] = {}
    for a in anns:
        if isinstance(a, dict) and isinstance(a.get("caption"), str):
            by_image.setdefault(a.get("image_id"), []).append(a["caption"])
    for image_id, caps in by_image.items():
        name = files.get(image_id)
        img = str(root / name) if name else None
        for c in caps:
            yield CaptionRecord(str(image_id), img, c)


def _read_table(path: str, delimiter: str, images_root: str | os.PathLike | None = None
                ) -> Iterator[CaptionRecord]:
    root = _base(path, images_root)
    with _open_text(path) as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        names = [h.strip().lower() for h in header]
        cap_col = next((names.index(n) for n in _CAPTION_FIELDS if n in names), None)
        if cap_col is None:
            if delimiter == "\t" and len(header) == 2:
                # RegionCLIP text TSV: key \t caption | key \t {"captions": [...]} (no header)
                yield from _tsv_rows([header], path)
                yield from _tsv_rows(reader, path)
                return
            raise InputError(f"{path} has no caption column (header: {', '.join(header[:8])})",
                             "name the columns image,caption (or filepath,title)")
        img_col = next((names.index(n) for n in _IMAGE_FIELDS if n in names), None)
        key_col = next((names.index(n) for n in _KEY_FIELDS if n in names), None)
        for rowno, row in enumerate(reader, 2):
            if not row or cap_col >= len(row):
                continue
            caption = row[cap_col]
            image = row[img_col] if img_col is not None and img_col < len(row) else None
            key = row[key_col] if key_col is not None and key_col < len(row) else (image or str(rowno))
            yield CaptionRecord(key, _resolve_image(image, root), caption)


def _tsv_rows(rows: Iterable[list[str]], path: str) -> Iterator[CaptionRecord]:
    for row in rows:
        if len(row) < 2:
            continue
        key, text = row[0], row[1]
        caps = [text]
        if text.lstrip().startswith("{"):
            try:
                caps = _captions_of(json.loads(text).get("captions")) or [text]
            except (json.JSONDecodeError, AttributeError):
                caps = [text]
        for c in caps:
            yield CaptionRecord(key, None, c)


def _read_txt(path: str) -> Iterator[CaptionRecord]:
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield CaptionRecord(str(lineno), None, line)


# ---- tar shards


def _webdataset() -> Any:
    try:
        import webdataset  # noqa: F401
        from webdataset import tariterators
    except ImportError:
        return None
    return tariterators


def _split_member(name: str) -> tuple[str | None, str]:
    """webdataset's key/extension split: key = path up to the first dot of the base name."""
    m = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (m.group(1), m.group(2).lower()) if m else (None, "")


def _tar_members(url: str, want: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of the regular files of a shard whose names pass ``want``, streamed."""
    tariterators = _webdataset()
    if tariterators is not None:
        streams = tariterators.url_opener([{"url": url}])
        for s in tariterators.tar_file_expander(streams, select_files=want, eof_value=None):
            yield s["fname"], s["data"]
        return
    with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isreg() and want(member.name):
                data = tar.extractfile(member)
                yield member.name, data.read() if data is not None else b""


def _tar_samples(url: str, with_images: bool) -> Iterator[dict[str, Any]]:
    """Group a shard's members into samples ``{"__key__", ext: bytes, ...}`` (consecutive
    members with the same key, as webdataset's ``group_by_keys``)."""
    def want(name: str) -> bool:
        _, ext = _split_member(name)
        last = ext.rsplit(".", 1)[-1]
        return last in ("txt", "json") or (with_images and last in _IMAGE_EXTS)

    current: dict[str, Any] | None = None
    for name, data in _tar_members(url, want):
        key, ext = _split_member(name)
        if key is None:
            continue
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
        current[ext] = data
    if current is not None:
        yield current


def _sample_captions(sample: dict[str, Any]) -> list[str]:
    if "txt" in sample:
        text = sample["txt"].decode("utf-8", errors="replace").strip()
        if text:
            return [text]
    if "json" in sample:
        try:
            meta = json.loads(sample["json"].decode("utf-8", errors="replace"))
        except json.JSONDecodeError:
            return []
        if isinstance(meta, dict):
            return [c for c in _captions_of(_field(meta, _CAPTION_FIELDS)) if c.strip()]
    return []


def _sample_image(sample: dict[str, Any]) -> tuple[str, bytes] | None:
    for ext in _IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    return None


class _ShardError(Exception):
    """A shard that broke off mid-stream (truncated / not a tar)."""


def _iter_shard(url: str, with_images: bool) -> Iterator[dict[str, Any]]:
    try:
        yield from _tar_samples(url, with_images)
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
        # webdataset appends the stream and url to exn.args; the first argument is the message
        msg = str(e.args[0]) if e.args else type(e).__name__
        raise _ShardError(f"{url}: {' '.join(msg.split())[:200]}") from None


def _read_tar(url: str) -> Iterator[CaptionRecord]:
    try:
        for sample in _iter_shard(url, with_images=False):
            for c in _sample_captions(sample):
                yield CaptionRecord(sample["__key__"], None, c)
    except _ShardError as e:
        raise InputError(f"cannot read tar shard {e}", "is the shard complete? re-download it") from None


# ---- public iterators


def iter_records(source: CaptionSource | str | os.PathLike, fmt: str | None = None,
                 images_root: str | os.PathLike | None = None) -> Iterator[CaptionRecord]:
    """``CaptionRecord``s of one caption file or shard, streamed where the format allows
    (JSONL, CSV/TSV, TXT, tar; a JSON file is parsed whole). Tar records carry ``image=None``
    here: the image bytes are skipped, not read (see :class:`ImageTextDataset`)."""
    if not isinstance(source, CaptionSource):
        (source,) = resolve_sources([source], fmt)
    path, f = source.path, source.fmt
    if f == "jsonl":
        return _guard(path, _read_jsonl(path, images_root))
    if f == "json":
        return _guard(path, _read_json(path, images_root))
    if f == "csv":
        return _guard(path, _read_table(path, ",", images_root))
    if f == "tsv":
        return _guard(path, _read_table(path, "\t", images_root))
    if f == "txt":
        return _guard(path, _read_txt(path))
    if f == "tar":
        return _read_tar(path)
    raise InputError(f"unknown caption format {f!r}")  # pragma: no cover - resolve_sources checks


def iter_caption_records(paths: str | os.PathLike | Iterable[str | os.PathLike], fmt: str | None = None
                         ) -> Iterator[CaptionRecord]:
    """The records of every source in ``paths``, in order. Paths are checked first (eagerly)."""
    sources = resolve_sources(paths, fmt)

    def gen() -> Iterator[CaptionRecord]:
        for s in sources:
            yield from iter_records(s)

    return gen()


def iter_captions(paths: str | os.PathLike | Iterable[str | os.PathLike], fmt: str | None = None
                  ) -> Iterator[str]:
    """Caption strings from any mix of caption files and shards (format by extension).

    Missing paths and unknown formats raise InputError when this is called, before anything is
    read; a malformed file raises InputError when the iteration reaches it.
    """
    records = iter_caption_records(paths, fmt)
    return (r.caption for r in records)


# --------------------------------------------------------------------------------------------
# images


class _Missing(Exception):
    pass


class _Corrupt(Exception):
    pass


def decode_image(source: str | os.PathLike | bytes) -> Image.Image:
    """Decode an image file (path) or encoded bytes to RGB with EXIF orientation applied.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for anything PIL cannot
    decode completely (truncated, not an image, decompression bomb).
    """
    try:
        return _decode(source)
    except _Missing as e:
        raise FileNotFoundError(str(e)) from None
    except _Corrupt as e:
        raise ValueError(str(e)) from None


def _decode(source: str | os.PathLike | bytes) -> Image.Image:
    if isinstance(source, (bytes, bytearray)):
        fp: Any = io.BytesIO(source)
        name = "<bytes>"
    else:
        name = os.fspath(source)
        if _is_url(name) or not os.path.isfile(name):
            raise _Missing(name)
        fp = name
    try:
        with Image.open(fp) as im:
            im.load()  # decode now, so truncated files fail here and not in the transform
            try:
                im = ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001 - a broken EXIF block should not lose the image
                pass
            return im.convert("RGB")
    except FileNotFoundError:
        raise _Missing(name) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
            Image.DecompressionBombError) as e:
        raise _Corrupt(f"{name}: {e}") from None


# --------------------------------------------------------------------------------------------
# the training data set


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
      does this, spec 4.2), deterministically from ``(seed, epoch, key)``; ``"first"`` takes the
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
        first = [e.image for e in list(entries.values())[:16] if e.image and not _is_url(e.image)]
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
                for sample in _iter_shard(url, with_images=True):
                    index += 1
                    if not by_shard and index % big_g != g:
                        continue
                    captions = _sample_captions(sample)
                    img = _sample_image(sample)
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
            except _ShardError:
                self._count(row, "bad_shards")
