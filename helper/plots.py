"""PNG plots of results: test accuracy over epochs, and methods against the published numbers.

matplotlib with the Agg backend (files only, no display), imported when a plot is drawn.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Curve = list[tuple[int, float]]  # (epoch, test accuracy %), main stage only


@dataclass
class Series:
    label: str
    curves: list[Curve]  # one per seed


@dataclass
class Bar:
    label: str
    mean: float
    std: float | None
    n: int
    published: float | None


def read_curve(folder: Path, key: str = "test_acc") -> Curve:
    """``(epoch, key)`` of the main stage from a run's ``metrics.jsonl`` (init-stage rows are skipped)."""
    path = Path(folder) / "metrics.jsonl"
    if not path.exists():
        return []
    curve = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("stage", "main") == "main" and row.get(key) is not None:
            curve.append((int(row["epoch"]), float(row[key])))
    return curve


def mean_curve(curves: Sequence[Curve]) -> tuple[list[int], list[float], list[float]]:
    """Epochs present in every curve, the mean and the (population) spread across curves at each."""
    curves = [dict(c) for c in curves if c]
    if not curves:
        return [], [], []
    epochs = sorted(set.intersection(*(set(c) for c in curves)))
    means, stds = [], []
    for e in epochs:
        values = [c[e] for c in curves]
        mean = sum(values) / len(values)
        means.append(mean)
        stds.append(math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)))
    return epochs, means, stds


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(series: Sequence[Series], title: str, path: Path) -> Path:
    """Test accuracy per epoch, one line per method (mean over seeds, band = ± std when n > 1)."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    for s in series:
        epochs, means, stds = mean_curve(s.curves)
        if not epochs:
            continue
        n = sum(1 for c in s.curves if c)
        (line,) = ax.plot(epochs, means, marker="o" if len(epochs) <= 20 else None, ms=3, label=f"{s.label} (n={n})")
        if n > 1:
            lo = [m - d for m, d in zip(means, stds)]
            hi = [m + d for m, d in zip(means, stds)]
            ax.fill_between(epochs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(_wrap(title), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _save(fig, plt, path)


def plot_bars(bars: Sequence[Bar], title: str, path: Path) -> Path:
    """One bar per method (our mean, error bar = sample std), the published number as a marker beside it."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(bars) + 2), 4.5), dpi=110)
    xs = list(range(len(bars)))
    means = [b.mean for b in bars]
    errs = [b.std or 0.0 for b in bars]
    rects = ax.bar(xs, means, color="tab:blue", alpha=0.8, label="ours (last epoch)")
    spread = [(x, m, e) for x, m, e, b in zip(xs, means, errs, bars) if b.n > 1]
    if spread:  # error bars only where there is a spread to show (n > 1)
        ax.errorbar([x for x, _, _ in spread], [m for _, m, _ in spread], yerr=[e for _, _, e in spread],
                    fmt="none", ecolor="black", capsize=3, label="± std over seeds")  # fmt: skip
    for rect, b in zip(rects, bars):
        if not math.isnan(b.mean):
            # Above the bar, its error bar and the published marker, so that nothing overlaps the text.
            top = max(b.mean + (b.std or 0.0), b.published if b.published is not None else -math.inf)
            ax.annotate(
                f"{b.mean:.1f}\nn={b.n}", (rect.get_x() + rect.get_width() / 2, top), xytext=(0, 4),
                textcoords="offset points", ha="center", va="bottom", fontsize=7,
            )  # fmt: skip
    pub = [(x, b.published) for x, b in zip(xs, bars) if b.published is not None]
    if pub:
        ax.scatter(
            [x for x, _ in pub], [p for _, p in pub], marker="_", s=600, linewidths=2.5, color="tab:red", zorder=3,
            label="published",
        )  # fmt: skip
    values = [v for v in means + [p for _, p in pub] if not math.isnan(v)]
    if values:
        lo, hi = min(values), max(values)
        # Zoom in on high accuracies (differences of a point matter there); start at 0 for low ones.
        bottom = 0.0 if lo < 30 else lo - 0.15 * (hi - lo) - 5
        ax.set_ylim(bottom, min(100.0, hi + 0.25 * (hi - bottom) + 1))
    ax.set_xticks(xs, [b.label for b in bars], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test top-1 accuracy (%)")
    ax.set_title(_wrap(title), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, plt, path)


def _wrap(title: str, width: int = 60) -> str:
    """Long titles on two lines, broken at ' (' (pair, then protocol) or at the last space that fits."""
    if len(title) <= width:
        return title
    cut = title.find(" (")
    if cut <= 0 or cut > width:
        cut = title.rfind(" ", 0, width)
    return title if cut <= 0 else title[:cut] + "\n" + title[cut + 1 :]


def _save(fig: Any, plt: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
