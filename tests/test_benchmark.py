"""scripts/benchmark.py: its settings, its summary of rounds, and a short real run of both loops."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from shared_paths import DATA, ROOT, teacher

spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
benchmark = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = benchmark  # dataclasses look their module up here
spec.loader.exec_module(benchmark)

TEACHER = teacher("resnet56")  # the trained one from ../shared, else a random-init one (only timed here)
nan = math.nan


@pytest.fixture
def restore_threads():
    """``benchmark.main`` sets torch's thread count (``--threads``) for the process: put it back afterwards."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("text", "expected", "label"),
    [
        ("fp32", benchmark.Setting(), "fp32"),
        ("bf16+cl", benchmark.Setting("bf16", True), "bf16+channels_last"),
        ("fp16+channels_last+fold+compile", benchmark.Setting("fp16", True, True, True), None),
        ("fp32+fold", benchmark.Setting(fold=True), "fp32+fold"),
    ],
)
def test_settings_parse_and_name_the_flags(text, expected, label):
    setting = benchmark.Setting.parse(text)
    assert setting == expected
    if label:
        assert setting.label == label
    assert benchmark.Setting.parse(setting.label) == setting  # the label reads back
    flags = setting.flags()
    assert flags[:2] == ["--amp", {"fp32": "none"}.get(text.split("+")[0], text.split("+")[0])]
    assert ("--channels_last" in flags) == setting.channels_last
    assert ("--fold_teacher_bn" in flags) == setting.fold
    assert ("--compile" in flags) == setting.compile


def test_unknown_setting_is_refused():
    with pytest.raises(ValueError, match="unknown setting 'fp8'"):
        benchmark.Setting.parse("fp8+cl")


def test_gpu_defaults_use_bf16_channels_last_and_fold():
    settings = benchmark.default_settings(torch.device("cuda"), quick=False)
    assert benchmark.Setting() in settings  # the fp32 column
    assert benchmark.Setting("bf16", True, fold=True) in settings  # the >= 5x goal's configuration
    assert benchmark.default_settings(torch.device("cuda"), quick=True) == [benchmark.Setting("bf16", True, fold=True)]


def test_median_ratio_pairs_rounds_and_skips_missing_ones():
    # ratios 1.0, 1.5, 2.0 (the round with nan is skipped): median 1.5
    assert benchmark.median_ratio([100, 150, nan, 120], [100, 100, 90, 60]) == pytest.approx(1.5)
    # an even number of ratios: the mean of the middle two (1.2 and 1.4)
    assert benchmark.median_ratio([120, 140, 300, 100], [100, 100, 100, 100]) == pytest.approx(1.3)
    assert math.isnan(benchmark.median_ratio([nan, nan], [100, 100]))
    assert benchmark.best([nan, 80.0, 120.0]) == 120.0
    assert math.isnan(benchmark.best([nan]))


def test_table_reports_best_and_median_speed_ups():
    settings = [benchmark.Setting(), benchmark.Setting(channels_last=True)]
    results = {
        "kd": {"baseline": [100.0, 80.0, 50.0], "fp32": [110.0, 90.0, 60.0], "fp32+channels_last": [150.0, 96.0, 75.0]},
        "kdsvd": {"baseline": [70.0, 70.0, 70.0], "fp32": [nan, nan, nan], "fp32+channels_last": [nan, nan, nan]},
    }
    lines = benchmark.table(results, settings, parallel=1).splitlines()
    assert lines[0].startswith("| method | baseline img/s | fp32 img/s | fp32+channels_last img/s |")
    # best rounds 150 / 100; per-round ratios 1.5, 1.2, 1.5: median 1.5
    assert lines[2] == "| kd | 100.0 | 110.0 | 150.0 | 1.50x (fp32+channels_last) | 1.50x (fp32+channels_last) |"
    # a setting with the fastest single round need not have the highest median ratio
    results["kd"]["fp32"] = [200.0, 80.0, 50.0]  # ratios 2.0, 1.0, 1.0: median 1.0 < 1.5
    assert benchmark.table(results, settings, parallel=1).splitlines()[2] == (
        "| kd | 100.0 | 200.0 | 150.0 | 2.00x (fp32) | 1.50x (fp32+channels_last) |"
    )
    assert lines[3] == "| kdsvd | 70.0 | n/a | n/a | n/a | n/a |"
    assert "(sum of 3 processes)" in benchmark.table(results, settings, parallel=3).splitlines()[0]


@pytest.mark.usefixtures("restore_threads")
def test_missing_data_is_one_line_and_status_2(tmp_path: Path, monkeypatch, capsys, caplog):
    """No CIFAR-100 where --data_folder points (and no download): ``error: CIFAR-100 not found ...``, no
    traceback, exit status 2."""
    import dataset.cifar100 as cifar

    def offline(root: Path) -> None:
        raise OSError("offline")

    monkeypatch.setattr(cifar, "download_official", offline)
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--device", "cpu", "--methods", "kd", "--path_t", str(TEACHER), "--data_folder", str(tmp_path)])
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert exc.value.code == 2 and len(errors) == 1 and errors[0].startswith("error: CIFAR-100 not found")
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.usefixtures("restore_threads")
def test_short_cpu_run_times_both_loops_for_kd_and_crd(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "bench.json"
    benchmark.main([
        "--device", "cpu", "--methods", "kd,crd", "--settings", "fp32,fp32+cl+fold", "--steps", "1",
        "--rounds", "2", "--warmup", "0", "--workers", "0", "--threads", "1", "--nce_k", "256",
        "--path_t", str(TEACHER), "--data_folder", str(DATA), "--json", str(out),
    ])  # fmt: skip
    payload = json.loads(out.read_text())
    for method in ("kd", "crd"):
        rounds = payload["results"][method]
        assert set(rounds) == {"baseline", "fp32", "fp32+channels_last+fold"}
        for name, values in rounds.items():
            # A rate, not a time: positive and finite on any machine (a loaded 2-core one measured 8.6 images/s).
            assert len(values) == 2 and all(0 < v < 1e6 and math.isfinite(v) for v in values), (method, name, values)
    printed = capsys.readouterr().out
    assert "| kd | " in printed and "| crd | " in printed and "speed-up (median of rounds)" in printed


@pytest.mark.slow
@pytest.mark.usefixtures("restore_threads")
def test_parallel_processes_time_rounds_together_and_sum(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "bench.json"
    benchmark.main([
        "--device", "cpu", "--methods", "kd", "--settings", "fp32", "--steps", "1", "--rounds", "2",
        "--warmup", "0", "--threads", "1", "--ours_only", "--parallel", "2",
        "--path_t", str(TEACHER), "--data_folder", str(DATA), "--json", str(out),
    ])  # fmt: skip
    rounds = json.loads(out.read_text())["results"]["kd"]
    assert list(rounds) == ["fp32"] and len(rounds["fp32"]) == 2 and all(v > 10 for v in rounds["fp32"])
    header = capsys.readouterr().out
    assert "(sum of 2 processes)" in header and "| kd | n/a | " in header  # no baseline with --ours_only


def test_data_share_is_one_minus_the_median_ratio_to_the_one_batch_twin():
    results = {
        "crd": {
            "baseline": [25.0, 30.0, 20.0],  # ratios 0.25, 0.30, 0.20: median 0.25
            "baseline (one batch)": [100.0, 100.0, 100.0],
            "fp32": [90.0, nan, 96.0],  # ratios 0.90, 0.96: median 0.93
            "fp32 (one batch)": [100.0, 100.0, 100.0],
        }
    }
    lines = benchmark.data_share_table(results).splitlines()
    assert lines[0] == "| method | baseline | fp32 |"
    assert lines[2] == "| crd | 75% | 7% |"


@pytest.mark.slow
@pytest.mark.usefixtures("restore_threads")
def test_fixed_batch_twins_step_over_one_batch(tmp_path: Path, capsys: pytest.CaptureFixture):
    flags = ["--device", "cpu", "--methods", "kd", "--path_t", str(TEACHER), "--data_folder", str(DATA)]
    opts = benchmark.parse_args(flags)
    run = benchmark.build_run(opts, "kd", benchmark.Setting(), tmp_path / "runs", "twin")
    loop = benchmark.OursLoop(run)
    twins = benchmark.with_one_batch_twins({"fp32": loop})
    assert list(twins) == ["fp32", "fp32 (one batch)"] and twins["fp32"] is loop
    twin = twins["fp32 (one batch)"]
    assert twin.run is run and next(twin.batches) is next(twin.batches)  # the same batch, step after step
    a, b = next(loop.batches), next(loop.batches)
    assert not torch.equal(a.input, b.input)  # while the timed loop goes on through the data
    out = tmp_path / "bench.json"
    benchmark.main([
        *flags, "--settings", "fp32+cl", "--steps", "1", "--rounds", "2", "--warmup", "0", "--workers", "0",
        "--threads", "1", "--fixed_batch", "--json", str(out),
    ])  # fmt: skip
    rounds = json.loads(out.read_text())["results"]["kd"]
    assert list(rounds) == ["baseline", "baseline (one batch)", "fp32+channels_last", "fp32+channels_last (one batch)"]
    assert all(len(v) == 2 and all(v_ > 10 for v_ in v) for v in rounds.values())
    printed = capsys.readouterr().out.splitlines()
    share = printed[printed.index("| method | baseline | fp32+channels_last |") + 2]
    assert share.startswith("| kd | ") and share.count("%") == 2


class FakeLoop:
    """Counts steps; raises ``error`` at its ``fail_at``-th call of ``steps``."""

    def __init__(self, fail_at: int | None = None, error: type[Exception] = RuntimeError) -> None:
        self.calls, self.fail_at, self.error = 0, fail_at, error

    def steps(self, n: int) -> int:
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.error("diverged")
        return 64 * n


class CountingBarrier:
    def __init__(self) -> None:
        self.waits = 0

    def wait(self) -> None:
        self.waits += 1


def test_a_diverged_loop_is_na_from_then_on_and_the_others_go_on():
    loops = {
        "baseline": FakeLoop(fail_at=4, error=torch.linalg.LinAlgError),  # round 2's timed steps (warm-up, timed)
        "fp32": FakeLoop(fail_at=5, error=benchmark.NonFiniteLoss),  # round 3's warm-up
        "fp32+channels_last": FakeLoop(),
    }
    barrier = CountingBarrier()
    results = benchmark.time_rounds(loops, rounds=4, steps=2, warmup=1, device=torch.device("cpu"), barrier=barrier)
    assert [math.isfinite(v) for v in results["baseline"]] == [True, False, False, False]
    assert [math.isfinite(v) for v in results["fp32"]] == [True, True, False, False]
    assert all(v > 0 for v in results["fp32+channels_last"]) and len(results["fp32+channels_last"]) == 4
    assert loops["baseline"].calls == 4 and loops["fp32"].calls == 5  # never stepped again after diverging
    assert barrier.waits == 3 * 4  # one wait per loop and round, diverged or not: parallel processes stay in step
    with pytest.raises(RuntimeError, match="diverged"):  # anything else is a real failure
        benchmark.time_rounds({"x": FakeLoop(fail_at=1)}, rounds=1, steps=1, warmup=1, device=torch.device("cpu"))
