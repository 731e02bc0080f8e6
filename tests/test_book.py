"""The book builds from the committed notebooks with no warning, and serves all its scripts itself."""

from __future__ import annotations

import math
import re
import sys

import pytest

from book_helpers import CODE_WIDTH, REPO, book_pages, chapter_pages, fenced_code

sys.path.insert(0, str(REPO / "book" / "_ext"))
from normkit_book import external_resources  # noqa: E402


def test_book_builds_without_warnings(book_build):
    warnings = [line for line in book_build.log.splitlines() if re.search(r"WARNING|ERROR", line)]
    assert book_build.returncode == 0 and not warnings, (
        f"jupyter-book build -W -n --keep-going failed (exit {book_build.returncode}):\n" + "\n".join(warnings)
        + "\n\n" + book_build.log[-5000:])


@pytest.mark.parametrize("page", book_pages())
def test_page_built_and_loads_nothing_from_other_hosts(book_build, page):
    html = book_build.html / f"{page}.html"
    assert html.is_file(), f"{page} is in _toc.yml but {html} was not built"
    text = html.read_text(encoding="utf-8")
    assert not external_resources(text), f"{page}.html loads scripts or styles from another host"
    for src in re.findall(r'<script[^>]+src="([^"]+)"', text) + re.findall(r'<link[^>]+href="([^"#]+\.(?:css|js))[^"]*"', text):
        local = (html.parent / src.split("?")[0]).resolve()
        assert local.is_file(), f"{page}.html loads {src}, which is not in the built book"


@pytest.mark.parametrize("page", chapter_pages())
def test_chapter_has_widget_state_and_local_widget_manager(book_build, page):
    text = (book_build.html / f"{page}.html").read_text(encoding="utf-8")
    assert 'type="application/vnd.jupyter.widget-state+json"' in text, (
        f"{page}: no saved widget state; re-execute the notebook with `python -m normkit.book {page}.ipynb`")
    assert re.search(r'<script src="[./]*_static/vendor/jupyter-widgets/embed\.js', text)
    assert "require.min.js" not in text and "embed-amd.js" not in text


def test_bibliography_resolves_every_key():
    import pybtex.database

    keys = set(pybtex.database.parse_file(str(REPO / "book" / "references.bib")).entries)
    cited = set()
    sources = list((REPO / "book").glob("*.md")) + [REPO / f"{p}.ipynb" for p in chapter_pages()]
    for path in sources:
        for group in re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", path.read_text(encoding="utf-8")):
            cited |= {k.strip() for k in group.split(",")}
    assert cited <= keys, f"cited but not in book/references.bib: {sorted(cited - keys)}"


def test_code_blocks_of_the_pages_fit_the_column():
    """A page's code block (the commands a reader copies) needs no sideways scrolling in the
    HTML book, like the chapters' code cells (tests/test_notebooks.py)."""
    import nbformat

    def markdown(page: str) -> str:
        path = REPO / page
        if path.with_suffix(".md").exists():
            return path.with_suffix(".md").read_text(encoding="utf-8")
        cells = nbformat.read(path.with_suffix(".ipynb"), as_version=4).cells
        return "\n".join(c.source for c in cells if c.cell_type == "markdown")

    long = [f"{page}: {line.strip()[:50]!r}… ({len(line)} characters)"
            for page in book_pages() for line in fenced_code(markdown(page)) if len(line) > CODE_WIDTH]
    assert not long, f"code lines over {CODE_WIDTH} characters:\n" + "\n".join(long)


def test_fenced_code_is_the_shown_code_only():
    page = "\n".join(["text", "```bash", "a", "```", "```{figure} f.svg", ":alt: b", "caption", "```",
                     "````{code-block} python", "c", "````", "~~~", "d", "~~~", "```", "e"])
    assert fenced_code(page) == ["a", "c", "d", "e"]


def test_protocol_states_the_schedule_fit_one_cycle_follows():
    """The protocol page's learning-rate schedule, read from its prose, is the one fastai's
    ``fit_one_cycle`` (as normkit calls it, with fastai's defaults) sets at every step."""
    import math

    import fastai.callback.schedule  # noqa: F401 - Learner.fit_one_cycle
    from fastai.test_utils import synth_learner

    text = (REPO / "book" / "protocol.md").read_text(encoding="utf-8")
    stated = re.search(r"from \$\\eta_\{\\max\}/(\d+)\$.*?over the first quarter of the \$T\$ training"
                       r" steps, then anneals it to\s+\$\\eta_\{\\max\}/10\^(\d+)\$", text, re.S)
    assert stated, "book/protocol.md no longer states the schedule's first and last learning rates in words"
    start, warm, end = int(stated[1]), 0.25, 10 ** int(stated[2])  # warm: the first quarter
    display = text[text.index(r"\eta(t) ="):].split("$$")[0]
    for bound in (rf"\eta_{{\max}}/{stated[1]},", rf"\eta_{{\max}}/10^{stated[2]},"):
        assert bound in display, f"the prose's {bound[:-1]} is not in the formula"

    def cosine(a: float, b: float, p: float) -> float:
        return a + (b - a) * (1 - math.cos(math.pi * p)) / 2

    lr, learn = 0.01, synth_learner(n_trn=8)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(5, lr)
    steps = len(learn.recorder.lrs)
    t1 = warm * steps
    expected = [cosine(lr / start, lr, t / t1) if t < t1 else cosine(lr, lr / end, (t - t1) / (steps - t1))
                for t in range(steps)]
    assert steps == 40
    assert learn.recorder.lrs == pytest.approx(expected, rel=1e-5, abs=0)  # fastai computes in float32


def test_protocol_states_the_bounds_of_at_chance():
    """The protocol page's definition of a run *at chance* gives report.at_chance's bounds."""
    from normkit.report import CHANCE_ACCURACY, CHANCE_LOSS

    text = (REPO / "book" / "protocol.md").read_text(encoding="utf-8")
    found = re.search(r"^At chance\n: (.+?)\n\n", text, re.M | re.S)
    assert found, "book/protocol.md has no 'At chance' definition"
    words = " ".join(found.group(1).split())
    assert f"under ${CHANCE_ACCURACY:g}/K$" in words and f"within {CHANCE_LOSS:.0%} of $\\ln K$" in words, words
    assert f"under {CHANCE_ACCURACY / 10:g}, and within {CHANCE_LOSS * math.log(10):.3f} of {math.log(10):.3f}" in words, words
