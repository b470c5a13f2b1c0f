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
