"""The parameters and buffers of a TorchScript archive, read as data: nothing of it runs.

``torch.jit.load`` compiles the archive's ``code/`` and runs it (``__setstate__`` methods run while
loading, any method afterwards), so a TorchScript file from the internet can do anything. Its
tensors, though, are plain data: ``data.pkl`` pickles the module tree as objects of classes named
``__torch__.*`` whose attributes are tensors (``torch._utils._rebuild_tensor_v2`` over storages in
``data/``), and each class's code declares which attributes are parameters and buffers
(``__parameters__ = [...]``, ``__buffers__ = [...]``). This reader unpickles ``data.pkl`` with an
unpickler that knows only tensor rebuilding and inert stand-ins for the ``__torch__`` classes, reads
those two declarations as text, and returns what ``torch.jit.load(path).state_dict()`` would.

An archive whose code defines ``__setstate__`` builds its state by running code, so its pickled
attributes need not be its state; such files (and anything this reader does not understand) are
refused: only ``--trust-weights`` (``torch.jit.load``) reads them. This is what makes OpenAI's
``RN50.pt`` (a TorchScript archive, open_clip's ``openai`` tag) loadable without trusting it.
"""

from __future__ import annotations

import ast
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

__all__ = ["TorchScriptUnreadable", "read_torchscript_state"]

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_CLASS = re.compile(r"^class\s+([A-Za-z_][\w]*)\s*\(\s*Module\s*\)\s*:", re.M)
_DECL = re.compile(r"^\s+__(parameters|buffers)__\s*=\s*(\[.*?\])\s*$", re.M)


class TorchScriptUnreadable(Exception):
    """The archive cannot be read as data (the reason is the message)."""


class _Inert:
    """Stands for a ``__torch__`` class: keeps the pickled attributes, runs nothing."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD
        if not isinstance(state, dict):
            raise TorchScriptUnreadable(f"{self.qualname} has a state of type {type(state).__name__}, "
                                        "not attributes")
        self.__dict__["_attrs"] = state


def _identity(x: Any, *_: Any) -> Any:
    return x


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple, *_: Any) -> torch.Tensor:
    if not size:
        return storage[offset:offset + 1].reshape(()).clone()
    return torch.as_strided(storage, tuple(size), tuple(stride), offset).clone()


# The only callables data.pkl may name (everything else is refused). The torch.jit._pickle
# helpers are what archives of torch < 1.8 (OpenAI's RN50.pt) use for typed lists.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_list"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, classes: dict[str, type]):
        import io

        super().__init__(io.BytesIO(data))
        self._archive, self._root, self._classes = archive, root, classes
        self._storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        if module == "__torch__" or module.startswith("__torch__."):
            cls = self._classes.get(f"{module}.{name}")
            if cls is None:
                raise TorchScriptUnreadable(f"data.pkl names {module}.{name}, which the archive's code "
                                            "does not define as a module")
            return cls
        raise TorchScriptUnreadable(f"data.pkl names {module}.{name}, which is not data")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchScriptUnreadable(f"unknown persistent id {str(pid)[:60]}")
        _, storage_type, key, _location, numel = pid
        dtype = _STORAGE_DTYPES.get(storage_type) if isinstance(storage_type, str) else None
        if dtype is None:
            raise TorchScriptUnreadable(f"unknown storage type {storage_type!r}")
        if key not in self._storages:
            try:
                raw = self._archive.read(f"{self._root}/data/{key}")
            except KeyError:
                raise TorchScriptUnreadable(f"storage {key} is missing from the archive") from None
            flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
            t = flat.view(dtype) if flat.numel() else torch.empty(0, dtype=dtype)
            if t.numel() < int(numel):
                raise TorchScriptUnreadable(f"storage {key} holds {t.numel()} values, the pickle says {numel}")
            self._storages[key] = t
        return self._storages[key]


def _module_classes(archive: zipfile.ZipFile, root: str) -> dict[str, type]:
    """``__torch__`` qualified class name -> an inert class carrying its declared parameter and
    buffer names, from the text of ``code/`` (parsed, never compiled)."""
    classes: dict[str, type] = {}
    prefix = f"{root}/code/"
    for name in archive.namelist():
        if not (name.startswith(prefix) and name.endswith(".py")):
            continue
        text = archive.read(name).decode("utf-8", errors="replace")
        if re.search(r"^\s+def __setstate__\s*\(", text, re.M):
            raise TorchScriptUnreadable(f"its code defines __setstate__ ({name[len(prefix):]}): its state is built by "
                                        "running code")
        module = name[len(prefix):-len(".py")].replace("/", ".")
        starts = [(m.start(), m.group(1)) for m in _CLASS.finditer(text)]
        for i, (start, cls_name) in enumerate(starts):
            body = text[start:starts[i + 1][0] if i + 1 < len(starts) else len(text)]
            decl = {"parameters": [], "buffers": []}
            for m in _DECL.finditer(body):
                try:
                    decl[m.group(1)] = [str(x) for x in ast.literal_eval(m.group(2))]
                except (ValueError, SyntaxError):
                    raise TorchScriptUnreadable(f"cannot read the {m.group(1)} of {module}.{cls_name}") from None
            qual = f"{module}.{cls_name}"
            classes[qual] = type(cls_name, (_Inert,), {"qualname": qual, "parameters": decl["parameters"],
                                                       "buffers": decl["buffers"]})
    return classes


def _collect(obj: _Inert, prefix: str, out: dict[str, torch.Tensor]) -> None:
    attrs = obj.__dict__.get("_attrs", {})
    for kind in ("parameters", "buffers"):
        for name in getattr(obj, kind):
            value = attrs.get(name)
            if value is None:  # an Optional parameter that is None (bias=False)
                continue
            if not isinstance(value, torch.Tensor):
                raise TorchScriptUnreadable(f"{prefix}{name} is declared a {kind[:-1]} but holds "
                                            f"{type(value).__name__}")
            out[prefix + name] = value
    for name, value in attrs.items():
        if isinstance(value, _Inert):
            _collect(value, f"{prefix}{name}.", out)


def read_torchscript_state(path: str | Path) -> dict[str, torch.Tensor]:
    """``torch.jit.load(path).state_dict()`` without running anything of the archive.

    Raises :class:`TorchScriptUnreadable` (with the reason) for archives that cannot be read as
    data: code defining ``__setstate__``, ``data.pkl`` naming anything but tensors, containers and
    the archive's own module classes, missing storages."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as e:
        raise TorchScriptUnreadable(f"not a readable zip archive ({e})") from None
    with archive:
        pkls = [n for n in archive.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")]
        if len(pkls) != 1:
            raise TorchScriptUnreadable("no single <archive>/data.pkl")
        root = pkls[0].split("/", 1)[0]
        classes = _module_classes(archive, root)
        try:
            top = _Unpickler(archive.read(pkls[0]), archive, root, classes).load()
        except TorchScriptUnreadable:
            raise
        except Exception as e:  # noqa: BLE001 - any unpickling failure: not readable as data
            raise TorchScriptUnreadable(f"data.pkl cannot be read as data ({type(e).__name__}: "
                                        f"{' '.join(str(e).split())[:100]})") from None
    if not isinstance(top, _Inert):
        raise TorchScriptUnreadable(f"data.pkl holds a {type(top).__name__}, not a module")
    out: dict[str, torch.Tensor] = {}
    _collect(top, "", out)
    return out
