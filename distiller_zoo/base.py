"""The contract between a distillation method and the training engine.

A method is a subclass of :class:`Distiller` in one file of ``distiller_zoo/``, registered with
:func:`register`. The engine never names a method: it asks the registry for the class, builds it from
the student's and teacher's per-sample feature shapes, and calls it once per step.

What a method declares (class attributes):

* ``name``: the ``--distill`` value.
* ``paper``: title, venue and arXiv id of the paper.
* ``defaults``: the published loss weights (``gamma`` CE, ``alpha`` KD, ``beta`` this method), from
  RepDistiller's ``scripts/run_cifar_distill.sh`` or the method's paper/official code.
* ``preact``: the student and teacher are asked for pre-activation features (AB).
* ``needs_contrast``: the data pipeline must supply contrast indices (``batch.contrast_idx``), drawn by the
  sampler the method builds in ``make_sampler(args, labels, seed, device)`` (CRD).
* ``has_loss``: ``False`` for methods without a term of their own (plain KD: its loss is ``alpha * KL``).
* ``init_stage``: the method has an init stage of ``--init_epochs`` epochs (AB, FT, FSP).
* ``pooled_only``: the method reads only the pooled vector ``feats[-1]``, which every model returns alike with
  and without ``preact``, so ``--add`` may combine it with a method of either kind (ND with ReviewKD).

What a method implements:

* ``__init__(s_shapes, t_shapes, args, n_data)``: build the loss and trainable adapters.
  ``s_shapes``/``t_shapes`` are per-sample shapes of the model feature lists (``is_feat=True``; the
  last entry is the pooled vector). ``args`` is the parsed command line (read-only). ``n_data`` is the
  number of training images (CRD's memory size).
* ``check_pair(s_shapes, t_shapes, args)`` (classmethod): raise :class:`PairError` with a message that
  names the pair and the reason when the method cannot serve it. Called before anything is built.
* ``check_models(student, teacher, args)`` (classmethod, optional): the same for what the models can do
  beyond their shapes (FCFD needs ``forward_from``).
* ``forward(out_s, out_t, batch) -> Tensor``: the method's scalar loss (before ``beta``). ``out_s`` and
  ``out_t`` are :class:`models.FeatureOutput` (``feats``, ``logits``); ``batch`` is a
  :class:`dataset.Batch` (``input``, ``target``, ``index``, ``contrast_idx``).
* ``trainable_modules()``: the adapters trained in the main stage (default: every submodule that has
  parameters). The engine puts the student and these in the optimizer, never the teacher.
* For an init stage: ``init_modules(student)`` (the modules trained there) and
  ``init_loss(out_s, out_t, batch)``.
* ``add_arguments(parser)`` (classmethod): extra command-line flags of this method, if any, and
  ``validate(args)`` (classmethod): raise :class:`UsageError` for a value of them that cannot work (called for
  every registered method before any work, whichever method runs, as every flag is parsed).

Optional hooks (no-ops by default):

* ``set_epoch(epoch, stage)``: called by the engine at the start of every epoch (``stage`` is ``"init"``
  or ``"main"``), for schedules such as DKD's warm-up.
* ``deploy(student)``: the network that is evaluated and deployed, when it is not the student itself
  (SimKD keeps a projector and the teacher's classifier). Its extra parameters are reported.
* ``bind_teacher(teacher)``: called once after construction with the frozen teacher, for methods that
  read its modules (OFD's BN statistics, SimKD's classifier).
* ``bind_student(student)``: called once with the student (after ``bind_teacher``), for methods that
  read what its modules compute besides the features (SDD hooks the map before the classifier's pooling;
  CAT-KD reads its classifier weights); the student's modules are trained as the student's, never as adapters.
* ``prepare(teacher, train_loader, folder)``: called once before training when ``needs_train_pass`` is set,
  with the frozen teacher, the training loader (a ``dataset.DeviceLoader``: its ``images``, ``labels``) and the
  run folder, for what a method derives from the teacher over the training set (WKD-L's class-cost matrix).
* ``init_only_modules()``: for a method with an init stage, the adapters trained there only; the base class's
  ``set_stage(stage)`` (called by the engine every epoch) freezes them and keeps them in eval mode in ``"main"``.
* ``init_lr(args, student_name)``: the init stage's learning rate when it is not the main one (FT).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

Shapes = Sequence[torch.Size]


class Distiller(nn.Module):
    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    defaults: ClassVar[dict[str, float]] = {"gamma": 1.0, "alpha": 0.0, "beta": 0.0}
    preact: ClassVar[bool] = False
    needs_contrast: ClassVar[bool] = False
    has_loss: ClassVar[bool] = True
    init_stage: ClassVar[bool] = False
    two_views: ClassVar[bool] = False  # defines forward_views: a loss over a weak and a strong view (--two_views)
    needs_train_pass: ClassVar[bool] = False  # prepare() reads the teacher over the training set (WKD-L)
    pooled_only: ClassVar[bool] = False  # reads only feats[-1], equal with and without preact: --add serves both
    table_suffix: ClassVar[str] = ""  # added with --add, it names the run <method><suffix> (default "+<name>")

    def __init__(self, s_shapes: Shapes, t_shapes: Shapes, args: Any, n_data: int) -> None:
        super().__init__()
        self.stage = "init" if self.init_stage else "main"  # an init stage runs first

    @classmethod
    def check_pair(cls, s_shapes: Shapes, t_shapes: Shapes, args: Any) -> None:
        """Raise :class:`PairError` when the method cannot serve this pair."""

    @classmethod
    def check_models(cls, student: nn.Module, teacher: nn.Module, args: Any) -> None:
        """Raise :class:`PairError` when the method cannot serve these networks for what their feature shapes do
        not tell (FCFD runs the rest of a network from a stage). Called after :meth:`check_pair`, before any work."""

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add this method's own command-line flags (none by default)."""

    @classmethod
    def validate(cls, args: Any) -> None:
        """Raise :class:`UsageError` for a value of this method's flags that cannot work."""

    @classmethod
    def make_sampler(cls, args: Any, labels: torch.Tensor, seed: int, device: torch.device) -> Any:
        """The sampler of ``batch.contrast_idx`` over the training ``labels`` (methods with ``needs_contrast``)."""
        raise NotImplementedError(f"{cls.name} draws no contrast indices")

    def forward(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def forward_views(self, outs_s: tuple[Any, Any], outs_t: tuple[Any, Any], batch: Any) -> torch.Tensor:
        """The method's term when every image comes as two views (``--two_views``): ``outs_s`` and ``outs_t``
        are the (weak, strong) outputs of the student and teacher. Only methods with ``two_views`` define it."""
        raise NotImplementedError(f"{self.name} has no two-view loss")

    def trainable_modules(self) -> list[nn.Module]:
        return [m for m in self.children() if any(p.requires_grad for p in m.parameters())]

    def init_modules(self, student: nn.Module) -> list[nn.Module]:
        return []

    @property
    def student_preact(self) -> bool:
        """Whether the student's features are pre-activation; ``preact`` unless a method sets it apart."""
        return self.__dict__.get("_student_preact", self.preact)

    @student_preact.setter
    def student_preact(self, value: bool) -> None:
        self.__dict__["_student_preact"] = bool(value)

    def set_epoch(self, epoch: int, stage: str) -> None:
        """Called at the start of every epoch; no-op by default."""

    def init_only_modules(self) -> list[nn.Module]:
        """The adapters trained in the init stage only (AB's Connector, FT's Paraphraser): in the main stage they
        are frozen, out of the optimizer and kept in eval mode. None by default."""
        return []

    def set_stage(self, stage: str) -> None:
        """Enter ``"init"`` or ``"main"``: the init-only modules train in ``"init"`` only. The engine calls it at
        the start of every epoch, so a resumed run is in its stage too."""
        if stage not in ("init", "main"):
            raise ValueError(f"stage must be 'init' or 'main', not {stage!r}")
        self.stage = stage
        for module in self.init_only_modules():
            module.requires_grad_(stage == "init")
        self.train(self.training)

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.stage == "main":
            for module in self.init_only_modules():
                module.eval()
        return self

    def bind_teacher(self, teacher: nn.Module) -> None:
        """Receive the frozen teacher; no-op by default."""

    def bind_student(self, student: nn.Module) -> None:
        """Receive the student; no-op by default."""

    def prepare(self, teacher: nn.Module, train_loader: Any, folder: Any) -> None:
        """Derive what the method needs from the teacher over the training set; no-op by default."""

    def init_lr(self, args: Any, student_name: str) -> float | None:
        """The init stage's learning rate; ``None`` (the default) means the main learning rate."""
        return None

    def deploy(self, student: nn.Module) -> nn.Module | None:
        """The evaluated network when it is not ``student`` itself; ``None`` by default."""
        return None

    def init_loss(self, out_s: Any, out_t: Any, batch: Any) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no init stage")


REGISTRY: dict[str, type[Distiller]] = {}


def register(cls: type[Distiller]) -> type[Distiller]:
    """Class decorator: make ``cls`` available as ``--distill cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} registered twice")
    REGISTRY[cls.name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(REGISTRY)


def get_method(name: str) -> type[Distiller]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; valid --distill values: {', '.join(method_names())}") from None


def parameters_of(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters() if p.requires_grad]


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every method shares (RepDistiller's names and defaults: the KD term's temperature, the
    embedding size of CRD and CC, the length of an init stage), then each registered method's own flags."""
    group = parser.add_argument_group("distillation method")
    group.add_argument("--kd_T", type=float, default=4, help="temperature of the KD term (alpha)")
    group.add_argument("--feat_dim", type=int, default=128, help="embedding size of CRD and CC")
    init = ", ".join(n for n in method_names() if REGISTRY[n].init_stage)
    group.add_argument("--init_epochs", type=int, default=30, help=f"epochs of the init stage ({init})")
    for name in method_names():
        REGISTRY[name].add_arguments(parser)
    from .DOT import add_dot_arguments  # the DOT optimizer serves every method

    add_dot_arguments(parser)


# What a method may read of the run besides its flags, as a method built outside the command line sees it: no
# global batch (CRD's shard size: one process), no teacher file (the cache keys of WKD-L and ND), RepDistiller's
# 240 epochs (WKD-L's schedule).
RUN_FACTS = {"batch_size": None, "path_t": None, "epochs": 240}


def default_args(**overrides: Any) -> argparse.Namespace:
    """The method flags at their defaults, with :data:`RUN_FACTS` (for building methods outside the command line,
    e.g. tests)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_method_arguments(parser)
    args = parser.parse_args([])
    for key, value in RUN_FACTS.items():
        setattr(args, key, value)
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


def kd_term(args: Any, method: nn.Module | None = None) -> nn.Module:
    """The module of the KD (``alpha``) term: RepDistiller's ``DistillKL(kd_T)``, or, with ``--logit_stand``
    or ``--ctkd``, the same KL on modified logits (``logit_modifiers.ModifiedKL``; with ``--ctkd`` it holds the
    learned temperature, a parameter for the optimizer, and needs ``set_epoch(epoch, stage)`` every epoch).
    With ``--ctkd`` and a ``method`` that learns a temperature of its own (DKD, MLKD, DIST), the KD term uses
    that one (CTKD learns a single temperature for both terms)."""
    from .KD import DistillKL
    from .logit_modifiers import ModifiedKL, build_modifier, share_temperature

    modifier = build_modifier(args, args.kd_T)
    if method is not None:
        share_temperature(modifier, method)
    return DistillKL(args.kd_T) if modifier is None else ModifiedKL(modifier)


def adaptive_avg_pool2d(x: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """``F.adaptive_avg_pool2d(x, size)``'s values (B, C, h, w) from operators whose CUDA backward is
    deterministic: CUDA's backward of adaptive average pooling accumulates with atomics, and
    ``torch.use_deterministic_algorithms(True)`` (``--deterministic``) refuses it.

    The same size is ``x`` itself; sizes that divide are ``avg_pool2d`` with kernel = stride (the same windows);
    other sizes are the same windows (start ``floor(i * H / h)``, end ``ceil((i + 1) * H / h)``) written as two
    averaging matrices, ``A_h @ x @ A_w^T``.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x
    if in_h % out_h == 0 and in_w % out_w == 0:
        return nn.functional.avg_pool2d(x, (in_h // out_h, in_w // out_w))
    a_h, a_w = _window_means(in_h, out_h, x), _window_means(in_w, out_w, x)  # (h, H), (w, W)
    return torch.einsum("bcyx,iy,jx->bcij", x, a_h, a_w)


def _window_means(n_in: int, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """(n_out, n_in): row i averages adaptive pooling's window i (built on ``like``'s device)."""
    i = torch.arange(n_out, device=like.device).view(-1, 1)  # (n_out, 1)
    j = torch.arange(n_in, device=like.device).view(1, -1)  # (1, n_in)
    inside = (j >= (i * n_in) // n_out) & (j < ((i + 1) * n_in + n_out - 1) // n_out)  # (n_out, n_in)
    weights = inside.to(like.dtype)
    return weights / weights.sum(dim=1, keepdim=True)


def pool_to_smaller(f_s: torch.Tensor, f_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adaptive-average-pool whichever of two (B, C, H, W) maps is taller down to the other's size
    (RepDistiller's rule for stage pairs of different resolution)."""
    s_h, t_h = f_s.shape[2], f_t.shape[2]
    if s_h > t_h:
        f_s = adaptive_avg_pool2d(f_s, f_t.shape[2:])
    elif s_h < t_h:
        f_t = adaptive_avg_pool2d(f_t, f_s.shape[2:])
    return f_s, f_t
