"""Two properties of the training step that a GPU needs, made visible on the CPU with a ``TorchDispatchMode``:
where the host reads a device value (a host-device synchronisation on CUDA), and which operators CUDA's
deterministic mode refuses.

Which aten operators a host read reaches was measured on torch 2.14 (CPU) by running each construct under a
dispatch mode that lists the operators it sees:

* ``t.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``            -> ``aten._local_scalar_dense``
* ``torch.nonzero(m)``, ``torch.where(m)`` (one argument)                     -> ``aten.nonzero``
* ``x[m]`` with a boolean mask                                                 -> ``aten.index.Tensor`` (bool index)
* ``x[m] = v`` with a boolean mask                                             -> ``aten.index_put_`` (bool index)
* ``x.masked_select(m)``, ``torch.unique``, ``torch.equal``, ``torch.allclose``, ``repeat_interleave(t)``
  -> ``aten.masked_select``, ``aten._unique2``, ``aten.equal``, ``aten.allclose``, ``aten.repeat_interleave.Tensor``
* ``t.tolist()``, ``t.numpy()``, ``t.cpu()`` of a CPU tensor reach no operator (``numpy`` only ``aten.detach``):
  :class:`HostReads` wraps those three ``Tensor`` methods to count them.

``aten.is_nonzero`` is listed too (``bool`` of a one-element tensor reaches it in some versions).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that read a device value on the host (measured above).
HOST_READ_OPS = frozenset({
    "aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.equal", "aten.allclose",
    "aten.masked_select", "aten._unique2", "aten.unique_dim", "aten.unique_consecutive",
    "aten.repeat_interleave",
})  # fmt: skip
MASK_INDEX_OPS = frozenset({"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"})
HOST_METHODS = ("tolist", "numpy", "cpu")
STOP_READ = "aten._local_scalar_dense (torch.int64)"  # the stop agreement: a CPU tensor of the gloo group

# What ``torch.use_deterministic_algorithms(True)`` makes throw a RuntimeError on CUDA: the list "The following
# normally-nondeterministic operations will throw a RuntimeError when mode=True" in that function's docstring
# (torch 2.14.1, torch/__init__.py; `python -c "import torch; help(torch.use_deterministic_algorithms)"`),
# as the aten operators those modules and functions dispatch to. "when attempting to differentiate" means the
# backward operator. NLLLoss: the alert is in the CUDA kernel of nll_loss2d (inputs with spatial dimensions);
# the (B, C) cross-entropy of classification (``aten.nll_loss_forward``) has none.
REJECTED_ON_CUDA = {
    "aten.avg_pool3d_backward": "AvgPool3d backward",
    "aten._adaptive_avg_pool2d_backward": "AdaptiveAvgPool2d backward",
    "aten._adaptive_avg_pool3d_backward": "AdaptiveAvgPool3d backward",
    "aten.adaptive_max_pool2d_backward": "AdaptiveMaxPool2d backward",
    "aten.fractional_max_pool2d_backward": "FractionalMaxPool2d backward",
    "aten.fractional_max_pool3d_backward": "FractionalMaxPool3d backward",
    "aten.max_unpool2d": "MaxUnpool1d/2d",
    "aten.max_unpool3d": "MaxUnpool3d",
    "aten.upsample_linear1d_backward": "interpolate(linear) backward",
    "aten.upsample_bilinear2d_backward": "interpolate(bilinear) backward",
    "aten._upsample_bilinear2d_aa_backward": "interpolate(bilinear, antialias) backward",
    "aten.upsample_bicubic2d_backward": "interpolate(bicubic) backward",
    "aten._upsample_bicubic2d_aa_backward": "interpolate(bicubic, antialias) backward",
    "aten.upsample_trilinear3d_backward": "interpolate(trilinear) backward",
    "aten.reflection_pad1d_backward": "ReflectionPad1d backward",
    "aten.reflection_pad2d_backward": "ReflectionPad2d backward",
    "aten.reflection_pad3d_backward": "ReflectionPad3d backward",
    "aten.nll_loss2d_forward": "NLLLoss (2d)",
    "aten._ctc_loss_backward": "CTCLoss backward",
    "aten._embedding_bag_dense_backward": "EmbeddingBag backward (mode='max')",
    "aten.put_": "Tensor.put_",
    "aten.put": "Tensor.put",
    "aten.histc": "histc",
    "aten.median": "median with indices",
    "aten.grid_sampler_2d_backward": "grid_sample backward",
    "aten.grid_sampler_3d_backward": "grid_sample backward",
}
CONDITIONAL = {"aten.bincount": "bincount with weights", "aten.scatter_reduce": "scatter_reduce(prod)"}


def op_name(func: Any) -> str:
    """``aten.index`` for ``aten.index.Tensor`` (the operator without its overload)."""
    return str(func.overloadpacket)


def _is_mask_index(name: str, args: tuple) -> bool:
    if name not in MASK_INDEX_OPS or len(args) < 2:
        return False
    indices = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
    return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices)


def rejected_on_cuda(name: str, args: tuple, kwargs: dict) -> str | None:
    """The docstring's entry when this call is one CUDA's deterministic mode refuses, else None."""
    if name in REJECTED_ON_CUDA:
        if name == "aten.median" and len(args) < 2 and "dim" not in kwargs:
            return None  # median of all elements returns no indices
        return REJECTED_ON_CUDA[name]
    if name == "aten.bincount" and (len(args) > 1 and args[1] is not None or kwargs.get("weights") is not None):
        return CONDITIONAL[name]
    if name == "aten.scatter_reduce" and "prod" in (*args[4:5], kwargs.get("reduce")):
        return CONDITIONAL[name]
    return None


class HostReads(TorchDispatchMode):
    """Records every host read (with ``where()``, the caller's label of the moment) and every operator that
    CUDA's deterministic mode refuses, while active."""

    def __init__(self, where: Callable[[], Any] = lambda: None) -> None:
        super().__init__()
        self.where = where
        self.reads: list[tuple[Any, str]] = []  # (where, what)
        self.rejected: set[str] = set()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = op_name(func)
        self.ops.add(name)
        if name == "aten._local_scalar_dense":
            self.reads.append((self.where(), f"{name} ({args[0].dtype})"))
        elif name in HOST_READ_OPS:
            self.reads.append((self.where(), name))
        elif _is_mask_index(name, args):
            self.reads.append((self.where(), f"{name} (boolean mask)"))
        entry = rejected_on_cuda(name, args, kwargs)
        if entry:
            self.rejected.add(f"{name}: {entry}")
        return func(*args, **kwargs)

    @contextlib.contextmanager
    def watching_methods(self) -> Iterator[HostReads]:
        """Also count ``Tensor.tolist``, ``numpy`` and ``cpu``, which reach no operator on a CPU tensor."""
        saved = {m: getattr(torch.Tensor, m) for m in HOST_METHODS}

        def counted(method: str) -> Callable:
            def call(tensor: torch.Tensor, *a: Any, **k: Any) -> Any:
                self.reads.append((self.where(), f"Tensor.{method}"))
                return saved[method](tensor, *a, **k)

            return call

        try:
            for m in HOST_METHODS:
                setattr(torch.Tensor, m, counted(m))
            with self:
                yield self
        finally:
            for m, f in saved.items():
                setattr(torch.Tensor, m, f)


class StepClock:
    """Labels the moments of an epoch for :class:`HostReads`: ``("data", i)`` while batch i is made,
    ``("step", i)`` while it is trained on, ``("end", n)`` after the last."""

    def __init__(self) -> None:
        self.now: tuple[str, int] = ("setup", 0)

    def __call__(self) -> tuple[str, int]:
        return self.now

    def timed(self, batches: Any) -> Iterator[Any]:
        it, i = iter(batches), 0
        while True:
            self.now = ("data", i)
            try:
                batch = next(it)
            except StopIteration:
                break
            self.now = ("step", i)
            yield batch
            i += 1
        self.now = ("end", i)


def reads_between_intervals(reads: list, print_freq: int, stop_every: int | None = None) -> list:
    """The reads that the engine's contract forbids: any but those in a step at the print interval
    (``step % print_freq == 0``), at the end of the epoch, and (several processes) the stop agreement's
    CPU read after every ``stop_every``-th step."""

    def allowed(where: tuple[str, int], what: str) -> bool:
        kind, i = where
        if kind == "end" or (kind == "step" and i % print_freq == 0):
            return True
        return bool(stop_every) and kind == "step" and (i + 1) % stop_every == 0 and what == STOP_READ

    return [(w, what) for w, what in reads if not allowed(w, what)]


# ----------------------------------------------------------------------------------------------------------
# A method's training step on tiny models and random data (tests/test_gpu_path.py, scripts/gpu_check.py)


def tiny_loader(
    device: torch.device, n: int, batch: int, nce_k: int = 0, two_views: bool = False, seed: int = 0
) -> Any:
    """A training loader over ``n`` random images of 5 classes (with CRD's sampler when ``nce_k``)."""
    from dataset import CRDSampler, DeviceLoader

    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 5
    sampler = CRDSampler(labels, nce_k, device=device) if nce_k else None
    return DeviceLoader(images, labels, batch, device, train=True, crd=sampler, strong_view=two_views)


def tiny_objective(
    name: str, pair: tuple[str, str], device: torch.device, n_data: int, batch: int, nce_k: int, init: bool = False
) -> tuple[Any, torch.optim.Optimizer]:
    """The objective and optimizer of method ``name`` on (teacher, student) ``pair`` (5 classes) as
    train_student.py builds them, every weight 1 so that every term runs; ``init``: its init stage."""
    import models
    from distiller_zoo import get_method
    from distiller_zoo.base import default_args, kd_term, parameters_of
    from helper.engine import DistillObjective, InitObjective

    cls = get_method(name)
    torch.manual_seed(0)
    teacher, student = (models.create_model(m, num_classes=5) for m in pair)
    teacher.eval().requires_grad_(False)
    s_shapes = models.feature_shapes(student, preact=cls.preact)
    t_shapes = models.feature_shapes(teacher, preact=cls.preact)
    args = default_args(nce_k=nce_k, batch_size=batch)  # CRD sizes its gather from the batch size
    cls.check_pair(s_shapes, t_shapes, args)
    cls.check_models(student, teacher, args)  # FCFD: the networks need forward_from
    distiller = cls(s_shapes, t_shapes, args, n_data)
    distiller.bind_teacher(teacher)
    teacher.to(device), student.to(device), distiller.to(device)
    distiller.bind_student(student)  # SDD hooks the student's pooled map, CAT-KD reads its classifier
    if cls.needs_train_pass:  # WKD-L: its class costs from the teacher over a few (unaugmented) images
        import tempfile

        from dataset import DeviceLoader

        g = torch.Generator().manual_seed(1)
        images = torch.randint(0, 256, (4 * n_data, 3, 32, 32), dtype=torch.uint8, generator=g)
        plain = DeviceLoader(images, torch.arange(4 * n_data) % 5, batch, device, train=False)
        with tempfile.TemporaryDirectory() as folder:
            distiller.prepare(teacher, plain, folder)
    kd = kd_term(args).to(device)
    if init:
        distiller.set_stage("init")
        objective = InitObjective(student, teacher, distiller)
        params = parameters_of(objective.modules)
        distiller.set_epoch(1, "init")
    else:
        objective = DistillObjective(student, teacher, distiller, 1.0, 1.0, 1.0, kd)
        params = parameters_of([student, *distiller.trainable_modules(), kd])
        for m in (distiller, kd):
            if hasattr(m, "set_epoch"):
                m.set_epoch(1, "main")
    return objective, torch.optim.SGD(params, lr=0.01, momentum=0.9)
