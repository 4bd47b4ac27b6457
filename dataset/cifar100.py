"""CIFAR-100 from the ``cifar-100-python`` pickles: find, download, verify, load, split.

The folder layout is the one torchvision's ``CIFAR100`` reads (``<root>/cifar-100-python/{train,test,meta}``),
so an existing torchvision download is reused as is. Files are accepted either by their official md5 or,
failing that, by a content check (keys, dtype, shape, label range): copies rebuilt from other sources, such as
the offline copy these machines use, differ in their ``filenames`` strings only, and torchvision refuses them.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

BASE_FOLDER = "cifar-100-python"
# The official archive and its md5, the values torchvision's CIFAR100 uses (torchvision/datasets/cifar.py).
URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE = "cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# md5 of each extracted file of the official archive (same source).
OFFICIAL_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}
# Krizhevsky (2009): 100 classes, 500 training and 100 test images per class, 32x32 RGB.
NUM_CLASSES = 100
FULL_SIZE = {"train": 50_000, "test": 10_000}
IMAGE_SHAPE = (3, 32, 32)
ROW_BYTES = 3 * 32 * 32  # one image: R, G, B planes of 32x32, row-major

# The only globals a CIFAR pickle needs: numpy arrays (the pixels). Anything else in the file is refused,
# so a tampered file cannot run code when it is read.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),  # written by NumPy 1.x (the official files)
    ("numpy._core.multiarray", "_reconstruct"),  # written by NumPy 2.x
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5, NumPy 1.x
    ("numpy._core.numeric", "_frombuffer"),  # pickle protocol 5, NumPy 2.x
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),  # how pickle protocol 2 stores bytes when written by Python 3
}


class DataError(ValueError):
    """The data cannot be found, downloaded or read; the message says which file or folder and the fix."""


@dataclass(frozen=True)
class CIFAR100:
    train_images: torch.Tensor  # (N_train, 3, 32, 32) uint8, N_train = 50000 for the full set
    train_labels: torch.Tensor  # (N_train,) int64 fine labels in 0..99
    test_images: torch.Tensor  # (N_test, 3, 32, 32) uint8
    test_labels: torch.Tensor  # (N_test,) int64
    classes: list[str]  # the 100 fine class names, in label order
    root: Path  # the folder that holds cifar-100-python/

    @property
    def n_data(self) -> int:
        """Number of training images (the row count of CRD's memory)."""
        return len(self.train_labels)


def resolve_data_folder(data_folder: str | os.PathLike | None) -> Path:
    """The data folder: ``--data_folder`` if given, else ``$CIFAR100_ROOT``, else ``./data``."""
    if data_folder:
        return Path(data_folder).expanduser()
    env = os.environ.get("CIFAR100_ROOT")
    if env:
        return Path(env).expanduser()
    return Path("./data")


def download_official(root: Path) -> None:
    """Download and extract the official archive into ``root`` (torchvision checks the archive's md5)."""
    # Imported here: torchvision is only needed when the data is missing.
    from torchvision.datasets.utils import download_and_extract_archive

    download_and_extract_archive(URL, str(root), filename=ARCHIVE, md5=ARCHIVE_MD5)


def load_cifar100(
    root: str | os.PathLike,
    download: bool = True,
    downloader: Callable[[Path], None] | None = None,
) -> CIFAR100:
    """Read CIFAR-100 from ``root/cifar-100-python``, downloading it first if missing and ``download``.

    ``root`` may also be the ``cifar-100-python`` folder itself. ``downloader(root)`` fetches the data into
    ``root`` (default: :func:`download_official`); tests replace it to simulate a machine without network.
    Raises :class:`DataError` with one message naming the folder or file and the fix.
    """
    root = Path(root).expanduser()
    if root.name == BASE_FOLDER and not (root / BASE_FOLDER).is_dir() and (root / "meta").is_file():
        root = root.parent
    folder = root / BASE_FOLDER
    if _missing(folder):
        _fetch(root, folder, download, downloader or download_official)

    parsed, differ = {}, []
    for name in ("meta", "train", "test"):
        parsed[name], official = _read_verified(folder / name)
        if not official:
            differ.append(name)
    classes = _class_names(parsed["meta"], folder / "meta")
    train_images, train_labels = _arrays(parsed["train"], "train", folder)
    test_images, test_labels = _arrays(parsed["test"], "test", folder)
    if differ:
        log.info(
            "CIFAR-100 files %s in %s differ from the official checksums; accepted after a content check "
            "(keys, shapes, label range)",
            ", ".join(differ), folder,
        )  # fmt: skip
    return CIFAR100(train_images, train_labels, test_images, test_labels, classes, root)


def _missing(folder: Path) -> list[str]:
    return [name for name in OFFICIAL_MD5 if not (folder / name).is_file()]


def _fetch(root: Path, folder: Path, download: bool, downloader: Callable[[Path], None]) -> None:
    how = (
        f"Provide the data with --data_folder DIR or CIFAR100_ROOT=DIR, where DIR holds the {BASE_FOLDER} "
        f"folder (train, test, meta), or place the {BASE_FOLDER} folder in {root}"
    )
    looked = f"CIFAR-100 not found: {folder} lacks {', '.join(_missing(folder))}"
    if not download:
        raise DataError(f"{looked} and downloading is off. {how}")
    log.info("CIFAR-100 not found in %s; downloading %s", folder, URL)
    try:
        downloader(root)
    except Exception as err:  # any failure (no network, refused, bad archive) ends in the same advice
        raise DataError(f"{looked} and the download from {URL} failed ({err}). {how}") from err
    if _missing(folder):
        raise DataError(f"{looked} even after downloading {URL}. {how}")


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _read_verified(path: Path) -> tuple[dict, bool]:
    """Unpickle ``path`` (Python 2 pickles, hence latin1); returns the dict and whether its md5 is official."""
    raw = path.read_bytes()
    official = hashlib.md5(raw, usedforsecurity=False).hexdigest() == OFFICIAL_MD5[path.name]
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError, AttributeError,
            ImportError, IndexError, KeyError, MemoryError) as err:  # fmt: skip
        # Truncated or garbage files raise any of these from inside pickle; the user needs the file name.
        raise DataError(
            f"{path} is truncated or corrupt ({type(err).__name__}: {err}); delete it and download again, "
            "or point --data_folder / CIFAR100_ROOT at an intact copy"
        ) from err
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR-100 file (holds a {type(obj).__name__}, not a dict)")
    return obj, official


def _class_names(meta: dict, path: Path) -> list[str]:
    names = meta.get("fine_label_names")
    if not isinstance(names, list) or len(names) != NUM_CLASSES or not all(isinstance(n, str) for n in names):
        raise DataError(f"{path} is not CIFAR-100's meta file (no list of {NUM_CLASSES} 'fine_label_names')")
    return names


def _arrays(obj: dict, split: str, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Check the content of one split and return (images (N, 3, 32, 32) uint8, labels (N,) int64)."""
    path = folder / split
    if "data" not in obj or "fine_labels" not in obj:
        raise DataError(f"{path} is not a CIFAR-100 file (keys 'data' and 'fine_labels' expected)")
    data = obj["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' should be uint8 (N, {ROW_BYTES}), found {desc}")
    try:
        labels = np.asarray(obj["fine_labels"], dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: 'fine_labels' is not a list of integers") from err
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise DataError(f"{path}: labels outside 0..{NUM_CLASSES - 1}")
    if len(data) != FULL_SIZE[split]:
        log.warning(
            "%s holds %d images, not CIFAR-100's %d: results are not comparable with published ones",
            path, len(data), FULL_SIZE[split],
        )  # fmt: skip
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, *IMAGE_SHAPE)
    return images, torch.from_numpy(labels)


def split_indices(
    labels: torch.Tensor | np.ndarray,
    train_size: int | None = None,
    val_size: int = 0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced, seeded split of the training set into (train_idx, val_idx), both sorted int64.

    ``val_size`` images (``val_size / classes`` per class) are held out first; ``train_size`` (``None``: all
    the rest) are then taken from the remainder, equally from every class. The two sets are disjoint and
    depend only on ``labels`` and ``seed``.
    """
    # NumPy: a one-off sort of 50,000 labels, where torch's thread pool only adds overhead.
    labels = np.asarray(torch.as_tensor(labels, dtype=torch.int64).cpu())
    counts = np.unique(labels, return_counts=True)[1]
    n_cls, smallest = len(counts), int(counts.min())
    # At least one image per class must stay for training.
    val_per = _per_class(val_size, "--val_size", n_cls, smallest - 1, "available in the smallest class")
    if train_size is None:
        train_per = None
    else:
        train_per = _per_class(train_size, "--train_size", n_cls, smallest - val_per,
                               f"left per class after --val_size {val_size}")  # fmt: skip
        if train_per == 0:
            raise DataError("--train_size must be positive")
    keys = np.random.default_rng(seed).random(len(labels))  # (N,) random order within each class
    order = np.lexsort((keys, labels))  # (N,) grouped by class, random within
    starts = np.cumsum(counts) - counts  # first position of each class in `order`
    rank = np.empty(len(labels), dtype=np.int64)
    rank[order] = np.arange(len(labels)) - np.repeat(starts, counts)  # (N,) rank within its class
    val_mask = rank < val_per
    train_mask = ~val_mask if train_per is None else (rank >= val_per) & (rank < val_per + train_per)
    return torch.from_numpy(np.flatnonzero(train_mask)), torch.from_numpy(np.flatnonzero(val_mask))


def _per_class(size: int, flag: str, n_cls: int, available: int, where: str) -> int:
    if size < 0 or size % n_cls:
        raise DataError(f"{flag} {size} must be a non-negative multiple of the {n_cls} classes (class-balanced)")
    per = size // n_cls
    if per > available:
        raise DataError(f"{flag} {size} asks for {per} images per class but only {available} are {where}")
    return per
