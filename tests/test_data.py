import tarfile

import pytest
import torch

from normkit.data import DataError, data_info, imagenette_path, make_dls, IMAGENETTE_SPLIT


def test_folder_argument_and_env(tiny_data, monkeypatch):
    assert imagenette_path(tiny_data) == tiny_data
    monkeypatch.setenv("NORMKIT_DATA", str(tiny_data))
    assert imagenette_path() == tiny_data


def test_tgz_is_unpacked_once(tiny_data, tmp_path, monkeypatch):
    archive = tmp_path / "imagenette-tiny.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_data, arcname="imagenette-tiny")
    root = imagenette_path(archive)
    assert (root / "train").is_dir() and root.name == "imagenette-tiny"

    def no_second_unpack(*a, **k):
        raise AssertionError("unpacked twice")

    monkeypatch.setattr(tarfile, "open", no_second_unpack)
    assert imagenette_path(archive) == root
    assert data_info(root).n_train == data_info(tiny_data).n_train


def test_tgz_unpacked_once_when_asked_at_once(tiny_data, tmp_path, monkeypatch):
    """Two callers at once (two sweeps starting together) with a stale copy in the cache: one
    unpacks while the other waits, neither fails, and the copy is whole."""
    import threading
    import time

    monkeypatch.setenv("NORMKIT_CACHE", str(tmp_path / "cache"))
    archive = tmp_path / "imagenette-tiny.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tiny_data, arcname="imagenette-tiny")
    root = imagenette_path(archive)
    n_files = sum(1 for f in root.rglob("*") if f.is_file())
    dest = root.parent
    (dest / ".unpacked").write_text("a copy of an older archive")
    (tmp_path / "cache" / "data" / f"{dest.name}.tmp999999").mkdir()  # left by a killed unpack
    real, calls = tarfile.TarFile.extractall, []

    def slow_extractall(self, *a, **k):
        calls.append(1)
        time.sleep(0.5)  # both callers are in flight before either finishes
        return real(self, *a, **k)

    monkeypatch.setattr(tarfile.TarFile, "extractall", slow_extractall)
    got, errors = [], []

    def ask():
        try:
            got.append(imagenette_path(archive))
        except Exception as e:  # noqa: BLE001 - the test reports it
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and got == [root, root]
    assert len(calls) == 1
    assert sum(1 for f in root.rglob("*") if f.is_file()) == n_files
    assert sorted(p.name for p in (tmp_path / "cache" / "data").iterdir()) == [dest.name, f"{dest.name}.lock"]


def _train_only(p):
    (p / "train" / "a").mkdir(parents=True)
    (p / "train" / "a" / "x.JPEG").write_bytes(b"")
    return p


@pytest.mark.parametrize("make, match", [
    (lambda p: p / "nope", "does not exist"),
    (lambda p: (p / "x.txt").write_text("hi") and p / "x.txt", "not a .tgz"),
    (lambda p: (p / "bad.tgz").write_bytes(b"not a tarball") and p / "bad.tgz", "could not be unpacked"),
    (lambda p: _train_only(p), "has no val/ folder"),
])
def test_bad_sources_give_one_line_errors(tmp_path, make, match):
    with pytest.raises(DataError, match=match) as e:
        imagenette_path(make(tmp_path))
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_empty_class_folders_rejected(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "n01").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folders with images"):
        imagenette_path(tmp_path)


def test_layout_check_accepts_every_image_kind_training_reads(tmp_path):
    """A folder whose only images are, say, .bmp passes the layout check, since training
    (``split_files``) reads them; a folder of non-images is still refused."""
    from PIL import Image

    from normkit.data import split_files

    for split in ("train", "val"):
        (tmp_path / split / "n01").mkdir(parents=True)
        (tmp_path / split / "n01" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no class folders with images"):
        imagenette_path(tmp_path)
    for split in ("train", "val"):
        Image.new("RGB", (8, 8)).save(tmp_path / split / "n01" / "a.bmp")
    assert imagenette_path(tmp_path) == tmp_path
    train, valid = split_files(tmp_path)
    assert [f.name for f in train + valid] == ["a.bmp", "a.bmp"]


def test_data_info_identity(tiny_data, mini_data):
    info = data_info(tiny_data)
    assert (info.n_train, info.n_valid, info.n_classes) == (15, 6, 3)
    assert info.identity == "tiny-15-6"
    assert data_info(tiny_data).fingerprint == info.fingerprint
    # any copy of the official split is the study's data
    full = type(info)("p", "imagenette2-160", *IMAGENETTE_SPLIT, 10, "x")
    assert full.identity == "imagenette"


def test_data_info_counts_and_fingerprints_the_files_that_are_trained_on(tiny_data):
    """Every image both data paths train on (any image extension fastai knows) is counted and
    fingerprinted, so the data identity and the decoded cache follow the data; an image in a
    folder nested below a class (whose label would be that folder) is in neither."""
    import shutil

    from normkit.data import split_files

    before = data_info(tiny_data)
    cls = next(p for p in sorted((tiny_data / "train").iterdir()) if p.is_dir())
    image = sorted(cls.iterdir())[0]
    (cls / "more").mkdir()
    shutil.copy(image, cls / "more" / "extra.jpeg")
    shutil.copy(image, cls / "extra.bmp")
    after = data_info(tiny_data)
    train, valid = split_files(tiny_data)
    assert (after.n_train, after.n_valid) == (len(train), len(valid)) == (before.n_train + 1, before.n_valid)
    assert after.fingerprint != before.fingerprint


def test_dataloaders_follow_the_protocol(tiny_data):
    dls = make_dls(tiny_data, bs=2, size=16, num_workers=0, device="cpu", seed=0)
    assert len(dls.train_ds) == 15 and len(dls.valid_ds) == 6
    assert len(dls.train) == 7  # 15 images at bs 2: the last single image is dropped
    sizes = [len(y) for _, y in dls.train]
    assert sizes == [2] * 7
    assert dls.valid.bs == 128 and not dls.valid.drop_last  # evaluation is per image: batch size is speed only
    x, y = dls.one_batch()
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert list(dls.vocab) == sorted(p.name for p in (tiny_data / "train").iterdir())
    # normalised with ImageNet statistics: raw pixels in [0, 1] become roughly centred
    xv = torch.cat([b[0] for b in dls.valid])
    assert xv.min() < 0 < xv.max()
    names = [type(t).__name__ for t in dls.after_batch.fs]
    assert "Flip" in names and "Normalize" in names


def test_dataloaders_reject_bad_batch_size(tiny_data):
    with pytest.raises(ValueError, match="bs=0"):
        make_dls(tiny_data, bs=0)
    with pytest.raises(DataError, match="fewer training images"):
        make_dls(tiny_data, bs=64, num_workers=0)


def test_failed_download_is_one_line(monkeypatch):
    import fastai.data.external as ext

    def offline(url, *a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution\n(more lines)")

    monkeypatch.setattr(ext, "untar_data", offline)
    with pytest.raises(DataError, match="could not download Imagenette from .*set NORMKIT_DATA") as e:
        imagenette_path()
    assert "\n" not in str(e.value)
