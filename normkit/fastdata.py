"""The fast data path: the whole dataset as one uint8 tensor on the training device.

The plain path (:func:`normkit.data.make_dls`) decodes and augments every image in CPU
worker processes, one item at a time. At batch size 2 an epoch of Imagenette is ~4,700
optimizer steps, and per-step overheads, not arithmetic, decide how long a run takes. This
module removes the per-item Python work without changing what the network sees:

1. :func:`decode` decodes every image once, with the plain path's own fastai code
   (``PILImage.create`` then ``Resize(size)``), into uint8 tensors, and caches them in
   ``$NORMKIT_CACHE/decoded/`` under the data's fingerprint, so that later runs and other
   worker processes load one file instead of decoding thousands of JPEGs.

   * Validation images are stored exactly as the plain path makes them (the centre crop of
     the shorter side, resized to ``size``).
   * Training images that are square are stored resized to ``size``: ``Resize``'s random crop
     of the shorter side is then the whole image, so the stored image *is* the plain path's
     item, bit for bit. (Imagenette-128, the study's data, is all square.)
   * Training images that are not square are stored with the shorter side resized to
     ``size`` (the long side along the width, zero-padded to the longest one) and cropped on
     the device at a uniformly random offset, as ``Resize`` does. The plain path crops first
     and resizes after; the two differ only in where the bilinear resampling happens, so the
     distribution of crops is the same.

2. :class:`TensorLoader` serves batches from those tensors: a shuffled permutation per epoch
   from a ``torch.Generator`` seeded with the run's seed, exactly ``bs`` images per training
   batch (the last partial batch is dropped, as in the plain path), a horizontal flip with
   probability 0.5 per image, ``/255`` and ImageNet normalisation, i.e. the plain path's
   ``IntToFloatTensor``, ``Flip(p=0.5)`` and ``Normalize``. The random draws of an epoch are
   made at its start on the CPU (one small transfer), and the loader augments ``chunk`` images
   (whole batches) at once with a handful of tensor ops on the device, then hands out each
   batch as a slice of them: no kernel and no host synchronisation per batch. (Each image is
   computed on its own, so the batches are bit for bit those of one batch at a time.)

3. :class:`FastPath` bundles that with the other speed settings :func:`normkit.runs.train`
   accepts, each of which leaves the distribution of results unchanged (see the book's
   protocol page and ``tests/benchmarks/sweep_bench.py``):

   * ``fused_adam``: torch's ``AdamW`` (one fused kernel on CUDA, ``foreach`` on CPU) inside
     fastai's ``OptimWrapper``, with fastai's hyper-parameters (mom 0.9 scheduled by
     ``fit_one_cycle``, sqr_mom 0.99, eps 1e-5, wd 0.01 decoupled) and fastai's rule that
     norm-layer and bias parameters get no weight decay. Its update is the same formula as
     fastai's ``Adam`` (tests check the two trajectories agree to float rounding); fastai's
     own optimizer loops over parameters in Python, ~5 small kernels per tensor per step.
   * ``lean``: :class:`LeanLearner`, :class:`LeanOptimWrapper` and :class:`CrossEntropyLoss`
     instead of fastai's ``Learner``, ``OptimWrapper`` and ``CrossEntropyLossFlat``. They compute
     exactly the same numbers (tests check bit-identical records) with less Python per step: fastai
     calls every callback at every one of a step's ~8 events, mostly to do nothing, reads the
     optimizer's hyper-parameters by rebuilding them from its parameter groups, and wraps the loss
     in a tensor subclass whose every operation takes a slow path. With a model so small that
     only the overhead counts (``tests/benchmarks/step_time.py --net linear --size 8 --steps 2000``,
     on two CPU cores shared with a sweep) a step took 1.89 ms with fastai's, 0.88 ms with these, 0.35
     ms in a bare torch loop; at batch size 2 on a GPU the host's time per step is what bounds a run.
   * ``valid_bs``: validation batches of this size instead of the training ``bs``, but only
     when the network's output for one image in eval mode does not depend on the rest of the
     batch (checked on a freshly built network). fastai averages validation loss and
     accuracy per item, so the batch size does not change them.
   * ``channels_last``: NHWC memory layout for the model and the batches. Off by default:
     the study's runs are fp32 where its benefit is small, and a user norm that calls
     ``.view`` on its input would fail on it. Opt in and measure.
   * ``compile``: ``torch.compile`` the model with this mode (one of :data:`COMPILE_MODES`);
     ``"reduce-overhead"`` replays the step's kernels as CUDA graphs, the remedy for
     launch-bound batch-size-2 steps. Off by default: compilation costs tens of seconds per
     run and fuses operations, so results agree with eager ones to float rounding only
     (tested on a CPU). Opt in and measure (``tests/benchmarks/sweep_bench.py --compile``).
   * ``graph``: replay the network's forward and backward pass from CUDA graphs
     (:class:`normkit.graphs.StepGraph`, torch's ``make_graphed_callables``), after a check that
     nothing but tensors on the device drives the step; the loss, callbacks and optimizer stay
     eager, so the schedule is untouched. A replay runs the recorded kernels themselves. Off by
     default until measured on a GPU; each record says whether its network was graphed and, if
     not, why.

   The numerical precision is left at torch's defaults, the same as the plain path (on an
   H100, convolutions in TF32 and matmuls in full fp32); each record states it.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from fastai.callback.core import event
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat
from fastai.optimizer import OptimWrapper
from fastai.vision.core import imagenet_stats
from fastcore.basics import getcallable, noop

from .data import DataError, cache_dir, check_layout, data_info, split_files

__all__ = ["decode", "decoded_path", "TensorLoader", "make_fast_dls", "FastPath", "COMPILE_MODES", "fused_adam",
           "LeanLearner", "LeanOptimWrapper", "CrossEntropyLoss", "IMAGENET_MEAN", "IMAGENET_STD"]

#: fastai's ``imagenet_stats``, as the plain path normalises with.
IMAGENET_MEAN, IMAGENET_STD = (tuple(s) for s in imagenet_stats)
_FORMAT = 1


# ---------------------------------------------------------------------------------------
# Decoding once


def decoded_path(path: str | os.PathLike, size: int, max_train: int | None = None, max_valid: int | None = None) -> Path:
    """Where :func:`decode` caches the tensors of data folder ``path`` at ``size`` px."""
    info = data_info(path)
    return cache_dir() / "decoded" / f"{info.fingerprint}-{size}px-{max_train or 'all'}-{max_valid or 'all'}-v{_FORMAT}.pt"


def _decode_one(fn: Path, size: int, train: bool):
    """(HWC uint8 array with H == size, its width, transposed?) for one image."""
    import numpy as np
    from fastai.vision.all import PILImage, Resize
    from PIL import Image

    img = PILImage.create(fn)
    w, h = img.size
    if not train or w == h:
        # validation (centre crop), or a square training image whose random crop is all of it
        out = Resize(size)(img, split_idx=1)
        return np.asarray(out), size, False
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    arr = np.asarray(img.resize((nw, nh), Image.BILINEAR))
    if nh > nw:  # portrait: keep the long side along the width
        return np.ascontiguousarray(arr.transpose(1, 0, 2)), nh, True
    return arr, nw, False


def _stack(arrays, lengths, size: int) -> torch.Tensor:
    import numpy as np

    width = max(lengths)
    out = np.zeros((len(arrays), size, width, 3), dtype=np.uint8)
    for i, a in enumerate(arrays):
        out[i, :, : a.shape[1]] = a
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def decode(path: str | os.PathLike, size: int = 128, *, max_train: int | None = None, max_valid: int | None = None,
           threads: int | None = None, log=None) -> dict[str, Any]:
    """The data folder's images as uint8 tensors, decoded once and cached (see the module docstring).

    Returns a dict: ``train_x`` (N, 3, size, W) uint8 (W == size when every training image is
    square), ``train_len`` (N,) the width of each, ``train_t`` (N,) bool whether it is stored
    transposed, ``train_y`` (N,) int64; ``valid_x`` (M, 3, size, size), ``valid_y``; ``vocab``.
    """
    path = check_layout(Path(path))
    cache = decoded_path(path, size, max_train, max_valid)
    if cache.exists():
        try:
            d = torch.load(cache, map_location="cpu", weights_only=True)
            if d.get("format") == _FORMAT:
                return d
        except Exception:  # a damaged or partial cache file: decode again
            pass
    train, valid = split_files(path, max_train, max_valid)
    vocab = sorted({f.parent.name for f in train})
    index = {c: i for i, c in enumerate(vocab)}
    unknown = sorted({f.parent.name for f in valid} - set(vocab))
    if unknown:
        raise DataError(f"validation classes {', '.join(unknown)} have no training images in {str(path)!r}")
    if log:
        log(f"decoding {len(train)} + {len(valid)} images of {path} at {size} px into {cache} (once)")
    threads = threads or min(16, os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:  # PIL releases the GIL while decoding
        tr = list(pool.map(lambda f: _decode_one(f, size, True), train))
        va = list(pool.map(lambda f: _decode_one(f, size, False), valid))
    d = {
        "format": _FORMAT,
        "size": size,
        "vocab": vocab,
        "train_x": _stack([a for a, _, _ in tr], [n for _, n, _ in tr], size),
        "train_len": torch.tensor([n for _, n, _ in tr], dtype=torch.int64),
        "train_t": torch.tensor([t for _, _, t in tr], dtype=torch.bool),
        "train_y": torch.tensor([index[f.parent.name] for f in train], dtype=torch.int64),
        "valid_x": _stack([a for a, _, _ in va], [size] * len(va), size),
        "valid_y": torch.tensor([index[f.parent.name] for f in valid], dtype=torch.int64),
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
    torch.save(d, tmp)
    os.replace(tmp, cache)
    return d


# ---------------------------------------------------------------------------------------
# Serving batches


class _Dataset:
    """What fastai looks up on ``dls.train_ds``: a length (and no ``loss_func``)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class TensorLoader:
    """Batches (x float32 (B, 3, size, size) normalised, y int64 (B,)) from uint8 tensors on ``device``.

    Training loaders (``train=True``) augment as fastai's training split does: a random crop
    of each non-square image and a flip with p=0.5; by default they also shuffle with a
    generator seeded by ``seed`` and drop the last partial batch. Validation loaders take the
    centre of a non-square image, do not flip, and by default keep the order and every image.
    ``shuffle`` and ``drop_last`` override those defaults (fastai's ``get_preds`` asks a
    training loader for ``new(shuffle=False, drop_last=False)``: still augmented, as in fastai).
    ``chunk``: images augmented at once (rounded down to whole batches, at least one): the
    batches are views of them, the same numbers as one batch at a time with fewer kernel launches
    per batch, for ``chunk`` x 3 x size x size floats of memory.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, bs: int, *, vocab, train: bool, seed: int = 0,
                 size: int | None = None, lengths: torch.Tensor | None = None, transposed: torch.Tensor | None = None,
                 device=None, channels_last: bool = False, shuffle: bool | None = None, drop_last: bool | None = None,
                 chunk: int = 1024):
        if not isinstance(bs, int) or bs < 1:
            raise ValueError(f"bs={bs!r} is invalid; the batch size must be a positive integer")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise ValueError(f"chunk={chunk!r} is invalid; it must be a positive number of images")
        self.chunk = chunk
        self.images, self.labels = images, labels
        self.bs, self.vocab, self.train, self.seed = bs, vocab, train, seed
        self.size = size or images.shape[-2]
        self.shuffle = train if shuffle is None else bool(shuffle)
        self.drop_last = train if drop_last is None else bool(drop_last)
        self.channels_last = channels_last
        self.lengths = lengths if lengths is not None else torch.full((len(images),), images.shape[-1])
        self.transposed = transposed if transposed is not None else torch.zeros(len(images), dtype=torch.bool)
        self.cropped = bool((self.lengths != self.size).any())
        self.generator = torch.Generator().manual_seed(seed)
        self.dataset = _Dataset(len(images))
        self.device = torch.device("cpu")
        self.to(device or images.device)

    @property
    def n(self) -> int:
        return len(self.images)

    def __len__(self) -> int:
        return self.n // self.bs if self.drop_last else math.ceil(self.n / self.bs)

    def to(self, device) -> "TensorLoader":
        device = torch.device(device)
        self.device = device
        self.images, self.labels = self.images.to(device), self.labels.to(device)
        self.lengths, self.transposed = self.lengths.to(device), self.transposed.to(device)
        mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        self.mean, self.std = mean, std
        return self

    def epoch_plan(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(order, flip, crop position in [0, 1)) for the next epoch, drawn on the CPU.

        Without augmentation nothing is flipped and crops are centred (position 0.5, as
        fastai's ``Resize`` on the validation split)."""
        n = self.n
        if not self.train:
            order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
            return order, torch.zeros(n, dtype=torch.bool), torch.full((n,), 0.5)
        order = torch.randperm(n, generator=self.generator)
        flip = torch.rand(n, generator=self.generator) < 0.5
        pos = torch.rand(n, generator=self.generator)
        return (order if self.shuffle else torch.arange(n)), flip, pos

    def _images(self, idx: torch.Tensor, flip: torch.Tensor, pos: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """Images ``idx``, cropped, flipped and normalised: float (len(idx), 3, size, size)."""
        size = self.size
        x = self.images.index_select(0, idx)
        if self.cropped:
            length = self.lengths.index_select(0, idx)
            off = (pos.index_select(0, idx) * (length - size)).long()  # as Resize: int(pct * (w - crop))
            where = (off[:, None] + cols)[:, None, None, :].expand(len(idx), 3, size, size)
            x = x.gather(3, where)
            x = torch.where(self.transposed.index_select(0, idx)[:, None, None, None], x.transpose(2, 3), x)
        elif x.shape[-1] != size:  # every image square, in a tensor wider than them
            x = x[..., :size]
        if self.train:
            x = torch.where(flip.index_select(0, idx)[:, None, None, None], x.flip(3), x)
        x = (x.float().div_(255) - self.mean) / self.std  # laid out as the crops were: made contiguous
        return x.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def __iter__(self):
        order, flip, pos = (t.to(self.device, non_blocking=True) for t in self.epoch_plan())
        bs = self.bs
        cols = torch.arange(self.size, device=self.device)
        end = min(len(self) * bs, self.n)
        step = max(1, self.chunk // bs) * bs  # whole batches per chunk
        for start in range(0, end, step):
            idx = order[start:min(start + step, end)]
            x, y = self._images(idx, flip, pos, cols), self.labels.index_select(0, idx)
            for i in range(0, len(idx), bs):
                yield x[i:i + bs], y[i:i + bs]

    def one_batch(self):
        return next(iter(self))

    def new(self, shuffle: bool | None = None, drop_last: bool | None = None, bs: int | None = None,
            **kwargs) -> "TensorLoader":
        """A copy with the same augmentation (what fastai's ``get_preds`` asks for), optionally another
        batch size, shuffling or dropping of the last partial batch. fastai keywords this loader has
        no use for (``num_workers``, ...) are accepted and ignored."""
        return TensorLoader(self.images, self.labels, self.bs if bs is None else bs, vocab=self.vocab,
                            train=self.train, seed=self.seed, size=self.size, lengths=self.lengths,
                            transposed=self.transposed, device=self.device, channels_last=self.channels_last,
                            shuffle=self.shuffle if shuffle is None else shuffle,
                            drop_last=self.drop_last if drop_last is None else drop_last, chunk=self.chunk)


_DECODED: dict[tuple, dict[str, Any]] = {}  # per process: decoded data already on a device


def _on_device(path: Path, size: int, max_train, max_valid, device: torch.device) -> dict[str, Any]:
    key = (str(path), size, max_train, max_valid, str(device))
    if key not in _DECODED:
        d = decode(path, size, max_train=max_train, max_valid=max_valid)
        _DECODED.clear()  # keep one data set per process on the device
        _DECODED[key] = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    return _DECODED[key]


def make_fast_dls(path: str | os.PathLike, bs: int, size: int = 128, *, seed: int = 0, device=None,
                  max_train: int | None = None, max_valid: int | None = None, valid_bs: int | None = None,
                  channels_last: bool = False):
    """fastai ``DataLoaders`` of two :class:`TensorLoader`: the fast twin of :func:`normkit.data.make_dls`."""
    import fastai.callback.progress  # noqa: F401 - Learner.no_bar and the default callbacks, as fastai.vision.all gives
    import fastai.callback.schedule  # noqa: F401 - Learner.fit_one_cycle
    from fastai.data.core import DataLoaders

    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"bs={bs!r} is invalid; the batch size must be a positive integer")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    path = check_layout(Path(path))
    d = _on_device(path, size, max_train, max_valid, device)
    train = TensorLoader(d["train_x"], d["train_y"], bs, vocab=d["vocab"], train=True, seed=seed, size=size,
                         lengths=d["train_len"], transposed=d["train_t"], device=device, channels_last=channels_last)
    valid = TensorLoader(d["valid_x"], d["valid_y"], valid_bs or bs, vocab=d["vocab"], train=False, seed=seed,
                         size=size, device=device, channels_last=channels_last)
    if len(train) == 0:
        raise DataError(f"data folder {str(path)!r} has fewer training images ({train.n}) than one batch of {bs}")
    dls = DataLoaders(train, valid, path=path, device=device)
    dls.vocab = d["vocab"]
    return dls


# ---------------------------------------------------------------------------------------
# Less Python per step: fastai's Learner, optimizer wrapper and loss, lean


class LeanLearner(Learner):
    """fastai's ``Learner`` that calls, at each event, only the callbacks that handle it.

    fastai's ``Learner.__call__`` wraps each event name in a fastcore ``L`` to map over it, and
    ``Learner._call_one`` sorts the callbacks by ``order`` and calls every one of them at
    every event; a callback without a method for the event looks it up (through ``GetAttr``, on the
    learner and the model) and does nothing. This one keeps, per event, the sorted list of the
    callbacks that have a method for it, rebuilt whenever the callbacks change, and calls those in
    the same order, through the same ``Callback.__call__`` (its ``run``, ``run_train`` and
    ``run_valid`` rules unchanged). ``after_fit`` still goes to every callback, since it resets each
    one's ``run`` flag.
    """

    def __call__(self, event_name) -> None:
        """Run one event (a name) or several (a list of names), as fastai's ``Learner.__call__``
        does, without building a fastcore ``L`` for each."""
        for name in [event_name] if isinstance(event_name, str) else event_name:
            self._call_one(name)

    def _call_one(self, event_name: str) -> None:
        key = tuple(map(id, self.cbs))
        cache = self.__dict__.get("_lean_events")
        if cache is None or cache[0] != key:
            # the callbacks themselves are kept too, so that no id in the key is reused by a new one
            cache = self.__dict__["_lean_events"] = (key, {}, tuple(self.cbs))
        cbs = cache[1].get(event_name)
        if cbs is None:
            if not hasattr(event, event_name):  # as fastai's
                raise Exception(f"missing {event_name}")
            ordered = list(self.cbs.sorted("order"))
            cbs = cache[1][event_name] = (ordered if event_name == "after_fit" else
                                          [cb for cb in ordered if getcallable(cb, event_name) is not noop])
        for cb in cbs:
            cb(event_name)


class LeanOptimWrapper(OptimWrapper):
    """fastai's ``OptimWrapper`` whose ``hypers`` (read by the ``Recorder`` and the one-cycle
    ``ParamScheduler`` at every step) is built without fastai's generic ``detuplify_pg``: the same
    list of dicts (``betas`` split into ``mom`` and ``sqr_mom``, ``weight_decay`` named ``wd``)."""

    @property
    def hypers(self) -> list[dict[str, Any]]:
        fwd = self.fwd_map
        out = []
        for pg in self.opt.param_groups:
            d = {}
            for k, v in pg.items():
                if k == "params":
                    continue
                if isinstance(v, (tuple, list)):
                    for i, v_ in enumerate(v):
                        d[fwd.get(f"{k}__{i}", f"{k}__{i}")] = v_
                else:
                    d[fwd.get(k, k)] = v
            out.append(d)
        return out


class CrossEntropyLoss(CrossEntropyLossFlat):
    """fastai's ``CrossEntropyLossFlat`` (same loss, activation and decoding) returning a plain
    tensor: fastai's wraps its inputs in ``TensorBase``, so the loss and every operation the
    callbacks make on it take ``__torch_function__``'s slow path."""

    def _contiguous(self, x):
        return x.transpose(self.axis, -1).contiguous() if isinstance(x, torch.Tensor) else x


# ---------------------------------------------------------------------------------------
# The optimizer and the other settings


def fused_adam(model: torch.nn.Module, device, *, lean: bool = False) -> dict[str, Any]:
    """``Learner`` keyword arguments for torch ``AdamW`` with fastai ``Adam``'s rule and defaults.

    fastai's default: ``Adam(mom=0.9, sqr_mom=0.99, eps=1e-5, wd=0.01)`` with decoupled weight
    decay, none on bias parameters and (as normkit's plain path) on any normalisation layer's. ``fit_one_cycle``
    schedules ``lr`` and ``mom``; fastai's ``OptimWrapper`` (``lean``: :class:`LeanOptimWrapper`)
    maps ``mom`` to ``betas[0]``.
    """
    from functools import partial

    from fastai.torch_core import norm_bias_params

    from .norms import norm_layers

    # as the plain path: no weight decay on biases or on any normalisation layer's parameters
    no_wd = {id(p) for p in norm_bias_params(model, True)} | {id(p) for m in norm_layers(model) for p in m.parameters()}

    def splitter(m):
        params = [p for p in m.parameters() if p.requires_grad]
        return [{"params": [p for p in params if id(p) not in no_wd], "weight_decay": 0.01},
                {"params": [p for p in params if id(p) in no_wd], "weight_decay": 0.0}]

    kind = {"fused": True} if torch.device(device).type == "cuda" else {"foreach": True}
    opt = partial(torch.optim.AdamW, betas=(0.9, 0.99), eps=1e-5, **kind)

    def opt_func(groups, lr):
        groups = [g for g in groups if g["params"]]
        return (LeanOptimWrapper if lean else OptimWrapper)(groups, opt=partial(opt, lr=lr))

    return {"opt_func": opt_func, "splitter": splitter}


_BATCH_FREE: dict[tuple, bool] = {}


def eval_is_per_sample(net: str, norm, size: int = 128) -> bool:
    """Whether network ``net`` with ``norm``, freshly built, maps each image independently in eval mode.

    Checked on three random ``size`` px images, alone and together. Use the runs' image size:
    at a few pixels a ResNet's last maps are 1 x 1, where a per-sample norm such as FRN
    (x / sqrt(x^2 + eps)) amplifies the float rounding that differs between batch sizes."""
    from .models import build_model

    key = (net, norm, size)
    if key not in _BATCH_FREE:
        state = torch.random.get_rng_state()
        try:
            gen = torch.Generator().manual_seed(0)
            model = build_model(net, norm, n_out=3).eval()
            x = torch.randn(3, 3, size, size, generator=gen)
            with torch.no_grad():
                together = model(x)
                alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
            _BATCH_FREE[key] = bool(torch.allclose(together, alone, rtol=1e-4, atol=1e-5))
        finally:
            torch.random.set_rng_state(state)
    return _BATCH_FREE[key]


#: The modes of ``torch.compile`` that :class:`FastPath` accepts.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class FastPath:
    """The fast path's settings; pass one to :func:`normkit.runs.train` (``fast=``)."""

    fused_adam: bool = True
    valid_bs: int | None = 128  # as the plain path (normkit.data.make_dls)
    channels_last: bool = False
    compile: str | None = None  # a torch.compile mode, see COMPILE_MODES
    lean: bool = True  # LeanLearner, LeanOptimWrapper, CrossEntropyLoss: same numbers, less Python per step
    graph: bool = False  # forward and backward replayed from CUDA graphs (normkit.graphs.StepGraph)

    def __post_init__(self):
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile={self.compile!r} is invalid; valid modes: {', '.join(COMPILE_MODES)} (or None)")
        if self.graph and self.compile is not None:
            raise ValueError(f"graph=True and compile={self.compile!r} cannot be combined: torch.compile makes its own "
                             "graphs; choose one")

    def make_dls(self, config, path, device):
        proto = config.protocol_obj
        valid_bs = self.valid_bs if self.valid_bs and eval_is_per_sample(config.net, config.norm_obj, config.size) else config.bs
        valid_bs = max(valid_bs, config.bs)
        return make_fast_dls(path, config.bs, config.size, seed=config.seed, device=device, max_train=proto.max_train,
                             max_valid=proto.max_valid, valid_bs=valid_bs, channels_last=self.channels_last)

    def learner(self, dls, model: torch.nn.Module, device, **kwargs) -> Learner:
        """A fastai ``Learner`` (:class:`LeanLearner` if :attr:`lean`) with cross-entropy loss for
        ``model``, moved to ``device`` (and layout) in place and compiled if asked, with a
        :class:`~normkit.graphs.StepGraph` if :attr:`graph`; ``kwargs`` (``metrics``, ``cbs``) go to
        the ``Learner``."""
        import fastai.callback.progress  # noqa: F401 - Learner.no_bar and the default callbacks
        import fastai.callback.schedule  # noqa: F401 - Learner.fit_one_cycle

        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        opt = fused_adam(model, device, lean=self.lean) if self.fused_adam else {}
        cls, loss = (LeanLearner, CrossEntropyLoss()) if self.lean else (Learner, CrossEntropyLossFlat())
        if self.graph:
            from .graphs import StepGraph

            kwargs["cbs"] = [*(kwargs.get("cbs") or []), StepGraph()]
        return cls(dls, self.compiled(model), loss_func=loss, **opt, **kwargs)

    def compiled(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` compiled with :attr:`compile` (itself when None). Dynamo's caches are reset
        first, so that each run of a sweep is compiled afresh (never silently left eager after
        dynamo's per-function limit of recompilations)."""
        if self.compile is None:
            return model
        torch._dynamo.reset()
        return torch.compile(model, mode=self.compile)

    def settings(self, device) -> dict[str, Any]:
        """What this path changes in a record's ``settings`` (:func:`normkit.runs.train` writes
        the rest, the same for both paths: validation batch size, precision, schedule, ...;
        and, when :attr:`graph`, what the :class:`~normkit.graphs.StepGraph` did)."""
        out: dict[str, Any] = {
            "data_path": "fast: uint8 tensor on the device, shuffle/crop/flip/normalise there (normkit.fastdata)",
            "channels_last": self.channels_last,
            "compile": self.compile,
            "graph": "asked (see normkit.graphs)" if self.graph else False,
            "learner": ("normkit LeanLearner (fastai Learner calling only the callbacks that handle each event), "
                        "LeanOptimWrapper, CrossEntropyLoss (plain tensors)") if self.lean else "fastai Learner",
        }
        if self.fused_adam:
            from .runs import FASTAI_ADAM

            kind = "fused" if torch.device(device).type == "cuda" else "foreach"
            out["optimizer"] = f"torch AdamW ({kind}) in fastai OptimWrapper, same rule as {FASTAI_ADAM}"
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
