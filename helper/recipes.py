"""The published recipes as one table: method x pair -> every flag that differs from the defaults, each with its
source file (``helper/published/recipes.csv``).

One row per setting: ``method`` (the label of the run scripts and the report), ``pair`` (``teacher:student``,
or ``*`` for every pair; a pair's row overrides the ``*`` row of the same flag), ``flag`` (a
``train_student.py`` flag, written as on the command line; an empty ``value`` is a switch such as
``--two_views``), and ``repo``, ``file``, ``commit`` (where the value is written) with a free ``note``.
Flags starting with ``@`` are for the scripts, not for ``train_student.py``: ``@script`` (``distill`` or
``newer``: the script that runs the method), ``@trial_prefix`` (prepended to the trial, so that e.g. KD+LS
does not share plain KD's run folder; the seed comes from the trial's digits), ``@skip`` (the method has
no published number on that pair and the script leaves it out) and ``@optional`` (a labelled variant, e.g.
MLKD's first-commit schedule: the script runs it only when it is named with ``--methods``).

The run scripts ``scripts/run_cifar_distill.sh`` and ``scripts/run_cifar_newer.sh`` are generated from it
(``python -m helper.recipes scripts --write``; without ``--write`` it compares), as are the table of
``helper/published/newer_recipes.md``, README's method table (labels from ``helper/published/methods.csv``,
papers and default weights from the method files) and ``scripts/run_cifar_vanilla.sh``'s models
(``helper.published``). The schedule that ``EPOCHS`` scales (240 epochs, decays at 150/180/210) is
``train_student.py``'s defaults (:func:`schedule`). Other entry points::

    python -m helper.recipes show dkd resnet56:resnet20     # the training command
    python -m helper.recipes diff save/student_model/RUN    # how a run's args.json differs from its recipe
    python -m helper.recipes list                           # every method and its script

Adding a method's recipe: append its rows to ``recipes.csv`` (``NAME,*,@script,newer,...``, then
``NAME,*,--distill,NAME,...`` and its weights and parameters, each with repo, file and commit; a pair whose
value differs gets its own row, e.g. ``NAME,resnet56:resnet20,-b,2,...``), run ``python -m helper.recipes
scripts --write`` (the run script's block and the table in ``newer_recipes.md``), then ``tests/test_recipes.py``
(the command of every pair must pass the CLI's validation, and a label equal to its ``--distill`` must have the
method's ``defaults`` as its ``*`` weights). Other code asks this module: ``flags(method, teacher, student)`` for
the flags, ``command(...)`` for the whole command.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import re
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "helper" / "published" / "recipes.csv"
COLUMNS = ("method", "pair", "flag", "value", "repo", "file", "commit", "note")
SCRIPTS = {"distill": "scripts/run_cifar_distill.sh", "newer": "scripts/run_cifar_newer.sh"}


class RecipeError(ValueError):
    """A malformed table row or an unknown method; reported as one line."""


@dataclass(frozen=True)
class Row:
    method: str
    pair: str
    flag: str
    value: str
    repo: str
    file: str
    commit: str
    note: str = ""

    @property
    def source(self) -> str:
        return f"{self.repo} {self.file} @ {self.commit[:7]}"


def _check_row(row: Row, line: int) -> None:
    if not (row.method and row.pair and row.flag and row.repo and row.file and row.commit):
        raise RecipeError(f"recipes.csv line {line}: method, pair, flag, repo, file and commit are required")
    if row.pair != "*" and row.pair.count(":") != 1:
        raise RecipeError(f"recipes.csv line {line}: pair {row.pair!r} is not '*' or teacher:student")
    if not row.flag.startswith("-") and not row.flag.startswith("@"):
        raise RecipeError(f"recipes.csv line {line}: flag {row.flag!r} is not a -flag or an @setting")


@functools.cache
def load(path: Path = TABLE) -> tuple[Row, ...]:
    """Every row of the table, in file order; a row without its source is an error."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise RecipeError(f"{path}: expected the columns {','.join(COLUMNS)}")
        rows = tuple(Row(**{k: (v or "").strip() for k, v in r.items()}) for r in reader)
    seen: set[tuple[str, str, str]] = set()
    for line, row in enumerate(rows, start=2):
        _check_row(row, line)
        key = (row.method, row.pair, row.flag)
        if key in seen:  # a value written twice
            raise RecipeError(f"recipes.csv line {line}: {row.method} {row.pair} {row.flag} is set twice")
        seen.add(key)
    return rows


def methods(script: str | None = None) -> list[str]:
    """The labels in table order (those of one script with ``script``)."""
    names = list(dict.fromkeys(r.method for r in load()))
    return [m for m in names if script is None or setting(m, "@script") == script]


def _pair(teacher: str | None, student: str | None) -> str:
    return f"{teacher}:{student}" if teacher and student else "*"


def rows(method: str, teacher: str | None = None, student: str | None = None) -> list[Row]:
    """The rows that make ``method``'s recipe on a pair: the ``*`` rows, each replaced by the pair's row of the
    same flag, then the pair's other rows. Without a pair: the ``*`` rows."""
    table = [r for r in load() if r.method == method]
    if not table:
        raise RecipeError(f"no recipe named {method!r}; known: {' '.join(methods())}")
    pair = _pair(teacher, student)
    own = {r.flag: r for r in table if r.pair == pair and pair != "*"}
    out = [own.pop(r.flag, r) for r in table if r.pair == "*"]
    return out + [r for r in table if r.pair == pair and r.flag in own]


def setting(method: str, name: str, teacher: str | None = None, student: str | None = None) -> str | None:
    """An ``@`` setting's value (``None`` if absent)."""
    return next((r.value for r in rows(method, teacher, student) if r.flag == name), None)


def skipped(method: str, teacher: str, student: str) -> bool:
    return setting(method, "@skip", teacher, student) is not None


def optional(method: str) -> bool:
    """An ``@optional`` recipe (a variant such as MLKD's first-commit schedule): its script runs it only when
    it is named (``--methods``), not by default."""
    return setting(method, "@optional") is not None


def default_methods(script: str) -> list[str]:
    """The recipes a script runs when no ``--methods`` are given."""
    return [m for m in methods(script) if not optional(m)]


def flags(method: str, teacher: str | None = None, student: str | None = None) -> list[str]:
    """The ``train_student.py`` flags of ``method`` on a pair (or on any pair), as command-line words."""
    argv: list[str] = []
    for row in rows(method, teacher, student):
        if not row.flag.startswith("@"):
            argv += [row.flag] if row.value == "" else [row.flag, row.value]
    return argv


def trial_id(method: str, trial: str | int) -> str:
    return f"{setting(method, '@trial_prefix') or ''}{trial}"


@functools.cache
def schedule() -> tuple[int, tuple[tuple[int, int], ...]]:
    """RepDistiller's schedule as ``train_student.py``'s defaults give it: its epochs (240) and its decay epochs
    as reduced fractions of them (150/180/210 -> 5/8, 3/4, 7/8), for a shortened schedule."""
    parser = _student_parser()
    epochs = int(parser.get_default("epochs"))
    fractions = [Fraction(int(e), epochs) for e in parser.get_default("lr_decay_epochs").split(",")]
    return epochs, tuple((f.numerator, f.denominator) for f in fractions)


def scaled_epochs(recipe_epochs: int, epochs: int | None) -> int:
    """A recipe's epochs under the scripts' ``EPOCHS`` override: ``recipe * EPOCHS / 240`` (so MLKD's 960-epoch
    recipes run four times ``EPOCHS``), at least 1."""
    return recipe_epochs if epochs is None else max(recipe_epochs * epochs // schedule()[0], 1)


def decay_epochs(epochs: int) -> str:
    """150/180/210 scaled to a schedule of ``epochs`` (5/8, 3/4, 7/8 of it, at least epoch 1)."""
    return ",".join(str(max(epochs * n // d, 1)) for n, d in schedule()[1])


def run_flags(method: str, teacher: str | None, student: str | None, epochs: int | None = None) -> list[str]:
    """The recipe's flags with the ``EPOCHS`` override applied (``--epochs`` scaled, the decay epochs moved)."""
    argv = flags(method, teacher, student)
    if epochs is None or epochs == schedule()[0]:
        return argv
    if "--epochs" in argv:
        i = argv.index("--epochs") + 1
        argv[i] = str(scaled_epochs(int(argv[i]), epochs))
    else:
        argv += ["--epochs", str(epochs)]
    return [*argv, "--lr_decay_epochs", decay_epochs(epochs)]


def command(
    method: str, teacher: str, student: str, trial: str | int = 1, path_t: str | None = None,
    epochs: int | None = None, python: str = "python", extra: Sequence[str] = (),
) -> list[str]:  # fmt: skip
    """The ``train_student.py`` command of ``method`` on ``teacher:student``, word for word as the run scripts
    print it (``DRY_RUN=1``). ``path_t`` defaults to the scripts' teacher layout."""
    path_t = path_t or f"./save/models/{teacher}_vanilla/ckpt_epoch_240.pth"
    return [
        python, "train_student.py", "--path_t", path_t, "--model_s", student,
        *run_flags(method, teacher, student, epochs), "--trial", trial_id(method, trial), "--resume", "auto", *extra,
    ]  # fmt: skip


@functools.cache
def _student_parser() -> argparse.ArgumentParser:
    from helper.options import student_parser

    return student_parser()


def parse(method: str, teacher: str, student: str, **kwargs: Any) -> argparse.Namespace:
    """The recipe's command through ``train_student.py``'s parser and validation (no model, no data)."""
    from helper.options import validate_student_args

    args = _student_parser().parse_args(command(method, teacher, student, **kwargs)[2:])
    validate_student_args(args)
    return args


# Flags that name or place a run rather than train it: never part of a recipe's difference.
PLACE_FLAGS = frozenset(
    {
        "print_freq", "tb_freq", "save_freq", "num_workers", "data_folder", "seed", "trial", "deterministic",
        "resume", "device", "save_dir", "run_name", "eval_batch_size", "compile", "channels_last", "fold_teacher_bn",
        "skip_nonfinite", "model_s", "model_t", "path_t",
    }
)  # fmt: skip
# Switches that pick a recipe among those of one --distill (kd, kd+ls, kd+ctkd, kd++; mlkd, mlkd-std).
RECIPE_SWITCHES = ("distill", "logit_stand", "ctkd", "two_views", "add")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
        return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))
    return a == b


def _effective(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` with the flags whose ``None`` means "the published default" resolved: the loss weights (the
    method's ``defaults``) and the learning rate (RepDistiller's per model)."""
    from helper.options import effective_lr, loss_weights

    ns = argparse.Namespace(**args)
    w = loss_weights(ns)
    return {**args, "gamma": w.gamma, "alpha": w.alpha, "beta": w.beta, "learning_rate": effective_lr(ns, ns.model_s)}


@functools.cache
def _recipe_args(method: str, teacher: str, student: str) -> dict[str, Any]:
    """The recipe's parsed flags with the defaults it leaves to the method resolved (cached: read-only)."""
    return _effective(vars(parse(method, teacher, student)))


def diff_from(args: dict[str, Any], method: str, teacher: str, student: str) -> list[tuple[str, Any, Any]]:
    """``(flag, recipe value, run value)`` for every training flag where a run's ``args`` differ from
    ``method``'s published recipe on the pair (empty: the run is the recipe). A flag the run does not record
    (an older ``args.json``) counts as the recipe's."""
    recipe = _recipe_args(method, teacher, student)
    run = _effective({**recipe, **args})
    keys = [k for k in recipe if k not in PLACE_FLAGS]
    return [(k, recipe[k], run[k]) for k in keys if not _same(run[k], recipe[k])]


def match(args: dict[str, Any], teacher: str, student: str) -> tuple[str | None, list[tuple[str, Any, Any]]]:
    """The recipe a run follows (same ``--distill`` and switches; the closest one) and its difference from it;
    ``(None, [])`` when no recipe has this run's switches."""
    best: tuple[str | None, list[tuple[str, Any, Any]]] = (None, [])
    for method in methods():
        if skipped(method, teacher, student):
            continue
        recipe = _recipe_args(method, teacher, student)
        if any(bool(recipe[k]) != bool(args.get(k)) if k != "distill" else recipe[k] != args.get(k)
               for k in RECIPE_SWITCHES):  # fmt: skip
            continue
        delta = diff_from(args, method, teacher, student)
        if best[0] is None or len(delta) < len(best[1]):
            best = (method, delta)
    return best


def read_run(folder: Path) -> tuple[dict[str, Any], str, str]:
    """A run folder's flags and its (teacher, student): the teacher from ``summary.json`` where the run
    finished, else ``--model_t``, else the checkpoint's folder name."""
    args = json.loads((folder / "args.json").read_text()).get("args", {})
    teacher = None
    if (folder / "summary.json").is_file():
        teacher = json.loads((folder / "summary.json").read_text()).get("model_t")
    if teacher is None:
        from models import teacher_name_from_path

        teacher = args.get("model_t") or teacher_name_from_path(args["path_t"])
    return args, teacher, args["model_s"]


# ----------------------------------------------------------------------------------------------------------
# The run scripts: the block between these markers is generated from the table.

BEGIN = "# BEGIN RECIPES"
END = "# END RECIPES"


def script_block(script: str) -> str:
    """The shell lines of one script's recipes: ``RECIPE[method|*]`` for every pair, ``RECIPE[method|t:s]`` where
    a pair's flags differ (``skip``: no published number there), ``TRIAL_PREFIX[method]``."""
    from helper.published import PAIRS

    names = methods(script)
    lines = [
        f"{BEGIN}: generated by `python -m helper.recipes scripts --write` from helper/published/recipes.csv,",
        "# which names the source of every value; edit the table, not these lines.",
        f'RECIPE_PAIRS="{" ".join(f"{t}:{s}" for t, s in PAIRS)}"',
        f"RECIPE_STANDARD_EPOCHS={schedule()[0]}",
        f"RECIPE_DECAY_FRACTIONS=({' '.join(f'{chr(34)}{n} {d}{chr(34)}' for n, d in schedule()[1])})",
        f"RECIPE_METHODS=({' '.join(names)})",
        f"RECIPE_OPTIONAL=({' '.join(m for m in names if optional(m))})",
        "declare -A RECIPE=(",
    ]
    for m in names:
        lines.append(f'    ["{m}|*"]="{shlex.join(flags(m))}"')
        for t, s in PAIRS:
            own = "skip" if skipped(m, t, s) else shlex.join(flags(m, t, s))
            if own != shlex.join(flags(m)):
                lines.append(f'    ["{m}|{t}:{s}"]="{own}"')
    lines.append(")")
    prefixes = " ".join(f'["{m}"]={setting(m, "@trial_prefix")}' for m in names if setting(m, "@trial_prefix"))
    lines += [f"declare -A TRIAL_PREFIX=({prefixes})", END]
    return "\n".join(lines)


def docs_block(script: str) -> str:
    """The markdown table of one script's recipes: flags on every pair, each pair's own values, the sources."""
    from helper.published import PAIRS

    lines = [
        "<!-- BEGIN RECIPES: generated by `python -m helper.recipes scripts --write` from recipes.csv -->",
        "| Label | Flags (every pair) | Per pair (teacher->student: its own flags) | Sources (repository file @ commit)"
        " |",
        "|---|---|---|---|",
    ]
    for m in methods(script):
        base = flags(m)
        own = []
        for t, s in PAIRS:
            if skipped(m, t, s):
                own.append(f"{t}->{s}: none published")
                continue
            extra = [r for r in rows(m, t, s) if r.pair != "*" and not r.flag.startswith("@")]
            if extra:
                own.append(f"{t}->{s}: " + " ".join(f"`{r.flag} {r.value}`".replace(" `", "`") for r in extra))
        sources = dict.fromkeys(f"{r.repo} `{r.file}` @ {r.commit[:7]}" for r in load() if r.method == m)
        lines.append(f"| `{m}` | `{shlex.join(base)}` | {'; '.join(own) or 'none'} | {'; '.join(sources)} |")
    return "\n".join([*lines, "<!-- END RECIPES -->"])


def _weights_text(defaults: dict[str, float]) -> str:
    return " / ".join(f"{defaults.get(k, d):g}" for k, d in (("gamma", 1.0), ("alpha", 0.0), ("beta", 0.0)))


def readme_block() -> str:
    """README's method table: every registered ``--distill`` method, in the report's order, with its label and
    authors (``methods.csv``), its paper, default weights and init stage (its file), the repositories its own
    recipe (the one named after it) cites and every recipe that runs it (``recipes.csv``)."""
    from distiller_zoo import get_method, method_names
    from helper.published import METHOD_LABELS, method_rank, method_table

    authors = {r["method"]: r["authors"] for r in method_table()}
    lines = [
        "<!-- BEGIN METHODS: generated by `python -m helper.recipes scripts --write` from helper/published/"
        "methods.csv, recipes.csv and the method files -->",
        "| `--distill` | name | paper | default `-r / -a / -b` | init stage | its recipe cites | recipes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(method_names(), key=method_rank):
        cls = get_method(name)
        labels = [m for m in methods() if flags(m)[flags(m).index("--distill") + 1] == name]
        repos = dict.fromkeys(r.repo for r in load() if r.method == name and not r.repo.startswith("arXiv:"))
        paper = ", ".join(filter(None, (authors.get(name, ""), " ".join(cls.paper.split()))))
        lines.append(
            f"| `{name}` | {METHOD_LABELS.get(name, name)} | {paper} | {_weights_text(cls.defaults)} | "
            f"{'yes' if cls.init_stage else ''} | {', '.join(repos) or '–'} | "
            f"{', '.join(f'`{m}`' for m in labels) or '–'} |"
        )
    return "\n".join([*lines, "<!-- END METHODS -->"])


def models_block() -> str:
    """``run_cifar_vanilla.sh``'s models: RepDistiller's teachers and the students of its pairs
    (``helper.published``), each trained alone."""
    from helper.published import PAIRS, TEACHERS

    return "\n".join([
        "# BEGIN MODELS: generated by `python -m helper.recipes scripts --write` from helper/published.py (TEACHERS,",
        "# PAIRS: RepDistiller's fetch_pretrained_teachers.sh and README tables); edit that, not these lines.",
        f"TEACHER_MODELS=({' '.join(TEACHERS)})",
        f"STUDENT_MODELS=({' '.join(dict.fromkeys(s for _, s in PAIRS))})",
        "# END MODELS",
    ])  # fmt: skip


# Files with a block made from the table: path -> (begin marker, end marker, the block).
def generated_files() -> dict[str, tuple[str, str, str]]:
    out = {rel: (BEGIN, END, script_block(script)) for script, rel in SCRIPTS.items()}
    out["helper/published/newer_recipes.md"] = ("<!-- BEGIN RECIPES", "<!-- END RECIPES -->", docs_block("newer"))
    out["README.md"] = ("<!-- BEGIN METHODS", "<!-- END METHODS -->", readme_block())
    out["scripts/run_cifar_vanilla.sh"] = ("# BEGIN MODELS", "# END MODELS", models_block())
    return out


def render(rel: str, text: str) -> str:
    """``text`` (the contents of ``rel``) with its generated block replaced by the table's."""
    begin, end, block = generated_files()[rel]
    pattern = re.compile(rf"^{re.escape(begin)}.*?^{re.escape(end)}.*?$", re.S | re.M)
    if not pattern.search(text):
        raise RecipeError(f"{rel}: no '{begin}' ... '{end}' block")
    return pattern.sub(lambda _: block, text, count=1)


def sync_scripts(write: bool) -> list[str]:
    """The files whose generated block differs from the table (rewritten with ``write``)."""
    stale = []
    for rel in generated_files():
        path = ROOT / rel
        text = path.read_text()
        new = render(rel, text)
        if new != text:
            stale.append(rel)
            if write:
                path.write_text(new)
    return stale


# ----------------------------------------------------------------------------------------------------------
# The command line


def _split_pair(text: str) -> tuple[str, str]:
    teacher, sep, student = text.partition(":")
    if not sep or not teacher or not student:
        raise RecipeError(f"pair {text!r} is not teacher:student")
    return teacher, student


def _show(opts: argparse.Namespace) -> int:
    teacher, student = _split_pair(opts.pair)
    epochs = opts.epochs
    print(shlex.join(command(opts.method, teacher, student, opts.trial, opts.path_t, epochs, opts.python)))
    if opts.sources:
        for row in rows(opts.method, teacher, student):
            print(f"#   {row.flag} {row.value}: {row.source}" + (f" ({row.note})" if row.note else ""))
    return 0


def _diff(opts: argparse.Namespace) -> int:
    args, teacher, student = read_run(Path(opts.folder))
    method, delta = match(args, teacher, student)
    if method is None:
        print(f"{opts.folder}: no published recipe has --distill {args.get('distill')} with these switches")
        return 1
    print(f"{opts.folder}: {method} on {teacher}:{student}" + ("" if delta else ": the published recipe"))
    for flag, recipe, run in delta:
        print(f"  --{flag}: recipe {recipe!r}, run {run!r}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m helper.recipes", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print the training command of a method on a pair")
    show.add_argument("method")
    show.add_argument("pair", help="teacher:student")
    show.add_argument("--trial", default="1")
    show.add_argument("--epochs", type=int, help="the scripts' EPOCHS override")
    show.add_argument("--path_t", help="teacher checkpoint (default: the scripts' layout)")
    show.add_argument("--python", default="python")
    show.add_argument("--sources", action="store_true", help="also print the source of every value")
    diff = sub.add_parser("diff", help="how a run folder's args.json differs from its published recipe")
    diff.add_argument("folder")
    sub.add_parser("list", help="every recipe and its script")
    scripts = sub.add_parser("scripts", help="compare the generated blocks (scripts, README) with the tables; --write")
    scripts.add_argument("--write", action="store_true")
    opts = p.parse_args(argv)
    try:
        if opts.cmd == "show":
            return _show(opts)
        if opts.cmd == "diff":
            return _diff(opts)
        if opts.cmd == "list":
            for m in methods():
                print(f"{m}\t{setting(m, '@script')}{' (optional)' if optional(m) else ''}\t{shlex.join(flags(m))}")
            return 0
        stale = sync_scripts(opts.write)
        print(("rewritten: " if opts.write else "out of date: ") + " ".join(stale) if stale else "up to date")
        return 1 if stale and not opts.write else 0
    except (RecipeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
