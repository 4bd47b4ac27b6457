"""Train a model of the zoo on CIFAR-100 with cross-entropy (RepDistiller's ``train_teacher.py``).

    python train_teacher.py --model resnet32x4

The final checkpoint ``save/models/<model>_cifar100_lr_..._trial_<t>/ckpt_epoch_240.pth`` holds
``{'model': state_dict, ...}`` and serves as ``--path_t`` of ``train_student.py`` (ours or RepDistiller's).
"""

from __future__ import annotations

import common.omp  # noqa: F401 (first: sets OMP_WAIT_POLICY before torch loads)

# isort: split

import argparse
import logging
import sys

from helper import distributed
from helper.data import build_data
from helper.engine import ClassifierObjective, Precision
from helper.folder import prepare_folder
from helper.optim import lr_schedule, seed_everything, sgd
from helper.options import (
    effective_lr,
    lr_decay_epochs,
    seed_of,
    teacher_parser,
    teacher_run_folder,
    validate_teacher_args,
)
from helper.run import Run, Stage
from helper.setup import log_fast_path, prepare_model, run_cli
from models import create_model

log = logging.getLogger("kd")


def build(args: argparse.Namespace) -> Run:
    validate_teacher_args(args)
    folder = teacher_run_folder(args)
    resume_path = prepare_folder(folder, args)
    dist, device = distributed.setup(args.device)  # torchrun's processes, else one
    seed = seed_of(args)
    seed_everything(seed, args.deterministic)
    data = build_data(args, device, seed)
    log_fast_path(args)
    model = prepare_model(dist.batchnorm(create_model(args.model, num_classes=100), args.sync_bn, device), device, args)
    lr = effective_lr(args, args.model)
    stage = Stage(
        "main",
        ClassifierObjective(model),
        sgd([model], lr, args),
        args.epochs,
        lr_schedule(lr, lr_decay_epochs(args), args.lr_decay_rate),
    )
    log.info("model %s, lr %g, %d training images", args.model, lr, data.n_data)
    return Run(
        args=args,
        method="vanilla",
        kind="teacher",
        folder=folder,
        device=device,
        precision=Precision(args.amp, device.type),
        seed=seed,
        model=model,
        arch=args.model,
        stages=[stage],
        train_loader=data.train_loader,
        test_loader=data.test_loader,
        val_loader=data.val_loader,
        summary={
            "method": "vanilla",
            "model_s": args.model,
            "lr": lr,
            "epochs": args.epochs,
            "train_size": data.n_data,
            "val_size": args.val_size,
        },
        config={"lr": lr, "seed": seed},
        resume_path=resume_path,
        dist=dist,
    )


def main(argv: list[str] | None = None) -> int:
    return run_cli(teacher_parser(), build, argv)


if __name__ == "__main__":
    sys.exit(main())
