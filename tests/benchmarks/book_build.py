"""Time building the book from the committed notebooks and recorded runs (no training).

    uv run python tests/benchmarks/book_build.py              # one fresh `jupyter-book build`, in seconds
    uv run python tests/benchmarks/book_build.py --repeat 3   # best and median of 3 fresh builds
    uv run python tests/benchmarks/book_build.py --execute    # also time `python -m normkit.book` first
                                                        # (re-executes nbs/*.ipynb in place from results/)

Each build goes to a new temporary folder, so every page is read and written (as in CI).
Not a test: it prints the timings and exits 0 if every build succeeded.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _jupyter_book() -> str:
    exe = Path(sys.executable).with_name("jupyter-book")
    return str(exe) if exe.exists() else (shutil.which("jupyter-book") or "jupyter-book")


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if res.returncode:
        sys.stderr.write(res.stdout[-4000:] + res.stderr[-4000:])
        raise SystemExit(f"book_build: `{' '.join(cmd)}` failed (exit {res.returncode})")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=1, help="number of fresh builds (default 1)")
    p.add_argument("--execute", action="store_true", help="first re-execute the chapter notebooks from results/")
    args = p.parse_args(argv)

    if args.execute:
        print(f"execute notebooks (python -m normkit.book): {timed([sys.executable, '-m', 'normkit.book']):.1f} s",
              flush=True)
    times = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="normkit-book-") as out:
            t = timed([_jupyter_book(), "build", str(REPO), "--path-output", out, "-W", "-n", "--keep-going", "-q"])
        times.append(t)
        print(f"book build {i + 1}/{args.repeat}: {t:.1f} s", flush=True)
    if args.repeat > 1:
        print(f"book build: best {min(times):.1f} s, median {statistics.median(times):.1f} s over {args.repeat} builds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
