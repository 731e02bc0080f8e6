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
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

__all__ = ["execute_notebook", "merge_streams", "stable_ids", "uncommitted_results", "main"]


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


_WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
_WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
_ALTAIR_ID = re.compile(r"altair-viz-([0-9a-f]{32})")
_MODEL_REF = re.compile(r"IPY_MODEL_([0-9A-Za-z]+)")


def stable_ids(nb: dict, salt: str) -> dict:
    """``nb`` with the random ids an execution gives its widget models and altair charts replaced
    by ids made from ``salt`` (the notebook's name) and the order in which they first appear.

    Each execution draws new uuids for every widget model and chart, so without this a notebook
    re-executed on the same records differs from its last commit in hundreds of lines, and the diff
    of a re-execution that did change a table is unreadable. Models are numbered in the order the
    outputs show them, each followed by the models it refers to (``IPY_MODEL_<id>``, its state's
    keys in sorted order); models no output reaches come last, in the order of their content. Every
    occurrence of an id is replaced, so references stay consistent. Returns a new notebook dict.
    """
    state = nb.get("metadata", {}).get("widgets", {}).get(_WIDGET_STATE, {}).get("state", {})
    order: list[str] = []

    def visit_model(mid: str) -> None:
        if mid in order or mid not in state:
            return
        order.append(mid)
        for ref in _MODEL_REF.findall(json.dumps(state[mid].get("state", {}), sort_keys=True)):
            visit_model(ref)

    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            data = out.get("data", {})
            view = data.get(_WIDGET_VIEW)
            if isinstance(view, dict) and view.get("model_id"):
                visit_model(view["model_id"])
            for chart in _ALTAIR_ID.findall(json.dumps(data)):
                if chart not in order:
                    order.append(chart)
    blank = re.compile("|".join(map(re.escape, state)) or r"(?!)")
    for mid in sorted(set(state) - set(order),
                      key=lambda m: (blank.sub("ID", json.dumps(state[m], sort_keys=True)), m)):
        order.append(mid)
    new = {old: hashlib.sha1(f"{salt}/{i}".encode()).hexdigest()[:32] for i, old in enumerate(order)}
    text = json.dumps(nb)
    if new:
        longest_first = sorted(new, key=len, reverse=True)  # no id matched inside a longer one
        text = re.sub("|".join(map(re.escape, longest_first)), lambda m: new[m.group(0)], text)
    return json.loads(text)


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
    nbformat.write(nbformat.from_dict(stable_ids(nb, path.stem)), path)


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
