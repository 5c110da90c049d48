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


@pytest.fixture(params=["kernels", "tensors"])
def code_path(request, monkeypatch) -> str:
    """Run a test twice: on the compiled CPU kernels of :mod:`models.native` and on the tensor
    code alone. The kernels' run is skipped where they cannot be built (no C++ compiler);
    ``tests/test_native.py`` fails instead when a compiler is present."""
    from models import native

    if request.param == "tensors":
        monkeypatch.setattr(native, "usable", lambda points: False)
    elif not native.available():
        pytest.skip("the CPU kernels could not be built on this machine (see the log)")
    return request.param
