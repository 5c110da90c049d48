"""Shared fixtures: the location of the reference material, and skipping when it is absent."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REFERENCE = SHARED / "reference"
SKELETONS = SHARED / "datasets" / "utkinect_skeletons"


def require(path: Path) -> Path:
    """Skip the calling test with a reason when ``path`` does not exist."""
    if not path.exists():
        pytest.skip(f"{path} is absent: the reference material lives beside the repository "
                    "in ../shared and is not distributed with it")
    return path


@pytest.fixture
def reference_dir() -> Path:
    return require(REFERENCE)


@pytest.fixture
def skeletons_dir() -> Path:
    return require(SKELETONS)
