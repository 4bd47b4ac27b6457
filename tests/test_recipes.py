"""The recipe table (helper/published/recipes.csv): every row names its source, every recipe is a command the
CLI accepts, the run scripts are generated from it and print its commands, the methods' defaults agree with it,
and a run folder's flags are compared with it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from distiller_zoo import get_method, method_names
from helper import published, recipes, report

ROOT = Path(__file__).resolve().parents[1]
SWITCHES = ("--logit_stand", "--ctkd", "--two_views")


def test_every_row_names_its_source():
    rows = recipes.load()
    assert len(rows) > 100
    for row in rows:
        assert row.repo and row.file and row.commit, row
        # a git commit (40 hex digits), or an arXiv version for values that only a paper publishes
        assert re.fullmatch(r"[0-9a-f]{40}", row.commit) or (row.repo.startswith("arXiv:") and row.commit[0] == "v")


def test_a_row_without_a_source_or_set_twice_is_refused(tmp_path: Path):
    text = (ROOT / "helper" / "published" / "recipes.csv").read_text().splitlines()
    no_source = tmp_path / "a.csv"
    no_source.write_text("\n".join([text[0], "kd,*,-r,0.1,,,,"]) + "\n")
    with pytest.raises(recipes.RecipeError, match="repo, file and commit are required"):
        recipes.load(no_source)
    twice = tmp_path / "b.csv"
    twice.write_text("\n".join([text[0], text[1], text[1]]) + "\n")
    with pytest.raises(recipes.RecipeError, match="set twice"):
        recipes.load(twice)


@pytest.mark.parametrize("method", recipes.methods())
def test_every_recipe_parses_and_validates_on_every_pair(method: str):
    for teacher, student in published.PAIRS:
        if recipes.skipped(method, teacher, student):
            continue
        args = recipes.parse(method, teacher, student)
        argv = recipes.flags(method, teacher, student)
        assert args.distill == argv[argv.index("--distill") + 1] and args.model_s == student
        for epochs in (None, 24):  # also under the scripts' EPOCHS override
            recipes.parse(method, teacher, student, epochs=epochs, trial=3)


def test_scripts_are_the_table():
    assert recipes.sync_scripts(write=False) == []
    text = (ROOT / "scripts" / "run_cifar_newer.sh").read_text()
    assert recipes.render("scripts/run_cifar_newer.sh", text.replace("--dkd_beta 2", "--dkd_beta 3")) == text
    vanilla = (ROOT / "scripts" / "run_cifar_vanilla.sh").read_text()
    assert recipes.render("scripts/run_cifar_vanilla.sh", vanilla.replace(" vgg8 ", " vgg11 ")) == vanilla
    assert f"TEACHER_MODELS=({' '.join(published.TEACHERS)})" in vanilla


def test_schedule_is_train_students_defaults():
    """240 epochs and decays at 150/180/210 are written once, as train_student.py's defaults."""
    assert recipes.schedule() == (240, ((5, 8), (3, 4), (7, 8)))
    assert recipes.decay_epochs(24) == "15,18,21" and recipes.decay_epochs(240) == "150,180,210"
    assert recipes.scaled_epochs(960, 24) == 96 and recipes.scaled_epochs(480, None) == 480
    assert recipes.schedule()[0] == report.STANDARD_EPOCHS  # the report's "standard protocol"


def test_readmes_example_command_is_the_crd_recipe():
    """README's first example (RepDistiller's own command) carries the table's CRD weights."""
    text = (ROOT / "README.md").read_text()
    example = re.search(r"--distill crd --model_s resnet8x4 (.*) --trial 1", text)
    assert example and example.group(1).split() == recipes.flags("crd")[2:]


def _dry_run(script: str, **env: str) -> list[list[str]]:
    result = subprocess.run(
        ["bash", str(ROOT / script), "--dry-run"], env={"PATH": "/usr/bin:/bin", "PYTHON": "python", **env},
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return [shlex.split(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("script", list(recipes.SCRIPTS))
@pytest.mark.parametrize("env", [{}, {"TRIALS": "1 2", "EPOCHS": "24", "EXTRA": "--amp bf16"}])
def test_dry_run_prints_the_tables_commands(script: str, env: dict[str, str]):
    trials = env.get("TRIALS", "1").split()
    epochs = int(env["EPOCHS"]) if "EPOCHS" in env else None
    extra = env.get("EXTRA", "").split()
    expected = [
        recipes.command(m, t, s, trial, epochs=epochs, extra=extra)
        for trial in trials
        for t, s in published.PAIRS
        for m in recipes.default_methods(script)
        if not recipes.skipped(m, t, s)
    ]
    assert _dry_run(recipes.SCRIPTS[script], **env) == expected


def _weights(argv: list[str]) -> dict[str, float]:
    names = {"-r": "gamma", "-a": "alpha", "-b": "beta"}
    return {names[f]: float(argv[i + 1]) for i, f in enumerate(argv) if f in names}


def test_methods_defaults_are_their_plain_recipes():
    checked = []
    for label in recipes.methods():
        argv = recipes.flags(label)
        distill = argv[argv.index("--distill") + 1]
        if label not in (distill, f"{distill}-std") or any(s in argv for s in SWITCHES):
            continue  # a variant (CRD+KD, KD+LS, MLKD's two views): not the method's defaults
        defaults = get_method(distill).defaults
        assert {k: defaults[k] for k in _weights(argv)} == _weights(argv), label
        checked.append(label)
    assert {"kd", "crd", "dkd", "reviewkd", "ofd", "simkd", "wttm", "mlkd-std"} <= set(checked)


def test_plain_recipes_parameters_are_the_flags_defaults():
    """A method parameter that a method's own recipe sets on every pair (``*``) equals its flag's default in the
    method file (LumiNet's alpha 31, WTTM's l 0.2, ITRD's README values): the two writings cannot drift."""
    parser = recipes._student_parser()
    checked = 0
    for label in recipes.methods():
        argv = recipes.flags(label)
        if label != argv[argv.index("--distill") + 1]:
            continue  # a variant or a combination: its values may differ from the defaults on purpose
        for row in recipes.rows(label):
            if row.flag.startswith("--") and row.flag != "--distill" and row.value:
                default = parser.get_default(row.flag[2:])
                if default is None:
                    continue  # resolved per model when not given (--learning_rate: RepDistiller's 0.05 or 0.01)
                assert float(row.value) == float(default), (label, row.flag, row.value, default)
                checked += 1
    assert checked >= 6


# The corrections, read from the official files (cited in the table).
@pytest.mark.parametrize(
    ("method", "pair", "expected"),
    [
        ("mlkd", "resnet32x4:ShuffleV2", {"--epochs": "960", "--learning_rate": "0.01"}),
        ("mlkd", "ResNet50:MobileNetV2", {"--epochs": "480", "--learning_rate": "0.01"}),
        ("kd+ls", "resnet110:resnet20", {"--base_temp": "4", "-a": "12"}),
        ("dkd+ls", "vgg13:vgg8", {"--base_temp": "2", "-b": "15", "--dkd_beta": "2"}),
        ("dkd+ls", "resnet56:resnet20", {"--base_temp": "3", "-b": "18", "--dkd_beta": "2"}),
        ("dkd+ls", "vgg13:MobileNetV2", {"--base_temp": "3", "-b": "9", "--dkd_beta": "2"}),
        ("dkd+ls", "resnet32x4:resnet8x4", {"--base_temp": "2", "-b": "9"}),
        ("mlkd+ls", "vgg13:vgg8", {"-b": "6", "--epochs": "480", "--learning_rate": "0.01"}),
        ("mlkd+ls", "resnet32x4:ShuffleV1", {"-b": "9", "--epochs": "960"}),
    ],
)
def test_corrected_values(method: str, pair: str, expected: dict[str, str]):
    argv = recipes.flags(method, *pair.split(":"))
    assert {f: argv[argv.index(f) + 1] for f in expected} == expected
    if method == "dkd+ls" and "--dkd_beta" not in expected:
        assert "--dkd_beta" not in argv  # DKD's default beta 8 (no BETA in the config, none in the log name)


def _run_folder(tmp_path: Path, args: dict) -> Path:
    folder = tmp_path / "run"
    folder.mkdir(exist_ok=True)
    (folder / "args.json").write_text(json.dumps({"args": args}))
    return folder


def test_a_runs_difference_from_its_recipe(tmp_path: Path):
    args = vars(recipes.parse("dkd+ls", "resnet56", "resnet20", trial=4))
    assert recipes.match(args, "resnet56", "resnet20") == ("dkd+ls", [])
    changed = {**args, "dkd_beta": 8.0, "epochs": 24}
    method, delta = recipes.match(changed, "resnet56", "resnet20")
    assert method == "dkd+ls" and sorted(delta) == [("dkd_beta", 2.0, 8.0), ("epochs", 240, 24)]
    plain = vars(recipes.parse("kd", "resnet56", "resnet20"))
    assert recipes.match(plain, "resnet56", "resnet20") == ("kd", [])
    folder = _run_folder(tmp_path, {**changed, "path_t": "save/models/resnet56_vanilla/ckpt_epoch_240.pth"})
    assert recipes.read_run(folder)[1:] == ("resnet56", "resnet20")


def test_command_line(capsys: pytest.CaptureFixture[str], tmp_path: Path):
    assert recipes.main(["show", "dkd", "resnet56:resnet20"]) == 0
    line = capsys.readouterr().out.strip()
    assert shlex.split(line) == recipes.command("dkd", "resnet56", "resnet20")
    assert "--dkd_beta 2" in line
    assert recipes.main(["show", "nope", "resnet56:resnet20"]) == 2
    assert "no recipe named 'nope'" in capsys.readouterr().err
    args = {**vars(recipes.parse("wttm", "vgg13", "vgg8")), "ttm_l": 0.3}
    assert recipes.main(["diff", str(_run_folder(tmp_path, args))]) == 0
    assert "--ttm_l: recipe 0.1, run 0.3" in capsys.readouterr().out


def test_readme_method_table_is_generated_from_the_tables():
    """README's method table is the generated block: one row per registered method with its label from
    methods.csv and its ``defaults``; a changed label is a stale README."""
    text = (ROOT / "README.md").read_text()
    assert recipes.render("README.md", text) == text
    weights = r"([0-9.e-]+) / ([0-9.e-]+) / ([0-9.e-]+)"
    rows = re.findall(rf"^\| `([a-z0-9_+-]+)` \| ([^|]+) \| [^|]+ \| {weights} \|", text, re.M)
    assert sorted(name for name, *_ in rows) == sorted(method_names())
    for name, label, *weights in rows:
        d = get_method(name).defaults
        assert label.strip() == published.METHOD_LABELS[name]
        assert [float(w) for w in weights] == [d["gamma"], d["alpha"], d["beta"]], name
    assert "| `wkd_l` | WKD-L |" in text and "`wkd_l`, `wkd_l+wkdf` |" in text
    stale = text.replace("| `kd` | KD |", "| `kd` | Knowledge distillation |")
    assert stale != text and recipes.render("README.md", stale) == text


def test_every_method_name_has_one_label():
    """methods.csv labels every registered method, every recipe and every method of the published tables,
    each once; the report's order is its order."""
    names = [r["method"] for r in published.method_table()]
    assert len(names) == len(set(names))
    wanted = {*method_names(), *recipes.methods(), *(row.method for row in published.load_all())}
    assert wanted <= set(names), wanted - set(names)
    assert published.method_label("crd+kd") == "CRD+KD" and published.method_label("nope") == "nope"
    assert published.method_rank("kd") < published.method_rank("crd") < published.method_rank("dkd")


def test_wkd_l_f_is_the_official_combined_config():
    """JiamingLv/WKD configs/cifar100/wkd_lf: WKD-L (weight, T) and WKD-F (weight, ratio, grid) in one run."""
    argv = recipes.flags("wkd_l+wkdf", "resnet32x4", "resnet8x4")
    assert {f: argv[argv.index(f) + 1] for f in ("--distill", "--wkd_weight", "--add", "--wkdf_ratio")} == {
        "--distill": "wkd_l", "--wkd_weight": "200", "--add": "wkdf:0.08", "--wkdf_ratio": "8",
    }  # fmt: skip
    assert "--wkd_T" not in argv  # T 8: the --wkd_T default
    args = recipes.parse("wkd_l+wkdf", "wrn_40_2", "ShuffleV1")
    assert (args.wkd_weight, args.wkd_T, args.add, args.wkdf_ratio, args.wkdf_grid) == (60, 4, ["wkdf:0.5"], 3, 4)
    assert recipes.match(vars(args), "wrn_40_2", "ShuffleV1") == ("wkd_l+wkdf", [])  # the report's n/c
    plain = vars(recipes.parse("wkd_l", "wrn_40_2", "ShuffleV1"))
    assert recipes.match(plain, "wrn_40_2", "ShuffleV1") == ("wkd_l", [])


def test_optional_variant_runs_only_when_named():
    """MLKD's first-commit schedule (480 epochs on every pair) is a labelled, optional recipe."""
    assert recipes.optional("mlkd-480ep") and "mlkd-480ep" not in recipes.default_methods("newer")
    args = recipes.parse("mlkd-480ep", "resnet56", "resnet20")
    assert (args.epochs, args.learning_rate, args.two_views, args.trial) == (480, 0.025, True, "v1_1")
    assert recipes.parse("mlkd-480ep", "vgg13", "MobileNetV2").learning_rate == 0.0025
    first = vars(recipes.parse("mlkd-480ep", "resnet32x4", "ShuffleV1"))
    assert recipes.match(first, "resnet32x4", "ShuffleV1") == ("mlkd-480ep", [])
    assert recipes.match({**first, "epochs": 960}, "resnet32x4", "ShuffleV1") == ("mlkd", [])
    named = _dry_run("scripts/run_cifar_newer.sh", METHODS="mlkd mlkd-480ep", PAIRS="resnet32x4:ShuffleV1")
    assert named == [recipes.command(m, "resnet32x4", "ShuffleV1") for m in ("mlkd", "mlkd-480ep")]
