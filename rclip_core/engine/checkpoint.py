"""Training checkpoints: atomic save, resume from the latest, RNG state, pruning, SIGTERM.

Layout under a run's checkpoint directory::

    ckpt_00005000/model.safetensors   model weights (safetensors: no pickle)
    ckpt_00005000/state.pt            optimizer, scheduler, RNG states, step, caller's extra
    latest                            one line: the name of the newest complete checkpoint

A checkpoint is written into a hidden temporary directory and renamed into place only once
both files are complete; ``latest`` is then replaced atomically. A crash or a full disk
mid-write therefore leaves the previous checkpoint and ``latest`` untouched. ``state.pt`` holds
only tensors and plain Python values, so it is read with ``torch.load(weights_only=True)``.
Save on the main process only (``distributed.is_main()``).
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from rclip_core.errors import InputError, RuntimeFailure
from rclip_core.fileio import atomic_write_text

__all__ = [
    "Checkpoint",
    "checkpoint_name",
    "save_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_latest",
    "restore_training_state",
    "rng_state",
    "restore_rng",
    "StopFlag",
    "install_sigterm_handler",
]

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"
LATEST_FILE = "latest"
_NAME_RE = re.compile(r"^ckpt_(\d{8,})$")
_TMP_PREFIX = ".tmp-ckpt_"


def checkpoint_name(step: int) -> str:
    return f"ckpt_{int(step):08d}"


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``state`` is the dict saved in ``state.pt``."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def extra(self) -> dict[str, Any]:
        return self.state.get("extra", {})


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch CPU and CUDA generator states as tensors and plain values."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Restore generators saved by :func:`rng_state` (accepts a whole ``state.pt`` dict too).

    CUDA states are restored only when the same number of devices is visible.
    """
    if "rng" in state and "python" not in state:
        state = state["rng"]
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state((
        str(npst["bit_generator"]),
        npst["key"].numpy().astype(np.uint32),
        int(npst["pos"]),
        int(npst["has_gauss"]),
        float(npst["gauss"]),
    ))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ----------------------------------------------------------------------------- saving

_PLAIN = (bool, int, float, str, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Refuse values that ``torch.load(weights_only=True)`` could not read back."""
    if isinstance(value, (torch.Tensor, *_PLAIN)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint value {where} has a key of type {type(k).__name__}")
            _check_plain(v, f"{where}.{k}")
        return
    raise TypeError(
        f"checkpoint value {where} is a {type(value).__name__}; store tensors, numbers, strings, "
        "lists and dicts only (they must load with weights_only=True)"
    )


def _tensors_for_safetensors(model_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no shared storage (safetensors refuses aliasing)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for name, t in model_state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"model_state[{name!r}] is a {type(t).__name__}, expected a tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()  # a fresh copy
        else:
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            whole = (t.is_contiguous() and t.storage_offset() == 0
                     and storage.nbytes() == t.numel() * t.element_size())
            if key in seen or not whole:
                t = t.clone(memory_format=torch.contiguous_format)
            else:
                seen.add(key)
        out[name] = t.contiguous()
    return out


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``ckpt_dir`` as (step, path), oldest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME_RE.match(p.name)
        if m and p.is_dir() and (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def _read_latest_pointer(d: Path) -> Path | None:
    try:
        name = (d / LATEST_FILE).read_text(encoding="utf-8").strip()
    except OSError:
        return None
    if not _NAME_RE.match(name):
        return None
    p = d / name
    return p if (p / MODEL_FILE).is_file() and (p / STATE_FILE).is_file() else None


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    step: int,
    model_state: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    extra: Mapping[str, Any] | None = None,
    rng: bool = True,
    keep_last: int | None = None,
) -> Path:
    """Write ``ckpt_dir/ckpt_{step:08d}/`` atomically and point ``latest`` at it.

    Args:
        ckpt_dir: the run's checkpoint directory (created if needed).
        step: number of completed optimizer steps (resume continues at ``step``).
        model_state: name -> tensor (e.g. the trainable model's ``state_dict()``).
        optimizer, scheduler: anything with ``state_dict()``; stored in ``state.pt``.
        extra: caller state, e.g. ``{"sampler": {...}, "recipe": {...}}``: tensors and plain
            values only (checked before anything is written).
        rng: also store the Python/NumPy/torch/CUDA generator states.
        keep_last: afterwards delete all but the newest ``keep_last`` checkpoints.

    Returns:
        the final checkpoint directory.
    """
    d = Path(ckpt_dir)
    step = int(step)
    state: dict[str, Any] = {"step": step, "extra": dict(extra or {})}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if rng:
        state["rng"] = rng_state()
    _check_plain(state, "state")
    tensors = _tensors_for_safetensors(model_state)

    from safetensors.torch import save_file

    try:
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob(_TMP_PREFIX + "*"):  # leftovers of a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        final = d / checkpoint_name(step)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{step:08d}-", dir=d))
        try:
            save_file(tensors, str(tmp / MODEL_FILE), metadata={"step": str(step), "format": "pt"})
            torch.save(state, tmp / STATE_FILE)
            for f in (tmp / MODEL_FILE, tmp / STATE_FILE):
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
            if final.exists():  # re-saving a step: move the old one aside first
                trash = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}old-", dir=d))
                os.replace(final, trash / final.name)
                shutil.rmtree(trash, ignore_errors=True)
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o777 & ~mask)  # mkdtemp makes it private (0700)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        atomic_write_text(d / LATEST_FILE, final.name + "\n")
    except OSError as e:
        raise RuntimeFailure(f"cannot write checkpoint {checkpoint_name(step)} in {d}: {e.strerror or e}",
                             hint="check free disk space and permissions of the output directory") from None
    if keep_last is not None and keep_last > 0:
        for _, old in list_checkpoints(d)[:-keep_last]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- loading

def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load one checkpoint directory (``.../ckpt_XXXXXXXX``)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not (p / MODEL_FILE).is_file() or not (p / STATE_FILE).is_file():
        raise InputError(f"{p} is not a complete checkpoint (needs {MODEL_FILE} and {STATE_FILE})")
    try:
        model_state = load_file(str(p / MODEL_FILE), device=str(map_location))
        state = torch.load(p / STATE_FILE, map_location=map_location, weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, ValueError, OSError, EOFError) as e:
        raise InputError(f"checkpoint {p} is unreadable: {str(e).splitlines()[0] if str(e) else e}",
                         hint="delete it to resume from the previous checkpoint") from None
    return Checkpoint(path=p, step=int(state["step"]), model_state=model_state, state=state)


def load_latest(ckpt_dir: str | os.PathLike, map_location: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest complete checkpoint in ``ckpt_dir``, or None when there is none.

    Follows ``latest``; if the pointer is missing or stale (a crash between the rename and the
    pointer update), falls back to the highest-step complete checkpoint.
    """
    d = Path(ckpt_dir)
    p = _read_latest_pointer(d)
    if p is None:
        found = list_checkpoints(d)
        if not found:
            return None
        p = found[-1][1]
    return load_checkpoint(p, map_location)


def restore_training_state(
    ckpt: Checkpoint,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    rng: bool = True,
) -> int:
    """Load optimizer/scheduler state and RNG from ``ckpt``; return the step to resume at.

    The model weights are the caller's job (``model.load_state_dict(ckpt.model_state)``),
    because only the caller knows which parameters the checkpoint covers.
    """
    if optimizer is not None and "optimizer" in ckpt.state:
        optimizer.load_state_dict(ckpt.state["optimizer"])
    if scheduler is not None and "scheduler" in ckpt.state:
        scheduler.load_state_dict(ckpt.state["scheduler"])
    if rng and "rng" in ckpt.state:
        restore_rng(ckpt.state["rng"])
    return ckpt.step


# ----------------------------------------------------------------------------- SIGTERM

class StopFlag:
    """Set by a signal handler; the training loop polls it, saves a checkpoint and exits."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def set(self, signum: int | None = None) -> None:
        self.signum = signum
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def __bool__(self) -> bool:
        return self.is_set()

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def trim_metrics_log(path: str | os.PathLike, start_step: int) -> None:
    """A JSON-lines metrics log at the start of a run: deleted for a fresh run (``start_step``
    0); on resume, the lines of steps after the checkpoint are dropped (they are run again)."""
    import json

    path = Path(path)
    if not path.is_file():
        return
    if start_step == 0:
        path.unlink()
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if int(json.loads(line).get("step", 0)) <= start_step:
                kept.append(line)
        except (ValueError, AttributeError):
            continue
    atomic_write_text(path, "".join(k + "\n" for k in kept))


def install_sigterm_handler(signals: Iterable[int] = (signal.SIGTERM,)) -> StopFlag:
    """Make SIGTERM (scheduler preemption, torchrun shutdown) set a flag instead of killing us.

    Must be called from the main thread. Returns the :class:`StopFlag`; ``flag.uninstall()``
    restores the previous handlers.
    """
    flag = StopFlag()
    for signum in signals:
        flag._previous[signum] = signal.signal(signum, lambda s, _frame: flag.set(s))
    return flag
