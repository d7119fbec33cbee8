"""All figures of the book, in one style.

Each function takes stored results and returns a matplotlib ``Figure``; the
chapter shows it inline and :func:`save` writes it under
``_build/figures/<preset>/<chapter>/`` (git-ignored), so a smoke run never
overwrites a figure of record.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .results import RunResult, _repo_root

__all__ = ["style", "save", "accuracy_vs_epochs", "accuracy_vs_cost", "per_seed_points", "PALETTE"]

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf", "#bcbd22")


def style() -> None:
    """The book's plotting style (applied by every function here)."""
    plt.rcParams.update(
        {
            "figure.dpi": 110,
            "savefig.dpi": 150,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "font.size": 10,
            "legend.frameon": False,
        }
    )


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
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=9)


def save(fig: Figure, name: str, *, chapter: str, preset: str, root: str | Path | None = None) -> Path:
    """Save ``fig`` as ``<root>/<preset>/<chapter>/<name>.png`` (root: ``_build/figures`` of the checkout)."""
    if root is None:
        base = _repo_root() or Path.cwd()
        root = base / "_build" / "figures"
    path = Path(root) / preset / chapter / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def accuracy_vs_epochs(results: Sequence[RunResult], metric: str = "val_accuracy", *, title: str | None = None) -> Figure:
    """Mean over seeds (line) and min-max band of ``metric`` per epoch, one line per run name."""
    style()
    groups = _groups(results)
    fig, ax = plt.subplots(figsize=(6.4, 4 + 0.25 * max(0, len(groups) - 4)))
    for i, (name, runs) in enumerate(groups.items()):
        curves = np.array([[h[metric] for h in r.history] for r in runs]) * 100
        epochs = np.arange(1, curves.shape[1] + 1)
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
    fig, ax = plt.subplots(figsize=(6.4, 4 + 0.25 * max(0, len(groups) - 4)))
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
    ax.set_xlabel("MFLOPs per image" if cost == "flops_per_image" else cost.replace("_", " "))
    ax.set_ylabel(f"final {metric.replace('_', ' ')} (%)")
    ax.set_title(title or f"{metric.replace('_', ' ')} vs {cost.replace('_', ' ')} (points: seeds; bars: ±1 std)")
    _legend(ax, len(groups))
    fig.tight_layout()
    return fig


def per_seed_points(results: Sequence[RunResult], metric: str = "test_accuracy", *, title: str | None = None) -> Figure:
    """One column per run name: every seed's final ``metric`` and the mean ± std."""
    style()
    groups = _groups(results)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(groups) + 2), 4))
    for i, (name, runs) in enumerate(groups.items()):
        ys = np.array([r.final[metric] for r in runs]) * 100
        jitter = np.linspace(-0.08, 0.08, len(ys)) if len(ys) > 1 else np.zeros(1)
        ax.scatter(i + jitter, ys, color=_color(i), alpha=0.6, s=22)
        ax.errorbar(i + 0.22, ys.mean(), yerr=ys.std(ddof=1) if len(ys) > 1 else None, fmt="D", color=_color(i), capsize=4)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right")
    ax.set_ylabel(f"final {metric.replace('_', ' ')} (%)")
    ax.set_title(title or f"{metric.replace('_', ' ')} per run (points: seeds; diamond: mean ± std)")
    fig.tight_layout()
    return fig
