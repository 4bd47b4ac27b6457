"""A small synthetic CIFAR-100 and random-init teachers, for the tests of a clone without ``../shared``.

The folder is ``cifar-100-python/{train,test,meta}`` in the official archive's pickle layout: protocol-2 pickles
whose strings are Python 2 ``str`` (so ``pickle.load(f, encoding="bytes")`` gives the keys ``b'data'``,
``b'fine_labels'``, ``b'coarse_labels'``, ``b'filenames'``, ``b'batch_label'`` and ``encoding="latin1"`` gives
``str`` keys, as for the official files), ``data`` a (N, 3072) uint8 array of R, G, B planes.

The images are learnable: each class has a coarse colour pattern (4x4 blocks of 8x8 pixels, mirror-symmetric so
a horizontal flip keeps it), each image is its class's pattern plus Gaussian noise. Training on them lowers the
loss within a few epochs, as on the real data; their accuracies say nothing about CIFAR-100.

Written once per content version into a folder of the system's temporary directory (an atomic rename, so
parallel test processes and torchrun's workers share one copy); the content depends on nothing but the constants
here.
"""

from __future__ import annotations

import os
import pickle
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS, TEST_PER_CLASS = 5, 1  # 500 training and 100 test images: the largest subsets the tests ask for
VERSION = "v1"  # change with any change to the content below
NOISE_STD = 24.0  # pixel noise around each class's pattern (0..255 scale)


class _Py2Pickler(pickle._Pickler):
    """A protocol-2 pickler that writes every ``str`` and ``bytes`` as a Python 2 string (SHORT_BINSTRING /
    BINSTRING) and NumPy's globals under ``numpy.core``, as the official files (written by Python 2) hold them."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj: str | bytes) -> None:
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string

    def save_global(self, obj, name=None) -> None:
        module, qualname = obj.__module__.replace("numpy._core", "numpy.core"), name or obj.__qualname__
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
        self.memoize(obj)

    dispatch[type] = save_global


def _dump(obj: dict, path: Path) -> None:
    with open(path, "wb") as f:
        _Py2Pickler(f, protocol=2).dump(obj)


def class_names() -> list[str]:
    return [f"class{i:02d}" for i in range(100)]


def _patterns(seed: int) -> np.ndarray:
    """(100, 3, 32, 32): per class, 4x4 blocks of random colour, the right half mirroring the left."""
    half = np.random.default_rng(seed).integers(40, 216, (100, 3, 4, 2))
    return np.concatenate([half, half[..., ::-1]], axis=3).repeat(8, axis=2).repeat(8, axis=3)


def make_split(split: str, per_class: int, patterns: np.ndarray, seed: int) -> dict:
    """One split as the official file holds it: ``per_class`` images a class, each its pattern plus noise,
    in a random order."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(100), per_class)
    rng.shuffle(labels)
    pixels = patterns[labels] + rng.normal(0.0, NOISE_STD, (len(labels), 3, 32, 32))
    data = np.clip(np.rint(pixels), 0, 255).astype(np.uint8).reshape(len(labels), 3072)
    return {
        "batch_label": f"synthetic {split} batch 1 of 1",
        "fine_labels": labels.tolist(),
        "coarse_labels": (labels // 5).tolist(),
        "filenames": [f"synthetic_{split}_{i:05d}.png" for i in range(len(labels))],
        "data": data,
    }


def write_cifar100(root: Path, train_per_class: int = TRAIN_PER_CLASS, test_per_class: int = TEST_PER_CLASS,
                   seed: int = 0) -> Path:  # fmt: skip
    """Write ``root/cifar-100-python/{train,test,meta}``; returns ``root``. Both splits share the class patterns
    (drawn from ``seed``); their noise and order come from ``seed + 1`` and ``seed + 2``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    patterns = _patterns(seed)
    _dump(make_split("train", train_per_class, patterns, seed + 1), folder / "train")
    _dump(make_split("test", test_per_class, patterns, seed + 2), folder / "test")
    meta = {"fine_label_names": class_names(), "coarse_label_names": [f"superclass{i:02d}" for i in range(20)]}
    _dump(meta, folder / "meta")
    return root


def _cache() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"kd-bench-tests-{uid}" / VERSION


def _publish(final: Path, write) -> Path:
    """``write(tmp)`` into a private folder, renamed to ``final`` unless another process got there first."""
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        write(tmp)
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def synthetic_cifar100() -> Path:
    """The shared synthetic folder (holds ``cifar-100-python``), written on first use."""
    return _publish(_cache() / "data", write_cifar100)


def random_teacher(arch: str) -> Path:
    """``<cache>/teachers/<arch>_vanilla/ckpt_epoch_240.pth``: a seeded random-init ``arch`` in RepDistiller's
    format (``{'model': state_dict}``), named as the published teachers so the architecture is read from the
    path. Its BatchNorms get non-trivial statistics and affine values, as a trained teacher's, so that a loader
    or a fold that lost them would change the outputs. Stands in where a test needs a teacher, not a trained one."""
    import torch

    from models import create_model

    def write(tmp: Path) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = create_model(arch)
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, torch.nn.BatchNorm2d):
                        m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
                        m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
            torch.save({"model": model.state_dict(), "epoch": 240}, tmp / "ckpt_epoch_240.pth")

    return _publish(_cache() / "teachers" / f"{arch}_vanilla", write) / "ckpt_epoch_240.pth"
