"""Whole-process time of one distillation epoch: ``train_student.py`` as a user runs it against a RepDistiller-style
process doing the same work, as separate subprocesses alternating round by round.

    python scripts/bench_process.py --threads 2 --rounds 2 --json kd.json               # KD
    python scripts/bench_process.py --threads 2 --methods crd --rounds 1 --json crd.json   # CRD, nce_k 16384

Each round runs, one after the other, for each method:

* **ours**: ``train_student.py --path_t T --model_s resnet20 --distill kd -r 0.1 -a 0.9 -b 0 --epochs 1
  --train_size 5000`` (CRD: ``--distill crd -a 0 -b 0.8``; its default ``--nce_k 16384`` exceeds the 4,950
  negatives per class of 5,000 images, so both processes draw them with replacement, as RepDistiller does),
  every other flag at its default, into a temporary ``--save_dir``. A light wrapper (``scripts/bench_process.py
  _ours OUT ARGS``) imports ``train_student`` and calls its ``main(ARGS)``; it only adds timers around the
  functions of each phase.
* **baseline**: a process in RepDistiller's ``train_student.py`` order (its ``HobbitLong/RepDistiller``
  ``train_student.py``, ``main``): imports; the data (CIFAR-100 as a PIL-image dataset, the same class-balanced
  5,000-image subset, RepDistiller's test loader: batch 32, ``workers // 2`` processes); the teacher loaded and the
  student and the method's modules built (fp32, no channels-last, no folding); the teacher's validation on the test
  set; one epoch of ``scripts/benchmark.py``'s ``BaselineLoop`` (RepDistiller's ``train_distill``: PIL
  ``DataLoader`` with ``--workers``, fp32, ``.item()`` and top-1/top-5 every step, CRD's per-image
  ``np.random.choice`` and gathered memory rows); the student's validation; the ``_best.pth`` and ``_last.pth``
  writes. RepDistiller sets no ``OMP_WAIT_POLICY``; the baseline keeps the environment as it is
  (``--passive_baseline`` sets it to ``PASSIVE``, as ``train_student.py`` does for itself).

The whole-process time is measured by this script from the spawn to the exit of the child. The phases are each
child's own timers: ``startup`` (spawn to the end of the imports), ``data``, ``models`` (teacher loaded, student and
method built, placed), ``teacher_eval``, ``steps`` (the epoch's training steps, their data included), ``evaluation``
(the epoch's test evaluation), ``checkpoint`` (checkpoint writes); ``other`` is the rest (logs, run folder,
summary, interpreter exit). The ratio is the median over rounds of baseline seconds / ours seconds, the two run
back to back within a round (robust to load from elsewhere on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SPAWN_ENV = "KDBENCH_SPAWN"  # the parent's time.monotonic() at spawn (CLOCK_MONOTONIC: one clock for all processes)
PHASES = ("startup", "data", "models", "teacher_eval", "steps", "evaluation", "checkpoint")
COMMANDS = {  # RepDistiller's command lines (README of HobbitLong/RepDistiller)
    "kd": ["--distill", "kd", "-r", "0.1", "-a", "0.9", "-b", "0"],
    "crd": ["--distill", "crd", "-a", "0", "-b", "0.8"],
}


class Timers:
    """Seconds per phase, accumulated by wrapped functions."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        fn = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[phase] += time.monotonic() - start

        setattr(owner, name, timed)

    def startup_done(self) -> None:
        self.seconds["startup"] = time.monotonic() - float(os.environ[SPAWN_ENV])

    def write(self, out: str) -> None:
        Path(out).write_text(json.dumps(self.seconds))


# ----------------------------------------------------------------------------------------------------------
# The children


def child_ours(out: str, argv: list[str]) -> int:
    """``train_student.main(argv)`` with timers around each phase's functions."""
    timers = Timers()
    sys.path.insert(0, str(ROOT))
    import train_student  # first: common.omp, then torch, as `python train_student.py`

    timers.startup_done()
    import helper.checkpoint
    import helper.run

    timers.wrap(train_student, "build_data", "data")
    for name in ("build_pair", "place_models", "prepare_methods"):
        timers.wrap(train_student, name, "models")
    timers.wrap(train_student.ckpt_io, "load_teacher", "models")
    timers.wrap(train_student, "evaluate_teacher", "teacher_eval")
    timers.wrap(helper.run, "train_one_epoch", "steps")
    timers.wrap(helper.run, "evaluate", "evaluation")
    timers.wrap(helper.checkpoint, "save_atomic", "checkpoint")
    code = train_student.main(argv)
    timers.write(out)
    return code


def child_baseline(out: str, argv: list[str]) -> int:
    """RepDistiller's ``train_student.py`` order of work, timed phase by phase."""
    timers = Timers()
    sys.path.insert(0, str(ROOT / "scripts"))
    import benchmark  # torch, torchvision's transforms, the project's models and losses
    import torch

    from helper.options import student_parser

    timers.startup_done()
    args = student_parser().parse_args(argv)
    workers = int(os.environ.get("KDBENCH_WORKERS", "2"))
    start = time.monotonic()
    train_loader, test_loader, n_data = baseline_data(args, workers, benchmark)
    timers.seconds["data"] = time.monotonic() - start
    start = time.monotonic()
    loop = baseline_models(args, train_loader, n_data, benchmark)
    timers.seconds["models"] = time.monotonic() - start
    start = time.monotonic()
    validate(loop.objective.teacher, test_loader, benchmark)
    timers.seconds["teacher_eval"] = time.monotonic() - start
    best = 0.0
    folder = Path(args.save_dir) / "baseline"
    folder.mkdir(parents=True)
    for epoch in range(1, args.epochs + 1):
        start = time.monotonic()
        loop.steps(len(train_loader))
        timers.seconds["steps"] += time.monotonic() - start
        start = time.monotonic()
        acc = validate(loop.objective.student, test_loader, benchmark)
        timers.seconds["evaluation"] += time.monotonic() - start
        start = time.monotonic()
        if acc > best:  # RepDistiller: <model_s>_best.pth whenever the test accuracy improves
            best = acc
            state = {"epoch": epoch, "model": loop.objective.student.state_dict(), "best_acc": best}
            torch.save(state, folder / f"{args.model_s}_best.pth")
        if epoch % args.save_freq == 0:
            state = {"epoch": epoch, "model": loop.objective.student.state_dict(), "accuracy": acc}
            torch.save(state, folder / f"ckpt_epoch_{epoch}.pth")
        timers.seconds["checkpoint"] += time.monotonic() - start
    start = time.monotonic()
    torch.save({"opt": args, "model": loop.objective.student.state_dict()}, folder / f"{args.model_s}_last.pth")
    timers.seconds["checkpoint"] += time.monotonic() - start
    return timers.write(out) or 0


class TestSet:
    """RepDistiller's test set: a PIL image per item through ``ToTensor`` and ``Normalize``."""

    def __init__(self, images_nhwc: Any, targets: list[int], mean: tuple, std: tuple) -> None:
        from torchvision import transforms

        self.data, self.targets = images_nhwc, targets
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple:
        from PIL import Image

        return self.transform(Image.fromarray(self.data[index])), self.targets[index]


def baseline_data(args: argparse.Namespace, workers: int, benchmark: Any) -> tuple[Any, Any, int]:
    """RepDistiller's ``get_cifar100_dataloaders(is_instance=True)`` / ``_sample`` on the same class-balanced
    subset ``train_student.py --train_size`` takes (``dataset.split_indices`` with the run's seed)."""
    from torch.utils.data import DataLoader

    from dataset import CIFAR100_MEAN, CIFAR100_STD, load_cifar100, resolve_data_folder, split_indices
    from helper.options import seed_of

    data = load_cifar100(resolve_data_folder(args.data_folder))
    train_idx, _ = split_indices(data.train_labels, args.train_size, 0, seed_of(args))
    images = data.train_images[train_idx].permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C)
    nce_k = args.nce_k if args.distill == "crd" else None
    train_set = benchmark.CIFAR100Instance(images, data.train_labels[train_idx].tolist(), nce_k)
    test_idx = split_indices(data.test_labels, args.test_size, 0, seed_of(args))[0] if args.test_size else slice(None)
    test_images = data.test_images[test_idx].permute(0, 2, 3, 1).contiguous().numpy()
    test_set = TestSet(test_images, data.test_labels[test_idx].tolist(), CIFAR100_MEAN, CIFAR100_STD)
    train = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, num_workers=workers)
    test = DataLoader(test_set, batch_size=args.batch_size // 2, shuffle=False, num_workers=workers // 2)
    return train, test, len(train_set)


def baseline_models(args: argparse.Namespace, train_loader: Any, n_data: int, benchmark: Any) -> Any:
    """Teacher loaded, student and the method's modules built as ``train_student.py`` builds them, fp32 (no
    channels-last, no folding), in ``benchmark.BaselineLoop``."""
    from types import SimpleNamespace

    import torch

    from distiller_zoo import get_method, kd_term
    from helper import checkpoint
    from helper.engine import DistillObjective
    from helper.optim import sgd
    from helper.options import effective_lr, loss_weights
    from models import create_model, feature_shapes

    teacher, _, _ = checkpoint.load_teacher(args.path_t, args.model_t, num_classes=100)
    student = create_model(args.model_s, num_classes=100)
    method = get_method(args.distill)
    distiller = method(feature_shapes(student, preact=method.preact), feature_shapes(teacher, preact=method.preact),
                       args, n_data)  # fmt: skip
    distiller.bind_teacher(teacher)
    distiller.bind_student(student)
    distiller.set_stage("main")
    kd = kd_term(args, distiller)
    w = loss_weights(args)
    objective = DistillObjective(student, teacher, distiller, w.gamma, w.alpha, w.beta, kd)
    optimizer = sgd([student, *distiller.trainable_modules(), kd], effective_lr(args, args.model_s), args)
    run = SimpleNamespace(
        stages=[SimpleNamespace(objective=objective, optimizer=optimizer)], device=torch.device("cpu")
    )
    return benchmark.BaselineLoop(run, train_loader)


def validate(model: Any, loader: Any, benchmark: Any) -> float:
    """RepDistiller's ``validate``: eval mode, ``no_grad``, the loss and top-1/top-5 read on the host per batch."""
    import torch
    import torch.nn.functional as F

    model.eval()
    meters = {name: benchmark.AverageMeter() for name in ("loss", "top1", "top5")}
    with torch.no_grad():
        for input, target in loader:
            output = model(input.float())
            acc1, acc5 = benchmark.accuracy(output, target, topk=(1, 5))
            meters["loss"].update(F.cross_entropy(output, target).item(), input.size(0))
            meters["top1"].update(acc1, input.size(0))
            meters["top5"].update(acc5, input.size(0))
    return meters["top1"].sum / meters["top1"].count


# ----------------------------------------------------------------------------------------------------------
# The parent


def spawn(kind: str, argv: list[str], env: dict[str, str], workdir: Path) -> dict[str, Any]:
    """Run one child; its whole-process seconds and phases."""
    out = workdir / f"{kind}.json"
    env = {**env, SPAWN_ENV: repr(time.monotonic())}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, __file__, f"_{kind}", str(out), *argv], env=env, cwd=workdir, capture_output=True, text=True
    )
    whole = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{kind} process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    phases = json.loads(out.read_text())
    phases["other"] = whole - sum(phases.values())
    return {"whole": whole, "phases": phases}


def child_args(opts: argparse.Namespace, method: str, save_dir: Path) -> list[str]:
    argv = [
        "--path_t", str(opts.path_t), "--model_s", opts.student, *COMMANDS[method], "--epochs", str(opts.epochs),
        "--train_size", str(opts.train_size), "--save_dir", str(save_dir),
    ]  # fmt: skip
    if opts.test_size:  # smoke runs only: both processes evaluate on the same class-balanced test subset
        argv += ["--test_size", str(opts.test_size)]
    if method == "crd" and opts.nce_k is not None:
        argv += ["--nce_k", str(opts.nce_k)]
    if opts.data_folder:
        argv += ["--data_folder", str(opts.data_folder)]
    return argv


def environments(opts: argparse.Namespace) -> dict[str, dict[str, str]]:
    env = dict(os.environ)
    if opts.threads:
        env.update(OMP_NUM_THREADS=str(opts.threads), MKL_NUM_THREADS=str(opts.threads))
    base = {**env, "KDBENCH_WORKERS": str(opts.workers)}
    if opts.passive_baseline:
        base["OMP_WAIT_POLICY"] = "PASSIVE"
    return {"ours": env, "baseline": base}


def measure(opts: argparse.Namespace, info: dict[str, Any]) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``results[method][kind]``: one entry per round; ours then the baseline within each round. With ``--json``,
    the file is rewritten after every process (a long run stopped early keeps its finished rounds)."""
    envs = environments(opts)
    results = {m: {"ours": [], "baseline": []} for m in opts.methods}
    for r in range(opts.rounds):
        for method in opts.methods:
            for kind in ("ours", "baseline"):
                with tempfile.TemporaryDirectory(prefix="kdbench-proc-") as tmp:
                    res = spawn(kind, child_args(opts, method, Path(tmp) / "save"), envs[kind], Path(tmp))
                results[method][kind].append(res)
                print(f"round {r + 1}/{opts.rounds} {method} {kind}: {res['whole']:.1f} s", file=sys.stderr)
                if opts.json:
                    Path(opts.json).write_text(json.dumps({"info": info, "results": results}, indent=2))
    return results


def median(values: list[float]) -> float:
    values = sorted(v for v in values if math.isfinite(v))
    if not values:
        return math.nan
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def summarise(results: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for method, kinds in results.items():
        ratios = [b["whole"] / o["whole"] for o, b in zip(kinds["ours"], kinds["baseline"])]
        phases = {
            kind: {p: median([r["phases"][p] for r in rounds]) for p in (*PHASES, "other")}
            for kind, rounds in kinds.items()
        }
        out[method] = {"ratio": median(ratios), "ratios": ratios, "phases_median": phases}
    return out


def report(results: dict, summary: dict, info: dict) -> str:
    lines = [
        f"whole-process seconds per round ({info['rounds']} rounds), {info['student']} <- {info['teacher']}, "
        f"{info['train_size']} training and {info.get('test_size', 10000)} test images, threads {info['threads']}, "
        f"baseline workers {info['workers']}, "
        f"load average {info['load_average']} -> {info['load_average_end']}",
        "",
        "| method | ours s | baseline s | baseline / ours (median of rounds) |",
        "|---|---|---|---:|",
    ]
    for method, kinds in results.items():
        ours = ", ".join(f"{r['whole']:.1f}" for r in kinds["ours"])
        base = ", ".join(f"{r['whole']:.1f}" for r in kinds["baseline"])
        lines.append(f"| {method} | {ours} | {base} | {summary[method]['ratio']:.2f}x |")
    lines += ["", "phase seconds (median of rounds):", ""]
    lines += ["| method | process | " + " | ".join((*PHASES, "other")) + " |", "|---|---|" + "---:|" * 8]
    for method, s in summary.items():
        for kind, phases in s["phases_median"].items():
            lines.append(f"| {method} | {kind} | " + " | ".join(f"{phases[p]:.1f}" for p in (*PHASES, "other")) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default="kd", help="comma-separated: kd, crd")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--path_t", default=None, help="teacher (default: $KD_TEACHERS/resnet56_vanilla/ckpt_epoch_240.pth)")
    p.add_argument("--model_s", dest="student", default="resnet20")
    p.add_argument("--train_size", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--test_size", type=int, default=None, help="a test subset (smoke runs; default: all 10,000)")
    p.add_argument("--nce_k", type=int, default=None, help="CRD negatives (default: train_student's, 16384)")
    p.add_argument("--data_folder", default=None, help="CIFAR-100 root (default: $CIFAR100_ROOT, else ./data)")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both processes (default: torch's)")
    p.add_argument(
        "--workers", type=int, default=2,
        help="the baseline's DataLoader workers (RepDistiller's default 8; 2 fits a 2-core machine)",
    )  # fmt: skip
    p.add_argument("--passive_baseline", action="store_true", help="OMP_WAIT_POLICY=PASSIVE for the baseline too")
    p.add_argument("--json", default=None, help="also write every round and the summary to this file")
    opts = p.parse_args(argv)
    opts.methods = opts.methods.split(",")
    unknown = sorted(set(opts.methods) - set(COMMANDS))
    if unknown:
        p.error(f"unknown methods {unknown}; valid: {', '.join(COMMANDS)}")
    for name in ("rounds", "train_size", "test_size", "epochs", "nce_k", "threads"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            p.error(f"--{name} must be positive, got {value}")
    if opts.workers < 0:
        p.error(f"--workers must be >= 0, got {opts.workers}")
    root = os.environ.get("KD_TEACHERS")
    default = Path(root) / "resnet56_vanilla" / "ckpt_epoch_240.pth" if root else None
    opts.path_t = Path(opts.path_t) if opts.path_t else default
    if opts.path_t is None or not opts.path_t.is_file():
        p.error(f"teacher checkpoint not found: {opts.path_t} (--path_t, or $KD_TEACHERS/resnet56_vanilla/)")
    opts.path_t = opts.path_t.resolve()
    if opts.data_folder:
        opts.data_folder = Path(opts.data_folder).resolve()
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("_ours", "_baseline"):
        return (child_ours if argv[0] == "_ours" else child_baseline)(argv[1], argv[2:])
    if argv[:1] == ["--from_json"]:  # the tables of an earlier (possibly stopped) run's --json file
        payload = json.loads(Path(argv[1]).read_text())
        payload["info"].setdefault("load_average_end", "(stopped)")
        print(report(payload["results"], summarise(payload["results"]), payload["info"]))
        return 0
    opts = parse_args(argv)
    info = {
        "rounds": opts.rounds, "student": opts.student, "teacher": str(opts.path_t),
        "train_size": opts.train_size, "threads": opts.threads or "torch default", "workers": opts.workers,
        "cpu_count": os.cpu_count(), "load_average": [round(x, 2) for x in os.getloadavg()],
        "passive_baseline": opts.passive_baseline, "nce_k": opts.nce_k or 16384, "test_size": opts.test_size or 10000,
    }  # fmt: skip
    results = measure(opts, info)
    info["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    summary = summarise(results)
    print(report(results, summary, info))
    if opts.json:
        Path(opts.json).write_text(json.dumps({"info": info, "results": results, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
