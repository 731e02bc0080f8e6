"""The sweep executor (normkit.sweep) and ``normkit sweep`` on the CPU, at smoke scale."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import normkit.sweep as sw
from normkit import study
from normkit.runs import PROTOCOLS, Protocol, ResultStore, RunConfig
from normkit.sweep import _Planner, order_longest_first, run_cost, sweep, sweep_order

from part_made import part_made



@pytest.fixture
def data(mini_data):
    """(data folder, its identity); conftest gives every test its own cache and results folders."""
    from normkit.data import data_info

    return mini_data, data_info(mini_data).identity


def _smoke(identity, net="cnn", norm="batchnorm", bs=8, seed=0, lr=1e-2):
    return RunConfig.make(net, norm, bs, lr, seed, data=identity, protocol="smoke")


def test_longest_first():
    v1 = [RunConfig.make(net, "batchnorm", bs, 1e-2, 0) for net in ("cnn", "resnet18") for bs in (128, 2)]
    ordered = [(c.net, c.bs) for c in order_longest_first(v1, 9469, 3925)]
    assert ordered == [("resnet18", 2), ("cnn", 2), ("resnet18", 128), ("cnn", 128)]
    assert run_cost(v1[1], 9469, 3925) > 10 * run_cost(v1[0], 9469, 3925)
    # on a CPU the arithmetic counts from the first image: a bs-128 run costs less than a bs-2 one, not 10x less
    cpu = [run_cost(c, 9469, 3925, sw.CPU_BS_KNEE) for c in v1[:2]]
    assert 0.5 < cpu[0] / cpu[1] < 0.8


def test_longest_first_counts_what_is_left():
    """A run resumed after 4 of its 5 epochs is planned by the epoch it has left."""
    big, small = (RunConfig.make(net, "batchnorm", 2, 1e-2, 0) for net in ("resnet18", "cnn"))
    assert order_longest_first([small, big], 9469, 3925) == [big, small]
    assert order_longest_first([small, big], 9469, 3925, done_epochs={big.key: 4}) == [small, big]
    assert run_cost(big, 9469, 3925, done_epochs=4) == pytest.approx(run_cost(big, 9469, 3925) / 5)
    assert run_cost(big, 9469, 3925, done_epochs=5) == 0
    with pytest.raises(ValueError, match=r"done_epochs=6: must be between 0 and the run's 5 epochs"):
        run_cost(big, 9469, 3925, done_epochs=6)


def test_train_steps_and_estimate(tmp_path):
    from tests.test_runs import fake_record

    v1 = [RunConfig.make("cnn", "batchnorm", bs, 1e-2, 0) for bs in (128, 2)]
    assert [sw.train_steps(c, 9469) for c in v1] == [5 * 73, 5 * 4734]
    assert sw.train_steps(_smoke("x", bs=2), 9469) == 6  # smoke: capped at max_steps
    store = ResultStore(tmp_path)
    assert sw.estimate(v1, store) == "24,035 training steps"  # no GPU record: steps only
    done = RunConfig.make("resnet18", "batchnorm", 2, 1e-3, 0)
    cpu, gpu = fake_record(done), fake_record(done)
    cpu.update(device="cpu: test", settings={"data_path": "fast: ...", "workers": 1})
    store.put(cpu)
    assert sw.estimate(v1, store) == "24,035 training steps"  # CPU records say nothing about a GPU
    units = run_cost(done, 9469, 3925)
    gpu.update(device="cuda: NVIDIA H100", wall_time_s=units * 0.01, settings={"data_path": "fast: ...", "workers": 4})
    store.put(gpu)  # 0.01 s per cost unit per worker, 4 workers
    minutes = sum(run_cost(c, 9469, 3925) for c in v1) * 0.01 / 4 / 60
    assert sw.estimate(v1, store) == (f"24,035 training steps, about {minutes:,.0f} min on NVIDIA H100 at the pace "
                                      f"of its 1 recorded run (fast data path, 4 workers); none of those at batch "
                                      f"size 128, so for it this extrapolates the cost model")
    # a recorded CNN BatchNorm run, three times slower per cost unit: the CNN's runs go at its pace
    cnn = RunConfig.make("cnn", "batchnorm", 128, 1e-3, 0)
    slow = fake_record(cnn)
    slow.update(device="cuda: NVIDIA H100", wall_time_s=run_cost(cnn, 9469, 3925) * 0.03,
                settings={"data_path": "fast: ...", "workers": 4})
    store.put(slow)
    minutes = sum(run_cost(c, 9469, 3925) for c in v1) * 0.03 / 4 / 60
    assert sw.estimate(v1, store) == (f"24,035 training steps, about {minutes:,.0f} min on NVIDIA H100 at the pace "
                                      f"of its 2 recorded runs (fast data path, 4 workers)")
    assert minutes >= 0.5
    quick = [RunConfig.make("cnn", "batchnorm", 128, 1e-2, 1)]  # seconds at this pace: never "about 0 min"
    assert sw.estimate(quick, store) == ("365 training steps, under a minute on NVIDIA H100 at the pace "
                                         "of its 2 recorded runs (fast data path, 4 workers)")


def test_planner_time_limit():
    runs = ["long", "mid", "short"]
    cost = {"long": 100.0, "mid": 10.0, "short": 1.0}.__getitem__
    free = _Planner(list(runs), cost, None)
    assert [free.next(0, 0) for _ in range(4)] == ["long", "mid", "short", None]
    p = _Planner(list(runs), cost, deadline=50.0, prior=(2.0, 1.0))  # 2 s per unit
    assert p.next(0, 0) == "mid"  # long would end at 200 s: skipped, the shorter one fits
    assert p.next(25, 1) == "short" and p.next(49, 1) is None and p.pending == ["long"]
    blind = _Planner(list(runs), cost, deadline=50.0)
    assert blind.next(0, 0) == "long" and blind.next(0, 1) is None  # no estimate: one run, then wait for it
    blind.finished("long", 10.0)
    assert blind.rate == 0.1 and blind.next(1, 0) == "mid"


def test_planner_projects_a_slow_group_at_its_own_pace():
    """A group (network, norm) slower than the cost model says, known from earlier records or
    from its finished runs, is projected at its own pace; a group never seen at the overall one."""
    cost = {"slow-a": 10.0, "slow-b": 10.0, "fast-a": 10.0, "new-a": 10.0}.__getitem__
    group = lambda c: c.split("-")[0]  # noqa: E731
    p = _Planner(["slow-a", "fast-a", "new-a"], cost, deadline=50.0, prior=(30.0, 30.0), group=group,
                 by_group={"slow": (25.0, 10.0), "fast": (5.0, 20.0)})  # 2.5, 0.25 and overall 1 s per unit
    assert p.rate_for("slow-a") == 2.5 and p.rate_for("fast-a") == 0.25 and p.rate_for("new-a") == 1.0
    assert p.next(30.0, 0) == "fast-a"  # slow-a would end at 55 s: past the deadline, skipped
    assert p.next(35.0, 1) == "new-a" and p.pending == ["slow-a"]  # 45 s at the overall pace
    p.finished("new-a", 40.0)  # new's own pace is now known: 4 s per unit
    assert p.rate_for("new-b") == 4.0 and p.rate_for("slow-b") == 2.5


def test_planner_scales_the_records_pace_by_this_calls():
    """Records made on a faster machine: once a run of a group the records know has ended here,
    the other groups' recorded paces are scaled by how much slower it went than they said; a
    run of a group they do not know (projected at their overall pace) does not set the scale."""
    cost = {"slow-a": 10.0, "slow-b": 10.0, "fast-a": 10.0, "fast-b": 10.0, "new-a": 10.0, "new-b": 10.0}.__getitem__
    group = lambda c: c.split("-")[0]  # noqa: E731
    p = _Planner(["fast-b"], cost, deadline=100.0, prior=(30.0, 30.0), group=group,
                 by_group={"slow": (25.0, 10.0), "fast": (5.0, 20.0)})  # 2.5, 0.25 and overall 1 s per unit
    assert p.factor == 1.0 and p.projected(["slow-a", "fast-a"]) == 27.5
    p.finished("new-a", 40.0)  # no record of new: no scale yet
    assert p.factor == 1.0 and p.rate_for("fast-b") == 0.25 and p.rate == 1.0
    p.finished("slow-a", 50.0)  # twice the 25 s its records said
    assert p.factor == 2.0
    assert p.rate_for("fast-b") == 0.5 and p.rate == 2.0  # the records' paces, doubled
    assert p.rate_for("slow-b") == 5.0 and p.rate_for("new-b") == 4.0  # paces seen in this call
    p.finished("fast-a", 15.0, share=0.5)  # paused half-way: 5 units in 15 s, 1.25 s foreseen
    assert p.factor == 65.0 / 26.25 and p.rate_for("fast-b") == 3.0
    assert p.projected(["fast-b", "new-b"]) == 70.0
    assert p.next(71.0, 0) is None and p.pending == ["fast-b"]  # 30 s more: past the deadline
    assert p.next(70.0, 0) == "fast-b"
    plain = _Planner(["a", "b"], cost=lambda c: 1.0, deadline=None, prior=(3.0, 1.0))  # no groups: any run scales
    plain.finished("a", 6.0)
    assert plain.factor == 2.0 and plain.rate == 6.0 and plain.rate_for("b") == 6.0


def test_the_prior_pace_is_kept_by_network_and_norm(data, tmp_path):
    path, identity = data
    store = ResultStore(tmp_path / "results")
    runs = {"batchnorm": 10.0, "groupnorm": 30.0}
    for norm, wall in runs.items():
        c = _smoke(identity, norm=norm)
        store.put({"format": 1, "key": c.key, "config": c.to_dict(), "status": "ok", "diverged_at": None,
                   "epochs": [], "final": {"accuracy": 0.5, "valid_loss": 1.0, "train_loss": 1.0},
                   "wall_time_s": wall, "device": "cpu: test", "settings": {"data_path": "fast: x", "workers": 2},
                   "versions": {}, "commit": "unknown", "date": "2026-01-01T00:00:00+00:00"})
    configs = [_smoke(identity, norm=n) for n in runs]
    (seconds, units), by_group = sw._prior(store, configs, "cpu", "fast", 2, lambda c: 1.0)
    assert (seconds, units) == (40.0, 2.0)
    assert by_group == {("cnn", "batchnorm"): (10.0, 1.0), ("cnn", "groupnorm"): (30.0, 1.0)}


def test_time_limit_in_one_process(data, monkeypatch, tmp_path):
    """The first run starts, takes (by its report) far too long, so nothing else is started."""
    path, identity = data
    calls = []

    def fake_run(config_ds, *args):
        [config_d] = config_ds
        calls.append(config_d)
        return [{"key": RunConfig.from_dict(config_d).key, "status": "ok", "accuracy": 0.5, "wall_time_s": 1e4, "pid": 0}]

    monkeypatch.setattr(sw, "_run_one", fake_run)
    lines = []
    configs = [_smoke(identity, bs=bs) for bs in (8, 16, 32)]
    report = sweep(configs, store=ResultStore(tmp_path), data=path, device="cpu", time_limit=60, log=lines.append)
    assert len(calls) == 1 and RunConfig.from_dict(calls[0]) == order_longest_first(configs, 200, 100, sw.CPU_BS_KNEE)[0]
    assert len(report.trained) == 1 and len(report.skipped) == 2 and report.ok
    assert "[1/3 done, 2 left, 0 running]" in lines[-2] and "run the same command again" in lines[-1]
    assert any(line.startswith("no checkpoints: a run is started on an estimate") for line in lines)


@pytest.fixture
def smoke3(monkeypatch):
    """A 3-epoch smoke protocol, so that a run can be half-made (a checkpoint after its first epoch)."""
    three = Protocol("smoke3", epochs=3, size=32, max_train=200, max_valid=100)
    monkeypatch.setitem(PROTOCOLS, three.version, three)
    return three.version


def test_resumed_runs_start_first():
    """A run resumed from a checkpoint goes before every fresh run, however short it is; each group longest first."""
    big, mid, small = (RunConfig.make(net, "batchnorm", bs, 1e-2, 0) for net, bs in (("resnet18", 2), ("cnn", 2),
                                                                                      ("cnn", 128)))
    assert sweep_order([small, mid, big], 9469, 3925) == [big, mid, small]
    assert sweep_order([small, mid, big], 9469, 3925, done_epochs={small.key: 1}) == [small, big, mid]
    # among resumed runs, by what is left: a fifth of a cnn bs-2 run is more than four fifths of a bs-128 one
    assert sweep_order([small, mid, big], 9469, 3925, done_epochs={small.key: 1, mid.key: 4}) == [mid, small, big]


def test_a_time_limit_that_fits_one_run_resumes_the_checkpointed_one(data, smoke3, monkeypatch, tmp_path):
    """With room for one run, the sweep finishes the half-made run rather than start a longer fresh one."""
    path, identity = data
    calls = []

    def fake_run(config_ds, *args):
        [config_d] = config_ds
        calls.append(RunConfig.from_dict(config_d))
        return [{"key": calls[-1].key, "status": "ok", "accuracy": 0.5, "wall_time_s": 1e4, "pid": 0}]

    monkeypatch.setattr(sw, "_run_one", fake_run)
    configs = [RunConfig.make("cnn", "batchnorm", bs, 1e-2, 0, data=identity, protocol=smoke3) for bs in (8, 16, 32)]
    resumed = order_longest_first(configs, 200, 100, sw.CPU_BS_KNEE)[-1]  # the shortest, and it has 2 of 3 epochs left
    part_made(tmp_path / "ckpt", resumed, 1)
    lines = []
    report = sweep(configs, store=ResultStore(tmp_path / "results"), data=path, device="cpu", time_limit=60,
                   checkpoints=tmp_path / "ckpt", log=lines.append)
    assert calls == [resumed] and len(report.skipped) == 2
    assert any("1 of them resume from a checkpoint" in line for line in lines)


def _state(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, from /proc; None once it is gone."""
    try:
        state, ppid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:2]
    except (OSError, ValueError):
        return None
    return state, int(ppid)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped, does not)."""
    st = _state(pid)
    return st is not None and st[0] != "Z"


def _descendants(pid: int) -> set[int]:
    """The live processes below ``pid``."""
    parents = {int(d.name): st[1] for d in Path("/proc").glob("[0-9]*")
               if (st := _state(int(d.name))) is not None and st[0] != "Z"}
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


_SLOW_SWEEP = """
    import dataclasses, sys
    from normkit.runs import PROTOCOLS, ResultStore, RunConfig
    from normkit.sweep import sweep

    data, identity, results, checkpoints = sys.argv[1:]
    # runs that would train for hours: only a kill ends them
    PROTOCOLS["slow"] = dataclasses.replace(PROTOCOLS["smoke"], version="slow", epochs=10_000, max_steps=1)
    configs = [RunConfig.make("cnn", "batchnorm", 8, 1e-2, seed, data=identity, protocol="slow") for seed in range(4)]
    sweep(configs, store=ResultStore(results), data=data, device="cpu", workers=2, checkpoints=checkpoints)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers end with their sweep on Linux only")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["kill", "kill -9"])
def test_a_killed_sweep_leaves_no_worker_training(data, tmp_path, sig):
    """``kill`` or ``kill -9`` of a sweep ends its workers too; they used to train on, orphaned,
    each taking a core and writing records (seen: two for 40 minutes after ``pkill -f 'normkit sweep'``)."""
    path, identity = data
    checkpoints, workers = tmp_path / "checkpoints", set()
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_SLOW_SWEEP), str(path), identity,
                             str(tmp_path / "results"), str(checkpoints)], cwd=Path(__file__).resolve().parents[1])
    try:
        deadline = time.time() + 600
        while not list(checkpoints.rglob("*.pt")):  # a worker has trained an epoch: it is past its start-up
            assert proc.poll() is None, f"the sweep ended early (rc {proc.returncode})"
            assert time.time() < deadline, "no worker saved a checkpoint within 10 minutes"
            time.sleep(0.2)
        workers = _descendants(proc.pid)
        assert len(workers) >= 2, workers
        proc.send_signal(sig)
        proc.wait(60)
        deadline = time.time() + 60
        while (left := {w for w in workers if _alive(w)}) and time.time() < deadline:
            time.sleep(0.2)
        assert not left, f"{len(left)} process(es) of the killed sweep still running: {sorted(left)}"
    finally:
        for pid in [proc.pid, *workers]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_two_workers_train_record_and_resume(data, tmp_path):
    path, identity = data
    store = ResultStore(tmp_path / "results")
    configs = [_smoke(identity, net, norm, seed=seed) for net in ("cnn",) for norm in ("batchnorm", "none")
               for seed in (0, 1)]
    lines = []
    report = sweep(configs, store=store, data=path, device="cpu", workers=2, fast=True, log=lines.append)
    assert report.ok and sorted(report.trained) == sorted(c.key for c in configs) and not report.skipped
    for c in configs:
        record = store.get(c)
        assert record["status"] == "ok" and record["settings"]["workers"] == 2
        assert record["settings"]["data_path"].startswith("fast")
    assert sum("done" in line for line in lines) == 4 and "ETA" in lines[-2]
    # the same call again trains nothing
    again = sweep(configs, store=store, data=path, device="cpu", workers=2, fast=True, log=lines.append)
    assert again.trained == [] and again.recorded == 4 and "nothing to train" in lines[-1]
    # records made with 2 workers tell how long runs take, so a short limit starts none of new runs
    more = [_smoke(identity, "cnn", "batchnorm", seed=seed) for seed in (5, 6)]
    late = sweep(more, store=store, data=path, device="cpu", workers=2, fast=True, time_limit=1e-3, log=lines.append)
    assert late.trained == [] and len(late.skipped) == 2 and store.missing(more) == more


def test_units_pack_runs_that_differ_only_in_their_seed_and_learning_rate():
    configs = [RunConfig.make("cnn", norm, 2, lr, seed) for norm in ("batchnorm", "groupnorm") for lr in (1e-2, 1e-3)
               for seed in (0, 1, 2)]
    assert sw.make_units(configs, 1) == [(c,) for c in configs]
    units = sw.make_units(configs, 2, mix_lr=False)
    assert [len(u) for u in units] == [2, 1] * 4
    assert [c for u in units for c in u] == configs  # each run once, in order
    for u in units:
        assert len({(c.norm, c.lr) for c in u}) == 1 and len({c.seed for c in u}) == len(u)
    assert [len(u) for u in sw.make_units(configs[::-1], 3, mix_lr=False)] == [3] * 4
    mixed = sw.make_units(configs, 6)
    assert [len(u) for u in mixed] == [6, 6] and [{c.norm for c in u} for u in mixed] == [{"batchnorm"}, {"groupnorm"}]
    assert [len(u) for u in sw.make_units(configs, 4)] == [4, 2, 4, 2]


def test_a_run_that_resumes_is_not_packed(data, smoke3, tmp_path):
    """``pack=3`` with one of three seeds half-made: that run is trained alone (and first), the other two in a pack."""
    path, identity = data
    configs = [RunConfig.make("cnn", "batchnorm", 8, 1e-2, seed, data=identity, protocol=smoke3) for seed in range(3)]
    part_made(tmp_path / "ckpt", configs[1], 1)
    lines = []
    sweep(configs, store=ResultStore(tmp_path / "results"), data=path, device="cpu", fast=True, pack=3,
          checkpoints=tmp_path / "ckpt", dry_run=True, log=lines.append)
    missing = [line for line in lines if "missing:" in line]
    assert "packs of up to 3 runs (2 units)" in lines[0]
    assert "seed=1" in missing[0] and "pack" not in missing[0]
    assert all("seed=1" not in line and "[a pack of 2]" in line for line in missing[1:]) and len(missing) == 3


def test_a_packed_sweep_records_each_run_and_resumes(data, tmp_path):
    """``pack=3``: one unit of three seeds, one of one; each run gets its own record, saying it was
    packed; the pace of packed records is each run's share of its pack's time."""
    path, identity = data
    store = ResultStore(tmp_path / "results")
    configs = [_smoke(identity, bs=4, seed=seed) for seed in (0, 1, 2, 3)]
    lines = []
    report = sweep(configs, store=store, data=path, device="cpu", workers=1, fast=True, pack=3, log=lines.append)
    assert report.ok and sorted(report.trained) == sorted(c.key for c in configs)
    assert "packs of up to 3 runs (2 units)" in lines[0]
    packs = [store.get(c)["settings"].get("packed") for c in configs]
    assert [p["runs"] if p else 1 for p in packs] == [3, 3, 3, 1] and packs[0]["seeds"] == [0, 1, 2]
    assert sum("done" in line for line in lines) == 4 and sum("(a pack of 3)" in line for line in lines) == 3
    timed = {c.seed: (how, wall) for how, c, wall in sw._timed_runs(store, ["smoke"])}
    assert timed[0][0][1] == "fast, packs of 3" and timed[3][0][1] == "fast"
    assert timed[0][1] == pytest.approx(store.get(configs[0])["wall_time_s"] / 3)
    again = sweep(configs, store=store, data=path, device="cpu", fast=True, pack=3, log=lines.append)
    assert again.trained == [] and "nothing to train" in lines[-1]


def _start_method(_):
    import multiprocessing

    return multiprocessing.get_start_method()


def test_workers_fork_their_dataloader_workers():
    """Pool workers are spawned, but a plain run's DataLoader workers inside them must fork: spawning
    them pickles DataLoaders that hold CUDA tensors, which fails (seen on an H200)."""
    from concurrent.futures import ProcessPoolExecutor

    import torch.multiprocessing as tmp

    with ProcessPoolExecutor(1, mp_context=tmp.get_context("spawn"), initializer=sw._worker_init,
                             initargs=({}, 1)) as pool:
        assert pool.submit(_start_method, None).result() == "fork"


def test_a_failing_run_is_reported_and_the_others_go_on(data, monkeypatch, tmp_path):
    path, identity = data
    real = sw._run_one

    def flaky(config_ds, *args):
        if config_ds[0]["seed"] == 1:
            raise RuntimeError("boom\nmore")
        return real(config_ds, *args)

    monkeypatch.setattr(sw, "_run_one", flaky)
    lines = []
    configs = [_smoke(identity, seed=s) for s in (0, 1)]
    report = sweep(configs, store=ResultStore(tmp_path), data=path, device="cpu", fast=False, num_workers=0,
                   log=lines.append)
    assert len(report.trained) == 1 and list(report.failed.values()) == ["RuntimeError: boom"]
    assert any("FAILED: RuntimeError: boom" in line for line in lines)
    record = json.loads(ResultStore(tmp_path).path(configs[0]).read_text())
    assert record["settings"]["data_path"].startswith("plain") and record["settings"]["workers"] == 1
    # the plain path states what the fast path states about validation and precision
    assert record["settings"]["valid_bs"] == 128 and "cudnn_allow_tf32" in record["settings"]


def test_cli_compile_modes_are_torch_compile_modes():
    from normkit.cli import _parser
    from normkit.fastdata import COMPILE_MODES as FAST_MODES

    sweep_parser = next(a for a in _parser()._subparsers._group_actions[0].choices.values() if a.prog.endswith("sweep"))
    [compile_arg] = [a for a in sweep_parser._actions if a.dest == "compile"]
    assert tuple(compile_arg.choices) == FAST_MODES


def test_cli_status_says_what_is_left(smoke, capsys):
    from normkit.cli import main

    assert main(["status", "--chapter", "baseline"]) == 0
    out = capsys.readouterr().out
    # smoke: 12 runs of 1 step (bs 128, 160 images) and 12 of 6 (bs 2, capped)
    assert out.startswith("baseline: 0/24 runs recorded (protocol smoke") and "to make: 84 training steps" in out
    assert "fast-path check" not in out
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert out.count("runs recorded (protocol smoke") == 5
    check, six, packs = out.splitlines()[-3:]
    assert check.startswith("fast-path check: 0/12 runs recorded (fast and plain paths); to make: uv run python")
    assert six.startswith("fast-path check, six seeds at bs 2: 0/12 runs recorded") and six.endswith("--bs 2 --seeds 6")
    assert packs == "packs check: 0/6 runs recorded in packs; to make: " + study.PACK_CHECK_COMMAND


def test_cli_prints_no_library_warnings(tmp_path):
    """A command's output starts with its own lines, not a library's deprecation warnings."""
    proc = subprocess.run([sys.executable, "-m", "normkit", "status", "--chapter", "baseline",
                           "--results", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("baseline: 0/24 runs recorded"), proc.stdout
    assert "Warning" not in proc.stderr and "jit.script" not in proc.stderr, proc.stderr


def test_cli_dry_run(smoke, capsys):
    from normkit.cli import main

    assert main(["sweep", "--chapter", "batchnorm", "--net", "cnn", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "12 to train (1 worker on cpu, plain data path)" in out and out.count("missing:") == 12
    listed = [line for line in out.splitlines() if "missing:" in line]
    costs = [float(line.rsplit("(cost ", 1)[1].rstrip(")").replace(",", "")) for line in listed]
    assert costs == sorted(costs, reverse=True) and costs[0] > costs[-1]  # longest first
    # in smoke runs on a CPU, one 128-image step outweighs six 2-image steps
    assert "bs=128 " in listed[0]
    assert main(["sweep", "--chapter", "batchnorm", "--net", "cnn", "--bs", "2", "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "missing:" in line]
    assert len(listed) == 6 and all("bs=2 " in line for line in listed)
    # the whole study at one batch size skips the chapter without it (eps_sweep is batch size 2 only)
    assert main(["sweep", "--chapter", "all", "--net", "resnet18", "--bs", "128", "--dry-run"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "missing:" in line]
    assert len(listed) == 3 * 6 + 9 * 6 and all("bs=128 " in line for line in listed)


def test_cli_time_limit_reaches_the_probes(smoke, monkeypatch, tmp_path):
    """The small-batch chapter's probes come after its runs and keep to the same --time-limit."""
    import time

    import normkit.probes
    import normkit.sweep
    from normkit.cli import main
    from normkit.sweep import SweepReport

    calls = []
    monkeypatch.setattr(normkit.sweep, "sweep", lambda configs, **kw: SweepReport())
    monkeypatch.setattr(normkit.probes, "make_probes", lambda configs, store, **kw: calls.append(kw) or [])
    before = time.monotonic()
    assert main(["sweep", "--chapter", "small_batch", "--results", str(tmp_path), "--time-limit", "600"]) == 0
    assert main(["sweep", "--chapter", "small_batch", "--results", str(tmp_path)]) == 0
    assert [kw["train"] for kw in calls] == [True, True]
    assert before + 600 <= calls[0]["deadline"] <= time.monotonic() + 600 and calls[1]["deadline"] is None


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers: '0' must be at least 1"),
    (["--time-limit", "soon"], "is not a number of seconds"),
    (["--fast", "--plain"], "not allowed with argument"),
    (["--plain", "--channels-last"], "apply to the fast path"),
    (["--plain", "--compile", "default"], "apply to the fast path"),
    (["--plain", "--fastai-learner"], "apply to the fast path"),
    (["--plain", "--pack", "3"], "apply to the fast path"),
    (["--pack", "0"], "--pack: '0' must be at least 1"),
    (["--compile", "fast"], "argument --compile: invalid choice: 'fast'"),
    (["--net", "vgg"], "network(s) vgg not in grid"),
    (["--bs", "64"], "batch size(s) 64 not in grid 'batchnorm'; its batch sizes: 128, 2"),
    (["--bs", "two"], "--bs: 'two' is not a whole number"),
    (["--device", "cuda"], "CUDA is not available"),
])
def test_cli_bad_inputs_give_one_line(smoke, capsys, args, message):
    import torch

    from normkit.cli import main

    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    try:
        code = main(["sweep", "--chapter", "batchnorm", "--dry-run", *args])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.startswith("normkit: error:") and err.count("\n") == 1


def test_cli_whole_study_at_an_unknown_batch_size_names_the_studys_batch_sizes(smoke, capsys):
    from normkit.cli import main
    from normkit.study import CHAPTERS, chapter

    code = main(["sweep", "--chapter", "all", "--bs", "64", "--dry-run"])
    err = capsys.readouterr().err
    every = sorted({b for name in CHAPTERS for b in chapter(name).batch_sizes}, reverse=True)
    assert code == 2 and err.count("\n") == 1
    assert f"batch size(s) 64 not in any chapter; the study's batch sizes: {', '.join(map(str, every))}" in err


@pytest.mark.parametrize("checkpoints", [False, True])
def test_cli_interrupted_says_what_is_kept_and_how_to_resume(smoke, tmp_path, monkeypatch, capsys, checkpoints):
    """Ctrl-C in ``normkit sweep`` ends with one line and code 130, naming what a rerun resumes."""
    import normkit.sweep
    from normkit.cli import main

    def interrupted(configs, **kw):
        raise KeyboardInterrupt

    monkeypatch.delenv("NORMKIT_CHECKPOINTS", raising=False)
    monkeypatch.setattr(normkit.sweep, "sweep", interrupted)
    extra = ["--checkpoints", str(tmp_path / "ckpt")] if checkpoints else []
    assert main(["sweep", "--chapter", "batchnorm", "--results", str(tmp_path), *extra]) == 130
    err = capsys.readouterr().err
    kept = ", and runs in flight up to their last epoch" if checkpoints else ""
    assert err == f"normkit: interrupted; finished runs are recorded{kept}: rerun the same command to resume\n"


PLAIN_ONLY = "channels_last, compile, pack and graph apply to the fast data path only"
MPS_OFF_CUDA = r"^mps=True needs a CUDA device \(CUDA MPS\); got device cpu$"


@pytest.mark.parametrize("options, message", [
    pytest.param({"workers": 0}, "workers=0 is invalid; it must be a positive integer", id="workers-0"),
    pytest.param({"workers": True}, "workers=True is invalid", id="workers-bool"),
    pytest.param({"time_limit": 0}, "time_limit=0 is invalid; it must be a positive number of seconds",
                 id="time-limit-0"),
    pytest.param({"pack": 0, "fast": True}, r"pack=0 is invalid; it must be a positive integer \(1: no packing\)",
                 id="pack-0"),
    pytest.param({"fast": False, "channels_last": True}, PLAIN_ONLY, id="channels-last-plain"),
    pytest.param({"fast": False, "compile": "default"}, PLAIN_ONLY, id="compile-plain"),
    pytest.param({"fast": False, "pack": 2}, PLAIN_ONLY, id="pack-plain"),
    pytest.param({"fast": False, "graph": True}, PLAIN_ONLY, id="graph-plain"),
    pytest.param({"fast": True, "graph": True}, "graph=True needs a CUDA device", id="graph-cpu"),
    pytest.param({"fast": True, "mps": True}, MPS_OFF_CUDA, id="mps-cpu"),
    pytest.param({"fast": True, "mps": True, "dry_run": True}, MPS_OFF_CUDA, id="mps-cpu-dry-run"),
    pytest.param({"fast": True, "mps": True, "data": "/nonexistent"}, MPS_OFF_CUDA, id="mps-cpu-before-the-data"),
])
def test_sweep_rejects_bad_options_in_one_line(data, tmp_path, options, message):
    """Each bad option is named with its value before anything is read or trained."""
    path, identity = data
    with pytest.raises(ValueError, match=message) as e:
        sweep([_smoke(identity)], store=ResultStore(tmp_path), device="cpu", **{"data": path, **options})
    assert "\n" not in str(e.value) and not list(tmp_path.iterdir())
