"""The benchmark on a small scale, end to end, on real CIFAR-100 with a real trained teacher (``make demo``).

1. Finds the trained resnet56 teacher ($KD_TEACHERS, else save/models, else fetches it with
   scripts/fetch_teachers.py).
2. Trains a small student on a class-balanced subset of the training set, with the real command-line tools
   as subprocesses: alone (train_teacher.py, the "vanilla" row), with KD and with CRD (train_student.py,
   RepDistiller's published loss weights). train_student.py evaluates the teacher on the full test set first.
3. Builds the result table and plots with ``python -m helper.report`` (every run is evaluated on all 10,000
   test images after every epoch).

A few epochs on a few thousand images: the numbers are far below the 240-epoch ones and are not comparable
with the published results; the demo shows the pipeline working, not the methods' merits. About 10 minutes
on 2 CPU cores (measured: docs/demo_output.md). Runs are resumable: running it again skips finished runs
(``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER = "resnet56"  # the teacher of RepDistiller's resnet56 -> resnet20 pair (72.34% published)
# RepDistiller decays the LR after epochs 150, 180, 210 of 240; the short schedule decays at the same fractions.
DECAY_FRACTIONS = (150 / 240, 180 / 240, 210 / 240)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--student", default="resnet8", help="student architecture (default resnet8, 0.08 M params)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (default 3)")
    parser.add_argument("--train_size", type=int, default=3000, help="class-balanced training images (default 3000)")
    parser.add_argument("--methods", default="kd crd", help="methods besides vanilla (default: 'kd crd')")
    parser.add_argument("--out", type=Path, default=ROOT / "demo_out", help="output folder (default demo_out/)")
    parser.add_argument("--fresh", action="store_true", help="delete the output folder first")
    parser.add_argument("--seed", type=int, default=0, help="seed of every run (same subset and order for all)")
    return parser.parse_args()


def decay_epochs(epochs: int) -> str:
    """RepDistiller's decay points scaled to ``epochs`` (e.g. 4 -> '2,3'), increasing and inside the run."""
    points = sorted({max(1, round(epochs * f)) for f in DECAY_FRACTIONS if round(epochs * f) < epochs})
    return ",".join(map(str, points)) or str(epochs)


def shown(arg: str) -> str:
    """Paths inside the project relative to its root, as a user would type them."""
    path = Path(arg)
    if path.is_absolute() and path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    return arg


def run(cmd: list[str], env: dict[str, str]) -> float:
    """Run a command from the project root, showing it first; returns its wall time in seconds."""
    print(f"\n$ {shlex.join(shown(a) for a in cmd)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    if result.returncode != 0:
        sys.exit(f"demo: the command above failed with exit status {result.returncode}")
    return time.perf_counter() - start


def find_teacher(env: dict[str, str]) -> Path:
    """$KD_TEACHERS/resnet56_vanilla/ckpt_epoch_240.pth, else save/models/..., else fetch it."""
    relative = Path(f"{TEACHER}_vanilla") / "ckpt_epoch_240.pth"
    for folder in (env.get("KD_TEACHERS"), "save/models"):
        if folder and (ROOT / folder / relative).is_file():
            return (ROOT / folder / relative).resolve()
    print(f"no {relative} in $KD_TEACHERS or save/models: fetching it (chenyaofo's CIFAR-100 resnet56, 3.4 MB)")
    run([sys.executable, "scripts/fetch_teachers.py", "--models", TEACHER, "--source", "chenyaofo", "--no_eval"], env)
    return (ROOT / "save" / "models" / relative).resolve()


def method_flags(method: str, train_size: int) -> list[str]:
    """RepDistiller's published weights (its scripts/run_cifar_distill.sh)."""
    flags = {
        "kd": ["-r", "0.1", "-a", "0.9", "-b", "0"],
        "crd": ["-a", "0", "-b", "0.8"],
        "crd+kd": ["-a", "1", "-b", "0.8"],
        "hint": ["-a", "0", "-b", "100"],
        "attention": ["-a", "0", "-b", "1000"],
        "similarity": ["-a", "0", "-b", "3000"],
        "pkt": ["-a", "0", "-b", "30000"],
    }[method]
    distill = "crd" if method == "crd+kd" else method
    if distill == "crd":
        # RepDistiller's 16384 negatives need more images than a subset has (they are drawn from the other
        # classes' images): the largest power of two up to 4096 (its dataset default) that the subset holds.
        negatives = train_size - train_size // 100
        nce_k = 1 << (min(4096, negatives).bit_length() - 1)
        flags += ["--nce_k", str(nce_k)]
    return ["--distill", distill, *flags]


def summaries(save: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(save.rglob("summary.json"))]


def report_on(runs: list[dict], args: argparse.Namespace, times: dict[str, float]) -> None:
    """What was measured, in words, next to what the full protocol gives (RepDistiller's README numbers)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # run as `python scripts/demo.py`
    from helper.published import lookup, teacher_accuracy

    acc = {}
    for s in runs:
        if (s.get("model_s"), s.get("epochs"), s.get("train_size"), s.get("seed")) != (
            args.student, args.epochs, args.train_size, args.seed,
        ):  # fmt: skip
            continue  # a run of an earlier demo with other settings
        name = "vanilla" if s.get("kind") == "teacher" else s["method"]
        acc["crd+kd" if name == "crd" and s.get("alpha", 0) > 0 else name] = s["test_acc"]
    teacher_acc = next((s["teacher_acc"] for s in runs if s.get("teacher_acc") is not None), None)
    print("\nWhat was measured (one seed each; at this scale differences of a point or so are seed noise):")
    if teacher_acc is not None:
        published = teacher_accuracy(TEACHER)
        print(
            f"  teacher {TEACHER}: {teacher_acc:.2f}% on the 10,000 test images, evaluated by train_student.py "
            f"(RepDistiller's teacher: {published:.2f}%)"
        )
    base = acc.get("vanilla")
    for name in ["vanilla", *args.methods.split()]:
        if name in acc:
            delta = "" if name == "vanilla" or base is None else f" ({acc[name] - base:+.2f} points vs vanilla)"
            print(f"  {args.student} {name}: {acc[name]:.2f}% after {args.epochs} epochs{delta}")
    full = {m: lookup(TEACHER, "resnet20", m).acc for m in ("vanilla", "kd", "crd")}
    print(
        f"  For scale: with 240 epochs on all 50,000 images RepDistiller reports resnet56 -> resnet20 at "
        f"{full['vanilla']:.2f}% (vanilla), {full['kd']:.2f}% (KD), {full['crd']:.2f}% (CRD); "
        "scripts/run_cifar_distill.sh runs that protocol."
    )
    print(f"  Wall time: {', '.join(f'{k} {v:.0f} s' for k, v in times.items())}")


def main() -> int:
    args = parse_args()
    wall_start = time.perf_counter()
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    save, results = args.out / "save", args.out / "results"
    env = dict(os.environ)
    # OpenMP threads that spin while waiting starve each other when the cores are shared with other processes:
    # measured here on 2 busy cores, a resnet8 training step ran at 30-43 img/s by default and at 206 img/s
    # with passive waiting. On an idle machine the setting costs nothing measurable.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.setdefault("CIFAR100_ROOT", str(ROOT.parent / "shared" / "data") if (ROOT.parent / "shared" / "data").is_dir()
                   else str(ROOT / "data"))  # fmt: skip
    schedule = [
        "--epochs", str(args.epochs), "--lr_decay_epochs", decay_epochs(args.epochs),
        "--train_size", str(args.train_size), "--seed", str(args.seed), "--save_dir", str(save), "--resume", "auto",
        # Batches of 100 evaluated 2-4x faster than the default 1000 on 2 CPU cores (activations fit the caches);
        # channels-last convolutions were faster as well. Neither changes what is computed.
        "--eval_batch_size", "100", "--channels_last",
    ]  # fmt: skip
    print(
        f"Demo: {TEACHER} teacher -> {args.student} student, {args.epochs} epochs on {args.train_size:,} training "
        f"images ({args.train_size // 100} per class), evaluated on the 10,000 test images.\n"
        f"Data: {env['CIFAR100_ROOT']}. Output: {shown(str(args.out))}/.\n"
        f"This is a smoke-scale run: {args.epochs} epochs on {args.train_size:,} images give accuracies far below "
        "the 240-epoch, 50,000-image results, and they are not comparable with the published numbers."
    )
    teacher = find_teacher(env)
    times = {}
    py = sys.executable
    times["vanilla"] = run([py, "train_teacher.py", "--model", args.student, "--trial", "0", *schedule], env)
    for method in args.methods.split():
        cmd = [py, "train_student.py", "--path_t", str(teacher), "--model_s", args.student]
        times[method] = run([*cmd, *method_flags(method, args.train_size), "--trial", "0", *schedule], env)
    times["report"] = run([py, "-m", "helper.report", str(save), "--out", str(results), "--plots"], env)

    report_on(summaries(save), args, times)
    plots = ", ".join(p.name for p in sorted(results.glob("*.png")))
    print(f"Table: {shown(str(results / 'results.md'))}; plots: {plots}")
    print(f"Total wall time: {time.perf_counter() - wall_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
