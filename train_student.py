"""Distil a frozen teacher into a student on CIFAR-100: ``gamma * CE + alpha * KD + beta * method``.

Runs RepDistiller's commands verbatim, e.g.::

    python train_student.py --path_t ./save/models/resnet32x4_vanilla/ckpt_epoch_240.pth \\
        --distill crd --model_s resnet8x4 -a 0 -b 0.8 --trial 1
"""

from __future__ import annotations

import os

# Idle OpenMP threads yield the CPU instead of spinning: on shared or small CPUs, spinning threads slowed
# training steps several-fold. Set before torch is imported; a value in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from dataclasses import asdict  # noqa: E402

import torch  # noqa: E402

from distiller_zoo import get_method, kd_term  # noqa: E402
from distiller_zoo.combine import AddedMethods, parse_added  # noqa: E402
from distiller_zoo.DOT import dot_optimizer  # noqa: E402
from helper import checkpoint as ckpt_io  # noqa: E402
from helper import distributed  # noqa: E402
from helper.data import build_data  # noqa: E402
from helper.engine import DistillObjective, InitObjective, Precision, evaluate  # noqa: E402
from helper.fold import fold_batchnorm  # noqa: E402
from helper.options import (
    UsageError,
    effective_lr,
    loss_weights,
    lr_decay_epochs,
    seed_of,
    student_parser,
    student_run_folder,
    validate_student_args,
)
from helper.run import (
    Run,
    Stage,
    fit,
    lr_schedule,
    prepare_folder,
    seed_everything,
    setup_logging,
    sgd,
)
from helper.setup import cli_errors, log_fast_path, prepare_model  # noqa: E402
from models import create_model, feature_shapes  # noqa: E402

log = logging.getLogger("kd")


def build(args: argparse.Namespace) -> Run:
    validate_student_args(args)
    dist, device = distributed.setup(args.device)  # torchrun's processes, else one
    if args.dot and dist.enabled:
        raise UsageError("--dot runs in one process only (its two backward passes per step are not DDP's)")
    seed = seed_of(args)
    seed_everything(seed, args.deterministic)
    method = get_method(args.distill)
    weights = loss_weights(args)

    teacher, arch_t, _ = ckpt_io.load_teacher(args.path_t, args.model_t, num_classes=100)
    folder = student_run_folder(args, arch_t)
    resume_path = prepare_folder(folder, args)
    student = create_model(args.model_s, num_classes=100)
    if hasattr(student, "preact_bn_twice"):  # WRN: RepDistiller's double BN update, or --wrn_preact_bn once
        student.preact_bn_twice = args.wrn_preact_bn == "twice"
    s_shapes = feature_shapes(student, preact=method.preact)
    t_shapes = feature_shapes(teacher, preact=method.preact)
    method.check_pair(s_shapes, t_shapes, args)
    method.check_models(student, teacher, args)
    added_spec = parse_added(args.add, args.distill)  # --add: [(method, weight)], checked by the validation
    for name, _ in added_spec:  # before the data is built, as for --distill
        get_method(name).check_pair(s_shapes, t_shapes, args)
        get_method(name).check_models(student, teacher, args)
    contrast = method.needs_contrast or any(get_method(name).needs_contrast for name, _ in added_spec)
    data = build_data(args, device, seed, contrast=contrast)
    log_fast_path(args)
    distiller = dist.batchnorm(method(s_shapes, t_shapes, args, data.n_data), args.sync_bn, device)
    added = dist.batchnorm(AddedMethods(added_spec, s_shapes, t_shapes, args, data.n_data), args.sync_bn, device)

    precision = Precision(args.amp, device.type)
    distiller.bind_teacher(teacher)  # before folding: OFD reads the teacher's BNs
    added.bind_teacher(teacher)
    if args.fold_teacher_bn:
        teacher, folded = fold_batchnorm(teacher.eval(), preact=method.preact)
        log.info("teacher: %d BatchNorms folded into their convolutions", folded)
    teacher = prepare_model(teacher, device, args)
    student = prepare_model(dist.batchnorm(student, args.sync_bn, device), device, args)
    distiller.to(device)
    added.to(device)
    distiller.bind_student(student)  # after prepare_model: SDD hooks the student's pooled map, CAT-KD
    added.bind_student(student)  # reads its classifier
    if method.needs_train_pass:
        distiller.prepare(teacher, data.train_loader, folder)
    added.prepare(teacher, data.train_loader, folder)
    if args.channels_last:  # the adapters (connectors, regressors) in the models' memory format
        distiller.to(memory_format=torch.channels_last)
        added.to(memory_format=torch.channels_last)
    lr = effective_lr(args, args.model_s)
    kd = kd_term(args, distiller).to(device)  # with --ctkd: the method's learned temperature, if it has one
    main = Stage(
        "main",
        DistillObjective(student, teacher, distiller, weights.gamma, weights.alpha, weights.beta, kd, added),
        (dot_optimizer if args.dot else sgd)(
            [student, *distiller.trainable_modules(), *added.trainable_modules(), kd], lr, args
        ),
        args.epochs,
        lr_schedule(lr, lr_decay_epochs(args), args.lr_decay_rate),
        on_epoch=lambda epoch: [m.set_epoch(epoch, "main") for m in (distiller, kd, added) if hasattr(m, "set_epoch")],
    )
    stages = [main]
    if method.init_stage and args.init_epochs > 0:
        distiller.set_stage("init")  # the init modules must be trainable when their optimizer is built
        init_objective = InitObjective(student, teacher, distiller)
        init_lr = distiller.init_lr(args, args.model_s) or lr
        init = Stage(
            "init", init_objective, sgd(init_objective.modules, init_lr, args), args.init_epochs,
            lambda epoch: init_lr, evaluate=False, on_epoch=lambda epoch: distiller.set_epoch(epoch, "init"),
        )  # fmt: skip
        stages.insert(0, init)

    deployed = distiller.deploy(student)
    teacher_acc = {"acc": None}
    if args.no_teacher_eval:
        log.info("teacher %s (%s): test evaluation skipped (--no_teacher_eval)", arch_t, args.path_t)
    else:
        teacher_acc = evaluate(teacher, data.test_loader, precision, device)
        log.info("teacher %s (%s): test accuracy %.2f", arch_t, args.path_t, teacher_acc["acc"])
    log.info(
        "student %s, method %s: gamma %g alpha %g beta %g, lr %g%s%s",
        args.model_s, args.distill, weights.gamma, weights.alpha, weights.beta, lr,
        "" if method.has_loss else f" ({args.distill} has no loss term of its own)",
        "".join(f", + {w:g} * {n}" for n, w in added_spec),
    )  # fmt: skip
    return Run(
        args=args,
        method=args.distill,
        kind="student",
        folder=folder,
        device=device,
        precision=precision,
        seed=seed,
        model=student,
        arch=args.model_s,
        stages=stages,
        train_loader=data.train_loader,
        test_loader=data.test_loader,
        val_loader=data.val_loader,
        extra_state={"distiller": distiller, "kd_term": kd, **({"added": added} if len(added) else {})},
        eval_model=deployed,
        summary={
            "method": args.distill,
            "model_s": args.model_s,
            "model_t": arch_t,
            "teacher_acc": teacher_acc["acc"],
            "teacher_path": args.path_t,
            "gamma": weights.gamma,
            "alpha": weights.alpha,
            "beta": weights.beta,
            "added": dict(added_spec),
            "lr": lr,
            "epochs": args.epochs,
            "train_size": data.n_data,
            "val_size": args.val_size,
            "adapter_params": sum(
                p.numel() for m in [*distiller.trainable_modules(), *added.trainable_modules()] for p in m.parameters()
            ),
            # Every parameter of the evaluated network, frozen ones included (SimKD reuses the teacher's head).
            "deployed_params": sum(p.numel() for p in (deployed or student).parameters()),
        },
        config={"model_t": arch_t, "lr": lr, "seed": seed, "weights": asdict(weights)},
        resume_path=resume_path,
        dist=dist,
    )


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    args = student_parser().parse_args(argv)
    with cli_errors(), distributed.session():
        fit(build(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
