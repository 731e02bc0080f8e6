"""Helpers for the book tests: the pages of the book and building it (see conftest.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# The widest code line the HTML book shows without sideways scrolling, in a code cell or a
# page's code block (the output box, a little wider, is normkit.report.OUTPUT_COLUMN).
CODE_WIDTH = 75


@dataclass(frozen=True)
class BookBuild:
    """One ``jupyter-book build`` of the repository: where its HTML is and what it said."""

    html: Path
    returncode: int
    log: str
    seconds: float


def book_pages() -> list[str]:
    """The documents in the book's table of contents (``_toc.yml``), in order, without suffix."""
    import yaml

    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(entries):
        for e in entries or []:
            if "file" in e:
                pages.append(e["file"])
            walk(e.get("sections"))

    for part in toc.get("parts") or []:
        walk(part.get("chapters"))
    walk(toc.get("chapters"))
    return [p.removesuffix(".md").removesuffix(".ipynb") for p in pages]


def chapter_pages() -> list[str]:
    """The chapters: the notebooks (``nbs/*.ipynb``) in the table of contents."""
    return [p for p in book_pages() if p.startswith("nbs/")]


def fenced_code(markdown: str) -> list[str]:
    """The lines of the fenced code blocks in MyST markdown: ```` ```bash ````, ```` ```{code-block} ````
    and the like, not directives such as ```` ```{figure} ```` whose body is not shown as code."""
    from markdown_it import MarkdownIt  # the parser MyST builds on

    return [line for t in MarkdownIt("commonmark").parse(markdown) if t.type == "fence"
            and (not t.info.startswith("{") or t.info.startswith("{code")) for line in t.content.splitlines()]


def jupyter_book() -> str:
    exe = Path(sys.executable).with_name("jupyter-book")
    return str(exe) if exe.exists() else (shutil.which("jupyter-book") or "jupyter-book")


def build_book(out: Path, *extra: str) -> BookBuild:
    """``jupyter-book build`` the repository into ``out/_build/html``, warnings as errors."""
    cmd = [jupyter_book(), "build", str(REPO), "--path-output", str(out), "-W", "-n", "--keep-going", *extra]
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    return BookBuild(out / "_build" / "html", res.returncode, res.stdout + res.stderr, time.perf_counter() - start)


def expected_tables(page: str) -> int:
    """How many ``table.normkit-table`` a chapter should show: in the widgets its outputs display
    (walking a Tab's children in the saved widget state), else in its HTML outputs; the same
    choice myst-nb makes (a widget view before text/html)."""
    nb = json.loads((REPO / f"{page}.ipynb").read_text())
    state = nb.get("metadata", {}).get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})

    def in_model(model_id: str) -> int:
        model = state.get(model_id, {}).get("state", {})
        n = str(model.get("value", "")).count('class="normkit-table"')
        return n + sum(in_model(str(c).removeprefix("IPY_MODEL_")) for c in model.get("children", []) or [])

    n = 0
    for cell in nb["cells"]:
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            if "application/vnd.jupyter.widget-view+json" in data:
                n += in_model(data["application/vnd.jupyter.widget-view+json"]["model_id"])
            elif "text/html" in data:
                html = data["text/html"]
                n += ("".join(html) if isinstance(html, list) else html).count('class="normkit-table"')
    return n
