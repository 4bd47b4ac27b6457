"""A run from flags to ``summary.json``: set-up, stages, checkpoints, resume, records.

``train_teacher.py`` and ``train_student.py`` only build what differs between them (the model, the
objective, the stages) and hand a :class:`Run` to :func:`fit`; everything else lives here once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

import torch
from torch import nn

from dataset import DeviceLoader
from helper import checkpoint as ckpt_io
from helper.distributed import Distributed
from helper.engine import Objective, Precision, StepControl, evaluate, train_one_epoch
from helper.folder import check_resumable, lock_folder, record_schedule, release_folder
from helper.logs import setup_logging
from helper.records import Recorder, environment, write_json

log = logging.getLogger("kd")


# ----------------------------------------------------------------------------------------------------------
# Set-up


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Stage:
    """A sequence of epochs with one objective and one optimizer (``init`` or ``main``)."""

    name: str
    objective: Objective
    optimizer: torch.optim.Optimizer
    epochs: int
    lr_at: Callable[[int], float]
    evaluate: bool = True  # RepDistiller's init stages do not evaluate
    on_epoch: Callable[[int], None] = lambda epoch: None  # e.g. a method's warm-up schedule


@dataclass
class Run:
    args: argparse.Namespace
    kind: str  # "teacher" or "student"
    method: str  # "vanilla" or the --distill name (named in errors and records)
    folder: Path
    device: torch.device
    precision: Precision
    seed: int
    model: nn.Module  # the model being trained (saved under "model")
    arch: str
    stages: list[Stage]
    train_loader: DeviceLoader
    test_loader: DeviceLoader
    val_loader: DeviceLoader | None = None
    extra_state: dict[str, nn.Module] = field(default_factory=dict)  # e.g. the distiller (CRD memory...)
    summary: dict[str, Any] = field(default_factory=dict)  # facts known before training (teacher acc, ...)
    config: dict[str, Any] = field(default_factory=dict)  # derived values written to args.json
    resume_path: Path | None = None  # from prepare_folder(), called before any work
    eval_model: nn.Module | None = None  # the network evaluated, when it is not ``model`` (SimKD)
    dist: Distributed = field(default_factory=Distributed)  # the processes of a torchrun run (default: one)

    @property
    def evaluated(self) -> nn.Module:
        return self.model if self.eval_model is None else self.eval_model


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop stops at the next step boundary and saves."""

    def __init__(self, repeat_grace: float = 0.0) -> None:
        self.signum: int | None = None
        # torchrun passes a Ctrl-C or SIGTERM on to its processes, which may have had it already: a signal that
        # soon after the first is the same request, not a second one.
        self.repeat_grace = repeat_grace
        self._first_at = 0.0

    def __call__(self) -> bool:
        return self.signum is not None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            if self.signum is not None:  # a second signal: stop now
                if time.monotonic() - self._first_at < self.repeat_grace:
                    return
                raise KeyboardInterrupt
            self.signum, self._first_at = signum, time.monotonic()
            log.warning("received %s: stopping at the next step and saving a checkpoint", signal.Signals(signum).name)

        previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def _state(run: Run, stage: Stage, epoch: int, step: int, best: dict[str, Any], skipped: int) -> dict[str, Any]:
    state = {
        "arch": run.arch,
        "kind": run.kind,
        "model": run.model.state_dict(),
        "stage": stage.name,
        "epoch": epoch,  # epochs of this stage completed
        "step": step,  # steps of the next epoch already done (a stop between steps), else 0
        "optimizer": stage.optimizer.state_dict(),
        "rng": ckpt_io.rng_state(),
        "args": vars(run.args),
        "accuracy": best.get("last_acc"),
        "best": dict(best),
        "skipped_steps": skipped,
    }
    for name, module in run.extra_state.items():
        state[name] = module.state_dict()
    return state


def fit(run: Run) -> dict[str, Any]:
    """Train every stage of ``run`` (resuming if asked), then write ``summary.json``; returns it."""
    run.dist.barrier()  # every process has checked the run folder before rank 0 writes to it
    if run.dist.is_main:
        lock_folder(run.folder)  # held since prepare_folder() (a no-op then)
    try:
        return _fit(run, run.resume_path)
    finally:
        if run.dist.is_main:
            release_folder(run.folder)


@dataclass
class _Progress:
    """Where a run stands: the stage, epoch and step to continue after, the best accuracies, the throughput."""

    start: tuple[str, int, int]
    best: dict[str, Any]
    skipped: int = 0
    images: int = 0
    seconds: float = 0.0


@dataclass
class _Loop:
    """What every epoch of every stage shares: the step control, the stop flag, the records, the scaler."""

    control: StepControl
    stop: _StopFlag
    recorder: Recorder
    scaler: Any


def _fit(run: Run, resume_path: Path | None) -> dict[str, Any]:
    main_process = run.dist.is_main  # rank 0 alone writes the run folder; every process loads it
    setup_logging(run.folder if main_process else None)
    recorder = Recorder(run.folder, enabled=main_process)
    run.dist.check_batches(run.train_loader.num_images, run.train_loader.batch_size, run.train_loader.drop_last)
    progress = _begin(run, recorder, resume_path)
    log.info("run folder: %s", run.folder)
    stop = _StopFlag(repeat_grace=5.0 if run.dist.enabled else 0.0)
    control = StepControl(skip_nonfinite=run.args.skip_nonfinite, stop_requested=run.dist.agreed(stop))
    control.skipped = progress.skipped
    loop = _Loop(control, stop, recorder, run.precision.scaler())
    wall_start = time.perf_counter()
    first = [s.name for s in run.stages].index(progress.start[0])
    with stop.installed():
        for si, stage in enumerate(run.stages[first:], start=first):
            _train_stage(run, si, stage, progress, si == first, loop)
    wall = time.perf_counter() - wall_start
    summary = _summary(run, progress.best, wall, progress.images, progress.seconds, control.skipped)
    if main_process:
        write_json(run.folder / "summary.json", summary)
    recorder.close()
    run.dist.barrier()  # no process leaves before rank 0 has written the summary
    log.info(
        "done: test_acc %.2f (last epoch), best %.2f at epoch %d; %s",
        summary["test_acc"], summary["best_acc"], summary["best_epoch"], run.folder,
    )  # fmt: skip
    return summary


def _begin(run: Run, recorder: Recorder, resume_path: Path | None) -> _Progress:
    """A fresh start (``args.json`` written), or the state of the checkpoint at ``resume_path`` restored."""
    first = "init" if run.stages and run.stages[0].name == "init" else "main"
    progress = _Progress((first, 0, 0), {"best_acc": -1.0, "best_epoch": 0, "val_best_acc": -1.0})
    if resume_path is None:
        if run.dist.is_main:
            write_json(run.folder / "args.json", {"args": vars(run.args), **run.config, **run.dist.record()})
            recorder.truncate_after("init", 0)  # rows of a start killed before its first checkpoint
        return progress
    state = ckpt_io.load_checkpoint(resume_path)
    check_resumable(state, run.args, resume_path)
    run.model.load_state_dict(state["model"])
    for name, module in run.extra_state.items():
        module.load_state_dict(state[name])
    progress = _Progress((state["stage"], state["epoch"], state["step"]), dict(state["best"]))
    progress.skipped = state.get("skipped_steps", 0)
    ckpt_io.set_rng_state(state["rng"])
    for stage in run.stages:
        if stage.name == state["stage"]:
            stage.optimizer.load_state_dict(state["optimizer"])
    if run.dist.is_main:
        recorder.truncate_after(state["stage"], state["epoch"])
        record_schedule(run.folder, run.args.epochs, state["args"].get("epochs"))
    log.info("resuming %s from %s: stage %s, epoch %d, step %d", run.folder, resume_path, *progress.start)
    return progress


def _train_stage(run: Run, si: int, stage: Stage, progress: _Progress, first: bool, loop: _Loop) -> None:
    """The epochs of ``stage`` (the ``si``-th) after those done; ``first``: the stage the run starts (or
    resumes) in, which continues after ``progress.start``'s epoch and step."""
    done_epochs, skip_steps = (progress.start[1], progress.start[2]) if first else (0, 0)
    control = loop.control
    objective = run.dist.wrap(stage.objective, stage.optimizer)  # DDP when several processes
    for epoch in range(done_epochs + 1, stage.epochs + 1):
        data_epoch = epoch + sum(s.epochs for s in run.stages[:si])  # distinct shuffles across stages
        lr = stage.lr_at(epoch)
        stage.on_epoch(epoch)
        for group in stage.optimizer.param_groups:
            group["lr"] = lr
        batches = run.train_loader.epoch(data_epoch, start_batch=skip_steps)
        stats = train_one_epoch(
            objective, batches, stage.optimizer, run.precision, loop.scaler, run.device, epoch,
            label=f"{run.method} {stage.name}", print_freq=run.args.print_freq, control=control,
            progress=_progress(len(run.train_loader) - skip_steps, f"{stage.name} {epoch}"), dist=run.dist,
        )  # fmt: skip
        run.dist.broadcast_buffers([run.model, *run.extra_state.values()])
        if "stopped_at" in stats:
            _stopped(run, stage, epoch, skip_steps + stats["stopped_at"], progress.best, control, loop.stop)
        skip_steps = 0
        progress.images += stats["images"]
        progress.seconds += stats["seconds"]
        row = _epoch_row(run, stage, epoch, lr, stats, progress.best)
        loop.recorder.epoch(row)
        if run.dist.is_main:
            _save(run, stage, epoch, progress.best, control.skipped, row)


def _stopped(run: Run, stage: Stage, epoch: int, steps: int, best: dict, control: StepControl, stop: _StopFlag) -> None:
    """A stop request between steps: ``latest.pth`` saved after step ``steps`` of ``epoch``, then exit."""
    path = run.folder / "latest.pth"
    if run.dist.is_main:
        ckpt_io.save_atomic(_state(run, stage, epoch - 1, steps, best, control.skipped), path)
    run.dist.barrier()  # the checkpoint is on disk before any process exits
    raise SystemExit(
        f"stopped by {signal.Signals(stop.signum).name} at {stage.name} epoch {epoch}, step {steps}; "
        f"saved {path}. Resume with the same command plus --resume auto"
        if run.dist.is_main
        else 1  # rank 0 says it
    )


def _progress(total: int, desc: str) -> Callable[[Any], Any]:
    """A tqdm bar when attached to a terminal, nothing otherwise."""
    if not sys.stderr.isatty():
        return iter
    from tqdm import tqdm

    return lambda it: iter(tqdm(it, total=total, desc=desc, leave=False, dynamic_ncols=True))


def _epoch_row(run: Run, stage: Stage, epoch: int, lr: float, stats: dict, best: dict) -> dict[str, Any]:
    row: dict[str, Any] = {"stage": stage.name, "epoch": epoch, "lr": lr}
    row["train_loss"] = stats.get("loss")
    row["train_acc"] = stats.get("acc")
    row.update({k: v for k, v in stats.items() if k.startswith("loss_")})
    row["epoch_time"] = stats["seconds"]
    row["images_per_sec"] = stats["images"] / max(stats["seconds"], 1e-9)
    if stage.evaluate and (epoch % run.args.eval_freq == 0 or epoch == stage.epochs):
        test = evaluate(run.evaluated, run.test_loader, run.precision, run.device, dist=run.dist)
        row.update(test_acc=test["acc"], test_acc_top5=test["acc_top5"], test_loss=test["loss"])
        if stage.name == "main":
            best["last_acc"], best["last_acc_top5"] = test["acc"], test["acc_top5"]
            best["new_best"] = test["acc"] > best["best_acc"]
            if best["new_best"]:
                best["best_acc"], best["best_epoch"] = test["acc"], epoch
        if run.val_loader is not None:
            val = evaluate(run.evaluated, run.val_loader, run.precision, run.device, dist=run.dist)
            row.update(val_acc=val["acc"], val_loss=val["loss"])
            if stage.name == "main" and val["acc"] > best["val_best_acc"]:
                best.update(val_best_acc=val["acc"], val_best_epoch=epoch, test_acc_at_val_best=test["acc"])
    line = " ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float))
    log.info("%s epoch %d/%d: %s", stage.name, epoch, stage.epochs, line)
    return row


def _save(run: Run, stage: Stage, epoch: int, best: dict, skipped: int, row: dict) -> None:
    """The epoch's published files, then ``latest.pth``: a resume starts from ``latest.pth``, so a kill at any
    moment either redoes this epoch (and rewrites its files) or finds every one of them written."""
    state = _state(run, stage, epoch, 0, best, skipped)
    if stage.name == "main":
        _save_published(run, stage, epoch, best, row, state)
    ckpt_io.save_atomic(state, run.folder / "latest.pth")


def _save_published(run: Run, stage: Stage, epoch: int, best: dict, row: dict, state: dict[str, Any]) -> None:
    if epoch % run.args.save_freq == 0 or epoch == stage.epochs:
        ckpt_io.save_atomic(state, run.folder / f"ckpt_epoch_{epoch}.pth")
    if best.pop("new_best", False):
        # RepDistiller's best checkpoint: selected on the TEST set, kept for compatibility only.
        best_state = {"arch": run.arch, "epoch": epoch, "model": state["model"], "best_acc": best["best_acc"]}
        ckpt_io.save_atomic(best_state, run.folder / f"{run.arch}_best.pth")
    if run.val_loader is not None and best.get("val_best_epoch") == epoch:
        val_state = {"arch": run.arch, "epoch": epoch, "model": state["model"], "val_acc": row.get("val_acc")}
        ckpt_io.save_atomic(val_state, run.folder / f"{run.arch}_val_best.pth")
    if epoch == stage.epochs:
        last = {"arch": run.arch, "epoch": epoch, "model": state["model"], "accuracy": row.get("test_acc")}
        ckpt_io.save_atomic(last, run.folder / f"{run.arch}_last.pth")


def _summary(run: Run, best: dict, wall: float, images: int, seconds: float, skipped: int) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "kind": run.kind,
        "arch": run.arch,
        "test_acc": best.get("last_acc"),
        "test_acc_top5": best.get("last_acc_top5"),
        "best_acc": best["best_acc"],
        "best_epoch": best["best_epoch"],
        "params": count_parameters(run.model),
        "wall_time": wall,
        "images_per_sec": images / seconds if seconds else None,
        "seed": run.seed,
        "skipped_steps": skipped,
        "environment": environment(run.device),
        **run.summary,
        **run.dist.record(),
    }
    if run.val_loader is not None:
        summary["val_best_acc"] = best.get("val_best_acc")
        summary["val_best_epoch"] = best.get("val_best_epoch")
        summary["test_acc_at_val_best"] = best.get("test_acc_at_val_best")
    return summary
