"""Normalisation layers by name.

Every network in normkit is built from a :class:`Norm`: a registered normalisation
method plus its parameters. A ``Norm`` makes the layer that follows each convolution
(``norm(channels, act=True)`` gives "norm then ReLU", or one fused norm-activation layer
for methods such as FRN+TLU and EvoNorm) and, for methods that change the convolution
itself (Weight Standardization), the convolution too.

>>> norm = get_norm("batchnorm", eps=0.1)
>>> norm(64)                         # BatchNorm2d(64, eps=0.1) followed by ReLU
>>> available_norms()                # every registered name

Register your own with :func:`register_norm`.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import nn

__all__ = ["NormSpec", "Norm", "register_norm", "get_norm", "available_norms", "norm_spec"]


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
            return spec.build(num_channels, apply_act=act, **self.kwargs)
        layer = spec.build(num_channels, **self.kwargs)
        return nn.Sequential(layer, nn.ReLU(inplace=True)) if act else layer

    def conv(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1) -> nn.Module:
        """A ``kernel_size`` convolution with 'same' padding, of the kind this method asks for."""
        cls = self.spec.conv or nn.Conv2d
        return cls(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=self.spec.conv_bias)


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
    norm(8, act=False)  # build once so that bad values fail here, with the builder's message
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


# ---------------------------------------------------------------------------------------
# Built-in methods. Later chapters register more in normkit.norms_extra.


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
    _check("eps", eps, isinstance(eps, (int, float)) and eps > 0, "a positive number")
    _check("momentum", momentum, isinstance(momentum, (int, float)) and 0 < momentum <= 1, "in (0, 1]")
    return nn.BatchNorm2d(num_channels, eps=float(eps), momentum=float(momentum))


register_norm("none", no_norm, conv_bias=True, description="no normalisation")
register_norm("batchnorm", batchnorm, batch_dependent=True, description="BatchNorm (torch.nn.BatchNorm2d)")
