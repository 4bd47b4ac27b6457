"""scripts/sweep.py: the grid expands into the command-line tools' runs (their own folder names), finished runs
are skipped, and a small grid runs end to end with scripts/queue.sh (the local runner) on the CPU and is tabulated."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shared_paths import DATA, ROOT

from helper.options import student_parser, student_run_folder
from models import create_model

spec = importlib.util.spec_from_file_location("sweep", ROOT / "scripts" / "sweep.py")
sweep = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sweep  # dataclasses look their module up here
spec.loader.exec_module(sweep)


def config(**overrides):
    base = {"pairs": ["resnet32x4:resnet8x4"], "methods": ["kd"], "flags": {"save_dir": "S"}}
    return {**base, **overrides}


def test_grid_expands_into_runs_named_as_the_tools_name_them():
    runs = sweep.expand(
        config(
            pairs=["resnet32x4:resnet8x4", {"teacher": "t/resnet56_vanilla/ckpt.pth", "student": "resnet20"}],
            methods=["kd", "vanilla", {"name": "crd+kd", "distill": "crd", "alpha": 1, "beta": 0.8}],
            models=["resnet56"],
            trials=[1, 2],
            flags={"save_dir": "S", "epochs": 5, "nce_k": 4096},
            grid={"learning_rate": [0.01, 0.05]},
        )
    )
    # 2 trials x 2 learning rates x (1 model alone + 2 pairs x 3 methods)
    assert len(runs) == 2 * 2 * (1 + 2 * 3) == len({r.folder for r in runs})
    scripts = [r.script for r in runs]
    assert scripts.count("train_teacher.py") == 2 * 2 * (1 + 2) and scripts.count("train_student.py") == 2 * 2 * 4
    crd = next(r for r in runs if "--distill" in r.argv and "crd" in r.argv and "resnet20" in r.argv)
    argv = list(crd.argv)
    assert argv[argv.index("--path_t") + 1] == "t/resnet56_vanilla/ckpt.pth"
    assert argv[-2:] == ["--resume", "auto"] and "--alpha" in argv and "--nce_k" in argv and "--epochs" in argv
    # The tools' own name, and the grid point (the name leaves the learning rate out): passed as --run_name.
    default = student_run_folder(student_parser().parse_args(argv[: argv.index("--run_name")]), "resnet56")
    lr = argv[argv.index("--learning_rate") + 1]
    assert crd.folder == default.with_name(f"{default.name}_learning_rate-{lr}")
    assert crd.folder.name == f"S-resnet20_T-resnet56_cifar100_crd_r-1_a-1_b-0.8_1_ep5_learning_rate-{lr}"
    assert argv[argv.index("--run_name") + 1] == crd.folder.name
    named = next(r for r in runs if "resnet8x4" in r.argv and "kd" in r.argv)
    assert named.argv[named.argv.index("--path_t") + 1] == "./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth"
    alone = [r for r in runs if r.script == "train_teacher.py"]
    assert all("--nce_k" not in r.argv for r in alone)  # student-only flags stay with the students
    assert {r.folder.parent for r in alone} == {Path("S/models")}
    assert any(r.folder.name == "resnet8x4_cifar100_lr_0.01_decay_0.0005_trial_2_ep5_learning_rate-0.01" for r in alone)
    assert not any("--run_name" in r.argv for r in sweep.expand(config(flags={"epochs": 5})))  # no grid: no name


def test_duplicates_are_run_once_and_bad_flags_are_refused():
    # A grid over a student-only flag gives the same teacher run twice: kept once.
    runs = sweep.expand(config(methods=["vanilla", "crd"], grid={"nce_k": [16, 32]}))
    assert [r.script for r in runs] == ["train_teacher.py", "train_student.py", "train_student.py"]
    assert "--run_name" not in runs[0].argv and runs[2].folder.name.endswith("_nce_k-32")
    with pytest.raises(sweep.SweepError, match="'lr' is not a flag"):
        sweep.expand(config(flags={"lr": 0.1}))
    with pytest.raises(sweep.SweepError, match="train_student.py refuses"):
        sweep.expand(config(flags={"epochs": "many"}))
    with pytest.raises(sweep.SweepError, match="is not teacher:student"):
        sweep.expand(config(pairs=["resnet8x4"]))


def test_flags_and_yaml_merge(tmp_path):
    file = tmp_path / "grid.yaml"
    file.write_text("pairs: resnet56:resnet20\nmethods: [kd, crd]\ntrials: [3]\nflags: {epochs: 2}\ncluster: slurm\n")
    opts, extra = sweep.parse_args(
        ["--config", str(file), "--methods", "kd", "--set", "lr_decay_epochs=1,2", "--grid", "learning_rate=0.01,0.1",
         "--save_dir", str(tmp_path), "--gpus", "", "--", "--amp", "bf16"]
    )  # fmt: skip
    merged = sweep.build_config(opts)
    assert merged["methods"] == ["kd"] and merged["pairs"] == ["resnet56:resnet20"] and merged["trials"] == [3]
    assert merged["flags"] == {"epochs": 2, "lr_decay_epochs": "1,2", "save_dir": str(tmp_path)}
    assert merged["grid"] == {"learning_rate": [0.01, 0.1]} and extra == ["--amp", "bf16"]
    assert opts.cluster == "slurm" and opts.report_out == tmp_path / "results" and opts.gpus == []
    runs = sweep.expand(merged, extra)
    assert len(runs) == 2 and all(r.argv[r.argv.index("--amp") + 1] == "bf16" for r in runs)
    assert sweep.flag_argv([("channels_last", True), ("compile", False), ("a", 1)]) == ["--channels_last", "-a", "1"]


def test_slots_and_multi_gpu_commands():
    assert sweep.local_slots([], 1, 3) == [(), (), ()]
    assert sweep.local_slots([0, 1], 1, 2) == [(0,), (0,), (1,), (1,)]
    assert sweep.local_slots([0, 1, 2, 3, 4], 2, 1) == [(0, 1), (2, 3)]
    with pytest.raises(sweep.SweepError, match="only 1 GPU"):
        sweep.local_slots([0], 2, 1)
    (run,) = sweep.expand(config())
    assert run.command("py", 1)[:2] == ["py", str(ROOT / "train_student.py")]
    assert run.command("py", 4)[:6] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4"]


# ---------------------------------------------------------------------------------------------- end to end


def run_sweep(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "sweep.py"), *argv], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_a_small_grid_runs_locally_is_tabulated_and_a_rerun_skips_it(tmp_path):
    teacher = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    teacher.parent.mkdir()
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8").state_dict()}, teacher)  # RepDistiller's format: no arch
    (tmp_path / "grid.yaml").write_text(
        json.dumps(  # JSON is YAML
            {
                "pairs": ["resnet8:resnet8"],
                "methods": ["kd", "crd"],
                "teacher_template": str(tmp_path / "{arch}_vanilla" / "ckpt_epoch_240.pth"),
                "flags": {
                    "epochs": 1,
                    "train_size": 100,
                    "test_size": 100,
                    "nce_k": 50,
                    "device": "cpu",
                    "data_folder": str(DATA),
                },
            }  # fmt: skip
        )
    )
    argv = ["--config", "grid.yaml", "--save_dir", "save", "--cluster", "local", "--runs_per_gpu", "2", "--gpus", ""]
    argv += ["--poll", "0.5"]
    dry = run_sweep(*argv, "--dry_run", cwd=tmp_path)
    assert dry.returncode == 0, dry.stderr
    commands = dry.stdout.splitlines()
    assert len(commands) == 2 and all("--resume auto" in c and "--nce_k 50" in c for c in commands)
    assert not (tmp_path / "save").exists()  # a dry run runs nothing

    first = run_sweep(*argv, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 runs: 0 finished (skipped), 2 to run" in first.stderr and first.stderr.count("[done]") == 2
    folders = sorted((tmp_path / "save" / "student_model").iterdir())
    assert [f.name.split("_cifar100_")[1].split("_")[0] for f in folders] == ["crd", "kd"]
    for folder in folders:
        summary = json.loads((folder / "summary.json").read_text())
        (row,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert summary["model_t"] == "resnet8" and summary["test_acc"] == row["test_acc"]
        assert float(row["test_acc"]).is_integer()  # a count of the 100 test images, in percent
    table = (tmp_path / "save" / "results" / "results.md").read_text()
    assert "KD" in table and "CRD" in table
    rows = (tmp_path / "save" / "results" / "results.csv").read_text().splitlines()
    assert len(rows) == 3  # a header and one row per method
    # scripts/queue.sh, the run scripts' runner, ran them: one log per run, named by its folder
    assert sorted(p.stem for p in (tmp_path / "save" / "sweep_logs").glob("*.log")) == [f.name for f in folders]

    stamps = [(f / "summary.json").stat().st_mtime_ns for f in folders]
    again = run_sweep(*argv, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 runs: 2 finished (skipped), 0 to run" in again.stderr and "[start]" not in again.stderr
    assert [(f / "summary.json").stat().st_mtime_ns for f in folders] == stamps
    marked = run_sweep(*argv, "--dry_run", cwd=tmp_path).stdout.splitlines()
    assert all(line.startswith("# finished: ") for line in marked)


def test_local_runs_go_through_the_run_scripts_queue(tmp_path, monkeypatch):
    """--cluster local hands the commands to scripts/queue.sh: GPU groups as its GPUS, --runs_per_gpu as its
    JOBS_PER_GPU, one queue_add per run (named by the run folder), and reports the runs left unfinished."""
    seen = {}

    class FakeQueue:
        def __init__(self, argv, env, stdout):
            seen.update(script=argv[2], env=env)

        def wait(self):
            return 0

    monkeypatch.setattr(sweep.subprocess, "Popen", FakeQueue)
    runs = sweep.expand(config())
    opts = argparse.Namespace(gpus=[0, 1, 2, 3], gpus_per_run=2, runs_per_gpu=3, log_dir=tmp_path, python="py")
    assert sweep.run_local(runs, opts) == [r.label for r in runs]  # nothing ran: every run is unfinished
    assert (seen["env"]["GPUS"], seen["env"]["JOBS_PER_GPU"]) == ("0,1 2,3", "3")
    lines = seen["script"].splitlines()
    assert lines[0].endswith("scripts/queue.sh") and lines[-1] == "queue_run"
    assert [shlex.split(line)[1] for line in lines[1:-1]] == [r.folder.name for r in runs]
    assert shlex.split(lines[1])[2:] == runs[0].command("py", 2)
