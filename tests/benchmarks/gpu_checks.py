"""Every GPU measurement the book waits for, in one command within a time budget (not a test).

    uv run python tests/benchmarks/gpu_checks.py --budget 3600      # on a machine with a CUDA GPU
    uv run python tests/benchmarks/gpu_checks.py --only bench --only sweep --budget 600
    uv run python tests/benchmarks/gpu_checks.py --dry-run           # the plan, on any machine

The steps, in this order (the two short correctness checks first, then the measurements, most
wanted first), each measurement writing into the checkout's ``results/`` as the book reads it:

* ``graphs``: the CUDA-graph tests (``tests/test_graphs.py``): replayed runs match eager ones;
* ``resume``: the checkpoint tests on CUDA (``tests/test_checkpoints.py -k cuda``): a run stopped
  after an epoch and resumed matches the run made in one go;
* ``bench-packs``: the issue's benchmark on its target slice, ResNet18 at batch size 2, plain
  fastai against normkit's runs in packs of 6 replayed from CUDA graphs, the settings that
  remove the most per-step overhead (``sweep_bench.py --record``), at two lengths;
* ``bench-mps``: the packs again (at the shorter length) with their two workers as clients of a
  private CUDA MPS daemon, whose kernels can then run at the same time instead of taking turns;
  skipped where ``nvidia-cuda-mps-control`` is not installed;
* ``bench``: the same slice with normkit's default settings;
* ``steps``: the time per step of each way of training that network (``step_time.py --record``);
* ``science``: the fast-path check on the GPU, kept in ``results/gpu`` (``sweep_bench.py
  --check-science``), three runs at once on each path: one plain CNN run at batch size 2 had
  not finished after 176 s on an H200, and the check has three of them (its runs are
  independent, so running them side by side changes their time, not their numbers);
* ``sweep``: the study's missing runs (``normkit sweep --chapter all``) for the rest of the budget.

A step starts only if the budget has at least its ``needs`` seconds left (an estimate) and is
stopped when the budget ends; ``science`` and ``sweep`` get the time that is left as their own
``--time-limit`` and stop cleanly, keeping every finished run. ``--archive FILE`` writes, after
every step, a ``.tgz`` of the files under ``results/`` that the steps made or changed, so that a
machine whose only way back is one folder (``$OUT``) returns what finished even if it is cut off.
Unpack it into the checkout (``tar xzf FILE``), commit the records, then re-execute the book
(``python -m normkit.book``, which refuses uncommitted records). Exits 1 if a step failed, else 0
(a step skipped for time is not a failure).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = "tests/benchmarks"


@dataclass(frozen=True)
class Step:
    """One measurement: its command (from the checkout's root), the seconds it needs to be worth
    starting, whether it takes the time left as ``--time-limit``, and a program it requires."""

    name: str
    argv: tuple[str, ...]
    needs: int
    time_limit: bool = False
    requires: str | None = None  # a program that must be installed, else the step is skipped


#: The steps: first the two short correctness checks (a failure there says which numbers after it
#: not to trust), then the measurements, most wanted first. Their ``needs`` are the seconds each
#: took on an H200 (2026-12-04, at 300 steps only), with the second length's estimated, rounded
#: up. The speed slices are made at two lengths (300 and 1200 steps per epoch) so that the
#: projection counts each run's fixed seconds once; ``bench-mps`` (not yet measured anywhere) is
#: ``bench-packs`` at 300 steps under CUDA MPS, to set against that length of it. The pytest steps
#: override the project's ``addopts`` (``--nbval``): a GPU image need not have nbval.
PYTEST = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra")
LENGTHS = ("--steps", "300", "--steps", "1200")
STEPS = (
    Step("graphs", (*PYTEST, "tests/test_graphs.py"), 60),
    Step("resume", (*PYTEST, "tests/test_checkpoints.py", "-k", "cuda"), 40),
    Step("bench-packs", (f"{BENCH}/sweep_bench.py", "--net", "resnet18", "--bs", "2", "--seeds", "12", "--workers", "2",
                         "--pack", "6", "--graph", *LENGTHS, "--record", "results/benchmarks"), 330),
    Step("bench-mps", (f"{BENCH}/sweep_bench.py", "--net", "resnet18", "--bs", "2", "--seeds", "12", "--workers", "2",
                       "--pack", "6", "--graph", "--mps", "--record", "results/benchmarks"), 140,
         requires="nvidia-cuda-mps-control"),
    Step("bench", (f"{BENCH}/sweep_bench.py", "--net", "resnet18", "--bs", "2", *LENGTHS, "--record",
                   "results/benchmarks"), 260),
    Step("steps", (f"{BENCH}/step_time.py", "--net", "resnet18", "--bs", "2", "--pack", "6", "--graph",
                   "--record", "results/benchmarks"), 70),
    Step("science", (f"{BENCH}/sweep_bench.py", "--check-science", "--results", "results/gpu", "--workers", "3"), 180,
         time_limit=True),
    Step("sweep", ("-m", "normkit", "sweep", "--chapter", "all"), 120, time_limit=True),
)
#: Seconds kept back from a --time-limit, for the command to start and to write its last record.
MARGIN = 20


def snapshot(folder: Path) -> dict[str, int]:
    """Each file under ``folder`` (relative path) with its modification time in nanoseconds."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


def changed(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """The files of ``after`` that are new or modified since ``before``, sorted."""
    return sorted(f for f, t in after.items() if before.get(f) != t)


def archive(path: Path, root: Path, files: list[str]) -> None:
    """Write ``files`` (paths relative to ``root``) into the ``.tgz`` at ``path``, replacing it."""
    tmp = path.with_name(path.name + ".part")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(root / f, arcname=f)
    tmp.replace(path)


def command(step: Step, left: float) -> list[str]:
    """The command of ``step`` started with ``left`` seconds of the budget left."""
    argv = [sys.executable, *step.argv]
    if step.time_limit:
        argv += ["--time-limit", str(max(int(left) - MARGIN, 1))]
    return argv


def run(cmd: list[str], env: dict[str, str], timeout: float) -> int | str:
    """Run ``cmd`` from the checkout's root in a process group of its own; its exit status, or,
    past ``timeout`` seconds, a note that the whole group (a sweep's workers too) was stopped."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # time to write what it has
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        proc.wait()
        return "stopped at the end of the budget"


def main(argv: list[str] | None = None) -> int:
    names = [s.name for s in STEPS]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=3600, help="seconds for all the steps together (default 3600)")
    p.add_argument("--only", action="append", metavar="STEP",
                   help=f"only these steps, in the usual order (repeatable; {', '.join(names)})")
    p.add_argument("--archive", metavar="FILE", help="after each step, a .tgz of the files under results/ it made")
    p.add_argument("--dry-run", action="store_true", help="print the plan; run nothing")
    args = p.parse_args(argv)
    bad = sorted(set(args.only or ()) - set(names))
    if bad:
        p.error(f"--only {', '.join(bad)}: no such step; the steps are {', '.join(names)}")
    if args.budget <= 0:
        p.error(f"--budget {args.budget:g} is invalid; it must be a positive number of seconds")
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    if args.dry_run:
        for s in steps:
            req = f" (if {s.requires} is installed)" if s.requires else ""
            print(f"{s.name}: needs {s.needs}s{req}: {' '.join(command(s, args.budget)[1:])}")
        return 0
    import torch

    if not torch.cuda.is_available():
        p.error("these are GPU measurements and CUDA is not available here; the benchmarks' toy scale on a CPU: "
                f"{BENCH}/sweep_bench.py, {BENCH}/step_time.py")
    if args.archive and not Path(args.archive).resolve().parent.is_dir():
        p.error(f"--archive {args.archive!r}: its folder does not exist")
    end = time.monotonic() + args.budget
    results = REPO / "results"
    before = snapshot(results)
    failed, skipped = [], []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for s in steps:
        left = end - time.monotonic()
        if left < s.needs:
            print(f"== {s.name}: skipped, {left:.0f}s of the budget left and it needs {s.needs}s", flush=True)
            skipped.append(s.name)
            continue
        if s.requires and shutil.which(s.requires) is None:
            print(f"== {s.name}: skipped, {s.requires} is not installed here", flush=True)
            skipped.append(s.name)
            continue
        cmd = command(s, left)
        print(f"== {s.name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        rc = run(cmd, env, max(left, 1))
        print(f"== {s.name}: exit {rc} after {time.monotonic() - t0:.0f}s", flush=True)
        if rc not in (0, 3):  # sweep_bench --check-science exits 3 while runs are still missing
            failed.append(s.name)
        if args.archive:
            files = changed(before, snapshot(results))
            archive(Path(args.archive), REPO, [f"results/{f}" for f in files])
            print(f"   {len(files)} new or changed file(s) under results/ in {args.archive}", flush=True)
    print(f"== done: {len(steps) - len(skipped) - len(failed)} of {len(steps)} step(s) ran without failure"
          + "".join(f"; {what}: {', '.join(v)}" for what, v in (("skipped", skipped), ("failed", failed)) if v))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
