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
               ``key<TAB>caption`` / ``key<TAB>{"captions": [...]}`` (text only; the official
               ``detectron2/data/clip_datasets/clip_img_txt_pair_tsv.py``).
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
* :class:`rclip_core.data.streams.ImageTextDataset`: the training stream of decoded images
  (``ImageTextSample(key, image, caption)``), which skips missing and corrupt images and counts
  them instead of failing; it reads shards with :func:`iter_shard_samples`.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, NamedTuple, Sequence


from rclip_core.errors import InputError

__all__ = [
    "CAPTION_FORMATS",
    "CaptionRecord",
    "CaptionSource",
    "ShardError",
    "detect_format",
    "expand_paths",
    "resolve_sources",
    "iter_records",
    "iter_caption_records",
    "iter_captions",
    "iter_shard_samples",
    "sample_captions",
    "sample_image",
    "is_url",
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
    shards, whose images live inside the shard and are read by
    :class:`rclip_core.data.streams.ImageTextDataset`)."""

    key: str
    image: str | None
    caption: str


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


def is_url(path: str) -> bool:
    """Whether ``path`` is a URL (``http://``, ``s3://``, ``pipe:cmd``) rather than a local path."""
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
                if not is_url(p) and os.path.isdir(p):
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
        if is_url(p):
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
    if is_url(image) or os.path.isabs(image):
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


def sample_captions(sample: dict[str, Any]) -> list[str]:
    """The captions of a shard sample: its ``.txt``, else the ``caption`` field(s) of its ``.json``."""
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


def sample_image(sample: dict[str, Any]) -> tuple[str, bytes] | None:
    """``(extension, encoded bytes)`` of a shard sample's image, or None when it has none."""
    for ext in _IMAGE_EXTS:
        if ext in sample:
            return ext, sample[ext]
    return None


class ShardError(Exception):
    """A shard that broke off mid-stream (truncated / not a tar)."""


def iter_shard_samples(url: str, with_images: bool) -> Iterator[dict[str, Any]]:
    """The samples ``{"__key__", ext: bytes, ...}`` of one shard, streamed; image members only
    ``with_images``. A shard that breaks off mid-stream raises :class:`ShardError`."""
    try:
        yield from _tar_samples(url, with_images)
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error) as e:
        # webdataset appends the stream and url to exn.args; the first argument is the message
        msg = str(e.args[0]) if e.args else type(e).__name__
        raise ShardError(f"{url}: {' '.join(msg.split())[:200]}") from None


def _read_tar(url: str) -> Iterator[CaptionRecord]:
    try:
        for sample in iter_shard_samples(url, with_images=False):
            for c in sample_captions(sample):
                yield CaptionRecord(sample["__key__"], None, c)
    except ShardError as e:
        raise InputError(f"cannot read tar shard {e}", "is the shard complete? re-download it") from None


# ---- public iterators


def iter_records(source: CaptionSource | str | os.PathLike, fmt: str | None = None,
                 images_root: str | os.PathLike | None = None) -> Iterator[CaptionRecord]:
    """``CaptionRecord``s of one caption file or shard, streamed where the format allows
    (JSONL, CSV/TSV, TXT, tar; a JSON file is parsed whole). Tar records carry ``image=None``
    here: the image bytes are skipped, not read (see :class:`rclip_core.data.streams.ImageTextDataset`)."""
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
