"""Packed runs (normkit.packed): N runs as one grouped network compute exactly what N runs alone do."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from normkit.fastdata import FastPath
from normkit.models import NETS, build_model
from normkit.norms import available_norms
from normkit.packed import PackedLinear, PackedLoader, can_pack, pack, train_pack, unpack
from normkit.runs import RunConfig, train

from torch_state import torch_threads


@pytest.fixture
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch_threads(1):
            yield
    finally:
        torch.set_default_dtype(old)


def _runs(net, norm, n=3):
    models = []
    for seed in range(n):
        torch.manual_seed(seed)
        models.append(build_model(net, norm))
    return models


@pytest.mark.parametrize("net", list(NETS))
@pytest.mark.parametrize("norm", available_norms())
def test_a_packed_network_is_its_runs_side_by_side(net, norm, float64):
    """In float64, so that only the arithmetic's order could differ: the packed network's
    training-mode outputs, every parameter's gradient, the running statistics and the
    inference-mode outputs are each run's own, to 1e-10."""
    models = _runs(net, norm)
    alone = [copy.deepcopy(m) for m in models]
    packed = pack(models)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 3, 40, 40, generator=gen) for _ in models]
    ys = [torch.randint(0, 10, (2,), generator=gen) for _ in models]
    out = packed(torch.cat(xs, 1))
    assert out.shape == (2, 3, 10)
    sum(nn.functional.cross_entropy(out[:, i], y) for i, y in enumerate(ys)).backward()
    for i, (m, x, y) in enumerate(zip(alone, xs, ys)):
        o = m(x)
        torch.testing.assert_close(out[:, i], o, rtol=1e-10, atol=1e-10)
        nn.functional.cross_entropy(o, y).backward()
    grads = {name: p.grad for name, p in packed.named_parameters()}
    for i, m in enumerate(alone):
        for name, p in m.named_parameters():
            g = grads[name]
            mine = g[i] if isinstance(packed.get_submodule(name.rpartition(".")[0]), PackedLinear) else g.chunk(3)[i]
            torch.testing.assert_close(mine, p.grad, rtol=1e-9, atol=1e-12, msg=f"gradient of {name}, run {i}")
    back = unpack(packed, [copy.deepcopy(m) for m in models])
    for b, m in zip(back, alone):
        for (name, t), u in zip(b.state_dict().items(), m.state_dict().values()):
            torch.testing.assert_close(t, u, rtol=1e-10, atol=1e-12, msg=f"state {name}")
    packed.eval()
    with torch.no_grad():
        out = packed(torch.cat(xs, 1))
        for i, (m, x) in enumerate(zip(alone, xs)):
            torch.testing.assert_close(out[:, i], m.eval()(x), rtol=1e-10, atol=1e-10)


def test_pack_refuses_what_it_cannot_pack_in_one_line():
    with pytest.raises(ValueError, match="one architecture"):
        pack([build_model("cnn", "batchnorm"), build_model("cnn", "groupnorm")])
    with pytest.raises(ValueError, match="at least one"):
        pack([])
    odd = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LSTM(4, 4))
    assert not can_pack(odd) and can_pack(build_model("resnet18", "evonorm_b0"))
    with pytest.raises(ValueError, match=r"layer '1' \(LSTM\) cannot be packed; packable layers: .*GroupNorm"):
        pack([odd, copy.deepcopy(odd)])
    a, b = build_model("cnn", "batchnorm"), build_model("cnn", "batchnorm")
    b[1][0].num_batches_tracked += 1
    with pytest.raises(ValueError, match="num_batches_tracked differs"):
        pack([a, b])
    with pytest.raises(ValueError, match="holds 2 runs, got 3 models"):
        unpack(pack([a, a]), [a, a, a])


def test_packed_linear_applies_each_runs_matrix():
    layers = [nn.Linear(4, 2) for _ in range(3)]
    p = PackedLinear.from_linears(layers)
    x = torch.randn(5, 3, 4)
    torch.testing.assert_close(p(x), torch.stack([m(x[:, i]) for i, m in enumerate(layers)], 1))
    torch.testing.assert_close(p(x.reshape(5, 12)), p(x))


def test_packed_loader_puts_each_runs_batch_side_by_side(mini_data):
    from normkit.fastdata import make_fast_dls

    def loaders():
        return [make_fast_dls(mini_data, 4, 32, seed=s, device="cpu", max_train=40, max_valid=8) for s in (0, 1)]

    (x, y) = next(iter(PackedLoader([d.train for d in loaders()])))
    dls = loaders()  # fresh generators: the first epoch again
    (x0, y0), (x1, y1) = (next(iter(d.train)) for d in dls)
    assert x.shape == (4, 6, 32, 32) and y.shape == (4, 2)
    assert torch.equal(x[:, :3], x0) and torch.equal(x[:, 3:], x1) and torch.equal(y, torch.stack([y0, y1], 1))
    assert not torch.equal(x0, x1)  # each run its own shuffle
    valid = PackedLoader([dls[0].valid], shared=True, n=2)
    (xv, yv), (xv0, yv0) = next(iter(valid)), next(iter(dls[0].valid))
    assert torch.equal(xv, torch.cat([xv0, xv0], 1)) and torch.equal(yv, torch.stack([yv0, yv0], 1))
    with pytest.raises(ValueError, match="one length"):
        PackedLoader([dls[0].train, dls[0].valid])


@pytest.fixture
def data(mini_data):
    from normkit.data import data_info

    return mini_data, data_info(mini_data).identity


@pytest.mark.parametrize("net,norm,bs", [("cnn", "batchnorm", 8), ("cnn", "groupnorm", 2), ("resnet18", "evonorm_s0", 4)])
def test_a_pack_records_what_its_runs_record_alone(data, net, norm, bs, one_thread):
    """Three seeds trained as one pack (smoke protocol) leave the records the same three runs leave
    trained one by one on the fast path: every epoch's metrics agree to float rounding."""
    path, identity = data
    configs = [RunConfig.make(net, norm, bs, 1e-2, seed, data=identity, protocol="smoke") for seed in (0, 1, 2)]
    packed = train_pack(configs, path, device="cpu")
    for c, rec in zip(configs, packed):
        alone = train(c, path, device="cpu", fast=FastPath())
        assert rec["key"] == c.key and rec["status"] == alone["status"] == "ok"
        assert len(rec["epochs"]) == len(alone["epochs"]) == c.epochs
        for e, f in zip(rec["epochs"], alone["epochs"]):
            for k in ("train_loss", "valid_loss", "accuracy"):
                assert e[k] == pytest.approx(f[k], rel=1e-4, abs=1e-6), (c.describe(), k)
        assert rec["settings"]["packed"]["runs"] == 3 and rec["settings"]["packed"]["seeds"] == [0, 1, 2]
        assert rec["n_params"] == alone["n_params"]
        assert {k: v for k, v in rec["settings"].items() if k != "packed"} == alone["settings"]
        assert rec["cpu_time_s"] == packed[0]["cpu_time_s"] > 0 and "cpu_time_s" in alone  # the pack's, as its wall time


def test_a_run_that_diverges_in_a_pack_leaves_the_others_alone(data, one_thread):
    """NaN poured into run 1's weights half-way through its epoch: run 1's record says diverged, at
    the step the guard saw it, and runs 0 and 2 record what they record in a pack without it."""
    from fastai.callback.core import Callback

    path, identity = data
    configs = [RunConfig.make("cnn", "batchnorm", 4, 1e-2, seed, data=identity, protocol="smoke") for seed in (0, 1, 2)]

    class Poison(Callback):
        def before_batch(self):
            if self.training and self.iter == 3:
                with torch.no_grad():
                    self.learn.model[0].weight.chunk(3)[1].fill_(float("nan"))

    clean = train_pack(configs, path, device="cpu")
    seen = {}
    poisoned = train_pack(configs, path, device="cpu", cbs=[Poison()], on_trained=lambda learn, models: seen.update(models=models))
    assert poisoned[1]["status"] == "diverged" and poisoned[1]["final"] is None
    assert poisoned[1]["diverged_at"] == {"epoch": 0, "iter": 3, "loss": pytest.approx(float("nan"), nan_ok=True)}
    for i in (0, 2):
        assert poisoned[i]["status"] == "ok"
        for e, f in zip(poisoned[i]["epochs"], clean[i]["epochs"], strict=True):
            assert e == pytest.approx(f, rel=1e-6)
    assert torch.isnan(seen["models"][1][0].weight).all() and not torch.isnan(seen["models"][0][0].weight).any()


def test_train_pack_refuses_runs_that_differ_beyond_the_seed_and_learning_rate(data):
    path, identity = data
    a = RunConfig.make("cnn", "batchnorm", 4, 1e-2, 0, data=identity, protocol="smoke")
    with pytest.raises(ValueError, match="differ only in their seed and learning rate; got cnn batchnorm bs=2"):
        train_pack([a, RunConfig.make("cnn", "batchnorm", 2, 1e-2, 1, data=identity, protocol="smoke")], path)
    other_lr = RunConfig.make("cnn", "batchnorm", 4, 1e-3, 1, data=identity, protocol="smoke")
    with pytest.raises(ValueError, match=r"differ only in their seed \(and learning rate, with fused_adam\)"):
        train_pack([a, other_lr], path, fast=FastPath(fused_adam=False))
    with pytest.raises(ValueError, match="a pack's runs must differ"):
        train_pack([a, a], path)


def test_a_pack_of_two_learning_rates_records_what_its_runs_record_alone(data, one_thread):
    """Seeds 0 and 1 at lr 0.01 and 0.001 in one pack: the one-cycle schedule runs for 0.01 and
    RunLearningRates scales the lr-0.001 runs' steps; every record equals the run's alone."""
    path, identity = data
    configs = [RunConfig.make("cnn", "groupnorm", 4, lr, seed, data=identity, protocol="smoke")
               for lr in (1e-2, 1e-3) for seed in (0, 1)]
    packed = train_pack(configs, path, device="cpu")
    for c, rec in zip(configs, packed):
        alone = train(c, path, device="cpu", fast=FastPath())
        for e, f in zip(rec["epochs"], alone["epochs"], strict=True):
            for k in ("train_loss", "valid_loss", "accuracy"):
                assert e[k] == pytest.approx(f[k], rel=1e-4, abs=1e-6), (c.describe(), k)
        assert rec["settings"]["packed"]["lrs"] == [0.01, 0.01, 0.001, 0.001]


def test_run_learning_rates_scale_each_runs_adamw_step():
    """One AdamW step of a packed network with RunLearningRates equals each run's own AdamW step
    at its own learning rate (weight decay included), to float rounding."""
    from types import SimpleNamespace

    from normkit.packed import RunLearningRates

    models = _runs("cnn", "batchnorm", n=2)
    alone = [copy.deepcopy(m) for m in models]
    packed = pack(models)
    x = torch.randn(4, 3, 16, 16)
    lrs = [1e-2, 1e-3]
    packed(torch.cat([x, x], 1)).sum().backward()
    opt = torch.optim.AdamW(packed.parameters(), lr=max(lrs), weight_decay=0.01)
    cb = RunLearningRates([lr / max(lrs) for lr in lrs])
    cb.learn = SimpleNamespace(model=packed)
    cb.before_fit()
    cb.before_step()
    opt.step()
    cb.after_step()
    for m, lr in zip(alone, lrs):
        m(x).sum().backward()
        torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01).step()
    for i, m in enumerate(unpack(packed, [copy.deepcopy(m) for m in models])):
        for (name, p), q in zip(m.named_parameters(), alone[i].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"run {i} {name}")


@pytest.mark.parametrize("net", list(NETS))
def test_a_pack_exempts_the_same_parameters_from_weight_decay(net):
    """The fast path's optimizer decays no bias and no norm-layer parameter; a packed network's
    parameters fall in the same groups as the run's own."""
    from normkit.fastdata import fused_adam

    def groups(model):
        names = {id(p): n for n, p in model.named_parameters()}
        return [sorted(names[id(p)] for p in g["params"]) for g in fused_adam(model, "cpu")["splitter"](model)]

    for norm in available_norms():
        models = _runs(net, norm, n=2)
        assert groups(pack(models)) == groups(models[0]), norm
