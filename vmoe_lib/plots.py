"""All figures of the book, in one style.

Each function takes stored results and returns a matplotlib ``Figure``; the chapter shows it inline and
:func:`save` writes it under ``_build/figures/<preset>/<chapter>/`` (git-ignored), so a smoke run never overwrites a
figure of record. Statistical figures (per-seed strips with means, heatmaps, the forest plot of the papers' claims)
are drawn with seaborn.

Readable at the book's width: :func:`style` sets seaborn's theme with the book's sizes and asks the notebook for
2x-density images; :func:`check_readable` fails a figure wider than the page or with text smaller than
:data:`MIN_FONT_POINTS` (80 % of the body text at the width a 7.2-inch figure is shown); the tests run it over every
figure of every chapter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.text import Text
from matplotlib.ticker import MaxNLocator

from .results import RunResult, _repo_root

__all__ = ["style", "save", "check_readable", "strip_with_means", "plain_log_axis", "compact_number", "accuracy_vs_epochs",
           "accuracy_vs_cost", "per_seed_points", "forest", "PALETTE", "VERDICT_COLORS", "MIN_FONT_POINTS",
           "MAX_WIDTH_INCHES"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf", "#bcbd22")
#: Colours of the four verdicts (and a control's two), as the book's badges show them.
VERDICT_COLORS = {"reproduced": "#1a7f37", "not reproduced": "#cf222e", "inconclusive": "#9a6700",
                  "not testable": "#8c959f", "passed": "#1a7f37", "failed": "#cf222e"}
#: The smallest text a figure may hold (points): 80 % of the book's 16-px body text at 110 dpi, with room for the
#: figure to be shown a little narrower than drawn.
MIN_FONT_POINTS = 10.0
#: The widest figure (inches): 7.2 in at 110 dpi is the book's content width at 1280 px.
MAX_WIDTH_INCHES = 7.5


def style() -> None:
    """The book's plotting style (applied by every function here): seaborn's ``whitegrid`` theme, 11-point text,
    10-point ticks and legends, and 2x-density images in a notebook."""
    sns.set_theme(style="whitegrid", palette=list(PALETTE), rc={
        "figure.dpi": 110,
        "savefig.dpi": 220,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 11,
        "axes.titlesize": 11,
        "axes.labelsize": 11,
        "xtick.labelsize": 10,
        "ytick.labelsize": 10,
        "legend.fontsize": 10,
        "legend.title_fontsize": 10,
        "figure.titlesize": 12,
        "legend.frameon": False,
        "grid.alpha": 0.5,
    })
    try:  # in a notebook, images at twice the pixel density (sharp on HiDPI screens)
        from IPython import get_ipython

        if get_ipython() is not None:
            from matplotlib_inline.backend_inline import set_matplotlib_formats

            set_matplotlib_formats("retina")
    except ImportError:
        pass


def check_readable(fig: Figure, *, min_points: float = MIN_FONT_POINTS, max_width: float = MAX_WIDTH_INCHES) -> None:
    """Raise ``ValueError`` naming what a reader could not read: a figure wider than ``max_width`` inches (it would
    be shrunk on the page) or visible text smaller than ``min_points``."""
    width = fig.get_figwidth()
    problems = [f"figure is {width:.2f} in wide (> {max_width} in: the page would shrink it)"] if width > max_width else []
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text().strip() and text.get_fontsize() < min_points - 1e-6:
            problems.append(f"{text.get_text()[:40]!r} is {text.get_fontsize():g} pt (< {min_points:g})")
    if problems:
        raise ValueError("figure not readable at the book's width: " + "; ".join(problems[:8])
                         + (f" and {len(problems) - 8} more" if len(problems) > 8 else ""))


def _groups(results: Iterable[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.name, []).append(r)
    return groups


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def _legend(ax, n: int) -> None:
    """A legend that never covers the data: inside the axes for a few series, under them in columns for more."""
    if n <= 4:
        ax.legend()
        return
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)


def compact_number(value: float) -> str:
    """``5``, ``20``, ``50k``, ``1.5M``: a tick label that stays short for counts of parameters or FLOPs."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def plain_log_axis(axis: Any) -> None:
    """A log-scaled axis labelled with plain numbers (``5``, ``10``, ``20``, ``50k``, ``1M``), not powers of ten
    (``7×10⁰``)."""
    axis.set_major_locator(mticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _: compact_number(v)))
    axis.set_minor_formatter(mticker.NullFormatter())


def save(fig: Figure, name: str, *, chapter: str, preset: str, root: str | Path | None = None) -> Path:
    """Save ``fig`` as ``<root>/<preset>/<chapter>/<name>.png`` (root: ``_build/figures`` of the checkout)."""
    if root is None:
        base = _repo_root() or Path.cwd()
        root = base / "_build" / "figures"
    path = Path(root) / preset / chapter / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def strip_with_means(ax, values: Mapping[str, Sequence[float]], *, ylabel: str = "test accuracy (%)",
                     band: Sequence[float] | None = None, band_label: str = "", rotate: bool = False) -> None:
    """Per group (x): every value as a point (seaborn strip) and the mean ± one sd beside it (seaborn point plot);
    ``band`` draws another model's mean ± sd as a grey band behind (e.g. the dense model)."""
    order = [k for k, v in values.items() if len(v)]
    data = pd.DataFrame([{"group": k, "value": float(x)} for k in order for x in values[k]])
    if band is not None and len(band):
        b = np.asarray(band, dtype=float)
        sd = b.std(ddof=1) if b.size > 1 else 0.0
        ax.axhspan(b.mean() - sd, b.mean() + sd, color="0.9", zorder=0)
        ax.axhline(b.mean(), color="0.45", ls="--", lw=1, label=band_label or None)
    if data.empty:
        return
    palette = {k: _color(i) for i, k in enumerate(order)}
    sns.stripplot(data=data, x="group", y="value", hue="group", order=order, hue_order=order, palette=palette,
                  alpha=0.6, size=5, jitter=0.12, dodge=False, legend=False, ax=ax)
    sns.pointplot(data=data, x="group", y="value", hue="group", order=order, hue_order=order, palette=palette,
                  errorbar="sd", markers="D", linestyles="none", capsize=0.15, dodge=0.45, legend=False, ax=ax)
    ax.set_xlabel("")
    ax.set_ylabel(ylabel)
    if rotate:
        ax.tick_params(axis="x", rotation=25)
        for label in ax.get_xticklabels():
            label.set_horizontalalignment("right")
    if band is not None and len(band) and band_label:
        ax.legend(loc="best")


def accuracy_vs_epochs(results: Sequence[RunResult], metric: str = "val_accuracy", *, title: str | None = None) -> Figure:
    """Mean over seeds (line) and min-max band of ``metric`` per epoch, one line per run name."""
    style()
    groups = _groups(results)
    fig, ax = plt.subplots(figsize=(7.2, 4.4 + 0.25 * max(0, len(groups) - 4)))
    for i, (name, runs) in enumerate(groups.items()):
        # Epochs without an evaluation (``eval_every``) have no ``metric``: the curve joins the evaluated ones.
        curves = np.array([[h[metric] for h in r.history if metric in h] for r in runs]) * 100
        epochs = np.array([h["epoch"] for h in runs[0].history if metric in h])
        ax.plot(epochs, curves.mean(0), marker="o", color=_color(i), label=f"{name} (n={len(runs)})")
        if len(runs) > 1:
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=_color(i), alpha=0.2, linewidth=0)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.set_title(title or f"{metric.replace('_', ' ')} per epoch (band: min-max over seeds)")
    _legend(ax, len(groups))
    fig.tight_layout()
    return fig


def accuracy_vs_cost(
    results: Sequence[RunResult],
    metric: str = "test_accuracy",
    cost: str = "flops_per_image",
    *,
    log_x: bool = True,
    title: str | None = None,
) -> Figure:
    """Per-seed points and mean ± std of the final ``metric`` against a cost (FLOPs per image by default)."""
    style()
    groups = _groups(results)
    fig, ax = plt.subplots(figsize=(7.2, 4.4 + 0.25 * max(0, len(groups) - 4)))
    for i, (name, runs) in enumerate(groups.items()):
        xs = np.array([r.record["costs"][cost] for r in runs], dtype=float)
        if cost == "flops_per_image":
            xs = xs / 1e6
        ys = np.array([r.final[metric] for r in runs]) * 100
        ax.scatter(xs, ys, color=_color(i), alpha=0.45, s=18)
        ax.errorbar(xs.mean(), ys.mean(), yerr=ys.std(ddof=1) if len(ys) > 1 else None, fmt="o", color=_color(i),
                    markersize=7, capsize=4, label=name)
    if log_x:
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
    ax.set_xlabel("MFLOPs per image (log scale)" if cost == "flops_per_image" else cost.replace("_", " "))
    ax.set_ylabel(f"final {metric.replace('_', ' ')} (%)")
    ax.set_title(title or f"{metric.replace('_', ' ')} vs {cost.replace('_', ' ')} (points: seeds; bars: ±1 std)")
    _legend(ax, len(groups))
    fig.tight_layout()
    return fig


def per_seed_points(results: Sequence[RunResult], metric: str = "test_accuracy", *, title: str | None = None) -> Figure:
    """One column per run name: every seed's final ``metric`` and the mean ± std."""
    style()
    groups = _groups(results)
    fig, ax = plt.subplots(figsize=(min(MAX_WIDTH_INCHES, max(4.0, 1.1 * len(groups) + 2)), 4))
    strip_with_means(ax, {name: [r.final[metric] * 100 for r in runs] for name, runs in groups.items()},
                     ylabel=f"final {metric.replace('_', ' ')} (%)", rotate=True)
    ax.set_title(title or f"{metric.replace('_', ' ')} per run (points: seeds; diamond: mean ± std)")
    fig.tight_layout()
    return fig


def forest(findings: Sequence[Any], *, paper_names: Mapping[str, str] | None = None) -> Figure:
    """The forest plot of the papers' claims (``findings``: :class:`vmoe_lib.book.Finding`), one row each, grouped by
    paper: our effect (points) with its 90 % interval, coloured by verdict; the smallest effect of interest the rule
    reads (a bar: ``m`` for superiority, ``-m`` for non-inferiority, ``±m`` for equivalence); the paper's own number
    (an open diamond) where it gives one."""
    style()
    rows = [f for f in findings if f.row.effect is not None and f.row.interval is not None]
    papers = list(dict.fromkeys(f.paper for f in rows))
    height = 1.6 + 0.27 * (len(rows) + len(papers))
    fig, ax = plt.subplots(figsize=(7.2, height))
    y, ticks, labels, headers = 0.0, [], [], []
    data = []
    for paper in papers:
        ticks.append(y)
        labels.append((paper_names or {}).get(paper, paper))
        headers.append(len(labels) - 1)
        y += 1
        for f in (g for g in rows if g.paper == paper):
            r = f.row
            lo, hi = r.interval
            color = VERDICT_COLORS.get(r.verdict, "0.3")
            ax.plot([lo, hi], [y, y], color=color, lw=2.2, solid_capstyle="butt")
            bars = {"tost": (-r.min_effect, r.min_effect), "noninferiority": (-r.min_effect,)}.get(r.test, (r.min_effect,))
            for bar in bars:
                ax.plot([bar, bar], [y - 0.32, y + 0.32], color="0.25", lw=1.2)
            data.append({"effect": r.effect, "y": y, "verdict": r.verdict})
            paper_effect = (r.paper or {}).get("effect")
            if paper_effect is not None:
                ax.scatter([paper_effect], [y], marker="D", s=34, facecolor="white", edgecolor="0.15", zorder=4)
            chapter = (r.notebook or r.chapter).split("_", 1)[0]
            ticks.append(y)
            labels.append(f"{int(chapter) if chapter.isdigit() else chapter} · {r.claim_id}")
            y += 1
    frame = pd.DataFrame(data)
    if not frame.empty:
        sns.scatterplot(data=frame, x="effect", y="y", hue="verdict", palette=VERDICT_COLORS, s=42, zorder=5,
                        edgecolor="white", linewidth=0.6, ax=ax, legend=False)
    ax.axvline(0, color="0.35", lw=1)
    ax.set_yticks(ticks, labels)
    for i in headers:
        ax.get_yticklabels()[i].set_fontweight("bold")
        ax.get_yticklabels()[i].set_fontsize(11)
    ax.set_ylim(y - 0.4, -0.6)
    ax.set_ylabel("")
    ax.set_xlabel("effect (accuracy points; positive: the paper's direction)")
    ax.grid(axis="y", visible=False)
    present = list(dict.fromkeys(d["verdict"] for d in data))
    handles = [Line2D([], [], color=VERDICT_COLORS[v], marker="o", lw=2.2, label=v) for v in present]
    handles += [Line2D([], [], color="0.25", marker="|", markersize=12, ls="", label="smallest effect of interest"),
                Line2D([], [], color="0.15", marker="D", mfc="white", ls="", label="the paper's number")]
    legend_rows = 0.75 / height
    fig.legend(handles=handles, loc="lower center", ncol=3, bbox_to_anchor=(0.5, 0.0))
    fig.tight_layout(rect=(0, legend_rows, 1, 1))
    return fig
