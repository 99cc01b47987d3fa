"""Shared pytest fixtures for the engine tests."""
from __future__ import annotations

from pathlib import Path

import pytest

REAL_METADATA = (Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real-metadata").resolve()


@pytest.fixture
def real_metadata_dir() -> Path:
    """The real RELION/cryoSPARC files in ../shared/data/real-metadata (read-only); skips when absent."""
    if not REAL_METADATA.is_dir():
        pytest.skip(f"real metadata not found at {REAL_METADATA}")
    return REAL_METADATA
