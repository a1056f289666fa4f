"""notebooks/cs330_hw2.ipynb runs end to end in its tiny setting, on images the test writes."""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_omniglot import _write

ROOT = Path(__file__).resolve().parents[1]


def test_cs330_hw2_notebook_executes(tmp_path, monkeypatch):
    _write(tmp_path, "images_background_small1", {"Greek": 3, "Latin": 2, "Korean": 2}, zipped=True)
    _write(tmp_path, "images_background_small2", {"Greek": 3, "Tagalog": 2}, zipped=True)
    monkeypatch.setenv("OMNIGLOT_ROOT", str(tmp_path))
    monkeypatch.setenv("NOTEBOOK_TINY", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(ROOT / "notebooks" / "cs330_hw2.ipynb", as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    try:
        client.execute()
    except Exception as error:  # show the failing cell's traceback, not nbclient's wrapper
        pytest.fail(f"notebook failed: {error}")
    outputs = "".join(o.get("text", "") for c in notebook.cells if c.cell_type == "code" for o in c.outputs)
    assert "| ProtoNets |" in outputs and "MAML + learned inner lrs" in outputs
    assert "within-alphabet, drawer split" in outputs and "| ProtoNets | 2-way |" in outputs
