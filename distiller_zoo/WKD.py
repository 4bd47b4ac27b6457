"""WKD-L: "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge Distillation", Jiaming Lv,
Haoyuan Yang and Peihua Li, NeurIPS 2024, arXiv 2412.08139.

Loss: the entropy-regularised Wasserstein distance (Sinkhorn) between the teacher's and student's softened
distributions over the non-target classes, with a class-to-class cost from the teacher (1 - linear CKA of its
last-stage features of each pair of classes over the training set, sharpened), plus a target-class term
``-p_t[y] log p_s[y]``; the distance's weight decays along a half cosine after epoch 150.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dataset import DeviceLoader

from .base import Distiller, Shapes, register

__all__ = ["cka_cost_matrix", "linear_cka", "non_target", "sinkhorn_distance", "wkd_logit_loss"]

log = logging.getLogger(__name__)

SINKHORN_EPS = 1e-8  # official sinkhorn(): added to both denominators
COST_EPS = 1e-8  # official wkd_logit_loss(): relu(cost) + 1e-8


def sinkhorn_distance(p_s: torch.Tensor, p_t: torch.Tensor, cost: torch.Tensor, reg: float, iters: int) -> torch.Tensor:
    """Per-sample ``sum(flow * cost)`` of the Sinkhorn plan between ``p_s`` and ``p_t`` (B, n) under ``cost``
    (B, n, n), ``iters`` unrolled iterations from ``u = 1/n`` (official ``sinkhorn``); shape (B,)."""
    kernel = torch.exp(-cost / reg)  # (B, n, n)
    u = torch.full_like(p_s, 1.0 / p_s.shape[1])  # (B, n)
    for _ in range(iters):
        v = p_t / (torch.einsum("bij,bi->bj", kernel, u) + SINKHORN_EPS)  # K^T u
        u = p_s / (torch.einsum("bij,bj->bi", kernel, v) + SINKHORN_EPS)  # K v
    flow = u[:, :, None] * kernel * v[:, None, :]  # (B, n, n)
    return (flow * cost).sum(dim=(1, 2))


def non_target(target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C-1) the classes other than ``target``, ascending (no boolean indexing: no host sync)."""
    j = torch.arange(num_classes - 1, device=target.device)[None, :]  # (1, C-1)
    return j + (j >= target[:, None]).long()


def wkd_logit_loss(
    z_s: torch.Tensor, z_t: torch.Tensor, target: torch.Tensor, cost: torch.Tensor,
    T: float, weight: float, reg: float, iters: int,
) -> torch.Tensor:  # fmt: skip
    """``mean(-p_t[y] log p_s[y]) + weight * mean(WD_T)`` (official ``wkd_logit_loss_with_speration``): the
    target term at T = 1 with the teacher's probability as a constant; WD between the softmax at ``T`` of the
    non-target logits under the (C, C) ``cost`` restricted to those classes."""
    z_s, z_t = z_s.float(), z_t.float()
    y = target[:, None]
    log_p_s_y = F.log_softmax(z_s, dim=1).gather(1, y)  # (B, 1)
    p_t_y = F.softmax(z_t, dim=1).gather(1, y).detach()  # (B, 1)
    idx = non_target(target, z_s.shape[1])  # (B, C-1)
    q_s = F.softmax(z_s.gather(1, idx) / T, dim=1)  # (B, C-1)
    q_t = F.softmax(z_t.gather(1, idx) / T, dim=1)
    c = F.relu(cost.float()[idx[:, :, None], idx[:, None, :]]) + COST_EPS  # (B, C-1, C-1)
    return -(p_t_y * log_p_s_y).mean() + weight * sinkhorn_distance(q_s, q_t, c, reg, iters).mean()


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Linear CKA of two (n, d) matrices, rows paired, columns centred (official ``linear_CKA_precenter``):
    ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)``."""
    x, y = x - x.mean(0, keepdim=True), y - y.mean(0, keepdim=True)
    return (y.t() @ x).square().sum() / ((x.t() @ x).norm() * (y.t() @ y).norm())


def cka_cost_matrix(class_feats: torch.Tensor) -> torch.Tensor:
    """``1 - linear_cka`` between every pair of classes; ``class_feats`` (K, n, d): each class's rows (images
    in training-set order, each image's positions row-major, as the official ``generate_class_proto.py``)."""
    x = class_feats.float() - class_feats.float().mean(1, keepdim=True)  # (K, n, d), centred per class
    gram_norm = torch.stack([(xi.t() @ xi).norm() for xi in x])  # (K,)
    cost = torch.empty(len(x), len(x), device=x.device)
    chunk = max(1, 2**26 // (x.shape[2] ** 2))  # classes per einsum: its (chunk, d, d) output stays <= 256 MB
    for i, xi in enumerate(x):
        for k in range(0, len(x), chunk):  # ||X_k^T X_i||_F^2 for a chunk of classes k
            cross = torch.einsum("nd,kne->kde", xi, x[k : k + chunk]).square().sum(dim=(1, 2))
            cost[i, k : k + chunk] = 1 - cross / (gram_norm[i] * gram_norm[k : k + chunk])
    return cost


@torch.no_grad()
def class_features(teacher: nn.Module, batches: Iterable[Any]) -> torch.Tensor:
    """(K, n, d) the teacher's ``feats[-2]`` rows per class (``n``: the smallest class's count of images times
    the map's positions) over ``batches`` (normalised, un-augmented, in training-set order)."""
    feats, labels = [], []
    for batch in batches:
        f = teacher(batch.input, is_feat=True).feats[-2].float()  # (b, d, h, w)
        feats.append(f.flatten(2).transpose(1, 2))  # (b, h*w, d)
        labels.append(batch.target)
    feats, labels = torch.cat(feats), torch.cat(labels)  # (N, h*w, d), (N,)
    per_class = [feats[labels == k] for k in range(int(labels.max()) + 1)]  # once per teacher, off the step
    n = min(len(f) for f in per_class)  # CIFAR-100: 500 each (the official code needs equal counts)
    return torch.stack([f[:n].reshape(-1, f.shape[-1]) for f in per_class])


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@register
class WKDLDistiller(Distiller):
    """WKD-L on the logits, with the class-cost matrix built once per teacher in :meth:`prepare`.

    Defaults: the official CIFAR-100 config ``configs/cifar100/wkd_l/res32x4_res8x4.yaml`` (JiamingLv/WKD):
    CE 1, ``--wkd_weight 600``, ``--wkd_T 8``, Sinkhorn lambda 0.05 and 10 iterations, cost ``cka`` sharpened
    with 1.0 (``1 - exp(-1.0 * cost)``), cosine decay of the weight from epoch 150 to the last; the other
    config (``wrn40_2_shuv1.yaml``) has weight 200 and T 6: ``scripts/run_cifar_newer.sh`` passes them. The
    method's term is the whole official ``loss_kd`` (target term + weighted WD), so ``-b 1``.

    Cost ``cka`` (official ``tools/generate_class_proto.py --feature_type feature`` then
    ``generate_cost_matrix.py``): the teacher's ``feats[-2]`` over the training images, un-augmented, rows per
    class; ``1 - linear CKA`` per pair of classes. It is computed on the training device once and cached in the
    run folder as ``wkd_cost_<sha256 of the teacher checkpoint>_<n images>.pt``; a resumed run (or a rerun in
    the same folder) reads it back. With ``--train_size`` it uses that subset (the official code: all 50,000).
    Cost ``fc``: ``1 - cosine`` of the teacher classifier's weight rows (official ``COST_MATRIX: fc``).
    Differences, on purpose: the official forward runs under fp16 autocast (here ``--amp``); the cost's
    relu + 1e-8 and the masking are gathers instead of boolean indexing (same values, no host sync).
    """

    name = "wkd_l"
    paper = "Wasserstein Distance Rivals Kullback-Leibler Divergence for Knowledge Distillation (NeurIPS 2024, arXiv 2412.08139)"  # noqa: E501
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1.0}
    needs_train_pass = True

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k.startswith("wkd_")})
        self.path_t, self.epochs = args.path_t, args.epochs
        self.weight = args.wkd_weight
        self.register_buffer("cost", None, persistent=False)  # (C, C), set by prepare()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("WKD-L")
        g.add_argument("--wkd_weight", type=float, default=600.0, help="WKD-L: weight of the WD (official: 600)")
        g.add_argument("--wkd_T", type=float, default=8.0, help="WKD-L: temperature (official: 8)")
        g.add_argument("--wkd_sinkhorn_lambda", type=float, default=0.05, help="WKD-L: Sinkhorn lambda (0.05)")
        g.add_argument("--wkd_sinkhorn_iter", type=int, default=10, help="WKD-L: Sinkhorn iterations (10)")
        g.add_argument("--wkd_cost", choices=["cka", "fc"], default="cka", help="WKD-L: class cost (cka)")
        g.add_argument("--wkd_sharpen", type=float, default=1.0, help="WKD-L: cost -> 1 - exp(-s cost) (1; 0: off)")
        g.add_argument("--wkd_decay_epoch", type=int, default=150, help="WKD-L: cosine decay from this epoch")

    def set_epoch(self, epoch: int, stage: str) -> None:
        """Official ``forward_train``: ``0.5 w (1 + cos(pi (e - d) / (E - d)))`` after epoch ``d``."""
        d, w = self.args.wkd_decay_epoch, self.args.wkd_weight
        decayed = epoch > d and self.epochs > d
        self.weight = 0.5 * w * (1 + math.cos((epoch - d) / (self.epochs - d) * math.pi)) if decayed else w

    def prepare(self, teacher: nn.Module, train_loader: Any, folder: Any) -> None:
        self.set_cost(self.raw_cost(teacher, train_loader, folder))

    def set_cost(self, raw: torch.Tensor) -> None:
        """The raw cost (1 - CKA or 1 - cosine), sharpened as the official ``WKD.__init__``."""
        s = self.args.wkd_sharpen
        self.cost = (1 - torch.exp(-s * raw) if s != 0 else raw).float()

    def raw_cost(self, teacher: nn.Module, train_loader: Any, folder: Any) -> torch.Tensor:
        device = next(teacher.parameters()).device
        if self.args.wkd_cost == "fc":
            fc = [m for m in teacher.modules() if isinstance(m, nn.Linear)][-1]
            w = F.normalize(fc.weight.detach().float(), dim=1)  # (C, D): a constant of the run, no gradient
            return 1 - w @ w.t()
        key = file_sha256(self.path_t) if self.path_t else "no-checkpoint"
        path = Path(folder) / f"wkd_cost_{key[:16]}_n{train_loader.num_images}.pt"
        if path.is_file():
            saved = torch.load(path, map_location=device, weights_only=True)
            if saved["teacher_sha256"] == key and saved["n_images"] == train_loader.num_images:
                log.info("wkd_l: class-cost matrix read from %s", path)
                return saved["cost"]
        log.info("wkd_l: computing the class-cost matrix over %d training images", train_loader.num_images)
        plain = DeviceLoader(train_loader.images, train_loader.labels, 250, train_loader.device, train=False)
        was_training = teacher.training
        cost = cka_cost_matrix(class_features(teacher.eval(), plain))
        teacher.train(was_training)
        tmp = path.with_suffix(".tmp")
        torch.save({"cost": cost.cpu(), "teacher_sha256": key, "n_images": train_loader.num_images}, tmp)
        tmp.replace(path)  # atomic: a crash never leaves half a file
        return cost

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        if self.cost is None:
            raise RuntimeError("wkd_l: prepare() must build the class-cost matrix before the first forward")
        a = self.args
        return wkd_logit_loss(out_s.logits, out_t.logits, batch.target, self.cost, a.wkd_T, self.weight,
                              a.wkd_sinkhorn_lambda, a.wkd_sinkhorn_iter)  # fmt: skip
