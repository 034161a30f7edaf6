"""Shared pytest fixtures (keep minimal; add new fixtures below)."""

from __future__ import annotations

from pathlib import Path

import pytest

#: Real beamline files, outside the repository (see ../shared/fixtures/README.md).
FIXTURES_DIR = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Path to ``../shared/fixtures`` (relative to the repository root)."""
    return FIXTURES_DIR
