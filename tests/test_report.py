"""Result tables and plots from synthetic run folders (no training)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from helper import published, report
from helper.options import student_parser, teacher_parser

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_run(
    root: Path,
    name: str,
    *,
    model_s: str,
    model_t: str | None = None,
    distill: str = "kd",
    weights: tuple[float, float, float] = (1.0, 0.0, 0.0),
    seed: int = 0,
    test_acc: float,
    best_acc: float | None = None,
    flags: tuple[str, ...] = (),
    curve: tuple[float, ...] = (),
    test_acc_at_val_best: float | None = None,
) -> Path:
    """A finished run folder as the engine writes it: args.json, summary.json, metrics.jsonl."""
    folder = root / name
    folder.mkdir(parents=True)
    if model_t is None:
        args = vars(teacher_parser().parse_args(["--model", model_s, *flags]))
        summary = {"kind": "teacher", "method": "vanilla", "model_s": model_s}
    else:
        gamma, alpha, beta = weights
        argv = ["--model_s", model_s, "--path_t", f"t/{model_t}_vanilla/ckpt_epoch_240.pth", "--distill", distill]
        args = vars(student_parser().parse_args([*argv, "-r", str(gamma), "-a", str(alpha), "-b", str(beta), *flags]))
        summary = {
            "kind": "student", "method": distill, "model_s": model_s, "model_t": model_t, "teacher_acc": 72.61,
            "gamma": gamma, "alpha": alpha, "beta": beta,
        }  # fmt: skip
    summary.update(
        arch=model_s, test_acc=test_acc, test_acc_top5=90.0, best_acc=best_acc if best_acc is not None else test_acc,
        best_epoch=args["epochs"], seed=seed, lr=0.05, epochs=args["epochs"], wall_time=60.0, images_per_sec=500.0,
        environment={"device_name": "test-cpu"},
    )  # fmt: skip
    if test_acc_at_val_best is not None:
        summary.update(val_best_acc=50.0, val_best_epoch=1, test_acc_at_val_best=test_acc_at_val_best)
    (folder / "args.json").write_text(json.dumps({"args": args, "seed": seed}))
    (folder / "summary.json").write_text(json.dumps(summary))
    rows = [{"stage": "main", "epoch": e + 1, "test_acc": acc} for e, acc in enumerate(curve or (test_acc,))]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


KD = dict(model_s="resnet20", model_t="resnet56", distill="kd", weights=(0.1, 0.9, 0.0))


@pytest.fixture()
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "save"
    # Three seeds of KD under RepDistiller's protocol: 70.0, 71.0, 72.5 -> mean 71.1667, sample std 1.2583.
    for seed, acc in enumerate((70.0, 71.0, 72.5)):
        make_run(root, f"kd_{seed}", seed=seed, test_acc=acc, best_acc=acc + 0.5, curve=(40.0, 60.0, acc), **KD)
    # The same method on a 5-epoch, 5,000-image schedule, and one with bf16 autocast: other protocols.
    make_run(root, "kd_short", test_acc=20.0, flags=("--epochs", "5", "--train_size", "5000"), **KD)
    make_run(root, "kd_amp", test_acc=99.0, flags=("--amp", "bf16"), **KD)
    # CRD with and without the KD term (CRD+KD is --distill crd -a 1 -b 0.8).
    make_run(root, "crd", model_s="resnet20", model_t="resnet56", distill="crd", weights=(1, 0, 0.8), test_acc=71.0)
    make_run(root, "crdkd", model_s="resnet20", model_t="resnet56", distill="crd", weights=(1, 1, 0.8), test_acc=72.0)
    # train_teacher.py runs: a vanilla student and a teacher architecture.
    make_run(root, "van_20", model_s="resnet20", test_acc=69.5)
    make_run(root, "van_56", model_s="resnet56", test_acc=72.0)
    # A run that has not finished: never counted.
    (root / "unfinished").mkdir()
    (root / "unfinished" / "args.json").write_text("{}")
    return root


def by_key(groups: list[report.Group]) -> dict[tuple, report.Group]:
    return {(g.teacher, g.student, g.method, g.protocol.label): g for g in groups}


def test_mean_std_n_against_hand_numbers(runs: Path):
    groups = by_key(report.group_runs(report.find_runs([runs])))
    kd = groups[("resnet56", "resnet20", "kd", "240 ep, full data")]
    assert kd.last.n == 3
    assert kd.last.mean == pytest.approx(71.1666667, abs=1e-6)
    assert kd.last.std == pytest.approx(1.2583057, abs=1e-6)  # sample std (n - 1)
    assert kd.best.mean == pytest.approx(71.6666667, abs=1e-6)
    assert kd.val_selected is None
    assert sorted(r.summary["seed"] for r in kd.runs) == [0, 1, 2]
    assert kd.last.text() == "71.17 ± 1.26"
    single = groups[(None, "resnet20", "vanilla", "240 ep, full data")]
    assert (single.last.n, single.last.std, single.last.text()) == (1, None, "69.50")


def test_protocols_are_never_averaged_together(runs: Path):
    groups = report.group_runs(report.find_runs([runs]))
    kd = [g for g in groups if g.method == "kd"]
    labels = sorted(g.protocol.label for g in kd)
    assert labels == ["240 ep, full data", "240 ep, full data, amp bf16", "5 ep, 5,000 img"]
    assert sorted(len(g.runs) for g in kd) == [1, 1, 3]
    short = next(g for g in kd if g.protocol.epochs == 5)
    assert short.last.mean == 20.0 and not short.protocol.standard
    assert next(g for g in kd if g.protocol.flags).last.mean == 99.0
    assert sum(len(g.runs) for g in groups) == 9  # the unfinished run is left out


def test_published_numbers_and_difference(runs: Path):
    groups = by_key(report.group_runs(report.find_runs([runs])))
    kd = groups[("resnet56", "resnet20", "kd", "240 ep, full data")]
    assert kd.published.acc == 70.66  # RepDistiller README, resnet56 -> resnet20, KD
    diff, basis = kd.comparison
    assert (round(diff, 4), basis, kd.comparable) == (0.5067, "last", True)
    short = groups[("resnet56", "resnet20", "kd", "5 ep, 5,000 img")]
    assert short.published.acc == 70.66 and not short.comparable
    assert groups[(None, "resnet20", "vanilla", "240 ep, full data")].published.acc == 69.06
    assert groups[(None, "resnet56", "vanilla", "240 ep, full data")].published.acc == 72.34  # a teacher row


def test_crd_with_kd_term_is_crd_plus_kd(runs: Path):
    groups = by_key(report.group_runs(report.find_runs([runs])))
    crd = groups[("resnet56", "resnet20", "crd", "240 ep, full data")]
    crdkd = groups[("resnet56", "resnet20", "crd+kd", "240 ep, full data")]
    assert (crd.published.acc, crdkd.published.acc) == (71.16, 71.63)
    assert crdkd.weights == (1.0, 1.0, 0.8)
    assert report.table_method("crd", 1.0) == "crd+kd"
    assert report.table_method("crd", 0.0) == "crd"
    assert report.table_method("kd", 0.9) == "kd"
    # Logit modifiers name the combination as the published tables do (KD+LS, DKD+LS, KD+CTKD).
    assert report.table_method("kd", 0.9, {"logit_stand": True}) == "kd+ls"
    assert report.table_method("dkd", 0.0, {"logit_stand": True, "ctkd": False}) == "dkd+ls"
    assert report.table_method("kd", 0.9, {"ctkd": True}) == "kd+ctkd"
    # methods added with --add follow the --distill method, as the published tables name the combinations
    assert report.table_method("wttm", 0.0, {"add": ["itrd:1"]}) == "wttm+itrd"
    assert report.table_method("wkd_l", 0.0, {"add": ["wkdf:0.08"]}) == "wkd_l+wkdf"
    assert report.table_method("crd", 0.0, {"add": ["pkt,rkd:2"]}) == "crd+pkt+rkd"


def test_combined_recipe_is_its_published_row(tmp_path: Path):
    """A WKD-L+WKD-F run (the table's recipe on resnet32x4 -> resnet8x4) is labelled from methods.csv, looked up
    in the WKD README's row, and compared: its flags are the recipe's."""
    from helper import recipes

    wkd = dict(model_s="resnet8x4", model_t="resnet32x4", distill="wkd_l", weights=(1.0, 0.0, 1.0))
    argv = recipes.flags("wkd_l+wkdf", "resnet32x4", "resnet8x4")
    flags = tuple(argv[argv.index("-b") + 2 :])  # the flags after the weights: --wkd_weight 200 --add ...
    make_run(tmp_path, "wkd_lf", test_acc=77.0, flags=flags, **wkd)
    (group,) = report.group_runs(report.find_runs([tmp_path]))
    assert group.method == "wkd_l+wkdf" and group.label.startswith("WKD-L+WKD-F (")
    assert group.published.acc == 77.28 and group.recipe_diff == [] and group.comparable


def test_best_epoch_tables_are_compared_with_our_best_epoch(tmp_path: Path):
    # DKD's published number is a best-epoch mean (mdistiller #30), so Δ uses our best epoch.
    make_run(
        tmp_path, "dkd", model_s="resnet8x4", model_t="resnet32x4", distill="dkd", weights=(1, 0, 8), test_acc=75.0,
        best_acc=76.0,
    )  # fmt: skip
    (group,) = report.group_runs(report.find_runs([tmp_path]))
    assert group.published.acc == 76.32
    diff, basis = group.comparison
    assert basis == "best" and diff == pytest.approx(76.0 - 76.32)


def test_val_selected_column(tmp_path: Path):
    for seed, acc in enumerate((60.0, 62.0)):
        make_run(
            tmp_path, f"v{seed}", seed=seed, test_acc=acc + 1, test_acc_at_val_best=acc, flags=("--val_size", "5000"),
            **KD,
        )  # fmt: skip
    (group,) = report.group_runs(report.find_runs([tmp_path]))
    assert group.protocol.label == "240 ep, full data, 5,000 val held out"
    assert (group.val_selected.mean, group.val_selected.n) == (61.0, 2)
    assert group.val_selected.std == pytest.approx(math.sqrt(2))
    assert not group.comparable


def test_csv_and_markdown_written(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "results"
    assert report.main([str(runs), "--out", str(out)]) == 0
    text = (out / "results.md").read_text()
    assert capsys.readouterr().out == text  # the table is also printed
    assert "## 240 ep, full data (RepDistiller's protocol)" in text
    assert "## 5 ep, 5,000 img" in text
    assert "| resnet56 → resnet20 | KD | r 0.1, a 0.9, b 0 | 3 | 71.17 ± 1.26 | 70.66 [1] | +0.51 |" in text
    assert "| resnet56 → resnet20 | KD | r 0.1, a 0.9, b 0 | 1 | 20.00 | 70.66 [1] | n/c |" in text
    assert "| resnet56 → resnet20 | CRD+KD | r 1, a 1, b 0.8 | 1 | 72.00 | 71.63 [2] | +0.37 |" in text
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7
    kd = next(r for r in rows if r["method"] == "kd" and r["protocol"] == "240 ep, full data")
    assert (kd["n"], kd["last_mean"], kd["last_std"], kd["published"], kd["diff"]) == (
        "3", "71.1667", "1.2583", "70.66", "0.5067",
    )  # fmt: skip
    assert kd["comparable"] == "True" and kd["seeds"] == "0 1 2"


def test_plots_are_non_empty_pngs(runs: Path, tmp_path: Path):
    out = tmp_path / "results"
    groups = report.group_runs(report.find_runs([runs]))
    paths = report.write_plots(groups, out)
    # Pairs x protocols with a distilled student: resnet56 -> resnet20 under three protocols, two plots each.
    assert len(paths) == 6
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path


def test_published_tables_are_complete():
    rd = published.load(published.TABLES[0])
    # 13 pairs; per pair teacher, vanilla, 13 methods (FSP only in the same-family table) and CRD+KD.
    assert len(rd) == 7 * 16 + 6 * 15
    assert {(r.teacher, r.student) for r in rd} == set(published.PAIRS)
    assert published.lookup("wrn_40_2", "wrn_40_1", "fsp").acc is None  # N/A in the README
    assert published.lookup("ResNet50", "vgg8", "crd").acc == 74.30
    assert published.teacher_accuracy("resnet110") == 74.31
    newer = published.load(published.TABLES[1])
    simkd = next(r for r in newer if r.method == "simkd")
    assert "extra deployed params" in simkd.protocol
    assert all(r.source and r.protocol for r in newer)


def test_rld_numbers_are_marked_third_party_and_crld_has_none():
    # No primary source for RLD's table was readable (the RLD README has none); every row says so.
    rld = {(r.teacher, r.student): r for r in published.load(published.TABLES[1]) if r.method == "rld"}
    assert len(rld) == 10 and set(rld) <= set(published.PAIRS)
    assert rld[("resnet32x4", "resnet8x4")].acc == 76.64 and rld[("ResNet50", "MobileNetV2")].acc == 70.76
    assert all("3rd-party" in r.source and "mean of 3 runs" in r.protocol for r in rld.values())
    # CRLD's paper numbers were found in no readable source (official repo not stored): no row, no comparison.
    assert all(published.lookup(t, s, "crld") is None for t, s in published.PAIRS)


def test_method_flags_name_the_method_but_keep_the_protocol(tmp_path: Path):
    crd = dict(model_s="resnet20", model_t="resnet56", distill="crd", weights=(1.0, 0.0, 0.8))
    make_run(tmp_path, "crd_default", test_acc=71.0, **crd)
    make_run(tmp_path, "crd_small_k", test_acc=70.0, flags=("--nce_k", "4096"), **crd)
    ls = dict(KD, weights=(0.1, 9.0, 0.0))  # KD+LS's recipe on resnet56 -> resnet20: -a 9 (--base_temp 2)
    make_run(tmp_path, "kd_ls", test_acc=71.5, flags=("--logit_stand",), **ls)
    make_run(tmp_path, "kd_ls_kd_weights", test_acc=71.0, flags=("--logit_stand",), **KD)
    groups = report.group_runs(report.find_runs([tmp_path]))
    assert [(g.label, g.weights, g.comparable) for g in groups] == [
        ("CRD", (1.0, 0.0, 0.8), True),
        ("CRD (nce_k 4096)", (1.0, 0.0, 0.8), False),  # same table, but not RepDistiller's setting
        ("KD+LS", (0.1, 0.9, 0.0), False),  # not LS-KD's recipe (helper.recipes: alpha 0.9, not 9)
        ("KD+LS", (0.1, 9.0, 0.0), True),  # LS-KD reports the best epoch: compared with our best epoch
    ]
    assert groups[1].recipe_diff == [("nce_k", 16384, 4096)] and groups[2].recipe_diff == [("alpha", 9.0, 0.9)]
    kd_ls = groups[3]
    assert kd_ls.published.acc == 71.43 and kd_ls.comparison == (pytest.approx(71.5 - 71.43), "best")


def test_two_view_runs_form_a_protocol_of_their_own_and_speed_flags_do_not(tmp_path: Path):
    mlkd = dict(model_s="resnet20", model_t="resnet56", distill="mlkd")
    make_run(tmp_path, "mlkd_std", test_acc=71.0, weights=(0.2, 0.0, 0.9), **mlkd)
    make_run(tmp_path, "mlkd_2v", test_acc=72.0, weights=(0.1, 0.0, 0.9), flags=("--two_views",), **mlkd)
    make_run(tmp_path, "kd_fold", test_acc=71.0, flags=("--fold_teacher_bn",), **KD)
    groups = {g.weights: g for g in report.group_runs(report.find_runs([tmp_path]))}
    two, one, fold = groups[(0.1, 0.0, 0.9)], groups[(0.2, 0.0, 0.9)], groups[(0.1, 0.9, 0.0)]
    assert not two.protocol.standard and "views weak+strong" in two.protocol.label and two.label == "MLKD"
    assert one.protocol.standard and fold.protocol.standard and fold.label == "KD"
