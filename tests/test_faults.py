"""Faults a long run must survive without losing finished work (CLI level, in separate processes).

The faults come at named points of a run (``tests/fault_points.py``: training steps, evaluation batches and the
three phases of every checkpoint write), chosen by label, so a test says exactly where its process dies. The runs
are processes forked from one server that imported torch once (``fault_points.py --serve``); with
``KD_DRILL_FRESH=1`` every run is a fresh interpreter instead.

The fault drill (:func:`test_fault_drill`): a short CRD run (resnet8 student, the shared resnet20 teacher or,
without ``../shared``, a random-init one; 100 images, 3 epochs) killed with SIGKILL ``KD_DRILL_KILLS`` times (20 by
default) in one chain, each kill followed at once by ``--resume auto``. The kill points are drawn with
``random.Random(KD_DRILL_SEED)`` (0) from the labels an uninterrupted run reaches: 30% training steps, 20%
evaluation batches (the teacher's at start-up included), 50% checkpoint writes, plus two fixed ones in the final
epoch (every published file written but not ``latest.pth``; ``latest.pth`` written but not ``summary.json``). Labels
are sorted in run order, so every resumed process reaches its own. After every kill each ``.pth`` left must load and
``latest.pth`` must hold the last finished epoch; the chain must end with the uninterrupted run's weights, bit for
bit, and with every file it leaves.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from shared_paths import DATA, ROOT, teacher

from helper.checkpoint import remove_partial_writes, save_atomic
from helper.folder import lock_folder, release_folder
from helper.options import UsageError, schedule_variants, student_parser, student_run_folder

TEACHER = teacher("resnet20")  # the trained one from ../shared, else a random-init one (any teacher will do)
FAULT_POINTS = Path(__file__).with_name("fault_points.py")
DRILL_KILLS = int(os.environ.get("KD_DRILL_KILLS", "20"))
DRILL_SEED = int(os.environ.get("KD_DRILL_SEED", "0"))

# resnet8 on 500 images (8 steps an epoch), evaluated on 100 test images.
BASE = [
    "--model", "resnet8", "--train_size", "500", "--test_size", "100", "--data_folder", str(DATA),
    "--deterministic", "--save_freq", "100",
]  # fmt: skip

# The drill's run: CRD, 4 steps an epoch, 2 evaluation batches; ckpt_epoch_2 and _3, best and last are written.
EPOCHS = 3
CRD = [
    str(ROOT / "train_student.py"), "--path_t", str(TEACHER), "--distill", "crd", "--model_s", "resnet8",
    "-a", "0", "-b", "0.8", "--nce_k", "64", "--train_size", "100", "--test_size", "100", "--batch_size", "25",
    "--eval_batch_size", "50", "--data_folder", str(DATA), "--deterministic", "--device", "cpu", "--save_freq", "2",
]  # fmt: skip
TIMING = {"epoch_time", "images_per_sec"}  # metrics that differ between identical runs
FAULTS = ("KD_FAULT_TRACE", "KD_FAULT_KILL", "KD_FAULT_TERM", "KD_FAULT_ENOSPC")


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


class Runner:
    """Runs a script under fault_points.py; returns (exit status, output). -9: killed by SIGKILL."""

    def __init__(self) -> None:
        self.fresh = os.environ.get("KD_DRILL_FRESH") == "1"
        self.server = None
        if not self.fresh:
            self.server = subprocess.Popen(
                [sys.executable, str(FAULT_POINTS), "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                text=True, env=child_env(), cwd=ROOT,
            )  # fmt: skip

    def __call__(self, cwd: Path, argv: list[str], **faults: str) -> tuple[int, str]:
        env = {name: faults.get(name[len("KD_FAULT_") :].lower(), "") for name in FAULTS}
        log = cwd / f"run{time.monotonic_ns()}.log"
        if self.fresh:
            with open(log, "w") as out:
                rc = subprocess.run(
                    [sys.executable, str(FAULT_POINTS), *argv], cwd=cwd, env={**child_env(), **env},
                    stdout=out, stderr=subprocess.STDOUT, timeout=900,
                ).returncode  # fmt: skip
        else:
            request = {"argv": argv, "env": env, "cwd": str(cwd), "log": str(log)}
            self.server.stdin.write(json.dumps(request) + "\n")
            self.server.stdin.flush()
            rc = json.loads(self.server.stdout.readline())["rc"]
        return rc, log.read_text()

    def close(self) -> None:
        if self.server is not None:
            self.server.stdin.close()
            self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()


def crd_run(runner: Runner, tmp: Path, *extra: str, epochs: int = EPOCHS, **faults: str) -> tuple[int, str, Path]:
    """The drill's CRD run in ``tmp/save`` (RepDistiller's folder naming); returns status, output, folder."""
    rc, out = runner(tmp, [*CRD, "--epochs", str(epochs), "--save_dir", str(tmp / "save"), *extra], **faults)
    folders = sorted((tmp / "save" / "student_model").iterdir())
    assert len(folders) == 1, folders
    return rc, out, folders[0]


@pytest.fixture(scope="module")
def reference(runner, tmp_path_factory) -> tuple[Path, list[str]]:
    """The uninterrupted run and the labels of the fault points it reached, in order."""
    tmp = tmp_path_factory.mktemp("reference")
    rc, out, folder = crd_run(runner, tmp, trace=str(tmp / "trace.txt"))
    assert rc == 0, out[-3000:]
    return folder, (tmp / "trace.txt").read_text().split()


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def assert_equal_tensors(a, b, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_tensors(x, y, f"{where}[{i}]")


def assert_same_run(folder: Path, ref: Path, resumed_within: int = 0) -> None:
    """Bit-identical final state (student, CRD embeddings and memory, optimizer, RNG) and published files.
    ``resumed_within``: an epoch resumed between steps, whose training means cover the steps after the resume
    only (the checkpoint holds no running means), so they are not compared."""
    got, want = load(folder / "latest.pth"), load(ref / "latest.pth")
    for key in ("model", "distiller", "kd_term", "optimizer", "rng"):
        assert_equal_tensors(got[key], want[key], key)
    assert (got["stage"], got["epoch"], got["step"], got["best"]) == (want["stage"], want["epoch"], 0, want["best"])
    for name in ("resnet8_last.pth", "resnet8_best.pth", f"ckpt_epoch_{EPOCHS}.pth"):
        a, b = load(folder / name), load(ref / name)
        assert a["epoch"] == b["epoch"], name
        assert_equal_tensors(a["model"], b["model"], name)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(line) for line in (ref / "metrics.jsonl").read_text().splitlines()]

    def kept(row: dict) -> dict:
        partial = row["epoch"] == resumed_within
        return {k: v for k, v in row.items() if k not in TIMING and not (partial and k.startswith(("train_", "loss_")))}

    assert [kept(r) for r in rows] == [kept(r) for r in ref_rows]
    summary, ref_summary = (json.loads((f / "summary.json").read_text()) for f in (folder, ref))
    for key in ("test_acc", "best_acc", "best_epoch", "epochs"):
        assert summary[key] == ref_summary[key], key


def epoch_of(label: str) -> int:
    return int(label.split(":")[1]) if label.startswith("main:") else 0


def drill_labels(labels: list[str], kills: int, seed: int) -> list[str]:
    fixed = [f"main:{EPOCHS}:write:resnet8_last.pth:renamed", f"main:{EPOCHS}:write:latest.pth:renamed"][:kills]
    kinds = {kind: [lb for lb in labels if f":{kind}" in lb and lb not in fixed] for kind in ("step", "eval", "write")}
    rest = kills - len(fixed)
    quota = {"step": round(0.3 * rest), "eval": round(0.2 * rest)}
    quota["write"] = rest - quota["step"] - quota["eval"]
    rng = random.Random(seed)
    chosen = fixed + [lb for kind, n in quota.items() for lb in rng.sample(kinds[kind], n)]
    return sorted(chosen, key=labels.index)


# ----------------------------------------------------------------------------------------------------------
# The drill


@pytest.mark.slow
def test_fault_drill(runner, reference, tmp_path):
    ref, labels = reference
    chosen = drill_labels(labels, DRILL_KILLS, DRILL_SEED)
    assert len(set(chosen)) == DRILL_KILLS
    finished, unreadable, partial_writes_seen = 0, [], 0
    for i, label in enumerate(chosen):
        resume = ["--resume", "auto"] if i else []
        rc, out, folder = crd_run(runner, tmp_path, *resume, kill=label)
        assert rc == -signal.SIGKILL, f"kill {i + 1} at {label}: exit {rc}\n{out[-3000:]}"
        for path in folder.glob("*.pth"):
            try:
                load(path)
            except Exception as exc:  # any failure to load is a lost checkpoint
                unreadable.append(f"{path.name} after the kill at {label}: {exc}")
        if label == f"main:{epoch_of(label)}:write:latest.pth:renamed":
            finished = epoch_of(label)
        elif label.startswith("main:"):
            finished = epoch_of(label) - 1  # nothing lost beyond the current epoch
        if finished:
            assert load(folder / "latest.pth")["epoch"] == finished, label
        else:
            assert not (folder / "latest.pth").exists(), label
        if label.endswith((":partial", ":unrenamed")):
            partial_writes_seen += len(list(folder.glob(".*.pth.*.tmp")))
    assert unreadable == []
    rc, out, folder = crd_run(runner, tmp_path, "--resume", "auto")
    assert rc == 0, out[-3000:]
    assert_same_run(folder, ref)
    assert files(folder) == files(ref)  # no lock, no temporary file, nothing missing
    if any(label.endswith((":partial", ":unrenamed")) for label in chosen):
        assert partial_writes_seen > 0  # kills inside writes did leave temporary files, removed since
    print(f"fault drill: {len(chosen)} SIGKILLs survived at {chosen}; 0 unreadable checkpoints")


@pytest.mark.slow
def test_sigterm_saves_at_a_step_boundary_and_resume_completes(runner, reference, tmp_path):
    ref, _ = reference
    rc, out, folder = crd_run(runner, tmp_path, term="main:2:step:2")
    assert rc == 1 and "Traceback" not in out, out[-3000:]
    assert "stopped by SIGTERM at main epoch 2, step" in out
    assert "Resume with the same command plus --resume auto" in out
    state = load(folder / "latest.pth")
    assert (state["stage"], state["epoch"]) == ("main", 1) and state["step"] >= 2
    rc, out, folder = crd_run(runner, tmp_path, "--resume", "auto")
    assert rc == 0, out[-3000:]
    assert_same_run(folder, ref, resumed_within=2)


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["partial", "unrenamed"])
def test_a_full_disk_loses_nothing_written_and_is_one_clear_line(runner, reference, tmp_path, phase):
    ref, _ = reference
    rc, out, folder = crd_run(runner, tmp_path, enospc=f"main:2:write:latest.pth:{phase}")
    errors = [line for line in out.splitlines() if "error:" in line]
    assert rc == 1 and "Traceback" not in out and len(errors) == 1, out[-3000:]
    assert f"no space left to write {folder / 'latest.pth'}; the previous checkpoint is intact" in errors[0]
    assert load(folder / "latest.pth")["epoch"] == 1  # the previous latest.pth
    assert load(folder / "ckpt_epoch_2.pth")["epoch"] == 2  # written before the failed write, kept
    assert [p.name for p in folder.iterdir() if p.name.endswith(".tmp")] == []
    rc, out, folder = crd_run(runner, tmp_path, "--resume", "auto")  # space again: the run completes
    assert rc == 0, out[-3000:]
    assert_same_run(folder, ref)


@pytest.mark.slow
def test_resume_auto_with_a_longer_schedule_extends_the_finished_run(runner, reference, tmp_path):
    ref, _ = reference
    rc, out, short = crd_run(runner, tmp_path, epochs=1)
    assert rc == 0 and short.name.endswith("_ep1_n100_test100"), out[-3000:]
    first = short.name
    for epochs in (2, 3):  # 1 epoch, extended to 2, then to 3
        rc, out, folder = crd_run(runner, tmp_path, "--resume", "auto", epochs=epochs)
        assert rc == 0 and f"extending {short} to --epochs {epochs}: renamed to {folder}" in out, out[-3000:]
        assert folder.name == first.replace("_ep1_", f"_ep{epochs}_") and not short.exists()
        short = folder
    assert folder.name == ref.name
    assert_same_run(folder, ref)  # the same LR at every epoch (decays at 150, 180, 210): bit-identical
    assert files(folder) == files(ref) | {"ckpt_epoch_1.pth"}  # the 1-epoch run's last epoch is kept
    record = json.loads((folder / "args.json").read_text())
    assert record["args"]["epochs"] == 3 and record["extended_from_epochs"] == [1, 2]
    rc, out, _ = crd_run(runner, tmp_path, "--resume", "auto")
    assert rc == 0 and "already finished" in out


# ----------------------------------------------------------------------------------------------------------
# The run folder's lock, partial writes, schedule variants, a full disk in torch.save


def test_the_run_lock_dies_with_its_process(tmp_path):
    code = "import sys, time; from pathlib import Path; from helper.folder import lock_folder; "
    code += "lock_folder(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)"
    child = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=child_env()
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(
            UsageError, match=re.escape(f"run folder {tmp_path} is in use by process {child.pid}; wait")
        ):
            lock_folder(tmp_path)
        os.kill(child.pid, signal.SIGKILL)
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + 60
        while stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if stat.exists():
            os.kill(child.pid, 0)  # the PID still exists (a zombie, not reaped): a PID check would refuse here
        else:  # no /proc: wait for the exit
            child.wait()
        lock_folder(tmp_path)  # accepted at once
        assert (tmp_path / "run.lock").read_text() == str(os.getpid())
        lock_folder(tmp_path)  # this process again: a no-op
        release_folder(tmp_path)
        assert not (tmp_path / "run.lock").exists()
    finally:
        child.kill()
        child.wait()


def test_only_partial_checkpoint_writes_are_removed(tmp_path):
    partial = [".latest.pth.k2x_9q0a.tmp", ".resnet8_best.pth.abcdefgh.tmp"]
    kept = ["latest.pth", ".args.json.tmp", ".latest.pth.tmp", "notes.pth.abcdefgh.tmp", ".x.pth.ABCDEFGH.tmp"]
    for name in partial + kept:
        (tmp_path / name).write_text("")
    (tmp_path / ".d.pth.abcdefgh.tmp").mkdir()
    assert remove_partial_writes(tmp_path) == 2
    assert files(tmp_path) == set(kept) | {".d.pth.abcdefgh.tmp"}


def test_a_full_disk_inside_torch_save_is_reported_as_one(tmp_path, monkeypatch):
    # torch.save turns the OSError of a failed write into a RuntimeError ("unexpected pos"): still a full disk.
    path = tmp_path / "latest.pth"
    save_atomic({"model": {"w": torch.ones(3)}}, path)
    fdopen = os.fdopen

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Full(fdopen(*a, **k)))
    with pytest.raises(OSError, match="no space left to write .*latest.pth; the previous checkpoint is intact"):
        save_atomic({"model": {"w": torch.zeros(100_000)}}, path)
    monkeypatch.undo()
    assert torch.equal(load(path)["model"]["w"], torch.ones(3))
    assert files(tmp_path) == {"latest.pth"}


def test_schedule_variants_are_the_same_run_under_another_epochs(tmp_path):
    def folder(*argv: str) -> tuple:
        args = student_parser().parse_args(["--path_t", "t.pth", "--save_dir", str(tmp_path), *argv])
        return args, student_run_folder(args, "resnet20")

    for argv in (["--epochs", "1"], ["--epochs", "30"], [], ["--epochs", "300"], ["--epochs", "30", "-b", "1"]):
        folder(*argv, "--train_size", "200")[1].mkdir(parents=True)
    folder("--epochs", "30", "--train_size", "300")[1].mkdir()
    folder("--epochs", "30", "--train_size", "200", "--trial", "11")[1].mkdir()
    args, target = folder("--epochs", "50", "--train_size", "200")
    variants = schedule_variants(target, args)
    assert sorted(variants) == [1, 30, 240, 300]
    assert variants[240].name == target.name.replace("_ep50", "") and variants[30].name.endswith("_1_ep30_n200")
    args, named = folder("--epochs", "50", "--run_name", "mine")
    assert schedule_variants(named, args) == {}


# ----------------------------------------------------------------------------------------------------------
# Teacher runs


def teacher(tmp_path: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_teacher.py"), *BASE, "--save_dir", str(tmp_path / "save"), *argv],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.mark.slow
def test_non_finite_loss_stops_naming_method_epoch_and_step(tmp_path):
    # Epoch 1 at lr 0.01, then the "decay" multiplies it by 1e12: the loss diverges in epoch 2.
    blow_up = ["--epochs", "3", "--learning_rate", "0.01", "--lr_decay_epochs", "1", "--lr_decay_rate", "1e12"]
    proc = teacher(tmp_path, *blow_up, "--run_name", "run", check=False)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert "vanilla main: the loss is" in proc.stderr and "at epoch 2, step" in proc.stderr
    state = torch.load(tmp_path / "save" / "models" / "run" / "latest.pth", map_location="cpu", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v.float()).all() for v in state["model"].values())
    # With --skip_nonfinite the run goes on, skipping (and counting) the bad steps.
    teacher(tmp_path, *blow_up, "--run_name", "skip", "--skip_nonfinite")
    summary = json.loads((tmp_path / "save" / "models" / "skip" / "summary.json").read_text())
    assert summary["skipped_steps"] > 0


@pytest.mark.slow
def test_a_run_in_progress_is_not_overwritten(tmp_path):
    folder = tmp_path / "save" / "models" / "run"
    cmd = [sys.executable, str(ROOT / "train_teacher.py"), *BASE, "--save_dir", str(tmp_path / "save")]
    first = subprocess.Popen(
        [*cmd, "--epochs", "50", "--run_name", "run"], cwd=tmp_path, env=child_env(), stderr=subprocess.PIPE
    )
    try:
        deadline = time.time() + 300
        while not (folder / "args.json").exists() and time.time() < deadline:
            time.sleep(0.05)
        second = teacher(tmp_path, "--epochs", "50", "--run_name", "run", "--resume", "auto", check=False)
        assert second.returncode == 2 and f"run folder {folder} is in use by process {first.pid}" in second.stderr
        assert len([line for line in second.stderr.splitlines() if "error:" in line]) == 1
    finally:
        first.kill()
        first.communicate()
