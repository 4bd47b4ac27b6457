"""The two command lines end to end, in subprocesses, on small subsets of CIFAR-100 (the synthetic one of
``cifar_fixture.py`` where ``../shared`` is missing)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shared_paths import DATA, ROOT, needs_real_teachers, real_teacher

from models import create_model

pytestmark = pytest.mark.slow

# Small, fast protocol: 100 training images (1 per class), 100 test images, one epoch.
SMALL = ["--epochs", "1", "--train_size", "100", "--test_size", "100", "--print_freq", "1", "--data_folder", str(DATA)]

# RepDistiller's scripts/run_cifar_distill.sh, verbatim (teacher path and student as there).
REPDISTILLER_COMMANDS = {
    "kd": "--distill kd -r 0.1 -a 0.9 -b 0",
    "hint": "--distill hint -a 0 -b 100",
    "attention": "--distill attention -a 0 -b 1000",
    "similarity": "--distill similarity -a 0 -b 3000",
    "correlation": "--distill correlation -a 0 -b 0.02",
    "vid": "--distill vid -a 0 -b 1",
    "rkd": "--distill rkd -a 0 -b 1",
    "pkt": "--distill pkt -a 0 -b 30000",
    "abound": "--distill abound -a 0 -b 1",
    "factor": "--distill factor -a 0 -b 200",
    "fsp": "--distill fsp -a 0 -b 50",
    "nst": "--distill nst -a 0 -b 50",
    "crd": "--distill crd -a 0 -b 0.8",
    "crd+kd": "--distill crd -a 1 -b 0.8",
}

SUMMARY_KEYS = {
    "test_acc", "test_acc_top5", "best_acc", "best_epoch", "teacher_acc", "params", "wall_time", "images_per_sec",
    "environment", "method", "model_s", "model_t", "gamma", "alpha", "beta", "seed",
}  # fmt: skip


def run(script: str, *argv: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {' '.join(argv)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def only_folder(parent: Path) -> Path:
    (folder,) = [p for p in parent.iterdir() if p.is_dir()]
    return folder


@pytest.fixture(scope="module")
def repdistiller_teacher(tmp_path_factory) -> Path:
    """A resnet32x4 teacher in RepDistiller's published layout and format ({'model': state_dict} only)."""
    root = tmp_path_factory.mktemp("teachers")
    path = root / "save" / "models" / "resnet32x4_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet32x4").state_dict(), "epoch": 240}, path)
    return path


@pytest.mark.parametrize("method", list(REPDISTILLER_COMMANDS))
def test_repdistiller_commands_run_verbatim(method, repdistiller_teacher, tmp_path):
    argv = ["--path_t", str(repdistiller_teacher), *REPDISTILLER_COMMANDS[method].split()]
    argv += ["--model_s", "resnet8x4", "--trial", "1", *SMALL, "--init_epochs", "1", "--nce_k", "16"]
    run("train_student.py", *argv, "--save_dir", str(tmp_path), cwd=tmp_path)
    folder = only_folder(tmp_path / "student_model")
    assert ":" not in folder.name and folder.name.startswith("S-resnet8x4_T-resnet32x4_cifar100_")
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary) >= SUMMARY_KEYS
    assert summary["model_t"] == "resnet32x4" and summary["params"] == 1_233_540
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    main = [r for r in rows if r["stage"] == "main"]
    assert len(main) == 1 and {"lr", "train_loss", "train_acc", "test_acc", "test_acc_top5", "test_loss"} <= set(
        main[0]
    )
    # The summary reports the epoch's evaluation: a count of the 100 test images, in percent.
    assert summary["test_acc"] == summary["best_acc"] == main[0]["test_acc"] and summary["best_epoch"] == 1
    assert float(summary["test_acc"]).is_integer() and summary["test_acc"] <= main[0]["test_acc_top5"]
    tokens = REPDISTILLER_COMMANDS[method].split()
    weights = dict(zip(tokens[2::2], tokens[3::2]))
    assert (summary["gamma"], summary["alpha"], summary["beta"]) == (
        float(weights.get("-r", 1)),
        float(weights["-a"]),
        float(weights["-b"]),
    )
    if method in ("abound", "factor", "fsp"):
        assert [r["stage"] for r in rows] == ["init", "main"]
    ckpt = torch.load(folder / "latest.pth", map_location="cpu", weights_only=True)
    assert ckpt["arch"] == "resnet8x4" and "optimizer" in ckpt and "distiller" in ckpt


def test_teacher_trains_and_its_checkpoint_serves_as_teacher(tmp_path):
    run("train_teacher.py", "--model", "resnet8", *SMALL, "--save_dir", str(tmp_path), cwd=tmp_path)
    folder = only_folder(tmp_path / "models")
    assert folder.name == "resnet8_cifar100_lr_0.05_decay_0.0005_trial_0_ep1_n100_test100"
    ckpt = torch.load(folder / "ckpt_epoch_1.pth", map_location="cpu", weights_only=True)
    assert set(ckpt["model"]) == set(create_model("resnet8").state_dict())  # RepDistiller reads ['model']
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["method"] == "vanilla" and summary["params"] == 83_892
    run(
        "train_student.py", "--path_t", str(folder / "ckpt_epoch_1.pth"), "--model_s", "resnet8", "--distill", "kd",
        *SMALL, "--save_dir", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    student_folder = only_folder(tmp_path / "student_model")
    student = json.loads((student_folder / "summary.json").read_text())
    assert student["model_t"] == "resnet8" and student["teacher_acc"] == pytest.approx(summary["test_acc"])
    # The teacher is measured before training, and run.log holds the lines logged before its folder existed.
    log_text = (student_folder / "run.log").read_text()
    measured = f"teacher resnet8 ({folder / 'ckpt_epoch_1.pth'}): test accuracy {summary['test_acc']:.2f}"
    assert measured in log_text and log_text.index("data:") < log_text.index(measured)
    assert log_text.index("data:") < log_text.index("run folder:")


@needs_real_teachers("resnet20")
def test_real_teacher_is_measured_before_training(tmp_path):
    teacher = real_teacher("resnet20")
    proc = run(
        "train_student.py", "--path_t", str(teacher), "--model_s", "resnet8", "--distill", "kd", "--epochs", "1",
        "--train_size", "100", "--data_folder", str(DATA), "--save_dir", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    summary = json.loads((only_folder(tmp_path / "student_model") / "summary.json").read_text())
    # The published-format resnet20 scores 68.83% on the full test set (shared/teachers/README.md).
    assert summary["teacher_acc"] == pytest.approx(68.83, abs=0.02)
    assert "teacher resnet20" in proc.stderr and "68.83" in proc.stderr
    # run.log holds the lines logged before the run folder existed too.
    log_text = (only_folder(tmp_path / "student_model") / "run.log").read_text()
    assert "test accuracy 68.83" in log_text and log_text.index("data:") < log_text.index("run folder:")


def test_training_loss_falls_on_a_tiny_subset(tmp_path):
    argv = [
        "--model",
        "resnet8",
        "--epochs",
        "6",
        "--train_size",
        "500",
        "--test_size",
        "100",
        "--lr_decay_epochs",
        "10",
    ]
    run("train_teacher.py", *argv, "--data_folder", str(DATA), "--save_dir", str(tmp_path), cwd=tmp_path)
    rows = [json.loads(line) for line in (only_folder(tmp_path / "models") / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5, 6]
    losses = [r["train_loss"] for r in rows]
    # CE starts near ln(100) = 4.6; six epochs on 500 images must bring it clearly down.
    assert losses[0] > 4.0 and losses[-1] < losses[0] - 0.3


def final_weights(folder: Path) -> dict[str, torch.Tensor]:
    state = torch.load(folder / "latest.pth", map_location="cpu", weights_only=True)
    return {**state["model"], **{f"distiller.{k}": v for k, v in state["distiller"].items()}}


def test_resume_gives_the_weights_of_an_uninterrupted_run(repdistiller_teacher, tmp_path):
    common = [
        "--path_t", str(repdistiller_teacher), "--model_s", "resnet8", "--distill", "crd", "-a", "1",
        "--train_size", "200", "--test_size", "100", "--nce_k", "32", "--batch_size", "64",
        "--data_folder", str(DATA), "--save_dir", str(tmp_path), "--deterministic",
    ]  # fmt: skip
    run("train_student.py", *common, "--epochs", "2", "--run_name", "straight", cwd=tmp_path)
    run("train_student.py", *common, "--epochs", "1", "--run_name", "resumed", cwd=tmp_path)
    run("train_student.py", *common, "--epochs", "2", "--run_name", "resumed", "--resume", "auto", cwd=tmp_path)
    straight = final_weights(tmp_path / "student_model" / "straight")
    resumed = final_weights(tmp_path / "student_model" / "resumed")
    assert straight.keys() == resumed.keys() and any("memory" in k for k in straight)
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    rows = (tmp_path / "student_model" / "resumed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    # A finished run is skipped by --resume auto.
    proc = run("train_student.py", *common, "--epochs", "2", "--run_name", "resumed", "--resume", "auto", cwd=tmp_path)
    assert "already finished" in proc.stderr


def test_a_second_run_in_the_same_folder_is_refused(tmp_path):
    argv = ["--model", "resnet8", *SMALL, "--save_dir", str(tmp_path)]
    run("train_teacher.py", *argv, cwd=tmp_path)
    folder = only_folder(tmp_path / "models")
    before = (folder / "summary.json").read_bytes()
    proc = run("train_teacher.py", *argv, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "already holds a run; pass --resume auto" in proc.stderr
    assert "Traceback" not in proc.stderr and (folder / "summary.json").read_bytes() == before


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model_s", "resnet9"], "--model_s 'resnet9': unknown model"),
        (["--distill", "magic"], "--distill 'magic': unknown method"),
        (["--epochs", "0"], "--epochs 0: must be positive"),
        (["--lr_decay_epochs", "a,b"], "--lr_decay_epochs"),
        (["--distill", "hint", "--hint_layer", "4"], "hint"),
        (["--model_s", "resnet8", "--distill", "fsp", "--model_t", "resnet32x4"], "fsp"),
    ],
)
def test_user_errors_are_one_line_before_any_work(argv, message, repdistiller_teacher, tmp_path):
    proc = run(
        "train_student.py", "--path_t", str(repdistiller_teacher), *SMALL, *argv, "--save_dir", str(tmp_path),
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and message in proc.stderr
    assert not (tmp_path / "student_model").exists() or not any((tmp_path / "student_model").rglob("summary.json"))


def test_crd_default_nce_k_on_a_subset_draws_with_replacement(repdistiller_teacher, tmp_path):
    """RepDistiller's 16384 negatives on 100 images (99 negatives per class) run, drawn with replacement as
    RepDistiller's ``CIFAR100InstanceSample`` does, and the log says so."""
    proc = run(
        "train_student.py", "--path_t", str(repdistiller_teacher), "--model_s", "resnet8", *SMALL,
        "--distill", "crd", "-a", "0", "-b", "0.8", "--save_dir", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    assert "--nce_k 16384 exceeds the 99 negatives available to some classes" in proc.stderr
    summary = json.loads((only_folder(tmp_path / "student_model") / "summary.json").read_text())
    assert summary["train_size"] == 100 and math.isfinite(summary["test_acc"])


def test_missing_teacher_checkpoint_is_refused(tmp_path):
    proc = run(
        "train_student.py", "--path_t", str(tmp_path / "nope.pth"), *SMALL, "--save_dir", str(tmp_path),
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "nope.pth does not exist" in proc.stderr and "Traceback" not in proc.stderr
