"""Shared pieces of the two entry points: one-line errors, and placing a model on its device."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from dataset import DataError
from distiller_zoo import PairError
from helper import distributed
from helper.checkpoint import CheckpointError
from helper.engine import NonFiniteLoss
from helper.folder import RunFinished
from helper.logs import setup_logging
from helper.options import UsageError
from helper.run import fit

log = logging.getLogger("kd")

# Errors a user can cause or must act on: reported as one line, without a traceback.
USER_ERRORS = (UsageError, DataError, PairError, CheckpointError)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Turn user errors into ``error: <message>`` and exit status 2; a non-finite loss into status 3."""
    try:
        yield
    except RunFinished as exc:
        log.info("%s", exc)
    except USER_ERRORS as exc:
        log.error("error: %s", exc)
        raise SystemExit(2) from None
    except NonFiniteLoss as exc:
        log.error("error: %s; the last good checkpoint is kept (see --skip_nonfinite)", exc)
        raise SystemExit(3) from None
    except OSError as exc:
        log.error("error: %s", exc)
        raise SystemExit(1) from None


def prepare_model(model: nn.Module, device: torch.device, args: argparse.Namespace) -> nn.Module:
    """Move to the device, in channels-last format if asked. (Compilation wraps the forward only, so the
    module and its ``state_dict`` keys stay those of the plain model.)"""
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        compile_forward(model)
    return model


def compile_forward(model: nn.Module) -> None:
    """``torch.compile`` the model's forward in place.

    A frozen model (eval mode, no trainable parameter: the teacher) is compiled with inductor's
    ``freezing``: its weights and BN statistics become constants, so BN folds into the convolutions and
    CPU convolutions run on pre-packed weights (the teacher's forward, about 40% of a distillation step,
    is 10-15% faster on a CPU). Freezing assumes the weights never change, which holds for the teacher.

    Compilation happens at a call (the first, and any that brings new shapes): an error raised by the
    compiler there (``torch._dynamo``'s exceptions, which wrap the backend's) logs a warning and the model runs
    eagerly from then on. Any other error (out of memory, a device assert, a bad input) is the run's own and
    is raised as it is: falling back would hide it and re-run the step.
    """
    # What compiling raises: dynamo's exceptions, which also wrap the backend's (BackendCompilerFailed).
    from torch._dynamo.exc import TorchDynamoException as CompileError  # imported only with --compile

    eager = model.forward
    frozen = not model.training and not any(p.requires_grad for p in model.parameters())
    current = {"forward": torch.compile(eager, options={"freezing": True} if frozen else None)}

    def forward(*args: object, **kwargs: object) -> object:
        try:
            return current["forward"](*args, **kwargs)
        except CompileError as exc:
            if current["forward"] is eager or isinstance(exc.__cause__, torch.OutOfMemoryError):
                raise
            log.warning("--compile: torch.compile failed here (%s: %s); running eagerly", type(exc).__name__, exc)
            current["forward"] = eager
            return eager(*args, **kwargs)

    model.forward = forward  # type: ignore[method-assign]


def log_fast_path(args: argparse.Namespace) -> None:
    """One line of the run log that says which speed settings this run used (args.json has them as flags)."""
    parts = [
        "channels-last" if args.channels_last else "NCHW (--no_channels_last)",
        f"precision {'fp32' if args.amp == 'none' else args.amp}",
        "compiled" if args.compile else "eager",
    ]
    if hasattr(args, "fold_teacher_bn"):
        folded = "teacher BatchNorms folded" if args.fold_teacher_bn else "teacher unfolded (--no_fold_teacher_bn)"
        parts.insert(1, folded)
    log.info("speed settings: %s", ", ".join(parts))


def run_cli(parser: argparse.ArgumentParser, build: Callable[[argparse.Namespace], Any], argv: list[str] | None) -> int:
    """An entry point's ``main``: parse ``argv``, build the run, train it; a user error is one line, status 2."""
    setup_logging()
    args = parser.parse_args(argv)
    with cli_errors(), distributed.session():
        fit(build(args))
    return 0
