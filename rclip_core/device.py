"""Device selection: CUDA when available, else CPU; ``--device`` overrides."""

from __future__ import annotations

import torch

from rclip_core.errors import InputError


def resolve_device(name: str | None = None) -> torch.device:
    """``None``/"auto" picks cuda if available, else cpu. "cuda:1", "cpu", "mps" accepted."""
    if name is None or str(name).lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(str(name))
    except RuntimeError:
        raise InputError(f"unknown device {name!r}", "use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError("--device cuda was asked for but no CUDA GPU is available",
                             "use --device cpu (or auto)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise InputError("--device mps was asked for but MPS is not available", "use --device cpu")
    elif dev.type != "cpu":
        raise InputError(f"unsupported device {name!r}", "use auto, cpu, cuda or cuda:N")
    return dev
