"""The run folder: created, locked for the life of the run, refused when it holds another run; resumption's
checks (the checkpoint to resume from, the flags that must match) and a longer schedule's take-over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

from helper import checkpoint as ckpt_io
from helper.options import UsageError, schedule_variants
from helper.records import write_json

log = logging.getLogger("kd")

# Run folders this process holds the lock of: resolved folder -> descriptor of its open ``run.lock``.
_LOCKS: dict[Path, int] = {}


# Flags that may differ between a run and its resumption; every other flag must match.
RESUME_FREE_FLAGS = {
    "resume", "device", "print_freq", "tb_freq", "num_workers", "save_freq", "compile", "eval_batch_size",
    "data_folder", "epochs", "eval_freq",
    "channels_last", "fold_teacher_bn",  # these two change float rounding only
}  # fmt: skip


class RunFinished(Exception):
    """``--resume auto`` on a run that already finished: nothing to do (exit status 0)."""


def prepare_folder(folder: Path, args: argparse.Namespace) -> Path | None:
    """Create the run folder and lock it for the life of this process (:func:`lock_folder`), refusing to
    overwrite another run; returns the checkpoint to resume from. ``--resume auto`` with a longer ``--epochs``
    first takes over this run's folder of the shorter schedule (:func:`_extend`)."""
    main = int(os.environ.get("RANK", "0")) == 0  # torchrun's rank 0 alone locks and writes the folder
    if args.resume == "auto" and not (folder / "args.json").exists():
        _extend(folder, args, main)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_test.{os.getpid()}"  # per process: the processes of one run probe at once
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--save_dir {args.save_dir}: cannot write the run folder {folder} ({exc.strerror})") from None
    if not main:
        return _resume_path(folder, args)
    lock_folder(folder)
    try:
        ckpt_io.remove_partial_writes(folder)
        return _resume_path(folder, args)
    except BaseException:
        release_folder(folder)
        raise


def _resume_path(folder: Path, args: argparse.Namespace) -> Path | None:
    started = (folder / "args.json").exists()
    if args.resume is None:
        if started:
            raise UsageError(
                f"run folder {folder} already holds a run; pass --resume auto to continue it, "
                "or another --trial / --run_name for a new one"
            )
        return None
    if args.resume == "auto":
        summary = folder / "summary.json"
        if summary.exists() and _finished_epochs(summary) >= args.epochs:
            raise RunFinished(f"{folder} already finished (summary.json exists); nothing to do")
        latest = folder / "latest.pth"
        return latest if latest.exists() else None
    return Path(args.resume)


def _extend(folder: Path, args: argparse.Namespace, main: bool) -> None:
    """Extending a run: its folder name carries the schedule (``_ep<N>``, see ``helper.options``), so this
    run's folder under the longest shorter ``--epochs`` that exists is renamed to ``folder`` (one atomic
    rename, done under that folder's lock), and the run resumes there from its ``latest.pth``. Its
    ``summary.json`` goes: the run is finished again when the longer schedule is."""
    shorter = {n: p for n, p in schedule_variants(folder, args).items() if n < args.epochs}
    sources = [shorter[n] for n in sorted(shorter, reverse=True) if (shorter[n] / "args.json").exists()]
    if not sources:
        return
    source = sources[0]
    if not main:  # wait for rank 0's rename (torchrun ends this process if rank 0 fails)
        deadline = time.monotonic() + 300
        while source.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    lock_folder(source)
    try:
        os.rename(source, folder)  # replaces an empty ``folder``, fails on one that holds files
    except OSError as exc:
        release_folder(source)
        raise UsageError(
            f"--resume auto: cannot extend {source} to --epochs {args.epochs} in {folder} ({exc.strerror}); "
            f"move {folder} away"
        ) from None
    _LOCKS[folder.resolve()] = _LOCKS.pop(source.resolve())
    (folder / "summary.json").unlink(missing_ok=True)  # not finished until the longer schedule is
    log.info("extending %s to --epochs %d: renamed to %s", source, args.epochs, folder)


def lock_folder(folder: Path) -> None:
    """Hold an exclusive ``flock`` on ``folder/run.lock`` until :func:`release_folder` or this process ends.

    The kernel drops the lock when the process dies, however it dies (``kill -9`` included), so a killed
    run's folder can be resumed at once; a PID written in the file only names the holder in the message.
    The lock file is removed on release while still locked; a process that locked a removed file sees it
    and tries again, so two processes never hold locks on different files of one folder.
    """
    key = folder.resolve()
    held = _LOCKS.get(key)
    if held is not None and _same_file(held, folder / "run.lock"):
        return
    if held is not None:  # the folder was removed and made again under us
        os.close(_LOCKS.pop(key))
    path = folder / "run.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _try_lock(fd):
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            who = f"process {holder}" if holder.isdigit() else "another process"
            raise UsageError(f"run folder {folder} is in use by {who}; wait for it or choose another --trial")
        if _same_file(fd, path):
            break
        os.close(fd)  # released and removed between our open and our lock: lock the new file
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _LOCKS[key] = fd


def release_folder(folder: Path) -> None:
    """Remove ``folder/run.lock`` and release it (no-op if this process does not hold it)."""
    fd = _LOCKS.pop(folder.resolve(), None)
    if fd is None:
        return
    if _same_file(fd, folder / "run.lock"):
        with contextlib.suppress(OSError):
            (folder / "run.lock").unlink()
    os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except OSError:
        return False


def _try_lock(fd: int) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # Windows: a byte-range lock, also released by the system when the process ends
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


def _finished_epochs(summary: Path) -> int:
    """The schedule length a finished run trained for (a longer --epochs continues it)."""
    try:
        return int(json.loads(summary.read_text()).get("epochs", 0))
    except (OSError, ValueError, TypeError):
        return 0


def check_resumable(state: dict[str, Any], args: argparse.Namespace, path: Path) -> None:
    saved = state.get("args")
    if not isinstance(saved, dict) or "stage" not in state:
        raise UsageError(f"--resume {path}: not a checkpoint of this project's runs (no run state)")
    current = vars(args)
    for key, value in current.items():
        if key in RESUME_FREE_FLAGS or key not in saved:
            continue
        if saved[key] != value:
            raise UsageError(
                f"--resume {path}: that run used --{key} {saved[key]!r}, this one --{key} {value!r}; "
                "resume with the same flags"
            )


def record_schedule(folder: Path, epochs: int, previous: Any) -> None:
    """A run extended to a longer ``--epochs``: ``args.json`` gives the new schedule and the earlier ones."""
    path = folder / "args.json"
    if previous == epochs or not path.exists():
        return
    record = json.loads(path.read_text())
    record["args"]["epochs"] = epochs
    record["extended_from_epochs"] = [*record.get("extended_from_epochs", []), previous]
    write_json(path, record)
