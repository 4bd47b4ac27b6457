"""CRD's contrast indices, drawn for a whole batch at once on the training device.

For each anchor of class c, RepDistiller's ``CIFAR100InstanceSample`` returns K+1 training-set indices: first the
positive (the anchor itself in ``exact`` mode; a uniformly random image of class c, possibly the anchor, in
``relax`` mode), then K distinct negatives drawn uniformly without replacement from the images of every other
class (with replacement only when K exceeds their number). This sampler draws the same distribution, with
the per-class index lists held as padded tables on the device.

K distinct negatives: every allowed position of the anchor's table row gets an independent random 63-bit key
and the K largest keys win. The keys are exchangeable, so the winning set is a uniformly random K-subset
(a tie needs two equal 63-bit keys: probability about 1e-10 per row among CIFAR-100's 49,500 negatives).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from .cifar100 import DataError

log = logging.getLogger(__name__)

MODES = ("exact", "relax")


class CRDSampler:
    """Draws CRD's (B, K+1) contrast indices for a batch.

    ``labels`` (N,) are the labels of the images the training loader serves and ``indices`` (N,) their
    positions in the full training set (``Batch.index``; default 0..N-1). Negatives come from those N images
    only. ``percent < 1`` keeps a seeded random fraction of each class's negatives, fixed at construction, as
    RepDistiller's ``percent`` does (there with NumPy's global RNG).
    """

    def __init__(
        self,
        labels: torch.Tensor | np.ndarray,
        nce_k: int,
        mode: str = "exact",
        percent: float = 1.0,
        seed: int = 0,
        device: torch.device | str = "cpu",
        indices: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        labels = torch.as_tensor(labels, dtype=torch.int64).cpu()
        if nce_k < 1:
            raise DataError(f"--nce_k must be positive, got {nce_k}")
        if mode not in MODES:
            raise DataError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not 0.0 < percent <= 1.0:
            raise DataError(f"the negative fraction (percent) must be in (0, 1], got {percent}")
        ids = torch.arange(len(labels)) if indices is None else torch.as_tensor(indices, dtype=torch.int64).cpu()
        if ids.shape != labels.shape:
            raise ValueError(f"{len(labels)} labels but indices of shape {tuple(ids.shape)}")
        self.nce_k, self.mode, self.percent = nce_k, mode, percent
        self.device = torch.device(device)
        self.indices = ids.to(self.device)  # (N,) the index space of Batch.index

        num_classes = int(labels.max()) + 1 if len(labels) else 0
        members = [ids[labels == c] for c in range(num_classes)]  # ids of each class, ascending
        if sum(len(m) > 0 for m in members) < 2:
            raise DataError("CRD needs images of at least two classes in the training set")
        gen = torch.Generator().manual_seed(seed)
        negatives = []
        for c in range(num_classes):
            others = torch.cat(members[:c] + members[c + 1 :])  # every image of another class
            keep = int(len(others) * percent)
            if keep < 1:
                raise DataError(f"percent {percent} keeps no negative for class {c} ({len(others)} available)")
            if keep < len(others):
                others = others[torch.randperm(len(others), generator=gen)[:keep]]
            negatives.append(others)
        self._pos, self._pos_count = _padded_table(members, self.device)  # (C, P), (C,)
        self._neg, self._neg_count = _padded_table(negatives, self.device)  # (C, Q), (C,)
        counts = [len(n) for n in negatives]
        self._ragged = min(counts) != max(counts)  # unequal class sizes: mask the padding when drawing
        self._fewest_negatives = min(counts)
        if nce_k > self._fewest_negatives:
            log.warning(
                "--nce_k %d exceeds the %d negatives available to some classes; those anchors draw their "
                "negatives with replacement, as RepDistiller does", nce_k, self._fewest_negatives,
            )  # fmt: skip

    def negatives_of(self, label: int) -> torch.Tensor:
        """The training-set indices class ``label``'s negatives are drawn from (after ``percent``)."""
        return self._neg[label, : self._neg_count[label]]

    def sample(self, index: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Contrast indices (B, K+1) int64 for anchors ``index`` (B,) of classes ``target`` (B,).

        Column 0 is the positive, columns 1..K the negatives. ``generator`` lives on the sampler's device.
        """
        neg = self._draw_negatives(target, generator)  # (B, K)
        if self.mode == "exact":
            pos = index
        else:
            count = self._pos_count[target]  # (B,)
            # 63 random bits modulo the class size: the bias (size / 2**63) is far below anything measurable.
            r = torch.empty_like(target).random_(generator=generator) % count  # (B,)
            pos = self._pos.view(-1)[target * self._pos.shape[1] + r]
        return torch.cat([pos[:, None], neg], dim=1)

    def _draw_negatives(self, target: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        b, k, width = len(target), self.nce_k, self._neg.shape[1]
        count = self._neg_count[target]  # (B,) negatives available to each anchor
        cols = None
        if k <= width:
            keys = torch.empty((b, width), dtype=torch.int64, device=target.device)  # (B, Q)
            keys.random_(generator=generator)  # uniform in [0, 2**63)
            if self._ragged:  # padding positions lose against any real key
                pad = torch.arange(width, device=target.device) >= count[:, None]
                keys.masked_fill_(pad, -1)
            cols = keys.topk(k, dim=1, sorted=False).indices  # (B, K) distinct positions in each row
        if k > self._fewest_negatives:  # some anchors have fewer than K negatives: draw with replacement
            with_repl = torch.empty((b, k), dtype=torch.int64, device=target.device).random_(generator=generator)
            with_repl %= count[:, None]
            cols = with_repl if cols is None else torch.where((count < k)[:, None], with_repl, cols)
        flat = target[:, None] * width + cols  # (B, K) into the flattened table
        return self._neg.view(-1).index_select(0, flat.view(-1)).view(b, k)


def _padded_table(rows: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack index lists of unequal length into (len(rows), longest) int64, padded with 0, and their lengths."""
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    table = torch.zeros((len(rows), int(lengths.max())), dtype=torch.int64)
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    return table.to(device), lengths.to(device)
