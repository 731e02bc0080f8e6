"""Time per training step in one process, and where it goes (not a test).

    uv run python tests/benchmarks/step_time.py                                  # CPU: toy scale
    uv run python tests/benchmarks/step_time.py --net resnet18 --bs 2            # GPU: the bs-2 step
    uv run python tests/benchmarks/step_time.py --net resnet18 --bs 2 --compile reduce-overhead --profile
    uv run python tests/benchmarks/step_time.py --norm batchnorm --norm runningbatchnorm
    uv run python tests/benchmarks/step_time.py --net linear --size 8 --steps 2000   # the overhead alone
    uv run python tests/benchmarks/step_time.py --net resnet18 --bs 2 --pack 3 --pack 6   # packed runs
    uv run python tests/benchmarks/step_time.py --net resnet18 --bs 2 --pack 6 --graph    # CUDA graphs
    uv run python tests/benchmarks/step_time.py --pack 6 --profile --record results/benchmarks  # kept for the book
    uv run python tests/benchmarks/step_time.py --net resnet18 --size 128 --data PATH   # and the plain path

At batch size 2 a step of the study is tiny arithmetic behind a long queue of small kernel
launches and Python: the host, not the GPU, sets the pace (on an H200, 8 workers kept the GPU
28 % busy). This measures one run's steady-state time per step (``--steps`` steps after
``--warmup``, the device synchronised at both ends) for each way of training the same model on
the same batches (normkit's fast data path, random images: the time does not depend on them):

* ``torch loop``: forward, loss, backward, torch AdamW, nothing else: the floor;
* ``fastai Learner``: fit_one_cycle with fastai's Learner, OptimWrapper and loss (``FastPath(lean=False)``);
* ``LeanLearner``: normkit's fast path as sweeps run it (``FastPath()``);
* ``plain fastai`` with ``--data PATH`` (Imagenette, a folder or .tgz): the plain path as
  ``normkit sweep --plain`` runs it, fastai's ``DataLoaders`` decoding and augmenting the real
  images item by item in this process (as a sweep's workers load them), fastai's ``Learner``
  and ``Adam``: what the fast path saves, data loading included;
* ``LeanLearner + compile MODE`` with ``--compile`` (``reduce-overhead``: CUDA graphs);
* ``LeanLearner + CUDA graphs`` with ``--graph`` (CUDA only): the network's forward and backward
  replayed from CUDA graphs (:mod:`normkit.graphs`, ``normkit sweep --graph``); a network the
  check refuses is timed eagerly, and the line says why;
* ``LeanLearner, packs of N`` with ``--pack N``: N runs (seeds) trained as one grouped network
  (:mod:`normkit.packed`, as ``normkit sweep --pack N`` trains them, every other run at a tenth of
  the learning rate as in a pack that mixes the study's two); the time of one packed step
  divided by N, i.e. per run, so that it compares with the rows above (with ``--compile``, also
  compiled; with ``--graph``, also graphed).

cuDNN is set as every run sets it (fastai's ``set_seed(reproducible=True)``: deterministic
algorithms, no autotuning); ``--cudnn-benchmark`` lets cuDNN autotune instead, to measure what
that determinism costs.
``--net linear`` replaces the network by one linear layer (no norm), so that nearly all of a step
is overhead: what fastai's Learner adds to a torch loop, and what normkit's LeanLearner saves.
``--profile`` also counts, for each variant on the fast path (not the torch loop or plain
fastai), the aten operator calls (and on a GPU the kernel launches) per step and run, in a
profiled fit apart from the timed ones, and prints torch.profiler's table for the last variant:
the operators taking the most time.
``--record DIR`` writes what was measured, with the command, hardware, threads, library versions,
normkit commit and date, to a JSON file in ``DIR`` (``results/benchmarks`` for the book's
figures); :func:`normkit.report.step_times` reads them. On a CPU the figures are the host's Python
overhead plus CPU arithmetic, at a toy size: they say what fastai's per-step overhead costs, not
what a GPU step costs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from normkit.fastdata import COMPILE_MODES, FastPath, TensorLoader, fused_adam  # noqa: E402
from normkit.models import NETS, build_model  # noqa: E402
from normkit.norms import get_norm  # noqa: E402
from normkit.runs import GRAPHED  # noqa: E402


#: The 1-minute load average when the script started (None where the OS has none), for --record.
LOAD_BEFORE = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _loaders(n_steps: int, bs: int, size: int, device: torch.device, seed: int = 0):
    from fastai.data.core import DataLoaders

    gen = torch.Generator().manual_seed(seed)
    n = n_steps * bs
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (n,), generator=gen)
    vocab = [str(i) for i in range(10)]
    train = TensorLoader(images, labels, bs, vocab=vocab, train=True, seed=seed, device=device)
    valid = TensorLoader(images[:bs], labels[:bs], bs, vocab=vocab, train=False, device=device)
    dls = DataLoaders(train, valid, device=device)
    dls.vocab = vocab
    return dls


def _timer(warmup: int, steps: int, device: torch.device, times: list):
    from fastai.callback.core import Callback, CancelFitException

    class StepTimer(Callback):
        """Wall time of training steps warmup .. warmup+steps, the device synchronised at both ends."""

        order = 100

        def before_batch(self):
            if self.training and self.iter == warmup:
                _sync(device)
                self.t0 = time.perf_counter()

        def after_batch(self):
            if self.training and self.iter == warmup + steps - 1:
                _sync(device)
                times.append((time.perf_counter() - self.t0) / steps)
                raise CancelFitException()

    return StepTimer()


def _model(args, norm, n_out: int = 10) -> torch.nn.Module:
    if args.net == "linear":
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * args.size * args.size, n_out))
    return build_model(args.net, norm, n_out=n_out)


def torch_loop(args, device, norm) -> float:
    """Seconds per step of a bare torch loop on the same model, batches and optimizer."""
    dls = _loaders(args.warmup + args.steps, args.bs, args.size, device)
    model = _model(args, norm).to(device).train()
    opt = fused_adam(model, device)
    groups = [g for g in opt["splitter"](model) if g["params"]]
    optimizer = opt["opt_func"](groups, 1e-3).opt  # the torch AdamW inside fastai's wrapper
    loss_func = torch.nn.CrossEntropyLoss()
    for i, (x, y) in enumerate(dls.train):
        if i == args.warmup:
            _sync(device)
            t0 = time.perf_counter()
        loss = loss_func(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - t0) / args.steps


def learner_step(args, device, norm, fast: FastPath, profile: dict | None = None, pack: int = 1,
                 table: bool = False) -> float:
    """Seconds per step of ``fit_one_cycle`` on a Learner that ``fast`` builds; with ``pack`` > 1,
    of a pack of that many runs trained as one network, divided by ``pack`` (per run). With
    ``profile`` (a dict), the fit is profiled instead and the counts per step and run go into it
    (and torch.profiler's table is printed if ``table``)."""
    from fastai.metrics import accuracy

    from normkit.runs import _make_guard

    n_steps = args.warmup + args.steps
    times: list[float] = []
    timer = _timer(args.warmup, args.steps, device, times)
    if pack == 1:
        dls = _loaders(n_steps, args.bs, args.size, device)
        learn = fast.learner(dls, _model(args, norm), device, metrics=accuracy, cbs=[_make_guard(), timer])
    else:
        from normkit.packed import packed_learner

        each = [_loaders(n_steps, args.bs, args.size, device, seed=s) for s in range(pack)]
        lrs = [1e-3 if i % 2 == 0 else 1e-4 for i in range(pack)]  # the study's two lrs (a tenth apart), mixed
        learn, _, _ = packed_learner(fast, each, [_model(args, norm) for _ in range(pack)], device, lrs, cbs=[timer])
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if profile is None:
            learn.fit_one_cycle(1, 1e-3)
        else:
            profile.update(_profiled(learn, device, pack, table))
    status = getattr(learn, "graph_status", None)
    if status and not status.startswith(GRAPHED):
        print(f"    ({status})")
    return times[0] / pack if times else float("nan")


def _plain_dls(args, device):
    from normkit.data import imagenette_path, make_dls

    return make_dls(imagenette_path(args.data), args.bs, args.size, device=device, num_workers=0)


def plain_step(args, device, norm, dls) -> float:
    """Seconds per step of the plain path (``normkit sweep --plain``): fastai's DataLoaders
    (``dls``, over the images in ``args.data``, loaded in this process) and the Learner that
    :func:`normkit.runs.plain_learner` builds for every plain run."""
    from normkit.runs import _make_guard, plain_learner

    times: list[float] = []
    learn = plain_learner(dls, _model(args, norm, len(dls.vocab)),
                          cbs=[_make_guard(), _timer(args.warmup, args.steps, device, times)])
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fit_one_cycle(1, 1e-3)
    return times[0] if times else float("nan")


def _profiled(learn, device, pack: int, table: bool) -> dict[str, float]:
    """Profile a fit of ``learn``: aten operator calls (and CUDA kernel launches) per step and run."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        learn.fit_one_cycle(1, 1e-3)
    events = prof.key_averages()
    if table:
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(events.table(sort_by=key, row_limit=15))
    steps = len(learn.dls.train) * pack  # step-runs: a pack's step is one step of each of its runs
    counts = {"aten_ops_per_step": sum(e.count for e in events
                                       if e.device_type.name == "CPU" and e.key.startswith("aten::")) / steps}
    if device.type == "cuda":
        counts["kernels_per_step"] = sum(e.count for e in events if e.device_type.name == "CUDA") / steps
    return counts


def _record(folder: str, argv: list[str], args, device, rows: list[dict]) -> Path:
    """Write the measured ``rows`` with how they were made into ``folder``; the file's path."""
    from normkit.report import write_benchmark
    from normkit.runs import device_name

    return write_benchmark(folder, "step_time", {
        "command": " ".join(["tests/benchmarks/step_time.py", *argv]),
        "args": {k: v for k, v in vars(args).items() if k != "record"},
        "device": device_name(device), "threads": torch.get_num_threads(), "rows": rows,
        "load_average": LOAD_BEFORE})  # the machine's 1-minute load before the first step: was it idle?


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--net", choices=[*NETS, "linear"], default="cnn", help="linear: one layer, the overhead alone")
    p.add_argument("--norm", action="append", help="norm(s) to time (default batchnorm)")
    p.add_argument("--bs", type=int, default=2)
    p.add_argument("--size", type=int, help="image size (default 128 on cuda, 32 on cpu)")
    p.add_argument("--steps", type=int, default=200, help="steps timed (default 200)")
    p.add_argument("--warmup", type=int, default=30, help="steps before timing (default 30)")
    p.add_argument("--repeats", type=int, default=3, help="times each variant runs; the best counts (default 3)")
    p.add_argument("--compile", choices=COMPILE_MODES, help="also time the fast path with torch.compile in this mode")
    p.add_argument("--graph", action="store_true",
                   help="also time the fast path with the network replayed from CUDA graphs (CUDA only)")
    p.add_argument("--pack", type=int, action="append", default=[], metavar="N",
                   help="also time packs of N runs as one network, per run (repeatable)")
    p.add_argument("--profile", action="store_true",
                   help="count aten operator calls (and CUDA kernels) per step and run for each variant; "
                        "torch.profiler's table of the last")
    p.add_argument("--record", metavar="DIR", help="write the figures, with how they were made, to a JSON file in DIR")
    p.add_argument("--data", metavar="PATH",
                   help="also time the plain path (fastai DataLoaders and Learner) on this Imagenette folder or .tgz")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="cuDNN autotuning instead of the runs' deterministic algorithms")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    for name, v in (("--bs", args.bs), ("--steps", args.steps), ("--repeats", args.repeats)):
        if v < 1:
            p.error(f"{name} {v} is invalid; it must be a positive integer")
    for n in args.pack:
        if n < 2:
            p.error(f"--pack {n} is invalid; a pack has at least 2 runs")
    if args.warmup < 0:
        p.error(f"--warmup {args.warmup} is invalid; it must be 0 or more")
    if args.record:
        from normkit.report import benchmark_folder

        try:
            benchmark_folder(args.record)
        except ValueError as e:
            p.error(str(e))
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here")
    if args.graph and device.type != "cuda":
        p.error(f"--graph needs --device cuda (CUDA graphs); the device is {device.type}")
    args.size = args.size or (128 if device.type == "cuda" else 32)
    plain_dls = None
    if args.data:
        try:
            plain_dls = _plain_dls(args, device)
            batches = len(plain_dls.train)
        except Exception as e:  # noqa: BLE001 - a path that is not Imagenette: say so in one line
            p.error(f"--data {args.data}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        if batches < args.warmup + args.steps:
            p.error(f"--data {args.data}: {batches} training batches of {args.bs}, fewer than the "
                    f"{args.warmup + args.steps} steps asked (--warmup + --steps)")
    torch.backends.cudnn.deterministic = not args.cudnn_benchmark  # as the runs: set_seed(reproducible=True)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    try:
        norms = [get_norm(n) for n in args.norm or ["batchnorm"]]
    except (KeyError, ValueError) as e:
        p.error(str(e).strip("'\""))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)"
    print(f"{args.net} at batch size {args.bs}, {args.size} px, on {where}: seconds per training step, steady state "
          f"({args.steps} steps after {args.warmup}; best of {args.repeats}; cuDNN "
          f"{'autotuned' if args.cudnn_benchmark else 'deterministic, as the runs'})")
    if device.type == "cpu":
        toy = " at toy scale" if args.net == "linear" or args.size < 128 else ""
        print(f"NOTE: on a CPU{toy}: the host's per-step overhead plus CPU arithmetic, not a GPU's step.")
    variants = [("torch loop", None, 1), ("fastai Learner", FastPath(lean=False), 1), ("LeanLearner", FastPath(), 1)]
    if args.data:
        variants.append(("plain fastai (DataLoaders, Learner)", "plain", 1))
    if args.compile:
        variants.append((f"LeanLearner + compile {args.compile}", FastPath(compile=args.compile), 1))
    if args.graph:
        variants.append(("LeanLearner + CUDA graphs", FastPath(graph=True), 1))
    for n in args.pack:
        variants.append((f"LeanLearner, packs of {n} (per run)", FastPath(), n))
        if args.compile:
            variants.append((f"LeanLearner + compile, packs of {n} (per run)", FastPath(compile=args.compile), n))
        if args.graph:
            variants.append((f"LeanLearner + CUDA graphs, packs of {n} (per run)", FastPath(graph=True), n))
    rows = []
    for norm in norms[:1] if args.net == "linear" else norms:
        label = "none (one linear layer)" if args.net == "linear" else norm.label
        print(f"\n{'no norm (one linear layer)' if args.net == 'linear' else norm.label}")
        floor, mine = None, []  # this norm's rows, one per variant
        for name, fast, n in variants:
            runs = [torch_loop(args, device, norm) if fast is None else plain_step(args, device, norm, plain_dls) if fast == "plain"
                    else learner_step(args, device, norm, fast, pack=n) for _ in range(args.repeats)]
            best = min(runs)
            floor = floor or best
            spread = f" (runs: {', '.join(f'{r * 1e3:.2f}' for r in runs)})" if len(runs) > 1 else ""
            print(f"  {name:36} {best * 1e3:8.2f} ms/step  {best / floor:5.2f}x the torch loop{spread}")
            mine.append({"norm": label, "variant": name, "pack": n, "ms_per_step": best * 1e3,
                         "ms_repeats": [r * 1e3 for r in runs], "vs_torch_loop": best / floor})
        rows += mine
        if args.profile:
            print(f"\nper training step and run, in a profiled fit of each ({label}):")
            profiled = [(i, v) for i, v in enumerate(variants) if isinstance(v[1], FastPath)]
            for k, (i, (name, fast, n)) in enumerate(profiled):
                last = k == len(profiled) - 1
                counts: dict[str, float] = {}
                if last:
                    print(f"\nprofile of {name}, {norm.label}:")
                learner_step(args, device, norm, fast, profile=counts, pack=n, table=last)
                mine[i].update(counts)
                kernels = f", {counts['kernels_per_step']:,.0f} kernel launches" if "kernels_per_step" in counts else ""
                print(f"  {name:36} {counts['aten_ops_per_step']:8,.0f} aten operator calls (nested ones included)"
                      + kernels)
    if args.record:
        print(f"\nrecorded in {_record(args.record, argv, args, device, rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
