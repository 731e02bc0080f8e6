"""The study's tables, from run records.

Each cell of a table is one (normalisation, batch size, learning rate) combination: the
mean ± sample standard deviation (ddof=1) over seeds of the final-epoch validation
accuracy and loss. The best cell (highest mean accuracy among cells whose runs are all
recorded and none diverged) is in bold. Missing runs show as missing, diverged runs as
diverged; neither is averaged in. A run that ended at chance (:func:`at_chance`: it learned
nothing) is averaged in, and its cell says so.

>>> tabs(chapter("batchnorm"))       # an ipywidgets Tab: one table per network
>>> compare(chapter("batchnorm"), reference=chapter("baseline"))   # each cell against the baseline's
"""

from __future__ import annotations

import html
import math
import os
import statistics
import textwrap
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

try:
    import ipywidgets as widgets

    _Tab = widgets.Tab
except ImportError:  # a machine that only trains (a bare GPU box): tables, findings and comparisons still work
    widgets = None
    _Tab = object

from .models import NET_TITLES
from .runs import ResultStore, RunConfig, default_results_dir, graphed, how_made, pack_size, run_seconds

__all__ = ["Cell", "Table", "TableTabs", "results_table", "summarize", "table_html", "table_text", "tabs", "findings",
           "at_chance", "CHANCE_ACCURACY", "CHANCE_LOSS", "differences", "compare", "compare_findings",
           "batch_size_changes", "batch_size_tabs", "RESOLVE_SE",
           "provenance", "run_costs", "benchmark_folder", "write_benchmark", "step_times", "step_time_tables", "sweep_benchmarks",
           "sweep_benchmark_tables", "TARGET_SPEEDUP", "TARGET_GRID_MIN", "runs_frame", "accuracy_chart", "eps_chart", "curves_frame",
           "curves_chart"]


#: :func:`at_chance`'s bounds: an accuracy under ``CHANCE_ACCURACY / K`` and a validation loss
#: within ``CHANCE_LOSS`` (a fraction) of ln K, for K classes.
CHANCE_ACCURACY, CHANCE_LOSS = 1.5, 0.01


def at_chance(record: dict[str, Any]) -> bool:
    """Whether a finished run ended at chance: its final validation accuracy is under
    ``CHANCE_ACCURACY / K`` and its validation loss within ``CHANCE_LOSS * ln K`` of ln K, for the
    K classes of its data (``record["data_source"]["n_classes"]``). A network that gives every
    image the same uniform prediction scores 1/K and ln K: it has learned nothing. The loss alone
    does not tell, since an over-confident network that learned can also lose more than ln K;
    a record that does not name K is not judged (False)."""
    k = (record.get("data_source") or {}).get("n_classes")
    final = record.get("final") or {}
    if record.get("status") != "ok" or not isinstance(k, int) or k < 2 or not final:
        return False
    return (final["accuracy"] < CHANCE_ACCURACY / k
            and abs(final["valid_loss"] - math.log(k)) <= CHANCE_LOSS * math.log(k))


@dataclass(frozen=True)
class Cell:
    """The runs of one table cell, summarised."""

    n_runs: int
    n_recorded: int
    n_diverged: int
    acc_mean: float | None
    acc_std: float | None
    loss_mean: float | None
    loss_std: float | None
    n_chance: int = 0  #: runs that ended at chance (:func:`at_chance`), averaged in with the others

    @property
    def n_ok(self) -> int:
        return self.n_recorded - self.n_diverged

    @property
    def complete(self) -> bool:
        return self.n_recorded == self.n_runs and self.n_diverged == 0

    @property
    def status(self) -> str:
        """``ok``, ``partial`` (some runs missing), ``diverged`` (some diverged) or ``missing``."""
        if self.n_recorded == 0:
            return "missing"
        if self.n_diverged:
            return "diverged"
        return "ok" if self.n_recorded == self.n_runs else "partial"

    @classmethod
    def of(cls, records: list[dict[str, Any] | None]) -> "Cell":
        done = [r for r in records if r is not None]
        ok = [r for r in done if r["status"] == "ok"]
        acc = [r["final"]["accuracy"] for r in ok]
        loss = [r["final"]["valid_loss"] for r in ok]
        return cls(len(records), len(done), len(done) - len(ok), *_mean_std(acc), *_mean_std(loss),
                   n_chance=sum(map(at_chance, ok)))


def _mean_std(xs: list[float]) -> tuple[float | None, float | None]:
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def summarize(configs: Iterable[RunConfig], store: ResultStore | None = None) -> pd.DataFrame:
    """One row per (net, norm, bs, lr) with its :class:`Cell` statistics, in grid order."""
    store = store or ResultStore()
    groups: dict[tuple, list[dict[str, Any] | None]] = {}
    for config, record in store.records(configs).items():
        groups.setdefault((config.net, config.norm_obj.label, config.bs, config.lr), []).append(record)
    rows = []
    for (net, norm, bs, lr), records in groups.items():
        cell = Cell.of(records)
        rows.append({"net": net, "norm": norm, "bs": bs, "lr": lr, "status": cell.status, "n_runs": cell.n_runs,
                     "n_recorded": cell.n_recorded, "n_diverged": cell.n_diverged,
                     "acc_mean": cell.acc_mean, "acc_std": cell.acc_std,
                     "loss_mean": cell.loss_mean, "loss_std": cell.loss_std, "n_chance": cell.n_chance, "cell": cell})
    return pd.DataFrame(rows)


def _fmt(mean: float | None, std: float | None) -> str:
    """``mean ± std`` to 3 decimals; a spread that would round to 0.000 keeps one significant
    digit (``0.686 ± 0.0004``), so that only identical runs read ``± 0.000``."""
    if mean is None or not math.isfinite(mean):
        return "–"
    if std is None:
        return f"{mean:.3f}"
    if 0 < std < 0.0005:
        return f"{mean:.3f} ± {std:.{-math.floor(math.log10(std))}f}"
    return f"{mean:.3f} ± {std:.3f}"


def _cell_texts(cell: Cell) -> tuple[str, str, str]:
    """(accuracy text, loss text, note) for one cell."""
    if cell.status == "missing":
        return "missing", "missing", ""
    acc, loss = _fmt(cell.acc_mean, cell.acc_std), _fmt(cell.loss_mean, cell.loss_std)
    notes = []
    if cell.n_diverged == cell.n_recorded:
        acc = loss = "diverged"
    if cell.n_diverged:
        notes.append(f"{cell.n_diverged}/{cell.n_runs} diverged")
    if cell.n_chance:
        notes.append(f"{cell.n_chance}/{cell.n_runs} at chance")
    if cell.n_recorded < cell.n_runs:
        notes.append(f"{cell.n_runs - cell.n_recorded}/{cell.n_runs} missing")
    return acc, loss, "; ".join(notes)


class Table:
    """A table whose HTML and plain-text forms hold the same rows: the book shows the HTML,
    nbval compares the text.

    ``strong`` cells are bold in HTML and marked ``*`` in text; ``text_head`` gives the text
    form shorter column names. The first ``text_columns`` columns hold words and are aligned
    left in HTML; the others hold figures and are aligned right. ``wrap_last``: the last column's
    cells (a count and its notes) may wrap in HTML where the table needs the room; figures never do.
    """

    def __init__(self, head: list[str], rows: list[list[str]], caption: str = "", *,
                 classes: list[str] | None = None, strong: Iterable[tuple[int, int]] = (),
                 text_head: list[str] | None = None, text_columns: int = 1, wrap_last: bool = False):
        self.head, self.rows, self.caption = head, rows, caption
        self.classes, self.strong, self.text_head = classes, set(strong), text_head or head
        self.text_columns, self.wrap_last = text_columns, wrap_last

    @property
    def html(self) -> str:
        def cell(tag: str, j: int, content: str) -> str:  # the first column is aligned left by the CSS
            if 0 < j < self.text_columns:
                return f'<{tag} class="nk-text">{content}</{tag}>'
            if self.wrap_last and tag == "td" and j == len(self.head) - 1:
                return f'<{tag} class="nk-wrap">{content}</{tag}>'
            return f"<{tag}>{content}</{tag}>"

        out = ['<table class="normkit-table">']
        if self.caption:
            out.append(f"<caption>{html.escape(self.caption)}</caption>")
        out.append("<thead><tr>" + "".join(cell("th", j, html.escape(h)) for j, h in enumerate(self.head))
                   + "</tr></thead><tbody>")
        for i, row in enumerate(self.rows):
            cls = f' class="{self.classes[i]}"' if self.classes else ""
            tds = [f"<strong>{html.escape(t)}</strong>" if (i, j) in self.strong else html.escape(t) for j, t in enumerate(row)]
            out.append(f"<tr{cls}>" + "".join(cell("td", j, t) for j, t in enumerate(tds)) + "</tr>")
        out.append("</tbody></table>")
        return "".join(out)

    @property
    def text(self) -> str:
        body = [[t + "*" if (i, j) in self.strong else t for j, t in enumerate(row)] for i, row in enumerate(self.rows)]
        widths = [max(len(r[i]) for r in [self.text_head] + body) for i in range(len(self.text_head))]
        lines = [self.caption] if self.caption else []
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [self.text_head] + body]
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        return self.html

    def __repr__(self) -> str:
        return self.text


def results_table(frame: pd.DataFrame, caption: str = "") -> Table:
    """The table of a :func:`summarize` frame for one network (one row per cell)."""
    if frame["net"].nunique() > 1:
        raise ValueError(f"table_html takes one network, got {', '.join(frame['net'].unique())}")
    show_norm = frame["norm"].nunique() > 1
    eligible = frame[[c.complete for c in frame["cell"]]]
    best = eligible["acc_mean"].idxmax() if len(eligible) else None
    head = (["Normalisation"] if show_norm else []) + ["Batch size", "Learning rate", "Validation accuracy", "Validation loss", "Runs"]
    text_head = (["norm"] if show_norm else []) + ["bs", "lr", "valid accuracy", "valid loss", "runs"]
    rows, classes, strong = [], [], set()
    for i, (idx, row) in enumerate(frame.iterrows()):
        cell: Cell = row["cell"]
        acc, loss, note = _cell_texts(cell)
        runs = f"{cell.n_recorded}/{cell.n_runs}" + (f" ({note})" if note else "")
        rows.append(([row["norm"]] if show_norm else []) + [str(row["bs"]), f"{row['lr']:g}", acc, loss, runs])
        classes.append(f"nk-{cell.status}" + (" nk-best" if idx == best else ""))
        if idx == best:
            strong |= {(i, len(rows[-1]) - 3), (i, len(rows[-1]) - 2)}
    return Table(head, rows, caption, classes=classes, strong=strong, text_head=text_head, wrap_last=True)


def table_html(frame: pd.DataFrame, caption: str = "") -> str:
    """An HTML table of a :func:`summarize` frame for one network (one row per cell)."""
    return results_table(frame, caption).html


def table_text(frame: pd.DataFrame, title: str = "") -> str:
    """A plain-text version of :func:`table_html` (the best cell marked with ``*``)."""
    return results_table(frame, title).text


def _title(net: str, frame: pd.DataFrame) -> str:
    """``CNN`` or, when every row has the same normalisation, ``CNN, groupnorm``."""
    norms = frame["norm"].unique()
    return NET_TITLES.get(net, net) + (f", {norms[0]}" if len(norms) == 1 else "")


def _frame(grids, store: ResultStore | None) -> pd.DataFrame:
    from .study import grid_configs

    return summarize(grid_configs(grids), store)


def tabs(*grids, store: ResultStore | None = None):
    """An ipywidgets ``Tab`` with one table per network of the grids (:class:`~normkit.study.Grid`).

    Several grids make one table per network with a row per (norm, batch size, lr).
    """
    if not grids:
        raise ValueError("tabs needs at least one grid")
    frame = _frame(grids, store)
    nets = list(dict.fromkeys(frame["net"]))
    seeds = sorted({s for g in grids for s in g.seeds})
    tables = {}
    for net in nets:
        sub = frame[frame["net"] == net]
        cap = (f"{_title(net, sub)}: mean ± std over {len(seeds)} seeds of the final-epoch validation metrics "
               f"({grids[0].protocol.describe()})")
        tables[NET_TITLES.get(net, net)] = results_table(sub, cap)
    return TableTabs(tables)


class TableTabs(_Tab):
    """An ipywidgets ``Tab`` of tables whose plain-text and HTML forms hold every table in full.

    Jupyter and the book show the tabs; the full text and HTML are what nbval compares and
    what renderers without widget support show.
    """

    def __init__(self, tables: dict[str, Table]):
        """``tables``: tab title -> its :class:`Table`, in tab order."""
        if widgets is None:
            raise ImportError("normkit.report's tabs need ipywidgets (pip install ipywidgets); its tables, "
                              "findings and comparisons do not")
        super().__init__(children=[widgets.HTML(t.html) for t in tables.values()], titles=list(tables))
        self._tables = dict(tables)

    def _repr_mimebundle_(self, **kwargs):
        bundle = dict(super()._repr_mimebundle_(**kwargs) or {})
        bundle["text/plain"] = "\n\n".join(t.text for t in self._tables.values())
        bundle["text/html"] = "".join(f"<h4>{html.escape(title)}</h4>{t.html}" for title, t in self._tables.items())
        return bundle


def findings(*grids, store: ResultStore | None = None) -> str:
    """What the recorded runs of the grids show, in sentences computed from the records.

    Chapters print this under their tables, so that no number in the prose is typed by hand.
    """
    frame = _frame(grids, store)
    lines = []
    for net in dict.fromkeys(frame["net"]):
        sub = frame[frame["net"] == net]
        title = _title(net, sub)
        missing = int((sub["n_runs"] - sub["n_recorded"]).sum())
        if missing == sub["n_runs"].sum():
            lines.append(f"{title}: no runs recorded yet, nothing to compare.")
            continue
        parts = []
        if missing:
            parts.append(f"{missing} of {int(sub['n_runs'].sum())} runs still missing")
        div = sub[sub["n_diverged"] > 0]
        for _, r in div.iterrows():
            parts.append(f"{r['norm']} at bs {r['bs']}, lr {r['lr']:g} diverged in {r['n_diverged']} of {r['n_runs']} runs")
        label = lambda r: (f"{r['norm']}, " if sub["norm"].nunique() > 1 else "") + f"bs {r['bs']}, lr {r['lr']:g}"
        chance = sub[sub["n_chance"] > 0]
        if len(chance):
            parts.append("runs that ended at chance, having learned nothing: " + " and ".join(
                f"{r['n_chance']} of {r['n_runs']} at {label(r)}" for _, r in chance.iterrows()))
        done = sub[[c.complete for c in sub["cell"]]]
        if len(done):
            best = done.loc[done["acc_mean"].idxmax()]
            worst = done.loc[done["acc_mean"].idxmin()]
            if len(done) == 1:  # nothing to rank yet
                parts.insert(0, f"only {label(best)} complete ({_fmt(best['acc_mean'], best['acc_std'])} accuracy)")
            else:
                parts.insert(0, f"best {label(best)} ({_fmt(best['acc_mean'], best['acc_std'])} accuracy), "
                                f"worst {label(worst)} ({_fmt(worst['acc_mean'], worst['acc_std'])})")
        lines.append(f"{title}: " + "; ".join(parts) + ".")
    return _wrap(lines)


#: A difference of means counts as resolved when it exceeds this many standard errors.
RESOLVE_SE = 2.0


def _verdict(delta: float, se: float) -> str:
    """``better``/``worse`` when ``|delta| > RESOLVE_SE x se``, else ``within noise``."""
    return "within noise" if abs(delta) <= RESOLVE_SE * se else "better" if delta > 0 else "worse"


def _difference(a: Cell, b: Cell) -> tuple[float | None, float | None, str]:
    """(mean accuracy of ``a`` minus ``b``'s, its standard error, verdict); no difference, and the
    verdict ``diverged`` or ``missing runs``, unless both cells are complete."""
    if a.n_diverged or b.n_diverged:
        return None, None, "diverged"
    if not (a.complete and b.complete):
        return None, None, "missing runs"
    delta = a.acc_mean - b.acc_mean
    se = math.sqrt(((a.acc_std or 0.0) ** 2) / a.n_ok + ((b.acc_std or 0.0) ** 2) / b.n_ok)
    return delta, se, _verdict(delta, se)


def _reference_label(reference) -> str:
    """The one normalisation label of a reference grid; a one-line error if it has several."""
    labels = list(dict.fromkeys(n.label for n in reference.norms))
    if len(labels) != 1:
        raise ValueError(f"reference grid {reference.name!r} has {len(labels)} normalisations "
                         f"({', '.join(labels)}); compare against one, e.g. reference.subset(norms=[{labels[0]!r}])")
    return labels[0]


def differences(*grids, reference, store: ResultStore | None = None, reference_store: ResultStore | None = None,
                reference_label: str | None = None) -> pd.DataFrame:
    """Each cell of the grids against the same (network, batch size, lr) cell of ``reference``.

    ``reference``: a grid with one normalisation (e.g. ``chapter("batchnorm")``); rows of the
    grids with that normalisation are left out, unless ``reference_store`` reads the reference's
    records from another store (the same runs made another way, e.g. on the plain data path).
    ``reference_label`` names the reference in tables (default: its normalisation).

    One row per compared cell, with both cells' :class:`Cell`, ``delta`` = mean accuracy minus
    the reference's, ``se`` its standard error from the seeds' spreads, sqrt(s²/n + s_ref²/n_ref),
    and ``verdict``: ``better`` or ``worse`` when ``|delta| > RESOLVE_SE x se``, ``within noise``
    otherwise; ``missing runs`` or ``diverged`` (delta NaN) when either cell is not complete.
    """
    ref_label = _reference_label(reference)
    if not grids:
        raise ValueError("differences needs at least one grid to compare with the reference")
    frame = _frame(grids, store)
    if reference_store is None:
        frame = frame[frame["norm"] != ref_label]
    ref = _frame([reference], reference_store or store).set_index(["net", "bs", "lr"])
    rows = []
    for _, row in frame.iterrows():
        key = (row["net"], row["bs"], row["lr"])
        if key not in ref.index:
            continue
        a: Cell = row["cell"]
        b: Cell = ref.loc[key, "cell"]
        delta, se, verdict = _difference(a, b)
        rows.append({"net": row["net"], "norm": row["norm"], "bs": row["bs"], "lr": row["lr"],
                     "reference": reference_label or ref_label, "cell": a, "ref_cell": b, "delta": delta, "se": se, "verdict": verdict})
    return pd.DataFrame(rows, columns=["net", "norm", "bs", "lr", "reference", "cell", "ref_cell", "delta", "se", "verdict"])


def _fmt_signed(delta: float) -> str:
    """``+0.012`` / ``-0.012``; a difference that rounds to zero is ``0.000``, not ``-0.000``."""
    return "0.000" if abs(delta) < 0.0005 else f"{delta:+.3f}"


def _fmt_delta(delta: float | None, se: float | None) -> str:
    if delta is None or pd.isna(delta):
        return "–"
    return f"{_fmt_signed(delta)} ± {se:.3f}"


def _mean_text(cell: Cell, spread: bool = False) -> str:
    """A cell's mean accuracy for a comparison: ``0.689`` (``0.689 ± 0.012`` with the seeds'
    standard deviation if ``spread``), ``0.451 (1/3)`` while runs are missing, ``1/3 diverged``
    or ``missing`` (otherwise the spreads are in the chapters' tables and in the SE)."""
    if cell.n_recorded == 0:
        return "missing"
    if cell.n_diverged:
        return f"{cell.n_diverged}/{cell.n_runs} diverged"
    text = _fmt(cell.acc_mean, cell.acc_std) if spread else f"{cell.acc_mean:.3f}"
    return text + ("" if cell.n_recorded == cell.n_runs else f" ({cell.n_recorded}/{cell.n_runs})")


def compare(*grids, reference, store: ResultStore | None = None, reference_store: ResultStore | None = None,
            reference_label: str | None = None, label: str | None = None, spread: bool = False):
    """An ipywidgets ``Tab`` (one table per network) of :func:`differences` (same arguments): each
    cell's accuracy beside the reference's, their difference ± its standard error, and the verdict.
    ``label`` heads the compared runs' column (default "Accuracy"), as ``reference_label`` the
    reference's. ``spread``: show each side's mean ± the seeds' standard deviation, not the mean alone."""
    diff = differences(*grids, reference=reference, store=store, reference_store=reference_store,
                       reference_label=reference_label)
    if not len(diff):
        raise ValueError(f"nothing to compare: the grids share no (network, batch size, lr) cell with "
                         f"{reference.name!r}" + ("" if reference_store else " outside its own normalisation"))
    ref = diff["reference"].iloc[0]
    tables = {}
    for net in dict.fromkeys(diff["net"]):
        sub = diff[diff["net"] == net]
        show_norm = sub["norm"].nunique() > 1
        rows, classes = [], []
        for _, r in sub.iterrows():
            rows.append(([r["norm"]] if show_norm else []) + [
                str(r["bs"]), f"{r['lr']:g}", _mean_text(r["cell"], spread), _mean_text(r["ref_cell"], spread),
                _fmt_delta(r["delta"], r["se"]), r["verdict"]])
            classes.append("nk-" + r["verdict"].replace(" ", "-"))
        head = (["Normalisation"] if show_norm else []) + ["Batch size", "Learning rate", label or "Accuracy", ref,
                                                           "Difference ± SE", "Verdict"]
        text_head = (["norm"] if show_norm else []) + ["bs", "lr", label or "accuracy", ref, "diff ± se", "verdict"]
        what = (f"validation accuracy of each cell and of {ref}'s, mean ± standard deviation over seeds; the "
                f"difference of the means" if spread else
                f"mean validation accuracy over seeds of each cell and of {ref}'s, their difference")
        cap = (f"{_title(net, sub)} against {ref}: {what} ± its standard error; 'better' or 'worse' beyond "
               f"{RESOLVE_SE:g} standard errors")
        tables[NET_TITLES.get(net, net)] = Table(head, rows, cap, classes=classes, text_head=text_head)
    return TableTabs(tables)


def compare_findings(*grids, reference, store: ResultStore | None = None, reference_store: ResultStore | None = None,
                     reference_label: str | None = None) -> str:
    """:func:`differences` (same arguments) in sentences, one per network and normalisation, computed
    from the records; the normalisations with no complete cell to compare yet share one sentence per network."""
    diff = differences(*grids, reference=reference, store=store, reference_store=reference_store,
                       reference_label=reference_label)
    lines = []
    for net, by_net in diff.groupby("net", sort=False):
        ref, waiting = by_net["reference"].iloc[0], []
        for norm, sub in by_net.groupby("norm", sort=False):
            if (sub["verdict"] == "missing runs").all():
                waiting.append(norm)
                continue
            parts = []
            for verdict in ("better", "worse", "within noise", "diverged", "missing runs"):
                cells = sub[sub["verdict"] == verdict]
                if len(cells):
                    where = ", ".join(f"bs {r['bs']} lr {r['lr']:g}" + (f" {_fmt_signed(r['delta'])}" if pd.notna(r["delta"]) else "")
                                      for _, r in cells.iterrows())
                    parts.append(f"{verdict} in {len(cells)} of {len(sub)} cells ({where})")
            lines.append(f"{NET_TITLES.get(net, net)}, {norm} against {ref}: " + "; ".join(parts) + ".")
        if waiting:
            lines.append(f"{NET_TITLES.get(net, net)}: nothing to compare with {ref} yet for {', '.join(waiting)} "
                         f"(runs missing).")
    return _wrap(lines)


def batch_size_changes(*grids, reference=None, store: ResultStore | None = None, large: int = 128,
                       small: int = 2) -> pd.DataFrame:
    """What going from batch size ``large`` to ``small`` does to each method, at each learning rate.

    One row per (network, normalisation, lr) whose grid has both batch sizes: ``change`` = mean
    accuracy at ``small`` minus at ``large``, ± ``se`` (from both cells' seed spreads). With
    ``reference`` (a grid with one normalisation, e.g. the baseline, whose change measures what
    the optimisation alone does at the small batch), ``vs_ref`` = change minus the reference's
    change at the same lr, ± ``vs_ref_se``, and ``verdict``: ``better`` or ``worse`` (the method
    fares better or worse at the small batch than the reference does) beyond ``RESOLVE_SE``
    standard errors, else ``within noise``; ``missing runs`` or ``diverged`` where a cell of
    either is not complete.
    """
    from .study import grid_configs

    if not grids:
        raise ValueError("batch_size_changes needs at least one grid")
    ref_label = None if reference is None else _reference_label(reference)
    frame = _frame(grids + ((reference,) if reference is not None else ()), store)
    cells = {(r["net"], r["norm"], r["lr"], r["bs"]): r["cell"] for _, r in frame.iterrows()}
    rows = []
    for (net, norm, lr) in dict.fromkeys((c.net, c.norm_obj.label, c.lr) for c in grid_configs(grids)):
        if norm == ref_label or (net, norm, lr, large) not in cells or (net, norm, lr, small) not in cells:
            continue
        at_large, at_small = cells[(net, norm, lr, large)], cells[(net, norm, lr, small)]
        change, se, status = _difference(at_small, at_large)
        row = {"net": net, "norm": norm, "lr": lr, "large": at_large, "small": at_small, "change": change, "se": se,
               "reference": ref_label, "ref_change": None, "vs_ref": None, "vs_ref_se": None,
               "verdict": status if change is None else ""}
        if ref_label is not None:
            if (net, ref_label, lr, large) not in cells or (net, ref_label, lr, small) not in cells:
                continue
            ref_change, ref_se, ref_status = _difference(cells[(net, ref_label, lr, small)], cells[(net, ref_label, lr, large)])
            row["ref_change"] = ref_change
            if change is None or ref_change is None:
                row["verdict"] = status if change is None else ref_status
            else:
                row["vs_ref"], row["vs_ref_se"] = change - ref_change, math.hypot(se, ref_se)
                row["verdict"] = _verdict(row["vs_ref"], row["vs_ref_se"])
        rows.append(row)
    return pd.DataFrame(rows, columns=["net", "norm", "lr", "large", "small", "change", "se", "reference", "ref_change",
                                       "vs_ref", "vs_ref_se", "verdict"])


def batch_size_tabs(*grids, reference=None, store: ResultStore | None = None, large: int = 128, small: int = 2):
    """An ipywidgets ``Tab`` (one table per network) of :func:`batch_size_changes` (same arguments)."""
    diff = batch_size_changes(*grids, reference=reference, store=store, large=large, small=small)
    if not len(diff):
        raise ValueError(f"nothing to compare: no normalisation of the grids has both batch sizes {large} and {small}")
    ref = diff["reference"].iloc[0]
    tables = {}
    for net in dict.fromkeys(diff["net"]):
        sub = diff[diff["net"] == net]
        rows, classes = [], []
        for _, r in sub.iterrows():
            # against a reference the accuracies themselves are left to the tables without one (width)
            row = [r["norm"], f"{r['lr']:g}"] + ([] if ref is not None else [_mean_text(r["large"]), _mean_text(r["small"])])
            row.append(_fmt_delta(r["change"], r["se"]))
            if ref is not None:
                ref_change = "–" if r["ref_change"] is None or pd.isna(r["ref_change"]) else _fmt_signed(r["ref_change"])
                row += [ref_change, _fmt_delta(r["vs_ref"], r["vs_ref_se"]), r["verdict"]]
            rows.append(row)
            classes.append("nk-" + (r["verdict"] or "ok").replace(" ", "-"))
        accs = [] if ref is not None else [f"bs {large}", f"bs {small}"]
        head = ["Normalisation", "Learning rate"] + accs + [f"Change {large} → {small} ± SE"]
        text_head = ["norm", "lr"] + accs + ["change ± se"]
        if ref is None:
            cap = (f"{NET_TITLES.get(net, net)}: mean validation accuracy over seeds at batch size {large} and "
                   f"{small}, and the change ± its standard error")
        else:
            head += [f"{ref}'s change", "Difference ± SE", "Verdict"]
            text_head += [f"{ref} change", "diff ± se", "verdict"]
            cap = (f"{NET_TITLES.get(net, net)}: change of the mean validation accuracy from batch size {large} "
                   f"to {small} ± its standard error, against {ref}'s change at the same learning rate: 'better' or "
                   f"'worse' at batch size {small} beyond {RESOLVE_SE:g} standard errors")
        tables[NET_TITLES.get(net, net)] = Table(head, rows, cap, classes=classes, text_head=text_head)
    return TableTabs(tables)


#: Characters of printed output the book's column holds in a 1280-pixel-wide window (the book's
#: CSS wraps anything longer at the column's edge, which breaks a printed table's columns).
OUTPUT_COLUMN = 77
#: Printed sentences wrap at this width, within :data:`OUTPUT_COLUMN`.
TEXT_WIDTH = OUTPUT_COLUMN - 1


def _wrap(sentences: list[str]) -> str:
    """One sentence per line, each wrapped at :data:`TEXT_WIDTH` with its continuation indented."""
    return "\n".join(textwrap.fill(s, TEXT_WIDTH, subsequent_indent="  ", break_on_hyphens=False) for s in sentences)


def provenance(configs: Iterable[RunConfig], store: ResultStore | None = None, *, label: str | None = None) -> str:
    """Where a set of runs' numbers came from: devices, dates, commits, versions, total time,
    wrapped at :data:`TEXT_WIDTH`; ``label`` starts it (e.g. which data path's runs they are)."""
    configs = list(configs)
    records = [r for r in (store or ResultStore()).records(configs).values() if r is not None]
    start = f"{label}: " if label else ""
    if not records:
        return f"{start}No runs recorded yet (0 of {len(configs)})."
    # a run resumed from a checkpoint (normkit.runs.Checkpoints) was made in parts, each with its own
    # device, date, commit and versions: every part counts
    parts = [p for r in records for p in [r, *((r.get("settings") or {}).get("resumed") or [])]]
    devices = sorted({p["device"] for p in parts})
    dates = sorted(p["date"] for p in parts)
    commits = sorted({_commit_label(p["commit"]) for p in parts})
    torch_v = sorted({p["versions"]["torch"] for p in parts})
    fastai_v = sorted({p["versions"]["fastai"] for p in parts})
    hours = sum(run_seconds(r) for r in records) / 3600
    packed, n_graphed = sum(pack_size(r) > 1 for r in records), sum(map(graphed, records))
    resumed = sum(bool((r.get("settings") or {}).get("resumed")) for r in records)
    flushed = Counter(str((r.get("settings") or {}).get("flush_denormals")) for r in records)
    how = ([f"{packed} of them trained in packs of several runs, each counted for its share of its pack's time"]
           if packed else []) + ([f"{n_graphed} with the network replayed from CUDA graphs"] if n_graphed else []) + (
           [f"{resumed} stopped and resumed from a checkpoint, the same run to the bit, its parts' times summed"]
           if resumed else []) + (
           [f"{flushed['True']} with float32 denormals flushed to zero on the CPU, which is faster late in a run "
            "and leaves Adam's steps as they were"] if flushed["True"] else []) + (
           [f"{flushed['partly']} with denormals flushed on some CPU threads only"] if flushed["partly"] else [])
    packs = f" ({'; '.join(how)})" if how else ""
    return _wrap([f"{start}{len(records)} of {len(configs)} runs recorded on {'; '.join(devices)}, "
                  f"{dates[0][:10]} to {dates[-1][:10]}, normkit commit(s) {', '.join(commits)}, "
                  f"torch {', '.join(torch_v)}, fastai {', '.join(fastai_v)}; "
                  f"{f'{hours:.2f} h' if hours >= 0.1 else f'{hours * 60:.1f} min'} of training in total{packs}."])


def run_costs(configs: Iterable[RunConfig], store: ResultStore | Iterable[ResultStore] | None = None) -> pd.DataFrame:
    """What the recorded runs of ``configs`` took, in ``store`` (or in each of several stores, e.g.
    the study's and the plain path's): one row per (hardware, network, batch size, how they were
    made, runs at once), from each record's own wall and CPU time.

    Columns: how many runs; the median and the range of their minutes (a run trained in a pack
    counts for its share of its pack's time) and the method of the longest; the runs an hour at
    the median pace with that many at once; and the cores they kept busy (CPU seconds over wall
    seconds, median, over the records that have ``cpu_time_s``; "–" if none has). A sweep's
    workers count as "at once"; a run whose machine also ran something else kept fewer cores
    busy than it had threads, which the last column shows. Diverged runs, cut short, are left out.
    """
    configs = list(configs)
    stores = [ResultStore()] if store is None else [store] if isinstance(store, ResultStore) else list(store)
    rows = []
    for c, r in ((c, r) for st in stores for c, r in st.records(configs).items()):
        if r is None or r.get("status") != "ok":
            continue
        device, made, workers = how_made(r)
        cpu = r.get("cpu_time_s")
        rows.append({"hardware": device, "network": NET_TITLES.get(c.net, c.net), "batch size": c.bs, "made": made,
                     "at once": workers, "minutes": run_seconds(r) / 60, "method": c.norm_obj.label,
                     "cores": cpu / r["wall_time_s"] if cpu is not None and r["wall_time_s"] else math.nan})
    index = ["hardware", "network", "batch size", "made", "at once"]
    columns = ["runs", "minutes (median)", "minutes (range)", "longest", "runs an hour", "cores busy"]
    if not rows:
        return pd.DataFrame(columns=index + columns).set_index(index)
    frame = pd.DataFrame(rows)
    groups = frame.groupby(index, sort=False)
    out = groups.agg(runs=("minutes", "size"), median=("minutes", "median"), low=("minutes", "min"),
                     high=("minutes", "max"), cores=("cores", "median"))
    out["longest"] = frame.loc[groups["minutes"].idxmax(), "method"].to_numpy()
    out = out.sort_index(level=["hardware", "network", "batch size", "made", "at once"],
                         ascending=[True, True, False, True, True])
    return pd.DataFrame({
        "runs": out["runs"],
        "minutes (median)": out["median"].round(1),
        "minutes (range)": [f"{lo:.1f}–{hi:.1f}" for lo, hi in zip(out["low"], out["high"])],
        "longest": out["longest"],
        "runs an hour": (out.index.get_level_values("at once") * 60 / out["median"]).round(1),
        "cores busy": ["–" if math.isnan(x) else f"{x:.2f}" for x in out["cores"]],
    }, index=out.index)


def write_benchmark(folder: str | os.PathLike, kind: str, record: dict[str, Any]) -> Path:
    """Write a benchmark's ``record`` (what it measured and how) as ``folder/<kind>-<date>-<hash>.json``,
    with its kind, the date, library versions and normkit commit added; the file's path. The
    benchmark scripts' ``--record DIR`` (``tests/benchmarks/``); :func:`step_times` and
    :func:`sweep_benchmarks` read them back."""
    import datetime as dt
    import hashlib
    import json

    from .runs import environment

    record = {"kind": kind, "format": 1, **record,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **environment()}
    text = json.dumps(record, indent=1, sort_keys=True)
    path = Path(folder) / f"{kind}-{record['date'][:10]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def benchmark_folder(folder: str | os.PathLike) -> Path:
    """``folder``, made if missing, once it is known to be writable: a benchmark script checks its
    ``--record DIR`` before it measures, not after. ValueError (one line) if it cannot be."""
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--record {str(folder)!r}: cannot make the folder ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"--record {str(folder)!r}: the folder is not writable")
    return path


def _benchmarks(folder: str | os.PathLike | None, kind: str) -> list[dict[str, Any]]:
    import json

    folder = Path(folder) if folder is not None else default_results_dir() / "benchmarks"
    return [json.loads(f.read_text()) for f in sorted(folder.glob(f"{kind}-*.json"))] if folder.is_dir() else []


def _commit_label(commit: str) -> str:
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")


def step_times(folder: str | os.PathLike | None = None) -> pd.DataFrame:
    """The recorded step-time benchmarks (``tests/benchmarks/step_time.py --record``, kept in
    ``results/benchmarks/``): one row per variant timed, by benchmark command, with its time per
    step and run, that time over the bare torch loop's, the aten operator calls per step and run
    where profiled, and the hardware, threads, date and normkit commit it was measured with (and
    the machine's load average before it started: a busy machine makes slow steps)."""
    rows = []
    for b in _benchmarks(folder, "step_time"):
        for r in b["rows"]:
            ops = r.get("aten_ops_per_step")
            rows.append({"command": b["command"], "variant": r["variant"], "norm": r["norm"],
                         "ms per step and run": round(r["ms_per_step"], 3), "× torch loop": round(r["vs_torch_loop"], 2),
                         "aten calls per step and run": "–" if ops is None else f"{ops:,.0f}",
                         "hardware": f"{b['device']}, {b['threads']} thread{'s' if b['threads'] > 1 else ''}"
                                     + ("" if b.get("load_average") is None else f", load {b['load_average']:.1f} before"),
                         "date": b["date"][:10], "commit": _commit_label(b["commit"])})
    columns = ["command", "variant", "norm", "ms per step and run", "× torch loop", "aten calls per step and run",
               "hardware", "date", "commit"]
    return pd.DataFrame(rows, columns=columns).set_index(["command", "variant"])


def _benchmark_html(frame: pd.DataFrame, render, none: str):
    """Benchmark tables (``frame``, indexed by command first) as one IPython ``HTML`` object: each
    command's rows as ``render(command, rows)`` makes them, or ``none`` if there are none."""
    from IPython.display import HTML

    if frame.empty:
        return HTML(none)
    return HTML("\n".join(render(command, table.droplevel("command"))
                          for command, table in frame.groupby(level="command", sort=False)))


def _benchmark_heading(command: str, *facts: str) -> str:
    """A benchmark's command, and under it how it was made, as an HTML paragraph."""
    return f"<p><code>{html.escape(str(command))}</code><br>{html.escape(', '.join(map(str, facts)))}</p>"


def step_time_tables(folder: str | os.PathLike | None = None):
    """:func:`step_times` for reading: one table per benchmark, under its command, hardware, date
    and commit (an IPython ``HTML`` object; a line that says how to make one if none is recorded)."""
    def render(command: str, table: pd.DataFrame) -> str:
        first = table.iloc[0]
        return (_benchmark_heading(command, first["hardware"], first["date"], f"normkit commit {first['commit']}")
                + table.drop(columns=["hardware", "date", "commit"]).to_html())

    return _benchmark_html(step_times(folder), render, "<p>No benchmark recorded yet. Make one with <code>uv run python "
                           "tests/benchmarks/step_time.py --profile --record results/benchmarks</code>.</p>")


def denormal_benchmarks(folder: str | os.PathLike | None = None) -> pd.DataFrame:
    """The recorded denormal benchmarks (``tests/benchmarks/denormals.py --record``, kept in
    ``results/benchmarks/``): one row per step timed (the optimizer step; the training step on
    the run's data) per benchmark, by command, with its milliseconds with float32 denormals kept
    and flushed to zero (:func:`normkit.runs.flush_denormals`), the speed-up, the run whose
    checkpoint it started from, the share of denormal values in that checkpoint, and the hardware
    (threads, the load before it started), date and commit it was measured with."""
    rows = []
    for b in _benchmarks(folder, "denormals"):
        ms = {(r["what"], r["flush_denormals"]): r["ms"] for r in b["rows"]}
        run = RunConfig.from_dict(b["run"])
        share = b["denormal_share"]
        for what in dict.fromkeys(r["what"] for r in b["rows"]):
            kept, flushed = ms[what, False], ms[what, True]
            rows.append({"command": b["command"], "step": what, "ms, denormals kept": round(kept, 1),
                         "ms, flushed": round(flushed, 1), "speed-up": round(kept / flushed, 2),
                         "run": f"{run.describe()}, after {b['epochs_done']} of {run.epochs} epochs",
                         "denormal": f"{share['weights']:.1%} of its weights, {share['adam_moments']:.1%} of Adam's moments",
                         "hardware": f"{b['device']}, {b['threads']} thread{'s' if b['threads'] > 1 else ''}"
                                     + ("" if b.get("load_average") is None else f", load {b['load_average']:.1f} before"),
                         "date": b["date"][:10], "commit": _commit_label(b["commit"])})
    columns = ["command", "step", "ms, denormals kept", "ms, flushed", "speed-up", "run", "denormal", "hardware", "date",
               "commit"]
    return pd.DataFrame(rows, columns=columns).set_index(["command", "step"])


def denormal_tables(folder: str | os.PathLike | None = None):
    """:func:`denormal_benchmarks` for reading: per benchmark, its command, hardware, date and
    commit, the run and its share of denormal values, and a table of the steps timed (an IPython
    ``HTML`` object; a line that says how to make one if none is recorded)."""
    def render(command: str, table: pd.DataFrame) -> str:
        first = table.iloc[0]
        return (_benchmark_heading(command, first["hardware"], first["date"], f"normkit commit {first['commit']}")
                + f"<p>{html.escape(f'From the checkpoint of {first.run}: denormal, {first.denormal}.')}</p>"
                + table[["ms, denormals kept", "ms, flushed", "speed-up"]].to_html())

    return _benchmark_html(denormal_benchmarks(folder), render, "<p>No denormal benchmark recorded yet. Make one from a "
                           "run's checkpoint with <code>uv run python tests/benchmarks/denormals.py CHECKPOINT --data "
                           "PATH --record results/benchmarks</code>.</p>")


#: The issue's targets for a sweep on one GPU (``tests/benchmarks/sweep_bench.py``): normkit's
#: sweep at least this many times plain fastai's speed on the batch-size-2 ResNet18 slice, ...
TARGET_SPEEDUP = 8.0
#: ... and the full grid of the study projected to end within this many minutes.
TARGET_GRID_MIN = 20.0


def sweep_benchmarks(folder: str | os.PathLike | None = None) -> pd.DataFrame:
    """The recorded sweep benchmarks (``tests/benchmarks/sweep_bench.py --record``, kept in
    ``results/benchmarks/``): one row per way of training (plain fastai, normkit's sweep) per
    benchmark, by command, with its wall time, runs an hour, seconds per run from the records,
    runs at once, start-up (the wall time the runs' records do not account for: each worker's
    start, the last runs' uneven end), the whole study's projected minutes at the slice's pace
    (start-up included, in proportion) and as one sweep (start-up once, then the runs' steady
    pace), the GPU's mean utilisation and peak memory; and per benchmark the speed-up by the wall
    clock and in steady state, whether each meets :data:`TARGET_SPEEDUP` (judged on the
    batch-size-2 ResNet18 slice only), whether the one-sweep projection meets
    :data:`TARGET_GRID_MIN` (``None`` where the figures mean nothing: a CPU, toy scale), hardware,
    slice, date and commit. A benchmark made at two lengths (``--steps A --steps B``) also has
    each way's fitted fixed seconds per run and the projection that counts them once per run
    (*grid min (fitted)*), which is then the one judged against the target (None elsewhere)."""
    rows = []
    for b in _benchmarks(folder, "sweep_bench"):
        meaningful = b["meaningful"]
        judged = meaningful and b["target_slice"]
        fit = b.get("fit") or {}
        fitted = "fast" in fit
        grid_min = fit["fast"]["grid_min"] if fitted else b["ways"]["fast"]["grid_min_sweep"]
        for way, w in ((way, b["ways"][way]) for way in ("plain", "fast")):
            gpu = ("–" if w["gpu_util_mean"] is None else
                   f"{w['gpu_util_mean']:.0f}%, {w['gpu_peak_gib']:.1f} GiB")
            rows.append({
                "command": b["command"], "way": way, "how": w["how"], "wall s": round(w["wall_s"], 1),
                "runs an hour": round(w["runs_per_hour"], 1), "s per run": round(w["run_s"], 1),
                "at once": w["at_once"], "start-up s": round(w["startup_s"], 1),
                "grid min (slice's pace)": round(w["grid_min_wall"], 1),
                "grid min (one sweep)": round(w["grid_min_sweep"], 1), "GPU use, peak memory": gpu,
                "speed-up (wall)": round(b["speedup_wall"], 2), "speed-up (steady)": round(b["speedup_steady"], 2),
                "meets speed-up (wall)": (b["speedup_wall"] >= TARGET_SPEEDUP) if judged else None,
                "meets speed-up (steady)": (b["speedup_steady"] >= TARGET_SPEEDUP) if judged else None,
                "fixed s per run": round(fit[way]["fixed_s"], 2) if fitted else None,
                "grid min (fitted)": round(fit[way]["grid_min"], 1) if fitted else None,
                "fit steps": fit.get("steps"), "fit error": fit.get("error"),
                "meets grid time": (grid_min <= TARGET_GRID_MIN) if meaningful else None,
                "meaningful": meaningful, "grid runs": b["grid_runs"], "hardware": b["device"], "slice": b["slice"],
                "date": b["date"][:10], "commit": _commit_label(b["commit"])})
    columns = ["command", "way", "how", "wall s", "runs an hour", "s per run", "at once", "start-up s",
               "grid min (slice's pace)", "grid min (one sweep)", "GPU use, peak memory", "speed-up (wall)",
               "speed-up (steady)", "fixed s per run", "grid min (fitted)", "fit steps", "fit error",
               "meets speed-up (wall)", "meets speed-up (steady)", "meets grid time", "meaningful",
               "grid runs", "hardware", "slice", "date", "commit"]
    return pd.DataFrame(rows, columns=columns).set_index(["command", "way"])


def sweep_benchmark_tables(folder: str | os.PathLike | None = None):
    """:func:`sweep_benchmarks` for reading: per benchmark, its command, hardware, slice, date and
    commit, a table of the two ways, and a line that sets its speed-up and projected grid time
    against the issue's targets (an IPython ``HTML`` object; a line that says how to make one if
    none is recorded)."""
    def render(command: str, table: pd.DataFrame) -> str:
        b, fast = table.iloc[0], table.loc["fast"]
        fitted = ["fixed s per run", "grid min (fitted)"] if pd.notna(fast["grid min (fitted)"]) else []
        if b["meaningful"]:
            wall, steady = b["meets speed-up (wall)"], b["meets speed-up (steady)"]
            speed = ("the target is for the batch-size-2 ResNet18 slice" if wall is None else
                     f"the target, ≥ {TARGET_SPEEDUP:g}× on the batch-size-2 ResNet18 slice: "
                     + {(True, True): "met", (False, True): "met in steady state, not by this slice's wall clock",
                        (True, False): "met by the wall clock, not in steady state", (False, False): "not met"}[(wall, steady)])
            sweep, pace = fast["grid min (one sweep)"], fast["grid min (slice's pace)"]
            verdict = f"the target, ≤ {TARGET_GRID_MIN:g} min: {'met' if b['meets grid time'] else 'not met'}."
            line = (f"Speed-up {b['speed-up (wall)']:.2f}× by the wall clock, {b['speed-up (steady)']:.2f}× in steady "
                    f"state; {speed}. ")
            if fitted:
                steps = " and ".join(map(str, b["fit steps"]))
                line += (f"The whole study ({b['grid runs']} runs) projected at {fast['grid min (fitted)']:.1f} min as "
                         f"one sweep, counting each run's fixed {fast['fixed s per run']:.2f} s once (fitted from the "
                         f"slice at {steps} steps per epoch; {sweep:.1f} min scaling the whole run time with its cost, "
                         f"{pace:.0f} min at this slice's pace); {verdict}")
            else:
                line += (f"The whole study ({b['grid runs']} runs) projected at {sweep:.1f} min as one sweep "
                         f"({pace:.0f} min at this slice's pace); {verdict}")
                if pd.notna(b["fit error"]):
                    line += f" No fit of fixed and per-step costs: {b['fit error']}."
                else:
                    line += (" This scales each run's fixed costs (its Learner, graph capture) with its steps too; "
                             "a benchmark made at two lengths (--steps A --steps B) fits them apart.")
        else:
            where = "On a CPU" if b["hardware"].startswith("cpu") else "At toy scale (the smoke protocol)"
            line = f"{where}: these figures mean nothing for the GPU targets (no verdict)."
        shown = table[["how", "wall s", "runs an hour", "s per run", "at once", "start-up s", "grid min (slice's pace)",
                       "grid min (one sweep)", *fitted, "GPU use, peak memory"]]
        return (_benchmark_heading(command, b["hardware"], b["slice"], b["date"], f"normkit commit {b['commit']}")
                + shown.to_html() + f"<p>{html.escape(line)}</p>")

    return _benchmark_html(sweep_benchmarks(folder), render, "<p>No sweep benchmark is recorded yet. Make one on a GPU "
                           "with <code>uv run python tests/benchmarks/sweep_bench.py --net resnet18 --bs 2 --record "
                           "results/benchmarks</code>, or with every GPU measurement this book waits for, in one "
                           "command: <code>uv run python tests/benchmarks/gpu_checks.py --budget SECONDS</code>.</p>")


# ---------------------------------------------------------------------------------------
# Charts (altair)


def runs_frame(configs: Iterable[RunConfig], store: ResultStore | None = None) -> pd.DataFrame:
    """One row per run (recorded or not): network, norm label, grid cell, seed, status and final metrics."""
    rows = []
    for c, r in (store or ResultStore()).records(list(configs)).items():
        status = "missing" if r is None else r["status"]
        final = (r or {}).get("final") or {}
        rows.append({"net": NET_TITLES.get(c.net, c.net), "norm": c.norm_obj.label, "bs": c.bs, "lr": c.lr,
                     "seed": c.seed, "eps": dict(c.norm_params).get("eps"), "status": status,
                     "accuracy": final.get("accuracy"), "valid_loss": final.get("valid_loss")})
    return pd.DataFrame(rows)


def _no_data(title: str):
    import altair as alt

    return (alt.Chart(pd.DataFrame({"text": [title]})).mark_text(size=14, opacity=0.7)
            .encode(text="text:N").properties(width=420, height=60))


def _net_selector(nets: list[str], name: str = "network"):
    """A radio control (an altair parameter called ``name``) that picks one of ``nets``."""
    import altair as alt

    return alt.param(name=name, value=nets[0], bind=alt.binding_radio(options=nets, name="Network: "))


def accuracy_chart(*grids, store: ResultStore | None = None):
    """Final validation accuracy of every recorded run by normalisation, one panel per (bs, lr),
    in the grids' order (a row per batch size, a column per learning rate).

    Each run is a dot (diverged runs as red crosses at 0); the black tick and bar are the
    mean over seeds and its ± one standard deviation. A radio control picks the network.
    """
    import altair as alt

    frame = runs_frame([c for g in grids for c in g.configs()], store)
    done = frame[frame["status"] != "missing"].copy()
    n_all, n_done = len(frame), len(done)
    if not n_done:
        return _no_data(f"No runs recorded yet (0 of {n_all}): the chart appears once they are.")
    done["acc"] = done["accuracy"].where(done["status"] == "ok", 0.0)
    cell = "bs {}, lr {:g}".format
    done["cell"] = [cell(bs, lr) for bs, lr in zip(done["bs"], done["lr"])]
    cells = list(dict.fromkeys(cell(bs, lr) for g in grids for bs in g.batch_sizes for lr in g.lrs))
    lrs = {lr for g in grids for lr in g.lrs}
    order = list(dict.fromkeys(frame["norm"]))
    nets = list(dict.fromkeys(frame["net"]))
    net = _net_selector(nets)
    base = alt.Chart(done).transform_filter(alt.datum.net == net)
    y = alt.Y("norm:N", sort=order, title=None)
    dots = base.mark_point(filled=True, size=40, opacity=0.6).encode(
        x=alt.X("acc:Q", title="final validation accuracy", scale=alt.Scale(domain=[0, 1])), y=y,
        color=alt.Color("status:N", scale=alt.Scale(domain=["ok", "diverged"], range=["#4c78a8", "#d62728"]),
                        title="run"),
        shape=alt.Shape("status:N", scale=alt.Scale(domain=["ok", "diverged"], range=["circle", "cross"]), legend=None),
        tooltip=["norm", "cell", "seed", "status", alt.Tooltip("accuracy:Q", format=".3f"),
                 alt.Tooltip("valid_loss:Q", format=".3f")])
    ok = base.transform_filter(alt.datum.status == "ok")
    mean = ok.mark_tick(color="black", thickness=2, size=14).encode(x="mean(acc):Q", y=y)
    spread = ok.mark_rule(color="black").encode(x=alt.X("ci0:Q"), x2="ci1:Q", y=y).transform_aggregate(
        m="mean(acc)", s="stdev(acc)", groupby=["norm", "cell"]).transform_calculate(
        ci0="datum.m - (isValid(datum.s) ? datum.s : 0)", ci1="datum.m + (isValid(datum.s) ? datum.s : 0)")
    chart = (alt.layer(spread, mean, dots).properties(width=260, height=max(60, 22 * len(order)))
             .facet(facet=alt.Facet("cell:N", title=None, sort=cells), columns=len(lrs))
             .add_params(net)
             .properties(title=f"{n_done} of {n_all} runs recorded; dots: seeds, tick and bar: mean ± std"))
    return chart


def curves_frame(configs: Iterable[RunConfig], store: ResultStore | None = None) -> pd.DataFrame:
    """One row per (recorded run, epoch): network, norm label, cell, seed, run status and that
    epoch's validation accuracy and loss and smoothed training loss (non-finite values as NaN)."""
    rows = []
    for c, r in (store or ResultStore()).records(list(configs)).items():
        if r is None:
            continue
        for e in r["epochs"]:
            row = {"net": NET_TITLES.get(c.net, c.net), "norm": c.norm_obj.label, "bs": c.bs, "lr": c.lr,
                   "cell": f"bs {c.bs}, lr {c.lr:g}", "seed": c.seed, "status": r["status"], "epoch": e["epoch"] + 1}
            for k in ("accuracy", "valid_loss", "train_loss"):
                v = e.get(k)
                row[k] = v if isinstance(v, (int, float)) and math.isfinite(v) else float("nan")
            rows.append(row)
    return pd.DataFrame(rows, columns=["net", "norm", "bs", "lr", "cell", "seed", "status", "epoch", "accuracy",
                                       "valid_loss", "train_loss"])


def curves_chart(*grids, store: ResultStore | None = None):
    """Validation accuracy after each epoch of every recorded run, one panel per (bs, lr) as in
    :func:`accuracy_chart`: a thin line per seed and a thick one through the seeds' mean, a
    colour per normalisation (click the legend to pick one). A radio control picks the network.

    A diverged run's line stops at its last finite epoch.
    """
    import altair as alt

    configs = [c for g in grids for c in g.configs()]
    frame = curves_frame(configs, store)
    n_all = len(dict.fromkeys(configs))
    n_done = len(frame[["net", "norm", "bs", "lr", "seed"]].drop_duplicates()) if len(frame) else 0
    if not n_done:
        return _no_data(f"No runs recorded yet (0 of {n_all}): the chart appears once they are.")
    cells = list(dict.fromkeys(f"bs {bs}, lr {lr:g}" for g in grids for bs in g.batch_sizes for lr in g.lrs))
    lrs = {lr for g in grids for lr in g.lrs}
    order = list(dict.fromkeys(c.norm_obj.label for c in configs))
    epochs = max(g.protocol.epochs for g in grids)
    net = _net_selector(list(dict.fromkeys(NET_TITLES.get(c.net, c.net) for c in configs)))
    pick = alt.selection_point(fields=["norm"], bind="legend")
    base = alt.Chart(frame.dropna(subset=["accuracy"])).transform_filter(alt.datum.net == net)
    x = alt.X("epoch:Q", title="epoch", scale=alt.Scale(domain=[1, epochs]), axis=alt.Axis(tickMinStep=1, format="d"))
    y = alt.Y("accuracy:Q", title="validation accuracy", scale=alt.Scale(domain=[0, 1]))
    # every method of the grids in the legend, in their order, so a method keeps its colour as runs arrive;
    # those not picked dimmed once one is
    color = alt.Color("norm:N", sort=order, title="normalisation", scale=alt.Scale(domain=order),
                      legend=_opaque_legend())
    fade = alt.condition(pick, alt.value(0.35), alt.value(0.04))
    seeds = base.mark_line(strokeWidth=1).encode(x=x, y=y, color=color, detail="seed:N", opacity=fade,
                                                 tooltip=["norm", "cell", "seed", "epoch", "status",
                                                          alt.Tooltip("accuracy:Q", format=".3f")])
    mean = base.mark_line(strokeWidth=2.5, point=True).encode(
        x=x, y=alt.Y("mean(accuracy):Q", title="validation accuracy"), color=color,
        opacity=alt.condition(pick, alt.value(1.0), alt.value(0.1)))
    return (alt.layer(seeds, mean).properties(width=230, height=190)
            .facet(facet=alt.Facet("cell:N", title=None, sort=cells), columns=len(lrs))
            .add_params(net, pick)
            .properties(title=alt.TitleParams(f"Validation accuracy by epoch: {n_done} of {n_all} runs recorded",
                                              subtitle="thin: each seed; thick: the seeds' mean; click the legend "
                                                       "to pick a normalisation")))


def _opaque_legend():
    """A legend whose swatches are drawn opaque, not as faint as the marks they stand for (the
    seeds' thin lines, the dots), so that every colour and shape can be told apart."""
    import altair as alt

    return alt.Legend(symbolOpacity=1)


def eps_chart(grid, store: ResultStore | None = None):
    """Final validation accuracy against BatchNorm's eps (log scale), per learning rate, for a
    grid whose norms differ only in eps; seeds as dots, the mean as a line through the recorded
    eps values (the axis spans the whole sweep), diverged runs at 0."""
    import altair as alt

    frame = runs_frame(grid.configs(), store)
    if frame["eps"].isna().any():
        raise ValueError(f"eps_chart needs a grid of batchnorm eps values, got norms {', '.join(frame['norm'].unique())}")
    done = frame[frame["status"] != "missing"].copy()
    if not len(done):
        return _no_data(f"No runs recorded yet (0 of {len(frame)}): the chart appears once they are.")
    done["acc"] = done["accuracy"].where(done["status"] == "ok", 0.0)
    done["lr"] = done["lr"].map("{:g}".format)
    nets = list(dict.fromkeys(frame["net"]))
    net = _net_selector(nets)
    base = alt.Chart(done).transform_filter(alt.datum.net == net)
    ticks = sorted(frame["eps"].unique().tolist())
    # the whole sweep on the axis, recorded or not, so a missing eps reads as a gap
    x = alt.X("eps:Q", scale=alt.Scale(type="log", domain=[ticks[0], ticks[-1]]), title="eps",
              axis=alt.Axis(values=ticks, format="~e", grid=False))
    color = alt.Color("lr:N", title="max lr", legend=_opaque_legend())
    dots = base.mark_point(filled=True, size=40, opacity=0.6).encode(
        x=x, y=alt.Y("acc:Q", title="final validation accuracy", scale=alt.Scale(domain=[0, 1])), color=color,
        shape=alt.Shape("status:N", scale=alt.Scale(domain=["ok", "diverged"], range=["circle", "cross"]), title="run",
                        legend=_opaque_legend()),
        tooltip=["eps", "lr", "seed", "status", alt.Tooltip("accuracy:Q", format=".3f")])
    line = (base.transform_filter(alt.datum.status == "ok").mark_line(point=alt.OverlayMarkDef(shape="diamond", size=60))
            .encode(x=x, y="mean(acc):Q", color=color))
    bs = ", ".join(str(b) for b in grid.batch_sizes)
    return (alt.layer(line, dots).add_params(net).properties(
        width=420, height=260,
        title=alt.TitleParams(f"BatchNorm's eps at batch size {bs}: {len(done)} of {len(frame)} runs recorded",
                              subtitle="dots: seeds; diamonds: their mean, joined across recorded eps values only")))
