"""Distillation working, in minutes, on real CIFAR-100 with a real trained teacher (``make demo``).

1. Finds the trained teacher ($KD_TEACHERS, else save/models, else fetches it with scripts/fetch_teachers.py).
2. Trains a resnet8 on a class-balanced subset of the training set with the real command-line tools as
   subprocesses, two seeds each: alone (train_teacher.py, the "vanilla" row) and with KD, DKD and CRD
   (train_student.py). Two runs at a time with one thread each (measured faster than one run with two).
3. Prints the verdict: for every method, mean ± std over seeds, the gap to vanilla, and whether the gap is at
   least 1.5 points and larger than the spread between seeds; then ``python -m helper.report`` builds the table
   and the plots (error bars: ± std over seeds).

Every run is evaluated once, after its last epoch, on all 10,000 test images. The schedule (sizes, epochs, why)
is explained in README.md ("The demo") with its measured time and table; docs/demo_output.md holds a real run.
The numbers are far below the 240-epoch ones: the demo shows that the methods beat the student trained alone,
not the published accuracies. Runs are resumable: running it again keeps finished runs and resumes the others
from their last checkpoint (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as `python scripts/demo.py`

from helper import recipes  # noqa: E402

# RepDistiller decays the LR after epochs 150, 180, 210 of 240; the short schedule decays at the same fractions.
DECAY_FRACTIONS = tuple(n / d for n, d in recipes.schedule()[1])
# The published pair whose recipe (helper/published/recipes.csv) each method runs: RepDistiller's smallest ResNet
# pair, the closest to the demo's resnet20 -> resnet8 (DKD's beta 2 is mdistiller's for it).
RECIPE_PAIR = ("resnet56", "resnet20")
MIN_GAP = 1.5  # points of top-1 a method must gain over vanilla (in the mean over seeds) to count as a win


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--teacher", default="resnet20", help="teacher architecture, a trained checkpoint (default resnet20)")
    add("--student", default="resnet8", help="student architecture (default resnet8, 0.08 M params)")
    add("--epochs", type=int, default=100, help="epochs per run (default 100)")
    add("--train_size", type=int, default=200, help="class-balanced training images, a multiple of 100 (default 200)")
    add("--batch_size", type=int, default=32, help="training batch (default 32; RepDistiller: 64)")
    add("--methods", default="kd dkd crd", help="recipes (helper/published/recipes.csv) besides vanilla, each with its "
        f"weights on {':'.join(RECIPE_PAIR)} (default: 'kd dkd crd')")  # fmt: skip
    add("--seeds", default="0 1", help="seeds of every method (default: '0 1'); each seed also picks the subset")
    add("--jobs", type=int, default=2, help="runs at a time, each with cores/jobs threads (default 2)")
    add("--out", type=Path, default=ROOT / "demo_out", help="output folder (default demo_out/)")
    add("--fresh", action="store_true", help="delete the output folder first")
    args = parser.parse_args(argv)
    args.seed_list = [int(s) for s in args.seeds.split()]
    if len(args.seed_list) < 2 or args.jobs < 1 or args.epochs < 1 or args.train_size < 100 or args.train_size % 100:
        parser.error("need at least 2 seeds, --jobs >= 1, --epochs >= 1 and --train_size a multiple of the 100 classes")
    unknown = [m for m in args.methods.split() if m not in recipes.methods() or recipes.skipped(m, *RECIPE_PAIR)]
    if unknown:
        parser.error(f"--methods: no recipe {' '.join(unknown)} on {':'.join(RECIPE_PAIR)}; valid: "
                     f"{' '.join(m for m in recipes.methods() if not recipes.skipped(m, *RECIPE_PAIR))}")  # fmt: skip
    return args


def decay_epochs(epochs: int) -> str:
    """RepDistiller's decay points scaled to ``epochs`` (e.g. 6 -> '4,5'), increasing and inside the run."""
    points = sorted({max(1, round(epochs * f)) for f in DECAY_FRACTIONS if round(epochs * f) < epochs})
    return ",".join(map(str, points)) or str(epochs)


def _own_flags(distill: str) -> set[str]:
    """The argument names that a method's own ``add_arguments`` defines."""
    from distiller_zoo import get_method

    parser = argparse.ArgumentParser(add_help=False)
    get_method(distill).add_arguments(parser)
    return {a.dest for a in parser._actions}


def method_flags(method: str, epochs: int) -> list[str]:
    """The method's published recipe on ``RECIPE_PAIR`` (``helper.recipes``: RepDistiller's weights for kd, crd,
    ..., mdistiller's for DKD), without its epochs (the demo's schedule is its own); the method's warm-up epochs
    (DKD's 20 of 240) scaled to the short schedule (under one epoch: no ramp). CRD keeps RepDistiller's 16384
    negatives: a subset holds fewer per class, so they are drawn with replacement, as RepDistiller does."""
    from distiller_zoo.DKD import warmup_epochs

    argv = recipes.flags(method, *RECIPE_PAIR)
    if "--epochs" in argv:
        del argv[argv.index("--epochs") : argv.index("--epochs") + 2]
    args = recipes.parse(method, *RECIPE_PAIR)
    for dest in sorted(d for d in _own_flags(args.distill) if d.endswith("_warmup")):
        warmup = warmup_epochs(args) if dest == "dkd_warmup" else getattr(args, dest)
        argv += [f"--{dest}", f"{warmup * epochs / recipes.schedule()[0]:.3g}"]
    return argv


# ----------------------------------------------------------------------------------------------------------
# The runs


@dataclass
class Job:
    method: str  # "vanilla" or a recipe name (helper/published/recipes.csv)
    seed: int
    cmd: list[str]
    folder: Path  # the run folder (--run_name under the save dir)
    wall: float = 0.0
    cpu: float = 0.0
    kept: bool = False  # finished by an earlier demo: not run again

    @property
    def label(self) -> str:
        return f"{self.method} s{self.seed}"


def shown(arg: str) -> str:
    """Paths inside the project relative to its root, as a user would type them."""
    path = Path(arg)
    if path.is_absolute() and path.is_relative_to(ROOT):
        return str(path.relative_to(ROOT))
    return arg


def build_jobs(args: argparse.Namespace, teacher: Path, py: str = sys.executable) -> list[Job]:
    """Every run of the demo, the longest first (two slots fill best that way), vanilla last.

    Only the first distillation run evaluates the teacher on the test set (a resnet56 pass over 10,000 images
    costs about as much CPU as two student epochs here); the others pass --no_teacher_eval.
    """
    save = args.out / "save"
    tag = f"{args.student}_T-{args.teacher}_n{args.train_size}_ep{args.epochs}_bs{args.batch_size}"
    schedule = [
        "--epochs", str(args.epochs), "--lr_decay_epochs", decay_epochs(args.epochs),
        "--train_size", str(args.train_size), "--batch_size", str(args.batch_size),
        "--save_dir", str(save), "--resume", "auto",
        # Evaluation once, after the last epoch, on the full test set (every epoch cost a third of vanilla's time).
        # Batches of 500 and channels-last convolutions measured fastest on 2 CPU cores; neither changes results.
        "--eval_freq", str(args.epochs), "--eval_batch_size", "500", "--channels_last",
    ]  # fmt: skip
    jobs = []
    for method in args.methods.split():
        for seed in args.seed_list:
            name = f"{method.replace('+', '_')}_{tag}_seed{seed}"
            cmd = [py, "train_student.py", "--path_t", str(teacher), "--model_s", args.student, "--fold_teacher_bn"]
            cmd += [*method_flags(method, args.epochs), "--trial", str(seed), "--seed", str(seed)]
            cmd += [*schedule, "--run_name", name] + (["--no_teacher_eval"] if jobs else [])
            jobs.append(Job(method, seed, cmd, save / "student_model" / name))
    for seed in args.seed_list:
        name = f"vanilla_{tag}_seed{seed}"
        cmd = [py, "train_teacher.py", "--model", args.student, "--trial", str(seed), "--seed", str(seed)]
        jobs.append(Job("vanilla", seed, [*cmd, *schedule, "--run_name", name], save / "models" / name))
    return jobs


def finished(job: Job, epochs: int) -> dict | None:
    """The run's summary.json if it finished the whole schedule, else None."""
    path = job.folder / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("epochs", 0) >= epochs and summary.get("test_acc") is not None else None


def _pump(stream, prefix: str, log_path: Path) -> None:
    """Copy a run's output to its log file and to the console, each line prefixed with the run."""
    with log_path.open("a") as log:
        for line in stream:
            log.write(line)
            print(f"[{prefix}] {line}", end="", flush=True)


def start(job: Job, env: dict[str, str], logs: Path) -> subprocess.Popen:
    print(f"\n$ {shlex.join(shown(a) for a in job.cmd)}", flush=True)
    proc = subprocess.Popen(
        job.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    pump = threading.Thread(target=_pump, args=(proc.stdout, job.label, logs / f"{job.folder.name}.log"))
    pump.start()
    proc.pump = pump  # type: ignore[attr-defined]
    return proc


def unfinished(jobs: list[Job], epochs: int) -> list[Job]:
    """The jobs still to run; the finished ones are marked kept and their commands shown."""
    pending = []
    for job in jobs:
        if finished(job, epochs):
            job.kept = True
            print(f"\n$ {shlex.join(shown(a) for a in job.cmd)}\n  (finished by an earlier demo: kept)")
        else:
            pending.append(job)
    return pending


def run_jobs(jobs: list[Job], epochs: int, slots: int, env: dict[str, str], logs: Path) -> None:
    """Run the unfinished jobs, ``slots`` at a time; each job's wall and CPU time (user+sys) from os.wait4."""
    logs.mkdir(parents=True, exist_ok=True)
    pending = unfinished(jobs, epochs)
    running: dict[int, tuple[Job, subprocess.Popen, float]] = {}
    try:
        while pending or running:
            while pending and len(running) < slots:
                job = pending.pop(0)
                proc = start(job, env, logs)
                running[proc.pid] = (job, proc, time.perf_counter())
            pid, status, usage = os.wait4(-1, 0)
            if pid not in running:
                continue
            job, proc, started = running.pop(pid)
            proc.returncode = os.waitstatus_to_exitcode(status)
            proc.pump.join()  # type: ignore[attr-defined]
            job.wall, job.cpu = time.perf_counter() - started, usage.ru_utime + usage.ru_stime
            if proc.returncode != 0:
                for _, other, _ in running.values():
                    other.terminate()  # they save a checkpoint and stop: a rerun resumes them
                log = logs / f"{job.folder.name}.log"
                sys.exit(f"demo: {job.label} failed with exit status {proc.returncode} (log: {log})")
            print(f"  {job.label}: done in {job.wall:.0f} s wall, {job.cpu:.0f} s CPU", flush=True)
    except KeyboardInterrupt:  # Ctrl-C reached the runs too: each saves a checkpoint at its next step
        for _, proc, _ in running.values():
            proc.wait()
        sys.exit("demo: interrupted; run it again to resume (finished runs are kept)")


# ----------------------------------------------------------------------------------------------------------
# The verdict


@dataclass
class Verdict:
    method: str
    accs: list[float]
    mean: float
    std: float  # sample standard deviation over seeds
    gap: float | None = None  # mean - vanilla's mean (None for vanilla)
    spread: float | None = None  # sqrt(std^2 + vanilla std^2)
    wins: bool | None = None  # gap >= MIN_GAP and gap > spread
    notes: list[str] = field(default_factory=list)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1); std 0 for a single value."""
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def verdicts(accs: dict[str, list[float]], min_gap: float = MIN_GAP) -> list[Verdict]:
    """Vanilla first, then each method against it.

    The spread is the standard deviation of the difference between one method run and one vanilla run,
    sqrt(std_method^2 + std_vanilla^2): a gap above it is not explained by the seed-to-seed variation of
    either side. A method wins when its gap is at least ``min_gap`` points and larger than the spread.
    """
    base_mean, base_std = mean_std(accs["vanilla"])
    out = [Verdict("vanilla", accs["vanilla"], base_mean, base_std)]
    for method, values in accs.items():
        if method == "vanilla":
            continue
        mean, std = mean_std(values)
        gap, spread = mean - base_mean, math.hypot(std, base_std)
        out.append(Verdict(method, values, mean, std, gap, spread, gap >= min_gap and gap > spread))
    return out


def verdict_lines(results: list[Verdict], min_gap: float = MIN_GAP) -> list[str]:
    lines = []
    for v in results:
        seeds = ", ".join(f"{a:.2f}" for a in v.accs)
        head = f"  {v.method:8s} {v.mean:6.2f} ± {v.std:4.2f}  (seeds: {seeds})"
        if v.gap is None:
            lines.append(head)
            continue
        outcome = "beats vanilla" if v.wins else "does NOT beat vanilla"
        lines.append(
            f"{head}  gap {v.gap:+.2f}, spread {v.spread:.2f}: "
            f"gap >= {min_gap:g} {'yes' if v.gap >= min_gap else 'NO'}, "
            f"gap > spread {'yes' if v.gap > v.spread else 'NO'} -> {outcome}"
        )
    won = [v.method for v in results if v.wins]
    lost = [v.method for v in results if v.wins is False]
    lines.append(
        f"  Verdict: {', '.join(won) or 'no method'} beat{'s' if len(won) == 1 else ''} the student trained alone"
        + (f"; {', '.join(lost)} did not" if lost else "")
        + "."
    )
    if lost:
        lines.append("  Each method at this and other scales, and RepDistiller's own code run beside ours: README.md, "
                     '"The demo".')  # fmt: skip
    return lines


def accuracies(jobs: list[Job], epochs: int) -> dict[str, list[float]]:
    """Last-epoch top-1 on the full test set per method, in seed order (RepDistiller's reporting rule)."""
    accs: dict[str, list[float]] = {}
    for job in sorted(jobs, key=lambda j: (j.method != "vanilla", j.seed)):
        summary = finished(job, epochs)
        if summary is not None:
            accs.setdefault(job.method, []).append(summary["test_acc"])
    return accs


# ----------------------------------------------------------------------------------------------------------
# Main


def find_teacher(arch: str, env: dict[str, str]) -> Path:
    """$KD_TEACHERS/<arch>_vanilla/ckpt_epoch_240.pth, else save/models/..., else fetch it."""
    relative = Path(f"{arch}_vanilla") / "ckpt_epoch_240.pth"
    for folder in (env.get("KD_TEACHERS"), "save/models"):
        if folder and (ROOT / folder / relative).is_file():
            return (ROOT / folder / relative).resolve()
    print(f"no {relative} in $KD_TEACHERS or save/models: fetching it (chenyaofo's CIFAR-100 {arch})", flush=True)
    cmd = [sys.executable, "scripts/fetch_teachers.py", "--models", arch, "--source", "chenyaofo", "--no_eval"]
    print(f"$ {shlex.join(shown(a) for a in cmd)}", flush=True)
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        sys.exit("demo: fetching the teacher failed (see above)")
    return (ROOT / "save" / "models" / relative).resolve()


def environment(jobs: int) -> dict[str, str]:
    env = dict(os.environ)
    # Idle OpenMP threads yield instead of spinning: on 2 busy cores a resnet8 step ran 5x faster (Makefile).
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    shared = ROOT.parent / "shared" / "data"
    env.setdefault("CIFAR100_ROOT", str(shared if shared.is_dir() else ROOT / "data"))
    return env


def report_on(jobs: list[Job], args: argparse.Namespace, teacher: Path) -> bool:
    """The verdict and, for scale, the published 240-epoch numbers; True when every method wins."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # run as `python scripts/demo.py`
    from helper.published import lookup

    accs = accuracies(jobs, args.epochs)
    first = finished(jobs[0], args.epochs) or {}
    print(f"\nTeacher {args.teacher} ({shown(str(teacher))}): {first.get('teacher_acc') or float('nan'):.2f}% on the "
          "10,000 test images (evaluated by the first distillation run).")  # fmt: skip
    print(f"Top-1 (%) of {args.student} on the 10,000 test images after {args.epochs} epochs on "
          f"{args.train_size:,} images, mean ± sample std over seeds {args.seeds}; "
          "spread = sqrt(std^2 + std_vanilla^2):")  # fmt: skip
    if "vanilla" not in accs or len(accs) < 2:
        print("  (not enough finished runs for a verdict)")
        return False
    results = verdicts(accs)
    print("\n".join(verdict_lines(results)))
    pairs = [("resnet56", "resnet20"), ("resnet110", "resnet32")]
    for t, s in pairs:
        pub = {m: lookup(t, s, m) for m in ("vanilla", "kd", "crd")}
        print(f"  For scale, 240 epochs on all 50,000 images (RepDistiller's README): {t} -> {s} "
              + ", ".join(f"{m} {p.acc:.2f}" for m, p in pub.items() if p is not None))  # fmt: skip
    return all(v.wins for v in results if v.wins is not None)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall_start, load_start = time.perf_counter(), os.getloadavg()
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    env = environment(args.jobs)
    print(
        f"Demo: {args.teacher} teacher -> {args.student} student, {args.epochs} epochs on {args.train_size:,} "
        f"class-balanced training images, seeds {args.seeds}, methods vanilla {args.methods}; {args.jobs} runs at "
        f"a time with {env['OMP_NUM_THREADS']} thread(s) each.\nData: {env['CIFAR100_ROOT']}. "
        f"Output: {shown(str(args.out))}/ (each run's log in {shown(str(args.out / 'logs'))}/)."
    )
    teacher = find_teacher(args.teacher, env)
    jobs = build_jobs(args, teacher)
    run_jobs(jobs, args.epochs, args.jobs, env, args.out / "logs")
    save, results = args.out / "save", args.out / "results"
    report = [sys.executable, "-m", "helper.report", str(save), "--out", str(results), "--plots"]
    print(f"\n$ {shlex.join(shown(a) for a in report)}", flush=True)
    subprocess.run(report, cwd=ROOT, env=env, check=True)
    report_on(jobs, args, teacher)
    plots = ", ".join(p.name for p in sorted(results.glob("*.png")))
    print(f"Table: {shown(str(results / 'results.md'))}; plots (error bars: ± std over seeds): {plots}")
    wall, child = time.perf_counter() - wall_start, resource.getrusage(resource.RUSAGE_CHILDREN)
    kept = sum(j.kept for j in jobs)
    print(
        f"Wall time {wall:.0f} s; CPU time of the runs {child.ru_utime + child.ru_stime:.0f} s (user+sys); "
        f"load average {load_start[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"
        + (f"; {kept} run(s) kept from an earlier demo" if kept else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
