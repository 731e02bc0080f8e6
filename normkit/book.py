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

__all__ = ["execute_notebook", "main"]


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
