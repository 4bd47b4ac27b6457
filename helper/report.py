"""Result tables from run folders: mean ± std over seeds beside the published numbers.

    python -m helper.report save/ --out results/ [--plots]

Reads every ``summary.json`` (and the ``args.json`` beside it) under the given folders, groups the runs by
(teacher, student, method, loss weights, protocol) and writes ``results.md`` and ``results.csv``. Runs of
different protocols (epochs, training-set size, validation split, non-default flags such as ``--amp``) are
never averaged together: each protocol gets a table of its own, and the difference to a published number
is only shown where the protocol is RepDistiller's (240 epochs on the full training set).

Three accuracies per group, because papers disagree on which one they report:

* last epoch: RepDistiller's and CRD's rule (RepDistiller GitHub #16), the one compared with its tables;
* best epoch: the maximum over epochs of the TEST accuracy (the DKD/mdistiller rule; optimistic, since
  it selects on the test set);
* val-selected: the test accuracy at the epoch of best accuracy on a held-out split of the training set
  (only for runs with ``--val_size``), which removes that selection bias.
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helper import published

log = logging.getLogger(__name__)

FULL_TRAIN_SIZE = 50_000  # CIFAR-100 training images (Krizhevsky, 2009)
STANDARD_EPOCHS = 240  # RepDistiller's schedule (its train_student.py default)

# Flags that do not change what is measured: bookkeeping, placement, identity of the run. The seed and
# trial are the very thing a group averages over; the teacher file is summarised by its accuracy.
NEUTRAL_FLAGS = frozenset(
    {
        "print_freq", "tb_freq", "save_freq", "num_workers", "data_folder", "seed", "trial", "deterministic",
        "resume", "device", "save_dir", "run_name", "eval_batch_size", "compile", "channels_last", "fold_teacher_bn",
        "eval_freq", "no_teacher_eval",
        "skip_nonfinite", "dataset", "model", "model_s", "model_t", "path_t", "distill",
        # Reported elsewhere: the loss weights, the schedule length, the data subset, the learning rate.
        "gamma", "alpha", "beta", "epochs", "train_size", "val_size", "learning_rate",
    }
)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Runs


@dataclass(frozen=True)
class Protocol:
    """What makes two runs comparable: same schedule length, same data, same non-default flags."""

    epochs: int
    train_size: int | None  # None: the whole training set (minus the validation split)
    val_size: int
    flags: tuple[tuple[str, str], ...] = ()  # sorted (flag, value) pairs that differ from the defaults

    @property
    def standard(self) -> bool:
        """RepDistiller's protocol: 240 epochs, all 50,000 training images, default flags."""
        return self.epochs == STANDARD_EPOCHS and self.train_size is None and not self.val_size and not self.flags

    @property
    def label(self) -> str:
        data = "full data" if self.train_size is None else f"{self.train_size:,} img"
        parts = [f"{self.epochs} ep", data]
        if self.val_size:
            parts.append(f"{self.val_size:,} val held out")
        parts += [f"{k} {v}" for k, v in self.flags]
        return ", ".join(parts)

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9]+", "_", self.label.replace(",", "")).strip("_")


Flags = tuple[tuple[str, str], ...]


@dataclass
class RunRecord:
    folder: Path
    summary: dict[str, Any]
    args: dict[str, Any]
    teacher: str | None  # None for train_teacher.py runs
    student: str
    method: str  # table method: "vanilla", "kd", "crd+kd", ...
    weights: tuple[float, float, float] | None  # (gamma, alpha, beta); None for vanilla
    protocol: Protocol
    method_flags: Flags = ()  # non-default flags of the method (kd_T, nce_k, ...): part of the method's name


@functools.cache
def _parser_defaults(kind: str) -> dict[str, Any]:
    """Default flag values of the entry point that wrote a run (imported lazily: it imports torch)."""
    from helper.options import student_parser, teacher_parser

    parser = teacher_parser() if kind == "teacher" else student_parser()
    return vars(parser.parse_args([]))


def _non_default(args: dict[str, Any], defaults: dict[str, Any], keys: Iterable[str]) -> Flags:
    return tuple(sorted((k, _fmt_value(args[k])) for k in keys if k in args and args[k] != defaults[k]))


def _default_lr(arch: str) -> float:
    """The learning rate the tools give ``arch`` when none is passed (RepDistiller's, per model)."""
    from helper.options import effective_lr

    return effective_lr(argparse.Namespace(learning_rate=None), arch)


def _fmt_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def method_flags_of(kind: str, args: dict[str, Any]) -> Flags:
    """Non-default flags that only train_student.py has (the method's: ``--kd_T``, ``--nce_k``, ...)."""
    if kind == "teacher":
        return ()
    teacher = _parser_defaults("teacher")
    defaults = _parser_defaults("student")
    keys = (
        k for k in defaults
        if k not in teacher and k not in NEUTRAL_FLAGS and k not in modifiers() and k not in PROTOCOL_STUDENT_FLAGS
    )  # fmt: skip
    return _non_default(args, defaults, keys)


def protocol_of(kind: str, args: dict[str, Any], summary: dict[str, Any], arch: str) -> Protocol:
    """The training recipe: the flags both entry points share (schedule, optimiser, data, precision)."""
    defaults = _parser_defaults(kind)
    shared = _parser_defaults("teacher").keys() & _parser_defaults("student").keys()
    flags = list(_non_default(args, defaults, (k for k in shared if k not in NEUTRAL_FLAGS)))
    lr = summary.get("lr")
    if lr is not None and not math.isclose(lr, _default_lr(arch)):
        flags.append(("lr", _fmt_value(float(lr))))
    if args.get("two_views"):  # a data protocol of train_student.py's own (MLKD's weak + strong views)
        flags.append(("views", "weak+strong"))
    train_size = args.get("train_size")
    if train_size is not None and train_size >= FULL_TRAIN_SIZE - (args.get("val_size") or 0):
        train_size = None  # asking for every image is the full set
    return Protocol(
        epochs=int(args.get("epochs", summary.get("epochs", STANDARD_EPOCHS))),
        train_size=train_size,
        val_size=int(args.get("val_size") or 0),
        flags=tuple(sorted(flags)),
    )


# train_student.py flags that change the training protocol rather than the method: shown with the protocol.
PROTOCOL_STUDENT_FLAGS = frozenset({"two_views"})


@functools.cache
def modifiers() -> dict[str, str]:
    """Logit modifiers that combine with a method and give it a name of its own in the published tables (the
    LS-KD README: KD+LS, DKD+LS, MLKD+LS, KD+CTKD; the mdistiller README: KD+DOT): flag -> suffix, as the run
    folders name them (``helper.options.SWITCHES``, imported lazily: it imports torch)."""
    from helper.options import SWITCHES

    return {flag: suffix for flag, suffix in SWITCHES.items() if flag not in PROTOCOL_STUDENT_FLAGS}


def added_names(args: dict[str, Any] | None) -> list[str]:
    """The methods a run added with ``--add`` (``["itrd:1.0", "nd:2,pkt"]`` -> ``["itrd", "nd", "pkt"]``)."""
    specs = (args or {}).get("add") or []
    return [item.partition(":")[0].strip() for spec in specs for item in spec.split(",") if item.strip()]


def _table_suffix(added: str) -> str:
    try:
        from distiller_zoo import get_method

        return get_method(added).table_suffix or f"+{added}"
    except ValueError:
        return f"+{added}"  # a method this checkout does not register


def table_method(method: str, alpha: float, args: dict[str, Any] | None = None) -> str:
    """The name of a run in the tables.

    RepDistiller's naming: a feature method trained with the KD term as well (``-a`` > 0) is
    ``<method>+kd`` (CRD+KD is ``--distill crd -a 1 -b 0.8``). Logit modifiers append theirs:
    ``--distill kd --logit_stand`` is ``kd+ls``, ``--distill dkd --logit_stand`` is ``dkd+ls``. Added methods
    append theirs: ``--distill wttm --add itrd`` is ``wttm+itrd``, ``--distill dkd --add nd:4`` is ``dkd++``.
    """
    name = method
    if alpha > 0 and method != "kd":
        try:
            from distiller_zoo import get_method

            own_kd = get_method(method).defaults.get("alpha", 0.0) > 0  # the KD term is part of its recipe
        except ValueError:
            own_kd = False  # a method this checkout does not register: name it by the rule above
        if not own_kd:
            name = f"{method}+kd"
    for added in added_names(args):  # --add: wttm with itrd is wttm+itrd; ND names dkd with it dkd++
        name += _table_suffix(added)
    for flag, suffix in modifiers().items():
        if (args or {}).get(flag):
            name = f"{name}+{suffix}"
    return name


def read_run(summary_path: Path) -> RunRecord | None:
    """One finished run, or None (with a warning) when its files are not this project's."""
    folder = summary_path.parent
    try:
        summary = json.loads(summary_path.read_text())
        args = json.loads((folder / "args.json").read_text()).get("args", {})
    except (OSError, json.JSONDecodeError) as exc:
        log.warning("skipping %s: %s", folder, exc)
        return None
    kind = summary.get("kind")
    if kind not in ("teacher", "student"):
        log.warning("skipping %s: summary.json has no kind teacher/student", folder)
        return None
    student = summary.get("model_s") or summary.get("arch")
    if kind == "teacher":
        teacher, method, weights = None, "vanilla", None
    else:
        teacher = summary.get("model_t")
        gamma, alpha, beta = (float(summary.get(k, 0.0)) for k in ("gamma", "alpha", "beta"))
        method, weights = table_method(summary.get("method", "?"), alpha, args), (gamma, alpha, beta)
    protocol = protocol_of(kind, args, summary, student)
    return RunRecord(folder, summary, args, teacher, student, method, weights, protocol, method_flags_of(kind, args))


def find_runs(roots: Iterable[Path]) -> list[RunRecord]:
    """Every finished run under ``roots`` (each folder once, even if given twice)."""
    seen: set[Path] = set()
    runs = []
    unfinished = 0
    for root in roots:
        if not root.exists():
            log.warning("%s does not exist", root)
            continue
        for path in sorted(root.rglob("summary.json")):
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            run = read_run(path)
            if run is not None:
                runs.append(run)
        unfinished += sum(1 for p in root.rglob("args.json") if not (p.parent / "summary.json").exists())
    if unfinished:
        log.info("%d unfinished runs (args.json without summary.json) are not included", unfinished)
    return runs


# ----------------------------------------------------------------------------------------------------------
# Groups


@dataclass(frozen=True)
class Stat:
    mean: float
    std: float | None  # sample standard deviation (n - 1); None for a single run
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat | None:
        values = [float(v) for v in values if v is not None]
        if not values:
            return None
        std = statistics.stdev(values) if len(values) > 1 else None
        return cls(statistics.fmean(values), std, len(values))

    def text(self, with_n: bool = False) -> str:
        out = f"{self.mean:.2f}" if self.std is None else f"{self.mean:.2f} ± {self.std:.2f}"
        return f"{out} (n={self.n})" if with_n else out


@dataclass
class Group:
    teacher: str | None
    student: str
    method: str
    weights: tuple[float, float, float] | None
    protocol: Protocol
    method_flags: Flags = ()
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def label(self) -> str:
        """The method's table name, with its non-default flags: ``CRD (nce_k 4096)``."""
        name = published.method_label(self.method)
        return f"{name} ({', '.join(f'{k} {v}' for k, v in self.method_flags)})" if self.method_flags else name

    def values(self, key: str) -> list[float]:
        return [r.summary[key] for r in self.runs if r.summary.get(key) is not None]

    @property
    def last(self) -> Stat | None:
        return Stat.of(self.values("test_acc"))

    @property
    def best(self) -> Stat | None:
        return Stat.of(self.values("best_acc"))

    @property
    def val_selected(self) -> Stat | None:
        return Stat.of(self.values("test_acc_at_val_best"))

    @property
    def published(self) -> published.Published | None:
        return published.lookup(self.teacher, self.student, self.method)

    @property
    def comparison(self) -> tuple[float | None, str]:
        """(ours - published, basis): last epoch against last-epoch tables, best epoch against best-epoch ones."""
        pub = self.published
        if pub is None or pub.acc is None:
            return None, ""
        basis = "best" if "best-epoch" in pub.protocol else "last"
        ours = self.best if basis == "best" else self.last
        return (None, basis) if ours is None else (ours.mean - pub.acc, basis)

    @property
    def recipe_diff(self) -> list[tuple[str, Any, Any]] | None:
        """How these runs' flags differ from the published recipe they follow (``helper.recipes``); ``None``
        when no recipe of the table has their method and switches (or for vanilla runs)."""
        if self.teacher is None or not self.runs:
            return None
        from helper import recipes

        try:
            method, delta = recipes.match(self.runs[0].args, self.teacher, self.student)
        except (recipes.RecipeError, SystemExit, ValueError):  # args this checkout's parser does not accept
            return None
        return None if method is None else delta

    @property
    def comparable(self) -> bool:
        """Same protocol and method settings as the published number, so Δ means something: the runs are their
        published recipe (the table's), or, without one, RepDistiller's protocol with the method's defaults."""
        if self.comparison[0] is None:
            return False
        delta = self.recipe_diff
        if delta is not None:
            return not delta
        return self.protocol.standard and not self.method_flags


def group_key(run: RunRecord) -> tuple:
    weights = None if run.weights is None else tuple(round(w, 6) for w in run.weights)
    return (run.teacher, run.student, run.method, weights, run.protocol, run.method_flags)


def _pair_rank(teacher: str | None, student: str) -> tuple:
    pairs = list(published.PAIRS)
    if teacher is None:  # vanilla: before the first pair that uses this student (or the teacher itself)
        firsts = [i for i, (t, s) in enumerate(pairs) if student in (t, s)]
        return (firsts[0] if firsts else len(pairs), 0, student, "")
    index = pairs.index((teacher, student)) if (teacher, student) in pairs else len(pairs)
    return (index, 1, teacher, student)


def group_runs(runs: Iterable[RunRecord]) -> list[Group]:
    """Runs grouped by (teacher, student, method, weights, protocol), in RepDistiller's table order."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = group_key(run)
        if key not in groups:
            groups[key] = Group(run.teacher, run.student, run.method, key[3], run.protocol, run.method_flags)
        groups[key].runs.append(run)
    return sorted(
        groups.values(),
        key=lambda g: (
            not g.protocol.standard, g.protocol.label, _pair_rank(g.teacher, g.student),
            published.method_rank(g.method), str(g.weights), g.method_flags,
        ),
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Output


def _weights_text(weights: tuple[float, float, float] | None) -> str:
    return "–" if weights is None else "r {:g}, a {:g}, b {:g}".format(*weights)


def _pair_text(group: Group) -> str:
    return f"{group.teacher or '–'} → {group.student}"


def _teacher_acc_text(group: Group) -> str:
    values = sorted({round(v, 2) for v in group.values("teacher_acc")})
    return "/".join(f"{v:.2f}" for v in values[:3]) or "–"


def csv_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    rows = []
    for g in groups:
        last, best, val = g.last, g.best, g.val_selected
        pub = g.published
        diff, basis = g.comparison
        wall = Stat.of(g.values("wall_time"))
        speed = Stat.of(g.values("images_per_sec"))
        top5 = Stat.of(g.values("test_acc_top5"))
        devices = sorted({str(r.summary.get("environment", {}).get("device_name", "")) for r in g.runs})
        rows.append(
            {
                "teacher": g.teacher or "",
                "student": g.student,
                "method": g.method,
                "method_label": g.label,
                "gamma": "" if g.weights is None else g.weights[0],
                "alpha": "" if g.weights is None else g.weights[1],
                "beta": "" if g.weights is None else g.weights[2],
                "protocol": g.protocol.label,
                "standard_protocol": g.protocol.standard,
                "epochs": g.protocol.epochs,
                "train_size": g.protocol.train_size or "",
                "val_size": g.protocol.val_size,
                "flags": " ".join(f"{k}={v}" for k, v in g.protocol.flags),
                "method_flags": " ".join(f"{k}={v}" for k, v in g.method_flags),
                "n": len(g.runs),
                "seeds": " ".join(str(r.summary.get("seed")) for r in g.runs),
                "last_mean": _num(last and last.mean),
                "last_std": _num(last and last.std),
                "best_mean": _num(best and best.mean),
                "best_std": _num(best and best.std),
                "val_selected_mean": _num(val and val.mean),
                "val_selected_std": _num(val and val.std),
                "val_selected_n": val.n if val else 0,
                "top5_mean": _num(top5 and top5.mean),
                "teacher_acc": _teacher_acc_text(g) if g.teacher else "",
                "published": _num(pub and pub.acc),
                "published_std": _num(pub and pub.std),
                "published_source": pub.source if pub else "",
                "published_protocol": pub.protocol if pub else "",
                "diff": _num(diff),
                "diff_basis": basis,
                "comparable": g.comparable,
                "wall_time_mean_s": _num(wall and wall.mean, 1),
                "images_per_sec_mean": _num(speed and speed.mean, 1),
                "device": "; ".join(d for d in devices if d),
                "folders": " ".join(str(r.folder) for r in g.runs),
            }
        )
    return rows


def _num(value: float | None, digits: int = 4) -> str | float:
    return "" if value is None else round(float(value), digits)


def write_csv(groups: Sequence[Group], path: Path) -> None:
    rows = csv_rows(groups)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["teacher"])
        writer.writeheader()
        writer.writerows(rows)


MD_HEADER = (
    "| Teacher → Student | Method | Weights | n | Last epoch | Published | Δ | Best epoch | Val-selected "
    "| Teacher acc | img/s | Wall/run |"
)


def _md_row(g: Group, sources: dict[str, int]) -> str:
    pub = g.published
    diff, basis = g.comparison
    if pub is None or pub.acc is None:
        pub_text, diff_text = "–", "–"
    else:
        ref = sources.setdefault(f"{pub.source} ({pub.protocol})", len(sources) + 1)
        pub_text = f"{pub.acc:.2f} [{ref}]"
        if diff is None:
            diff_text = "–"
        elif not g.comparable:
            diff_text = "n/c"
        else:
            diff_text = f"{diff:+.2f}" + (" (best)" if basis == "best" else "")
    wall = Stat.of(g.values("wall_time"))
    speed = Stat.of(g.values("images_per_sec"))
    cells = [
        _pair_text(g),
        g.label,
        _weights_text(g.weights),
        str(len(g.runs)),
        g.last.text() if g.last else "–",
        pub_text,
        diff_text,
        g.best.text() if g.best else "–",
        g.val_selected.text(with_n=g.val_selected.n != len(g.runs)) if g.val_selected else "–",
        _teacher_acc_text(g) if g.teacher else "–",
        f"{speed.mean:,.0f}" if speed else "–",
        _duration(wall.mean) if wall else "–",
    ]
    return "| " + " | ".join(cells) + " |"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def markdown(groups: Sequence[Group]) -> str:
    """The result tables, one per protocol, with numbered sources of the published numbers."""
    lines = ["# CIFAR-100 results", ""]
    if not groups:
        return "\n".join([*lines, "No finished runs found.", ""])
    lines += [
        "Top-1 accuracy (%) on the 10,000 CIFAR-100 test images: mean ± sample std over seeds (n runs).",
        "Last epoch is RepDistiller's reporting rule (RepDistiller GitHub #16) and is what Δ compares with its tables.",
        "Best epoch selects on the test set (the DKD/mdistiller rule; optimistic). Val-selected is the test accuracy",
        "at the epoch that is best on a held-out validation split (runs with --val_size only).",
        "Δ = ours − published; 'n/c': not comparable (another protocol, or method flags other than the published).",
        "img/s: training throughput; Wall/run: time of the training loop per run (summary.json), mean over runs.",
        "",
    ]
    sources: dict[str, int] = {}
    by_protocol: dict[Protocol, list[Group]] = defaultdict(list)
    for g in groups:
        by_protocol[g.protocol].append(g)
    for protocol, members in by_protocol.items():
        title = protocol.label + (" (RepDistiller's protocol)" if protocol.standard else "")
        lines += [f"## {title}", ""]
        if not protocol.standard:
            lines += [
                f"Not RepDistiller's protocol ({protocol.label} instead of 240 ep on the full data): these numbers "
                "are not comparable with the published ones, which are shown for orientation only.",
                "",
            ]
        lines += [MD_HEADER, "|" + "---|" * MD_HEADER.count(" | ") + "---|"]
        lines += [_md_row(g, sources) for g in members]
        lines.append("")
    if sources:
        lines += ["Sources of the published numbers:", ""]
        lines += [f"[{n}] {text}" for text, n in sources.items()]
        lines.append("")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Plots


def write_plots(groups: Sequence[Group], out: Path) -> list[Path]:
    """Per (pair, protocol): accuracy-over-epochs curves and a bar chart against the published numbers."""
    from helper import plots

    written = []
    vanilla = {(g.student, g.protocol): g for g in groups if g.teacher is None}
    pairs: dict[tuple, list[Group]] = defaultdict(list)
    for g in groups:
        if g.teacher is not None:
            pairs[(g.teacher, g.student, g.protocol)].append(g)
    for (teacher, student, protocol), members in pairs.items():
        base = vanilla.get((student, protocol))
        members = ([base] if base else []) + members
        title = f"{teacher} → {student} ({protocol.label})"
        stem = f"{teacher}_{student}_{protocol.slug}"
        series = [plots.Series(_legend(g, members), [plots.read_curve(r.folder) for r in g.runs]) for g in members]
        written.append(plots.plot_curves(series, title, out / f"curves_{stem}.png"))
        bars = []
        for g in members:
            pub = g.published
            stat = g.last
            bars.append(
                plots.Bar(
                    _legend(g, members), stat.mean if stat else math.nan, stat.std if stat else None,
                    len(g.runs), pub.acc if pub else None,
                )
            )  # fmt: skip
        written.append(plots.plot_bars(bars, title + ": last epoch", out / f"bars_{stem}.png"))
    return written


def _legend(g: Group, members: Sequence[Group]) -> str:
    same_label = [m for m in members if m.label == g.label]
    return f"{g.label}, {_weights_text(g.weights)}" if len(same_label) > 1 else g.label


# ----------------------------------------------------------------------------------------------------------
# Command line


def build_report(roots: Sequence[Path], out: Path, with_plots: bool = False) -> tuple[list[Group], str]:
    """Read the runs under ``roots`` and write ``results.md``, ``results.csv`` (and plots) into ``out``."""
    groups = group_runs(find_runs(roots))
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(groups)
    (out / "results.md").write_text(text)
    write_csv(groups, out / "results.csv")
    if with_plots:
        for path in write_plots(groups, out):
            log.info("wrote %s", path)
    return groups, text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="folders to search for run folders (summary.json)")
    parser.add_argument("--out", type=Path, default=Path("results"), help="output folder (default: results/)")
    parser.add_argument("--plots", action="store_true", help="also write PNG plots per pair and protocol")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    groups, text = build_report(args.folders, args.out, args.plots)
    sys.stdout.write(text)
    log.info("%d groups from %d runs; wrote %s", len(groups), sum(len(g.runs) for g in groups), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
