"""The torchrun launcher behind ``--nproc N`` (pretrain, finetune, pseudo-label).

The command relaunches itself as ``python -m torch.distributed.run ... -m rclip_cli <args>``;
each worker then joins the process group through :func:`rclip_core.dist.init_distributed`. A
command must check :func:`rclip_core.dist.launched_by_torchrun` before relaunching, since the
workers run the same command line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Mapping, Sequence

from rclip_core.errors import InputError

__all__ = ["free_port", "torchrun_command", "launch_torchrun"]


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(
    nproc: int,
    module_args: Sequence[str],
    extra_torchrun_args: Sequence[str] = (),
    module: str = "rclip_cli",
    port: int | None = None,
) -> list[str]:
    """The command line :func:`launch_torchrun` runs (exposed for tests and ``--dry-run``).

    Single-node rendezvous on ``127.0.0.1:<free port>`` (what ``--standalone`` does, but with an
    explicit port so the workers' MASTER_PORT is known).
    """
    if int(nproc) < 1:
        raise InputError(f"--nproc must be at least 1, got {nproc}")
    port = free_port() if port is None else int(port)
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1",
        "--nproc_per_node", str(int(nproc)),
        "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"127.0.0.1:{port}",
        *map(str, extra_torchrun_args),
        "-m", module,
        *map(str, module_args),
    ]


def launch_torchrun(
    nproc: int,
    module_args: Sequence[str],
    extra_torchrun_args: Sequence[str] = (),
    module: str = "rclip_cli",
    env: Mapping[str, str] | None = None,
) -> int:
    """Run ``python -m torch.distributed.run --nproc_per_node N -m <module> <module_args>``.

    The workers inherit stdout/stderr. The workers see LOCAL_RANK/WORLD_SIZE, so a command
    that relaunches itself must check :func:`launched_by_torchrun` first.

    Args:
        nproc: processes on this node.
        module_args: arguments after ``-m <module>``, e.g. ``["pretrain", "recipe.yaml"]``.
        extra_torchrun_args: extra torchrun options placed before ``-m``.
        module: the Python module to run (default the rclip CLI).
        env: extra environment variables for the workers.

    Returns:
        torchrun's exit code (0 when every worker succeeded).
    """
    cmd = torchrun_command(nproc, module_args, extra_torchrun_args, module)
    child_env = dict(os.environ)
    if env:
        child_env.update({k: str(v) for k, v in env.items()})
    # torchrun would otherwise warn and force 1 thread per worker; respect an explicit choice
    child_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, int(nproc)))))
    proc = subprocess.Popen(cmd, env=child_env)
    previous = None
    if threading.current_thread() is threading.main_thread():
        # a scheduler's SIGTERM (preemption) must reach torchrun, which forwards it to the
        # workers so that they can save a checkpoint and exit
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached torchrun too (same process group): let it stop its workers
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                return proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
