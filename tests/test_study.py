import re

import pytest

from normkit import report, study
from normkit.runs import ResultStore

from test_report import record


def test_chapter_grids_are_the_studys_grid():
    for name in study.CHAPTERS:
        g = study.chapter(name)
        configs = g.configs()
        assert len(configs) == len(g) == len(set(configs))
        assert {c.net for c in configs} == {"cnn", "resnet18"}
        assert {c.bs for c in configs} == ({2} if name == "eps_sweep" else {128, 2})
        assert {c.lr for c in configs} == {0.01, 0.001}
        assert {c.seed for c in configs} == {0, 1, 2}
        assert {(c.epochs, c.size, c.protocol, c.data) for c in configs} == {(5, 128, "v1", "imagenette")}
    assert {c.norm for c in study.chapter("baseline").configs()} == {"none"}
    assert {c.norm for c in study.chapter("batchnorm").configs()} == {"batchnorm"}
    assert {c.norm_obj.label for c in study.chapter("small_batch").configs()} == {"batchnorm(eps=0.1)"}
    assert {c.norm for c in study.chapter("alternatives").configs()} == set(study.ALTERNATIVES)


def test_shared_runs_are_made_once():
    """The eps sweep's eps=1e-5 and eps=0.1 runs at bs 2 are the same runs as chapters 2 and 3 show."""
    sweep = set(study.chapter("eps_sweep").configs())
    bs2 = lambda g: {c for c in study.chapter(g).configs() if c.bs == 2}
    assert bs2("batchnorm") <= sweep and bs2("small_batch") <= sweep
    everything = {c for name in study.CHAPTERS for c in study.chapter(name).configs()}
    assert len(everything) == 24 * 3 + 36 + 24 * 9
    assert study.study_configs() == list(dict.fromkeys(c for name in study.CHAPTERS for c in study.chapter(name).configs()))
    bn, eps = study.chapter("batchnorm"), study.chapter("eps_sweep")  # BatchNorm's bs-2 runs are in both grids
    shared = set(bn.configs()) & set(eps.configs())
    assert shared and study.grid_configs([bn, eps]) == bn.configs() + [c for c in eps.configs() if c not in shared]
    from normkit.runs import PROTOCOLS  # the whole study under another protocol and data: the same runs, each once

    other = study.study_configs(PROTOCOLS["smoke"], data="elsewhere")
    assert len(other) == len(everything) and {(c.protocol, c.data) for c in other} == {("smoke", "elsewhere")}


def test_unknown_chapter_and_bad_subsets():
    with pytest.raises(ValueError, match="unknown chapter 'bn'; valid chapters: baseline, batchnorm, small_batch"):
        study.chapter("bn")
    g = study.chapter("batchnorm")
    with pytest.raises(ValueError, match="network\\(s\\) vgg not in grid"):
        g.subset(nets=["vgg"])
    with pytest.raises(ValueError, match="norm\\(s\\) none not in grid 'batchnorm'; its norms: batchnorm"):
        g.subset(norms=["none"])
    assert len(g.subset(nets=["cnn"])) == len(g) // 2
    with pytest.raises(ValueError, match="batch size\\(s\\) 64 not in grid 'batchnorm'; its batch sizes: 128, 2"):
        g.subset(batch_sizes=[64])
    assert {c.bs for c in g.subset(batch_sizes=[128]).configs()} == {128}
    assert len(g.subset(nets=["resnet18"], batch_sizes=[2])) == len(g) // 4


def test_cpu_lists_missing_runs_and_trains_nothing(capsys, monkeypatch):
    import normkit.runs

    monkeypatch.setattr(normkit.runs, "train", lambda *a, **k: pytest.fail("must not train on a CPU"))
    g = study.chapter("baseline")
    missing = study.make_runs(g, train=False)
    assert len(missing) == 24
    out = capsys.readouterr().out
    assert "24 of 24 runs of chapter 'baseline' are not recorded yet" in out
    assert "uv run normkit sweep --chapter baseline" in out


def test_smoke_grid_end_to_end(smoke, capsys):
    """The chapter grid at toy scale through the real path: data, Learner, records, table."""
    g = study.chapter("batchnorm")
    assert g.protocol.version == "smoke" and g.configs()[0].data.startswith(smoke.name)
    assert study.make_runs(g) == []
    assert "All 24 runs of chapter 'batchnorm' are recorded" in capsys.readouterr().out
    store = ResultStore()
    assert len(list((store.root / "smoke").glob("*.json"))) == 24
    html = "".join(c.value for c in report.tabs(g).children)
    assert "missing" not in html and html.count("± ") >= 16 and "<strong>" in html


def test_smoke_data_falls_back_to_generated(monkeypatch, tmp_path):
    monkeypatch.setattr(study, "_repo", lambda: tmp_path / "nowhere" / "repo")
    path = study.smoke_data()
    assert "fake-imagenette" in str(path) and (path / "val").is_dir()


def test_smoke_data_remakes_what_a_killed_maker_left(monkeypatch, tmp_path):
    """A generated folder cut short (here: val/ made, train/ empty) is made again, not used."""
    monkeypatch.setenv("NORMKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(study, "_repo", lambda: tmp_path / "nowhere" / "repo")
    fake = tmp_path / "cache" / "data" / "fake-imagenette"
    (fake / "val" / "n01440764").mkdir(parents=True)
    (fake / "train").mkdir()
    path = study.smoke_data()
    assert len(list(path.glob("train/*/*.JPEG"))) == 3 * 60 and len(list(path.glob("val/*/*.JPEG"))) == 3 * 15


def test_sweep_command_names_a_subset(capsys):
    g = study.chapter("alternatives")
    assert study.sweep_command(g) == "uv run normkit sweep --chapter alternatives"
    assert study.sweep_command(g.subset(norms=["frn"])) == "uv run normkit sweep --chapter alternatives --norm frn"
    assert study.sweep_command(g.subset(nets=["resnet18"], batch_sizes=[128])) == (
        "uv run normkit sweep --chapter alternatives --net resnet18 --bs 128")
    assert study.sweep_command(study.chapter("small_batch").subset(nets=["cnn"])) == (
        "uv run normkit sweep --chapter small_batch --net cnn")
    study.make_runs(g.subset(norms=["frn"]), train=False, brief=True)
    assert capsys.readouterr().out == (
        "24 of 24 runs not recorded yet; make them with: uv run normkit sweep --chapter alternatives --norm frn\n")


def test_a_subset_of_a_chapter_says_which_part_of_it_its_runs_are(capsys, tmp_path):
    """A method's section of a chapter counts that method's runs: its message must not read as the
    whole chapter's ("All 24 runs of chapter 'alternatives'" while the chapter has 216)."""
    g = study.chapter("alternatives")
    study.make_runs(g.subset(nets=["resnet18"], norms=["frn"]), ResultStore(tmp_path), train=False)
    out = capsys.readouterr().out
    assert out.startswith("12 of 12 runs of chapter 'alternatives' with network resnet18 and norm frn are not recorded yet")
    assert "uv run normkit sweep --chapter alternatives --net resnet18 --norm frn" in out
    study.make_runs(g, ResultStore(tmp_path), train=False)
    assert capsys.readouterr().out.startswith("216 of 216 runs of chapter 'alternatives' are not recorded yet")


def test_a_norm_label_with_parameters_is_quoted_for_the_shell_and_plain_in_the_message(capsys, tmp_path):
    """``batchnorm(eps=0.01)`` has parentheses, which a shell would parse: the command quotes it,
    the sentence does not."""
    g = study.chapter("eps_sweep").subset(norms=["batchnorm(eps=0.01)"])
    assert study.sweep_command(g) == "uv run normkit sweep --chapter eps_sweep --norm 'batchnorm(eps=0.01)'"
    study.make_runs(g, ResultStore(tmp_path), train=False)
    assert capsys.readouterr().out.startswith(
        "12 of 12 runs of chapter 'eps_sweep' with norm batchnorm(eps=0.01) are not recorded yet")


def test_path_check_is_the_batchnorm_chapters_lr_001_cnn_cells_and_its_plain_runs_live_apart(tmp_path):
    check = study.path_check()
    configs = check.configs()
    assert {(c.net, c.norm, c.bs, c.lr) for c in configs} == {("cnn", "batchnorm", 128, 1e-2), ("cnn", "batchnorm", 2, 1e-2)}
    assert len(configs) == 6 and set(configs) <= set(study.chapter("batchnorm").configs())
    store = ResultStore(tmp_path)
    assert study.plain_store(store).root == tmp_path / "plain"
    assert study.plain_store(store).path(configs[0]) != store.path(configs[0])


def test_make_path_check_lists_each_paths_missing_runs_on_a_cpu(tmp_path, capsys):
    missing = study.make_path_check(ResultStore(), train=False)  # the results folder (the test's own)
    assert len(missing) == 6
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{path} path: 6 of 6 runs not recorded yet; make them with: {study.PATH_CHECK_COMMAND}"
                   for path in ("fast", "plain")]
    # the check made on a GPU has its own folder, and its command records there
    gpu = study.gpu_store()
    assert gpu.root == ResultStore().root / "gpu" and study.plain_store(gpu).root == gpu.root / "plain"
    assert len(study.make_path_check(gpu, train=False)) == 6
    assert capsys.readouterr().out.splitlines()[0].endswith("--check-science --results results/gpu")
    study.make_path_check(ResultStore(tmp_path / "elsewhere"), grid=study.path_check(batch_sizes=[2]), train=False)
    assert capsys.readouterr().out.splitlines()[0].endswith(f"--results {(tmp_path / 'elsewhere').resolve()} --bs 2")


def test_a_widened_path_check_has_more_seeds_and_says_how_to_make_them(tmp_path, capsys):
    check = study.path_check_six()
    configs = check.configs()
    assert {(c.bs, c.seed) for c in configs} == {(2, s) for s in range(6)}
    assert configs == study.path_check(batch_sizes=(2,), seeds=6).configs()
    assert set(study.path_check(batch_sizes=[2]).configs()) < set(configs)  # seeds 0-2 are the study's
    assert study.path_check_command(check) == study.PATH_CHECK_COMMAND + " --bs 2 --seeds 6"
    assert study.path_check_command() == study.PATH_CHECK_COMMAND
    store = ResultStore()
    for c in configs[:2]:  # two fast runs recorded: only four are left on that path
        store.put(record(c, 0.5))
    missing = study.make_path_check(store, grid=check, train=False)
    assert len(missing) == 6
    assert capsys.readouterr().out.splitlines() == [
        "fast path: 4 of 6 runs not recorded yet; make them with: " + study.path_check_command(check),
        "plain path: 6 of 6 runs not recorded yet; make them with: " + study.path_check_command(check)]


@pytest.mark.parametrize("kw, message", [
    (dict(batch_sizes=(64,)), "batch_sizes [64]: valid are one or both of 128, 2"),
    (dict(batch_sizes=()), "batch_sizes []"),
    (dict(seeds=1), "seeds must be a count of at least 2"),
    (dict(seeds=3.0), "got 3.0"),
])
def test_path_check_rejects_a_bad_widening(kw, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        study.path_check(**kw)


def test_make_path_check_trains_both_paths_runs_in_smoke_mode(tmp_path, smoke, capsys):
    store = ResultStore(tmp_path)
    assert study.make_path_check(store) == []
    configs = study.path_check().configs()
    plain = [study.plain_store(store).get(c) for c in configs]
    assert all(r is not None and r["settings"]["data_path"].startswith("plain") for r in plain)
    fast = [store.get(c) for c in configs]
    assert all(r is not None and not r["settings"]["data_path"].startswith("plain") for r in fast)
    out = capsys.readouterr().out
    assert "fast path: all 6 runs of grid 'path_check' are recorded" in out
    assert "plain path: all 6 runs of grid 'path_check' are recorded" in out


def test_describe_calls_a_chapter_a_chapter_and_other_grids_grids():
    assert study.chapter("baseline").describe().startswith("chapter 'baseline': 24 runs = networks (cnn, resnet18)")
    assert study.path_check(batch_sizes=[2], seeds=6).describe().startswith(
        "grid 'path_check': 6 runs = networks (cnn) x norms (batchnorm) x batch sizes (2) x learning rates (0.01) "
        "x seeds (0, 1, 2, 3, 4, 5)")


def test_make_pack_check_trains_each_cells_seeds_as_one_pack_in_smoke_mode(tmp_path, smoke, capsys):
    store = ResultStore(tmp_path)
    assert study.packed_store(store).root == tmp_path / "packed"
    assert study.make_pack_check(store) == []
    configs = study.path_check().configs()
    packed = [study.packed_store(store).get(c) for c in configs]
    assert all(r["settings"]["packed"]["runs"] == 3 for r in packed)
    assert {tuple(r["settings"]["packed"]["seeds"]) for r in packed} == {(0, 1, 2)}
    assert store.missing(configs) == configs  # the runs one by one are the study's own, made elsewhere
    assert "packed: all 6 runs of grid 'path_check' are recorded" in capsys.readouterr().out


def test_make_pack_check_lists_its_missing_runs_on_a_cpu(capsys):
    assert len(study.make_pack_check(train=False)) == 6
    assert capsys.readouterr().out.splitlines() == [
        f"packed: 6 of 6 runs not recorded yet; make them with: {study.PACK_CHECK_COMMAND}"]
