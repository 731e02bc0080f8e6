"""Checkpoints: a run stopped after an epoch and resumed is the run it would have been."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from normkit import runs
from normkit.data import data_info
from normkit.fastdata import FastPath
from normkit.runs import PROTOCOLS, Checkpoints, Protocol, ResultStore, RunConfig, train

from part_made import part_made
from torch_state import torch_threads

#: The smoke protocol with three epochs: a checkpoint after the first, one to resume, one after that.
THREE = Protocol("resume3", epochs=3, size=32, max_train=160, max_valid=40, max_steps=6)


@pytest.fixture(autouse=True)
def three(monkeypatch):
    monkeypatch.setitem(PROTOCOLS, THREE.version, THREE)


def cfg(mini_data, norm="groupnorm", seed=0):
    return RunConfig.make("cnn", norm, 2, 1e-3, seed, data=data_info(mini_data).identity, protocol=THREE.version)


class Stopped(Exception):
    pass


def stop_after_saves(monkeypatch, n: int) -> None:
    """Make a run stop (raise :class:`Stopped`) right after its ``n``-th checkpoint is written."""
    real, count = Checkpoints.save, []

    def save(self, config, state):
        real(self, config, state)
        count.append(1)
        if len(count) == n:
            raise Stopped("stopped on purpose")

    monkeypatch.setattr(Checkpoints, "save", save)


def weights_into(out: dict):
    return lambda learn: out.update({k: v.detach().clone() for k, v in learn.model.state_dict().items()})


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA GPU (tests/benchmarks/gpu_checks.py runs it there)")


@pytest.mark.parametrize("path, loaders, device", [
    ("plain", 0, "cpu"), ("plain", 2, "cpu"), ("fast", 0, "cpu"),
    pytest.param("plain", 0, "cuda", marks=CUDA), pytest.param("fast", 0, "cuda", marks=CUDA)])
def test_a_resumed_run_is_the_run_it_would_have_been(mini_data, tmp_path, monkeypatch, path, loaders, device):
    """Stopped after its first epoch and resumed, a run ends with the same weights and the same
    metrics, to the bit on a CPU, as the run made in one go (with fastai's data workers too).
    On CUDA (random states and optimizer state moved between devices) to float rounding."""
    c, fast = cfg(mini_data), (FastPath() if path == "fast" else None)
    w_whole, w_resumed = {}, {}
    whole = train(c, mini_data, num_workers=loaders, fast=fast, device=device, on_trained=weights_into(w_whole))
    with monkeypatch.context() as m:
        stop_after_saves(m, 1)
        with pytest.raises(Stopped):
            train(c, mini_data, num_workers=loaders, fast=fast, device=device, checkpoints=tmp_path)
    assert Checkpoints(tmp_path).progress(c) == 1
    resumed = train(c, mini_data, num_workers=loaders, fast=fast, device=device, checkpoints=tmp_path,
                    on_trained=weights_into(w_resumed))
    if device == "cpu":
        assert resumed["epochs"] == whole["epochs"] and resumed["final"] == whole["final"]
        assert same_weights(w_resumed, w_whole)
    else:
        for a, b in zip(resumed["epochs"], whole["epochs"], strict=True):
            assert a == pytest.approx(b, rel=1e-3)
        assert all(torch.allclose(w_resumed[k].float(), w_whole[k].float(), rtol=1e-3, atol=1e-5) for k in w_whole)
    [earlier] = resumed["settings"]["resumed"]  # the part before the stop, named in the record
    assert earlier["epochs"] == [0, 1] and earlier["device"] == whole["device"]
    assert earlier["commit"] == whole["commit"] and earlier["versions"] == whole["versions"]
    assert resumed["wall_time_s"] > earlier["wall_time_s"] > 0 and resumed["cpu_time_s"] > earlier["cpu_time_s"]
    assert "resumed" not in whole["settings"]


def test_the_random_state_is_part_of_the_checkpoint(mini_data, tmp_path, monkeypatch):
    """The comparison above can fail: resumed without its random state, a run shuffles and
    augments its next epochs otherwise, and ends elsewhere."""
    c = cfg(mini_data)
    whole = train(c, mini_data, num_workers=0)
    with monkeypatch.context() as m:
        stop_after_saves(m, 1)
        with pytest.raises(Stopped):
            train(c, mini_data, num_workers=0, checkpoints=tmp_path)
    monkeypatch.setattr(runs, "_set_rng_state", lambda learn, state: None)
    resumed = train(c, mini_data, num_workers=0, checkpoints=tmp_path)
    assert resumed["epochs"][0] == whole["epochs"][0]  # the epoch made before the stop
    assert resumed["epochs"][1:] != whole["epochs"][1:]


def test_checkpoints_hold_plain_data_only(mini_data, tmp_path, monkeypatch):
    """A checkpoint loads with ``weights_only=True`` (no code runs from the file), and is not
    written after the last epoch: the record is."""
    c = cfg(mini_data)
    with monkeypatch.context() as m:
        stop_after_saves(m, 2)
        with pytest.raises(Stopped):
            train(c, mini_data, num_workers=0, checkpoints=tmp_path)
    state_file, summary_file = Checkpoints(tmp_path).paths(c)
    state = torch.load(state_file, weights_only=True)
    assert state["key"] == c.key and len(state["epochs"]) == 2 and state["how"] == "plain"
    summary = json.loads(summary_file.read_text())
    assert summary["epochs_done"] == 2 and summary["epochs"] == state["epochs"]
    assert [s["epochs"] for s in summary["segments"]] == [[0, 2]]
    saves = []
    real = Checkpoints.save
    monkeypatch.setattr(Checkpoints, "save", lambda self, config, st: saves.append(1) or real(self, config, st))
    record = train(c, mini_data, num_workers=0, checkpoints=tmp_path)
    assert saves == [] and record["status"] == "ok"  # resumed at the last epoch: nothing more to save


@pytest.mark.parametrize("damage", ["garbage", "other path", "other run", "other flush"])
def test_a_checkpoint_that_does_not_fit_is_reported_and_not_used(mini_data, tmp_path, monkeypatch, damage):
    c = cfg(mini_data)
    whole = train(c, mini_data, num_workers=0)
    with monkeypatch.context() as m:
        stop_after_saves(m, 1)
        with pytest.raises(Stopped):
            train(c, mini_data, num_workers=0, checkpoints=tmp_path, fast=FastPath() if damage == "other path" else None,
                  flush=damage != "other flush")
    state_file = Checkpoints(tmp_path).paths(c)[0]
    if damage == "garbage":
        state_file.write_bytes(b"not a checkpoint")
    elif damage == "other run":
        other = cfg(mini_data, seed=1)
        state = torch.load(state_file, weights_only=True)
        state["key"] = other.key
        torch.save(state, state_file)
    with pytest.warns(UserWarning, match="not used, the run starts afresh"):
        record = train(c, mini_data, num_workers=0, checkpoints=tmp_path, flush=True)
    assert record["epochs"] == whole["epochs"] and "resumed" not in record["settings"]


@pytest.mark.parametrize("old", [False, True])
def test_a_run_resumes_with_denormals_as_its_checkpoint_made_them(mini_data, tmp_path, monkeypatch, old):
    """A CPU run flushes denormals by default (runs.flush_denormals), but one resumed from a
    checkpoint made without (or ``old``: from before the switch existed) goes on without: the
    whole run is made one way, and resumes to the bit."""
    c = cfg(mini_data)
    whole = train(c, mini_data, num_workers=0, flush=False)
    with monkeypatch.context() as m:
        stop_after_saves(m, 1)
        with pytest.raises(Stopped):
            train(c, mini_data, num_workers=0, checkpoints=tmp_path, flush=False)
    state_file, summary_file = Checkpoints(tmp_path).paths(c)
    if old:
        state = torch.load(state_file, weights_only=True)
        del state["flush_denormals"]
        torch.save(state, state_file)
        summary = json.loads(summary_file.read_text())
        del summary["flush_denormals"]
        summary_file.write_text(json.dumps(summary))
    assert Checkpoints(tmp_path).flushes(c) is False
    resumed = train(c, mini_data, num_workers=0, checkpoints=tmp_path)
    assert resumed["settings"]["resumed"] and resumed["settings"]["flush_denormals"] is False
    assert resumed["epochs"] == whole["epochs"]


KILL_SCRIPT = """
import sys
from normkit.runs import PROTOCOLS, Protocol, RunConfig, train
from normkit.data import data_info
PROTOCOLS["resume3"] = Protocol("resume3", epochs=3, size=32, max_train=160, max_valid=40, max_steps=6)
c = RunConfig.make("cnn", "groupnorm", 2, 1e-3, 0, data=data_info(sys.argv[1]).identity, protocol="resume3")
print("started", flush=True)
train(c, sys.argv[1], num_workers=0, checkpoints=sys.argv[2])
"""


def test_a_killed_run_resumes_from_its_checkpoint(mini_data, tmp_path):
    """SIGKILL a run once it has written a checkpoint: the next call resumes it, and the record
    is the one the run makes in one go."""
    c = cfg(mini_data)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(mini_data), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    summary = Checkpoints(tmp_path).paths(c)[1]
    deadline = time.time() + 240
    while time.time() < deadline and not summary.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = Checkpoints(tmp_path).progress(c)
    assert done in (1, 2), "the run should have written a checkpoint before it was killed"
    resumed = train(c, mini_data, num_workers=0, checkpoints=tmp_path)
    whole = train(c, mini_data, num_workers=0)
    assert resumed["epochs"] == whole["epochs"]
    assert resumed["settings"]["resumed"][-1]["epochs"][1] == done


def test_a_sweep_resumes_from_checkpoints_and_removes_them(mini_data, tmp_path, monkeypatch):
    from normkit.sweep import sweep

    c, other = cfg(mini_data), cfg(mini_data, seed=1)
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        stop_after_saves(m, 1)
        with pytest.raises(Stopped):
            train(c, mini_data, num_workers=0, checkpoints=ckpt)
    lines = []
    store = ResultStore(tmp_path / "results")
    report = sweep([c, other], store=store, data=mini_data, device="cpu", fast=False, num_workers=0,
                   checkpoints=ckpt, log=lines.append)
    assert report.ok and len(report.trained) == 2
    assert any("1 of them resume from a checkpoint" in line and "after 1 of 3 epochs" in line for line in lines)
    record = store.get(c)
    assert [s["epochs"] for s in record["settings"]["resumed"]] == [[0, 1]]
    assert record["epochs"] == train(c, mini_data, num_workers=0)["epochs"]
    assert "resumed" not in store.get(other)["settings"]
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.json"))  # removed with their records


def test_the_cli_lists_runs_to_resume(tmp_path, capsys):
    """``normkit sweep --checkpoints DIR --dry-run`` says which runs resume, and from where."""
    from normkit.cli import main
    from normkit.study import chapter, grid_configs

    configs = grid_configs([chapter("batchnorm").subset(nets=["cnn"], batch_sizes=[128])])
    c = configs[0]
    part_made(tmp_path / "ckpt", c, 3)
    rc = main(["sweep", "--chapter", "batchnorm", "--net", "cnn", "--bs", "128", "--dry-run",
               "--results", str(tmp_path / "results"), "--checkpoints", str(tmp_path / "ckpt")])
    out = capsys.readouterr().out
    assert rc == 0 and f"1 of them resume from a checkpoint in {tmp_path / 'ckpt'}: {c.describe()} after 3 of 5 epochs" in out


def test_the_environment_names_a_default_folder(mini_data, tmp_path, monkeypatch):
    """``NORMKIT_CHECKPOINTS`` is the sweep's default folder: a chapter's own runs resume too."""
    from normkit.sweep import sweep

    c = cfg(mini_data)
    with monkeypatch.context() as m:
        stop_after_saves(m, 1)
        with pytest.raises(Stopped):
            train(c, mini_data, num_workers=0, checkpoints=tmp_path / "env")
    monkeypatch.setenv("NORMKIT_CHECKPOINTS", str(tmp_path / "env"))
    lines = []
    sweep([c], store=ResultStore(tmp_path / "results"), data=mini_data, device="cpu", fast=False, num_workers=0,
          log=lines.append)
    assert any("resume from a checkpoint in " + str(tmp_path / "env") in line for line in lines)
    assert ResultStore(tmp_path / "results").get(c)["settings"]["resumed"][0]["epochs"] == [0, 1]


def test_a_sweep_counts_only_the_epochs_a_run_has_left(mini_data, tmp_path):
    """A run with 2 of its 3 epochs in a checkpoint costs a third of a fresh one (for the time
    limit and the ETA), and it starts before the fresh runs, though it is the shorter."""
    from normkit.sweep import sweep

    resumed, fresh = cfg(mini_data), cfg(mini_data, seed=1)
    part_made(tmp_path / "ckpt", resumed, 2)
    lines = []
    sweep([resumed, fresh], store=ResultStore(tmp_path / "results"), data=mini_data, device="cpu", fast=False,
          checkpoints=tmp_path / "ckpt", dry_run=True, log=lines.append)
    listed = [line for line in lines if line.lstrip().startswith("missing:")]
    assert [resumed.describe() in listed[0], fresh.describe() in listed[1]] == [True, True]
    cost = [float(line.rsplit("(cost ", 1)[1].rstrip(")").replace(",", "")) for line in listed]
    assert cost[0] == pytest.approx(cost[1] / 3, abs=0.5)  # printed rounded


def test_the_cli_status_counts_part_made_runs(tmp_path, capsys):
    from normkit.cli import main
    from normkit.study import chapter

    configs = chapter("baseline").configs()
    for c, done in zip(configs[:2], (2, 4)):
        part_made(tmp_path / "ckpt", c, done)
    args = ["status", "--chapter", "baseline", "--results", str(tmp_path / "results")]
    assert main(args) == 0 and "part-made" not in capsys.readouterr().out
    assert main(args + ["--checkpoints", str(tmp_path / "ckpt")]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith(f"; 2 of them part-made in {tmp_path / 'ckpt'} (6 of their 10 epochs)")


def test_a_run_pauses_where_its_next_epoch_would_end_past_its_deadline(mini_data, tmp_path):
    """With a deadline already past, a run stops after its first checkpoint (RunPaused), and
    resumed without one it is the run made in one go; a far deadline changes nothing."""
    c = cfg(mini_data)
    whole = train(c, mini_data, num_workers=0)
    with pytest.raises(runs.RunPaused, match=rf"run {c.key} paused after 1 of 3 epochs \(checkpoint saved\)") as e:
        train(c, mini_data, num_workers=0, checkpoints=tmp_path, deadline=time.time())
    assert (e.value.key, e.value.done, e.value.epochs) == (c.key, 1, 3)
    assert Checkpoints(tmp_path).progress(c) == 1
    resumed = train(c, mini_data, num_workers=0, checkpoints=tmp_path, deadline=time.time() + 3600)
    assert resumed["epochs"] == whole["epochs"] and [s["epochs"] for s in resumed["settings"]["resumed"]] == [[0, 1]]
    with pytest.raises(ValueError, match=r"deadline=1\.0 needs checkpoints"):
        train(c, mini_data, num_workers=0, deadline=1.0)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sweep_pauses_a_run_at_its_time_limit_and_resumes_it(mini_data, tmp_path, workers):
    """A sweep's first run starts with no estimate of its time; when its next epoch would end
    past the time limit, it pauses (in a worker process too) and keeps its checkpoint; its pace
    then tells that the other run does not fit, so that one does not start. The same call
    without the limit resumes the first to the run made in one go."""
    from normkit.sweep import sweep

    c, other = cfg(mini_data), cfg(mini_data, seed=1)
    store, ckpt, lines = ResultStore(tmp_path / "results"), tmp_path / "ckpt", []
    report = sweep([c, other], store=store, data=mini_data, device="cpu", fast=False, num_workers=0, workers=workers,
                   checkpoints=ckpt, time_limit=1e-3, log=lines.append)
    assert report.ok and report.paused == {c.key: 1} and not report.trained and report.skipped == [other.key]
    assert store.missing([c]) == [c] and Checkpoints(ckpt).progress(c) == 1
    assert any("[0/2 done, 2 left" in line and "paused after 1 of 3 epochs" in line for line in lines)
    assert "1 paused at the time limit" in lines[-1] and "1 not started within the time limit" in lines[-1]
    assert not any(line.startswith("no checkpoints") for line in lines)
    again = sweep([c], store=store, data=mini_data, device="cpu", fast=False, num_workers=0, workers=workers,
                  checkpoints=ckpt, log=lines.append)
    assert again.trained == [c.key] and not again.paused
    # The one-go run is made with the thread count the record names: the logged training loss is
    # a multi-threaded reduction, whose last bits depend on it (seen on an AMD EPYC).
    with torch_threads(store.get(c)["settings"]["threads"]):
        whole = train(c, mini_data, num_workers=0)
    assert store.get(c)["epochs"] == whole["epochs"]
