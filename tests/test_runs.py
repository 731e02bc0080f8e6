import json
import os
import platform
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
from torch import nn

from normkit import norms
from normkit.data import data_info
from normkit.runs import RunConfig, ResultStore, cpu_capability, cpu_model, device_name, run_grid, train

from torch_state import torch_threads


def cfg(mini_data, **kw):
    args = dict(net="cnn", norm="batchnorm", bs=2, lr=1e-3, seed=0)
    args.update(kw)
    return RunConfig.make(args.pop("net"), args.pop("norm"), args.pop("bs"), args.pop("lr"), args.pop("seed"),
                          data=data_info(mini_data).identity, protocol="smoke")


# -- configs ---------------------------------------------------------------------------

def test_config_key_is_stable_and_distinct(mini_data):
    a, b = cfg(mini_data), cfg(mini_data)
    assert a == b and a.key == b.key and len(a.key) == 16
    others = [cfg(mini_data, seed=1), cfg(mini_data, bs=128), cfg(mini_data, lr=1e-2), cfg(mini_data, net="resnet18"),
              RunConfig.make("cnn", norms.get_norm("batchnorm", eps=0.1), 2, 1e-3, 0, data=a.data, protocol="smoke")]
    assert len({a.key, *[o.key for o in others]}) == 6
    assert RunConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a


@pytest.mark.parametrize("kw, match", [
    (dict(net="vgg"), "unknown network 'vgg'; valid networks: cnn, resnet18"),
    (dict(norm="batchnrom"), "unknown norm 'batchnrom'; valid norms: .*batchnorm"),
    (dict(bs=0), "bs=0"),
    (dict(bs=2.0), "bs=2.0"),
    (dict(lr=-1), "lr=-1"),
    (dict(seed=-3), "seed=-3"),
])
def test_bad_configs(mini_data, kw, match):
    with pytest.raises(ValueError, match=match):
        cfg(mini_data, **kw)


def test_unknown_protocol():
    with pytest.raises(ValueError, match="unknown protocol 'fast'; valid protocols: v1, smoke"):
        RunConfig.make("cnn", "none", 2, 1e-3, 0, protocol="fast")


def test_bad_smoke_variable(monkeypatch):
    from normkit.runs import current_protocol

    monkeypatch.setenv("NORMKIT_SMOKE", "yes")
    with pytest.raises(ValueError, match="NORMKIT_SMOKE='yes'"):
        current_protocol()


# -- the store -------------------------------------------------------------------------

def fake_record(config, acc=0.5, status="ok"):
    """A syntactically valid record for store tests (never shown anywhere)."""
    return {"format": 1, "key": config.key, "config": config.to_dict(), "status": status, "diverged_at": None,
            "epochs": [], "final": None if status == "diverged" else {"accuracy": acc, "valid_loss": 1.0, "train_loss": 1.0},
            "wall_time_s": 1.0, "device": "test", "versions": {}, "commit": "test", "date": "2026-01-01T00:00:00+00:00"}


def test_store_roundtrip_and_atomic_write(mini_data, tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    c = cfg(mini_data)
    assert store.get(c) is None and store.missing([c]) == [c]
    path = store.put(fake_record(c))
    assert path == tmp_path / "smoke" / f"{c.key}.json"
    assert store.get(c)["final"]["accuracy"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left

    # a crash between writing and renaming leaves the old record intact and no half file
    def crash(*a):
        raise OSError("killed")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        store.put(fake_record(c, acc=0.9))
    assert store.get(c)["final"]["accuracy"] == 0.5


@pytest.mark.parametrize("damage", [
    lambda p, r: p.write_text(json.dumps(r)[:40]),                                  # truncated
    lambda p, r: p.write_text(json.dumps({**r, "key": "0" * 16})),                  # wrong key
    lambda p, r: p.write_text(json.dumps({k: v for k, v in r.items() if k != "final"})),  # missing field
    lambda p, r: p.write_text(json.dumps({**r, "final": {"accuracy": "high"}})),    # bad metrics
    lambda p, r: p.write_text("[]"),
])
def test_damaged_record_is_reported_and_ignored(mini_data, tmp_path, damage):
    store = ResultStore(tmp_path)
    c = cfg(mini_data)
    path = store.put(fake_record(c))
    damage(path, fake_record(c))
    with pytest.warns(UserWarning, match="damaged record"):
        assert store.get(c) is None
    assert str(path) in store.damaged
    assert store.missing([c]) == [c]


def test_damaged_record_is_redone_by_the_grid(mini_data, tmp_path):
    store = ResultStore(tmp_path)
    c = cfg(mini_data, bs=128)
    store.path(c).parent.mkdir(parents=True)
    store.path(c).write_text("{not json")
    with pytest.warns(UserWarning, match="damaged record"):
        [record] = run_grid([c], store, mini_data, num_workers=0, log=None)
    assert record["status"] == "ok" and store.get(c) == record


# -- training --------------------------------------------------------------------------

def test_record_contents(mini_data, tmp_path):
    c = cfg(mini_data)
    [r] = run_grid([c], ResultStore(tmp_path), mini_data, num_workers=0, log=None)
    assert r["status"] == "ok" and r["key"] == c.key and r["config"] == c.to_dict()
    assert len(r["epochs"]) == c.epochs
    assert set(r["epochs"][0]) == {"epoch", "train_loss", "valid_loss", "accuracy"}
    assert 0 <= r["final"]["accuracy"] <= 1
    assert r["device"] == device_name(torch.device("cpu")) and r["versions"]["fastai"] and r["versions"]["torch"]
    assert r["data_source"]["identity"] == c.data and r["data_source"]["fingerprint"]
    assert r["commit"] and r["date"].startswith("20") and r["wall_time_s"] > 0
    # the CPU seconds of the training process: over the wall time, the cores the run kept busy
    assert 0 < r["cpu_time_s"] <= r["wall_time_s"] * torch.get_num_threads() + 1
    assert r["settings"]["threads"] == torch.get_num_threads()


def test_a_cpu_record_names_the_cpu_model(tmp_path):
    """Two machines that both say ``x86_64`` can differ several times in speed: a record names the model."""
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC  9654 96-Core Processor\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC  9654 96-Core Processor\n")
    assert cpu_model(info) == "AMD EPYC 9654 96-Core Processor"
    assert cpu_model(tmp_path / "absent") == cpu_model(tmp_path) and cpu_model(tmp_path)  # no such file: the architecture
    name = device_name(torch.device("cpu"))
    assert name == f"cpu: {cpu_model()} ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})"
    if sys.platform.startswith("linux") and "model name" in open("/proc/cpuinfo").read():
        assert cpu_model() not in ("x86_64", "aarch64", "")


def test_a_cpu_record_names_the_vector_instructions(monkeypatch):
    """Two machines reporting the same CPU model can differ in the vector instructions torch uses,
    and so in speed: a record names them, and leaves them out where torch cannot say."""
    if platform.machine() in ("x86_64", "AMD64"):
        assert cpu_capability() in {"DEFAULT", "AVX2", "AVX512"}
    for capability, tail in [("AVX2", " cores, AVX2)"), ("AVX512", " cores, AVX512)")]:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert device_name(torch.device("cpu")).endswith(tail)

    def unknown():
        raise RuntimeError("no capability")

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", unknown)
    assert cpu_capability() == "" and device_name(torch.device("cpu")) == f"cpu: {cpu_model()} ({os.cpu_count()} cores)"


def test_training_is_repeatable(mini_data):
    c = cfg(mini_data)
    a, b = train(c, mini_data, num_workers=0), train(c, mini_data, num_workers=0)
    assert a["final"] == b["final"]


class NaNLayer(nn.Module):
    def forward(self, x):
        return x * float("nan")


def test_divergence_is_recorded_and_the_grid_goes_on(mini_data, tmp_path):
    norms.register_norm("nan_test", lambda c: NaNLayer(), overwrite=True)
    try:
        bad, good = cfg(mini_data, norm="nan_test"), cfg(mini_data, seed=1)
        rb, rg = run_grid([bad, good], ResultStore(tmp_path), mini_data, num_workers=0, log=None)
    finally:
        norms._REGISTRY.pop("nan_test")
    assert rb["status"] == "diverged" and rb["final"] is None
    assert rb["diverged_at"]["epoch"] == 0 and rb["diverged_at"]["iter"] == 0
    assert rg["status"] == "ok"


class LateNaN(nn.Module):
    """Each layer fine for its first 3 training forward passes, NaN from the 4th (iteration 3) on."""

    made: list["LateNaN"] = []

    def __init__(self):
        super().__init__()
        self.calls = 0
        LateNaN.made.append(self)

    def forward(self, x):
        if self.training:
            self.calls += 1
        return x * float("nan") if self.training and self.calls > 3 else x


@pytest.mark.parametrize("every", [2, 64])
def test_divergence_is_found_at_its_step_though_checked_every_few_steps(mini_data, monkeypatch, every):
    """The guard reads the losses on the host only every GUARD_EVERY steps and at the end of an
    epoch's training (so a GPU is not made to wait each step), yet records the first bad step,
    and stops the fit at the next check."""
    from normkit import runs

    monkeypatch.setattr(runs, "GUARD_EVERY", every)
    norms.register_norm("late_nan_test", lambda c: LateNaN(), overwrite=True)
    LateNaN.made = []
    try:
        record = train(cfg(mini_data, norm="late_nan_test", net="cnn"), mini_data, num_workers=0)
    finally:
        norms._REGISTRY.pop("late_nan_test")
    assert record["status"] == "diverged" and record["final"] is None and record["epochs"] == []
    assert record["diverged_at"]["epoch"] == 0 and record["diverged_at"]["iter"] == 3
    assert record["diverged_at"]["loss"] != record["diverged_at"]["loss"]  # NaN
    passes = {layer.calls for layer in LateNaN.made if layer.calls}  # per layer of the trained model
    assert passes == {4 if every == 2 else 6}  # stopped at the check after step 3, or at the epoch's end (6 steps)


class BoomLayer(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_a_failed_run_raises_after_the_others_are_recorded(mini_data, tmp_path):
    norms.register_norm("boom_test", lambda c: BoomLayer(), overwrite=True)
    store = ResultStore(tmp_path)
    try:
        bad, good = cfg(mini_data, norm="boom_test"), cfg(mini_data, seed=1)
        with pytest.raises(RuntimeError, match=f"1 run\\(s\\) failed .*{bad.key}: RuntimeError: boom"):
            run_grid([bad, good], store, mini_data, num_workers=0, log=None)
    finally:
        norms._REGISTRY.pop("boom_test")
    assert store.get(bad) is None and store.get(good)["status"] == "ok"


def test_data_identity_must_match(mini_data, tiny_data, tmp_path):
    c = cfg(mini_data)
    with pytest.raises(ValueError, match="but the runs ask for"):
        run_grid([c], ResultStore(tmp_path), tiny_data, num_workers=0, log=None)


KILL_SCRIPT = """
import sys, warnings
warnings.simplefilter("ignore")
from normkit.runs import RunConfig, ResultStore, run_grid
from normkit.data import data_info
data, root = sys.argv[1], sys.argv[2]
ident = data_info(data).identity
configs = [RunConfig.make("cnn", "none", 2, 1e-3, s, data=ident, protocol="smoke") for s in range(6)]
run_grid(configs, ResultStore(root), data, num_workers=0, log=lambda s: print(s, flush=True))
"""


def test_killed_sweep_resumes(mini_data, tmp_path):
    """SIGKILL a sweep after its first record: the rest is made by the next call, nothing twice."""
    root = tmp_path / "res"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(mini_data), str(root)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((root / "smoke").glob("*.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = sorted((root / "smoke").glob("*.json"))
    assert 1 <= len(first) < 6, "the sweep should have been killed part-way"
    before = {p.name: p.read_text() for p in first}
    ident = data_info(mini_data).identity
    configs = [RunConfig.make("cnn", "none", 2, 1e-3, s, data=ident, protocol="smoke") for s in range(6)]
    store = ResultStore(root)
    trained = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no record may be damaged by the kill
        records = run_grid(configs, store, mini_data, num_workers=0, log=trained.append)
    assert all(r["status"] == "ok" for r in records)
    assert {p.name: p.read_text() for p in first} == before  # finished runs were not redone
    assert f"{6 - len(first)} to train" in trained[0]


def test_no_weight_decay_on_any_norm_layer(mini_data, monkeypatch):
    """Every norm's parameters are exempt from weight decay, not only torch's BatchNorm ones."""
    import fastai.learner
    from normkit.norms import norm_layers

    seen = {}
    orig = fastai.learner.Learner.fit

    def spy(self, *a, **k):
        out = orig(self, *a, **k)
        seen["norm"] = [self.opt.state[p].get("do_wd", True) for m in norm_layers(self.model) for p in m.parameters()]
        seen["conv"] = [self.opt.state[m.weight].get("do_wd", True) for m in self.model.modules()
                        if isinstance(m, nn.Conv2d)]
        return out

    monkeypatch.setattr(fastai.learner.Learner, "fit", spy)
    train(cfg(mini_data, norm="groupnorm", bs=128), mini_data, num_workers=0)
    assert seen["norm"] and not any(seen["norm"])
    assert seen["conv"] and all(seen["conv"])


def test_records_name_the_commit_this_process_loaded(monkeypatch):
    """A checkout that changes during a long sweep does not change the commit its records name."""
    from normkit import runs

    loaded = runs._LOADED_COMMIT
    assert loaded and loaded == runs._commit()  # the tests run on the checkout they imported
    monkeypatch.setattr(runs, "_commit", lambda: "0" * 40)  # HEAD moves on while we run
    assert runs.environment()["commit"] == loaded


def test_a_copy_names_the_commit_it_was_given(monkeypatch):
    """A checkout copied to another machine, without its .git or with a stale one, names its commit
    in $NORMKIT_COMMIT; an invalid value is ignored."""
    import subprocess

    from normkit import runs

    def no_repo(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 128, "", "fatal: not a git repository")

    monkeypatch.setattr(runs.subprocess, "run", no_repo)
    monkeypatch.delenv("NORMKIT_COMMIT", raising=False)
    assert runs._commit() == "unknown"
    monkeypatch.setenv("NORMKIT_COMMIT", "not-a-sha")
    assert runs._commit() == "unknown"
    monkeypatch.setenv("NORMKIT_COMMIT", "AB" * 20)
    assert runs._commit() == "ab" * 20
    monkeypatch.undo()  # git answers again (the checkout's HEAD), but the given commit wins
    monkeypatch.setenv("NORMKIT_COMMIT", "cd" * 20)
    assert runs._commit() == "cd" * 20


# -- denormals ---------------------------------------------------------------------------

def flushing_here() -> bool:
    """Whether this thread flushes denormals: 9.2e-41 (made from its bits) times 1 is 0."""
    return torch.tensor([1 << 16], dtype=torch.int32).view(torch.float32).mul(1.0).item() == 0.0


@pytest.mark.parametrize("flush", [None, False])
def test_cpu_runs_flush_denormals_and_say_so(mini_data, flush):
    """A CPU run flushes float32 denormals to zero unless told not to; its record says which,
    and the state found is restored after it."""
    before, during = flushing_here(), []
    r = train(cfg(mini_data), mini_data, num_workers=0, flush=flush, on_trained=lambda learn: during.append(flushing_here()))
    assert during == [flush is None] and r["settings"]["flush_denormals"] is (flush is None)
    assert flushing_here() == before


def test_the_flush_reaches_every_thread_of_torchs_pool():
    """torch's own switch sets the calling thread only: a thread pool made before it would go on
    computing with denormals (half of a large tensor's elements, measured). flush_denormals
    sets the pool's threads too, and denormals_flushed checks all of them."""
    from normkit.runs import denormals_flushed, flush_denormals

    with torch_threads(2):
        assert denormals_flushed() is False  # the pool now exists, made without the flush
        torch.set_flush_denormal(True)
        try:
            assert denormals_flushed() == "partly"  # torch's switch alone
        finally:
            torch.set_flush_denormal(False)
        with flush_denormals():
            assert denormals_flushed() is True
        assert denormals_flushed() is False


@pytest.mark.parametrize("fast", [False, True])
def test_flushed_denormals_leave_adam_steps_as_they_were(fast):
    """Late in a long run most of Adam's moments are denormal; flushed to zero they are 0 in the
    update m / (sqrt(v) + eps), which with eps = 1e-5 cannot move a weight: the weights after
    several steps are the same to the bit, flushed or not, for the plain path's fastai Adam and
    the fast path's torch AdamW. (With eps at 1e-30 instead they differ: the check can fail.)"""
    from fastai.optimizer import Adam

    from normkit.runs import flush_denormals

    def steps(flush: bool, eps: float) -> tuple[list[torch.Tensor], float]:
        torch.manual_seed(0)
        params = [nn.Parameter(torch.randn(1000) * 0.05) for _ in range(3)]
        # gradients of 0.5e-20 to 1e-20: their squares (Adam's v) are denormal
        grads = [(torch.rand(1000) + 1) * 0.5e-20 * torch.randn(1000).sign() for _ in params]
        if fast:
            opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.99), eps=eps, weight_decay=0.0, foreach=True)
        else:
            opt = Adam(params, lr=1e-2, mom=0.9, sqr_mom=0.99, eps=eps, wd=0.0)
        with flush_denormals(flush):
            for _ in range(5):
                for p, g in zip(params, grads):
                    p.grad = g.clone()
                opt.step()
            sq = torch.cat([opt.state[p]["exp_avg_sq" if fast else "sqr_avg"].flatten() for p in params])
        return [p.detach().clone() for p in params], float((sq != 0).float().mean())

    kept, nonzero_kept = steps(False, 1e-5)
    flushed, nonzero_flushed = steps(True, 1e-5)
    assert nonzero_kept == 1.0 and nonzero_flushed == 0.0  # the moments were denormal, then flushed
    assert all(torch.equal(a, b) for a, b in zip(kept, flushed))
    tiny_eps = [steps(f, 1e-30)[0] for f in (False, True)]
    assert not all(torch.equal(a, b) for a, b in zip(*tiny_eps))
