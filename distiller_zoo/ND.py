"""ND: "Improving Knowledge Distillation via Regularizing Feature Norm and Direction", Yuzhu Wang, Lechao Cheng,
Manni Duan, Yongheng Wang, Zunlei Feng and Shu Kong, arXiv 2305.17007 (2023).

Loss: per sample, one minus the student's embedding (the pooled vector before the classifier) projected on the
unit direction of its class's teacher center (the teacher's mean embedding of that class over the training
set), divided by the larger of the student's and the teacher's embedding norms: the direction is pulled to the
teacher's class mean and the norm pushed up to at least the teacher's.

ND is a term added to a base method: KD++, DKD++, DIST++ and ReviewKD++ of the official code
(WangYZ1608/Knowledge-Distillation-via-ND) are ``--distill kd -r 1 -a W_kd --add nd:W``, ``--distill dkd ...
--add nd:W``, ``--distill dist ... --add nd:W`` and ``--distill reviewkd ... --add nd:W`` (``combine.py``); their
published weights are the ``kd++``, ``dkd++``, ``dist++`` and ``reviewkd++`` rows of
``helper/published/recipes.csv``. ``--distill nd`` alone is CE + ND. Not reproduced by those recipes (their notes
say so): the official scripts ramp the base method's term by ``min(1, epoch / 20)`` from epoch 0 (here KD and DIST
have no warm-up, DKD and ReviewKD their own from epoch 1) and train with Nesterov SGD (here plain momentum).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import PairError
from dataset import DeviceLoader

from .base import Distiller, Shapes, register
from .WKD import file_sha256

__all__ = ["class_means", "embedding_projector", "nd_loss"]

log = logging.getLogger(__name__)

# The official DirectNormLoss divides by max(|s|, |t|) with no epsilon; this floor only acts when both
# embeddings are (numerically) zero, where the official value is NaN.
NORM_EPS = 1e-12
CENTER_BATCH = 500  # images per teacher forward of the center pass (eval mode: the size does not change a value)


def nd_loss(s_emb: torch.Tensor, t_emb: torch.Tensor, directions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Batch mean of ``1 - <s, e_y> / max(|s|, |t|)`` (official ``utils.py``, ``DirectNormLoss``, before its
    ``nd_loss_factor``). ``s_emb``, ``t_emb`` (B, D); ``directions`` (C, D): the unit class centers."""
    s, t = s_emb.float(), t_emb.float()
    e = directions[target]  # (B, D): the direction of each sample's class (an integer gather: no host sync)
    max_norm = torch.maximum(s.norm(dim=1), t.norm(dim=1)).clamp_min(NORM_EPS)  # (B,)
    return (1 - (s * e).sum(dim=1) / max_norm).mean()


def embedding_projector(s_dim: int, t_dim: int) -> nn.Sequential:
    """The official student wrapper's ``fc1`` (``Models/embtrans_cifar.py``, ``EmbTrans``) for students whose
    embedding size differs from the teacher's: ``BatchNorm1d(s)`` (weight 1, bias 0), ``Dropout(0.5)``,
    ``Linear(s, t)`` with a zero bias (its weight at PyTorch's default initialisation)."""
    proj = nn.Sequential(nn.BatchNorm1d(s_dim), nn.Dropout(0.5), nn.Linear(s_dim, t_dim))
    nn.init.ones_(proj[0].weight)
    nn.init.zeros_(proj[0].bias)
    nn.init.zeros_(proj[2].bias)
    return proj


@torch.no_grad()
def class_means(teacher: nn.Module, batches: Iterable[Any]) -> torch.Tensor:
    """(C, D) the mean of the teacher's embedding (``feats[-1]``) per class over ``batches`` (official
    ``emb_fea_distribution.py``, ``emb_fea``). Sums as one-hot products in float64: deterministic kernels, and
    no TF32 rounding of the 50,000-term sums. A class without an image is an error."""
    sums = counts = None
    for batch in batches:
        out = teacher(batch.input, is_feat=True)
        emb = out.feats[-1].double()  # (b, D)
        onehot = F.one_hot(batch.target, out.logits.shape[1]).double()  # (b, C)
        sums = onehot.t() @ emb if sums is None else sums + onehot.t() @ emb  # (C, D)
        counts = onehot.sum(0) if counts is None else counts + onehot.sum(0)  # (C,)
    if sums is None:
        raise ValueError("nd: the class centers need at least one training image")
    empty = torch.nonzero(counts == 0).flatten().tolist()  # once, before training (not on the step)
    if empty:
        raise ValueError(f"nd: classes {empty[:10]} have no training image; their teacher centers are undefined")
    return (sums / counts[:, None]).float()


@register
class NDDistiller(Distiller):
    """ND on the student's and teacher's embeddings (``feats[-1]``), with the teacher's class centers built
    once in :meth:`prepare`.

    Centers (official ``emb_fea_distribution.py``, whose JSON files the training scripts read): the frozen
    teacher in eval mode over the training set as the training loader serves it (``Dataset/cifar.py``: pad 4,
    random crop, flip; one augmented view per image), the mean embedding per class. Here that pass is the
    training loader's augmentation of epoch 0, which training (epochs 1 on) never draws: the same distribution,
    fixed by the seed. ``--nd_centers train`` uses the un-augmented images instead. The centers are cached in the
    run folder as ``nd_centers_<sha256 of the teacher checkpoint>_n<images>_<mode>_s<seed>.pt`` and read back by
    a resumed run; with ``--train_size`` they come from that subset (the official code: all 50,000).

    A student whose embedding size differs from the teacher's gets the official projector
    (:func:`embedding_projector`, trained with the student, not deployed): on the official pairs exactly the
    WRN-40-1, MobileNetV2, ShuffleV1 and ShuffleV2 students that its code wraps. Differences, on purpose: the
    official code rounds every embedding value and every center to 4 decimals (its JSON), here they are kept in
    float32; the norm floor :data:`NORM_EPS`.
    """

    name = "nd"
    paper = "Improving Knowledge Distillation via Regularizing Feature Norm and Direction (arXiv 2305.17007, 2023)"
    # Official train_cifar_kd.py: --cls_loss_factor 1, --nd_loss_factor 1 (argparse defaults).
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 1.0}
    needs_train_pass = True
    pooled_only = True  # reads feats[-1] alone, the same with and without preact: addable to ReviewKD
    table_suffix = "++"  # the official names: --distill dkd --add nd is DKD++

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        s_dim, t_dim = s_shapes[-1][0], t_shapes[-1][0]
        self.projector = embedding_projector(s_dim, t_dim) if s_dim != t_dim else None
        self.mode, self.path_t = args.nd_centers, args.path_t
        self.register_buffer("directions", None, persistent=False)  # (C, D) unit centers, set by prepare()

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("ND (KD++, DKD++, DIST++, ReviewKD++: --add nd:W)")
        g.add_argument(
            "--nd_centers", choices=["train_aug", "train"], default="train_aug",
            help="ND: the teacher's class centers over the augmented (official) or plain training images",
        )  # fmt: skip

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        for side, shapes in (("student", s_shapes), ("teacher", t_shapes)):
            if len(shapes[-1]) != 1:
                shape = tuple(shapes[-1])
                raise PairError(f"nd: the {side}'s last feature has shape {shape}, expected a pooled vector")

    def prepare(self, teacher: nn.Module, train_loader: Any, folder: Any) -> None:
        self.set_centers(self.centers(teacher, train_loader, folder))

    def set_centers(self, centers: torch.Tensor) -> None:
        """Keep the unit directions of ``centers`` (C, D); the loss never reads their norms."""
        self.directions = F.normalize(centers.float(), dim=1)

    def centers(self, teacher: nn.Module, train_loader: Any, folder: Any) -> torch.Tensor:
        device, n, seed = train_loader.device, train_loader.num_images, int(getattr(train_loader, "seed", 0))
        key = file_sha256(self.path_t) if self.path_t else "no-checkpoint"
        path = Path(folder) / f"nd_centers_{key[:16]}_n{n}_{self.mode}_s{seed}.pt"
        if path.is_file():
            saved = torch.load(path, map_location=device, weights_only=True)
            if saved["teacher_sha256"] == key and saved["n_images"] == n:
                log.info("nd: class centers read from %s", path)
                return saved["centers"]
        log.info("nd: the teacher's class centers over %d training images (%s)", n, self.mode)
        augment = self.mode == "train_aug"
        loader = DeviceLoader(train_loader.images, train_loader.labels, CENTER_BATCH, device, train=augment, seed=seed)
        was_training = teacher.training
        centers = class_means(teacher.eval(), loader.epoch(0))
        teacher.train(was_training)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: torchrun's ranks all compute and write
        torch.save({"centers": centers.cpu(), "teacher_sha256": key, "n_images": n}, tmp)
        tmp.replace(path)  # atomic: a crash never leaves half a file
        return centers

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        if self.directions is None:
            raise RuntimeError("nd: prepare() must build the teacher's class centers before the first forward")
        s_emb = out_s.feats[-1]  # (B, D_s)
        if self.projector is not None:
            s_emb = self.projector(s_emb)  # (B, D_t)
        return nd_loss(s_emb, out_t.feats[-1], self.directions, batch.target)
