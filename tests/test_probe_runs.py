"""Probe records: trained models measured after training (smoke protocol on the mini data).

One module-scoped sweep makes two CNN probes; the tests then check their files, resuming,
redoing damaged records, their contents, and the book's table and chart helpers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest

from normkit import probes, runs, study
from normkit.probes import ProbeConfig, ProbeStore, gap_table, make_probes, stats_chart, stats_table


@pytest.fixture(scope="module")
def made(tmp_path_factory, mini_data):
    """Two CNN probes (trained at bs 2 and bs 128) made under the smoke protocol."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NORMKIT_SMOKE", "1")
        mp.setenv("NORMKIT_DATA", str(mini_data))
        mp.setenv("NORMKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        configs = [dataclasses.replace(c, max_batches=8) for c in probes.probe_configs()
                   if c.run.net == "cnn" and c.run.norm_obj.label == "batchnorm"]
        store = ProbeStore(tmp_path_factory.mktemp("results"))
        logs: list[str] = []
        missing = make_probes(configs, store, log=logs.append)
        yield configs, store, missing, logs


@pytest.fixture
def smoke_made(made, smoke):
    return made


def test_probe_configs_are_the_chapters_seed0_runs(smoke):
    configs = probes.probe_configs()
    chapter_runs = set(study.chapter("batchnorm").configs()) | set(study.chapter("small_batch").configs())
    assert len(configs) == 6 and all(c.run in chapter_runs and c.run.seed == 0 for c in configs)
    assert {(c.run.bs, c.run.lr) for c in configs} == {(2, 1e-3), (128, 1e-2)}
    assert all(c.eval_batch_sizes == (2, 16) for c in configs)  # the smoke protocol's 40 val images
    c = configs[0]
    assert ProbeConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    assert dataclasses.replace(c, threshold=0.1).key != c.key and dataclasses.replace(c, max_batches=9).key != c.key


def test_v1_probes_evaluate_at_2_and_128():
    assert {c.eval_batch_sizes for c in probes.probe_configs()} == {(2, 128)}
    assert {c.run.protocol for c in probes.probe_configs()} == {"v1"}


def test_records_are_written_atomically_where_they_belong(smoke_made):
    configs, store, missing, logs = smoke_made
    assert missing == [] and "All 2 probe records are recorded" in logs[-1]
    folder = store.root / "smoke" / "probes"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"{c.key}.json" for c in configs)  # no temporary files
    record = store.get(configs[0])
    before = store.path(configs[0]).read_text()
    with pytest.raises(ValueError):  # a write that fails halfway (NaN is refused) leaves the old record whole
        store.put({**record, "wall_time_s": math.nan})
    assert store.path(configs[0]).read_text() == before and not list(folder.glob(".*.tmp"))


def test_second_call_resumes_and_makes_nothing(smoke_made, monkeypatch):
    configs, store, _, _ = smoke_made
    mtimes = [store.path(c).stat().st_mtime_ns for c in configs]
    monkeypatch.setattr(probes, "make_probe", lambda *a, **k: pytest.fail("a recorded probe was made again"))
    logs: list[str] = []
    assert make_probes(configs, store, log=logs.append) == []
    assert [store.path(c).stat().st_mtime_ns for c in configs] == mtimes and "All 2" in logs[-1]


def test_damaged_records_are_reported_and_redone(smoke_made, monkeypatch):
    configs, store, _, _ = smoke_made
    good = store.get(configs[1])
    path = store.path(configs[1])
    made = []
    real = probes.make_probe
    monkeypatch.setattr(probes, "make_probe", lambda c, *a, **k: made.append(c) or real(c, *a, **k))
    for damage in (json.dumps({**good, "config": configs[0].to_dict()}), json.dumps({**good, "gap": []}),
                   json.dumps({**good, "format": 99}), "{not json"):
        path.write_text(damage)
        with pytest.warns(UserWarning, match="damaged probe record"):
            assert ProbeStore(store.root).get(configs[1]) is None
    with pytest.warns(UserWarning, match="damaged probe record"):
        assert make_probes(configs, ProbeStore(store.root), log=None) == []
    assert made == [configs[1]] and ProbeStore(store.root).get(configs[1])["status"] == "ok"


def test_contents_are_sane(smoke_made, mini_data):
    configs, store, _, _ = smoke_made
    for c in configs:
        r = store.get(c)
        assert r["kind"] == "probe" and r["status"] == "ok" and r["config"]["run"] == c.run.to_dict()
        assert {"device", "versions", "commit", "date", "data_source"} <= set(r) and r["device"].startswith("cpu")
        assert r["training"]["key"] == c.run.key and r["data_source"]["identity"] == c.run.data
        assert {s["eval_bs"] for s in r["stats"]} == {2, 16}
        for bs in (2, 16):
            rows = sorted((s for s in r["stats"] if s["eval_bs"] == bs), key=lambda s: s["depth"])
            # the CNN's four BatchNorm layers at 32 px: 16, 8, 4 and 2 pixels a side
            assert [s["depth"] for s in rows] == [0, 1, 2, 3] and [s["n"] for s in rows] == [bs * 256, bs * 64, bs * 16, bs * 4]
            assert all(s["batches"] == min(8, 40 // bs) for s in rows)
            for s in rows:
                assert 0 <= s["collapsed"] <= 1 and 0 <= s["gaussian_collapsed"] <= 1
                assert 0 < s["var_ratio_p05"] <= s["var_ratio_median"] <= s["var_ratio_p95"] and s["mean_shift_rms"] >= 0
            gap = {g["mode"]: g for g in r["gap"] if g["eval_bs"] == bs}
            assert set(gap) == {"batch", "running"} and gap["batch"]["samples"] == gap["running"]["samples"] == 40 // bs * bs
            assert all(0 <= g["accuracy"] <= 1 and g["loss"] > 0 for g in gap.values())
        # running statistics do not depend on the batch: over all 40 images (bs 2) the probe
        # reproduces the trained model's own final validation metrics
        run_gap = next(g for g in r["gap"] if g["eval_bs"] == 2 and g["mode"] == "running")
        assert run_gap["accuracy"] == pytest.approx(r["training"]["final"]["accuracy"], abs=1e-6)
        assert run_gap["loss"] == pytest.approx(r["training"]["final"]["valid_loss"], rel=1e-4)
    # retrained identically: the same config and seed through runs.train gives the same run
    again = runs.train(configs[0].run, mini_data, num_workers=0)
    assert again["final"] == store.get(configs[0])["training"]["final"]


def test_diverged_training_leaves_a_diverged_record(smoke, tmp_path, monkeypatch):
    c = probes.probe_configs()[0]

    def diverged(config, *a, **k):
        return {"key": config.key, "status": "diverged", "final": None, "diverged_at": {"epoch": 0, "iter": 3},
                "wall_time_s": 0.1, "settings": {}}

    monkeypatch.setattr(runs, "train", diverged)
    store = ProbeStore(tmp_path)
    assert make_probes([c], store, log=None) == []
    r = store.get(c)
    assert r["status"] == "diverged" and r["stats"] == [] and r["gap"] == []
    assert "diverged" in gap_table([c], store).text and "diverged" in stats_table([c], store).html


def test_tables_and_chart_render_from_records(smoke_made):
    configs, store, _, _ = smoke_made
    missing_one = dataclasses.replace(configs[0], threshold=0.02)  # never made
    gap = gap_table(configs + [missing_one], store)
    assert 'class="normkit-table"' in gap._repr_html_() and "2 of 3 probes recorded" in gap.text
    record = store.get(configs[0])
    running = next(g for g in record["gap"] if g["eval_bs"] == 2 and g["mode"] == "running")
    assert f"{running['accuracy']:.3f}" in gap.text
    lines = gap.text.splitlines()
    assert sum("missing" in line for line in lines) == 2 and sum("missing" in line for line in gap.html.split("<tr")) == 2
    stats = stats_table(configs, store)
    assert "missing" not in stats.text and "2 of 2 probes recorded" in stats.text and len(stats.text.splitlines()) == 2 + 4
    spec = stats_chart(configs, store).to_dict()
    assert "2 of 2 probes recorded" in json.dumps(spec["title"]) and len(spec["vconcat"]) == 2
    assert "not recorded yet" not in json.dumps(spec)  # every panel has its probe
    # the same model probed on another network, never made: that network's panel says so
    other = dataclasses.replace(configs[0], run=dataclasses.replace(configs[0].run, net="resnet18"))
    spec_missing = stats_chart(configs + [other], store).to_dict()
    assert "2 of 3 probes recorded" in json.dumps(spec_missing["title"]) and len(spec_missing["vconcat"]) == 2
    notes = [rows for name, rows in spec_missing["datasets"].items() if rows and "note" in rows[0]]
    assert [[(r["net"], r["note"]) for r in rows] for rows in notes] == [[("ResNet18", "not recorded yet")]]
    panel = spec_missing["vconcat"][0]["hconcat"][0]["layer"][-1]
    assert panel["mark"]["type"] == "text" and panel["encoding"]["text"]["field"] == "note"
    # the collapse axis never shrinks to the data's range: all-zero fractions and a 1e-100
    # yardstick must not read as a steep rise
    collapse_y = spec["vconcat"][0]["hconcat"][0]["layer"][0]["encoding"]["y"]
    assert collapse_y["scale"]["domain"][0] == 0 and collapse_y["scale"]["domain"][1] >= 0.01
    assert all(panel["width"] <= 200 for row in spec["vconcat"] for panel in row["hconcat"])
    assert repr(gap) == gap.text
    assert gap_table(configs + [configs[0]], store).text == gap_table(configs, store).text  # a repeat is one probe
    # a value every probe made shares is said once, in the caption, not in a column of repeats
    assert "Layers" not in stats.head and stats.caption.endswith("; 4 BatchNorm layers in each model")
    assert "Images" in gap.head  # full batches only: fewer images at a larger eval batch size


def test_a_column_whose_probes_differ_stays(smoke_made, tmp_path):
    configs, store, _, _ = smoke_made
    fewer = copy.deepcopy(store.get(configs[1]))
    fewer["stats"] = [row for row in fewer["stats"] if row["layer"] != max(r["layer"] for r in fewer["stats"])]
    both = ProbeStore(tmp_path)
    both.put(store.get(configs[0]))
    both.put(fewer)
    stats = stats_table(configs, both)
    i = stats.head.index("Layers")
    assert [r[i] for r in stats.rows] == ["4", "4", "3", "3"] and "BatchNorm layers in each model" not in stats.caption


def test_tables_read_each_probe_by_its_key(smoke_made, tmp_path):
    """Two probes of the same trained model (same network and label, another threshold) each
    show their own record's numbers."""
    configs, store, _, _ = smoke_made
    twin = dataclasses.replace(configs[0], threshold=0.02)
    record = copy.deepcopy(store.get(configs[0]))
    record |= {"key": twin.key, "config": twin.to_dict()}
    for g in record["gap"]:
        g["accuracy"] = 0.123456
    for row in record["stats"]:
        row["var_ratio_median"] = 777.0
    both = ProbeStore(tmp_path)
    both.put(store.get(configs[0]))
    both.put(record)
    gap = gap_table([configs[0], twin], both).text.splitlines()[2:]
    stats = stats_table([configs[0], twin], both).text.splitlines()[2:]
    n = len(configs[0].eval_batch_sizes)
    assert len(gap) == len(stats) == 2 * n
    assert not any("0.123" in line for line in gap[:n]) and all("0.123" in line for line in gap[n:])
    assert not any("777" in line for line in stats[:n]) and all("777" in line for line in stats[n:])


def test_missing_probes_are_said_missing_with_the_command(tmp_path):
    configs = probes.probe_configs()  # v1 on a CPU: nothing is trained
    store = ProbeStore(tmp_path)
    logs: list[str] = []
    assert make_probes(configs, store, log=logs.append) == configs
    assert "6 of 6 probe records are not recorded yet" in logs[0] and "uv run normkit sweep --chapter small_batch" in logs[0]
    gap, stats = gap_table(configs, store), stats_table(configs, store)
    assert "0 of 6 probes recorded" in gap.text and all("missing" in line for line in gap.text.splitlines()[2:])
    assert len(gap.text.splitlines()) == 2 + 12 and "0 of 6" in stats.text
    assert "No probe recorded yet (0 of 6)" in json.dumps(stats_chart(configs, store).to_dict())


def test_probe_tabs_hold_one_table_per_network(tmp_path):
    configs = probes.probe_configs()  # v1: three probes of each network
    store = ProbeStore(tmp_path)
    for tabs in (probes.gap_tabs(configs, store), probes.stats_tabs(configs, store)):
        tables = tabs._tables
        assert list(tables) == ["CNN", "ResNet18"]
        for title, table in tables.items():
            assert table.head[:2] == ["Method", "Trained at"] and "Network" not in table.head
            assert table.text_columns == 2  # Method and Trained at are aligned left
            assert table.caption.startswith(f"{title}: ") and "0 of 3 probes recorded" in table.caption
            assert len(table.rows) == 3 * 2 and all(len(r) == len(table.head) for r in table.rows)
            assert "Layers" not in table.head  # nothing to say while no probe is made
        text = tabs._repr_mimebundle_()["text/plain"]
        assert text.count("0 of 3 probes recorded") == 2
    cnn = [c for c in configs if c.run.net == "cnn"]
    assert probes.gap_table(cnn, store, network=False).rows == probes.gap_tabs(configs, store)._tables["CNN"].rows
    with pytest.raises(ValueError, match="needs the probes of one network; these have cnn, resnet18"):
        probes.stats_table(configs, store, network=False)
    with pytest.raises(ValueError, match="configs is empty"):
        probes.gap_tabs([], store)


def test_a_time_limit_starts_no_probe_projected_past_it(smoke_made, tmp_path, monkeypatch):
    """`normkit sweep --time-limit` once trained a 41-minute probe after its runs had used the limit up."""
    import shutil
    import time

    import torch

    configs, made_store, _, _ = smoke_made
    shutil.copytree(made_store.root, tmp_path, dirs_exist_ok=True)
    store = ProbeStore(tmp_path)
    originals = {c: store.get(c) for c in configs}
    assert originals[configs[0]]["device"] == runs.device_name(torch.device("cpu"))
    for c in configs:
        store.path(c).unlink()
    twin = dataclasses.replace(configs[0], threshold=0.5)  # same network and training batch size
    store.put({**originals[configs[0]], "key": twin.key, "config": twin.to_dict(), "wall_time_s": 100.0})
    assert probes.projected_probe_seconds(configs[0], store, "cpu") == 100.0
    assert probes.projected_probe_seconds(configs[1], store, "cpu") is None  # bs 128: no probe, no run record here

    made = []
    monkeypatch.setattr(probes, "make_probe", lambda c, *a, **k: made.append(c) or originals[c])
    logs: list[str] = []
    assert make_probes(configs, store, log=logs.append, deadline=time.monotonic() + 50) == configs
    assert made == [] and "not started, projected to take 2 min, past the time limit" in logs[0]
    assert "not started, nothing recorded here tells how long it takes" in logs[1]
    assert "2 of 2 probe records are not recorded yet" in logs[2]
    assert make_probes(configs, store, log=None, deadline=time.monotonic() + 1000) == configs[1:]
    assert made == configs[:1]
    assert make_probes(configs, store, log=None) == [] and made == configs  # no limit: unknown is no obstacle

    other = dataclasses.replace(configs[0], threshold=0.25)  # a probe timed on another device tells nothing
    store.put({**originals[configs[0]], "key": other.key, "config": other.to_dict(), "wall_time_s": 9.0,
               "device": "cuda: NVIDIA H200"})
    store.path(twin).unlink()
    store.path(configs[0]).unlink()
    assert probes.projected_probe_seconds(configs[0], store, "cpu") is None
