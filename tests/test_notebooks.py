"""The chapter notebooks: their Colab setup cell, and a top-to-bottom run at smoke scale.

nbval (configured in pyproject.toml) separately re-runs every notebook as committed and
checks that its outputs, made from the committed records, match exactly.
"""

import json
import os
import re
import sys
import tomllib
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "nbs").glob("*.ipynb"))


def setup_cell(nb_path):
    return nbformat.read(nb_path, as_version=4).cells[1].source


def test_every_notebook_has_the_same_setup_cell():
    cells = {p.name: setup_cell(p) for p in NOTEBOOKS}
    assert len(set(cells.values())) == 1, f"setup cells differ: {sorted(cells)}"
    assert "ensure_normkit()" in next(iter(cells.values()))


def run_setup(find_spec_result):
    """Execute the setup cell's definitions with the network and pip replaced by fakes."""
    src = setup_cell(NOTEBOOKS[0])
    defs = src.split("\nensure_normkit()")[0]
    ns = {}
    exec(defs, ns)
    calls = []
    did = ns["ensure_normkit"](find_spec=lambda name: find_spec_result, run=calls.append)
    return ns, did, calls


def test_setup_installs_the_pinned_release_only_when_missing():
    ns, did, calls = run_setup(find_spec_result=None)
    assert did and calls == [[sys.executable, "-m", "pip", "install", "--quiet", ns["NORMKIT"]]]
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert ns["NORMKIT"].endswith(f"@v{version}"), "the setup cell must pin normkit to this release"
    _, did, calls = run_setup(find_spec_result=object())
    assert not did and calls == []


def test_committed_notebooks_are_clean():
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{p.name} not run top to bottom"
        for c in code:
            assert all(o.output_type != "error" for o in c.outputs), f"{p.name} has an error output"
            assert "widget" not in json.dumps(c.metadata)
        if any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for c in code for o in c.outputs):
            assert "widgets" in nb.metadata, f"{p.name} lost its widget state (tabs would not work in the HTML)"


@pytest.fixture(scope="module")
def smoke_results(tmp_path_factory):
    """One results folder for every notebook's smoke run: later chapters reuse earlier runs."""
    return tmp_path_factory.mktemp("smoke-results")


@pytest.mark.parametrize("nb_path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_smoke_scale(nb_path, smoke, smoke_results, monkeypatch):
    """Top to bottom with NORMKIT_SMOKE=1: the grid is trained at toy scale and every table filled."""
    from nbclient import NotebookClient

    monkeypatch.setenv("NORMKIT_RESULTS", str(smoke_results))
    nb = nbformat.read(nb_path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(nb_path.parent)}}).execute()
    texts = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            data = o.get("data", {})
            texts.append(o.get("text", "") + data.get("text/plain", "") + data.get("text/html", ""))
    out = "\n".join(texts)
    assert "are not recorded yet" not in out
    tables = re.findall(r'<table class="normkit-table".*?</table>', out)
    assert tables or "normkit-table" not in nb_path.read_text(), f"{nb_path.name}: no tables rendered"
    assert "missing" not in "".join(tables)
