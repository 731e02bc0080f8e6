"""Normalisation layers by name.

Every network in normkit is built from a :class:`Norm`: a registered normalisation
method plus its parameters. A ``Norm`` makes the layer that follows each convolution
(``norm(channels, act=True)`` gives "norm then ReLU", or one fused norm-activation layer
for methods such as FRN+TLU and EvoNorm) and, for methods that change the convolution
itself (Weight Standardization), the convolution too.

>>> norm = get_norm("batchnorm", eps=0.1)
>>> norm(64)                         # BatchNorm2d(64, eps=0.1) followed by ReLU
>>> available_norms()                # every registered name

Registered methods (parameters with their defaults; * = batch-dependent in training,
+ = fused norm-activation layer):

==================  =====================================================================
none                no normalisation (convolutions get a bias)
batchnorm *         ``nn.BatchNorm2d``: eps=1e-5, momentum=0.1
layernorm           ``nn.GroupNorm(1, C)``: eps=1e-5
instancenorm        :class:`InstanceNorm2d` (affine, no running stats): eps=1e-5
groupnorm           ``nn.GroupNorm``: groups=32, eps=1e-5
ws_groupnorm        timm ``StdConv2d`` (its eps 1e-6) + GroupNorm: groups=32, eps=1e-5
batchrenorm *       :class:`BatchRenorm2d`: eps=1e-5, momentum=0.1, r_max=3, d_max=5,
                    warmup_steps=5000
runningbatchnorm *  :class:`RunningBatchNorm2d`: mom=0.1, eps=1e-5
frn +               timm ``FilterResponseNormTlu2d``: eps=1e-5
evonorm_b0 * +      timm ``EvoNorm2dB0``: momentum=0.1, eps=1e-3
evonorm_s0 +        timm ``EvoNorm2dS0``: groups=32, eps=1e-5
==================  =====================================================================

Register your own with :func:`register_norm`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d, StdConv2d
from torch import nn

__all__ = [
    "NormSpec", "Norm", "register_norm", "get_norm", "available_norms", "norm_spec",
    "InstanceNorm2d", "BatchRenorm2d", "RunningBatchNorm2d",
]

#: Channel count of the layer :func:`get_norm` builds to validate parameters: the widest
#: layer of the study's networks, a multiple of every group count valid for them.
PROBE_CHANNELS = 512


@dataclass(frozen=True)
class NormSpec:
    """A registered normalisation method.

    Attributes:
        name: registry key, e.g. ``"batchnorm"``.
        build: ``build(num_channels, **params) -> nn.Module``; for methods with
            ``fuses_act`` it also takes ``apply_act: bool``.
        defaults: every parameter the method accepts, with its default value.
        fuses_act: the layer contains its own activation, so the network must not add a
            ReLU after it (FRN+TLU, EvoNorm).
        batch_dependent: one sample's output depends on the other samples in the batch
            while training.
        conv: a replacement for ``nn.Conv2d`` (e.g. a weight-standardised conv), or None.
        conv_bias: give convolutions a bias (only useful when nothing after them shifts
            the activations, i.e. no normalisation at all).
        description: one line for tables and error messages.
    """

    name: str
    build: Callable[..., nn.Module]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    fuses_act: bool = False
    batch_dependent: bool = False
    conv: Callable[..., nn.Module] | None = None
    conv_bias: bool = False
    description: str = ""


_REGISTRY: dict[str, NormSpec] = {}


def register_norm(
    name: str,
    build: Callable[..., nn.Module],
    *,
    defaults: Mapping[str, Any] | None = None,
    fuses_act: bool = False,
    batch_dependent: bool = False,
    conv: Callable[..., nn.Module] | None = None,
    conv_bias: bool = False,
    description: str = "",
    overwrite: bool = False,
) -> NormSpec:
    """Add a normalisation method to the registry and return its spec.

    ``defaults`` lists the parameters ``build`` accepts besides the channel count; when
    omitted they are read from ``build``'s signature (every keyword with a default).
    """
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"norm name must be a lower-case identifier, got {name!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"norm {name!r} is already registered; pass overwrite=True to replace it")
    if defaults is None:
        defaults = _signature_defaults(build)
    spec = NormSpec(name, build, dict(defaults), fuses_act, batch_dependent, conv, conv_bias, description)
    _REGISTRY[name] = spec
    return spec


def available_norms() -> list[str]:
    """Names of every registered normalisation method, sorted."""
    return sorted(_REGISTRY)


def norm_spec(name: str) -> NormSpec:
    """The registered spec for ``name``; unknown names raise ``ValueError`` listing the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown norm {name!r}; valid norms: {', '.join(available_norms())}") from None


@dataclass(frozen=True)
class Norm:
    """A normalisation method with its parameters: a factory for the layers of a network."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def spec(self) -> NormSpec:
        return norm_spec(self.name)

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        """Human-readable name, e.g. ``batchnorm(eps=0.1)``; defaults are not repeated."""
        changed = {k: v for k, v in self.params if self.spec.defaults.get(k) != v}
        inner = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in changed.items())
        return f"{self.name}({inner})" if inner else self.name

    def __call__(self, num_channels: int, act: bool = True) -> nn.Module:
        """The layer after a convolution with ``num_channels`` outputs: norm, then ReLU if ``act``."""
        spec = self.spec
        if spec.fuses_act:
            return _mark(spec.build(num_channels, apply_act=act, **self.kwargs))
        layer = _mark(spec.build(num_channels, **self.kwargs))
        return nn.Sequential(layer, nn.ReLU(inplace=True)) if act else layer

    def conv(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> nn.Module:
        """A ``kernel_size`` convolution with 'same' padding, of the kind this method asks for."""
        cls = self.spec.conv or nn.Conv2d
        return cls(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=self.spec.conv_bias)


#: Attribute set on every layer a :class:`Norm` builds; training exempts their parameters
#: from weight decay, as fastai does by default for torch's own norm layers only.
NORM_LAYER_FLAG = "is_normkit_norm"


def _mark(layer: nn.Module) -> nn.Module:
    setattr(layer, NORM_LAYER_FLAG, True)
    return layer


def norm_layers(model: nn.Module) -> list[nn.Module]:
    """Every normalisation layer that a :class:`Norm` built in ``model``."""
    return [m for m in model.modules() if getattr(m, NORM_LAYER_FLAG, False)]


def get_norm(name: str | Norm, **params: Any) -> Norm:
    """The method ``name`` with ``params`` over its defaults; bad names or parameters raise ``ValueError``."""
    if isinstance(name, Norm):
        if params:
            return get_norm(name.name, **{**name.kwargs, **params})
        return name
    spec = norm_spec(name)
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        valid = ", ".join(spec.defaults) or "none"
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for norm {name!r}; valid parameters: {valid}")
    merged = {**spec.defaults, **params}
    norm = Norm(name, tuple(sorted(merged.items())))
    norm(PROBE_CHANNELS, act=False)  # build once so that bad values fail here, with the builder's message
    return norm


def _signature_defaults(build: Callable[..., nn.Module]) -> dict[str, Any]:
    sig = inspect.signature(build)
    return {
        p.name: p.default
        for p in list(sig.parameters.values())[1:]
        if p.default is not inspect.Parameter.empty and p.name != "apply_act"
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _check(name: str, value: Any, ok: bool, valid: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid; {name} must be {valid}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_eps(eps: Any) -> None:
    _check("eps", eps, _is_number(eps) and eps > 0, "a positive number")


def _check_momentum(name: str, value: Any) -> None:
    _check(name, value, _is_number(value) and 0 < value <= 1, "a number in (0, 1]")


def _check_groups(groups: Any, num_channels: int) -> None:
    """``groups`` must be a positive integer dividing ``num_channels``."""
    _check("groups", groups, isinstance(groups, int) and not isinstance(groups, bool) and groups > 0,
           "a positive integer")
    if num_channels % groups:
        valid = [g for g in range(1, num_channels + 1) if num_channels % g == 0]
        raise ValueError(f"groups={groups} does not divide num_channels={num_channels}; "
                         f"valid groups for {num_channels} channels: {', '.join(map(str, valid))}")


# ---------------------------------------------------------------------------------------
# Built-in methods.


def no_norm(num_channels: int) -> nn.Module:
    """No normalisation: the identity (the baseline)."""
    return nn.Identity()


def batchnorm(num_channels: int, eps: float = 1e-5, momentum: float = 0.1) -> nn.Module:
    r"""BatchNorm (Ioffe & Szegedy, 2015) over (N, H, W) for each channel.

    Training: :math:`y = \gamma (x - \mu_B) / \sqrt{\sigma_B^2 + \epsilon} + \beta` with the
    batch's per-channel mean and (biased) variance; running estimates are updated as
    :math:`r \leftarrow (1 - m) r + m\,s_B` (``momentum`` = m). Inference uses the running
    estimates instead. Shapes: (N, C, H, W) -> (N, C, H, W).
    """
    _check_eps(eps)
    _check_momentum("momentum", momentum)
    return nn.BatchNorm2d(num_channels, eps=float(eps), momentum=float(momentum))


register_norm("none", no_norm, conv_bias=True, description="no normalisation")
register_norm("batchnorm", batchnorm, batch_dependent=True, description="BatchNorm (torch.nn.BatchNorm2d)")


# --- batch-independent alternatives ---------------------------------------------------


def layernorm(num_channels: int, eps: float = 1e-5) -> nn.Module:
    r"""Layer Normalization (Ba et al., 2016) over (C, H, W) of each sample.

    :math:`y_{nchw} = \gamma_c (x_{nchw} - \mu_n) / \sqrt{\sigma_n^2 + \epsilon} + \beta_c`
    with the mean and (biased) variance of sample n over all its C·H·W values. Built as
    ``nn.GroupNorm(1, C)``: one group holding every channel. Note the affine is per
    *channel* (γ, β of shape (C,)), as in GroupNorm, not per element as in
    ``nn.LayerNorm([C, H, W])`` (which would tie the layer to one image size).
    Shapes: (N, C, H, W) -> (N, C, H, W).
    """
    _check_eps(eps)
    return nn.GroupNorm(1, num_channels, eps=float(eps))


class InstanceNorm2d(nn.InstanceNorm2d):
    r"""``nn.InstanceNorm2d(C, affine=True)`` that also accepts a 1x1 input.

    :math:`y_{nchw} = \gamma_c (x_{nchw} - \mu_{nc}) / \sqrt{\sigma_{nc}^2 + \epsilon} + \beta_c`
    with the mean and (biased) variance of channel c of sample n over its H·W values; no
    running statistics, so training and inference compute the same thing.

    torch refuses a 1x1 input (``Expected more than 1 spatial element``); here it gets the
    formula's value, :math:`\beta_c` (the mean of one value is that value). ResNet18's last
    stage is 1x1 at 32 px (the smoke protocol) and 4x4 at 128 px: instance statistics
    degenerate as the feature map shrinks, and at 1x1 the layer passes no information.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__(num_features, eps=eps, affine=True, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and x.shape[-1] * x.shape[-2] == 1:  # the formula, written out
            x_hat = (x - x.mean(dim=(2, 3), keepdim=True)) / (
                x.var(dim=(2, 3), unbiased=False, keepdim=True) + self.eps).sqrt()
            return x_hat * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return super().forward(x)


def instancenorm(num_channels: int, eps: float = 1e-5) -> nn.Module:
    """Instance Normalization (Ulyanov et al., 2016) with a per-channel affine: see :class:`InstanceNorm2d`."""
    _check_eps(eps)
    return InstanceNorm2d(num_channels, eps=float(eps))


def groupnorm(num_channels: int, groups: int = 32, eps: float = 1e-5) -> nn.Module:
    r"""Group Normalization (Wu & He, 2018): ``nn.GroupNorm(groups, C)``.

    The C channels of each sample are split into ``groups`` groups of C/groups consecutive
    channels; :math:`y = \gamma_c (x - \mu_{ng}) / \sqrt{\sigma_{ng}^2 + \epsilon} + \beta_c`
    with the mean and (biased) variance of group g of sample n over its (C/groups)·H·W
    values. ``groups=1`` is LayerNorm, ``groups=C`` InstanceNorm. The default 32 (the
    paper's) divides every width of both networks (32..512); in the CNN's first layer (32
    channels) it is InstanceNorm. ``groups`` must divide C. Shapes: (N, C, H, W) -> same.
    """
    _check_eps(eps)
    _check_groups(groups, num_channels)
    return nn.GroupNorm(groups, num_channels, eps=float(eps))


def filter_response_norm(num_channels: int, apply_act: bool = True, eps: float = 1e-5) -> nn.Module:
    r"""Filter Response Normalization with a Thresholded Linear Unit (Singh & Krishnan, 2019).

    timm's ``FilterResponseNormTlu2d``: with :math:`\nu^2_{nc}` the mean of :math:`x^2` over
    the H·W values of channel c of sample n (no mean subtraction),
    :math:`y = \max(\gamma_c x / \sqrt{\nu^2_{nc} + \epsilon} + \beta_c,\ \tau_c)`; without
    ``apply_act`` the max with the learned threshold τ is left out. Per sample and channel:
    batch-independent. timm's default eps (1e-5; the paper uses 1e-6, learned at 1x1).
    """
    _check_eps(eps)
    return FilterResponseNormTlu2d(num_channels, apply_act=bool(apply_act), eps=float(eps))


def evonorm_s0(num_channels: int, apply_act: bool = True, groups: int = 32, eps: float = 1e-5) -> nn.Module:
    r"""EvoNorm-S0 (Liu et al., 2020): timm's ``EvoNorm2dS0``, a normalisation-activation layer.

    :math:`y = \gamma_c\, x \,\sigma(v_c x) / s_{ng}(x) + \beta_c` where σ is the logistic
    sigmoid (so :math:`x\sigma(v x)` is a Swish), and :math:`s_{ng} = \sqrt{\mathrm{Var}_g(x) + \epsilon}`
    is the standard deviation of the (C/groups)·H·W values of x's group in its sample (as
    GroupNorm, without mean subtraction in the numerator). Batch-independent. Without
    ``apply_act`` the layer is only the affine :math:`\gamma_c x + \beta_c`: no normalisation
    at all (as in timm and the paper's reference TensorFlow code); in ResNet18 this is the
    case for the second norm of each block and for the shortcut norms.
    """
    _check_eps(eps)
    _check_groups(groups, num_channels)
    return EvoNorm2dS0(num_channels, groups=groups, apply_act=bool(apply_act), eps=float(eps))


register_norm("layernorm", layernorm, description="LayerNorm over (C, H, W) per sample (nn.GroupNorm(1, C))")
register_norm("instancenorm", instancenorm, description="InstanceNorm over (H, W) per sample and channel, affine")
register_norm("groupnorm", groupnorm, description="GroupNorm (nn.GroupNorm), 32 groups by default")
register_norm("ws_groupnorm", groupnorm, conv=StdConv2d,
              description="Weight Standardization (timm StdConv2d) + GroupNorm")
register_norm("frn", filter_response_norm, fuses_act=True, description="Filter Response Norm + TLU (timm)")
register_norm("evonorm_s0", evonorm_s0, fuses_act=True, description="EvoNorm-S0 norm-activation, grouped (timm)")


# --- batch-dependent alternatives -----------------------------------------------------


class BatchRenorm2d(nn.Module):
    r"""Batch Renormalization (Ioffe, 2017) for (N, C, H, W) inputs.

    Training, per channel, with the batch mean :math:`\mu_B` and biased variance
    :math:`\sigma_B^2` over (N, H, W), :math:`s_B = \sqrt{\sigma_B^2 + \epsilon}`, and the
    running estimates :math:`\mu` and :math:`s = \sqrt{\text{running\_var} + \epsilon}`:

    .. math::

        r = \mathrm{clip}(s_B / s,\ 1/r_{\max}(t),\ r_{\max}(t)), \quad
        d = \mathrm{clip}((\mu_B - \mu) / s,\ -d_{\max}(t),\ d_{\max}(t)), \\
        y = \gamma \left(\frac{x - \mu_B}{s_B}\, r + d\right) + \beta,

    with r and d treated as constants by backpropagation (stop-gradient). Then, as in
    ``nn.BatchNorm2d``, :math:`\mu \leftarrow \mu + m(\mu_B - \mu)` and
    running_var :math:`\leftarrow` running_var :math:`+\, m(\hat\sigma_B^2 - \text{running\_var})`
    with the unbiased batch variance (``momentum`` = m). Inference:
    :math:`y = \gamma (x - \mu) / s + \beta`.

    While the clips do not bind, :math:`(x - \mu_B) r / s_B + d = (x - \mu) / s`: the training
    output *equals* the inference output, and only the gradients see the batch statistics.
    With r_max = 1 and d_max = 0 the layer is exactly BatchNorm.

    Schedule: with t the number of training batches seen so far (the buffer
    ``num_batches_tracked``, which is the number of optimizer steps in a plain training
    loop), :math:`r_{\max}(t) = 1 + (r_{\max} - 1) f`, :math:`d_{\max}(t) = d_{\max} f`,
    :math:`f = \min(t / \text{warmup\_steps}, 1)`: BatchNorm at the start, relaxed linearly.

    Defaults: r_max = 3 and d_max = 5 are the paper's final limits. The paper trains with
    BatchNorm for 5k steps, then relaxes the limits until 25k-40k steps. Here a single ramp
    from step 0: with momentum 0.1 the running estimates forget their initial (0, 1) within
    ~50 steps (0.9^50 < 1%), when the limits have moved by 1% of their range, so no separate
    BatchNorm phase is needed. The ramp is counted in steps, not epochs or samples, because
    what must be trustworthy before the limits open is the running average, which moves once
    per step. ``warmup_steps=5000``: on Imagenette (9469 training images, 5 epochs), at batch
    size 2 (4734 steps an epoch) the limits are fully open after about one epoch; at batch
    size 128 (73 steps an epoch, 365 in all) they only reach r_max 1.15, d_max 0.37, so the
    layer stays close to BatchNorm there, which is what it is for: with 128 samples r ≈ 1
    and d ≈ 0 anyway. A batch of one sample works (its H·W values give the statistics; with
    a single value per channel the variance is 0 and the running variance is not debiased).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1,
                 r_max: float = 3.0, d_max: float = 5.0, warmup_steps: int = 5000):
        super().__init__()
        self.num_features = num_features
        self.eps, self.momentum = eps, momentum
        self.r_max, self.d_max, self.warmup_steps = r_max, d_max, warmup_steps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current clipping limits (r_max(t), d_max(t)), as 0-d tensors."""
        t = self.num_batches_tracked.float()
        f = (t / self.warmup_steps).clamp(max=1.0) if self.warmup_steps > 0 else torch.ones_like(t)
        return 1 + (self.r_max - 1) * f, self.d_max * f

    def correction(self, mean_b: torch.Tensor, std_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """r and d (shape (C,), detached) for a batch with mean ``mean_b`` and std ``std_b`` (eps included)."""
        std = (self.running_var + self.eps).sqrt()
        r_lim, d_lim = self.limits()
        r = torch.clamp(std_b.detach() / std, min=1 / r_lim, max=r_lim)
        d = torch.clamp((mean_b.detach() - self.running_mean) / std, min=-d_lim, max=d_lim)
        return r, d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"BatchRenorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        shape = (1, -1, 1, 1)
        if self.training:
            mean_b = x.mean(dim=(0, 2, 3))
            var_b = x.var(dim=(0, 2, 3), unbiased=False)
            std_b = (var_b + self.eps).sqrt()
            r, d = self.correction(mean_b, std_b)
            x_hat = (x - mean_b.view(shape)) / std_b.view(shape) * r.view(shape) + d.view(shape)
            n = x.numel() // x.shape[1]
            with torch.no_grad():
                self.running_mean.lerp_(mean_b, self.momentum)
                self.running_var.lerp_(var_b * (n / (n - 1) if n > 1 else 1.0), self.momentum)
                self.num_batches_tracked.add_(1)
        else:
            x_hat = (x - self.running_mean.view(shape)) / (self.running_var + self.eps).sqrt().view(shape)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, r_max={self.r_max}, "
                f"d_max={self.d_max}, warmup_steps={self.warmup_steps}")


def batchrenorm(num_channels: int, eps: float = 1e-5, momentum: float = 0.1, r_max: float = 3.0,
                d_max: float = 5.0, warmup_steps: int = 5000) -> nn.Module:
    """Batch Renormalization: see :class:`BatchRenorm2d`."""
    _check_eps(eps)
    _check_momentum("momentum", momentum)
    _check("r_max", r_max, _is_number(r_max) and r_max >= 1, "a number >= 1")
    _check("d_max", d_max, _is_number(d_max) and d_max >= 0, "a number >= 0")
    _check("warmup_steps", warmup_steps,
           isinstance(warmup_steps, int) and not isinstance(warmup_steps, bool) and warmup_steps >= 0,
           "an integer >= 0")
    return BatchRenorm2d(num_channels, float(eps), float(momentum), float(r_max), float(d_max), warmup_steps)


class RunningBatchNorm2d(nn.Module):
    r"""RunningBatchNorm, from the fast.ai course (2019, part 2, lesson 10), for (N, C, H, W).

    Normalises with running statistics in training as well as at inference, so that a
    small, noisy batch moves the statistics only a little. Per channel, three exponentially
    weighted running sums are kept, starting at 0: of the values (S), of their squares (Q)
    and of their number (K). A training batch with n = N·H·W values per channel updates

    .. math::

        S \leftarrow (1 - w) S + w \textstyle\sum x, \quad
        Q \leftarrow (1 - w) Q + w \textstyle\sum x^2, \quad
        K \leftarrow (1 - w) K + w\, n, \qquad
        w = 1 - (1 - \text{mom}) / \sqrt{\max(N - 1, 1)},

    and every forward pass, training or not, computes
    :math:`\mu = S/K`, :math:`\sigma^2 = \max(Q/K - \mu^2, 0)` and
    :math:`y = \gamma (x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta`.

    * Debiasing: S, Q and K start at 0 and shrink by the same factor, so the start-up bias
      (the :math:`1 - \prod(1 - w)` of Adam's correction) cancels in S/K and Q/K: the first
      batch gives exactly its own mean and variance.
    * The weight of a new batch grows with the batch size (fast.ai's choice): w = mom for
      N <= 2 (the ``max(N - 1, 1)`` keeps N = 1 finite, where fast.ai divides by 0), 0.92 for
      N = 128 with mom = 0.1, so large batches behave much like BatchNorm.
    * The current batch's sums enter with their gradient (the old sums are constants), so
      training is still batch-dependent, but a batch can only move μ and σ² by a fraction w.
    * Until 20 samples have been seen, σ² is floored at 0.01 (fast.ai's guard against a tiny
      variance estimated from the first few samples).
    """

    warmup_samples: int = 20
    warmup_min_var: float = 0.01

    def __init__(self, num_features: int, mom: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.mom, self.eps = num_features, mom, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("sums", torch.zeros(num_features))
        self.register_buffer("sqrs", torch.zeros(num_features))
        self.register_buffer("count", torch.zeros(()))
        self.register_buffer("num_samples", torch.tensor(0, dtype=torch.long))

    def batch_weight(self, batch_size: int) -> float:
        """w, the weight of a batch of ``batch_size`` samples in the running sums."""
        return 1 - (1 - self.mom) / math.sqrt(max(batch_size - 1, 1))

    def stats(self, sums: torch.Tensor, sqrs: torch.Tensor, count: torch.Tensor, num_samples: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance (shape (C,)) from running sums; (0, 1) before any training batch."""
        seen = count > 0
        k = count.clamp(min=torch.finfo(sums.dtype).tiny)
        mean = torch.where(seen, sums / k, torch.zeros_like(sums))
        var = torch.where(seen, (sqrs / k - mean * mean).clamp(min=0), torch.ones_like(sqrs))
        var = torch.where(num_samples < self.warmup_samples, var.clamp(min=self.warmup_min_var), var)
        return mean, var

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"RunningBatchNorm2d expects (N, C, H, W) input, got shape {tuple(x.shape)}")
        sums, sqrs, count = self.sums, self.sqrs, self.count
        if self.training:
            w = self.batch_weight(x.shape[0])
            xf = x.to(torch.promote_types(x.dtype, torch.float32))  # sums in float32 at least
            sums = torch.lerp(sums, xf.sum(dim=(0, 2, 3)), w)
            sqrs = torch.lerp(sqrs, (xf * xf).sum(dim=(0, 2, 3)), w)
            # full_like, not new_tensor: no tensor made from host data in the step (see normkit.graphs)
            count = torch.lerp(count, torch.full_like(count, x.numel() / x.shape[1]), w)
            with torch.no_grad():
                self.sums.copy_(sums)
                self.sqrs.copy_(sqrs)
                self.count.copy_(count)
                self.num_samples.add_(x.shape[0])
        mean, var = self.stats(sums, sqrs, count, self.num_samples)
        shape = (1, -1, 1, 1)
        x_hat = (x - mean.view(shape).to(x.dtype)) / (var + self.eps).sqrt().view(shape).to(x.dtype)
        return x_hat * self.weight.view(shape) + self.bias.view(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, mom={self.mom}, eps={self.eps}"


def runningbatchnorm(num_channels: int, mom: float = 0.1, eps: float = 1e-5) -> nn.Module:
    """fast.ai's RunningBatchNorm: see :class:`RunningBatchNorm2d`."""
    _check_eps(eps)
    _check_momentum("mom", mom)
    return RunningBatchNorm2d(num_channels, float(mom), float(eps))


def evonorm_b0(num_channels: int, apply_act: bool = True, momentum: float = 0.1, eps: float = 1e-3) -> nn.Module:
    r"""EvoNorm-B0 (Liu et al., 2020): timm's ``EvoNorm2dB0``, a normalisation-activation layer.

    :math:`y = \gamma_c\, x / \max\!\left(\sqrt{\sigma_c^2 + \epsilon},\ v_c x + \sqrt{\sigma_{nc}^2 + \epsilon}\right) + \beta_c`
    where :math:`\sigma_c^2` is the batch variance over (N, H, W) in training (running
    variance, updated with ``momentum`` and the unbiased batch variance, at inference) and
    :math:`\sigma_{nc}^2` the instance variance over (H, W). Batch-dependent in training.
    Without ``apply_act`` the layer is only the affine :math:`\gamma_c x + \beta_c` (as in timm
    and the paper's reference code): in ResNet18 the second norm of each block and the
    shortcut norms do not normalise. timm's default eps, 1e-3.
    """
    _check_eps(eps)
    _check_momentum("momentum", momentum)
    return EvoNorm2dB0(num_channels, apply_act=bool(apply_act), momentum=float(momentum), eps=float(eps))


register_norm("batchrenorm", batchrenorm, batch_dependent=True,
              description="Batch Renormalization (normkit BatchRenorm2d), r/d limits ramped over warmup_steps")
register_norm("runningbatchnorm", runningbatchnorm, batch_dependent=True,
              description="fast.ai RunningBatchNorm: running statistics in training too")
register_norm("evonorm_b0", evonorm_b0, fuses_act=True, batch_dependent=True,
              description="EvoNorm-B0 norm-activation, batch variance (timm)")
