"""scripts/demo.py: its verdict (hand-computed), its runs, its resume; and the two flags it relies on."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from shared_paths import DATA, ROOT

from helper import recipes
from models import create_model

spec = importlib.util.spec_from_file_location("demo", ROOT / "scripts" / "demo.py")
demo = importlib.util.module_from_spec(spec)
sys.modules["demo"] = demo  # dataclasses look their module up by name
spec.loader.exec_module(demo)


# ----------------------------------------------------------------------------------------------------------
# The verdict, against hand computations


def test_mean_and_sample_std():
    assert demo.mean_std([10.0, 12.0]) == pytest.approx((11.0, math.sqrt(2)))  # ((10-11)^2 + (12-11)^2) / 1
    assert demo.mean_std([1.0, 2.0, 6.0]) == pytest.approx((3.0, math.sqrt(7)))  # (4 + 1 + 9) / 2 = 7
    assert demo.mean_std([5.0]) == (5.0, 0.0)


def test_a_method_wins_with_a_gap_of_1_5_points_above_the_spread():
    vanilla, kd = demo.verdicts({"vanilla": [10.0, 12.0], "kd": [14.0, 15.0]})
    assert (vanilla.mean, vanilla.gap, vanilla.wins) == (11.0, None, None)
    # kd: mean 14.5, std sqrt(0.5); gap 3.5; spread sqrt(2 + 0.5) = 1.581.
    assert kd.mean == 14.5 and kd.std == pytest.approx(math.sqrt(0.5))
    assert kd.gap == pytest.approx(3.5) and kd.spread == pytest.approx(math.sqrt(2.5))
    assert kd.wins is True


def test_a_gap_inside_the_spread_does_not_win():
    # vanilla 12 ± sqrt(8), crd 14 ± sqrt(2): gap 2 >= 1.5 but spread sqrt(10) = 3.16 > 2.
    (_, crd) = demo.verdicts({"vanilla": [10.0, 14.0], "crd": [13.0, 15.0]})
    assert crd.gap == pytest.approx(2.0) and crd.spread == pytest.approx(math.sqrt(10)) and crd.wins is False
    lines = demo.verdict_lines(demo.verdicts({"vanilla": [10.0, 14.0], "crd": [13.0, 15.0]}))
    assert "gap >= 1.5 yes, gap > spread NO -> does NOT beat vanilla" in lines[1]
    assert lines[-2] == "  Verdict: no method beat the student trained alone; crd did not."
    assert lines[-1].startswith("  Each method at this and other scales") and "README.md" in lines[-1]


def test_a_gap_below_1_5_points_does_not_win_however_tight_the_seeds():
    # vanilla 10.1 ± 0.141, dkd 11.2 ± 0.141: spread 0.2 < gap 1.1 < 1.5.
    results = demo.verdicts({"vanilla": [10.0, 10.2], "kd": [14.0, 14.2], "dkd": [11.1, 11.3]})
    kd, dkd = results[1:]
    assert dkd.gap == pytest.approx(1.1) and dkd.spread == pytest.approx(0.2) and dkd.wins is False
    assert kd.gap == pytest.approx(4.0) and kd.wins is True
    lines = demo.verdict_lines(results)
    assert lines[0] == "  vanilla   10.10 ± 0.14  (seeds: 10.00, 10.20)"
    assert lines[1].endswith("gap +4.00, spread 0.20: gap >= 1.5 yes, gap > spread yes -> beats vanilla")
    assert "gap +1.10, spread 0.20: gap >= 1.5 NO, gap > spread yes -> does NOT beat vanilla" in lines[2]
    assert lines[-2] == "  Verdict: kd beats the student trained alone; dkd did not."
    won = demo.verdict_lines(demo.verdicts({"vanilla": [10.0, 10.2], "kd": [14.0, 14.2]}))
    assert won[-1] == "  Verdict: kd beats the student trained alone."  # no pointer when every method wins


# ----------------------------------------------------------------------------------------------------------
# The runs


def args_for(tmp_path: Path, *extra: str):
    return demo.parse_args(["--out", str(tmp_path / "out"), "--epochs", "6", "--train_size", "5000", *extra])


def test_runs_every_method_and_seed_once_and_evaluates_the_teacher_once(tmp_path: Path):
    jobs = demo.build_jobs(args_for(tmp_path), Path("/t/ckpt.pth"), py="python")
    assert [j.label for j in jobs] == [
        "kd s0",
        "kd s1",
        "dkd s0",
        "dkd s1",
        "crd s0",
        "crd s1",
        "vanilla s0",
        "vanilla s1",
    ]
    assert len({j.folder for j in jobs}) == 8
    assert [("--no_teacher_eval" in j.cmd) for j in jobs[:6]] == [False] + [True] * 5
    for job in jobs:
        flags = dict(zip(job.cmd, job.cmd[1:]))
        assert flags["--epochs"] == "6" and flags["--eval_freq"] == "6" and flags["--lr_decay_epochs"] == "4,5"
        assert flags["--seed"] == flags["--trial"] == str(job.seed) and flags["--resume"] == "auto"
        assert flags["--run_name"] == job.folder.name
    dkd = dict(zip(jobs[2].cmd, jobs[2].cmd[1:]))
    assert dkd["--dkd_warmup"] == "0.5"  # mdistiller's 20 of 240 epochs, scaled to 6
    assert "--nce_k" not in jobs[4].cmd  # RepDistiller's 16384, drawn with replacement from 4,950 per class


def test_method_flags_are_the_tables_recipes():
    """The demo runs each method's recipe on resnet56 -> resnet20 from helper/published/recipes.csv; only the
    warm-up (scaled) is the demo's."""
    pair = demo.RECIPE_PAIR
    for method in ("kd", "hint", "attention", "similarity", "pkt"):
        assert demo.method_flags(method, 6) == recipes.flags(method, *pair)
    for method in ("crd", "crd+kd"):  # RepDistiller's 16384 negatives, whatever the subset
        flags = recipes.flags(method, *pair)
        assert demo.method_flags(method, 6) == flags and "--nce_k" not in flags
    dkd = demo.method_flags("dkd", 240)
    assert dkd == [*recipes.flags("dkd", *pair), "--dkd_warmup", "20"] and "--dkd_beta" in dkd  # mdistiller's 2
    assert demo.method_flags("rld", 12)[-2:] == ["--rld_warmup", "1"]  # RLD's 20 of 240
    mlkd = demo.method_flags("mlkd", 6)
    assert "--epochs" not in mlkd and "--two_views" in mlkd  # the demo's schedule, the recipe's protocol


def test_unknown_method_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        args_for(tmp_path, "--methods", "kd nope")
    assert "no recipe nope on resnet56:resnet20" in capsys.readouterr().err


def test_decay_points_scale_repdistillers():
    assert [demo.decay_epochs(e) for e in (240, 8, 6, 3, 1)] == ["150,180,210", "5,6,7", "4,5", "2", "1"]


def fake(job, marker: Path, code: int = 0) -> None:
    """Replace a run by a cheap process that records that it ran."""
    job.cmd = [
        sys.executable,
        "-c",
        f"open({str(marker)!r}, 'a').write({job.label!r} + '\\n'); raise SystemExit({code})",
    ]


def test_a_rerun_keeps_the_finished_runs_and_runs_the_others(tmp_path: Path, capsys):
    args = args_for(tmp_path, "--methods", "kd")
    jobs = demo.build_jobs(args, Path("/t/ckpt.pth"))
    done, partial = jobs[0], jobs[1]  # kd s0 finished; kd s1 stopped after 3 of 6 epochs
    for job, epochs in ((done, 6), (partial, 3)):
        job.folder.mkdir(parents=True)
        (job.folder / "summary.json").write_text(json.dumps({"epochs": epochs, "test_acc": 20.0}))
    marker = tmp_path / "ran.txt"
    for job in jobs:
        fake(job, marker)
    demo.run_jobs(jobs, 6, 2, dict(os.environ), tmp_path / "logs")
    assert sorted(marker.read_text().split("\n")[:-1]) == ["kd s1", "vanilla s0", "vanilla s1"]
    assert done.kept and not partial.kept
    assert "(finished by an earlier demo: kept)" in capsys.readouterr().out
    assert demo.accuracies(jobs, 6) == {"kd": [20.0]}  # the unfinished run's summary is not counted


def test_a_failed_run_stops_the_demo_with_its_log(tmp_path: Path):
    jobs = demo.build_jobs(args_for(tmp_path, "--methods", "kd"), Path("/t/ckpt.pth"))
    for job in jobs:
        fake(job, tmp_path / "ran.txt", code=3 if job.label == "kd s0" else 0)
    with pytest.raises(SystemExit, match="kd s0 failed with exit status 3"):
        demo.run_jobs(jobs[:1], 6, 1, dict(os.environ), tmp_path / "logs")


def test_bad_demo_flags_are_refused_in_one_line(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        demo.parse_args(["--seeds", "0"])
    assert "need at least 2 seeds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo.parse_args(["--train_size", "250"])  # not class-balanced: train_student.py would refuse it later
    assert "multiple of the 100 classes" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# --eval_freq and --no_teacher_eval, on a tiny real run


def test_eval_freq_and_no_teacher_eval(tmp_path: Path):
    teacher = tmp_path / "t.pth"
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8").state_dict()}, teacher)
    cmd = [
        sys.executable, str(ROOT / "train_student.py"), "--path_t", str(teacher), "--model_t", "resnet8",
        "--model_s", "resnet8", "--epochs", "3", "--eval_freq", "2", "--no_teacher_eval", "--train_size", "100",
        "--test_size", "100",
        "--data_folder", str(DATA), "--save_dir", str(tmp_path), "--run_name", "r",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    folder = tmp_path / "student_model" / "r"
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "test_acc" in r] == [2, 3]  # every 2nd epoch and the last
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["teacher_acc"] is None and summary["test_acc"] == rows[-1]["test_acc"]
    assert "test evaluation skipped" in proc.stderr
