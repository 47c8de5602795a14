"""Every notebook in examples/ runs top to bottom (small sizes: HEADSCOPE_EXAMPLE_SMALL=1).

The notebooks assert their own claims (e.g. ablating the top induction heads raises the loss on
the repeated half), so a wrong number fails here as well as an exception. Also checks that the
committed .ipynb files are what examples/build_notebooks.py generates, without outputs.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))


def _builder():
    spec = importlib.util.spec_from_file_location("build_notebooks", EXAMPLES / "build_notebooks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_notebooks_are_generated_and_clean():
    import nbformat

    assert NOTEBOOKS, "no notebooks in examples/"
    builder = _builder()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        assert path.stem in builder.NOTEBOOKS, f"{path.name} is not built by examples/build_notebooks.py"
        sources = [c.source for c in nb.cells]
        assert sources == [src for _, src in builder.NOTEBOOKS[path.stem]], f"{path.name} differs from its builder"
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch, tmp_path):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("HEADSCOPE_EXAMPLE_SMALL", "1")
    nb = nbformat.read(path, as_version=4)
    # Runs in a scratch directory so nothing a notebook writes lands in the repository.
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
