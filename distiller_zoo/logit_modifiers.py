"""Logit modifiers that any temperature-softened logit loss can use: logit standardisation and CTKD.

* LS: "Logit Standardization in Knowledge Distillation", Sun, Ren, Li, Wang and Cao, CVPR 2024, arXiv 2403.01427.
  Loss in words: both networks' logits are z-scored per sample (minus their mean, divided by their standard
  deviation) before the temperature-softened softmax of the logit loss, with a base temperature of 2.
* CTKD: "Curriculum Temperature for Knowledge Distillation", Li, Li, Yang, Zhao, Song, Luo, Li and Yang, AAAI
  2023, arXiv 2211.16231. Loss in words: the temperature of the logit loss is one learned scalar trained to
  *maximise* that loss (a gradient reversal layer in front of it), with a reversal weight that a cosine
  curriculum raises from 0 to 1 over the first 10 epochs.

Which losses use them: the KD term of every method (``kd_term`` in ``base.py``, so ``--distill kd
--logit_stand`` is KD+LS) and the logit methods DKD, MLKD and DIST, which build their own
:class:`LogitModifier` with :func:`build_modifier` and call it on their logits. Flags: ``--logit_stand``,
``--base_temp`` (LS-KD's ``tools/train.py`` names them ``--logit-stand`` and ``--base-temp``) and ``--ctkd``
with ``--ctkd_t_start/--ctkd_t_end/--ctkd_decay_max/--ctkd_decay_min/--ctkd_decay_loops`` (CTKD's
``train_student.py``: ``--have_mlp 1 --mlp_name global`` and ``--t_start/--t_end/--decay_*``).

With ``--ctkd``, a logit method's temperature is also the KD term's (``share_temperature``): CTKD learns one
temperature per step and passes it to both terms.

LS-KD's third flag, ``--kd-weight`` (9), sets the weight of the modified term; here that weight is the
term's own weight: ``-a`` for the KD term, ``-b`` for DKD and MLKD (see ``helper/published/newer_recipes.md``).
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CurriculumTemperature",
    "LogitModifier",
    "ModifiedKL",
    "add_modifier_arguments",
    "build_modifier",
    "cosine_reversal_weight",
    "share_temperature",
    "standardize",
]

# LS-KD, mdistiller/distillers/KD.py ``normalize``: added to the standard deviation so that a constant logit
# vector (std 0) does not divide by zero.
LS_EPS = 1e-7


def standardize(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample z-score of ``logits`` (B, C): mean 0, (unbiased) standard deviation 1.

    The unbiased standard deviation (divides by C - 1) is ``Tensor.std``'s default, which LS-KD uses.
    """
    mean = logits.mean(dim=1, keepdim=True)  # (B, 1)
    std = logits.std(dim=1, keepdim=True)  # (B, 1)
    return (logits - mean) / (std + LS_EPS)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``weight`` (CTKD's gradient reversal)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.weight, None


def cosine_reversal_weight(epoch: int, start: float, end: float, loops: float) -> float:
    """CTKD's ``CosineDecay(max_value=start, min_value=end, num_loops=loops).get_value(epoch)``.

    ``start + (end - start) * (1 - cos(pi * e / loops)) / 2`` with ``e`` clamped to ``[0, loops]``. With CTKD's
    defaults (0, -1, 10) it falls from 0 at epoch 0 to -1 at epoch 10 and stays there. The backward multiplies
    by this value directly, so a negative value reverses the gradient: the temperature ascends the loss ever
    more strongly, the paper's easy-to-hard curriculum (lambda from 0 to 1, then the gradient times -lambda).
    CTKD issue #24 reads the code's direction as the opposite; evaluating the schedule shows it is not.
    """
    e = min(max(epoch, 0), loops)
    return end + (start - end) * (math.cos(e * math.pi / loops) + 1.0) * 0.5


class CurriculumTemperature(nn.Module):
    """CTKD's global temperature: ``T = t_start + t_end * sigmoid(theta)``, ``theta`` behind a gradient reversal.

    ``theta`` starts at 1 (CTKD ``models/temp_global.py``, ``Global_T``: ``torch.ones(1)``), so T starts at
    1 + 20 sigmoid(1) = 15.62 and stays within (1, 21) (CTKD ``train_student.py``: ``--t_start 1 --t_end 20``).
    The reversal weight is set once per epoch by :meth:`set_epoch`; training without it raises, because a
    weight that never leaves 0 would silently freeze the temperature.
    """

    def __init__(
        self, t_start: float = 1.0, t_end: float = 20.0, decay_max: float = 0.0, decay_min: float = -1.0,
        decay_loops: float = 10.0,
    ) -> None:  # fmt: skip
        super().__init__()
        self.t_start, self.t_end = t_start, t_end
        self.decay_max, self.decay_min, self.decay_loops = decay_max, decay_min, decay_loops
        self.theta = nn.Parameter(torch.ones(()))
        self.reversal: float | None = None

    def set_epoch(self, epoch: int, stage: str = "main") -> None:
        # CTKD calls ``gradient_decay.get_value(epoch)`` with the 1-based epoch, as the engine numbers them.
        self.reversal = cosine_reversal_weight(epoch, self.decay_max, self.decay_min, self.decay_loops)

    def forward(self) -> torch.Tensor:
        if self.reversal is None:
            if self.training:
                raise RuntimeError(
                    "--ctkd: the temperature's reversal weight is unset; call set_epoch(epoch) each epoch"
                )
            theta = self.theta
        else:
            theta = _ScaleGradient.apply(self.theta, self.reversal)
        return self.t_start + self.t_end * torch.sigmoid(theta)  # () scalar


class LogitModifier(nn.Module):
    """Maps a logit loss's inputs ``(z_s, z_t)`` to standardised logits and the temperature to use.

    ``temperature`` is the loss's own temperature; with LS it is replaced by ``--base_temp`` (LS-KD
    ``tools/train.py`` sets ``KD.TEMPERATURE`` / ``DKD.T`` to ``--base-temp``), with CTKD by the learned one.
    """

    def __init__(self, standardize_logits: bool, temperature: float, ctkd: CurriculumTemperature | None) -> None:
        super().__init__()
        self.standardize_logits = standardize_logits
        self.temperature = temperature
        self.ctkd = ctkd
        self._borrowed: tuple[CurriculumTemperature, ...] = ()  # another module's temperature (not registered)

    def temperature_now(self) -> torch.Tensor | float:
        learned = self.ctkd if self.ctkd is not None else next(iter(self._borrowed), None)
        return learned() if learned is not None else self.temperature

    def borrow_temperature(self, learned: CurriculumTemperature) -> None:
        """Use ``learned`` (owned, trained and checkpointed by another module) instead of an own temperature."""
        self.ctkd, self._borrowed = None, (learned,)

    def forward(self, z_s: torch.Tensor, z_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        if self.standardize_logits:
            z_s, z_t = standardize(z_s), standardize(z_t)  # (B, C) each
        return z_s, z_t, self.temperature_now()

    def set_epoch(self, epoch: int, stage: str = "main") -> None:
        if self.ctkd is not None:
            self.ctkd.set_epoch(epoch, stage)


def add_modifier_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the LS and CTKD flags once (every logit method calls this from its ``add_arguments``)."""
    if parser.get_default("logit_stand") is not None:
        return
    group = parser.add_argument_group("logit modifiers (LS, CTKD)")
    add = group.add_argument
    add("--logit_stand", action="store_true", help="z-score the logits of the KD term and of DKD/MLKD/DIST (LS)")
    # LS-KD tools/train.py: --base-temp default 2 (its README uses 2 for most pairs, 3 for some).
    add("--base_temp", type=float, default=2.0, help="temperature used with --logit_stand (LS-KD: 2)")
    add("--ctkd", action="store_true", help="learn a global temperature by gradient reversal (CTKD)")
    # CTKD train_student.py / scripts/run_cifar_distill.sh: --t_start 1 --t_end 20 --cosine_decay 1
    # --decay_max 0 --decay_min -1 --decay_loops 10.
    add("--ctkd_t_start", type=float, default=1.0, help="CTKD: lowest temperature")
    add("--ctkd_t_end", type=float, default=20.0, help="CTKD: range of the temperature above --ctkd_t_start")
    add("--ctkd_decay_max", type=float, default=0.0, help="CTKD: reversal weight at epoch 0")
    add("--ctkd_decay_min", type=float, default=-1.0, help="CTKD: reversal weight after the curriculum")
    add("--ctkd_decay_loops", type=float, default=10.0, help="CTKD: epochs of the cosine curriculum")


def build_modifier(args: Any, temperature: float) -> LogitModifier | None:
    """The modifier the flags ask for, or ``None`` (the loss then runs unchanged at ``temperature``)."""
    ls = bool(args.logit_stand)
    ctkd = bool(args.ctkd)
    if not (ls or ctkd):
        return None
    learned = None
    if ctkd:
        learned = CurriculumTemperature(
            args.ctkd_t_start, args.ctkd_t_end, args.ctkd_decay_max, args.ctkd_decay_min, args.ctkd_decay_loops
        )
    return LogitModifier(ls, float(args.base_temp) if ls else float(temperature), learned)


def share_temperature(modifier: LogitModifier | None, owner: nn.Module) -> None:
    """With ``--ctkd``, let ``modifier`` (the KD term's) use the learned temperature of ``owner`` (a logit method:
    DKD, MLKD, DIST) instead of learning a second one. CTKD's ``helper/loops.py`` computes one temperature per
    step and passes it to both ``criterion_div`` (KD) and ``criterion_kd`` (its DKD). No-op when either has none.
    """
    if modifier is None or modifier.ctkd is None:
        return
    learned = next((m for m in owner.modules() if isinstance(m, CurriculumTemperature)), None)
    if learned is not None:
        modifier.borrow_temperature(learned)


def softened_kl(z_s: torch.Tensor, z_t: torch.Tensor, T: torch.Tensor | float) -> torch.Tensor:
    """Per-sample ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, shape (B,). In float32 (see DistillKL)."""
    log_p_s = F.log_softmax(z_s.float() / T, dim=1)  # (B, C)
    log_p_t = F.log_softmax(z_t.float() / T, dim=1)  # (B, C)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1) * T**2


class ModifiedKL(nn.Module):
    """The KD term under a :class:`LogitModifier`: batch mean of :func:`softened_kl` on the modified logits.

    Without a modifier ``kd_term`` returns RepDistiller's ``DistillKL``; with one, this module, whose
    ``set_epoch`` the engine must call every epoch when CTKD is on.
    """

    def __init__(self, modifier: LogitModifier) -> None:
        super().__init__()
        self.modifier = modifier

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        z_s, z_t, T = self.modifier(y_s, y_t)
        return softened_kl(z_s, z_t, T).mean()

    def set_epoch(self, epoch: int, stage: str = "main") -> None:
        self.modifier.set_epoch(epoch, stage)
