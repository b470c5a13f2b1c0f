"""The commands the README shows, tried as written.

Those that need only what the project makes (ShapesWorld) or ships run for real, in the order
the README gives them, in a scratch folder. Those that need the official checkpoints, COCO /
LVIS images or hours of training are run up to the end of option parsing (the README's own
arguments followed by ``--help``), so that every option they write still exists. Every command
of every ``bash`` block is in one of the two groups: a command added to the README without a
decision fails here. The two set-up commands are what ``.ci/run`` runs; the multi-node
``torchrun`` line needs several machines.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: run for real, as written (in this order, in one scratch folder)
RUN = [
    "rclip quickstart --dry-run",
    "rclip data shapes world --train 2000 --val 500 --seed 0",
    "rclip data inspect world",
]


def readme_commands() -> list[str]:
    """Every command line of the README's ``bash`` blocks (continuations joined, comments dropped)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.sub(r"\s+#\s.*$", "", line.strip())
            if line and not line.startswith("#"):
                out.append(" ".join(line.split()))
    return out


def _kind(command: str) -> str:
    if command.startswith("python3 -m venv"):
        return "setup"
    if command.startswith("torchrun "):
        return "multi-node"
    if command in RUN:
        return "run"
    if command.startswith("rclip ") and " ... " not in command:
        return "parse"
    return "unknown"


def _rclip(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, COLUMNS="200", RCLIP_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "rclip_cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_every_readme_command_is_covered():
    commands = readme_commands()
    assert len(commands) >= 30
    kinds = {c: _kind(c) for c in commands}
    # "rclip finetune ... --fully-supervised" stands for the command above it plus a flag
    unknown = [c for c, k in kinds.items() if k == "unknown" and c != "rclip finetune ... --fully-supervised"]
    assert unknown == []
    assert [c for c in RUN if c not in commands] == []  # the RUN list follows the README
    assert sum(k == "setup" for k in kinds.values()) == 2


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    for command in RUN:
        res = _rclip(shlex.split(command)[1:], tmp_path)
        assert res.returncode == 0, f"{command}\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
    assert (tmp_path / "world" / "world.json").is_file()
    assert "rclip finetune" in _rclip(["quickstart", "--dry-run"], tmp_path).stdout


@pytest.mark.parametrize("command", [c for c in readme_commands() if _kind(c) == "parse"])
def test_readme_commands_parse(command, tmp_path):
    """Options and subcommands as the README writes them (values are checked by each command's
    own bad-input tests)."""
    res = _rclip([*shlex.split(command)[1:], "--help"], REPO)
    assert res.returncode == 0, f"{command}\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
    assert "Usage:" in res.stdout
