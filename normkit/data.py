"""Imagenette, loaded with fastai.

Where the images come from, in order of precedence:

1. the ``source`` argument of :func:`imagenette_path`,
2. the ``NORMKIT_DATA`` environment variable,
3. fastai's download, ``untar_data(URLs.IMAGENETTE_160)`` (the default for readers).

A source is a folder in fastai's Imagenette layout (``train/<wnid>/*.JPEG`` and
``val/<wnid>/*.JPEG``) or a ``.tgz`` of one, which is unpacked once into the cache
(``NORMKIT_CACHE``, default ``~/.cache/normkit``).

The pipeline, the same for every experiment (see the book's protocol page):

* the official train/val split (the ``train`` and ``val`` folders);
* every image resized to 128 x 128 (``Resize``: a random crop of the shorter side for
  training, the centre crop for validation; a no-op on images that are already square);
* augmentation: a random horizontal flip, nothing else;
* normalisation: ImageNet channel mean and standard deviation;
* training batches of exactly ``bs`` images (the last, partial batch of an epoch is dropped);
* validation in batches of ``val_bs`` = 128 images whatever ``bs`` is: in evaluation mode every
  method normalises each image on its own (running or per-sample statistics), so the
  validation batch size changes nothing but the speed.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

__all__ = [
    "DataError", "DataInfo", "imagenette_path", "open_data", "data_info", "make_dls", "make_fake_imagenette",
    "IMAGENETTE_SPLIT",
]

#: Number of (train, val) images in the official Imagenette split.
IMAGENETTE_SPLIT = (9469, 3925)


class DataError(ValueError):
    """A data source that is missing or not in fastai's Imagenette layout."""


def cache_dir() -> Path:
    """normkit's cache folder: ``$NORMKIT_CACHE``, else ``~/.cache/normkit``."""
    return Path(os.environ.get("NORMKIT_CACHE", Path.home() / ".cache" / "normkit"))


def imagenette_path(source: str | os.PathLike | None = None) -> Path:
    """The folder holding ``train/`` and ``val/``; downloads Imagenette if no source is given."""
    source = source if source is not None else os.environ.get("NORMKIT_DATA") or None
    if source is None:
        from fastai.data.external import URLs, untar_data

        try:
            path = untar_data(URLs.IMAGENETTE_160)
        except Exception as e:  # network, disk or archive trouble: one line, and what to do instead
            why = " ".join(str(e).split())[:200] or type(e).__name__
            raise DataError(f"could not download Imagenette from {URLs.IMAGENETTE_160} ({why}); "
                            f"set NORMKIT_DATA to a local copy (folder or .tgz)") from None
        return check_layout(path)
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {str(path)!r} does not exist (set NORMKIT_DATA or pass a folder or .tgz)")
    if path.is_file():
        path = _unpack(path)
    return check_layout(_find_root(path))


def _unpack(archive: Path) -> Path:
    """Unpack ``archive`` into the cache once; unpack it again only if it changed (path, size, mtime)."""
    name = archive.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        raise DataError(f"data source {str(archive)!r} is a file but not a .tgz/.tar.gz/.tar archive")
    stat = archive.stat()
    stamp = f"{archive.resolve()} {stat.st_size} {int(stat.st_mtime)}"

    def extract(folder: Path) -> None:
        with tarfile.open(archive) as tar:
            tar.extractall(folder, filter="data")

    try:
        return cached_folder(cache_dir() / "data" / name, stamp, extract)
    except (tarfile.TarError, OSError, EOFError) as e:
        why = " ".join(str(e).split())  # tarfile's messages can span lines
        raise DataError(f"data source {str(archive)!r} could not be unpacked: {why}") from None


def cached_folder(dest: Path, stamp: str, make: Callable[[Path], None]) -> Path:
    """``dest``, made by ``make(folder)`` unless it already holds a finished copy stamped ``stamp``.

    Safe when several processes ask at once (two sweeps, a sweep and a notebook): one makes it
    under a file lock while the others wait, then find it done. ``make`` fills a private folder
    that is swapped in whole, stamp included, so a killed maker never leaves a copy that looks
    finished, and a stale copy is replaced in one step.
    """
    from filelock import FileLock

    if _stamp(dest) == stamp:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(dest.with_name(dest.name + ".lock")):
        if _stamp(dest) == stamp:  # another process made it while this one waited
            return dest
        import shutil

        for kind in ("tmp", "old"):  # what a killed maker left behind
            for left in dest.parent.glob(f"{dest.name}.{kind}*"):
                shutil.rmtree(left, ignore_errors=True)
        tmp, old = (dest.with_name(f"{dest.name}.{kind}{os.getpid()}") for kind in ("tmp", "old"))
        try:
            make(tmp)
            (tmp / ".unpacked").write_text(stamp)
            if dest.exists():
                dest.rename(old)
            tmp.rename(dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
    return dest


def _stamp(dest: Path) -> str | None:
    """The stamp of the finished copy in ``dest`` (see :func:`cached_folder`), or None."""
    try:
        return (dest / ".unpacked").read_text()
    except OSError:
        return None


def _find_root(path: Path) -> Path:
    """``path`` itself if it has train/ and val/, else its single sub-folder that does."""
    if (path / "train").is_dir():
        return path
    subs = [p for p in path.iterdir() if p.is_dir() and (p / "train").is_dir()] if path.is_dir() else []
    return subs[0] if len(subs) == 1 else path


def check_layout(path: Path) -> Path:
    """Raise :class:`DataError` unless ``path`` has ``train/`` and ``val/`` with image class folders."""
    path = Path(path)
    for split in ("train", "val"):
        d = path / split
        if not d.is_dir():
            raise DataError(f"data folder {str(path)!r} has no {split}/ folder (expected fastai's Imagenette layout: train/<class>/*.JPEG, val/<class>/*.JPEG)")
        classes = [c for c in d.iterdir() if c.is_dir()]
        if not classes or not any(_images(c) for c in classes):
            raise DataError(f"data folder {str(d)!r} has no class folders with images")
    return path


def _images(folder: Path) -> list[Path]:
    """The images directly in ``folder``: the files :func:`split_files` would train on
    (fastai's ``image_extensions``, any case)."""
    from fastai.data.transforms import image_extensions

    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in image_extensions)


@dataclass(frozen=True)
class DataInfo:
    """What a data folder holds: enough to name it in a run's config and record."""

    path: str
    name: str
    n_train: int
    n_valid: int
    n_classes: int
    fingerprint: str  # sha256 of every image's split/class/name and byte size

    @property
    def identity(self) -> str:
        """``"imagenette"`` for any copy of the official split, else ``name-ntrain-nvalid``."""
        if (self.n_train, self.n_valid, self.n_classes) == (*IMAGENETTE_SPLIT, 10):
            return "imagenette"
        return f"{self.name}-{self.n_train}-{self.n_valid}"

    @property
    def meta(self) -> dict:
        """What a record says of its data: every field and the identity."""
        return asdict(self) | {"identity": self.identity}


def open_data(source: str | os.PathLike | None, identities: Iterable[str], what: str = "runs") -> tuple[Path, DataInfo]:
    """The data folder for ``what`` (runs, probes) that ask for ``identities``, and what it holds;
    ``ValueError`` if it holds other data."""
    path = imagenette_path(source)
    info = data_info(path)
    wrong = sorted(set(identities) - {info.identity})
    if wrong:
        raise ValueError(f"the data at {path} is {info.identity!r} but the {what} ask for {', '.join(map(repr, wrong))}")
    return path, info


def data_info(path: str | os.PathLike) -> DataInfo:
    """Count and fingerprint the images in a checked data folder: the files both data paths
    train on (:func:`split_files`), so adding or changing any of them changes the fingerprint."""
    path = check_layout(Path(path))
    train, valid = split_files(path)
    h = hashlib.sha256()
    for split, files in (("train", train), ("val", valid)):
        for img in files:
            h.update(f"{split}/{img.parent.name}/{img.name}:{img.stat().st_size}\n".encode())
    classes = {f.parent.name for f in train + valid}
    return DataInfo(str(path), path.name, len(train), len(valid), len(classes), h.hexdigest()[:16])


def make_dls(path: str | os.PathLike, bs: int, size: int = 128, *, val_bs: int = 128, device=None,
             num_workers: int | None = None, max_train: int | None = None, max_valid: int | None = None,
             seed: int | None = None):
    """fastai ``DataLoaders`` over the official split, with the pipeline in the module docstring.

    ``max_train``/``max_valid`` keep a fixed, seed-independent subset per split (smoke runs).
    """
    from fastai.vision.all import (
        CategoryBlock, DataBlock, Flip, GrandparentSplitter, ImageBlock, Normalize, Resize,
        imagenet_stats, parent_label,
    )

    if not isinstance(bs, int) or bs < 1:
        raise ValueError(f"bs={bs!r} is invalid; the batch size must be a positive integer")
    path = check_layout(Path(path))

    def items(p):
        train, valid = split_files(p, max_train, max_valid)
        return train + valid

    block = DataBlock(
        blocks=(ImageBlock, CategoryBlock),
        get_items=items,
        splitter=GrandparentSplitter(train_name="train", valid_name="val"),
        get_y=parent_label,
        item_tfms=Resize(size),
        batch_tfms=[Flip(p=0.5), Normalize.from_stats(*imagenet_stats)],
    )
    if num_workers is None:
        num_workers = min(8, os.cpu_count() or 1)
    if seed is not None:
        from fastai.torch_core import set_seed

        set_seed(seed, reproducible=True)
    dls = block.dataloaders(path, bs=bs, val_bs=val_bs, num_workers=num_workers, device=device)
    if len(dls.train) == 0:
        raise DataError(f"data folder {str(path)!r} has fewer training images ({len(dls.train_ds)}) than one batch of {bs}")
    return dls


def split_files(path: str | os.PathLike, max_train: int | None = None,
                max_valid: int | None = None) -> tuple[list[Path], list[Path]]:
    """The training and validation image files both data paths train on: fastai's
    ``get_image_files`` under ``train/`` and ``val/``, sorted, with the fixed subsets of
    ``max_train``/``max_valid`` (smoke runs)."""
    from fastai.vision.all import get_image_files

    files = sorted(get_image_files(path, folders=["train", "val"]))
    train = [f for f in files if f.parent.parent.name == "train"]
    valid = [f for f in files if f.parent.parent.name == "val"]
    return _subset(train, max_train), _subset(valid, max_valid)


def _subset(files: list[Path], n: int | None) -> list[Path]:
    """Every ``len/n``-th file, so a subset keeps every class."""
    if n is None or n >= len(files):
        return files
    step = len(files) / n
    return [files[int(i * step)] for i in range(n)]


def make_fake_imagenette(dest: str | os.PathLike, n_train: int = 8, n_valid: int = 4, size: int = 32,
                         classes: tuple[str, ...] = ("n01440764", "n02102040", "n02979186")) -> Path:
    """Write a tiny folder of random JPEGs in Imagenette's layout (for tests without real data).

    Each class has its own mean colour, so a model can learn something from it.
    """
    import numpy as np
    from PIL import Image

    dest = Path(dest)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_valid)):
        for k, wnid in enumerate(classes):
            folder = dest / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            base = rng.uniform(40, 215, size=3)
            for i in range(n):
                pix = np.clip(base + rng.normal(0, 40, size=(size, size, 3)), 0, 255).astype("uint8")
                Image.fromarray(pix).save(folder / f"{wnid}_{i}.JPEG", quality=90)
    return dest
