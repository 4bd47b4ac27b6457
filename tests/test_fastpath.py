"""The fast-path flags (``--channels_last``, ``--amp bf16``, ``--compile``, ``--fold_teacher_bn``) leave results
equivalent.

One distillation step (teacher forward, student forward and backward, every loss term, an SGD step) on small
real-shaped models, once the plain way and once with the flag, compared term by term and weight by weight.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from shared_paths import DATA, ROOT, teacher
from torch import nn

import models
from dataset import Batch, CRDSampler
from distiller_zoo import get_method
from distiller_zoo.base import default_args
from distiller_zoo.KD import DistillKL
from helper.engine import DistillObjective, Precision, train_one_epoch
from helper.fold import fold_batchnorm
from helper.setup import compile_forward
from models import FeatureOutput, create_model, feature_shapes

CPU = torch.device("cpu")
FP32 = Precision("none", "cpu")
N_DATA, BATCH, NCE_K = 64, 8, 16  # CRD memory rows, batch size, negatives: small but the real code paths

# (gamma, alpha, beta): the published weights, with the KD term switched on for the feature methods so that
# one step exercises CE, KL and the method's own term together.
WEIGHTS = {"kd": (0.1, 0.9, 0.0), "attention": (1.0, 0.9, 1000.0), "crd": (1.0, 0.9, 0.8)}


def make_step_inputs(method: str, seed: int = 0) -> tuple[nn.Module, nn.Module, nn.Module, Batch]:
    """A random resnet8 teacher (frozen) and student, the method's distiller and one batch with CRD indices."""
    torch.manual_seed(seed)
    teacher, student = create_model("resnet8"), create_model("resnet8")
    teacher.eval().requires_grad_(False)
    cls = get_method(method)
    s_shapes, t_shapes = feature_shapes(student, preact=cls.preact), feature_shapes(teacher, preact=cls.preact)
    distiller = cls(s_shapes, t_shapes, default_args(nce_k=NCE_K, batch_size=BATCH), N_DATA)
    distiller.bind_teacher(teacher)
    labels = torch.arange(N_DATA) % 4
    index = torch.randperm(N_DATA)[:BATCH]
    contrast = CRDSampler(labels, NCE_K, seed=seed).sample(index, labels[index], torch.Generator().manual_seed(seed))
    batch = Batch(torch.randn(BATCH, 3, 32, 32), labels[index], index, contrast)
    return student, teacher, distiller, batch


def one_step(
    method: str, student: nn.Module, teacher: nn.Module, distiller: nn.Module, batch: Batch, precision: Precision
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """One training step through the engine; returns its loss terms and the student's updated weights."""
    gamma, alpha, beta = WEIGHTS[method]
    objective = DistillObjective(student, teacher, distiller, gamma, alpha, beta, DistillKL(4))
    params = [p for m in (student, distiller) for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    stats = train_one_epoch(objective, [batch], optimizer, precision, precision.scaler(), CPU, 1, print_freq=0)
    terms = {k: v for k, v in stats.items() if k.startswith("loss")}
    return terms, {k: v.detach().clone() for k, v in student.state_dict().items()}


def to_channels_last(*modules: nn.Module) -> None:
    for module in modules:
        module.to(memory_format=torch.channels_last)


# ---------------------------------------------------------------------------------------------- channels-last


@pytest.mark.parametrize("method", ["kd", "attention", "crd"])
def test_channels_last_step_equals_the_plain_step(method):
    student, teacher, distiller, batch = make_step_inputs(method)
    copies = copy.deepcopy((student, teacher, distiller))
    ref_terms, ref_weights = one_step(method, student, teacher, distiller, batch, FP32)

    student, teacher, distiller = copies
    to_channels_last(student, teacher)
    batch = batch._replace(input=batch.input.contiguous(memory_format=torch.channels_last))
    terms, weights = one_step(method, student, teacher, distiller, batch, FP32)

    assert student.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert set(terms) == set(ref_terms) and len(terms) == 2 + (method != "kd") + 1  # loss, ce, kd, method
    # Same arithmetic in another memory order: only the summation order inside the convolutions differs, so
    # the results agree to fp32 rounding. Observed: the KL term (a small difference of two near-equal
    # distributions, about 0.09 here) within 1.2e-5 relative, every other term within 1e-6, the updated
    # weights within 7e-5 relative; the bounds below leave a margin for other kernels.
    for name, value in ref_terms.items():
        assert terms[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for name, value in ref_weights.items():
        torch.testing.assert_close(weights[name], value, rtol=1e-4, atol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------- bf16 autocast


# bf16 keeps 8 significant bits (relative rounding 2**-9, about 0.2%) in the convolutions and matrix products;
# autocast keeps the losses' softmax, logs and reductions in fp32. Observed on one step of resnet8 -> resnet8:
# every term within 7e-4 relative of fp32 (rounding errors of opposite sign largely cancel in the batch means).
# 1% is a margin of about 15 over that while still catching a term computed on the wrong tensor or scale.
BF16_REL = 1e-2


@pytest.mark.parametrize("method", ["kd", "attention", "crd"])
def test_bf16_autocast_step_stays_within_tolerance(method):
    student, teacher, distiller, batch = make_step_inputs(method)
    copies = copy.deepcopy((student, teacher, distiller))
    ref_terms, _ = one_step(method, student, teacher, distiller, batch, FP32)
    student, teacher, distiller = copies

    with torch.no_grad(), Precision("bf16", "cpu").autocast():
        assert student(batch.input).dtype == torch.bfloat16  # autocast really runs the convolutions in bf16
    terms, weights = one_step(method, student, teacher, distiller, batch, Precision("bf16", "cpu"))

    assert set(terms) == set(ref_terms)
    for name, value in ref_terms.items():
        assert terms[name] == pytest.approx(value, rel=BF16_REL), name
    floats = [w for w in weights.values() if w.is_floating_point()]  # (not BN's step counters)
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in floats)  # fp32 master weights


# ---------------------------------------------------------------------------------------------- torch.compile


@pytest.fixture(scope="module")
def compiler() -> None:
    """Skip when torch.compile cannot build kernels here (the CPU backend needs a working C++ compiler)."""
    try:
        fn = torch.compile(lambda x: torch.sin(x) + 1)
        torch.testing.assert_close(fn(torch.ones(4)), torch.sin(torch.ones(4)) + 1)
    except Exception as exc:  # backend errors differ by platform and version
        pytest.skip(f"torch.compile cannot run here: {type(exc).__name__}: {str(exc)[:200]}")


def test_compiled_forward_equals_eager(compiler, caplog):
    torch.manual_seed(0)
    student, teacher = create_model("resnet8"), create_model("resnet8")
    teacher.eval().requires_grad_(False)  # frozen: compiled with inductor's freezing (constant weights)
    eager_s, eager_t = copy.deepcopy(student), copy.deepcopy(teacher)
    x = torch.randn(BATCH, 3, 32, 32)
    with caplog.at_level(logging.WARNING, logger="kd"):
        compile_forward(student)
        compile_forward(teacher)
        with torch.inference_mode():
            out_t = teacher(x, is_feat=True)
        out_s = student(x, is_feat=True)
    assert not [r for r in caplog.records if "torch.compile failed" in r.getMessage()], "fell back to eager"

    with torch.inference_mode():
        ref_t = eager_t(x, is_feat=True)
    ref_s = eager_s(x, is_feat=True)
    # Fused kernels and BN folded into the convolutions round differently from eager: fp32 tolerance.
    got = [*out_t.feats, out_t.logits, *out_s.feats, out_s.logits]
    ref = [*ref_t.feats, ref_t.logits, *ref_s.feats, ref_s.logits]
    assert len(got) == len(ref) == 12
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # The student trains: its compiled graph updates BN statistics as eager does and passes gradients back.
    for name, buf in eager_s.named_buffers():
        torch.testing.assert_close(dict(student.named_buffers())[name], buf, rtol=1e-4, atol=1e-6, msg=name)
    out_s.logits.sum().backward()
    assert student.fc.weight.grad is not None and torch.isfinite(student.fc.weight.grad).all()


class _Failing(nn.Module):
    """A model whose compiled forward raises ``error`` (as the compiler or the compiled code would)."""

    def __init__(self, error: Exception) -> None:
        super().__init__()
        self.error, self.lin = error, nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def _compiled_raising(monkeypatch, error: Exception) -> nn.Module:
    def fake_compile(fn, options=None):
        def compiled(*args, **kwargs):
            raise error

        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = _Failing(error)
    compile_forward(model)
    return model


def test_compile_falls_back_to_eager_only_for_a_compiler_error(monkeypatch, caplog):
    from torch._dynamo.exc import BackendCompilerFailed

    x = torch.randn(3, 2)
    model = _compiled_raising(monkeypatch, BackendCompilerFailed("inductor", RuntimeError("no C++ compiler"), None))
    with caplog.at_level(logging.WARNING, logger="kd"):
        torch.testing.assert_close(model(x), model.lin(x))  # the eager result, once the compiler failed
    assert any("torch.compile failed" in r.getMessage() for r in caplog.records)
    # Errors of the run itself are raised as they are, never re-run eagerly.
    for error in (torch.OutOfMemoryError("CUDA out of memory"), RuntimeError("device-side assert triggered")):
        model = _compiled_raising(monkeypatch, error)
        with pytest.raises(type(error), match=str(error)):
            model(x)


def test_no_recompilation_after_the_first_epoch(monkeypatch):
    """Two epochs with a partial last batch, the teacher's and the student's evaluation batches (another
    size, another partial batch): dynamo builds every graph in the first epoch and none in the second. The
    ``eager`` backend keeps it cheap: recompilation is dynamo's decision (its guards), whatever the backend."""
    from torch._dynamo.utils import counters

    from dataset import DeviceLoader
    from helper.engine import evaluate

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, options=None: real_compile(fn, backend="eager"))
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=5), create_model("resnet8", num_classes=5)
    teacher.eval().requires_grad_(False)
    compile_forward(student)
    compile_forward(teacher)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (22, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(22) % 5
    train = DeviceLoader(images[:10], labels[:10], 4, CPU, train=True)  # batches of 4, 4, 2
    test = DeviceLoader(images[10:], labels[10:], 5, CPU, train=False)  # batches of 5, 5, 2
    kd = get_method("kd")([], [], default_args(), 10)
    objective = DistillObjective(student, teacher, kd, 0.1, 0.9, 0.0, DistillKL(4.0))
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01)
    evaluate(teacher, test, FP32, CPU)  # train_student.py's teacher accuracy at start
    graphs = []
    for epoch in (1, 2):
        train_one_epoch(objective, train.epoch(epoch), optimizer, FP32, FP32.scaler(), CPU, epoch)
        evaluate(student, test, FP32, CPU)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 4 and graphs[1] == graphs[0], graphs  # 4+: student and teacher, train and eval
    assert counters["frames"]["ok"] == counters["frames"]["total"]  # every frame compiled, none fell back


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_run_with_every_fast_path_flag(compiler, tmp_path):
    teacher = tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    teacher.parent.mkdir()
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8").state_dict()}, teacher)
    argv = [
        "--path_t",
        str(teacher),
        "--model_s",
        "resnet8",
        "--distill",
        "kd",
        "--epochs",
        "1",
        "--train_size",
        "100",
        "--test_size",
        "100",
        "--batch_size",
        "100",
        "--eval_batch_size",
        "100",
        "--data_folder",
        str(DATA),
        "--save_dir",
        str(tmp_path / "save"),
        "--device",
        "cpu",
        "--amp",
        "bf16",
        "--channels_last",
        "--compile",
        "--fold_teacher_bn",
    ]  # fmt: skip  (one batch of 100 everywhere: the compiled graphs see one shape)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train_student.py"), *argv], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.compile failed" not in proc.stderr  # compiled, not the eager fallback
    (summary_path,) = (tmp_path / "save").rglob("summary.json")
    summary = json.loads(summary_path.read_text())
    (row,) = [json.loads(line) for line in (summary_path.parent / "metrics.jsonl").read_text().splitlines()]
    assert summary["test_acc"] == row["test_acc"] and float(row["test_acc"]).is_integer()  # a count of 100 images
    assert summary["epochs"] == 1 and 4.0 < row["loss_ce"] < 5.5  # an untrained student's CE: about ln(100) = 4.6
    args = json.loads((summary_path.parent / "args.json").read_text())["args"]
    assert (args["amp"], args["channels_last"], args["compile"], args["fold_teacher_bn"]) == ("bf16", True, True, True)
    assert "teacher: 9 BatchNorms folded" in proc.stderr  # resnet8: stem, 6 in the blocks, 2 in shortcuts
    run_log = (summary_path.parent / "run.log").read_text()
    assert "speed settings: channels-last, teacher BatchNorms folded, precision bf16, compiled" in run_log


# ---------------------------------------------------------------------------------------------- BN folding


@pytest.mark.parametrize("arch", models.model_names())
def test_folded_teacher_gives_the_same_outputs(arch):
    torch.manual_seed(0)
    model = create_model(arch)
    with torch.no_grad():  # non-trivial running statistics, as a trained teacher has
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    model.eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    folded, count = fold_batchnorm(model, preact=True)
    assert count > 0 and folded is not model
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == n_bn - count
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == n_bn  # the original is untouched
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        a, b = model(x, is_feat=True, preact=True), folded(x, is_feat=True, preact=True)
    for u, v in zip([*a.feats, a.logits], [*b.feats, b.logits]):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-4 * u.abs().max().item())


def test_real_teacher_folds_every_batchnorm():
    from helper.checkpoint import load_teacher

    # The trained resnet56 from ../shared, else a random-init one with non-trivial BatchNorms (cifar_fixture.py).
    model, _, _ = load_teacher(str(teacher("resnet56")), None, num_classes=100)
    folded, count = fold_batchnorm(model.eval())
    assert count == 57 == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # stem, 54 in blocks, 2 shortcuts
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


class MisleadingOrder(nn.Module):
    """A conv and a BN that are siblings in that order, but the BN normalises the input, not the conv's output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 10)
        with torch.no_grad():
            self.bn.running_mean.fill_(0.3)
            self.bn.running_var.fill_(2.0)

    def forward(self, x, is_feat=False, preact=False):
        f = self.conv(self.bn(x))
        logits = self.fc(f.mean(dim=(2, 3)))
        return FeatureOutput([f], logits) if is_feat else logits


def test_fold_is_refused_when_the_forward_does_not_apply_bn_to_the_conv(caplog):
    model = MisleadingOrder().eval()
    with caplog.at_level(logging.WARNING, logger="kd"):
        folded, count = fold_batchnorm(model)
    assert folded is model and count == 0
    assert "teacher BatchNorms not folded" in caplog.text
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(MisleadingOrder().train())
