"""Probes of batch statistics, the train/eval gap and the eps bound, on tiny models."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normkit.norms import Norm, get_norm
from normkit.probes import (
    batch_statistics_mode, batch_stats, eps_bound, gaussian_collapse_fraction, population_stats, running_stats,
    summarise_batch_stats, train_eval_gap,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_net(norm: str | Norm = "batchnorm") -> nn.Sequential:
    n = get_norm(norm)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), n(4), nn.Conv2d(4, 6, 3, stride=2, padding=1), n(6, act=False),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- batch statistics -------------------------------------------------------------------------


def test_batch_stats_are_the_moments_of_each_batchnorm_input():
    model = tiny_net().eval()
    before = state(model)
    xs = [torch.randn(2, 3, 8, 8) * 2 + 1 for _ in range(5)]
    stats = batch_stats(model, [(x, torch.zeros(2)) for x in xs])
    assert list(stats.columns) == ["layer", "channel", "batch_idx", "n", "mean", "var"]
    assert len(stats) == (4 + 6) * 5 and list(stats["layer"].unique()) == ["1.0", "3"]
    assert set(stats.loc[stats["layer"] == "3", "n"]) == {2 * 4 * 4}
    assert same_state(model.state_dict(), before) and not model.training  # no trace left
    x = xs[3]
    h1 = model[0](x)
    h2 = model[2](F.relu(F.batch_norm(h1, None, None, model[1][0].weight, model[1][0].bias, training=True)))
    for layer, h in (("1.0", h1), ("3", h2)):
        got = stats[(stats["layer"] == layer) & (stats["batch_idx"] == 3)].sort_values("channel")
        assert np.allclose(got["mean"], h.mean(dim=(0, 2, 3)).detach().numpy(), atol=1e-5)
        assert np.allclose(got["var"], h.var(dim=(0, 2, 3), unbiased=False).detach().numpy(), atol=1e-5)


def test_batch_stats_in_eval_mode_and_max_batches():
    model = tiny_net().train()
    with torch.no_grad():
        model[1][0].running_mean.fill_(10.0)  # eval mode: layer 3's input comes from the running statistics
    xs = [torch.randn(2, 3, 8, 8) for _ in range(6)]
    stats = batch_stats(model, iter(xs), max_batches=4, train_mode=False)
    assert sorted(stats["batch_idx"].unique()) == [0, 1, 2, 3] and model.training
    h2 = model[2](model[1].eval()(model[0](xs[0])))
    got = stats[(stats["layer"] == "3") & (stats["batch_idx"] == 0)].sort_values("channel")
    assert np.allclose(got["mean"], h2.mean(dim=(0, 2, 3)).detach().numpy(), atol=1e-5)


def test_batch_stats_needs_a_batchnorm_layer():
    with pytest.raises(ValueError, match="no layer of type"):
        batch_stats(tiny_net(get_norm("groupnorm", groups=2)), [torch.randn(2, 3, 8, 8)])


def test_batch_statistics_mode_restores_buffers_and_modes():
    model = nn.Sequential(tiny_net("batchrenorm"), nn.Dropout(0.5)).train()
    model[0][1].eval()
    before = state(model)
    with batch_statistics_mode(model):
        assert model[0][1][0].training and model[0][3].training and not model[1].training
        model(torch.randn(2, 3, 8, 8) + 5)
        assert not same_state(model.state_dict(), before)
    assert same_state(model.state_dict(), before)
    assert model.training and model[1].training and not model[0][1].training


def test_population_stats_pool_the_batches_exactly():
    model = tiny_net()
    xs = [torch.randn(3, 3, 8, 8) * 2 + 1 for _ in range(4)]
    pop = population_stats(batch_stats(model, xs))
    h = model[0](torch.cat(xs)).detach()  # the first layer's input does not depend on the mode
    got = pop[pop["layer"] == "1.0"].sort_values("channel")
    assert np.allclose(got["mean"], h.mean(dim=(0, 2, 3)).numpy(), atol=1e-5)
    assert np.allclose(got["var"], h.var(dim=(0, 2, 3), unbiased=False).numpy(), atol=1e-4)


def test_running_stats_are_the_buffers():
    model = tiny_net()
    with torch.no_grad():
        model[3].running_var.uniform_(0.5, 2.0)
    run = running_stats(model)
    got = run[run["layer"] == "3"].sort_values("channel")
    assert np.allclose(got["var"], model[3].running_var.numpy()) and len(run) == 4 + 6


def test_summary_counts_collapsed_pairs_and_shifts():
    stats = pd.DataFrame({"layer": "a", "channel": 0, "batch_idx": [0, 1, 2, 3], "n": 8,
                          "mean": [0.0, 2.0, 0.0, -2.0], "var": [1.0, 1.0, 0.001, 4.0]})
    reference = pd.DataFrame({"layer": ["a"], "channel": [0], "mean": [0.0], "var": [4.0]})
    s = summarise_batch_stats(stats, reference, threshold=0.01).iloc[0]
    assert s["collapsed"] == pytest.approx(0.25) and s["batches"] == 4 and s["n"] == 8
    assert s["mean_shift_rms"] == pytest.approx(math.sqrt((1 + 1) / 4))  # shifts 0, 1, 0, -1 (sigma = 2)
    assert s["var_ratio_median"] == pytest.approx(0.25)
    assert summarise_batch_stats(stats, reference, threshold=0.3)["collapsed"].iloc[0] == pytest.approx(0.75)
    assert summarise_batch_stats(stats)["layer"].tolist() == ["a"]  # population reference by default
    with pytest.raises(ValueError, match="threshold=0"):
        summarise_batch_stats(stats, threshold=0)


def test_gaussian_collapse_fraction_matches_sampling():
    g = torch.Generator().manual_seed(1)
    for m, t in ((2, 0.01), (8, 0.1), (32, 0.5)):
        x = torch.randn(200_000, m, generator=g, dtype=torch.float64)
        sampled = float((x.var(dim=1, unbiased=False) < t).double().mean())
        assert gaussian_collapse_fraction(m, t) == pytest.approx(sampled, abs=0.005)
    assert gaussian_collapse_fraction(2, 0.01) == pytest.approx(0.1125, abs=1e-3)  # P(chi2_1 < 0.02)
    with pytest.raises(ValueError, match="m=1"):
        gaussian_collapse_fraction(1)


def test_small_batches_collapse_more_often_than_large_ones():
    model = tiny_net()
    data = torch.randn(64, 3, 4, 4)
    collapsed = {}
    for bs in (1, 16):
        stats = batch_stats(model, data.split(bs))
        collapsed[bs] = summarise_batch_stats(stats, threshold=0.2)["collapsed"].max()
    assert collapsed[1] > collapsed[16]


# --- train/eval gap ----------------------------------------------------------------------------


def test_train_eval_gap_evaluates_both_ways_and_changes_nothing():
    model = tiny_net()
    batches = [(torch.randn(4, 3, 8, 8) * 3 + 2, torch.randint(0, 3, (4,))) for _ in range(3)]
    before = state(model)
    gap = train_eval_gap(model, batches)
    assert same_state(model.state_dict(), before) and model.training
    assert gap["mode"].tolist() == ["batch", "running"] and gap["samples"].tolist() == [12, 12]
    for mode, train in (("batch", True), ("running", False)):
        loss = correct = 0.0
        for x, y in batches:
            with torch.no_grad():
                out = copy.deepcopy(model).train(train)(x)
            loss += float(F.cross_entropy(out, y)) * 4
            correct += int((out.argmax(1) == y).sum())
        row = gap.set_index("mode").loc[mode]
        assert row["loss"] == pytest.approx(loss / 12, rel=1e-5) and row["accuracy"] == pytest.approx(correct / 12)
    assert gap["loss"].iloc[0] != pytest.approx(gap["loss"].iloc[1])  # running (0, 1) vs inputs of mean 2


def test_no_gap_without_batch_statistics():
    gap = train_eval_gap(tiny_net(get_norm("groupnorm", groups=2)), [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))])
    assert gap["loss"].iloc[0] == pytest.approx(gap["loss"].iloc[1]) and gap["accuracy"].nunique() == 1


# --- eps bound ----------------------------------------------------------------------------------


def normalised(x: torch.Tensor, eps: float) -> torch.Tensor:
    """BatchNorm's x-hat, by torch, for a batch laid out as (N, C, H, W)."""
    return F.batch_norm(x, None, None, training=True, eps=eps)


def test_eps_bound_holds_on_random_batches():
    for shape in ((2, 3, 1, 1), (2, 3, 2, 2), (8, 3, 4, 4), (1, 3, 5, 5)):
        m = shape[0] * shape[2] * shape[3]
        for eps in (1e-5, 0.1):
            for scale in (1e-4, 1.0, 100.0):
                x = torch.randn(shape, dtype=torch.float64) * scale + 3
                x[0, 1] *= 1e-3  # and a lopsided batch
                xh = normalised(x, eps)
                sigma = x.var(dim=(0, 2, 3), unbiased=False).sqrt()
                bound = torch.as_tensor(eps_bound(eps, m, sigma.numpy()))
                assert (xh.abs().amax(dim=(0, 2, 3)) <= bound * (1 + 1e-9)).all()
                assert (xh.abs() <= math.sqrt(m - 1) + 1e-12).all()
                dev = (x - x.mean(dim=(0, 2, 3), keepdim=True)).abs()
                assert (xh.abs() <= dev / math.sqrt(eps) * (1 + 1e-9)).all()


@pytest.mark.parametrize("m", [2, 3, 8, 32, 256])
@pytest.mark.parametrize("eps", [1e-5, 0.1])
def test_eps_bound_is_tight_when_one_value_differs(m, eps):
    for a in (1e-3, 1.0, 1e3):
        x = torch.zeros(m, 1, 1, 1, dtype=torch.float64)
        x[0] = a
        sigma = float(x.std(unbiased=False))
        got = float(normalised(x, eps).abs().max())
        assert got == pytest.approx(eps_bound(eps, m, sigma), rel=1e-9)
    # a large outlier reaches sqrt(m - 1) whatever eps is; a collapsed one is squashed by eps
    assert eps_bound(eps, m, 1e6) == pytest.approx(math.sqrt(m - 1), rel=1e-6)
    assert eps_bound(eps, m) == math.sqrt(m - 1)
    assert eps_bound(eps, m, 1e-6) == pytest.approx(math.sqrt((m - 1) / eps) * 1e-6, rel=1e-5)


def test_eps_bound_arguments():
    assert eps_bound(0.1, 2, 0.0) == 0.0 and eps_bound(0.0, 5, 0.0) == 0.0
    assert eps_bound(0.0, 5, 1e-9) == pytest.approx(2.0)  # no eps: any tiny spread is blown up to sqrt(m-1)
    assert eps_bound(0.1, 1) == 0.0  # a single value is its own mean
    for bad in ({"eps": -1.0, "m": 2}, {"eps": 0.1, "m": 0}, {"eps": 0.1, "m": 2.5}):
        with pytest.raises(ValueError):
            eps_bound(**bad)


# --- probe_model: what a probe record holds, on a tiny model ----------------------------------


class _FakeValid:
    """Stands in for a fastai validation DataLoader: ``new(bs=..., shuffle=True, drop_last=True)``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def new(self, bs: int, shuffle: bool, drop_last: bool):
        import random

        idx = list(range(len(self.x)))
        random.Random(random.randint(0, 2**32 - 1)).shuffle(idx)
        n = len(idx) // bs * bs if drop_last else len(idx)
        return [(self.x[idx[i:i + bs]], self.y[idx[i:i + bs]]) for i in range(0, n, bs)]


def test_probe_model_rows_per_layer_and_batch_size():
    from normkit.probes import ProbeConfig, probe_model, probe_configs

    model = tiny_net()
    with torch.no_grad():
        model[1][0].running_var.fill_(4.0)
    valid = _FakeValid(torch.randn(21, 3, 8, 8), torch.randint(0, 3, (21,)))
    config = ProbeConfig(probe_configs()[0].run, (2, 8), max_batches=5, threshold=0.01)
    before = state(model)
    stats, gap = probe_model(model, valid, config)
    assert same_state(model.state_dict(), before)
    assert [(s["eval_bs"], s["layer"], s["depth"]) for s in stats] == [(2, "1.0", 0), (2, "3", 1), (8, "1.0", 0), (8, "3", 1)]
    assert [s["batches"] for s in stats] == [5, 5, 2, 2] and [s["n"] for s in stats] == [128, 32, 512, 128]
    assert [(g["eval_bs"], g["mode"], g["samples"]) for g in gap] == [(2, "batch", 20), (2, "running", 20),
                                                                       (8, "batch", 16), (8, "running", 16)]
    # layer 1.0 against its running variance of 4: the ratios are the batch variances / 4
    import random

    random.seed(config.val_seed)  # the probe's shuffled order
    first = batch_stats(model, valid.new(bs=2, shuffle=True, drop_last=True)[:5])
    ratios = first.loc[first["layer"] == "1.0", "var"] / 4
    assert stats[0]["var_ratio_median"] == pytest.approx(float(ratios.median()), rel=1e-5)
    assert stats[0]["collapsed"] == pytest.approx(float((ratios < 0.01).mean()))
    assert stats == probe_model(model, valid, config)[0]  # the same shuffled batches for a seed
    random.seed(123)
    expected = random.random()
    random.seed(123)
    probe_model(model, valid, config)
    assert random.random() == expected, "probing must leave the caller's random stream where it was"
    assert all(isinstance(v, (int, float, str)) for row in stats + gap for v in row.values())  # JSON-ready
