"""FCFD: "Function-Consistent Feature Distillation", Dongyang Liu, Meina Kan, Shiguang Shan and Xilin Chen,
ICLR 2023, OpenReview pgHNOcxEdRI (official code: LiuDongyang6/FCFD).

Loss: bridges (conv + BN) map each stage's features between the student's and the teacher's spaces; the
bridged student features must match the teacher's (appearance, L2), and so must what the teacher's later
stages make of them (function, L2 at every later stage, pooled at the last), while the logits of mixed
paths (the student's early stages and the teacher's later ones, or the other way round) are distilled from
the teacher's logits (KL).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import PairError, UsageError
from models import FeatureOutput

from .base import Distiller, Shapes, get_method, register
from .DKD import linear_warmup
from .KD import DistillKL

__all__ = ["FAMILIES", "FCFDBridge", "batch_statistics", "candidate_paths", "fcfd_l2", "stage_shapes"]

Path = tuple[str, int]  # ("s2t" or "t2s", j): the first network's stem and stages 1..j, the other's after j


def candidate_paths(n_stages: int, direction: str) -> list[Path]:
    """The mixed paths to sample from (official ``MetaModel._create_candidate_path``): a switch after stage
    ``j`` for ``j`` in 1..n_stages-2 (``n_stages`` counts the stem); ``bi`` lists ``t2s`` before ``s2t``."""
    switches = range(1, n_stages - 1)
    t2s, s2t = [("t2s", j) for j in switches], [("s2t", j) for j in switches]
    return {"bi": t2s + s2t, "s2t": s2t, "t2s": t2s, "nomix": []}[direction]


class FCFDBridge(nn.Sequential):
    """Official ``MetaModel.build_bridge``: conv3x3 + BN, then LeakyReLU(0.1) where the target network reads
    post-activation stage outputs (``stage_input == "afterrelu"``: the ResNets, ShuffleV2), nothing otherwise
    (:meth:`set_activation`, parameter-free, called when the method is bound to the networks). A target map half
    the size: stride-2 conv (with bias, as the official ``nn.Conv2d`` default); twice the size: ConvTranspose
    4/2/1."""

    def __init__(self, src: torch.Size, dst: torch.Size) -> None:
        (c_in, h_in, _), (c_out, h_out, _) = src, dst
        if h_in == h_out:
            conv: nn.Module = nn.Conv2d(c_in, c_out, 3, stride=1, padding=1, bias=False)
        elif h_in == 2 * h_out:
            conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)
        elif 2 * h_in == h_out:
            conv = nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
        else:
            raise PairError(f"fcfd: no bridge from a {h_in}x{h_in} map to a {h_out}x{h_out} one (sizes equal or x2)")
        super().__init__(conv, nn.BatchNorm2d(c_out), nn.LeakyReLU(0.1))
        if isinstance(conv, nn.Conv2d):  # the official init loop reaches Conv2d only, not ConvTranspose2d
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def set_activation(self, after_relu: bool) -> None:
        """LeakyReLU(0.1) last when the target's stage outputs are post-activation, else none (no state)."""
        self[2] = nn.LeakyReLU(0.1) if after_relu else nn.Identity()


@dataclass(frozen=True)
class Family:
    """How the official code cuts a model family into stages (``classification/models/*.py``, ``stage_forward``
    and ``stage_input``, LiuDongyang6/FCFD @ 2aefb7b). ``after_relu``: bridges into it end in a LeakyReLU;
    ``preact``: its stage outputs are taken before their ReLU (our ``preact=True`` features; its stages open
    with the ReLU); ``head``: its last stage runs on to the map the classifier pools (``model.head``: before
    that map's ReLU unless ``after_relu``)."""

    after_relu: bool
    preact: bool
    head: bool


FAMILIES = {
    "ResNet": Family(True, False, False),  # resnet.py, resnetv2.py "afterrelu" (CIFAR ResNets, ResNet50)
    "WideResNet": Family(False, False, True),  # wrn.py "beforebn": raw residual streams, the last through bn1
    "VGG": Family(False, True, False),  # vgg.py "beforerelu": block outputs before their ReLU
    "MobileNetV2": Family(False, False, True),  # mobilenetv2.py "beforerelu": the last through conv2's BN
    "ShuffleNet": Family(False, True, False),  # ShuffleNetv1.py "beforerelu": the units' sums before the ReLU
    "ShuffleNetV2": Family(True, False, True),  # ShuffleNetv2.py "afterrelu": the last through conv2, bn2, ReLU
}


def stage_shapes(shapes: Shapes) -> list[torch.Size]:
    """The feature shapes (stem, stages, pooled) with the last stage's as the official one, the map the
    classifier pools: the pooled vector's channels at the last stage's size (MobileNetV2's 1280 channels, not
    160; ShuffleV2's 1024, not 464; the same shape for the other families)."""
    last = torch.Size([shapes[-1][0], *shapes[-2][1:]])
    return [*shapes[:-2], last, shapes[-1]]


@contextlib.contextmanager
def batch_statistics(bns: Sequence[nn.BatchNorm2d]) -> Iterator[None]:
    """BatchNorms normalise with the batch's statistics and leave their running ones alone (the official
    ``GhostForward`` keeps a mixed path's running statistics apart from the network's own; only its validation of
    mixed paths reads them, so none are kept here). Restores each module's mode afterwards."""
    saved = [(bn.training, bn.track_running_stats) for bn in bns]
    for bn in bns:
        bn.training, bn.track_running_stats = True, False
    try:
        yield
    finally:
        for bn, (training, track) in zip(bns, saved):
            bn.training, bn.track_running_stats = training, track


def fcfd_l2(maps: Sequence[torch.Tensor], target: torch.Tensor, last: bool) -> torch.Tensor:
    """Official ``train_one_epoch``'s L2 at one stage: ``sum_m mse(m, target)``, at the last stage plus
    ``mse(pool(relu(m)), pool(relu(target)))`` (global average pooling); ``F.mse_loss`` averages all elements."""
    loss = sum(F.mse_loss(m, target) for m in maps)
    if last:
        pooled = target.relu().mean(dim=(2, 3))  # (B, C)
        loss = loss + sum(F.mse_loss(m.relu().mean(dim=(2, 3)), pooled) for m in maps)
    return loss


def _rest_of_network(side: str, model: nn.Module) -> nn.Module:
    """The zoo model under DDP (``.module``) or ``torch.compile`` (``._orig_mod``) wrappers; :class:`PairError`
    when it cannot run the rest of the network from a stage (``forward_from``) or is of no family the official
    code cuts into stages (:data:`FAMILIES`)."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model._orig_mod
    name = type(model).__name__
    if not callable(getattr(model, "forward_from", None)) or name not in FAMILIES:
        raise PairError(
            f"fcfd: the {side} ({name}) has no forward_from, the rest of the network from a stage, or no official "
            f"stage definition; FCFD serves the zoo's families ({', '.join(FAMILIES)})"
        )
    if FAMILIES[name].head and not callable(getattr(model, "head", None)):
        raise PairError(f"fcfd: the {side} ({name}) has no head(), the map its classifier pools")
    return model


@register
class FCFDDistiller(Distiller):
    """FCFD on the official stage outputs (the stem is not bridged, as in the official ``MetaModel``).

    Per step: the appearance L2 of every stage (the bridged student map against the teacher's) and, for
    ``--fcfd_paths`` mixed paths drawn without replacement from ``candidate_paths`` (official ``--extra_paths 2``,
    ``--extra_type bi``, ``random.sample`` every step, as here), the function
    L2 of an ``s2t`` path's later teacher stages and the KL of its logits to the teacher's at ``--kd_T`` (both
    directions, the ``t2s`` logits from the student's classifier). The term is ``fcfd_l2_weight * warmup * L2 +
    fcfd_kl_weight * KL``; the official ``weight_l2`` warm-up is ``min(1, epoch / 20)`` (1-based epochs).

    The stages are the official ones per family (:data:`FAMILIES`): the features ``feats[1:-1]`` of our forward
    (before their ReLU for VGG and ShuffleV1, whose stage outputs the official code takes there: the method asks
    the engine for those networks' ``preact`` features), except that the official last stage of WRN,
    MobileNetV2 and ShuffleV2 runs on to the map the classifier pools (:meth:`stage_features`: ``model.head`` of
    our last stage output, on the student under batch statistics without a second running-statistics update).

    Defaults: ``experiments/cifar/resnet8x4-resnet32x4.yaml`` of LiuDongyang6/FCFD: label weight 1, KL to the
    teacher 1 (``-a 1``), T 4, ``weight_l2`` 5, mixed-path KL weight 1; ``-b 1`` scales the whole term.

    The models must have ``forward_from(x, start, is_feat, preact)`` (the rest of the network from a feature:
    every family of the zoo), else :class:`PairError`. Mixed paths run the networks' BatchNorms on batch
    statistics without touching their running ones, as the official code does: its teacher stays in train mode
    (``freeze`` only clears ``requires_grad``). Deviations, on purpose: the teacher's own features and logits are
    the engine's (eval mode, running statistics; the official ones use batch statistics), and
    ``--fcfd_teacher_bn running`` runs the teacher's later stages in eval mode too. The bridges used are built,
    not the official unused ones (teacher to student at the last stage), so the adapter count is smaller; the
    values are unchanged. The official SGD is Nesterov's; ours is RepDistiller's plain momentum. Under DDP see
    :meth:`_touch_unused`.
    """

    name = "fcfd"
    paper = "Function-Consistent Feature Distillation (ICLR 2023, OpenReview pgHNOcxEdRI)"
    defaults = {"gamma": 1.0, "alpha": 1.0, "beta": 1.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.n_stages = len(s_shapes) - 1  # stem + stages; the last entry of the feature list is the pooled vector
        last = self.n_stages - 1
        s_shapes, t_shapes = stage_shapes(s_shapes), stage_shapes(t_shapes)
        self.s2t = nn.ModuleList([FCFDBridge(s_shapes[s], t_shapes[s]) for s in range(1, last + 1)])
        self.t2s = nn.ModuleList([FCFDBridge(t_shapes[s], s_shapes[s]) for s in range(1, last)])
        self.kl = DistillKL(args.kd_T)
        self.candidates = candidate_paths(self.n_stages, args.fcfd_direction)
        self.n_paths, self.teacher_bn = args.fcfd_paths, args.fcfd_teacher_bn
        self.l2_weight, self.kl_weight, self.warmup_epochs = args.fcfd_l2_weight, args.fcfd_kl_weight, args.fcfd_warmup
        self.warmup = 1.0  # until the engine's first set_epoch
        self.preact, self.student_preact = False, False  # per network family, set when bound
        self.__dict__["_nets"] = {}  # "student"/"teacher": (model, its BatchNorms, Family); not submodules

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        if len(s_shapes) != len(t_shapes) or len(s_shapes) < 4:
            raise PairError(f"fcfd: student and teacher need the same number (>= 2) of stages, got {len(s_shapes) - 2}"
                            f" and {len(t_shapes) - 2}")  # fmt: skip
        n = len(candidate_paths(len(s_shapes) - 1, args.fcfd_direction))
        if not 0 <= args.fcfd_paths <= n:
            raise PairError(f"fcfd: --fcfd_paths {args.fcfd_paths} must be in 0..{n} (--fcfd_direction "
                            f"{args.fcfd_direction} has {n} mixed paths)")  # fmt: skip
        for src, dst in zip(stage_shapes(s_shapes)[1:-1], stage_shapes(t_shapes)[1:-1]):
            h_s, h_t = src[1], dst[1]
            if h_s != h_t and 2 * h_s != h_t and h_s != 2 * h_t:
                raise PairError(f"fcfd: no bridge between a {h_s}x{h_s} map and a {h_t}x{h_t} one (sizes equal or x2)")

    @classmethod
    def validate(cls, args: Any) -> None:
        for name in ("fcfd_l2_weight", "fcfd_kl_weight", "fcfd_warmup"):
            if not getattr(args, name) >= 0:
                raise UsageError(f"fcfd: --{name} must be >= 0, got {getattr(args, name)}")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("FCFD")
        group.add_argument("--fcfd_paths", type=int, default=2, help="FCFD: mixed paths per step (official 2)")
        group.add_argument("--fcfd_direction", default="bi", choices=["bi", "s2t", "t2s", "nomix"],
                           help="FCFD: which mixed paths (official --extra_type bi)")  # fmt: skip
        group.add_argument("--fcfd_l2_weight", type=float, default=5.0, help="FCFD: weight of the L2 terms (5)")
        group.add_argument("--fcfd_kl_weight", type=float, default=1.0, help="FCFD: weight of mixed paths' KL (1)")
        group.add_argument("--fcfd_warmup", type=float, default=20, help="FCFD: epochs of the L2 warm-up (20)")
        group.add_argument("--fcfd_teacher_bn", default="batch", choices=["batch", "running"],
                           help="FCFD: BN statistics of the teacher on bridged maps (official: batch)")  # fmt: skip

    @classmethod
    def check_models(cls, student: nn.Module, teacher: nn.Module, args: Any) -> None:
        """Both networks of a family in :data:`FAMILIES`; with a ``preact`` family (VGG, ShuffleV1) no ``--add``
        of a method that reads the stage features (it would get FCFD's pre-activation ones)."""
        nets = {side: _rest_of_network(side, model) for side, model in (("student", student), ("teacher", teacher))}
        preact = [type(m).__name__ for m in nets.values() if FAMILIES[type(m).__name__].preact]
        if preact and getattr(args, "add", None):
            from .combine import parse_added  # a late import: combine imports the registry

            readers = [n for n, _ in parse_added(args.add, cls.name) if not get_method(n).pooled_only]
            if readers:
                raise PairError(f"fcfd: --add {', '.join(readers)} cannot share the forward pass: FCFD reads the "
                                f"pre-activation stage features of {' and '.join(preact)}")  # fmt: skip

    def bind_teacher(self, teacher: nn.Module) -> None:
        """Keep a frozen copy (called before the engine folds the teacher's BatchNorms: the copy keeps them; its
        BN modes change for mixed paths without touching the engine's teacher). Not a submodule: not saved.
        The engine then asks the teacher for pre-activation features if its family's stages are those."""
        copied = copy.deepcopy(_rest_of_network("teacher", teacher)).requires_grad_(False).eval()
        family = self._bind("teacher", copied)
        self.preact = family.preact
        for bridge in self.s2t:
            bridge.set_activation(family.after_relu)

    def bind_student(self, student: nn.Module) -> None:
        family = self._bind("student", student)
        self.student_preact = family.preact
        for bridge in self.t2s:
            bridge.set_activation(family.after_relu)

    def _bind(self, side: str, model: nn.Module) -> Family:
        model = _rest_of_network(side, model)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._nets[side] = (model, bns, FAMILIES[type(model).__name__])
        return self._nets[side][2]

    def set_epoch(self, epoch: int, stage: str) -> None:
        self.warmup = linear_warmup(epoch, self.warmup_epochs)

    def sample_paths(self) -> list[Path]:
        """Official ``random.sample(self.extra_path_list, extra_path_num)``: Python's generator (seeded by the
        engine, saved in checkpoints), nothing read from a tensor."""
        return random.sample(self.candidates, self.n_paths)

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        f_s, f_t = self.stage_features("student", out_s.feats), self.stage_features("teacher", out_t.feats)
        return self.loss(f_s, f_t, out_t.logits, self.sample_paths())

    def stage_features(self, side: str, feats: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``side``'s feature list (stem, stages, pooled) with the official last stage: for a family with a
        ``head``, ``model.head`` of our last stage output, on the student with batch statistics (its values in
        train mode, no second update of the running ones) and on the teacher with running ones (as the engine's
        eval-mode features). Unchanged for the other families."""
        model, bns, family = self._net(side, feats[-2].device)
        if not family.head:
            return list(feats)
        if side == "student":
            with batch_statistics(bns):
                last = model.head(feats[-2], preact=not family.after_relu)
        else:
            with torch.no_grad():
                last = model.eval().head(feats[-2], preact=not family.after_relu)
        return [*feats[:-2], last, feats[-1]]

    def loss(self, f_s: Sequence[torch.Tensor], f_t: Sequence[torch.Tensor], z_t: torch.Tensor,
             paths: Sequence[Path]) -> torch.Tensor:  # fmt: skip
        """The term for given mixed ``paths``: ``f_s``/``f_t`` are the feature lists with the official stages
        (stem, stages, pooled: :meth:`stage_features`), ``z_t`` the teacher's logits (B, K)."""
        last = self.n_stages - 1
        bridged = {s: bridge(f_s[s]) for s, bridge in enumerate(self.s2t, start=1)}  # student maps, teacher space
        maps = {s: [bridged[s]] for s in bridged}  # every map compared with the teacher's at stage s
        kl = z_t.new_zeros((), dtype=torch.float32)
        for direction, j in paths:
            if direction == "s2t":  # the student's stages 1..j, then the teacher's
                out = self._rest("teacher", bridged[j], j)
                for s, m in zip(range(j + 1, last + 1), out.feats):
                    maps[s].append(m)
            else:  # the teacher's stages 1..j, then the student's
                out = self._rest("student", self.t2s[j - 1](f_t[j]), j)
            kl = kl + self.kl(out.logits, z_t)
        l2 = sum(fcfd_l2(maps[s], f_t[s].detach(), s == last) for s in maps)
        return self.l2_weight * self.warmup * l2 + self.kl_weight * kl + self._touch_unused(paths)

    def _touch_unused(self, paths: Sequence[Path]) -> torch.Tensor | float:
        """Under DistributedDataParallel (``static_graph``: the same parameters in every step's graph), the bridges
        of the paths not drawn enter with weight 0; on one process they get no gradient, as in the official code
        (so SGD's weight decay and momentum skip them that step)."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return 0.0
        unused = [p.sum() for j, b in enumerate(self.t2s, start=1) if ("t2s", j) not in paths for p in b.parameters()]
        return 0.0 * torch.stack(unused).sum() if unused else 0.0

    def _net(self, side: str, device: torch.device) -> tuple[nn.Module, list[nn.Module], Family]:
        if side not in self._nets:
            raise RuntimeError("fcfd: call bind_teacher(teacher) and bind_student(student) before training")
        model, bns, family = self._nets[side]
        if side == "teacher" and next(model.parameters()).device != device:
            model.to(device)  # bound before the engine moved the teacher to the device
        return model, bns, family

    def _rest(self, side: str, x: torch.Tensor, start: int) -> Any:
        """``side``'s network after feature ``start`` on ``x``, its BatchNorms on batch statistics (the teacher's
        on running ones with ``--fcfd_teacher_bn running``): logits and the later stages' official outputs."""
        model, bns, family = self._net(side, x.device)
        running = side == "teacher" and self.teacher_bn == "running"
        if running and model.training:
            model.eval()
        with contextlib.nullcontext() if running else batch_statistics(bns):
            out = model.forward_from(x, start, is_feat=True, preact=family.preact)
            if family.head and side == "teacher":  # the t2s paths read only the logits
                *stages, last, pooled = out.feats
                out = FeatureOutput([*stages, model.head(last, preact=not family.after_relu), pooled], out.logits)
        return out
