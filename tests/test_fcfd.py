"""FCFD (distiller_zoo/FCFD.py) against hand computations, and the models' ``forward_from`` against ``forward``."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from test_cli import SMALL, only_folder, repdistiller_teacher, run  # noqa: F401 (a fixture)
from test_scripts import commands, flag, run_script
from torch import nn

import models
from common.errors import UsageError
from distiller_zoo import PairError, get_method
from distiller_zoo.base import default_args
from distiller_zoo.FCFD import batch_statistics, candidate_paths
from helper import published

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

RESNETS = [n for n in models.model_names() if callable(getattr(models.create_model(n), "forward_from", None))]


def test_resnets_have_forward_from_and_others_are_refused() -> None:
    assert set(RESNETS) == {n for n in models.model_names() if n.startswith("resnet")}
    cls = get_method("fcfd")
    with pytest.raises(PairError, match=r"^fcfd: the student \(VGG\) has no forward_from.*CIFAR ResNets"):
        cls.check_models(models.create_model("vgg8"), models.create_model("resnet56"), default_args())


@pytest.mark.parametrize("name", ["resnet8", "resnet8x4"])
def test_forward_from_is_the_rest_of_forward(name: str) -> None:
    torch.manual_seed(0)
    model = models.create_model(name).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = model(x, is_feat=True)
        for start in range(4):
            out = model.forward_from(feats[start], start, is_feat=True)
            torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)
            for got, want in zip(out.feats, feats[start + 1 :]):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
            assert len(out.feats) == len(feats) - start - 1
        with pytest.raises(ValueError, match="0..3"):
            model.forward_from(feats[0], 4)
    assert list(model.state_dict()) == keys  # parameter-free: the checkpoint format is unchanged


def test_candidate_paths_follow_the_official_lists() -> None:
    # Official MetaModel._create_candidate_path, 4 stages: [0,0,1,1], [0,0,0,1], [1,1,0,0], [1,1,1,0].
    assert candidate_paths(4, "bi") == [("t2s", 1), ("t2s", 2), ("s2t", 1), ("s2t", 2)]
    assert candidate_paths(5, "s2t") == [("s2t", 1), ("s2t", 2), ("s2t", 3)]
    assert candidate_paths(4, "nomix") == []


def test_batch_statistics_normalises_by_the_batch_and_keeps_running_stats() -> None:
    bn = nn.BatchNorm2d(3).eval()
    bn.running_mean.fill_(5.0)
    x = torch.randn(4, 3, 2, 2) * 3 + 1
    with batch_statistics([bn]):
        y = bn(x)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps))
    assert not bn.training and bn.track_running_stats and bn.running_mean.eq(5.0).all()
    assert bn.num_batches_tracked.item() == 0


def build(s_name: str = "resnet8", t_name: str = "resnet14", **overrides):
    torch.manual_seed(0)
    student, teacher = models.create_model(s_name), models.create_model(t_name).eval().requires_grad_(False)
    args = default_args(kd_T=4.0, **overrides)
    s_shapes, t_shapes = models.feature_shapes(student), models.feature_shapes(teacher)
    cls = get_method("fcfd")
    cls.check_pair(s_shapes, t_shapes, args)
    method = cls(s_shapes, t_shapes, args, 100)
    method.bind_teacher(teacher)
    method.bind_student(student)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_t = teacher(x, is_feat=True)
    return method, student.train(), teacher, student(x, is_feat=True), out_t


def bridge_by_hand(bridge: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    conv, bn, _ = bridge
    y = F.conv2d(x, conv.weight, conv.bias, padding=1)
    y = F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    return F.leaky_relu(y, 0.1)


def kl(z_s: torch.Tensor, z_t: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    p_t = F.softmax(z_t / T, dim=1)
    return (p_t * (p_t.log() - F.log_softmax(z_s / T, dim=1))).sum(1).mean() * T * T


def test_loss_equals_a_hand_computation_of_appearance_function_and_mixed_kl() -> None:
    method, student, teacher, out_s, out_t = build()
    f_s, f_t, z_t = out_s.feats, out_t.feats, out_t.logits
    b = {s: bridge_by_hand(method.s2t[s - 1], f_s[s]) for s in (1, 2, 3)}
    t_batch = copy.deepcopy(teacher).train()  # the teacher's later stages on batch statistics
    s2 = t_batch.layer3(t_batch.layer2(b[1]))  # s2t after stage 1: teacher stages 2 and 3
    mid = t_batch.layer2(b[1])
    pool = lambda m: m.relu().mean(dim=(2, 3))  # noqa: E731
    l2 = F.mse_loss(b[1], f_t[1]) + F.mse_loss(b[2], f_t[2]) + F.mse_loss(mid, f_t[2])
    l2 = l2 + F.mse_loss(b[3], f_t[3]) + F.mse_loss(s2, f_t[3])
    l2 = l2 + F.mse_loss(pool(b[3]), pool(f_t[3])) + F.mse_loss(pool(s2), pool(f_t[3]))
    s_batch = copy.deepcopy(student).train()
    t2s = s_batch.layer3(bridge_by_hand(method.t2s[1], f_t[2]))  # t2s after stage 2: the student's stage 3
    z_s2t, z_t2s = t_batch.fc(s2.mean(dim=(2, 3))), s_batch.fc(t2s.mean(dim=(2, 3)))
    method.set_epoch(5, "main")  # warm-up 5 / 20 on the L2 terms only
    expected = 5.0 * 0.25 * l2 + 1.0 * (kl(z_s2t, z_t) + kl(z_t2s, z_t))
    got = method.loss(f_s, f_t, z_t, [("s2t", 1), ("t2s", 2)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_mixed_paths_leave_running_stats_and_teacher_alone() -> None:
    method, student, teacher, out_s, out_t = build()
    stats = {k: v.clone() for k, v in student.state_dict().items() if "running" in k or "num_batches" in k}
    loss = method.loss(out_s.feats, out_t.feats, out_t.logits, candidate_paths(4, "bi"))
    loss.backward()
    for k, v in student.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert student.layer3[0].conv1.weight.grad.abs().sum() > 0


def test_running_teacher_bn_uses_the_eval_teacher() -> None:
    method, student, teacher, out_s, out_t = build(fcfd_teacher_bn="running", fcfd_l2_weight=0.0)
    bridged = method.s2t[1](out_s.feats[2])
    with torch.no_grad():
        expected = kl(teacher.forward_from(bridged, 2), out_t.logits)
        got = method.loss(out_s.feats, out_t.feats, out_t.logits, [("s2t", 2)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_sampled_paths_are_distinct_candidates_and_seeded() -> None:
    method = build()[0]
    random.seed(3)
    first = [tuple(method.sample_paths()) for _ in range(20)]
    random.seed(3)
    assert first == [tuple(method.sample_paths()) for _ in range(20)]
    assert all(len(set(p)) == 2 and set(p) <= set(method.candidates) for p in first)
    assert len(set(first)) > 1


@pytest.mark.parametrize(
    ("overrides", "pattern", "error", "check"),
    [
        ({"fcfd_paths": 5}, r"--fcfd_paths 5 must be in 0..4", PairError, "pair"),
        ({"fcfd_direction": "s2t", "fcfd_paths": 3}, r"--fcfd_paths 3 must be in 0..2", PairError, "pair"),
        ({"fcfd_l2_weight": -1.0}, r"--fcfd_l2_weight must be >= 0", UsageError, "flags"),
        ({"fcfd_warmup": float("nan")}, r"--fcfd_warmup must be >= 0", UsageError, "flags"),
    ],
)
def test_bad_flags_are_refused_in_one_line(overrides: dict, pattern: str, error: type, check: str) -> None:
    """Flag values are the method's validation; the paths a pair's stages allow are its pair check."""
    shapes, args = models.feature_shapes(models.create_model("resnet8")), default_args(**overrides)
    with pytest.raises(error, match=pattern) as err:
        if check == "pair":
            get_method("fcfd").check_pair(shapes, shapes, args)
        else:
            get_method("fcfd").validate(args)
    assert "\n" not in str(err.value)


def test_script_runs_fcfd_on_the_cifar_resnet_pairs_with_the_official_configs() -> None:
    cmds = commands(run_script("run_cifar_newer.sh", "fcfd", DRY_RUN="1"))
    got = {(flag(c, "--path_t").split("/")[-2], flag(c, "--model_s")): c for c in cmds}
    assert set(got) == {("resnet56_vanilla", "resnet20"), ("resnet32x4_vanilla", "resnet8x4")}
    # LiuDongyang6/FCFD experiments/cifar: weight_l2 0.02 (resnet20-resnet56.yaml) and 5; T 4; lr 0.05.
    assert flag(got["resnet56_vanilla", "resnet20"], "--fcfd_l2_weight") == "0.02"
    assert flag(got["resnet32x4_vanilla", "resnet8x4"], "--fcfd_l2_weight") == "5"
    for c in got.values():
        assert [flag(c, f) for f in ("-r", "-a", "-b", "--kd_T", "--learning_rate")] == ["1", "1", "1", "4", "0.05"]
    assert published.lookup("resnet32x4", "resnet8x4", "fcfd").acc == 76.62  # 3rd-party: EA-KD's ablation


@pytest.mark.slow
@pytest.mark.long
def test_cli_runs_fcfd_with_a_folded_teacher(repdistiller_teacher, tmp_path):  # noqa: F811
    # The default --fold_teacher_bn folds the engine's teacher; FCFD's own copy keeps its BatchNorms.
    argv = ["--path_t", str(repdistiller_teacher), "--distill", "fcfd", "--model_s", "resnet8x4", *SMALL]
    run("train_student.py", *argv, "--save_dir", str(tmp_path), cwd=tmp_path)
    folder = only_folder(tmp_path / "student_model")
    (main,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert {"loss_ce", "loss_kd", "loss_fcfd"} <= set(main) and main["loss_fcfd"] > 0, main
    assert all(math.isfinite(main[k]) for k in main if k.startswith("loss_"))
