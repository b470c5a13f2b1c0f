"""Process-group state for one-process and torchrun runs: rank, world size, barrier, main first.

Each worker started by torchrun (``rclip pretrain --nproc N`` relaunches itself through
``rclip_cli._torchrun``) calls :func:`init_distributed`, which reads the environment torchrun
sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT). Without those variables
everything here is a no-op, so the same code runs on one process.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

from rclip_core.errors import InputError, RuntimeFailure

__all__ = [
    "DistInfo",
    "init_distributed",
    "launched_by_torchrun",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "all_reduce_mean",
    "cleanup",
    "main_process_first",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits. ``distributed`` is False for a plain single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise RuntimeFailure(f"torchrun variable {name} is not set",
                                 hint="start workers with torchrun (rclip pretrain --nproc N)")
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeFailure(f"torchrun variable {name}={value!r} is not an integer") from None


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    """True inside a worker started by torchrun (so a CLI must not relaunch itself)."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def init_distributed(
    backend: str | None = None,
    device: str | torch.device | None = None,
    timeout_s: float = 1800.0,
) -> DistInfo:
    """Join the process group described by torchrun's environment variables.

    Args:
        backend: "nccl" or "gloo"; default nccl when CUDA is available and the worker uses it,
            gloo otherwise (CPU).
        device: the device the caller wants ("cpu", "cuda"); "cuda" becomes ``cuda:LOCAL_RANK``.
            Default: cuda:LOCAL_RANK when CUDA is available, else cpu.
        timeout_s: collective timeout.

    Returns:
        :class:`DistInfo`. With WORLD_SIZE unset or 1 nothing is initialised and the result is
        rank 0 of 1 on ``device``. Calling it again in an initialised process returns the
        current state without re-initialising.
    """
    env = os.environ
    world_size = _env_int(env, "WORLD_SIZE", 1)
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if world_size <= 1:
        dev = torch.device(device) if device is not None else torch.device("cuda" if use_cuda else "cpu")
        return DistInfo(device=dev)
    rank = _env_int(env, "RANK")
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if name not in env:
            raise RuntimeFailure(f"torchrun variable {name} is not set",
                                 hint="start workers with torchrun (rclip pretrain --nproc N)")
    if use_cuda:
        if not torch.cuda.is_available():
            raise InputError("CUDA was requested but is not available", hint="use --device cpu")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    backend = backend or ("nccl" if use_cuda else "gloo")
    if backend == "nccl" and not use_cuda:
        raise InputError("the nccl backend needs CUDA devices", hint="use the gloo backend on CPU")
    if not dist.is_available():
        raise RuntimeFailure("this PyTorch build has no torch.distributed support")
    if not dist.is_initialized():
        try:
            dist.init_process_group(
                backend=backend,
                init_method="env://",
                rank=rank,
                world_size=world_size,
                timeout=timedelta(seconds=timeout_s),
            )
        except (RuntimeError, ValueError) as e:
            raise RuntimeFailure(f"cannot join the process group ({backend}): {e}") from None
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                    backend=dist.get_backend(), device=dev)


def _ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if _ready() else 0


def get_world_size() -> int:
    return dist.get_world_size() if _ready() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that writes files."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process; a no-op in a single process."""
    if _ready() and dist.get_world_size() > 1:
        dist.barrier()


def _local_rank() -> int:
    value = os.environ.get("LOCAL_RANK")
    try:
        return int(value) if value is not None else get_rank()
    except ValueError:
        return get_rank()


@contextmanager
def main_process_first(local: bool = True) -> Iterator[bool]:
    """Run the block on the main process first, then on the others.

    For work whose result the other processes then reuse (a download, a cache file, a
    vocabulary's text embeddings): the main process enters the block while the others wait at
    a barrier; once it leaves the block, they run it (finding its results). A no-op in a single
    process. Every process must enter the block, or the barriers hang.

    Args:
        local: True (default) for the main process of this node (LOCAL_RANK 0), the one that
            shares a file system with the node's other workers; False for global rank 0.

    Yields:
        True on the process that goes first.
    """
    first = (_local_rank() if local else get_rank()) == 0
    if not first:
        barrier()
    try:
        yield first
    finally:
        if first:
            barrier()


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_mean(value: torch.Tensor | Mapping[str, float | torch.Tensor]):
    """Mean over processes.

    Args:
        value: a tensor (any shape), or a dict of scalars (floats or 0-d tensors), e.g. the
            loss terms to log. Every process must pass the same keys.

    Returns:
        a new detached tensor on the input's device (floating inputs keep their dtype, integer
        ones come back as float64) or a dict of floats; in a single process the input's
        values unchanged (tensors detached and cloned).
    """
    if isinstance(value, Mapping):
        keys = sorted(value)
        flat = torch.tensor([float(value[k]) for k in keys], dtype=torch.float64)
        reduced = all_reduce_mean(flat)
        return {k: float(v) for k, v in zip(keys, reduced.tolist())}
    out = value.detach().clone()
    if not _ready() or dist.get_world_size() == 1:
        return out
    work = out.to(_collective_device())
    if not work.is_floating_point():
        work = work.double()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    work /= dist.get_world_size()
    return work.to(device=value.device, dtype=value.dtype if value.is_floating_point() else work.dtype)


def cleanup() -> None:
    """Leave the process group (call at the end of every worker, also after errors)."""
    if _ready():
        dist.destroy_process_group()
