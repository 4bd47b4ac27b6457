"""Checkpoints: atomic writes, safe loading, RNG state, and teacher loading.

A checkpoint is a plain dict of tensors and Python values (no pickled classes), so it loads with
``torch.load(..., weights_only=True)``. Teacher checkpoints keep RepDistiller's ``{'model': state_dict}``
entry so that RepDistiller's own ``train_student.py`` can read them.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import create_model, model_names, teacher_name_from_path

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, or for another model."""


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` so that a crash at any moment leaves either the old file or the new one.

    The data goes to a temporary file in the same folder, is flushed to disk, and then renamed over
    ``path`` (``os.replace`` is atomic on POSIX and Windows). A full disk raises :class:`OSError` with a
    clear message and leaves the previous file untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        full = _disk_full(exc)
        if full:
            raise OSError(full, f"no space left to write {path}; the previous checkpoint is intact") from exc
        raise


def _disk_full(exc: BaseException | None) -> int:
    """ENOSPC or EDQUOT if ``exc`` is, or was raised while handling, a full disk: ``torch.save`` turns the
    ``OSError`` of a failed write into a ``RuntimeError`` ("unexpected pos ...") with the ``OSError`` as context."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return exc.errno
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return 0


# save_atomic's temporary files: "." + the checkpoint's name + "." + tempfile.mkstemp's 8 random characters + ".tmp".
_PARTIAL_WRITE = re.compile(r"\..+\.pth\.[a-z0-9_]{8}\.tmp")


def remove_partial_writes(folder: str | os.PathLike) -> int:
    """Delete the temporary files of checkpoint writes killed before their rename (in ``folder`` only, and only
    :func:`save_atomic`'s name pattern); returns how many. Call it while holding the run folder's lock."""
    removed = 0
    for path in Path(folder).iterdir():
        if _PARTIAL_WRITE.fullmatch(path.name) and path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    if removed:
        log.info("removed %d partial checkpoint write(s) left by an interrupted run in %s", removed, folder)
    return removed


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on the CPU with safe unpickling.

    RepDistiller's ``*_last.pth`` files also pickle an ``argparse.Namespace``, which is allowed here.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    if isinstance(ckpt, dict) and "model" not in ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        ckpt = {"model": ckpt}  # a bare state_dict (e.g. a released model file)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise CheckpointError(f"{path} is not a model checkpoint (expected a dict with a 'model' state_dict)")
    return ckpt


def load_model_state(model: nn.Module, state: dict[str, torch.Tensor], arch: str, source: str) -> None:
    """``load_state_dict(strict=True)`` with a message that says what does not match."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing keys (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[0]})")
        if wrong:
            k = wrong[0]
            detail.append(f"{len(wrong)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise CheckpointError(f"{source} does not hold a {arch} with this number of classes: {'; '.join(detail)}")
    model.load_state_dict(state, strict=True)


def teacher_arch(ckpt: dict[str, Any], path: str, model_t: str | None) -> str:
    """The teacher's architecture: ``--model_t``, else what the checkpoint records, else the folder name
    (RepDistiller's rule, e.g. ``save/models/resnet32x4_vanilla/ckpt_epoch_240.pth``)."""
    if model_t:
        return model_t
    recorded = ckpt.get("arch")
    if isinstance(recorded, str):
        return recorded
    guess = teacher_name_from_path(path)
    if guess not in model_names():
        raise CheckpointError(
            f"cannot tell the architecture of {path}: the checkpoint does not record it and the folder name "
            f"gives {guess!r}; pass --model_t (one of: {', '.join(model_names())})"
        )
    return guess


def load_teacher(path: str, model_t: str | None, num_classes: int) -> tuple[nn.Module, str, dict[str, Any]]:
    """Build and load a frozen teacher (eval mode, no gradients) from any supported checkpoint."""
    ckpt = load_checkpoint(path)
    arch = teacher_arch(ckpt, path, model_t)
    model = create_model(arch, num_classes=num_classes)
    load_model_state(model, ckpt["model"], arch, f"--path_t {path}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, arch, ckpt


# ----------------------------------------------------------------------------------------------------------
# RNG state, stored as tensors and plain values so that checkpoints stay weights_only-loadable.


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x
