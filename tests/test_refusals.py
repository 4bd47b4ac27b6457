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
from shared_paths import teacher as shared_teacher

import train_student
import train_teacher
from helper import checkpoint as ckpt_io
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
    student = {flag for script, flag, _ in NON_FINITE if script == "student"}
    teacher = {flag for script, flag, _ in NON_FINITE if script == "teacher"}
    # RepDistiller's float flags and a method's own are among them (the list is read from the parsers).
    assert {"--learning_rate", "--momentum", "--weight_decay", "--lr_decay_rate", "--kd_T", "--nce_t"} <= student
    assert {"--gamma", "--alpha", "--beta", "--dkd_beta", "--ttm_l"} <= student
    assert {"--learning_rate", "--momentum", "--weight_decay", "--lr_decay_rate"} == teacher
    assert len(NON_FINITE) == 3 * (len(student) + len(teacher))
    assert len(BAD_INPUTS) == len(NON_FINITE) + len(OTHER) >= 40


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


# ---------------------------------------------------------------------------------------------- teacher layouts

REAL_TEACHER = shared_teacher("resnet20")  # the trained one from ../shared, else a random-init one
# The layouts people publish: RepDistiller's, {'state_dict': ...}, {'net': ...}, a bare state_dict, each with
# its keys as saved, under nn.DataParallel ('module.'), inside a wrapper ('model.'), or both.
LAYOUTS = {
    "{'model': state_dict}": lambda sd: {"model": sd, "accuracy": 68.83},
    "{'state_dict': state_dict}": lambda sd: {"state_dict": sd, "epoch": 200, "optimizer": {"lr": 0.1}},
    "{'net': state_dict}": lambda sd: {"net": sd, "acc": 68.83, "epoch": 200},
    "a bare state_dict": lambda sd: sd,
}
KEY_PREFIXES = ["", "module.", "model.", "module.model."]


@pytest.fixture(scope="module")
def real_teacher():
    model, arch, _ = ckpt_io.load_teacher(str(REAL_TEACHER), None, 100)
    x = torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return model, arch, x, model(x)


@pytest.mark.parametrize("prefix", KEY_PREFIXES)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_published_layouts_load_and_give_the_teachers_outputs(layout, prefix, real_teacher, tmp_path, caplog):
    original, arch, x, logits = real_teacher
    state = {prefix + k: v for k, v in original.state_dict().items()}
    path = tmp_path / f"{arch}_vanilla" / "ckpt.pth"  # the architecture from the folder name, as RepDistiller
    path.parent.mkdir()
    torch.save(LAYOUTS[layout](state), path)
    with caplog.at_level(logging.INFO, logger="helper.checkpoint"):
        teacher, found, _ = ckpt_io.load_teacher(str(path), None, 100)
    assert found == arch == "resnet20" and not teacher.training
    assert torch.equal(teacher(x), logits)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "helper.checkpoint"]
    removed = " then ".join(repr(p) for p in ("module.", "model.") if p in prefix)
    assert line == f"teacher checkpoint {path}: resnet20 {layout}" + (f", key prefix {removed} removed" * bool(prefix))


def test_five_published_layouts_are_accepted():
    assert len(LAYOUTS) + ("module." in KEY_PREFIXES) == 5  # 4 containers, and nn.DataParallel's prefix in each


def test_what_holds_no_teacher_of_that_architecture_is_refused_clearly(real_teacher, tmp_path):
    original, *_ = real_teacher
    folder = tmp_path / "resnet20_vanilla"
    folder.mkdir()
    with pytest.raises(ckpt_io.CheckpointError, match=r"is a directory, not a file: .*\(it holds no \.pth file\)"):
        ckpt_io.load_teacher(str(folder), None, 100)
    torch.save({"net": {"module." + k: v for k, v in original.state_dict().items()}}, folder / "ckpt.pth")
    with pytest.raises(ckpt_io.CheckpointError, match=r"is a directory, not a file: .*\(it holds ckpt\.pth\)"):
        ckpt_io.load_teacher(str(folder), None, 100)
    with pytest.raises(ckpt_io.CheckpointError, match=r"it holds a resnet20, not a resnet32 \(pass --model_t resnet20"):
        ckpt_io.load_teacher(str(folder / "ckpt.pth"), "resnet32", 100)
    with pytest.raises(ckpt_io.CheckpointError, match="does not hold a resnet20 with this number of classes"):
        ckpt_io.load_teacher(str(folder / "ckpt.pth"), None, 10)
    torch.save({"optimizer": {"state": {}}, "epoch": 3}, folder / "opt.pth")
    with pytest.raises(ckpt_io.CheckpointError, match="not a model checkpoint .*'model', 'state_dict', 'net'"):
        ckpt_io.load_teacher(str(folder / "opt.pth"), None, 100)
    torch.save({"model": {"encoder." + k: v for k, v in original.state_dict().items()}}, folder / "other.pth")
    with pytest.raises(ckpt_io.CheckpointError, match="does not hold a resnet20 .*unexpected keys"):
        ckpt_io.load_teacher(str(folder / "other.pth"), None, 100)
