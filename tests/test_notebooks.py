"""Notebooks run top to bottom (so they cannot rot)."""
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_notebook_runs(name, shared, tmp_path, monkeypatch):
    monkeypatch.setenv("COSTMODEL_SHARED", str(shared))
    monkeypatch.setenv("COSTMODEL_NB_ITERATIONS", "30")
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    assert any(o.get("output_type") == "execute_result" for c in nb.cells for o in c.get("outputs", []))
