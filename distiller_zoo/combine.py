"""Several registered methods in one run: ``--distill A --add B:w --add C:w``.

The loss becomes ``gamma * CE + alpha * KD + beta * A + w_B * B + w_C * C``: each added method is built and
checked exactly as ``--distill`` builds it (its own flags, adapters and published defaults), its term is
computed on the same forward pass and logged under its own name. ``--add B`` without a weight takes B's
published weight (its ``defaults["beta"]``). Single-method command lines are unchanged: without ``--add``
nothing here is used.

TTM's code (zkxufo/TTM ``train_student.py``) has one ``--add`` choice (kd, ttm, wttm) whose weight is ``-a``;
here any registered method with a loss of its own can be added, each with its own weight, so TTM's
``--distill itrd --add wttm -b 1 -a W`` is ``--distill itrd --add wttm:W -a 0`` (or ``--distill wttm -b W
--add itrd:1``, the same loss).

What cannot be added (a clear error before any work): the ``--distill`` method itself, a method twice, a
method without a term of its own (``kd``: use ``-a``), one with an init stage, one that changes the deployed
network (SimKD), one that reads pre-activation features when the ``--distill`` method does not (or the other
way round; a ``pooled_only`` method such as ND reads ``feats[-1]``, the same either way), and any addition
with ``--two_views``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .base import Distiller, Shapes, get_method

__all__ = ["AddedMethods", "added_suffix", "parse_added"]


def _parse_one(item: str) -> tuple[str, float | None]:
    name, sep, weight = item.partition(":")
    if not name:
        raise ValueError(f"--add {item!r}: expected METHOD or METHOD:WEIGHT, e.g. itrd:1.0")
    get_method(name)  # unknown names raise with the list of valid ones
    if not sep:
        return name, None
    try:
        value = float(weight)
    except ValueError:
        raise ValueError(f"--add {item!r}: weight {weight!r} is not a number") from None
    if not value >= 0:  # also rejects nan
        raise ValueError(f"--add {item!r}: the weight must be zero or positive")
    return name, value


def parse_added(specs: Sequence[str] | None, primary: str) -> list[tuple[str, float]]:
    """``["itrd:1.0", "pkt"]`` (repeated ``--add`` flags, each may also be comma-separated) ->
    ``[("itrd", 1.0), ("pkt", 30000.0)]``; a missing weight is the method's published ``beta``.
    Raises ``ValueError`` naming the bad item."""
    out: list[tuple[str, float]] = []
    for spec in specs or ():
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, weight = _parse_one(item)
            cls = get_method(name)
            if name == primary or name in (n for n, _ in out):
                raise ValueError(f"--add {name}: already in this run (--distill {primary} or an earlier --add)")
            if cls.init_stage or cls.deploy is not Distiller.deploy:
                raise ValueError(f"--add {name}: methods with an init stage or their own deployed network run alone")
            if not cls.has_loss:
                raise ValueError(f"--add {name}: it has no term of its own (for the KD term, use -a)")
            if cls.preact != get_method(primary).preact and not cls.pooled_only:
                raise ValueError(f"--add {name}: reads {'pre' if cls.preact else 'post'}-activation features, "
                                 f"--distill {primary} the others; they cannot share one forward pass")  # fmt: skip
            out.append((name, cls.defaults.get("beta", 0.0) if weight is None else weight))
    return out


def added_suffix(specs: Sequence[str] | None, primary: str) -> str:
    """The run folder's record of the added methods, e.g. ``add-itrd-1`` (no ``:`` in folder names)."""
    added = parse_added(specs, primary)
    return "_".join(f"add-{name}-{weight:g}" for name, weight in added)


class AddedMethods(nn.Module):
    """The added methods of one run, built from the same shapes and flags as the ``--distill`` method."""

    def __init__(self, added: Sequence[tuple[str, float]], s_shapes: Shapes, t_shapes: Shapes, args: Any,
                 n_data: int) -> None:  # fmt: skip
        super().__init__()  # each method's check_pair is the caller's, before the data is built
        self.methods = nn.ModuleDict({name: get_method(name)(s_shapes, t_shapes, args, n_data) for name, _ in added})
        self.weights = dict(added)

    @property
    def needs_contrast(self) -> bool:
        return any(m.needs_contrast for m in self.methods.values())

    def __iter__(self) -> Iterator[tuple[str, float, Distiller]]:  # type: ignore[override]
        return ((name, self.weights[name], m) for name, m in self.methods.items())

    def __len__(self) -> int:
        return len(self.methods)

    def trainable_modules(self) -> list[nn.Module]:
        return [mod for m in self.methods.values() for mod in m.trainable_modules()]

    def set_epoch(self, epoch: int, stage: str) -> None:
        for m in self.methods.values():
            m.set_epoch(epoch, stage)

    def bind_teacher(self, teacher: nn.Module) -> None:
        for m in self.methods.values():
            m.bind_teacher(teacher)

    def bind_student(self, student: nn.Module) -> None:
        for m in self.methods.values():
            m.bind_student(student)

    def prepare(self, teacher: nn.Module, train_loader: Any, folder: Any) -> None:
        for m in self.methods.values():
            if m.needs_train_pass:  # WKD-L's class costs, as for --distill
                m.prepare(teacher, train_loader, folder)

    def terms(self, out_s: Any, out_t: Any, batch: Any) -> dict[str, torch.Tensor]:
        """Each added method's unweighted loss (for tests; the engine computes them one by one)."""
        return {name: m(out_s, out_t, batch) for name, _, m in self}
