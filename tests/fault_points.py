"""Run a training script with named fault points, for the fault tests: ``python fault_points.py SCRIPT ARGS...``.

The points are labelled by where they fall in a run, so that a label means the same moment in every process
of a run that reaches it (a resumed process replays its last unfinished epoch):

- ``startup:eval:<j>``: before batch ``j`` of the teacher's evaluation (students), before any training;
- ``<stage>:<epoch>:step:<i>``: before training step ``i`` (0-based, counted from the epoch's start);
- ``<stage>:<epoch>:eval:<j>``: before batch ``j`` of the epoch's evaluation;
- ``<stage>:<epoch>:write:<file>:<phase>``: in ``helper.checkpoint.save_atomic`` writing ``<file>``, phase
  ``partial`` (the second ``write`` of the checkpoint's bytes to its temporary file), ``unrenamed`` (the
  temporary file is complete, at its ``fsync``, before the rename) or ``renamed`` (after the rename).

Environment: ``KD_FAULT_TRACE=<file>`` appends every label reached to that file; ``KD_FAULT_KILL=<label>``
sends this process SIGKILL at that label; ``KD_FAULT_TERM=<label>`` sends it SIGTERM; ``KD_FAULT_ENOSPC=<label>``
makes the write at that label (a ``partial`` or ``unrenamed`` one) fail with ENOSPC, as a full disk does.
Nothing here changes what the script computes.

``python fault_points.py --serve`` imports torch and the project once, then for each request line on stdin
(JSON: ``argv``, ``env``, ``cwd``, ``log``) forks a fresh process that runs ``argv`` with the faults of ``env``
(stdout and stderr to ``log``), waits for it, and answers a line ``{"rc": ...}`` (``-9`` for SIGKILL): a run
then costs no interpreter start and no import of torch, ``torch._inductor`` (which ``--deterministic`` imports)
or TensorBoard: 10-20 s each on a loaded 2-core machine.
"""

from __future__ import annotations

import errno
import json
import os
import runpy
import signal
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common.omp  # noqa: E402, F401 (as the entry points: before torch loads)
import helper.checkpoint as checkpoint  # noqa: E402
import helper.engine as engine  # noqa: E402
import helper.run as run  # noqa: E402

where = ["startup"]  # "<stage>:<epoch>" of the epoch being trained or saved


def point(label: str) -> None:
    trace = os.environ.get("KD_FAULT_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(label + "\n")
    if label == os.environ.get("KD_FAULT_KILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    if label == os.environ.get("KD_FAULT_TERM"):
        os.kill(os.getpid(), signal.SIGTERM)
    if label == os.environ.get("KD_FAULT_ENOSPC"):
        raise OSError(errno.ENOSPC, "No space left on device")


def counted(batches, kind: str):
    for i, batch in enumerate(batches):
        point(f"{where[0]}:{kind}:{i}")
        yield batch


def train_one_epoch(objective, loader, *args, **kwargs):
    label, epoch = kwargs["label"], args[4]  # "<method> <stage>"; args: optimizer, precision, scaler, device, epoch
    where[0] = f"{label.rsplit(' ', 1)[-1]}:{epoch}"
    return _train_one_epoch(objective, counted(loader, "step"), *args, **kwargs)


def evaluate(model, loader, *args, **kwargs):
    return _evaluate(model, counted(loader, "eval"), *args, **kwargs)


class _File:
    """A file whose second ``write`` is a fault point."""

    def __init__(self, f, label: str) -> None:
        self._f, self._label, self._writes = f, label, 0

    def write(self, data):
        self._writes += 1
        if self._writes == 2:
            point(self._label)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def save_atomic(obj, path):
    label = f"{where[0]}:write:{Path(path).name}"
    fdopen, fsync = os.fdopen, os.fsync

    def hooked_fsync(fd):
        point(f"{label}:unrenamed")
        return fsync(fd)

    os.fdopen = lambda *a, **k: _File(fdopen(*a, **k), f"{label}:partial")
    os.fsync = hooked_fsync
    try:
        _save_atomic(obj, path)
    finally:
        os.fdopen, os.fsync = fdopen, fsync
    point(f"{label}:renamed")


_train_one_epoch, _evaluate, _save_atomic = engine.train_one_epoch, engine.evaluate, checkpoint.save_atomic
run.train_one_epoch, run.evaluate, engine.evaluate = train_one_epoch, evaluate, evaluate
checkpoint.save_atomic = save_atomic


def run_script(argv: list[str]) -> int:
    """Run ``argv[0]`` as ``__main__`` with ``argv`` as ``sys.argv``; returns its exit status."""
    sys.argv = list(argv)
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        print(exc.code, file=sys.stderr)
        return 1
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _child(request: dict) -> None:
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        code = run_script(request["argv"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def serve() -> None:
    import torch._inductor  # noqa: F401  (torch.use_deterministic_algorithms imports it: 3-10 s)
    import torch.utils.tensorboard  # noqa: F401  (the run's records)

    for line in sys.stdin:
        request = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            _child(request)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        sys.exit(run_script(sys.argv[1:]))
