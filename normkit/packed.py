"""Packed runs: several runs of one network trained as one grouped network.

At batch size 2 a ResNet18 step on a GPU is a few hundred tiny kernels, each of which
takes longer to launch than to compute. Runs that differ only in their seed (or learning
rate) have the same architecture, so N of them can be laid side by side along the channel
dimension and trained as **one** network whose every layer computes the N runs' layers at once:

* a convolution with ``groups=g`` becomes one with ``groups=N*g`` and N times the channels
  (group n sees only run n's channels);
* a per-channel normalisation (BatchNorm, InstanceNorm, FRN, EvoNorm-B0, Batch
  Renormalization, RunningBatchNorm) gets N times the channels; a grouped one (GroupNorm,
  LayerNorm as ``GroupNorm(1, C)``, EvoNorm-S0) N times the groups;
* the classifier becomes a :class:`PackedLinear`, N weight matrices applied by one
  ``einsum``; the network maps ``(B, N*3, H, W)`` to logits ``(B, N, n_out)``.

Nothing in a packed network mixes two runs: every statistic, weight and activation of run
n is computed from run n's channels only, so each run's output, gradient and running
statistics are those of the run alone (the tests check this for every norm and both
networks, in float64 to 1e-10). The loss is the sum of the runs' own mean losses, so each
run's parameters get exactly their own gradient; Adam updates each parameter element
independently, so one optimizer steps all runs as N optimizers would. Runs of different
learning rates follow fastai's one-cycle schedule for the largest, ``lr_max``, and
:class:`RunLearningRates` scales each run's step to its own (see there). Each run keeps its own
initialisation (built after ``set_seed(seed)`` as alone), its own shuffling and augmentation
(its own :class:`~normkit.fastdata.TensorLoader`) and its own record. A run that diverges
does not disturb the others: its channels hold NaN, the others' do not, and its record says
where it diverged (its slice goes on computing NaN until the pack ends).

The N runs take one kernel launch where they took N, which is what a launch-bound step
needs; whether it pays on a given GPU is measured by ``tests/benchmarks/step_time.py
--pack N``. Only the fast data path packs, and only runs of one network, norm and batch
size; runs of different learning rates only with the fast path's torch AdamW (fastai's own
``Adam`` is not scaled).

>>> packed = pack([build_model("cnn", "groupnorm") for _ in range(3)])
>>> packed(torch.randn(2, 9, 128, 128)).shape      # -> (2, 3, 10)
"""

from __future__ import annotations

import copy
import time
import warnings
from typing import Any, Callable, Sequence

import torch
from fastai.callback.core import Callback, CancelFitException, CancelTrainException
from torch import nn
from timm.layers import EvoNorm2dB0, EvoNorm2dS0, FilterResponseNormTlu2d

from .norms import BatchRenorm2d, RunningBatchNorm2d

__all__ = ["pack", "unpack", "PackedLinear", "PackedLoader", "PackedLoss", "PackedRecorder", "RunLearningRates",
           "run_scales", "can_pack", "pack_key", "packed_learner", "train_pack", "PACKABLE"]


class PackedLinear(nn.Module):
    r"""N independent linear layers applied at once: :math:`y_{bn} = W_n x_{bn} + b_n`.

    Shapes: input (B, N * in_features) (run n's features at ``[n*in:(n+1)*in]``, as a packed
    network's pooled channels lie) or (B, N, in_features) -> (B, N, out_features).
    """

    def __init__(self, n: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.n, self.in_features, self.out_features = n, in_features, out_features
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(n, out_features)) if bias else None

    @classmethod
    def from_linears(cls, layers: Sequence[nn.Linear]) -> "PackedLinear":
        first = layers[0]
        out = cls(len(layers), first.in_features, first.out_features, first.bias is not None)
        with torch.no_grad():
            out.weight.copy_(torch.stack([m.weight for m in layers]))
            if out.bias is not None:
                out.bias.copy_(torch.stack([m.bias for m in layers]))
        return out.to(first.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.n, self.in_features)
        y = torch.einsum("bni,noi->bno", x, self.weight)
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return f"n={self.n}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


#: The layer types :func:`pack` knows, with the attributes it multiplies by N.
PACKABLE: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "groups"),  # and subclasses, e.g. timm's StdConv2d
    nn.BatchNorm2d: ("num_features",),
    nn.InstanceNorm2d: ("num_features",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    BatchRenorm2d: ("num_features",),
    RunningBatchNorm2d: ("num_features",),
    FilterResponseNormTlu2d: (),
    EvoNorm2dB0: (),
    EvoNorm2dS0: ("groups",),
}

#: Layers without parameters or buffers that act on each channel (or each sample) alone.
_CHANNELWISE = (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Identity)


def _kind(m: nn.Module) -> type | None:
    for t in PACKABLE:
        if isinstance(m, t):
            return t
    return None


def _check_packable(model: nn.Module) -> None:
    for name, m in model.named_modules():
        own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        if isinstance(m, nn.Linear) or _kind(m) is not None:
            continue
        if own or (not list(m.children()) and not isinstance(m, _CHANNELWISE)):
            valid = ", ".join(sorted({t.__name__ for t in PACKABLE} | {"Linear"} | {t.__name__ for t in _CHANNELWISE}))
            raise ValueError(f"layer {name or 'model'!r} ({type(m).__name__}) cannot be packed; "
                             f"packable layers: {valid}; train such runs unpacked (pack=1)")


def can_pack(model: nn.Module) -> bool:
    """Whether :func:`pack` accepts networks like ``model``."""
    try:
        _check_packable(model)
    except ValueError:
        return False
    return True


def pack(models: Sequence[nn.Module]) -> nn.Module:
    """One network computing ``models`` (same architecture, any weights) side by side.

    Input (B, N*C, H, W): run n's C input channels at ``[n*C:(n+1)*C]``; output (B, N, n_out).
    The packed network is a new module (``models`` are not changed) on their device; its
    0-d buffers (step counters) are shared, so they must be equal in every model. Layers must
    be of the :data:`PACKABLE` kinds, ``nn.Linear`` or parameter-free channel-wise ones
    (others raise ``ValueError``); containers (``nn.Sequential``, the residual blocks) are taken
    to combine their children's outputs channel by channel, as normkit's networks do."""
    models = list(models)
    if not models:
        raise ValueError("pack() needs at least one model, got none")
    arch = [[(n, type(m)) for n, m in model.named_modules()] for model in models]
    if any(a != arch[0] for a in arch[1:]):
        raise ValueError("pack() needs models of one architecture; these differ in their layers")
    _check_packable(models[0])
    n = len(models)
    out = copy.deepcopy(models[0])
    mods = [dict(m.named_modules()) for m in models]
    for name, m in list(out.named_modules()):
        group = [d[name] for d in mods]
        if isinstance(m, nn.Linear):
            _replace(out, name, PackedLinear.from_linears(group))
            continue
        kind = _kind(m)
        if kind is None:
            continue
        for attr in PACKABLE[kind]:
            setattr(m, attr, getattr(m, attr) * n)
        with torch.no_grad():
            for pname, p in list(m.named_parameters(recurse=False)):
                if p is not None:
                    setattr(m, pname, nn.Parameter(torch.cat([getattr(g, pname) for g in group]),
                                                   requires_grad=p.requires_grad))
            for bname, b in list(m.named_buffers(recurse=False)):
                if b is None:
                    continue
                values = [getattr(g, bname) for g in group]
                if b.dim() == 0:
                    if any(not torch.equal(v, b) for v in values):
                        raise ValueError(f"buffer {name}.{bname} differs between the models; a packed "
                                         f"network shares it (it counts steps), so they must be equal")
                else:
                    setattr(m, bname, torch.cat(values))
    out.packed_runs = n
    return out


def unpack(packed: nn.Module, models: Sequence[nn.Module]) -> list[nn.Module]:
    """Copy each run's slice of ``packed`` (made by :func:`pack` from models like these) into
    ``models``, in place, and return them: e.g. to save or evaluate one run alone."""
    n = len(models)
    if getattr(packed, "packed_runs", None) != n:
        raise ValueError(f"the packed network holds {getattr(packed, 'packed_runs', None)} runs, got {n} models")
    pmods = dict(packed.named_modules())
    with torch.no_grad():
        for i, model in enumerate(models):
            for name, m in model.named_modules():
                src = pmods[name]
                if isinstance(m, nn.Linear):
                    m.weight.copy_(src.weight[i])
                    if m.bias is not None:
                        m.bias.copy_(src.bias[i])
                    continue
                if _kind(m) is None:
                    continue
                for tname, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                    if t is None:
                        continue
                    whole = getattr(src, tname)
                    t.copy_(whole if t.dim() == 0 else whole.chunk(n)[i])
    return list(models)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)


# ---------------------------------------------------------------------------------------
# Data and loss


class PackedLoader:
    """Batches for a packed network from N loaders: x (B, N*3, H, W), y (B, N).

    Training: each run's own :class:`~normkit.fastdata.TensorLoader` (its seed's shuffling
    and augmentation), batch i of each side by side. Validation (``shared``): one loader whose
    batches every run sees, repeated along the channels (the validation set has no
    randomness)."""

    def __init__(self, loaders: Sequence[Any], *, shared: bool = False, n: int | None = None):
        self.loaders = list(loaders)
        self.shared = shared
        self.n = n if shared else len(self.loaders)
        if shared and (len(self.loaders) != 1 or not n):
            raise ValueError("a shared PackedLoader takes one loader and the number of runs n")
        lens = {len(dl) for dl in self.loaders}
        if len(lens) != 1:
            raise ValueError(f"the loaders of a pack must have one length, got {sorted(lens)}")
        first = self.loaders[0]
        self.bs, self.vocab, self.device, self.dataset = first.bs, first.vocab, first.device, first.dataset
        self.drop_last, self.shuffle = first.drop_last, first.shuffle

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self):
        if self.shared:
            for x, y in self.loaders[0]:
                yield x.repeat(1, self.n, 1, 1), y[:, None].expand(-1, self.n)
            return
        for batches in zip(*self.loaders):
            yield torch.cat([x for x, _ in batches], 1), torch.stack([y for _, y in batches], 1)

    def one_batch(self):
        return next(iter(self))

    def new(self, **kwargs) -> "PackedLoader":
        return PackedLoader([dl.new(**kwargs) for dl in self.loaders], shared=self.shared, n=self.n)

    def to(self, device) -> "PackedLoader":
        for dl in self.loaders:
            dl.to(device)
        self.device = torch.device(device)
        return self


class PackedLoss(nn.Module):
    """The sum over runs of each run's mean cross-entropy: ``pred`` (B, N, C), ``y`` (B, N).

    Each run's parameters thus get their own loss's gradient. ``per_run`` holds the last
    call's N mean losses (detached), which :class:`PackedRecorder` reads."""

    def __init__(self):
        super().__init__()
        self.per_run: torch.Tensor | None = None

    def forward(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b, n, c = pred.shape
        losses = nn.functional.cross_entropy(pred.reshape(b * n, c), y.reshape(b * n), reduction="none")
        per_run = losses.view(b, n).mean(0)
        self.per_run = per_run.detach()
        return per_run.sum()

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        return x.softmax(-1)

    def decodes(self, x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)


# ---------------------------------------------------------------------------------------
# Training


def pack_key(config, *, lr: bool = False) -> tuple:
    """What runs must share to be packed: everything in their config but the seed and, unless
    ``lr`` is true, the learning rate."""
    d = config.to_dict()
    d.pop("seed")
    if not lr:
        d.pop("lr")
    return tuple(sorted((k, str(v)) for k, v in d.items()))


def run_scales(param: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """A tensor shaped like a packed parameter holding, at each element, its run's value of
    ``scales``: :func:`pack` lays the N runs along the first dimension, in N equal chunks."""
    n = len(scales)
    if param.shape[0] % n:
        raise ValueError(f"a parameter of shape {tuple(param.shape)} cannot hold {n} runs along its first dimension")
    s = torch.tensor(list(scales), dtype=param.dtype, device=param.device).repeat_interleave(param.shape[0] // n)
    return s.view(-1, *([1] * (param.dim() - 1))).expand_as(param).contiguous()


class RunLearningRates(Callback):
    r"""Each run of a pack at its own learning rate.

    The optimizer steps every run with the schedule's :math:`\mathrm{lr}(t)` (fastai's one-cycle
    for :math:`\mathrm{lr}_{\max}`, the largest of the pack); then run n's parameters are put at
    :math:`\theta_{\text{before}} + s_n (\theta_{\text{after}} - \theta_{\text{before}})` with
    :math:`s_n = \mathrm{lr}_n / \mathrm{lr}_{\max}`. AdamW's step, weight decay included, is
    proportional to its learning rate, so this is the step at :math:`s_n\,\mathrm{lr}(t)`: the
    schedule of run n alone (to float rounding; exactly for :math:`s_n = 1`). Three multi-tensor
    operations a step. (fastai's own ``Adam`` is proportional too, but normkit packs different
    learning rates only with the fast path's AdamW, which the tests check.)
    """

    order = 10

    def __init__(self, scales: Sequence[float]):
        self.scales = list(scales)

    def before_fit(self):
        self.params = [p for p in self.learn.model.parameters() if p.requires_grad]
        self.before = [torch.empty_like(p) for p in self.params]
        self.weights = [run_scales(p, self.scales) for p in self.params]

    def before_step(self):
        torch._foreach_copy_(self.before, [p.detach() for p in self.params])

    def after_step(self):
        with torch.no_grad():
            torch._foreach_lerp_(self.before, [p.detach() for p in self.params], self.weights)
            torch._foreach_copy_([p.detach() for p in self.params], self.before)


class PackedRecorder(Callback):
    """Each run's metrics and divergence, as :func:`normkit.runs.train`'s guard records them for a
    run alone: the smoothed training loss (fastai's ``AvgSmoothLoss``, beta 0.98), the
    validation loss and accuracy averaged per image, and the first non-finite training loss
    (checked every ``guard_every`` steps and before each validation; a run that diverged gets
    no more epochs). ``max_steps``: at most this many training batches per epoch. The fit stops
    when every run has diverged. Reads the per-run losses :class:`PackedLoss` keeps."""

    order = 60

    def __init__(self, n: int, max_steps: int | None = None, guard_every: int = 64, beta: float = 0.98):
        self.n, self.max_steps, self.guard_every, self.beta = n, max_steps, guard_every, beta

    def before_fit(self):
        self.diverged_at: list[dict | None] = [None] * self.n
        self.epochs: list[list[dict]] = [[] for _ in range(self.n)]
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._smooth: torch.Tensor | None = None
        self._count = 0

    def before_epoch(self):
        self._vloss = self._vcorrect = None
        self._vcount = 0

    def _check(self):
        if not self._pending:
            return
        iters, losses = zip(*self._pending)
        self._pending = []
        values = torch.stack(losses)  # (steps, n)
        bad = ~torch.isfinite(values)
        if not bad.any():  # the one wait for the device
            return
        for run in range(self.n):
            rows = torch.nonzero(bad[:, run])
            if self.diverged_at[run] is None and len(rows):
                first = int(rows[0, 0])
                self.diverged_at[run] = {"epoch": self.epoch, "iter": iters[first], "loss": float(values[first, run])}
        if all(d is not None for d in self.diverged_at):
            raise CancelFitException()

    def after_loss(self):
        per_run = self.learn.loss_func.per_run
        if self.training:
            self._count += 1
            if self._smooth is None:  # fastai's AvgSmoothLoss starts at 0 and is debiased
                self._smooth = torch.zeros_like(per_run)
            self._smooth = torch.lerp(per_run, self._smooth, self.beta)
            self._pending.append((self.iter, per_run))
            if len(self._pending) >= self.guard_every:
                self._check()
            return
        y = self.learn.yb[0]
        bs = y.shape[0]
        correct = (self.learn.pred.argmax(-1) == y).sum(0)
        loss = per_run * bs
        self._vloss = loss if self._vloss is None else self._vloss + loss
        self._vcorrect = correct if self._vcorrect is None else self._vcorrect + correct
        self._vcount += bs

    def after_batch(self):
        if self.max_steps and self.training and self.iter + 1 >= self.max_steps:
            raise CancelTrainException()

    def after_train(self):
        self._check()

    def after_epoch(self):
        from .runs import _num

        if self._vcount == 0:
            return
        smooth = (self._smooth / (1 - self.beta ** self._count)).tolist()
        vloss = (self._vloss / self._vcount).tolist()
        acc = (self._vcorrect.float() / self._vcount).tolist()  # float32, as fastai's accuracy
        for run in range(self.n):
            if self.diverged_at[run] is None:
                self.epochs[run].append({"epoch": self.epoch, "train_loss": _num(smooth[run]),
                                         "valid_loss": _num(vloss[run]), "accuracy": _num(acc[run])})


def packed_learner(fast, dls_each: Sequence[Any], models: Sequence[nn.Module], device, lrs: Sequence[float], *,
                   max_steps: int | None = None, cbs: Sequence[Any] = ()) -> tuple[Any, PackedRecorder, float]:
    """A fastai ``Learner`` (built by ``fast``, a :class:`~normkit.fastdata.FastPath`) training
    ``models`` as one packed network on their own ``DataLoaders`` (``dls_each``; the first one's
    validation set is every run's), each run at its learning rate in ``lrs``. Returns the learner,
    its :class:`PackedRecorder` and ``lr_max``, the learning rate to give ``fit_one_cycle``."""
    from fastai.data.core import DataLoaders

    from .runs import GUARD_EVERY

    n = len(models)
    dls = DataLoaders(PackedLoader([d.train for d in dls_each]), PackedLoader([dls_each[0].valid], shared=True, n=n),
                      path=getattr(dls_each[0], "path", "."), device=device)
    dls.vocab = dls_each[0].vocab
    recorder = PackedRecorder(n, max_steps, GUARD_EVERY)
    lr_max = max(lrs)
    scales = [lr / lr_max for lr in lrs]
    scaling = [RunLearningRates(scales)] if any(x != 1 for x in scales) else []
    learn = fast.learner(dls, pack(models), device, cbs=[recorder, *scaling, *cbs])
    learn.loss_func = PackedLoss()
    return learn, recorder, lr_max


def train_pack(configs: Sequence, data_path, *, device=None, fast=None, data_meta: dict[str, Any] | None = None,
               cbs: Sequence[Any] = (), on_trained: Callable[[Any, list[nn.Module]], None] | None = None
               ) -> list[dict[str, Any]]:
    """Train the runs ``configs`` (equal but for their seeds and learning rates) as one packed
    network on the fast data path (``fast``, a :class:`~normkit.fastdata.FastPath`; default
    settings if None); return their records, as :func:`normkit.runs.train` makes them, in order.

    ``cbs``: more fastai callbacks for the ``Learner``. ``on_trained``: called with the
    ``Learner`` and the runs' models (each its slice of the trained network, see :func:`unpack`)
    after the fit."""
    from fastai.torch_core import set_seed

    from .fastdata import FastPath
    from .models import build_model
    from .runs import _no_decay_on_norm_layers, flush_denormals, record_of

    configs = list(configs)
    if not configs:
        raise ValueError("train_pack() needs at least one config, got none")
    fast = fast or FastPath()
    if len({pack_key(c, lr=not fast.fused_adam) for c in configs}) != 1:
        what = "seed and learning rate" if fast.fused_adam else "seed (and learning rate, with fused_adam)"
        raise ValueError(f"a pack's runs must differ only in their {what}; got "
                         + "; ".join(sorted({c.describe() for c in configs})))
    if len({(c.seed, c.lr) for c in configs}) != len(configs):
        raise ValueError(f"a pack's runs must differ, got {[c.describe() for c in configs]}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    proto = configs[0].protocol_obj
    # as runs.train: a CPU pack flushes float32 denormals, and its records say what held
    with flush_denormals(device.type == "cpu") as flushed:
        start, cpu_start = time.time(), time.process_time()
        dls_each = []
        models = []
        for c in configs:
            set_seed(c.seed, reproducible=True)
            dls_each.append(fast.make_dls(c, data_path, device))
            set_seed(c.seed, reproducible=True)
            models.append(build_model(c.net, c.norm_obj, n_out=len(dls_each[-1].vocab)))
        n = len(configs)
        learn, recorder, lr_max = packed_learner(fast, dls_each, models, device, [c.lr for c in configs],
                                                 max_steps=proto.max_steps, cbs=cbs)
        model = getattr(learn.model, "_orig_mod", learn.model)  # the packed network, not a compiled wrapper
        _no_decay_on_norm_layers(learn)
        with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            learn.fit_one_cycle(configs[0].epochs, lr_max)
        if on_trained is not None:
            on_trained(learn, unpack(model, [m.to(device) for m in models]))
    wall, cpu = round(time.time() - start, 2), round(time.process_time() - cpu_start, 2)
    n_params = sum(p.numel() for p in models[0].parameters())
    records = []
    for i, c in enumerate(configs):
        rec = record_of(c, recorder.epochs[i], recorder.diverged_at[i], n_params=n_params, wall_time_s=wall,
                        device=device, data_meta=data_meta, valid_bs=dls_each[i].valid.bs, fast=fast, learn=learn,
                        cpu_time_s=cpu, flushed=flushed)
        rec["settings"]["packed"] = {
            "runs": n, "seeds": [x.seed for x in configs], "lrs": [x.lr for x in configs],
            "how": "trained side by side as one grouped network (normkit.packed), each run at its own learning rate; "
                   "wall_time_s and cpu_time_s are the pack's"}
        records.append(rec)
    return records
