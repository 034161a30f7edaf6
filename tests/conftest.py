"""Shared pytest fixtures (keep minimal; add new fixtures below)."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Real beamline files and labels, kept in the repository (see tests/data/README.md).
FIXTURES_DIR = Path(__file__).resolve().parent / "data"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Path to ``tests/data`` (real I16 scans and the Zooniverse labels)."""
    return FIXTURES_DIR
