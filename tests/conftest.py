"""Shared fixtures: real mini Imagenette when ../shared/data has it, else generated images."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_MINI = REPO.parent / "shared" / "data" / "imagenette-mini"


@pytest.fixture(autouse=True)
def _isolated(tmp_path_factory, monkeypatch):
    """Every test gets its own results folder and cache, and the study protocol by default."""
    base = tmp_path_factory.mktemp("nk")
    monkeypatch.setenv("NORMKIT_RESULTS", str(base / "results"))
    monkeypatch.setenv("NORMKIT_CACHE", str(base / "cache"))
    monkeypatch.delenv("NORMKIT_SMOKE", raising=False)
    monkeypatch.delenv("NORMKIT_DATA", raising=False)
    monkeypatch.delenv("NORMKIT_CHECKPOINTS", raising=False)


@pytest.fixture
def one_thread():
    """Seeded, on one torch thread: the norm and probe tests use tiny tensors on a shared machine."""
    import torch

    from torch_state import torch_threads

    torch.manual_seed(0)
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> Path:
    """A small data folder in fastai's Imagenette layout: the real mini subset if present."""
    if (SHARED_MINI / "train").is_dir():
        return SHARED_MINI
    from normkit.data import make_fake_imagenette

    return make_fake_imagenette(tmp_path_factory.mktemp("fake") / "imagenette-fake", n_train=60, n_valid=15)


@pytest.fixture
def tiny_data(tmp_path) -> Path:
    """A tiny generated folder (3 classes, 5 train / 2 val images each, odd-sized train set)."""
    from normkit.data import make_fake_imagenette

    return make_fake_imagenette(tmp_path / "tiny", n_train=5, n_valid=2, size=24)


@pytest.fixture
def smoke(monkeypatch, mini_data):
    """The smoke protocol on the mini data."""
    monkeypatch.setenv("NORMKIT_SMOKE", "1")
    monkeypatch.setenv("NORMKIT_DATA", str(mini_data))
    return mini_data



# ==== The book build (tests/test_book.py, tests/test_browser.py) ===========================
# One build of the Jupyter Book per session; helpers in tests/book_helpers.py. Keep other
# fixtures outside this section.


@pytest.fixture(scope="session")
def book_build(tmp_path_factory):
    """A fresh build of the whole book (a new output folder, so every page is read and checked)."""
    from book_helpers import build_book

    return build_book(tmp_path_factory.mktemp("book"))
# ==== end of the book build section =========================================================
