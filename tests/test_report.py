import math
import statistics
from pathlib import Path

import pandas as pd
import pytest

from normkit import report, study
from normkit.runs import ResultStore


def grid(**kw):
    return study.Grid.of("test", ["batchnorm"], nets=("cnn",), data="test-data", **kw)


def record(config, acc, loss=1.0, status="ok"):
    return {"format": 1, "key": config.key, "config": config.to_dict(), "status": status, "diverged_at": None,
            "epochs": [], "final": None if status == "diverged" else {"accuracy": acc, "valid_loss": loss, "train_loss": 1.0},
            "wall_time_s": 3600.0, "device": "cuda: Test GPU", "versions": {"torch": "2.x", "fastai": "2.8"},
            "commit": "abcdef1234567890", "date": "2026-01-02T00:00:00+00:00"}


@pytest.fixture
def store(tmp_path):
    return ResultStore(tmp_path)


def fill(store, g, accs):
    """accs: {(bs, lr): [acc per seed or 'diverged' or None for missing]}"""
    for c in g.configs():
        value = accs[(c.bs, c.lr)][c.seed]
        if value is None:
            continue
        if value == "diverged":
            store.put(record(c, None, status="diverged"))
        else:
            store.put(record(c, value, loss=1 - value))


def rows(html):
    return [r for r in html.split("<tr")[2:]]


def test_mean_std_bold_best_missing_and_diverged(store):
    g = grid()
    fill(store, g, {
        (128, 0.01): [0.80, 0.82, 0.84],
        (128, 0.001): [0.70, 0.71, 0.72],
        (2, 0.01): [0.90, "diverged", 0.92],   # best mean, but a seed diverged: not eligible for bold
        (2, 0.001): [None, None, None],
    })
    frame = report.summarize(g.configs(), store)
    cell = frame.set_index(["bs", "lr"]).loc[(128, 0.01)]
    assert cell["acc_mean"] == pytest.approx(0.82)
    assert cell["acc_std"] == pytest.approx(statistics.stdev([0.80, 0.82, 0.84]))  # sample std, ddof=1
    html = report.table_html(frame)
    r128, r128b, r2, r2b = rows(html)
    assert "<strong>0.820 ± 0.020</strong>" in r128 and "nk-best" in r128
    assert "<strong>" not in r128b + r2 + r2b
    assert "0.910 ± 0.014" in r2 and "1/3 diverged" in r2 and "nk-diverged" in r2
    assert r2b.count("missing") >= 2 and "0/3" in r2b


def test_all_diverged_and_partial(store):
    g = grid()
    fill(store, g, {(128, 0.01): ["diverged"] * 3, (128, 0.001): [0.5, None, None],
                    (2, 0.01): [None] * 3, (2, 0.001): [None] * 3})
    html = report.table_html(report.summarize(g.configs(), store))
    r1, r2, _, _ = rows(html)
    assert r1.count("diverged") >= 2 and "3/3 diverged" in r1
    assert "0.500" in r2 and "2/3 missing" in r2 and "nk-partial" in r2
    assert "<strong>" not in html  # no complete, non-diverged cell: nothing is best


def test_a_run_that_learned_nothing_is_at_chance_and_its_cell_says_so(store):
    ln10 = math.log(10)
    ten = {"data_source": {"n_classes": 10}}
    g = grid()
    at = {(128, 0.01): [(0.101, ln10 + 0.002)] * 3,             # uniform guesses
          (128, 0.001): [(0.10, ln10), (0.45, ln10 + 2.9), (0.6, 1.2)],  # one at chance; an over-confident
          (2, 0.01): [(0.16, ln10), (0.1, ln10 * 1.02), (0.14, ln10 * 0.985)],  # just outside each bound
          (2, 0.001): [(0.1, ln10)] * 3}
    for c in g.configs():
        acc, loss = at[(c.bs, c.lr)][c.seed]
        store.put({**record(c, acc, loss), **({} if (c.bs, c.lr) == (2, 0.001) else ten)})
    for (acc, loss), chance in (((0.1, ln10), True), ((0.149, ln10 * 0.991), True), ((0.15, ln10), False),
                                ((0.1, ln10 * 0.989), False), ((0.45, ln10 + 2.9), False)):
        r = {"status": "ok", "final": {"accuracy": acc, "valid_loss": loss}, **ten}
        assert report.at_chance(r) is chance, (acc, loss)
        assert report.at_chance({**r, "data_source": {"n_classes": 2}}) is False  # 1/K is 0.5 there
    assert not report.at_chance({"status": "diverged", "final": None, **ten})
    frame = report.summarize(g.configs(), store)
    assert frame["n_chance"].tolist() == [3, 1, 0, 0]  # a record that does not name K is not judged
    r1, r2, r3, r4 = rows(report.table_html(frame))
    assert "3/3 (3/3 at chance)" in r1 and "3/3 (1/3 at chance)" in r2 and "(" not in r3 + r4
    assert "0.101 ± 0.000" in r1  # averaged in, not dropped
    text = report.findings(g, store=store)
    assert "ended at chance, having learned nothing: 3 of 3 at bs 128, lr 0.01 and 1 of 3 at bs 128, lr 0.001" in (
        " ".join(text.split()))


def test_tabs_one_per_network(store):
    g = study.Grid.of("test", ["none"], data="test-data")
    t = report.tabs(g, store=store)
    assert t.titles == ("CNN", "ResNet18")
    assert all('class="normkit-table"' in c.value and "missing" in c.value for c in t.children)
    with pytest.raises(ValueError, match="at least one grid"):
        report.tabs()


def test_two_grids_share_a_table_with_a_norm_column(store):
    a = study.Grid.of("a", ["none"], nets=("cnn",), data="test-data")
    b = grid()
    fill(store, b, {k: [0.6, 0.6, 0.6] for k in [(128, 0.01), (128, 0.001), (2, 0.01), (2, 0.001)]})
    html = report.tabs(a, b, store=store).children[0].value
    assert "<th>Normalisation</th>" in html and html.count("<tr") == 9


def test_findings_and_provenance_come_from_records(store):
    g = grid()
    fill(store, g, {(128, 0.01): [0.80, 0.82, 0.84], (128, 0.001): [0.70, 0.71, 0.72],
                    (2, 0.01): [0.5, 0.5, "diverged"], (2, 0.001): [None, 0.3, 0.3]})
    text = report.findings(g, store=store).replace("\n  ", " ")  # unwrapped
    assert text.startswith("CNN, batchnorm: best bs 128, lr 0.01 (0.820 ± 0.020") and "worst bs 128, lr 0.001" in text
    assert "1 of 12 runs still missing" in text and "diverged in 1 of 3 runs" in text
    prov = report.provenance(g.configs(), store)
    assert prov.startswith("11 of 12 runs recorded on cuda: Test GPU") and "11.00 h" in prov.replace("\n  ", " ")
    labelled = report.provenance(g.configs(), store, label="fast path")
    assert labelled.startswith("fast path: 11 of 12 runs recorded on cuda: Test GPU") and "\n  " in labelled
    assert max(len(line) for line in labelled.splitlines()) <= report.TEXT_WIDTH
    assert "normkit commit(s) abcdef123456," in prov.replace("\n  ", " ")
    dirty = ResultStore(store.root / "dirty")  # made from uncommitted changes: the commit says so
    c = g.configs()[0]
    dirty.put({**record(c, 0.8), "commit": "abcdef1234567890+dirty"})
    assert "normkit commit(s) abcdef123456+dirty," in report.provenance([c], dirty).replace("\n  ", " ")
    quick = ResultStore(store.root / "quick")  # under a tenth of an hour: minutes, not "0.00 h"
    quick.put({**record(c, 0.8), "wall_time_s": 15.0})
    assert report.provenance([c], quick).replace("\n  ", " ").endswith("; 0.2 min of training in total.")
    packed = ResultStore(store.root / "packed")  # a pack of 3 records its pack's time in each run's record
    for c3 in g.configs()[:3]:
        packed.put({**record(c3, 0.8), "wall_time_s": 300.0, "settings": {"packed": {"runs": 3}}})
    assert report.provenance(g.configs()[:3], packed).replace("\n  ", " ").endswith(
        "; 5.0 min of training in total (3 of them trained in packs of several runs, each counted for its share of "
        "its pack's time).")
    from normkit.runs import GRAPHED

    graph = {"packed": {"runs": 3}, "graph": f"{GRAPHED} (...)"}
    for c3, settings in zip(g.configs()[:3], [graph, graph, {"graph": "not graphed, eager: ..."}]):
        packed.put({**record(c3, 0.8), "wall_time_s": 300.0, "settings": settings})
    assert report.provenance(g.configs()[:3], packed).replace("\n  ", " ").endswith(
        "(2 of them trained in packs of several runs, each counted for its share of its pack's time; 2 with the "
        "network replayed from CUDA graphs).")
    resumed = ResultStore(store.root / "resumed")  # made in two parts: each part's machine, date and commit count
    part = {"epochs": [0, 2], "device": "cpu: Other CPU (2 cores)", "date": "2025-12-24T00:00:00+00:00",
            "commit": "0123456789abcdef", "versions": {"torch": "2.0", "fastai": "2.7"}, "wall_time_s": 100.0}
    resumed.put({**record(c, 0.8), "settings": {"resumed": [part]}})
    text = report.provenance([c], resumed).replace("\n  ", " ")
    assert text.startswith("1 of 1 runs recorded on cpu: Other CPU (2 cores); cuda: Test GPU, 2025-12-24 to ")
    assert "commit(s) 0123456789ab, abcdef123456, torch 2.0, " in text and "fastai 2.7, " in text
    assert text.endswith("(1 stopped and resumed from a checkpoint, the same run to the bit, its parts' times summed).")
    flushed = ResultStore(store.root / "flushed")  # CPU runs with denormals flushed (runs.flush_denormals) say so
    for c3, flush in zip(g.configs()[:3], [True, True, "partly"]):
        flushed.put({**record(c3, 0.8), "settings": {"flush_denormals": flush}})
    flushed.put({**record(g.configs()[3], 0.8), "settings": {"flush_denormals": False}})
    assert report.provenance(g.configs()[:4], flushed).replace("\n  ", " ").endswith(
        "(2 with float32 denormals flushed to zero on the CPU, which is faster late in a run and leaves Adam's "
        "steps as they were; 1 with denormals flushed on some CPU threads only).")
    one = ResultStore(store.root / "one")
    fill(one, g, {(128, 0.01): [0.80, 0.82, 0.84], (128, 0.001): [None] * 3, (2, 0.01): [None] * 3, (2, 0.001): [None] * 3})
    assert report.findings(g, store=one).replace("\n  ", " ") == (
        "CNN, batchnorm: only bs 128, lr 0.01 complete (0.820 ± 0.020 accuracy); 9 of 12 runs still missing.")
    empty = ResultStore(store.root / "empty")
    assert report.findings(g, store=empty) == "CNN, batchnorm: no runs recorded yet, nothing to compare."
    assert report.provenance(g.configs(), empty) == "No runs recorded yet (0 of 12)."


def test_run_costs_group_the_records_times(store):
    """One row per (hardware, network, batch size, way made, runs at once): runs, median and
    range of minutes, the slowest run's method, runs an hour, and cores busy where recorded;
    a packed run counts for its share of its pack's time; diverged runs are left out."""
    g = study.Grid.of("test", ["batchnorm", "groupnorm"], nets=("cnn",), data="test-data")
    for c in g.configs():
        fast = {"data_path": "fast: ...", "workers": 2}
        if c.bs == 128:  # 6 minutes each, then 60 for one groupnorm run; a pack of 3 for bs 2, lr 0.01
            minutes = 60 if (c.norm_obj.label, c.lr, c.seed) == ("groupnorm", 0.01, 1) else 6
            store.put({**record(c, 0.8), "wall_time_s": minutes * 60.0, "settings": fast, "cpu_time_s": minutes * 60.0})
        elif c.lr == 0.01 and c.norm_obj.label == "batchnorm":
            store.put({**record(c, 0.8), "wall_time_s": 900.0, "settings": {**fast, "packed": {"runs": 3}}})
        elif c.lr == 0.001 and c.seed == 0:
            store.put({**record(c, None, status="diverged"), "wall_time_s": 1.0})
        elif c.lr == 0.001:
            store.put({**record(c, 0.5), "wall_time_s": 120.0, "device": "cpu: Test CPU"})  # the plain path, alone
    costs = report.run_costs(g.configs(), store)
    assert list(costs.columns) == ["runs", "minutes (median)", "minutes (range)", "longest", "runs an hour", "cores busy"]
    assert list(costs.index) == [("cpu: Test CPU", "CNN", 2, "plain", 1), ("cuda: Test GPU", "CNN", 128, "fast", 2),
                                 ("cuda: Test GPU", "CNN", 2, "fast, packs of 3", 2)]
    cpu, bs128, packs = (costs.loc[i] for i in costs.index)
    assert (cpu["runs"], cpu["minutes (median)"], cpu["runs an hour"], cpu["cores busy"]) == (4, 2.0, 30.0, "–")
    assert (bs128["runs"], bs128["minutes (median)"], bs128["minutes (range)"], bs128["longest"]) == (
        12, 6.0, "6.0–60.0", "groupnorm")
    assert (bs128["runs an hour"], bs128["cores busy"]) == (20.0, "1.00")
    assert (packs["runs"], packs["minutes (median)"], packs["runs an hour"]) == (3, 5.0, 24.0)
    assert report.run_costs(g.configs(), ResultStore(store.root / "empty")).empty
    other = ResultStore(store.root / "other")  # several stores: each one's records, in one table
    other.put({**record(g.configs()[0], 0.8), "wall_time_s": 600.0, "settings": {"data_path": "plain: ..."}})
    both = report.run_costs(g.configs(), [store, other])
    assert list(both.index) == [("cpu: Test CPU", "CNN", 2, "plain", 1), ("cuda: Test GPU", "CNN", 128, "fast", 2),
                                ("cuda: Test GPU", "CNN", 128, "plain", 1), ("cuda: Test GPU", "CNN", 2, "fast, packs of 3", 2)]
    assert both.loc[("cuda: Test GPU", "CNN", 128, "plain", 1), "minutes (median)"] == 10.0


def test_table_takes_one_network(store):
    frame = report.summarize(study.Grid.of("t", ["none"], data="d").configs(), store)
    with pytest.raises(ValueError, match="one network"):
        report.table_html(frame)


def test_accuracy_chart_panels_follow_the_grids(store):
    """One panel per (bs, lr) of the grids, a row per batch size and a column per learning rate;
    runs that are recorded are dots, the title counts them."""
    g = grid()
    fill(store, g, {(128, 0.01): [0.9, 0.8, None], (128, 0.001): [None] * 3, (2, 0.01): ["diverged", None, None],
                    (2, 0.001): [None] * 3})
    spec = report.accuracy_chart(g, store=store).to_dict()
    assert spec["facet"]["sort"] == ["bs 128, lr 0.01", "bs 128, lr 0.001", "bs 2, lr 0.01", "bs 2, lr 0.001"]
    assert spec["columns"] == 2 and "3 of 12 runs recorded" in str(spec["title"])
    other = grid(batch_sizes=(32, 8), lrs=(0.1,), seeds=(0,))
    store.put(record(other.configs()[0], 0.5))
    spec = report.accuracy_chart(other, store=store).to_dict()
    assert spec["facet"]["sort"] == ["bs 32, lr 0.1", "bs 8, lr 0.1"] and spec["columns"] == 1
    assert "No runs recorded yet (0 of 6)" in str(report.accuracy_chart(grid(batch_sizes=(4,)), store=store).to_dict())


def test_a_tiny_spread_is_not_shown_as_zero(store):
    """Seeds that agree to 3 decimals still show their spread; only identical runs read ± 0.000."""
    g = grid()
    fill(store, g, {(128, 0.01): [0.68611, 0.68561, 0.68637], (128, 0.001): [0.5, 0.5, 0.5],
                    (2, 0.01): [0.70, 0.7001, 0.7002], (2, 0.001): [None] * 3})
    r1, r2, r3, _ = rows(report.table_html(report.summarize(g.configs(), store)))
    assert "0.686 ± 0.0004" in r1 and "0.500 ± 0.000" in r2 and "0.700 ± 0.0001" in r3


def test_eps_chart_spans_the_whole_sweep(store):
    """Only some eps values recorded: the axis still runs over every eps of the grid."""
    g = study.Grid.of("eps", [("batchnorm", {"eps": e}) for e in (1e-5, 1e-2, 1.0)], nets=("cnn",), batch_sizes=(2,),
                      data="test-data")
    for c in g.configs():
        if dict(c.norm_params)["eps"] == 1e-5:
            store.put(record(c, 0.5))
    spec = report.eps_chart(g, store=store).to_dict()
    enc = spec["layer"][0]["encoding"]["x"]
    assert enc["scale"]["domain"] == [1e-5, 1.0] and enc["axis"]["values"] == [1e-5, 1e-2, 1.0]
    assert "6 of 18 runs recorded" in str(spec["title"])


def test_differences_against_a_reference(store):
    """Each cell against the reference's: the difference of means, its standard error from both
    cells' spreads, and a verdict only where both cells are complete and nothing diverged."""
    ref = study.Grid.of("ref", ["none"], nets=("cnn",), data="test-data")
    g = grid()
    fill(store, ref, {(128, 0.01): [0.50, 0.52, 0.54], (128, 0.001): [0.70, 0.71, 0.72],
                      (2, 0.01): [0.5, 0.5, 0.5], (2, 0.001): [0.4, 0.4, 0.4]})
    fill(store, g, {(128, 0.01): [0.80, 0.82, 0.84], (128, 0.001): [0.70, 0.72, 0.74],
                    (2, 0.01): [0.5, 0.5, "diverged"], (2, 0.001): [None, 0.3, 0.3]})
    diff = report.differences(g, reference=ref, store=store).set_index(["bs", "lr"])
    se = (2 * 0.02 ** 2 / 3) ** 0.5
    assert diff.loc[(128, 0.01), "delta"] == pytest.approx(0.30) and diff.loc[(128, 0.01), "se"] == pytest.approx(se)
    assert diff.loc[(128, 0.01), "verdict"] == "better"
    assert diff.loc[(128, 0.001), "delta"] == pytest.approx(0.01) and diff.loc[(128, 0.001), "verdict"] == "within noise"
    assert diff.loc[(2, 0.01), "verdict"] == "diverged" and diff.loc[(2, 0.001), "verdict"] == "missing runs"
    assert pd.isna(diff.loc[(2, 0.001), "delta"]) and pd.isna(diff.loc[(2, 0.01), "se"])

    tabs = report.compare(g, reference=ref, store=store)
    assert tabs.titles == ("CNN",)
    text = repr(tabs._tables["CNN"])
    assert "+0.300 ± 0.016  better" in text and "1/3 diverged" in text and "within noise" in text
    assert "0.300 (2/3)" in text  # a partial cell: the mean of its recorded runs and how many
    assert "<td>0.820</td><td>0.520</td><td>+0.300 ± 0.016</td><td>better</td>" in tabs.children[0].value
    sentences = report.compare_findings(g, reference=ref, store=store)
    assert max(map(len, sentences.splitlines())) <= report.TEXT_WIDTH  # wrapped to fit the page
    assert sentences.replace("\n  ", " ") == ("CNN, batchnorm against none: better in 1 of 4 cells (bs 128 lr 0.01 +0.300); within noise in 1 "
                         "of 4 cells (bs 128 lr 0.001 +0.010); diverged in 1 of 4 cells (bs 2 lr 0.01); missing runs in 1 "
                         "of 4 cells (bs 2 lr 0.001).")


def test_a_worse_cell_and_the_reference_rows_left_out(store):
    ref = grid()
    other = study.Grid.of("o", ["none", "batchnorm"], nets=("cnn",), batch_sizes=(128,), lrs=(0.01,), data="test-data")
    fill(store, ref, {k: [0.80, 0.81, 0.82] for k in [(128, 0.01), (128, 0.001), (2, 0.01), (2, 0.001)]})
    fill(store, other.subset(norms=["none"]), {(128, 0.01): [0.60, 0.70, 0.65]})
    diff = report.differences(other, reference=ref, store=store)
    assert list(diff["norm"]) == ["none"] and diff["verdict"].iloc[0] == "worse"


def test_compare_refuses_a_reference_with_several_norms_or_nothing_shared(store):
    sweep = study.Grid.of("eps", [("batchnorm", {"eps": e}) for e in (1e-5, 0.1)], nets=("cnn",), data="test-data")
    with pytest.raises(ValueError, match=r"reference grid 'eps' has 2 normalisations \(batchnorm, batchnorm\(eps=0.1\)\)"):
        report.differences(grid(), reference=sweep, store=store)
    with pytest.raises(ValueError, match="nothing to compare"):
        report.compare(grid(), reference=grid(), store=store)
    with pytest.raises(ValueError, match="at least one grid"):
        report.differences(reference=grid(), store=store)


def test_compare_findings_group_what_cannot_be_compared_yet(store):
    ref = grid()
    fill(store, ref, {k: [0.80, 0.81, 0.82] for k in [(128, 0.01), (128, 0.001), (2, 0.01), (2, 0.001)]})
    other = study.Grid.of("o", ["none", "layernorm", "groupnorm"], nets=("cnn",), data="test-data")
    fill(store, other.subset(norms=["layernorm"]), {(128, 0.01): [0.8101, 0.8099, 0.81], (128, 0.001): [None] * 3,
                                                   (2, 0.01): [None] * 3, (2, 0.001): [None] * 3})
    text = report.compare_findings(other, reference=ref, store=store)
    assert text.replace("\n  ", " ").splitlines() == [
        "CNN, layernorm against batchnorm: within noise in 1 of 4 cells (bs 128 lr 0.01 0.000); missing runs in 3 of 4 "
        "cells (bs 128 lr 0.001, bs 2 lr 0.01, bs 2 lr 0.001).",
        "CNN: nothing to compare with batchnorm yet for none, groupnorm (runs missing)."]
    assert "0.000 ± 0.006" in repr(report.compare(other, reference=ref, store=store)._tables["CNN"])
    plain = repr(report.compare(other, reference=ref, store=store)._tables["CNN"])
    spread = repr(report.compare(other, reference=ref, store=store, spread=True)._tables["CNN"])
    assert "0.810 " in plain and "0.810 ± 0.0001" not in plain and "0.810 ± 0.010" not in plain
    assert "0.810 ± 0.0001" in spread and "0.810 ± 0.010" in spread and "mean ± standard deviation" in spread
    labelled = report.compare(other, reference=ref, store=store, label="in packs", reference_label="one by one")
    assert "<th>in packs</th><th>one by one</th>" in labelled._tables["CNN"].html


def test_curves_chart_draws_each_recorded_epoch(store):
    """A line per recorded run through its epochs (a diverged run stops at its last finite one),
    panels as in accuracy_chart, both networks on the selector, the title counting the runs."""
    g = study.Grid.of("test", ["batchnorm"], data="test-data")
    configs = [c for c in g.configs() if c.net == "cnn" and c.bs == 128 and c.lr == 0.01]
    for c, accs in zip(configs, ([0.3, 0.5], [0.2, 0.4], [0.25, float("nan")])):
        rec = record(c, accs[-1], status="diverged" if accs[-1] != accs[-1] else "ok")
        rec["epochs"] = [{"epoch": i, "accuracy": a, "valid_loss": 1.0, "train_loss": 1.0} for i, a in enumerate(accs)]
        store.put(rec)
    frame = report.curves_frame(g.configs(), store)
    assert len(frame) == 6 and frame["epoch"].tolist() == [1, 2] * 3 and frame["accuracy"].isna().sum() == 1
    spec = report.curves_chart(g, store=store).to_dict()
    assert "3 of 24 runs recorded" in str(spec["title"]) and spec["facet"]["sort"][0] == "bs 128, lr 0.01"
    assert len(spec["datasets"][spec["data"]["name"]]) == 5  # the NaN epoch is not drawn
    two = study.Grid.of("two", ["none", "batchnorm"], data="test-data")  # "none" has no runs yet
    spec2 = report.curves_chart(two, store=store).to_dict()
    assert spec2["spec"]["layer"][0]["encoding"]["color"]["scale"]["domain"] == ["none", "batchnorm"]  # stable colours
    net = next(p for p in spec["params"] if p["name"] == "network")
    assert net["bind"]["options"] == ["CNN", "ResNet18"]
    assert "No runs recorded yet (0 of 12)" in str(report.curves_chart(grid(), store=ResultStore(store.root / "x")).to_dict())


def test_batch_size_changes_and_against_a_reference_change(store):
    """bs 2 minus bs 128 per (method, lr), ± SE; against the reference's change, the difference
    of the two changes ± SE and a verdict; incomplete cells get none."""
    ref = study.Grid.of("ref", ["none"], nets=("cnn",), data="test-data")
    g = grid()
    fill(store, ref, {(128, 0.01): [0.50, 0.50, 0.50], (128, 0.001): [0.40, 0.40, 0.40],
                      (2, 0.01): [0.60, 0.60, 0.60], (2, 0.001): [0.40, 0.41, 0.42]})
    fill(store, g, {(128, 0.01): [0.80, 0.82, 0.84], (128, 0.001): [0.70, 0.70, 0.70],
                    (2, 0.01): [0.50, 0.52, 0.54], (2, 0.001): [0.70, None, 0.70]})
    plain = report.batch_size_changes(g, store=store).set_index("lr")
    assert plain.loc[0.01, "change"] == pytest.approx(-0.30) and plain.loc[0.01, "se"] == pytest.approx((2 * 0.02 ** 2 / 3) ** 0.5)
    assert plain.loc[0.001, "verdict"] == "missing runs" and pd.isna(plain.loc[0.001, "change"])
    vs = report.batch_size_changes(g, reference=ref, store=store).set_index("lr")
    assert vs.loc[0.01, "ref_change"] == pytest.approx(0.10) and vs.loc[0.01, "vs_ref"] == pytest.approx(-0.40)
    assert vs.loc[0.01, "verdict"] == "worse" and vs.loc[0.001, "verdict"] == "missing runs"
    table = report.batch_size_tabs(g, reference=ref, store=store)._tables["CNN"]
    assert ("<td>batchnorm</td><td>0.01</td><td>-0.300 ± 0.016</td><td>+0.100</td>"
            "<td>-0.400 ± 0.016</td><td>worse</td>") in table.html
    assert "missing runs" in table.text
    alone = report.batch_size_tabs(g, store=store)._tables["CNN"]  # no reference: the accuracies themselves
    assert "<td>batchnorm</td><td>0.01</td><td>0.820</td><td>0.520</td><td>-0.300 ± 0.016</td></tr>" in alone.html
    assert "0.700 (2/3)" in alone.text and "verdict" not in alone.text
    with pytest.raises(ValueError, match="no normalisation of the grids has both batch sizes 128 and 2"):
        report.batch_size_tabs(grid(batch_sizes=(128,)), store=store)


def test_report_works_without_ipywidgets_except_tabs(tmp_path):
    """A machine that only trains (the GPU box had torch and fastai, not ipywidgets) can still
    compare records (sweep_bench --check-science) and make probes; only tabs need ipywidgets."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys
        sys.modules["ipywidgets"] = None  # import fails, as where it is not installed
        from normkit import report, study
        from normkit.runs import ResultStore
        g = study.Grid.of("test", ["batchnorm"], nets=("cnn",), data="test-data")
        store = ResultStore({str(tmp_path)!r})
        print(report.differences(g, reference=g, store=store, reference_store=store)["verdict"].tolist())
        import normkit.probes
        try:
            report.tabs(g, store=store)
        except ImportError as e:
            print("tabs:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "missing runs" in out.stdout
    assert "tabs: normkit.report's tabs need ipywidgets (pip install ipywidgets)" in out.stdout


def test_table_aligns_its_text_columns_left():
    table = report.Table(["Method", "Trained at", "Accuracy"], [["batchnorm", "bs 2, lr 0.001", "0.500"]], text_columns=2)
    assert '<th>Method</th><th class="nk-text">Trained at</th><th>Accuracy</th>' in table.html
    assert '<td>batchnorm</td><td class="nk-text">bs 2, lr 0.001</td><td>0.500</td>' in table.html
    one = report.Table(["Method", "Accuracy"], [["batchnorm", "0.500"]])  # default: the first column only
    assert "nk-text" not in one.html
    css = (Path(__file__).resolve().parent.parent / "book" / "_static" / "normkit.css").read_text()
    assert "table.normkit-table .nk-text" in css
