"""Command-line flags of ``train_teacher.py`` and ``train_student.py``.

Every flag of RepDistiller's two scripts keeps its name and default, so its published commands run
verbatim. New flags follow the same spelling. Parsed flags are never changed afterwards: values derived
from them (the effective learning rate, the loss weights, the run folder) are computed by the functions
below and stored under names of their own.
"""

from __future__ import annotations

import argparse
import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError
from distiller_zoo import get_method, method_names
from distiller_zoo.base import add_method_arguments
from distiller_zoo.combine import added_suffix, parse_added
from models import model_names

# RepDistiller lowers the learning rate of these students to 0.01 (train_student.py / train_teacher.py).
SMALL_LR_MODELS = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
DEFAULT_LR = 0.05
SMALL_LR = 0.01


# Switches of train_student.py that change what a method trains, each with the suffix it adds to the run folder's
# name and (but the protocol's two_views) to the method's name in the report: KD+LS, DKD+LS, KD+CTKD, KD+DOT.
SWITCHES = {"logit_stand": "ls", "ctkd": "ctkd", "two_views": "2v", "dot": "dot"}


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    # RepDistiller's flags and defaults.
    add("--print_freq", type=int, default=100, help="steps between progress lines")
    add("--tb_freq", type=int, default=500, help="accepted for compatibility (unused, as in RepDistiller)")
    add("--save_freq", type=int, default=40, help="save a checkpoint every N epochs")
    add("--batch_size", type=int, default=64, help="training batch size")
    add("--num_workers", type=int, default=8, help="accepted for compatibility; the data lives on the device")
    add("--epochs", type=int, default=240, help="number of training epochs")
    add(
        "--learning_rate",
        type=float,
        default=None,
        help=f"SGD learning rate (default {DEFAULT_LR:g}; {SMALL_LR:g} for {'/'.join(SMALL_LR_MODELS)}, "
        "as RepDistiller)",
    )
    add("--lr_decay_epochs", type=str, default="150,180,210", help="epochs after which the LR decays")
    add("--lr_decay_rate", type=float, default=0.1, help="LR decay factor")
    add("--weight_decay", type=float, default=5e-4, help="SGD weight decay")
    add("--momentum", type=float, default=0.9, help="SGD momentum")
    add("--dataset", type=str, default="cifar100", choices=["cifar100"], help="dataset")
    # New flags.
    add("--data_folder", type=str, default=None, help="CIFAR-100 root (default: $CIFAR100_ROOT, else ./data)")
    add("--train_size", type=int, default=None, help="class-balanced training subset of N images")
    add("--test_size", type=int, default=None, help="evaluate on a class-balanced test subset (smoke runs only)")
    add("--val_size", type=int, default=0, help="hold out N training images (class-balanced) for validation")
    add("--seed", type=int, default=None, help="random seed (default: derived from --trial)")
    add("--deterministic", action="store_true", help="bit-identical reruns (deterministic kernels)")
    add("--resume", type=str, default=None, help="checkpoint to resume from, or 'auto' for the run's latest")
    add("--device", type=str, default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    add("--save_dir", type=str, default="./save", help="root of the run folders")
    add("--run_name", type=str, default=None, help="run folder name (default: RepDistiller's naming)")
    add("--eval_batch_size", type=int, default=None, help="evaluation batch size (default: 1000 on GPU, 100 on CPU)")
    add("--eval_freq", type=int, default=1, help="test-set evaluation every N epochs, and after the last")
    add("--drop_last", action="store_true", help="drop the last partial training batch")
    add("--amp", type=str, default="none", choices=["none", "bf16", "fp16"], help="autocast precision")
    # On by default (results equal up to float rounding, tests/test_fastpath.py); RepDistiller's commands that do
    # not name it get it too. --no_channels_last: NCHW, as RepDistiller.
    add("--channels_last", action="store_true", default=True, help="channels-last memory format (default)")
    add("--no_channels_last", dest="channels_last", action="store_false", help="NCHW memory format")
    add("--compile", action="store_true", help="torch.compile the model forwards")
    add("--skip_nonfinite", action="store_true", help="skip steps whose loss is not finite (counted)")
    add("--sync_bn", action="store_true", help="torchrun: BatchNorm statistics over the global batch")


def teacher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Train a model of the zoo on CIFAR-100 (cross-entropy).")
    _common_arguments(parser)
    parser.add_argument("--model", type=str, default="resnet110", help=f"one of: {', '.join(model_names())}")
    parser.add_argument("-t", "--trial", type=int, default=0, help="trial id (folder name and default seed)")
    return parser


def student_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Distil a frozen teacher into a student on CIFAR-100.")
    _common_arguments(parser)
    parser.add_argument("--model_s", type=str, default="resnet8", help=f"one of: {', '.join(model_names())}")
    parser.add_argument("--path_t", type=str, default=None, help="teacher checkpoint")
    parser.add_argument("--model_t", type=str, default=None, help="teacher architecture if not recorded")
    parser.add_argument("--distill", type=str, default="kd", help=f"one of: {', '.join(method_names())}")
    parser.add_argument("--trial", type=str, default="1", help="trial id (folder name and default seed)")
    parser.add_argument(
        "-r", "--gamma", type=float, default=None, help="CE weight (default: the method's published, 1 for most)"
    )
    parser.add_argument("-a", "--alpha", type=float, default=None, help="KD weight (default: the method's published)")
    parser.add_argument(
        "-b", "--beta", type=float, default=None, help="weight of the method's term (default: its published)"
    )
    parser.add_argument(
        "--fold_teacher_bn",
        action="store_true",
        default=True,
        help="fold the frozen teacher's BatchNorms into its convolutions (default; faster; checked against the "
        "unfolded teacher at start, outputs equal up to rounding)",
    )
    parser.add_argument(
        "--no_fold_teacher_bn", dest="fold_teacher_bn", action="store_false", help="keep the teacher's BatchNorms"
    )
    parser.add_argument(
        "--no_teacher_eval",
        action="store_true",
        help="skip the teacher's test-set evaluation before training (its accuracy is then not recorded)",
    )
    parser.add_argument(
        "--two_views",
        action="store_true",
        help="MLKD's protocol: every image as a weak (crop, flip) and a strong (+ RandAugment, Cutout) view; "
        f"only methods with a two-view loss ({', '.join(n for n in method_names() if get_method(n).two_views)})",
    )
    parser.add_argument(
        "--add",
        action="append",
        default=None,
        metavar="METHOD[:WEIGHT]",
        help="add another method's term with its own weight (default: its published), e.g. --add itrd:1.0; "
        "repeat or comma-separate for more (distiller_zoo/combine.py)",
    )
    parser.add_argument(
        "--wrn_preact_bn", type=str, default="twice", choices=["twice", "once"],
        help="WRN students with preact features (abound, ofd): update the three tapped BNs' running statistics "
        "twice per step as RepDistiller's wrn.py (twice), or once",
    )  # fmt: skip
    add_method_arguments(parser)
    return parser


# ----------------------------------------------------------------------------------------------------------
# Derived values


def lr_decay_epochs(args: argparse.Namespace) -> list[int]:
    try:
        epochs = [int(e) for e in args.lr_decay_epochs.split(",") if e.strip()]
    except ValueError:
        raise UsageError(
            f"--lr_decay_epochs {args.lr_decay_epochs!r}: expected comma-separated epochs, e.g. 150,180,210"
        ) from None
    if any(e <= 0 for e in epochs) or epochs != sorted(epochs):
        raise UsageError(f"--lr_decay_epochs {args.lr_decay_epochs!r}: expected increasing positive epochs")
    return epochs


def effective_lr(args: argparse.Namespace, model_name: str) -> float:
    """The user's --learning_rate if given, else RepDistiller's default for this model."""
    if args.learning_rate is not None:
        return args.learning_rate
    return SMALL_LR if model_name in SMALL_LR_MODELS else DEFAULT_LR


@dataclass(frozen=True)
class LossWeights:
    gamma: float  # cross-entropy
    alpha: float  # KD (KL at temperature kd_T)
    beta: float  # the method's own term


def loss_weights(args: argparse.Namespace) -> LossWeights:
    """Given weights win; a weight not given takes the method's published value.

    For every command of RepDistiller's scripts this equals RepDistiller's behaviour (its ``-r`` default 1
    is the published CE weight of all its methods but KD, whose script passes ``-r 0.1``), and ``-a``/``-b``
    no longer crash when omitted.
    """
    defaults = get_method(args.distill).defaults
    gamma = defaults.get("gamma", 1.0) if args.gamma is None else args.gamma
    alpha = defaults.get("alpha", 0.0) if args.alpha is None else args.alpha
    beta = defaults.get("beta", 0.0) if args.beta is None else args.beta
    return LossWeights(gamma=float(gamma), alpha=float(alpha), beta=float(beta))


def seed_of(args: argparse.Namespace) -> int:
    """--seed, else a number derived from --trial (so trials differ and each is reproducible)."""
    if args.seed is not None:
        return args.seed
    digits = "".join(ch for ch in str(args.trial) if ch.isdigit())
    return int(digits) if digits else sum(map(ord, str(args.trial)))


def _fmt(x: float) -> str:
    return f"{x:g}"


def _protocol_suffix(args: argparse.Namespace) -> str:
    """Runs with a non-standard protocol get their own folders, so they never mix with full runs."""
    parts = []
    if args.epochs != 240:
        parts.append(f"ep{args.epochs}")
    if args.train_size:
        parts.append(f"n{args.train_size}")
    if args.val_size:
        parts.append(f"val{args.val_size}")
    if args.test_size:
        parts.append(f"test{args.test_size}")
    if "distill" in vars(args):  # a student run: logit modifiers, the two-view protocol, DOT and added methods
        parts += [suffix for flag, suffix in SWITCHES.items() if getattr(args, flag)]  # change what it trains
        if args.add:
            parts.append(added_suffix(args.add, args.distill))
    return "".join(f"_{p}" for p in parts)


def schedule_variants(folder: Path, args: argparse.Namespace) -> dict[int, Path]:
    """The existing folders of the run in ``folder`` under another ``--epochs``, by their epochs: the names
    differ in the ``_ep<N>`` part of the protocol suffix alone (none for 240). With ``--run_name`` the name does
    not depend on the schedule: nothing."""
    if args.run_name or not folder.parent.is_dir():
        return {}
    suffix = _protocol_suffix(args)
    prefix = folder.name[: len(folder.name) - len(suffix)]
    found = {}
    for path in folder.parent.glob(glob.escape(prefix) + "*"):
        middle = path.name[len(prefix) :]
        epochs = _epochs_of(middle) or 240  # checked below: the name must be the one of that schedule
        variant = argparse.Namespace(**{**vars(args), "epochs": epochs})
        if epochs != args.epochs and path.is_dir() and prefix + _protocol_suffix(variant) == path.name:
            found[epochs] = path
    return found


def _epochs_of(suffix: str) -> int:
    digits = suffix[3:].split("_", 1)[0] if suffix.startswith("_ep") else ""
    return int(digits) if digits.isdigit() else 0


def teacher_run_folder(args: argparse.Namespace) -> Path:
    """RepDistiller's ``save/models/{model}_{dataset}_lr_{lr}_decay_{wd}_trial_{trial}``."""
    lr = effective_lr(args, args.model)
    name = args.run_name or (
        f"{args.model}_{args.dataset}_lr_{_fmt(lr)}_decay_{_fmt(args.weight_decay)}_trial_{args.trial}"
        + _protocol_suffix(args)
    )
    return Path(args.save_dir) / "models" / name


def student_run_folder(args: argparse.Namespace, model_t: str) -> Path:
    """RepDistiller's ``S:{s}_T:{t}_{dataset}_{distill}_r:{g}_a:{a}_b:{b}_{trial}`` with '-' for ':'."""
    w = loss_weights(args)
    name = args.run_name or (
        f"S-{args.model_s}_T-{model_t}_{args.dataset}_{args.distill}"
        f"_r-{_fmt(w.gamma)}_a-{_fmt(w.alpha)}_b-{_fmt(w.beta)}_{args.trial}" + _protocol_suffix(args)
    )
    return Path(args.save_dir) / "student_model" / name


# ----------------------------------------------------------------------------------------------------------
# Validation: everything that can be checked from the flags alone, before any work.


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise UsageError(f"--{name} {value}: must be positive")


def _non_negative(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 0:
            raise UsageError(f"--{name} {value}: must be zero or positive")


def _check_model(flag: str, name: str) -> None:
    if name not in model_names():
        raise UsageError(f"--{flag} {name!r}: unknown model; valid names: {', '.join(model_names())}")


def _finite(args: argparse.Namespace) -> None:
    """Every float-valued flag (weights, temperatures, lr, momentum, decay, each method's own) is finite:
    ``float()`` accepts ``nan`` and ``inf``, which would start training and stop at the first step."""
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name} {value}: must be a finite number")


def _check_common(args: argparse.Namespace) -> None:
    _finite(args)
    _positive(args, "epochs", "batch_size", "learning_rate", "save_freq", "print_freq", "eval_batch_size", "eval_freq")
    _positive(args, "train_size", "test_size", "lr_decay_rate")
    _non_negative(args, "val_size", "weight_decay", "momentum")
    lr_decay_epochs(args)
    if args.device is not None:
        import torch

        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UsageError(f"--device {args.device!r}: expected cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: CUDA is not available here; use --device cpu")
    if args.resume is not None and args.resume != "auto" and not os.path.isfile(args.resume):
        raise UsageError(f"--resume {args.resume}: no such file (give a checkpoint path or 'auto')")


def validate_teacher_args(args: argparse.Namespace) -> None:
    _check_common(args)
    _check_model("model", args.model)


def _check_added(args: argparse.Namespace) -> None:
    if not args.add:
        return
    if args.two_views:
        raise UsageError("--add: not with --two_views (the added methods have no two-view loss)")
    try:
        parse_added(args.add, args.distill)
    except ValueError as e:
        raise UsageError(str(e)) from None


def validate_student_args(args: argparse.Namespace) -> None:
    _check_common(args)
    _check_model("model_s", args.model_s)
    if args.model_t is not None:
        _check_model("model_t", args.model_t)
    if args.distill not in method_names():
        raise UsageError(f"--distill {args.distill!r}: unknown method; valid: {', '.join(method_names())}")
    if args.path_t is None:
        raise UsageError("--path_t is required: the teacher checkpoint to distil from")
    if args.two_views and not get_method(args.distill).two_views:
        two = ", ".join(n for n in method_names() if get_method(n).two_views)
        raise UsageError(f"--two_views: {args.distill} has no two-view loss; methods with one: {two}")
    if args.dot and (args.amp == "fp16" or not 0 <= args.dot_delta <= args.momentum):
        raise UsageError(f"--dot: needs --amp none or bf16 (got {args.amp}) and 0 <= --dot_delta <= --momentum "
                         f"(got {args.dot_delta}, {args.momentum})")  # fmt: skip
    _non_negative(args, "gamma", "alpha", "beta", "init_epochs")
    _check_added(args)
    _positive(args, "kd_T", "feat_dim")
    for name in method_names():  # every method's flags are parsed, whichever runs
        get_method(name).validate(args)
