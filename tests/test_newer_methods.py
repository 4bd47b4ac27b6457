"""The newer methods (OFD, ReviewKD, DKD, DIST, MLKD, SimKD, WTTM) and the logit modifiers (LS, CTKD): values
computed by hand on tiny tensors, and properties that fail when the formula is wrong.

The hand computations use ``math`` on Python floats, independently of the torch code under test. The
registry-wide build/backward check on the benchmark's pairs is ``tests/test_methods.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import models
from dataset.batch import Batch
from distiller_zoo import DistillKL, PairError, get_method, kd_term
from distiller_zoo.base import default_args
from distiller_zoo.DIST import dist_loss, inter_class_relation, intra_class_relation
from distiller_zoo.DKD import dkd_loss, dkd_terms
from distiller_zoo.DKD import warmup_epochs as dkd_warmup_epochs
from distiller_zoo.logit_modifiers import cosine_reversal_weight, softened_kl, standardize
from distiller_zoo.MLKD import batch_level_loss, class_level_loss, confidence_fraction, mlkd_loss
from distiller_zoo.OFD import ofd_margin, partial_l2
from distiller_zoo.ReviewKD import hcl_loss
from distiller_zoo.WTTM import wttm_loss, wttm_terms
from models import FeatureOutput

Z_S = [[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]  # student logits, 2 samples x 3 classes
Z_T = [[3.0, 1.0, 0.0], [1.0, 0.0, 2.0]]  # teacher logits
TARGET = [0, 2]


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def softmax(row: list[float], T: float = 1.0) -> list[float]:
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)  # 0 log 0 = 0


def logits_out(logits: torch.Tensor) -> FeatureOutput:
    return FeatureOutput([], logits)


def batch_of(target: list[int]) -> Batch:
    n = len(target)
    return Batch(torch.zeros(n, 3, 32, 32), torch.tensor(target), torch.arange(n))


# ------------------------------------------------------------------------------------------ registration


@pytest.mark.parametrize(
    ("name", "weights"),
    [
        ("ofd", (1.0, 0.0, 1e-3)),
        ("reviewkd", (1.0, 0.0, 5.0)),
        ("dkd", (1.0, 0.0, 1.0)),
        ("dist", (1.0, 0.0, 1.0)),
        ("mlkd", (0.2, 0.0, 0.9)),
        ("simkd", (0.0, 0.0, 1.0)),
        ("wttm", (1.0, 0.0, 4.0)),
    ],
)
def test_published_weights(name: str, weights: tuple[float, float, float]) -> None:
    d = get_method(name).defaults
    assert (d["gamma"], d["alpha"], d["beta"]) == weights


def test_method_flags_and_their_sources() -> None:
    a = default_args()
    assert (a.dkd_alpha, a.dkd_beta, a.dkd_T, a.dkd_warmup) == (1.0, 8.0, 4.0, None)  # mdistiller CFG.DKD
    assert (dkd_warmup_epochs(a), dkd_warmup_epochs(default_args(ctkd=True))) == (20.0, 0.0)  # CTKD: none
    assert dkd_warmup_epochs(default_args(ctkd=True, dkd_warmup=5)) == 5
    assert (a.dist_beta, a.dist_gamma, a.dist_tau) == (2.0, 2.0, 4.0)
    assert (a.reviewkd_warmup, a.reviewkd_stu_preact, a.simkd_factor, a.ttm_l, a.mlkd_T) == (20, False, 2, 0.2, 4.0)
    assert (a.logit_stand, a.base_temp, a.ctkd) == (False, 2.0, False)  # LS-KD tools/train.py
    assert (a.ctkd_t_start, a.ctkd_t_end, a.ctkd_decay_max, a.ctkd_decay_min, a.ctkd_decay_loops) == (1, 20, 0, -1, 10)


# ------------------------------------------------------------------------------------------ LS and CTKD


def test_standardize_by_hand() -> None:
    # Row 2: mean 4, deviations (-2, -2, 4), unbiased variance 24 / 2 = 12.
    s = math.sqrt(12.0)
    expected = t([[-1.0, 0.0, 1.0], [-2 / s, -2 / s, 4 / s]])
    torch.testing.assert_close(standardize(t([[1.0, 2.0, 3.0], [2.0, 2.0, 8.0]])), expected)


def test_kd_term_is_distill_kl_without_modifiers() -> None:
    term = kd_term(default_args(kd_T=3.0))
    assert isinstance(term, DistillKL) and term.T == 3.0


def test_kd_with_logit_stand_by_hand() -> None:
    args = default_args(logit_stand=True, base_temp=2.0, kd_T=4.0)
    z_s, z_t = [1.0, 2.0, 4.0], [0.0, 3.0, 3.0]

    def zscore(row: list[float]) -> list[float]:
        mean = sum(row) / 3
        std = math.sqrt(sum((v - mean) ** 2 for v in row) / 2)
        return [(v - mean) / std for v in row]

    # base_temp 2 replaces kd_T 4; times T^2.
    expected = 4.0 * kl(softmax(zscore(z_t), 2.0), softmax(zscore(z_s), 2.0))
    assert kd_term(args)(t([z_s]), t([z_t])).item() == pytest.approx(expected, rel=1e-5)


def test_kd_with_logit_stand_ignores_student_shift_and_scale() -> None:
    g = torch.Generator().manual_seed(0)
    z_s, z_t = torch.randn(4, 10, generator=g), torch.randn(4, 10, generator=g)
    moved = 3.0 * z_s + 5.0
    ls = kd_term(default_args(logit_stand=True))
    torch.testing.assert_close(ls(moved, z_t), ls(z_s, z_t), rtol=1e-5, atol=1e-6)
    plain = kd_term(default_args())
    assert not torch.allclose(plain(moved, z_t), plain(z_s, z_t))  # the property is LS's, not KD's


def test_ctkd_curriculum_values() -> None:
    # CTKD CosineDecay(max 0, min -1, loops 10): 0 at epoch 0, -1 from epoch 10 on.
    values = [cosine_reversal_weight(e, 0.0, -1.0, 10) for e in (0, 1, 5, 10, 15)]
    assert values == pytest.approx([0.0, (math.cos(math.pi / 10) + 1) / 2 - 1, -0.5, -1.0, -1.0])


def test_ctkd_temperature_starts_at_sigmoid_of_one() -> None:
    term = kd_term(default_args(ctkd=True))
    term.set_epoch(1)
    T = term.modifier.temperature_now()
    assert T.item() == pytest.approx(1 + 20 / (1 + math.exp(-1)), rel=1e-6)  # 15.62
    assert [n for n, _ in term.named_parameters()] == ["modifier.ctkd.theta"]  # trained by the optimizer


@pytest.mark.parametrize("epoch", [5, 10])
def test_ctkd_temperature_gets_the_reversed_gradient(epoch: int) -> None:
    g = torch.Generator().manual_seed(1)
    z_s, z_t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    term = kd_term(default_args(ctkd=True)).train()
    term.set_epoch(epoch)
    term(z_s, z_t).backward()
    # The same loss with a plain (not reversed) temperature of the same value.
    theta = torch.ones((), requires_grad=True)
    T = 1 + 20 * torch.sigmoid(theta)
    DistillKL(T)(z_s, z_t).backward()
    weight = cosine_reversal_weight(epoch, 0.0, -1.0, 10)  # -0.5 and -1
    assert theta.grad.abs() > 1e-4
    torch.testing.assert_close(term.modifier.ctkd.theta.grad, weight * theta.grad)


def test_ctkd_refuses_to_train_without_a_curriculum() -> None:
    term = kd_term(default_args(ctkd=True)).train()
    with pytest.raises(RuntimeError, match="set_epoch"):
        term(torch.zeros(2, 3), torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------ DKD


def test_dkd_by_hand() -> None:
    tckd, nckd = [], []
    for s, te, y in zip(Z_S, Z_T, TARGET):
        p_s, p_t = softmax(s), softmax(te)
        tckd.append(kl([p_t[y], 1 - p_t[y]], [p_s[y], 1 - p_s[y]]))
        others = [c for c in range(3) if c != y]
        nckd.append(kl(softmax([te[c] for c in others]), softmax([s[c] for c in others])))
    got_t, got_n = dkd_terms(t(Z_S), t(Z_T), torch.tensor(TARGET), 1.0)
    torch.testing.assert_close(got_t, torch.tensor(tckd))
    torch.testing.assert_close(got_n, torch.tensor(nckd))
    loss = dkd_loss(t(Z_S), t(Z_T), torch.tensor(TARGET), 1.0, 8.0, 1.0)
    assert loss.item() == pytest.approx((tckd[0] + 8 * nckd[0] + tckd[1] + 8 * nckd[1]) / 2, rel=1e-5)


def test_dkd_decomposes_kd() -> None:
    # Paper eq. 4: KD = TCKD + (1 - p_t[target]) * NCKD, per sample, at any temperature (times T^2 all round).
    g = torch.Generator().manual_seed(2)
    z_s, z_t = 3 * torch.randn(5, 7, generator=g), 3 * torch.randn(5, 7, generator=g)
    target, T = torch.tensor([0, 3, 6, 2, 2]), 4.0
    tckd, nckd = dkd_terms(z_s, z_t, target, T)
    p_target = F.softmax(z_t / T, dim=1).gather(1, target[:, None]).squeeze(1)
    kd = F.kl_div(F.log_softmax(z_s / T, 1), F.softmax(z_t / T, 1), reduction="none").sum(1) * T**2
    torch.testing.assert_close(tckd + (1 - p_target) * nckd, kd)
    # With alpha = beta = 1 DKD drops that weight, so it is larger than KD wherever NCKD > 0.
    assert (tckd + nckd > kd).all()


def test_dkd_is_zero_for_the_teacher_itself() -> None:
    z = t(Z_T)
    assert dkd_loss(z, z, torch.tensor(TARGET), 1.0, 8.0, 4.0).item() == pytest.approx(0.0, abs=1e-6)


def test_dkd_warmup_ramps_the_term() -> None:
    cls = get_method("dkd")
    method = cls([], [], default_args(), 10)
    out_s, out_t, batch = logits_out(t(Z_S)), logits_out(t(Z_T)), batch_of(TARGET)
    full = dkd_loss(t(Z_S), t(Z_T), torch.tensor(TARGET), 1.0, 8.0, 4.0)
    for epoch, factor in [(1, 1 / 20), (5, 5 / 20), (20, 1.0), (200, 1.0)]:
        method.set_epoch(epoch, "main")
        torch.testing.assert_close(method(out_s, out_t, batch), factor * full)


def test_dkd_under_ctkd_has_no_warmup_and_shares_one_temperature_with_the_kd_term() -> None:
    # CTKD helper/loops.py: one temperature per step, passed to criterion_div (KD) and criterion_kd (DKD).
    args = default_args(ctkd=True, alpha=1.0)
    method = get_method("dkd")([], [], args, 10).train()
    term = kd_term(args, method).train()
    assert [n for n, _ in term.named_parameters()] == []  # the method owns the one temperature
    out_s, out_t, batch = logits_out(t(Z_S)), logits_out(t(Z_T)), batch_of(TARGET)
    for m in (method, term):
        m.set_epoch(1, "main")
    with torch.no_grad():
        method.modifier.ctkd.theta.fill_(0.3)
    T = 1.0 + 20.0 * torch.sigmoid(torch.tensor(0.3))
    expected = dkd_loss(t(Z_S), t(Z_T), torch.tensor(TARGET), 1.0, 8.0, T)  # full weight at epoch 1
    torch.testing.assert_close(method(out_s, out_t, batch), expected)
    torch.testing.assert_close(term(t(Z_S), t(Z_T)), softened_kl(t(Z_S), t(Z_T), T).mean())
    alone = kd_term(args, get_method("kd")([], [], args, 10))  # KD has no temperature of its own: the term learns it
    assert [n for n, _ in alone.named_parameters()] == ["modifier.ctkd.theta"]


def test_dkd_with_logit_stand_uses_base_temp_and_ignores_student_scale() -> None:
    method = get_method("dkd")([], [], default_args(logit_stand=True, base_temp=3.0), 10)
    z_s, z_t = t(Z_S), t(Z_T)
    expected = dkd_loss(standardize(z_s), standardize(z_t), torch.tensor(TARGET), 1.0, 8.0, 3.0)
    batch = batch_of(TARGET)
    torch.testing.assert_close(method(logits_out(z_s), logits_out(z_t), batch), expected)
    torch.testing.assert_close(method(logits_out(5 * z_s - 1), logits_out(z_t), batch), expected)


# ------------------------------------------------------------------------------------------ DIST


def pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    num = sum((x - ma) * (y - mb) for x, y in zip(a, b))
    return num / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_dist_by_hand() -> None:
    y_s, y_t = [softmax(r, 2.0) for r in Z_S], [softmax(r, 2.0) for r in Z_T]
    inter = 1 - sum(pearson(a, b) for a, b in zip(y_s, y_t)) / 2
    columns = [([r[c] for r in y_s], [r[c] for r in y_t]) for c in range(3)]
    intra = 1 - sum(pearson(a, b) for a, b in columns) / 3
    expected = 4.0 * (2.0 * inter + 3.0 * intra)  # tau^2 (beta inter + gamma intra), tau 2, beta 2, gamma 3
    assert dist_loss(t(Z_S), t(Z_T), 2.0, 3.0, 2.0).item() == pytest.approx(expected, rel=1e-5)


def test_dist_is_zero_for_the_teacher_itself() -> None:
    g = torch.Generator().manual_seed(3)
    z, other = 3 * torch.randn(6, 10, generator=g), 3 * torch.randn(6, 10, generator=g)
    # Not exactly 0: the official 1e-8 added to the product of norms (tiny for tau-4 softmax columns).
    assert dist_loss(z, z, 2.0, 2.0, 4.0).item() == pytest.approx(0.0, abs=1e-3)
    assert dist_loss(other, z, 2.0, 2.0, 4.0).item() > 1.0


def test_dist_relations_ignore_positive_affine_maps() -> None:
    g = torch.Generator().manual_seed(4)
    y_s, y_t = torch.rand(5, 8, generator=g), torch.rand(5, 8, generator=g)
    row_a, row_b = torch.rand(5, 1, generator=g) + 0.1, torch.randn(5, 1, generator=g)
    col_a, col_b = torch.rand(1, 8, generator=g) + 0.1, torch.randn(1, 8, generator=g)
    # Pearson per row (inter-class) ignores a positive affine map of each row, per column (intra) of each column.
    torch.testing.assert_close(inter_class_relation(row_a * y_s + row_b, y_t), inter_class_relation(y_s, y_t))
    torch.testing.assert_close(intra_class_relation(col_a * y_s + col_b, y_t), intra_class_relation(y_s, y_t))
    # ... but not the other one's.
    assert not torch.allclose(intra_class_relation(row_a * y_s + row_b, y_t), intra_class_relation(y_s, y_t))


def test_dist_ignores_a_shift_of_the_logits_but_not_a_scale() -> None:
    g = torch.Generator().manual_seed(5)
    z_s, z_t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    shift = torch.randn(4, 1, generator=g)  # per-sample constant: softmax, hence DIST, unchanged
    base = dist_loss(z_s, z_t, 2.0, 2.0, 4.0)
    torch.testing.assert_close(dist_loss(z_s + shift, z_t, 2.0, 2.0, 4.0), base)
    assert not torch.allclose(dist_loss(3 * z_s, z_t, 2.0, 2.0, 4.0), base)


# ------------------------------------------------------------------------------------------ WTTM


def test_wttm_by_hand() -> None:
    gamma, total = 0.5, 0.0
    for s, te in zip(Z_S, Z_T):
        powered = [p**gamma for p in softmax(te)]
        u = sum(powered)
        total += u * kl([p / u for p in powered], softmax(s))
    assert wttm_loss(t(Z_S), t(Z_T), gamma).item() == pytest.approx(total / 2, rel=1e-5)


def test_wttm_with_power_one_is_kl_at_temperature_one() -> None:
    z_s, z_t = t(Z_S), t(Z_T)
    torch.testing.assert_close(wttm_loss(z_s, z_t, 1.0), DistillKL(1.0)(z_s, z_t))


def test_wttm_minimum_is_the_transformed_teacher() -> None:
    z_t = t(Z_T)
    # softmax(gamma * z_t) is the transformed teacher, so the loss vanishes there, not at the teacher itself.
    assert wttm_loss(0.2 * z_t + 1.0, z_t, 0.2).item() == pytest.approx(0.0, abs=1e-6)
    assert wttm_loss(z_t, z_t, 0.2).item() > 0.01


def test_wttm_weights_flatter_teachers_more() -> None:
    weight, _ = wttm_terms(torch.zeros(2, 4), t([[0.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0]]), 0.5)
    assert weight[0].item() == pytest.approx(4 * 0.25**0.5)  # uniform: C^(1 - gamma) = 2
    assert 1.0 < weight[1].item() < weight[0].item()


# ------------------------------------------------------------------------------------------ MLKD


def test_mlkd_levels_by_hand() -> None:
    p_s, p_t = [softmax(r) for r in Z_S], [softmax(r) for r in Z_T]

    def gram(rows: list[list[float]], over_classes: bool) -> list[list[float]]:
        cols = list(zip(*rows)) if over_classes else rows
        return [[sum(a * b for a, b in zip(u, v)) for v in cols] for u in cols]

    def sq_diff(a: list[list[float]], b: list[list[float]]) -> float:
        return sum((x - y) ** 2 for ra, rb in zip(a, b) for x, y in zip(ra, rb))

    bc = sq_diff(gram(p_t, False), gram(p_s, False)) / 2  # / B
    cc = sq_diff(gram(p_t, True), gram(p_s, True)) / 3  # / C
    assert batch_level_loss(t(Z_S), t(Z_T), 1.0).item() == pytest.approx(bc, rel=1e-5)
    assert class_level_loss(t(Z_S), t(Z_T), 1.0).item() == pytest.approx(cc, rel=1e-5)


def test_mlkd_confidence_fractions() -> None:
    # Teacher confidences (max prob) 0.844 and 0.665: median 0.754, one of two at or below it. Class sums of the
    # probabilities 1.089, 0.204, 0.707: median 0.707, two of three at or below it.
    m, m_c = confidence_fraction(t(Z_T))
    assert (m.item(), m_c.item()) == pytest.approx((0.5, 2 / 3))


def test_mlkd_loss_sums_the_levels_over_its_temperatures() -> None:
    z_s, z_t = t(Z_S), t(Z_T)
    temps = (4.0, 3.0, 5.0, 2.0, 6.0)
    m, m_c = 0.5, 2 / 3
    expected = sum(
        (1 + m) * DistillKL(T)(z_s, z_t) + m_c * class_level_loss(z_s, z_t, T) + m * batch_level_loss(z_s, z_t, T)
        for T in temps
    )
    method = get_method("mlkd")([], [], default_args(), 10)
    torch.testing.assert_close(method(logits_out(z_s), logits_out(z_t), batch_of(TARGET)), expected)
    assert mlkd_loss(z_t, z_t, temps).item() == pytest.approx(0.0, abs=1e-6)


# ------------------------------------------------------------------------------------------ OFD


def test_ofd_margin_is_the_mean_of_the_negative_part() -> None:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, -2.0, 1.0, 1.0]))  # |gamma| is the std
        bn.bias.copy_(torch.tensor([0.0, 0.0, -1.0, 5.0]))
    phi1, Phi1 = math.exp(-0.5) / math.sqrt(2 * math.pi), 0.5 * (1 + math.erf(1 / math.sqrt(2)))
    expected = [-math.sqrt(2 / math.pi), -2 * math.sqrt(2 / math.pi), -1 - phi1 / Phi1, -3.0]  # last: P(x<0) < 1e-3
    assert ofd_margin(bn).tolist() == pytest.approx(expected, rel=1e-5)


def test_ofd_partial_l2_by_hand() -> None:
    margin = torch.tensor([-1.0])
    target = t([[-2.0, -0.5, -0.5, 1.0, -2.0]]).view(1, 1, 1, 5)
    source = t([[-1.5, -1.0, 0.0, 0.5, -0.5]]).view(1, 1, 1, 5)
    # Targets max(t, -1) = (-1, -0.5, -0.5, 1, -1). Skipped where source <= target <= 0: the first two.
    # Others: (0 + 0.5)^2 + (0.5 - 1)^2 + (-0.5 + 1)^2 = 0.75.
    assert partial_l2(source, target, margin).item() == pytest.approx(0.75)
    assert partial_l2(torch.cat([source, source]), torch.cat([target, target]), margin).item() == pytest.approx(0.75)


@pytest.fixture(scope="module")
def small_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    teacher = models.create_model("vgg8").eval()  # 4 stage maps: 128, 256, 512, 512 channels
    return teacher, models.create_model("resnet8")  # 3 stage maps: 16, 32, 64


def test_ofd_pairs_the_deepest_stages_and_weights_them(small_pair) -> None:
    teacher, student = small_pair
    cls = get_method("ofd")
    s_shapes, t_shapes = models.feature_shapes(student, preact=True), models.feature_shapes(teacher, preact=True)
    method = cls(s_shapes, t_shapes, default_args(), 10)
    with pytest.raises(RuntimeError, match="bind_teacher"):
        method(FeatureOutput([], torch.zeros(1)), FeatureOutput([], torch.zeros(1)), None)
    method.bind_teacher(teacher)
    bns = teacher.get_bn_before_relu()[1:]
    for i, bn in enumerate(bns):
        torch.testing.assert_close(getattr(method, f"margin{i}"), ofd_margin(bn))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        out_s, out_t = student(x, is_feat=True, preact=True), teacher(x, is_feat=True, preact=True)
        expected = sum(
            partial_l2(conn(f_s), F.adaptive_avg_pool2d(f_t, f_s.shape[-2:]), ofd_margin(bn)) * w
            for conn, f_s, f_t, bn, w in zip(
                method.connectors, out_s.feats[1:-1], out_t.feats[2:-1], bns, (0.25, 0.5, 1.0)
            )
        )
        torch.testing.assert_close(method(out_s, out_t, None), expected)
    restored = cls(s_shapes, t_shapes, default_args(), 10)
    restored.load_state_dict(method.state_dict())
    assert restored.bound and torch.equal(restored.margin2, method.margin2)


def test_ofd_shufflev2_teacher_margins_cover_the_right_branch() -> None:
    teacher = models.create_model("ShuffleV2").eval()
    s_shapes = models.feature_shapes(models.create_model("resnet8"), preact=True)
    method = get_method("ofd")(s_shapes, models.feature_shapes(teacher, preact=True), default_args(), 10)
    method.bind_teacher(teacher)
    bn = teacher.get_bn_before_relu()[0]  # 58 of the stage's 116 channels
    assert torch.equal(method.margin0[:58], torch.zeros(58))
    torch.testing.assert_close(method.margin0[58:], ofd_margin(bn))


# ------------------------------------------------------------------------------------------ ReviewKD


def test_hcl_by_hand() -> None:
    f_t = torch.arange(16.0).view(1, 1, 4, 4)
    # Full: mean of k^2, k < 16 = 77.5. 2x2 means 2.5, 4.5, 10.5, 12.5 -> mean square 73.25. 1x1: 7.5^2.
    # Weights 1, 1/2, 1/4 (the 4x4 level is skipped: not smaller than the map).
    expected = (77.5 + 73.25 / 2 + 56.25 / 4) / 1.75
    assert hcl_loss(torch.zeros_like(f_t), f_t).item() == pytest.approx(expected)


def sizes(*shapes: tuple[int, ...]) -> list[torch.Size]:
    return [torch.Size(s) for s in shapes]


@pytest.mark.parametrize(
    ("s_shapes", "t_shapes", "in_channels", "out_channels", "out_shapes"),
    [
        # resnet8x4 <- resnet32x4, official build_review_kd: in/out [64, 128, 256, 256], shapes [1, 8, 16, 32].
        (
            sizes((32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)),
            sizes((32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)),
            [64, 128, 256, 256], [64, 128, 256, 256], [32, 16, 8, 1],
        ),
        # MobileNetV2 <- ResNet50: in [12, 16, 48, 160, 1280], out [256, 512, 1024, 2048, 2048], [1, 4, 8, 16, 32].
        (
            sizes((16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280,)),
            sizes((64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4), (2048,)),
            [12, 16, 48, 160, 1280], [256, 512, 1024, 2048, 2048], [32, 16, 8, 4, 1],
        ),
    ],
)  # fmt: skip
def test_reviewkd_matches_the_official_tables(s_shapes, t_shapes, in_channels, out_channels, out_shapes) -> None:
    method = get_method("reviewkd")(s_shapes, t_shapes, default_args(), 10)
    abfs = list(method.abfs)[::-1]  # shallowest first
    assert [abf.conv1[0].in_channels for abf in abfs] == in_channels
    assert [abf.conv2[0].out_channels for abf in abfs] == out_channels
    assert {abf.conv1[0].out_channels for abf in abfs} == {min(512, in_channels[-1])}
    assert [size[0] for size in method.out_sizes[::-1]] == out_shapes
    assert [abf.att_conv is None for abf in abfs] == [False] * (len(abfs) - 1) + [True]  # deepest: no fusion
    feats_s = [torch.randn(2, *s) for s in s_shapes]
    feats_t = [torch.randn(2, *s) for s in t_shapes]
    fused = method.fused(feats_s)
    assert [tuple(f.shape[1:]) for f in fused] == [(c, h, h) for c, h in zip(out_channels, out_shapes)]
    out_s, out_t = FeatureOutput(feats_s, torch.zeros(2, 100)), FeatureOutput(feats_t, torch.zeros(2, 100))
    levels_t = [*feats_t[1:-1], feats_t[-1][:, :, None, None]][-len(fused) :]
    expected = sum(hcl_loss(a, b) for a, b in zip(fused, levels_t))
    torch.testing.assert_close(method(out_s, out_t, None), expected)
    method.set_epoch(2, "main")  # warm-up 2 / 20
    torch.testing.assert_close(method(out_s, out_t, None), expected / 10)


# ------------------------------------------------------------------------------------------ SimKD


def test_simkd_loss_and_deployed_network(small_pair) -> None:
    teacher, student = small_pair  # teacher feats[-2] 512x4x4, student 64x8x8: the student's map is pooled
    cls = get_method("simkd")
    s_shapes, t_shapes = models.feature_shapes(student), models.feature_shapes(teacher)
    method = cls(s_shapes, t_shapes, default_args(), 10)
    with pytest.raises(RuntimeError, match="bind_teacher"):
        method.deploy(student)
    method.bind_teacher(teacher)
    assert torch.equal(method.classifier.weight, teacher.classifier.weight)
    assert not any(p.requires_grad for p in method.classifier.parameters())
    assert method.trainable_modules() == [method.projector]

    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    out_s = student(x, is_feat=True)
    with torch.no_grad():
        out_t = teacher(x, is_feat=True)
    f_s = F.adaptive_avg_pool2d(out_s.feats[-2], (4, 4))
    torch.testing.assert_close(method(out_s, out_t, None), F.mse_loss(method.projector(f_s), out_t.feats[-2]))

    deployed = method.deploy(student).eval()
    with torch.no_grad():
        logits = deployed(x)
        f = F.adaptive_avg_pool2d(student(x, is_feat=True).feats[-2], (4, 4))
        expected = teacher.classifier(method.projector(f).mean(dim=(2, 3)))
    torch.testing.assert_close(logits, expected)
    n = sum(p.numel() for m in (student, method.projector, method.classifier) for p in m.parameters())
    assert sum(p.numel() for p in deployed.parameters()) == n


def test_simkd_refuses_a_teacher_whose_classifier_reads_another_width() -> None:
    s_shapes = sizes((16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,))
    shufflev2 = sizes((24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4), (1024,))
    with pytest.raises(PairError, match="464 channels .* 1024"):
        get_method("simkd").check_pair(s_shapes, shufflev2, default_args())
