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

from book_helpers import CODE_WIDTH

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((REPO / "nbs").glob("*.ipynb"))


def setup_cell(nb_path):
    return nbformat.read(nb_path, as_version=4).cells[1].source


def test_every_notebook_has_the_same_setup_cell():
    cells = {p.name: setup_cell(p) for p in NOTEBOOKS}
    assert len(set(cells.values())) == 1, f"setup cells differ: {sorted(cells)}"
    assert "ensure_normkit()" in next(iter(cells.values()))


def run_setup(find_spec_result, clone):
    """Execute the setup cell's definitions with the network, git and pip replaced by fakes."""
    src = setup_cell(NOTEBOOKS[0])
    defs = src.split("\nensure_normkit()")[0]
    ns = {}
    exec(defs, ns)
    calls = []
    path = list(sys.path)
    try:
        did = ns["ensure_normkit"](find_spec=lambda name: find_spec_result, run=calls.append, clone=str(clone))
        added = [p for p in sys.path if p not in path]
    finally:
        sys.path[:] = path
    return ns, did, calls, added


def test_setup_fetches_the_pinned_release_with_its_records_only_when_missing(tmp_path):
    clone = tmp_path / "normkit"
    ns, did, calls, added = run_setup(None, clone)
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert ns["RELEASE"] == f"v{version}", "the setup cell must pin normkit to this release"
    assert did and calls == [
        ["git", "clone", "--quiet", "--depth", "1", "--branch", ns["RELEASE"], ns["REPO"], str(clone)],
        [sys.executable, "-m", "pip", "install", "--quiet", "--editable", str(clone)],
    ]
    # the kernel imports normkit from the clone, so its results/ is where records are read
    assert added == [str(clone)]
    clone.mkdir()  # a second chapter in the same runtime reuses the clone
    _, did, calls, _ = run_setup(None, clone)
    assert did and calls == [[sys.executable, "-m", "pip", "install", "--quiet", "--editable", str(clone)]]
    _, did, calls, added = run_setup(object(), clone)
    assert not did and calls == [] and added == []


def test_an_editable_clone_reads_its_own_records(tmp_path, monkeypatch):
    """What the setup cell relies on: normkit imported from a checkout reads that checkout's results/."""
    import shutil
    import subprocess

    monkeypatch.delenv("NORMKIT_RESULTS", raising=False)
    clone = tmp_path / "normkit"
    (clone / "results").mkdir(parents=True)
    (clone / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    shutil.copytree(REPO / "normkit", clone / "normkit", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-c", "from normkit.runs import default_results_dir as d; print(d())"],
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(clone)}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(clone / "results")


def test_committed_notebooks_are_clean():
    for p in NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert [c.execution_count for c in code] == list(range(1, len(code) + 1)), f"{p.name} not run top to bottom"
        for c in code:
            assert all(o.output_type != "error" for o in c.outputs), f"{p.name} has an error output"
            assert "widget" not in json.dumps(c.metadata)
            # each printed box of the HTML has text, and one print is one box (normkit.book.merge_streams)
            streams = [o for o in c.outputs if o.output_type == "stream"]
            assert all(o.text.strip() for o in streams), f"{p.name}: a whitespace-only output in {c.source[:40]!r}"
            for a, b in zip(c.outputs, c.outputs[1:]):
                assert not (a.output_type == b.output_type == "stream" and a.name == b.name), (
                    f"{p.name}: one stream in two outputs in {c.source[:40]!r}")
        if any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for c in code for o in c.outputs):
            assert "widgets" in nb.metadata, f"{p.name} lost its widget state (tabs would not work in the HTML)"


def test_shown_code_fits_the_column():
    """The code a reader sees, at once or by expanding a cell tagged ``hide-input``, needs no
    sideways scrolling in the HTML book (removed cells are never shown)."""
    hidden = {"remove-input", "remove-cell"}
    long = [f"{p.name}: {line.strip()[:50]!r}… ({len(line)} characters)"
            for p in NOTEBOOKS for c in nbformat.read(p, as_version=4).cells
            if c.cell_type == "code" and not hidden & set(c.metadata.get("tags", []))
            for line in c.source.splitlines() if len(line) > CODE_WIDTH]
    assert not long, f"code lines over {CODE_WIDTH} characters:\n" + "\n".join(long)


def printed_table_rows(nb) -> list[str]:
    """The printed lines of a notebook that are rows of a table: two or more spaces between words."""
    return [line for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "stream" for line in o.get("text", "").splitlines()
            if re.search(r"\S {2,}\S", line)]


def test_printed_tables_fit_the_output_column():
    """A printed table whose rows wrap in the HTML book loses its columns; prose lines may wrap."""
    from normkit.report import OUTPUT_COLUMN

    wide = [f"{p.name}: {row.strip()[:50]!r}… ({len(row)} characters)" for p in NOTEBOOKS
            for row in printed_table_rows(nbformat.read(p, as_version=4)) if len(row) > OUTPUT_COLUMN]
    assert not wide, f"printed table rows over {OUTPUT_COLUMN} characters:\n" + "\n".join(wide)


def test_printed_table_rows_are_told_from_prose():
    text = "a sentence, not a table\n  m    5%  median\n 2   0.002  0.2\n"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(outputs=[
        nbformat.v4.new_output("stream", name="stdout", text=text)])])
    assert printed_table_rows(nb) == ["  m    5%  median", " 2   0.002  0.2"]


def test_merge_streams_joins_a_print_sent_in_pieces_and_keeps_each_streams_text():
    from normkit.book import merge_streams

    out = nbformat.v4.new_output
    widget = out("display_data", data={"text/plain": "Tab(...)"})
    cell = [out("stream", name="stdout", text="missing\n"), widget, out("stream", name="stdout", text="best"),
            out("stream", name="stdout", text="\n"), out("stream", name="stderr", text="warn\n"), widget,
            out("stream", name="stdout", text="\n"), out("stream", name="stdout", text="last\n")]

    def text(outputs, name):
        return "".join(o.text for o in outputs if o.output_type == "stream" and o.name == name)

    before = {n: text(cell, n) for n in ("stdout", "stderr")}
    merged = merge_streams([nbformat.from_dict(dict(o)) for o in cell])
    assert [(o.output_type, o.get("text")) for o in merged] == [
        ("stream", "missing\n"), ("display_data", None), ("stream", "best\n\n"), ("stream", "warn\n"),
        ("display_data", None), ("stream", "last\n")]
    assert {n: text(merged, n) for n in before} == before  # what nbval compares: each stream's text


def _widget_notebook(ids):
    """A notebook whose one cell shows a Tab of two HTML widgets and an altair chart, with ``ids``
    (tab, html1, html2, layout, chart, unshown) as an execution would draw them."""
    tab, h1, h2, layout, chart, unshown = ids
    model = lambda name, **state: {"model_name": name, "model_module": "@jupyter-widgets/controls",
                                   "state": {"_model_name": name, **state}}
    html = (f'<div id="altair-viz-{chart}"></div><script>if (outputDiv.id !== "altair-viz-{chart}") '
            '{"datasets": {"data-0123456789abcdef0123456789abcdef": []}}</script>')
    cell = nbformat.v4.new_code_cell("tabs", execution_count=1, outputs=[
        nbformat.v4.new_output("display_data", data={
            "application/vnd.jupyter.widget-view+json": {"model_id": tab, "version_major": 2, "version_minor": 0},
            "text/plain": "Tab(...)"}),
        nbformat.v4.new_output("display_data", data={"text/html": html})])
    cell.id = "tabs"
    nb = nbformat.v4.new_notebook(cells=[cell])
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"version_major": 2, "version_minor": 0,
        "state": {tab: model("TabModel", children=[f"IPY_MODEL_{h1}", f"IPY_MODEL_{h2}"], layout=f"IPY_MODEL_{layout}",
                                      titles=["CNN", "ResNet18"]),
                  h1: model("HTMLModel", value="cnn table", layout=f"IPY_MODEL_{layout}"),
                  h2: model("HTMLModel", value="resnet table", layout=f"IPY_MODEL_{layout}"),
                  layout: model("LayoutModel"), unshown: model("LayoutModel", width="1px")}}}
    return nb


def test_stable_ids_make_a_re_execution_on_the_same_records_identical():
    """Each execution draws new uuids for widget models and charts; the saved notebook gets ids from its
    name and their order, so re-executing on unchanged records leaves the committed file unchanged."""
    import uuid

    from normkit.book import stable_ids

    first, second = (_widget_notebook([uuid.uuid4().hex for _ in range(6)]) for _ in range(2))
    assert first != second
    a, b = stable_ids(first, "02_batchnorm"), stable_ids(second, "02_batchnorm")
    assert a == b and stable_ids(a, "02_batchnorm") == a
    assert stable_ids(first, "03_small_batch") != a  # another chapter's page: other ids
    text = json.dumps(a)
    state = a["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]["state"]
    shown = a["cells"][0]["outputs"][0]["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
    refs = set(re.findall(r"IPY_MODEL_([0-9a-f]+)", text))
    assert len(state) == 5 and shown in state and refs <= set(state)  # every reference still resolves
    tables = [state[r.removeprefix("IPY_MODEL_")]["state"]["value"] for r in state[shown]["state"]["children"]]
    assert tables == ["cnn table", "resnet table"]  # the tabs still hold their own tables, in order
    charts = set(re.findall(r"altair-viz-([0-9a-f]{32})", text))
    assert len(charts) == 1 and charts.isdisjoint(state)  # both of the chart's occurrences renamed alike
    assert "data-0123456789abcdef0123456789abcdef" in text  # altair's content hashes are left alone
    assert nbformat.validate(nbformat.from_dict(a)) is None


def test_committed_notebooks_have_stable_ids():
    """Re-executed with ``python -m normkit.book`` (which saves stable ids), not saved from Jupyter."""
    from normkit.book import stable_ids

    for p in NOTEBOOKS:
        nb = json.loads(p.read_text(encoding="utf-8"))
        assert stable_ids(nb, p.stem) == nb, (
            f"{p.name}: widget or chart ids are not the stable ones; re-execute it with `python -m normkit.book nbs/{p.name}`")


def test_uncommitted_results_lists_what_a_clean_clone_would_not_have(tmp_path):
    """Records git has not committed: new, changed, staged or deleted; nothing outside git."""
    import subprocess

    from normkit.book import uncommitted_results

    assert uncommitted_results(tmp_path / "results") == []  # not a git checkout
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "results" / "v1").mkdir(parents=True)
    (tmp_path / "results" / "v1" / "a.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("outside results/")
    assert uncommitted_results(tmp_path / "results") == ["results/v1/a.json"]
    subprocess.run([*git, "add", "results"], check=True)
    assert uncommitted_results(tmp_path / "results") == ["results/v1/a.json"]  # staged is not committed
    subprocess.run([*git, "commit", "-qm", "a"], check=True)
    assert uncommitted_results(tmp_path / "results") == []
    (tmp_path / "results" / "v1" / "a.json").write_text('{"changed": 1}')
    (tmp_path / "results" / "v1" / "b.json").write_text("{}")
    assert sorted(uncommitted_results(tmp_path / "results")) == ["results/v1/a.json", "results/v1/b.json"]


def test_book_refuses_to_execute_over_uncommitted_records(monkeypatch, capsys):
    """Outputs made from records a clean clone lacks would fail nbval there (CI failed so once)."""
    import normkit.book as book

    ran, checked = [], []
    monkeypatch.setattr(book, "execute_notebook", ran.append)
    monkeypatch.setattr(book, "uncommitted_results", lambda results: checked.append(results) or ["results/v1/x.json"])
    monkeypatch.delenv("NORMKIT_RESULTS", raising=False)
    monkeypatch.chdir(REPO)
    assert book.main([str(NOTEBOOKS[0])]) == 2
    assert checked == [REPO / "results"]
    err = capsys.readouterr().err
    assert err.startswith("normkit.book: error: results/ holds 1 record file(s) git has not committed")
    assert "git add results &&" in err
    assert "results/v1/x.json" in err and "--allow-uncommitted" in err and len(err.splitlines()) == 1
    assert ran == []
    assert book.main([str(NOTEBOOKS[0]), "--allow-uncommitted"]) == 0
    assert ran == [NOTEBOOKS[0]]


def test_book_names_the_results_folder_it_checked(monkeypatch, capsys, tmp_path):
    """With NORMKIT_RESULTS set, the check and its message are about that folder, not results/."""
    import normkit.book as book

    ran, checked = [], []
    elsewhere = tmp_path / "my-results"
    monkeypatch.setattr(book, "execute_notebook", ran.append)
    monkeypatch.setattr(book, "uncommitted_results",
                        lambda results: checked.append(results) or ["my-results/v1/y.json"])
    monkeypatch.setenv("NORMKIT_RESULTS", str(elsewhere))
    monkeypatch.chdir(tmp_path)
    assert book.main([str(NOTEBOOKS[0])]) == 2
    assert checked == [elsewhere]
    err = capsys.readouterr().err
    assert err.startswith("normkit.book: error: my-results/ holds 1 record file(s)")
    assert "git add my-results &&" in err and "results/ holds" not in err.replace("my-results/ holds", "")
    monkeypatch.chdir(REPO)  # a folder outside the working directory is shown in full
    assert book.main([str(NOTEBOOKS[0])]) == 2
    assert capsys.readouterr().err.startswith(f"normkit.book: error: {elsewhere.resolve()}/ holds 1 record file(s)")
    assert ran == []


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
