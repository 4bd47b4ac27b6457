"""KD: "Distilling the Knowledge in a Neural Network", Hinton, Vinyals and Dean, NIPS 2014 Deep Learning
Workshop, arXiv 1503.02531.

Loss: T^2 times the KL divergence from the teacher's to the student's temperature-softened class
distribution, averaged over the batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Distiller, Shapes, register

__all__ = ["DistillKL"]


class DistillKL(nn.Module):
    """``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``, summed over classes, averaged over the batch.

    The T^2 factor keeps the gradient's size roughly independent of T (Hinton et al., section 2), so the
    weight of this term need not be retuned with T. Same value as RepDistiller's ``DistillKL`` (which
    uses the removed ``size_average=False`` and divides by B by hand).
    """

    def __init__(self, T: float) -> None:
        super().__init__()
        self.T = T

    def forward(self, y_s: torch.Tensor, y_t: torch.Tensor) -> torch.Tensor:
        # float32 on purpose: under bf16 autocast the log-softmax of tempered logits loses the small
        # probability differences that this loss is made of.
        log_p_s = F.log_softmax(y_s.float() / self.T, dim=1)  # (B, classes)
        p_t = F.softmax(y_t.float() / self.T, dim=1)  # (B, classes)
        return F.kl_div(log_p_s, p_t, reduction="batchmean") * self.T**2


@register
class KDDistiller(Distiller):
    """Plain KD: no term of its own; the engine adds ``alpha * DistillKL(kd_T)`` for every method.

    ``forward`` returns that same KL term (RepDistiller builds ``DistillKL`` as this method's criterion),
    but since ``has_loss`` is False the engine never calls it and ``-b`` has no effect, as in RepDistiller.
    """

    name = "kd"
    paper = "Distilling the Knowledge in a Neural Network (NIPS 2014 DL Workshop, arXiv 1503.02531)"
    # run_cifar_distill.sh: --distill kd -r 0.1 -a 0.9 -b 0
    defaults = {"gamma": 0.1, "alpha": 0.9, "beta": 0.0}
    has_loss = False

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.kl = DistillKL(args.kd_T)

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return self.kl(out_s.logits, out_t.logits)
