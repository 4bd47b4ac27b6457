"""AB, FT, FSP, NST and KD-SVD: loss values computed by hand on tiny tensors, their properties, pair
refusals, and the init/main stage switch of the two-stage methods."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from distiller_zoo import PairError, get_method
from distiller_zoo.AB import ABLoss, Connector
from distiller_zoo.base import default_args
from distiller_zoo.FSP import FSP
from distiller_zoo.FT import FactorTransfer, Paraphraser, Translator
from distiller_zoo.KDSVD import KDSVD
from distiller_zoo.NST import NSTLoss
from helper.options import effective_lr
from models import FeatureOutput


def t(values: list, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(shape)


def num(value: torch.Tensor | float) -> float:
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)


def close(value: torch.Tensor | float, expected: float) -> bool:
    return math.isclose(num(value), expected, rel_tol=1e-5, abs_tol=1e-7)


# Per-sample feature shapes (stem, stages, pooled) of RepDistiller's models (reference section 1.2b).
RESNET20 = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]
RESNET8X4 = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)]
RESNET32X4 = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)]
WRN_40_2 = [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)]
WRN_40_1 = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]
VGG8 = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)]
SHUFFLEV1 = [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4), (960,)]


def sizes(shapes: list[tuple[int, ...]]) -> list[torch.Size]:
    return [torch.Size(s) for s in shapes]


def random_output(shapes: list[tuple[int, ...]], batch: int = 2, grad: bool = False) -> FeatureOutput:
    feats = [torch.randn(batch, *s, requires_grad=grad) for s in shapes]
    return FeatureOutput(feats, torch.randn(batch, 100, requires_grad=grad))


def build(name: str, s_shapes: list, t_shapes: list, **flags: object) -> nn.Module:
    return get_method(name)(sizes(s_shapes), sizes(t_shapes), default_args(**flags), 100)


class TinyStudent(nn.Module):
    """Stands in for a model: only ``get_feat_modules`` is read by the init stages."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 10)

    def get_feat_modules(self) -> nn.ModuleList:
        return nn.ModuleList([self.body])


# ---------------------------------------------------------------------------------------------------------
# AB


def test_ab_loss_by_hand() -> None:
    # Layer 0 (weight 2^(0-2+1) = 1/2), batch of 2, margin 1. Per element:
    # sample 0: s=-2,t=-1 past the margin -> 0; s=-.5,t=-1 -> (.5)^2; s=.5,t=1 -> (-.5)^2; s=2,t=1 -> 0;
    #           s=0,t=0 (a teacher 0 counts as off) -> (0+1)^2 = 1                           sum 1.5
    # sample 1: s=3,t=-1 -> 16; s=-3,t=1 -> 16; s=1,t=1 on the margin -> 0; s=-1,t=-1 -> 0; s=0,t=1 -> 1   sum 33
    # -> 0.5 * 34.5 / 2 * 3/1000 = 0.025875
    s0 = t([-2, -0.5, 0.5, 2, 0, 3, -3, 1, -1, 0], (2, 1, 1, 5))
    t0 = t([-1, -1, 1, 1, 0, -1, 1, 1, -1, 1], (2, 1, 1, 5))
    # Layer 1 (weight 1): s=0,t=1 -> 1; s=2,t=1 -> 0  -> 1 * 1 / 2 * 3/1000 = 0.0015
    s1 = t([0, 2], (2, 1, 1, 1))
    t1 = t([1, 1], (2, 1, 1, 1))
    losses = ABLoss(2)([s0, s1], [t0, t1])
    assert len(losses) == 2
    assert close(losses[0], 0.025875)
    assert close(losses[1], 0.0015)


def test_ab_student_past_margin_on_teacher_side_contributes_zero() -> None:
    g_t = torch.randn(3, 8, 4, 4)
    # Each student value at least the margin away from 0, on the side of the teacher's sign.
    g_s = torch.where(g_t > 0, 1 + torch.rand_like(g_t), -1 - torch.rand_like(g_t))
    assert float(ABLoss(1)([g_s], [g_t])[0]) == 0.0
    # The same magnitudes on the wrong side all count: (|s| + 1)^2 per element.
    expected = (g_s.abs() + 1).pow(2).sum() / 3 * 3 / 1000
    assert close(ABLoss(1)([-g_s], [g_t])[0], num(expected))


def test_ab_layer_weights_halve_towards_the_stem() -> None:
    assert ABLoss(3).w == [0.25, 0.5, 1.0]
    assert ABLoss(4).w == [0.125, 0.25, 0.5, 1.0]


def test_connector_is_identity_only_where_channels_and_size_match() -> None:
    connector = Connector(sizes(RESNET20[1:-1]), sizes(WRN_40_1[1:-1]))
    assert all(isinstance(c, nn.Identity) for c in connector.connectors)
    # Same channels, different size: a (transposed) conv is still needed.
    (conv,) = Connector([torch.Size([16, 16, 16])], [torch.Size([16, 32, 32])]).connectors
    assert not isinstance(conv, nn.Identity) and conv(torch.randn(2, 16, 16, 16)).shape == (2, 16, 32, 32)
    connector = Connector(sizes(SHUFFLEV1[1:-1]), sizes(RESNET32X4[1:-1]))
    out = connector([torch.randn(2, *s) for s in SHUFFLEV1[1:-1]])
    assert [tuple(o.shape[1:]) for o in out] == RESNET32X4[1:-1]
    # No ReLU at the end: the connected student map must be able to go negative like a pre-activation.
    assert any(bool((o < 0).any()) for o in out)


def test_ab_refuses_unequal_stage_counts_and_unmappable_sizes() -> None:
    with pytest.raises(PairError, match=r"student has 4 .* teacher 3"):
        get_method("abound").check_pair(sizes(VGG8), sizes(RESNET32X4), default_args())
    odd = [(16, 32, 32), (16, 5, 5), (32, 4, 4), (32,)]
    big = [(16, 32, 32), (16, 8, 8), (32, 4, 4), (32,)]
    with pytest.raises(PairError, match="feature 1"):
        get_method("abound").check_pair(sizes(odd), sizes(big), default_args())


def test_ab_stages_connector_trained_in_init_only() -> None:
    ab = build("abound", SHUFFLEV1, RESNET32X4)
    bn = ab.connector.connectors[0].bn
    assert ab.has_loss is False and ab.preact is True
    student = TinyStudent()
    modules = ab.init_modules(student)
    assert modules[0] is ab.connector and list(modules[1]) == [student.body]
    # Init stage (the state after construction): the Connector trains and follows train()/eval().
    ab.train()
    assert bn.training and all(p.requires_grad for p in ab.connector.parameters())
    ab.set_stage("main")
    assert not bn.training and not any(p.requires_grad for p in ab.connector.parameters())
    ab.train()  # the engine calls train() every epoch: the frozen Connector stays in eval mode
    assert not bn.training
    assert ab.trainable_modules() == []
    out_s, out_t = random_output(SHUFFLEV1), random_output(RESNET32X4)
    assert float(ab(out_s, out_t, None)) == 0.0
    ab.set_stage("init")  # as the engine's per-epoch hook does
    assert bn.training and all(p.requires_grad for p in ab.connector.parameters())
    with pytest.raises(ValueError):
        ab.set_stage("warmup")


def test_ab_init_loss_trains_connector_and_student_features() -> None:
    ab = build("abound", SHUFFLEV1, RESNET32X4)
    out_s, out_t = random_output(SHUFFLEV1, grad=True), random_output(RESNET32X4)
    loss = ab.init_loss(out_s, out_t, None)
    expected = sum(ABLoss(3)(ab.connector(out_s.feats[1:-1]), out_t.feats[1:-1]))
    assert close(loss, num(expected)) and num(loss) > 0
    loss.backward()
    assert all(p.grad is not None for p in ab.connector.parameters())
    assert all(f.grad is not None for f in out_s.feats[1:-1])


def test_ab_main_stage_flag_keeps_the_loss_and_the_connector_training() -> None:
    ab = build("abound", SHUFFLEV1, RESNET32X4, ab_main_stage=True)
    ab.set_stage("main")
    ab.train()
    assert ab.has_loss is True and ab.trainable_modules() == [ab.connector]
    assert ab.connector.connectors[0].bn.training
    out_s, out_t = random_output(SHUFFLEV1), random_output(RESNET32X4)
    assert close(ab(out_s, out_t, None), num(ab.init_loss(out_s, out_t, None)))


# ---------------------------------------------------------------------------------------------------------
# FT


def test_factor_transfer_by_hand() -> None:
    # Student channels [1, 0] and [1, 2]: mean of squares [1, 2] -> [1, 2]/sqrt(5).
    # Teacher channel [3, 0]: [9, 0] -> [1, 0].  mean |diff| = (1 - 1/sqrt5 + 2/sqrt5) / 2 = 1/2 + 1/(2 sqrt5)
    f_s = t([1, 0, 1, 2], (1, 2, 1, 2))
    f_t = t([3, 0], (1, 1, 1, 2))
    expected = 0.5 + 0.5 / math.sqrt(5)
    assert close(FactorTransfer()(f_s, f_t), expected)
    # The larger map is average-pooled first: 2x4 blocks of 3s and 0s pool to [3, 0], either side.
    f_t_big = t([3, 3, 0, 0, 3, 3, 0, 0], (1, 1, 2, 4))
    assert close(FactorTransfer()(f_s, f_t_big), expected)
    assert close(FactorTransfer()(f_t_big, f_s), expected)


def test_factor_transfer_paper_factor_by_hand() -> None:
    # Whole factor: s = [1, 0, 1, 2]/sqrt6, t = [1, 0, 0, 0]; mean |diff| = (1 + 2/sqrt6) / 4
    f_s = t([1, 0, 1, 2], (1, 2, 1, 2))
    f_t = t([2, 0, 0, 0], (1, 2, 1, 2))
    assert close(FactorTransfer(paper_factor=True)(f_s, f_t), 0.25 + 0.5 / math.sqrt(6))
    # RepDistiller's channel-averaged factor differs on the same input: [1, 2]/sqrt5 vs [1, 0].
    assert close(FactorTransfer()(f_s, f_t), 0.5 + 0.5 / math.sqrt(5))


@pytest.mark.parametrize("paper_factor", [False, True])
def test_factor_transfer_is_zero_for_equal_factors(paper_factor: bool) -> None:
    f = torch.randn(4, 8, 4, 4)
    assert float(FactorTransfer(paper_factor=paper_factor)(f, f.clone())) == pytest.approx(0.0, abs=1e-7)
    assert float(FactorTransfer(paper_factor=paper_factor)(f, torch.randn(4, 8, 4, 4))) > 0


def test_paraphraser_and_translator_shapes_and_repdistiller_keys() -> None:
    paraphraser = Paraphraser((64, 8, 8))
    f_t = torch.randn(2, 64, 8, 8)
    factor, reconstruction = paraphraser(f_t)
    assert factor.shape == (2, 32, 8, 8) and reconstruction.shape == f_t.shape
    assert paraphraser(f_t, is_factor=True).shape == (2, 32, 8, 8)
    # RepDistiller's batched (N, C, H, W) shapes are accepted too.
    translator = Translator(torch.Size([2, 256, 4, 4]), torch.Size([2, 64, 8, 8]))
    assert translator(torch.randn(2, 256, 4, 4)).shape == (2, 32, 4, 4)
    # Same module indices as RepDistiller, so its checkpoints' keys load: conv at 0/3/6, BN (or none) at 1/4/7.
    assert [k for k in paraphraser.state_dict() if k.endswith("weight")] == [
        f"{part}.{i}.weight" for part in ("encoder", "decoder") for i in (0, 3, 6)
    ]
    assert "encoder.4.running_mean" in translator.state_dict()


def test_ft_stages_paraphraser_frozen_in_main() -> None:
    ft = build("factor", RESNET8X4, RESNET32X4)
    assert ft.init_modules(TinyStudent()) == [ft.paraphraser]
    assert ft.trainable_modules() == [ft.translator]
    ft.train()
    assert ft.paraphraser.training and all(p.requires_grad for p in ft.paraphraser.parameters())
    ft.set_stage("main")
    ft.train()
    assert not ft.paraphraser.training and ft.translator.training
    assert not any(p.requires_grad for p in ft.paraphraser.parameters())
    out_s, out_t = random_output(RESNET8X4, grad=True), random_output(RESNET32X4)
    loss = ft(out_s, out_t, None)
    loss.backward()
    assert all(p.grad is not None for p in ft.translator.parameters())
    assert out_s.feats[-2].grad is not None
    assert all(p.grad is None for p in ft.paraphraser.parameters())
    ft.set_stage("init")
    assert ft.paraphraser.training and all(p.requires_grad for p in ft.paraphraser.parameters())
    ft.set_stage("main")  # as the engine does every epoch (e.g. when a run resumes in the main stage)
    ft.train()
    assert not ft.paraphraser.training and not any(p.requires_grad for p in ft.paraphraser.parameters())


def test_ft_init_loss_is_reconstruction_mse_of_teacher_map() -> None:
    ft = build("factor", RESNET8X4, RESNET32X4)
    out_s, out_t = random_output(RESNET8X4), random_output(RESNET32X4)
    loss = ft.init_loss(out_s, out_t, None)
    _, reconstruction = ft.paraphraser(out_t.feats[-2])
    assert close(loss, num((reconstruction - out_t.feats[-2]).pow(2).mean()))
    loss.backward()
    assert all(p.grad is not None for p in ft.paraphraser.parameters())
    assert all(p.grad is None for p in ft.translator.parameters())


def test_ft_forward_matches_factor_transfer_and_paper_flag() -> None:
    torch.manual_seed(0)
    out_s, out_t = random_output(RESNET8X4), random_output(RESNET32X4)
    for paper in (False, True):
        ft = build("factor", RESNET8X4, RESNET32X4, ft_paper_factor=paper)
        factor_s = ft.translator(out_s.feats[-2])
        factor_t = ft.paraphraser(out_t.feats[-2], is_factor=True)
        expected = FactorTransfer(paper_factor=paper)(factor_s, factor_t)
        assert close(ft(out_s, out_t, None), num(expected))


@pytest.mark.parametrize(
    ("student", "learning_rate", "expected"),
    [
        ("resnet8x4", None, 0.01),  # RepDistiller's pretrain.py: 0.01 for CIFAR ResNet/WRN students ...
        ("wrn_16_2", 0.1, 0.01),  # ... whatever --learning_rate says
        ("ResNet50", None, 0.05),  # otherwise the main learning rate: 0.05 by default ...
        ("ShuffleV1", None, 0.01),  # ... 0.01 for MobileNetV2/ShuffleNets ...
        ("vgg8", 0.02, 0.02),  # ... or the user's
    ],
)
def test_ft_init_lr_quirk(student: str, learning_rate: float | None, expected: float) -> None:
    ft, args = build("factor", RESNET8X4, RESNET32X4), default_args(learning_rate=learning_rate)
    own = ft.init_lr(args, student)  # None: the main learning rate, as train_student.py resolves it
    assert own == (expected if student in ("resnet8x4", "wrn_16_2") else None)
    assert (own or effective_lr(args, student)) == expected


# ---------------------------------------------------------------------------------------------------------
# FSP


def test_fsp_by_hand() -> None:
    # bot [1, 2] (1 channel), top channels [1, 1] and [0, 3]: G = mean over positions of top*bot
    # = [[(1 + 2)/2], [(0 + 6)/2]] = [[1.5], [3]]. Teacher top all 0 -> G_t = 0; loss = (1.5^2 + 3^2)/2.
    bot = t([1, 2], (1, 1, 1, 2))
    top = t([1, 1, 0, 3], (1, 2, 1, 2))
    fsp = FSP([bot.shape, top.shape], [bot.shape, top.shape])
    (g,) = fsp.compute_fsp([bot, top])
    assert g.shape == (1, 2, 1) and g.flatten().tolist() == [1.5, 3.0]
    (loss,) = fsp([bot, top], [bot, torch.zeros_like(top)])
    assert close(loss, 5.625)
    # A larger bottom map is pooled to the top's size first: 2x4 blocks of 1s and 2s pool to [1, 2].
    bot_big = t([1, 1, 2, 2, 1, 1, 2, 2], (1, 1, 2, 4))
    (loss,) = fsp([bot_big, top], [bot, torch.zeros_like(top)])
    assert close(loss, 5.625)


def test_fsp_zero_for_equal_features_and_positive_otherwise() -> None:
    g = [torch.randn(2, *s) for s in RESNET20[:-1]]
    fsp = FSP(sizes(RESNET20[:-1]), sizes(RESNET20[:-1]))
    assert [float(x) for x in fsp(g, [f.clone() for f in g])] == [0.0, 0.0, 0.0]
    assert all(float(x) > 0 for x in fsp(g, [torch.randn_like(f) for f in g]))


def test_fsp_refuses_unequal_channels_naming_layer_and_counts() -> None:
    with pytest.raises(PairError, match=r"feature 1 has 16 channels in the student .* 32 in the teacher"):
        get_method("fsp").check_pair(sizes(WRN_40_1), sizes(WRN_40_2), default_args())
    with pytest.raises(ValueError, match="equal channel counts"):  # RepDistiller raises ValueError too
        FSP(sizes(WRN_40_1[:-1]), sizes(WRN_40_2[:-1]))
    with pytest.raises(PairError, match="as many feature maps"):
        get_method("fsp").check_pair(sizes(RESNET8X4), sizes(VGG8), default_args())


def test_fsp_is_an_init_stage_on_the_student_body() -> None:
    fsp = build("fsp", RESNET8X4, RESNET32X4)
    assert fsp.has_loss is False and fsp.init_stage is True
    student = TinyStudent()
    (body,) = fsp.init_modules(student)
    assert list(body) == [student.body]
    out_s, out_t = random_output(RESNET8X4), random_output(RESNET32X4)
    expected = sum(FSP(sizes(RESNET8X4[:-1]), sizes(RESNET32X4[:-1]))(out_s.feats[:-1], out_t.feats[:-1]))
    assert close(fsp.init_loss(out_s, out_t, None), num(expected))
    assert float(fsp(out_s, out_t, None)) == 0.0


# ---------------------------------------------------------------------------------------------------------
# NST


def test_nst_by_hand() -> None:
    # Channels normalised over positions: student [3, 0] -> [1, 0] and [0, 1];
    # teacher [1, 0] and [2, 0] -> [1, 0] twice.
    # k(t,t): all 1 -> 1; k(s,s): [[1, 0], [0, 1]] -> 1/2; k(s,t): [[1, 1], [0, 0]] -> 1/2.  1 + 1/2 - 2 * 1/2 = 1/2
    f_s = t([3, 0, 0, 1], (1, 2, 1, 2))
    f_t = t([1, 0, 2, 0], (1, 2, 1, 2))
    (loss,) = NSTLoss()([f_s], [f_t])
    assert close(loss, 0.5)
    # Channel counts may differ: teacher [1, 0] alone: k(t,t) = 1, k(s,s) = 1/2, k(s,t) = [1, 0] -> 1/2.
    (loss,) = NSTLoss()([f_s], [t([1, 0], (1, 1, 1, 2))])
    assert close(loss, 0.5)
    # A kernel value off {0, 1}: student [1, 1] -> [r, r], teacher [1, 0]; k(s,t) = r^2 = 1/2 -> 1 + 1 - 1 = 1.
    (loss,) = NSTLoss()([t([1, 1], (1, 1, 1, 2))], [t([1, 0], (1, 1, 1, 2))])
    assert close(loss, 1.0)


def test_nst_zero_for_equal_features_and_positive_otherwise() -> None:
    g = [torch.randn(2, *s) for s in RESNET20[1:-1]]
    assert all(abs(float(x)) < 1e-6 for x in NSTLoss()(g, [f.clone() for f in g]))
    assert all(float(x) > 0 for x in NSTLoss()(g, [torch.randn_like(f) for f in g]))


def test_nst_method_serves_cross_family_pairs() -> None:
    nst = build("nst", SHUFFLEV1, RESNET32X4)
    out_s, out_t = random_output(SHUFFLEV1), random_output(RESNET32X4)
    expected = sum(NSTLoss()(out_s.feats[1:-1], out_t.feats[1:-1]))
    assert close(nst(out_s, out_t, None), num(expected))


# ---------------------------------------------------------------------------------------------------------
# KD-SVD


def test_kdsvd_by_hand() -> None:
    # One sample, two stages of 2 channels on a 1x1 map: each map's matrix (HW=1, C=2) has one right-singular
    # vector, its normalised row. Teacher [1, 0] twice -> v_t = [1, 0] in both stages (up to one shared sign,
    # which cancels). Student [1, 0] then [1, 1] -> [1, 0] and [r, r], r = 1/sqrt2, sign-aligned to the teacher.
    # rbf[c, c'] = exp(-(v2[c] - v1[c'])^2 / 8):  student [[a, b], [a, b]], teacher [[1, e], [e, 1]] with
    # a = exp(-(r - 1)^2 / 8), b = exp(-r^2 / 8), e = exp(-1/8).  Loss = sum of squared differences / B.
    r = 1 / math.sqrt(2)
    a, b, e = math.exp(-((r - 1) ** 2) / 8), math.exp(-(r**2) / 8), math.exp(-1 / 8)
    expected = (a - 1) ** 2 + (b - e) ** 2 + (a - e) ** 2 + (b - 1) ** 2
    assert expected == pytest.approx(0.0184381523)
    teacher = [t([1, 0], (1, 2, 1, 1)), t([1, 0], (1, 2, 1, 1))]
    student = [t([1, 0], (1, 2, 1, 1)), t([1, 1], (1, 2, 1, 1))]
    (loss,) = KDSVD()(student, teacher)
    assert close(loss, expected)
    # Flipping the student's sign changes nothing: singular vectors are aligned by |cosine| and sign.
    (loss,) = KDSVD()([-f for f in student], teacher)
    assert close(loss, expected)


def test_kdsvd_zero_up_to_sign_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    stages = [(8, 8, 8), (16, 4, 4), (32, 2, 2)]  # small stand-ins for a ResNet's stage maps
    g = [torch.randn(3, *s) for s in stages]
    assert all(abs(float(x)) < 1e-6 for x in KDSVD()(g, [f.clone() for f in g]))
    assert all(abs(float(x)) < 1e-6 for x in KDSVD()([-f for f in g], g))
    g_s = [torch.randn(3, *s, requires_grad=True) for s in stages]
    losses = KDSVD()(g_s, g)
    assert len(losses) == 2 and all(math.isfinite(num(x)) and num(x) > 0 for x in losses)
    sum(losses).backward()
    assert all(f.grad is not None and bool(torch.isfinite(f.grad).all()) for f in g_s)


def test_kdsvd_handles_non_square_maps() -> None:
    # RepDistiller's reshape assumed H = W (a (C, 2, 8) map broke its batch dimension); H * W is used here,
    # so a (C, 2, 8) map holding the same values in the same order as a (C, 4, 4) map gives the same loss.
    torch.manual_seed(1)
    g_s = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)]
    g_t = [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)]
    square = KDSVD()(g_s, g_t)[0]
    flat = KDSVD()([f.reshape(2, -1, 2, 8) for f in g_s], [f.reshape(2, -1, 2, 8) for f in g_t])[0]
    assert close(flat, float(square))


def _tied_maps(b: int = 2, c: int = 16, h: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A student stage map whose (HW, C) matrix is diagonal with its two smallest entries equal: two exactly
    tied singular values, as a ReLU map met in a real run (resnet20, step 47 at -b 1: two singular values of
    1.5083e-05 in one image of the batch made torch's SVD gradient NaN for the whole batch)."""
    torch.manual_seed(0)
    d = torch.rand(b, c) + 0.5
    d[:, -2:] = 1e-3
    x = torch.zeros(b, h * h, c)
    x[:, torch.arange(c), torch.arange(c)] = d
    return torch.rand(b, 8, 8, 8), x.transpose(1, 2).reshape(b, c, h, h)


def test_kdsvd_guarded_gradient_is_torchs_away_from_ties() -> None:
    torch.manual_seed(2)
    stages = [(8, 8, 8), (16, 4, 4), (32, 2, 2)]  # HW > C, HW = C and HW < C (the complement term)
    g_t = [torch.randn(3, *s, dtype=torch.float64) for s in stages]
    grads = []
    for guarded in (True, False):
        g_s = [torch.randn(3, *s, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) for s in stages]
        g_s = [f.requires_grad_() for f in g_s]
        grads.append(torch.autograd.grad(sum(KDSVD(guarded=guarded)(g_s, g_t)), g_s))
    for a, b in zip(*grads):
        assert float(b.abs().max()) > 1e-4  # a gradient to compare
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)  # float64; 1e-8 of S^-1's guard is below


def test_kdsvd_guarded_gradient_stays_finite_at_tied_singular_values() -> None:
    f1, f2 = _tied_maps()
    g_t = [torch.rand(2, 8, 8, 8), torch.rand(2, 16, 4, 4)]
    for guarded, finite in ((True, True), (False, False)):  # torch's own: NaN (0 x inf) at the tie
        g_s = [f1.clone().requires_grad_(), f2.clone().requires_grad_()]
        grad = torch.autograd.grad(sum(KDSVD(guarded=guarded)(g_s, g_t)), g_s)[1]
        assert bool(torch.isfinite(grad).all()) is finite


@pytest.mark.parametrize("grad, survives", [("guarded", True), ("torch", False)])
def test_kdsvd_at_its_published_beta_trains_through_a_tie(grad, survives) -> None:
    """Three dozen SGD steps (lr 0.05, momentum 0.9, as RepDistiller) of the published ``-b 1`` loss on
    student maps that start tied: the guarded gradient keeps them finite, torch's makes them NaN at once."""
    f1, f2 = _tied_maps()
    g_s = [nn.Parameter(f1), nn.Parameter(f2)]
    g_t = [torch.rand(2, 8, 8, 8), torch.rand(2, 16, 4, 4)]
    args = default_args(kdsvd_grad=grad)
    criterion = get_method("kdsvd")(sizes(RESNET20), sizes(RESNET20), args, 100).criterion
    optimizer = torch.optim.SGD(g_s, lr=0.05, momentum=0.9)
    first = None
    try:
        for _ in range(36):
            loss = 1.0 * sum(criterion(g_s, g_t))  # -b 1
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            first = num(loss) if first is None else first
    except torch.linalg.LinAlgError:  # the SVD of NaN maps (the engine reports it as a non-finite loss)
        pass
    assert all(bool(torch.isfinite(p).all()) for p in g_s) is survives
    if survives:
        assert num(sum(criterion(g_s, g_t))) < first  # and it trained


def test_kdsvd_refuses_unequal_channels() -> None:
    with pytest.raises(PairError, match=r"feature 1 has 16 in the student .* 32 in the teacher"):
        get_method("kdsvd").check_pair(sizes(WRN_40_1), sizes(WRN_40_2), default_args())
    get_method("kdsvd").check_pair(sizes(RESNET8X4), sizes(RESNET32X4), default_args())


# ---------------------------------------------------------------------------------------------------------
# Published weights


@pytest.mark.parametrize(
    ("name", "beta", "init_stage", "has_loss"),
    [("abound", 1.0, True, False), ("factor", 200.0, True, True), ("fsp", 50.0, True, False),
     ("nst", 50.0, False, True), ("kdsvd", 1.0, False, True)],
)  # fmt: skip
def test_recipes(name: str, beta: float, init_stage: bool, has_loss: bool) -> None:
    cls = get_method(name)
    assert cls.defaults == {"gamma": 1.0, "alpha": 0.0, "beta": beta}
    assert (cls.init_stage, cls.has_loss) == (init_stage, has_loss)
