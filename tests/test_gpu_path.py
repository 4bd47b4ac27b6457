"""The training step as a GPU runs it, checked on the CPU with a dispatch mode (helper/sync_check.py):

* no host read of a device value between the print intervals, for every registered method, with one and two
  views, in one process and in two (DDP over gloo);
* no operator that ``torch.use_deterministic_algorithms(True)`` refuses on CUDA, in the forward and backward
  of every method, on a pair with equal and a pair with unequal map sizes;
* the deterministic adaptive pooling equals ``F.adaptive_avg_pool2d``.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from dataset import DeviceLoader
from distiller_zoo import PairError, get_method, method_names
from distiller_zoo.base import adaptive_avg_pool2d
from helper.distributed import DDPObjective, Distributed
from helper.engine import NonFiniteLoss, Precision, train_one_epoch
from helper.sync_check import HostReads, StepClock, reads_between_intervals, tiny_loader, tiny_objective

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

CPU = torch.device("cpu")
FP32 = Precision("none", "cpu")
N_DATA, BATCH, NCE_K = 20, 4, 8  # 5 batches; the last one full (a partial one is in the DDP test)
PRINT_FREQ = 3  # reads allowed in steps 0 and 3 and at the end; steps 1, 2 and 4 must have none
EQUAL = ("resnet14", "resnet8")  # teacher, student: every map the same size
UNEQUAL = ("ShuffleV1", "resnet8")  # the student's maps 2x larger than the teacher's at stages 1-3
# Methods that need equal channel counts at every map (RepDistiller's "N/A" for cross-family pairs).
REFUSE_UNEQUAL = {"fsp", "kdsvd"}


def loader(two_views: bool = False, crd: bool = False, n: int = N_DATA, seed: int = 0) -> DeviceLoader:
    return tiny_loader(CPU, n, BATCH, NCE_K if crd else 0, two_views=two_views, seed=seed)


def build(name: str, pair: tuple[str, str], init: bool = False) -> tuple:
    return tiny_objective(name, pair, CPU, N_DATA, BATCH, NCE_K, init=init)


def count_reads(objective, batches, optimizer, dist=None, epoch: int = 1, control=None) -> tuple[HostReads, dict]:
    clock = StepClock()
    mode = HostReads(clock)
    with mode.watching_methods():
        stats = train_one_epoch(
            objective, batches, optimizer, FP32, FP32.scaler(), CPU, epoch, print_freq=PRINT_FREQ,
            progress=clock.timed, dist=dist, control=control,
        )  # fmt: skip
    return mode, stats


def stages(name: str) -> list[bool]:
    return [True, False] if get_method(name).init_stage else [False]


@pytest.mark.parametrize("name", method_names())
def test_no_host_read_between_print_intervals(name, caplog):
    caplog.set_level("DEBUG", logger="helper.engine")  # the interval's averages are read and logged too
    cls = get_method(name)
    for init in stages(name):
        objective, optimizer = build(name, EQUAL, init=init)
        mode, stats = count_reads(objective, loader(crd=cls.needs_contrast), optimizer)
        assert stats["images"] == N_DATA
        assert reads_between_intervals(mode.reads, PRINT_FREQ) == [], f"{name} (init={init})"
        # The reads that are allowed happen: the check is live (it would see a read if there were one).
        assert any(w == ("step", 0) for w, _ in mode.reads) and any(w[0] == "end" for w, _ in mode.reads)


@pytest.mark.parametrize("name", [n for n in method_names() if get_method(n).two_views])
def test_no_host_read_with_two_views(name):
    objective, optimizer = build(name, EQUAL)
    mode, stats = count_reads(objective, loader(two_views=True, crd=get_method(name).needs_contrast), optimizer)
    assert stats["images"] == N_DATA
    assert reads_between_intervals(mode.reads, PRINT_FREQ) == []


def test_the_counter_sees_each_kind_of_host_read():
    """Each construct the contract forbids is caught (measured reach of each in helper/sync_check.py)."""
    x, m = torch.randn(4, 5), torch.randn(4, 5) > 0
    constructs = {
        "item": lambda: x[0, 0].item(), "bool": lambda: bool(x[0, 0] > 0), "tolist": lambda: x.tolist(),
        "cpu": lambda: x.cpu(), "mask": lambda: x[m], "mask_set": lambda: x.clone().__setitem__(m, 0.0),
        "nonzero": lambda: m.nonzero(), "where1": lambda: torch.where(m), "equal": lambda: torch.equal(x, x),
        "unique": lambda: x.unique(), "masked_select": lambda: x.masked_select(m),
    }  # fmt: skip
    for what, construct in constructs.items():
        mode = HostReads()
        with mode.watching_methods():
            construct()
        assert len(mode.reads) >= 1, what
    mode = HostReads()
    with mode.watching_methods():
        torch.where(m, x, 0.0).sum().mul(2)
    assert mode.reads == []


def test_a_non_finite_loss_is_found_at_the_interval_and_named_by_its_step():
    objective, optimizer = build("kd", EQUAL)
    batches = list(loader())
    bad = batches[1]
    batches[1] = bad._replace(input=bad.input * float("nan"))
    clock = StepClock()
    mode = HostReads(clock)
    with pytest.raises(NonFiniteLoss, match=r"epoch 2, step 1 \(found between steps 1 and 3"), mode:
        train_one_epoch(objective, clock.timed(batches), optimizer, FP32, FP32.scaler(), CPU, 2, print_freq=3)
    assert clock.now == ("step", 3)  # it ran on to the interval without reading, then stopped
    assert reads_between_intervals(mode.reads, 3) == []


@pytest.mark.parametrize("pair", [EQUAL, UNEQUAL], ids=["equal-maps", "unequal-maps"])
@pytest.mark.parametrize("name", method_names())
def test_no_operator_cuda_deterministic_mode_refuses(name, pair):
    for init in stages(name):
        try:
            objective, optimizer = build(name, pair, init=init)
        except PairError:
            assert pair == UNEQUAL and name in REFUSE_UNEQUAL
            return
        batches = list(loader(crd=get_method(name).needs_contrast, n=2 * BATCH))
        mode = HostReads()
        with mode:
            train_one_epoch(objective, batches, optimizer, FP32, FP32.scaler(), CPU, 1, print_freq=0)
        assert "aten.convolution_backward" in mode.ops  # forward and backward were both recorded
        assert mode.rejected == set(), f"{name} (init={init}) on {pair}"


@pytest.mark.parametrize(
    ("size", "out"), [((32, 32), (16, 16)), ((16, 16), (4, 4)), ((8, 8), (8, 8)), ((7, 7), (3, 3)), ((5, 9), (2, 4)),
                      ((4, 4), (8, 8)), ((8, 8), 1)],
)  # fmt: skip
def test_deterministic_adaptive_pooling_equals_torchs(size, out):
    x = torch.randn(2, 3, *size, dtype=torch.float64, requires_grad=True)
    mine, torchs = adaptive_avg_pool2d(x, out), F.adaptive_avg_pool2d(x, out)
    torch.testing.assert_close(mine, torchs, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(torchs)
    (grad_mine,) = torch.autograd.grad(mine, x, g)
    (grad_torch,) = torch.autograd.grad(torchs, x, g)
    torch.testing.assert_close(grad_mine, grad_torch, rtol=1e-12, atol=1e-12)
    mode = HostReads()
    with mode:
        y = adaptive_avg_pool2d(x, out)
        torch.autograd.grad(y, x, g)
    assert mode.rejected == set() and mode.reads == []


# ----------------------------------------------------------------------------------------------------------
# Two processes (DDP over gloo)

DDP_METHODS = ("kd", "crd", "dkd")
DDP_DATA = 18  # batches of 4, 4, 4, 4, 2: the last one partial, split 1 + 1


# DDP's reducer with ``static_graph=True`` (helper/distributed.py DDPObjective) reads one int32 element of its
# per-parameter "used" map for every parameter in every backward (measured here: 29 reads per step for
# resnet8's 29 parameters, none without static_graph). That map (``local_used_map_``, reducer.cpp) is a host
# tensor (pinned on CUDA), so these reads do not wait for the device; they are counted apart and checked to be
# exactly those.
DDP_MAP_READ = "aten._local_scalar_dense (torch.int32)"


def _ddp_worker(rank: int, world: int, init_file: str, results: dict) -> None:
    import torch.distributed as tdist

    from helper.engine import StepControl

    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        dist = Distributed(rank, world, 0, "gloo", None)
        out = {}
        for name in DDP_METHODS:
            objective, optimizer = build(name, EQUAL)
            wrapped = DDPObjective(objective, optimizer)
            batches = loader(crd=get_method(name).needs_contrast, n=DDP_DATA)
            control = StepControl(stop_requested=dist.agreed(lambda: False, every=2))
            mode, stats = count_reads(wrapped, batches, optimizer, dist=dist, control=control)
            bad = reads_between_intervals(mode.reads, PRINT_FREQ, stop_every=2)
            map_reads = [w for w, what in bad if what == DDP_MAP_READ]
            n_params = sum(1 for g in optimizer.param_groups for _ in g["params"])
            out[name] = ([r for r in bad if r[1] != DDP_MAP_READ], stats["images"], len(map_reads), n_params)
        results[rank] = out
    finally:
        tdist.destroy_process_group()


@pytest.mark.slow
def test_no_host_read_between_print_intervals_with_two_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in (0, 1):
        for name in DDP_METHODS:
            bad, images, map_reads, n_params = results[rank][name]
            assert images == DDP_DATA, (rank, name)  # the meters cover the global batches
            assert bad == [], (rank, name)
            assert map_reads == 3 * n_params, (rank, name)  # steps 1, 2, 4: one per trained parameter


# ----------------------------------------------------------------------------------------------------------
# scripts/gpu_check.py without CUDA, and the claims above on a real GPU (pytest -m cuda)


def load_gpu_check():
    import importlib.util
    import sys

    from shared_paths import ROOT

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_check_without_cuda_runs_the_cpu_stand_ins(tmp_path, monkeypatch, capsys):
    import json

    gpu_check = load_gpu_check()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--methods", "kd,dkd", "--json", str(tmp_path / "check.json")]) == 0
    printed = capsys.readouterr().out
    assert "no CUDA device" in printed and "sync: dkd" in printed
    summary = json.loads((tmp_path / "check.json").read_text())
    assert summary["sync"] == {"kd": "ok", "dkd": "ok"}
    assert summary["deterministic"] == dict.fromkeys(gpu_check.DETERMINISTIC_METHODS, "bit-identical")
    assert "benchmark" not in summary and "epoch" not in summary
    # The check is live: a step that reads a value on the host is reported, and the script still exits 0.
    import helper.engine

    topk = helper.engine.topk_correct
    monkeypatch.setattr(helper.engine, "topk_correct", lambda *a, **k: [c + 0 * c.item() for c in topk(*a, **k)])
    assert gpu_check.main(["--methods", "kd", "--json", str(tmp_path / "bad.json")]) == 0
    assert json.loads((tmp_path / "bad.json").read_text())["sync"]["kd"].startswith("FAILED: host reads")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.cuda
@CUDA
def test_cuda_deterministic_mode_accepts_the_pooling_and_refuses_torchs():
    x = torch.randn(2, 3, 32, 32, device="cuda", requires_grad=True)
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        adaptive_avg_pool2d(x, (7, 7)).sum().backward()  # the matrix form
        adaptive_avg_pool2d(x, (8, 8)).sum().backward()  # avg_pool2d
        with pytest.raises(RuntimeError, match="deterministic"):
            F.adaptive_avg_pool2d(x, (8, 8)).sum().backward()
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.cuda
@CUDA
def test_cuda_steps_never_synchronise():
    gpu_check = load_gpu_check()
    results = gpu_check.check_sync(torch.device("cuda"), method_names())
    assert all(v == "ok" or v.startswith("n/a") for v in results.values()), results
