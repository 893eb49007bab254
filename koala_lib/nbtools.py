"""Notebook hygiene: re-execute the stage notebooks on a profile and store them cleaned, as committed.

Cleaning keeps what a reader needs (sources, outputs, figures) and drops what changes on every run:
papermill's injected-parameters cell and cell metadata, cell ids, progress bars on stderr. Execution counts
are renumbered 1, 2, 3, ... in cell order, so they never change between runs (nbval needs them on cells
that carry outputs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nbformat

from koala_lib.config import project_root
from koala_lib.pipeline import run_pipeline

_KEEP_CELL_META = ("tags",)


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """The notebook as committed: no injected cell, sequential execution counts, no volatile metadata or stderr."""
    cells = []
    count = 0
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if "injected-parameters" in tags:
            continue
        cell.metadata = {k: v for k, v in cell.get("metadata", {}).items() if k in _KEEP_CELL_META}
        cell.pop("id", None)
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            outputs = []
            for out in cell.outputs:
                if out.get("output_type") == "stream" and out.get("name") == "stderr":
                    continue
                if "execution_count" in out:
                    out["execution_count"] = count
                out.pop("metadata", None) if out.get("output_type") == "stream" else None
                outputs.append(out)
            cell.outputs = outputs
        cells.append(cell)
    nb.cells = cells
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
    }
    nb.nbformat, nb.nbformat_minor = 4, 4
    return nb


def refresh(profile: str = "smoke", overrides: Sequence[str] = (), stages: str | None = None) -> list[Path]:
    """Execute the notebooks on `profile` and write them, cleaned, back to notebooks/."""
    written = []
    for run in run_pipeline(profile, overrides, stages=stages, progress=False):
        nb = clean(nbformat.read(run.notebook, as_version=4))
        target = project_root() / "notebooks" / run.notebook.name
        nbformat.write(nb, target)
        written.append(target)
    return written
