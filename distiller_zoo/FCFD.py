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
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import PairError, UsageError

from .base import Distiller, Shapes, register
from .DKD import linear_warmup
from .KD import DistillKL

__all__ = ["FCFDBridge", "batch_statistics", "candidate_paths", "fcfd_l2"]

Path = tuple[str, int]  # ("s2t" or "t2s", j): the first network's stem and stages 1..j, the other's after j


def candidate_paths(n_stages: int, direction: str) -> list[Path]:
    """The mixed paths to sample from (official ``MetaModel._create_candidate_path``): a switch after stage
    ``j`` for ``j`` in 1..n_stages-2 (``n_stages`` counts the stem); ``bi`` lists ``t2s`` before ``s2t``."""
    switches = range(1, n_stages - 1)
    t2s, s2t = [("t2s", j) for j in switches], [("s2t", j) for j in switches]
    return {"bi": t2s + s2t, "s2t": s2t, "t2s": t2s, "nomix": []}[direction]


class FCFDBridge(nn.Sequential):
    """Official ``MetaModel.build_bridge``: conv3x3 + BN, then LeakyReLU(0.1) because the target network reads
    post-activation stage outputs (``stage_input == "afterrelu"``, the CIFAR ResNets). A target map half the
    size: stride-2 conv (with bias, as the official ``nn.Conv2d`` default); twice the size: ConvTranspose 4/2/1."""

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
    when it cannot run the rest of the network from a stage (``forward_from``)."""
    while isinstance(getattr(model, "module", None), nn.Module) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model._orig_mod
    if not callable(getattr(model, "forward_from", None)):
        raise PairError(
            f"fcfd: the {side} ({type(model).__name__}) has no forward_from, the rest of the network from a stage; "
            "FCFD serves the CIFAR ResNets (resnet8-resnet110, resnet8x4, resnet32x4)"
        )
    return model


@register
class FCFDDistiller(Distiller):
    """FCFD on the stage outputs (``feats[1:-1]``; the stem is not bridged, as in the official ``MetaModel``).

    Per step: the appearance L2 of every stage (the bridged student map against the teacher's) and, for
    ``--fcfd_paths`` mixed paths drawn without replacement from ``candidate_paths`` (official ``--extra_paths 2``,
    ``--extra_type bi``, ``random.sample`` every step, as here), the function
    L2 of an ``s2t`` path's later teacher stages and the KL of its logits to the teacher's at ``--kd_T`` (both
    directions, the ``t2s`` logits from the student's classifier). The term is ``fcfd_l2_weight * warmup * L2 +
    fcfd_kl_weight * KL``; the official ``weight_l2`` warm-up is ``min(1, epoch / 20)`` (1-based epochs).

    Defaults: ``experiments/cifar/resnet8x4-resnet32x4.yaml`` of LiuDongyang6/FCFD: label weight 1, KL to the
    teacher 1 (``-a 1``), T 4, ``weight_l2`` 5, mixed-path KL weight 1; ``-b 1`` scales the whole term.

    The models must have ``forward_from(x, start, is_feat)`` (the rest of the network from a feature; the CIFAR
    ResNets), else :class:`PairError`. Mixed paths run the networks' BatchNorms on batch statistics without
    touching their running ones, as the official code does: its teacher stays in train mode (``freeze`` only
    clears ``requires_grad``). Deviations, on purpose: the teacher's own features and logits are the engine's
    (eval mode, running statistics; the official ones use batch statistics), and ``--fcfd_teacher_bn running``
    runs the teacher's later stages in eval mode too. The bridges used are built, not the official unused
    ones (teacher to student at the last stage), so the adapter count is smaller; the values are unchanged. The
    official SGD is Nesterov's; ours is RepDistiller's plain momentum. Under DDP see :meth:`_touch_unused`.
    """

    name = "fcfd"
    paper = "Function-Consistent Feature Distillation (ICLR 2023, OpenReview pgHNOcxEdRI)"
    defaults = {"gamma": 1.0, "alpha": 1.0, "beta": 1.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.n_stages = len(s_shapes) - 1  # stem + stages; the last entry of the feature list is the pooled vector
        last = self.n_stages - 1
        self.s2t = nn.ModuleList([FCFDBridge(s_shapes[s], t_shapes[s]) for s in range(1, last + 1)])
        self.t2s = nn.ModuleList([FCFDBridge(t_shapes[s], s_shapes[s]) for s in range(1, last)])
        self.kl = DistillKL(args.kd_T)
        self.candidates = candidate_paths(self.n_stages, args.fcfd_direction)
        self.n_paths, self.teacher_bn = args.fcfd_paths, args.fcfd_teacher_bn
        self.l2_weight, self.kl_weight, self.warmup_epochs = args.fcfd_l2_weight, args.fcfd_kl_weight, args.fcfd_warmup
        self.warmup = 1.0  # until the engine's first set_epoch
        self.__dict__["_nets"] = {}  # "student"/"teacher": (model, its BatchNorms); not submodules

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        if len(s_shapes) != len(t_shapes) or len(s_shapes) < 4:
            raise PairError(f"fcfd: student and teacher need the same number (>= 2) of stages, got {len(s_shapes) - 2}"
                            f" and {len(t_shapes) - 2}")  # fmt: skip
        n = len(candidate_paths(len(s_shapes) - 1, args.fcfd_direction))
        if not 0 <= args.fcfd_paths <= n:
            raise PairError(f"fcfd: --fcfd_paths {args.fcfd_paths} must be in 0..{n} (--fcfd_direction "
                            f"{args.fcfd_direction} has {n} mixed paths)")  # fmt: skip
        for s in range(1, len(s_shapes) - 1):
            FCFDBridge(s_shapes[s], t_shapes[s]), FCFDBridge(t_shapes[s], s_shapes[s])  # raise PairError

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
        for side, model in (("student", student), ("teacher", teacher)):
            _rest_of_network(side, model)

    def bind_teacher(self, teacher: nn.Module) -> None:
        """Keep a frozen copy (called before the engine folds the teacher's BatchNorms: the copy keeps them; its
        BN modes change for mixed paths without touching the engine's teacher). Not a submodule: not saved."""
        copied = copy.deepcopy(_rest_of_network("teacher", teacher)).requires_grad_(False).eval()
        self._bind("teacher", copied)

    def bind_student(self, student: nn.Module) -> None:
        self._bind("student", student)

    def _bind(self, side: str, model: nn.Module) -> None:
        model = _rest_of_network(side, model)
        bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self._nets[side] = (model, bns)

    def set_epoch(self, epoch: int, stage: str) -> None:
        self.warmup = linear_warmup(epoch, self.warmup_epochs)

    def sample_paths(self) -> list[Path]:
        """Official ``random.sample(self.extra_path_list, extra_path_num)``: Python's generator (seeded by the
        engine, saved in checkpoints), nothing read from a tensor."""
        return random.sample(self.candidates, self.n_paths)

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return self.loss(out_s.feats, out_t.feats, out_t.logits, self.sample_paths())

    def loss(self, f_s: Sequence[torch.Tensor], f_t: Sequence[torch.Tensor], z_t: torch.Tensor,
             paths: Sequence[Path]) -> torch.Tensor:  # fmt: skip
        """The term for given mixed ``paths``: ``f_s``/``f_t`` are the feature lists (stem, stages, pooled),
        ``z_t`` the teacher's logits (B, K)."""
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

    def _rest(self, side: str, x: torch.Tensor, start: int) -> Any:
        """``side``'s network after feature ``start`` on ``x``, its BatchNorms on batch statistics (the teacher's
        on running ones with ``--fcfd_teacher_bn running``)."""
        if side not in self._nets:
            raise RuntimeError("fcfd: call bind_teacher(teacher) and bind_student(student) before training")
        model, bns = self._nets[side]
        if side == "teacher" and next(model.parameters()).device != x.device:
            model.to(x.device)  # bound before the engine moved the teacher to the device
        running = side == "teacher" and self.teacher_bn == "running"
        if running and model.training:
            model.eval()
        with contextlib.nullcontext() if running else batch_statistics(bns):
            return model.forward_from(x, start, is_feat=True)
