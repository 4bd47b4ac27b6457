"""LumiNet, RLD and CRLD: values computed by hand (``math`` on Python floats) on tiny tensors, properties that
fail when the formula is wrong, CRLD's two views, and a one-epoch command line run of each.

The comparison with the official code (same random inputs, values and gradients) is recorded in
``helper/published/newer_recipes.md``; no test depends on that code.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from shared_paths import teacher
from test_cli import SMALL, only_folder, run
from test_newer_methods import TARGET, Z_S, Z_T, kl, softmax, t
from test_scripts import _newer, flag

from dataset.batch import Batch
from distiller_zoo import get_method
from distiller_zoo.base import default_args
from distiller_zoo.CRLD import crld_loss, kd_per_sample, teacher_confident
from distiller_zoo.LumiNet import luminet_loss, perception
from distiller_zoo.RLD import rld_loss, rld_terms
from helper.options import UsageError, student_parser, student_run_folder, validate_student_args
from models import FeatureOutput


def randn(seed: int, *shape: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_published_defaults_and_flags() -> None:
    weights = {
        n: tuple(get_method(n).defaults[k] for k in ("gamma", "alpha", "beta")) for n in ("luminet", "rld", "crld")
    }
    assert weights == {"luminet": (2.0, 0.0, 1.0), "rld": (1.0, 0.0, 1.0), "crld": (2.0, 0.0, 1.0)}
    a = default_args()
    assert (a.luminet_alpha, a.luminet_T, a.luminet_warmup) == (31.0, 4.0, 20)  # LumiNet cfg.py SOLVER, LUMINET
    assert (a.rld_alpha, a.rld_beta, a.rld_T, a.rld_alpha_T, a.rld_warmup) == (1.0, 8.0, 4.0, 1.0, 20)  # CFG.RLD
    assert (a.crld_T, a.crld_tau_w, a.crld_tau_s, a.crld_wv, a.crld_cv) == (4.0, 0.9, 0.2, 2.0, 0.5)  # CFG.CRLD


# ------------------------------------------------------------------------------------------ LumiNet


def by_hand_perception(rows: list[list[float]], eps: float = 1e-5) -> list[list[float]]:
    cols = list(zip(*rows))
    means = [sum(c) / len(c) for c in cols]
    variances = [sum((v - m) ** 2 for v in c) / len(c) for c, m in zip(cols, means)]  # biased
    return [[(v - m) / math.sqrt(s + eps) for v, m, s in zip(r, means, variances)] for r in rows]


def test_perception_by_hand() -> None:
    torch.testing.assert_close(perception(t(Z_S)), t(by_hand_perception(Z_S)))


def test_luminet_by_hand() -> None:
    ps, pt = by_hand_perception(Z_S), by_hand_perception(Z_T)
    for T, alpha in ((4.0, 33.0), (8.0, 70.0)):
        expected = alpha**2 * sum(kl(softmax(b, T), softmax(a, T)) for a, b in zip(ps, pt)) / 2
        # rtol 1e-5: a small KL of nearly equal distributions in float32 (measured 2.8e-6 relative at T = 4).
        torch.testing.assert_close(luminet_loss(t(Z_S), t(Z_T), T, alpha), torch.tensor(expected), rtol=1e-5, atol=0)


def test_luminet_ignores_a_per_class_affine_map_of_the_student() -> None:
    z_s, z_t = randn(0, 16, 10), randn(1, 16, 10)
    shift, scale = randn(2, 1, 10), randn(3, 1, 10).abs() + 0.5
    base = luminet_loss(z_s, z_t, 4.0, 31.0)
    torch.testing.assert_close(luminet_loss(z_s * scale + shift, z_t, 4.0, 31.0), base, rtol=1e-4, atol=1e-5)
    assert luminet_loss(z_t * scale + shift, z_t, 4.0, 31.0) < 1e-4 * base  # the teacher up to that map: ~0


def test_luminet_warmup_ramps_the_term() -> None:
    method = get_method("luminet")([], [], default_args(), 0)
    out_s, out_t = FeatureOutput([], randn(0, 8, 10)), FeatureOutput([], randn(1, 8, 10))
    batch = Batch(torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), torch.arange(8))
    full = luminet_loss(out_s.logits, out_t.logits, 4.0, 31.0)
    for epoch, factor in ((1, 0.05), (10, 0.5), (25, 1.0)):
        method.set_epoch(epoch, "main")
        torch.testing.assert_close(method(out_s, out_t, batch), factor * full)


# ------------------------------------------------------------------------------------------ RLD


def test_rld_by_hand() -> None:
    T, aT = 4.0, 2.0
    scd = mcd = 0.0
    for zs, zt, y in zip(Z_S, Z_T, TARGET):
        ps, pt = softmax(zs, aT), softmax(zt, aT)
        top = max(range(3), key=lambda c: zt[c])
        scd += kl([pt[top], 1 - pt[top]], [ps[y], 1 - ps[y]]) / 2 * aT**2
        kept = [c for c in range(3) if zt[c] < zt[y]]  # classes the teacher ranks below the true one
        mcd += kl(softmax([zt[c] for c in kept], T), softmax([zs[c] for c in kept], T)) / 2 * T**2
    got_scd, got_mcd = rld_terms(t(Z_S), t(Z_T), torch.tensor(TARGET), T, aT)
    torch.testing.assert_close(got_scd, torch.tensor(scd))
    torch.testing.assert_close(got_mcd, torch.tensor(mcd))
    torch.testing.assert_close(
        rld_loss(t(Z_S), t(Z_T), torch.tensor(TARGET), 1.0, 8.0, T, aT), torch.tensor(scd + 8 * mcd)
    )


def test_rld_teacher_splits_at_its_own_top_class() -> None:
    # Row 0's teacher prefers class 0, the label is 1: SCD compares (p_s[1], rest) with (p_t[0], rest).
    z_s, z_t, y = t([[0.0, 0.0, 0.0]]), t([[2.0, 1.0, 0.0]]), torch.tensor([1])
    pt = softmax([2.0, 1.0, 0.0])
    scd, mcd = rld_terms(z_s, z_t, y, 4.0, 1.0)
    torch.testing.assert_close(scd, torch.tensor(kl([pt[0], 1 - pt[0]], [1 / 3, 2 / 3])))
    # MCD keeps only class 2 (below the true class 1): a one-class distribution on both sides.
    torch.testing.assert_close(mcd, torch.tensor(0.0))


def test_rld_mcd_is_zero_and_finite_when_the_teacher_ranks_the_label_last() -> None:
    z_s = t([[1.0, 2.0, 3.0]]).requires_grad_()
    _, mcd = rld_terms(z_s, t([[3.0, 1.0, 0.0]]), torch.tensor([2]), 4.0, 1.0)
    mcd.backward()
    assert mcd.item() == 0.0 and torch.isfinite(z_s.grad).all()


def test_rld_mcd_has_no_gradient_on_masked_classes() -> None:
    z_s, z_t = randn(0, 8, 10).requires_grad_(), randn(1, 8, 10)
    y = torch.arange(8) % 10
    _, mcd = rld_terms(z_s, z_t, y, 4.0, 1.0)
    mcd.backward()
    mask = z_t >= z_t.gather(1, y[:, None])
    assert mask.sum() > 8  # some teacher prefers another class to the label
    assert (z_s.grad[mask] == 0).all() and (z_s.grad[~mask].abs() > 0).any()


# ------------------------------------------------------------------------------------------ CRLD


def test_crld_by_hand() -> None:
    # Weak teacher row 0 is confident (top probability >= 0.9), row 1 is not; strong teacher row 1 < 0.2.
    sw, ss = [[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]], [[0.0, 2.0, 1.0], [1.0, 1.0, 0.0]]
    tw, ts = [[6.0, 1.0, 0.0], [1.0, 0.0, 2.0]], [[5.0, 1.0, 0.0], [0.0, 0.0, 0.0]]
    conf = lambda rows, tau: [float(max(softmax(r)) >= tau) for r in rows]  # noqa: E731
    m_w, m_s = conf(tw, 0.9), conf(ts, 0.2)
    assert m_w == [1.0, 0.0] and m_s == [1.0, 1.0]
    kd = lambda s, te: 16 * kl(softmax(te, 4.0), softmax(s, 4.0))  # noqa: E731
    within = sum(m * (kd(a, b) + kd(c, d)) for m, a, b, c, d in zip(m_w, sw, tw, ss, ts)) / 2
    cross = sum(m * (kd(c, b) + kd(a, d)) for m, a, b, c, d in zip(m_s, sw, tw, ss, ts)) / 2
    got = crld_loss((t(sw), t(tw)), (t(ss), t(ts)), 4.0, 0.9, 0.2, 2.0, 0.5)
    torch.testing.assert_close(got, torch.tensor(2.0 * within + 0.5 * cross))
    torch.testing.assert_close(teacher_confident(t(tw), 0.9), torch.tensor(m_w))
    torch.testing.assert_close(kd_per_sample(t(sw), t(tw), 4.0)[1], torch.tensor(kd(sw[1], tw[1])))


def test_crld_one_view_is_the_two_view_loss_with_equal_views() -> None:
    method = get_method("crld")([], [], default_args(), 0)
    out_s, out_t = FeatureOutput([], randn(0, 16, 10)), FeatureOutput([], randn(1, 16, 10, scale=6.0))
    batch = Batch(torch.zeros(16, 3, 32, 32), torch.zeros(16, dtype=torch.long), torch.arange(16))
    one = method(out_s, out_t, batch)
    torch.testing.assert_close(method.forward_views((out_s, out_s), (out_t, out_t), batch), one)
    out_s2, out_t2 = FeatureOutput([], randn(2, 16, 10)), FeatureOutput([], randn(3, 16, 10, scale=6.0))
    assert (method.forward_views((out_s, out_s2), (out_t, out_t2), batch) - one).abs() > 1e-3


def test_crld_unconfident_samples_get_no_gradient() -> None:
    s_w, s_s = randn(0, 16, 10).requires_grad_(), randn(1, 16, 10).requires_grad_()
    t_w, t_s = randn(2, 16, 10, scale=6.0), randn(3, 16, 10, scale=6.0)
    crld_loss((s_w, t_w), (s_s, t_s), 4.0, 0.9, 0.99, 2.0, 0.5).backward()  # tau_s 0.99: cross terms mostly off
    off = (teacher_confident(t_w, 0.9) == 0) & (teacher_confident(t_s, 0.99) == 0)
    on = teacher_confident(t_w, 0.9) == 1
    assert off.any() and on.any()
    assert (s_w.grad[off] == 0).all() and (s_s.grad[off] == 0).all() and (s_w.grad[on].abs() > 0).any()


def test_two_views_accepted_by_crld_refused_by_rld() -> None:
    parse = student_parser().parse_args
    validate_student_args(parse(["--path_t", "t.pth", "--distill", "crld", "--two_views"]))
    with pytest.raises(UsageError, match="--two_views: rld has no two-view loss; methods with one: crld, mlkd"):
        validate_student_args(parse(["--path_t", "t.pth", "--distill", "rld", "--two_views"]))
    two = student_run_folder(parse(["--path_t", "t.pth", "--distill", "crld", "--two_views"]), "resnet56")
    assert two.name.endswith("_2v")


# ------------------------------------------------------------------------------------------ recipes


def test_recipe_script_passes_the_official_per_pair_values() -> None:
    lumi = _newer("luminet")  # LumiNet configs/cifar100/luminet/*.yaml: (ALPHA, T, CE_WEIGHT)
    expected = {("resnet32x4", "resnet8x4"): ("33", "4", "2"), ("vgg13", "vgg8"): ("70", "8", "1"),
                ("vgg13", "MobileNetV2"): ("70", "8", "2"), ("wrn_40_2", "wrn_40_1"): ("75", "8", "1"),
                ("wrn_40_2", "ShuffleV1"): ("35", "4", "1"), ("resnet56", "resnet20"): ("31", "4", "2")}  # fmt: skip
    for pair, values in expected.items():
        assert (flag(lumi[pair], "--luminet_alpha"), flag(lumi[pair], "--luminet_T"), flag(lumi[pair], "-r")) == values
    rld, crld = _newer("rld"), _newer("crld")
    assert all(
        (flag(c, "-r"), flag(c, "-a"), flag(c, "-b")) == ("1", "0", "1") for c in [*rld.values(), *crld.values()]
    )
    assert all("--two_views" in c for c in crld.values()) and not any("--two_views" in c for c in rld.values())
    for cmd in [*lumi.values(), *rld.values(), *crld.values()]:  # every recipe is a valid command line
        validate_student_args(student_parser().parse_args(cmd[cmd.index("--path_t") :]))


# ------------------------------------------------------------------------------------------ command line

TEACHER = teacher("resnet20")  # the trained one from ../shared, else a random-init one
RECIPES = {  # scripts/run_cifar_newer.sh's flags (LumiNet with its resnet32x4->resnet8x4 values)
    "luminet": ["--distill", "luminet", "-r", "2", "-a", "0", "-b", "1", "--luminet_alpha", "33"],
    "rld": ["--distill", "rld", "-r", "1", "-a", "0", "-b", "1"],
    "crld": ["--distill", "crld", "--two_views", "-r", "1", "-a", "0", "-b", "1"],
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(RECIPES))
def test_one_epoch_run(method: str, tmp_path) -> None:
    argv = ["--path_t", str(TEACHER), "--model_s", "resnet8", *RECIPES[method], *SMALL, "--save_dir", str(tmp_path)]
    run("train_student.py", *argv, cwd=tmp_path)
    folder = only_folder(tmp_path / "student_model")
    (row,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    gamma = float(RECIPES[method][RECIPES[method].index("-r") + 1])
    assert row[f"loss_{method}"] > 0 and math.isfinite(row["train_loss"])
    # An untrained student's CE is about ln(100) = 4.6 per view; the total is gamma * CE + the method's term.
    assert (8.0 if method == "crld" else 4.0) < row["loss_ce"] < (11.0 if method == "crld" else 5.5)
    assert row["train_loss"] == pytest.approx(gamma * row["loss_ce"] + row[f"loss_{method}"], rel=1e-4)
