"""The model zoo against RepDistiller's checkpoint format, feature meaning and parameter counts."""

from __future__ import annotations

import copy
import functools
import importlib.util
import math
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from shared_paths import REAL_DATA, ROOT, SHARED, needs_real_teachers, real_teacher
from torch import nn

from models import FeatureOutput, create_model, feature_shapes, model_dict, model_names, teacher_name_from_path
from models.common import channel_shuffle
from models.shufflenetv2 import ShuffleV2

STATE_DICTS = ROOT / "tests" / "state_dicts"  # a copy of ../shared/reference/state_dicts (keys and shapes)
SHARED_STATE_DICTS = SHARED / "reference" / "state_dicts"
NAMES = list(model_dict)

# Trainable parameters and per-sample feature shapes (is_feat=True, 3x32x32 input, 100 classes), from
# reference/state_dicts/README.md (test_table_matches_reference_readme checks the transcription).
RESNET = [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)]
RESNET_X4 = [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)]
WRN_K2 = [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)]
VGG = [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4), (512,)]
REFERENCE = {
    "resnet8": (83_892, RESNET),
    "resnet14": (181_108, RESNET),
    "resnet20": (278_324, RESNET),
    "resnet32": (472_756, RESNET),
    "resnet44": (667_188, RESNET),
    "resnet56": (861_620, RESNET),
    "resnet110": (1_736_564, RESNET),
    "resnet8x4": (1_233_540, RESNET_X4),
    "resnet32x4": (7_433_860, RESNET_X4),
    "ResNet50": (23_705_252, [(64, 32, 32), (256, 32, 32), (512, 16, 16), (1024, 8, 8), (2048, 4, 4), (2048,)]),
    "wrn_16_1": (180_916, RESNET),
    "wrn_16_2": (703_284, WRN_K2),
    "wrn_40_1": (569_780, RESNET),
    "wrn_40_2": (2_255_156, WRN_K2),
    "vgg8": (3_965_028, VGG),
    "vgg11": (9_277_284, VGG),
    "vgg13": (9_462_180, VGG),
    "vgg16": (14_774_436, VGG),
    "vgg19": (20_086_692, VGG),
    "MobileNetV2": (812_836, [(16, 16, 16), (12, 16, 16), (16, 8, 8), (48, 4, 4), (160, 2, 2), (1280,)]),
    "ShuffleV1": (949_258, [(24, 32, 32), (240, 16, 16), (480, 8, 8), (960, 4, 4), (960,)]),
    "ShuffleV2": (1_355_528, [(24, 32, 32), (116, 16, 16), (232, 8, 8), (464, 4, 4), (1024,)]),
}

# Top-level modules that get_feat_modules() leaves out, per family (RepDistiller's lists).
HEAD_MODULES = {
    "resnet": {"fc"},
    "resnetv2": {"linear"},
    "wrn": {"bn1", "fc"},
    "vgg": {"classifier"},
    "mobilenetv2": {"conv2", "classifier"},
    "shufflenetv1": {"linear"},
    "shufflenetv2": {"conv2", "bn2", "linear"},
}


def family(model: nn.Module) -> str:
    return type(model).__module__.rsplit(".", 1)[-1]


@functools.cache
def built(name: str) -> nn.Module:
    """One model per name for the read-only tests; tests that change it work on a copy."""
    torch.manual_seed(0)
    return create_model(name)


def inputs(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def eval_feats(model: nn.Module, preact: bool) -> FeatureOutput:
    model.eval()
    with torch.no_grad():
        return model(inputs(), is_feat=True, preact=preact)


@functools.cache
def cached_feats(name: str, preact: bool) -> FeatureOutput:
    """Eval-mode features of ``built(name)`` on ``inputs()``, computed once (tests only read them)."""
    return eval_feats(built(name), preact)


def reference_entries(name: str) -> list[tuple[str, tuple[int, ...]]]:
    path = STATE_DICTS / f"{name}.txt"
    entries = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            entries.append((key, tuple(int(v) for v in re.findall(r"\d+", shape))))
    return entries


def stage_maps(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """The per-stage maps: everything between the stem output and the pooled vector."""
    return feats[1:-1]


# ---------------------------------------------------------------------------------------------------- registry


def test_registry_has_repdistillers_22_names():
    assert model_names() == [
        "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet8x4",
        "resnet32x4", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "vgg8", "vgg11", "vgg13",
        "vgg16", "vgg19", "MobileNetV2", "ShuffleV1", "ShuffleV2",
    ]  # fmt: skip
    with pytest.raises(TypeError):
        model_dict["extra"] = model_dict["resnet8"]  # read-only registry


def test_create_model_rejects_unknown_name_and_lists_valid_ones():
    with pytest.raises(ValueError, match="nope") as err:
        create_model("nope")
    assert all(name in str(err.value) for name in NAMES)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("save/models/wrn_40_2_vanilla/ckpt_epoch_240.pth", "wrn_40_2"),
        ("save/models/resnet32x4_vanilla/ckpt_epoch_240.pth", "resnet32x4"),
        ("save/models/ResNet50_vanilla/x.pth", "ResNet50"),
        (Path("models/wrn_16_1_cifar100_lr_0.05_decay_0.0005_trial_0/best.pth"), "wrn_16_1"),
    ],
)
def test_teacher_name_from_path(path, expected):
    assert teacher_name_from_path(path) == expected


def test_table_matches_reference_readme():
    readme = STATE_DICTS / "README.md"
    rows = {}
    for line in readme.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] in model_dict:
            shapes = [tuple(int(v) for v in s.split(",") if v) for s in re.findall(r"\(([\d,]+)\)", cells[3])]
            rows[cells[0]] = (int(cells[1].replace(",", "")), shapes)
    assert rows == REFERENCE


def test_listings_cover_the_registry():
    assert sorted(p.stem for p in STATE_DICTS.glob("*.txt")) == sorted(NAMES)


def test_listings_are_a_copy_of_the_shared_reference():
    if not SHARED_STATE_DICTS.is_dir():
        pytest.skip(f"the copy is checked against {SHARED_STATE_DICTS}, not on this machine")
    for name in NAMES:
        assert (STATE_DICTS / f"{name}.txt").read_bytes() == (SHARED_STATE_DICTS / f"{name}.txt").read_bytes(), name
    copy, shared = (STATE_DICTS / "README.md").read_text(), (SHARED_STATE_DICTS / "README.md").read_text()
    table = [[ln for ln in text.splitlines() if ln.startswith("|")] for text in (copy, shared)]
    assert table[0] == table[1] and len(table[0]) == 2 + len(NAMES)


# ---------------------------------------------------------------------------------------------- architecture


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_keys_shapes_and_parameter_count_match_reference(name):
    model = built(name)
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert params == REFERENCE[name][0]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == reference_entries(name)
    header = (STATE_DICTS / f"{name}.txt").read_text().splitlines()[0]
    assert params == int(re.search(r"(\d+) trainable parameters", header).group(1))


@pytest.mark.parametrize("name", NAMES)
def test_reference_format_state_dict_loads_strictly(name):
    gen = torch.Generator().manual_seed(2)
    state = {
        key: torch.tensor(7) if key.endswith("num_batches_tracked") else torch.randn(shape, generator=gen)
        for key, shape in reference_entries(name)
    }
    model = copy.deepcopy(built(name))
    model.load_state_dict(state, strict=True)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", NAMES)
def test_logits_and_feature_shapes(name):
    model = built(name)
    with torch.no_grad():
        logits = model.eval()(inputs())
    out = cached_feats(name, preact=False)
    feats, logits_feat = out  # RepDistiller's unpacking
    assert isinstance(out, FeatureOutput) and out.feats is feats and out.logits is logits_feat
    assert logits.shape == (2, 100) and torch.equal(logits, logits_feat)
    expected = [torch.Size((2, *s)) for s in REFERENCE[name][1]]
    assert [f.shape for f in feats] == expected
    assert [f.shape for f in cached_feats(name, preact=True).feats] == expected


@pytest.mark.parametrize("name", NAMES)
def test_num_classes_sets_the_classifier_width(name):
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        assert model(inputs()).shape == (2, 7)


@pytest.mark.parametrize("name", NAMES)
def test_feature_shapes_helper_restores_mode_and_leaves_global_rng(name):
    model = built(name).train()
    rng = torch.get_rng_state()
    shapes = feature_shapes(model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(m.training for m in model.modules())
    assert shapes == [torch.Size(s) for s in REFERENCE[name][1]]
    assert feature_shapes(model.eval(), preact=True) == shapes and not model.training


@pytest.mark.parametrize("name", NAMES)
def test_initialisation_follows_repdistiller(name):
    model = built(name)  # never trained or loaded into: its parameters are the initial ones
    fam = family(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(torch.all(m.bias == 0) for m in convs if m.bias is not None)
    big = max(convs, key=lambda m: m.weight.numel())  # enough samples for a 5 % check of the spread
    receptive = big.weight[0, 0].numel()
    if fam.startswith("shufflenet"):  # PyTorch's default: U(-b, b) with b = 1 / sqrt(fan_in)
        expected_std = 1 / math.sqrt(3 * big.weight.shape[1] * receptive)
    else:  # He normal, fan_out = k * k * out_channels
        expected_std = math.sqrt(2 / (big.weight.shape[0] * receptive))
    assert big.weight.std().item() == pytest.approx(expected_std, rel=0.05)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    if fam in ("vgg", "mobilenetv2"):
        assert linear.weight.std().item() == pytest.approx(0.01, rel=0.1)
    else:  # PyTorch's default weight: U(-b, b), b = 1 / sqrt(fan_in)
        assert linear.weight.abs().max().item() <= 1 / math.sqrt(linear.in_features)
        assert linear.weight.std().item() == pytest.approx(1 / math.sqrt(3 * linear.in_features), rel=0.1)
    zero_bias = fam in ("vgg", "mobilenetv2", "wrn")
    assert bool(torch.all(linear.bias == 0)) == zero_bias


# ------------------------------------------------------------------------------------------- feature meaning


def expected_preact(fam, block, block_in, bn_out):
    """A stage's pre-activation rebuilt from the BN of get_bn_before_relu() and the input of its block."""
    if fam == "resnet":
        return bn_out + (block_in if block.downsample is None else block.downsample(block_in))
    if fam == "resnetv2":
        return bn_out + block.shortcut(block_in)
    if fam == "shufflenetv1":
        assert block.stride == 1  # the last unit of a stage adds its input
        return bn_out + block_in
    if fam == "shufflenetv2":  # the left half passes unchanged; RepDistiller's order (before the shuffle)
        return torch.cat([block_in[:, : block_in.shape[1] - bn_out.shape[1]], bn_out], 1)
    if fam == "mobilenetv2":
        return bn_out + block_in if block.use_res_connect else bn_out
    return bn_out  # wrn, vgg: the BN output is the pre-activation


@pytest.mark.parametrize("name", NAMES)
def test_preact_features_equal_tensors_captured_by_hooks(name):
    model = built(name).eval()
    fam = family(model)
    parents = {child: parent for parent in model.modules() for child in parent.children()}
    bns = model.get_bn_before_relu()
    blocks = [parents[parents[bn]] if fam == "mobilenetv2" else parents[bn] for bn in bns]
    bn_out, block_in = {i: [] for i in range(len(bns))}, {i: [] for i in range(len(bns))}
    handles = []
    for i, (bn, block) in enumerate(zip(bns, blocks)):
        handles.append(bn.register_forward_hook(lambda m, a, out, i=i: bn_out[i].append(out.clone())))
        handles.append(block.register_forward_pre_hook(lambda m, a, i=i: block_in[i].append(a[0].clone())))
    try:
        feats = eval_feats(model, preact=True).feats
    finally:
        for h in handles:
            h.remove()
    assert all(len(v) == 1 for v in bn_out.values())  # each BN ran once, also where preact reuses it (WRN)
    with torch.no_grad():
        expected = [expected_preact(fam, b, block_in[i][0], bn_out[i][0]) for i, b in enumerate(blocks)]
    assert len(stage_maps(feats)) == len(expected)
    for got, want in zip(stage_maps(feats), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    plain = cached_feats(name, preact=False).feats
    assert torch.equal(feats[0], plain[0]) and torch.equal(feats[-1], plain[-1])


@pytest.mark.parametrize("name", NAMES)
def test_plain_features_relate_to_preact_features(name):
    model = built(name)
    fam = family(model)
    plain = stage_maps(cached_feats(name, preact=False).feats)
    pre = stage_maps(cached_feats(name, preact=True).feats)
    if fam == "mobilenetv2":  # preact ignored
        assert all(torch.equal(a, b) for a, b in zip(plain, pre))
    elif fam == "wrn":  # plain: raw residual streams; preact: the next BN applied to them
        with torch.no_grad():
            normed = [bn(f) for bn, f in zip(model.get_bn_before_relu(), plain)]
        assert all(torch.equal(a, b) for a, b in zip(normed, pre))
        assert all(f.min() < 0 for f in plain)  # not post-ReLU
    elif fam == "shufflenetv2":  # RepDistiller's preact is taken before the channel shuffle
        assert all(torch.equal(a, channel_shuffle(F.relu(b), 2)) for a, b in zip(plain, pre))
        assert not all(torch.equal(a, F.relu(b)) for a, b in zip(plain, pre))
    else:
        assert all(torch.equal(a, F.relu(b)) for a, b in zip(plain, pre))
        assert all(b.min() < 0 for b in pre)  # a real pre-activation, not the ReLU output again


def test_shufflev2_shuffle_preact_matches_post_activation_channel_order():
    shuffled = ShuffleV2(shuffle_preact=True)
    shuffled.load_state_dict(built("ShuffleV2").state_dict())
    plain = stage_maps(cached_feats("ShuffleV2", preact=False).feats)
    default = stage_maps(cached_feats("ShuffleV2", preact=True).feats)
    pre = stage_maps(eval_feats(shuffled, preact=True).feats)
    assert all(torch.equal(a, F.relu(b)) for a, b in zip(plain, pre))
    assert all(torch.equal(b, channel_shuffle(d, 2)) for b, d in zip(pre, default))


@pytest.mark.parametrize("name", NAMES)
def test_bn_before_relu_and_feat_modules(name):
    model = built(name)
    fam = family(model)
    bns = model.get_bn_before_relu()
    channels = [s[0] for s in REFERENCE[name][1][1:-1]]
    assert all(isinstance(bn, nn.BatchNorm2d) for bn in bns)
    assert all(any(bn is m for m in model.modules()) for bn in bns)
    # ShuffleV2's BN is the right branch only: half the channels of the stage output.
    expected = [c // 2 for c in channels] if fam == "shufflenetv2" else channels
    assert [bn.num_features for bn in bns] == expected
    feat_modules = model.get_feat_modules()
    assert isinstance(feat_modules, nn.ModuleList)
    covered = {id(p) for p in feat_modules.parameters()}
    left_out = {n.split(".")[0] for n, p in model.named_parameters() if id(p) not in covered}
    assert left_out == HEAD_MODULES[fam]


# ------------------------------------------------------------------------------------------------ behaviour


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    # The preact forward runs every module the plain one runs, plus the split of each stage's last block.
    model = copy.deepcopy(built(name)).train()
    feats, logits = model(inputs(), is_feat=True, preact=True)
    (logits.sum() + sum(f.sum() for f in feats)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NAMES)
def test_eval_forward_is_deterministic(name):
    first, second = cached_feats(name, True), eval_feats(built(name), True)
    assert torch.equal(first.logits, second.logits)
    assert all(torch.equal(a, b) for a, b in zip(first.feats, second.feats))


@pytest.mark.parametrize("name", NAMES)
def test_train_forward_updates_each_batchnorm_once(name):
    """A preact forward in train mode leaves exactly the BN state of a plain one (for WRNs with
    ``preact_bn_twice = False``, ``--wrn_preact_bn once``; see the test below for RepDistiller's default)."""
    plain, preact = copy.deepcopy(built(name)).train(), copy.deepcopy(built(name)).train()
    if hasattr(preact, "preact_bn_twice"):
        preact.preact_bn_twice = False
    with torch.no_grad():
        plain(inputs())
        preact(inputs(), is_feat=True, preact=True)
    bns = [m for m in preact.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.num_batches_tracked.item() == 1 for m in bns)
    after_plain = plain.state_dict()
    assert all(torch.equal(v, after_plain[k]) for k, v in preact.state_dict().items())
    assert not torch.equal(bns[0].running_mean, torch.zeros_like(bns[0].running_mean))


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("wrn")])
def test_wrn_preact_forward_updates_three_batchnorms_twice_as_repdistiller(name):
    """RepDistiller's WRN calls ``get_bn_before_relu()``'s three BNs again for its preact features: their
    running statistics take the momentum update twice with the same batch statistics, by hand
    ``r2 = (1 - m)^2 r0 + (1 - (1 - m)^2) b`` (m = 0.1; b the batch mean, or the unbiased batch variance, of
    the BN's input), and ``num_batches_tracked`` is 2. Every other BN, and the features, are a plain forward's."""
    model = copy.deepcopy(built(name)).train()
    assert model.preact_bn_twice  # the default
    plain = copy.deepcopy(model)
    bns = model.get_bn_before_relu()
    seen = {}
    hooks = [bn.register_forward_pre_hook(lambda m, a, i=i: seen.setdefault(i, a[0].detach())) for i, bn in
             enumerate(bns)]  # fmt: skip
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in bns]
    with torch.no_grad():
        out = model(inputs(), is_feat=True, preact=True)
        plain.preact_bn_twice = False
        once = plain(inputs(), is_feat=True, preact=True)
    for hook in hooks:
        hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(out.feats, once.feats)) and torch.equal(out.logits, once.logits)
    keep = (1 - 0.1) ** 2
    for bn, (mean0, var0), i in zip(bns, before, range(3)):
        x = seen[i].double()
        mean, var = x.mean(dim=(0, 2, 3)), x.var(dim=(0, 2, 3), unbiased=True)
        torch.testing.assert_close(
            bn.running_mean.double(), keep * mean0.double() + (1 - keep) * mean, rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(
            bn.running_var.double(), keep * var0.double() + (1 - keep) * var, rtol=1e-5, atol=1e-6
        )
        assert bn.num_batches_tracked.item() == 2
    twice = {id(bn) for bn in bns}
    after_once = dict(plain.named_modules())
    for key, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d) and id(module) not in twice:
            assert torch.equal(module.running_mean, after_once[key].running_mean), key
            assert module.num_batches_tracked.item() == 1, key


def test_model_table_counts_resnet8_macs_by_hand():
    spec = importlib.util.spec_from_file_location("model_table", ROOT / "scripts" / "model_table.py")
    model_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(model_table)
    # Per conv: in * out * k * k * output pixels. Stem, layer1 (2 convs), layer2 and layer3 (2 convs at
    # stride 2 then 1, plus the 1x1 shortcut), fc.
    expected = (
        3 * 16 * 9 * 32 * 32
        + 2 * 16 * 16 * 9 * 32 * 32
        + (16 * 32 * 9 + 32 * 32 * 9 + 16 * 32) * 16 * 16
        + (32 * 64 * 9 + 64 * 64 * 9 + 32 * 64) * 8 * 8
        + 64 * 100
    )
    model = built("resnet8").train()
    assert model_table.count_macs(model) == expected == 12_507_392
    assert model.training


# ---------------------------------------------------------------------------------------- published teachers

TEACHERS = ["resnet20", "resnet32", "resnet44", "resnet56"]
# CIFAR-100 train statistics, the normalisation the teachers were evaluated with (teachers/README.md).
MEAN, STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)


@functools.cache
def cifar100_test_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    with (REAL_DATA / "cifar-100-python" / "test").open("rb") as f:
        data = pickle.load(f, encoding="latin1")
    x = torch.from_numpy(np.asarray(data["data"][:n])).view(n, 3, 32, 32).float() / 255
    x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    return x, torch.tensor(data["fine_labels"][:n])


@pytest.mark.parametrize("arch", [pytest.param(a, marks=needs_real_teachers(a)) for a in TEACHERS])
def test_published_teacher_loads_strictly_and_classifies_cifar100(arch):
    path = real_teacher(arch)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model(teacher_name_from_path(path))
    model.load_state_dict(checkpoint["model"], strict=True)
    x, y = cifar100_test_images(100)
    with torch.no_grad():
        logits = model.eval()(x)
    assert torch.isfinite(logits).all()
    # 68.8-72.6 % on the full test set (teachers/README.md), 67-71 % on these first 100 images; chance is 1 %.
    assert (logits.argmax(1) == y).float().mean().item() >= 0.6
