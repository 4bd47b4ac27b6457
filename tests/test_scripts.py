"""The reproduction scripts: dry runs print RepDistiller's commands, the job queue runs and reports them, and
the teacher fetcher fails clearly offline and lays files out in RepDistiller's teacher layout (no training)."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
from shared_paths import REAL_TEACHERS

from distiller_zoo import PairError, get_method
from distiller_zoo.base import default_args
from helper import published
from helper.checkpoint import load_teacher
from models import create_model, feature_shapes

ROOT = Path(__file__).resolve().parents[1]
SHARED_TEACHERS = REAL_TEACHERS
OFFLINE = "http://127.0.0.1:9/unreachable"  # the discard port: connection refused at once

spec = importlib.util.spec_from_file_location("fetch_teachers", ROOT / "scripts" / "fetch_teachers.py")
fetch_teachers = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = fetch_teachers  # dataclasses look their module up here
spec.loader.exec_module(fetch_teachers)

# RepDistiller's scripts/run_cifar_distill.sh, plus CRD+KD.
PUBLISHED_FLAGS = {
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


def run_script(name: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("TRIALS", "GPUS", "EPOCHS", "EXTRA", "DRY_RUN")}
    environ.update(env)
    return subprocess.run(
        ["bash", str(ROOT / "scripts" / name), *args], capture_output=True, text=True, env=environ, timeout=60
    )


def commands(result: subprocess.CompletedProcess) -> list[list[str]]:
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines()]


def flag(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# ---------------------------------------------------------------------------------------------- run scripts


def test_vanilla_dry_run_trains_every_published_model():
    cmds = commands(run_script("run_cifar_vanilla.sh", "--dry-run"))
    assert len(cmds) == 15
    models = [flag(c, "--model") for c in cmds]
    students = {s for _, s in published.PAIRS}
    assert set(models) == set(published.TEACHERS) | students and len(students) == 9
    for cmd in cmds:
        assert cmd[1] == "train_teacher.py" and cmd[-2:] == ["--resume", "auto"] and flag(cmd, "--trial") == "0"


def test_vanilla_trials_gpus_epochs_and_extra_flags():
    result = run_script("run_cifar_vanilla.sh", "--models", "resnet20 ResNet50", TRIALS="0 1 2", GPUS="0 1",
                        EPOCHS="5", EXTRA="--amp bf16", DRY_RUN="1")  # fmt: skip
    cmds = commands(result)
    assert len(cmds) == 6
    assert [c[0] for c in cmds] == [f"CUDA_VISIBLE_DEVICES={i % 2}" for i in range(6)]
    assert sorted((flag(c, "--model"), flag(c, "--trial")) for c in cmds) == sorted(
        (m, t) for m in ("resnet20", "ResNet50") for t in "012"
    )
    assert all(flag(c, "--epochs") == "5" and flag(c, "--amp") == "bf16" for c in cmds)
    assert "# 6 runs (dry run" in result.stderr


def test_distill_dry_run_covers_every_method_on_the_13_pairs():
    result = run_script("run_cifar_distill.sh", "--dry-run")
    cmds = commands(result)
    # 13 pairs x 13 settings, plus FSP on the 6 pairs whose channel counts match.
    assert len(cmds) == 13 * 13 + 6
    pairs = {(Path(flag(c, "--path_t")).parent.name.removesuffix("_vanilla"), flag(c, "--model_s")) for c in cmds}
    assert pairs == set(published.PAIRS)
    for cmd in cmds:
        assert cmd[1] == "train_student.py" and flag(cmd, "--trial") == "1" and "--resume" in cmd
        assert flag(cmd, "--path_t").endswith("_vanilla/ckpt_epoch_240.pth")
    text = [" ".join(c) for c in cmds]
    for method, flags in PUBLISHED_FLAGS.items():
        expected = 6 if method == "fsp" else 13
        assert sum(flags + " --trial" in t.replace(f" --model_s {_model_s(t)}", "") for t in text) == expected, method
    assert "fsp skipped on 7 pair(s)" in result.stderr


def _model_s(text: str) -> str:
    return re.search(r"--model_s (\S+)", text).group(1)


def test_fsp_runs_exactly_on_the_pairs_whose_channels_match(one_thread: None):
    cmds = commands(run_script("run_cifar_distill.sh", "--dry-run", "--methods", "fsp"))
    fsp_pairs = {(Path(flag(c, "--path_t")).parent.name.removesuffix("_vanilla"), flag(c, "--model_s")) for c in cmds}
    method, args = get_method("fsp"), default_args()
    shapes = {}
    for teacher, student in published.PAIRS:
        for arch in (teacher, student):
            if arch not in shapes:
                shapes[arch] = feature_shapes(create_model(arch))
        if (teacher, student) in fsp_pairs:
            method.check_pair(shapes[student], shapes[teacher], args)
        else:
            with pytest.raises(PairError):
                method.check_pair(shapes[student], shapes[teacher], args)
    assert len(fsp_pairs) == 6


def test_distill_filters_teacher_template_and_unknown_method(tmp_path: Path):
    template = "runs/{arch}_cifar100_lr_0.05_decay_0.0005_trial_0/ckpt_epoch_240.pth"
    result = run_script("run_cifar_distill.sh", "--dry-run", "--methods", "kd crd+kd", "--pairs",
                        "resnet32x4:resnet8x4", "--epochs", "3", "--", "--amp", "bf16",
                        TEACHER_TEMPLATE=template, TRIALS="1 2")  # fmt: skip
    cmds = commands(result)
    assert len(cmds) == 4
    assert {flag(c, "--path_t") for c in cmds} == {template.format(arch="resnet32x4")}
    assert all(flag(c, "--epochs") == "3" and c[-2:] == ["--amp", "bf16"] for c in cmds)
    bad = run_script("run_cifar_distill.sh", "--dry-run", "--methods", "kd nope")
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr


def test_distill_refuses_to_start_without_teachers(tmp_path: Path):
    result = run_script("run_cifar_distill.sh", "--methods", "kd", TEACHER_DIR=str(tmp_path))
    assert result.returncode == 1
    assert "missing teacher checkpoint" in result.stderr and "fetch_pretrained_teachers.sh" in result.stderr
    assert str(tmp_path / "resnet56_vanilla" / "ckpt_epoch_240.pth") in result.stderr


def test_queue_runs_every_command_and_reports_failures(tmp_path: Path):
    # A stand-in interpreter: records its arguments and GPU, fails for resnet110.
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\necho "$CUDA_VISIBLE_DEVICES $*" >> "$RECORD"\n[[ "$*" != *resnet110* ]]\n')
    fake.chmod(0o755)
    record = tmp_path / "record.txt"
    result = run_script("run_cifar_vanilla.sh", "--models", "resnet20 resnet110 resnet56 vgg8", "--gpus", "3 4",
                        PYTHON=str(fake), RECORD=str(record), LOG_DIR=str(tmp_path / "logs"))  # fmt: skip
    assert result.returncode == 1
    assert "3 of 4 runs finished" in result.stdout
    assert "resnet110_trial_0 (exit 1)" in result.stderr
    lines = sorted(record.read_text().splitlines())
    assert len(lines) == 4 and {line.split()[0] for line in lines} == {"3", "4"}
    assert all("--resume auto" in line for line in lines)
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        f"{m}_trial_0.log" for m in sorted(["resnet20", "resnet110", "resnet56", "vgg8"])
    ]


# ---------------------------------------------------------------------------------------------- teachers


def test_fetch_offline_fails_with_one_clear_message(tmp_path: Path):
    env = {**os.environ, "KD_MDISTILLER_URL": OFFLINE, "KD_SHAPE2PROG_URL": OFFLINE, "KD_CHENYAOFO_URL": OFFLINE}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fetch_teachers.py"), "--save_dir", str(tmp_path), "--timeout", "5"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1
    assert "could not get 6 teacher(s) from any source" in errors[0] and "--from" in errors[0]
    assert not list(tmp_path.rglob("*.pth")) and not list(tmp_path.rglob("*.tar"))  # nothing half-written


def test_shell_wrapper_passes_arguments(tmp_path: Path):
    result = run_script(
        "fetch_pretrained_teachers.sh", "--models", "resnet20", "--save_dir", str(tmp_path), "--timeout", "5",
        KD_CHENYAOFO_URL=OFFLINE,
    )  # fmt: skip
    assert result.returncode == 1 and "could not get 1 teacher(s)" in result.stderr


def _teacher_file(path: Path, arch: str) -> dict:
    torch.manual_seed(0)
    state = create_model(arch).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "accuracy": 50.0}, path)
    return state


def test_fetch_from_the_mdistiller_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # mdistiller's layout: cifar_teachers/<arch>_vanilla/ckpt_epoch_240.pth, served here from a file:// URL.
    src = tmp_path / "src"
    state = _teacher_file(src / "cifar_teachers" / "resnet56_vanilla" / "ckpt_epoch_240.pth", "resnet56")
    archive = tmp_path / "cifar_teachers.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src / "cifar_teachers", arcname="cifar_teachers")
    monkeypatch.setenv("KD_MDISTILLER_URL", archive.as_uri())
    save = tmp_path / "save"
    assert fetch_teachers.main(["--models", "resnet56", "--save_dir", str(save), "--no_eval"]) == 0
    dest = save / "models" / "resnet56_vanilla" / "ckpt_epoch_240.pth"
    model, arch, ckpt = load_teacher(str(dest), None, num_classes=100)
    assert arch == "resnet56" and ckpt["accuracy"] == 50.0
    assert torch.equal(model.state_dict()["fc.weight"], state["fc.weight"])
    # The same archive given with --from (no network at all).
    other = tmp_path / "other"
    assert fetch_teachers.main(["--from", str(archive), "--save_dir", str(other), "--no_eval"]) == 0
    assert (other / "models" / "resnet56_vanilla" / "ckpt_epoch_240.pth").read_bytes() == dest.read_bytes()


def test_chenyaofo_state_dict_is_wrapped_and_loads_strictly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    raw = tmp_path / "cifar100_resnet20.pt"
    torch.save(create_model("resnet20").state_dict(), raw)  # a bare state_dict, as that project releases
    dest = tmp_path / "resnet20_vanilla" / "ckpt_epoch_240.pth"
    fetch_teachers.wrap_state_dict(raw, dest, "resnet20", 68.83, "https://example/x.pt")
    _, arch, ckpt = load_teacher(str(dest), None, num_classes=100)
    assert (arch, ckpt["accuracy"]) == ("resnet20", 68.83)
    # A download whose hash does not match the name is refused.
    release = tmp_path / "release"
    release.mkdir()
    (release / "cifar100_resnet20-23dac2f1.pt").write_bytes(raw.read_bytes())
    monkeypatch.setenv("KD_CHENYAOFO_URL", release.as_uri())
    fetcher = fetch_teachers.Fetcher(tmp_path / "models", timeout=5)
    with pytest.raises(fetch_teachers.FetchError, match="SHA-256 does not start with 23dac2f1"):
        fetcher.fetch("resnet20")
    assert not (tmp_path / "models" / "resnet20_vanilla").exists()


def test_reference_accuracies():
    assert fetch_teachers.reference_accuracy("resnet56", "mdistiller", None)[0] == 72.34  # RepDistiller README
    assert fetch_teachers.reference_accuracy("resnet56", "chenyaofo", None)[0] == 72.63  # chenyaofo README
    assert fetch_teachers.reference_accuracy("resnet20", "from x", 1.0)[0] == 68.83
    assert fetch_teachers.reference_accuracy("resnet8", "from x", 12.5) == (12.5, "recorded in the checkpoint")


def test_from_shared_teachers_lays_out_the_files(tmp_path: Path):
    archs = ("resnet20", "resnet32", "resnet44", "resnet56")
    source = SHARED_TEACHERS  # the trained teachers where ../shared has them, else four random-init ones
    if not all((source / f"{arch}_vanilla" / "ckpt_epoch_240.pth").is_file() for arch in archs):
        source = tmp_path / "teachers"
        for i, arch in enumerate(archs):
            (source / f"{arch}_vanilla").mkdir(parents=True)
            state = {"model": create_model(arch).state_dict(), "accuracy": 60.0 + i}
            torch.save(state, source / f"{arch}_vanilla" / "ckpt_epoch_240.pth")
    save_dir = tmp_path / "save"
    assert fetch_teachers.main(["--from", str(source), "--save_dir", str(save_dir), "--no_eval"]) == 0
    for arch in archs:
        dest = save_dir / "models" / f"{arch}_vanilla" / "ckpt_epoch_240.pth"
        assert dest.is_symlink() and dest.resolve() == (source / f"{arch}_vanilla" / "ckpt_epoch_240.pth").resolve()
    src = torch.load(source / "resnet56_vanilla" / "ckpt_epoch_240.pth", map_location="cpu", weights_only=True)
    _, arch, ckpt = load_teacher(str(save_dir / "models" / "resnet56_vanilla" / "ckpt_epoch_240.pth"), None, 100)
    assert arch == "resnet56" and ckpt["accuracy"] == src["accuracy"]
    if source == SHARED_TEACHERS:
        assert ckpt["accuracy"] == pytest.approx(72.61)  # the shared resnet56 (../shared/teachers/README.md)


def _newer(*methods: str, **env: str) -> dict[tuple[str, str], list[str]]:
    """DRY_RUN of run_cifar_newer.sh: (teacher, student) -> command, for one method."""
    cmds = commands(run_script("run_cifar_newer.sh", *methods, DRY_RUN="1", **env))
    out = {}
    for c in cmds:
        pair = (Path(flag(c, "--path_t")).parent.name.removesuffix("_vanilla"), flag(c, "--model_s"))
        assert pair not in out
        out[pair] = c
    assert set(out) == set(published.PAIRS)
    return out


def test_newer_wttm_uses_the_papers_per_pair_values():
    cmds = _newer("wttm")
    expected = {("resnet56", "resnet20"): ("0.3", "1.5"), ("resnet32x4", "resnet8x4"): ("0.1", "3"),
                ("resnet32x4", "ShuffleV2"): ("0.4", "16"), ("vgg13", "vgg8"): ("0.1", "2.25")}  # fmt: skip
    for pair, (power, beta) in expected.items():
        assert (flag(cmds[pair], "--ttm_l"), flag(cmds[pair], "-b")) == (power, beta), pair
    assert all(flag(c, "-r") == "1" and flag(c, "-a") == "0" for c in cmds.values())


def test_newer_mlkd_runs_its_own_protocol_and_the_standard_one():
    two = _newer("mlkd")
    for pair, cmd in two.items():
        assert "--two_views" in cmd and flag(cmd, "-r") == "0.1" and flag(cmd, "-b") == "0.9", pair
    # MLKD configs/cifar100/ours/*.yaml at 5ee473f (960 epochs and lr 0.01 since 77b91ec; 240 epochs since 5ee473f).
    schedule = {("resnet32x4", "ShuffleV1"): ("960", "0.01"), ("vgg13", "MobileNetV2"): ("480", "0.01"),
                ("wrn_40_2", "ShuffleV1"): ("480", "0.01"), ("resnet56", "resnet20"): (None, "0.025")}  # fmt: skip
    for pair, expected in schedule.items():
        cmd = two[pair]
        assert (flag(cmd, "--epochs") if "--epochs" in cmd else None, flag(cmd, "--learning_rate")) == expected, pair
    one = _newer("mlkd-std")
    assert all("--two_views" not in c and flag(c, "-r") == "0.2" and "--epochs" not in c for c in one.values())
    short = _newer("mlkd", EPOCHS="24")
    assert flag(short[("resnet32x4", "ShuffleV2")], "--epochs") == "96"
    assert flag(short[("resnet56", "resnet20")], "--epochs") == "24"
    assert flag(short[("resnet32x4", "ShuffleV2")], "--lr_decay_epochs") == "15,18,21"


def test_newer_uses_the_shared_queue_options():
    result = run_script("run_cifar_newer.sh", "--methods", "dkd simkd", "--pairs", "resnet56:resnet20 vgg13:vgg8",
                        GPUS="0 1", TRIALS="1 2", EXTRA="--amp bf16", DRY_RUN="1")  # fmt: skip
    cmds = commands(result)
    assert len(cmds) == 2 * 2 * 2 and "# 8 runs (dry run" in result.stderr
    assert [c[0] for c in cmds] == [f"CUDA_VISIBLE_DEVICES={i % 2}" for i in range(8)]
    assert all(flag(c, "--amp") == "bf16" and c.count("--resume") == 1 for c in cmds)
    dkd = [c for c in cmds if flag(c, "--distill") == "dkd" and flag(c, "--model_s") == "resnet20"]
    assert sorted(flag(c, "--trial") for c in dkd) == ["1", "2"] and all(flag(c, "--dkd_beta") == "2" for c in dkd)
    bad = run_script("run_cifar_newer.sh", "--dry-run", "nope")
    assert bad.returncode == 2 and "unknown method 'nope'" in bad.stderr
    one = commands(run_script("run_cifar_newer.sh", "dkd", "--pairs", "resnet56:resnet20", EPOCHS="1", DRY_RUN="1"))
    assert flag(one[0], "--epochs") == "1" and flag(one[0], "--lr_decay_epochs") == "1,1,1"  # positive, as required
