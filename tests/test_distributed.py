"""One run on several processes: two gloo processes on the CPU (torchrun) train like one process with the same
global batch, and rank 0 alone writes the run folder.

The end-to-end tests run ``train_teacher.py`` / ``train_student.py`` under ``torchrun --nproc_per_node 2`` and in
one plain process, with ``--sync_bn`` (BatchNorm over the global batch, so the forward pass is that of one
process). Few steps and small learning rates: training a random network on 100 images amplifies float rounding
by about ten per step (a 1e-8 change of the initial weights moves them by 1e-3 within eight steps), so the
comparison is made before rounding has grown past the tolerance. The injected faults are judged on two NCHW
steps, where rounding stays at its own size: a wrong gradient scale moves the weights by 2.3e-3, 48x the tolerance
there (4.9e-5, from a reorder difference of 4.9e-7).

This file is also the worker: ``python tests/test_distributed.py SPECS.json`` runs the listed commands in
sequence, under torchrun or alone.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from shared_paths import DATA, ROOT  # beside this file, so also found when torchrun runs it as a script
from torch import nn

if str(ROOT) not in sys.path:  # run as a script by torchrun
    sys.path.insert(0, str(ROOT))

from dataset.batch import Batch  # noqa: E402
from helper.distributed import Distributed, PortableSyncBatchNorm, convert_sync_batchnorm  # noqa: E402
from helper.engine import Meter  # noqa: E402
from helper.options import UsageError  # noqa: E402
from models import create_model  # noqa: E402

# Two processes and one differ by float summation order only (BatchNorm statistics, the loss mean and the
# weight-gradient sums are reduced in other orders), which depends on the CPU's kernels. The tolerance is
# measured in each run: one process trained once more with each batch's rows reordered (even rows, then odd:
# the two processes' order) differs from the plain one process by float order alone. The two-process run
# reorders more reductions (all-reduces of gradients and BN moments besides), each a perturbation of the same
# size as the row order's; rounding differences grow alike from there, so their effect on the weights is of the
# same order, but a half batch per process also lets the (channels-last, the default) convolution kernels
# block their sums differently, which a same-size reorder does not show. Measured: max |w| difference, teacher
# run, 1.1e-6 reordered and 1.1e-6 for two processes; kd with channels-last, 3.7e-6 reordered and 3.9e-5 for
# two processes (10.6x). NOISE_FACTOR 100 leaves about 10x room over the largest ratio seen; on the two-step
# fault runs below, every fault still moves the weights 37x (skipped shard) to 900x (doubled shard) beyond it.
NOISE_FACTOR = 100
NOISE_FLOOR = 1e-7  # should a reorder change no bit (an exact reduction), 1e-7 still catches every fault


# ---------------------------------------------------------------------------------------------- the pieces


def batch_of(n: int, k: int = 0) -> Batch:
    g = torch.Generator().manual_seed(n)
    contrast = torch.randint(0, 100, (n, k + 1), generator=g) if k else None
    return Batch(
        torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g), torch.arange(n), contrast
    )


def test_one_process_is_left_as_it_is():
    one, batch = Distributed(), batch_of(25, k=3)
    part, scale = one.shard(batch)
    assert part is batch and scale == 1.0
    x = torch.randn(3)
    assert one.sum(x) is x and one.record() == {} and not one.enabled and one.is_main
    flag = lambda: True  # noqa: E731
    assert one.agreed(flag) is flag and one.wrap("objective", None) == "objective"
    model = create_model("resnet8")
    assert one.batchnorm(model, True, torch.device("cpu")) is model and isinstance(model.bn1, nn.BatchNorm2d)
    meter = Meter(torch.device("cpu"))
    meter.count = 4
    meter.add("loss", torch.tensor(2.5), 4)
    assert meter.averages(one) == meter.averages() == {"loss": 2.5}


def test_shares_are_interleaved_rows_and_weights_give_the_global_mean_gradient():
    """DDP averages the processes' gradients; weighting each process's mean loss by its share (rows x world /
    global rows) makes that average the gradient of the global batch's mean loss, also for 13 + 12 rows."""
    batch = batch_of(25, k=3)
    shares = [Distributed(rank=r, world_size=2).shard(batch) for r in range(2)]
    assert [p.target.shape[0] for p, _ in shares] == [13, 12]
    assert [s for _, s in shares] == [26 / 25, 24 / 25]
    assert torch.equal(shares[1][0].input, batch.input[1::2]) and torch.equal(shares[1][0].index, batch.index[1::2])
    assert torch.equal(shares[0][0].contrast_idx, batch.contrast_idx[0::2])
    assert Distributed(rank=0, world_size=2).shard(batch_of(24))[1] == 1.0  # an even split: exactly 1

    torch.manual_seed(0)
    model = nn.Linear(48, 10)

    def grad(part: Batch, scale: float = 1.0) -> torch.Tensor:
        model.zero_grad()
        (F.cross_entropy(model(part.input.flatten(1)), part.target) * scale).backward()
        return model.weight.grad.clone()

    ddp_average = sum(grad(part, scale) for part, scale in shares) / 2
    torch.testing.assert_close(ddp_average, grad(batch), rtol=1e-6, atol=1e-7)
    unweighted = sum(grad(part) for part, _ in shares) / 2
    assert not torch.allclose(unweighted, grad(batch), rtol=1e-4, atol=1e-6)


def test_every_process_needs_a_row_of_every_batch():
    two = Distributed(rank=0, world_size=2)
    two.check_batches(100, 25, drop_last=False)
    two.check_batches(101, 25, drop_last=True)  # the batch of 1 is dropped
    with pytest.raises(UsageError, match="batch of 1 images, fewer than the 2 processes"):
        two.check_batches(101, 25, drop_last=False)
    with pytest.raises(UsageError, match="--batch_size 1 "):
        two.check_batches(100, 1, drop_last=False)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_sync_batchnorm_keeps_the_state_dict_and_one_process_batchnorm(device):
    torch.manual_seed(0)
    model = create_model("resnet8")
    plain = create_model("resnet8")
    plain.load_state_dict(model.state_dict())
    converted = convert_sync_batchnorm(model, torch.device(device))  # conversion alone needs no GPU
    kind = PortableSyncBatchNorm if device == "cpu" else nn.SyncBatchNorm
    assert isinstance(converted.bn1, kind) and isinstance(converted.layer3[0].downsample[1], kind)
    assert list(converted.state_dict()) == list(plain.state_dict())
    if device == "cpu":  # without a process group it is plain BatchNorm, in training and evaluation
        x = torch.randn(8, 3, 32, 32)
        torch.testing.assert_close(converted(x), plain(x), rtol=0, atol=0)
        for key, value in plain.state_dict().items():
            assert torch.equal(converted.state_dict()[key], value), key
        converted.eval(), plain.eval()
        torch.testing.assert_close(converted(x), plain(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- injected faults


def _reorder(self: Distributed, batch: Batch) -> tuple[Batch, float]:
    """One process, the batch's rows reordered (even, then odd): the same rows, other summation orders."""
    if self.enabled:
        return _SHARD(self, batch)
    n = batch.target.shape[0]
    order = torch.cat([torch.arange(0, n, 2), torch.arange(1, n, 2)])
    return Batch(*(None if t is None else t[order] for t in batch)), 1.0


def _scale(self: Distributed, batch: Batch) -> tuple[Batch, float]:
    part, scale = _SHARD(self, batch)
    return part, scale * self.world_size  # the sum of the processes' gradients, not their mean


def _skip(self: Distributed, batch: Batch) -> tuple[Batch, float]:
    part, scale = _SHARD(self, batch)
    return part, 0.0 if self.rank == 1 else scale  # rank 1's shard contributes nothing


def _double(self: Distributed, batch: Batch) -> tuple[Batch, float]:
    return _SHARD(Distributed(rank=0, world_size=self.world_size), batch)  # both take rank 0's rows


_SHARD = Distributed.shard
# Faults injected into two-process runs: a wrong gradient scale, no gradient all-reduce (each process trains
# on its own rows; rank 0's weights are written), a skipped shard, a shard counted twice.
FAULTS = {
    "scale": ("shard", _scale),
    "no_allreduce": ("wrap", lambda self, objective, optimizer: objective),
    "skip_shard": ("shard", _skip),
    "double_shard": ("shard", _double),
}
PATCHES = {"reorder": ("shard", _reorder), **FAULTS}


def _patch(name: str) -> None:
    """Put back the real methods, then apply the named patch to ``Distributed``."""
    Distributed.shard, Distributed.wrap = _SHARD, _WRAP
    attr, replacement = PATCHES[name]
    setattr(Distributed, attr, replacement)


_WRAP = Distributed.wrap


# ---------------------------------------------------------------------------------------------- end to end

# Batches of 25 split 13 + 12 (the weighting matters); CRD's batches of 45 split 23 + 22, then 5 + 5 (the memory
# gather pads the shorter share). The test set (100 images, one evaluation batch) leaves rank 1 without one.
COMMON = ["--train_size", "100", "--test_size", "100", "--device", "cpu", "--sync_bn", "--print_freq", "1"]
STUDENT = ["--model_s", "resnet8", "--epochs", "1"]
RUNS = {
    "teacher": ("train_teacher.py", ["--model", "resnet8", "--epochs", "1", "--batch_size", "25",
                                     "--learning_rate", "0.01"]),
    "kd": ("train_student.py", [*STUDENT, "--distill", "kd", "--batch_size", "25", "--learning_rate", "0.01"]),
    "crd": ("train_student.py", [*STUDENT, "--distill", "crd", "--nce_k", "50", "--batch_size", "45",
                                 "--learning_rate", "0.002", "--run_name", "crd"]),
}  # fmt: skip
# CRD is then resumed for a second epoch, as if stopped after its first (summary.json removed): every process
# loads the checkpoint (model, memory, optimizer).
RESUME = ["--epochs", "2", "--resume", "auto"]


# The faults are judged on two optimizer steps (the teacher's command, batches of 75 and 25: 38 + 37, then 13 +
# 12 rows) in NCHW: so few steps leave float rounding near its own size, while each fault changes every step's
# gradient by a share of itself. Not over the four channels-last steps above: the CPU's channels-last BatchNorm
# is less exact (its output 1.3e-5 from float64 vs 4.4e-7 in NCHW, measured on 25x16x32x32), and the teacher's
# reordered run then ends 6.7e-5 from the plain one, a tolerance (6.7e-3) the skipped shard (1.1e-2) passed by
# less than 2x.
TWO_STEPS = ["--batch_size", "75", "--no_channels_last"]


def _two_steps(save_dir: Path) -> tuple[str, list[str]]:
    script, argv = RUNS["teacher"]
    return script, [*argv, *COMMON, *TWO_STEPS, "--data_folder", str(DATA), "--save_dir", str(save_dir)]


def _specs(save_dir: Path, teacher: Path) -> list[tuple[str, list[str]]]:
    common = [*COMMON, "--data_folder", str(DATA), "--save_dir", str(save_dir)]
    specs = []
    for script, argv in RUNS.values():
        specs.append((script, [*argv, *common, *(["--path_t", str(teacher)] if script == "train_student.py" else [])]))
    script, argv = specs[-1]
    specs += [("unfinish", [str(save_dir / "student_model" / "crd" / "summary.json")]), (script, [*argv, *RESUME])]
    return specs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same commands in two processes (torchrun, gloo) and in one; returns the two save folders.

    The teacher runs as a plain ``torchrun ... train_teacher.py`` (the command joins the process group from
    torchrun's environment); the students run through this file as the worker, which joins once for all."""
    root = tmp_path_factory.mktemp("distributed")
    teacher = root / "teacher.pth"
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8").state_dict(), "arch": "resnet8"}, teacher)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    one, two = _specs(root / "one", teacher), _specs(root / "two", teacher)
    (root / "one.json").write_text(json.dumps([*one, _two_steps(root / "one_steps")]))
    (root / "two.json").write_text(json.dumps(two[1:]))
    perm = [("patch", ["reorder"]), *_specs(root / "perm", teacher), _two_steps(root / "perm_steps")]
    (root / "perm.json").write_text(json.dumps(perm))
    faults = []
    for fault in FAULTS:  # the teacher's two-step command, two processes, each fault injected in turn
        faults += [("patch", [fault]), _two_steps(root / f"fault_{fault}")]
    (root / "faults.json").write_text(json.dumps(faults))
    commands = {
        "one": [sys.executable, __file__, str(root / "one.json")],
        "two": [*torchrun, __file__, str(root / "two.json")],
        "cli": [*torchrun, str(ROOT / two[0][0]), *two[0][1]],
        "perm": [sys.executable, __file__, str(root / "perm.json")],
        "faults": [*torchrun, __file__, str(root / "faults.json")],
    }
    procs = {}
    for name, command in commands.items():
        log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed below)
        procs[name] = (subprocess.Popen(command, env=env, cwd=root, stdout=log, stderr=log), log)
    for name, (proc, log) in procs.items():
        code = proc.wait(timeout=600)
        log.close()
        assert code == 0, f"{name} process(es) failed:\n{(root / f'{name}.log').read_text()[-4000:]}"
    return {"one": root / "one", "two": root / "two", "perm": root / "perm", "logs": root}


def run_folder(save_dir: Path, name: str) -> Path:
    parent = save_dir / ("models" if name == "teacher" else "student_model")
    if name.startswith("crd"):
        return parent / "crd"
    (folder,) = [p for p in parent.iterdir() if f"_{name}_" in p.name or name == "teacher"]
    return folder


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def max_difference(one: dict, two: dict) -> float:
    """The largest absolute difference of the float tensors of the model (and the distiller's state)."""
    worst = 0.0
    for part in ("model", "distiller"):
        if part not in one:
            continue
        assert one[part].keys() == two[part].keys()
        for key, value in one[part].items():
            if torch.is_tensor(value) and value.is_floating_point():
                worst = max(worst, float((two[part][key].double() - value.double()).abs().max()))
    return worst


def tolerance(one: dict, reordered: dict) -> float:
    return max(NOISE_FACTOR * max_difference(one, reordered), NOISE_FLOOR)


def assert_same_state(one: dict, two: dict, tol: float) -> None:
    assert max_difference(one, two) <= tol, f"max |two - one| {max_difference(one, two):.3g} > tolerance {tol:.3g}"
    for part in ("model", "distiller"):  # integer state (step counters, BN batch counts) is exact
        for key, value in one.get(part, {}).items():
            if torch.is_tensor(value) and not value.is_floating_point():
                assert torch.equal(two[part][key], value), f"{part}.{key}"
    assert one["epoch"] == two["epoch"] and one["step"] == two["step"]


@pytest.mark.parametrize("name", ["teacher", "kd", "crd"])
@pytest.mark.slow
def test_two_processes_train_like_one(runs, name):
    one, two = run_folder(runs["one"], name), run_folder(runs["two"], name)
    perm = run_folder(runs["perm"], name)
    checkpoints = ["ckpt_epoch_1.pth", "latest.pth"] if name == "crd" else ["latest.pth"]  # crd: then resumed
    for file in checkpoints:
        tol = tolerance(load(one / file), load(perm / file))
        logging.getLogger(__name__).info("%s %s: float-order tolerance %.3g", name, file, tol)
        assert_same_state(load(one / file), load(two / file), tol)
    if name == "crd":  # the memory moved, and equally: the gathered global batch updated every process's copy
        state = load(two / "latest.pth")["distiller"]
        assert state["crd.contrast.z_s"] > 0
    rows_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_two) == len(rows_one) == (2 if name == "crd" else 1)
    for a, b in zip(rows_one, rows_two):  # meters: sums over both processes' rows
        for key in ("train_loss", "train_acc", "test_acc", "test_acc_top5", "test_loss", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), key
        assert {k for k in a if k.startswith("loss_")} == {k for k in b if k.startswith("loss_")}


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_each_ddp_fault_fails_the_comparison(runs, fault):
    """The teacher's two-process run with a fault injected (see FAULTS) is refused by the same comparison,
    with a margin: the tolerance is far above float-order noise yet far below what a fault does."""
    root = runs["logs"]
    one = load(run_folder(root / "one_steps", "teacher") / "latest.pth")
    tol = tolerance(one, load(run_folder(root / "perm_steps", "teacher") / "latest.pth"))
    faulty = load(run_folder(root / f"fault_{fault}", "teacher") / "latest.pth")
    assert one["epoch"] == faulty["epoch"] == 1
    with pytest.raises(AssertionError, match="max .two - one"):
        assert_same_state(one, faulty, tol)
    logging.getLogger(__name__).info("%s: %.3g, tolerance %.3g", fault, max_difference(one, faulty), tol)
    assert max_difference(one, faulty) > 10 * tol


@pytest.mark.slow
def test_rank_zero_alone_writes_the_run_folder(runs):
    for name in ("teacher", "kd", "crd"):
        one, two = run_folder(runs["one"], name), run_folder(runs["two"], name)
        assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())
        assert not (two / "run.lock").exists() and not list(two.glob(".write_test*"))
        assert len(list((two / "tb").iterdir())) == len(list((one / "tb").iterdir()))  # one events file per command
        log = (two / "run.log").read_text()
        assert log.count("run folder:") == (2 if name == "crd" else 1)  # rank 0's lines only
        args = json.loads((two / "args.json").read_text())
        assert args["world_size"] == 2 and args["backend"] == "gloo" and args["args"]["batch_size"] in (25, 45)
        summary = json.loads((two / "summary.json").read_text())
        assert summary["world_size"] == 2 and "world_size" not in json.loads((one / "summary.json").read_text())
        assert summary["test_acc"] == pytest.approx(json.loads((one / "summary.json").read_text())["test_acc"])
    for log in ("cli.log", "two.log"):
        assert "process group: 2 processes (gloo)" in (runs["logs"] / log).read_text()


# ---------------------------------------------------------------------------------------------- the worker


def _run_specs(path: str) -> None:
    """Run each (script, argv) of the JSON file in this process, in order (under torchrun: in every rank)."""
    import torch.distributed as tdist

    import train_student
    import train_teacher

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if several:  # one process group for all the commands (the commands join it rather than start their own)
        tdist.init_process_group("gloo")
    for script, argv in json.loads(Path(path).read_text()):
        if script == "patch":
            _patch(argv[0])
            continue
        if script == "unfinish":  # rank 0 removes the summary, as if the run had stopped after its checkpoint
            if not several or tdist.get_rank() == 0:
                Path(argv[0]).unlink()
            if several:
                tdist.barrier()
            continue
        entry = train_teacher.main if script == "train_teacher.py" else train_student.main
        assert entry(argv) == 0
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)  # each run's run.log holds that run's lines only
            handler.close()
    if several:
        tdist.destroy_process_group()


if __name__ == "__main__":
    _run_specs(sys.argv[1])
