"""Re-execute the book's chapter notebooks so their outputs show the recorded runs.

    python -m normkit.book nbs/01_baseline.ipynb ...     # default: every nbs/*.ipynb

Outputs are made from the records in ``results/`` (or ``$NORMKIT_RESULTS``; no training on a CPU:
missing runs are listed as missing), and the ipywidgets state is saved in each notebook so that the
tabs work in the published HTML.

The notebooks' saved outputs are what nbval checks on a clean clone, so in a git checkout this
refuses to run while ``results/`` holds records git has not committed (new, changed, staged or deleted):
outputs made from them would not match the clone's. Commit the records first, or pass
``--allow-uncommitted`` to execute anyway.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["execute_notebook", "merge_streams", "uncommitted_results", "main"]


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


def uncommitted_results(results: str | os.PathLike) -> list[str]:
    """Paths (from the repository's root) under the ``results`` folder whose content differs from
    git's last commit (untracked, changed, staged or deleted); empty outside a git checkout."""
    try:
        proc = subprocess.run(["git", "-C", str(results), "status", "--porcelain", "--untracked-files=all",
                               "--", "."], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:  # not a git checkout (e.g. an unpacked sdist)
        return []
    return [line[3:] for line in proc.stdout.splitlines() if line.strip()]


def _display(folder: Path) -> str:
    """``folder`` relative to the working directory when it lies under it (``results``), else absolute."""
    folder = Path(folder).resolve()
    try:
        return str(folder.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(folder)


def main(argv: list[str] | None = None) -> int:
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(prog="python -m normkit.book", description=__doc__.split("\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="notebooks to execute (default: every nbs/*.ipynb)")
    parser.add_argument("--allow-uncommitted", action="store_true",
                        help="execute even if the results folder (results/, or $NORMKIT_RESULTS) holds "
                             "records git has not committed")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted((repo / "nbs").glob("*.ipynb"))
    for p in paths:
        if not p.exists():
            print(f"normkit.book: error: no notebook {str(p)!r}", file=sys.stderr)
            return 2
    # Imported here, not at the top: normkit.runs imports torch, and --help and the errors above stay instant.
    from .runs import default_results_dir  # the folder the notebooks read

    results = default_results_dir()
    loose = [] if args.allow_uncommitted else uncommitted_results(results)
    if loose:
        shown = ", ".join(loose[:3]) + (f" and {len(loose) - 3} more" if len(loose) > 3 else "")
        folder = _display(results)
        print(f"normkit.book: error: {folder}/ holds {len(loose)} record file(s) git has not committed ({shown}); "
              "the outputs would not match a clean clone's: commit them first "
              f"(git add {shlex.quote(folder)} && git commit), "
              "or pass --allow-uncommitted", file=sys.stderr)
        return 2
    for p in paths:
        print(f"executing {p}", flush=True)
        execute_notebook(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
