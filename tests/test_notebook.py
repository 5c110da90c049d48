"""The theory notebook runs from start to end and prints the numbers it claims."""

import re
from pathlib import Path

import pytest

pytest.importorskip("ipykernel", reason="executing the notebook needs ipykernel")

from notebooks.execute_notebook import execute  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "equivariant_hyperspheres_demo.ipynb"

# Every check in the notebook runs in float64.
ROUNDING_TOL = 1e-10


@pytest.fixture(scope="module")
def printed() -> str:
    """Everything the notebook printed, after running all of its cells in a fresh kernel.

    A failing cell raises ``CellExecutionError`` here, which fails every test of this module.
    """
    notebook = execute(NOTEBOOK)
    return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for output in cell.outputs if output.output_type == "stream")


def numbers_after(label: str, text: str) -> list[float]:
    """The numbers printed right after each occurrence of ``label``; at least one must exist."""
    found = re.findall(re.escape(label) + r"\s*([-+0-9.e]+)", text)
    assert found, f"the notebook no longer prints {label!r}"
    return [float(value) for value in found]


def test_filter_bank_theorem_holds_to_rounding(printed):
    label = "max equivariance error over n = 2..6 and both determinants:"
    assert numbers_after(label, printed)[0] < ROUNDING_TOL


def test_change_of_basis_matches_its_closed_forms(printed):
    errors = numbers_after("max |M - closed form| =", printed)
    assert len(errors) == 3 and max(errors) < ROUNDING_TOL


def test_sphere_sign_convention(printed):
    assert numbers_after("max |<X, s> - (r^2 - |x - c|^2) / 2| =", printed)[0] < ROUNDING_TOL


def test_model_is_invariant_and_mlp_is_not(printed):
    label = "max invariance error of DEH_hulls (Gram features and output):"
    assert numbers_after(label, printed)[0] < ROUNDING_TOL
    assert numbers_after("DEH output spread over the angles:", printed)[0] < ROUNDING_TOL
    assert numbers_after("MLP output spread over the angles:", printed)[0] > 1e-3
