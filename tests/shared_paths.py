"""Where the tests find the project and the shared data (CIFAR-100, the trained teachers)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the project
SHARED = Path(os.environ.get("KD_SHARED") or ROOT.parent / "shared")  # data and teachers beside it
DATA = Path(os.environ.get("CIFAR100_ROOT") or SHARED / "data")  # holds cifar-100-python/
