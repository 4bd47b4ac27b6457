"""AB: Heo, Lee, Yun and Choi, "Knowledge Transfer via Distillation of Activation Boundaries Formed by
Hidden Neurons", AAAI 2019, arXiv 1811.03233.

Loss in words: a hinge-like squared loss that pushes each student pre-activation to the same side of
zero as the teacher's, by a margin, so that the student's neurons switch on and off where the
teacher's do.

Recipe (RepDistiller, and the authors' code bhheo/AB_distillation): the AB loss is an initialisation.
For ``--init_epochs`` epochs it trains the Connector and the student body
(``student.get_feat_modules()``) on the pre-activation stage maps ``feats[1:-1]``; the main stage is
then plain CE (+ KD with ``-a``): the AB term is 0, so ``-b`` has no effect (``has_loss = False``), and
the Connector stays in eval mode, out of the optimizer. ``--ab_main_stage`` is an option of this
project, in neither the paper nor RepDistiller: it keeps ``beta * AB`` in the main stage and keeps
training the Connector there.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from common.errors import PairError

from .base import Distiller, Shapes, register
from .FitNet import ConvReg

__all__ = ["ABLoss", "Connector", "AB"]


class ABLoss(nn.Module):
    """RepDistiller's ``ABLoss(feat_num, margin=1.0)``; ``forward(g_s, g_t)`` returns one loss per layer.

    Per layer, over all elements of the (connected) student map s and the teacher map t:
    ``(s + m)^2 [s > -m and t <= 0] + (s - m)^2 [s <= m and t > 0]``, summed, times the layer weight
    ``2^(i - n + 1)`` (the deepest layer weighs 1, each shallower one half as much), divided by the batch
    size and multiplied by 3/1000. Margin 1, the halving weights and 3/1000 are those of the authors'
    cifar10_AB_distillation.py.
    """

    def __init__(self, feat_num: int, margin: float = 1.0) -> None:
        super().__init__()
        self.w = [2.0 ** (i - feat_num + 1) for i in range(feat_num)]
        self.margin = margin

    def forward(self, g_s: Sequence[torch.Tensor], g_t: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        bsz = g_s[0].shape[0]
        return [w * self.criterion_alternative_l2(s, t) / bsz * 3 / 1000 for w, s, t in zip(self.w, g_s, g_t)]

    def criterion_alternative_l2(self, source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The paper's alternative loss: a student value already past the margin on the teacher's side
        contributes nothing; teacher values of exactly 0 count as "off"."""
        m = self.margin
        off = (source > -m) & (target <= 0)  # teacher off, student not yet below -m
        on = (source <= m) & (target > 0)  # teacher on, student not yet above m
        return ((source + m).pow(2) * off + (source - m).pow(2) * on).sum()


class Connector(nn.Module):
    """RepDistiller's ``Connector(s_shapes, t_shapes)``: per layer, the identity when the student's map
    already has the teacher's channels and height, else ``ConvReg(use_relu=False)`` (conv + BN), so the
    connected map can take either sign like the teacher's pre-activations.

    Shapes are per-sample ``(C, H, W)`` or RepDistiller's ``(N, C, H, W)``.
    """

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes) -> None:
        super().__init__()
        if len(s_shapes) != len(t_shapes):
            raise PairError(f"Connector: {len(s_shapes)} student maps but {len(t_shapes)} teacher maps")
        self.connectors = nn.ModuleList(
            nn.Identity() if s[-3:-1] == t[-3:-1] else ConvReg(s, t, use_relu=False) for s, t in zip(s_shapes, t_shapes)
        )

    def forward(self, g_s: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [connect(f) for connect, f in zip(self.connectors, g_s)]  # each (B, C_t, H_t, W_t)


@register
class AB(Distiller):
    """``--distill abound``: AB on the pre-activation stage maps ``feats[1:-1]``, with an init stage.

    Stages (the base class's :meth:`set_stage`, entered by the engine every epoch):

    * ``"init"``: the Connector is trainable and follows ``train()``/``eval()``; :meth:`init_modules`
      returns it and the student body, and :meth:`init_loss` is the AB loss.
    * ``"main"``: by default the Connector is frozen (an init-only module: ``requires_grad`` off, kept in eval
      mode), :meth:`trainable_modules` is empty and the method has no loss. With
      ``--ab_main_stage`` the Connector keeps training and :meth:`forward` is the AB loss
      (``has_loss`` is then ``True`` on the instance).
    """

    name = "abound"
    paper = (
        "Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden Neurons, AAAI 2019, "
        "arXiv 1811.03233"
    )
    # beta 1: RepDistiller scripts/run_cifar_distill.sh, `--distill abound -a 0 -b 1` (no effect there).
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1.0}
    preact = True
    has_loss = False  # RepDistiller's main stage: loss_kd = 0; an instance sets True with --ab_main_stage
    init_stage = True

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.check_pair(s_shapes, t_shapes, args)
        self.main_loss = bool(args.ab_main_stage)
        self.has_loss = self.main_loss
        self.connector = Connector(s_shapes[1:-1], t_shapes[1:-1])
        self.criterion = ABLoss(len(s_shapes[1:-1]))

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--ab_main_stage",
            action="store_true",
            help="abound: keep beta * AB loss (and train the Connector) in the main stage too; by default "
            "AB is an init stage only, as in the paper and RepDistiller",
        )

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        g_s, g_t = s_shapes[1:-1], t_shapes[1:-1]
        if len(g_s) != len(g_t):
            raise PairError(
                f"abound connects stage maps one to one, but the student has {len(g_s)} "
                f"({[tuple(s) for s in g_s]}) and the teacher {len(g_t)} ({[tuple(t) for t in g_t]})"
            )
        for i, (s, t) in enumerate(zip(g_s, g_t), start=1):
            if len(s) != 3 or len(t) != 3:
                raise PairError(f"abound: feature {i} is not a (C, H, W) map: student {tuple(s)}, teacher {tuple(t)}")
            if s[:2] == t[:2]:
                continue
            try:
                # On the meta device: checks the layer without allocating or drawing random weights.
                with torch.device("meta"):
                    ConvReg(s, t, use_relu=False)
            except PairError as err:
                raise PairError(f"abound Connector at feature {i}: {err}") from None

    def init_only_modules(self) -> list[nn.Module]:
        return [] if self.main_loss else [self.connector]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.connector] if self.main_loss else []

    def init_modules(self, student: nn.Module) -> list[nn.Module]:
        return [self.connector, student.get_feat_modules()]

    def init_loss(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return sum(self.criterion(self.connector(out_s.feats[1:-1]), out_t.feats[1:-1]))

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        if not self.main_loss:
            # RepDistiller's main stage: loss_kd = 0 (the engine does not call this while has_loss is False).
            return out_s.logits.new_zeros(())
        return self.init_loss(out_s, out_t, batch)
