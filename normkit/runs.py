"""Training runs, their records and the result store.

A run is a :class:`RunConfig`: network, normalisation and its parameters, batch size,
learning rate, seed, epochs, image size, data identity and protocol version. It is
trained by a fastai ``Learner`` with ``fit_one_cycle`` and leaves a record: a small JSON
file in ``results/<protocol>/<key>.json``, where ``key`` is a hash of the config.

:func:`run_grid` trains every config that has no record yet, writing each record
atomically the moment its run ends, so a sweep killed at any point resumes where it
stopped and loses at most the run in flight. A record that cannot be read is reported
and its run is made again; it never enters a table.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import re
import subprocess
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterable

from .norms import Norm, get_norm, norm_layers

__all__ = [
    "Protocol", "PROTOCOLS", "current_protocol", "RunConfig", "ResultStore", "DamagedRecord",
    "train", "plain_learner", "flush_denormals", "denormals_flushed", "record_of", "pack_size", "run_seconds",
    "graphed", "GRAPHED", "path_kind", "how_made", "run_grid",
    "default_results_dir", "default_checkpoints_dir", "Checkpoints", "RunPaused",
    "RECORD_FORMAT", "CHECKPOINT_FORMAT",
]

RECORD_FORMAT = 1


@dataclass(frozen=True)
class Protocol:
    """How every run is trained; its ``version`` is part of every run's config."""

    version: str
    epochs: int = 5
    size: int = 128
    max_train: int | None = None  # a fixed subset of the training images (smoke runs only)
    max_valid: int | None = None
    max_steps: int | None = None  # at most this many training batches per epoch (smoke runs only)

    def describe(self) -> str:
        subset = f", {self.max_train} train / {self.max_valid} val images" if self.max_train else ""
        subset += f", at most {self.max_steps} steps per epoch" if self.max_steps else ""
        return f"protocol {self.version}: {self.epochs} epoch(s) of fit_one_cycle at {self.size} px{subset}"


#: ``v1`` is the study; ``smoke`` runs the same code at toy scale for tests (never in the book).
PROTOCOLS: dict[str, Protocol] = {
    "v1": Protocol("v1", epochs=5, size=128),
    "smoke": Protocol("smoke", epochs=1, size=32, max_train=160, max_valid=40, max_steps=6),
}


def current_protocol() -> Protocol:
    """``smoke`` when the environment variable ``NORMKIT_SMOKE`` is set to 1, else ``v1``."""
    value = os.environ.get("NORMKIT_SMOKE", "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"NORMKIT_SMOKE={value!r} is invalid; use 1 (smoke runs) or 0")
    return PROTOCOLS["smoke" if value == "1" else "v1"]


def config_key(config: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of a config's canonical JSON: the name of its record."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run."""

    net: str
    norm: str
    norm_params: tuple[tuple[str, Any], ...]
    bs: int
    lr: float
    seed: int
    epochs: int
    size: int
    data: str
    protocol: str

    @classmethod
    def make(cls, net: str, norm: str | Norm, bs: int, lr: float, seed: int, *, data: str = "imagenette",
             protocol: Protocol | str = "v1") -> "RunConfig":
        """A config with the protocol's epochs and size; bad values raise ``ValueError``."""
        from .models import NETS

        if net not in NETS:
            raise ValueError(f"unknown network {net!r}; valid networks: {', '.join(NETS)}")
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
            raise ValueError(f"bs={bs!r} is invalid; the batch size must be a positive integer")
        if not isinstance(lr, (int, float)) or not 0 < lr < 10:
            raise ValueError(f"lr={lr!r} is invalid; the learning rate must be a number in (0, 10)")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed={seed!r} is invalid; the seed must be a non-negative integer")
        if isinstance(protocol, str):
            if protocol not in PROTOCOLS:
                raise ValueError(f"unknown protocol {protocol!r}; valid protocols: {', '.join(PROTOCOLS)}")
            protocol = PROTOCOLS[protocol]
        n = get_norm(norm)
        return cls(net, n.name, n.params, bs, float(lr), seed, protocol.epochs, protocol.size, data, protocol.version)

    @property
    def norm_obj(self) -> Norm:
        return get_norm(self.norm, **dict(self.norm_params))

    @property
    def protocol_obj(self) -> Protocol:
        return PROTOCOLS[self.protocol]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["norm_params"] = dict(self.norm_params)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        names = {f.name for f in fields(cls)}
        if set(d) != names:
            raise ValueError(f"config fields {sorted(d)} differ from {sorted(names)}")
        d = dict(d)
        d["norm_params"] = tuple(sorted(d["norm_params"].items()))
        return cls(**d)

    @property
    def key(self) -> str:
        """16 hex digits of the sha256 of the config's canonical JSON."""
        return config_key(self.to_dict())

    def describe(self) -> str:
        return f"{self.net} {self.norm_obj.label} bs={self.bs} lr={self.lr:g} seed={self.seed}"


# ---------------------------------------------------------------------------------------
# The store


def atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Make ``path`` with ``write(f)`` (``f`` a binary file) atomically: a temporary file beside
    it, fsync, rename; a failed write leaves ``path`` as it was and no temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class DamagedRecord(Exception):
    """A record file that exists but cannot be used."""


class RunPaused(Exception):
    """A run stopped at the end of an epoch because its next epoch would end after its deadline
    (:func:`train`'s ``deadline``); its checkpoint holds the epochs done, and it resumes from there.
    ``ran``: the epochs it ran in this call, in ``wall_s`` seconds (its pace, for time estimates)."""

    def __init__(self, key: str, done: int, epochs: int, ran: int = 0, wall_s: float = 0.0):
        super().__init__(key, done, epochs, ran, wall_s)
        self.key, self.done, self.epochs, self.ran, self.wall_s = key, done, epochs, ran, wall_s

    def __str__(self) -> str:
        return f"run {self.key} paused after {self.done} of {self.epochs} epochs (checkpoint saved)"


def default_results_dir() -> Path:
    """``NORMKIT_RESULTS`` if set, else ``results/`` of the checkout normkit runs from, else ``./results``."""
    env = os.environ.get("NORMKIT_RESULTS")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    if (repo / "results").is_dir() and (repo / "pyproject.toml").exists():
        return repo / "results"
    return Path("results")


def default_checkpoints_dir() -> str | None:
    """``NORMKIT_CHECKPOINTS`` if set: the folder runs save their checkpoints in when none is given
    (:class:`Checkpoints`); else None, no checkpoints."""
    return os.environ.get("NORMKIT_CHECKPOINTS") or None


class ResultStore:
    """Run records on disk: ``<root>/<protocol>/<key>.json``, one per run."""

    kind = "record"  # what warnings call a record of this store
    allow_nan = True  # a diverged run's last metrics may be NaN or infinite

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_results_dir()
        self.damaged: dict[str, str] = {}  # path -> why, for every damaged record seen

    def path(self, config: RunConfig) -> Path:
        return self.root / config.protocol / f"{config.key}.json"

    def check(self, record: Any, config: RunConfig) -> dict[str, Any]:
        """``record`` if it is a sound record of ``config``, else raise :class:`DamagedRecord`."""
        return _check_record(record, config)

    def config_of(self, record: dict[str, Any]) -> RunConfig:
        return RunConfig.from_dict(record["config"])

    def get(self, config) -> dict[str, Any] | None:
        """The record of ``config``; None if there is none or it is damaged (reported once)."""
        path = self.path(config)
        if not path.exists():
            return None
        try:
            return self.check(json.loads(path.read_text()), config)
        except (DamagedRecord, ValueError, TypeError, KeyError, OSError) as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            if str(path) not in self.damaged:
                warnings.warn(f"damaged {self.kind} {path} ignored and to be redone: {why}", stacklevel=2)
            self.damaged[str(path)] = why
            return None

    def put(self, record: dict[str, Any]) -> Path:
        """Write ``record`` atomically (temporary file, fsync, rename); a failed write leaves nothing."""
        path = self.path(self.config_of(record))
        text = json.dumps(record, indent=1, sort_keys=True, allow_nan=self.allow_nan) + "\n"
        atomic_write(path, lambda f: f.write(text.encode()))
        return path

    def records(self, configs: Iterable) -> dict[Any, dict[str, Any] | None]:
        """Each config with its record, or None where it is missing or damaged."""
        return {c: self.get(c) for c in configs}

    def missing(self, configs: Iterable) -> list:
        return [c for c, r in self.records(configs).items() if r is None]


_REQUIRED = {"format", "key", "config", "status", "epochs", "final", "wall_time_s", "device", "versions", "commit", "date"}


def require_fields(record: Any, required: set[str]) -> None:
    """Raise :class:`DamagedRecord` unless ``record`` is a JSON object with every field in ``required``."""
    if not isinstance(record, dict):
        raise DamagedRecord("not a JSON object")
    missing = required - set(record)
    if missing:
        raise DamagedRecord(f"missing fields {sorted(missing)}")


def check_header(record: Any, config: Any, required: set[str], expect: dict[str, Any]) -> None:
    """The checks every kind of record shares; raise :class:`DamagedRecord` unless ``record``
    has the ``required`` fields, the ``expect``-ed values (its format, ...), the config of its
    file name (``config``, a :class:`RunConfig` or alike with ``key`` and ``from_dict``) and a
    known status."""
    require_fields(record, required)
    got = {k: record[k] for k in expect}
    if got != expect:
        raise DamagedRecord(f"record {got}, expected {expect}")
    if record["key"] != config.key or type(config).from_dict(record["config"]) != config:
        raise DamagedRecord("its config does not match its file name")
    if record["status"] not in ("ok", "diverged"):
        raise DamagedRecord(f"unknown status {record['status']!r}")


def _check_record(record: Any, config: RunConfig) -> dict[str, Any]:
    check_header(record, config, _REQUIRED, {"format": RECORD_FORMAT})
    if record["status"] == "ok":
        final = record["final"]
        if not isinstance(final, dict) or not all(isinstance(final.get(k), (int, float)) for k in ("accuracy", "valid_loss")):
            raise DamagedRecord("final metrics missing")
    return record


# ---------------------------------------------------------------------------------------
# Training


#: The optimizer of every run, as records name it (the fast path's fused AdamW follows its rule).
FASTAI_ADAM = "fastai Adam (sqr_mom=0.99, eps=1e-5; mom cycled 0.95-0.85-0.95 by fit_one_cycle)"


def precision_settings() -> dict[str, Any]:
    """torch's float32 precision switches, as in effect now (each record states them)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
                "float32_matmul_precision": torch.get_float32_matmul_precision()}


def _denormals(n: int):
    """``n`` float32 denormals (9.2e-41; the normal range ends at 1.18e-38), made from their bits:
    a float written on a flushing thread would already be zero."""
    import torch

    return torch.full((n,), 1 << 16, dtype=torch.int32).view(torch.float32)


@contextmanager
def flush_denormals(on: bool = True):
    """Flush float32 denormals to zero on the CPU inside the block (``torch.set_flush_denormal``,
    the x86 flags FTZ and DAZ); the state found is restored after it.

    Late in a long CPU run most of Adam's moment estimates decay below 1.18e-38, where x86
    arithmetic is many times slower (``tests/benchmarks/denormals.py`` measures it on a run's
    checkpoint). Flushed, those moments are zero; in Adam's update
    :math:`m / (\\sqrt{v} + \\epsilon)` the :math:`\\epsilon = 10^{-5}` dwarfs them either way,
    and the weights come out the same to the bit (``test_flushed_denormals_leave_adam_steps_as_they_were``).

    The switch is per thread, and torch sets it on the calling thread only; the threads of its
    CPU thread pool (OpenMP) are set too, by running the same switch on each of them. Where that
    cannot be done (no OpenMP, no GNU libgomp), they keep their state; where the CPU has no such
    flags (not x86) nothing changes. The block gets what holds, as :func:`denormals_flushed`
    measures it (``with flush_denormals(True) as flushed``: what a record states).
    """
    before = _denormals(1).mul(1.0).item() == 0.0  # this thread's state
    _flush_on_every_thread(on)
    try:
        yield denormals_flushed()
    finally:
        _flush_on_every_thread(before)


def _flush_on_every_thread(on: bool) -> None:
    """``torch.set_flush_denormal(on)`` on this thread and on each thread of torch's OpenMP pool:
    libgomp runs glibc's ``fesetenv`` with this thread's floating-point state (MXCSR: FTZ, DAZ) on
    every thread of the pool. Nothing more where that is not possible (the pool keeps its state)."""
    import ctypes
    import sys

    import torch

    torch.set_flush_denormal(on)
    if torch.get_num_threads() == 1 or not torch.backends.openmp.is_available() or not sys.platform.startswith("linux"):
        return
    try:
        libc, gomp = ctypes.CDLL(None), ctypes.CDLL("libgomp.so.1")  # the libgomp torch has loaded
        env = ctypes.create_string_buffer(256)  # a glibc fenv_t (32 bytes on x86-64)
        if libc.fegetenv(env) != 0:
            return
        gomp.GOMP_parallel.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        gomp.GOMP_parallel(ctypes.cast(libc.fesetenv, ctypes.c_void_p), env, torch.get_num_threads(), 0)
    except (OSError, AttributeError):
        return


def denormals_flushed() -> bool | str:
    """Whether float32 denormals are flushed to zero now on every thread torch computes on
    (:func:`flush_denormals`): True, False, or ``"partly"`` (on some threads only)."""
    zero = _denormals(1 << 20).mul(1.0).eq(0)  # large enough to be split between threads
    return True if bool(zero.all()) else False if not bool(zero.any()) else "partly"


def environment() -> dict[str, Any]:
    """Library versions and the normkit commit, for records."""
    import fastai
    import timm
    import torch
    import torchvision

    from . import __version__

    return {
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "fastai": fastai.__version__, "timm": timm.__version__, "normkit": __version__},
        "commit": _LOADED_COMMIT,
    }


def _commit() -> str:
    """HEAD of the checkout normkit was loaded from (``+dirty`` if normkit/ has changes). A copy of a
    clean checkout on another machine (a remote GPU) names its commit in ``$NORMKIT_COMMIT``, which
    wins: such a copy may carry no ``.git``, or a stale one (seen: the session's first HEAD)."""
    given = os.environ.get("NORMKIT_COMMIT", "").strip().lower()
    if re.fullmatch(r"[0-9a-f]{40}", given):
        return given
    repo = Path(__file__).resolve().parent.parent
    sha = dirty = ""
    try:
        res = subprocess.run(["git", "rev-parse", "--verify", "-q", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        sha = res.stdout.strip() if res.returncode == 0 else ""
        if sha:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "normkit"], cwd=repo,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return (sha + ("+dirty" if dirty else "")) if sha else "unknown"


#: The commit of the code this process loaded, read when it imports normkit.runs: a record
#: made later in a long sweep must not name a commit checked out while the sweep ran.
_LOADED_COMMIT = _commit()


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``), else the architecture (e.g. ``x86_64``)."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The vector instruction set torch's CPU kernels use here (``torch.backends.cpu.get_cpu_capability()``:
    e.g. ``AVX2``, ``AVX512``, ``DEFAULT``), or ``""`` where this torch cannot say."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return ""


def device_name(device) -> str:
    """What a record says it ran on: ``cuda: <GPU name>`` or ``cpu: <CPU model> (<n> cores, <capability>)``,
    the capability being :func:`cpu_capability`. Two machines that report the same CPU model can
    differ in it, and so in speed (an AVX2-only AMD EPYC took about twice as long per step as an
    AVX-512 one of the same name). Older records name a CPU without it (``cpu: AMD EPYC (2 cores)``),
    or by its architecture only (``cpu: x86_64``), which do not tell such machines apart."""
    import torch

    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    capability = cpu_capability()
    return f"cpu: {cpu_model()} ({os.cpu_count()} cores{', ' + capability if capability else ''})"


#: Training steps between two checks of the losses for divergence (see ``_make_guard``).
GUARD_EVERY = 64


def _make_guard(max_steps: int | None = None):
    from fastai.callback.core import Callback, CancelFitException, CancelTrainException
    import torch

    class DivergenceGuard(Callback):
        """Stops a fit cleanly after the first NaN or infinite training loss, and says where;
        logs each epoch's smoothed train loss, validation loss and accuracy in ``epochs``.

        The losses are checked every :data:`GUARD_EVERY` steps and at the end of each epoch's
        training, not at every step: reading a loss on the host waits for the device, and one
        wait per step keeps a GPU from queueing work ahead at batch size 2. The first
        non-finite step is still the one recorded (a diverged run's metrics are not used)."""

        order = 60  # after the Recorder (50) has computed the epoch's metrics

        done: tuple[dict[str, Any], ...] = ()  # epochs made before a resumed fit (see :class:`Checkpoints`)

        def before_fit(self):
            self.diverged_at = None
            self.epochs = list(self.done)
            self._pending = []  # (iteration, loss) of the steps not checked yet, this epoch

        def _check(self):
            if not self._pending:
                return
            iters, losses = zip(*self._pending)
            self._pending = []
            values = torch.stack([x.reshape(()) if x.numel() == 1 else x.sum() for x in losses])
            bad = torch.nonzero(~torch.isfinite(values))  # the one wait for the device
            if len(bad):
                first = int(bad[0, 0])
                self.diverged_at = {"epoch": self.epoch, "iter": iters[first], "loss": float(values[first])}
                raise CancelFitException()

        def after_epoch(self):
            if self.diverged_at is not None or self.epoch < len(self.done):
                return  # the epoch was cut short (no metrics for it), or skipped by a resumed fit
            valid_loss, acc = self.recorder.values[-1][-2:]  # the Recorder's validation loss and accuracy
            self.epochs.append({"epoch": self.epoch, "train_loss": _num(self.learn.smooth_loss),
                                "valid_loss": _num(valid_loss), "accuracy": _num(acc)})

        def after_loss(self):
            if self.training:
                self._pending.append((self.iter, self.loss.detach()))
                if len(self._pending) >= GUARD_EVERY:
                    self._check()

        def after_batch(self):
            if max_steps and self.training and self.iter + 1 >= max_steps:
                raise CancelTrainException()  # smoke protocol: a short epoch, then validation

        def after_train(self):
            self._check()  # before validation: a diverged epoch gets no metrics

    return DivergenceGuard()


def _no_decay_on_norm_layers(learn) -> None:
    """Exempt every normalisation layer's parameters from weight decay in ``learn``'s fastai
    optimizer (created here; ``fit`` keeps it).

    fastai exempts biases and torch's BatchNorm/InstanceNorm/LayerNorm parameters; this
    extends it to every norm layer, so that no method is decayed where BatchNorm is not. (The
    fast path's torch AdamW gets the same exemption from its parameter groups.)
    """
    from fastai.optimizer import Optimizer

    learn.create_opt()
    if isinstance(learn.opt, Optimizer):
        for layer in norm_layers(learn.model):
            for p in layer.parameters():
                learn.opt.state[p]["do_wd"] = False


def plain_learner(dls, model, cbs: list | None = None):
    """The plain path's fastai ``Learner`` for ``model`` on ``dls``: cross-entropy loss, fastai's
    default optimizer (Adam), accuracy as the metric, and no weight decay on the normalisation
    layers. :func:`train` builds every plain run with it, and the step-time benchmark times it."""
    from fastai.learner import Learner
    from fastai.losses import CrossEntropyLossFlat
    from fastai.metrics import accuracy

    learn = Learner(dls, model, loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cbs)
    _no_decay_on_norm_layers(learn)
    return learn


# ---------------------------------------------------------------------------------------
# Checkpoints

#: The format of a run's checkpoint (:class:`Checkpoints`); a checkpoint of another is not used.
CHECKPOINT_FORMAT = 1


def _plain(x: Any) -> Any:
    """``x`` with plain containers, tensors and numbers only (fastcore's ``L``, fastai's tensor
    subclasses and numpy scalars made lists, ``torch.Tensor`` and Python numbers), so that a
    checkpoint loads with ``torch.load(weights_only=True)``: no code runs from the file."""
    import numpy as np
    import torch
    from fastcore.foundation import L

    if isinstance(x, torch.Tensor):
        return x.as_subclass(torch.Tensor) if type(x) is not torch.Tensor else x
    if isinstance(x, dict):
        return {_plain(k): _plain(v) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_plain(v) for v in x)
    if isinstance(x, (list, L)):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, str):
        return str(x)
    return x


def _to_device(x: Any, device) -> Any:
    """``x`` (nested dicts, lists, tuples) with its tensors on ``device``."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    return x


def _rng_state(learn) -> dict[str, Any]:
    """Every random state the rest of a fit draws from: Python's, numpy's, torch's (CPU and
    CUDA), and each data loader's own (fastai's ``rng``, :class:`~normkit.fastdata.TensorLoader`'s
    ``generator``), as plain lists and tensors (loadable with ``weights_only``)."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
             "torch": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [], "loaders": []}
    for dl in learn.dls.loaders:
        gen = getattr(dl, "generator", None)
        rng = getattr(dl, "rng", None)
        state["loaders"].append({"generator": gen.get_state()} if isinstance(gen, torch.Generator)
                                else {"rng": rng.getstate()} if rng is not None else {})
    return state


def _set_rng_state(learn, state: dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    def tuples(x):
        return tuple(tuples(v) for v in x) if isinstance(x, (list, tuple)) else x

    random.setstate(tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for dl, s in zip(learn.dls.loaders, state["loaders"]):
        if "generator" in s:
            dl.generator.set_state(s["generator"])
        elif "rng" in s:
            dl.rng.setstate(tuples(s["rng"]))


class Checkpoints:
    """A folder of unfinished runs' checkpoints: ``<root>/<protocol>/<key>.pt``, the state of a
    run after its last finished epoch, and ``<key>.json``, a summary of it (epochs done, metrics so far).

    With a checkpoint a run stopped at any point (a killed sweep, a Colab session that ended)
    loses at most one epoch: :func:`train` resumes it from its checkpoint, exactly as if it had
    not stopped. The state saved is what the rest of the fit depends on: the weights, the
    optimizer's state, every random generator (:func:`_rng_state`: so the next epochs shuffle,
    augment and seed data workers as they would have), the smoothed training loss and the
    metrics of the epochs done; the one-cycle schedule follows from the epoch (fastai's
    ``fit(start_epoch=)``). A run is resumed only by the same data path and settings
    (``how``), with denormals flushed as they were (:func:`flush_denormals`), and its record
    names each earlier part of the run (``settings.resumed``: its epochs, device, commit,
    versions, times) and counts their times in ``wall_time_s`` and ``cpu_time_s``.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    def paths(self, config: RunConfig) -> tuple[Path, Path]:
        """(state, summary) files of ``config``'s checkpoint."""
        base = self.root / config.protocol / config.key
        return base.with_suffix(".pt"), base.with_suffix(".json")

    def progress(self, config: RunConfig) -> int:
        """Epochs of ``config`` done in its checkpoint (from the summary); 0 if it has none."""
        summary = self.paths(config)[1]
        try:
            d = json.loads(summary.read_text())
            return int(d["epochs_done"]) if d.get("key") == config.key else 0
        except (OSError, ValueError, KeyError, TypeError):
            return 0

    def flushes(self, config: RunConfig) -> bool | None:
        """Whether ``config``'s checkpoint was made with denormals flushed (:func:`flush_denormals`;
        a checkpoint from before that switch was not); None if it has no checkpoint."""
        try:
            d = json.loads(self.paths(config)[1].read_text())
            return bool(d.get("flush_denormals", False)) if d.get("key") == config.key else None
        except (OSError, ValueError, AttributeError):
            return None

    def remove(self, config: RunConfig) -> None:
        """Delete ``config``'s checkpoint (once its record is written)."""
        for f in self.paths(config):
            f.unlink(missing_ok=True)

    def load(self, config: RunConfig, how: Any, device, flush: bool = False) -> dict[str, Any] | None:
        """``config``'s checkpoint if it has one made the same way (``how``, ``flush``: denormals
        flushed or not); None if it has none.
        One that cannot be used (damaged, another format, config or data path) is reported and ignored."""
        import torch

        path = self.paths(config)[0]
        if not path.exists():
            return None
        try:
            # on the CPU: random states must stay there; the weights and optimizer state are
            # moved to the run's device as they are loaded (see ``saver``)
            state = torch.load(path, map_location="cpu", weights_only=True)
            got = {k: state.get(k) for k in ("format", "key", "how")} | {
                "flush_denormals": state.get("flush_denormals", False)}
            want = {"format": CHECKPOINT_FORMAT, "key": config.key, "how": how, "flush_denormals": flush}
            if got != want:
                raise ValueError(f"it was made as {got}, this run is {want}")
            if not 0 < len(state["epochs"]) < config.epochs:
                raise ValueError(f"it holds {len(state['epochs'])} of {config.epochs} epochs")
            return state
        except Exception as e:  # noqa: BLE001 - a checkpoint that cannot be used is redone, never trusted
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            warnings.warn(f"checkpoint {path} not used, the run starts afresh: {why}", stacklevel=3)
            return None

    def save(self, config: RunConfig, state: dict[str, Any]) -> None:
        """Write ``state`` and its summary, each atomically (the state first)."""
        import torch

        path, summary = self.paths(config)
        atomic_write(path, lambda f: torch.save(state, f))
        text = json.dumps({"key": config.key, "config": config.to_dict(), "epochs_done": len(state["epochs"]),
                           "flush_denormals": state["flush_denormals"], "epochs": state["epochs"],
                           "segments": state["segments"]}, indent=1)
        atomic_write(summary, lambda f: f.write(text.encode()))

    def saver(self, config: RunConfig, how: Any, model, guard, device, clock: tuple[float, float],
              flush: bool = False, deadline: float | None = None):
        """The fastai callback that resumes ``config`` from its checkpoint, if any, and saves one
        after each epoch but the last. ``how``: the data path and settings, ``flush``: whether
        denormals are flushed (a checkpoint is resumed only by the same); ``model``: the network
        whose weights are saved (not a compiled wrapper); ``guard``: the run's divergence guard (its epochs are saved, and restored); ``clock``: the
        wall and CPU times the run started at; ``deadline``: a ``time.time()`` by which the fit
        must end: once a checkpoint is saved, the fit stops there if one more epoch, at the
        mean pace of the epochs run so far in this process, would end after it (the callback's
        ``paused`` is then True). Its ``start_epoch`` is where the fit starts; its
        ``earlier``, the times and segments (:class:`Checkpoints`) of the parts already run."""
        from fastai.callback.core import Callback, CancelFitException

        store = self
        resume = self.load(config, how, device, flush)
        if resume is not None:
            model.load_state_dict(resume["model"])
            guard.done = tuple(resume["epochs"])

        class EpochCheckpoint(Callback):
            order = 61  # after the divergence guard has logged the epoch's metrics
            start_epoch = len(resume["epochs"]) if resume else 0
            paused = False
            earlier = {"wall_time_s": resume["wall_time_s"], "cpu_time_s": resume["cpu_time_s"],
                       "segments": resume["segments"]} if resume else {"wall_time_s": 0.0, "cpu_time_s": 0.0,
                                                                       "segments": []}

            def before_fit(self):
                if resume is not None:  # after the Recorder's reset and the optimizer's creation
                    from fastai.optimizer import Optimizer

                    opt = resume["opt"]
                    if isinstance(self.learn.opt, Optimizer):  # fastai's takes its state as it is given
                        opt = _to_device(opt, device)  # (torch's moves it to the parameters' devices itself)
                    self.learn.opt.load_state_dict(opt)
                    smooth = self.learn.recorder.smooth_loss
                    smooth.val, smooth.count = resume["smooth_loss"][0].cpu(), resume["smooth_loss"][1]
                    _set_rng_state(self.learn, resume["rng"])

            def after_epoch(self):
                if guard.diverged_at is not None or self.epoch < self.start_epoch or self.epoch >= self.n_epoch - 1:
                    return
                import torch

                smooth = self.learn.recorder.smooth_loss
                wall, cpu = time.time() - clock[0], time.process_time() - clock[1]
                segment = {"epochs": [self.start_epoch, self.epoch + 1], "device": device_name(torch.device(device)),
                           "threads": torch.get_num_threads(), "wall_time_s": round(wall, 2),
                           "cpu_time_s": round(cpu, 2),
                           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **environment()}
                store.save(config, _plain({
                    "format": CHECKPOINT_FORMAT, "key": config.key, "how": how, "flush_denormals": flush,
                    "epochs": list(guard.epochs),
                    "model": model.state_dict(), "opt": self.learn.opt.state_dict(),
                    "smooth_loss": [torch.as_tensor(smooth.val).detach().clone(), smooth.count],
                    "rng": _rng_state(self.learn),
                    "wall_time_s": self.earlier["wall_time_s"] + wall, "cpu_time_s": self.earlier["cpu_time_s"] + cpu,
                    "segments": [*self.earlier["segments"], segment]}))
                if deadline is not None and time.time() + wall / (self.epoch + 1 - self.start_epoch) > deadline:
                    self.paused = True
                    raise CancelFitException()

        return EpochCheckpoint()


def train(config: RunConfig, data_path: str | os.PathLike, *, device=None, num_workers: int | None = None,
          data_meta: dict[str, Any] | None = None, fast=None,
          on_trained: Callable[[Any], None] | None = None,
          checkpoints: str | os.PathLike | None = None, flush: bool | None = None,
          deadline: float | None = None) -> dict[str, Any]:
    """Train one run with a fastai ``Learner`` and ``fit_one_cycle``; return its record.

    ``checkpoints``: a folder where the run saves its state after each epoch but the last, and
    from which it resumes, exactly where it stopped, if it was stopped (see :class:`Checkpoints`).
    ``deadline`` (a ``time.time()``; with ``checkpoints`` only): the run stops after an epoch's
    checkpoint when its next epoch would end after the deadline, and raises :class:`RunPaused`;
    called again, it resumes there. The time limit of :func:`normkit.sweep.sweep` uses it, so that a
    run started on an estimate that proves too low pauses instead of running past the limit.

    ``on_trained``: called with the trained ``Learner`` after the fit (diverged or not), e.g.
    to measure the trained model (:func:`normkit.probes.make_probes`).

    ``fast``: a :class:`normkit.fastdata.FastPath` to train from the data on the device with
    its speed settings (same distribution of results); None for the plain fastai pipeline.

    ``flush``: flush float32 denormals to zero on the CPU during the run (:func:`flush_denormals`:
    the same weights; ``tests/benchmarks/denormals.py`` measures what it saves). None: as its
    checkpoint was made, if it resumes one, else on a CPU device only. The record states what
    held during the fit (``settings.flush_denormals``: True, False or "partly", see
    :func:`denormals_flushed`).
    """
    import torch

    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if deadline is not None and checkpoints is None:
        raise ValueError(f"deadline={deadline!r} needs checkpoints: a run can stop early only where it can resume")
    if flush is None:
        made = Checkpoints(checkpoints).flushes(config) if checkpoints is not None else None
        flush = device.type == "cpu" if made is None else made
    with flush_denormals(flush) as flushed:
        return _train(config, data_path, device, num_workers, data_meta, fast, on_trained, checkpoints, flush,
                      flushed, deadline)


def _train(config, data_path, device, num_workers, data_meta, fast, on_trained, checkpoints, flush, flushed,
           deadline=None) -> dict[str, Any]:
    """:func:`train`'s body, run with denormals flushed as ``flush`` says (``flushed``: what holds)."""
    from fastai.metrics import accuracy
    from fastai.torch_core import set_seed

    from .data import make_dls
    from .models import build_model

    proto = config.protocol_obj
    start, cpu_start = time.time(), time.process_time()
    set_seed(config.seed, reproducible=True)
    if fast is None:
        dls = make_dls(data_path, config.bs, config.size, device=device, num_workers=num_workers,
                       max_train=proto.max_train, max_valid=proto.max_valid)
    else:
        dls = fast.make_dls(config, data_path, device)
    set_seed(config.seed, reproducible=True)
    model = build_model(config.net, config.norm_obj, n_out=len(dls.vocab))
    guard = _make_guard(proto.max_steps)
    if fast is None:
        learn = plain_learner(dls, model, cbs=[guard])
    else:
        learn = fast.learner(dls, model, device, metrics=accuracy, cbs=[guard])
        _no_decay_on_norm_layers(learn)
    saver = None
    if checkpoints is not None:
        saver = Checkpoints(checkpoints).saver(config, "plain" if fast is None else fast.to_dict(), model, guard,
                                               device, (start, cpu_start), flush, deadline)
    with learn.no_bar(), learn.no_logging(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learn.fit_one_cycle(config.epochs, config.lr, cbs=[saver] if saver else None,
                            start_epoch=saver.start_epoch if saver else 0)
    if saver is not None and saver.paused:
        raise RunPaused(config.key, len(guard.epochs), config.epochs, len(guard.epochs) - saver.start_epoch,
                        round(time.time() - start, 2))
    if on_trained is not None:
        on_trained(learn)
    earlier = saver.earlier if saver else {"wall_time_s": 0.0, "cpu_time_s": 0.0, "segments": []}
    record = record_of(config, guard.epochs, guard.diverged_at, n_params=sum(p.numel() for p in model.parameters()),
                       wall_time_s=round(earlier["wall_time_s"] + time.time() - start, 2), device=device,
                       data_meta=data_meta, valid_bs=dls.valid.bs, fast=fast, learn=learn,
                       cpu_time_s=round(earlier["cpu_time_s"] + time.process_time() - cpu_start, 2),
                       flushed=flushed)
    if earlier["segments"]:
        record["settings"]["resumed"] = earlier["segments"]
    return record


def record_of(config: RunConfig, epochs: list[dict[str, Any]], diverged_at: dict[str, Any] | None, *, n_params: int,
              wall_time_s: float, device, data_meta: dict[str, Any] | None, valid_bs: int, fast=None,
              learn=None, cpu_time_s: float | None = None, flushed: bool | str | None = None) -> dict[str, Any]:
    """The record of a finished run: its per-epoch metrics (``epochs``), where it diverged (None
    if it did not), and how it was made (``fast``, and ``learn``: the fastai ``Learner`` that made
    it, whose :class:`~normkit.graphs.StepGraph`, if any, says whether its network was graphed).
    ``cpu_time_s``, the CPU seconds of the process that trained it, over ``wall_time_s`` is how
    many cores it kept busy: below ``settings.threads``, it shared its cores with other work.
    ``flushed``: whether float32 denormals were flushed to zero during the fit (``settings.flush_denormals``,
    as :func:`flush_denormals` yields it).
    A run whose last validation loss is not finite is diverged; one that neither diverged nor
    finished its epochs is an error."""
    import math

    import torch

    diverged = diverged_at is not None
    if not diverged and epochs and not math.isfinite(epochs[-1]["valid_loss"] or math.nan):
        diverged, diverged_at = True, {"epoch": len(epochs) - 1, "iter": None, "loss": epochs[-1]["valid_loss"]}
    final = None if diverged or len(epochs) < config.epochs else {k: epochs[-1][k] for k in ("valid_loss", "accuracy", "train_loss")}
    if not diverged and final is None:
        raise RuntimeError(f"run {config.describe()} ended after {len(epochs)} of {config.epochs} epochs without diverging")
    return {
        "format": RECORD_FORMAT,
        "key": config.key,
        "config": config.to_dict(),
        "status": "diverged" if diverged else "ok",
        "diverged_at": diverged_at,
        "epochs": epochs,
        "final": final,
        "n_params": n_params,
        "wall_time_s": wall_time_s,
        **({} if cpu_time_s is None else {"cpu_time_s": cpu_time_s}),
        "device": device_name(device),
        "data_source": data_meta,
        "settings": {"optimizer": FASTAI_ADAM,
                     "wd": "0.01 decoupled; none on biases and normalisation-layer parameters",
                     "schedule": "fit_one_cycle", "train_loss": "fastai smoothed training loss (beta=0.98)",
                     "deterministic": True, "data_path": "plain: fastai DataBlock", "learner": "fastai Learner",
                     "valid_bs": valid_bs, "threads": torch.get_num_threads(),
                     **precision_settings(), **({} if fast is None else fast.settings(device)),
                     **({"graph": learn.graph_status} if hasattr(learn, "graph_status") else {}),
                     **({} if flushed is None else {"flush_denormals": flushed})},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **environment(),
    }


def pack_size(record: dict[str, Any]) -> int:
    """How many runs were trained together with this one (``settings.packed``, see
    :mod:`normkit.packed`): 1 for a run trained alone."""
    return int(((record.get("settings") or {}).get("packed") or {}).get("runs", 1))


#: The start of ``settings.graph`` in the record of a run whose network was replayed from CUDA
#: graphs (:class:`normkit.graphs.StepGraph`).
GRAPHED = "graphed: forward and backward replayed from CUDA graphs"


def graphed(record: dict[str, Any]) -> bool:
    """Whether the run of ``record`` had its network replayed from CUDA graphs."""
    return str((record.get("settings") or {}).get("graph", "")).startswith(GRAPHED)


def path_kind(data_path: str, pack: int = 1, graph: bool = False) -> str:
    """How runs were made, in words: the data path (``fast`` or ``plain``), the pack size if over
    1, and whether the networks were replayed from CUDA graphs."""
    return data_path + (f", packs of {pack}" if pack > 1 else "") + (", CUDA graphs" if graph else "")


def how_made(record: dict[str, Any]) -> tuple[str, str, int]:
    """(device, :func:`path_kind`, workers) of a record: what its pace depends on besides the run."""
    s = record.get("settings") or {}
    kind = path_kind(str(s.get("data_path", "plain")).split(":")[0], pack_size(record), graphed(record))
    return str(record.get("device")), kind, int(s.get("workers", 1))


def run_seconds(record: dict[str, Any]) -> float:
    """The wall seconds a run took: its ``wall_time_s``, or for a run trained in a pack of N,
    which records the pack's time, its N-th."""
    return float(record["wall_time_s"]) / pack_size(record)


def _num(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def run_grid(configs: Iterable[RunConfig], store: ResultStore | None = None, data: str | os.PathLike | None = None, *,
             device=None, num_workers: int | None = None,
             log: Callable[[str], None] | None = print) -> list[dict[str, Any]]:
    """Train every config without a record with the plain fastai pipeline, one at a time in
    this process, writing each record as it finishes; return all records (in ``configs``' order).

    The plain reference of :func:`normkit.sweep.sweep` (``workers=1, fast=False``), which
    it calls. ``data`` is a folder or .tgz (see :func:`normkit.data.imagenette_path`); the
    data's identity must match each config's ``data``. A run that fails (an error, not a
    divergence) does not stop the others; it raises ``RuntimeError`` once they are done.
    """
    from .sweep import sweep

    configs = list(dict.fromkeys(configs))
    store = store or ResultStore()
    report = sweep(configs, store=store, data=data, device=device, workers=1, fast=False, num_workers=num_workers,
                   log=log)
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} run(s) failed (the others are recorded): "
                           + "; ".join(f"{k}: {e}" for k, e in report.failed.items()))
    return [store.get(c) for c in configs]
