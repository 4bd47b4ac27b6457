"""Distil a frozen teacher into a student on CIFAR-100: ``gamma * CE + alpha * KD + beta * method``.

Runs RepDistiller's commands verbatim, e.g.::

    python train_student.py --path_t ./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth \\
        --distill crd --model_s resnet8x4 -a 0 -b 0.8 --trial 1
"""

from __future__ import annotations

import common.omp  # noqa: F401 (first: sets OMP_WAIT_POLICY before torch loads)

# isort: split

import argparse
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from distiller_zoo import Distiller, get_method, kd_term
from distiller_zoo.combine import AddedMethods, parse_added
from distiller_zoo.DOT import dot_optimizer
from helper import checkpoint as ckpt_io
from helper import distributed
from helper.data import RunData, build_data
from helper.engine import DistillObjective, InitObjective, Precision, evaluate
from helper.fold import fold_batchnorm
from helper.folder import prepare_folder
from helper.optim import lr_schedule, seed_everything, sgd
from helper.options import (
    LossWeights,
    UsageError,
    effective_lr,
    loss_weights,
    lr_decay_epochs,
    seed_of,
    student_parser,
    student_run_folder,
    validate_student_args,
)
from helper.run import Run, Stage
from helper.setup import log_fast_path, prepare_model, run_cli
from models import create_model, feature_shapes

log = logging.getLogger("kd")


@dataclass
class Pair:
    """The teacher and the student of a run, as loaded and built, with their feature shapes."""

    teacher: nn.Module
    arch_t: str
    student: nn.Module
    s_shapes: list[torch.Size]
    t_shapes: list[torch.Size]


@dataclass
class Methods:
    """The ``--distill`` method and the ``--add`` methods, once built, with the loss weights."""

    distiller: Distiller
    added: AddedMethods
    spec: list[tuple[str, float]]  # --add: [(method, weight)]
    weights: LossWeights  # gamma (CE), alpha (KD), beta (the --distill method)


def build(args: argparse.Namespace) -> Run:
    """Flags -> teacher and student -> run folder -> data -> methods -> models on the device -> stages."""
    validate_student_args(args)
    dist, device = distributed.setup(args.device)  # torchrun's processes, else one
    if args.dot and dist.enabled:
        raise UsageError("--dot runs in one process only (its two backward passes per step are not DDP's)")
    seed = seed_of(args)
    seed_everything(seed, args.deterministic)
    method = get_method(args.distill)
    teacher, arch_t, _ = ckpt_io.load_teacher(args.path_t, args.model_t, num_classes=100)
    folder = student_run_folder(args, arch_t)
    resume_path = prepare_folder(folder, args)
    pair = build_pair(args, method, teacher, arch_t)
    spec = parse_added(args.add, args.distill)  # checked by the validation
    for name, _ in spec:  # before the data is built, as for --distill
        get_method(name).check_pair(pair.s_shapes, pair.t_shapes, args)
        get_method(name).check_models(pair.student, pair.teacher, args)
    samplers = [m.make_sampler for m in (method, *(get_method(n) for n, _ in spec)) if m.needs_contrast]
    data = build_data(args, device, seed, samplers[0] if samplers else None, args.two_views)
    log_fast_path(args)
    methods = Methods(
        dist.batchnorm(method(pair.s_shapes, pair.t_shapes, args, data.n_data), args.sync_bn, device),
        dist.batchnorm(AddedMethods(spec, pair.s_shapes, pair.t_shapes, args, data.n_data), args.sync_bn, device),
        spec,
        loss_weights(args),
    )
    teacher, student = place_models(args, pair, methods, dist, device)
    prepare_methods(args, methods, student, teacher, data, folder, device)
    kd = kd_term(args, methods.distiller).to(device)  # with --ctkd: the method's learned temperature, if any
    precision = Precision(args.amp, device.type)
    teacher_acc = evaluate_teacher(args, arch_t, teacher, data, precision, device)
    lr = effective_lr(args, args.model_s)
    log_start(args, lr, methods)
    deployed = methods.distiller.deploy(student)  # the evaluated network when it is not the student (SimKD)
    return Run(
        args=args, method=args.distill, kind="student", folder=folder, device=device, precision=precision,
        seed=seed, model=student, arch=args.model_s, stages=build_stages(args, lr, student, teacher, methods, kd),
        train_loader=data.train_loader, test_loader=data.test_loader, val_loader=data.val_loader,
        extra_state={"distiller": methods.distiller, "kd_term": kd, **({"added": methods.added} if spec else {})},
        eval_model=deployed,
        summary=summary_of(args, lr, arch_t, teacher_acc["acc"], deployed or student, methods, data.n_data),
        config={"model_t": arch_t, "lr": lr, "seed": seed, "weights": asdict(methods.weights)},
        resume_path=resume_path, dist=dist,
    )  # fmt: skip


def build_pair(args: argparse.Namespace, method: type[Distiller], teacher: nn.Module, arch_t: str) -> Pair:
    """The student (freshly initialised) beside the loaded teacher; the method checks it can serve them."""
    student = create_model(args.model_s, num_classes=100)
    if hasattr(student, "preact_bn_twice"):  # WRN: RepDistiller's double BN update, or --wrn_preact_bn once
        student.preact_bn_twice = args.wrn_preact_bn == "twice"
    s_shapes = feature_shapes(student, preact=method.preact)
    t_shapes = feature_shapes(teacher, preact=method.preact)
    method.check_pair(s_shapes, t_shapes, args)
    method.check_models(student, teacher, args)
    return Pair(teacher, arch_t, student, s_shapes, t_shapes)


def place_models(
    args: argparse.Namespace, pair: Pair, methods: Methods, dist: distributed.Distributed, device: torch.device
) -> tuple[nn.Module, nn.Module]:
    """The teacher (bound to the methods, then BatchNorms folded) and the student, on the device."""
    for m in (methods.distiller, methods.added):
        m.bind_teacher(pair.teacher)  # before folding: OFD reads the teacher's BNs
    teacher = pair.teacher
    if args.fold_teacher_bn:
        teacher, folded = fold_batchnorm(teacher.eval(), preact=methods.distiller.preact)
        log.info("teacher: %d BatchNorms folded into their convolutions", folded)
    teacher = prepare_model(teacher, device, args)
    student = prepare_model(dist.batchnorm(pair.student, args.sync_bn, device), device, args)
    return teacher, student


def prepare_methods(
    args: argparse.Namespace, methods: Methods, student: nn.Module, teacher: nn.Module, data: RunData,
    folder: Path, device: torch.device,
) -> None:  # fmt: skip
    """The methods on the device, bound to the placed student, with what they derive from the training set."""
    distiller, added = methods.distiller, methods.added
    distiller.to(device)
    added.to(device)
    distiller.bind_student(student)  # after prepare_model: SDD hooks the student's pooled map, CAT-KD
    added.bind_student(student)  # reads its classifier
    if distiller.needs_train_pass:
        distiller.prepare(teacher, data.train_loader, folder)
    added.prepare(teacher, data.train_loader, folder)
    if args.channels_last:  # the adapters (connectors, regressors) in the models' memory format
        distiller.to(memory_format=torch.channels_last)
        added.to(memory_format=torch.channels_last)


def build_stages(
    args: argparse.Namespace, lr: float, student: nn.Module, teacher: nn.Module, methods: Methods, kd: nn.Module
) -> list[Stage]:
    """The main stage, preceded by the method's init stage when it has one. Every epoch first puts the method
    in its stage (a resumed run too), then runs the per-epoch schedules (warm-ups, learned temperatures)."""
    distiller, added, weights = methods.distiller, methods.added, methods.weights

    def begin(stage: str, modules: tuple) -> Callable[[int], None]:
        def hook(epoch: int) -> None:
            distiller.set_stage(stage)
            for m in modules:
                if hasattr(m, "set_epoch"):  # RepDistiller's KL has no schedule
                    m.set_epoch(epoch, stage)

        return hook

    trained = [student, *distiller.trainable_modules(), *added.trainable_modules(), kd]
    main = Stage(
        "main",
        DistillObjective(student, teacher, distiller, weights.gamma, weights.alpha, weights.beta, kd, added),
        (dot_optimizer if args.dot else sgd)(trained, lr, args),
        args.epochs,
        lr_schedule(lr, lr_decay_epochs(args), args.lr_decay_rate),
        on_epoch=begin("main", (distiller, kd, added)),
    )
    if not (distiller.init_stage and args.init_epochs > 0):
        return [main]
    distiller.set_stage("init")  # the init modules must be trainable when their optimizer is built
    objective = InitObjective(student, teacher, distiller)
    init_lr = distiller.init_lr(args, args.model_s) or lr
    init = Stage(
        "init", objective, sgd(objective.modules, init_lr, args), args.init_epochs, lambda epoch: init_lr,
        evaluate=False, on_epoch=begin("init", (distiller,)),
    )  # fmt: skip
    return [init, main]


def evaluate_teacher(
    args: argparse.Namespace, arch_t: str, teacher: nn.Module, data: RunData, precision: Precision,
    device: torch.device,
) -> dict:  # fmt: skip
    if args.no_teacher_eval:
        log.info("teacher %s (%s): test evaluation skipped (--no_teacher_eval)", arch_t, args.path_t)
        return {"acc": None}
    acc = evaluate(teacher, data.test_loader, precision, device)
    log.info("teacher %s (%s): test accuracy %.2f", arch_t, args.path_t, acc["acc"])
    return acc


def log_start(args: argparse.Namespace, lr: float, methods: Methods) -> None:
    weights = methods.weights
    log.info(
        "student %s, method %s: gamma %g alpha %g beta %g, lr %g%s%s",
        args.model_s, args.distill, weights.gamma, weights.alpha, weights.beta, lr,
        "" if methods.distiller.has_loss else f" ({args.distill} has no loss term of its own)",
        "".join(f", + {w:g} * {n}" for n, w in methods.spec),
    )  # fmt: skip


def summary_of(
    args: argparse.Namespace, lr: float, arch_t: str, teacher_acc: float | None, deployed: nn.Module,
    methods: Methods, n_data: int,
) -> dict:  # fmt: skip
    """``deployed``: the evaluated network (the student, or what the method deploys in its place)."""
    weights, adapters = methods.weights, [*methods.distiller.trainable_modules(), *methods.added.trainable_modules()]
    return {
        "method": args.distill, "model_s": args.model_s, "model_t": arch_t, "teacher_acc": teacher_acc,
        "teacher_path": args.path_t, "gamma": weights.gamma, "alpha": weights.alpha, "beta": weights.beta,
        "added": dict(methods.spec), "lr": lr, "epochs": args.epochs, "train_size": n_data,
        "val_size": args.val_size, "adapter_params": sum(p.numel() for m in adapters for p in m.parameters()),
        # Every parameter of the evaluated network, frozen ones included (SimKD reuses the teacher's head).
        "deployed_params": sum(p.numel() for p in deployed.parameters()),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_cli(student_parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
