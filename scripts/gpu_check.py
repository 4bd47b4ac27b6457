"""The first command to run on a GPU machine (about 10 minutes on one modern GPU): does the training step run on
this GPU as the CPU tests say it will, and how fast?

    python scripts/gpu_check.py                      # or: make gpu-check
    python scripts/gpu_check.py --json gpu_check.json --data_folder /data/cifar100

1. ``tests``: the tests marked ``cuda`` (``pytest -m cuda``).
2. ``sync``: 20 steps of every method on tiny models under ``torch.cuda.set_sync_debug_mode("error")``: any
   host-device synchronisation inside a step raises. The first step is a warm-up outside the check (lazy CUDA
   initialisation, CRD's one-time log of its normalisation constants); the end-of-epoch reads come after it.
3. ``deterministic``: KD, CRD and ReviewKD, 20 steps twice under ``torch.use_deterministic_algorithms(True)``:
   the weights must be bit-identical.
4. ``benchmark``: ``scripts/benchmark.py``'s table (the RepDistiller-style loop against fp32, bf16 +
   channels-last + folded teacher, and the same compiled) for resnet32x4 -> resnet8x4 and resnet56 -> resnet20.
5. ``epoch``: one full-data epoch of KD and CRD on resnet32x4 -> resnet8x4 (``train_student.py`` with bf16, a
   randomly initialised teacher: speed does not depend on its weights): images/s, peak GPU memory, and the
   projected time of RepDistiller's 240 epochs.

One summary table is printed and, with ``--json``, written. Without CUDA the script says so, runs the CPU
stand-ins of 2 and 3 (host reads counted by a dispatch mode, see helper/sync_check.py; determinism of the CPU
kernels), and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS's condition for deterministic results

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from distiller_zoo import PairError, get_method, method_names  # noqa: E402
from helper.engine import Precision, train_one_epoch  # noqa: E402
from helper.sync_check import HostReads, StepClock, reads_between_intervals, tiny_loader, tiny_objective  # noqa: E402

TINY_PAIR = ("resnet14", "resnet8")
BATCH, NCE_K, STEPS = 8, 16, 20
DETERMINISTIC_METHODS = ("kd", "crd", "reviewkd")
BENCH_PAIRS = ("resnet32x4,resnet8x4", "resnet56,resnet20")
BENCH_SETTINGS = "fp32,bf16+cl+fold,bf16+cl+fold+compile"


def _steps(name: str, device: torch.device, watch: str = "none") -> tuple[HostReads | None, Any]:
    """STEPS training steps of ``name`` on tiny models. ``watch``: ``"cuda"`` raises at any synchronisation from
    the second step to the last; ``"count"`` counts host reads (CPU stand-in); ``"none"`` just trains."""
    objective, optimizer = tiny_objective(name, TINY_PAIR, device, STEPS * BATCH, BATCH, NCE_K)
    loader = tiny_loader(device, STEPS * BATCH, BATCH, NCE_K if get_method(name).needs_contrast else 0)
    precision = Precision("none", device.type)
    clock = StepClock()

    def progress(batches: Any) -> Any:
        for i, batch in enumerate(clock.timed(batches)):
            if watch == "cuda":
                torch.cuda.set_sync_debug_mode("error" if i >= 1 else "default")
            yield batch
        if watch == "cuda":
            torch.cuda.set_sync_debug_mode("default")  # the end-of-epoch reads

    mode = HostReads(clock) if watch == "count" else None
    context = mode.watching_methods() if mode else contextlib.nullcontext()
    try:
        with context:
            train_one_epoch(
                objective, loader, optimizer, precision, precision.scaler(), device, 1, 0, progress=progress
            )
    finally:
        if watch == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    return mode, objective


def check_sync(device: torch.device, methods: list[str]) -> dict[str, str]:
    """Per method: ``ok``, or the first synchronisation (CUDA) / host reads (CPU) inside a step."""
    results = {}
    for name in methods:
        try:
            mode, _ = _steps(name, device, "cuda" if device.type == "cuda" else "count")
            bad = reads_between_intervals(mode.reads, print_freq=STEPS) if mode else []  # step 0: warm-up
            results[name] = "ok" if not bad else f"FAILED: host reads {bad[:3]}"
        except PairError as exc:
            results[name] = f"n/a ({exc})"
        except RuntimeError as exc:
            results[name] = f"FAILED: {str(exc).splitlines()[0][:160]}"
    return results


def check_deterministic(device: torch.device) -> dict[str, str]:
    """Per method: ``bit-identical``, or what went wrong, for two seeded runs under deterministic algorithms."""
    results = {}
    torch.use_deterministic_algorithms(True)
    try:
        for name in DETERMINISTIC_METHODS:
            try:
                states = [_steps(name, device)[1].student.state_dict() for _ in range(2)]
            except RuntimeError as exc:
                results[name] = f"FAILED: {str(exc).splitlines()[0][:160]}"
                continue
            differ = [k for k in states[0] if not torch.equal(states[0][k], states[1][k])]
            results[name] = "bit-identical" if not differ else f"FAILED: {len(differ)} tensors differ"
    finally:
        torch.use_deterministic_algorithms(False)
    return results


def run_cuda_tests() -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "cuda", str(ROOT / "tests")], cwd=ROOT, capture_output=True,
        text=True,
    )  # fmt: skip
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return ("ok: " if proc.returncode == 0 else "FAILED: ") + last


def run_benchmark(out: Path, data_folder: str | None) -> dict[str, str]:
    """benchmark.py's table per pair (its JSON file), or why it failed."""
    results = {}
    for pair in BENCH_PAIRS:
        path = out / f"benchmark_{pair.replace(',', '-')}.json"
        argv = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--device", "cuda", "--pair", pair]
        argv += ["--methods", "kd,crd", "--settings", BENCH_SETTINGS, "--rounds", "3", "--json", str(path)]
        argv += ["--data_folder", data_folder] if data_folder else []
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True)
        print(proc.stdout, end="")
        results[pair] = f"ok: {path}" if proc.returncode == 0 else f"FAILED: {proc.stderr.strip()[-300:]}"
    return results


def run_epoch(method: str, out: Path, data_folder: str | None) -> dict[str, Any]:
    """One full-data epoch of ``method`` on resnet32x4 -> resnet8x4 with default flags and bf16."""
    import models
    import train_student

    teacher_dir = out / "teacher" / "resnet32x4_vanilla"
    teacher_dir.mkdir(parents=True, exist_ok=True)
    teacher_path = teacher_dir / "ckpt_epoch_240.pth"
    if not teacher_path.exists():  # random weights: speed does not depend on them
        torch.save({"model": models.create_model("resnet32x4", num_classes=100).state_dict()}, teacher_path)
    argv = ["--path_t", str(teacher_path), "--distill", method, "--model_s", "resnet8x4", "--epochs", "1"]
    argv += ["--amp", "bf16", "--save_dir", str(out / "runs"), "--run_name", f"{method}_epoch"]
    argv += ["--data_folder", data_folder] if data_folder else []
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    code = train_student.main(argv)
    seconds = time.perf_counter() - start
    summaries = list((out / "runs").rglob(f"{method}_epoch/summary.json"))
    if code or not summaries:
        return {"status": f"FAILED (exit {code})"}
    summary = json.loads(summaries[0].read_text())
    return {
        "status": "ok", "images_per_s": summary.get("images_per_sec"), "process_s": round(seconds, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "projected_240_epochs_min": round(240 * summary["wall_time"] / 60, 1),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None, help="also write the summary to this file")
    p.add_argument("--data_folder", default=None, help="CIFAR-100 root (default: $CIFAR100_ROOT, else ./data)")
    p.add_argument("--methods", default=None, help="comma-separated methods for the sync check (default: all)")
    p.add_argument("--out", default=None, help="folder for runs and benchmark files (default: a temporary one)")
    args = p.parse_args(argv)
    methods = args.methods.split(",") if args.methods else method_names()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    summary: dict[str, Any] = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    if not cuda:
        print("no CUDA device: running the CPU stand-ins (host reads counted, CPU determinism); no benchmark")
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu_check_"))
    if cuda:
        summary["tests"] = run_cuda_tests()
    summary["sync"] = check_sync(device, methods)
    summary["deterministic"] = check_deterministic(device)
    if cuda:
        summary["benchmark"] = run_benchmark(out, args.data_folder)
        summary["epoch"] = {m: run_epoch(m, out, args.data_folder) for m in ("kd", "crd")}
    print(table(summary))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    failed = "FAILED" in json.dumps(summary)
    return 1 if failed and cuda else 0


def table(summary: dict[str, Any]) -> str:
    """The summary as one two-column table: check, result."""
    rows = [("device", summary["device"]), ("torch", summary["torch"])]
    for part in ("tests", "sync", "deterministic", "benchmark", "epoch"):
        value = summary.get(part)
        if isinstance(value, dict):
            rows += [(f"{part}: {k}", v if isinstance(v, str) else json.dumps(v)) for k, v in value.items()]
        elif value is not None:
            rows.append((part, value))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


if __name__ == "__main__":
    raise SystemExit(main())
