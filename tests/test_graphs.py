"""normkit.graphs: which training steps a CUDA graph may replay, and StepGraph in a run.

The check runs on any device, so every norm and both networks are checked here on the CPU.
The recording itself needs CUDA: the last test runs only where there is a GPU.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from normkit.fastdata import FastPath
from normkit.graphs import HOST_OPS, StepGraph, graph_check
from normkit.models import NETS, build_model
from normkit.norms import available_norms
from normkit.runs import GRAPHED, RunConfig, graphed, train

CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("norm", available_norms())
def test_every_norm_of_both_networks_can_be_replayed(net, norm, one_thread):
    """Nothing but tensors on the device drives a training step of any network of the study."""
    model = build_model(net, norm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert graph_check(model, (torch.randn(2, 3, 32, 32),)) is None
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # checked on a copy


@pytest.mark.parametrize("net", NETS)
@pytest.mark.parametrize("norm", available_norms())
def test_every_packed_network_can_be_replayed(net, norm, one_thread):
    """The same for a pack of two runs (normkit.packed), as ``normkit sweep --pack N --graph`` trains them."""
    from normkit.packed import can_pack, pack

    models = [build_model(net, norm) for _ in range(2)]
    if not can_pack(models[0]):
        pytest.skip(f"{net} with {norm} is not packed")
    assert graph_check(pack(models), (torch.randn(2, 6, 32, 32),)) is None


class _PythonSchedule(nn.Module):
    """Scales its input by a factor that a Python counter ramps up."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.t = 0

    def forward(self, x):
        self.t += 1
        return self.lin(x) * min(1.0, self.t / 10)


class _Counter(nn.Module):
    """Counts its calls in a Python number that the computation never reads."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.lin(x)


class _HostBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        y = self.lin(x)
        return y * 2 if y.mean() > 0 else y  # reads the device on the host


class _NewTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, x):
        return self.lin(x) + x.new_tensor(0.5)  # a tensor made from host data


class _ReplacedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("running", torch.zeros(2))

    def forward(self, x):
        y = self.lin(x)
        self.running = 0.9 * self.running + 0.1 * y.detach().mean(0)  # a new tensor each step, not in place
        return y


@pytest.mark.parametrize("module,why", [
    (_PythonSchedule, "operations change from step to step .*aten.mul.* with other arguments"),
    (_Counter, "attribute model.calls changes at each step"),
    (_HostBranch, "calls aten.(_local_scalar_dense|is_nonzero)"),
    (_NewTensor, "calls aten.lift_fresh"),
    (_ReplacedBuffer, "tensor running is replaced at each step"),
])
def test_the_check_refuses_what_a_graph_would_freeze(module, why):
    model = module()
    msg = graph_check(model, (torch.randn(3, 4),))
    assert msg is not None and re.search(why, msg), msg
    assert getattr(model, "t", 0) == 0 and getattr(model, "calls", 0) == 0  # the model itself untouched


def _fit_with(model, step_graph):
    """One epoch of a fastai Learner on 8 random (4 features, 2 classes) samples, batch size 2."""
    import fastai.callback.progress  # noqa: F401 - Learner.no_bar
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    g = torch.Generator().manual_seed(0)
    ds = [(torch.randn(4, generator=g), torch.tensor(i % 2)) for i in range(8)]
    learn = Learner(DataLoaders.from_dsets(ds, ds[:4], bs=2), model, loss_func=nn.CrossEntropyLoss(), cbs=[step_graph])
    with learn.no_bar(), learn.no_logging():
        learn.fit(1, 1e-3)
    return learn


def test_step_graph_says_why_it_left_a_network_eager():
    """In a fit, the StepGraph checks the network on the first training batch; a network the check
    refuses is trained eagerly, and the status (for the record) gives the check's reason."""
    model = _PythonSchedule()
    learn = _fit_with(model, StepGraph())
    assert learn.graph_status.startswith("not graphed, eager: the step's operations change from step to step")
    assert model.t == 4 + 2  # 4 training and 2 validation batches: the check ran on a copy
    learn = _fit_with(_Counter(), StepGraph(capture=False))
    assert learn.graph_status == "not graphed, eager: attribute model.calls changes at each step"
    learn = _fit_with(nn.Linear(4, 2), StepGraph(capture=False))
    assert learn.graph_status == "not graphed, eager: capture was not asked (the check passed)"


class _FakeRecording(StepGraph):
    """A StepGraph on the CPU whose recording does to the module what torch's does (three warm-up
    forward and backward passes in training mode, then a new ``forward``) without a graph."""

    devices = ("cpu",)

    @staticmethod
    def record(model, args):
        for _ in range(3):
            out = model(*args)
            torch.autograd.grad(out.sum(), [p for p in model.parameters()], allow_unused=True)
        own = model.forward
        model.forward = lambda *a: own(*a)


def test_step_graph_leaves_the_run_as_it_was_eager(smoke, one_thread, monkeypatch):
    """What StepGraph does around the recording: the warm-up passes' running statistics put back
    (a BatchNorm run's record is the eager one, metric for metric), the gradients dropped before
    each backward, the module's own forward restored after the fit, and the status says graphed."""
    from normkit.data import data_info
    from normkit.fastdata import FastPath

    c = RunConfig.make("cnn", "batchnorm", 8, 1e-2, 0, data=data_info(smoke).identity, protocol="smoke")
    eager = train(c, smoke, device="cpu", fast=FastPath())
    step_graph = _FakeRecording()
    models = []
    orig = FastPath.learner

    def learner(self, dls, model, device, **kwargs):
        models.append(model)
        return orig(self, dls, model, device, **{**kwargs, "cbs": [*kwargs.get("cbs", []), step_graph]})

    monkeypatch.setattr(FastPath, "learner", learner)
    faked = train(c, smoke, device="cpu", fast=FastPath())
    assert faked["epochs"] == eager["epochs"]
    assert faked["settings"]["graph"].startswith(GRAPHED) and graphed(faked)
    assert "forward" not in models[0].__dict__


def test_the_check_needs_two_steps_to_compare():
    with pytest.raises(ValueError, match="steps=1 is invalid"):
        graph_check(nn.Linear(2, 2), (torch.randn(1, 2),), steps=1)
    assert {"_local_scalar_dense", "nonzero", "lift_fresh"} <= HOST_OPS


def test_graph_and_compile_cannot_be_combined():
    with pytest.raises(ValueError, match="graph=True and compile='default' cannot be combined"):
        FastPath(graph=True, compile="default")


def test_a_run_asked_for_graphs_on_a_cpu_is_the_eager_run_and_says_so(smoke, one_thread):
    """Without CUDA the StepGraph checks the network and leaves the run alone: the record is the
    eager run's, metric for metric, and ``settings.graph`` says why nothing was graphed."""
    from normkit.data import data_info

    c = RunConfig.make("cnn", "runningbatchnorm", 8, 1e-2, 0, data=data_info(smoke).identity, protocol="smoke")
    eager = train(c, smoke, device="cpu", fast=FastPath())
    asked = train(c, smoke, device="cpu", fast=FastPath(graph=True))
    assert asked["epochs"] == eager["epochs"]
    assert eager["settings"]["graph"] is False and not graphed(eager)
    assert asked["settings"]["graph"] == "not graphed, eager: CUDA graphs need a CUDA device, not cpu"
    assert not graphed(asked)
    assert {k: v for k, v in asked["settings"].items() if k != "graph"} == \
        {k: v for k, v in eager["settings"].items() if k != "graph"}


def test_graphed_reads_a_records_settings():
    assert graphed({"settings": {"graph": GRAPHED + " (...)"}})
    assert not graphed({"settings": {"graph": "not graphed, eager: ..."}}) and not graphed({}) and not graphed(
        {"settings": None})


def test_the_sweep_and_its_cli_refuse_graphs_without_cuda(capsys):
    from normkit.cli import main
    from normkit.runs import path_kind
    from normkit.sweep import sweep

    c = RunConfig.make("cnn", "batchnorm", 8, 1e-2, 0, protocol="smoke")
    with pytest.raises(ValueError, match="graph=True needs a CUDA device"):
        sweep([c], device="cpu", fast=True, graph=True, dry_run=True, log=None)
    with pytest.raises(ValueError, match="apply to the fast data path only"):
        sweep([c], device="cpu", fast=False, graph=True, dry_run=True, log=None)
    assert main(["sweep", "--chapter", "batchnorm", "--graph", "--plain", "--dry-run"]) == 2
    assert "--graph apply to the fast path" in capsys.readouterr().err
    assert path_kind("fast", 6, True) == "fast, packs of 6, CUDA graphs" and path_kind("fast", 1) == "fast"


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("net,norm,fused,pack", [
    ("resnet18", "batchnorm", True, 1),
    ("resnet18", "batchnorm", False, 1),  # fastai's Adam zeroes gradients in place rather than dropping them
    ("cnn", "runningbatchnorm", True, 1),
    ("cnn", "batchrenorm", True, 1),
    ("resnet18", "evonorm_b0", True, 1),
    ("resnet18", "groupnorm", True, 2),  # a pack of two runs at two learning rates
])
def test_graphed_steps_compute_what_eager_steps_compute_on_cuda(net, norm, fused, pack):
    """20 training steps at batch size 2 from one initialisation, once eager and once with the
    network replayed from CUDA graphs (the fast path as sweeps run it): the same parameters and
    running statistics, the network graphed, and its own forward restored after the fit."""
    import fastai.callback.progress  # noqa: F401 - Learner.no_bar
    import fastai.callback.schedule  # noqa: F401 - Learner.fit_one_cycle
    from fastai.data.core import DataLoaders

    from normkit.fastdata import TensorLoader
    from normkit.packed import packed_learner

    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (40,), generator=g)

    def dls(seed):
        train_dl = TensorLoader(x, y, 2, vocab=list(range(10)), train=True, seed=seed, device="cuda")
        valid_dl = TensorLoader(x[:8], y[:8], 8, vocab=list(range(10)), train=False, device="cuda")
        return DataLoaders(train_dl, valid_dl, device="cuda")

    def fit(graph):
        fast = FastPath(graph=graph, fused_adam=fused)
        torch.manual_seed(0)
        models = [build_model(net, norm) for _ in range(pack)]
        if pack == 1:
            learn, lr = fast.learner(dls(0), models[0], "cuda"), 1e-3
        else:
            learn, _, lr = packed_learner(fast, [dls(s) for s in range(pack)], models, "cuda", [1e-3, 1e-4][:pack])
        with learn.no_bar(), learn.no_logging():
            learn.fit_one_cycle(1, lr)
        return learn

    eager, graphed_ = fit(False), fit(True)
    assert graphed_.graph_status.startswith(GRAPHED), graphed_.graph_status
    assert "forward" not in graphed_.model.__dict__
    for (name, a), b in zip(eager.model.state_dict().items(), graphed_.model.state_dict().values()):
        diff = (a.float() - b.float()).abs().max().item()
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5), (name, diff)
