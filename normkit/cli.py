"""``normkit``: make and inspect the study's runs from the shell.

    normkit sweep --chapter batchnorm [--net cnn] [--norm batchnorm] [--bs 128] [--data PATH] [--dry-run]
                  [--workers N] [--fast | --plain] [--time-limit SECONDS] [--device cpu|cuda] [--checkpoints DIR]
                  [--channels-last] [--fastai-adam] [--fastai-learner] [--compile MODE] [--pack N] [--graph] [--mps]
    normkit status [--chapter NAME] [--checkpoints DIR]   # runs recorded per chapter, and the training left

``sweep`` trains the missing runs (the ones it resumes first, then longest first), writing
each record as its run ends, so stopping it anywhere loses only the runs in flight and the
same command resumes; with ``--checkpoints DIR`` each run also saves its state after every
epoch, and a stopped run resumes from there (at most one epoch lost). On CUDA
it uses the fast data path and several worker processes by default; on a CPU, one run at
a time on the plain fastai pipeline. See :mod:`normkit.sweep`.
"""

from __future__ import annotations

import argparse
import sys
import time

from .data import DataError


class _Parser(argparse.ArgumentParser):
    """Errors in one line: ``normkit: error: ...``."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"normkit: error: {message} (see normkit {self._sub_name()}--help)\n")

    def _sub_name(self) -> str:
        parts = self.prog.split()[1:]
        return (" ".join(parts) + " ") if parts else ""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive, finite number of seconds")
    return value


def _parser() -> argparse.ArgumentParser:
    from .fastdata import COMPILE_MODES
    from .study import _chapters

    chapters = list(_chapters())
    p = _Parser(prog="normkit", description="Make and inspect the runs behind the book.")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    s = sub.add_parser("sweep", help="train every run of a chapter that has no record yet")
    s.add_argument("--chapter", action="append", choices=chapters + ["all"], required=True,
                   help="chapter(s) whose grid to run; 'all' for the whole study")
    s.add_argument("--net", action="append", help="only these networks (cnn, resnet18)")
    s.add_argument("--norm", action="append", help="only these norms (name or label, e.g. 'batchnorm(eps=0.1)')")
    s.add_argument("--bs", action="append", type=_positive_int, help="only these batch sizes (128, 2)")
    s.add_argument("--data", help="Imagenette folder or .tgz (default: $NORMKIT_DATA, else fastai's download)")
    s.add_argument("--results", help="results folder (default: the checkout's results/)")
    s.add_argument("--dry-run", action="store_true", help="list the missing runs in the order they would start; train nothing")
    s.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    s.add_argument("--workers", type=_positive_int,
                   help="runs trained at once, each in its own process (default: 1 on cpu, up to 8 on cuda)")
    path = s.add_mutually_exclusive_group()
    path.add_argument("--fast", dest="fast", action="store_true", default=None,
                      help="data decoded once and augmented on the device (default on cuda)")
    path.add_argument("--plain", dest="fast", action="store_false",
                      help="the plain fastai DataLoaders, CPU decoding (default on cpu)")
    s.add_argument("--time-limit", type=_seconds, metavar="SECONDS",
                   help="start no run (nor a small_batch probe) projected to end after this many seconds, and with "
                        "--checkpoints pause a run after an epoch when its next one would end later; exit cleanly "
                        "(rerun to continue)")
    s.add_argument("--checkpoints", metavar="DIR",
                   help="save each run's state after every epoch in DIR, and resume unfinished runs from it "
                        "(a stopped sweep loses at most an epoch of each run in flight; default: "
                        "$NORMKIT_CHECKPOINTS if set, else none)")
    s.add_argument("--channels-last", action="store_true", help="NHWC memory layout (fast path; measure first)")
    s.add_argument("--fastai-adam", action="store_true",
                   help="fast path with fastai's own Adam instead of the equivalent fused torch AdamW")
    s.add_argument("--fastai-learner", action="store_true",
                   help="fast path with fastai's own Learner, optimizer wrapper and loss (same numbers, more Python per step)")
    s.add_argument("--compile", choices=COMPILE_MODES, metavar="MODE",
                   help=f"torch.compile each model with this mode ({', '.join(COMPILE_MODES)}; fast path; measure first)")
    s.add_argument("--pack", type=_positive_int, default=1, metavar="N",
                   help="train up to N runs that differ only in their seed and learning rate as one grouped network (fast path; "
                        "each keeps its own record; measure first with tests/benchmarks/step_time.py --pack N)")
    s.add_argument("--graph", action="store_true",
                   help="replay each network's forward and backward from CUDA graphs (fast path on cuda; each record says "
                        "whether it was graphed; measure first with tests/benchmarks/step_time.py --graph)")
    s.add_argument("--mps", action="store_true", help="run a private CUDA MPS daemon so the workers' kernels overlap")
    st = sub.add_parser("status", help="how many runs of each chapter are recorded")
    st.add_argument("--chapter", action="append", choices=chapters + ["all"])
    st.add_argument("--results")
    st.add_argument("--checkpoints", metavar="DIR",
                    help="also say how many missing runs are part-made there (default: $NORMKIT_CHECKPOINTS if set)")
    return p


def _grids(names, nets=None, norms=None, batch_sizes=None):
    from .study import _chapters, chapter

    every = not names or "all" in names
    grids = [chapter(n) for n in (list(_chapters()) if every else names)]
    if every and batch_sizes:  # the whole study: skip the chapters without these batch sizes (eps_sweep has no 128)
        every_bs = sorted({b for g in grids for b in g.batch_sizes}, reverse=True)
        grids = [g for g in grids if set(batch_sizes) & set(g.batch_sizes)]
        if not grids:
            raise ValueError(f"batch size(s) {', '.join(map(str, batch_sizes))} not in any chapter; "
                             f"the study's batch sizes: {', '.join(map(str, every_bs))}")
        return [g.subset(nets=nets, norms=norms, batch_sizes=[b for b in batch_sizes if b in g.batch_sizes])
                for g in grids]
    return [g.subset(nets=nets, norms=norms, batch_sizes=batch_sizes) for g in grids]


def _make_probes(args, store, train: bool, deadline: float | None) -> None:
    """The small-batch chapter's probe records (:mod:`normkit.probes`), after its runs; only
    listed on a dry run or when the time limit left runs undone, and none started that would
    end after ``deadline`` (``time.monotonic()``)."""
    from .probes import ProbeStore, make_probes, probe_configs

    configs = [c for c in probe_configs()
               if (not args.net or c.run.net in args.net) and (not args.bs or c.run.bs in args.bs)]
    make_probes(configs, ProbeStore(store.root), data=args.data, train=train, device=args.device, deadline=deadline)


def _status(args, store) -> int:
    """``normkit status``: runs recorded per chapter, the training left, and the path checks."""
    from .runs import Checkpoints, default_checkpoints_dir
    from .sweep import estimate

    folder = args.checkpoints or default_checkpoints_dir()
    saved = Checkpoints(folder) if folder else None
    for g in _grids(args.chapter):
        configs = g.configs()
        missing = store.missing(configs)
        left = f"; to make: {estimate(missing, store)}" if missing else ""
        partial = [saved.progress(c) for c in missing] if saved else []
        if any(partial):
            done = sum(partial)
            left += (f"; {sum(map(bool, partial))} of them part-made in {saved.root} ({done} of their "
                     f"{sum(c.epochs for c, n in zip(missing, partial) if n)} epochs)")
        print(f"{g.name}: {len(configs) - len(missing)}/{len(configs)} runs recorded ({g.protocol.describe()}){left}")
        if g.name == "small_batch":
            from .probes import ProbeStore, probe_configs

            probes = probe_configs()
            left = ProbeStore(store.root).missing(probes)
            print(f"small_batch probes: {len(probes) - len(left)}/{len(probes)} probe records recorded")
    if not args.chapter or "all" in args.chapter:
        from .study import (PACK_CHECK_COMMAND, packed_store, path_check, path_check_command, path_check_six,
                            plain_store)

        for what, grid in (("fast-path check", path_check()), ("fast-path check, six seeds at bs 2", path_check_six())):
            configs = grid.configs()
            left = len(store.missing(configs)) + len(plain_store(store).missing(configs))
            print(f"{what}: {2 * len(configs) - left}/{2 * len(configs)} runs recorded (fast and plain paths)"
                  + (f"; to make: {path_check_command(grid)}" if left else ""))
        configs = path_check().configs()
        left = len(packed_store(store).missing(configs))
        print(f"packs check: {len(configs) - left}/{len(configs)} runs recorded in packs"
              + (f"; to make: {PACK_CHECK_COMMAND}" if left else ""))
    return 0


def _sweep(args, store) -> int:
    """``normkit sweep``: train the missing runs of the chosen grids (and the small-batch probes)."""
    from .study import grid_configs
    from .sweep import sweep

    if args.fast is False and (args.channels_last or args.fastai_adam or args.fastai_learner or args.compile
                               or args.pack > 1 or args.graph):
        raise ValueError("--channels-last, --fastai-adam, --fastai-learner, --compile, --pack and --graph apply to "
                         "the fast path, not with --plain")
    grids = _grids(args.chapter, args.net, args.norm, args.bs)
    configs = grid_configs(grids)
    deadline = time.monotonic() + args.time_limit if args.time_limit else None  # the probes' too
    report = sweep(configs, store=store, data=args.data, device=args.device, workers=args.workers, fast=args.fast,
                   channels_last=args.channels_last, fused_adam=not args.fastai_adam, compile=args.compile,
                   lean=not args.fastai_learner, pack=args.pack, graph=args.graph, time_limit=args.time_limit, mps=args.mps,
                   checkpoints=args.checkpoints, dry_run=args.dry_run)
    if {"small_batch", "all"} & set(args.chapter):
        _make_probes(args, store, train=not (args.dry_run or report.skipped or report.paused), deadline=deadline)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    import warnings

    # fastai's import calls torch.jit.script, which torch >= 2.9 marks deprecated: a line of
    # library noise before every command's own output, about nothing the user can change
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from .runs import ResultStore

    args = _parser().parse_args(argv)
    try:
        store = ResultStore(args.results)
        return _status(args, store) if args.cmd == "status" else _sweep(args, store)
    except (DataError, ValueError) as e:
        print(f"normkit: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        from .runs import default_checkpoints_dir

        saving = getattr(args, "checkpoints", None) or default_checkpoints_dir()
        kept = ", and runs in flight up to their last epoch" if saving else ""
        print(f"normkit: interrupted; finished runs are recorded{kept}: rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
