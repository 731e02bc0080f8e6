"""Plain fastai vs normkit's sweep on the same runs and the same device (not a test).

    uv run python tests/benchmarks/sweep_bench.py                  # speed: a fixed slice, both ways
    uv run python tests/benchmarks/sweep_bench.py --workers 8 --mps
    uv run python tests/benchmarks/sweep_bench.py --net resnet18 --bs 2   # the issue's target slice (>= 8x)
    uv run python tests/benchmarks/sweep_bench.py --compile reduce-overhead  # CUDA graphs: measure before using
    uv run python tests/benchmarks/sweep_bench.py --net resnet18 --bs 2 --seeds 12 --workers 2 --pack 6   # packed runs
    uv run python tests/benchmarks/sweep_bench.py --net resnet18 --bs 2 --seeds 12 --workers 2 --pack 6 --graph
    uv run python tests/benchmarks/sweep_bench.py --net resnet18 --bs 2 --record results/benchmarks  # kept for the book
    uv run python tests/benchmarks/sweep_bench.py --net resnet18 --bs 2 --steps 300 --steps 1200  # fixed costs apart
    uv run python tests/benchmarks/sweep_bench.py --check-science  # same accuracy, fast vs plain?
    uv run python tests/benchmarks/sweep_bench.py --check-science --results results/gpu  # kept: the book's GPU check

Speed. The slice: {cnn, resnet18} x batch size {128, 2} x BatchNorm, lr 0.01, seeds
0..K-1 (K = --seeds, default the number of workers); ``--net`` and ``--bs`` narrow it. It is trained twice into temporary
result folders: the plain way (fastai's DataBlock pipeline and Adam, one run at a time, as
``normkit sweep --plain --workers 1``) and normkit's way (``--fast``, ``--workers N``). For each
it prints runs/hour, cost units/second (see normkit.sweep.run_cost), GPU utilisation and
peak GPU memory (from nvidia-smi, every 0.5 s), then their ratio and each one's projected
time for the whole study (every chapter's runs, each once: 324 runs under protocol v1, not
counting the small-batch chapter's 6 probes). On CUDA the slice runs the ``bench`` protocol
(v1 cut to 300 training steps and 1,000 validation images per run) so that both ways fit in
minutes; the projection scales by the cost model, which is an estimate: the v1 records' own
wall times are the final word.
The wall clock includes each worker's start-up (process, imports, data onto the device), paid
once per worker, so in a short slice nearly in full. The next two lines leave it out, from the
runs' records: the steady-state speed-up and the projection of a long sweep. The last adds the
start-up back once (the wall time the records do not account for): the whole study as one
sweep, the projection the book judges against its 20-minute goal.
A slice's runs are short, so any fixed cost of a run (building its Learner, capturing its
graphs, cuDNN's first calls) weighs far more in them than in the study's runs, and scaled by
the cost model it swells the projection. ``--steps A --steps B`` makes the slice at two lengths
(training steps per epoch) and fits, per way, a run's fixed seconds and its seconds per cost
unit through the two (:func:`fit_fixed_and_per_unit`); the fitted projection counts the fixed
seconds once per run, the rest by each run's cost, and the start-up once. The other figures are
the longer slice's.
``--pack N`` trains normkit's runs in packs of up to N (``normkit sweep --pack N``); a packed
record's wall time is its pack's, so the steady state counts each run for its share of it.
``--graph`` replays each network's forward and backward from CUDA graphs (``normkit sweep
--graph``, :mod:`normkit.graphs`; CUDA only) and prints how many runs were graphed.
``--record DIR`` writes the figures, with the command, hardware, slice, library versions and
commit, to a JSON file in DIR; in ``results/benchmarks`` the summary chapter shows them against
the issue's targets (``normkit.report.sweep_benchmark_tables``).

On a CPU it runs the smoke protocol on the mini data set. Its figures mean nothing there.
(``--protocol v1`` or ``bench`` on a CPU reads the real Imagenette: ``--data``, $NORMKIT_DATA or
fastai's download.)

Science (--check-science): for one batch-size-128 and one batch-size-2 cell (cnn,
BatchNorm, lr 0.01: normkit.study.path_check), 3 seeds each (``--bs`` narrows it to one cell,
``--seeds N`` widens it to seeds 0..N-1; ``--workers`` applies to both paths, the plain one
defaulting to one run at a time), the plain and the fast path's
mean accuracies must agree within twice the standard error of their difference (from the
seeds' spread). On CUDA this uses protocol v1 by default (real runs). ``--results DIR`` keeps
the records, so that a command cut off by a time limit resumes: the fast runs as a results
folder does (DIR/<protocol>/), the plain ones in DIR/plain/ (normkit.study.plain_store). With
``--results results`` the fast runs are the study's own records (seeds beyond the study's
three are made here) and the plain runs go to results/plain/; the book shows that comparison
(chapter 05_summary). Exits 1 if a cell disagrees.

Packs (--check-packs): the same cells, each cell's seeds trained as one pack (``--pack``,
default 6; normkit.packed) into DIR/packed/ (normkit.study.packed_store), against the same runs
trained one by one on the fast path (DIR itself, made too if missing): the same comparison and
verdicts. ``--results results`` is the book's (chapter 05_summary).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from normkit.runs import PROTOCOLS, Protocol, ResultStore, RunConfig, device_name, graphed, run_seconds  # noqa: E402
from normkit.fastdata import COMPILE_MODES  # noqa: E402
from normkit.sweep import run_cost, sweep  # noqa: E402

PROTOCOLS.setdefault("bench", Protocol("bench", epochs=1, size=128, max_valid=1000, max_steps=300))
#: The 1-minute load average when the script started (None where the OS has none), for --record.
LOAD_BEFORE = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


class GPUSampler:
    """Mean utilisation and peak memory of the GPU (all processes), from nvidia-smi every 0.5 s."""

    def __init__(self):
        self.exe = shutil.which("nvidia-smi")
        self.util, self.mem = [], []
        self._stop = threading.Event()

    def __enter__(self):
        if self.exe:
            self._t = threading.Thread(target=self._run, daemon=True)
            self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run([self.exe, "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
                                      "-i", "0"], capture_output=True, text=True, timeout=5).stdout.split(",")
                self.util.append(float(out[0]))
                self.mem.append(float(out[1]))
            except (OSError, subprocess.SubprocessError, ValueError, IndexError):
                pass
            self._stop.wait(0.5)

    def __exit__(self, *exc):
        self._stop.set()

    def figures(self) -> dict:
        """Mean utilisation (%) and peak memory (GiB); None where nvidia-smi gave nothing."""
        if not self.util:
            return {"gpu_util_mean": None, "gpu_peak_gib": None}
        return {"gpu_util_mean": statistics.mean(self.util), "gpu_peak_gib": max(self.mem) / 1024}

    def describe(self) -> str:
        f = self.figures()
        if f["gpu_util_mean"] is None:
            return "GPU utilisation n/a (no nvidia-smi)"
        return f"GPU utilisation {f['gpu_util_mean']:.0f}% mean, peak memory {f['gpu_peak_gib']:.1f} GiB"


def _data(args, device):
    from normkit.data import data_info, imagenette_path, make_fake_imagenette

    if args.data or os.environ.get("NORMKIT_DATA"):
        path = imagenette_path(args.data)
    elif device == "cpu" and args.protocol in (None, "smoke"):  # toy scale: the mini data
        mini = REPO.parent / "shared" / "data" / "imagenette-mini"
        path = mini if (mini / "train").is_dir() else make_fake_imagenette(Path(tempfile.mkdtemp()) / "fake", 60, 15)
    else:
        path = imagenette_path(None)  # fastai's download: real protocols need the real data
    return path, data_info(path)


#: Imagenette's training and validation images (the full study's data; the projection's).
IMAGENETTE = (9469, 3925)


def _study_grid() -> tuple[int, float]:
    """The whole study under protocol v1 (every chapter's runs, each once): its number of runs and
    its cost units (normkit.sweep.run_cost) on Imagenette."""
    from normkit.study import study_configs

    configs = study_configs(PROTOCOLS["v1"], data="imagenette")
    return len(configs), sum(run_cost(c, *IMAGENETTE) for c in configs)


def fit_fixed_and_per_unit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """A run's fixed seconds and its seconds per cost unit (normkit.sweep.run_cost), from the mean
    ``(units per run, seconds per run)`` of the same slice at two lengths: the line through both.

    Raises ValueError, naming the figures, where they do not separate the two: the same units
    twice, the longer runs no slower, or a negative fixed cost (the timings' noise is larger
    than the fixed cost)."""
    if len(points) != 2:
        raise ValueError(f"{len(points)} point(s): a fit needs the slice at exactly two lengths")
    (u1, t1), (u2, t2) = sorted(points)
    if u2 <= u1:
        raise ValueError(f"both lengths cost {u1:g} units per run: a fit needs two different lengths")
    k = (t2 - t1) / (u2 - u1)
    if k <= 0:
        raise ValueError(f"the longer runs took {t2:.2f}s, the shorter {t1:.2f}s: the timings separate no per-step cost")
    fixed = t1 - k * u1
    if fixed < 0:
        raise ValueError(f"the fixed cost per run comes out at {fixed:.2f}s: the timings' noise exceeds it")
    return fixed, k


def _timed(label, configs, store, path, device, **kw):
    with GPUSampler() as gpu:
        t = time.time()
        report = sweep(configs, store=store, data=path, device=device, log=lambda s: print("   ", s, flush=True), **kw)
        wall = time.time() - t
    if not report.ok:
        raise SystemExit(f"{label}: {len(report.failed)} run(s) failed")
    # a packed run's record holds its pack's wall time: each run counts for its share of it
    run_s = statistics.mean(run_seconds(r) for r in store.records(configs).values())
    return wall, gpu, run_s


def _slice_protocol(base: str, steps: int | None) -> str:
    """The protocol ``base`` cut to ``steps`` training steps per epoch (registered on first use; the
    sweep passes it on to its workers); ``base`` itself for None or its own cap."""
    proto = PROTOCOLS[base]
    if steps is None or steps == proto.max_steps:
        return base
    name = f"{base}-{steps}steps"
    PROTOCOLS.setdefault(name, Protocol(name, epochs=proto.epochs, size=proto.size, max_train=proto.max_train,
                                        max_valid=proto.max_valid, max_steps=steps))
    return name


def speed(args, device, path, info, argv: list[str] | None = None) -> int:
    import torch

    base = args.protocol or ("bench" if device == "cuda" else "smoke")
    lengths = sorted(set(args.steps or [PROTOCOLS[base].max_steps]), key=lambda n: (n is not None, n or 0))
    workers = args.workers or (min(8, max(1, (os.cpu_count() or 2) // 2)) if device == "cuda" else 2)
    seeds = args.seeds or workers
    nets, sizes = args.net or ["cnn", "resnet18"], args.bs or [128, 2]
    hardware = device_name(torch.device(device))
    meaningful = device == "cuda" and base != "smoke"
    if device == "cpu":
        print("NOTE: on a CPU at toy scale; the figures below mean nothing for the GPU study.")
    from normkit.fastdata import decode

    proto = PROTOCOLS[base]
    t = time.time()
    decode(path, proto.size, max_train=proto.max_train, max_valid=proto.max_valid)
    print(f"one-time decode for the fast path: {time.time() - t:.1f}s (cached in $NORMKIT_CACHE/decoded afterwards)")
    fast_how = (f"normkit: fast data path, {workers} worker{'s' if workers != 1 else ''}" + (", MPS" if args.mps else "")
                + (", channels-last" if args.channels_last else "") + (f", torch.compile {args.compile}" if args.compile else "")
                + (f", packs of up to {args.pack} runs" if args.pack > 1 else "") + (", CUDA graphs" if args.graph else ""))
    grid_runs, grid_units = _study_grid()
    per_length = []
    for steps in lengths:
        protocol = _slice_protocol(base, steps)
        configs = [RunConfig.make(net, "batchnorm", bs, 1e-2, s, data=info.identity, protocol=protocol)
                   for net in nets for bs in sizes for s in range(seeds)]
        per_length.append(_speed_slice(args, device, path, info, configs, protocol, workers, fast_how, grid_units,
                                       meaningful))
    last = per_length[-1]  # the longest slice's figures are the benchmark's headline
    configs, ways = last["configs"], last["ways"]
    slice_text = (f"{len(configs)} runs: {' and '.join(nets)} at batch size {' and '.join(map(str, sizes))}, BatchNorm, "
                  f"lr 0.01, seeds 0-{seeds - 1}; {PROTOCOLS[last['protocol']].describe()}"
                  + (f"; also at {', '.join(str(p['steps']) for p in per_length[:-1])} steps per epoch, for the fit"
                     if len(per_length) > 1 else ""))
    meaningless = "" if meaningful else f"   [{'CPU' if device == 'cpu' else 'toy scale'}: meaningless]"
    fit = None
    if len(per_length) == 2:
        fit = {"steps": [p["steps"] for p in per_length]}
        try:
            for name in ("plain", "fast"):
                fixed, per_unit = fit_fixed_and_per_unit([(p["units_per_run"], p["ways"][name]["run_s"]) for p in per_length])
                w = ways[name]
                grid_min = (grid_runs * fixed + grid_units * per_unit) / w["at_once"] / 60 + w["startup_s"] / 60
                fit[name] = {"fixed_s": fixed, "s_per_unit": per_unit, "grid_min": grid_min}
            fit["speedup"] = fit["plain"]["grid_min"] / fit["fast"]["grid_min"]
            print(f"fixed seconds per run, from the slice at {' and '.join(map(str, fit['steps']))} steps: plain "
                  f"{fit['plain']['fixed_s']:.1f}s, fast {fit['fast']['fixed_s']:.1f}s; the projected {grid_runs}-run v1 "
                  f"grid counting them once per run (the rest scaled with each run's cost, start-up once): plain "
                  f"{fit['plain']['grid_min']:.1f} min, fast {fit['fast']['grid_min']:.1f} min, a speed-up of "
                  f"{fit['speedup']:.2f}x{meaningless}")
        except ValueError as e:
            fit["error"] = str(e)
            print(f"no fit of fixed and per-step costs: {e}")
    if args.record:
        from normkit.report import write_benchmark

        path = write_benchmark(args.record, "sweep_bench", {
            "command": " ".join(["tests/benchmarks/sweep_bench.py", *(sys.argv[1:] if argv is None else argv)]),
            "args": {k: v for k, v in vars(args).items() if k != "record"},
            "device": hardware, "data": info.identity, "load_average": LOAD_BEFORE, "meaningful": meaningful,
            "slice": slice_text, "target_slice": set(nets) == {"resnet18"} and set(sizes) == {2},
            "runs": len(configs), "grid_runs": grid_runs, "graphed_runs": last["graphed_runs"], "ways": ways,
            "speedup_wall": last["speedup_wall"], "speedup_steady": last["speedup_steady"],
            "lengths": [{k: v for k, v in p.items() if k not in ("configs", "protocol")} for p in per_length],
            "fit": fit})
        print(f"\nrecorded in {path}")
    return 0


def _speed_slice(args, device, path, info, configs, protocol, workers, fast_how, grid_units, meaningful) -> dict:
    """Train ``configs`` both ways and print their figures; the figures, as --record keeps them."""
    import torch

    units = sum(run_cost(c, info.n_train, info.n_valid) for c in configs)
    print(f"slice: {len(configs)} runs ({protocol} protocol: {PROTOCOLS[protocol].describe()}) on {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device == 'cuda' else ''}, data {info.identity}")
    out, graphed_runs = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        print("plain: fastai DataLoaders and Adam, one run at a time")
        out["plain"] = _timed("plain", configs, ResultStore(Path(tmp) / "plain"), path, device, workers=1, fast=False)
        print(fast_how)
        store = ResultStore(Path(tmp) / "fast")
        out["fast"] = _timed("fast", configs, store, path, device, workers=workers, fast=True, mps=args.mps,
                             channels_last=args.channels_last, compile=args.compile, pack=args.pack, graph=args.graph)
        if args.graph:
            records = list(store.records(configs).values())  # read once: how many graphed, and why not the others
            eager = sorted({str(r["settings"].get("graph")) for r in records if not graphed(r)})
            graphed_runs = sum(map(graphed, records))
            print(f"    CUDA graphs: {graphed_runs} of {len(configs)} runs graphed" + "".join(f"; {s}" for s in eager))
    grid_runs = _study_grid()[0]
    # The wall clock includes each worker's start-up (spawn, imports, the decoded data onto the
    # device), which a slice of one run per worker pays in full and a long sweep pays once per
    # worker. The records' own wall times leave it out: with every worker busy, a sweep makes
    # workers / (mean run time) runs per second. (A packed record's time is its pack's.)
    ways = {}
    for name, (wall, gpu, run_s), at_once, how in (
            ("plain", out["plain"], 1, "plain fastai: DataBlock pipeline and Adam, one run at a time"),
            ("fast", out["fast"], workers, fast_how)):
        busy = len(configs) * run_s / at_once  # the wall time with every worker busy from the start
        steady = grid_units / (units / busy) / 60
        # the rest of the wall time: each worker's start-up (and the last runs' uneven end), paid
        # once by a sweep of any length
        startup = max(0.0, wall - busy)
        ways[name] = {"how": how, "wall_s": wall, "runs_per_hour": len(configs) / wall * 3600, "units_per_s": units / wall,
                      "grid_min_wall": grid_units / (units / wall) / 60, "run_s": run_s, "at_once": at_once,
                      "grid_min_steady": steady, "startup_s": startup, "grid_min_sweep": steady + startup / 60,
                      **gpu.figures()}
    speedup_wall = ways["fast"]["runs_per_hour"] / ways["plain"]["runs_per_hour"]
    speedup_steady = workers * ways["plain"]["run_s"] / ways["fast"]["run_s"]

    print(f"\n{'':8} {'wall s':>8} {'runs/hour':>10} {'units/s':>9}  projected {grid_runs}-run v1 grid   GPU")
    for name, w in ways.items():
        gpu = out[name][1]
        print(f"{name:8} {w['wall_s']:8.1f} {w['runs_per_hour']:10.1f} {w['units_per_s']:9.1f}  "
              f"{w['grid_min_wall']:10.1f} min               {gpu.describe()}")
    meaningless = "" if meaningful else f"   [{'CPU' if device == 'cpu' else 'toy scale'}: meaningless]"
    print(f"speed-up (plain wall / fast wall): {speedup_wall:.2f}x{meaningless}")
    share = f" (its share of a pack of {args.pack})" if args.pack > 1 else ""
    print(f"per run, from the records (no worker start-up): plain {ways['plain']['run_s']:.1f}s one at a time, fast "
          f"{ways['fast']['run_s']:.1f}s{share} with {workers} {'pack' if args.pack > 1 else 'run'}"
          f"{'s' if workers != 1 else ''} at once; steady-state speed-up {speedup_steady:.2f}x{meaningless}")
    print(f"projected {grid_runs}-run v1 grid at that steady state: plain {ways['plain']['grid_min_steady']:.1f} min, fast "
          f"{ways['fast']['grid_min_steady']:.1f} min{meaningless}")
    print(f"as one sweep (each worker's start-up once: plain {ways['plain']['startup_s']:.1f}s, fast "
          f"{ways['fast']['startup_s']:.1f}s): plain {ways['plain']['grid_min_sweep']:.1f} min, fast "
          f"{ways['fast']['grid_min_sweep']:.1f} min{meaningless}\n")
    return {"steps": PROTOCOLS[protocol].max_steps, "protocol": protocol, "configs": configs,
            "units_per_run": units / len(configs), "ways": ways, "speedup_wall": speedup_wall,
            "speedup_steady": speedup_steady, "graphed_runs": graphed_runs}


def check_science(args, device, path, info) -> int:
    from normkit.study import packed_store, path_check, plain_store

    protocol = args.protocol or ("v1" if device == "cuda" else "smoke")
    widen = {k: v for k, v in (("batch_sizes", args.bs), ("seeds", args.seeds)) if v}  # else path_check's defaults
    grid = path_check(PROTOCOLS[protocol], data=info.identity, **widen)
    configs = grid.configs()
    keep = args.results is not None
    root = Path(args.results) if keep else Path(tempfile.mkdtemp())
    packs = args.check_packs
    if packs:  # the reference: runs one by one on the fast path; checked: the same runs in packs
        stores = {"fast": ResultStore(root), "packed": packed_store(ResultStore(root))}
        ref, new = "fast", "packed"
    else:
        stores = {"plain": plain_store(ResultStore(root)), "fast": ResultStore(root)}
        ref, new = "plain", "fast"
    print(f"check-{'packs' if packs else 'science'}: {len(configs)} runs ({grid.describe()}), {ref} vs {new}, "
          f"on {device}; records in {root}")
    if protocol == "smoke":
        print("NOTE: at toy scale; this checks that the comparison runs, not the science.")
    elif device == "cpu" and packs:
        print("NOTE: on a CPU; this checks packing's arithmetic, not the GPU kernels of a pack (cuDNN's grouped "
              "convolutions, fused AdamW).")
    elif device == "cpu":
        print("NOTE: on a CPU; this checks the fast data path and optimiser against the plain ones, not the "
              "settings only CUDA has (fused AdamW, MPS, compilation).")
    deadline = time.time() + args.time_limit if args.time_limit else None
    for name, store in stores.items():
        left = None if deadline is None else max(1.0, deadline - time.time())
        pack = (args.pack if args.pack > 1 else 6) if name == "packed" else 1
        sweep(configs, store=store, data=path, device=device, fast=name != "plain", time_limit=left, pack=pack,
              workers=(args.workers or 1) if name == "plain" else (args.workers or None), mps=args.mps and name != "plain",
              log=lambda s: print("   ", s, flush=True))
    from normkit.report import differences

    failed = incomplete = False
    diff = differences(grid, reference=grid, store=stores[new], reference_store=stores[ref])
    for _, d in diff.iterrows():
        what = f"{d['net']} {d['norm']} bs={d['bs']} lr={d['lr']:g}"
        if d["verdict"] in ("missing runs", "diverged"):
            print(f"{what}: {d['verdict']}; rerun with --results {root}")
            incomplete = True
            continue
        cell, ref_cell = d["cell"], d["ref_cell"]
        ok = d["verdict"] == "within noise"
        failed |= not ok
        print(f"{what}: {ref} {ref_cell.acc_mean:.4f} ± {ref_cell.acc_std:.4f}, {new} {cell.acc_mean:.4f} ± "
              f"{cell.acc_std:.4f}; {new} - {ref} {d['delta'] if abs(d['delta']) >= 5e-5 else 0.0:+.4f} ± {d['se']:.4f} "
              f"(se): {'PASS' if ok else 'FAIL'} ({d['verdict']})")
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else (3 if incomplete else 0)


def main(argv=None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data", help="Imagenette folder or .tgz (default $NORMKIT_DATA, else fastai's download; "
                   "the mini data for the smoke protocol on a CPU)")
    p.add_argument("--workers", type=int, help="normkit's worker processes (default: up to 8 on cuda, 2 on cpu)")
    p.add_argument("--seeds", type=int, help="seeds per (network, batch size) in the speed slice, or per cell with --check-science (default 3)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), help="default: bench (speed) / v1 (science) on cuda, smoke on cpu")
    p.add_argument("--mps", action="store_true", help="normkit's workers under a private CUDA MPS daemon")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", choices=COMPILE_MODES, help="torch.compile mode for normkit's runs (speed)")
    p.add_argument("--pack", type=int, default=1, metavar="N",
                   help="normkit trains packs of up to N runs as one network (speed: default 1; --check-packs: "
                        "default 6)")
    p.add_argument("--graph", action="store_true",
                   help="normkit replays each network's forward and backward from CUDA graphs (speed; CUDA only)")
    p.add_argument("--steps", action="append", type=int, metavar="N",
                   help="(speed) training steps per epoch of each slice run (default: the protocol's, 300 for bench); "
                        "twice, two lengths: the slice is made at both, and each way's fixed seconds per run are "
                        "fitted apart from its per-step cost, so that the projection counts them once per run")
    p.add_argument("--net", action="append", choices=["cnn", "resnet18"], help="only these networks in the speed slice")
    p.add_argument("--bs", action="append", type=int, choices=[128, 2], help="only these batch sizes in the speed slice or the science check")
    p.add_argument("--record", metavar="DIR",
                   help="(speed) write the figures, with the command, hardware, slice, versions and commit, to a JSON "
                        "file in DIR (the book's: results/benchmarks)")
    p.add_argument("--check-science", action="store_true", help="compare accuracies instead of timing")
    p.add_argument("--check-packs", action="store_true",
                   help="compare accuracies of runs trained in packs with the same runs trained one by one")
    p.add_argument("--results", help="(--check-science) keep the records here, to resume")
    p.add_argument("--time-limit", type=float, help="(--check-science) seconds; start no run projected past it")
    args = p.parse_args(argv)
    if args.check_science and args.check_packs:
        p.error("--check-science and --check-packs are two checks; run one at a time")
    if args.pack < 1:
        p.error(f"--pack {args.pack} is invalid; it must be a positive integer (1: no packing)")
    if args.steps and (args.check_science or args.check_packs):
        p.error("--steps sets the speed slice's length; the checks train the protocol's full runs")
    bad = [n for n in args.steps or () if n < 1]
    if bad or len(set(args.steps or ())) > 2:
        p.error(f"--steps {' '.join(map(str, args.steps))}: give one or two different positive numbers of steps")
    if args.record and (args.check_science or args.check_packs):
        p.error("--record keeps the speed slice's figures; the checks keep their runs with --results DIR")
    if args.record:
        from normkit.report import benchmark_folder

        try:
            benchmark_folder(args.record)
        except ValueError as e:
            p.error(str(e))
    if args.graph and (args.check_science or args.check_packs):
        p.error("--graph applies to the speed slice; the graphs' own check is tests/test_graphs.py on a GPU")
    if args.graph and args.device != "cuda":
        p.error(f"--graph needs --device cuda (CUDA graphs); the device is {args.device}")
    path, info = _data(args, args.device)
    if args.check_science or args.check_packs:
        return check_science(args, args.device, path, info)
    return speed(args, args.device, path, info, argv)


if __name__ == "__main__":
    sys.exit(main())
