"""The architecture's rules (docs/architecture.md), checked on the source: the layers' imports, the length of
functions, and that a method of any kind is one file (a throwaway method registered here trains through the CLI).
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch
from shared_paths import DATA, ROOT
from torch import nn

import train_student
from common.errors import UsageError
from dataset import CRDSampler
from distiller_zoo.base import REGISTRY, Distiller, register

LOWER = ("models", "distiller_zoo", "dataset", "common")  # below the engine: they never import helper/
MAX_LINES = 60


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    """Every absolute module name ``path`` imports, at any depth (lazy imports inside functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_layers_below_the_engine_never_import_it():
    offenders = {
        str(p.relative_to(ROOT)): sorted(m for m in imported_modules(p) if m.split(".")[0] == "helper")
        for p in python_files(*LOWER)
    }
    assert len(offenders) > 50  # every model, method, data and common module was read
    assert {k: v for k, v in offenders.items() if v} == {}


def test_common_is_a_leaf():
    """``common/`` imports the standard library and torch only, so every part may import it."""
    project = {"helper", "models", "distiller_zoo", "dataset", "scripts", "train_student", "train_teacher"}
    for path in python_files("common"):
        assert not {m.split(".")[0] for m in imported_modules(path)} & project, path


def long_functions(paths: list[Path]) -> list[str]:
    found = []
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_LINES:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_every_function_fits_on_a_screen():
    """No function of the project (outside scripts/ and tests/) is longer than 60 lines, docstring included."""
    paths = [*python_files(*LOWER, "helper"), ROOT / "train_student.py", ROOT / "train_teacher.py"]
    assert len(paths) > 70
    assert long_functions(paths) == []


def test_the_length_check_can_fail(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "long.py").write_text(f"def f():\n{body}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(f"{__name__}.ROOT", tmp_path)
        assert long_functions([tmp_path / "long.py"]) == [f"long.py:1 f ({MAX_LINES + 1} lines)"]


# ---------------------------------------------------------------------------------------------- one file


class ToyContrast(Distiller):
    """A CRD-like method with an init stage, declared in this file only: its own flag, its validation, its
    contrast sampler, an init-only module and a main-stage adapter."""

    name = "toy_contrast"
    paper = "a method of this test"
    defaults = {"gamma": 1.0, "alpha": 0.0, "beta": 0.5}
    needs_contrast = True
    init_stage = True
    seen: list[tuple[int, ...]] = []  # shapes of the contrast indices the method was given
    weights: dict[str, torch.Tensor] = {}  # the adapters' weights when built and when the main stage began

    @classmethod
    def add_arguments(cls, parser) -> None:
        parser.add_argument("--toy_k", type=int, default=7, help="toy_contrast: negatives per anchor")

    @classmethod
    def validate(cls, args) -> None:
        if args.toy_k < 1:
            raise UsageError(f"--toy_k {args.toy_k}: must be positive")

    @classmethod
    def make_sampler(cls, args, labels, seed, device) -> CRDSampler:
        return CRDSampler(labels, args.toy_k, seed=seed, device=device)

    def __init__(self, s_shapes, t_shapes, args, n_data) -> None:
        super().__init__(s_shapes, t_shapes, args, n_data)
        self.warm = nn.Linear(s_shapes[-1][0], t_shapes[-1][0])  # trained in the init stage only
        self.head = nn.Linear(s_shapes[-1][0], t_shapes[-1][0])  # trained in the main stage
        type(self).weights = {"warm_built": self.warm.weight.detach().clone()}

    def init_only_modules(self) -> list[nn.Module]:
        return [self.warm]

    def trainable_modules(self) -> list[nn.Module]:
        return [self.head]

    def init_modules(self, student) -> list[nn.Module]:
        return [self.warm]

    def init_loss(self, out_s, out_t, batch) -> torch.Tensor:
        return (self.warm(out_s.feats[-1]) - out_t.feats[-1]).pow(2).mean()

    def forward(self, out_s, out_t, batch) -> torch.Tensor:
        if not type(self).seen:
            type(self).weights |= {
                "warm_main": self.warm.weight.detach().clone(),
                "head": self.head.weight.detach().clone(),
            }
        type(self).seen.append(tuple(batch.contrast_idx.shape))
        return (self.head(out_s.feats[-1]) - out_t.feats[-1]).pow(2).mean()


@pytest.fixture
def toy_method():
    register(ToyContrast)
    ToyContrast.seen, ToyContrast.weights = [], {}
    yield ToyContrast
    del REGISTRY[ToyContrast.name]


@pytest.mark.slow
def test_a_method_declared_in_one_file_trains_through_the_cli(toy_method, tmp_path, one_thread):
    teacher = tmp_path / "resnet8_teacher.pth"
    torch.manual_seed(0)
    torch.save({"model": train_student.create_model("resnet8").state_dict(), "arch": "resnet8"}, teacher)
    argv = [
        "--path_t", str(teacher), "--model_s", "resnet8", "--distill", "toy_contrast", "--toy_k", "5",
        "--epochs", "1", "--init_epochs", "1", "--train_size", "100", "--test_size", "100", "--batch_size", "50",
        "--data_folder", str(DATA), "--save_dir", str(tmp_path), "--device", "cpu", "--no_teacher_eval",
    ]  # fmt: skip
    with pytest.raises(UsageError, match="--toy_k 0: must be positive"):
        train_student.build(train_student.student_parser().parse_args([*argv, "--toy_k", "0"]))
    assert not (tmp_path / "student_model").exists()  # refused before any work
    assert train_student.main(argv) == 0
    (folder,) = (tmp_path / "student_model").iterdir()
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["init", "main"]
    assert "loss_init" in rows[0] and rows[1]["loss_toy_contrast"] > 0
    assert toy_method.seen == [(50, 6), (50, 6)]  # its sampler's K + 1 indices, on both main-stage steps
    assert json.loads((folder / "args.json").read_text())["args"]["toy_k"] == 5
    state = torch.load(folder / "latest.pth", map_location="cpu", weights_only=True)["distiller"]
    weights = toy_method.weights
    assert not torch.equal(weights["warm_main"], weights["warm_built"])  # the init stage trained it ...
    assert torch.equal(state["warm.weight"], weights["warm_main"])  # ... and the main stage left it frozen
    assert not torch.equal(state["head.weight"], weights["head"])  # the adapter trained in the main stage
