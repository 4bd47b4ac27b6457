"""Console lines and ``run.log`` through :mod:`logging`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TextIO


class _EarlyRecords(logging.Handler):
    """Keeps the lines logged before the run folder exists (data, teacher accuracy), for ``run.log``."""

    LIMIT = 1000  # a process that never gets a run folder does not grow without bound

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.LIMIT:
            self.records.append(record)


class _Stderr(logging.StreamHandler):
    """Console lines to the ``sys.stderr`` of the moment they are written: a caller that replaces it after
    the first run of the process (an in-process second run, a test's capture) still gets them."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass  # StreamHandler.__init__ sets it; the property above always answers


def setup_logging(folder: Path | None = None) -> None:
    """Console lines (and ``run.log`` in the run folder, from the first line of the process on) through
    :mod:`logging`."""
    root = logging.getLogger()
    if not any(getattr(h, "_kd", False) for h in root.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        handler._kd = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        root.addHandler(_EarlyRecords())
        root.setLevel(logging.INFO)
    if folder is not None:
        handler = logging.FileHandler(folder / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        for early in [h for h in root.handlers if isinstance(h, _EarlyRecords)]:
            for record in early.records:
                handler.handle(record)
            root.removeHandler(early)
        root.addHandler(handler)
