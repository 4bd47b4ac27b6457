"""Images per second of full distillation training steps: this project's engine against a RepDistiller-style loop.

    python scripts/benchmark.py --quick --threads 1                  # CPU: kd and crd, a few minutes
    python scripts/benchmark.py --device cpu --threads 1             # every method, CPU settings
    python scripts/benchmark.py --device cuda                        # every method, bf16 / channels-last / compile
    python scripts/benchmark.py --device cuda --parallel 4 --methods kd,crd   # 4 runs at once on one GPU

A step is everything a training step does: make the batch (and CRD's contrast indices), the teacher's forward,
the student's forward and backward, every loss term, the optimizer step. For each method it times, in one run,
alternating between them round after round; the table gives each one's best round, and the speed-up both as best
round over best round and as the median of the per-round ratios (robust to load from elsewhere):

* **baseline**, built as RepDistiller builds it: a torchvision ``CIFAR100`` subclass returning PIL images through
  ``RandomCrop(32, padding=4)``, ``RandomHorizontalFlip()``, ``ToTensor()``, ``Normalize`` (for CRD, RepDistiller's
  ``CIFAR100InstanceSample``: a per-image ``np.random.choice`` of K negatives) in a shuffled ``DataLoader``
  (batch 64, ``--workers`` processes); fp32; the teacher under ``torch.no_grad()``; the KL term always computed;
  ``loss.item()`` and the top-1/top-5 accuracy read on the host every step (RepDistiller's ``AverageMeter``);
  CRD's scores from the gathered ``B x (K+1)`` memory rows (RepDistiller's ``ContrastMemory``). The models, loss
  modules, weights and optimizer are those ``train_student.py`` builds (fp32, no fast path), so the comparison
  isolates the loop, the data pipeline and the fast path, not differences between loss implementations.
* **ours**, one column per fast-path setting: the run ``train_student.build()`` makes from the same flags plus the
  setting (``--amp``, ``--channels_last``, ``--compile``), driven by ``helper.engine.train_one_epoch`` over the
  device-held data (``dataset.DeviceLoader``).

With ``--fixed_batch`` every configuration gets a twin that runs the same step on the same models over one batch
held in memory; the second table gives the data pipeline's share of a step, ``1 - loop / twin`` (what remains is
the models' arithmetic, the losses and the optimizer).

The teacher is ``--path_t``, else ``$KD_TEACHERS/<arch>_vanilla/ckpt_epoch_240.pth`` when it exists, else a randomly
initialised one with calibrated BN statistics (speed does not depend on the weights).
The data is the real CIFAR-100 training set (``--data_folder``, else ``$CIFAR100_ROOT``). Warm-up steps
(``--warmup``) run before each timed round; compilation happens in the first, untimed, warm-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import count, islice, repeat
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as `python scripts/benchmark.py`: the project's packages

from dataset import CIFAR100_MEAN, CIFAR100_STD, Batch, load_cifar100, resolve_data_folder  # noqa: E402
from distiller_zoo import method_names  # noqa: E402
from distiller_zoo.CRD import ContrastMemory  # noqa: E402
from helper.engine import DistillObjective, NonFiniteLoss, train_one_epoch  # noqa: E402
from helper.options import student_parser  # noqa: E402
from helper.run import Run  # noqa: E402
from helper.setup import cli_errors  # noqa: E402

log = logging.getLogger("benchmark")

BASELINE = "baseline"
QUICK_METHODS = ("kd", "crd")


# ----------------------------------------------------------------------------------------------------------
# Fast-path settings


@dataclass(frozen=True)
class Setting:
    """One combination of the fast-path flags of ``train_student.py``."""

    amp: str = "none"
    channels_last: bool = False
    compile: bool = False
    fold: bool = False

    @property
    def label(self) -> str:
        parts = [self.amp if self.amp != "none" else "fp32"]
        parts += ["channels_last"] * self.channels_last + ["fold"] * self.fold + ["compile"] * self.compile
        return "+".join(parts)

    def flags(self) -> list[str]:
        return (
            ["--amp", self.amp] + (["--channels_last"] if self.channels_last else ["--no_channels_last"])
            + (["--fold_teacher_bn"] if self.fold else ["--no_fold_teacher_bn"]) + ["--compile"] * self.compile
        )  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> Setting:
        """``fp32``, ``bf16``, ``fp16``, optionally joined with ``+channels_last`` (``cl``), ``+fold`` (the teacher's
        BatchNorms folded) and ``+compile``."""
        amp, channels_last, compiled, fold = "none", False, False, False
        for token in text.split("+"):
            if token in ("fp32", "none"):
                continue
            if token in ("bf16", "fp16"):
                amp = token
            elif token in ("channels_last", "cl"):
                channels_last = True
            elif token == "compile":
                compiled = True
            elif token == "fold":
                fold = True
            else:
                raise ValueError(
                    f"unknown setting {token!r} in {text!r}; use fp32/bf16/fp16, channels_last, fold, compile"
                )
        return cls(amp, channels_last, compiled, fold)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 arithmetic is native here. On a CPU without AVX512-BF16 or AMX, autocast to bf16 runs
    emulated kernels that are several times slower than fp32, so it is left out of the default settings."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    cpu = torch.cpu
    return any(getattr(cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def default_settings(device: torch.device, quick: bool) -> list[Setting]:
    if device.type == "cuda":
        if quick:
            return [Setting("bf16", True, fold=True)]
        return [
            Setting(), Setting("bf16", True), Setting("fp16", True), Setting("bf16", True, fold=True),
            Setting("bf16", True, True, fold=True),
        ]  # fmt: skip
    # Compilation takes minutes on a small CPU, so the quick run leaves it out.
    settings = [Setting(), Setting(channels_last=True), Setting(channels_last=True, fold=True)]
    if not quick:
        settings.append(Setting(channels_last=True, compile=True, fold=True))
    if native_bf16(device):
        settings.append(Setting("bf16", True))
    return settings


# ----------------------------------------------------------------------------------------------------------
# Our runs: train_student.build() and helper.engine.train_one_epoch


def make_teacher_checkpoint(arch: str, folder: Path) -> Path:
    """A randomly initialised teacher in RepDistiller's checkpoint format (speed does not depend on weights).

    Its BN statistics are measured on a few batches of unit-normal inputs (the scale of normalised images):
    with the initial statistics (mean 0, variance 1) the features of a random resnet56 grow to about 1e4 and
    some losses overflow, which a trained teacher never does.
    """
    from models import create_model

    model = create_model(arch, num_classes=100)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    gen = torch.Generator().manual_seed(0)
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the calibration batches
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(128, 3, 32, 32, generator=gen))
    for bn in norms:
        bn.momentum = 0.1
    path = folder / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict()}, path)
    return path


def default_teacher(arch: str) -> Path | None:
    """``$KD_TEACHERS/<arch>_vanilla/ckpt_epoch_240.pth`` when it exists (the Makefile's teacher folder)."""
    root = os.environ.get("KD_TEACHERS")
    path = Path(root) / f"{arch}_vanilla" / "ckpt_epoch_240.pth" if root else None
    return path if path is not None and path.is_file() else None


def build_run(opts: argparse.Namespace, method: str, setting: Setting, save_dir: Path, name: str) -> Run:
    """The run ``train_student.py`` builds for these flags (its folder under a temporary ``save_dir``)."""
    import train_student

    argv = [
        "--path_t", str(opts.path_t), "--model_t", opts.teacher, "--model_s", opts.student, "--distill", method,
        "--device", str(opts.device), "--nce_k", str(opts.nce_k), "--batch_size", str(opts.batch_size),
        "--save_dir", str(save_dir), "--run_name", name, "--test_size", "100", "--eval_batch_size", "100",
        *setting.flags(),
    ]  # fmt: skip
    if opts.data_folder:
        argv += ["--data_folder", str(opts.data_folder)]
    run = train_student.build(student_parser().parse_args(argv))
    main = run.stages[-1]
    main.on_epoch(1)  # the main stage's modes (AB/FT/FSP enter it here) and epoch-1 schedules
    for group in main.optimizer.param_groups:
        group["lr"] = main.lr_at(1)
    return run


def endless(batches: Callable[[int], Iterator[Batch]]) -> Iterator[Batch]:
    for epoch in count(1):
        yield from batches(epoch)


class OursLoop:
    """Steps of our engine on one built run (the main stage)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.stage = run.stages[-1]
        self.scaler = run.precision.scaler()
        self.batches = endless(run.train_loader.epoch)

    def steps(self, n: int) -> int:
        stats = train_one_epoch(
            self.stage.objective, islice(self.batches, n), self.stage.optimizer, self.run.precision, self.scaler,
            self.run.device, epoch=1, label="bench", print_freq=0,
        )  # fmt: skip
        return int(stats["images"])


# ----------------------------------------------------------------------------------------------------------
# The baseline: RepDistiller's data pipeline and train_distill loop


class CIFAR100Instance(Dataset):
    """RepDistiller's ``CIFAR100Instance`` (image, target, index), or with ``nce_k`` its ``CIFAR100InstanceSample``
    in ``exact`` mode (image, target, index, (K+1) contrast indices): a PIL image per item through the transforms.

    It holds the arrays this project loads (``dataset.load_cifar100``, the same bytes torchvision's ``CIFAR100``
    holds) rather than subclassing torchvision's class, whose md5 check refuses re-packed copies of the data.
    """

    def __init__(self, images_nhwc: np.ndarray, targets: list[int], nce_k: int | None) -> None:
        from torchvision import transforms

        self.data, self.targets, self.nce_k = images_nhwc, targets, nce_k
        self.transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR100_MEAN, CIFAR100_STD),
        ])  # fmt: skip
        labels = np.asarray(targets)
        # RepDistiller: cls_negative[c] = indices of every image of another class (equal sizes: a 2-D array).
        self.cls_negative = np.asarray([np.flatnonzero(labels != c) for c in range(int(labels.max()) + 1)])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple:
        from PIL import Image

        img, target = self.data[index], self.targets[index]
        img = self.transform(Image.fromarray(img))
        if self.nce_k is None:
            return img, target, index
        replace = self.nce_k > len(self.cls_negative[target])
        neg_idx = np.random.choice(self.cls_negative[target], self.nce_k, replace=replace)
        return img, target, index, np.hstack((np.asarray([index]), neg_idx))


def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """RepDistiller's ``helper.util.accuracy``, read on the host."""
    maxk, batch_size = max(topk), target.size(0)
    pred = output.topk(maxk, 1, True, True).indices.t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().mul_(100.0 / batch_size).item() for k in topk]


class AverageMeter:
    def __init__(self) -> None:
        self.sum, self.count = 0.0, 0

    def update(self, val: float, n: int = 1) -> None:
        self.sum += val * n
        self.count += n


class BaselineLoop:
    """RepDistiller's ``train_distill`` step for step, on the modules of a run built without the fast path."""

    def __init__(self, run: Run, loader: DataLoader) -> None:
        objective = run.stages[-1].objective
        if not isinstance(objective, DistillObjective):
            raise TypeError("the main stage of a student run distils")
        self.run, self.objective, self.optimizer = run, objective, run.stages[-1].optimizer
        for module in objective.distiller.modules():
            if isinstance(module, ContrastMemory):
                module.path = "gather"  # RepDistiller's ContrastMemory: index_select of B x (K+1) rows, bmm
        self.loader = loader
        self.batches = endless(lambda epoch: iter(loader))  # a new epoch starts its workers, as in RepDistiller
        self.meters = {name: AverageMeter() for name in ("loss", "top1", "top5")}

    def steps(self, n: int) -> int:
        o, device = self.objective, self.run.device
        o.train()  # student and adapters in train mode, teacher in eval
        preact = o.distiller.preact
        images = 0
        for data in islice(self.batches, n):
            input, target, index, *contrast = data
            input, target, index = input.float().to(device), target.to(device), index.to(device)
            contrast_idx = contrast[0].to(device) if contrast else None
            out_s = o.student(input, is_feat=True, preact=preact)
            with torch.no_grad():
                out_t = o.teacher(input, is_feat=True, preact=preact)
                out_t = type(out_t)([f.detach() for f in out_t.feats], out_t.logits)
            loss_cls = F.cross_entropy(out_s.logits, target)
            loss_div = o.kd(out_s.logits, out_t.logits)  # RepDistiller computes it whatever alpha is
            loss_kd = o.distiller(out_s, out_t, Batch(input, target, index, contrast_idx)) if o.beta else 0.0
            loss = o.gamma * loss_cls + o.alpha * loss_div + o.beta * loss_kd
            acc1, acc5 = accuracy(out_s.logits, target, topk=(1, 5))
            self.meters["loss"].update(loss.item(), input.size(0))
            self.meters["top1"].update(acc1, input.size(0))
            self.meters["top5"].update(acc5, input.size(0))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            images += input.size(0)
        return images


ONE_BATCH = " (one batch)"


def with_one_batch_twins(loops: dict[str, OursLoop | BaselineLoop]) -> dict[str, OursLoop | BaselineLoop]:
    """Each loop followed by a twin on the same run (models, losses, optimizer) that steps over one batch held in
    memory: the same step without the data pipeline (for CRD, without drawing the negatives either)."""
    out: dict[str, OursLoop | BaselineLoop] = {}
    for name, loop in loops.items():
        twin = BaselineLoop(loop.run, loop.loader) if isinstance(loop, BaselineLoop) else OursLoop(loop.run)
        twin.batches = repeat(next(twin.batches))
        out[name], out[name + ONE_BATCH] = loop, twin
    return out


# ----------------------------------------------------------------------------------------------------------
# Timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FileBarrier:
    """All ``parties`` processes wait at each :meth:`wait` until every one has arrived (files in ``folder``)."""

    def __init__(self, folder: Path, parties: int, rank: int) -> None:
        self.folder, self.parties, self.rank, self.generation = folder, parties, rank, 0

    def wait(self) -> None:
        self.generation += 1
        (self.folder / f"{self.generation}.{self.rank}").touch()
        while len(list(self.folder.glob(f"{self.generation}.*"))) < self.parties:
            time.sleep(0.005)


# A loop stops for good on these: a non-finite loss (our engine) or an SVD of non-finite features (KD-SVD; the
# baseline, like RepDistiller, raises it where it meets it).
DIVERGED = (NonFiniteLoss, torch.linalg.LinAlgError)


def images_per_second(
    loop: OursLoop | BaselineLoop, steps: int, warmup: int, device: torch.device, barrier: FileBarrier | None
) -> float:
    """Run ``warmup`` steps, then time ``steps`` steps (with the other processes, under ``--parallel``)."""
    diverged = None
    try:
        loop.steps(warmup)
        synchronize(device)
    except DIVERGED as exc:
        diverged = exc
    if barrier is not None:
        barrier.wait()  # also after a failed warm-up: the processes' rounds stay in step
    if diverged is not None:
        raise diverged
    start = time.perf_counter()
    images = loop.steps(steps)
    synchronize(device)
    return images / (time.perf_counter() - start)


def time_rounds(
    loops: dict[str, OursLoop | BaselineLoop],
    rounds: int,
    steps: int,
    warmup: int,
    device: torch.device,
    barrier: FileBarrier | None = None,
    label: str = "",
) -> dict[str, list[float]]:
    """Images/s of every round for each loop, the loops alternating round by round; a loop that diverges gets
    ``nan`` for that round and every later one while the others go on."""
    results: dict[str, list[float]] = {name: [] for name in loops}
    stopped: set[str] = set()
    for r in range(rounds):
        for name, loop in loops.items():
            if name in stopped:
                if barrier is not None:
                    barrier.wait()
                results[name].append(math.nan)
                continue
            try:
                ips = images_per_second(loop, steps, warmup, device, barrier)
            except DIVERGED as exc:
                log.warning("%s %s: %s; n/a from here on", label, name, exc)
                stopped.add(name)
                results[name].append(math.nan)
                continue
            results[name].append(ips)
            log.info("%s round %d/%d %s: %.1f images/s", label, r + 1, rounds, name, ips)
    return results


def measure_method(
    opts: argparse.Namespace, method: str, settings: list[Setting], barrier: FileBarrier | None
) -> dict[str, list[float]]:
    """Images/s of every round (``opts.rounds``) for the baseline and each setting, the configurations alternating
    round by round (``nan`` for a round that stopped on a non-finite loss)."""
    loops: dict[str, OursLoop | BaselineLoop] = {}
    # A fresh compile cache per method: the models of earlier methods share ResNet.forward's code object, and
    # dynamo's per-code recompile limit would otherwise send later methods to eager silently.
    torch._dynamo.reset()
    with tempfile.TemporaryDirectory(prefix="kdbench-") as save_dir:
        if not opts.ours_only:
            base_run = build_run(opts, method, Setting(), Path(save_dir), f"{method}-baseline")
            crd_k = opts.nce_k if base_run.train_loader.crd is not None else None
            data = load_cifar100(resolve_data_folder(opts.data_folder))
            images = data.train_images.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C), as torchvision
            train_set = CIFAR100Instance(images, data.train_labels.tolist(), crd_k)
            loader = DataLoader(train_set, batch_size=opts.batch_size, shuffle=True, num_workers=opts.workers)
            loops[BASELINE] = BaselineLoop(base_run, loader)
        for setting in settings:
            run = build_run(opts, method, setting, Path(save_dir), f"{method}-{setting.label}")
            loops[setting.label] = OursLoop(run)
            log.info("%s %s: compiling and warming up", method, setting.label)
            loops[setting.label].steps(1)  # compile now, not inside a timed round
        if opts.fixed_batch:
            loops = with_one_batch_twins(loops)
        return time_rounds(loops, opts.rounds, opts.steps, opts.warmup, opts.device, barrier, method)


# ----------------------------------------------------------------------------------------------------------
# Report


def machine(opts: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(opts.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if opts.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(opts.device)
    return info


def _fmt(value: float) -> str:
    return f"{value:,.1f}" if math.isfinite(value) else "n/a"


def best(rounds: list[float]) -> float:
    """The fastest measured round (``nan`` when none finished)."""
    measured = [x for x in rounds if math.isfinite(x)]
    return max(measured) if measured else math.nan


def median_ratio(rounds: list[float], base: list[float]) -> float:
    """The median over rounds of ``rounds[r] / base[r]``: the two ran back to back in round ``r``, so a burst of
    load from elsewhere slows both and the ratio keeps the comparison; ``nan`` when no round has both."""
    ratios = sorted(a / b for a, b in zip(rounds, base) if math.isfinite(a) and math.isfinite(b) and b > 0)
    if not ratios:
        return math.nan
    mid = len(ratios) // 2
    return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2


def table(results: dict[str, dict[str, list[float]]], settings: list[Setting], parallel: int) -> str:
    """Best images/s of each configuration; the speed-up of the fastest setting as its best round over the
    baseline's, and the highest median over rounds of a setting's ratio to the baseline (with that setting)."""
    names = [s.label for s in settings]
    agg = f" (sum of {parallel} processes)" if parallel > 1 else ""
    lines = [
        f"| method | baseline img/s{agg} | "
        + " | ".join(f"{n} img/s" for n in names)
        + " | speed-up (best rounds) | speed-up (median of rounds) |",
        "|---|---:|" + "---:|" * len(names) + "---:|---:|",
    ]
    for method, rounds in results.items():
        ips = {name: best(r) for name, r in rounds.items()}
        base = ips.get(BASELINE, math.nan)
        measured = [n for n in names if math.isfinite(ips[n])]
        top = max(measured, key=lambda n: ips[n]) if measured else None
        speedup = median = "n/a"
        if top and math.isfinite(base):
            speedup = f"{ips[top] / base:.2f}x ({top})"
            medians = {n: median_ratio(rounds[n], rounds[BASELINE]) for n in measured}
            top_median = max(medians, key=lambda n: medians[n] if math.isfinite(medians[n]) else -1.0)
            if math.isfinite(medians[top_median]):
                median = f"{medians[top_median]:.2f}x ({top_median})"
        cells = [_fmt(base)] + [_fmt(ips[n]) for n in names]
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {speedup} | {median} |")
    return "\n".join(lines)


def data_share_table(results: dict[str, dict[str, list[float]]]) -> str:
    """For every configuration timed with ``--fixed_batch``: the share of a step that the data pipeline costs,
    ``1 - loop / one-batch`` images/s as the median over rounds (negative values are noise)."""
    configurations = next(iter(results.values()))
    names = [n for n in configurations if n + ONE_BATCH in configurations]
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for method, rounds in results.items():
        cells = []
        for n in names:
            ratio = median_ratio(rounds[n], rounds[n + ONE_BATCH])
            cells.append(f"{100 * (1 - ratio):.0f}%" if math.isfinite(ratio) else "n/a")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Entry point


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--pair", default="resnet56,resnet20", help="teacher,student architectures")
    p.add_argument(
        "--path_t", default=None, help="teacher checkpoint (default: $KD_TEACHERS/<arch>_vanilla/, else a random one)"
    )
    p.add_argument("--data_folder", default=None, help="CIFAR-100 root (default: $CIFAR100_ROOT, else ./data)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: all; --quick: kd,crd)")
    p.add_argument("--settings", default=None, help="comma-separated fast-path settings, e.g. fp32,bf16+cl+compile")
    p.add_argument("--steps", type=int, default=None, help="timed steps per round (default: CPU 4, GPU 50)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps before each round (CPU 1, GPU 10)")
    p.add_argument("--rounds", type=int, default=None, help="rounds; the best is kept (default 5; --quick 3)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--nce_k", type=int, default=16384, help="CRD negatives (RepDistiller's default)")
    p.add_argument("--batch_size", type=int, default=64, help="RepDistiller's default")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="DataLoader workers of the baseline (default: RepDistiller's 8, at most the number of cores)",
    )
    p.add_argument("--quick", action="store_true", help="a short run: kd and crd, fewer steps, no compilation on CPU")
    p.add_argument("--parallel", type=int, default=1, help="N processes at once; their images/s are summed")
    p.add_argument("--ours_only", action="store_true", help="skip the baseline")
    p.add_argument(
        "--fixed_batch",
        action="store_true",
        help="also time every configuration over one batch held in memory: the data pipeline's share of a step",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")
    p.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)  # a child of --parallel
    p.add_argument("--barrier", default=None, help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    opts.device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    opts.teacher, opts.student = opts.pair.split(",")
    # A CPU step takes about a second and other processes may come and go: short rounds, many of them,
    # keep the best. A GPU step takes milliseconds: longer rounds.
    cpu = opts.device.type == "cpu"
    opts.steps = opts.steps or (4 if cpu else 50)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if cpu else 10)
    opts.rounds = opts.rounds or (3 if opts.quick else 5)
    opts.workers = opts.workers if opts.workers is not None else min(8, os.cpu_count() or 1)
    if opts.methods:
        opts.methods = opts.methods.split(",")
    else:
        opts.methods = list(QUICK_METHODS) if opts.quick else method_names()
    unknown = sorted(set(opts.methods) - set(method_names()))
    if unknown:
        p.error(f"unknown methods {unknown}; valid: {', '.join(method_names())}")
    return opts


def run_parallel(opts: argparse.Namespace, argv: list[str]) -> dict[str, dict[str, list[float]]]:
    """Launch ``--parallel`` copies of this script, synchronised at every timed round, and sum their images/s."""
    with tempfile.TemporaryDirectory(prefix="kdbench-par-") as tmp:
        outs = [Path(tmp) / f"rank{r}.json" for r in range(opts.parallel)]
        barrier = Path(tmp) / "barrier"
        barrier.mkdir()
        children = [
            subprocess.Popen([sys.executable, __file__, *argv, *child_flags(opts, r, barrier, outs[r])])
            for r in range(opts.parallel)
        ]
        if any(child.wait() != 0 for child in children):
            raise SystemExit("a benchmark process failed")
        parts = [json.loads(out.read_text())["results"] for out in outs]
    # The processes time each round together (the barrier): a round's aggregate is the sum of theirs.
    return {m: {k: [sum(r) for r in zip(*(p[m][k] for p in parts))] for k in parts[0][m]} for m in parts[0]}


def child_flags(opts: argparse.Namespace, rank: int, barrier: Path, out: Path) -> list[str]:
    return ["--parallel", str(opts.parallel), "--rank", str(rank), "--barrier", str(barrier), "--json", str(out)]


def strip_parallel(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--parallel", "--json"):
            skip = True
        elif not a.startswith(("--parallel=", "--json=")):
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    """The benchmark; a user error (no CIFAR-100, an unreadable teacher) is one line and exit status 2, as in
    the training scripts."""
    with cli_errors():
        _benchmark(sys.argv[1:] if argv is None else argv)


def _benchmark(argv: list[str]) -> None:
    opts = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("kd").setLevel(logging.WARNING)  # the runs' own set-up lines
    if opts.threads:
        torch.set_num_threads(opts.threads)
    settings = [Setting.parse(s) for s in opts.settings.split(",")] if opts.settings else None
    settings = settings or default_settings(opts.device, opts.quick)
    child = opts.barrier is not None
    info = machine(opts)
    if opts.parallel > 1 and not child:
        results = run_parallel(opts, strip_parallel(argv))
    else:
        with tempfile.TemporaryDirectory(prefix="kdbench-teacher-") as tmp:
            opts.path_t = (
                opts.path_t or default_teacher(opts.teacher) or make_teacher_checkpoint(opts.teacher, Path(tmp))
            )
            log.info("teacher: %s", opts.path_t)
            barrier = FileBarrier(Path(opts.barrier), opts.parallel, opts.rank) if child else None
            results = {m: measure_method(opts, m, settings, barrier) for m in opts.methods}
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    if opts.json:
        payload = {"machine": info, "settings": [asdict(s) for s in settings], "results": results,
                   "flags": {k: str(v) for k, v in vars(opts).items()}}  # fmt: skip
        Path(opts.json).write_text(json.dumps(payload, indent=2))
    if child:
        return
    print(
        f"\n{opts.teacher} -> {opts.student}, batch {opts.batch_size}, images per second of full training steps, "
        f"{opts.rounds} rounds of {opts.steps} steps (every round in --json); "
        f"{info['device']}, torch {info['torch']}, "
        f"{info['threads']} threads, load average {info['load_average']} -> {info['load_average_end']}; "
        f"baseline: PIL + DataLoader with {opts.workers} workers, fp32\n"
    )
    print(table(results, settings, opts.parallel))
    if opts.fixed_batch:
        print(
            "\nShare of a step spent in the data pipeline "
            "(1 - images/s over the data / over one batch held in memory, median of rounds):\n"
        )
        print(data_share_table(results))


if __name__ == "__main__":
    main()
