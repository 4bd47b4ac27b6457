"""ITRD and methods combined in one run (``--add``): values computed by hand on tiny tensors, properties that
fail when a formula is wrong, and the combination through the engine's objective and the command line.

The hand computations use ``math`` on Python floats, independently of the torch code under test. The
registry-wide build/backward check on the benchmark's pairs is ``tests/test_methods.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from shared_paths import DATA
from test_cli import SMALL, only_folder, repdistiller_teacher, run  # noqa: F401 (a fixture)
from test_scripts import _newer, commands, flag, run_script

from dataset.batch import Batch
from distiller_zoo import DistillKL, PairError, get_method
from distiller_zoo.base import default_args
from distiller_zoo.CATKD import cat_loss, class_activation_maps
from distiller_zoo.combine import AddedMethods, added_suffix, parse_added
from distiller_zoo.ITRD import itrd_correlation, itrd_mutual
from distiller_zoo.WKDF import cosine_decay, gaussian_moments, wkdf_loss
from helper import published
from helper.engine import DistillObjective
from helper.options import UsageError, student_parser, student_run_folder, validate_student_args
from models import FeatureOutput, create_model

F_S = [[1.0, 2.0], [2.0, 0.0], [3.0, 1.0]]  # 3 samples x 2 dimensions
F_T = [[0.0, 1.0], [1.0, 3.0], [2.0, 2.0]]


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def column(rows: list[list[float]], d: int) -> list[float]:
    return [r[d] for r in rows]


def standardized(xs: list[float]) -> list[float]:
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))  # unbiased, as Tensor.std
    return [(x - m) / sd for x in xs]


def gram(rows: list[list[float]]) -> list[list[float]]:
    unit = [[v / math.sqrt(sum(w * w for w in r)) for v in r] for r in rows]
    return [[sum(a * b for a, b in zip(u, v)) for v in unit] for u in unit]


# ------------------------------------------------------------------------------------------ ITRD


@pytest.mark.parametrize("alpha", [1.01, 1.5])
def test_itrd_correlation_by_hand(alpha: float) -> None:
    total = 0.0
    for d in range(2):
        s, tt = standardized(column(F_S, d)), standardized(column(F_T, d))
        c = sum(a * b for a, b in zip(s, tt)) / 3
        total += ((1 - c) ** 2) ** alpha
    got = itrd_correlation(t(F_S), t(F_T), alpha).item()
    assert got == pytest.approx(math.log2(total), rel=1e-5)


def test_itrd_mutual_by_hand() -> None:
    g_s, g_t = gram(F_S), gram(F_T)
    g_st = [[a * b for a, b in zip(r, q)] for r, q in zip(g_s, g_t)]
    tr_s, tr_st = sum(g_s[i][i] for i in range(3)), sum(g_st[i][i] for i in range(3))
    want = sum((g_s[i][j] / tr_s) ** 2 - (g_st[i][j] / tr_st) ** 2 for i in range(3) for j in range(3))
    assert itrd_mutual(t(F_S), t(F_T)).item() == pytest.approx(want, rel=1e-5)


def test_itrd_correlation_ignores_positive_affine_maps_per_dimension() -> None:
    torch.manual_seed(0)
    f_s, f_t = torch.randn(16, 5), torch.randn(16, 5)
    scale, shift = torch.rand(5) + 0.5, torch.randn(5)
    base = itrd_correlation(f_s, f_t, 1.01)
    assert itrd_correlation(f_s * scale + shift, f_t, 1.01).item() == pytest.approx(base.item(), rel=1e-5)
    # A sign flip turns a correlation c into -c and changes the loss.
    assert not torch.isclose(itrd_correlation(-f_s, f_t, 1.01), base, rtol=1e-3)


def test_itrd_mutual_ignores_row_scale_and_vanishes_for_a_constant_teacher_direction() -> None:
    torch.manual_seed(1)
    f_s, f_t = torch.rand(8, 6), torch.rand(8, 4)
    base = itrd_mutual(f_s, f_t)
    rows = torch.rand(8, 1) + 0.1
    assert itrd_mutual(f_s * rows, f_t * rows).item() == pytest.approx(base.item(), rel=1e-5, abs=1e-7)
    assert base.abs() > 1e-4
    # Every teacher row along one direction: G_t is all ones, G_st = G_s and the term is 0.
    same = torch.rand(8, 1) * torch.rand(1, 4)
    assert itrd_mutual(f_s, same).abs().item() < 1e-6


def test_itrd_weights_and_flags() -> None:
    d, a = get_method("itrd").defaults, default_args()
    assert (d["gamma"], d["alpha"], d["beta"]) == (1.0, 0.0, 1.0)  # ITRD README.md: -r 1 -b 1
    assert (a.lambda_corr, a.lambda_mutual, a.alpha_it) == (2.0, 1.0, 1.01)  # ITRD README.md's command


@pytest.mark.parametrize(("s_dim", "t_dim"), [(64, 256), (64, 64)])
def test_itrd_term_sums_its_weighted_parts(s_dim: int, t_dim: int) -> None:
    torch.manual_seed(2)
    args = default_args(lambda_corr=0.7, lambda_mutual=3.0)
    m = get_method("itrd")([torch.Size([s_dim])], [torch.Size([t_dim])], args, 10)
    f_s, f_t = torch.rand(8, s_dim), torch.rand(8, t_dim)
    got = m(FeatureOutput([f_s], None), FeatureOutput([f_t], None), None)
    e = m.embed(f_s)
    # The mutual term reads the embedded student only when the widths differ (official forward_mutual_it).
    want = 0.7 * itrd_correlation(e, f_t, 1.01) + 3.0 * itrd_mutual(e if s_dim != t_dim else f_s, f_t)
    assert torch.allclose(got, want, rtol=1e-6)


# ------------------------------------------------------------------------------------------ CAT-KD


def test_cat_maps_and_loss_by_hand() -> None:
    # One image, 2 channels on a 2x2 map, 2 classes; pooled to 1x1: the map means are (2.5, 1), so the class maps
    # are W @ (2.5, 1) = (2.5 - 1, 0.5 * 2.5 + 2) = (1.5, 3.25).
    feat = t([[1.0, 2.0, 3.0, 4.0], [0.0, 2.0, 2.0, 0.0]]).view(1, 2, 2, 2)
    w = t([[1.0, -1.0], [0.5, 2.0]])
    cam = class_activation_maps(feat, w, 1)
    assert cam.flatten().tolist() == pytest.approx([1.5, 3.25])
    other = t([[0.5], [1.25]]).view(1, 2, 1, 1)
    assert cat_loss(cam, other, False).item() == pytest.approx(((1.5 - 0.5) ** 2 + (3.25 - 1.25) ** 2) / 2)
    # Normalised per map over its positions: each 1x1 map becomes 1 (the sign), so these agree.
    assert cat_loss(cam, other, True).item() == pytest.approx(0.0, abs=1e-7)


def test_cat_maps_pool_before_the_classifier_as_after() -> None:
    torch.manual_seed(5)
    feat, w = torch.rand(3, 6, 8, 8), torch.randn(10, 6)
    full = torch.einsum("kc,bchw->bkhw", w, feat)  # the official order: 1x1 convolution, then pooling
    want = torch.nn.functional.adaptive_avg_pool2d(full, (2, 2))
    assert torch.allclose(class_activation_maps(feat, w, 2), want, rtol=1e-5, atol=1e-6)


def test_cat_normalised_loss_ignores_a_positive_scale_per_map() -> None:
    torch.manual_seed(6)
    cam_s, cam_t = torch.rand(2, 5, 2, 2), torch.rand(2, 5, 2, 2)
    scale = torch.rand(2, 5, 1, 1) + 0.5
    assert cat_loss(cam_s * scale, cam_t, True).item() == pytest.approx(cat_loss(cam_s, cam_t, True).item(), rel=1e-5)
    assert cat_loss(cam_s * scale, cam_t, False).item() != pytest.approx(cat_loss(cam_s, cam_t, False).item(), rel=1e-3)


@pytest.mark.parametrize("arch", ["wrn_40_1", "resnet8x4", "vgg8", "ShuffleV1"])
def test_cat_maps_at_resolution_one_are_the_logits_without_bias(arch: str) -> None:
    # The maps are the classifier applied at every position of the map it pools: pooled to 1x1 they give the
    # logits minus the bias. For WRN this needs the final BN + ReLU (the pre-activation list).
    torch.manual_seed(7)
    model = create_model(arch).eval()
    out = model(torch.randn(2, 3, 32, 32), is_feat=True, preact=True)
    method = get_method("catkd")([f.shape[1:] for f in out.feats], [f.shape[1:] for f in out.feats], default_args(), 2)
    method.bind_student(model)
    fc = method.__dict__["_student_fc"]
    cam = class_activation_maps(out.feats[-2].relu(), fc.weight, 1).flatten(1)
    assert torch.allclose(cam, out.logits - fc.bias, rtol=1e-4, atol=1e-5)


def test_catkd_between_a_network_and_itself_is_zero_and_refuses_mobilenetv2() -> None:
    torch.manual_seed(8)
    model = create_model("resnet8x4").eval()
    out = model(torch.randn(2, 3, 32, 32), is_feat=True, preact=True)
    shapes = [f.shape[1:] for f in out.feats]
    method = get_method("catkd")(shapes, shapes, default_args(), 2)
    method.bind_student(model)
    method.bind_teacher(model)
    assert method(out, out, None).item() == pytest.approx(0.0, abs=1e-10)
    mv2 = create_model("MobileNetV2").eval()
    mv2_shapes = [f.shape[1:] for f in mv2(torch.randn(2, 3, 32, 32), is_feat=True, preact=True).feats]
    with pytest.raises(PairError, match="student's last feature map"):
        get_method("catkd").check_pair(mv2_shapes, shapes, default_args())


# ------------------------------------------------------------------------------------------ WKD-F


def test_wkdf_by_hand() -> None:
    # One image, one channel, a 2x2 map, grid 1: student (1, 2, 3, 4): mean 2.5, unbiased var 5/3;
    # teacher (0, 0, 2, 2): mean 1, unbiased var 4/3.
    f_s, f_t = t([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2), t([[0.0, 0.0], [2.0, 2.0]]).view(1, 1, 2, 2)
    eps = 1e-5
    sd_s, sd_t = math.sqrt(5 / 3 + eps), math.sqrt(4 / 3 + eps)
    want = 4.0 * (2.5 - 1.0) ** 2 + (sd_s - sd_t) ** 2
    assert wkdf_loss(f_s, f_t, 4.0, 1, eps).item() == pytest.approx(want, rel=1e-5)


def test_wkdf_grid_cells_are_the_map_blocks() -> None:
    torch.manual_seed(9)
    f = torch.rand(2, 3, 8, 8)
    mean, std = gaussian_moments(f, 4, 1e-5)
    block = f[:, :, 2:4, 6:8]  # cell (1, 3) of a 4x4 grid of 2x2 blocks
    assert torch.allclose(mean[:, :, 1, 3], block.mean((2, 3)))
    assert torch.allclose(std[:, :, 1, 3], torch.sqrt(block.var((2, 3)) + 1e-5))
    # The loss divides by grid^2 * B: a map equal to the teacher's but shifted by d in every cell costs ratio d^2 C.
    assert wkdf_loss(f + 0.5, f, 2.0, 4, 1e-5).item() == pytest.approx(2.0 * 0.25 * 3, rel=1e-5)
    assert wkdf_loss(f, f, 2.0, 4, 1e-5).item() == 0.0


def test_wkdf_cosine_decay_and_defaults() -> None:
    assert [cosine_decay(e, 150, 240) for e in (1, 150)] == [1.0, 1.0]
    assert cosine_decay(195, 150, 240) == pytest.approx(0.5) and cosine_decay(240, 150, 240) == pytest.approx(0.0)
    assert cosine_decay(200, 0, 240) == 1.0  # 0 disables
    a, d = default_args(), get_method("wkdf").defaults
    assert (d["gamma"], d["beta"], a.wkdf_ratio, a.wkdf_grid, a.wkdf_decay_epoch) == (1.0, 0.08, 4.0, 1, 150)


# ------------------------------------------------------------------------------------------ --add


def test_parse_added_weights_defaults_and_errors() -> None:
    assert parse_added(["itrd:1.5", "pkt"], "wttm") == [("itrd", 1.5), ("pkt", 30000.0)]
    assert parse_added(["itrd:0.5,attention"], "wttm") == [("itrd", 0.5), ("attention", 1000.0)]
    assert parse_added(None, "wttm") == []
    assert added_suffix(["itrd:1.0"], "wttm") == "add-itrd-1"
    bad = {
        "wttm": "already in this run",
        "itrd,itrd": "already in this run",
        "kd": "no term of its own",
        "factor": "init stage",
        "simkd": "deployed network",
        "abound:1": "init stage",
        "itrd:x": "not a number",
        "itrd:-1": "zero or positive",
        "nope": "unknown method",
    }
    for spec, message in bad.items():
        with pytest.raises(ValueError, match=message):
            parse_added([spec], "wttm")


def test_added_methods_declare_their_data_needs() -> None:
    s_shapes, t_shapes = [torch.Size([4, 8, 8]), torch.Size([4])], [torch.Size([6, 8, 8]), torch.Size([6])]
    added = AddedMethods(parse_added(["crd:0.8"], "wttm"), s_shapes, t_shapes, default_args(nce_k=4), 16)
    assert added.needs_contrast and len(added) == 1 and added.weights == {"crd": 0.8}
    assert not AddedMethods(parse_added(["itrd"], "wttm"), s_shapes, t_shapes, default_args(), 16).needs_contrast
    with pytest.raises(ValueError, match="pre-activation"):
        parse_added(["catkd"], "wttm")  # CAT-KD reads the pre-activation list, WTTM the other


def test_add_flag_reaches_the_folder_name_and_the_validation() -> None:
    parser = student_parser()
    args = parser.parse_args(["--path_t", "x.pth", "--distill", "wttm", "--add", "itrd:1.0"])
    validate_student_args(args)
    assert student_run_folder(args, "resnet32x4").name.endswith("_wttm_r-1_a-0_b-4_1_add-itrd-1")
    plain = parser.parse_args(["--path_t", "x.pth", "--distill", "wttm"])
    assert plain.add is None and student_run_folder(plain, "resnet32x4").name.endswith("_wttm_r-1_a-0_b-4_1")
    with pytest.raises(UsageError, match="--add kd"):
        validate_student_args(parser.parse_args(["--path_t", "x.pth", "--distill", "wttm", "--add", "kd"]))
    two = ["--path_t", "x.pth", "--distill", "mlkd", "--two_views", "--add", "itrd"]
    with pytest.raises(UsageError, match="--two_views"):
        validate_student_args(parser.parse_args(two))


class Net(torch.nn.Module):
    """A stand-in network: the feature list is (stem map, pooled vector)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, width, 3, padding=1)
        self.fc = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor, is_feat: bool = False, preact: bool = False):
        f = self.conv(x).relu()  # (B, width, 8, 8)
        pooled = f.mean((2, 3))  # (B, width)
        out = FeatureOutput([f, pooled], self.fc(pooled))
        return out if is_feat else out.logits


def test_added_terms_are_logged_with_their_own_weights() -> None:
    torch.manual_seed(3)
    student, teacher = Net(4), Net(6).eval()
    batch = Batch(torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,)), torch.arange(8))
    s_shapes, t_shapes = [torch.Size([4, 8, 8]), torch.Size([4])], [torch.Size([6, 8, 8]), torch.Size([6])]
    args = default_args()
    wttm = get_method("wttm")(s_shapes, t_shapes, args, 8)
    added = AddedMethods(parse_added(["itrd:0.25"], "wttm"), s_shapes, t_shapes, args, 8)
    objective = DistillObjective(student, teacher, wttm, 1.0, 0.0, 4.0, DistillKL(4.0), added)
    objective.train()
    terms, _ = objective(batch)
    assert set(terms) == {"ce", "wttm", "itrd"} and terms["itrd"][0] == 0.25 and terms["wttm"][0] == 4.0
    out_s, out_t = student(batch.input, is_feat=True), teacher(batch.input, is_feat=True)
    alone = added.methods["itrd"](out_s, out_t, batch)
    assert torch.allclose(terms["itrd"][1], alone)
    # The added method's adapter is trainable and reached by the combined loss.
    sum(w * v for w, v in terms.values()).backward()
    (embed,) = added.trainable_modules()
    assert embed.weight.grad is not None and embed.weight.grad.abs().sum() > 0
    # A zero weight is not computed, as for every term.
    zero = AddedMethods([("itrd", 0.0)], s_shapes, t_shapes, args, 8)
    assert "itrd" not in DistillObjective(student, teacher, wttm, 1.0, 0.0, 4.0, DistillKL(4.0), zero)(batch)[0]


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize(
    "command",
    [
        "--distill itrd -r 1 -a 0 -b 1",
        "--distill wttm -r 1 -a 0 -b 4 --ttm_l 0.2 --add itrd:1.0",
        "--distill catkd -r 1 -a 0 -b 15 --cat_resolution 2 --cat_normalize 0",
        "--distill wkdf -r 1 -a 0 -b 0.08 --wkdf_ratio 4 --wkdf_grid 1",
    ],
)
def test_cli_runs_itrd_catkd_and_wttm_plus_itrd(command, repdistiller_teacher, tmp_path):  # noqa: F811
    argv = ["--path_t", str(repdistiller_teacher), *command.split(), "--model_s", "resnet8x4", *SMALL]
    run("train_student.py", *argv, "--save_dir", str(tmp_path), cwd=tmp_path)
    folder = only_folder(tmp_path / "student_model")
    args = json.loads((folder / "args.json").read_text())["args"]
    summary = json.loads((folder / "summary.json").read_text())
    (main,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    if "--add" in command:
        assert folder.name.endswith("_wttm_r-1_a-0_b-4_1_ep1_n100_test100_add-itrd-1"), folder.name
        assert args["add"] == ["itrd:1.0"] and summary["added"] == {"itrd": 1.0}
        assert {"loss_ce", "loss_wttm", "loss_itrd"} <= set(main) and "loss_kd" not in main, main
    else:
        assert summary["added"] == {} and {"loss_ce", f"loss_{args['distill']}"} <= set(main), main
    assert all(math.isfinite(main[k]) for k in main if k.startswith("loss_"))


def test_itrd_correlation_stays_finite_with_a_dead_channel() -> None:
    # The official code divides 0 by 0 for a dimension constant over the batch; here it correlates 0.
    torch.manual_seed(4)
    f_s, f_t = torch.rand(8, 3), torch.rand(8, 3)
    f_t[:, 1] = 0.0
    f_s.requires_grad_()
    loss = itrd_correlation(f_s, f_t, 1.01)
    s = (f_s - f_s.mean(0)) / f_s.std(0)
    tt = (f_t - f_t.mean(0)) / f_t.std(0)
    c = (s * tt).sum(0) / 8
    want = torch.log2((1 - c[0]) ** 2.02 + 1.0 + (1 - c[2]) ** 2.02)  # the dead dimension: (1 - 0)^2 = 1
    assert torch.isfinite(loss) and torch.allclose(loss, want, rtol=1e-5)
    loss.backward()
    assert torch.isfinite(f_s.grad).all()


def test_script_runs_wttm_plus_itrd_with_wttms_per_pair_values_and_the_published_numbers_exist():
    combined, wttm = _newer("wttm+itrd"), _newer("wttm")
    for pair, cmd in combined.items():
        assert flag(cmd, "--distill") == "wttm" and flag(cmd, "--add") == "itrd:1", cmd
        assert (flag(cmd, "--ttm_l"), flag(cmd, "-b")) == (flag(wttm[pair], "--ttm_l"), flag(wttm[pair], "-b"))
        assert (flag(cmd, "--lambda_corr"), flag(cmd, "--lambda_mutual"), flag(cmd, "--alpha_it")) == ("2", "1", "1.01")
    rows = [r for r in published.load(published.TABLES[1]) if r.method in ("itrd", "wttm+itrd")]
    assert {(r.teacher, r.student) for r in rows if r.method == "wttm+itrd"} == set(published.PAIRS)
    assert published.lookup("resnet32x4", "resnet8x4", "wttm+itrd").acc == 77.36  # TTM README


def test_script_runs_catkd_with_its_configs_and_skips_the_pairs_it_cannot_serve():
    cmds = commands(run_script("run_cifar_newer.sh", "catkd", DRY_RUN="1"))
    got = {flag(c, "--model_s"): c for c in cmds if "resnet32x4" in flag(c, "--path_t")}
    assert set(got) == {"resnet8x4", "ShuffleV1"}  # not ShuffleV2
    assert (flag(got["resnet8x4"], "-b"), flag(got["resnet8x4"], "--cat_normalize")) == ("15", "0")
    assert (flag(got["ShuffleV1"], "-b"), flag(got["ShuffleV1"], "--cat_resolution")) == ("600", "4")
    assert len(cmds) == 10 and not any(flag(c, "--model_s") in ("MobileNetV2", "ShuffleV2") for c in cmds)


@pytest.mark.slow
@pytest.mark.long
def test_a_combined_run_resumes_to_the_weights_of_an_uninterrupted_one(repdistiller_teacher, tmp_path):  # noqa: F811
    common = [
        "--path_t", str(repdistiller_teacher), "--model_s", "resnet8", "--distill", "wttm", "--add", "itrd:1",
        "--train_size", "200", "--test_size", "100", "--batch_size", "64", "--data_folder", str(DATA),
        "--save_dir", str(tmp_path), "--deterministic",
    ]  # fmt: skip
    run("train_student.py", *common, "--epochs", "2", "--run_name", "straight", cwd=tmp_path)
    run("train_student.py", *common, "--epochs", "1", "--run_name", "resumed", cwd=tmp_path)
    run("train_student.py", *common, "--epochs", "2", "--run_name", "resumed", "--resume", "auto", cwd=tmp_path)

    def weights(name: str) -> dict[str, torch.Tensor]:
        state = torch.load(tmp_path / "student_model" / name / "latest.pth", map_location="cpu", weights_only=True)
        return {**state["model"], **{f"added.{k}": v for k, v in state["added"].items()}}

    straight, resumed = weights("straight"), weights("resumed")
    assert straight.keys() == resumed.keys() and "added.methods.itrd.embed.weight" in straight
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
