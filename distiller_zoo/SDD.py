"""SDD: "Scale Decoupled Distillation", Shicai Wei, Chunbo Luo and Yang Luo, CVPR 2024, arXiv 2403.13512.

Loss: the last feature map is average-pooled at several scales (1x1, 2x2, 4x4: one global and 4 + 16 local
regions) and each pooled vector goes through the network's own classifier; KD (SD-KD) or DKD (SD-DKD) is
taken between the teacher's and student's logits of every region, and a local region whose teacher
prediction is right where the global one is wrong, or wrong where it is right (a "complementary" region),
counts twice.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import PairError

from .base import Distiller, Shapes, adaptive_avg_pool2d, register
from .DKD import dkd_terms, linear_warmup, warmup_epochs

__all__ = ["complementary_weights", "region_logits", "sdd_loss"]

# Official SPP (shicaiwei123/SDD-CVPR2024 mdistiller/models/cifar/utils.py): the map is pooled to 4x4 first,
# the 2x2 and 1x1 grids are pooled from that 4x4 grid.
BASE_GRID = 4


def region_logits(feature_map: torch.Tensor, classifier: nn.Module, scales: Sequence[int]) -> torch.Tensor:
    """Logits of every region, shape (N, B, K): N = sum of s^2 over ``scales`` (in the given order, each grid
    row-major), B the batch, K the classes. The first region is the global one when ``scales[0] == 1``."""
    base = adaptive_avg_pool2d(feature_map.float(), BASE_GRID)  # (B, C, 4, 4)
    pooled = [adaptive_avg_pool2d(base, s).flatten(2) for s in scales]  # (B, C, s*s) each
    regions = torch.cat(pooled, dim=2).permute(2, 0, 1)  # (N, B, C)
    n, b, c = regions.shape
    return classifier(regions.reshape(n * b, c)).view(n, b, -1)  # (N, B, K)


def complementary_weights(z_t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, B) region weights from the teacher's region logits ``z_t`` (N, B, K): 2 where a local region's
    prediction is right and the global one (region 0) wrong or the other way round, else 1 (region 0: 1)."""
    right = z_t.argmax(dim=2).eq(target[None, :])  # (N, B)
    return 1.0 + right.ne(right[:1]).float()


def sdd_loss(
    z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, per_row: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """``sum_{regions, samples} w * per_row(z_s, z_t, target) / (N * B)`` for region logits (N, B, K), with
    ``per_row`` a per-sample loss on (N*B, K) logits (official ``sdd_kd_loss``, ``multi_dkd``)."""
    n, b, k = z_s.shape
    weights = complementary_weights(z_t, target)  # (N, B)
    losses = per_row(z_s.reshape(n * b, k), z_t.reshape(n * b, k), target.repeat(n))  # (N*B,)
    return (weights.reshape(-1) * losses).sum() / (n * b)


def kd_rows(z_s: torch.Tensor, z_t: torch.Tensor, T: float) -> torch.Tensor:
    """Per-sample ``T^2 KL(softmax(z_t / T) || softmax(z_s / T))``, shape (rows,)."""
    log_p_s = F.log_softmax(z_s / T, dim=1)
    log_p_t = F.log_softmax(z_t / T, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * T**2


def parse_scales(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` (or the official ``"[1,2,4]"``) -> (1, 2, 4); the official SPP serves 1 first, then 2, 4."""
    scales = tuple(int(v) for v in text.strip("[] ").split(",") if v.strip())
    if not scales or scales[0] != 1 or any(s not in (1, 2, 4) for s in scales) or len(set(scales)) != len(scales):
        raise argparse.ArgumentTypeError(f"--sdd_scales {text!r}: distinct values of 1, 2, 4, starting with 1")
    return scales


def scales_flag(text: str) -> str:
    """The ``--sdd_scales`` value, checked and written ``"1,2,4"`` (a string, so ``args.json`` round-trips)."""
    return ",".join(str(v) for v in parse_scales(text))


def _classifier(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears or not hasattr(model, "pre_pool"):
        raise PairError(f"sdd: {type(model).__name__} has no pre_pool map and Linear classifier to read")
    return linears[-1]  # the zoo's classifier is its last Linear


class _SDDBase(Distiller):
    """Region logits from both networks' ``pre_pool`` maps (forward hooks), then :func:`sdd_loss`."""

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.scales = parse_scales(args.sdd_scales)
        self._maps: dict[str, torch.Tensor] = {}  # the latest pre_pool map of each network
        self._heads: dict[str, nn.Linear] = {}  # not submodules: neither is trained or saved here

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        if not any(a.dest == "sdd_scales" for a in parser._actions):
            parser.add_argument_group("SDD").add_argument(
                "--sdd_scales", type=scales_flag, default="1,2,4",
                help="SDD: pooling scales of the last map (official --M; [1,2,4] for most pairs)",
            )  # fmt: skip

    def _bind(self, key: str, model: nn.Module) -> None:
        self._heads[key] = _classifier(model)
        maps = self._maps

        def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            maps[key] = output

        model.pre_pool.register_forward_hook(keep)  # a closure: copies of the model (BN folding) keep it

    def bind_teacher(self, teacher: nn.Module) -> None:
        self._bind("teacher", teacher)

    def bind_student(self, student: nn.Module) -> None:
        self._bind("student", student)

    def regions(self) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self._maps) < 2:
            raise RuntimeError("sdd: bind_teacher and bind_student must come before the first forward")
        z_s = region_logits(self._maps["student"], self._heads["student"], self.scales)
        with torch.no_grad():
            z_t = region_logits(self._maps["teacher"].clone(), self._heads["teacher"], self.scales)
        return z_s, z_t


@register
class SDKDDistiller(_SDDBase):
    """SD-KD: KD at ``--kd_T`` on every region, complementary regions counted twice.

    Defaults: CE weight 0.1, ``-b 0.9``, ``--kd_T 4`` (the SDD fork's ``mdistiller/engine/cfg.py``, ``CFG.KD``:
    its CIFAR-100 ``configs/cifar100/sdd_kd/*.yaml`` set no KD values), no warm-up (``SDD_KD.forward_train``
    has it commented out; the authors' scripts say "SDD_KD warmup1"). ``--sdd_scales`` per pair:
    ``scripts/run_cifar_newer.sh`` (official ``teacher_*.sh``, ``--M``). With ``--sdd_scales 1`` it is KD.
    Differences from the official loss, on purpose: no host-side NaN checks (it zeroes NaN entries and a NaN
    loss; the engine's non-finite check stops the run instead).
    """

    name = "sdd_kd"
    paper = "Scale Decoupled Distillation (CVPR 2024, arXiv 2403.13512): SD-KD"
    defaults = {"gamma": 0.1, "alpha": 0.0, "beta": 0.9}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.T = args.kd_T

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        z_s, z_t = self.regions()
        return sdd_loss(z_s, z_t, batch.target, lambda s, t, y: kd_rows(s, t, self.T))


@register
class SDDKDDistiller(_SDDBase):
    """SD-DKD: DKD (``--dkd_alpha``, ``--dkd_beta``, ``--dkd_T``) on every region, complementary regions counted
    twice, ramped up linearly over ``--dkd_warmup`` epochs.

    Defaults: CE 1, alpha 1, beta 8, T 4, warm-up 20 (the SDD fork's ``cfg.py`` ``CFG.DKD`` and
    ``train_origin.py --warmup 20``); the per-pair beta of ``configs/cifar100/sdd_dkd/*.yaml`` (2 for
    resnet56->resnet20 and resnet110->resnet32, 6 for vgg13 and wrn_40_2 -> wrn/MobileNetV2 pairs) and
    ``--sdd_scales`` come from ``scripts/run_cifar_newer.sh``. With ``--sdd_scales 1`` it is DKD.
    """

    name = "sdd_dkd"
    paper = "Scale Decoupled Distillation (CVPR 2024, arXiv 2403.13512): SD-DKD"
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.alpha, self.beta, self.T = args.dkd_alpha, args.dkd_beta, args.dkd_T
        self.warmup_epochs, self.warmup = warmup_epochs(args), 1.0

    def set_epoch(self, epoch: int, stage: str) -> None:
        self.warmup = linear_warmup(epoch, self.warmup_epochs)

    def _rows(self, z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tckd, nckd = dkd_terms(z_s, z_t, target, self.T)
        return self.alpha * tckd + self.beta * nckd

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        z_s, z_t = self.regions()
        return self.warmup * sdd_loss(z_s, z_t, batch.target, self._rows)
