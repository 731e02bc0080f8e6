"""Re-execute the book's chapter notebooks so their outputs show the recorded runs.

    python -m normkit.book nbs/01_baseline.ipynb ...     # default: every nbs/*.ipynb

Outputs are made from the records in ``results/`` (no training on a CPU: missing runs are
listed as missing), and the ipywidgets state is saved in each notebook so that the
tabs work in the published HTML.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

__all__ = ["execute_notebook", "merge_streams", "main"]


def merge_streams(outputs: list) -> list:
    """A cell's outputs with each run of same-stream outputs joined into one, and any
    whitespace-only stream output added to the previous output of its stream.

    A kernel may send one ``print`` in pieces (its line, then its newline after a widget was
    displayed); the HTML book would show each piece as its own box, an empty one for a lone
    newline. The text of each stream, all of it joined (what nbval compares), is unchanged.
    """
    merged: list = []
    last: dict[str, Any] = {}  # stream name -> its latest output in ``merged``
    for out in outputs:
        if out.get("output_type") != "stream":
            merged.append(out)
            continue
        prev = merged[-1] if merged else None
        if prev is not None and prev.get("output_type") == "stream" and prev.get("name") == out.get("name"):
            prev["text"] += out["text"]
        elif not out["text"].strip() and out.get("name") in last:
            last[out["name"]]["text"] += out["text"]
        else:
            merged.append(out)
            last[out.get("name")] = out
    return merged


def execute_notebook(path: str | os.PathLike, timeout: int = 600) -> None:
    """Run ``path`` top to bottom in a fresh kernel, in its own folder, and save it in place."""
    import nbformat
    from nbclient import NotebookClient

    path = Path(path)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", store_widget_state=True,
                            resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    for cell in nb.cells:  # keep diffs small: no per-run timing metadata
        cell.get("metadata", {}).pop("execution", None)
        if cell.get("outputs"):
            cell["outputs"] = merge_streams(cell["outputs"])
    nbformat.write(nb, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    repo = Path(__file__).resolve().parent.parent
    paths = [Path(a) for a in argv] or sorted((repo / "nbs").glob("*.ipynb"))
    for p in paths:
        if not p.exists():
            print(f"normkit.book: error: no notebook {str(p)!r}", file=sys.stderr)
            return 2
        print(f"executing {p}", flush=True)
        execute_notebook(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
