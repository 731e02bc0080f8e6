"""The study: which runs each chapter of the book needs, and making them.

>>> grid = chapter("batchnorm")         # 2 networks x 2 batch sizes x 2 lrs x 3 seeds
>>> make_runs(grid)                     # trains on a GPU or in smoke mode, else lists what is missing
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from .norms import Norm, get_norm
from .runs import Protocol, ResultStore, RunConfig, current_protocol

__all__ = ["Grid", "chapter", "CHAPTERS", "PROBE_RUNS", "probe_runs", "path_check", "path_check_six", "plain_store",
           "packed_store", "gpu_store", "make_path_check", "make_pack_check", "PATH_CHECK_COMMAND", "PACK_CHECK_COMMAND",
           "path_check_command", "make_runs", "smoke_data", "grid_configs", "study_configs", "study_data",
           "sweep_command"]

NETS = ("cnn", "resnet18")
BATCH_SIZES = (128, 2)
LEARNING_RATES = (1e-2, 1e-3)
SEEDS = (0, 1, 2)


def _norm(spec: str | Norm | tuple[str, dict[str, Any]]) -> Norm:
    if isinstance(spec, tuple):
        return get_norm(spec[0], **spec[1])
    return get_norm(spec)


@dataclass(frozen=True)
class Grid:
    """A set of runs: every combination of networks, norms, batch sizes, learning rates and seeds."""

    name: str
    norms: tuple[Norm, ...]
    nets: tuple[str, ...] = NETS
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    lrs: tuple[float, ...] = LEARNING_RATES
    seeds: tuple[int, ...] = SEEDS
    protocol: Protocol = field(default_factory=current_protocol)
    data: str | None = None  # data identity; None: the study's, see study_data()

    @classmethod
    def of(cls, name: str, norms: Sequence[str | Norm | tuple[str, dict[str, Any]]], **kw: Any) -> "Grid":
        return cls(name, tuple(_norm(n) for n in norms), **kw)

    def configs(self) -> list[RunConfig]:
        data = self.data or study_data(self.protocol)[1]
        return [
            RunConfig.make(net, norm, bs, lr, seed, data=data, protocol=self.protocol)
            for net in self.nets for norm in self.norms for bs in self.batch_sizes for lr in self.lrs for seed in self.seeds
        ]

    def subset(self, nets: Iterable[str] | None = None, norms: Iterable[str] | None = None,
               batch_sizes: Iterable[int] | None = None) -> "Grid":
        """The same grid restricted to some networks, norm names (or labels) and/or batch sizes."""
        import dataclasses

        g = self
        if nets is not None:
            nets = tuple(nets)
            bad = sorted(set(nets) - set(self.nets))
            if bad:
                raise ValueError(f"network(s) {', '.join(bad)} not in grid {self.name!r}; its networks: {', '.join(self.nets)}")
            g = dataclasses.replace(g, nets=nets)
        if norms is not None:
            wanted = set(norms)
            keep = tuple(n for n in self.norms if n.name in wanted or n.label in wanted)
            found = {n.name for n in keep} | {n.label for n in keep}
            bad = sorted(wanted - found)
            if bad:
                labels = ", ".join(n.label for n in self.norms)
                raise ValueError(f"norm(s) {', '.join(bad)} not in grid {self.name!r}; its norms: {labels}")
            g = dataclasses.replace(g, norms=keep)
        if batch_sizes is not None:
            batch_sizes = tuple(batch_sizes)
            bad = sorted(set(batch_sizes) - set(self.batch_sizes), key=str)
            if bad:
                raise ValueError(f"batch size(s) {', '.join(map(str, bad))} not in grid {self.name!r}; "
                                 f"its batch sizes: {', '.join(map(str, self.batch_sizes))}")
            g = dataclasses.replace(g, batch_sizes=tuple(b for b in self.batch_sizes if b in batch_sizes))
        return g

    def describe(self) -> str:
        """The grid in words, e.g. for a chapter's first cell."""
        def join(xs):
            return ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs)

        what = "chapter" if self.name in CHAPTERS else "grid"
        return (f"{what} {self.name!r}: {len(self)} runs = networks ({join(self.nets)}) x norms "
                f"({', '.join(n.label for n in self.norms)}) x batch sizes ({join(self.batch_sizes)}) x "
                f"learning rates ({join(self.lrs)}) x seeds ({join(self.seeds)}); {self.protocol.describe()}")

    def __len__(self) -> int:
        return len(self.nets) * len(self.norms) * len(self.batch_sizes) * len(self.lrs) * len(self.seeds)


#: The eps values of the small-batch chapter's sweep (PyTorch's default first).
EPS_SWEEP = (1e-5, 1e-3, 1e-2, 1e-1, 1.0)

#: The alternatives to BatchNorm, in the order the book presents them.
ALTERNATIVES = ("layernorm", "instancenorm", "groupnorm", "ws_groupnorm", "batchrenorm", "runningbatchnorm",
                "frn", "evonorm_b0", "evonorm_s0")


def _chapters() -> dict[str, Grid]:
    return {
        "baseline": Grid.of("baseline", ["none"]),
        "batchnorm": Grid.of("batchnorm", ["batchnorm"]),
        "small_batch": Grid.of("small_batch", [("batchnorm", {"eps": 0.1})]),
        "eps_sweep": Grid.of("eps_sweep", [("batchnorm", {"eps": e}) for e in EPS_SWEEP], batch_sizes=(2,)),
        "alternatives": Grid.of("alternatives", list(ALTERNATIVES)),
    }


#: The trained models the small-batch chapter probes (:mod:`normkit.probes`), on both networks,
#: seed 0: BatchNorm at batch size 2 with lr 0.001 and at batch size 128 with lr 0.01 (each
#: batch size with the learning rate at which BatchNorm is expected to train best there: the
#: large rate it was made for at 128, the small one at 2, where 0.01 risks diverging and a
#: diverged run leaves nothing to probe), and BatchNorm with eps = 0.1 at batch size 2, lr 0.001.
PROBE_RUNS: tuple[tuple[str | tuple[str, dict[str, Any]], int, float], ...] = (
    ("batchnorm", 2, 1e-3), ("batchnorm", 128, 1e-2), (("batchnorm", {"eps": 0.1}), 2, 1e-3))


def probe_runs(protocol: Protocol | None = None) -> list[RunConfig]:
    """The run configs of :data:`PROBE_RUNS` (the same configs as the chapters' seed-0 runs)."""
    protocol = protocol or current_protocol()
    data = study_data(protocol)[1]
    return [RunConfig.make(net, _norm(norm), bs, lr, 0, data=data, protocol=protocol)
            for net in NETS for norm, bs, lr in PROBE_RUNS]


def path_check(protocol: Protocol | None = None, data: str | None = None, *,
               batch_sizes: Sequence[int] = BATCH_SIZES, seeds: int = len(SEEDS)) -> Grid:
    """The runs that check the fast data path against plain fastai (``tests/benchmarks/sweep_bench.py
    --check-science``): the CNN with BatchNorm at lr 0.01, batch sizes 128 and 2, three seeds,
    the same configs as those cells of chapter ``batchnorm``. ``batch_sizes`` narrows it and
    ``seeds`` (a count: seeds 0 to ``seeds`` - 1) widens it, e.g. to resolve a noisy cell."""
    bad = [b for b in batch_sizes if b not in BATCH_SIZES]
    if bad or not batch_sizes:
        raise ValueError(f"batch_sizes {list(batch_sizes)!r}: valid are one or both of {', '.join(map(str, BATCH_SIZES))}")
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 2:
        raise ValueError(f"seeds must be a count of at least 2 (a spread needs two runs), got {seeds!r}")
    return Grid.of("path_check", ["batchnorm"], nets=("cnn",), lrs=(1e-2,), data=data,
                   batch_sizes=tuple(b for b in BATCH_SIZES if b in batch_sizes), seeds=tuple(range(seeds)),
                   protocol=protocol or current_protocol())


def path_check_six(protocol: Protocol | None = None, data: str | None = None) -> Grid:
    """The second fast-path check: :func:`path_check`'s batch-size-2 cell with six seeds (three
    give a rough spread, and that cell's was the widest). The book and ``normkit status`` show it."""
    return path_check(protocol, data, batch_sizes=[2], seeds=6)


def plain_store(store: ResultStore | None = None) -> ResultStore:
    """Where the plain-path runs of :func:`path_check` are recorded: ``plain/`` inside the results
    folder (the fast-path runs of the same configs are the study's own records)."""
    return ResultStore((store or ResultStore()).root / "plain")


def packed_store(store: ResultStore | None = None) -> ResultStore:
    """Where :func:`path_check`'s runs are recorded when trained in packs (``normkit sweep --pack``,
    :mod:`normkit.packed`): ``packed/`` inside the results folder, to be set against the same runs
    trained one by one on the fast path (the study's own records)."""
    return ResultStore((store or ResultStore()).root / "packed")


def gpu_store(store: ResultStore | None = None) -> ResultStore:
    """Where :func:`path_check` is recorded when made on a GPU: ``gpu/`` inside the results folder,
    both paths (the fast runs in ``gpu/<protocol>/``, the plain ones in ``gpu/plain/``), apart from
    the study's own records so that the CPU and the GPU checks never mix."""
    return ResultStore((store or ResultStore()).root / "gpu")


#: Grid name -> the notebook that shows it (a run shared by two grids is made and recorded once).
CHAPTERS: dict[str, str] = {
    "baseline": "nbs/01_baseline.ipynb",
    "batchnorm": "nbs/02_batchnorm.ipynb",
    "small_batch": "nbs/03_small_batch.ipynb",
    "eps_sweep": "nbs/03_small_batch.ipynb",
    "alternatives": "nbs/04_alternatives.ipynb",
}


def chapter(name: str) -> Grid:
    """The grid of runs behind chapter ``name`` (under the current protocol)."""
    grids = _chapters()
    if name not in grids:
        raise ValueError(f"unknown chapter {name!r}; valid chapters: {', '.join(grids)}")
    return grids[name]


def study_configs(protocol: Protocol | None = None, data: str | None = None) -> list[RunConfig]:
    """Every run of the study, each once: the chapters' grids together (a run in two grids once),
    under ``protocol`` (default the current one) and ``data`` (default the study's)."""
    import dataclasses

    return grid_configs(dataclasses.replace(g, protocol=protocol or g.protocol, data=data or g.data)
                        for g in _chapters().values())


def grid_configs(grids: Iterable[Grid]) -> list[RunConfig]:
    """The runs of ``grids``, in order, each once (a run in two grids is made and recorded once)."""
    return list(dict.fromkeys(c for g in grids for c in g.configs()))


def _repo() -> Path:
    return Path(__file__).resolve().parent.parent


def smoke_data() -> Path:
    """Data for smoke runs: ``NORMKIT_DATA``, else ``../shared/data/imagenette-mini`` beside the
    checkout, else a small generated folder in the cache."""
    from .data import cache_dir, cached_folder, imagenette_path, make_fake_imagenette

    if os.environ.get("NORMKIT_DATA"):
        return imagenette_path()
    shared = _repo().parent / "shared" / "data" / "imagenette-mini"
    if (shared / "train").is_dir():
        return imagenette_path(shared)
    spec = dict(n_train=60, n_valid=15, classes=("n01440764", "n02102040", "n02979186"))
    fake = cached_folder(cache_dir() / "data" / "fake-imagenette", f"make_fake_imagenette {spec}",
                         lambda folder: make_fake_imagenette(folder, **spec))
    return imagenette_path(fake)


def study_data(protocol: Protocol | None = None) -> tuple[Path | None, str]:
    """(data folder or None if not needed yet, data identity) for a protocol.

    The study (``v1``) runs on Imagenette's official split, whatever copy provides it, so
    its identity is known without the data. Smoke runs use :func:`smoke_data`.
    """
    protocol = protocol or current_protocol()
    if protocol.version == "smoke":
        from .data import data_info

        path = smoke_data()
        return path, data_info(path).identity
    return None, "imagenette"


def _narrowed(grid: Grid) -> list[tuple[str, str, list[str]]]:
    """How ``grid`` narrows the chapter of its name: ``[(flag, word, values), ...]``, the sweep's
    option (``net``, ``norm``, ``bs``) and its word in a sentence; empty for a whole chapter or a
    grid that is no chapter's."""
    full = _chapters().get(grid.name)
    if full is None:
        return []
    dims = [("net", "network", grid.nets, full.nets, str), ("norm", "norm", grid.norms, full.norms, lambda n: n.label),
            ("bs", "batch size", grid.batch_sizes, full.batch_sizes, str)]
    return [(flag, word, [name(v) for v in mine]) for flag, word, mine, theirs, name in dims if set(mine) != set(theirs)]


def sweep_command(grid: Grid) -> str:
    """The one shell command that makes ``grid``'s runs (on a GPU), with ``--net``/``--norm``/``--bs``
    for a subset of a chapter's grid."""
    return f"uv run normkit sweep --chapter {grid.name}" + "".join(
        f" --{flag} {shlex.quote(v)}" for flag, _, values in _narrowed(grid) for v in values)


def make_runs(grid: Grid, store: ResultStore | None = None, *, train: bool | None = None,
              brief: bool = False, plain: bool = False, pack: int = 1, command: str | None = None,
              label: str | None = None) -> list[RunConfig]:
    """Make the grid's missing runs where that is cheap, else say which are missing; return the missing.

    ``train=None`` trains in smoke mode or when a GPU is present, and only lists the
    missing runs on a CPU (the full study would take days there). ``brief`` says it in one line.
    ``plain``: train on fastai's plain data path, one run at a time. ``pack``: train packs of up
    to this many runs as one network (fast path, :mod:`normkit.packed`). ``command``: the shell
    command that makes the runs (default: :func:`sweep_command`). ``label`` starts each message
    (e.g. which path's runs they are).
    """
    import torch

    from .sweep import estimate, sweep

    store = store or ResultStore()
    configs = grid.configs()
    missing = store.missing(configs)
    if train is None:
        train = grid.protocol.version == "smoke" or torch.cuda.is_available()
    if missing and train:
        smoke = grid.protocol.version == "smoke"
        # The sweep's defaults on a GPU (data on the device, several workers); smoke runs use
        # the device data path in this process (the plain path is covered by the tests), and so
        # do packs, which need it.
        fast = None  # the sweep's default for the device
        if plain:
            fast = False
        elif smoke or pack > 1:
            fast = True
        sweep(missing, store=store, data=study_data(grid.protocol)[0], fast=fast, pack=pack,
              workers=1 if smoke or plain else None, num_workers=0 if smoke else None, log=None if smoke else print)
        missing = store.missing(configs)
    command = command or sweep_command(grid)
    narrowed = " and ".join(f"{word} {', '.join(values)}" for _, word, values in _narrowed(grid))
    what = f"{'chapter' if grid.name in CHAPTERS else 'grid'} {grid.name!r}" + (f" with {narrowed}" if narrowed else "")
    start = f"{label}: " if label else ""
    if missing and brief:
        print(f"{start}{len(missing)} of {len(configs)} runs not recorded yet; make them with: {command}")
    elif missing:
        print(f"{len(missing)} of {len(configs)} runs of {what} are not recorded yet "
              f"({grid.protocol.describe()}); the tables show them as missing.\n"
              f"Make them on a GPU ({estimate(missing, store)}) with:\n\n    {command}\n")
    else:
        print(f"{start}{'all' if label else 'All'} {len(configs)} runs of {what} are recorded ({grid.protocol.describe()}).")
    return missing


#: The command that makes (or completes) the plain-path runs of :func:`path_check` into this
#: checkout's ``results/plain/`` (add ``--device cpu --protocol v1`` on a machine without a GPU).
PATH_CHECK_COMMAND = "uv run python tests/benchmarks/sweep_bench.py --check-science --results results"


#: The command that makes the packed runs of :func:`path_check` into ``results/packed/`` (add
#: ``--device cpu --protocol v1`` on a machine without a GPU).
PACK_CHECK_COMMAND = "uv run python tests/benchmarks/sweep_bench.py --check-packs --results results"


def path_check_command(grid: Grid | None = None, results: str = "results") -> str:
    """:data:`PATH_CHECK_COMMAND` for ``grid`` (default :func:`path_check`), with the ``--bs`` and
    ``--seeds`` options that select a narrowed or widened check, recording into ``results``."""
    grid = grid or path_check()
    options = [f"--bs {b}" for b in grid.batch_sizes] if grid.batch_sizes != BATCH_SIZES else []
    if grid.seeds != SEEDS:
        options.append(f"--seeds {len(grid.seeds)}")
    return " ".join([PATH_CHECK_COMMAND.replace("--results results", f"--results {results}"), *options])


def make_pack_check(store: ResultStore | None = None, *, train: bool | None = None) -> list[RunConfig]:
    """:func:`path_check`'s runs trained in packs (one per batch size: its three seeds), into
    :func:`packed_store`, made where that is cheap (as :func:`make_runs`) or listed with
    :data:`PACK_CHECK_COMMAND`; return the configs still missing. The same runs trained one by
    one are the study's own records (:func:`make_path_check` makes them)."""
    grid = path_check()
    return make_runs(grid, packed_store(store), train=train, brief=True, pack=len(grid.seeds) * len(grid.lrs),
                     command=PACK_CHECK_COMMAND, label="packed")


def make_path_check(store: ResultStore | None = None, *, grid: Grid | None = None,
                    train: bool | None = None) -> list[RunConfig]:
    """The runs of ``grid`` (default :func:`path_check`) on both paths: the fast ones in ``store``
    (for the default grid they are the study's own), the plain ones in its ``plain/`` folder.
    Made where that is cheap (``train=None``: in smoke mode or on a GPU), else listed, one line
    per path, with :func:`path_check_command`; return the configs still missing on either path."""
    grid = grid or path_check()
    store = store or ResultStore()
    home, root = ResultStore().root.resolve(), store.root.resolve()  # home: the checkout's results/
    where = str(Path("results") / root.relative_to(home)) if root.is_relative_to(home) else str(root)
    command = path_check_command(grid, results=where)
    missing = make_runs(grid, store, train=train, brief=True, command=command, label="fast path")
    missing += make_runs(grid, plain_store(store), train=train, brief=True, plain=True, command=command,
                         label="plain path")
    return list(dict.fromkeys(missing))
