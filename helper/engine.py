"""One training loop for teacher training, student training and init stages, and one evaluation.

What differs between those three is an *objective*: a callable that takes a batch and returns the named,
weighted loss terms and the logits used for the training accuracy. The loop itself never names a method.

Nothing on the hot path synchronises the host with the device: losses, accuracies and the record of the first
non-finite loss accumulate in device tensors and are read once per print interval and at the end of the epoch
(tests/test_gpu_path.py counts the reads). Two exceptions, both by request: ``--skip_nonfinite`` needs each
step's answer before its update, and fp16's ``GradScaler`` reads its inf flag on the host at every
``scaler.step`` (inside PyTorch); bf16 needs no scaler and has no such read, so prefer ``--amp bf16``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dataset.batch import Batch
from distiller_zoo import Distiller
from helper.distributed import Distributed

log = logging.getLogger(__name__)

Terms = dict[str, tuple[float, torch.Tensor]]  # name -> (weight, unweighted scalar loss)


class NonFiniteLoss(RuntimeError):
    """A training loss became NaN or infinite."""


# ----------------------------------------------------------------------------------------------------------
# Precision


@dataclass(frozen=True)
class Precision:
    """Autocast settings for one run: ``none`` (fp32), ``bf16`` or ``fp16`` (with a gradient scaler)."""

    amp: str
    device_type: str

    @property
    def dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.amp)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(self.device_type, enabled=self.amp == "fp16")


# ----------------------------------------------------------------------------------------------------------
# Objectives


class Objective:
    """Maps a batch to named loss terms and the logits to score. Subclasses set the modules' modes."""

    def train(self) -> None:
        raise NotImplementedError

    def __call__(self, batch: Batch) -> tuple[Terms, torch.Tensor]:
        raise NotImplementedError


def _term(terms: Terms, name: str, weight: float, compute: Callable[[], torch.Tensor]) -> None:
    """Add a term only when its weight is non-zero (zero-weight terms are never computed)."""
    if weight != 0:
        terms[name] = (weight, compute())


class ClassifierObjective(Objective):
    """Plain cross-entropy training (teachers and vanilla students)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def train(self) -> None:
        self.model.train()

    def __call__(self, batch: Batch) -> tuple[Terms, torch.Tensor]:
        logits = self.model(batch.input)
        return {"ce": (1.0, F.cross_entropy(logits, batch.target))}, logits


def teacher_forward(teacher: nn.Module, x: torch.Tensor, preact: bool) -> Any:
    """The frozen teacher without autograd. ``no_grad`` rather than ``inference_mode``: losses may save its
    outputs for the student's backward pass, which inference tensors forbid (they would need a copy of every
    feature at every step)."""
    with torch.no_grad():
        return teacher(x, is_feat=True, preact=preact)


class DistillObjective(Objective):
    """``gamma * CE + alpha * KL_T + beta * method`` (RepDistiller's ``train_distill``)."""

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        distiller: Distiller,
        gamma: float,
        alpha: float,
        beta: float,
        kd: nn.Module,
        added: Iterable[tuple[str, float, nn.Module]] = (),
    ) -> None:
        """``kd`` is the KD term's module (``distiller_zoo.kd_term``: RepDistiller's KL or a modified one); ``added``:
        ``(name, weight, method)`` of the methods added with ``--add``, each a term of its own."""
        self.student, self.teacher, self.distiller = student, teacher, distiller
        self.added = list(added)
        self.gamma, self.alpha = gamma, alpha
        self.beta = beta if distiller.has_loss else 0.0
        self.kd = kd

    def train(self) -> None:
        self.student.train()
        self.distiller.train()
        self.kd.train()
        for _, _, method in self.added:
            method.train()
        self.teacher.eval()

    def __call__(self, batch: Batch) -> tuple[Terms, torch.Tensor]:
        out_s = self.student(batch.input, is_feat=True, preact=self.distiller.student_preact)
        out_t = teacher_forward(self.teacher, batch.input, self.distiller.preact)
        terms: Terms = {}
        if batch.input_strong is None:
            _term(terms, "ce", self.gamma, lambda: F.cross_entropy(out_s.logits, batch.target))
            _term(terms, "kd", self.alpha, lambda: self.kd(out_s.logits, out_t.logits))
            _term(terms, self.distiller.name, self.beta, lambda: self.distiller(out_s, out_t, batch))
            for name, weight, method in self.added:
                _term(terms, name, weight, lambda m=method: m(out_s, out_t, batch))
            return terms, out_s.logits
        # Two views (MLKD's protocol, KD_ours.forward_train): each network sees each view in a forward of its
        # own (BatchNorm statistics per view); CE and KD are summed over the views, the method's term is its
        # two-view loss; accuracy is scored on the weak view.
        out_s2 = self.student(batch.input_strong, is_feat=True, preact=self.distiller.student_preact)
        out_t2 = teacher_forward(self.teacher, batch.input_strong, self.distiller.preact)
        target = batch.target
        _term(
            terms,
            "ce",
            self.gamma,
            lambda: F.cross_entropy(out_s.logits, target) + F.cross_entropy(out_s2.logits, target),
        )
        _term(
            terms, "kd", self.alpha, lambda: self.kd(out_s.logits, out_t.logits) + self.kd(out_s2.logits, out_t2.logits)
        )
        _term(
            terms, self.distiller.name, self.beta,
            lambda: self.distiller.forward_views((out_s, out_s2), (out_t, out_t2), batch),
        )  # fmt: skip
        return terms, out_s.logits


class InitObjective(Objective):
    """The init stage of AB, FT and FSP: only the method's init loss, on the modules it names."""

    def __init__(self, student: nn.Module, teacher: nn.Module, distiller: Distiller) -> None:
        self.student, self.teacher, self.distiller = student, teacher, distiller
        self.modules = distiller.init_modules(student)

    def train(self) -> None:
        # RepDistiller's init(): teacher and student in eval, the init modules in train mode.
        self.student.eval()
        self.teacher.eval()
        self.distiller.train()
        for module in self.modules:
            module.train()

    def __call__(self, batch: Batch) -> tuple[Terms, torch.Tensor]:
        # The student's features as the main stage reads them (``student_preact``; OFD reads the teacher's
        # pre-activations but the student's after its ReLU), the teacher's as ``preact`` says.
        out_s = self.student(batch.input, is_feat=True, preact=self.distiller.student_preact)
        out_t = teacher_forward(self.teacher, batch.input, self.distiller.preact)
        return {"init": (1.0, self.distiller.init_loss(out_s, out_t, batch))}, out_s.logits


# ----------------------------------------------------------------------------------------------------------
# Meters on the device


@dataclass
class Meter:
    """Sums of per-sample quantities kept on the device; read with :meth:`averages` (one sync)."""

    device: torch.device
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    count: int = 0

    def add(self, name: str, value: torch.Tensor, n: int) -> None:
        value = value.detach().float() * n
        if name in self.sums:
            self.sums[name] += value
        else:
            self.sums[name] = value.clone()

    def averages(self, dist: Distributed | None = None) -> dict[str, float]:
        """The means; with ``dist``, over the samples of every process (sums and counts added first)."""
        if dist is not None and dist.enabled:
            names = list(self.sums)
            count = torch.tensor([float(self.count)], device=self.device)
            totals = dist.sum(torch.cat([torch.stack([self.sums[k] for k in names]), count]))
            self.sums, self.count = dict(zip(names, totals[:-1])), int(totals[-1].item())
        if not self.sums or self.count == 0:
            return {}
        names = list(self.sums)
        values = torch.stack([self.sums[k] for k in names]).cpu().tolist()
        return {k: v / self.count for k, v in zip(names, values)}


def topk_correct(logits: torch.Tensor, target: torch.Tensor, ks: Iterable[int] = (1,)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (device tensors)."""
    maxk = min(max(ks), logits.shape[1])  # top-5 of fewer than 5 classes is top-all
    pred = logits.topk(maxk, dim=1).indices  # (B, maxk)
    hit = pred.eq(target[:, None])  # (B, maxk)
    return [hit[:, :k].any(dim=1).sum() for k in ks]


# ----------------------------------------------------------------------------------------------------------
# The loop


@dataclass
class StepControl:
    """What the loop checks between steps: a stop request (signal) and the non-finite policy."""

    skip_nonfinite: bool = False
    stop_requested: Callable[[], bool] = lambda: False
    skipped: int = 0


def train_one_epoch(
    objective: Objective, loader: Iterable[Batch], optimizer: torch.optim.Optimizer, precision: Precision,
    scaler: torch.amp.GradScaler, device: torch.device, epoch: int, label: str = "train", print_freq: int = 100,
    control: StepControl | None = None, progress: Callable[[Iterable[Batch]], Iterator[Batch]] = iter,
    dist: Distributed | None = None,
) -> dict[str, float]:  # fmt: skip
    """One pass over ``loader``; returns the epoch's mean of every term, the total loss and accuracy.

    The returned dict has ``loss``, ``acc`` (top-1 %, on the augmented training batches), one
    ``loss_<name>`` per term, ``images``, ``seconds`` and, when a stop was requested, ``stopped_at``.
    With several processes (``dist``), ``loader`` serves global batches, each process trains on its share
    and the returned values cover the global batches.
    """
    control = control or StepControl()
    dist = dist or Distributed()
    objective.train()
    meter = Meter(device)
    start = time.perf_counter()
    stopped_at = None
    # The first step whose loss was not finite, kept on the device (NOT_SEEN: none yet) and read only at the
    # print interval and at the end of the epoch, so the host can queue steps ahead of the device.
    first_bad = torch.full((), NOT_SEEN, dtype=torch.int64, device=device)
    checked_to = step = -1  # the last step whose losses were read as finite; the step
    for step, batch in enumerate(progress(loader)):
        batch, scale = dist.shard(batch)  # one process: the batch itself, scale 1
        terms, logits = _forward(objective, batch, precision, (label, epoch, step))
        loss = sum(weight * value.float() for weight, value in terms.values())
        if control.skip_nonfinite:
            # Skipping needs the answer before the update: one host sync per step (and, with several
            # processes, a collective on the global batch's loss), by request only.
            checked = dist.sum(loss.detach() * (scale / dist.world_size)) if dist.enabled else loss
            if not bool(torch.isfinite(checked)):
                control.skipped += 1
                log.warning("%s: skipped a non-finite loss at epoch %d, step %d", label, epoch, step)
                continue
        else:
            first_bad = torch.where(torch.isfinite(loss.detach()) | (first_bad < NOT_SEEN), first_bad, step)
        _update(terms, loss, optimizer, scaler, scale if dist.enabled else None)
        _record(meter, loss, terms, logits, batch.target)
        if print_freq and step % print_freq == 0:
            checked_to = _raise_if_nonfinite(first_bad, checked_to, step, label, epoch, dist)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s epoch %d step %d: %s", label, epoch, step, meter.averages())
        if control.stop_requested():
            stopped_at = step + 1
            break
    _raise_if_nonfinite(first_bad, checked_to, step, label, epoch, dist)  # before any checkpoint is written
    result = meter.averages(dist)
    result["images"] = meter.count
    result["seconds"] = time.perf_counter() - start
    if stopped_at is not None:
        result["stopped_at"] = stopped_at
    return result


def _forward(
    objective: Objective, batch: Batch, precision: Precision, at: tuple[str, int, int]
) -> tuple[Terms, torch.Tensor]:
    """The objective's terms and logits; ``at``: (label, epoch, step) for the error message."""
    try:
        with precision.autocast():
            return objective(batch)
    except torch.linalg.LinAlgError as exc:
        # A decomposition (KD-SVD's SVD) met NaN or inf in its input: the previous update left the model
        # non-finite. Reported like a non-finite loss, so the run stops cleanly on its last good checkpoint.
        label, epoch, step = at
        raise NonFiniteLoss(f"{label}: non-finite values in a decomposition at epoch {epoch}, step {step}") from exc


def _update(
    terms: Terms, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    scale: float | None,
) -> None:  # fmt: skip
    """One optimizer step on ``loss``; ``scale``: this process's share of the global batch (several processes)."""
    optimizer.zero_grad(set_to_none=True)
    if hasattr(optimizer, "step_kd"):  # DOT: the task and distillation gradients go to separate momenta
        _dot_step(terms, optimizer)
        return
    # DDP averages the processes' gradients; weighting each process's mean loss by its share of the
    # global batch makes that average the gradient of the global batch's mean loss.
    scaler.scale(loss if scale is None else loss * scale).backward()
    scaler.step(optimizer)  # fp16 only: GradScaler reads its inf flag on the host here (bf16 does not)
    scaler.update()


def _record(meter: Meter, loss: torch.Tensor, terms: Terms, logits: torch.Tensor, target: torch.Tensor) -> None:
    """The step's loss, terms and top-1 accuracy into the epoch's device sums."""
    n = target.shape[0]
    meter.count += n
    meter.add("loss", loss, n)
    for name, (_, value) in terms.items():
        meter.add(f"loss_{name}", value, n)
    (correct,) = topk_correct(logits.detach(), target)
    meter.add("acc", correct * (100.0 / n), n)


def _dot_step(terms: Terms, optimizer: torch.optim.Optimizer) -> None:
    """mdistiller's ``DOT.train_iter``: back-propagate the distillation terms (all but ``ce``), keep their
    gradients (``step_kd``), then the task term ``ce`` and update (``step``). One process, no loss scaling
    (``--dot`` refuses ``--amp fp16`` and several processes)."""
    task = [w * v.float() for name, (w, v) in terms.items() if name == "ce"]
    distill = [w * v.float() for name, (w, v) in terms.items() if name != "ce"]
    optimizer.zero_grad(set_to_none=True)
    if distill:
        sum(distill).backward(retain_graph=bool(task))
    optimizer.step_kd()
    optimizer.zero_grad(set_to_none=True)
    if task:
        sum(task).backward()
    optimizer.step()


NOT_SEEN = 2**62  # first_bad's value while every loss was finite


def _raise_if_nonfinite(
    first_bad: torch.Tensor, checked_to: int, step: int, label: str, epoch: int, dist: Distributed
) -> int:
    """Read the device's record of non-finite losses (one host sync; several processes: one MIN collective)
    and raise if any step up to ``step`` had one; returns ``step``, now checked."""
    if dist.enabled:
        first_bad = dist.min(first_bad)
    first = int(first_bad)
    if first < NOT_SEEN:
        raise NonFiniteLoss(
            f"{label}: the loss is not finite at epoch {epoch}, step {first} "
            f"(found between steps {checked_to + 1} and {step}, at the check after step {step})"
        )
    return step


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    precision: Precision,
    device: torch.device,
    dist: Distributed | None = None,
) -> dict:
    """Top-1 and top-5 accuracy (%) and mean cross-entropy of ``model`` over ``loader``.

    With several processes (``dist``), each evaluates every ``world_size``-th batch and the sums are added."""
    was_training = model.training
    model.eval()
    meter = Meter(device)
    dist = dist or Distributed()
    if dist.enabled:  # the same names on every process, also on one that gets no batch
        for name in ("loss", "acc", "acc_top5"):
            meter.add(name, torch.zeros((), device=device), 0)
    for i, batch in enumerate(loader):
        if i % dist.world_size != dist.rank:
            continue
        with precision.autocast():
            logits = model(batch.input)
        n = batch.target.shape[0]
        meter.count += n
        meter.add("loss", F.cross_entropy(logits.float(), batch.target), n)
        top1, top5 = topk_correct(logits, batch.target, (1, 5))
        meter.add("acc", top1 * (100.0 / n), n)
        meter.add("acc_top5", top5 * (100.0 / n), n)
    model.train(was_training)
    return meter.averages(dist)
