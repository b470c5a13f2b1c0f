"""Small file helpers shared by every command: atomic writes (no partial outputs), output
directory checks before any work starts, and file hashing for reports."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from rclip_core.errors import InputError


def ensure_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) and check that files can be written there.

    Raises InputError before any work is done, so that an unwritable ``--out`` never leaves a
    half-finished run behind.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise InputError(f"output path {p} exists and is not a directory", "choose another --out")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".rclip-probe-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise InputError(f"cannot write to output directory {p}: {e.strerror or e}",
                         "choose a writable --out directory") from None
    return p


def first_missing_dir(path: str | os.PathLike) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (None if it all exists).
    Take it before :func:`ensure_output_dir` so a failed run can undo what it created."""
    missing = None
    p = Path(path)
    for q in [p, *p.parents]:
        if q.exists():
            break
        missing = q
    return missing


def remove_empty_dirs(out: str | os.PathLike, created: Path | None) -> None:
    """Remove ``out`` and its parents up to ``created`` while they are empty (``os.rmdir`` never
    removes a directory with files in it): a failed run leaves nothing behind, not even --out."""
    if created is None:
        return
    p = Path(out)
    while True:
        try:
            os.rmdir(p)
        except OSError:
            return
        if p == created or p == p.parent:
            return
        p = p.parent


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the result to ``path`` only if it succeeded."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"cannot write {path}: it is a directory")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise InputError(f"cannot write {path}: {e.strerror or e}", "choose a writable output path") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _existing_file(path: str | os.PathLike, what: str, expected: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} not found: {p}")
    if p.is_dir():
        raise InputError(f"{what} {p} is a directory, expected {expected}")
    return p


def read_text(path: str | os.PathLike, what: str = "text file") -> str:
    """Read a UTF-8 text file, turning every failure into a one-line InputError naming ``what``."""
    p = _existing_file(path, what, "a text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} {p} is not UTF-8 text") from None
    except OSError as e:
        raise InputError(f"cannot read {what} {p}: {e.strerror or e}") from None


def read_json(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """Read JSON, turning every failure into a one-line InputError."""
    p = _existing_file(path, what, "a file")
    try:
        with open(p, "r", encoding="utf-8") as f:
            return json.load(f)
    except UnicodeDecodeError:
        raise InputError(f"{what} {p} is not text (binary file?)") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {p} is not valid JSON: {e.msg} at line {e.lineno}") from None
    except OSError as e:
        raise InputError(f"cannot read {what} {p}: {e.strerror or e}") from None
