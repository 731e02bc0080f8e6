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

import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from timm.layers import EvoNorm2dB0
from torch import nn

from .norms import BatchRenorm2d, RunningBatchNorm2d

__all__ = [
    "BATCHNORM_LAYERS", "BATCH_STAT_LAYERS", "batch_statistics_mode", "batch_stats", "population_stats",
    "running_stats", "summarise_batch_stats", "gaussian_collapse_fraction", "train_eval_gap", "eps_bound",
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
        with batch_statistics_mode(model, layer_types=BATCH_STAT_LAYERS if train_mode else ()), torch.no_grad():
            for batch in batches:
                if max_batches is not None and batch_idx >= max_batches:
                    break
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
    was_training = model.training
    with torch.no_grad():
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            model.eval()
            outputs = {"running": model(x)}
            with batch_statistics_mode(model, layer_types):
                outputs["batch"] = model(x)
            for mode, out in outputs.items():
                t = totals[mode]
                t[0] += float(loss_fn(out, y)) * len(y)
                t[1] += int((out.argmax(dim=1) == y).sum())
                t[2] += len(y)
    model.train(was_training)
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
