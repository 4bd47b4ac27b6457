"""Bad input is refused before any work, with one line naming the flag; published teacher layouts load.

The bad command lines run through the entry points' own ``main`` (parse, then validate), in this process: each
must exit with status 2 (as argparse's own errors), print one ``error:`` line naming the flag, and leave the
save folder empty (no run folder, so no training). The same command line with the bad value replaced by a
good one passes validation, so each refusal is due to the value alone.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

import train_student
import train_teacher
from helper.options import student_parser, teacher_parser, validate_student_args, validate_teacher_args
from models import create_model


def _float_flags(parser) -> list[str]:
    return [a.option_strings[-1] for a in parser._actions if a.type is float]


# Every float-valued flag of both scripts (the methods' own included, read from the parsers), each NaN, +inf
# and -inf; ``--flag=-inf`` so that argparse does not take ``-inf`` for an option.
NON_FINITE = [
    (script, flag, bad)
    for script, parser in (("student", student_parser()), ("teacher", teacher_parser()))
    for flag in _float_flags(parser)
    for bad in ("nan", "inf", "-inf")
]
# Other bad values: (script, argv, the good value of that flag, the message's start).
OTHER = [
    ("student", "--learning_rate=-0.05", "--learning_rate=0.05", "--learning_rate -0.05: must be positive"),
    ("student", "--learning_rate=0", "--learning_rate=0.05", "--learning_rate 0.0: must be positive"),
    ("teacher", "--learning_rate=-1", "--learning_rate=0.05", "--learning_rate -1.0: must be positive"),
    ("student", "--model_s=resnet9", "--model_s=resnet8", "--model_s 'resnet9': unknown model"),
    ("student", "--model_t=vgg99", "--model_t=vgg8", "--model_t 'vgg99': unknown model"),
    ("teacher", "--model=nope", "--model=resnet8", "--model 'nope': unknown model"),
    ("student", "--distill=magic", "--distill=kd", "--distill 'magic': unknown method"),
    ("student", "--lr_decay_epochs=a,b", "--lr_decay_epochs=150,180", "--lr_decay_epochs 'a,b'"),
    ("student", "--lr_decay_epochs=180,150", "--lr_decay_epochs=150,180", "--lr_decay_epochs '180,150'"),
    ("teacher", "--lr_decay_epochs=0,10", "--lr_decay_epochs=5,10", "--lr_decay_epochs '0,10'"),
    ("student", "--epochs=0", "--epochs=1", "--epochs 0: must be positive"),
    ("teacher", "--batch_size=-4", "--batch_size=4", "--batch_size -4: must be positive"),
    ("student", "--momentum=-0.9", "--momentum=0.9", "--momentum -0.9: must be zero or positive"),
    ("student", "--weight_decay=-1e-4", "--weight_decay=1e-4", "--weight_decay -0.0001: must be zero or"),
    ("student", "--alpha=-1", "--alpha=1", "--alpha -1.0: must be zero or positive"),
    ("student", "--kd_T=0", "--kd_T=4", "--kd_T 0.0: must be positive"),
    ("student", "--nce_m=1.5", "--nce_m=0.5", "--nce_m 1.5: must be in [0, 1)"),
    ("student", "--lr_decay_rate=0", "--lr_decay_rate=0.1", "--lr_decay_rate 0.0: must be positive"),
    ("teacher", "--resume=/no/such/ckpt.pth", "--resume=auto", "--resume /no/such/ckpt.pth: no such file"),
    ("student", "--device=tpu", "--device=cpu", "--device 'tpu': expected cpu, cuda or cuda:N"),
]
BAD_INPUTS = [(s, f"{flag}={bad}", f"{flag}=0.5", "--") for s, flag, bad in NON_FINITE] + OTHER


def test_at_least_forty_bad_inputs_are_tried():
    assert len(NON_FINITE) == 3 * (26 + 4)  # 26 float flags of train_student.py, 4 of train_teacher.py
    assert len(BAD_INPUTS) == 110 >= 40


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "resnet8_vanilla" / "ckpt_epoch_240.pth"
    path.parent.mkdir()
    torch.save({"model": create_model("resnet8").state_dict()}, path)
    return path


@pytest.mark.parametrize("script, bad, good, message", BAD_INPUTS)
def test_bad_input_is_refused_before_any_work(script, bad, good, message, teacher_file, tmp_path, caplog):
    flag, value = bad.split("=", 1)
    if message == "--":  # a non-finite value: the message names the flag's long name and the value
        dest = next(a for a in _parser(script)._actions if flag in a.option_strings).dest
        message = f"--{dest} {float(value)}: must be a finite number"
    common = ["--save_dir", str(tmp_path / "save"), "--epochs", "2"]
    if script == "student":
        common += ["--path_t", str(teacher_file)]
    main = train_student.main if script == "student" else train_teacher.main
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_info:
        main([*common, bad])
    assert exit_info.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith(f"error: {message}"), errors
    assert not (tmp_path / "save").exists()  # no run folder: nothing started
    validate = validate_student_args if script == "student" else validate_teacher_args
    validate(_parser(script).parse_args([*common, good]))  # the same line with a good value passes


def _parser(script: str):
    return student_parser() if script == "student" else teacher_parser()


def test_a_float_flag_is_checked_whatever_its_name():
    """The check reads every float of the parsed flags, so a method's new float flag is covered unseen."""
    args = student_parser().parse_args(["--path_t", "x.pth"])
    args.some_new_flag = math.nan
    with pytest.raises(Exception, match="--some_new_flag nan: must be a finite number"):
        validate_student_args(args)
