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

# One model per family; VGG and ShuffleV1 also run on from their pre-activation features (their official stages).
FAMILY_MODELS = ["resnet8", "resnet8x4", "ResNet50", "wrn_16_2", "vgg8", "MobileNetV2", "ShuffleV1", "ShuffleV2"]
FROM_PREACT = {"vgg8", "ShuffleV1"}


class Plain(nn.Module):  # a network that is no zoo family
    def forward_from(self, x, start, is_feat=False, preact=False):
        return x


def test_every_zoo_model_has_forward_from_and_others_are_refused() -> None:
    assert all(callable(getattr(models.create_model(n), "forward_from", None)) for n in models.model_names())
    cls = get_method("fcfd")
    with pytest.raises(PairError, match=r"^fcfd: the student \(Plain\) has no forward_from.*or no official stage"):
        cls.check_models(Plain(), models.create_model("resnet8"), default_args())


@pytest.mark.parametrize("name", FAMILY_MODELS)
@pytest.mark.parametrize("preact", [False, True])
def test_forward_from_is_the_rest_of_forward(name: str, preact: bool) -> None:
    torch.manual_seed(0)
    model = models.create_model(name).eval()
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = model(x, is_feat=True, preact=preact)
        post = model(x, is_feat=True).feats
        n = len(feats) - 2  # stages
        for start in range(n + 1):
            inputs = [post[start]] + ([feats[start]] if preact and name in FROM_PREACT else [])
            for given in inputs:
                out = model.forward_from(given, start, is_feat=True, preact=preact)
                torch.testing.assert_close(out.logits, logits, rtol=0, atol=0)  # the same operations: exact
                assert len(out.feats) == len(feats) - start - 1
                for got, want in zip(out.feats, feats[start + 1 :]):
                    torch.testing.assert_close(got, want, rtol=0, atol=0)
                torch.testing.assert_close(model.forward_from(given, start), logits, rtol=0, atol=0)
        with pytest.raises(ValueError, match=f"0..{n}"):
            model.forward_from(feats[0], n + 1)
    assert list(model.state_dict()) == keys  # parameter-free: the checkpoint format is unchanged


@pytest.mark.parametrize("name", ["wrn_16_2", "MobileNetV2", "ShuffleV2"])
def test_head_is_the_map_the_classifier_pools(name: str) -> None:
    torch.manual_seed(0)
    model = models.create_model(name).eval()
    seen = []
    model.pre_pool.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 32, 32), is_feat=True).feats
        head, pre = model.head(feats[-2]), model.head(feats[-2], preact=True)
    torch.testing.assert_close(head, seen[0], rtol=0, atol=0)
    torch.testing.assert_close(pre.relu(), head, rtol=0, atol=0)
    assert pre.min() < 0 and head.shape[1] == feats[-1].shape[1]  # the pooled vector's width (1280, 1024)


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


def build(s_name: str = "resnet8", t_name: str = "resnet14", stats: bool = False, **overrides):
    """The method bound to a fresh student and teacher (with ``stats``, the teacher's BatchNorms get non-trivial
    running statistics), and both networks' outputs as the engine asks for them (pre-activation features where
    the method says)."""
    torch.manual_seed(0)
    student, teacher = models.create_model(s_name), models.create_model(t_name).eval().requires_grad_(False)
    for bn in (m for m in teacher.modules() if isinstance(m, nn.BatchNorm2d) and stats):
        bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2.0)
    args = default_args(kd_T=4.0, **overrides)
    s_shapes, t_shapes = models.feature_shapes(student), models.feature_shapes(teacher)
    cls = get_method("fcfd")
    cls.check_pair(s_shapes, t_shapes, args)
    cls.check_models(student, teacher, args)
    method = cls(s_shapes, t_shapes, args, 100)
    method.bind_teacher(teacher)
    method.bind_student(student)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_t = teacher(x, is_feat=True, preact=method.preact)
    return method, student.train(), teacher, student(x, is_feat=True, preact=method.student_preact), out_t


def bridge_by_hand(bridge: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """A bridge between maps of one size: conv3x3, BN on batch statistics, LeakyReLU(0.1) if it has one."""
    conv, bn, act = bridge
    y = F.conv2d(x, conv.weight, conv.bias, padding=1)
    y = F.batch_norm(y, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)
    return F.leaky_relu(y, 0.1) if isinstance(act, nn.LeakyReLU) else y


def batch_bn(bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, None, None, bn.weight, bn.bias, training=True, eps=bn.eps)


def pool(m: torch.Tensor) -> torch.Tensor:
    return m.relu().mean(dim=(2, 3))


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


def test_bridges_and_features_follow_the_official_families() -> None:
    """Official ``build_bridge``: a LeakyReLU only into an "afterrelu" network (resnet8 here), none into
    ShuffleV1/VGG/MobileNetV2 ("beforerelu"); maps of x2 sizes; MobileNetV2's last stage at conv2's 1280 channels;
    the engine asked for pre-activation features of VGG and ShuffleV1 only."""
    method = build("ShuffleV1", "resnet8")[0]
    assert (method.preact, method.student_preact) == (False, True)
    assert all(isinstance(b[2], nn.LeakyReLU) for b in method.s2t) and all(
        isinstance(b[2], nn.Identity) for b in method.t2s
    )
    assert isinstance(method.s2t[0][0], nn.ConvTranspose2d)  # the student's 16x16 map to the teacher's 32x32
    assert method.t2s[0][0].stride == (2, 2) and method.t2s[0][0].bias is not None
    method, _, _, out_s, out_t = build("MobileNetV2", "vgg8")
    assert (method.preact, method.student_preact, method.n_stages, len(method.candidates)) == (True, False, 5, 6)
    assert not any(isinstance(b[2], nn.LeakyReLU) for b in [*method.s2t, *method.t2s])
    conv = method.s2t[-1][0]  # MobileNetV2 2x2 -> vgg8 4x4 at the last stage
    assert isinstance(conv, nn.ConvTranspose2d) and (conv.in_channels, conv.out_channels) == (1280, 512)
    assert out_t.feats[4].min() < 0  # vgg8's block4 before its ReLU
    assert method.stage_features("student", out_s.feats)[4].shape == (6, 1280, 2, 2)


def test_wrn_last_stage_is_the_final_bn_without_a_second_running_update() -> None:
    method, student, teacher, out_s, out_t = build("wrn_16_1", "wrn_16_2", stats=True)
    stats = {k: v.clone() for k, v in student.state_dict().items() if "running" in k}
    f_s, f_t = method.stage_features("student", out_s.feats), method.stage_features("teacher", out_t.feats)
    torch.testing.assert_close(f_s[3], batch_bn(student.bn1, out_s.feats[3]), rtol=0, atol=0)
    torch.testing.assert_close(f_t[3], teacher.bn1(out_t.feats[3]), rtol=0, atol=0)  # eval: running statistics
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in stats.items())
    assert [f.shape for f in f_s] == [f.shape for f in out_s.feats] and f_s[1] is out_s.feats[1]


def test_wrn_loss_equals_a_hand_computation() -> None:
    """wrn_16_2 -> wrn_16_1 (official ``wrn.py``: no LeakyReLU, the last stage through ``bn1``), s2t after stage
    1 and t2s after stage 2."""
    method, student, teacher, out_s, out_t = build("wrn_16_1", "wrn_16_2", stats=True)
    f_s, f_t = method.stage_features("student", out_s.feats), method.stage_features("teacher", out_t.feats)
    b = {s: bridge_by_hand(method.s2t[s - 1], f_s[s]) for s in (1, 2, 3)}
    t = copy.deepcopy(teacher).train()  # batch statistics
    m2 = t.block2(b[1])
    m3 = t.bn1(t.block3(m2))
    l2 = F.mse_loss(b[1], f_t[1]) + F.mse_loss(b[2], f_t[2]) + F.mse_loss(m2, f_t[2])
    l2 = l2 + F.mse_loss(b[3], f_t[3]) + F.mse_loss(m3, f_t[3]) + F.mse_loss(pool(b[3]), pool(f_t[3]))
    l2 = l2 + F.mse_loss(pool(m3), pool(f_t[3]))
    s = copy.deepcopy(student).train()
    z_t2s = s.fc(pool(s.bn1(s.block3(bridge_by_hand(method.t2s[1], f_t[2])))))
    expected = 5.0 * l2 + kl(t.fc(pool(m3)), out_t.logits) + kl(z_t2s, out_t.logits)
    got = method.loss(f_s, f_t, out_t.logits, [("s2t", 1), ("t2s", 2)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


def test_vgg_loss_equals_a_hand_computation() -> None:
    """vgg8 -> vgg8 (official ``vgg.py``: block outputs before their ReLU, each stage opens with ReLU and
    max-pool, no pool3 on 32x32, no LeakyReLU), s2t after stage 2 and t2s after stage 3, 5 stages."""
    method, student, teacher, out_s, out_t = build("vgg8", "vgg8", stats=True)
    f_s, f_t = out_s.feats, out_t.feats
    b = {s: bridge_by_hand(method.s2t[s - 1], f_s[s]) for s in (1, 2, 3, 4)}
    t = copy.deepcopy(teacher).train()
    m3 = t.block3(t.pool2(b[2].relu()))
    m4 = t.block4(m3.relu())
    l2 = sum(F.mse_loss(b[s], f_t[s]) for s in b) + F.mse_loss(m3, f_t[3]) + F.mse_loss(m4, f_t[4])
    l2 = l2 + F.mse_loss(pool(b[4]), pool(f_t[4])) + F.mse_loss(pool(m4), pool(f_t[4]))
    s = copy.deepcopy(student).train()
    z_t2s = s.classifier(pool(s.block4(bridge_by_hand(method.t2s[2], f_t[3]).relu())))
    method.set_epoch(10, "main")  # warm-up 10 / 20 on the L2 terms only
    expected = 5.0 * 0.5 * l2 + kl(t.classifier(pool(m4)), out_t.logits) + kl(z_t2s, out_t.logits)
    got = method.loss(f_s, f_t, out_t.logits, [("s2t", 2), ("t2s", 3)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    ("s_name", "t_name", "last_param"),
    [
        ("resnet8", "resnet14", "layer3.0.conv1.weight"),
        ("ShuffleV2", "wrn_16_1", "bn2.weight"),
        ("MobileNetV2", "vgg8", "conv2.1.weight"),
    ],
)
def test_mixed_paths_leave_running_stats_and_teacher_alone(s_name: str, t_name: str, last_param: str) -> None:
    method, student, teacher, out_s, out_t = build(s_name, t_name)
    stats = {k: v.clone() for k, v in student.state_dict().items() if "running" in k or "num_batches" in k}
    f_s, f_t = method.stage_features("student", out_s.feats), method.stage_features("teacher", out_t.feats)
    loss = method.loss(f_s, f_t, out_t.logits, method.candidates)
    loss.backward()
    for k, v in student.state_dict().items():
        if k in stats:
            assert torch.equal(v, stats[k]), k
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.parameters())
    assert dict(student.named_parameters())[last_param].grad.abs().sum() > 0


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


# LiuDongyang6/FCFD classification/experiments/cifar/<student>-<teacher>.yaml (T, weight_l2, loss_mixture's KL
# weight) and the train_lr0.0X.sh script that classification/README.md runs each pair with.
OFFICIAL = {
    ("resnet56", "resnet20"): ("4", "0.02", "1", "0.05"),
    ("resnet32x4", "resnet8x4"): ("4", "5", "1", "0.05"),
    ("wrn_40_2", "wrn_16_2"): ("4", "5", "0.2", "0.05"),
    ("wrn_40_2", "wrn_40_1"): ("4", "5", "1", "0.05"),
    ("vgg13", "vgg8"): ("4", "5", "1", "0.05"),
    ("vgg13", "MobileNetV2"): ("4", "5", "1", "0.01"),
    ("ResNet50", "MobileNetV2"): ("8", "5", "1", "0.01"),
    ("resnet32x4", "ShuffleV1"): ("8", "5", "1", "0.01"),
    ("resnet32x4", "ShuffleV2"): ("8", "5", "1", "0.01"),
    ("wrn_40_2", "ShuffleV1"): ("4", "5", "1", "0.01"),
}


def test_script_runs_fcfd_on_the_pairs_with_an_official_config() -> None:
    cmds = commands(run_script("run_cifar_newer.sh", "fcfd", DRY_RUN="1"))
    got = {(flag(c, "--path_t").split("/")[-2].removesuffix("_vanilla"), flag(c, "--model_s")): c for c in cmds}
    assert set(got) == set(OFFICIAL)
    for pair, c in got.items():
        values = tuple(flag(c, f) for f in ("--kd_T", "--fcfd_l2_weight", "--fcfd_kl_weight", "--learning_rate"))
        assert values == OFFICIAL[pair], pair
        assert [flag(c, f) for f in ("-r", "-a", "-b", "--fcfd_paths")] == ["1", "1", "1", "2"]
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


# One pair per family new to FCFD (teacher -> student), each family on the side it takes in a published pair.
CLI_PAIRS = [
    ("wrn_16_2", "wrn_16_1"),
    ("vgg8", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"),
    ("wrn_16_2", "ShuffleV1"),
    ("resnet8x4", "ShuffleV2"),
]


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize(("teacher", "student"), CLI_PAIRS, ids=[f"{t}-{s}" for t, s in CLI_PAIRS])
def test_cli_trains_fcfd_on_every_family(teacher: str, student: str, tmp_path) -> None:
    """Two steps of 50 images with a random-init teacher (RepDistiller's checkpoint layout), its BatchNorms
    folded: the FCFD term is finite and positive."""
    path = tmp_path / "save" / "models" / f"{teacher}_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"model": models.create_model(teacher).state_dict(), "epoch": 240}, path)
    argv = ["--path_t", str(path), "--distill", "fcfd", "--model_s", student, *SMALL, "--batch_size", "50"]
    run("train_student.py", *argv, "--save_dir", str(tmp_path), cwd=tmp_path)
    folder = only_folder(tmp_path / "student_model")
    (main,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert main["loss_fcfd"] > 0 and all(math.isfinite(main[k]) for k in main if k.startswith("loss_")), main


def test_an_added_feature_method_is_refused_where_fcfd_reads_pre_activations() -> None:
    cls, vgg, resnet = get_method("fcfd"), models.create_model("vgg8"), models.create_model("resnet8")
    with pytest.raises(PairError, match=r"^fcfd: --add pkt cannot share .* pre-activation stage features of VGG$"):
        cls.check_models(resnet, vgg, default_args(add=["pkt"]))
    cls.check_models(resnet, vgg, default_args(add=["nd"]))  # reads the pooled vector only: the same either way
    cls.check_models(resnet, models.create_model("resnet14"), default_args(add=["pkt"]))  # post-activation both
