"""Probes for the small-batch chapter: what a BatchNorm layer sees, batch by batch.

* :func:`batch_stats`: the per-channel mean and variance of the input of every
  BatchNorm-like layer, for each of many batches (a tidy ``DataFrame``).
* :func:`population_stats`, :func:`running_stats`: the reference statistics to compare
  them with; :func:`summarise_batch_stats`: their spread across batches and the fraction of
  "collapsed" (batch, channel) pairs; :func:`gaussian_collapse_fraction`: that fraction for
  i.i.d. Gaussian values, the yardstick.
* :func:`train_eval_gap`: loss and accuracy of one model with batch statistics and with
  running statistics.
* :func:`eps_bound`: how large a normalised value can be, and what ``eps`` changes.

>>> stats = batch_stats(model, (x for x, _ in dl), max_batches=100)
>>> summarise_batch_stats(stats, running_stats(model))
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.layers import EvoNorm2dB0
from torch import nn

from .models import NET_TITLES
from .norms import BatchRenorm2d, RunningBatchNorm2d
from .report import Table, TableTabs, _net_selector, _no_data
from .runs import DamagedRecord, Protocol, ResultStore, RunConfig, check_header, config_key, device_name, environment

__all__ = [
    "BATCHNORM_LAYERS", "BATCH_STAT_LAYERS", "batch_statistics_mode", "batch_stats", "population_stats",
    "running_stats", "summarise_batch_stats", "gaussian_collapse_fraction", "train_eval_gap", "eps_bound",
    "PROBE_FORMAT", "PROBE_THRESHOLD", "PROBE_MAX_BATCHES", "PROBE_EVAL_BATCH_SIZES", "ProbeConfig", "ProbeStore",
    "probe_configs", "probe_model", "make_probe", "make_probes", "probe_frames", "gap_table", "stats_table",
    "gap_tabs", "stats_tabs",
    "stats_chart",
]

#: Layers that normalise with the batch's mean and variance in training and keep running ones.
BATCHNORM_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm, BatchRenorm2d)
#: Every layer that behaves differently in training and in eval mode because of batch statistics.
BATCH_STAT_LAYERS: tuple[type[nn.Module], ...] = BATCHNORM_LAYERS + (RunningBatchNorm2d, EvoNorm2dB0)

_STAT_COLUMNS = ["layer", "channel", "batch_idx", "n", "mean", "var"]


@contextmanager
def batch_statistics_mode(model: nn.Module, layer_types: tuple[type[nn.Module], ...] = BATCH_STAT_LAYERS
                          ) -> Iterator[nn.Module]:
    """Inside the block, ``layer_types`` layers run in training mode and the rest in eval mode.

    So every BatchNorm normalises with the statistics of the batch in front of it, while
    dropout and the like stay off. On exit every buffer (running statistics, step counters)
    and every module's mode are restored: the forward passes leave no trace.
    """
    modes = {m: m.training for m in model.modules()}
    saved = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        model.eval()
        for m in model.modules():
            if isinstance(m, layer_types):
                m.train()
        yield model
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])
        for m, mode in modes.items():
            m.training = mode


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _inputs(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def batch_stats(model: nn.Module, batches: Iterable[Any], *, max_batches: int | None = None,
                train_mode: bool = True, layer_types: tuple[type[nn.Module], ...] = BATCHNORM_LAYERS
                ) -> pd.DataFrame:
    """Per-channel mean and variance of the input of every ``layer_types`` layer, batch by batch.

    Args:
        model: the network (not changed: see :func:`batch_statistics_mode`).
        batches: input tensors (N, C, H, W), or ``(x, y)`` tuples whose first item is used;
            the batch size of the probe is theirs.
        max_batches: stop after this many batches.
        train_mode: run the batch-statistics layers in training mode (default), so that each
            layer's input is what it would be in training, or the whole model in eval mode.
        layer_types: the layers whose inputs are probed.

    Returns:
        One row per (layer, channel, batch): ``layer`` (module name), ``channel``,
        ``batch_idx``, ``n`` (values per channel: N·H·W), ``mean`` and ``var`` (biased, as
        BatchNorm normalises with). Layers appear in the order of ``model.named_modules()``.
    """
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, layer_types)]
    if not layers:
        raise ValueError(f"the model has no layer of type {', '.join(t.__name__ for t in layer_types)} to probe")
    records: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {name: [] for name, _ in layers}
    batch_idx = 0

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().float()
            dims = [d for d in range(x.dim()) if d != 1]
            n = x.numel() // x.shape[1]
            records[name].append((batch_idx, n, x.mean(dim=dims).cpu(), x.var(dim=dims, unbiased=False).cpu()))
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name)) for name, m in layers]
    device = _device(model)
    try:
        with torch.no_grad():
            for batch in itertools.islice(batches, max_batches):
                # per batch, so that every batch meets the trained model's buffers (a layer that
                # updates its running statistics, e.g. Batch Renormalization, would otherwise
                # normalise batch k with statistics that batches 0..k-1 moved)
                with batch_statistics_mode(model, layer_types=BATCH_STAT_LAYERS if train_mode else ()):
                    model(_inputs(batch).to(device))
                batch_idx += 1
    finally:
        for h in handles:
            h.remove()

    frames = []
    for name, _ in layers:
        for b, n, mean, var in records[name]:
            c = len(mean)
            frames.append(pd.DataFrame({"layer": name, "channel": np.arange(c), "batch_idx": b, "n": n,
                                        "mean": mean.numpy(), "var": var.numpy()}))
    if not frames:
        return pd.DataFrame(columns=_STAT_COLUMNS)
    return pd.concat(frames, ignore_index=True)[_STAT_COLUMNS]


def population_stats(stats: pd.DataFrame) -> pd.DataFrame:
    """Mean and (biased) variance of each channel over every value of every batch in ``stats``.

    Pooled exactly from the per-batch moments: with weights n (values per batch),
    mean = Σ n·μ_b / Σ n and var = Σ n·(σ_b² + μ_b²) / Σ n − mean² (law of total variance).
    Columns: layer, channel, mean, var.
    """
    s = stats.assign(w_mean=stats["n"] * stats["mean"], w_sq=stats["n"] * (stats["var"] + stats["mean"] ** 2))
    g = s.groupby(["layer", "channel"], sort=False)[["n", "w_mean", "w_sq"]].sum()
    mean = g["w_mean"] / g["n"]
    var = (g["w_sq"] / g["n"] - mean**2).clip(lower=0)
    return pd.DataFrame({"mean": mean, "var": var}).reset_index()


def running_stats(model: nn.Module, layer_types: tuple[type[nn.Module], ...] = BATCHNORM_LAYERS) -> pd.DataFrame:
    """The running mean and variance buffers of every ``layer_types`` layer (NaN where a layer has none).

    Columns: layer, channel, mean, var.
    """
    frames = []
    for name, m in model.named_modules():
        if not isinstance(m, layer_types):
            continue
        var = getattr(m, "running_var", None)
        mean = getattr(m, "running_mean", None)
        if var is None and mean is None:
            continue
        c = len(var if var is not None else mean)
        nan = np.full(c, np.nan)
        frames.append(pd.DataFrame({
            "layer": name, "channel": np.arange(c),
            "mean": mean.detach().cpu().float().numpy() if mean is not None else nan,
            "var": var.detach().cpu().float().numpy() if var is not None else nan,
        }))
    if not frames:
        return pd.DataFrame(columns=["layer", "channel", "mean", "var"])
    return pd.concat(frames, ignore_index=True)


def summarise_batch_stats(stats: pd.DataFrame, reference: pd.DataFrame | None = None, *,
                          threshold: float = 0.01) -> pd.DataFrame:
    """How far each batch's statistics stray from the reference ones, layer by layer.

    For every (batch, channel) pair, with the reference mean μ and variance σ² of the channel
    (``reference``: :func:`running_stats` or, by default, :func:`population_stats` of
    ``stats``) and the batch's μ_B, σ_B²: the shift (μ_B − μ)/σ and the ratio σ_B²/σ² (the d
    and r² of Batch Renormalization). A pair has *collapsed* when σ_B²/σ² < ``threshold``:
    BatchNorm then multiplies that batch's deviations by ≥ 1/sqrt(threshold) more than the
    running statistics would (bounded only by eps, see :func:`eps_bound`). Channels whose
    reference variance is 0 are left out of the ratios.

    Returns one row per layer: layer, channels, batches, n (values per channel and batch),
    mean_shift_rms, var_ratio_p05, var_ratio_median, var_ratio_p95, collapsed (a fraction).
    """
    if not (isinstance(threshold, (int, float)) and threshold > 0):
        raise ValueError(f"threshold={threshold!r} is invalid; threshold must be a positive number")
    ref = population_stats(stats) if reference is None else reference
    merged = stats.merge(ref[["layer", "channel", "mean", "var"]], on=["layer", "channel"], suffixes=("", "_ref"),
                         how="left")
    ok = merged["var_ref"] > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        merged["shift"] = np.where(ok, (merged["mean"] - merged["mean_ref"]) / np.sqrt(merged["var_ref"]), np.nan)
        merged["ratio"] = np.where(ok, merged["var"] / merged["var_ref"], np.nan)
    rows = []
    for layer, g in merged.groupby("layer", sort=False):
        ratio = g["ratio"].dropna()
        rows.append({
            "layer": layer, "channels": g["channel"].nunique(), "batches": g["batch_idx"].nunique(),
            "n": int(g["n"].median()),
            "mean_shift_rms": float(np.sqrt(np.nanmean(g["shift"] ** 2))) if g["shift"].notna().any() else np.nan,
            "var_ratio_p05": ratio.quantile(0.05) if len(ratio) else np.nan,
            "var_ratio_median": ratio.median() if len(ratio) else np.nan,
            "var_ratio_p95": ratio.quantile(0.95) if len(ratio) else np.nan,
            "collapsed": float((ratio < threshold).mean()) if len(ratio) else np.nan,
        })
    return pd.DataFrame(rows)


def gaussian_collapse_fraction(m: int | np.ndarray, threshold: float = 0.01) -> float | np.ndarray:
    r"""P(σ_B²/σ² < threshold) for the biased variance σ_B² of m i.i.d. Gaussian values.

    :math:`m\sigma_B^2/\sigma^2 \sim \chi^2_{m-1}`, so the probability is
    :math:`P(\chi^2_{m-1} < m\,t) = P_{\mathrm{reg}}((m-1)/2,\ m t/2)` (regularised lower
    incomplete gamma). Real feature maps have spatially correlated values, so they behave
    like fewer than N·H·W independent values and collapse more often than this.
    """
    m_arr = np.asarray(m, dtype=np.float64)
    if np.any(m_arr < 2):
        raise ValueError(f"m={m!r} is invalid; m (values per channel) must be >= 2")
    a = torch.as_tensor((m_arr - 1) / 2)
    x = torch.as_tensor(m_arr * threshold / 2)
    p = torch.special.gammainc(a, x).numpy()
    return float(p) if np.ndim(p) == 0 else p


def train_eval_gap(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], *,
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
                   layer_types: tuple[type[nn.Module], ...] = BATCH_STAT_LAYERS) -> pd.DataFrame:
    """Loss and accuracy of ``model`` with batch statistics and with running statistics.

    Each ``(x, y)`` batch is evaluated twice: ``"running"``, the model in eval mode (as at
    inference), and ``"batch"``, the ``layer_types`` layers in training mode so that they
    normalise with the statistics of that very batch (of the batches' size: a gap at batch
    size 2 is not a gap at 128). Nothing is updated (:func:`batch_statistics_mode`).

    Returns two rows: mode ("batch", "running"), loss (mean per sample), accuracy, samples.
    """
    device = _device(model)
    totals = {"batch": [0.0, 0, 0], "running": [0.0, 0, 0]}
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with batch_statistics_mode(model, ()):  # every layer in eval mode
                outputs = {"running": model(x)}
            with batch_statistics_mode(model, layer_types):
                outputs["batch"] = model(x)
            for mode, out in outputs.items():
                t = totals[mode]
                t[0] += float(loss_fn(out, y)) * len(y)
                t[1] += int((out.argmax(dim=1) == y).sum())
                t[2] += len(y)
    rows = [{"mode": mode, "loss": t[0] / t[2] if t[2] else math.nan,
             "accuracy": t[1] / t[2] if t[2] else math.nan, "samples": t[2]} for mode, t in totals.items()]
    return pd.DataFrame(rows)


def eps_bound(eps: float, m: int, sigma: float | np.ndarray = math.inf) -> float | np.ndarray:
    r"""The largest \|normalised value\| BatchNorm can output for a channel of m values.

    Setting: one channel of a batch holds m values :math:`x_1..x_m` (m = N·H·W), with mean
    μ and biased variance :math:`\sigma^2 = \frac1m\sum_j (x_j-\mu)^2`; BatchNorm outputs
    :math:`\hat x_i = (x_i - \mu)/\sqrt{\sigma^2 + \epsilon}`. Returns
    :math:`\sqrt{m-1}\,\sigma/\sqrt{\sigma^2+\epsilon}` (:math:`\sqrt{m-1}` for the default
    σ = ∞, the bound over every batch).

    Derivation. The deviations sum to zero, so :math:`x_i - \mu = -\sum_{j\ne i}(x_j - \mu)`
    and by Cauchy–Schwarz :math:`(x_i-\mu)^2 \le (m-1)\sum_{j\ne i}(x_j-\mu)^2
    = (m-1)\,(m\sigma^2 - (x_i-\mu)^2)`, that is :math:`(x_i - \mu)^2 \le (m-1)\,\sigma^2`.
    Hence

    .. math::

        |\hat x_i| \le \sqrt{m-1}\,\frac{\sigma}{\sqrt{\sigma^2+\epsilon}} < \sqrt{m-1}
        \qquad\text{and}\qquad |\hat x_i| \le \frac{|x_i-\mu|}{\sqrt{\epsilon}}
        \le \sqrt{m-1}\,\frac{\sigma}{\sqrt{\epsilon}}.

    Equality holds when all values but one are equal (Cauchy–Schwarz is tight when the
    other deviations are equal): then :math:`|\hat x_i| = \sqrt{m-1}\,\sigma/\sqrt{\sigma^2+\epsilon}`.

    What this says about ``eps``: the first bound does not involve eps, so eps does *not*
    cap the normalised values, the number of values m does (m = 2: outputs are ±1 at most,
    whatever the inputs). What eps caps is the *gain*, :math:`1/\sqrt{\sigma^2+\epsilon} \le
    1/\sqrt{\epsilon}`: when a batch's variance collapses (σ² ≪ eps), a deviation is
    multiplied by at most :math:`1/\sqrt\epsilon` (316 for 1e-5, 3.2 for 0.1) and the
    outputs shrink towards 0 (:math:`\le \sqrt{m-1}\,\sigma/\sqrt\epsilon`) instead of being
    blown up to unit scale. With σ² ≫ eps, eps barely matters.
    """
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps={eps!r} is invalid; eps must be a number >= 0")
    if not (isinstance(m, (int, np.integer)) and m >= 1):
        raise ValueError(f"m={m!r} is invalid; m (values per channel) must be an integer >= 1")
    s = np.asarray(sigma, dtype=np.float64)
    if np.any(s < 0):
        raise ValueError("sigma must be >= 0")
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(np.isinf(s), 1.0, s / np.sqrt(s * s + eps))
        frac = np.where((s == 0) & (eps == 0), 0.0, frac)  # 0/0: every deviation is 0
    out = math.sqrt(m - 1) * frac
    return float(out) if np.ndim(out) == 0 else out


# ---------------------------------------------------------------------------------------
# Probe records: trained models, measured after training


#: Format of a probe record (``results/<protocol>/probes/<key>.json``).
PROBE_FORMAT = 1
#: A (batch, channel) pair has collapsed when its batch variance is below this fraction of the
#: running variance: BatchNorm then multiplies that batch's deviations by at least
#: 1/sqrt(0.01) = 10 times the gain inference applies.
PROBE_THRESHOLD = 0.01
#: Batches of each evaluation batch size whose statistics are summarised (the gap uses them all).
PROBE_MAX_BATCHES = 512
#: The evaluation batch sizes of the probes, per protocol (the smoke protocol has 40 val images).
PROBE_EVAL_BATCH_SIZES = {"v1": (2, 128), "smoke": (2, 16)}


@dataclass(frozen=True)
class ProbeConfig:
    """One probe: train ``run`` (as :func:`normkit.runs.train` does), then measure the trained
    model on the validation set, shuffled with ``val_seed``, in batches of each
    ``eval_batch_sizes`` (every batch full; the remainder is left out)."""

    run: RunConfig
    eval_batch_sizes: tuple[int, ...]
    max_batches: int = PROBE_MAX_BATCHES
    threshold: float = PROBE_THRESHOLD
    val_seed: int = 0

    @classmethod
    def of(cls, run: RunConfig) -> "ProbeConfig":
        """The probe of ``run`` with the defaults of its protocol."""
        return cls(run, PROBE_EVAL_BATCH_SIZES.get(run.protocol, PROBE_EVAL_BATCH_SIZES["v1"]))

    def to_dict(self) -> dict[str, Any]:
        return {"run": self.run.to_dict(), "run_key": self.run.key, "eval_batch_sizes": list(self.eval_batch_sizes),
                "max_batches": self.max_batches, "threshold": self.threshold, "val_seed": self.val_seed}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ProbeConfig":
        names = {"run", "run_key", "eval_batch_sizes", "max_batches", "threshold", "val_seed"}
        if not isinstance(d, dict) or set(d) != names:
            raise ValueError(f"probe config fields {sorted(d) if isinstance(d, dict) else d!r} differ from {sorted(names)}")
        run = RunConfig.from_dict(d["run"])
        if d["run_key"] != run.key:
            raise ValueError("probe config's run_key does not match its run")
        return cls(run, tuple(d["eval_batch_sizes"]), d["max_batches"], d["threshold"], d["val_seed"])

    @property
    def key(self) -> str:
        """16 hex digits of the sha256 of the probe config's canonical JSON."""
        return config_key(self.to_dict())

    def describe(self) -> str:
        return f"probe of {self.run.describe()} at eval batch sizes {', '.join(map(str, self.eval_batch_sizes))}"


def probe_configs(protocol: Protocol | None = None) -> list[ProbeConfig]:
    """The small-batch chapter's probes: one per run of :func:`normkit.study.probe_runs`."""
    from .study import probe_runs

    return [ProbeConfig.of(r) for r in probe_runs(protocol)]


class ProbeStore(ResultStore):
    """Probe records on disk: ``<root>/<protocol>/probes/<key>.json``, beside the run records."""

    kind = "probe record"
    allow_nan = False

    def path(self, config: ProbeConfig) -> Path:
        return self.root / config.run.protocol / "probes" / f"{config.key}.json"

    def check(self, record: Any, config: ProbeConfig) -> dict[str, Any]:
        return _check_probe(record, config)

    def config_of(self, record: dict[str, Any]) -> ProbeConfig:
        return ProbeConfig.from_dict(record["config"])


_PROBE_REQUIRED = {"format", "kind", "key", "config", "status", "training", "stats", "gap", "wall_time_s", "device",
                   "versions", "commit", "date"}
_STAT_FIELDS = ("eval_bs", "layer", "depth", "channels", "batches", "n", "mean_shift_rms", "var_ratio_p05",
                "var_ratio_median", "var_ratio_p95", "collapsed", "gaussian_collapsed")
_GAP_FIELDS = ("eval_bs", "mode", "loss", "accuracy", "samples")


def _check_probe(record: Any, config: ProbeConfig) -> dict[str, Any]:
    check_header(record, config, _PROBE_REQUIRED, {"format": PROBE_FORMAT, "kind": "probe"})
    if record["status"] == "ok":
        for name, fields_ in (("stats", _STAT_FIELDS), ("gap", _GAP_FIELDS)):
            rows = record[name]
            if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) and set(fields_) <= set(r) for r in rows):
                raise DamagedRecord(f"{name} rows missing or incomplete")
        if {r["eval_bs"] for r in record["gap"]} != set(config.eval_batch_sizes):
            raise DamagedRecord("gap rows do not cover the eval batch sizes")
    return record


def _clean(v: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    return v


def _eval_loader(valid, bs: int, seed: int):
    """``valid`` (a fastai DataLoader) in shuffled batches of exactly ``bs``, the same order for a seed."""
    import random

    state = random.getstate()
    try:
        random.seed(seed)  # a new fastai DataLoader draws its shuffling RNG's seed from ``random``
        dl = valid.new(bs=bs, shuffle=True, drop_last=True)
    finally:
        random.setstate(state)  # the caller's ``random`` stream goes on as if nothing happened
    # plain tensors: fastai's TensorImage/TensorCategory dispatch F.cross_entropy elsewhere
    return ((x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)) for x, y in dl)


def probe_model(model: nn.Module, valid, config: ProbeConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Measure a trained model on ``valid`` (a fastai validation DataLoader); (stats rows, gap rows).

    For each eval batch size: :func:`summarise_batch_stats` of the first ``max_batches``
    batches against the model's running statistics (one row per BatchNorm layer, with the
    collapse fraction i.i.d. Gaussian values would give, :func:`gaussian_collapse_fraction`),
    and :func:`train_eval_gap` over every full batch.
    """
    running = running_stats(model)
    depth = {name: i for i, name in enumerate(dict.fromkeys(running["layer"]))}
    stats_rows, gap_rows = [], []
    for bs in config.eval_batch_sizes:
        stats = batch_stats(model, _eval_loader(valid, bs, config.val_seed), max_batches=config.max_batches)
        if not len(stats):
            raise ValueError(f"the validation set has fewer than {bs} images: no batch to probe at batch size {bs}")
        summary = summarise_batch_stats(stats, running, threshold=config.threshold)
        for _, r in summary.iterrows():
            row = {"eval_bs": bs, "depth": depth[r["layer"]],
                   "gaussian_collapsed": gaussian_collapse_fraction(max(int(r["n"]), 2), config.threshold)}
            stats_rows.append({k: _clean(row[k] if k in row else r[k]) for k in _STAT_FIELDS})
        gap = train_eval_gap(model, _eval_loader(valid, bs, config.val_seed))
        for _, r in gap.iterrows():
            gap_rows.append({k: _clean(bs if k == "eval_bs" else r[k]) for k in _GAP_FIELDS})
    return stats_rows, gap_rows


def make_probe(config: ProbeConfig, data_path: str | os.PathLike, *, device=None, num_workers: int | None = None,
               data_meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``config.run`` with :func:`normkit.runs.train`, probe the trained model; return the record."""
    import torch

    from .data import make_dls
    from .runs import train

    start = time.time()
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    learners: list[Any] = []
    run_record = train(config.run, data_path, device=device, num_workers=num_workers, data_meta=data_meta,
                       on_trained=learners.append)
    training = {k: run_record.get(k) for k in ("key", "status", "final", "diverged_at", "wall_time_s", "settings")}
    stats_rows: list[dict[str, Any]] = []
    gap_rows: list[dict[str, Any]] = []
    if run_record["status"] == "ok":
        proto = config.run.protocol_obj
        # the plain fastai validation loader at the probe's batch size, whichever data path trained
        # the model: _eval_loader reshuffles it with fastai's DataLoader.new
        dls = make_dls(data_path, max(config.eval_batch_sizes), config.run.size, device=device, num_workers=num_workers,
                       max_train=proto.max_train, max_valid=proto.max_valid)
        model = learners[0].model
        stats_rows, gap_rows = probe_model(model, dls.valid, config)
    return {
        "format": PROBE_FORMAT,
        "kind": "probe",
        "key": config.key,
        "config": config.to_dict(),
        "status": run_record["status"],
        "training": training,
        "stats": stats_rows,
        "gap": gap_rows,
        "method": {"stats": "per BatchNorm layer: batch mean/var (biased) of its input with every BatchNorm in "
                            "training mode, against the layer's running mean/var; shift = (mu_B - mu_run)/sigma_run, "
                            "ratio = var_B/var_run, collapsed: ratio < threshold",
                   "gap": "the same batches evaluated in eval mode (running statistics) and with the BatchNorm "
                          "layers in training mode (batch statistics); nothing updated",
                   "valid": "the validation set shuffled with val_seed, full batches only"},
        "wall_time_s": round(time.time() - start, 2),
        "device": device_name(device),
        "data_source": data_meta,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **environment(),
    }


def projected_probe_seconds(config: ProbeConfig, store: ProbeStore, device) -> float | None:
    """Seconds a probe of ``config`` is projected to take on ``device``; None if nothing tells.

    The longest probe recorded in ``store`` on a device of the same name (:func:`device_name`) for the
    same network trained at the same batch size, else the recorded run it probes (``config.run`` in
    the run records beside ``store``) on such a device: that is its training alone, so a lower bound.
    """
    label = device_name(torch.device(device))
    seen = []
    for path in sorted((store.root / config.run.protocol / "probes").glob("*.json")):
        try:
            r = json.loads(path.read_text())
            run = r["config"]["run"]
            if (r.get("kind") == "probe" and r.get("device") == label and run["net"] == config.run.net
                    and run["bs"] == config.run.bs):
                seen.append(float(r["wall_time_s"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # damaged files are reported where they are read as records
    if seen:
        return max(seen)
    run = ResultStore(store.root).get(config.run)
    if run is not None and run.get("device") == label and isinstance(run.get("wall_time_s"), (int, float)):
        return float(run["wall_time_s"])
    return None


def make_probes(configs: Iterable[ProbeConfig] | None = None, store: ProbeStore | None = None,
                data: str | os.PathLike | None = None, *, train: bool | None = None, device=None,
                num_workers: int | None = None, deadline: float | None = None,
                log: Callable[[str], None] | None = print) -> list[ProbeConfig]:
    """Make the probes that have no record where that is cheap, else say which are missing; return the missing.

    ``configs``: default :func:`probe_configs`. ``train=None`` makes them in smoke mode or
    when a GPU is present and only lists them on a CPU (each trains a full run). Each record
    is written the moment its probe ends; present records are kept (resume), damaged ones
    are reported and redone. ``data``: default the study's data (:func:`normkit.study.study_data`).
    ``deadline`` (a ``time.monotonic()`` value): start no probe projected to end after it
    (:func:`projected_probe_seconds`), nor one whose time nothing tells; those stay missing.
    """
    import torch

    from .data import open_data
    from .study import chapter, sweep_command
    from .study import study_data

    configs = list(dict.fromkeys(configs if configs is not None else probe_configs()))
    store = store or ProbeStore()
    log = log or (lambda s: None)
    missing = store.missing(configs)
    protocols = {c.run.protocol for c in configs}
    smoke = protocols == {"smoke"}
    if train is None:
        train = smoke or torch.cuda.is_available()
    if missing and train:
        source = data if data is not None else study_data(missing[0].run.protocol_obj)[0]
        path, info = open_data(source, {c.run.data for c in missing}, what="probes")
        meta = info.meta
        if not smoke:
            log(f"{len(configs) - len(missing)} of {len(configs)} probes recorded; making {len(missing)} on {info.identity}")
        here = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        for i, c in enumerate(missing, 1):
            if deadline is not None:
                need = projected_probe_seconds(c, store, here)
                if need is None or time.monotonic() + need > deadline:
                    log(f"[probe {i}/{len(missing)}] {c.run.describe()}: not started, "
                        + ("nothing recorded here tells how long it takes" if need is None
                           else f"projected to take {need / 60:.0f} min, past the time limit"))
                    continue
            record = make_probe(c, path, device=device, num_workers=0 if smoke and num_workers is None else num_workers,
                                data_meta=meta)
            store.put(record)
            if not smoke:
                log(f"[probe {i}/{len(missing)}] {c.run.describe()}: {record['status']} in {record['wall_time_s']:.0f}s")
        missing = store.missing(configs)
    if missing:
        log(f"{len(missing)} of {len(configs)} probe records are not recorded yet ({_protocols(configs)}); "
            f"the probe tables and charts show them as missing.\n"
            f"Make them on a GPU (each trains its run again, then measures it) with:\n\n"
            f"    {sweep_command(chapter('small_batch'))}\n")
    else:
        log(f"All {len(configs)} probe records are recorded ({_protocols(configs)}).")
    return missing


def _protocols(configs: list[ProbeConfig]) -> str:
    return "; ".join(sorted({c.run.protocol_obj.describe() for c in configs}))


# ---------------------------------------------------------------------------------------
# Probe records in the book: a table of the train/eval gap, a chart and a table of the statistics


def _unique(configs: Iterable[ProbeConfig] | None) -> list[ProbeConfig]:
    """``configs`` (default :func:`probe_configs`) without repeats, in order."""
    return list(dict.fromkeys(configs if configs is not None else probe_configs()))


def _model_label(run: RunConfig) -> str:
    return f"{run.norm_obj.label}, trained at bs {run.bs}, lr {run.lr:g}"


def probe_frames(configs: Iterable[ProbeConfig] | None = None, store: ProbeStore | None = None
                 ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(probes, stats, gap): one row per probe (net, model, status), per (probe, eval bs, layer), per (probe, eval bs, mode).

    Every row carries its probe's ``key``, which joins the three frames."""
    configs = _unique(configs)
    store = store or ProbeStore()
    probes, stats, gap = [], [], []
    for c, r in store.records(configs).items():
        base = {"key": c.key, "net": NET_TITLES.get(c.run.net, c.run.net), "model": _model_label(c.run), "train_bs": c.run.bs,
                "lr": c.run.lr, "norm": c.run.norm_obj.label, "threshold": c.threshold}
        probes.append(base | {"status": "missing" if r is None else r["status"], "eval_batch_sizes": c.eval_batch_sizes})
        if r is None or r["status"] != "ok":
            continue
        stats += [base | row for row in r["stats"]]
        gap += [base | row for row in r["gap"]]
    cols_s = list(base) + list(_STAT_FIELDS) if configs else []
    return (pd.DataFrame(probes), pd.DataFrame(stats, columns=cols_s or None),
            pd.DataFrame(gap, columns=(list(base) + list(_GAP_FIELDS)) if configs else None))


def _f(v: Any, fmt: str = ".3f") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _network_caption(configs: list[ProbeConfig], network: bool) -> str:
    """The start of a probe table's caption: the network's title for a one-network table
    (``network=False``), else nothing. ValueError if such a table is given two networks."""
    if network or not configs:
        return ""
    nets = list(dict.fromkeys(c.run.net for c in configs))
    if len(nets) > 1:
        raise ValueError(f"network=False needs the probes of one network; these have {', '.join(nets)} "
                         f"(gap_tabs and stats_tabs make one table per network)")
    return f"{NET_TITLES.get(nets[0], nets[0])}: "


def gap_table(configs: Iterable[ProbeConfig] | None = None, store: ProbeStore | None = None, *,
              network: bool = True) -> Table:
    """The train/eval gap of every probed model: validation accuracy and loss with batch
    statistics and with running statistics, at each eval batch size (missing probes as missing).
    ``network=False``: the probes of one network, without the Network column (see :func:`gap_tabs`)."""
    configs = _unique(configs)
    start = _network_caption(configs, network)
    probes, _, gap = probe_frames(configs, store)
    head = ["Network", "Method", "Trained at", "Eval bs", "Accuracy (batch stats)", "Accuracy (running stats)",
            "Difference", "Loss (batch stats)", "Loss (running stats)", "Images"]
    rows, classes = [], []
    for _, p in probes.iterrows():
        for bs in p["eval_batch_sizes"]:
            if p["status"] != "ok":
                rows.append([p["net"], *_trained(p), str(bs)] + [p["status"]] * 5 + ["–"])
                classes.append(f"nk-{p['status']}")
                continue
            g = gap[(gap["key"] == p["key"]) & (gap["eval_bs"] == bs)].set_index("mode")
            b, r = g.loc["batch"], g.loc["running"]
            diff = None if b["accuracy"] is None or r["accuracy"] is None else b["accuracy"] - r["accuracy"]
            rows.append([p["net"], *_trained(p), str(bs), _f(b["accuracy"]), _f(r["accuracy"]), _f(diff, "+.3f"),
                         _f(b["loss"]), _f(r["loss"]), str(int(r["samples"]))])
            classes.append("nk-ok")
    n_done = int((probes["status"] != "missing").sum()) if len(probes) else 0
    protocol = _protocols(configs) if configs else ""
    caption = (f"{start}Train/eval gap: the same trained model on the validation set with batch statistics (as in "
               f"training) and with running statistics (as at inference); {n_done} of {len(configs)} probes "
               f"recorded ({protocol})")
    return _probe_table(head, rows, caption, classes, network)


def stats_table(configs: Iterable[ProbeConfig] | None = None, store: ProbeStore | None = None, *,
                network: bool = True) -> Table:
    """Batch statistics against running statistics, summarised over the BatchNorm layers of each
    probed model and eval batch size: collapse fraction (mean over layers and the worst layer),
    the median over layers of the median variance ratio and of the rms mean shift.
    ``network=False``: the probes of one network, without the Network column (see :func:`stats_tabs`)."""
    configs = _unique(configs)
    start = _network_caption(configs, network)
    probes, stats, _ = probe_frames(configs, store)
    threshold = configs[0].threshold if configs else PROBE_THRESHOLD
    head = ["Network", "Method", "Trained at", "Eval bs", "Layers", "Collapsed (mean over layers)",
            "Collapsed (worst layer)", "Gaussian yardstick (worst layer)", "Var ratio (median)", "Mean shift rms (median)"]
    rows, classes = [], []
    for _, p in probes.iterrows():
        for bs in p["eval_batch_sizes"]:
            if p["status"] != "ok":
                rows.append([p["net"], *_trained(p), str(bs)] + [p["status"]] * 6)
                classes.append(f"nk-{p['status']}")
                continue
            s = stats[(stats["key"] == p["key"]) & (stats["eval_bs"] == bs)]
            worst = s.loc[s["collapsed"].astype(float).idxmax()]
            rows.append([p["net"], *_trained(p), str(bs), str(len(s)), _f(float(s["collapsed"].mean())),
                         f"{_f(worst['collapsed'])} ({worst['layer']})", _f(worst["gaussian_collapsed"]),
                         _f(float(s["var_ratio_median"].median())), _f(float(s["mean_shift_rms"].median()))])
            classes.append("nk-ok")
    n_done = int((probes["status"] != "missing").sum()) if len(probes) else 0
    caption = (f"{start}Batch statistics against running statistics, per BatchNorm layer, summarised; collapsed: "
               f"batch variance below {threshold:g} x the running variance; {n_done} of {len(configs)} probes "
               f"recorded ({_protocols(configs) if configs else ''})")
    return _probe_table(head, rows, caption, classes, network, fold={"Layers": "{} BatchNorm layers in each model"})


def _trained(probe: pd.Series) -> tuple[str, str]:
    """A probe table's method and training cells, e.g. ('batchnorm', 'bs 2, lr 0.001'); the
    latter wraps, if it must, only after its comma (no-break spaces)."""
    return probe["norm"], f"bs\u00a0{probe['train_bs']}, lr\u00a0{probe['lr']:g}"


def _probe_table(head: list[str], rows: list[list[str]], caption: str, classes: list[str], network: bool,
                 fold: dict[str, str] | None = None) -> Table:
    """The table; without its Network column (the first) unless ``network``. Its columns up to
    *Trained at* are words. ``fold``: columns (name -> a caption phrase with ``{}`` for the value)
    that, if the probes made hold one value there, the caption states instead (a narrower table),
    and that are left out while no probe is made."""
    if not network:
        head, rows = head[1:], [r[1:] for r in rows]
    for name, phrase in (fold or {}).items():
        i = head.index(name)
        values = {r[i] for r, c in zip(rows, classes) if c == "nk-ok"}
        if len(values) <= 1:
            caption += f"; {phrase.format(values.pop())}" if values else ""
            head, rows = head[:i] + head[i + 1:], [r[:i] + r[i + 1:] for r in rows]
    return Table(head, rows, caption, classes=classes, text_columns=head.index("Trained at") + 1)


def _tabs(table: Callable[..., Table], configs: Iterable[ProbeConfig] | None, store: ProbeStore | None) -> TableTabs:
    configs = _unique(configs)
    nets = list(dict.fromkeys(c.run.net for c in configs))
    if not nets:
        raise ValueError("no probes to show: configs is empty")
    return TableTabs({NET_TITLES.get(n, n): table([c for c in configs if c.run.net == n], store, network=False)
                      for n in nets})


def gap_tabs(configs: Iterable[ProbeConfig] | None = None, store: ProbeStore | None = None) -> TableTabs:
    """:func:`gap_table` as an ipywidgets ``Tab``: one table per network."""
    return _tabs(gap_table, configs, store)


def stats_tabs(configs: Iterable[ProbeConfig] | None = None, store: ProbeStore | None = None) -> TableTabs:
    """:func:`stats_table` as an ipywidgets ``Tab``: one table per network."""
    return _tabs(stats_table, configs, store)


#: Width of each panel of :func:`stats_chart`: two panels and their axes fit the book's text
#: column (about 650 px; the legend is above them).
PANEL_WIDTH = 200


def stats_chart(configs: Iterable[ProbeConfig] | None = None, store: ProbeStore | None = None):
    """Per BatchNorm layer (x: depth), for each probed model (rows) and eval batch size (colour):
    left, the fraction of collapsed (batch, channel) pairs, with the Gaussian yardstick dashed;
    right, the batch/running variance ratio, median with its 5-95% band (log scale).
    A radio control picks the network; a panel whose probe that network lacks says "not recorded
    yet" (or the probe's status) instead of showing empty axes."""
    import altair as alt

    configs = _unique(configs)
    probes, stats, _ = probe_frames(configs, store)
    n_done = int((probes["status"] == "ok").sum()) if len(probes) else 0
    if not len(stats):
        return _no_data(f"No probe recorded yet (0 of {len(configs)}): the chart appears once they are.")
    stats = stats.copy()
    stats["eval_bs"] = stats["eval_bs"].astype(str)
    threshold = configs[0].threshold
    nets = list(dict.fromkeys(stats["net"]))
    net = _net_selector(nets, name="probe_network")
    x = alt.X("depth:Q", title="BatchNorm layer (input to output)", axis=alt.Axis(tickMinStep=1))
    color = alt.Color("eval_bs:N", title="eval batch size", sort=[str(b) for b in configs[0].eval_batch_sizes],
                      legend=alt.Legend(orient="top"))  # on the right, it pushed the chart past the column
    tip = ["layer", "eval_bs", "n", "batches", alt.Tooltip("collapsed:Q", format=".3f"),
           alt.Tooltip("gaussian_collapsed:Q", format=".3f"), alt.Tooltip("var_ratio_median:Q", format=".3g"),
           alt.Tooltip("mean_shift_rms:Q", format=".3g")]
    # the collapse axis spans at least [0, 0.01]: fractions of 0 and 1e-100 must not fill the panel
    top = max(0.01, float(stats[["collapsed", "gaussian_collapsed"]].max().max()))
    y_collapsed = alt.Y("collapsed:Q", title=f"collapsed (var ratio < {threshold:g})",
                        scale=alt.Scale(domain=[0, top]), axis=alt.Axis(format="~g"))
    # a panel whose probe the chosen network lacks says so, instead of showing empty axes
    absent = probes.loc[probes["status"] != "ok", ["net", "model", "status"]]
    absent = absent.assign(note=["not recorded yet" if st == "missing" else f"probe {st}" for st in absent["status"]])
    rows = []
    for model in dict.fromkeys(stats["model"]):
        base = alt.Chart(stats).transform_filter(alt.datum.net == net).transform_filter(alt.datum.model == model)
        notes = [alt.Chart(absent).transform_filter(alt.datum.net == net).transform_filter(alt.datum.model == model)
                 .mark_text(fontSize=13, color="gray").encode(text="note:N", x=alt.value(PANEL_WIDTH / 2),
                                                              y=alt.value(75))] if len(absent) else []
        collapsed = alt.layer(
            base.mark_line(point=True).encode(x=x, y=y_collapsed, color=color, tooltip=tip),
            base.mark_line(strokeDash=[4, 3], opacity=0.6).encode(x=x, y="gaussian_collapsed:Q", color=color),
            *notes,
        ).properties(width=PANEL_WIDTH, height=150, title=model)
        ratio = alt.layer(
            base.mark_area(opacity=0.25).encode(
                x=x, y=alt.Y("var_ratio_p05:Q", scale=alt.Scale(type="log"), title="batch var / running var"),
                y2="var_ratio_p95:Q", color=color),
            base.mark_line(point=True).encode(x=x, y="var_ratio_median:Q", color=color, tooltip=tip),
            *notes,
        ).properties(width=PANEL_WIDTH, height=150)
        rows.append(alt.hconcat(collapsed, ratio))
    return alt.vconcat(*rows).add_params(net).properties(
        title=f"{n_done} of {len(configs)} probes recorded; dashed: i.i.d. Gaussian values; band: 5-95% of batches")

