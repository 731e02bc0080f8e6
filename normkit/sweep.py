"""Sweeps: train many runs on one machine, keeping its GPU busy.

>>> from normkit.sweep import sweep
>>> from normkit.study import chapter
>>> sweep(chapter("batchnorm").configs(), workers=8, time_limit=1200)

What :func:`sweep` does with the configs that have no record yet:

* **Resumed runs, then longest first.** Runs that resume from a checkpoint start first (their
  epochs are already paid for); then the rest, ordered by a cost model (:func:`run_cost`:
  training steps x a per-network, per-batch-size step cost, plus validation), so the long runs
  do not end up alone at the tail of the sweep while the other workers sit idle
  (:func:`sweep_order`).
* **Several runs at once.** ``workers > 1`` starts that many worker processes (torch
  multiprocessing, ``spawn``) that share the device. At batch size 2 one run leaves an H100
  mostly idle (its time goes to kernel launches and Python), so other runs fill the gaps.
  Processes on one GPU are time-sliced by default; with CUDA MPS (``mps=True``, where
  ``nvidia-cuda-mps-control`` exists) their kernels can run concurrently. MPS is opt-in:
  normkit starts a private daemon (its own pipe folder in the cache) and stops it at the end.
  On Linux the workers end with the sweep, however it is stopped (``kill``, ``kill -9``, a
  notebook kernel restarted), instead of training on unseen.
* **Each record the moment its run ends.** A worker writes its run's record itself
  (:meth:`ResultStore.put` is atomic), so a sweep stopped at any point loses only the runs
  in flight, and the same call again trains only what is missing. With ``checkpoints`` (a
  folder) a run in flight saves its state after each epoch and the next call resumes it from
  there, to the same numbers (:class:`normkit.runs.Checkpoints`): a stop costs at most an
  epoch of it. The time limit and the ETA count only the epochs it has left.
* **A time limit.** With ``time_limit`` (seconds) no run is started whose projected end
  (now + its cost x the measured seconds per cost unit) is past the limit; shorter runs that
  still fit are started instead, and the sweep returns cleanly when nothing more fits. The
  rate comes from earlier records made on the same device with the same data path and number
  of workers, by network and norm, scaled by how much slower or faster this call's runs went
  than those records said (a machine that reports the same CPU model may be several times
  slower), and from the runs finished so far; until one exists, each worker's first run
  starts regardless. Estimates can still be wrong, so with ``checkpoints`` a run in flight
  also pauses after an epoch when its next epoch would end past the limit
  (:class:`normkit.runs.RunPaused`): its checkpoint is kept, the report lists it in
  ``paused``, and the next call resumes it.
* **Packs** (``pack=N``, fast path only): up to N runs that differ only in their seed and
  learning rate are trained as one grouped network (:mod:`normkit.packed`), one kernel launch
  where they took N; each run still gets its own record, the numbers it gets alone (to float
  rounding). A run that resumes from a checkpoint is trained alone (a pack starts afresh).
* **Progress:** one line per finished run: runs done / left / running, and the ETA.

The data path: ``fast=True`` trains from :mod:`normkit.fastdata` (the decoded data set on the
device; the same distribution of results as the plain path, see there), the default on
CUDA; ``fast=False`` is the plain fastai pipeline, the default on a CPU. There the arithmetic
sets the pace and the two paths take about as long: a ResNet18 step at batch size 2, one
thread, took 220 ms on the plain path and 205 to 233 ms on the fast one (two repeats each)
(``tests/benchmarks/step_time.py --net resnet18 --size 128 --norm groupnorm --data PATH``,
recorded in ``results/benchmarks/``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping

from .runs import PROTOCOLS, Protocol, ResultStore, RunConfig, RunPaused, how_made, path_kind, run_seconds

__all__ = ["sweep", "SweepReport", "run_cost", "train_steps", "estimate", "recorded_rates", "order_longest_first",
           "sweep_order", "make_units", "default_workers", "mps_available", "NET_STEP_COST", "BS_KNEE", "CPU_BS_KNEE"]

#: Relative cost of one training step of each network at a small batch size (launch-bound).
NET_STEP_COST = {"cnn": 1.0, "resnet18": 4.0}
#: Batch size at which a step costs twice its small-batch cost (the arithmetic starts to count).
BS_KNEE = 32
#: The same on a CPU, where a step's arithmetic counts from the first image: a v1 CNN run took
#: ~310 s at batch size 2 and ~210 s at 128 on 2 cores (the cost model says 0.66 with this knee).
CPU_BS_KNEE = 1
#: Cost of validating one image, relative to a small-batch training step (per network).
VALID_IMAGE_COST = 0.02


def train_steps(config: RunConfig, n_train: int) -> int:
    """Optimizer steps of a run on ``n_train`` training images (its protocol's caps applied)."""
    proto = config.protocol_obj
    steps = min(n_train, proto.max_train or n_train) // config.bs
    if proto.max_steps:
        steps = min(steps, proto.max_steps)
    return config.epochs * steps


def run_cost(config: RunConfig, n_train: int, n_valid: int, bs_knee: float = BS_KNEE,
             done_epochs: int = 0) -> float:
    """A run's cost in arbitrary units: ``epochs x (steps x step cost + validation)``, where a
    step costs ``net cost x (1 + bs / bs_knee)``.

    ``n_train``/``n_valid``: the data's image counts (the protocol's subsets are applied here).
    ``bs_knee``: :data:`BS_KNEE` on a GPU, :data:`CPU_BS_KNEE` on a CPU.
    ``done_epochs``: epochs already made (a run resumed from its checkpoint); only the rest is counted.
    """
    if not 0 <= done_epochs <= config.epochs:
        raise ValueError(f"done_epochs={done_epochs!r}: must be between 0 and the run's {config.epochs} epochs")
    n_valid = min(n_valid, config.protocol_obj.max_valid or n_valid)
    net = NET_STEP_COST.get(config.net, 2.0)
    full = (train_steps(config, n_train) * net * (1 + config.bs / bs_knee)
            + config.epochs * n_valid * net * VALID_IMAGE_COST)
    return full * (1 - done_epochs / config.epochs)


def order_longest_first(configs: Iterable[RunConfig], n_train: int, n_valid: int, bs_knee: float = BS_KNEE,
                        done_epochs: Mapping[str, int] | None = None) -> list[RunConfig]:
    """``configs`` sorted by decreasing :func:`run_cost` of what is left of each (ties keep their order).

    ``done_epochs``: run key -> epochs already made, for runs that resume from a checkpoint.
    """
    done = done_epochs or {}
    return sorted(configs, key=lambda c: -run_cost(c, n_train, n_valid, bs_knee, done.get(c.key, 0)))


def sweep_order(configs: Iterable[RunConfig], n_train: int, n_valid: int, bs_knee: float = BS_KNEE,
                done_epochs: Mapping[str, int] | None = None) -> list[RunConfig]:
    """The order a sweep starts ``configs`` in: the runs that resume from a checkpoint (keys in
    ``done_epochs``), then the others, each group longest first (:func:`order_longest_first`).

    A resumed run's first epochs are paid for, and it is the shortest way to a new record. Ordered
    only by what is left of it, it would wait behind every fresh run, so sweeps cut short again and
    again (a time limit that fits one run, a Colab session) would keep starting fresh runs and leave
    ever more half-made ones behind.
    """
    done = done_epochs or {}
    ordered = order_longest_first(configs, n_train, n_valid, bs_knee, done)
    return [c for c in ordered if c.key in done] + [c for c in ordered if c.key not in done]


def default_workers(device) -> int:
    """1 on a CPU; on CUDA half the CPU cores, at most 8 (to be tuned with tests/benchmarks/sweep_bench.py)."""
    import torch

    if torch.device(device).type != "cuda":
        return 1
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def mps_available() -> bool:
    """Whether CUDA MPS's control program is installed."""
    return shutil.which("nvidia-cuda-mps-control") is not None


@contextmanager
def _mps_daemon(log: Callable[[str], None]):
    """Run a private CUDA MPS daemon while the block runs (worker processes inherit its pipe folder)."""
    from .data import cache_dir

    exe = shutil.which("nvidia-cuda-mps-control")
    if exe is None:
        raise ValueError("CUDA MPS was asked for but nvidia-cuda-mps-control is not installed; run without --mps")
    base = cache_dir() / "mps" / str(os.getpid())
    dirs = {"CUDA_MPS_PIPE_DIRECTORY": base / "pipe", "CUDA_MPS_LOG_DIRECTORY": base / "log"}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **{k: str(v) for k, v in dirs.items()}}
    res = subprocess.run([exe, "-d"], env=env, capture_output=True, text=True, timeout=60)
    if res.returncode != 0:
        raise ValueError(f"could not start CUDA MPS: {(res.stderr or res.stdout).strip() or res.returncode}")
    old = {k: os.environ.get(k) for k in dirs}
    os.environ.update({k: str(v) for k, v in dirs.items()})
    log(f"CUDA MPS daemon started (pipe {dirs['CUDA_MPS_PIPE_DIRECTORY']})")
    try:
        yield
    finally:
        subprocess.run([exe], input="quit\n", env=env, capture_output=True, text=True, timeout=60)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class SweepReport:
    """What a sweep did."""

    recorded: int = 0          # runs that already had a record
    trained: list[str] = field(default_factory=list)    # keys of the runs trained now
    failed: dict[str, str] = field(default_factory=dict)  # key -> error
    skipped: list[str] = field(default_factory=list)    # keys not started because of the time limit
    paused: dict[str, int] = field(default_factory=dict)  # key -> epochs done: stopped at the time limit, resumable
    wall_s: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


# ---------------------------------------------------------------------------------------
# Worker side


def _die_with_parent(parent: int) -> None:
    """Have this process end when process ``parent`` (the one that started it) ends.

    A sweep killed by a signal it cannot catch (``kill -9``, a notebook kernel restarted) or by a
    plain ``kill`` (SIGTERM ends a Python process without running its ``finally`` blocks) would
    otherwise leave its workers training on, unseen, each taking a core and writing records. On
    Linux the kernel sends this process SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``);
    if the parent has already gone, it exits now. Elsewhere (or where the request fails) the
    workers outlive a killed sweep."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request: nobody will signal us
        os._exit(1)


def _worker_init(protocols: dict[str, dict], threads: int, parent: int | None = None) -> None:
    if parent is not None:
        _die_with_parent(parent)
    import multiprocessing
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    # A spawned worker inherits "spawn" as its default start method, so a plain run's fastai
    # DataLoader workers would be spawned too, which pickles the DataLoaders and fails once they
    # hold CUDA tensors ("Cannot pickle CUDA storage", seen on an H200). Fork them, as fastai does
    # in a single process: they only decode and augment on the CPU.
    if "fork" in multiprocessing.get_all_start_methods():
        multiprocessing.set_start_method("fork", force=True)
    for version, p in protocols.items():
        PROTOCOLS.setdefault(version, Protocol(**p))
    torch.set_num_threads(threads)


def _run_one(config_ds: list[dict], data_path: str, device: str, fast_d: dict | None, store_root: str,
             data_meta: dict, num_workers: int | None, extra_settings: dict,
             checkpoints: str | None = None, deadline: float | None = None) -> list[dict[str, Any]]:
    """Train one run (or a pack of runs, see :mod:`normkit.packed`) and write the records; a
    summary of each for the parent (``segment_s``: the wall seconds of this call, which for a run
    resumed from a checkpoint is less than its ``wall_time_s``). A single run saves and resumes
    checkpoints in ``checkpoints`` (:class:`normkit.runs.Checkpoints`); its checkpoint is removed
    once its record is written. With checkpoints and a ``deadline`` (``time.time()``), a single
    run raises :class:`normkit.runs.RunPaused` where its next epoch would end past it."""
    from .fastdata import FastPath
    from .runs import Checkpoints, train

    configs = [RunConfig.from_dict(d) for d in config_ds]
    fast = FastPath(**fast_d) if fast_d is not None else None
    if len(configs) == 1:
        records = [train(configs[0], data_path, device=device, num_workers=num_workers, data_meta=data_meta, fast=fast,
                         checkpoints=checkpoints, deadline=deadline if checkpoints is not None else None)]
    else:
        from .packed import train_pack

        records = train_pack(configs, data_path, device=device, fast=fast, data_meta=data_meta)
    out = []
    for config, record in zip(configs, records):
        record["settings"].update(extra_settings)
        ResultStore(store_root).put(record)
        if checkpoints is not None:
            Checkpoints(checkpoints).remove(config)
        earlier = sum(seg["wall_time_s"] for seg in record["settings"].get("resumed", []))
        acc = record["final"]["accuracy"] if record["final"] else None
        out.append({"key": record["key"], "status": record["status"], "accuracy": acc,
                    "wall_time_s": record["wall_time_s"], "segment_s": round(record["wall_time_s"] - earlier, 2),
                    "pid": os.getpid()})
    return out


def make_units(configs: list[RunConfig], pack: int, *, mix_lr: bool = True,
               alone: Iterable[str] = ()) -> list[tuple[RunConfig, ...]]:
    """``configs`` (in order) as the sweep's units of work: packs of up to ``pack`` runs that differ
    only in their seed and (if ``mix_lr``, as the fast path's AdamW allows) learning rate (see
    :func:`normkit.packed.pack_key`), each at its first run's place, or single runs (``pack=1``).
    A unit's runs take one worker, one model and one optimizer. The runs whose keys are in ``alone``
    (those that resume from a checkpoint: a pack starts its runs afresh) are single runs."""
    from .packed import pack_key

    alone = set(alone)
    if pack <= 1:
        return [(c,) for c in configs]
    groups: dict[tuple, list[list[RunConfig]]] = {}
    order: list[list[RunConfig]] = []
    for c in configs:
        if c.key in alone:
            order.append([c])
            continue
        chunks = groups.setdefault(pack_key(c, lr=not mix_lr), [])
        if not chunks or len(chunks[-1]) >= pack:
            chunks.append([])
            order.append(chunks[-1])
        chunks[-1].append(c)
    return [tuple(u) for u in order]


def _packable(configs: Iterable[RunConfig]) -> dict[tuple[str, Any], bool]:
    """Whether each (network, norm) of ``configs`` can be packed (every built-in norm can)."""
    from .models import build_model
    from .packed import can_pack

    return {k: can_pack(build_model(*k)) for k in dict.fromkeys((c.net, c.norm_obj) for c in configs)}


# ---------------------------------------------------------------------------------------
# Parent side


class _Planner:
    """Which run to start next, given a deadline, the pace of earlier records and the pace of this call.

    A run is projected at a pace in seconds per cost unit. The cost model does not know that some
    normalisations are slower than others (on an H200 a RunningBatchNorm ResNet18 run took 2.5 times
    a BatchNorm one), so with ``group`` (a run -> its group, e.g. network and norm) the pace is, first
    found first:

    1. its group's pace in this call, once a run of that group has finished (or paused) here;
    2. its group's pace in the earlier records (``by_group``), else theirs overall (``prior``), times
       :attr:`factor`, how much slower (or faster) this call's runs went than those records said (a machine with
       the same name as the one that made them can be several times slower: other cores, other load);
    3. this call's pace overall.
    """

    def __init__(self, todo: list[RunConfig], cost: Callable[[RunConfig], float], deadline: float | None,
                 prior: tuple[float, float] = (0.0, 0.0), group: Callable[[RunConfig], Any] | None = None,
                 by_group: dict[Any, tuple[float, float]] | None = None):
        self.pending = list(todo)  # in the order to start them (sweep_order)
        self.cost = cost
        self.deadline = deadline
        self.prior = prior  # wall seconds and cost units of the earlier records
        self.prior_by_group = dict(by_group or {})
        self.group = group or (lambda c: None)
        self.seconds = self.units = 0.0  # of the runs finished in this call
        self.by_group: dict[Any, tuple[float, float]] = {}
        self.took = self.foreseen = 0.0  # seconds of this call's runs that the records foresaw, and their foresight

    @staticmethod
    def _pace(seconds_units: tuple[float, float]) -> float | None:
        seconds, units = seconds_units
        return seconds / units if units > 0 else None

    @property
    def factor(self) -> float:
        """This call's seconds over the records' projection of them, for its finished runs whose group
        (or, without groups, any run) the records knew; 1 before there is one."""
        return self.took / self.foreseen if self.foreseen > 0 else 1.0

    def _recorded_pace(self, config: RunConfig) -> float | None:
        return self._pace(self.prior_by_group.get(self.group(config), (0.0, 0.0))) or self._pace(self.prior)

    def _scaled(self, recorded: float | None) -> float | None:
        """A recorded pace times :attr:`factor`, else this call's pace overall (None: unknown)."""
        return recorded * self.factor if recorded is not None else self._pace((self.seconds, self.units))

    @property
    def rate(self) -> float | None:
        """Seconds per cost unit overall: the records' times :attr:`factor`, else this call's (None: unknown)."""
        return self._scaled(self._pace(self.prior))

    def rate_for(self, config: RunConfig) -> float | None:
        """Seconds per cost unit projected for ``config`` (see the class docstring); None if unknown."""
        own = self._pace(self.by_group.get(self.group(config), (0.0, 0.0)))
        return own if own is not None else self._scaled(self._recorded_pace(config))

    def projected(self, configs: Iterable[RunConfig]) -> float | None:
        """Seconds that ``configs`` take one after another at their projected paces (None if one is unknown)."""
        total = 0.0
        for c in configs:
            rate = self.rate_for(c)
            if rate is None:
                return None
            total += self.cost(c) * rate
        return total

    def finished(self, config: RunConfig, wall_s: float, share: float = 1.0) -> None:
        """``config`` ran ``share`` of its cost (all of it, or the epochs before it paused) in ``wall_s``."""
        units = self.cost(config) * share
        key = self.group(config)
        if key in self.prior_by_group or (not self.prior_by_group and self._pace(self.prior) is not None):
            # only runs the records knew: a group they did not know was projected at their overall pace
            self.took += wall_s
            self.foreseen += units * self._recorded_pace(config)
        self.seconds += wall_s
        self.units += units
        seconds, done = self.by_group.get(key, (0.0, 0.0))
        self.by_group[key] = (seconds + wall_s, done + units)

    def next(self, now: float, running: int) -> RunConfig | None:
        """The first pending run that fits before the deadline (or None); removes it from pending."""
        for i, c in enumerate(self.pending):
            if self.deadline is not None:
                if self.rate is None:
                    if running > 0:
                        return None  # no estimate yet: wait for the first run to end
                elif now + self.cost(c) * self.rate_for(c) > self.deadline:
                    continue
            return self.pending.pop(i)
        return None


def _device_desc(device) -> str:
    """The start of the ``device`` field of records made on ``device``, without creating a CUDA
    context in this process (the workers' contexts may have to be MPS clients)."""
    from .runs import device_name

    if device.type != "cuda":
        return device_name(device)
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", str(device.index or 0)],
                             capture_output=True, text=True, timeout=20)
        name = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        name = ""
    return f"cuda: {name}"


def _timed_runs(store: ResultStore, protocols: Iterable[str]) -> Iterator[tuple[tuple[str, str, int], RunConfig, float]]:
    """((device, data path, workers), config, wall seconds) of each successful run recorded in ``store``."""
    import json

    for proto in sorted(set(protocols)):
        folder = store.root / proto
        if not folder.is_dir():
            continue
        for f in folder.glob("*.json"):
            try:
                r = json.loads(f.read_text())
                if r.get("status") != "ok":
                    continue
                yield how_made(r), RunConfig.from_dict(r["config"]), run_seconds(r)  # a packed run: its share of the pack
            except Exception:  # noqa: BLE001 - a record that cannot be read says nothing about speed
                continue


def recorded_rates(store: ResultStore, protocols: Iterable[str],
                   cost: Callable[[RunConfig], float]) -> dict[tuple[str, str, int], tuple[float, float, int]]:
    """Wall seconds, cost units and number of the successful runs recorded in ``store``, by
    (device, data path, workers): what the sweep's time estimates are made from. A packed run
    counts for its share of its pack's time."""
    return _rates(_timed_runs(store, protocols), cost)


def _rates(timed, cost: Callable[[RunConfig], float]) -> dict[tuple[str, str, int], tuple[float, float, int]]:
    rates: dict[tuple[str, str, int], tuple[float, float, int]] = {}
    for how, config, wall in timed:
        seconds, units, n = rates.get(how, (0.0, 0.0, 0))
        rates[how] = (seconds + wall, units + cost(config), n + 1)
    return rates


def _group(config: RunConfig) -> tuple[str, str]:
    """What a run's pace depends on beyond the cost model: its network and normalisation."""
    return config.net, config.norm_obj.label


def _prior(store: ResultStore, configs: list[RunConfig], device_desc: str, data_path_kind: str, workers: int,
           cost: Callable[[RunConfig], float], timed=None) -> tuple[tuple[float, float], dict[Any, tuple[float, float]]]:
    """(seconds, cost units) of earlier records made the same way, to estimate run times: in all,
    and by :func:`_group`. ``timed``: :func:`_timed_runs` already read (else read here)."""
    seconds = units = 0.0
    by_group: dict[Any, tuple[float, float]] = {}
    timed = _timed_runs(store, {c.protocol for c in configs}) if timed is None else timed
    for (device, kind, w), config, wall in timed:
        if device.startswith(device_desc) and kind == data_path_kind and w == workers:
            seconds, units = seconds + wall, units + cost(config)
            gs, gu = by_group.get(_group(config), (0.0, 0.0))
            by_group[_group(config)] = (gs + wall, gu + cost(config))
    return (seconds, units), by_group


def estimate(configs: Iterable[RunConfig], store: ResultStore | None = None) -> str:
    """How long ``configs`` take, in words: their training steps, and the GPU time projected
    from the records already made on a CUDA device (the way most runs were made there)."""
    from .data import IMAGENETTE_SPLIT

    configs = list(configs)
    n_train, n_valid = IMAGENETTE_SPLIT

    def cost(c: RunConfig) -> float:
        return run_cost(c, n_train, n_valid)

    text = f"{sum(train_steps(c, n_train) for c in configs):,} training steps"
    store = store or ResultStore()
    timed = list(_timed_runs(store, {c.protocol for c in configs}))  # the records, read once
    gpu = {k: v for k, v in _rates(timed, cost).items() if k[0].startswith("cuda")}
    if gpu:
        how, (seconds, units, n) = max(gpu.items(), key=lambda kv: kv[1][2])
        device, kind, workers = how
        _, by_group = _prior(store, configs, device, kind, workers, cost, timed)
        planner = _Planner([], cost, None, (seconds, units), group=_group, by_group=by_group)
        minutes = sum(cost(c) * planner.rate_for(c) for c in configs) / workers / 60
        path_desc, _, packs = kind.partition(", ")  # e.g. "fast, packs of 3"
        how_desc = f"{path_desc} data path{', ' + packs if packs else ''}, {workers} worker{'s' if workers > 1 else ''}"
        took = f"about {minutes:,.0f} min" if minutes >= 0.5 else "under a minute"  # never "about 0 min"
        text += (f", {took} on {device.removeprefix('cuda: ')} at the pace of its {n} recorded "
                 f"run{'s' if n > 1 else ''} ({how_desc})")
        seen = {c.bs for h, c, _ in timed if h == how}
        unseen = sorted({c.bs for c in configs} - seen, reverse=True)
        if unseen:
            text += (f"; none of those at batch size {', '.join(map(str, unseen))}, so for "
                     f"{'it' if len(unseen) == 1 else 'them'} this extrapolates the cost model")
    return text


def sweep(configs: Iterable[RunConfig], *, store: ResultStore | None = None, data: str | os.PathLike | None = None,
          device=None, workers: int | None = None, fast: bool | None = None, channels_last: bool = False,
          fused_adam: bool = True, compile: str | None = None, lean: bool = True, pack: int = 1,
          graph: bool = False, time_limit: float | None = None, mps: bool = False, num_workers: int | None = None,
          checkpoints: str | os.PathLike | None = None, dry_run: bool = False,
          log: Callable[[str], None] | None = print) -> SweepReport:
    """Train every config without a record, resumed runs first, then longest first, ``workers`` at a time;
    see the module docstring.

    ``data``: folder or .tgz (see :func:`normkit.data.imagenette_path`), whose identity must
    match the configs'. ``device``: default CUDA when available. ``fast``: the device data path
    (default: on CUDA). ``channels_last``, ``fused_adam``, ``compile``, ``lean``: the fast path's speed
    settings (:class:`normkit.fastdata.FastPath`). ``pack``: train up to this many runs that
    differ only in their seed and learning rate as one network (fast path; :mod:`normkit.packed`). ``graph``:
    replay each network's forward and backward from CUDA graphs (fast path on CUDA; :mod:`normkit.graphs`).
    ``num_workers``: the plain path's data-loading processes per run. ``checkpoints``: a folder
    where each run (not in a pack) saves its state after every epoch, and from which an unfinished
    run resumes (:class:`normkit.runs.Checkpoints`): a sweep stopped part-way then loses at most an
    epoch of each run in flight, not the runs. Default: ``$NORMKIT_CHECKPOINTS`` if set (so that a
    chapter's notebook, which sweeps its missing runs on a GPU, resumes them too), else none.
    """
    from .data import IMAGENETTE_SPLIT, open_data

    t0 = time.time()
    log = log or (lambda s: None)
    configs = list(dict.fromkeys(configs))
    store = store or ResultStore()
    device, workers, fast = _checked(device, workers, fast, pack=pack, time_limit=time_limit, channels_last=channels_last,
                                     compile=compile, graph=graph, mps=mps)
    todo = store.missing(configs)
    report = SweepReport(recorded=len(configs) - len(todo))
    from .fastdata import FastPath

    fast_path = FastPath(fused_adam=fused_adam, channels_last=channels_last, compile=compile, lean=lean,
                         graph=graph) if fast else None
    settings = {"device": str(device), "workers": workers, "data_path": "fast" if fast else "plain",
                "mps": bool(mps), "pack": pack, **({"fast": fast_path.to_dict()} if fast_path else {})}
    report.settings = settings
    if not todo:
        log(f"all {len(configs)} runs recorded in {store.root}; nothing to train")
        return report
    if dry_run and data is None and {c.data for c in todo} == {"imagenette"}:
        path, info = None, None  # no need for the data (nor its download) to list the runs
        n_train, n_valid = IMAGENETTE_SPLIT
    else:
        path, info = open_data(data, {c.data for c in todo})
        n_train, n_valid = info.n_train, info.n_valid

    knee = BS_KNEE if device.type == "cuda" else CPU_BS_KNEE
    from .runs import Checkpoints, default_checkpoints_dir

    checkpoints = checkpoints if checkpoints is not None else default_checkpoints_dir()
    saved = Checkpoints(checkpoints) if checkpoints is not None else None
    done_epochs = {c.key: n for c in todo if saved and (n := saved.progress(c))}

    def cost(c: RunConfig) -> float:  # what is left of a run: all of it, or the epochs after its checkpoint
        return run_cost(c, n_train, n_valid, knee, done_epochs.get(c.key, 0))

    todo = sweep_order(todo, n_train, n_valid, knee, done_epochs)
    units = make_units(todo, pack, mix_lr=fused_adam, alone=done_epochs)
    if pack > 1:
        ok = _packable(todo)
        units = [v for u in units for v in ([u] if len(u) == 1 or ok[(u[0].net, u[0].norm_obj)] else [(c,) for c in u])]
        for net, norm in sorted((k for k, v in ok.items() if not v), key=str):
            log(f"{net} {norm.label}: a layer cannot be packed, so its runs are trained one by one")
    kind = path_kind("fast" if fast else "plain", pack, graph)
    how = (f"{workers} worker{'s' if workers > 1 else ''} on {device}, {'fast' if fast else 'plain'} data path"
           + (f", packs of up to {pack} runs ({len(units)} units)" if pack > 1 else "")
           + (", CUDA graphs" if graph else "") + (", CUDA MPS" if mps else "") + (f", time limit {time_limit:g}s" if time_limit else ""))
    log(f"{report.recorded} of {len(configs)} runs recorded in {store.root}; {len(todo)} to train ({how})")
    if done_epochs:
        log(f"{len(done_epochs)} of them resume from a checkpoint in {saved.root}: "
            + ", ".join(f"{c.describe()} after {done_epochs[c.key]} of {c.epochs} epochs" for c in todo if c.key in done_epochs))
    if saved and pack > 1 and any(len(u) > 1 for u in units):
        log("runs trained in packs save no checkpoints (only single runs do)")
    if time_limit and not saved:
        log("no checkpoints: a run is started on an estimate of its time, and if it takes longer it ends past "
            "the time limit (with checkpoints it pauses after an epoch instead: --checkpoints DIR)")
    if dry_run:
        for u in units:
            for c in u:
                log(f"  missing: {c.describe()}  (cost {cost(c):,.0f})" + (f"  [a pack of {len(u)}]" if len(u) > 1 else ""))
        report.skipped = [c.key for c in todo]
        return report
    meta = info.meta

    extra = {"workers": workers, "mps": bool(mps)}
    prior, by_group = _prior(store, configs, _device_desc(device), kind, workers, cost)

    def unit_cost(u: tuple[RunConfig, ...]) -> float:
        return sum(cost(c) for c in u)

    planner = _Planner(units, unit_cost, t0 + time_limit if time_limit else None, prior,
                       group=lambda u: _group(u[0]), by_group=by_group)
    if fast:  # decode once here, so that the workers load the cached tensors
        from .fastdata import decode

        for size, mt, mv in sorted({(c.size, c.protocol_obj.max_train, c.protocol_obj.max_valid) for c in todo},
                                   key=str):
            decode(path, size, max_train=mt, max_valid=mv, log=log)
    if num_workers is None and not fast:
        num_workers = max(0, min(8, (os.cpu_count() or 1) // workers - 1)) if workers > 1 else None
    total = len(todo)
    fast_d = fast_path.to_dict() if fast_path else None

    def progress(u: tuple[RunConfig, ...], results: list[dict[str, Any]] | None, err: str | None, running: int) -> None:
        rest = planner.projected([*planner.pending, *in_flight.values()])
        eta = f"; ETA {rest / workers / 60:.1f} min" if rest is not None else ""
        done = len(report.trained) + len(report.failed) - (0 if isinstance(err, RunPaused) else len(u))
        for i, c in enumerate(u):
            done += not isinstance(err, RunPaused)
            if isinstance(err, RunPaused):
                what = (f"paused after {err.done} of {err.epochs} epochs, its next one would end past the time "
                        f"limit (checkpoint kept: the same command resumes it)")
            elif err:
                what = f"FAILED: {err}"
            else:
                res = results[i]
                what = (("DIVERGED" if res["status"] == "diverged" else f"acc {res['accuracy']:.3f}")
                        + f" in {res['wall_time_s']:.0f}s" + (f" (a pack of {len(u)})" if len(u) > 1 else ""))
            log(f"[{done}/{total} done, {total - done} left, {running} running] {c.describe()}: {what}"
                + (eta if i == len(u) - 1 else ""))

    in_flight: dict[Any, tuple[RunConfig, ...]] = {}
    ckpt = str(saved.root) if saved else None
    deadline = t0 + time_limit if time_limit and saved else None

    ctx = _mps_daemon(log) if mps else _nullcontext()
    try:
        with ctx:
            if workers == 1:
                while True:
                    u = planner.next(time.time(), 0)
                    if u is None:
                        break
                    res, err = _outcome(lambda: _run_one([c.to_dict() for c in u], str(path), str(device), fast_d,
                                                         str(store.root), meta, num_workers, extra, ckpt, deadline))
                    _account(report, planner, u, res, err)
                    progress(u, res, err, 0)
            else:
                _pool_loop(report, planner, in_flight, progress, workers, units, path, device, fast_d, store, meta,
                           num_workers, extra, ckpt, deadline)
    finally:
        report.skipped = [c.key for u in planner.pending for c in u]
        report.wall_s = time.time() - t0
    log(_closing_line(report, time_limit))
    return report


def _checked(device, workers: int | None, fast: bool | None, *, pack: int, time_limit: float | None,
             channels_last: bool, compile: str | None, graph: bool, mps: bool):
    """:func:`sweep`'s ``(torch.device, workers, fast)`` with their defaults filled in; a
    ValueError naming the first bad option."""
    import torch

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but CUDA is not available here")
    workers = default_workers(device) if workers is None else workers
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers={workers!r} is invalid; it must be a positive integer")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit={time_limit!r} is invalid; it must be a positive number of seconds")
    fast = device.type == "cuda" if fast is None else fast
    if not isinstance(pack, int) or isinstance(pack, bool) or pack < 1:
        raise ValueError(f"pack={pack!r} is invalid; it must be a positive integer (1: no packing)")
    if (channels_last or compile or pack > 1 or graph) and not fast:
        raise ValueError("channels_last, compile, pack and graph apply to the fast data path only")
    if graph and device.type != "cuda":
        raise ValueError(f"graph=True needs a CUDA device (CUDA graphs); got device {device}")
    if mps and device.type != "cuda":
        raise ValueError(f"mps=True needs a CUDA device (CUDA MPS); got device {device}")
    return device, workers, fast


def _closing_line(report: SweepReport, time_limit: float | None) -> str:
    """What a sweep did, and what is left to a rerun."""
    msg = f"trained {len(report.trained)} run(s) in {report.wall_s / 60:.1f} min"
    if report.failed:
        msg += f"; {len(report.failed)} FAILED (see above)"
    if report.paused:
        msg += f"; {len(report.paused)} paused at the time limit, kept in their checkpoints"
    if report.skipped or report.paused:
        why = " within the time limit" if time_limit and not report.failed else ""
        msg += (f"; {len(report.skipped)} not started{why}" if report.skipped else "") + ": run the same command again to continue"
    return msg


@contextmanager
def _nullcontext():
    yield


def _outcome(call: Callable[[], list[dict]]) -> tuple[list[dict] | None, str | RunPaused | None]:
    """(results, None) of ``call()``; (None, the RunPaused) if its run paused; else (None, a one-line error)."""
    try:
        return call(), None
    except RunPaused as e:
        return None, e
    except Exception as e:  # noqa: BLE001 - report it and go on with the others
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _account(report: SweepReport, planner: _Planner, u: tuple[RunConfig, ...], results: list[dict] | None,
             err: str | RunPaused | None) -> None:
    if isinstance(err, RunPaused):  # its pace counts: the epochs it ran of those it had left
        report.paused[err.key] = err.done
        planner.finished(u, err.wall_s, err.ran / (err.epochs - err.done + err.ran))
    elif err:
        report.failed.update({c.key: err for c in u})
    else:
        report.trained.extend(c.key for c in u)
        res = results[0]  # a pack's runs share its wall time; a resumed run's earlier parts are not in its cost
        planner.finished(u, res.get("segment_s", res["wall_time_s"]))


def _pool_loop(report, planner, in_flight, progress, workers, todo, path, device, fast_d, store, meta, num_workers,
               extra, checkpoints=None, deadline=None) -> None:
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    import torch.multiprocessing as tmp

    protocols = {c.protocol: asdict(c.protocol_obj) for u in todo for c in u}
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(workers, mp_context=tmp.get_context("spawn"), initializer=_worker_init,
                               initargs=(protocols, threads, os.getpid()))
    clean = False
    try:
        while True:
            while len(in_flight) < workers:
                u = planner.next(time.time(), len(in_flight))
                if u is None:
                    break
                fut = pool.submit(_run_one, [c.to_dict() for c in u], str(path), str(device), fast_d, str(store.root),
                                  meta, num_workers, extra, checkpoints, deadline)
                in_flight[fut] = u
            if not in_flight:
                break
            finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for fut in finished:
                u = in_flight.pop(fut)
                if isinstance(fut.exception(), BrokenProcessPool):
                    in_flight[fut] = u
                    raise fut.exception()
                res, err = _outcome(fut.result)
                _account(report, planner, u, res, err)
                progress(u, res, err, len(in_flight))
        clean = True
    except BrokenProcessPool:
        for u in in_flight.values():
            report.failed.update({c.key: "a worker process died (out of memory?)" for c in u})
        print("normkit: a worker process died; finished runs are recorded, rerun to resume", file=sys.stderr)
        in_flight.clear()
        clean = True
    finally:
        if not clean:  # interrupted: the runs in flight are lost anyway; end our workers now
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        pool.shutdown(wait=clean, cancel_futures=True)
