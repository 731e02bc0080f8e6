"""Training steps whose forward and backward pass are replayed from CUDA graphs.

At batch size 2 a ResNet18 step on a GPU is hundreds of tiny kernels, and the host's time to
launch them, not the arithmetic, bounds the run. A CUDA graph records a sequence of kernels
once and replays it with one launch. :class:`StepGraph`, a fastai callback, hands the
network to torch's own :func:`torch.cuda.make_graphed_callables` at the first training
step of a fit: from then on the network's forward pass is one graph replay and its backward
pass another, inside the usual autograd graph. Everything else in the step stays as it was
and eager: the loss, fastai's callbacks, the one-cycle schedule and the optimizer (a graph
would freeze the learning rate and momentum that fastai changes every step). Validation, in
eval mode, runs the network eagerly.

A replay runs the very kernels that were recorded, on the same memory, so it computes what the
eager step computes, *provided* that nothing outside tensors on the device drives the step. A
graph freezes everything else at the values it had when it was recorded:

* a Python number that changes from step to step (a counter kept on the module, a schedule
  read from a float);
* a value read from the device on the host (``.item()``, ``bool(t)``, ``nonzero``), which
  also cannot be recorded at all;
* a tensor made from host data inside the step (``torch.tensor(x)``, ``t.new_tensor(x)``);
* a buffer or parameter that the step replaces instead of updating in place: the graph goes
  on writing the old one.

:func:`graph_check` looks for each of these on a copy of the network before anything is
recorded, from a trace of the aten operations of three training steps, comparing the last
two (on any device, CPU included, which is how the tests check every norm and both
networks); a network that fails it is trained eagerly, and its record says why
(``settings.graph``). What is recorded per run: ``settings.graph`` is False when not asked,
else a sentence that says whether the network was graphed.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from fastai.callback.core import Callback
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .runs import GRAPHED

__all__ = ["graph_check", "StepGraph", "HOST_OPS"]

#: aten operations that read the device on the host or make a tensor from host data: a CUDA
#: graph can record none of them (or would freeze the value it read).
HOST_OPS = frozenset({"_local_scalar_dense", "is_nonzero", "item", "nonzero", "masked_select", "lift_fresh",
                      "lift_fresh_copy", "_unique2", "unique_dim", "unique_consecutive"})


class _Trace(TorchDispatchMode):
    """Records each aten operation: its name and its arguments, tensors by shape, dtype and device."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.ops: list[tuple[str, Any]] = []

    def _sig(self, a: Any) -> Any:
        if isinstance(a, torch.Tensor):
            if a.device.type == "cpu" and self.device.type != "cpu":
                if a.dim() == 0:  # a host scalar, passed by value: a graph keeps the value it was recorded with
                    return ("host scalar", str(a.dtype), a.item())
                return ("host tensor", tuple(a.shape), str(a.dtype))  # copied to the device: not in a graph
            return ("tensor", tuple(a.shape), str(a.dtype), a.device.type)
        if isinstance(a, (list, tuple)):
            return tuple(self._sig(x) for x in a)
        if isinstance(a, dict):
            return tuple(sorted((k, self._sig(v)) for k, v in a.items()))
        if isinstance(a, (bool, int, float, complex, str)) or a is None:
            return a
        return str(a)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops.append((str(func.overloadpacket.__name__), self._sig((args, kwargs))))
        return func(*args, **kwargs)


def _state(model: nn.Module) -> dict[str, Any]:
    """Where each parameter and buffer lives, and each module's plain Python attributes."""
    out: dict[str, Any] = {f"tensor {n}": t.data_ptr() for n, t in
                           [*model.named_parameters(), *model.named_buffers()]}
    for name, m in model.named_modules():
        for k, v in vars(m).items():
            if not k.startswith("_") and (v is None or isinstance(v, (bool, int, float, str, tuple))):
                out[f"attribute {name or 'model'}.{k}"] = v
    return out


def _step(model: nn.Module, args: Sequence[torch.Tensor], device: torch.device) -> list[tuple[str, Any]]:
    """The aten operations of one forward and backward pass (as a graph would record them)."""
    trace = _Trace(device)
    with trace:
        out = model(*args)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out]) if o.requires_grad]
        params = [p for p in model.parameters() if p.requires_grad]
        torch.autograd.grad(outs, params, grad_outputs=[torch.ones_like(o) for o in outs], allow_unused=True)
    return trace.ops


def graph_check(model: nn.Module, args: Sequence[torch.Tensor], steps: int = 3) -> str | None:
    """None if a training step of ``model`` on inputs ``args`` can be replayed from a CUDA graph;
    otherwise why not, in one sentence.

    Runs ``steps`` forward and backward passes (training mode) on a deep copy of ``model`` (the
    model itself is left untouched) and compares the last two, operation by operation (the first
    may initialise things lazily). Refused: an operation in :data:`HOST_OPS`; a host tensor in a
    step on another device; a step whose operations or non-tensor arguments change; a parameter or
    buffer replaced rather than updated in place; a module attribute (a Python number) that changes.
    """
    if steps < 2:
        raise ValueError(f"steps={steps!r} is invalid; graph_check needs at least 2 steps to compare")
    probe = copy.deepcopy(model).train()
    device = next((t.device for t in probe.parameters()), torch.device("cpu"))
    traces, states = [], []
    for _ in range(steps):
        states.append(_state(probe))
        traces.append(_step(probe, args, device))
    states.append(_state(probe))
    for ops in traces[1:]:
        host = next((name for name, _ in ops if name in HOST_OPS), None)
        if host:
            return f"the step calls aten.{host}, which reads the device on the host or makes a tensor from host data"
        where = next((name for name, sig in ops if "host tensor" in str(sig)), None)
        if where:
            return f"the step passes a host tensor to aten.{where}, a copy from the host that a graph cannot record"
    a, b = traces[-2], traces[-1]
    if len(a) != len(b):
        return f"the step's operations change from step to step ({len(a)} then {len(b)})"
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return (f"the step's operations change from step to step (operation {i}, aten.{x[0]}, then aten.{y[0]}"
                    f"{'' if x[0] != y[0] else ' with other arguments'}): a Python value drives the step")
    for key in states[-2]:
        if states[-2][key] != states[-1].get(key):
            what = "is replaced at each step, not updated in place" if key.startswith("tensor") else "changes at each step"
            return f"{key} {what}"
    return None


class StepGraph(Callback):
    """At the first training step of a fit, replay the network's forward and backward from CUDA graphs.

    The network (``learn.model``) is first checked with :func:`graph_check` on the step's batch;
    if it passes, :func:`torch.cuda.make_graphed_callables` records its forward and backward
    (its warm-up passes update running statistics, which are put back as they were, so that the
    run is the one made without graphs) and every later training step replays them. The loss,
    the callbacks and the optimizer step stay eager. After the fit the network's own ``forward``
    is restored. ``status`` (also ``learn.graph_status``) says what happened, for the record.

    The backward graph writes each step's gradients into the same memory, which the parameters'
    ``grad`` then share; so that a step's gradient is never added to itself, every graphed step
    starts its backward pass with ``grad`` set to None (whatever the optimizer's ``zero_grad``
    does): gradients are not accumulated across steps.

    ``capture=False`` runs the check only and trains eagerly (for devices without CUDA graphs).
    The network's output in a graphed step is a view of the graph's output memory, which the next
    step overwrites: a callback that keeps it across steps must copy it (normkit's callbacks keep
    only the loss, which is computed eagerly).
    """

    order = 5  # before the other callbacks see the first batch; the graph is made from its inputs
    devices = ("cuda",)  # where graphs can be recorded

    def __init__(self, capture: bool = True):
        self.capture = capture
        self.status = "not run"

    def before_fit(self):
        self._done = False
        self._graphed = None

    def before_batch(self):
        if self._done or not self.training:
            return
        self._done = True
        model, args = self.learn.model, tuple(self.learn.xb)
        why = None
        if not all(isinstance(a, torch.Tensor) for a in args):
            why = "the network's inputs are not all tensors"
        elif hasattr(model, "_orig_mod"):
            why = "the network is compiled by torch.compile, which makes its own graphs"
        why = why or graph_check(model, args)
        if why is None and not self.capture:
            why = "capture was not asked (the check passed)"
        if why is None and args[0].device.type not in self.devices:
            why = f"CUDA graphs need a CUDA device, not {args[0].device.type}"
        if why is not None:
            self.status = self.learn.graph_status = f"not graphed, eager: {why}"
            return
        buffers = [(b, b.detach().clone()) for b in model.buffers()]
        grads = [(p, p.grad) for p in model.parameters()]
        try:
            self.record(model, tuple(a.detach().clone() for a in args))
        except Exception as e:  # noqa: BLE001 - the run goes on eagerly, and its record says why
            model.__dict__.pop("forward", None)
            first = (str(e).strip().splitlines() or [""])[0]
            self.status = self.learn.graph_status = f"not graphed, eager: recording failed ({type(e).__name__}: {first})"
            return
        finally:
            with torch.no_grad():  # the warm-up passes updated them: the run goes on from where it was
                for b, saved in buffers:
                    b.copy_(saved)
            for p, g in grads:
                p.grad = g
        self._graphed = model
        self._params = [p for p in model.parameters() if p.requires_grad]
        self.status = self.learn.graph_status = (f"{GRAPHED} (torch.cuda.make_graphed_callables at the first training "
                                                 "step; loss, callbacks and optimizer eager)")

    @staticmethod
    def record(model: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        """Replace ``model``'s forward by its graphed twin (warm-up passes on ``args`` included)."""
        torch.cuda.make_graphed_callables(model, args, allow_unused_input=True)

    def before_backward(self):
        if self._graphed is not None and self.training:
            for p in self._params:  # the gradient is taken, not added to one that shares its memory
                p.grad = None

    def after_fit(self):
        if self._graphed is not None:
            self._graphed.__dict__.pop("forward", None)  # the module's own forward again
            self._graphed = None
