"""The RepDistiller losses of KD, FitNet, AT, SP, CC, VID, RKD, PKT and CRD against values worked out by
hand on tiny tensors, and the properties each loss must have."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from distiller_zoo import (
    PKT,
    Attention,
    ContrastLoss,
    ContrastMemory,
    ConvReg,
    Correlation,
    CRDLoss,
    DistillKL,
    HintLoss,
    PairError,
    RKDLoss,
    Similarity,
    VIDLoss,
)

SQRT2 = math.sqrt(2.0)


def scalar(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# KD


def test_distill_kl_by_hand() -> None:
    # Row 0 at T = 2: teacher (2 ln 3, 0) / 2 -> p_t = (3/4, 1/4); student 0 -> p_s = (1/2, 1/2).
    # Row 1: equal logits, KL 0. Loss = T^2 * (KL_0 + 0) / B.
    y_t = torch.tensor([[2 * math.log(3.0), 0.0], [1.0, -1.0]])
    y_s = torch.tensor([[0.0, 0.0], [1.0, -1.0]])
    kl_0 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812
    assert_close(DistillKL(2)(y_s, y_t), scalar(4 * kl_0 / 2))


def test_distill_kl_zero_for_equal_logits() -> None:
    y = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    assert_close(DistillKL(4)(y, y.clone()), scalar(0.0), atol=1e-6, rtol=0)


@pytest.mark.parametrize("T", [1.0, 4.0, 10.0])
def test_distill_kl_is_t_squared_times_tempered_kl(T: float) -> None:
    g = torch.Generator().manual_seed(1)
    y_s, y_t = torch.randn(3, 7, generator=g), 3 * torch.randn(3, 7, generator=g)
    # Softmax written out, independent of the library call.
    p_t = torch.exp(y_t / T) / torch.exp(y_t / T).sum(1, keepdim=True)
    p_s = torch.exp(y_s / T) / torch.exp(y_s / T).sum(1, keepdim=True)
    kl_per_row = (p_t * (p_t.log() - p_s.log())).sum(1)
    assert_close(DistillKL(T)(y_s, y_t), T**2 * kl_per_row.mean())


def test_distill_kl_keeps_its_scale_at_high_temperature() -> None:
    # Hinton et al. section 2.1: for T >> logits, T^2 KL -> (1 / 2C) sum_c (d_c - mean d)^2 with
    # d = z_s - z_t. Without the T^2 factor the loss would be ~1e-6 of this.
    g = torch.Generator().manual_seed(2)
    y_s, y_t = torch.randn(4, 5, generator=g), torch.randn(4, 5, generator=g)
    d = y_s - y_t
    limit = ((d - d.mean(1, keepdim=True)) ** 2).sum(1).mean() / (2 * 5)
    assert_close(DistillKL(1000.0)(y_s, y_t), limit, rtol=1e-2, atol=0)


def test_distill_kl_bf16_inputs_computed_in_float32() -> None:
    g = torch.Generator().manual_seed(3)
    y_s, y_t = torch.randn(4, 100, generator=g).bfloat16(), torch.randn(4, 100, generator=g).bfloat16()
    loss = DistillKL(4)(y_s, y_t)
    assert loss.dtype == torch.float32
    assert_close(loss, DistillKL(4)(y_s.float(), y_t.float()))


# ---------------------------------------------------------------------------------------------------------
# FitNet


def test_hint_loss_by_hand() -> None:
    f_s = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    assert_close(HintLoss()(f_s, torch.zeros_like(f_s)), scalar((1 + 4 + 9 + 16) / 4))


@pytest.mark.parametrize(
    ("s_shape", "t_shape", "layer", "kernel"),
    [
        ((16, 8, 8), (32, 8, 8), nn.Conv2d, (1, 1)),  # equal size: 1x1 conv
        ((16, 16, 16), (32, 8, 8), nn.Conv2d, (3, 3)),  # s = 2 t: 3x3 stride 2
        ((16, 10, 10), (32, 8, 8), nn.Conv2d, (3, 3)),  # s > t: valid conv, kernel 1 + s - t
        ((16, 8, 8), (32, 16, 16), nn.ConvTranspose2d, (4, 4)),  # t = 2 s: RepDistiller's 4/2/1
        ((16, 4, 4), (8, 12, 12), nn.ConvTranspose2d, (5, 5)),  # t = 3 s: k + 2 (k // 2)
        ((16, 4, 4), (8, 16, 16), nn.ConvTranspose2d, (8, 8)),  # t = 4 s
        ((2, 16, 8, 8), (2, 32, 16, 16), nn.ConvTranspose2d, (4, 4)),  # RepDistiller's (N, C, H, W) shapes
    ],
)
def test_conv_reg_maps_student_to_teacher_shape(s_shape, t_shape, layer, kernel) -> None:
    reg = ConvReg(s_shape, t_shape)
    assert type(reg.conv) is layer and reg.conv.kernel_size == kernel
    out = reg(torch.randn(3, *s_shape[-3:]))
    assert out.shape == (3, *t_shape[-3:])


def test_conv_reg_transposed_layer_is_repdistillers_at_factor_two() -> None:
    conv = ConvReg((16, 8, 8), (32, 16, 16)).conv
    assert (conv.stride, conv.padding, tuple(conv.weight.shape)) == ((2, 2), (1, 1), (16, 32, 4, 4))


@pytest.mark.parametrize(("s_shape", "t_shape"), [((16, 4, 4), (8, 10, 10)), ((16, 4, 4), (8, 8, 12)), ((16,), (8,))])
def test_conv_reg_refuses_unmatchable_sizes(s_shape, t_shape) -> None:
    with pytest.raises(PairError, match=r"\(16"):
        ConvReg(s_shape, t_shape)
    assert issubclass(PairError, ValueError)


def test_conv_reg_relu_is_optional() -> None:
    x = torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    assert (ConvReg((4, 6, 6), (5, 6, 6))(x) >= 0).all()
    # BatchNorm in train mode centres each channel, so without the ReLU about half the values are negative.
    assert (ConvReg((4, 6, 6), (5, 6, 6), use_relu=False)(x) < 0).float().mean() > 0.3


# ---------------------------------------------------------------------------------------------------------
# AT


def test_attention_by_hand() -> None:
    # Student: both channels (1, 1) -> channel mean of squares (1, 1) -> normalised (1/sqrt2, 1/sqrt2).
    # Teacher: channels (2, 0) and (0, 0) -> (2, 0) -> (1, 0). Mean over 2 positions of squared gaps.
    f_s = torch.ones(1, 2, 1, 2)
    f_t = torch.tensor([[[[2.0, 0.0]], [[0.0, 0.0]]]])
    expected = ((1 / SQRT2 - 1) ** 2 + (1 / SQRT2) ** 2) / 2
    losses = Attention()([f_s], [f_t])
    assert len(losses) == 1
    assert_close(losses[0], scalar(expected))


def test_attention_pools_the_larger_map_and_zips_the_shorter_list() -> None:
    # Student 2x4 pooled to the teacher's 1x2: (1, 3) -> squares (1, 9); teacher (3, 1) -> (9, 1).
    # Normalised gap (-8, 8) / sqrt(82); mean of squares 64 / 82.
    f_s = torch.tensor([[1.0, 1.0, 3.0, 3.0], [1.0, 1.0, 3.0, 3.0]]).view(1, 1, 2, 4)
    f_t = torch.tensor([3.0, 1.0]).view(1, 1, 1, 2)
    losses = Attention()([f_s, f_s, f_s], [f_t, f_t])
    assert len(losses) == 2
    assert_close(losses[0], scalar(64 / 82))
    assert_close(Attention()([f_t], [f_s])[0], scalar(64 / 82))  # teacher side pooled too


# ---------------------------------------------------------------------------------------------------------
# SP


def test_similarity_by_hand() -> None:
    # Student rows orthogonal: G_s = I. Teacher rows equal: G_t rows (1, 1) / sqrt2.
    # Per row: (1/sqrt2 - 1)^2 + 1/2 = 2 - sqrt2; two rows; divided by B^2 = 4.
    f_s = torch.eye(2).view(2, 2, 1, 1)
    f_t = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 2, 1, 1)
    losses = Similarity()([f_s], [f_t])
    assert len(losses) == 1
    assert_close(losses[0], scalar(2 * (2 - SQRT2) / 4))


def test_similarity_zero_for_equal_features_and_invariant_to_scale() -> None:
    f = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    assert_close(Similarity()([f], [f.clone()])[0], scalar(0.0), atol=1e-7, rtol=0)
    # Row normalisation of the Gram matrix removes a global scale of the features.
    assert_close(Similarity()([f], [5 * f])[0], scalar(0.0), atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------------------
# CC


def test_correlation_by_hand() -> None:
    # delta = |f_s|: <(1,2), (3,4)> = 11 and <(3,4), (0,0)> = 0; mean 5.5.
    f_s = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    assert_close(Correlation()(f_s, torch.zeros_like(f_s)), scalar(5.5))
    assert_close(Correlation()(-f_s, torch.zeros_like(f_s)), scalar(5.5))  # absolute gaps


def test_correlation_zero_for_equal_embeddings() -> None:
    e = torch.randn(5, 8, generator=torch.Generator().manual_seed(6))
    assert_close(Correlation()(e, e.clone()), scalar(0.0))


# ---------------------------------------------------------------------------------------------------------
# VID


def test_vid_initial_variance_is_init_pred_var() -> None:
    vid = VIDLoss(3, 4, 5, init_pred_var=5.0, eps=1e-5)
    assert_close(F.softplus(vid.log_scale) + 1e-5, torch.full((5,), 5.0))


def test_vid_by_hand() -> None:
    # All 1x1 weights 1 on one channel: the regressor is relu(relu(x)) = x for x > 0, variance 5.
    # Elements 1 and 2 against target 0: mean of 0.5 (x^2 / 5 + ln 5) = 0.25 + 0.5 ln 5.
    vid = VIDLoss(1, 1, 1)
    for conv in vid.regressor[::2]:
        nn.init.ones_(conv.weight)
    x = torch.tensor([1.0, 2.0]).view(1, 1, 1, 2)
    assert_close(vid(x, torch.zeros_like(x)), scalar(0.25 + 0.5 * math.log(5.0)))


def test_vid_pools_the_larger_map() -> None:
    vid = VIDLoss(1, 1, 1)
    for conv in vid.regressor[::2]:
        nn.init.ones_(conv.weight)
    # Student 2x4 of (1, 1, 2, 2) pools to (1, 2): same as the hand case above.
    x = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0]]).view(1, 1, 2, 4)
    assert_close(vid(x, torch.zeros(1, 1, 1, 2)), scalar(0.25 + 0.5 * math.log(5.0)))


# ---------------------------------------------------------------------------------------------------------
# RKD


def smooth_l1(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x.abs() < 1, 0.5 * x**2, x.abs() - 0.5)


def test_rkd_angle_term_by_hand() -> None:
    # Student collinear (0,0), (1,0), (2,0): cos at vertex 0 (between 1 and 2) = 1, at 1 = -1, at 2 = 1.
    # Teacher right isosceles (0,0), (1,0), (0,1): cos 0 at vertex 0, sqrt2/2 at vertices 1 and 2.
    # Only the 6 triples with b != c, both != a, differ: gaps 1, -1 - sqrt2/2, 1 - sqrt2/2, twice each;
    # Smooth-L1: 0.5, 1.5 + sqrt2/2 - 0.5 = 1 + sqrt2/2, (1 - sqrt2/2)^2 / 2 -> sum 2 * 1.75 = 3.5 over 27.
    f_s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    f_t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert_close(RKDLoss(w_d=0, w_a=1)(f_s, f_t), scalar(3.5 / 27))


def test_rkd_distance_term_by_hand() -> None:
    # Student distances d01 = 1, d02 = 2, d12 = 1, mean 4/3; teacher 1, 1, sqrt2, mean (2 + sqrt2)/3.
    f_s = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    f_t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    s = torch.tensor([1.0, 2.0, 1.0]) / (4 / 3)
    t = torch.tensor([1.0, 1.0, SQRT2]) / ((2 + SQRT2) / 3)
    expected = 2 * smooth_l1(s - t).sum() / 9  # each pair twice in the 3x3 matrix, zero diagonal
    assert_close(RKDLoss(w_d=1, w_a=0)(f_s, f_t), expected)
    assert_close(RKDLoss()(f_s, f_t), 25 * expected + 50 * scalar(3.5 / 27))


def test_rkd_zero_for_equal_or_rescaled_features() -> None:
    f = torch.randn(6, 10, generator=torch.Generator().manual_seed(7))
    assert_close(RKDLoss()(f, f.clone()), scalar(0.0), atol=1e-5, rtol=0)
    # Distances are normalised by their mean and angles are scale free: a scaled and shifted teacher
    # has the same relations.
    assert_close(RKDLoss()(f, 3 * f + 1), scalar(0.0), atol=1e-5, rtol=0)


def rkd_direct(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """RKD from the definitions: explicit difference vectors and their (B, B, B) cosines."""

    def relations(e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        diff = e.unsqueeze(0) - e.unsqueeze(1)  # (B, B, D): diff[a, b] = e_b - e_a
        dist = diff.norm(dim=2)
        dist = dist / dist[dist > 0].mean()
        unit = F.normalize(diff, dim=2)
        return dist, torch.bmm(unit, unit.transpose(1, 2))

    d_s, a_s = relations(f_s)
    with torch.no_grad():
        d_t, a_t = relations(f_t)
    return 25 * smooth_l1(d_s - d_t).mean() + 50 * smooth_l1(a_s - a_t).mean()


def test_rkd_matches_direct_computation_in_value_and_gradient() -> None:
    g = torch.Generator().manual_seed(8)
    # Post-ReLU-like features with a large common component, as pooled CNN features have.
    f_s = (torch.rand(8, 16, generator=g) + 2).requires_grad_()
    f_t = torch.rand(8, 32, generator=g) + 5
    loss = RKDLoss()(f_s, f_t)
    (grad,) = torch.autograd.grad(loss, f_s)
    f_s2 = f_s.detach().clone().requires_grad_()
    ref = rkd_direct(f_s2, f_t)
    (ref_grad,) = torch.autograd.grad(ref, f_s2)
    assert_close(loss, ref, rtol=1e-4, atol=1e-6)
    assert_close(grad, ref_grad, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------
# PKT


def test_pkt_by_hand() -> None:
    # Student rows orthogonal: (cos + 1) / 2 = [[1, .5], [.5, 1]] -> rows (2/3, 1/3).
    # Teacher rows equal: all ones -> rows (1/2, 1/2).
    # Mean over 4 entries of P_t ln(P_t / P_s) = 2 * (0.5 ln(3/4) + 0.5 ln(3/2)) / 4 = ln(9/8) / 4.
    f_s = torch.eye(2)
    f_t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert_close(PKT()(f_s, f_t), scalar(math.log(9 / 8) / 4), rtol=1e-5, atol=1e-6)


def test_pkt_zero_for_equal_features() -> None:
    f = torch.randn(6, 10, generator=torch.Generator().manual_seed(9))
    assert_close(PKT()(f, f.clone()), scalar(0.0))


# ---------------------------------------------------------------------------------------------------------
# CRD


def test_contrast_loss_by_hand() -> None:
    # N = 4, K = 2: m Pn = 2/4 = 1/2.
    # Row 0 (0.5, 0.5, 1.5): ln(.5/1) + ln(.5/1) + ln(.5/2). Row 1 (1.5, .5, .5): ln(1.5/2) + 2 ln(.5/1).
    x = torch.tensor([[0.5, 0.5, 1.5], [1.5, 0.5, 0.5]])
    row_0 = 2 * math.log(0.5) + math.log(0.25)
    row_1 = math.log(0.75) + 2 * math.log(0.5)
    expected = scalar(-(row_0 + row_1) / 2)
    assert_close(ContrastLoss(4)(x), expected)
    assert_close(ContrastLoss(4)(x.unsqueeze(2)), expected)  # RepDistiller's (B, K+1, 1)


def unit_memory(path: str = "auto") -> ContrastMemory:
    """N = 4 rows e1, e2, -e1, -e2 in both banks, D = 2, K = 2, T = 0.5, momentum 0.5."""
    mem = ContrastMemory(2, 4, K=2, T=0.5, momentum=0.5, path=path)
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    mem.memory_s.copy_(rows)
    mem.memory_t.copy_(rows)
    return mem


@pytest.mark.parametrize("path", ["gather", "matmul"])
def test_contrast_memory_scores_and_update_by_hand(path: str) -> None:
    mem = unit_memory(path)
    v1 = torch.tensor([[0.6, 0.8]])  # student embedding
    v2 = torch.tensor([[0.0, 1.0]])  # teacher embedding
    y, idx = torch.tensor([0]), torch.tensor([[0, 1, 2]])
    out_s, out_t = mem(v1, v2, y, idx)
    # v1 against teacher rows 0, 1, 2: 0.6, 0.8, -0.6; v2 against student rows: 0, 1, 0. T = 0.5.
    raw_s = torch.tensor([math.exp(1.2), math.exp(1.6), math.exp(-1.2)])
    raw_t = torch.tensor([1.0, math.exp(2.0), 1.0])
    z_s, z_t = 4 * raw_s.mean(), 4 * raw_t.mean()  # N * mean, fixed on this first batch
    assert out_s.shape == (1, 3, 1)
    assert_close(out_s.view(3), raw_s / z_s)
    assert_close(out_t.view(3), raw_t / z_t)
    assert_close(mem.z_s, z_s)
    assert_close(mem.z_t, z_t)
    # Row 0 only: student memory normalise(.5 (1, 0) + .5 (.6, .8)) = (2, 1)/sqrt5; teacher (1, 1)/sqrt2.
    expected_s = torch.tensor([[2 / math.sqrt(5), 1 / math.sqrt(5)], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    expected_t = torch.tensor([[1 / SQRT2, 1 / SQRT2], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert_close(mem.memory_s, expected_s)
    assert_close(mem.memory_t, expected_t)


def test_contrast_memory_z_fixed_after_first_batch() -> None:
    mem = ContrastMemory(8, 20, K=5)
    g = torch.Generator().manual_seed(10)
    v = [F.normalize(torch.randn(3, 8, generator=g), dim=1) for _ in range(4)]
    idx = torch.randint(20, (3, 6), generator=g)
    idx[:, 0] = torch.tensor([1, 2, 3])
    assert mem.z_s.item() == -1 and mem.z_t.item() == -1
    out_s, out_t = mem(v[0], v[1], idx[:, 0], idx)
    # On the first batch the normalised scores average 1/N by construction.
    assert_close(out_s.mean() * 20, scalar(1.0))
    assert_close(out_t.mean() * 20, scalar(1.0))
    z = (mem.z_s.clone(), mem.z_t.clone())
    mem(v[2], v[3], idx[:, 0], idx)
    assert mem.z_s.item() == z[0].item() and mem.z_t.item() == z[1].item()


def test_contrast_memory_update_touches_only_batch_rows_and_keeps_them_unit() -> None:
    mem = ContrastMemory(16, 30, K=4)
    before_s, before_t = mem.memory_s.clone(), mem.memory_t.clone()
    g = torch.Generator().manual_seed(11)
    y = torch.tensor([3, 7, 29])
    v1, v2 = (F.normalize(torch.randn(3, 16, generator=g), dim=1) for _ in range(2))
    mem(v1, v2, y)  # contrast indices drawn inside
    touched = torch.zeros(30, dtype=torch.bool)
    touched[y] = True
    for after, before in ((mem.memory_s, before_s), (mem.memory_t, before_t)):
        assert torch.equal(after[~touched], before[~touched])
        assert_close(after[y].norm(dim=1), torch.ones(3))
        assert not torch.allclose(after[y], before[y])
    assert_close(mem.memory_s[y], F.normalize(0.5 * before_s[y] + 0.5 * v1, dim=1))


def test_contrast_memory_draws_indices_with_the_positive_first() -> None:
    mem = unit_memory()
    v1 = torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    y = torch.tensor([1, 3])
    out_s, _ = mem(v1, v1, y)  # no idx: 2 random rows per sample, y in column 0
    assert out_s.shape == (2, 3, 1)
    # Positives: <e2, (.6, .8)> = .8 and <-e2, (0, 1)> = -1, at T = 0.5, divided by Z_s.
    expected = torch.tensor([math.exp(1.6), math.exp(-2.0)]) / mem.z_s
    assert_close(out_s[:, 0, 0], expected)


def test_contrast_memory_refuses_wrong_number_of_contrast_indices() -> None:
    with pytest.raises(ValueError, match="K\\+1"):
        unit_memory()(torch.ones(1, 2), torch.ones(1, 2), torch.tensor([0]), torch.tensor([[0, 1, 2, 3]]))


def crd_inputs(seed: int, n_data: int = 50, k: int = 20, bsz: int = 4):
    g = torch.Generator().manual_seed(seed)
    f_s, f_t = torch.randn(bsz, 12, generator=g), torch.randn(bsz, 24, generator=g)
    idx = torch.randperm(n_data, generator=g)[:bsz]
    contrast_idx = torch.randint(n_data, (bsz, k + 1), generator=g)
    contrast_idx[:, 0] = idx
    return f_s, f_t, idx, contrast_idx


def test_crd_gather_and_matmul_paths_agree() -> None:
    torch.manual_seed(12)
    base = CRDLoss(12, 24, n_data=50, feat_dim=8, nce_k=20)
    results = {}
    for path in ("gather", "matmul", "auto"):  # auto: B (K+1) = 84 > N = 50 -> matmul
        crd = copy.deepcopy(base)
        crd.contrast.path = path
        losses = []
        # Two batches, the second after the memory update and with Z fixed; one backward over both
        # (as with gradient accumulation), which must not trip over the in-place memory update.
        for seed in (0, 1):
            f_s, f_t, idx, contrast_idx = crd_inputs(seed)
            losses.append(crd(f_s, f_t, idx, contrast_idx))
        sum(losses).backward()
        grads = [p.grad.clone() for p in crd.parameters()]
        results[path] = (torch.stack(losses), grads, crd.contrast.memory_s.clone(), crd.contrast.memory_t.clone())
    for path in ("matmul", "auto"):
        losses, grads, mem_s, mem_t = results[path]
        assert_close(losses, results["gather"][0])
        for grad, ref in zip(grads, results["gather"][1]):
            assert_close(grad, ref)
        assert_close(mem_s, results["gather"][2])
        assert_close(mem_t, results["gather"][3])


def test_crd_loss_falls_when_student_embedding_moves_to_its_positive() -> None:
    torch.manual_seed(13)
    crd = CRDLoss(8, 24, n_data=50, feat_dim=8, nce_k=20)
    with torch.no_grad():  # identity student embedding: e_s = normalise(f_s)
        crd.embed_s.linear.weight.copy_(torch.eye(8))
        crd.embed_s.linear.bias.zero_()
    f_s, f_t, idx, contrast_idx = crd_inputs(14)
    f_s = f_s[:, :8]
    crd(f_s, f_t, idx, contrast_idx)  # first batch fixes Z
    f_s, f_t, idx, contrast_idx = crd_inputs(15)
    f_s = f_s[:, :8]
    positive = crd.contrast.memory_t[idx]  # (B, 8): the teacher memory rows scored as positives

    def loss_at(x: torch.Tensor) -> float:
        return copy.deepcopy(crd)(x, f_t, idx, contrast_idx).item()

    start = F.normalize(f_s, dim=1)
    target = F.normalize(positive, dim=1)
    losses = [loss_at(start + t * (target - start)) for t in (0.0, 0.5, 1.0)]
    assert losses[0] > losses[1] > losses[2]


def test_crd_gradients_reach_both_embeddings_not_the_memory() -> None:
    torch.manual_seed(16)
    crd = CRDLoss(12, 24, n_data=50, feat_dim=8, nce_k=20)
    f_s, f_t, idx, contrast_idx = crd_inputs(17)
    f_s.requires_grad_()
    loss = crd(f_s, f_t, idx, contrast_idx)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert f_s.grad is not None and f_s.grad.abs().sum() > 0
    for p in crd.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert not any(b.requires_grad for b in crd.buffers())


def test_crd_state_dict_holds_memory_and_constants() -> None:
    crd = CRDLoss(12, 24, n_data=50, feat_dim=8, nce_k=20)
    keys = set(crd.state_dict())
    assert {"contrast.memory_s", "contrast.memory_t", "contrast.z_s", "contrast.z_t"} <= keys
    assert crd.contrast.memory_s.shape == (50, 8)
    stdv = 1 / math.sqrt(8 / 3)
    assert crd.contrast.memory_s.abs().max() <= stdv and crd.contrast.memory_t.abs().max() <= stdv


def test_crd_takes_repdistiller_options_in_their_order() -> None:
    crd = CRDLoss(12, 24, 50, 8, 20, 0.1, 0.9)  # s_dim, t_dim, n_data, feat_dim, nce_k, nce_t, nce_m
    assert crd.embed_s.linear.weight.shape == (8, 12) and crd.embed_t.linear.weight.shape == (8, 24)
    assert (crd.contrast.K, crd.contrast.T, crd.contrast.momentum) == (20, 0.1, 0.9)
    assert crd.contrast.memory_t.shape == (50, 8)
