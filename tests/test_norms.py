"""The normalisation registry and every registered layer against its definition."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normkit.norms as norms
from normkit.models import build_model
from normkit.norms import (
    InstanceNorm2d, RunningBatchNorm2d, available_norms, get_norm, norm_spec, register_norm,
)

BUILT_IN = ["none", "batchnorm", "layernorm", "instancenorm", "groupnorm", "ws_groupnorm", "batchrenorm",
            "runningbatchnorm", "frn", "evonorm_b0", "evonorm_s0"]
#: What we know about each method, independently of the flags in the registry.
BATCH_DEPENDENT = {"batchnorm", "batchrenorm", "runningbatchnorm", "evonorm_b0"}
FUSED = {"frn", "evonorm_b0", "evonorm_s0"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def scratch_registry(monkeypatch):
    """A copy of the registry that the test may change."""
    monkeypatch.setattr(norms, "_REGISTRY", dict(norms._REGISTRY))


def randomise_affine(layer: nn.Module) -> nn.Module:
    """Give every parameter of a norm layer random values, so that the affine is tested too."""
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
    return layer


# --- registry ---------------------------------------------------------------------------


def test_every_built_in_norm_is_registered_with_a_description():
    assert set(BUILT_IN) <= set(available_norms())
    for name in BUILT_IN:
        spec = norm_spec(name)
        assert spec.description
        assert spec.fuses_act == (name in FUSED)


def test_unknown_norm_lists_valid_names():
    with pytest.raises(ValueError, match="unknown norm 'batchnrom'") as err:
        get_norm("batchnrom")
    for name in BUILT_IN:
        assert name in str(err.value)


def test_unknown_parameter_names_the_valid_ones():
    with pytest.raises(ValueError, match="unknown parameter") as err:
        get_norm("groupnorm", num_groups=4)
    assert "num_groups" in str(err.value) and "groups" in str(err.value) and "eps" in str(err.value)


@pytest.mark.parametrize("name, params", [
    ("batchnorm", {"eps": 0}), ("batchnorm", {"eps": -1e-5}), ("batchnorm", {"momentum": 1.5}),
    ("batchnorm", {"momentum": 0}), ("layernorm", {"eps": 0}), ("instancenorm", {"eps": -1.0}),
    ("groupnorm", {"groups": 3}), ("groupnorm", {"groups": 0}), ("groupnorm", {"groups": 2.0}),
    ("ws_groupnorm", {"groups": 5}), ("evonorm_s0", {"groups": 7}), ("frn", {"eps": 0.0}),
    ("evonorm_b0", {"momentum": 2.0}), ("batchrenorm", {"r_max": 0.5}), ("batchrenorm", {"d_max": -1.0}),
    ("batchrenorm", {"warmup_steps": -1}), ("batchrenorm", {"momentum": 0.0}), ("runningbatchnorm", {"mom": 0}),
    ("runningbatchnorm", {"eps": float("nan")}), ("batchnorm", {"eps": True}), ("batchnorm", {"eps": float("inf")}),
    ("batchnorm", {"momentum": True}),
])
def test_bad_values_give_a_one_line_error_naming_them(name, params):
    (key, value), = params.items()
    with pytest.raises(ValueError) as err:
        get_norm(name, **params)
    msg = str(err.value)
    assert "\n" not in msg and f"{key}=" in msg


def test_groups_must_divide_the_channels():
    norm = get_norm("groupnorm", groups=64)
    assert norm(64, act=False).num_groups == 64
    with pytest.raises(ValueError, match="groups=64 does not divide num_channels=32") as err:
        norm(32)
    assert "1, 2, 4, 8, 16, 32" in str(err.value)
    with pytest.raises(ValueError, match="groups=64 does not divide num_channels=32"):
        build_model("cnn", norm)


def test_default_group_count_fits_every_width_of_both_networks():
    for name in ("groupnorm", "ws_groupnorm", "evonorm_s0"):
        for c in (32, 64, 128, 256, 512):
            get_norm(name)(c)


def test_label_shows_only_changed_parameters():
    assert get_norm("batchnorm").label == "batchnorm"
    assert get_norm("batchnorm", eps=0.1).label == "batchnorm(eps=0.1)"
    assert get_norm("batchrenorm", warmup_steps=100).label == "batchrenorm(warmup_steps=100)"


class ScaleNorm(nn.Module):
    """A user's norm: x / rms(x over C, H, W) per sample."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps

    def forward(self, x):
        return x / (x.pow(2).mean(dim=(1, 2, 3), keepdim=True) + self.eps).sqrt()


def test_users_can_register_a_norm_and_build_both_networks(scratch_registry):
    spec = register_norm("scalenorm", ScaleNorm, description="rms over C, H, W")
    assert spec.defaults == {"eps": 1e-6} and "scalenorm" in available_norms()
    for net, n_norms in (("cnn", 4), ("resnet18", 20)):
        model = build_model(net, get_norm("scalenorm", eps=1e-5))
        layers = [m for m in model.modules() if isinstance(m, ScaleNorm)]
        assert len(layers) == n_norms and all(m.eps == 1e-5 for m in layers)
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_duplicate_registration_is_refused_without_overwrite(scratch_registry):
    with pytest.raises(ValueError, match="already registered"):
        register_norm("batchnorm", ScaleNorm)
    assert norm_spec("batchnorm").build is norms.batchnorm
    register_norm("batchnorm", ScaleNorm, overwrite=True)
    assert norm_spec("batchnorm").build is ScaleNorm


# --- BatchNorm ----------------------------------------------------------------------------


def test_batchnorm_training_normalises_with_the_batch_statistics():
    bn = get_norm("batchnorm")(3, act=False).train()
    x = torch.randn(8, 3, 5, 5) * torch.tensor([0.5, 2.0, 7.0]).view(1, 3, 1, 1) + torch.tensor([-3.0, 0.0, 4.0]).view(1, 3, 1, 1)
    y = bn(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4)


def test_batchnorm_eval_uses_the_running_statistics():
    bn = get_norm("batchnorm", momentum=0.2)(3, act=False).train()
    mean, var = torch.zeros(3), torch.ones(3)
    for _ in range(4):
        x = torch.randn(4, 3, 3, 3) * 2 + 1
        bn(x)
        mean = 0.8 * mean + 0.2 * x.mean(dim=(0, 2, 3))
        var = 0.8 * var + 0.2 * x.var(dim=(0, 2, 3), unbiased=True)  # torch tracks the unbiased variance
    assert torch.allclose(bn.running_mean, mean, atol=1e-6) and torch.allclose(bn.running_var, var, atol=1e-5)
    x = torch.randn(2, 3, 3, 3)
    expected = (x - mean.view(1, 3, 1, 1)) / (var.view(1, 3, 1, 1) + 1e-5).sqrt()
    assert torch.allclose(bn.eval()(x), expected, atol=1e-5)


def test_batchnorm_eps_sits_in_the_denominator():
    x = 1.0 + 1e-3 * torch.randn(4, 2, 3, 3, dtype=torch.float64)  # a channel whose variance (1e-6) collapsed
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    y = get_norm("batchnorm", eps=0.1)(2, act=False).double().train()(x)
    assert torch.allclose(y, (x - mu) / (var + 0.1).sqrt(), rtol=1e-9, atol=1e-12)
    assert (y.abs() <= (x - mu).abs() / 0.1**0.5).all()
    assert y.abs().max() < 0.02  # damped: the noise stays small, ...
    y_default = get_norm("batchnorm")(2, act=False).double().train()(x)  # ... 60x larger with eps=1e-5
    assert torch.allclose(y_default / y, ((var + 0.1) / (var + 1e-5)).sqrt().expand_as(y))
    assert y_default.abs().max() > 50 * y.abs().max()


# --- batch independence and train/eval ---------------------------------------------------


def _outputs_of_sample_0(layer: nn.Module, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample 0's output in two batches that share sample 0 and differ everywhere else."""
    x = torch.randn(4, 32, 6, 6)
    other = x.clone()
    other[1:] = torch.randn(3, 32, 6, 6) * 3 + 2
    a, b = copy.deepcopy(layer).train(train), copy.deepcopy(layer).train(train)
    return a(x)[0], b(other)[0]


@pytest.mark.parametrize("name", available_norms())
def test_batch_dependent_flag_matches_the_measured_behaviour(name):
    layer = randomise_affine(get_norm(name)(32))
    y0, y1 = _outputs_of_sample_0(layer, train=True)
    measured = not torch.allclose(y0, y1, atol=1e-6)
    assert measured == norm_spec(name).batch_dependent, f"{name}: measured batch dependence {measured}"
    if name in BUILT_IN:
        assert measured == (name in BATCH_DEPENDENT)


@pytest.mark.parametrize("name", available_norms())
def test_batch_independent_norms_are_the_same_in_train_and_eval(name):
    layer = randomise_affine(get_norm(name)(32))
    x = torch.randn(2, 32, 5, 5) * 2 + 1
    same = torch.allclose(copy.deepcopy(layer).train()(x), copy.deepcopy(layer).eval()(x), atol=1e-6)
    if not norm_spec(name).batch_dependent:
        assert same
        y0, y1 = _outputs_of_sample_0(layer, train=False)  # and batch-independent in eval mode too
        assert torch.allclose(y0, y1, atol=1e-6)
    else:
        assert not same


# --- Batch Renormalization ------------------------------------------------------------------


def test_batchrenorm_with_r_1_and_d_0_is_batchnorm():
    brn = get_norm("batchrenorm", r_max=1.0, d_max=0.0, momentum=0.3, warmup_steps=0)(4, act=False)
    bn = get_norm("batchnorm", momentum=0.3)(4, act=False)
    randomise_affine(brn)
    bn.load_state_dict({"weight": brn.weight, "bias": brn.bias, "running_mean": torch.zeros(4),
                        "running_var": torch.ones(4), "num_batches_tracked": torch.tensor(0)})
    for step in range(3):
        x = (torch.randn(3, 4, 5, 5) * (step + 1) + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        y_brn, y_bn = brn(x), bn(x2)
        assert torch.allclose(y_brn, y_bn, atol=1e-5)
        g = torch.randn_like(y_bn)
        (y_brn * g).sum().backward()
        (y_bn * g).sum().backward()
        assert torch.allclose(x.grad, x2.grad, atol=1e-5)
        assert torch.allclose(brn.running_mean, bn.running_mean, atol=1e-6)
        assert torch.allclose(brn.running_var, bn.running_var, atol=1e-5)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(brn.eval()(x), bn.eval()(x), atol=1e-5)


def test_batchrenorm_starts_as_batchnorm_and_its_limits_ramp_linearly():
    brn = get_norm("batchrenorm", warmup_steps=100)(4, act=False)
    bn = nn.BatchNorm2d(4)
    x = torch.randn(3, 4, 5, 5) * 3 + 1
    assert torch.allclose(brn(x), bn(x), atol=1e-5)
    for t, (r, d) in {0: (1.0, 0.0), 50: (2.0, 2.5), 100: (3.0, 5.0), 10_000: (3.0, 5.0)}.items():
        brn.num_batches_tracked.fill_(t)
        r_lim, d_lim = brn.limits()
        assert (float(r_lim), float(d_lim)) == pytest.approx((r, d))
    brn.num_batches_tracked.fill_(0)
    brn.train()(x)
    assert int(brn.num_batches_tracked) == 1
    brn.eval()(x)
    assert int(brn.num_batches_tracked) == 1  # only training batches count


def test_batchrenorm_clips_r_and_d_and_stops_their_gradient():
    brn = get_norm("batchrenorm", r_max=3.0, d_max=5.0, warmup_steps=0)(4, act=False)  # running stats (0, 1)
    for scale, shift, r_want, d_want in ((10.0, 10.0, 3.0, 5.0), (1e-3, -10.0, 1 / 3, -5.0), (1.5, 0.5, None, None)):
        x = (torch.randn(8, 4, 6, 6) * scale + shift).requires_grad_()
        mean_b = x.mean(dim=(0, 2, 3))
        std_b = (x.var(dim=(0, 2, 3), unbiased=False) + brn.eps).sqrt()
        r, d = brn.correction(mean_b, std_b)
        assert not r.requires_grad and not d.requires_grad
        assert ((r >= 1 / 3 - 1e-6) & (r <= 3 + 1e-6)).all() and (d.abs() <= 5 + 1e-6).all()
        if r_want is not None:
            assert torch.allclose(r, torch.full((4,), r_want)) and torch.allclose(d, torch.full((4,), d_want))
        else:  # within the limits: r and d are the raw ratios
            assert torch.allclose(r, std_b.detach() / (1 + brn.eps) ** 0.5)
        expected = (x - mean_b.view(1, 4, 1, 1)) / std_b.view(1, 4, 1, 1) * r.view(1, 4, 1, 1) + d.view(1, 4, 1, 1)
        fresh = copy.deepcopy(brn)
        assert torch.allclose(fresh(x), expected, atol=1e-4)


def test_batchrenorm_within_its_limits_trains_with_the_inference_output():
    """Unclipped, (x - mu_B)/s_B * r + d = (x - mu)/s: the forward no longer depends on the batch."""
    brn = randomise_affine(get_norm("batchrenorm", warmup_steps=0)(4, act=False))
    with torch.no_grad():
        brn.running_mean.copy_(torch.tensor([0.5, -0.5, 1.0, 0.0]))
        brn.running_var.copy_(torch.tensor([1.0, 2.0, 0.5, 1.5]))
    x = torch.randn(6, 4, 5, 5) * 1.2 + 0.3
    inference = copy.deepcopy(brn).eval()(x)
    assert torch.allclose(copy.deepcopy(brn).train()(x), inference, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 4, 5, 5), (1, 4, 1, 1), (2, 4, 1, 1)])
def test_batchrenorm_handles_a_single_sample(shape):
    brn = get_norm("batchrenorm", warmup_steps=10)(4, act=False)
    for _ in range(15):
        x = torch.randn(shape).requires_grad_()
        y = brn(x)
        y.sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert torch.isfinite(brn.running_var).all() and (brn.running_var > 0).all()
    assert torch.isfinite(brn.eval()(torch.randn(shape))).all()


# --- RunningBatchNorm ---------------------------------------------------------------------


def test_runningbatchnorm_first_batch_is_normalised_with_its_own_statistics():
    rbn = get_norm("runningbatchnorm")(3, act=False)
    x = torch.randn(16, 3, 4, 4) * 2 + 5  # 16 samples: below the 20-sample warm-up, var 4 > 0.01 floor
    mu = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    assert torch.allclose(rbn(x), (x - mu) / (var + 1e-5).sqrt(), atol=1e-4)  # debiased: no pull towards 0


def test_runningbatchnorm_batch_weight():
    rbn = RunningBatchNorm2d(3, mom=0.1)
    assert rbn.batch_weight(1) == rbn.batch_weight(2) == pytest.approx(0.1)
    assert rbn.batch_weight(128) == pytest.approx(1 - 0.9 / 127**0.5)


def test_runningbatchnorm_normalises_with_running_sums_in_training():
    rbn = get_norm("runningbatchnorm", mom=0.2)(3, act=False)
    s = q = k = torch.zeros(3)
    for _ in range(5):
        x = torch.randn(2, 3, 4, 4) * 3 - 1
        y = rbn(x)
        w = 0.2  # batch of 2
        s = (1 - w) * s + w * x.sum(dim=(0, 2, 3))
        q = (1 - w) * q + w * (x * x).sum(dim=(0, 2, 3))
        k = (1 - w) * k + w * 32
        mu, var = s / k, q / k - (s / k) ** 2
        expected = (x - mu.view(1, 3, 1, 1)) / (var.view(1, 3, 1, 1) + 1e-5).sqrt()
        assert torch.allclose(y, expected, atol=1e-4)
    assert torch.allclose(rbn.eval()(x), expected, atol=1e-4)  # eval: the same running statistics


@pytest.mark.parametrize("shape", [(2, 4, 4, 4), (1, 4, 4, 4), (2, 4, 1, 1), (1, 4, 1, 1)])
def test_runningbatchnorm_is_finite_and_sane_at_batch_size_2_and_1(shape):
    rbn = randomise_affine(get_norm("runningbatchnorm")(4, act=False))
    with torch.no_grad():
        rbn.weight.fill_(1.0)
        rbn.bias.fill_(0.0)
    means, variances = [], []
    for step in range(300):  # a stationary input distribution, N(3, 2^2)
        x = (torch.randn(shape) * 2 + 3).requires_grad_()
        y = rbn(x)
        y.pow(2).sum().backward()
        assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
        if step >= 100:  # the running estimates, averaged over time (one batch's are noisy at 1 value)
            mean, var = rbn.stats(rbn.sums, rbn.sqrs, rbn.count, rbn.num_samples)
            means.append(mean)
            variances.append(var)
    assert (torch.stack(means).mean(0) - 3).abs().max() < 0.5
    ratio = torch.stack(variances).mean(0) / 4
    assert ((ratio > 0.7) & (ratio < 1.3)).all()
    y = rbn.eval()(torch.randn(4096, 4, 1, 1) * 2 + 3)  # roughly normalised
    assert torch.isfinite(y).all()
    assert y.mean(dim=(0, 2, 3)).abs().max() < 1.0
    assert ((y.std(dim=(0, 2, 3)) > 0.5) & (y.std(dim=(0, 2, 3)) < 2.0)).all()


def test_runningbatchnorm_eval_before_training_is_finite():
    assert torch.isfinite(get_norm("runningbatchnorm")(3).eval()(torch.randn(2, 3, 4, 4))).all()


# --- wrapped layers against their definitions ------------------------------------------------


def test_groupnorm_with_one_group_per_channel_is_instancenorm():
    gn = randomise_affine(get_norm("groupnorm", groups=16)(16, act=False))
    inorm = get_norm("instancenorm")(16, act=False)
    assert isinstance(inorm, nn.InstanceNorm2d) and inorm.affine and not inorm.track_running_stats
    inorm.load_state_dict(gn.state_dict())
    x = torch.randn(3, 16, 5, 5) * 2 + 1
    assert torch.allclose(gn(x), inorm(x), atol=1e-5)


def test_instancenorm_on_a_1x1_map_gives_the_bias():
    inorm = randomise_affine(InstanceNorm2d(8)).train()
    y = inorm(torch.randn(2, 8, 1, 1))
    assert torch.allclose(y, inorm.bias.view(1, 8, 1, 1).expand_as(y))


def test_layernorm_is_the_formula_over_c_h_w():
    ln = randomise_affine(get_norm("layernorm")(6, act=False))
    x = torch.randn(3, 6, 4, 5) * 3 + 2
    mu = x.mean(dim=(1, 2, 3), keepdim=True)
    var = x.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
    expected = (x - mu) / (var + 1e-5).sqrt() * ln.weight.view(1, 6, 1, 1) + ln.bias.view(1, 6, 1, 1)
    assert torch.allclose(ln(x), expected, atol=1e-5)


def test_frn_tlu_is_its_formula():
    frn = randomise_affine(get_norm("frn", eps=1e-4)(6, act=True))
    x = torch.randn(3, 6, 4, 4) * 2 + 1
    nu2 = x.pow(2).mean(dim=(2, 3), keepdim=True)
    pre = frn.weight.view(1, 6, 1, 1) * x / (nu2 + 1e-4).sqrt() + frn.bias.view(1, 6, 1, 1)
    assert torch.allclose(frn(x), torch.maximum(pre, frn.tau.view(1, 6, 1, 1)), atol=1e-5)
    linear = get_norm("frn", eps=1e-4)(6, act=False)
    linear.load_state_dict({k: v for k, v in frn.state_dict().items() if k != "tau"})
    assert torch.allclose(linear(x), pre, atol=1e-5)


def _group_std(x: torch.Tensor, groups: int, eps: float) -> torch.Tensor:
    n, c, h, w = x.shape
    var = x.view(n, groups, -1).var(dim=2, unbiased=False)
    return (var + eps).sqrt().repeat_interleave(c // groups, dim=1).view(n, c, 1, 1)


def test_evonorm_s0_is_its_formula():
    evo = randomise_affine(get_norm("evonorm_s0", groups=4)(16, act=True))
    x = torch.randn(3, 16, 4, 4) * 2 + 1
    g, b, v = (p.view(1, 16, 1, 1) for p in (evo.weight, evo.bias, evo.v))
    expected = x * torch.sigmoid(v * x) / _group_std(x, 4, 1e-5) * g + b
    assert torch.allclose(evo(x), expected, atol=1e-5)
    linear = get_norm("evonorm_s0", groups=4)(16, act=False)  # without activation: the affine alone
    linear.load_state_dict({k: val for k, val in evo.state_dict().items() if k != "v"})
    assert torch.allclose(linear(x), x * g + b, atol=1e-6)


def test_evonorm_b0_is_its_formula():
    evo = randomise_affine(get_norm("evonorm_b0")(6, act=True))
    x = torch.randn(4, 6, 5, 5) * 2 + 1
    g, b, v = (p.view(1, 6, 1, 1) for p in (evo.weight, evo.bias, evo.v))
    batch_std = (x.var(dim=(0, 2, 3), unbiased=False, keepdim=True) + 1e-3).sqrt()
    inst_std = (x.var(dim=(2, 3), unbiased=False, keepdim=True) + 1e-3).sqrt()
    expected = x / torch.maximum(batch_std, v * x + inst_std) * g + b
    assert torch.allclose(evo.train()(x), expected, atol=1e-5)
    run_std = (evo.running_var.view(1, 6, 1, 1) + 1e-3).sqrt()
    assert torch.allclose(evo.eval()(x), x / torch.maximum(run_std, v * x + inst_std) * g + b, atol=1e-5)


def test_ws_conv_standardises_each_output_channel():
    norm = get_norm("ws_groupnorm")
    conv = norm.conv(3, 8, 3, stride=2)
    with torch.no_grad():
        conv.weight.mul_(5).add_(torch.randn(8, 1, 1, 1))
    w = conv.weight.view(8, -1)
    w_std = ((w - w.mean(dim=1, keepdim=True)) / (w.var(dim=1, unbiased=False, keepdim=True) + 1e-6).sqrt())
    assert torch.allclose(w_std.mean(dim=1), torch.zeros(8), atol=1e-5)
    assert torch.allclose(w_std.var(dim=1, unbiased=False), torch.ones(8), atol=1e-4)
    x = torch.randn(2, 3, 9, 9)
    assert torch.allclose(conv(x), F.conv2d(x, w_std.view_as(conv.weight), None, 2, 1), atol=1e-4)
    assert conv.bias is None and conv(x).shape == (2, 8, 5, 5)
