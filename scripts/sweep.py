"""Many runs from one grid: expand it into train_student.py / train_teacher.py commands, skip the finished ones,
run the rest with submitit on a Slurm cluster, or on this machine with scripts/queue.sh (the run scripts' runner),
then write the result tables.

    python scripts/sweep.py --pairs resnet32x4:resnet8x4,resnet56:resnet20 --methods kd,crd --trials 1,2,3 \\
        --cluster slurm --partition gpu --time 720
    python scripts/sweep.py --config sweep.yaml --cluster local --runs_per_gpu 2
    python scripts/sweep.py --config sweep.yaml --dry_run          # print the commands, run nothing

The grid is the product of trials x flag combinations (``--grid``) x (pairs x methods, and models trained
alone). A YAML file (``--config``) holds the same keys as the flags; flags given on the command line win::

    save_dir: save
    pairs: [resnet32x4:resnet8x4, {teacher: path/to/ckpt.pth, student: resnet20}]
    methods: [kd, crd, vanilla, {name: crd+kd, distill: crd, alpha: 1, beta: 0.8}]
    models: [resnet56]            # trained alone with train_teacher.py
    trials: [1, 2, 3]             # each run's seed is derived from its trial
    flags: {epochs: 240, amp: bf16}
    grid: {learning_rate: [0.01, 0.05]}

A pair's teacher is a checkpoint path, or an architecture read from ``--teacher_template`` (default
``./save/models/{arch}_vanilla/ckpt_epoch_240.pth``, the layout of scripts/fetch_pretrained_teachers.sh).
``vanilla`` trains the pair's student alone. Every run gets ``--resume auto``: a finished run (its
``summary.json`` exists) is skipped here already, an interrupted one continues. Flags after ``--`` go to every
run verbatim. ``--gpus_per_run N`` > 1 runs each command under ``torchrun --nproc_per_node N``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python scripts/sweep.py`
    sys.path.insert(0, str(ROOT))

from helper import checkpoint as ckpt_io  # noqa: E402
from helper.options import student_parser, student_run_folder, teacher_parser, teacher_run_folder  # noqa: E402
from models import model_names, teacher_name_from_path  # noqa: E402

log = logging.getLogger("kd.sweep")

DEFAULT_TEMPLATE = "./save/models/{arch}_vanilla/ckpt_epoch_240.pth"
LIST_KEYS = ("pairs", "methods", "models", "trials")


class SweepError(ValueError):
    """A grid that cannot be expanded (unknown flag, missing teacher, bad value); reported as one line."""


# ----------------------------------------------------------------------------------------------------------
# The grid


@dataclass(frozen=True)
class Method:
    name: str  # the label (folder names use --distill and the weights)
    distill: str | None  # None: trained alone (train_teacher.py)
    flags: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class RunSpec:
    """One command of the sweep and the run folder it writes (named by the command-line tools' own rule)."""

    label: str
    script: str  # train_student.py or train_teacher.py
    argv: tuple[str, ...]
    folder: Path

    @property
    def finished(self) -> bool:
        return (self.folder / "summary.json").exists()

    def command(self, python: str, gpus_per_run: int) -> list[str]:
        launcher = [python]
        if gpus_per_run > 1:  # one run on several GPUs: DistributedDataParallel, --batch_size stays global
            launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus_per_run)]
        return [*launcher, str(ROOT / self.script), *self.argv]


def parse_method(spec: str | dict[str, Any]) -> Method:
    """``kd`` (published weights), ``vanilla``, or ``{name: .., distill: .., <flag>: <value>, ...}``."""
    if isinstance(spec, str):
        return Method(spec, None if spec == "vanilla" else spec)
    spec = dict(spec)
    distill = spec.pop("distill", None)
    name = str(spec.pop("name", distill))
    if distill is None and name != "vanilla":
        raise SweepError(f"method {spec}: give 'distill' (a --distill value) or name it 'vanilla'")
    return Method(name, distill, tuple(sorted(spec.items())))


def parse_pair(spec: str | dict[str, str], template: str) -> tuple[str, str, str | None]:
    """(teacher checkpoint, student, teacher architecture if named) from ``teacher:student`` or a mapping."""
    if isinstance(spec, dict):
        teacher, student = spec["teacher"], spec["student"]
    else:
        teacher, sep, student = spec.rpartition(":")
        if not sep:
            raise SweepError(f"pair {spec!r} is not teacher:student")
    if teacher in model_names():
        return template.format(arch=teacher), student, teacher
    return teacher, student, None


def flag_argv(flags: Iterable[tuple[str, Any]]) -> list[str]:
    """``[(key, value)]`` as command-line words: True -> ``--key``, False/None -> nothing, lists joined by ','."""
    argv: list[str] = []
    for key, value in flags:
        option = key if key.startswith("-") else (f"-{key}" if len(key) == 1 else f"--{key}")
        if value is True:
            argv.append(option)
        elif value is not False and value is not None:
            argv += [option, ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)]
    return argv


def _known(parser: argparse.ArgumentParser, key: str) -> bool:
    option = key if key.startswith("-") else (f"-{key}" if len(key) == 1 else f"--{key}")
    return option in parser._option_string_actions  # argparse keeps no public table of its options


def _combinations(grid: dict[str, list[Any]]) -> list[tuple[tuple[str, Any], ...]]:
    keys = sorted(grid)
    return [tuple(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def expand(config: dict[str, Any], extra: Sequence[str] = ()) -> list[RunSpec]:
    """Every run of the grid, in order, without duplicates (two entries that name the same run folder)."""
    parsers = {"train_student.py": student_parser(), "train_teacher.py": teacher_parser()}
    flags = dict(config.get("flags") or {})
    grid = {k: v if isinstance(v, list) else [v] for k, v in (config.get("grid") or {}).items()}
    for key in [*flags, *grid]:
        if not any(_known(p, key) for p in parsers.values()):
            raise SweepError(f"flag {key!r} is not a flag of train_student.py or train_teacher.py")
    template = config.get("teacher_template") or DEFAULT_TEMPLATE
    methods = [parse_method(m) for m in config.get("methods") or []]
    pairs = [parse_pair(p, template) for p in config.get("pairs") or []]
    trials = config.get("trials") or [None]  # None: the tools' default trial
    arch_cache: dict[str, str] = {}
    runs: dict[Path, RunSpec] = {}

    def add(label: str, script: str, argv: list[str], trial: Any, combo: tuple, model_t: str | None) -> None:
        parser = parsers[script]
        combo = tuple((k, v) for k, v in combo if _known(parser, k))  # e.g. --nce_k: students only
        shared = [(k, v) for k, v in (*flags.items(), *combo) if _known(parser, k)]
        argv = [*argv, *flag_argv([("trial", trial)]), *flag_argv(shared), *extra]
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # argparse printed the reason
            raise SweepError(f"{label}: {script} refuses {shlex.join(argv)}") from None
        if script == "train_teacher.py":
            folder = teacher_run_folder(args)
        else:
            folder = student_run_folder(args, model_t or _teacher_arch(args.path_t, args.model_t, arch_cache))
        if combo:  # the tools' names leave most flags out: a grid point gets a folder of its own
            folder = folder.with_name(folder.name + "".join(f"_{k}-{_slug(v)}" for k, v in combo))
            argv += ["--run_name", folder.name]
        if folder in runs:
            log.info("%s is the run of %s (same folder %s); kept once", label, runs[folder].label, folder)
            return
        runs[folder] = RunSpec(label, script, (*argv, "--resume", "auto"), folder)

    for trial, combo in itertools.product(trials, _combinations(grid)):
        suffix = f" trial {trial}" if trial is not None else ""
        suffix += "".join(f" {k}={v}" for k, v in combo)
        for model in config.get("models") or []:
            add(f"{model} alone{suffix}", "train_teacher.py", ["--model", model], trial, combo, None)
        for (path_t, student, arch_t), method in itertools.product(pairs, methods):
            label = f"{arch_t or path_t} -> {student} {method.name}{suffix}"
            if method.distill is None:
                add(label, "train_teacher.py", ["--model", student, *flag_argv(method.flags)], trial, combo, None)
                continue
            argv = ["--path_t", path_t, "--model_s", student, "--distill", method.distill, *flag_argv(method.flags)]
            add(label, "train_student.py", argv, trial, combo, arch_t)
    return list(runs.values())


def _slug(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)
    return "".join(ch if ch.isalnum() or ch in ".,+-" else "-" for ch in text)


def _teacher_arch(path: str, model_t: str | None, cache: dict[str, str]) -> str:
    """The architecture the student tool will record for this teacher (its rule: --model_t, the checkpoint's
    own record, the folder name)."""
    if path not in cache:
        if model_t or not Path(path).is_file():
            cache[path] = model_t or teacher_name_from_path(path)
        else:
            cache[path] = ckpt_io.teacher_arch(ckpt_io.load_checkpoint(path), path, None)
    return cache[path]


def missing_teachers(runs: Iterable[RunSpec]) -> list[str]:
    paths = {r.argv[r.argv.index("--path_t") + 1] for r in runs if "--path_t" in r.argv}
    return sorted(p for p in paths if not Path(p).is_file())


# ----------------------------------------------------------------------------------------------------------
# Execution


class RunCommand:
    """One run as a submitit job: the command in a child process. On a Slurm time limit or preemption submitit
    calls :meth:`checkpoint`: the run is asked to stop (it saves a checkpoint) and the job is requeued; the same
    command, with ``--resume auto``, continues it."""

    def __init__(self, command: list[str], cwd: str, label: str) -> None:
        self.command, self.cwd, self.label = command, cwd, label
        self._child: subprocess.Popen | None = None

    def __call__(self) -> str:
        print(f"[sweep] {self.label}: {shlex.join(self.command)}", flush=True)
        self._child = subprocess.Popen(self.command, cwd=self.cwd)
        try:
            code = self._child.wait()
        except KeyboardInterrupt:  # stop the run at its next step; it saves a resumable checkpoint
            self._child.send_signal(signal.SIGINT)
            self._child.wait()
            raise
        if code != 0:
            raise RuntimeError(f"{self.label}: exit status {code}")
        return self.label

    def checkpoint(self) -> Any:
        import submitit

        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._child.wait(timeout=300)
        return submitit.helpers.DelayedSubmission(RunCommand(self.command, self.cwd, self.label))

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_child": None}  # a process handle does not travel


def local_slots(gpus: list[int], gpus_per_run: int, runs_per_gpu: int) -> list[tuple[int, ...]]:
    """The places a run can take on this machine: groups of ``gpus_per_run`` GPUs, each ``runs_per_gpu`` times;
    without GPUs, ``runs_per_gpu`` runs on the CPU."""
    if not gpus or gpus_per_run == 0:
        return [()] * runs_per_gpu
    groups = [tuple(gpus[i : i + gpus_per_run]) for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]
    if not groups:
        raise SweepError(f"--gpus_per_run {gpus_per_run} but only {len(gpus)} GPU(s) here")
    return [g for g in groups for _ in range(runs_per_gpu)]


def run_local(runs: list[RunSpec], opts: argparse.Namespace) -> list[str]:
    """This machine's runs go through ``scripts/queue.sh``, the runner of the run scripts: one run per slot (a
    GPU, or a group of ``--gpus_per_run`` GPUs, ``--runs_per_gpu`` times; without GPUs ``--runs_per_gpu`` runs
    at once), one log per run in ``--log_dir``, Ctrl-C passed on to the runs (each saves a checkpoint). Returns
    the runs that did not finish (no ``summary.json`` afterwards)."""
    slots = local_slots(opts.gpus, opts.gpus_per_run, opts.runs_per_gpu)
    groups = " ".join(dict.fromkeys(",".join(map(str, slot)) for slot in slots if slot))
    lines = [f"source {shlex.quote(str(ROOT / 'scripts' / 'queue.sh'))}"]
    for run in runs:
        argv = run.command(opts.python, opts.gpus_per_run)
        lines.append(f"queue_add {shlex.quote(run.folder.name)} {shlex.join(argv)}")
    lines.append("queue_run")
    env = {**os.environ, "GPUS": groups, "JOBS_PER_GPU": str(opts.runs_per_gpu), "LOG_DIR": str(opts.log_dir),
           "DRY_RUN": "0", "EXTRA": ""}  # fmt: skip
    log.info("%d runs on %d local slot(s) (scripts/queue.sh); logs in %s", len(runs), len(slots), opts.log_dir)
    try:  # the queue's progress lines go beside this tool's log, on stderr
        out: int | None = sys.stderr.fileno()
    except (OSError, ValueError, AttributeError):
        out = None
    queue = subprocess.Popen(["bash", "-c", "\n".join(lines)], env=env, stdout=out)
    try:
        queue.wait()
    except KeyboardInterrupt:  # the queue got the signal as well: it stops the runs, which save a checkpoint
        queue.wait()
        raise
    return [r.label for r in runs if not r.finished]


def run_slurm(runs: list[RunSpec], opts: argparse.Namespace) -> list[str] | None:
    """One Slurm job per run (an array by default); waits for them unless ``--no_wait`` (then None)."""
    import submitit

    executor = submitit.AutoExecutor(folder=opts.log_dir, cluster="slurm")
    params: dict[str, Any] = {
        "name": "kd-sweep", "timeout_min": opts.time, "nodes": 1, "tasks_per_node": 1,
        "gpus_per_node": opts.gpus_per_run, "cpus_per_task": opts.cpus_per_run,
        "slurm_array_parallelism": opts.array_parallelism,
    }  # fmt: skip
    if opts.mem:
        params["mem_gb"] = opts.mem
    if opts.partition:
        params["slurm_partition"] = opts.partition
    executor.update_parameters(**params)
    commands = [RunCommand(r.command(opts.python, opts.gpus_per_run), os.getcwd(), r.label) for r in runs]
    batch = contextlib.nullcontext() if opts.one_job_per_run else executor.batch()
    with batch:
        jobs = [executor.submit(c) for c in commands]
    ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
    log.info(
        "submitted %d runs to Slurm (job%s %s); logs in %s",
        len(jobs),
        "s" * (len(ids) > 1),
        " ".join(ids),
        opts.log_dir,
    )
    if opts.no_wait:
        log.info("run the same command again later: finished runs are skipped and the tables written")
        return None
    failures: list[str] = []
    for job, run in zip(jobs, runs):
        job.wait()
        failures += _outcome(job, run)
    return failures


def _outcome(job: Any, run: RunSpec) -> list[str]:
    try:
        error = job.exception()
    except Exception as exc:  # the job died without a result (killed, out of memory)
        error = exc
    if error is None:
        log.info("[done]  %s", run.label)
        return []
    log.error("[FAILED] %s: %s (log %s)", run.label, str(error).strip().splitlines()[-1], job.paths.stderr)
    return [run.label]


# ----------------------------------------------------------------------------------------------------------
# The command line


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", type=Path, help="YAML file with the grid (keys as these flags; flags win)")
    p.add_argument("--pairs", help="teacher:student pairs, comma-separated (teacher: architecture or .pth path)")
    p.add_argument("--methods", help="--distill values, comma-separated; 'vanilla' trains the student alone")
    p.add_argument("--models", help="models to train alone (train_teacher.py), comma-separated")
    p.add_argument("--trials", "--seeds", dest="trials", help="trials, comma-separated (each run's seed follows)")
    p.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE", help="a flag of every run")
    p.add_argument("--grid", action="append", default=[], metavar="FLAG=V1,V2", help="one run per value")
    p.add_argument("--teacher_template", help=f"checkpoint of a teacher named by architecture ({DEFAULT_TEMPLATE})")
    p.add_argument("--save_dir", help="root of the run folders (default ./save), passed to every run")
    p.add_argument("--report_out", type=Path, help="result tables (default <save_dir>/results)")
    p.add_argument("--log_dir", type=Path, help="job logs, one per run (default <save_dir>/sweep_logs)")
    p.add_argument("--cluster", choices=["local", "slurm"], default=None, help="where runs execute (local)")
    p.add_argument("--gpus", help="local: GPU ids to use, comma-separated (default: every visible GPU)")
    p.add_argument("--runs_per_gpu", type=int, help="local: runs at once per GPU (or on the CPU) (default 1)")
    p.add_argument("--gpus_per_run", type=int, help="GPUs per run; > 1: torchrun, one run over them (default 1)")
    p.add_argument("--partition", help="Slurm partition")
    p.add_argument("--cpus_per_run", type=int, help="Slurm: CPUs per run (default 8)")
    p.add_argument("--time", type=int, help="Slurm: minutes per run before requeue/timeout (default 1440)")
    p.add_argument("--mem", type=int, help="Slurm: GB of memory per run (default: the partition's)")
    p.add_argument("--array_parallelism", type=int, help="Slurm: runs of the array at once (default 64)")
    p.add_argument("--one_job_per_run", action="store_true", help="Slurm: separate jobs instead of a job array")
    p.add_argument("--no_wait", action="store_true", help="Slurm: submit and exit (rerun later for the tables)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--python", default=sys.executable, help="interpreter of the runs (default: this one)")
    p.add_argument("--poll", type=float, default=5.0, help=argparse.SUPPRESS)  # seconds between job checks
    return p.parse_args(argv), extra


# Where a flag is not given: the --config file's value, else this.
DEFAULTS = {"cluster": "local", "runs_per_gpu": 1, "gpus_per_run": 1, "cpus_per_run": 8, "time": 1440,
            "array_parallelism": 64, "save_dir": "./save", "gpus": None, "partition": None, "mem": None,
            "one_job_per_run": False, "no_wait": False}  # fmt: skip


def build_config(opts: argparse.Namespace) -> dict[str, Any]:
    """The YAML file's keys, overridden and extended by the command line; also settles ``opts``' defaults."""
    import yaml

    config: dict[str, Any] = {}
    if opts.config is not None:
        config = yaml.safe_load(opts.config.read_text()) or {}
        if not isinstance(config, dict):
            raise SweepError(f"--config {opts.config}: expected a mapping of keys to values")
    for key in LIST_KEYS:
        if getattr(opts, key) is not None:
            config[key] = [v.strip() for v in getattr(opts, key).split(",") if v.strip()]
        elif isinstance(config.get(key), str | int):
            config[key] = [config[key]]
    config["flags"] = dict(config.get("flags") or {})
    config["grid"] = dict(config.get("grid") or {})
    import yaml

    for text, target in [*((t, "flags") for t in opts.set), *((t, "grid") for t in opts.grid)]:
        key, sep, value = text.partition("=")
        if not sep:
            raise SweepError(f"--{'set' if target == 'flags' else 'grid'} {text!r}: expected FLAG=VALUE")
        # YAML scalars: "0.05" -> 0.05, "true" -> True; --grid splits at commas, --set keeps "150,180,210" whole.
        values = (
            [yaml.safe_load(v) for v in value.split(",") if v.strip()] if target == "grid" else yaml.safe_load(value)
        )
        config[target][key.strip()] = values
    for key, default in DEFAULTS.items():
        if getattr(opts, key) in (None, False):
            setattr(opts, key, config.get(key, default))
    if opts.teacher_template is None:
        opts.teacher_template = config.get("teacher_template") or os.environ.get("TEACHER_TEMPLATE")
    config["teacher_template"] = opts.teacher_template
    config["flags"]["save_dir"] = opts.save_dir
    opts.report_out = opts.report_out or Path(opts.save_dir) / "results"
    opts.log_dir = opts.log_dir or Path(opts.save_dir) / "sweep_logs"
    if isinstance(opts.gpus, str | int):
        opts.gpus = [int(g) for g in str(opts.gpus).split(",") if g.strip()]
    elif opts.gpus is None:
        import torch

        opts.gpus = list(range(torch.cuda.device_count()))
    if not config.get("pairs") and not config.get("models"):
        raise SweepError("nothing to run: give --pairs with --methods, and/or --models (or a --config)")
    if config.get("pairs") and not config.get("methods"):
        raise SweepError("--pairs needs --methods (e.g. --methods kd,crd,vanilla)")
    return config


def report(opts: argparse.Namespace) -> None:
    """The result tables over the sweep's save folder (helper.report: mean ± std beside the published)."""
    from helper import report as tables

    if not list(Path(opts.save_dir).rglob("summary.json")):
        log.warning("no finished run under %s yet: no tables", opts.save_dir)
        return
    tables.main([str(opts.save_dir), "--out", str(opts.report_out)])


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    opts, extra = parse_args(argv)
    try:
        config = build_config(opts)
        runs = expand(config, extra)
        missing = [] if opts.dry_run else missing_teachers(r for r in runs if not r.finished)
        if missing:
            raise SweepError(
                "missing teacher checkpoint(s): " + ", ".join(missing) + "; train them first (--models) or point "
                "--teacher_template at them"
            )
    except (SweepError, OSError) as exc:
        log.error("error: %s", exc)
        return 2
    todo = [r for r in runs if not r.finished]
    log.info("%d runs: %d finished (skipped), %d to run", len(runs), len(runs) - len(todo), len(todo))
    if opts.dry_run:
        for run in runs:
            prefix = "# finished: " if run.finished else ""
            print(prefix + shlex.join(run.command(opts.python, opts.gpus_per_run)))
        return 0
    failures: list[str] | None = []
    if todo:
        if __name__ != "__main__":  # imported: the jobs unpickle RunCommand without importing this file
            import cloudpickle

            cloudpickle.register_pickle_by_value(sys.modules[__name__])
        failures = run_slurm(todo, opts) if opts.cluster == "slurm" else run_local(todo, opts)
    if failures is None:
        return 0
    report(opts)
    if failures:
        log.error("%d of %d runs failed: %s", len(failures), len(todo), "; ".join(failures))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
