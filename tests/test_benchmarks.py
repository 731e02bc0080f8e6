"""The benchmarks are not timed tests, but CI checks that they still run (at toy scale on a CPU)."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent / "benchmarks"


def test_sweep_benchmark_runs_at_toy_scale_on_cpu(tmp_path, mini_data):
    res = subprocess.run([sys.executable, str(BENCH / "sweep_bench.py"), "--data", str(mini_data), "--seeds", "2",
                          "--workers", "1", "--net", "cnn", "--pack", "2"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    assert "runs/hour" in out and "mean nothing" in out and "slice: 4 runs" in out
    assert "packs of up to 2 runs" in out and "(its share of a pack of 2) with 1 pack at once" in out
    assert "steady-state speed-up" in out and "per run, from the records (no worker start-up)" in out


def test_check_science_at_toy_scale_keeps_its_records_as_the_book_reads_them(tmp_path, mini_data):
    """--check-science --results DIR: fast runs where the study keeps its records, plain runs in
    DIR/plain (study.plain_store), one line per cell with its verdict."""
    res = subprocess.run([sys.executable, str(BENCH / "sweep_bench.py"), "--check-science", "--data", str(mini_data),
                          "--workers", "1", "--results", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert res.returncode in (0, 1), res.stdout[-2000:] + res.stderr[-2000:]  # 1: a toy-scale cell disagreed
    out = res.stdout
    assert "toy scale" in out and out.count("fast - plain") == 2
    assert len(list((tmp_path / "smoke").glob("*.json"))) == 6
    assert len(list((tmp_path / "plain" / "smoke").glob("*.json"))) == 6


def test_check_packs_at_toy_scale_sets_packed_runs_against_the_same_runs_one_by_one(tmp_path, mini_data):
    res = subprocess.run([sys.executable, str(BENCH / "sweep_bench.py"), "--check-packs", "--data", str(mini_data),
                          "--workers", "1", "--results", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert res.returncode in (0, 1), res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    assert "fast vs packed" in out and out.count("packed - fast") == 2
    assert len(list((tmp_path / "smoke").glob("*.json"))) == 6
    packed = sorted((tmp_path / "packed" / "smoke").glob("*.json"))
    assert len(packed) == 6 and all('"runs": 3' in f.read_text() for f in packed)


def _bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_bench", BENCH / "sweep_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_only_the_toy_protocol_falls_back_to_the_mini_data_on_cpu(monkeypatch, tmp_path):
    """A real protocol on a CPU must train on the real Imagenette (fastai's download), never on
    the mini set, whose records would not match the study's."""
    import argparse

    import normkit.data

    bench = _bench_module()
    asked = []
    monkeypatch.delenv("NORMKIT_DATA", raising=False)
    monkeypatch.setattr(normkit.data, "imagenette_path", lambda p=None: asked.append(p) or tmp_path / "download")
    monkeypatch.setattr(normkit.data, "data_info", lambda p: p)
    monkeypatch.setattr(normkit.data, "make_fake_imagenette", lambda p, *a: tmp_path / "fake")
    for protocol in ("v1", "bench"):
        path, _ = bench._data(argparse.Namespace(data=None, protocol=protocol), "cpu")
        assert path == tmp_path / "download", protocol
    assert asked == [None, None]
    path, _ = bench._data(argparse.Namespace(data=None, protocol=None), "cpu")
    assert path != tmp_path / "download" and asked == [None, None]


def test_step_time_benchmark_runs_at_toy_scale_on_cpu(tmp_path):
    import json

    res = subprocess.run([sys.executable, str(BENCH / "step_time.py"), "--steps", "5", "--warmup", "2", "--repeats", "1",
                          "--compile", "default", "--pack", "2", "--profile", "--record", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = res.stdout
    assert "on a CPU at toy scale" in out and "profile of LeanLearner + compile, packs of 2 (per run)" in out
    names = ("torch loop", "fastai Learner", "LeanLearner", "LeanLearner + compile default",
             "LeanLearner, packs of 2 (per run)", "LeanLearner + compile, packs of 2 (per run)")
    for row in names:
        assert f"  {row} " in out and out.split(f"  {row} ", 1)[1].split("ms/step")[0].strip().replace(".", "").isdigit(), row
    [path] = tmp_path.glob("step_time-*.json")  # --record: the figures printed, with how they were made
    record = json.loads(path.read_text())
    assert record["kind"] == "step_time" and record["device"].startswith("cpu") and record["versions"]["torch"]
    assert record["command"].startswith("tests/benchmarks/step_time.py --steps 5") and record["args"]["pack"] == [2]
    assert [r["variant"] for r in record["rows"]] == list(names) and {r["norm"] for r in record["rows"]} == {"batchnorm"}
    for r in record["rows"]:
        assert f"  {r['variant']:36} {r['ms_per_step']:8.2f} ms/step" in out
        # --profile: operator calls per step and run for every variant but the torch loop, as printed
        assert ("aten_ops_per_step" in r) == (r["variant"] != "torch loop"), r
        if "aten_ops_per_step" in r:
            assert f"  {r['variant']:36} {r['aten_ops_per_step']:8,.0f} aten operator calls" in out
    packed = {r["variant"]: r["aten_ops_per_step"] for r in record["rows"] if "aten_ops_per_step" in r}
    assert packed["LeanLearner, packs of 2 (per run)"] < packed["LeanLearner"]  # per run: a pack shares its launches
    from normkit import report  # the book's table of recorded benchmarks reads it back

    table = report.step_times(tmp_path)
    assert list(table.index.get_level_values("variant")) == list(names)
    assert table.loc[(record["command"], "LeanLearner"), "aten calls per step and run"] == f"{packed['LeanLearner']:,.0f}"
    assert table.loc[(record["command"], "torch loop"), "aten calls per step and run"] == "–"
    assert table["hardware"].iloc[0].startswith("cpu: ") and table["date"].iloc[0] == record["date"][:10]
    assert table["hardware"].iloc[0].endswith(f", load {record['load_average']:.1f} before")
    assert report.step_times(tmp_path / "none").empty
    shown = report.step_time_tables(tmp_path).data  # the book's form: one table under its command
    assert shown.count("<table") == 1 and record["command"] in shown and table["hardware"].iloc[0] in shown
    assert "No benchmark recorded yet" in report.step_time_tables(tmp_path / "none").data


def test_step_time_benchmark_refuses_bad_values_in_one_line():
    res = subprocess.run([sys.executable, str(BENCH / "step_time.py"), "--steps", "0"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "--steps 0 is invalid; it must be a positive integer" in res.stderr
    res = subprocess.run([sys.executable, str(BENCH / "step_time.py"), "--pack", "1"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2 and "--pack 1 is invalid; a pack has at least 2 runs" in res.stderr
    res = subprocess.run([sys.executable, str(BENCH / "step_time.py"), "--norm", "batchnrom"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "batchnrom" in res.stderr and "Traceback" not in res.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU --graph is valid")
@pytest.mark.parametrize("script", ["step_time.py", "sweep_bench.py"])
def test_the_benchmarks_refuse_graphs_without_cuda_in_one_line(script):
    res = subprocess.run([sys.executable, str(BENCH / script), "--device", "cpu", "--graph"], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2 and "--graph needs --device cuda" in res.stderr and "Traceback" not in res.stderr
