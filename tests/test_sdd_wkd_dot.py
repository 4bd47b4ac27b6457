"""SDD (SD-KD, SD-DKD), WKD-L and the DOT optimizer: values computed by hand on tiny tensors (``math`` on Python
floats), properties that fail when the formula is wrong, WKD-L's cost cache, and one tiny CLI run of each on the
shared teacher. The registry-wide build/backward check on the benchmark's pairs is ``tests/test_methods.py``."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import distiller_zoo.WKD as wkd
import models
from dataset import DeviceLoader
from dataset.batch import Batch
from distiller_zoo import DistillKL, get_method
from distiller_zoo.base import default_args
from distiller_zoo.DKD import dkd_loss
from distiller_zoo.DOT import DistillationOrientedTrainer
from distiller_zoo.SDD import complementary_weights, kd_rows, parse_scales, region_logits, sdd_loss
from distiller_zoo.WKD import cka_cost_matrix, non_target, sinkhorn_distance, wkd_logit_loss
from helper.engine import _dot_step, teacher_forward

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def softmax(row: list[float], T: float = 1.0) -> list[float]:
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q))


# ------------------------------------------------------------------------------------------ SDD


def test_region_logits_pool_1x1_2x2_4x4_row_major() -> None:
    fmap = torch.arange(16.0).view(1, 1, 4, 4)  # one channel; an identity classifier shows the pooled values
    head = nn.Linear(1, 1, bias=False)
    nn.init.ones_(head.weight)
    z = region_logits(fmap, head, (1, 2, 4))  # (21, 1, 1)
    # 1x1: mean 7.5; 2x2 blocks: (0,1,4,5) 2.5, (2,3,6,7) 4.5, (8,9,12,13) 10.5, (10,11,14,15) 12.5; 4x4: the map.
    expected = [7.5, 2.5, 4.5, 10.5, 12.5, *range(16)]
    assert z.flatten().tolist() == pytest.approx(expected)
    # An 8x8 map: the 2x2 grid pooled from the 4x4 one equals pooling the map directly (official SPP).
    big = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    lin = nn.Linear(3, 5)
    direct = lin(nn.functional.adaptive_avg_pool2d(big, 2).flatten(2).permute(2, 0, 1))
    torch.testing.assert_close(region_logits(big, lin, (1, 2))[1:], direct)


def test_complementary_weights_by_hand() -> None:
    # 3 regions x 2 samples x 3 classes; targets 0 and 1. Sample 0: global right; region 1 right, region 2
    # wrong -> weights 1, 1, 2. Sample 1: global wrong; region 1 right, region 2 wrong -> 1, 2, 1.
    z_t = torch.tensor([[[5.0, 0, 0], [5.0, 0, 0]], [[5.0, 0, 0], [0, 5.0, 0]], [[0, 0, 5.0], [0, 0, 5.0]]])
    w = complementary_weights(z_t, torch.tensor([0, 1]))
    assert w.tolist() == [[1.0, 1.0], [1.0, 2.0], [2.0, 1.0]]


def test_sd_kd_by_hand() -> None:
    # 2 regions (global + one local), 1 sample, 3 classes, target 0, T 2. Teacher: global right, local wrong.
    z_s = [[[1.0, 2.0, 0.0]], [[0.0, 1.0, 1.0]]]
    z_t = [[[3.0, 1.0, 0.0]], [[0.0, 2.0, 1.0]]]
    T = 2.0
    terms = [T**2 * kl(softmax(t[0], T), softmax(s[0], T)) for s, t in zip(z_s, z_t)]
    expected = (1 * terms[0] + 2 * terms[1]) / 2  # weights 1 and 2, divided by N * B = 2
    got = sdd_loss(torch.tensor(z_s), torch.tensor(z_t), torch.tensor([0]), lambda s, t, y: kd_rows(s, t, T))
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_one_scale_is_kd_and_dkd() -> None:
    g = torch.Generator().manual_seed(1)
    z_s, z_t = 3 * torch.randn(1, 6, 10, generator=g), 3 * torch.randn(1, 6, 10, generator=g)
    target = torch.randint(10, (6,), generator=g)
    kd = sdd_loss(z_s, z_t, target, lambda s, t, y: kd_rows(s, t, 4.0))
    torch.testing.assert_close(kd, DistillKL(4.0)(z_s[0], z_t[0]))
    method = get_method("sdd_dkd")([], [], default_args(sdd_scales="1"), 10)
    rows = sdd_loss(z_s, z_t, target, method._rows)
    torch.testing.assert_close(rows, dkd_loss(z_s[0], z_t[0], target, 1.0, 8.0, 4.0))


def test_parse_scales() -> None:
    assert parse_scales("[1,2,4]") == (1, 2, 4) and parse_scales("1,2") == (1, 2)
    for bad in ("2,4", "1,3", "1,1", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="sdd_scales"):
            parse_scales(bad)


@pytest.mark.parametrize("arch", ["resnet8", "wrn_16_1", "MobileNetV2", "ShuffleV2", "vgg8"])
def test_global_region_is_the_models_own_logits(arch: str) -> None:
    # Through the pre_pool hooks the 1x1 region is the classifier on the pooled map: the model's logits.
    torch.manual_seed(0)
    student, teacher = models.create_model(arch).train(), models.create_model("resnet8").eval()
    method = get_method("sdd_kd")([], [], default_args(), 10)
    with pytest.raises(RuntimeError, match="bind_student"):
        method.regions()
    method.bind_teacher(teacher)
    method.bind_student(student)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out_s = student(x, is_feat=True)
    out_t = teacher_forward(teacher, x, False)
    z_s, z_t = method.regions()
    assert z_s.shape == (21, 4, 100) and z_t.shape == (21, 4, 100)
    torch.testing.assert_close(z_s[0], out_s.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_t[0], out_t.logits, rtol=1e-5, atol=1e-5)
    loss = method(out_s, out_t, Batch(x, torch.arange(4), torch.arange(4)))
    loss.backward()
    assert student.pre_pool is not None and next(student.parameters()).grad.abs().sum() > 0


def test_sd_dkd_warmup() -> None:
    method = get_method("sdd_dkd")([], [], default_args(), 10)
    method.set_epoch(5, "main")
    assert method.warmup == pytest.approx(5 / 20)
    method.set_epoch(30, "main")
    assert method.warmup == 1.0


# ------------------------------------------------------------------------------------------ WKD-L


def test_non_target_classes() -> None:
    assert non_target(torch.tensor([0, 2, 3]), 4).tolist() == [[1, 2, 3], [0, 1, 3], [0, 1, 2]]


def test_sinkhorn_by_hand() -> None:
    p_s, p_t = [0.7, 0.2, 0.1], [0.2, 0.3, 0.5]
    cost = [[0.0, 0.4, 0.9], [0.4, 0.0, 0.3], [0.9, 0.3, 0.0]]
    reg, iters = 0.5, 3
    k = [[math.exp(-c / reg) for c in row] for row in cost]
    u = [1 / 3] * 3
    for _ in range(iters):
        v = [p_t[j] / (sum(k[i][j] * u[i] for i in range(3)) + 1e-8) for j in range(3)]
        u = [p_s[i] / (sum(k[i][j] * v[j] for j in range(3)) + 1e-8) for i in range(3)]
    expected = sum(u[i] * k[i][j] * v[j] * cost[i][j] for i in range(3) for j in range(3))
    got = sinkhorn_distance(torch.tensor([p_s]), torch.tensor([p_t]), torch.tensor([cost]), reg, iters)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_sinkhorn_approaches_the_transport_cost() -> None:
    # All mass moves from class 0 to class 1 at cost 0.5: the exact distance is 0.5; identical inputs cost ~0.
    cost = torch.tensor([[[0.0, 0.5], [0.5, 0.0]]])
    far = sinkhorn_distance(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]]), cost, 0.05, 50)
    same = sinkhorn_distance(torch.tensor([[0.5, 0.5]]), torch.tensor([[0.5, 0.5]]), cost, 0.05, 50)
    assert far.item() == pytest.approx(0.5, rel=1e-3) and same.item() < 1e-3


def test_wkd_logit_loss_target_term_by_hand() -> None:
    z_s, z_t, y = [1.0, 2.0, 0.5], [3.0, 0.0, 1.0], 0
    expected = -softmax(z_t)[y] * math.log(softmax(z_s)[y])
    cost = torch.rand(3, 3)
    got = wkd_logit_loss(torch.tensor([z_s]), torch.tensor([z_t]), torch.tensor([y]), cost, 8.0, 0.0, 0.05, 10)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_cka_cost_is_zero_for_a_rotated_scaled_copy() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(50, 6, generator=g)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g))
    cost = cka_cost_matrix(torch.stack([x, 3 * x @ q, torch.randn(50, 6, generator=g)]))
    assert cost[0, 1].abs() < 1e-5 and cost.diagonal().abs().max() < 1e-5
    assert cost[0, 2] > 0.5 and torch.allclose(cost, cost.t(), atol=1e-6)


def test_wkd_weight_decays_along_a_half_cosine() -> None:
    method = get_method("wkd_l")([], [], default_args(epochs=240), 10)
    values = []
    for epoch in (1, 150, 195, 240):
        method.set_epoch(epoch, "main")
        values.append(method.weight)
    assert values == pytest.approx([600, 600, 300, 0], abs=1e-9)


def test_wkd_cost_is_cached_per_teacher_and_equals_a_recomputation(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    teacher = models.create_model("resnet8").eval()
    ckpt = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, ckpt)
    images = torch.randint(256, (200, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    loader = DeviceLoader(images, torch.arange(200) % 100, 64, "cpu", train=True)
    method = get_method("wkd_l")([], [], default_args(path_t=str(ckpt)), 200)
    method.prepare(teacher, loader, tmp_path)
    (cached,) = tmp_path.glob("wkd_cost_*_n200.pt")
    assert wkd.file_sha256(ckpt)[:16] in cached.name
    first = method.cost.clone()
    assert first.shape == (100, 100) and first.diagonal().abs().max() < 1e-5 and first.max() > 0.01

    def no_recompute(feats):
        raise AssertionError("the cached matrix should have been read")

    monkeypatch.setattr(wkd, "cka_cost_matrix", no_recompute)
    again = get_method("wkd_l")([], [], default_args(path_t=str(ckpt)), 200)
    again.prepare(teacher, loader, tmp_path)
    torch.testing.assert_close(again.cost, first)
    monkeypatch.undo()
    plain = DeviceLoader(images, torch.arange(200) % 100, 64, "cpu", train=False)
    fresh = wkd.cka_cost_matrix(wkd.class_features(teacher, plain))
    torch.testing.assert_close(again.cost, 1 - torch.exp(-fresh))  # sharpened with 1.0


# ------------------------------------------------------------------------------------------ DOT


def test_dot_two_steps_by_hand() -> None:
    # One weight reached by both losses, one only by the distillation loss; lr 0.1, m_task 0.8, m_kd 1.0, wd 0.1.
    w, a = nn.Parameter(torch.tensor(1.0)), nn.Parameter(torch.tensor(2.0))
    opt = DistillationOrientedTrainer([w, a], lr=0.1, momentum=0.8, momentum_kd=1.0, weight_decay=0.1)
    bw_t = bw_k = ba_k = None
    pw, pa = 1.0, 2.0
    for _ in range(2):
        terms = {"ce": (1.0, (w - 3) ** 2), "kd": (1.0, 2 * w + a**2)}
        _dot_step(terms, opt)
        g_t, g_kw, g_ka = 2 * (pw - 3) + 0.1 * pw, 2.0, 2 * pa
        bw_t = g_t if bw_t is None else 0.8 * bw_t + g_t
        bw_k = g_kw if bw_k is None else 1.0 * bw_k + g_kw
        # Only the distillation loss reaches a: the mean momentum 0.9, its own weight decay (not at the first step).
        ba_k = g_ka if ba_k is None else 0.9 * ba_k + g_ka + 0.1 * pa
        pw, pa = pw - 0.1 * (bw_t + bw_k), pa - 0.1 * ba_k
        assert (w.item(), a.item()) == pytest.approx((pw, pa), rel=1e-6)


def test_dot_with_equal_momenta_is_sgd() -> None:
    torch.manual_seed(0)
    net = nn.Linear(4, 3)
    twin = nn.Linear(4, 3)
    twin.load_state_dict(net.state_dict())
    dot = DistillationOrientedTrainer(net.parameters(), lr=0.1, momentum=0.9, momentum_kd=0.9, weight_decay=5e-4)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(8, 4, generator=g), torch.randint(3, (8,), generator=g)
        ce, kd = (lambda z: (nn.functional.cross_entropy(z, y), z.square().mean()))(net(x))
        _dot_step({"ce": (1.0, ce), "kd": (1.0, kd)}, dot)
        z = twin(x)
        sgd.zero_grad()
        (nn.functional.cross_entropy(z, y) + z.square().mean()).backward()
        sgd.step()
    # Weight decay once per step in both; the buffers add up to SGD's (linear in the gradients).
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q)


def test_dot_refuses_fp16() -> None:
    from helper.options import UsageError, student_parser, validate_student_args

    args = student_parser().parse_args(["--path_t", "x.pth", "--model_s", "resnet8", "--dot", "--amp", "fp16"])
    with pytest.raises(UsageError, match="--dot"):
        validate_student_args(args)


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize(
    "flags",
    ["--distill sdd_kd -r 0.1 -a 0 -b 0.9 --sdd_scales 1,2", "--distill sdd_dkd -r 1 -a 0 -b 1 --dkd_beta 2",
     "--distill wkd_l -r 1 -a 0 -b 1", "--distill kd -r 0.1 -a 0.9 -b 0 --dot"],
)  # fmt: skip
def test_tiny_cli_run(flags: str, tmp_path: Path) -> None:
    from shared_paths import teacher as shared_teacher
    from test_cli import SMALL, only_folder, run

    teacher = shared_teacher("resnet56")  # the trained one from ../shared, else a random-init one
    argv = ["--path_t", str(teacher), "--model_s", "resnet20", *flags.split(), "--trial", "1", *SMALL]
    run("train_student.py", *argv, "--save_dir", str(tmp_path), cwd=tmp_path)
    folder = only_folder(tmp_path / "student_model")
    (line,) = (folder / "metrics.jsonl").read_text().splitlines()
    metrics = json.loads(line)
    name = flags.split()[1]
    term = f"loss_{name}" if name != "kd" else "loss_kd"
    assert math.isfinite(metrics[term]) and metrics[term] > 0
    if name == "wkd_l":
        assert len(list(folder.glob("wkd_cost_*_n100.pt"))) == 1
    if "--dot" in flags:
        assert folder.name.endswith("_dot")
