"""MLKD's two-view protocol (``--two_views``): the strong view in the loader, the two-view objective of the
engine, MLKD's two-view loss against a direct transcription of its formula, the flag's validation and folder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cli import SMALL, only_folder, run

from dataset import DeviceLoader
from dataset.batch import Batch
from distiller_zoo import DistillKL, get_method
from distiller_zoo.base import default_args
from distiller_zoo.MLKD import batch_level_loss, class_level_loss, mlkd_loss, mlkd_two_view_loss
from helper.engine import DistillObjective
from helper.options import UsageError, student_parser, student_run_folder, validate_student_args
from models import create_model

TEMPS = (4.0, 3.0, 5.0, 2.0, 6.0)


def logits(seed: int, b: int = 8, c: int = 10) -> torch.Tensor:
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed)) * 3


def kd(z_s: torch.Tensor, z_t: torch.Tensor, T: float) -> torch.Tensor:
    """KD_ours's kd_loss: batch mean of KL(softmax(z_t/T) || softmax(z_s/T)), times T^2."""
    return F.kl_div(F.log_softmax(z_s / T, 1), F.softmax(z_t / T, 1), reduction="none").sum(1).mean() * T**2


def masks(z_t: torch.Tensor) -> tuple[float, float]:
    """KD_ours's masks reduce to the fraction at or below the median (numpy percentile 50)."""
    p = F.softmax(z_t, 1).numpy()
    conf, class_conf = p.max(1), p.sum(0)
    return float((conf <= np.percentile(conf, 50)).mean()), float((class_conf <= np.percentile(class_conf, 50)).mean())


def official(weak, strong, mix: bool = True) -> torch.Tensor:
    """KD_ours.forward_train's loss_kd + loss_cc + loss_bc without the KD weight, written term by term."""
    (sw, tw), (ss, ts) = weak, strong
    m, m_c = masks(tw)
    kd_weak = sum(m * kd(sw, tw, T) for T in TEMPS)
    kd_strong = sum(kd(sw, tw, T) if (mix and T in (2.0, 6.0)) else kd(ss, ts, T) for T in TEMPS)
    cc = sum(m_c * class_level_loss(sw, tw, T) for T in TEMPS)
    bc = sum(m * batch_level_loss(sw, tw, T) for T in TEMPS)
    return kd_weak + kd_strong + cc + bc


def test_two_view_loss_matches_the_official_formula() -> None:
    weak, strong = (logits(0), logits(1)), (logits(2), logits(3))
    torch.testing.assert_close(mlkd_two_view_loss(weak, strong, TEMPS), official(weak, strong))
    torch.testing.assert_close(
        mlkd_two_view_loss(weak, strong, TEMPS, official_mix=False), official(weak, strong, mix=False)
    )


def test_official_mix_reads_the_weak_view_at_t2_and_t6() -> None:
    weak, strong = (logits(0), logits(1)), (logits(2), logits(3))
    gap = mlkd_two_view_loss(weak, strong, TEMPS) - mlkd_two_view_loss(weak, strong, TEMPS, official_mix=False)
    expected = sum(kd(*weak, T) - kd(*strong, T) for T in (2.0, 6.0))
    torch.testing.assert_close(gap, expected)
    assert abs(gap.item()) > 1e-3  # the two settings really differ when the views differ


def test_two_views_equal_give_the_one_view_loss() -> None:
    weak = (logits(0), logits(1))
    torch.testing.assert_close(mlkd_two_view_loss(weak, weak, TEMPS), mlkd_loss(*weak, TEMPS))


def test_strong_view_class_and_batch_terms_do_not_train() -> None:
    """KD_ours computes the strong view's CC/BC terms but leaves them out of its loss: only instance terms."""
    sw, tw = logits(0), logits(1)
    ss = logits(2).requires_grad_()
    ts = logits(3)
    loss = mlkd_two_view_loss((sw, tw), (ss, ts), TEMPS, official_mix=False)
    (grad,) = torch.autograd.grad(loss, ss)
    (expected,) = torch.autograd.grad(sum(kd(ss, ts, T) for T in TEMPS), ss)
    torch.testing.assert_close(grad, expected)


def test_objective_runs_both_networks_on_both_views() -> None:
    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=100), create_model("resnet8", num_classes=100)
    args = default_args(distill="mlkd")
    distiller = get_method("mlkd")([], [], args, 100)
    objective = DistillObjective(student, teacher, distiller, 0.1, 0.5, 0.9, DistillKL(4.0))
    objective.train()
    weak, strong = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    target = torch.randint(0, 100, (6,))
    terms, scored = objective(Batch(weak, target, torch.arange(6), None, strong))

    teacher.eval()
    with torch.no_grad():
        zt_w, zt_s = teacher(weak), teacher(strong)
    zs_w, zs_s = student(weak), student(strong)  # train mode: batch statistics of each view alone
    torch.testing.assert_close(scored, zs_w)  # accuracy on the weak view
    assert terms["ce"][0] == 0.1
    torch.testing.assert_close(terms["ce"][1], F.cross_entropy(zs_w, target) + F.cross_entropy(zs_s, target))
    torch.testing.assert_close(terms["kd"][1], DistillKL(4.0)(zs_w, zt_w) + DistillKL(4.0)(zs_s, zt_s))
    torch.testing.assert_close(terms["mlkd"][1], mlkd_two_view_loss((zs_w, zt_w), (zs_s, zt_s), TEMPS))


def test_other_methods_refuse_two_views() -> None:
    args = student_parser().parse_args(["--path_t", "t.pth", "--distill", "kd", "--two_views"])
    with pytest.raises(UsageError, match="--two_views: kd has no two-view loss; methods with one: crld, mlkd"):
        validate_student_args(args)
    assert not get_method("dkd").two_views and get_method("mlkd").two_views


def test_two_view_runs_get_a_folder_of_their_own() -> None:
    parse = student_parser().parse_args
    one = student_run_folder(parse(["--path_t", "t.pth", "--distill", "mlkd"]), "resnet56")
    two = student_run_folder(parse(["--path_t", "t.pth", "--distill", "mlkd", "--two_views"]), "resnet56")
    assert two.name == one.name + "_2v"


# ------------------------------------------------------------------------------------------ the loader


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=g), torch.arange(50) % 10


def test_weak_view_is_the_one_view_batch_and_strong_view_differs(images) -> None:
    x, y = images
    one = list(DeviceLoader(x, y, 16, "cpu", train=True, seed=3).epoch(2))
    two = list(DeviceLoader(x, y, 16, "cpu", train=True, seed=3, strong_view=True).epoch(2))
    assert len(one) == len(two) == 4
    for a, b in zip(one, two):
        assert a.input_strong is None
        torch.testing.assert_close(a.input, b.input, rtol=0, atol=0)
        assert torch.equal(a.target, b.target)
        assert b.input_strong.shape == b.input.shape and b.input_strong.dtype == torch.float32
        assert (b.input_strong - b.input).abs().mean() > 0.1  # another crop, flip and RandAugment


def test_strong_view_is_reproducible_and_resumes_mid_epoch(images) -> None:
    x, y = images
    full = list(DeviceLoader(x, y, 16, "cpu", train=True, seed=3, strong_view=True).epoch(1))
    tail = list(DeviceLoader(x, y, 16, "cpu", train=True, seed=3, strong_view=True).epoch(1, start_batch=2))
    for a, b in zip(full[2:], tail):
        assert torch.equal(a.input_strong, b.input_strong)
    other = next(iter(DeviceLoader(x, y, 16, "cpu", train=True, seed=4, strong_view=True).epoch(1)))
    assert not torch.equal(other.input_strong, full[0].input_strong)


def test_strong_view_only_in_training(images) -> None:
    with pytest.raises(ValueError, match="strong view belongs to the training loader"):
        DeviceLoader(*images, 16, "cpu", train=False, strong_view=True)


# ------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_two_view_mlkd_run_completes(tmp_path) -> None:
    teacher = tmp_path / "resnet8_vanilla.pth"
    torch.save({"model": create_model("resnet8", num_classes=100).state_dict(), "epoch": 240}, teacher)
    run(
        "train_student.py", "--path_t", str(teacher), "--model_t", "resnet8", "--model_s", "resnet8",
        "--distill", "mlkd", "--two_views", "-r", "0.1", "-a", "0", "-b", "0.9", *SMALL,
        "--save_dir", str(tmp_path), cwd=tmp_path,
    )  # fmt: skip
    folder = only_folder(tmp_path / "student_model")
    assert folder.name.endswith("_2v")
    assert json.loads((folder / "args.json").read_text())["args"]["two_views"] is True
    (row,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    # CE summed over the two views of an untrained student: about 2 ln(100) = 9.2.
    assert 8.0 < row["loss_ce"] < 11.0
    assert row["train_loss"] == pytest.approx(0.1 * row["loss_ce"] + 0.9 * row["loss_mlkd"], rel=1e-4)
