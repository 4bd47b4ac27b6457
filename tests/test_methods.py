"""Every registered distillation method on the benchmark's teacher/student pairs: it refuses exactly the
pairs it cannot serve, with a useful message, or builds, and one training step gives a finite loss whose
gradient reaches the student and the method's own trainable modules, never the teacher."""

from __future__ import annotations

import re
import sys

import pytest
import torch
from torch import nn

import distiller_zoo
import models
from dataset import DeviceLoader
from dataset.batch import Batch
from distiller_zoo import PairError, get_method, method_names
from distiller_zoo.base import Distiller, default_args, parameters_of
from helper.engine import teacher_forward

# Teacher -> student pairs of RepDistiller's tables 1 and 2 (reference section 1.4), across all families.
PAIRS = [
    ("resnet56", "resnet20"),
    ("wrn_40_2", "wrn_40_1"),
    ("resnet32x4", "resnet8x4"),
    ("vgg13", "vgg8"),
    ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"),
    ("resnet32x4", "ShuffleV1"),
    ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
]
SAME_CHANNELS = {("resnet56", "resnet20"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8")}
# Pairs each method must refuse (all others it must serve). FSP needs equal channel counts at every map
# ("N/A" in RepDistiller's tables for wrn_40_2 -> wrn_40_1 and the cross-family pairs); so does KD-SVD,
# which matches singular vectors over channels.
# CAT-KD needs the last map to be the one the classifier pools: not MobileNetV2 or ShuffleV2 (a 1x1 conv between).
EXPECTED_REFUSALS = {
    "fsp": set(PAIRS) - SAME_CHANNELS,
    "kdsvd": set(PAIRS) - SAME_CHANNELS,
    "catkd": {("vgg13", "MobileNetV2"), ("ResNet50", "MobileNetV2"), ("resnet32x4", "ShuffleV2")},
}
# Untrained teachers are never confident: CRLD's confidence masks would drop every sample (a zero loss).
# WKD-L: its class cost from the teacher's classifier (cheap); the CKA cost over the training images (about 30 s
# to minutes per pair on a CPU) has its own tests in test_sdd_wkd_dot.py.
METHOD_ARGS = {"crld": {"crld_tau_w": 0.0, "crld_tau_s": 0.0}, "wkd_l": {"wkd_cost": "fc"}}
# FCFD: every mixed path (4 on 3-stage pairs, 6 on 4-stage ones; shapes: stem, stages, pooled), so that every bridge
# is used in the one step (two are drawn per step by default).
PAIR_ARGS = {"fcfd": lambda s_shapes: {"fcfd_paths": 2 * (len(s_shapes) - 3)}}
# ND: random positive class centers instead of its teacher pass over the training images (5-50 s per pair on a
# CPU), which tests/test_nd.py checks against a hand computation.
PREPARED = {"nd": lambda method, t_shapes: method.set_centers(torch.rand(100, t_shapes[-1][0]) + 0.1)}

REPDISTILLER_METHODS = {
    "kd", "hint", "attention", "similarity", "correlation", "vid", "rkd", "pkt",
    "abound", "factor", "fsp", "nst", "kdsvd", "crd",
}  # fmt: skip

BATCH, N_DATA, NCE_K = 4, 64, 8
TRAIN_IMAGES = torch.randint(256, (100, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def zoo() -> dict[str, nn.Module]:
    """Models built once per module (ResNet50 and vgg13 are slow to build on CPU)."""
    torch.manual_seed(0)
    return {name: models.create_model(name) for pair in PAIRS for name in pair}


@pytest.fixture(scope="module")
def shapes(zoo: dict[str, nn.Module]):
    """``models.feature_shapes`` per (model, preact), computed once."""
    cache = {}

    def get(name: str, preact: bool = False) -> list[torch.Size]:
        if (name, preact) not in cache:
            cache[name, preact] = models.feature_shapes(zoo[name], preact=preact)
        return cache[name, preact]

    return get


@pytest.fixture(scope="module")
def batch() -> Batch:
    g = torch.Generator().manual_seed(1)
    index = torch.randperm(N_DATA, generator=g)[:BATCH]
    contrast_idx = torch.randint(N_DATA, (BATCH, NCE_K + 1), generator=g)
    contrast_idx[:, 0] = index
    return Batch(
        input=torch.randn(BATCH, 3, 32, 32, generator=g),
        target=torch.randint(100, (BATCH,), generator=g),
        index=index,
        contrast_idx=contrast_idx,
    )


@pytest.fixture(scope="module")
def teacher_outputs(zoo: dict[str, nn.Module], batch: Batch) -> dict:
    """Teacher outputs per (teacher, preact), computed as the engine does: eval, inference mode, cloned."""
    cache = {}

    def get(name: str, preact: bool) -> models.FeatureOutput:
        if (name, preact) not in cache:
            teacher = zoo[name].eval()
            with torch.inference_mode():
                out = teacher(batch.input, is_feat=True, preact=preact)
            cache[name, preact] = models.FeatureOutput([f.clone() for f in out.feats], out.logits.clone())
        return cache[name, preact]

    return get


def test_registry_has_every_repdistiller_method() -> None:
    assert set(method_names()) >= REPDISTILLER_METHODS


@pytest.mark.parametrize("name", method_names())
def test_method_declarations(name: str) -> None:
    cls = get_method(name)
    assert cls.name == name
    # Title and venue with its year (not every paper has an arXiv id: FSP, CVPR 2017, has none).
    assert len(cls.paper) > 20 and re.search(r"20\d\d", cls.paper), cls.paper
    assert {"gamma", "alpha", "beta"} <= set(cls.defaults)
    assert all(w >= 0 for w in cls.defaults.values())
    # A method with no term of its own must not ask for one by default.
    assert cls.has_loss or cls.init_stage or cls.defaults["beta"] == 0


@pytest.mark.parametrize("name", method_names())
def test_method_file_opens_with_the_registered_paper(name: str) -> None:
    # The first paragraph of the method's file cites the paper the registry names: its arXiv id, else its year.
    cls = get_method(name)
    first = (sys.modules[cls.__module__].__doc__ or "").strip().split("\n\n")[0]
    ids = re.findall(r"\d{4}\.\d{4,5}", cls.paper)
    year = re.search(r"20\d\d", cls.paper).group()
    assert all(i in first for i in ids) if ids else year in first, (cls.paper, first[:200])


def nonzero_grad(module: nn.Module) -> bool:
    """Some trainable parameter got a non-zero gradient (true of a module with none, e.g. identities)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return not params or any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def check_student_and_modules(student: nn.Module, modules: list[nn.Module], what: str) -> None:
    # The stem's weights come first in every model of the zoo; every method's features depend on them.
    stem = next(student.parameters())
    assert stem.grad is not None and stem.grad.abs().sum() > 0, f"{what}: no gradient at the student's stem"
    for module in modules:
        assert nonzero_grad(module), f"{what}: no gradient in {type(module).__name__}"
        for p in module.parameters():
            if p.requires_grad:
                assert p.grad is not None and torch.isfinite(p.grad).all(), f"{what}: {type(module).__name__}"


@pytest.mark.parametrize(("teacher_name", "student_name"), PAIRS, ids=[f"{t}-{s}" for t, s in PAIRS])
@pytest.mark.parametrize("name", method_names())
def test_method_on_pair(name, teacher_name, student_name, zoo, shapes, batch, teacher_outputs, tmp_path) -> None:
    cls = get_method(name)
    teacher, student = zoo[teacher_name], zoo[student_name]
    s_shapes, t_shapes = shapes(student_name, cls.preact), shapes(teacher_name, cls.preact)
    args = default_args(nce_k=NCE_K, **METHOD_ARGS.get(name, {}), **PAIR_ARGS.get(name, lambda _: {})(s_shapes))

    try:
        cls.check_pair(s_shapes, t_shapes, args)
        cls.check_models(student, teacher, args)
    except PairError as err:
        message = str(err)
        assert (teacher_name, student_name) in EXPECTED_REFUSALS.get(name, set()), f"unexpected: {message}"
        # The message names what does not fit: at least one of the shapes' sizes, and a side or the method.
        assert re.search(r"\d", message) and re.search(rf"student|teacher|{name}", message), message
        return
    assert (teacher_name, student_name) not in EXPECTED_REFUSALS.get(name, set()), "should have refused"

    torch.manual_seed(2)
    method = cls(s_shapes, t_shapes, args, N_DATA)
    contrast = batch if cls.needs_contrast else batch._replace(contrast_idx=None)
    student.train()
    method.train()
    teacher.zero_grad(set_to_none=True)
    out_t = teacher_outputs(teacher_name, cls.preact)
    bind_teacher = getattr(method, "bind_teacher", None)  # methods that read the teacher's modules
    if bind_teacher:
        bind_teacher(teacher)
    if type(method).bind_student is not Distiller.bind_student:  # SDD: hooks on both networks
        method.bind_student(student)
        out_t = teacher_forward(teacher, batch.input, cls.preact)  # a fresh forward, seen by the hook
    if method.preact != cls.preact:  # FCFD: the teacher's family's stages are its pre-activation features (VGG)
        out_t = teacher_outputs(teacher_name, method.preact)
    if name in PREPARED:
        PREPARED[name](method, t_shapes)
    elif cls.needs_train_pass:  # WKD-L: the teacher over the (here: random, one per class) training images
        method.prepare(teacher, DeviceLoader(TRAIN_IMAGES, torch.arange(100), 50, "cpu", train=False), tmp_path)
    if cls.init_stage:
        method.set_stage("init")
        method.set_epoch(1, "init")
        student.zero_grad(set_to_none=True)
        method.zero_grad(set_to_none=True)
        loss = method.init_loss(student(batch.input, is_feat=True, preact=cls.preact), out_t, contrast)
        assert loss.shape == () and torch.isfinite(loss), loss
        loss.backward()
        init_modules = method.init_modules(student)
        assert any(parameters_of([m]) for m in init_modules), "an init stage trains something"
        for module in init_modules:
            assert nonzero_grad(module), f"init: no gradient in {type(module).__name__}"
        method.set_stage("main")

    method.set_epoch(1, "main")
    student.zero_grad(set_to_none=True)
    method.zero_grad(set_to_none=True)
    loss = method(student(batch.input, is_feat=True, preact=method.student_preact), out_t, contrast)
    assert loss.shape == () and torch.isfinite(loss), loss
    if method.has_loss:
        loss.backward()
        check_student_and_modules(student, method.trainable_modules(), name)
    else:
        # No term of its own: the engine never calls forward. Only an init-stage method or plain KD
        # (whose forward is the KL term that the engine adds through alpha) may say so.
        assert cls.init_stage or name == "kd"
        assert not parameters_of(method.trainable_modules())
    assert all(p.grad is None for p in teacher.parameters()), "gradient reached the teacher"
    deployed = method.deploy(student)
    if deployed is not None:
        with torch.no_grad():
            assert deployed.eval()(batch.input).shape == (BATCH, 100)


def test_kd_forward_is_the_kl_term(zoo, shapes, batch, teacher_outputs) -> None:
    cls = get_method("kd")
    student = zoo["resnet20"]
    method = cls(shapes("resnet20"), shapes("resnet56"), default_args(kd_T=3.0), N_DATA)
    out_s = student(batch.input, is_feat=True)
    out_t = teacher_outputs("resnet56", False)
    expected = distiller_zoo.DistillKL(3.0)(out_s.logits, out_t.logits)
    torch.testing.assert_close(method(out_s, out_t, batch), expected)


@pytest.mark.parametrize(
    ("hint_layer", "pattern"), [(4, r"--hint_layer 4 .*pooled"), (7, r"--hint_layer 7 is out of range")]
)
def test_hint_refuses_bad_layer_naming_the_flag(shapes, hint_layer: int, pattern: str) -> None:
    cls = get_method("hint")
    with pytest.raises(PairError, match=pattern):
        cls.check_pair(shapes("resnet20"), shapes("resnet56"), default_args(hint_layer=hint_layer))


def test_hint_transposed_regressor_for_cross_family_pair(shapes) -> None:
    # ResNet50 -> MobileNetV2 at hint layer 2: teacher 512x16x16, student 16x8x8 (reference section 2.2).
    cls = get_method("hint")
    method = cls(shapes("MobileNetV2"), shapes("ResNet50"), default_args(), N_DATA)
    assert isinstance(method.regressor.conv, nn.ConvTranspose2d)
    assert tuple(method.regressor.conv.weight.shape) == (16, 512, 4, 4)
