"""CAT-KD: "Class Attention Transfer Based Knowledge Distillation", Guo, Yan, Li and Lin, CVPR 2023, arXiv 2304.12777.

Loss: the mean squared error between the student's and the teacher's class activation maps (each network's
classifier weights applied at every position of its last feature map, one map per class), both average-pooled
to a small resolution (2x2) and optionally L2-normalised per map.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import PairError

from .base import Distiller, Shapes, adaptive_avg_pool2d, register

__all__ = ["cat_loss", "class_activation_maps"]


def class_activation_maps(feat: torch.Tensor, weight: torch.Tensor, resolution: int) -> torch.Tensor:
    """``avgpool_R(W * feat)``: the classifier ``weight`` (K, C) as a 1x1 convolution without bias on ``feat``
    (B, C, H, W), pooled to (B, K, R, R) (CAT-KD's ``conv_test`` then ``F.adaptive_avg_pool2d``).

    Pooled before the 1x1 product, which is the same map (both are linear in the positions) at R^2 / (H W) of
    the cost.
    """
    pooled = adaptive_avg_pool2d(feat.float(), (resolution, resolution))  # (B, C, R, R)
    return torch.einsum("kc,bcij->bkij", weight.float(), pooled)  # (B, K, R, R)


def cat_loss(cam_s: torch.Tensor, cam_t: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Mean squared error of the maps (B, K, R, R), each map L2-normalised over its R x R positions first when
    ``normalize`` (CAT-KD ``mdistiller/distillers/CAT_KD.py``, ``CAT_loss`` and ``_Normalize``)."""
    if normalize:
        cam_s, cam_t = F.normalize(cam_s, dim=(2, 3)), F.normalize(cam_t, dim=(2, 3))
    return F.mse_loss(cam_s, cam_t)


def _classifier(model: nn.Module, dim: int, side: str) -> nn.Linear:
    """The model's classifier: its only ``nn.Linear`` reading the pooled vector of width ``dim``. Checks on one
    random image (eval mode, no grad) that the pooled vector is the mean of ``relu(feats[-2])`` (preact)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == dim]
    if len(linears) != 1:
        raise PairError(f"catkd: the {side} has {len(linears)} linear layers reading {dim} features, expected 1")
    ref = next(model.parameters())
    was_training = model.training
    with torch.no_grad():
        out = model.eval()(torch.randn(2, 3, 32, 32, device=ref.device, dtype=ref.dtype), is_feat=True, preact=True)
    model.train(was_training)
    if not torch.allclose(out.feats[-2].relu().mean((2, 3)), out.feats[-1].flatten(1), rtol=1e-4, atol=1e-5):
        raise PairError(f"catkd: the {side}'s classifier does not pool relu of its last pre-activation map")
    return linears[0]


@register
class CATKDDistiller(Distiller):
    """CAT-KD on the last feature map, with each network's own classifier; the teacher's is a frozen copy.

    The official code rebuilds both networks (``*_test`` models: the classifier becomes a bias-free 1x1
    convolution before the pooling) and copies the teacher's classifier weights into it; here the models and
    checkpoints are unchanged: the maps are computed from the last feature map and the classifier weights
    (:meth:`bind_teacher`, :meth:`bind_student`). Deviation: the student keeps its classifier's bias (the
    official student has none); the bias does not enter the maps.

    Needs the last feature map to be the one the classifier pools (as many channels as the pooled vector, and
    checked on one image when the models are bound); a student or teacher with a layer between them
    (MobileNetV2's and ShuffleV2's last 1x1 convolution) is refused. Reads the pre-activation features (their
    last map's ReLU is the pooled map in every model), so ``--add`` does not combine it with post-activation
    methods.
    Defaults (CAT-KD ``mdistiller/engine/cfg.py``, ``CFG.CAT_KD``): ``-b 400``, ``--cat_resolution 2``,
    ``--cat_normalize 1``, CE weight 1; the per-pair configs (``configs/cifar100/CAT_KD/*.yaml``) set beta,
    the resolution and the normalisation: ``scripts/run_cifar_newer.sh`` passes them.
    """

    name = "catkd"
    paper = "Class Attention Transfer Based Knowledge Distillation (CVPR 2023, arXiv 2304.12777)"
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 400.0}
    preact = True  # the pre-activation list, whose last map's ReLU is what the classifier pools (see forward)

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.s_dim, self.t_dim = s_shapes[-1][0], t_shapes[-1][0]
        self.resolution, self.normalize = args.cat_resolution, bool(args.cat_normalize)
        self.register_buffer("teacher_weight", torch.zeros(0), persistent=False)
        self.__dict__["_student_fc"] = None  # the student's own classifier: not a submodule (trained with it)

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        for side, shapes in (("student", s_shapes), ("teacher", t_shapes)):
            if len(shapes[-2]) != 3 or shapes[-2][0] != shapes[-1][0]:
                raise PairError(
                    f"catkd: the {side}'s last feature map {tuple(shapes[-2])} is not the one its classifier "
                    f"pools ({shapes[-1][0]} features): no class activation maps"
                )
        if args.cat_resolution < 1:
            raise PairError(f"catkd: --cat_resolution {args.cat_resolution} must be at least 1")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("CAT-KD")
        group.add_argument("--cat_resolution", type=int, default=2, help="CAT-KD: side of the pooled maps (2)")
        group.add_argument(
            "--cat_normalize", type=int, default=1, choices=[0, 1], help="CAT-KD: L2-normalise each map (1)"
        )

    def bind_teacher(self, teacher: nn.Module) -> None:
        self.teacher_weight = _classifier(teacher, self.t_dim, "teacher").weight.detach().clone()  # (K, C_t)

    def bind_student(self, student: nn.Module) -> None:
        self.__dict__["_student_fc"] = _classifier(student, self.s_dim, "student")

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        fc = self.__dict__["_student_fc"]
        if fc is None or self.teacher_weight.numel() == 0:
            raise RuntimeError("catkd: call bind_student(student) and bind_teacher(teacher) before training")
            # relu of the pre-activation map: the map the classifier pools in every model (for WRN the post-activation
        # list holds the group's output before the final BN and ReLU).
        cam_s = class_activation_maps(out_s.feats[-2].relu(), fc.weight, self.resolution)  # (B, K, R, R)
        cam_t = class_activation_maps(out_t.feats[-2].relu(), self.teacher_weight, self.resolution)
        return cat_loss(cam_s, cam_t, self.normalize)
