"""SimKD: "Knowledge Distillation with the Reused Teacher Classifier", Chen, Mei, Zhang, Wang, Wang, Feng and
Chen, CVPR 2022, arXiv 2203.14001.

Loss: the mean squared error between a projector applied to the student's last feature map and the teacher's
last feature map; at inference the student's own classifier is replaced by the projector followed by the
teacher's (frozen) classifier, so the deployed network is student body + projector + teacher classifier.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import PairError

from .base import Distiller, Shapes, adaptive_avg_pool2d, register

__all__ = ["SimKDProjector", "SimKDStudent"]


class SimKDProjector(nn.Module):
    """The official bottleneck projector (``models/util.py``, ``SimKD.transfer``): 1x1 conv to ``t_C / factor``,
    3x3 conv, 1x1 conv to ``t_C``, each followed by BN and ReLU; convolutions without bias."""

    def __init__(self, s_channels: int, t_channels: int, factor: int = 2) -> None:
        super().__init__()
        mid = t_channels // factor
        self.transfer = nn.Sequential(
            nn.Conv2d(s_channels, mid, kernel_size=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid, t_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(t_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.transfer(x)


def _align(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official spatial alignment: the larger of the two maps is average-pooled to the other's size."""
    if f_s.shape[-1] > f_t.shape[-1]:
        return adaptive_avg_pool2d(f_s, f_t.shape[-2:]), f_t
    return f_s, adaptive_avg_pool2d(f_t, f_s.shape[-2:])


class SimKDStudent(nn.Module):
    """The deployed network: ``classifier(avgpool(projector(student_map)))`` with the student's last map.

    Holds the whole student (its own classifier is computed by its forward but unused), the projector and a
    frozen copy of the teacher's classifier. ``forward(x)`` returns logits (B, classes).
    """

    def __init__(
        self, student: nn.Module, projector: nn.Module, classifier: nn.Module, size: tuple[int, int] | None
    ) -> None:
        super().__init__()
        self.student, self.projector, self.classifier = student, projector, classifier
        self.size = size  # the teacher's map size when the student's map is larger (pooled to it), else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.student(x, is_feat=True).feats[-2]  # (B, s_C, H, W)
        if self.size is not None:
            f = adaptive_avg_pool2d(f, self.size)
        return self.classifier(self.projector(f).mean(dim=(2, 3)))  # (B, classes)


@register
class SimKDDistiller(Distiller):
    """SimKD: projector on ``feats[-2]`` trained by MSE to the teacher's ``feats[-2]``.

    Defaults (official ``scripts/run_distill.sh``: ``--distill simkd -c 0 -d 0 -b 1``; ``train_student.py``:
    ``--factor 2``, ``nn.MSELoss``): no cross-entropy, no KD term, ``-b 1``, ``--simkd_factor 2``. A CE weight
    above 0 (``-r``) would also train the student's own classifier, which the deployed network does not use.

    The teacher's classifier is needed only by the deployed network: the engine calls :meth:`bind_teacher`
    (a frozen copy of the teacher's ``nn.Linear`` on its pooled vector, kept here so that the checkpoint and
    the deployed network do not depend on the teacher object), then :meth:`deploy`. The teacher's last map
    must have as many channels as its pooled vector (true for every teacher of the benchmark; not for
    MobileNetV2 or ShuffleV2 teachers, whose last map feeds a further 1x1 conv): otherwise :class:`PairError`.
    During training the engine's accuracy is that of the student's own classifier; evaluation uses the
    deployed network.
    """

    name = "simkd"
    paper = "Knowledge Distillation with the Reused Teacher Classifier (CVPR 2022, arXiv 2203.14001)"
    defaults = {"gamma": 0.0, "alpha": 0.0, "beta": 1.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        s_map, t_map = s_shapes[-2], t_shapes[-2]
        self.projector = SimKDProjector(int(s_map[0]), int(t_map[0]), args.simkd_factor)
        self.t_dim = int(t_shapes[-1][0])
        self.size = (int(t_map[1]), int(t_map[2])) if s_map[-1] > t_map[-1] else None
        self.classifier: nn.Module | None = None

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        for who, shapes in (("student", s_shapes), ("teacher", t_shapes)):
            if len(shapes[-2]) != 3:
                raise PairError(f"simkd: the {who}'s feats[-2] {tuple(shapes[-2])} is not a (C, H, W) map")
        if t_shapes[-2][0] != t_shapes[-1][0]:
            raise PairError(
                f"simkd: the teacher's last map has {t_shapes[-2][0]} channels but its classifier reads "
                f"{t_shapes[-1][0]}: its classifier cannot be reused on the projector's output"
            )
        if t_shapes[-2][0] // args.simkd_factor < 1:
            raise PairError(
                f"simkd: --simkd_factor {args.simkd_factor} exceeds the teacher's {t_shapes[-2][0]} channels"
            )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument_group("SimKD").add_argument(
            "--simkd_factor", type=int, default=2, help="SimKD: projector bottleneck reduction (official: 2)"
        )

    def bind_teacher(self, teacher: nn.Module) -> None:
        """Keep a frozen copy of the teacher's classifier: its only ``nn.Linear`` reading the pooled vector."""
        linears = [m for m in teacher.modules() if isinstance(m, nn.Linear) and m.in_features == self.t_dim]
        if len(linears) != 1:
            raise PairError(
                f"simkd: expected one nn.Linear with {self.t_dim} inputs in the teacher, found {len(linears)}"
            )
        classifier = copy.deepcopy(linears[0]).requires_grad_(False)
        ref = next(self.projector.parameters())
        self.classifier = classifier.to(device=ref.device, dtype=ref.dtype)

    def trainable_modules(self) -> list[nn.Module]:
        return [self.projector]  # never the teacher's classifier

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        f_s, f_t = _align(out_s.feats[-2], out_t.feats[-2])  # (B, s_C, h, w), (B, t_C, h, w)
        return F.mse_loss(self.projector(f_s), f_t)

    def deploy(self, student: nn.Module) -> nn.Module:
        if self.classifier is None:
            raise RuntimeError("simkd: call bind_teacher(teacher) before deploy() (it needs the teacher's classifier)")
        return SimKDStudent(student, self.projector, self.classifier, self.size)
