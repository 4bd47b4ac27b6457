"""Where the tests find the project, the data and the teachers.

The real CIFAR-100 and the trained teachers come from ``../shared`` (``$KD_SHARED``; the data also from
``$CIFAR100_ROOT``, the teachers from ``$KD_TEACHERS``). Where they are missing, as on a clone from GitHub, the
tests use ``cifar_fixture.py``'s synthetic CIFAR-100 (500 training and 100 test images in the official pickle
layout) and seeded random-init teachers, so that every claim about the code runs anyway. Only the tests that
compare with numbers of the real data or the trained teachers (their accuracies) need ``../shared``; they are
marked ``needs_real_data`` / ``needs_real_teachers`` and say so when they skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cifar_fixture import random_teacher, synthetic_cifar100

ROOT = Path(__file__).resolve().parents[1]  # the project
SHARED = Path(os.environ.get("KD_SHARED") or ROOT.parent / "shared")  # data and teachers beside it
REAL_DATA = Path(os.environ.get("CIFAR100_ROOT") or SHARED / "data")  # holds cifar-100-python/ when real
REAL_TEACHERS = Path(os.environ.get("KD_TEACHERS") or SHARED / "teachers")  # <arch>_vanilla/ckpt_epoch_240.pth
HAS_REAL_DATA = all((REAL_DATA / "cifar-100-python" / name).is_file() for name in ("train", "test", "meta"))
DATA = REAL_DATA if HAS_REAL_DATA else synthetic_cifar100()  # what the runs of the tests read

needs_real_data = pytest.mark.skipif(
    not HAS_REAL_DATA, reason=f"compares with the real CIFAR-100's numbers; not found at {REAL_DATA}"
)


def real_teacher(arch: str) -> Path:
    return REAL_TEACHERS / f"{arch}_vanilla" / "ckpt_epoch_240.pth"


def needs_real_teachers(*archs: str) -> pytest.MarkDecorator:
    missing = [str(real_teacher(a)) for a in archs if not real_teacher(a).is_file()]
    return pytest.mark.skipif(
        bool(missing) or not HAS_REAL_DATA,
        reason=f"compares with the trained teachers' accuracies; missing: {', '.join(missing) or REAL_DATA}",
    )


def teacher(arch: str) -> Path:
    """The trained teacher ``arch`` from ``../shared`` if there, else a seeded random-init one in its format."""
    path = real_teacher(arch)
    return path if path.is_file() else random_teacher(arch)
