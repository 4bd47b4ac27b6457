"""ITRD: "Information Theoretic Representation Distillation", Miles, Lopez-Rodriguez and Mikolajczyk, BMVC 2022,
arXiv 2112.00459.

Loss: on the pooled features, a correlation term (log2 of the summed, Renyi-alpha-powered squared gaps between
1 and the per-dimension correlations of the embedded student and the teacher) plus a mutual-information term
(the trace-normalised student Gram matrix against the student-teacher Hadamard Gram matrix, squared entries).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Distiller, Shapes, register

__all__ = ["itrd_correlation", "itrd_mutual"]


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-dimension z-score over the batch, (B, D); a constant dimension gives 0 (see ``itrd_correlation``)."""
    std = x.std(0)  # (D,)
    return (x - x.mean(0)) / torch.where(std > 0, std, torch.ones_like(std))


def itrd_correlation(f_s: torch.Tensor, f_t: torch.Tensor, alpha: float) -> torch.Tensor:
    """``log2 sum_d (|1 - c_d|^2)^alpha`` with ``c_d`` the batch correlation of dimension d, (B, D) each.

    Standardised per dimension over the batch with the unbiased standard deviation (``Tensor.std``), then
    ``c_d = sum_b s_bd t_bd / B`` (ITRD ``distiller_zoo/IT.py``, ``forward_correlation_it``). Needs B >= 2.

    Deviation, on purpose: a dimension constant over the batch (a ReLU channel that is 0 for every image, common
    in a network's pooled features) has standard deviation 0, where the official code divides 0 by 0 and the loss
    is NaN; here that dimension standardises to 0 (correlation 0). Wherever the official value is finite, the
    two are equal.
    """
    s, t = _standardize(f_s.float()), _standardize(f_t.float())  # (B, D) each
    c = (s * t).sum(0) / f_s.shape[0]  # (D,)
    return torch.log2(((c - 1).abs().pow(2)).pow(alpha).sum())


def itrd_mutual(f_s: torch.Tensor, f_t: torch.Tensor) -> torch.Tensor:
    """``sum (G_s / tr G_s)^2 - (G_st / tr G_st)^2`` with ``G`` the Gram matrices of the L2-normalised rows and
    ``G_st = G_s * G_t`` (entry-wise), (B, D_s) and (B, D_t) (ITRD ``distiller_zoo/IT.py``, ``forward_mutual_it``).
    """
    s, t = F.normalize(f_s.float(), dim=1), F.normalize(f_t.float(), dim=1)
    g_s = s @ s.T  # (B, B)
    g_st = g_s * (t @ t.T)  # (B, B)
    g_s = g_s / g_s.diagonal().sum()
    g_st = g_st / g_st.diagonal().sum()
    return (g_s.pow(2) - g_st.pow(2)).sum()


@register
class ITRDDistiller(Distiller):
    """ITRD on the pooled features (the last entry of the feature list).

    One linear embedding ``student dim -> teacher dim`` (official ``Embed(s_dim, t_dim)``) feeds the correlation
    term always and the mutual-information term only when the dimensions differ, as in the official code.
    The term is ``lambda_corr * correlation + lambda_mutual * mutual``; the official flag names are kept.
    Defaults: ``--lambda_corr 2 --lambda_mutual 1 --alpha_it 1.01``, ``-b 1 -r 1`` (ITRD ``README.md``'s command;
    its argparse defaults are ``--lambda_mutual 0.05 --alpha_it 1.5``; TTM's ``train_student.py`` defaults are
    2, 1, 1.5). The official loop asks for pre-activation features; the pooled vector is the same either way in
    every model here, so ITRD reads the post-activation list and combines with any logit method.
    """

    name = "itrd"
    paper = "Information Theoretic Representation Distillation (BMVC 2022, arXiv 2112.00459)"
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1.0}

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.s_dim, self.t_dim = s_shapes[-1][0], t_shapes[-1][0]
        self.embed = nn.Linear(self.s_dim, self.t_dim)
        self.lambda_corr, self.lambda_mutual, self.alpha_it = args.lambda_corr, args.lambda_mutual, args.alpha_it

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("ITRD")
        group.add_argument("--lambda_corr", type=float, default=2.0, help="ITRD: correlation weight (2)")
        group.add_argument("--lambda_mutual", type=float, default=1.0, help="ITRD: mutual-information weight (1)")
        group.add_argument("--alpha_it", type=float, default=1.01, help="ITRD: Renyi's alpha (README: 1.01)")

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        f_s, f_t = out_s.feats[-1].flatten(1), out_t.feats[-1].flatten(1)  # (B, D_s), (B, D_t)
        e_s = self.embed(f_s)  # (B, D_t)
        corr = itrd_correlation(e_s, f_t, self.alpha_it)
        mutual = itrd_mutual(e_s if self.s_dim != self.t_dim else f_s, f_t)
        return self.lambda_corr * corr + self.lambda_mutual * mutual
