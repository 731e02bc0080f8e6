"""Denormals late in a CPU run: how many a run's checkpoint holds, what they cost a training
step, and what flushing them (normkit.runs.flush_denormals, on in every CPU run) saves (not a test).

    uv run python tests/benchmarks/denormals.py CHECKPOINT               # a run's <key>.pt: the optimizer
    uv run python tests/benchmarks/denormals.py CHECKPOINT --data PATH   # and training steps on its data
    uv run python tests/benchmarks/denormals.py CHECKPOINT --data PATH --record results/benchmarks

CHECKPOINT is a run's checkpoint from a sweep on the fast path (``normkit sweep --fast
--checkpoints DIR``): ``DIR/<protocol>/<key>.pt``, beside its ``<key>.json``. The script counts
the float32 values below 1.18e-38 (denormal) in its weights and in its optimizer's state
(Adam's moments), then times, with denormals kept and then flushed to zero:

* ``optimizer step``: torch AdamW's step alone (the fast path's optimizer, fastai's Adam rule)
  over the checkpoint's state, with zero gradients (so the moments go on decaying, as they do
  where a run's gradients are tiny);
* ``training step``, with ``--data PATH`` (the run's Imagenette, a folder or .tgz): the run
  trained on from the checkpoint's weights and optimizer state, on its own data, as the sweep
  trains it (the checkpoint's fast-path settings; ``--steps`` steps after ``--warmup``). Its
  data, not random images: where a run's gradients stay near zero depends on what it sees.

Each is the best of ``--repeats``, from the checkpoint's state each time. ``--record DIR``
writes the figures with the command, hardware, threads, versions, commit and date to a JSON
file in ``DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from normkit.runs import RunConfig, flush_denormals  # noqa: E402

#: The 1-minute load average when the script started (None where the OS has none), for --record.
LOAD_BEFORE = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None

#: The smallest normal float32.
TINY = torch.finfo(torch.float32).tiny


def denormal_share(tensors) -> tuple[float, int]:
    """(share of denormal values, number of values) over the float32 tensors in ``tensors``."""
    n = bad = 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
            n += t.numel()
            bad += int(((t != 0) & (t.abs() < TINY)).sum())
    return (bad / n if n else 0.0), n


def load(path: str) -> tuple[dict, RunConfig]:
    """The checkpoint at ``path`` and its run's config; ValueError (one line) if it is not a
    fast-path checkpoint of a run."""
    state_file = Path(path)
    summary = state_file.with_suffix(".json")
    if state_file.suffix != ".pt" or not state_file.is_file() or not summary.is_file():
        raise ValueError(f"{path}: not a run's checkpoint (a <key>.pt with its <key>.json beside it)")
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        config = RunConfig.from_dict(json.loads(summary.read_text())["config"])
    except Exception as e:  # noqa: BLE001 - one line, not a traceback
        raise ValueError(f"{path}: cannot be read ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(state.get("how"), dict):
        raise ValueError(f"{path}: made on the {state.get('how')!r} path; this benchmark loads the fast path's "
                         "(torch AdamW) checkpoints: normkit sweep --fast")
    return state, config


def moments(opt_state: dict) -> list[torch.Tensor]:
    return [t for s in opt_state["state"].values() for k, t in s.items() if k in ("exp_avg", "exp_avg_sq")]


def optimizer_step(state: dict, flush: bool, steps: int) -> float:
    """Seconds per torch AdamW step over the checkpoint's optimizer state, zero gradients."""
    opt_state = state["opt"]
    params, groups = [], []
    for g in opt_state["param_groups"]:
        ps = [torch.nn.Parameter(torch.zeros_like(opt_state["state"][i]["exp_avg"])) for i in g["params"]]
        params += ps
        groups.append({"params": ps, "weight_decay": g["weight_decay"]})
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99), eps=1e-5, foreach=True)
    opt.load_state_dict(opt_state)
    for p in params:
        p.grad = torch.zeros_like(p)
    with flush_denormals(flush):
        opt.step()
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        return (time.perf_counter() - t0) / steps


def training_step(state: dict, config: RunConfig, dls, flush: bool, warmup: int, steps: int) -> float:
    """Seconds per step of the run trained on from its checkpoint (weights and optimizer state)
    on its data (``dls``: its fast path's DataLoaders), as its sweep trains it."""
    from fastai.callback.core import Callback
    from fastai.metrics import accuracy
    from step_time import _timer

    from normkit.fastdata import FastPath
    from normkit.models import build_model

    device = torch.device("cpu")
    times: list[float] = []
    model = build_model(config.net, config.norm_obj, n_out=len(dls.vocab))
    model.load_state_dict(state["model"])

    class FromCheckpoint(Callback):
        order = 0

        def before_fit(self):
            self.learn.opt.load_state_dict(state["opt"])

    fast = FastPath(**state["how"])
    learn = fast.learner(dls, model, device, metrics=accuracy, cbs=[FromCheckpoint(), _timer(warmup, steps, device, times)])
    with flush_denormals(flush), learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fit_one_cycle(1, config.lr)
    return times[0]


def _count(least: int):
    """An argparse type: an integer of at least ``least``, or a one-line error that says so."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = least - 1
        if value < least:
            raise argparse.ArgumentTypeError(f"{text} is invalid; it must be an integer of at least {least}")
        return value

    return parse


def _record_folder(text: str) -> str:
    """An argparse type: a folder --record can write to (made if missing), checked before measuring."""
    from normkit.report import benchmark_folder

    try:
        benchmark_folder(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--record ")) from None
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="a run's checkpoint, <key>.pt (fast path), with its <key>.json beside it")
    p.add_argument("--data", metavar="PATH", help="the run's Imagenette (folder or .tgz): also time training steps on it")
    p.add_argument("--steps", type=_count(1), default=20, help="steps timed (default 20)")
    p.add_argument("--warmup", type=_count(0), default=3, help="training steps before timing (default 3)")
    p.add_argument("--repeats", type=_count(1), default=3, help="times each is measured; the best counts (default 3)")
    p.add_argument("--record", metavar="DIR", type=_record_folder,
                   help="write the figures, with how they were made, to a JSON file in DIR")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    try:
        state, config = load(args.checkpoint)
    except ValueError as e:
        p.error(str(e))
    dls = None
    if args.data:
        from normkit.data import data_info, imagenette_path
        from normkit.fastdata import FastPath

        try:
            path = imagenette_path(args.data)
            if data_info(path).identity != config.data:
                raise ValueError(f"it is {data_info(path).identity!r}, the run's data is {config.data!r}")
            dls = FastPath(**state["how"]).make_dls(config, path, torch.device("cpu"))
        except Exception as e:  # noqa: BLE001 - one line, not a traceback
            p.error(f"--data {args.data}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        if len(dls.train) < args.warmup + args.steps:
            p.error(f"--data {args.data}: {len(dls.train)} training batches, fewer than the "
                    f"{args.warmup + args.steps} steps asked (--warmup + --steps)")
    weights, n_weights = denormal_share(state["model"].values())
    moms, n_moms = denormal_share(moments(state["opt"]))
    print(f"{config.describe()}, after {len(state['epochs'])} of {config.epochs} epochs, on the CPU "
          f"({torch.get_num_threads()} thread(s)):")
    print(f"  denormal float32 values: {weights:.1%} of {n_weights:,} in the weights, "
          f"{moms:.1%} of {n_moms:,} in Adam's moments")
    rows = []
    for name in ("optimizer step", *(["training step"] if dls is not None else [])):
        got = {}
        for flush in (False, True):
            runs = [optimizer_step(state, flush, args.steps) if name == "optimizer step"
                    else training_step(state, config, dls, flush, args.warmup, args.steps) for _ in range(args.repeats)]
            got[flush] = min(runs)
            rows.append({"what": name, "flush_denormals": flush, "ms": min(runs) * 1e3,
                         "ms_repeats": [r * 1e3 for r in runs]})
        print(f"  {name:15} kept {got[False] * 1e3:9.2f} ms   flushed {got[True] * 1e3:9.2f} ms   "
              f"speed-up {got[False] / got[True]:5.2f}x")
    if args.record:
        from normkit.report import write_benchmark
        from normkit.runs import device_name

        path = write_benchmark(args.record, "denormals", {
            "command": " ".join(["tests/benchmarks/denormals.py", *argv]),
            "args": {k: v for k, v in vars(args).items() if k != "record"},
            "run": config.to_dict(), "epochs_done": len(state["epochs"]), "data": args.data,
            "denormal_share": {"weights": weights, "adam_moments": moms},
            "device": device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "rows": rows,
            "load_average": LOAD_BEFORE})
        print(f"\nrecorded in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
