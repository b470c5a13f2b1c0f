"""Reading and writing weights safely.

* Native format: one safetensors file; tensors under open_clip names (``visual.*``,
  ``transformer.*``, ...) plus optional ``rpn.*``, ``box_predictor.*``, ``class_embeddings``;
  JSON metadata under the safetensors metadata key ``rclip`` (architecture, embedding dim,
  class names, templates, rclip version, kind).
* Foreign formats (official RegionCLIP/Detectron2 ``.pth``, open_clip/OpenAI checkpoints,
  embedding tensors) are read with ``torch.load(weights_only=True)``. TorchScript archives
  (OpenAI's ``RN50.pt``) are read as data by :mod:`rclip_core.weights.torchscript`: their tensors,
  never their code. Formats that would run code when loaded - pickles that need
  ``weights_only=False``, TorchScript whose state is built by its own ``__setstate__`` - are
  refused with a line naming ``--trust-weights`` unless the caller passes ``trust=True`` (the
  CLI's ``--trust-weights``, the recipes' ``trust_weights: true``: ``torch.jit.load`` /
  ``torch.load(weights_only=False)``); nothing of them runs before that.
* Downloads: on the local main process first under torchrun (the others wait at a barrier, then
  read the cache), each into its own temporary file beside the target, moved into place only
  after its sha256 (or the sha256 prefix open_clip publishes) matches; progress goes to the
  caller's callback, else to a tqdm bar on stderr when stderr is a terminal (or
  ``RCLIP_PROGRESS=1``). Offline they fail within seconds with a hint to pass ``--weights PATH``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from rclip_core import __version__
from rclip_core.errors import InputError, OfflineError, RuntimeFailure, WeightsError

FORMAT_VERSION = 1
METADATA_KEY = "rclip"


@dataclass
class WeightsFile:
    """Tensors and metadata read from a weights file of any supported format."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    container: str = "safetensors"  # safetensors | pickle | torchscript


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]
                     ) -> Path:
    """Write tensors + rclip metadata atomically (no partial file on failure)."""
    from safetensors.torch import save_file

    from rclip_core.fileio import atomic_write

    meta = {"format": "rclip", "format_version": FORMAT_VERSION, "rclip_version": __version__, **metadata}
    # safetensors needs contiguous tensors that do not share memory
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(clean, str(p), metadata={METADATA_KEY: json.dumps(meta)}))


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < (1 << 30) and head[8:9] == b"{"


TRUST_FLAG = "--trust-weights"


def _is_torchscript(path: Path) -> bool:
    """A TorchScript archive: a zip with ``constants.pkl`` or a ``code/`` folder (torch's own
    test, ``serialization.py: _is_torchscript_zip``, looks for ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
    return any(n.rsplit("/", 1)[-1] == "constants.pkl" or n.startswith("code/") or "/code/" in n for n in names)


def _refuse(p: Path, what: str) -> WeightsError:
    return WeightsError(
        f"refusing to load {p}: {what}; pass {TRUST_FLAG} to load it anyway (only for files from a source you trust)",
        f"or convert it once on a trusted machine: rclip weights convert {p.name} OUT.safetensors {TRUST_FLAG}")


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The rclip metadata of a safetensors file from its header alone (no tensor is read): {}
    for a safetensors file without it, None for anything else (a pickle, a missing or empty
    path). Raises WeightsError for an unreadable header."""
    p = Path(path)
    if not (p.is_file() and p.stat().st_size > 0 and _is_safetensors(p)):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(p), "pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
        return json.loads(raw) if raw else {}
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad header
        raise WeightsError(f"weights file {p} is corrupt: {' '.join(str(e).split())}") from None


def read_weights(path: str | os.PathLike, trust: bool = False) -> WeightsFile:
    """Read any supported weights file into flat tensors.

    Args:
        trust: allow formats that run code when loaded (TorchScript archives, pickles that need
            ``weights_only=False``). Without it they raise :class:`WeightsError` naming
            ``--trust-weights`` before anything of them is unpickled or run.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"weights file not found: {p}")
    if p.is_dir():
        raise InputError(f"weights path {p} is a directory, expected a file")
    if p.stat().st_size == 0:
        raise WeightsError(f"weights file {p} is empty")
    if _is_safetensors(p):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(p))
            from safetensors import safe_open

            with safe_open(str(p), "pt") as f:
                raw = (f.metadata() or {}).get(METADATA_KEY)
            meta = json.loads(raw) if raw else {}
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"weights file {p} is corrupt: {' '.join(str(e).split())}") from None
        return WeightsFile(p, tensors, meta, "safetensors")
    if _is_torchscript(p):
        if not trust:
            # its tensors as data (nothing of the archive runs); refused when that cannot be done
            from rclip_core.weights.torchscript import TorchScriptUnreadable, read_torchscript_state

            try:
                return WeightsFile(p, read_torchscript_state(p), {}, "torchscript")
            except TorchScriptUnreadable as e:
                raise _refuse(p, f"it is a TorchScript archive that cannot be read as data ({e}), and "
                                 "its code would run if it were loaded") from None
        try:
            with warnings.catch_warnings():  # "torch.jit.load is deprecated": the file is what it is
                warnings.simplefilter("ignore")
                module = torch.jit.load(str(p), map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise WeightsError(f"cannot read TorchScript weights {p}: {' '.join(str(e).split())}") from None
        return WeightsFile(p, {k: v for k, v in module.state_dict().items()}, {}, "torchscript")
    obj = safe_torch_load(p, trust=trust)
    if isinstance(obj, torch.nn.Module):  # a trusted pickle of a whole module
        obj = obj.state_dict()
    return WeightsFile(p, flatten_checkpoint(obj, p), {}, "pickle")


def safe_torch_load(path: str | os.PathLike, trust: bool = False) -> Any:
    """``torch.load(weights_only=True)`` with one-line errors. A file that needs arbitrary code
    to unpickle is refused (it could run anything) unless ``trust``, when it is unpickled with
    ``weights_only=False``. TorchScript archives are refused here in any case (read them with
    :func:`read_weights`)."""
    p = Path(path)
    if _is_torchscript(p):
        raise _refuse(p, "it is a TorchScript archive, whose code runs when it is loaded")
    try:
        with warnings.catch_warnings():
            # e.g. "Detected pickle protocol 4": the failure below says all that matters
            warnings.simplefilter("ignore")
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Only a pickle that names a callable (GLOBAL / REDUCE of a non-allowlisted object)
        # could run code; any other unpickler failure (random bytes, unsupported opcodes)
        # is a corrupt or foreign file.
        if "GLOBAL" in str(e) or "Unsupported global" in str(e):
            if trust:
                return _trusted_torch_load(p)
            raise _refuse(p, "the file contains pickled objects that would run code") from None
        raise WeightsError(f"weights file {p} is corrupt or not a PyTorch checkpoint") from None
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a garbage file can fail anywhere in the legacy unpickler
        raise WeightsError(f"weights file {p} is corrupt or not a PyTorch checkpoint "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None


def _trusted_torch_load(p: Path) -> Any:
    """``--trust-weights``: unpickle with code allowed (the caller vouched for the file)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(str(p), map_location="cpu", weights_only=False)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any unpickling failure means a corrupt file here
        raise WeightsError(f"weights file {p} is corrupt or not a PyTorch checkpoint "
                           f"({type(e).__name__}: {' '.join(str(e).split())[:120]})") from None


def flatten_checkpoint(obj: Any, path: Path | str = "") -> dict[str, torch.Tensor]:
    """Detectron2 ``{"model": sd, ...}``, ``{"state_dict": sd}``, a bare state_dict, or a bare
    tensor (embedding files) -> flat ``{name: tensor}``. ``module.`` prefixes are stripped."""
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": obj}
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state_dict")
    for key in ("model", "state_dict", "model_state"):
        if key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    out: dict[str, torch.Tensor] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue  # Detectron2 files may carry non-tensor metadata (iteration, __author__)
        k = str(k)
        if k.startswith("module."):
            k = k[len("module."):]
        out[k] = v
    if not out:
        raise WeightsError(f"weights file {path} contains no tensors")
    return out


def save_official_embeddings(path: str | os.PathLike, emb, squeeze: bool = False) -> Path:
    """``torch.save`` of a contiguous float32 [N, D] tensor (``[D]`` for N = 1 with ``squeeze``,
    as the main-branch ``extract_concept_features.py``), written atomically."""
    import shutil
    import tempfile

    path = Path(path)
    t = emb.detach().to("cpu", torch.float32).contiguous().clone()
    if squeeze and t.shape[0] == 1:
        t = t[0].clone()
    path.parent.mkdir(parents=True, exist_ok=True)
    # torch.save names the zip's inner folder after the file: save under the final name in a
    # temporary folder beside it (so the file equals a plain torch.save), then move it in place.
    tmp = Path(tempfile.mkdtemp(prefix=".rclip-embed-", dir=path.parent))
    try:
        torch.save(t, str(tmp / path.name))
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


# ------------------------------------------------------------------------------------------
# Downloads
# ------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("RCLIP_CACHE", Path.home() / ".cache" / "rclip"))


def network_reachable(url: str, timeout: float = 3.0) -> bool:
    """Cheap check that the host of ``url`` accepts TCP connections within ``timeout`` s."""
    u = urllib.parse.urlparse(url)
    if u.scheme == "file":  # a local mirror needs no network, also when offline is forced
        return True
    if os.environ.get("RCLIP_OFFLINE", "") not in ("", "0") or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    host = u.hostname
    port = u.port or (443 if u.scheme == "https" else 80)
    if not host:
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


Progress = Callable[[int, "int | None"], None]


def _checksum_ok(got: str, expected: str) -> bool:
    """``expected`` is a full sha256 or a prefix of one (open_clip's release files name 8 hex
    digits of theirs)."""
    return got.startswith(expected.lower())


def _terminal_progress(name: str) -> tuple[Progress | None, Callable[[], None]]:
    """The default progress report: a tqdm bar on stderr when stderr is a terminal (or
    RCLIP_PROGRESS=1), nothing otherwise. Returns (callback, close)."""
    import sys

    if not (sys.stderr.isatty() or os.environ.get("RCLIP_PROGRESS") == "1"):
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(desc=f"downloading {name}", unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr,
               dynamic_ncols=True, leave=True)

    def update(done: int, total: int | None) -> None:
        if total and bar.total != total:
            bar.total = total
        bar.update(done - bar.n)

    return update, bar.close


def download(url: str, dest: str | os.PathLike, sha256: str | None = None,
             progress: Progress | None = None, timeout: float = 20.0) -> Path:
    """Download ``url`` to ``dest``, checking ``sha256`` (a full digest or a prefix) if given.

    An existing file with the right checksum is reused. Under torchrun the local main process
    (LOCAL_RANK 0) downloads while the others wait at a barrier and then take the file from the
    cache; every process must call this for the same files in the same order. The data goes to
    a temporary file of its own in ``dest``'s folder (``.NAME.XXXX.part``), which replaces
    ``dest`` only after the checksum matched and is removed on any failure.

    ``progress(bytes_done, total_or_None)`` is called as data arrives (default: a tqdm bar on a
    terminal's stderr). Offline: OfflineError within ~3 s.
    """
    from rclip_core.dist import get_world_size, main_process_first

    dest = Path(dest)
    with main_process_first(local=True) as first:
        if first or get_world_size() == 1:
            return _download_once(url, dest, sha256, progress, timeout)
        # The local main process has finished: its file is in place, or it failed (and says why).
        if dest.is_file() and (sha256 is None or _checksum_ok(sha256_of(dest), sha256)):
            return dest
        raise RuntimeFailure(f"the local main process did not download {url} to {dest}",
                             "see the first process's error above")


def _download_once(url: str, dest: Path, sha256: str | None, progress: Progress | None, timeout: float) -> Path:
    import tempfile

    if dest.is_dir():
        raise InputError(f"cannot download to {dest}: it is a directory")
    if dest.is_file() and (sha256 is None or _checksum_ok(sha256_of(dest), sha256)):
        return dest
    if not network_reachable(url):
        raise OfflineError(f"cannot download {url}: no network connection",
                           "download the file elsewhere and pass it with --weights PATH")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise InputError(f"cannot write {dest}: {e.strerror or e}") from None
    tmp = Path(tmp_name)
    close_bar: Callable[[], None] = lambda: None  # noqa: E731
    if progress is None:
        progress, close_bar = _terminal_progress(dest.name)
    h = hashlib.sha256()
    try:
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as src:
                total = src.headers.get("Content-Length")
                total_i = int(total) if total and total.isdigit() else None
                done = 0
                while True:
                    buf = src.read(1 << 20)
                    if not buf:
                        break
                    out.write(buf)
                    h.update(buf)
                    done += len(buf)
                    if progress:
                        progress(done, total_i)
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", None) or e
            raise OfflineError(f"download of {url} failed: {' '.join(str(reason).split())}",
                               "check the connection, or pass a local file with --weights PATH") from None
        finally:
            close_bar()
        got = h.hexdigest()
        if sha256 and not _checksum_ok(got, sha256):
            raise RuntimeFailure(f"checksum mismatch for {url}: got sha256 {got[:16]}..., expected {sha256[:16]}...",
                                 "the download is corrupt or the file changed upstream; nothing was kept; try again")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)  # a no-op after the move; removes the partial file otherwise
    return dest


def sha256_of(path: str | os.PathLike) -> str:
    from rclip_core.fileio import sha256_file

    return sha256_file(path)
