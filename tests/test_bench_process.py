"""scripts/bench_process.py: a tiny real run of both whole processes, KD and CRD, and its report's structure."""

from __future__ import annotations

import importlib.util
import json
import math

import pytest
from shared_paths import DATA, ROOT, teacher

spec = importlib.util.spec_from_file_location("bench_process", ROOT / "scripts" / "bench_process.py")
bench_process = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_process)

TEACHER = teacher("resnet56")  # the trained one of ../shared, else a random-init one (speed only)
ALL = (*bench_process.PHASES, "other")


def test_median_and_bad_flags(capsys):
    assert bench_process.median([3.0, 1.0, 2.0]) == 2.0
    assert bench_process.median([4.0, 1.0, math.nan, 2.0]) == 2.0  # nan left out: median of 1, 2, 4
    assert bench_process.median([1.0, 3.0]) == 2.0
    assert math.isnan(bench_process.median([]))
    for argv, message in ((["--methods", "dkd"], "unknown methods"), (["--rounds", "0"], "--rounds must be positive")):
        with pytest.raises(SystemExit):
            bench_process.parse_args([*argv, "--path_t", str(TEACHER)])
        assert message in capsys.readouterr().err
    # 5,000 images: 4,950 negatives per class, fewer than CRD's default 16,384, drawn with replacement
    assert bench_process.parse_args(["--methods", "crd", "--path_t", str(TEACHER)]).nce_k is None
    assert bench_process.parse_args(["--methods", "crd", "--nce_k", "4950", "--path_t", str(TEACHER)]).nce_k == 4950
    with pytest.raises(SystemExit):
        bench_process.parse_args(["--path_t", "/nonexistent/ckpt.pth"])
    assert "teacher checkpoint not found" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.long  # a minute of two whole processes: make test-all runs it
def test_one_tiny_round_of_kd_and_crd_reports_every_phase(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CIFAR100_ROOT", str(DATA))
    out = tmp_path / "bench.json"
    argv = ["--methods", "kd,crd", "--rounds", "1", "--train_size", "200", "--test_size", "100", "--nce_k", "64",
            "--threads", "1", "--workers", "1", "--path_t", str(TEACHER), "--json", str(out)]  # fmt: skip
    assert bench_process.main(argv) == 0
    payload = json.loads(out.read_text())
    assert set(payload["results"]) == {"kd", "crd"}
    for method, kinds in payload["results"].items():
        assert set(kinds) == {"ours", "baseline"}
        for kind, rounds in kinds.items():
            assert len(rounds) == 1
            whole, phases = rounds[0]["whole"], rounds[0]["phases"]
            assert set(phases) == set(ALL), (method, kind)
            measured = {p: phases[p] for p in bench_process.PHASES}
            assert all(math.isfinite(v) and v > 0 for v in measured.values()), (method, kind, measured)
            assert sum(measured.values()) <= whole, (method, kind, measured, whole)  # "other" is the rest
            assert phases["other"] == pytest.approx(whole - sum(measured.values()))
        summary = payload["summary"][method]
        ours, base = kinds["ours"][0]["whole"], kinds["baseline"][0]["whole"]
        assert summary["ratio"] == pytest.approx(base / ours)
    printed = capsys.readouterr().out
    assert "| kd | ours |" in printed and "| crd | baseline |" in printed
    assert bench_process.main(["--from_json", str(out)]) == 0  # the same tables, reprinted from the file
    assert capsys.readouterr().out.strip() == printed.strip()
