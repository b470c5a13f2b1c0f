"""Shared test fixtures. Tests are hermetic: no network, small tensors, fast on 2 CPU cores."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep tests deterministic and bounded on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")
# Any accidental download must fail fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own rclip cache (class embeddings, downloads): nothing leaks between
    tests or into the user's ~/.cache."""
    monkeypatch.setenv("RCLIP_CACHE", str(tmp_path / "rclip-cache"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def sample_image() -> Path:
    """A real 1920x1080 photo: the official demo's sample_img1.jpg (shipped under tests/data)."""
    return REPO / "tests" / "data" / "sample_img1.jpg"


# ----------------------------------------------------------------------------- CUDA tests
# Tests that need a GPU carry @pytest.mark.cuda. Without CUDA they are skipped with a reason
# (shown by -ra) and listed by name at the end of the run, so nothing hides; on a GPU machine
# `benchmarks/gpu_check.sh` runs them (`pytest -m cuda`).

CUDA_SKIP_REASON = "needs CUDA: run benchmarks/gpu_check.sh on a GPU machine"


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped without one; benchmarks/gpu_check.sh)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=CUDA_SKIP_REASON)
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    skipped = [r.nodeid for r in terminalreporter.stats.get("skipped", [])
               if "cuda" in getattr(r, "keywords", {}) or CUDA_SKIP_REASON in str(r.longrepr)]
    if skipped:
        terminalreporter.section(f"{len(skipped)} CUDA tests skipped (no GPU here)", sep="-")
        for nodeid in skipped:
            terminalreporter.write_line(nodeid)
