"""FT (factor transfer): Kim, Park and Kwak, "Paraphrasing Complex Network: Network Compression via
Factor Transfer", NeurIPS 2018, arXiv 1802.04977.

Loss in words: the mean absolute difference between the L2-normalised "factors" of the student
(a Translator applied to its last feature map) and of the teacher (the encoder of a Paraphraser,
an autoencoder pre-trained to reconstruct the teacher's last feature map).

Recipe (RepDistiller): an init stage of ``--init_epochs`` epochs trains only the Paraphraser, with the
MSE between its reconstruction and the teacher's ``feats[-2]``; then the Paraphraser is frozen (eval
mode, not optimised) and the Translator is trained with the student under ``beta * FT``.

Deviation kept by default: RepDistiller collapses the factor over channels AT-style,
``normalize(mean_c f^p1)`` (one value per position), while the paper and its authors' code
(Jangho-Kim/Factor-Transfer-pytorch, ``utils.FT``) normalise the whole factor tensor (C' x H x W).
``--ft_paper_factor`` switches to the paper's full factor (the authors' code uses beta 500 with it,
``--beta`` default of their train_student.py; pass ``-b 500`` to follow them).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import PairError

from .base import Distiller, Shapes, pool_to_smaller, register

__all__ = ["FactorTransfer", "Paraphraser", "Translator", "FT"]

# LeakyReLU slope of the Paraphraser and Translator (RepDistiller models/util.py, the authors' code).
LEAKY_SLOPE = 0.1

# Students whose FT init stage RepDistiller runs at LR 0.01 instead of --learning_rate
# (helper/pretrain.py: the CIFAR ResNets and WRNs, not ResNet50).
SMALL_INIT_LR_STUDENTS = frozenset(
    [
        "resnet8",
        "resnet14",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "resnet8x4",
        "resnet32x4",
        "wrn_16_1",
        "wrn_16_2",
        "wrn_40_1",
        "wrn_40_2",
    ]
)
SMALL_INIT_LR = 0.01


def conv_bn_act(conv: nn.Module, channels: int, use_bn: bool) -> list[nn.Module]:
    """``conv -> BN (or identity) -> LeakyReLU``. The identity keeps RepDistiller's module indices, so
    state_dict keys (``encoder.0.weight``, ``encoder.3.weight``, ...) match its checkpoints."""
    return [conv, nn.BatchNorm2d(channels) if use_bn else nn.Identity(), nn.LeakyReLU(LEAKY_SLOPE)]


class Paraphraser(nn.Module):
    """RepDistiller's ``Paraphraser(t_shape, k=0.5, use_bn=False)``: a 3x3 convolutional autoencoder.

    Encoder C -> C -> kC -> kC, decoder (transposed convs) kC -> kC -> C -> C, spatial size kept.
    ``t_shape`` is the teacher map's shape, ``(C, H, W)`` or RepDistiller's ``(N, C, H, W)``.
    ``forward(f, is_factor=False)`` returns ``(factor, reconstruction)``, or only the factor.
    k = 0.5: the paraphrase rate of the paper's CIFAR experiments (authors' code, ``--rate 0.5``).
    """

    def __init__(self, t_shape: torch.Size | tuple[int, ...], k: float = 0.5, use_bn: bool = False) -> None:
        super().__init__()
        c = t_shape[-3]
        f = int(c * k)
        self.encoder = nn.Sequential(
            *conv_bn_act(nn.Conv2d(c, c, 3, 1, 1), c, use_bn),
            *conv_bn_act(nn.Conv2d(c, f, 3, 1, 1), f, use_bn),
            *conv_bn_act(nn.Conv2d(f, f, 3, 1, 1), f, use_bn),
        )
        self.decoder = nn.Sequential(
            *conv_bn_act(nn.ConvTranspose2d(f, f, 3, 1, 1), f, use_bn),
            *conv_bn_act(nn.ConvTranspose2d(f, c, 3, 1, 1), c, use_bn),
            *conv_bn_act(nn.ConvTranspose2d(c, c, 3, 1, 1), c, use_bn),
        )

    def forward(self, f_t: torch.Tensor, is_factor: bool = False) -> Any:
        factor = self.encoder(f_t)  # (B, kC, H, W)
        if is_factor:
            return factor
        return factor, self.decoder(factor)  # (B, kC, H, W), (B, C, H, W)


class Translator(nn.Module):
    """RepDistiller's ``Translator(s_shape, t_shape, k=0.5, use_bn=True)``: three 3x3 convs with BN and
    LeakyReLU mapping the student map (B, C_s, H, W) to a factor (B, int(k * C_t), H, W)."""

    def __init__(
        self,
        s_shape: torch.Size | tuple[int, ...],
        t_shape: torch.Size | tuple[int, ...],
        k: float = 0.5,
        use_bn: bool = True,
    ) -> None:
        super().__init__()
        c = s_shape[-3]
        f = int(t_shape[-3] * k)
        self.encoder = nn.Sequential(
            *conv_bn_act(nn.Conv2d(c, c, 3, 1, 1), c, use_bn),
            *conv_bn_act(nn.Conv2d(c, f, 3, 1, 1), f, use_bn),
            *conv_bn_act(nn.Conv2d(f, f, 3, 1, 1), f, use_bn),
        )

    def forward(self, f_s: torch.Tensor) -> torch.Tensor:
        return self.encoder(f_s)


class FactorTransfer(nn.Module):
    """RepDistiller's ``FactorTransfer(p1=2, p2=1)``: ``forward(factor_s, factor_t)`` -> scalar.

    The larger map is pooled to the smaller size; ``factor(f) = normalize(mean_c f^p1)`` flattened to
    (B, HW); the loss is ``mean |factor_s - factor_t|^p2``. With ``paper_factor=True`` the factor is the
    whole tensor flattened to (B, C' H W) and normalised, as the paper and its authors' code (mean L1 over
    elements); both factors then need the same channel count, which the Translator guarantees. For an odd
    ``p2 > 1`` RepDistiller takes the signed power (which can go negative); this takes the absolute value,
    the same for p2 = 1 and 2.
    """

    def __init__(self, p1: float = 2, p2: float = 1, paper_factor: bool = False) -> None:
        super().__init__()
        self.p1 = p1
        self.p2 = p2
        self.paper_factor = paper_factor

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
        f_s, f_t = pool_to_smaller(f_s, f_t)
        diff = (self.factor(f_s) - self.factor(f_t)).abs()
        return diff.mean() if self.p2 == 1 else diff.pow(self.p2).mean()

    def factor(self, f: torch.Tensor) -> torch.Tensor:
        if self.paper_factor:
            return F.normalize(f.flatten(1))  # (B, C H W)
        return F.normalize(f.pow(self.p1).mean(1).flatten(1))  # (B, H W)


@register
class FT(Distiller):
    """``--distill factor``: FT on the last feature map ``feats[-2]``, with an init stage.

    Stages (the base class's :meth:`set_stage`, entered by the engine every epoch):

    * ``"init"``: the Paraphraser is trainable and follows ``train()``/``eval()``; :meth:`init_modules`
      returns it and :meth:`init_loss` is its reconstruction MSE.
    * ``"main"``: the Paraphraser is frozen (an init-only module): ``requires_grad`` off and kept in eval mode
      (RepDistiller sets it to eval each epoch and leaves it out of the optimizer). Only the Translator is
      trained (:meth:`trainable_modules`).

    :meth:`init_lr` gives
    RepDistiller's init-stage learning rate (0.01 for CIFAR ResNet/WRN students).
    """

    name = "factor"
    paper = "Paraphrasing Complex Network: Network Compression via Factor Transfer, NeurIPS 2018, arXiv 1802.04977"
    # beta 200: RepDistiller scripts/run_cifar_distill.sh, `--distill factor -a 0 -b 200`.
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 200.0}
    init_stage = True

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.check_pair(s_shapes, t_shapes, args)
        self.paraphraser = Paraphraser(t_shapes[-2])
        self.translator = Translator(s_shapes[-2], t_shapes[-2])
        self.criterion = FactorTransfer(paper_factor=args.ft_paper_factor)

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--ft_paper_factor",
            action="store_true",
            help="factor: compare the whole normalised factor tensors, as the FT paper, instead of "
            "RepDistiller's channel-averaged factor",
        )

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        s, t = s_shapes[-2], t_shapes[-2]
        if len(s) != 3 or len(t) != 3:
            raise PairError(
                f"factor reads the last feature map feats[-2], which must be (C, H, W) in both nets; "
                f"student {tuple(s)}, teacher {tuple(t)}"
            )
        if t[0] < 2:
            raise PairError(f"factor: the teacher map {tuple(t)} has too few channels for a k = 0.5 factor")

    def init_only_modules(self) -> list[nn.Module]:
        return [self.paraphraser]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.translator]

    def init_modules(self, student: nn.Module) -> list[nn.Module]:
        return [self.paraphraser]

    def init_lr(self, args: Any, student_name: str) -> float | None:
        """The init-stage learning rate, as RepDistiller's helper/pretrain.py: 0.01 for CIFAR ResNet/WRN
        students, else ``None``: the run's main learning rate (``--learning_rate``, or RepDistiller's default
        for the student)."""
        return SMALL_INIT_LR if student_name in SMALL_INIT_LR_STUDENTS else None

    def init_loss(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        f_t = out_t.feats[-2]  # (B, C_t, H, W)
        _, reconstruction = self.paraphraser(f_t)
        return F.mse_loss(reconstruction, f_t)

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        factor_s = self.translator(out_s.feats[-2])  # (B, C_t / 2, H_s, W_s)
        # Frozen in the main stage: no graph is built through the Paraphraser (no parameter needs grad).
        factor_t = self.paraphraser(out_t.feats[-2], is_factor=True)  # (B, C_t / 2, H_t, W_t)
        return self.criterion(factor_s, factor_t)
