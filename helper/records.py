"""What a run leaves on disk: ``args.json``, ``metrics.jsonl``, TensorBoard events, ``summary.json``."""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

# RepDistiller's TensorBoard scalar names, written under these names as well.


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


class Recorder:
    """Appends one JSON line per epoch and mirrors the scalars to TensorBoard (``<run>/tb``)."""

    def __init__(self, folder: Path, enabled: bool = True) -> None:
        self.folder = folder
        self.enabled = enabled
        self._writer = None

    def _tb(self) -> Any:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: it is slow to import

            self._writer = SummaryWriter(log_dir=str(self.folder / "tb"), flush_secs=30)
        return self._writer

    def epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        # Init rows go under their own names (``init_train_loss``), each at its own epoch: one step per epoch.
        step = row["epoch"]
        prefix = "" if row.get("stage", "main") == "main" else "init_"
        writer = self._tb()
        for key, value in row.items():
            if isinstance(value, int | float) and key != "epoch":
                writer.add_scalar(prefix + key, value, step)
        writer.flush()

    def truncate_after(self, stage: str, epoch: int) -> None:
        """On resume, drop rows written after the checkpoint (they will be recomputed)."""
        path = self.folder / "metrics.jsonl"
        if not path.exists():
            return
        order = {"init": 0, "main": 1}
        kept = []
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if (order[row.get("stage", "main")], row["epoch"]) <= (order[stage], epoch):
                kept.append(line)
        path.write_text("".join(f"{line}\n" for line in kept))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, Any]:
    """Versions and hardware, recorded in ``summary.json``."""
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": str(device),
        "device_name": device_name,
        "cpu_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }
