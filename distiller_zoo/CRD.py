"""CRD: "Contrastive Representation Distillation", Tian, Krishnan and Isola, ICLR 2020, arXiv 1910.10699.

Loss: noise-contrastive estimation (paper eq. 18) that scores each sample's student embedding high against
the teacher's memory row of the same sample and low against K other rows, plus the symmetric term with
teacher embeddings scored against the student's memory.

The memory banks hold one embedding per training image, updated with momentum at the batch's indices
(after InstDis/CMC). Scores are ``exp(<memory row, embedding> / T) / Z``, with ``Z`` fixed on the first
batch so that, on that batch, the scores average ``1 / N``: they then act as probabilities next to the
uniform noise probability ``Pn = 1 / N``.
"""

from __future__ import annotations

import argparse
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.collectives import active, all_gather_rows, all_reduce_sum, shard_rows
from common.errors import UsageError
from dataset import CRDSampler
from dataset.crd import MODES

from .base import Distiller, Shapes, register

__all__ = ["ContrastLoss", "ContrastMemory", "CRDLoss", "Embed"]

log = logging.getLogger(__name__)

# RepDistiller's ContrastLoss epsilon (crd/criterion.py).
_EPS = 1e-7


class Embed(nn.Module):
    """Flatten, linear map to ``dim_out``, L2-normalise each row (RepDistiller's ``crd.criterion.Embed``).
    Returns float32 (B, dim_out) so the scores built from it stay in float32 under autocast."""

    def __init__(self, dim_in: int = 1024, dim_out: int = 128) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear(x.flatten(1)).float(), dim=1)


class ContrastLoss(nn.Module):
    """NCE loss of paper eq. 18 on probabilities ``x`` (B, K+1) or (B, K+1, 1), positive in column 0.

    With noise probability ``Pn = 1 / n_data`` and ``m = K`` noise samples per positive:
    ``-(1/B) sum_i [log(x_i0 / (x_i0 + m Pn + eps)) + sum_k log(m Pn / (x_ik + m Pn + eps))]``.
    """

    def __init__(self, n_data: int) -> None:
        super().__init__()
        self.n_data = n_data

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, K+1)
        bsz, m = x.shape[0], x.shape[1] - 1
        noise = m / self.n_data  # m * Pn
        log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + _EPS))  # positives judged real
        log_d0 = torch.log(noise / (x[:, 1:] + noise + _EPS))  # negatives judged noise
        return -(log_d1.sum() + log_d0.sum()) / bsz


class ContrastMemory(nn.Module):
    """Two memory banks of unit embeddings, the contrast scores against them, and their update.

    ``memory_s`` holds student embeddings, ``memory_t`` teacher embeddings, one row per training image
    (``outputSize`` rows of ``inputSize``); both are buffers, so they are saved in ``state_dict`` and
    checkpoints, as are the normalisation constants ``z_s`` and ``z_t`` (-1 until set). Rows start
    uniform in [-stdv, stdv] with ``stdv = 1 / sqrt(inputSize / 3)`` (RepDistiller's init: expected
    squared row norm 1).

    ``path`` picks how scores are computed: ``"gather"`` gathers the (B, K+1, D) memory rows and takes a
    batched product with the embeddings; ``"matmul"`` multiplies the embeddings with the whole memory
    (B, N) and gathers the (B, K+1) scores; ``"auto"`` (default) takes ``matmul`` when the gathered rows
    would outnumber the memory's (B (K+1) > N; e.g. B 64, K 16384, N 50000 on CIFAR-100). Both give the
    same result up to float rounding.

    Several processes (torchrun), each with its share of the global batch: the memory is updated with the
    rows of the whole global batch (gathered from every process), so every process applies the update a
    single process would; Z is set from the mean score of the whole first batch. ``max_shard_rows`` (the
    most rows a process holds) lets the gather run without waiting for the device.
    """

    def __init__(
        self,
        inputSize: int,
        outputSize: int,
        K: int,
        T: float = 0.07,
        momentum: float = 0.5,
        path: str = "auto",
    ) -> None:
        super().__init__()
        if path not in ("auto", "gather", "matmul"):
            raise ValueError(f"path must be 'auto', 'gather' or 'matmul', got {path!r}")
        self.K, self.T, self.momentum, self.path = K, T, momentum, path
        stdv = 1.0 / math.sqrt(inputSize / 3)
        self.register_buffer("memory_s", torch.rand(outputSize, inputSize).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("memory_t", torch.rand(outputSize, inputSize).mul_(2 * stdv).sub_(stdv))
        self.register_buffer("z_s", torch.tensor(-1.0))
        self.register_buffer("z_t", torch.tensor(-1.0))
        self._z_logged = False
        self._z_seen_global = False  # several processes: Z has been offered the whole first batch's mean
        self.max_shard_rows: int | None = None

    def forward(
        self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor, idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores of student embeddings ``v1`` (B, D) against the teacher memory and of teacher
        embeddings ``v2`` (B, D) against the student memory, each (B, K+1, 1) as in RepDistiller.

        ``y`` (B,): the samples' rows in the memory (updated here); ``idx`` (B, K+1): the rows to score,
        positive first. Without ``idx``, K rows per sample are drawn uniformly (RepDistiller's
        ``AliasMethod`` with equal weights) and column 0 is set to ``y``.
        """
        bsz, n = v1.shape[0], self.memory_s.shape[0]
        if idx is None:
            idx = torch.randint(n, (bsz, self.K + 1), device=y.device)
            idx[:, 0] = y
        elif idx.shape != (bsz, self.K + 1):
            raise ValueError(f"contrast indices must be (B, K+1) = {(bsz, self.K + 1)}, got {tuple(idx.shape)}")
        use_matmul = self.path == "matmul" or (self.path == "auto" and idx.numel() > n)
        with torch.autocast(device_type=v1.device.type, enabled=False):
            v1, v2 = v1.float(), v2.float()
            out_s = torch.exp(self._scores(self.memory_t, v1, idx, use_matmul) / self.T)  # (B, K+1)
            out_t = torch.exp(self._scores(self.memory_s, v2, idx, use_matmul) / self.T)
            self._fix_z(out_s, out_t, n)
            # Divide by copies: the buffers are written in place on every call, which must not touch
            # a graph still waiting for its backward pass.
            out_s, out_t = out_s / self.z_s.clone(), out_t / self.z_t.clone()
        # The matmul path saved the whole memory for the backward pass: update it out of place.
        self._update(*self._global_batch(v1, v2, y), in_place=not use_matmul)
        return out_s.unsqueeze(2), out_t.unsqueeze(2)

    @staticmethod
    def _scores(memory: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, use_matmul: bool) -> torch.Tensor:
        """``<memory[idx[i, k]], v[i]>`` for every (i, k): (B, K+1). Memory rows carry no gradient."""
        memory = memory.detach()
        if use_matmul:
            return (v @ memory.t()).gather(1, idx)  # (B, N) -> (B, K+1)
        rows = memory[idx]  # (B, K+1, D)
        return torch.bmm(rows, v.unsqueeze(2)).squeeze(2)

    def _fix_z(self, out_s: torch.Tensor, out_t: torch.Tensor, n: int) -> None:
        """Set each Z to N * mean score the first time (when it is still negative); keep it afterwards.
        Branch-free (``torch.where``) so that no step waits for the device."""
        with torch.no_grad():
            mean_s, mean_t = out_s.mean(), out_t.mean()
            if active() and not self._z_seen_global:  # the mean over every process's rows, once
                total = all_reduce_sum(torch.stack([out_s.sum(), out_t.sum(), out_s.new_tensor(out_s.numel())]))
                mean_s, mean_t = total[0] / total[2], total[1] / total[2]
                self._z_seen_global = True
            self.z_s.copy_(torch.where(self.z_s < 0, mean_s * n, self.z_s))
            self.z_t.copy_(torch.where(self.z_t < 0, mean_t * n, self.z_t))
        if not self._z_logged:
            log.info("CRD normalisation constants: Z_s = %.1f, Z_t = %.1f", self.z_s.item(), self.z_t.item())
            self._z_logged = True

    def _global_batch(
        self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Several processes: the embeddings and rows of the whole global batch (one gather; the rows travel
        as float32, exact below 2**24). A row may appear twice (padding), with the same embedding."""
        if not active():
            return v1, v2, y
        d = v1.shape[1]
        rows = all_gather_rows(torch.cat([v1, v2, y[:, None].float()], dim=1), self.max_shard_rows)  # (P*W, 2D+1)
        return rows[:, :d], rows[:, d : 2 * d], rows[:, 2 * d].long()

    def _update(self, v1: torch.Tensor, v2: torch.Tensor, y: torch.Tensor, in_place: bool) -> None:
        """Row y <- normalise(momentum * row y + (1 - momentum) * embedding), only at the rows ``y``."""
        with torch.no_grad():
            for name, v in (("memory_s", v1), ("memory_t", v2)):
                memory = getattr(self, name)
                rows = F.normalize(memory[y] * self.momentum + v.detach() * (1 - self.momentum), dim=1)
                if in_place:
                    memory.index_copy_(0, y, rows)
                else:
                    setattr(self, name, memory.index_copy(0, y, rows))


class CRDLoss(nn.Module):
    """CRD: embeddings of both networks' features, two contrast memories, two NCE terms.

    ``s_dim``/``t_dim``: sizes of the student's and teacher's (flattened) features; ``n_data``: number of
    training images (memory rows). Defaults are RepDistiller's ``train_student.py`` flags: ``feat_dim``
    128, ``nce_k`` 16384 negatives, temperature ``nce_t`` 0.07, memory momentum ``nce_m`` 0.5. Both
    embeddings are trainable (the teacher's too, as in RepDistiller). RepDistiller's ``CRDLoss(opt)`` reads
    the same fields from ``opt``; here they are arguments, in the same order.
    """

    def __init__(
        self,
        s_dim: int,
        t_dim: int,
        n_data: int,
        feat_dim: int = 128,
        nce_k: int = 16384,
        nce_t: float = 0.07,
        nce_m: float = 0.5,
    ) -> None:
        super().__init__()
        self.embed_s = Embed(s_dim, feat_dim)
        self.embed_t = Embed(t_dim, feat_dim)
        self.contrast = ContrastMemory(feat_dim, n_data, nce_k, nce_t, nce_m)
        self.criterion_s = ContrastLoss(n_data)
        self.criterion_t = ContrastLoss(n_data)

    def forward(
        self, f_s: torch.Tensor, f_t: torch.Tensor, idx: torch.Tensor, contrast_idx: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``f_s`` (B, s_dim), ``f_t`` (B, t_dim), ``idx`` (B,) dataset indices, ``contrast_idx``
        (B, K+1) rows to contrast with, positive (= idx) first; drawn uniformly when None."""
        e_s = self.embed_s(f_s)  # (B, feat_dim), unit rows
        e_t = self.embed_t(f_t)
        out_s, out_t = self.contrast(e_s, e_t, idx, contrast_idx)
        return self.criterion_s(out_s) + self.criterion_t(out_t)


@register
class CRDDistiller(Distiller):
    """CRD on the pooled vectors, ``feats[-1]``; the data pipeline supplies ``batch.contrast_idx``."""

    name = "crd"
    paper = "Contrastive Representation Distillation (ICLR 2020, arXiv 1910.10699)"
    # run_cifar_distill.sh: --distill crd -a 0 -b 0.8 (CRD+KD: -a 1 -b 0.8)
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 0.8}
    needs_contrast = True

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """RepDistiller's CRD flags, same names and defaults (its ``train_student.py``)."""
        group = parser.add_argument_group("crd")
        group.add_argument("--mode", type=str, default="exact", choices=list(MODES), help="CRD positives")
        group.add_argument("--nce_k", type=int, default=16384, help="CRD negatives per sample")
        group.add_argument("--nce_t", type=float, default=0.07, help="CRD temperature")
        group.add_argument("--nce_m", type=float, default=0.5, help="CRD memory momentum")

    @classmethod
    def validate(cls, args: Any) -> None:
        for flag in ("nce_k", "nce_t"):
            if getattr(args, flag) <= 0:
                raise UsageError(f"--{flag} {getattr(args, flag)}: must be positive")
        if not 0 <= args.nce_m < 1:
            raise UsageError(f"--nce_m {args.nce_m}: must be in [0, 1)")

    @classmethod
    def make_sampler(cls, args: Any, labels: torch.Tensor, seed: int, device: torch.device) -> CRDSampler:
        """``--nce_k`` negatives per anchor drawn from the other classes' images, positives as ``--mode``. A
        ``--nce_k`` above the negatives a class has (a ``--train_size`` subset) draws them with replacement,
        as RepDistiller does (``dataset/cifar100.py``, ``CIFAR100InstanceSample``: ``replace = True if self.k >
        len(self.cls_negative[target])``); the sampler logs it once."""
        return CRDSampler(labels, args.nce_k, mode=args.mode, seed=seed, device=device)

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.crd = CRDLoss(
            math.prod(s_shapes[-1]),
            math.prod(t_shapes[-1]),
            n_data,
            feat_dim=args.feat_dim,
            nce_k=args.nce_k,
            nce_t=args.nce_t,
            nce_m=args.nce_m,
        )
        # None in a single process (and when built outside the command line, without a batch size).
        batch_size = args.batch_size
        self.crd.contrast.max_shard_rows = shard_rows(batch_size) if batch_size else None

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        return self.crd(out_s.feats[-1], out_t.feats[-1], batch.index, batch.contrast_idx)
