"""Published CIFAR-100 top-1 accuracies (%), as data, with their sources and protocols.

Two tables live in ``helper/published/``:

* ``repdistiller_cifar100.csv``: RepDistiller's README tables (= CRD paper Tables 1-2): for each of the 13
  teacher/student pairs the teacher, the student trained alone (``vanilla``) and every method, plus the
  paper's CRD+KD rows. RepDistiller reports the LAST epoch of 240 (RepDistiller GitHub #16).
* ``newer_methods_cifar100.csv``: later methods (OFD, ReviewKD, DKD, DIST, CTKD, LS, SimKD, TTM, ...) on the
  standard pairs, each row with its source and its protocol flags (``best-epoch``, ``480 ep``,
  ``extra deployed params``, ...), because those numbers were not all measured the same way.

Columns of both: ``source, setting, teacher, student, method, acc, std, protocol, notes``. Architectures
use the registry names (``wrn_40_2``, ``ShuffleV1``); ``method`` is the ``--distill`` name (``kd``,
``hint``, ``crd``), ``crd+kd`` for CRD with ``-a 1``, ``teacher`` and ``vanilla`` for the two baselines.
An empty ``acc`` is a cell the source marks N/A.
"""

from __future__ import annotations

import csv
import functools
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "published"
TABLES = ("repdistiller_cifar100.csv", "newer_methods_cifar100.csv")

# RepDistiller's pairs (its README, = CRD paper Tables 1 and 2): same family, then across families, in table order.
SAME_FAMILY_PAIRS = (
    ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"),
    ("resnet56", "resnet20"),
    ("resnet110", "resnet20"),
    ("resnet110", "resnet32"),
    ("resnet32x4", "resnet8x4"),
    ("vgg13", "vgg8"),
)
CROSS_FAMILY_PAIRS = (
    ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"),
    ("ResNet50", "vgg8"),
    ("resnet32x4", "ShuffleV1"),
    ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
)
PAIRS = SAME_FAMILY_PAIRS + CROSS_FAMILY_PAIRS
TEACHERS = ("wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50")

# --distill name -> the name used in papers and tables, in RepDistiller's table order.
METHOD_LABELS = {
    "teacher": "Teacher",
    "vanilla": "Vanilla",
    "kd": "KD",
    "hint": "FitNet",
    "attention": "AT",
    "similarity": "SP",
    "correlation": "CC",
    "vid": "VID",
    "rkd": "RKD",
    "pkt": "PKT",
    "abound": "AB",
    "factor": "FT",
    "fsp": "FSP",
    "nst": "NST",
    "crd": "CRD",
    "crd+kd": "CRD+KD",
    "kdsvd": "KDSVD",
    "ofd": "OFD",
    "reviewkd": "ReviewKD",
    "dkd": "DKD",
    "kd+dot": "KD+DOT",
    "dist": "DIST",
    "kd+ctkd": "KD+CTKD",
    "kd+ls": "KD+LS",
    "dkd+ls": "DKD+LS",
    "srrl": "SRRL",
    "semckd": "SemCKD",
    "simkd": "SimKD",
    "itrd": "ITRD",
    "ttm": "TTM",
    "wttm": "WTTM",
    "wttm+itrd": "WTTM+ITRD",
    "catkd": "CAT-KD",
    "wkdf": "WKD-F",
    "fcfd": "FCFD",
    "kd++": "KD++",
    "dist++": "DIST++",
    "dkd++": "DKD++",
    "reviewkd++": "ReviewKD++",
    "mlkd": "MLKD",
    "mlkd+ls": "MLKD+LS",
    "luminet": "LumiNet",
    "rld": "RLD",
    "crld": "CRLD",
    "sdd_kd": "SD-KD",
    "sdd_dkd": "SD-DKD",
    "wkd_l": "WKD-L",
}


def method_label(method: str) -> str:
    """The table name of a ``--distill`` method (unknown names are shown as they are)."""
    return METHOD_LABELS.get(method, method)


def method_rank(method: str) -> tuple[int, str]:
    """Sort key: RepDistiller's table order, then newer methods, then anything else by name."""
    order = list(METHOD_LABELS)
    return (order.index(method), "") if method in order else (len(order), method)


@dataclass(frozen=True)
class Published:
    source: str
    setting: str  # "same" or "cross" family
    teacher: str
    student: str
    method: str
    acc: float | None  # None: marked N/A by the source
    std: float | None
    protocol: str  # "last-epoch; 240 ep", "best-epoch (test set); mean of 5 runs", ...
    notes: str
    table: str  # the CSV file it came from

    @property
    def last_epoch(self) -> bool:
        """Reported at the last epoch (RepDistiller's rule), so directly comparable with our last-epoch mean."""
        return "last-epoch" in self.protocol


def _float(text: str) -> float | None:
    return float(text) if text.strip() else None


@functools.cache
def load(table: str) -> tuple[Published, ...]:
    """All rows of one CSV in ``helper/published/``."""
    with open(DATA_DIR / table, newline="") as f:
        return tuple(
            Published(
                source=row["source"],
                setting=row["setting"],
                teacher=row["teacher"],
                student=row["student"],
                method=row["method"],
                acc=_float(row["acc"]),
                std=_float(row["std"]),
                protocol=row["protocol"],
                notes=row["notes"],
                table=table,
            )
            for row in csv.DictReader(f)
        )


def load_all() -> tuple[Published, ...]:
    return tuple(row for table in TABLES for row in load(table))


def lookup(teacher: str | None, student: str, method: str) -> Published | None:
    """The published number for a result of ours.

    ``method`` is the table method (``kd``, ``crd+kd``, ...). A run without a teacher (``vanilla``, from
    ``train_teacher.py``) matches RepDistiller's vanilla-student number for that architecture, or its
    teacher number when the architecture is one of its teachers. RepDistiller's table is searched first.
    """
    rows = load_all()
    if teacher is None or method in ("vanilla", "teacher"):
        for wanted in ("vanilla", "teacher"):
            for row in rows:
                arch = row.student if wanted == "vanilla" else row.teacher
                if row.method == wanted and arch == student and row.acc is not None:
                    return row
        return None
    for row in rows:
        if (row.teacher, row.student, row.method) == (teacher, student, method):
            return row
    return None


def teacher_accuracy(arch: str) -> float | None:
    """RepDistiller's published accuracy of its teacher checkpoint ``arch`` (None if not one of its teachers)."""
    for row in load(TABLES[0]):
        if row.method == "teacher" and row.teacher == arch:
            return row.acc
    return None
