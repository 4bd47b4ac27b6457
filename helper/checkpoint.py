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


# Where published checkpoints keep the weights: RepDistiller's ``{'model': sd}``, the common
# ``{'state_dict': sd}`` (torchvision references, Lightning-style) and ``{'net': sd}`` (pytorch-cifar style).
STATE_KEYS = ("model", "state_dict", "net")
# Key prefixes of wrapped models: ``nn.DataParallel``/DDP (``module.``), a wrapper holding ``self.model``.
PREFIXES = ("module.", "model.")


def _is_state_dict(x: Any) -> bool:
    return isinstance(x, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in x.items())


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint on the CPU with safe unpickling; ``ckpt['model']`` is then its state_dict, found
    under any of :data:`STATE_KEYS` or as a bare state_dict, and ``ckpt['layout']`` says which it was.

    RepDistiller's ``*_last.pth`` files also pickle an ``argparse.Namespace``, which is allowed here.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pth"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else " (it holds no .pth file)"
        raise CheckpointError(f"checkpoint {path} is a directory, not a file: give the checkpoint file{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__})") from None
    if ckpt and _is_state_dict(ckpt):
        return {"model": ckpt, "layout": "a bare state_dict"}
    key = next((k for k in STATE_KEYS if isinstance(ckpt, dict) and _is_state_dict(ckpt.get(k))), None)
    if key is None:
        raise CheckpointError(
            f"{path} is not a model checkpoint (expected a state_dict, bare or under one of "
            f"{', '.join(repr(k) for k in STATE_KEYS)})"
        )
    return {**ckpt, "model": ckpt[key], "layout": f"{{{key!r}: state_dict}}"}


def strip_prefixes(state: dict[str, torch.Tensor], wanted: set[str]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove :data:`PREFIXES` that every key carries, outermost first, until the keys are ``wanted``'s."""
    removed: list[str] = []
    while set(state) != wanted:
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix) :]: v for k, v in state.items()}
        removed.append(prefix)
    return state, removed


def _matching_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The zoo's architecture whose state_dict has these keys (any number of classes), if one has."""
    for name in model_names():
        with torch.device("meta"):  # shapes only: nothing is allocated or initialised
            own = create_model(name, num_classes=100).state_dict()
        # Any number of classes: the classifier's rows may differ.
        same = set(own) == set(state) and all(own[k].shape == state[k].shape or own[k].shape[:1] == (100,) for k in own)
        if same:
            return name
    return None


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
        found = _matching_arch(state) if missing or unexpected else None
        what = f"it holds a {found}, not a {arch} (pass --model_t {found})" if found and found != arch else None
        what = what or f"it does not hold a {arch} with this number of classes"
        raise CheckpointError(f"{source}: {what}: {'; '.join(detail)}")
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
    state, removed = strip_prefixes(ckpt["model"], set(model.state_dict()))
    load_model_state(model, state, arch, f"--path_t {path}")
    prefixes = f", key prefix {' then '.join(repr(p) for p in removed)} removed" if removed else ""
    log.info("teacher checkpoint %s: %s %s%s", path, arch, ckpt["layout"], prefixes)
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
