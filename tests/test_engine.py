"""The engine's parts: flags and derived values, LR schedule, the loop, evaluation, checkpoints."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from dataset.batch import Batch
from distiller_zoo import DistillKL, method_names
from helper import checkpoint as ckpt_io
from helper.engine import (
    ClassifierObjective,
    DistillObjective,
    NonFiniteLoss,
    Precision,
    StepControl,
    evaluate,
    topk_correct,
    train_one_epoch,
)
from helper.optim import lr_schedule
from helper.options import (
    UsageError,
    effective_lr,
    loss_weights,
    lr_decay_epochs,
    student_parser,
    student_run_folder,
    teacher_parser,
    teacher_run_folder,
    validate_student_args,
    validate_teacher_args,
)
from models import create_model

CPU = torch.device("cpu")
FP32 = Precision("none", "cpu")


def student_args(*argv: str):
    return student_parser().parse_args(["--path_t", "x.pth", *argv])


# ---------------------------------------------------------------------------------------------- flags


def test_repdistiller_defaults():
    args = student_parser().parse_args([])
    assert (args.batch_size, args.epochs, args.lr_decay_epochs, args.weight_decay) == (64, 240, "150,180,210", 5e-4)
    assert (args.kd_T, args.nce_k, args.nce_t, args.nce_m, args.feat_dim) == (4, 16384, 0.07, 0.5, 128)
    assert (args.mode, args.hint_layer, args.init_epochs, args.trial) == ("exact", 2, 30, "1")
    assert args.model_s == "resnet8" and args.distill == "kd"
    assert teacher_parser().parse_args([]).model == "resnet110"


def test_fast_defaults_are_on_and_each_has_a_flag_to_turn_it_off():
    # RepDistiller's KD command, verbatim (scripts/run_cifar_distill.sh): channels-last and folding by default.
    repdistiller = ["--path_t", "t.pth", "--distill", "kd", "--model_s", "resnet8x4"]
    repdistiller += ["-r", "0.1", "-a", "0.9", "-b", "0", "--trial", "1"]
    args = student_parser().parse_args(repdistiller)
    assert (args.channels_last, args.fold_teacher_bn) == (True, True)
    args = student_args("--no_channels_last", "--no_fold_teacher_bn")
    assert (args.channels_last, args.fold_teacher_bn) == (False, False)
    args = student_args("--channels_last", "--fold_teacher_bn")  # the flags of earlier commands still parse
    assert (args.channels_last, args.fold_teacher_bn) == (True, True)
    assert teacher_parser().parse_args(["--no_channels_last"]).channels_last is False
    assert teacher_parser().parse_args([]).channels_last is True


def test_method_choices_come_from_the_registry():
    for name in method_names():
        validate_student_args(student_args("--distill", name))
    with pytest.raises(UsageError, match="valid: .*crd"):
        validate_student_args(student_args("--distill", "nope"))


def test_loss_weights_default_to_the_published_ones():
    assert loss_weights(student_args("--distill", "crd")).__dict__ == {"gamma": 1.0, "alpha": 0.0, "beta": 0.8}
    assert loss_weights(student_args("--distill", "attention")).beta == 1000
    # Given values win; an omitted -r is the method's published CE weight (1 for RepDistiller's methods).
    w = loss_weights(student_args("--distill", "crd", "-a", "1", "-b", "0.5"))
    assert (w.gamma, w.alpha, w.beta) == (1.0, 1.0, 0.5)
    w = loss_weights(student_args("--distill", "kd", "-r", "0.1", "-a", "0.9", "-b", "0"))
    assert (w.gamma, w.alpha, w.beta) == (0.1, 0.9, 0.0)
    assert loss_weights(student_args("--distill", "kd")).__dict__ == {"gamma": 0.1, "alpha": 0.9, "beta": 0.0}
    assert loss_weights(student_args("--distill", "hint", "-r", "0")).gamma == 0.0


def test_small_lr_is_a_default_not_an_override():
    assert effective_lr(student_args(), "MobileNetV2") == 0.01
    assert effective_lr(student_args(), "resnet8x4") == 0.05
    assert effective_lr(student_args("--learning_rate", "0.02"), "ShuffleV1") == 0.02


def test_lr_schedule_matches_repdistiller():
    lr = lr_schedule(0.05, [150, 180, 210], 0.1)
    assert lr(1) == lr(150) == 0.05
    assert math.isclose(lr(151), 0.005) and math.isclose(lr(180), 0.005)
    assert math.isclose(lr(181), 5e-4) and math.isclose(lr(211), 5e-5) and math.isclose(lr(240), 5e-5)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epochs", "0"], "--epochs 0: must be positive"),
        (["--batch_size", "-4"], "--batch_size -4"),
        (["--learning_rate", "0"], "--learning_rate"),
        (["--lr_decay_epochs", "150,abc"], "--lr_decay_epochs"),
        (["--lr_decay_epochs", "180,150"], "increasing"),
        (["--model_s", "resnet9"], "--model_s 'resnet9': unknown model; valid names: .*resnet8"),
        (["--nce_m", "1.5"], "--nce_m"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    ],
)
def test_bad_flags_are_refused_with_the_flag_named(argv, message):
    with pytest.raises(UsageError, match=message):
        validate_student_args(student_args(*argv))


def test_path_t_is_required():
    with pytest.raises(UsageError, match="--path_t is required"):
        validate_student_args(student_parser().parse_args([]))
    with pytest.raises(UsageError, match="--model 'nope'"):
        validate_teacher_args(teacher_parser().parse_args(["--model", "nope"]))


def test_run_folders_follow_repdistiller_without_colons():
    args = student_args("--distill", "crd", "--model_s", "resnet8x4", "-a", "0", "-b", "0.8", "--trial", "1")
    folder = student_run_folder(args, "resnet32x4")
    assert folder == Path("./save/student_model/S-resnet8x4_T-resnet32x4_cifar100_crd_r-1_a-0_b-0.8_1")
    short = student_run_folder(student_args("--epochs", "2", "--train_size", "500"), "resnet56")
    assert short.name.endswith("_ep2_n500") and ":" not in str(short)
    t = teacher_run_folder(teacher_parser().parse_args(["--model", "resnet32x4"]))
    assert t == Path("./save/models/resnet32x4_cifar100_lr_0.05_decay_0.0005_trial_0")
    assert lr_decay_epochs(student_args()) == [150, 180, 210]


# ---------------------------------------------------------------------------------------------- loop


class TinyNet(nn.Module):
    """A linear model with the zoo's forward signature, for fast loop tests."""

    def __init__(self, d: int = 12, classes: int = 5) -> None:
        super().__init__()
        self.body = nn.Linear(d, 8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x, is_feat=False, preact=False):
        h = self.body(x.flatten(1))
        logits = self.fc(torch.relu(h))
        if is_feat:
            from models import FeatureOutput

            return FeatureOutput([h if preact else torch.relu(h), h], logits)
        return logits


def tiny_batches(n: int = 4, b: int = 8, seed: int = 0, classes: int = 5) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [
        Batch(torch.randn(b, 12, generator=g), torch.randint(0, classes, (b,), generator=g), torch.arange(b))
        for _ in range(n)
    ]


class CountingMethod(nn.Module):
    """A stand-in distiller: an MSE between pooled features through a trainable adapter."""

    name, preact, student_preact, has_loss = "count", False, False, True

    def __init__(self) -> None:
        super().__init__()
        self.adapter = nn.Linear(8, 8)
        self.calls = 0

    def forward(self, out_s, out_t, batch):
        self.calls += 1
        return (self.adapter(out_s.feats[-1]) - out_t.feats[-1]).pow(2).mean()


def test_distill_objective_skips_zero_weights_and_never_trains_the_teacher():
    torch.manual_seed(0)
    student, teacher, method = TinyNet(), TinyNet(), CountingMethod()
    for p in teacher.parameters():
        p.requires_grad_(False)
    objective = DistillObjective(student, teacher, method, gamma=1.0, alpha=0.0, beta=0.0, kd=DistillKL(4.0))
    terms, _ = objective(tiny_batches(1)[0])
    assert list(terms) == ["ce"] and method.calls == 0
    objective = DistillObjective(student, teacher, method, gamma=0.5, alpha=0.9, beta=2.0, kd=DistillKL(4.0))
    objective.train()
    assert student.training and not teacher.training
    terms, _ = objective(tiny_batches(1)[0])
    assert list(terms) == ["ce", "kd", "count"] and [w for w, _ in terms.values()] == [0.5, 0.9, 2.0]
    sum(w * v for w, v in terms.values()).backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is not None for p in method.parameters())
    assert all(p.grad is None for p in teacher.parameters())


def test_train_one_epoch_reduces_loss_and_reports_terms():
    torch.manual_seed(0)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batches = tiny_batches(4)
    scaler = FP32.scaler()
    first = train_one_epoch(ClassifierObjective(model), batches, optimizer, FP32, scaler, CPU, 1)
    for epoch in range(2, 30):
        last = train_one_epoch(ClassifierObjective(model), batches, optimizer, FP32, scaler, CPU, epoch)
    assert set(first) >= {"loss", "acc", "loss_ce", "images", "seconds"}
    assert first["images"] == 32 and math.isclose(first["loss"], first["loss_ce"], rel_tol=1e-6)
    assert last["loss"] < 0.5 * first["loss"]


def test_non_finite_loss_stops_with_epoch_and_step_or_is_skipped():
    model = TinyNet()
    batches = tiny_batches(4)
    bad = batches[2]
    batches[2] = Batch(bad.input * float("nan"), bad.target, bad.index)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(NonFiniteLoss, match="epoch 7, step 2"):
        train_one_epoch(ClassifierObjective(model), batches, optimizer, FP32, FP32.scaler(), CPU, 7)
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    control = StepControl(skip_nonfinite=True)
    stats = train_one_epoch(
        ClassifierObjective(model), batches, optimizer, FP32, FP32.scaler(), CPU, 1, control=control
    )
    assert control.skipped == 1 and stats["images"] == 24
    assert all(torch.isfinite(p).all() for p in model.parameters())


class SVDOfInput(nn.Module):
    """A stand-in objective whose loss takes an SVD of the batch, as KD-SVD does of the features."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def train(self, mode: bool = True):
        return self

    def __call__(self, batch):
        s = torch.linalg.svdvals(batch.input * self.w)
        return {"svd": (1.0, s.sum())}, torch.zeros(len(batch.target), 5)


def test_a_failed_decomposition_on_non_finite_values_is_a_non_finite_loss():
    batches = tiny_batches(3)
    bad = batches[1]
    batches[1] = Batch(bad.input * float("inf"), bad.target, bad.index)
    objective = SVDOfInput()
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.0)
    with pytest.raises(NonFiniteLoss, match="non-finite values in a decomposition at epoch 4, step 1"):
        train_one_epoch(objective, batches, optimizer, FP32, FP32.scaler(), CPU, 4)


def test_stop_request_ends_the_epoch_at_a_step_boundary():
    model = TinyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = iter(range(100))
    control = StepControl(stop_requested=lambda: next(calls) >= 1)
    stats = train_one_epoch(
        ClassifierObjective(model), tiny_batches(4), optimizer, FP32, FP32.scaler(), CPU, 1, control=control
    )
    assert stats["stopped_at"] == 2 and stats["images"] == 16


def test_topk_and_evaluate_against_a_hand_count():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    target = torch.tensor([1, 2, 0])
    top1, top2 = topk_correct(logits, target, (1, 2))
    assert (int(top1), int(top2)) == (1, 2)  # row 0 top-1; row 1 second; row 2 third

    class Fixed(nn.Module):
        def forward(self, x):
            return logits[x.long().flatten()]

    loader = [
        Batch(torch.tensor([[0.0], [1.0]]), target[:2], torch.arange(2)),
        Batch(torch.tensor([[2.0]]), target[2:], torch.arange(1)),
    ]
    result = evaluate(Fixed(), loader, FP32, CPU)
    expected_loss = nn.functional.cross_entropy(logits, target).item()
    assert math.isclose(result["acc"], 100 / 3, rel_tol=1e-6) and math.isclose(result["acc_top5"], 100.0)
    assert math.isclose(result["loss"], expected_loss, rel_tol=1e-6)


def test_bf16_autocast_on_cpu_stays_close_to_fp32():
    torch.manual_seed(0)
    model = create_model("resnet8")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        with Precision("bf16", "cpu").autocast():
            low = model(x)
    assert low.dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: logits agree to a few hundredths.
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)


# ---------------------------------------------------------------------------------------------- checkpoints


def test_save_atomic_keeps_the_previous_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "latest.pth"
    ckpt_io.save_atomic({"model": {"w": torch.ones(2)}}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="no space left to write .*previous checkpoint is intact"):
        ckpt_io.save_atomic({"model": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(ckpt_io.load_checkpoint(path)["model"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["latest.pth"]  # no temporary file left behind


def test_load_checkpoint_refuses_bad_files_clearly(tmp_path):
    with pytest.raises(ckpt_io.CheckpointError, match="does not exist"):
        ckpt_io.load_checkpoint(tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ckpt_io.CheckpointError, match="not a readable PyTorch checkpoint"):
        ckpt_io.load_checkpoint(junk)
    torch.save({"something": 1}, tmp_path / "other.pth")
    with pytest.raises(ckpt_io.CheckpointError, match="not a model checkpoint"):
        ckpt_io.load_checkpoint(tmp_path / "other.pth")


def test_teacher_loading_checks_architecture_and_classes(tmp_path):
    folder = tmp_path / "resnet8_vanilla"
    folder.mkdir()
    model = create_model("resnet8")
    torch.save({"model": model.state_dict(), "epoch": 240}, folder / "ckpt_epoch_240.pth")
    teacher, arch, _ = ckpt_io.load_teacher(str(folder / "ckpt_epoch_240.pth"), None, 100)
    assert arch == "resnet8" and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ckpt_io.CheckpointError, match=r"it holds a resnet8, not a resnet20 \(pass --model_t resnet8\)"):
        ckpt_io.load_teacher(str(folder / "ckpt_epoch_240.pth"), "resnet20", 100)
    with pytest.raises(ckpt_io.CheckpointError, match="shape mismatches"):
        ckpt_io.load_teacher(str(folder / "ckpt_epoch_240.pth"), None, 10)
    odd = tmp_path / "mystery" / "t.pth"
    odd.parent.mkdir()
    torch.save({"model": model.state_dict()}, odd)
    with pytest.raises(ckpt_io.CheckpointError, match="pass --model_t"):
        ckpt_io.load_teacher(str(odd), None, 100)


def test_rng_state_round_trips_through_a_safe_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3)
    ckpt_io.save_atomic({"model": {}, "rng": ckpt_io.rng_state()}, tmp_path / "r.pth")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt_io.set_rng_state(ckpt_io.load_checkpoint(tmp_path / "r.pth")["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------------------------------------- init stages


class _Recording(nn.Module):
    """A resnet8 that records the ``preact`` it is asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.net, self.asked = create_model("resnet8"), []

    def forward(self, x, is_feat=False, preact=False):
        self.asked.append(preact)
        return self.net(x, is_feat=is_feat, preact=preact)


def test_init_objective_reads_the_student_as_the_main_stage_does():
    """A method whose student features differ from the teacher's (``student_preact`` apart from ``preact``)
    gets the same features in its init stage as in its main stage."""
    from helper.engine import InitObjective

    class Distiller(nn.Module):
        preact, student_preact = True, False

        def init_modules(self, student):
            return []

        def init_loss(self, out_s, out_t, batch):
            return (out_s.feats[-1] - out_t.feats[-1]).pow(2).mean()

    student, teacher, distiller = _Recording(), _Recording(), Distiller()
    batch = Batch(torch.randn(4, 3, 32, 32), torch.zeros(4, dtype=torch.long), torch.arange(4), None)
    init = InitObjective(student, teacher.eval(), distiller)
    terms, _ = init(batch)
    assert student.asked == [False] and teacher.asked == [True] and torch.isfinite(terms["init"][1])
    x = batch.input
    out_s, out_t = student.net(x, is_feat=True), teacher.net(x, is_feat=True, preact=True)
    assert torch.equal(terms["init"][1], distiller.init_loss(out_s, out_t, batch))


def test_init_epochs_are_tensorboard_rows_of_their_own(tmp_path):
    """Each init epoch at its own step under ``init_`` names; main epochs at their epoch (were all at step 0)."""
    from helper.records import Recorder

    calls = []

    class Writer:
        def add_scalar(self, name, value, step):
            calls.append((name, value, step))

        def flush(self):
            pass

    recorder = Recorder(tmp_path)
    recorder._writer = Writer()
    for epoch in (1, 2, 3):
        recorder.epoch({"stage": "init", "epoch": epoch, "train_loss": 10.0 - epoch})
    recorder.epoch({"stage": "main", "epoch": 1, "train_loss": 2.0})
    assert calls == [("init_train_loss", 9.0, 1), ("init_train_loss", 8.0, 2), ("init_train_loss", 7.0, 3),
                     ("train_loss", 2.0, 1)]  # fmt: skip
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 4
