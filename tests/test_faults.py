"""Faults a long run must survive without losing finished work (CLI level, in subprocesses).

Kills and full disks are simulated with a ``sitecustomize`` module put on the child's path: it wraps
``os.fsync``, which the checkpoint writer calls after writing a checkpoint's bytes to a temporary file and
before renaming it over the previous checkpoint, i.e. in the middle of a checkpoint write.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from shared_paths import DATA, ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (DATA / "cifar-100-python").is_dir(), reason=f"CIFAR-100 not found at {DATA}"),
]

# resnet8 on 500 images (8 steps an epoch), evaluated on 100 test images.
BASE = [
    "--model", "resnet8", "--train_size", "500", "--test_size", "100", "--data_folder", str(DATA),
    "--deterministic", "--save_freq", "100",
]  # fmt: skip

SITECUSTOMIZE = """
import errno, os
_mode, _at = os.environ.get("KD_FAULT", ""), int(os.environ.get("KD_FAULT_AT", "0"))
_calls = [0]
_fsync = os.fsync
def fsync(fd):
    _calls[0] += 1
    if _calls[0] == _at:
        if _mode == "kill":
            os._exit(137)  # as abrupt as SIGKILL: no cleanup, no rename
        if _mode == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
    return _fsync(fd)
os.fsync = fsync
"""


def env_for(tmp_path: Path, fault: str = "", at: int = 0) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": f"{hook}{os.pathsep}{ROOT}", "KD_FAULT": fault, "KD_FAULT_AT": str(at)}


def teacher(
    tmp_path: Path, *argv: str, fault: str = "", at: int = 0, check: bool = True
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_teacher.py"), *BASE, "--save_dir", str(tmp_path / "save"), *argv],
        cwd=tmp_path, env=env_for(tmp_path, fault, at), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "latest.pth", map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The reference: 3 epochs without interruption."""
    tmp = tmp_path_factory.mktemp("reference")
    teacher(tmp, "--epochs", "3", "--run_name", "run")
    return tmp / "save" / "models" / "run"


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(uninterrupted, tmp_path):
    folder = tmp_path / "save" / "models" / "run"
    # fsync calls: args.json is not fsynced; latest.pth after epoch 1 is call 1, after epoch 2 call 2.
    proc = teacher(tmp_path, "--epochs", "3", "--run_name", "run", fault="kill", at=2, check=False)
    assert proc.returncode == 137
    state = torch.load(folder / "latest.pth", map_location="cpu", weights_only=True)
    assert (state["stage"], state["epoch"]) == ("main", 1)  # the epoch-1 checkpoint survived intact
    assert not (folder / "summary.json").exists()
    teacher(tmp_path, "--epochs", "3", "--run_name", "run", "--resume", "auto")
    assert_same_weights(folder, uninterrupted)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3]


def test_sigterm_saves_at_a_step_boundary_and_resume_completes(uninterrupted, tmp_path):
    folder = tmp_path / "save" / "models" / "run"
    cmd = [sys.executable, str(ROOT / "train_teacher.py"), *BASE, "--save_dir", str(tmp_path / "save")]
    cmd += ["--epochs", "3", "--run_name", "run"]
    child = subprocess.Popen(cmd, cwd=tmp_path, env=env_for(tmp_path), stderr=subprocess.PIPE, text=True)
    # Stop it in the middle of epoch 2: after the epoch-1 checkpoint exists.
    deadline = time.time() + 600
    while not (folder / "latest.pth").exists() and time.time() < deadline and child.poll() is None:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=600)
    assert child.returncode != 0 and "Traceback" not in err
    assert "Resume with the same command plus --resume auto" in err
    state = torch.load(folder / "latest.pth", map_location="cpu", weights_only=True)
    assert state["stage"] == "main" and state["epoch"] >= 1
    teacher(tmp_path, "--epochs", "3", "--run_name", "run", "--resume", "auto")
    assert_same_weights(folder, uninterrupted)
    assert json.loads((folder / "summary.json").read_text())["best_epoch"] >= 1


def test_disk_full_while_saving_is_a_clear_error_and_keeps_the_previous_checkpoint(tmp_path):
    folder = tmp_path / "save" / "models" / "run"
    proc = teacher(tmp_path, "--epochs", "3", "--run_name", "run", fault="enospc", at=2, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "no space left to write" in proc.stderr and "previous checkpoint is intact" in proc.stderr
    state = torch.load(folder / "latest.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []


def test_non_finite_loss_stops_naming_method_epoch_and_step(tmp_path):
    # Epoch 1 at lr 0.01, then the "decay" multiplies it by 1e12: the loss diverges in epoch 2.
    blow_up = ["--epochs", "3", "--learning_rate", "0.01", "--lr_decay_epochs", "1", "--lr_decay_rate", "1e12"]
    proc = teacher(tmp_path, *blow_up, "--run_name", "run", check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "vanilla main: the loss is" in proc.stderr and "at epoch 2, step" in proc.stderr
    state = torch.load(tmp_path / "save" / "models" / "run" / "latest.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v.float()).all() for v in state["model"].values())
    # With --skip_nonfinite the run goes on, skipping (and counting) the bad steps.
    teacher(tmp_path, *blow_up, "--run_name", "skip", "--skip_nonfinite")
    summary = json.loads((tmp_path / "save" / "models" / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] > 0


def test_a_run_in_progress_is_not_overwritten(tmp_path):
    folder = tmp_path / "save" / "models" / "run"
    cmd = [sys.executable, str(ROOT / "train_teacher.py"), *BASE, "--save_dir", str(tmp_path / "save")]
    first = subprocess.Popen(
        [*cmd, "--epochs", "50", "--run_name", "run"], cwd=tmp_path, env=env_for(tmp_path), stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 300
        while not (folder / "args.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = teacher(tmp_path, "--epochs", "50", "--run_name", "run", "--resume", "auto", check=False)
        assert second.returncode == 2 and f"in use by process {first.pid}" in second.stderr
    finally:
        first.kill()
        first.communicate()
