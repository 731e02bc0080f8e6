"""``normkit``: make and inspect the study's runs from the shell.

    normkit sweep --chapter batchnorm [--net cnn] [--norm batchnorm] [--data PATH] [--dry-run]
    normkit status [--chapter NAME]
"""

from __future__ import annotations

import argparse
import sys

from .data import DataError


def _parser() -> argparse.ArgumentParser:
    from .study import _chapters

    chapters = list(_chapters())
    p = argparse.ArgumentParser(prog="normkit", description="Make and inspect the runs behind the book.")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="train every run of a chapter that has no record yet")
    s.add_argument("--chapter", action="append", choices=chapters + ["all"], required=True,
                   help="chapter(s) whose grid to run; 'all' for the whole study")
    s.add_argument("--net", action="append", help="only these networks (cnn, resnet18)")
    s.add_argument("--norm", action="append", help="only these norms (name or label, e.g. 'batchnorm(eps=0.1)')")
    s.add_argument("--data", help="Imagenette folder or .tgz (default: $NORMKIT_DATA, else fastai's download)")
    s.add_argument("--results", help="results folder (default: the checkout's results/)")
    s.add_argument("--dry-run", action="store_true", help="list the missing runs, train nothing")
    st = sub.add_parser("status", help="how many runs of each chapter are recorded")
    st.add_argument("--chapter", action="append", choices=chapters + ["all"])
    st.add_argument("--results")
    return p


def _grids(names, nets=None, norms=None):
    from .study import _chapters, chapter

    names = list(_chapters()) if not names or "all" in names else names
    return [chapter(n).subset(nets=nets, norms=norms) if (nets or norms) else chapter(n) for n in names]


def main(argv: list[str] | None = None) -> int:
    from .runs import ResultStore, run_grid

    args = _parser().parse_args(argv)
    try:
        store = ResultStore(args.results)
        if args.cmd == "status":
            for g in _grids(args.chapter):
                configs = g.configs()
                missing = store.missing(configs)
                print(f"{g.name}: {len(configs) - len(missing)}/{len(configs)} runs recorded ({g.protocol.describe()})")
            return 0
        grids = _grids(args.chapter, args.net, args.norm)
        configs = list(dict.fromkeys(c for g in grids for c in g.configs()))
        missing = store.missing(configs)
        print(f"{len(configs) - len(missing)} of {len(configs)} runs recorded in {store.root}; {len(missing)} to make")
        if args.dry_run:
            for c in missing:
                print("  missing:", c.describe())
            return 0
        run_grid(missing, store, args.data)
        return 0
    except (DataError, ValueError) as e:
        print(f"normkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("normkit: interrupted; finished runs are recorded, rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
