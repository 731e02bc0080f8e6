"""Both networks, built with every registered normalisation."""

from __future__ import annotations

import functools

import pytest
import torch
from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d, StdConv2d
from torch import nn

from normkit.models import BasicBlock, build_model
from normkit.norms import BatchRenorm2d, InstanceNorm2d, RunningBatchNorm2d, available_norms, get_norm, norm_spec

from torch_state import torch_threads

NETS = ("cnn", "resnet18")
#: Convolutions (= normalisation layers) per network: the CNN's 4; ResNet18's stem, 2 per
#: basic block (8 blocks) and the 1x1 shortcut convolutions of stages 2-4.
N_CONVS = {"cnn": 4, "resnet18": 1 + 2 * 8 + 3}
#: The layer each built-in method must put after every convolution.
LAYER_TYPE = {
    "batchnorm": nn.BatchNorm2d, "layernorm": nn.GroupNorm, "instancenorm": InstanceNorm2d,
    "groupnorm": nn.GroupNorm, "ws_groupnorm": nn.GroupNorm, "batchrenorm": BatchRenorm2d,
    "runningbatchnorm": RunningBatchNorm2d, "frn": FilterResponseNormTlu2d, "evonorm_b0": EvoNorm2dB0,
    "evonorm_s0": EvoNorm2dS0,
}
#: Anything that normalises, so that a stray layer of another kind is caught.
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, BatchRenorm2d,
              RunningBatchNorm2d, FilterResponseNormTlu2d, EvoNorm2dB0, EvoNorm2dS0)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster, and the machine is shared."""
    with torch_threads(1):
        yield


@functools.cache
def model(net: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(net, name)


def norm_layers(m: nn.Module) -> list[nn.Module]:
    return [x for x in m.modules() if isinstance(x, NORM_TYPES) or "Norm" in type(x).__name__]


def convs(m: nn.Module) -> list[nn.Conv2d]:
    return [x for x in m.modules() if isinstance(x, nn.Conv2d)]


@pytest.mark.parametrize("name", available_norms())
@pytest.mark.parametrize("net", NETS)
def test_forward_backward_and_eval_at_32px(net, name):
    m = model(net, name).train()
    m.zero_grad()
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    grads = [p.grad for p in m.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        assert m.eval()(x).shape == (2, 10)


@pytest.mark.parametrize("name", available_norms())
@pytest.mark.parametrize("net", NETS)
def test_every_norm_layer_is_of_the_requested_type(net, name):
    m = model(net, name)
    layers, cs = norm_layers(m), convs(m)
    assert len(cs) == N_CONVS[net]
    if name == "none":
        assert layers == []
        return
    expected = LAYER_TYPE.get(name) or type(get_norm(name)(64, act=False))
    assert all(type(x) is expected for x in layers), {type(x).__name__ for x in layers}
    assert len(layers) == len(cs)  # one after every convolution, nothing else
    widths = [c.out_channels for c in cs]
    assert sorted(getattr(x, "num_features", getattr(x, "num_channels", None)) or x.weight.numel()
                  for x in layers) == sorted(widths)


def test_group_counts_and_instancenorm_settings():
    assert {x.num_groups for x in norm_layers(model("resnet18", "layernorm"))} == {1}
    assert {x.num_groups for x in norm_layers(model("resnet18", "groupnorm"))} == {32}
    assert {x.num_groups for x in norm_layers(model("cnn", "ws_groupnorm"))} == {32}
    assert {x.groups for x in norm_layers(model("cnn", "evonorm_s0"))} == {32}
    assert all(x.affine and not x.track_running_stats for x in norm_layers(model("cnn", "instancenorm")))


@pytest.mark.parametrize("name", available_norms())
@pytest.mark.parametrize("net", NETS)
def test_convolutions_are_the_kind_the_method_asks_for(net, name):
    cs = convs(model(net, name))
    kind = StdConv2d if name == "ws_groupnorm" else nn.Conv2d
    assert all(type(c) is kind for c in cs)
    assert all((c.bias is not None) == (name == "none") for c in cs)


@pytest.mark.parametrize("name", available_norms())
@pytest.mark.parametrize("net", NETS)
def test_fused_norms_bring_their_own_activation(net, name):
    m = model(net, name)
    relus = [x for x in m.modules() if isinstance(x, nn.ReLU)]
    post_add = [b.act for b in m.modules() if isinstance(b, BasicBlock)]  # ResNet's ReLU after each addition
    assert len(post_add) == (8 if net == "resnet18" else 0)
    if norm_spec(name).fuses_act:
        assert len(relus) == len(post_add) and all(any(r is a for a in post_add) for r in relus)
        acts = [x.apply_act for x in norm_layers(m)]
        # CNN: every norm is followed by an activation; ResNet18: stem + first norm of each block
        assert sum(acts) == (4 if net == "cnn" else 1 + 8)
    else:
        assert len(relus) == (4 if net == "cnn" else 1 + 8 + 8)


def test_resnet18_parameter_count_with_batchnorm():
    assert sum(p.numel() for p in model("resnet18", "batchnorm").parameters()) == pytest.approx(11.18e6, rel=1e-3)


def test_bad_network_name():
    with pytest.raises(ValueError, match="unknown network 'vgg'; valid networks: cnn, resnet18"):
        build_model("vgg", "batchnorm")
