"""ND (KD++, DKD++, DIST++, ReviewKD++): the loss against hand computations, its gradient and properties, the
teacher's class centers and their cache, the projector, ``--add nd`` with every base method, and the command line.

Hand computations use ``math`` on Python floats. The registry-wide build/backward check on the benchmark's
pairs is ``tests/test_methods.py``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_cli import SMALL, only_folder, repdistiller_teacher, run  # noqa: F401 (a fixture)

import distiller_zoo.ND as nd_module
from dataset import DeviceLoader
from dataset.batch import Batch
from distiller_zoo import DistillKL, PairError, get_method
from distiller_zoo.base import default_args
from distiller_zoo.combine import AddedMethods, parse_added
from distiller_zoo.ND import class_means, embedding_projector, nd_loss
from helper import published, recipes
from helper.engine import DistillObjective
from helper.options import student_parser, student_run_folder
from models import FeatureOutput, create_model, feature_shapes

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

# Two samples in 2-D: sample 0 (class 0) has |s| = 5 < |t| = 6, sample 1 (class 1) |s| = sqrt(2) > |t| = 1.
S = [[3.0, 4.0], [1.0, 1.0]]
T = [[0.0, 6.0], [1.0, 0.0]]
CENTERS = [[2.0, 0.0], [0.0, 3.0]]  # directions (1, 0) and (0, 1): only the direction matters
Y = [0, 1]


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def directions() -> torch.Tensor:
    return F.normalize(t(CENTERS), dim=1)


def test_loss_by_hand() -> None:
    # 1 - <s, e_y> / max(|s|, |t|): 1 - 3/6 for sample 0, 1 - 1/sqrt(2) for sample 1; the batch mean.
    want = ((1 - 3 / 6) + (1 - 1 / math.sqrt(2))) / 2
    got = nd_loss(t(S), t(T), directions(), torch.tensor(Y)).item()
    assert got == pytest.approx(want, rel=1e-6)


def test_gradient_by_hand() -> None:
    s = t(S).requires_grad_()
    nd_loss(s, t(T), directions(), torch.tensor(Y)).backward()
    # Sample 0: max is |t| (a constant), d/ds = -e / (B |t|) = -(1, 0) / 12.
    # Sample 1: max is |s|, d/ds of -<s, e>/|s| is -(e/|s| - <s, e> s / |s|^3), halved by the mean.
    n = math.sqrt(2)
    g1 = [-(0.0 / n - 1.0 * 1.0 / n**3) / 2, -(1.0 / n - 1.0 * 1.0 / n**3) / 2]
    assert s.grad.tolist()[0] == pytest.approx([-1 / 12, 0.0], abs=1e-7)
    assert s.grad.tolist()[1] == pytest.approx(g1, rel=1e-6)


def test_zero_exactly_on_the_teacher_direction_at_least_the_teacher_norm() -> None:
    torch.manual_seed(0)
    d, y = F.normalize(torch.randn(5, 8), dim=1), torch.arange(5)
    t_emb = torch.rand(5, 8) + 0.1
    t_norm = t_emb.norm(dim=1, keepdim=True)
    on_dir = d[y] * t_norm * torch.tensor([[1.0], [1.5], [2.0], [3.0], [1.0]])  # norms >= the teacher's
    assert nd_loss(on_dir, t_emb, d, y).abs().item() < 1e-6
    # On the direction but shorter than the teacher: 1 - |s| / |t| each, so the term also enlarges the norm.
    short = d[y] * t_norm * 0.25
    assert nd_loss(short, t_emb, d, y).item() == pytest.approx(0.75, rel=1e-5)
    # Off the direction: positive; the opposite direction at the teacher's norm gives 2.
    assert nd_loss(torch.rand(5, 8), t_emb, d, y).item() > 0.05
    assert nd_loss(-d[y] * t_norm, t_emb, d, y).item() == pytest.approx(2.0, rel=1e-6)


def test_centers_scale_does_not_matter_but_the_label_does() -> None:
    torch.manual_seed(1)
    s, t_emb, c = torch.randn(6, 4), torch.rand(6, 4), torch.rand(3, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    base = nd_loss(s, t_emb, F.normalize(c, dim=1), y)
    scaled = F.normalize(c * torch.tensor([[2.0], [0.1], [7.0]]), dim=1)
    assert torch.allclose(nd_loss(s, t_emb, scaled, y), base, rtol=1e-6)
    assert not torch.allclose(nd_loss(s, t_emb, F.normalize(c, dim=1), y.roll(1)), base, rtol=1e-3)


class Pooled(torch.nn.Module):
    """A 'teacher' whose embedding is the per-channel mean of the image and whose logits have 3 classes."""

    def forward(self, x: torch.Tensor, is_feat: bool = False) -> FeatureOutput:
        emb = x.mean(dim=(2, 3))  # (B, 3)
        return FeatureOutput([emb], torch.zeros(len(x), 3))


def test_class_means_by_hand_and_an_empty_class_is_refused() -> None:
    x = torch.tensor([1.0, 2.0, 4.0, 8.0]).view(4, 1, 1, 1).expand(4, 3, 2, 2)
    batches = [Batch(x[:3], torch.tensor([0, 2, 0]), None), Batch(x[3:], torch.tensor([2]), None)]
    with pytest.raises(ValueError, match=r"classes \[1\] have no training image"):
        class_means(Pooled(), batches)
    batches.append(Batch(x[:1], torch.tensor([1]), None))
    got = class_means(Pooled(), batches).tolist()
    assert got == [pytest.approx([v] * 3, rel=1e-6) for v in (2.5, 1.0, 5.0)]  # (1 + 4) / 2, 1, (2 + 8) / 2


def _method(s: str = "resnet8", t_name: str = "resnet8x4", **overrides):
    s_shapes, t_shapes = feature_shapes(create_model(s)), feature_shapes(create_model(t_name))
    return get_method("nd")(s_shapes, t_shapes, default_args(**overrides), 16)


def _loader(n: int = 40, train: bool = False) -> DeviceLoader:
    g = torch.Generator().manual_seed(2)
    images = torch.randint(256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return DeviceLoader(images, torch.arange(n) % 10, 16, "cpu", train=train, seed=7)


def test_prepare_uses_the_training_augmentation_of_epoch_zero_and_caches(tmp_path, monkeypatch) -> None:
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=10).eval()
    method = _method("resnet8", "resnet8")
    method.prepare(teacher, _loader(), tmp_path)
    (cache,) = tmp_path.glob("nd_centers_*_n40_train_aug_s7.pt")
    # By hand: the same loader's augmented epoch 0 (pad 4, crop, flip), the teacher's feats[-1] averaged per class.
    plain = _loader()
    aug = DeviceLoader(plain.images, plain.labels, 40, "cpu", train=True, seed=7)
    with torch.no_grad():
        (batch,) = list(aug.epoch(0))
        emb = teacher(batch.input, is_feat=True).feats[-1]
    want = torch.stack([emb[batch.target == k].mean(0) for k in range(10)])
    assert torch.allclose(method.directions, F.normalize(want, dim=1), atol=1e-6)
    # A second run in the folder reads the file (class_means is not called again).
    monkeypatch.setattr(nd_module, "class_means", lambda *a: pytest.fail("recomputed instead of read"))
    again = _method("resnet8", "resnet8")
    again.prepare(teacher, _loader(), tmp_path)
    assert torch.equal(again.directions, method.directions) and cache.is_file()


def test_plain_centers_differ_from_augmented_ones(tmp_path) -> None:
    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=10).eval()
    aug, plain = _method("resnet8", "resnet8"), _method("resnet8", "resnet8", nd_centers="train")
    aug.prepare(teacher, _loader(), tmp_path)
    plain.prepare(teacher, _loader(), tmp_path)
    with torch.no_grad():
        emb = teacher(next(iter(DeviceLoader(_loader().images, _loader().labels, 40, "cpu", train=False))).input,
                      is_feat=True).feats[-1]  # fmt: skip
    want = torch.stack([emb[torch.arange(40) % 10 == k].mean(0) for k in range(10)])
    assert torch.allclose(plain.directions, F.normalize(want, dim=1), atol=1e-6)
    assert not torch.allclose(aug.directions, plain.directions, atol=1e-4)
    assert len(list(tmp_path.glob("nd_centers_*.pt"))) == 2


def test_forward_before_prepare_is_an_error() -> None:
    out = FeatureOutput([torch.rand(2, 64)], torch.zeros(2, 100))
    with pytest.raises(RuntimeError, match="prepare"):
        _method()(out, out, Batch(torch.zeros(2, 3, 32, 32), torch.tensor([0, 1]), None))


@pytest.mark.parametrize(
    ("teacher", "student", "projected"),
    [
        ("resnet56", "resnet20", False),
        ("resnet32x4", "resnet8x4", False),
        ("wrn_40_2", "wrn_40_1", True),  # 64 -> 128
        ("ResNet50", "MobileNetV2", True),  # 1280 -> 2048
        ("resnet32x4", "ShuffleV1", True),  # 960 -> 256
        ("resnet32x4", "ShuffleV2", True),  # 1024 -> 256
    ],
)
def test_projector_exactly_where_the_official_code_wraps_the_student(teacher, student, projected) -> None:
    method = _method(student, teacher)
    assert (method.projector is not None) == projected
    assert [m for m in method.trainable_modules()] == ([method.projector] if projected else [])


def test_projector_is_bn_dropout_linear_with_zero_bias() -> None:
    proj = embedding_projector(6, 4)
    bn, drop, lin = proj
    assert torch.equal(bn.weight, torch.ones(6)) and torch.equal(bn.bias, torch.zeros(6))
    assert drop.p == 0.5 and lin.weight.shape == (4, 6) and torch.equal(lin.bias, torch.zeros(4))


def test_check_pair_refuses_a_feature_map_as_embedding() -> None:
    with pytest.raises(PairError, match=r"nd: the student's last feature has shape \(8, 4, 4\)"):
        get_method("nd").check_pair([torch.Size([8, 4, 4])], [torch.Size([64])], default_args())


@pytest.mark.parametrize("base", ["kd", "dkd", "dist", "reviewkd"])
def test_nd_adds_to_every_base_method(base: str) -> None:
    # ReviewKD reads the teacher's pre-activation maps; ND's pooled vector is the same either way.
    assert parse_added(["nd:2"], base) == [("nd", 2.0)]
    args = student_parser().parse_args(["--path_t", "x.pth", "--distill", base, "--add", "nd:2"])
    assert student_run_folder(args, "resnet32x4").name.endswith("_add-nd-2")


def test_kd_plus_nd_through_the_objective(tmp_path) -> None:
    torch.manual_seed(3)
    teacher, student = create_model("resnet20").eval(), create_model("resnet8")  # 64 and 64
    s_shapes, t_shapes = feature_shapes(student), feature_shapes(teacher)
    args = default_args()
    added = AddedMethods(parse_added(["nd:2"], "kd"), s_shapes, t_shapes, args, 8)
    images = torch.randint(256, (100, 3, 32, 32), dtype=torch.uint8)
    added.prepare(teacher, DeviceLoader(images, torch.arange(100), 50, "cpu", train=False), tmp_path)
    kd = get_method("kd")(s_shapes, t_shapes, args, 8)
    batch = Batch(torch.randn(4, 3, 32, 32), torch.tensor([3, 1, 4, 1]), torch.arange(4))
    terms, _ = DistillObjective(student, teacher, kd, 1.0, 1.0, 0.0, DistillKL(4.0), added)(batch)
    assert set(terms) == {"ce", "kd", "nd"} and terms["nd"][0] == 2.0
    with torch.no_grad():
        out_s, out_t = student(batch.input, is_feat=True), teacher(batch.input, is_feat=True)
    want = nd_loss(out_s.feats[-1], out_t.feats[-1], added.methods["nd"].directions, batch.target)
    assert torch.allclose(terms["nd"][1], want, rtol=1e-5)


def test_recipes_and_published_numbers() -> None:
    # The official scripts' comment tables (CIFAR/train_cifar.sh, DIST++/train_dist.sh, ReviewKD++/...).
    assert recipes.flags("kd++", "resnet32x4", "resnet8x4")[:6] == ["--distill", "kd", "-r", "1", "-a", "3.5"]
    assert "nd:4" in recipes.flags("dkd++", "resnet32x4", "ShuffleV1")
    dkd = recipes.flags("dkd++", "resnet32x4", "ShuffleV1")
    assert [dkd[dkd.index(f) + 1] for f in ("--dkd_alpha", "--dkd_beta", "--learning_rate")] == ["0.5", "8", "0.02"]
    assert "nd:1.5" in recipes.flags("reviewkd++", "resnet32x4", "ShuffleV2")
    assert recipes.skipped("dist++", "vgg13", "vgg8")
    assert published.lookup("resnet32x4", "ShuffleV1", "dkd++").acc == 77.11  # ND README
    assert published.lookup("resnet56", "resnet20", "kd++").acc == 72.53


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.parametrize(("command", "weight"), [("--distill kd -r 1 -a 1", "2"), ("--distill reviewkd -b 1", "1")])
def test_cli_runs_a_base_method_plus_nd(command, weight, repdistiller_teacher, tmp_path):  # noqa: F811
    argv = ["--path_t", str(repdistiller_teacher), *command.split(), "--add", f"nd:{weight}", "--model_s", "ShuffleV1"]
    argv += SMALL
    run("train_student.py", *argv, "--save_dir", str(tmp_path), cwd=tmp_path)
    folder = only_folder(tmp_path / "student_model")
    (main,) = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert folder.name.endswith(f"_add-nd-{weight}"), folder.name
    assert "loss_nd" in main and math.isfinite(main["loss_nd"]) and 0 < main["loss_nd"] < 2.5, main
    assert len(list(folder.glob("nd_centers_*_n100_train_aug_s*.pt"))) == 1


def test_runs_are_named_and_matched_as_the_official_plus_plus_methods() -> None:
    from helper import report

    assert report.table_method("kd", 1.0, {"add": ["nd:2"]}) == "kd++"
    assert report.table_method("dkd", 0.0, {"add": ["nd:4"]}) == "dkd++"
    assert report.table_method("reviewkd", 0.0, {"add": ["nd:1"]}) == "reviewkd++"
    assert report.table_method("wttm", 0.0, {"add": ["itrd:1.0"]}) == "wttm+itrd"  # other methods: +name
    assert report.table_method("kd", 0.9, {"add": None}) == "kd"
    run = vars(recipes.parse("dkd++", "resnet32x4", "ShuffleV1"))
    assert recipes.match(run, "resnet32x4", "ShuffleV1") == ("dkd++", [])
    plain = vars(recipes.parse("dkd", "resnet32x4", "ShuffleV1"))
    assert recipes.match(plain, "resnet32x4", "ShuffleV1")[0] == "dkd"  # --add is a switch: never dkd++


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--nd_centers", "test"], "argument --nd_centers: invalid choice: 'test'"),
        (["--add", "nd:-2"], "--add 'nd:-2': the weight must be zero or positive"),
        (["--add", "nd:x"], "--add 'nd:x': weight 'x' is not a number"),
        (["--distill", "nd", "--add", "nd"], "--add nd: already in this run"),
    ],
)
def test_bad_nd_flags_are_one_line_errors(flags, message, tmp_path, capsys) -> None:
    import train_student

    argv = ["--path_t", str(tmp_path / "t.pth"), "--save_dir", str(tmp_path), *flags]
    with pytest.raises(SystemExit) as exit_info:
        train_student.main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and any(message in line for line in err), err
    assert not list(tmp_path.glob("student_model/*"))
