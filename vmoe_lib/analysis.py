"""Tables and verdicts computed from stored results (never typed by hand).

A verdict compares two groups of per-seed measurements with Welch's t-test
(unequal variances, few seeds) — or, when both measurements come from the same
trained model (e.g. one model evaluated two ways), with a paired t-test over
seeds (:func:`compare_paired`) — and says:

* ``reproduced`` — the claimed direction holds with one-sided p < ``alpha``;
* ``not reproduced`` — the 95% interval of the difference lies entirely below
  the claimed effect (the opposite holds, or the effect is surely smaller
  than the smallest effect the claim implies);
* ``inconclusive`` — neither: more seeds or a larger budget are needed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from .results import RunResult

__all__ = ["correct_of", "Comparison", "Verdict", "compare", "compare_paired", "decide", "describe_comparison", "runs_table", "summary_table", "final_metric", "write_verdicts", "verdict_table"]

VERDICTS = ("reproduced", "not reproduced", "inconclusive")


@dataclass
class Comparison:
    """Difference of means ``a - b`` with its Welch 95% interval and one-sided p-value (H1: a - b > min_effect)."""

    mean_a: float
    mean_b: float
    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_a: int
    n_b: int
    min_effect: float = 0.0


def compare(a: Sequence[float], b: Sequence[float], *, min_effect: float = 0.0, confidence: float = 0.95) -> Comparison:
    """Welch comparison of two samples of per-seed values (claim: ``a`` exceeds ``b`` by more than ``min_effect``)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("compare() needs at least one value in each group")
    diff = float(a.mean() - b.mean())
    va = a.var(ddof=1) / a.size if a.size > 1 else 0.0
    vb = b.var(ddof=1) / b.size if b.size > 1 else 0.0
    se = math.sqrt(va + vb)
    if a.size < 2 or b.size < 2 or se == 0.0:
        # One seed per side (or identical values): no spread to test against.
        p = 0.0 if se == 0.0 and a.size > 1 and b.size > 1 and diff > min_effect else float("nan")
        lo = hi = diff if se == 0.0 and a.size > 1 and b.size > 1 else float("nan")
        return Comparison(float(a.mean()), float(b.mean()), diff, lo, hi, p, a.size, b.size, min_effect)
    dof = (va + vb) ** 2 / ((va**2 / (a.size - 1) if a.size > 1 else 0) + (vb**2 / (b.size - 1) if b.size > 1 else 0))
    t = (diff - min_effect) / se
    p = float(stats.t.sf(t, dof))
    half = float(stats.t.ppf(0.5 + confidence / 2, dof) * se)
    return Comparison(float(a.mean()), float(b.mean()), diff, diff - half, diff + half, p, a.size, b.size, min_effect)


def compare_paired(
    a: Sequence[float], b: Sequence[float], *, min_effect: float = 0.0, confidence: float = 0.95
) -> Comparison:
    """Paired comparison: ``a[i]`` and ``b[i]`` are two measurements of the same seed's model.

    One-sample t-test on the per-seed differences ``a[i] - b[i]`` (claim: their mean exceeds
    ``min_effect``), with its two-sided ``confidence`` interval. Same :class:`Comparison` fields
    as :func:`compare`, so :func:`decide` applies unchanged.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"compare_paired() needs two equally long, non-empty samples; got {a.size} and {b.size}")
    d = a - b
    diff = float(d.mean())
    n = d.size
    se = float(d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    if n < 2 or se == 0.0:
        p = 0.0 if n > 1 and diff > min_effect else float("nan")
        lo = hi = diff if n > 1 else float("nan")
        return Comparison(float(a.mean()), float(b.mean()), diff, lo, hi, p, n, n, min_effect)
    p = float(stats.t.sf((diff - min_effect) / se, n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * se)
    return Comparison(float(a.mean()), float(b.mean()), diff, diff - half, diff + half, p, n, n, min_effect)


def decide(comparison: Comparison, *, min_effect: float | None = None, alpha: float = 0.05) -> str:
    """Map a :class:`Comparison` to ``reproduced`` / ``not reproduced`` / ``inconclusive`` (see module doc).

    ``min_effect`` defaults to the one the comparison's p-value was computed against.
    """
    if min_effect is None:
        min_effect = comparison.min_effect
    if not math.isnan(comparison.p_value) and comparison.p_value < alpha and comparison.diff > min_effect:
        return "reproduced"
    if not math.isnan(comparison.ci_high) and comparison.ci_high < min_effect + 1e-12:
        return "not reproduced"
    return "inconclusive"


def describe_comparison(comparison: Comparison, unit: float = 100.0, what: str = "%") -> str:
    """``"a vs b %: +d points, 95% CI [lo, hi], one-sided p = ..."`` (accuracies as percentages by default)."""
    c = comparison
    ci = f", 95% CI [{c.ci_low * unit:+.2f}, {c.ci_high * unit:+.2f}]" if np.isfinite(c.ci_low) else ""
    p = f", one-sided p = {c.p_value:.3g}" if np.isfinite(c.p_value) else ""
    return f"{c.mean_a * unit:.2f} vs {c.mean_b * unit:.2f} {what}: {c.diff * unit:+.2f} points{ci}{p}"


@dataclass
class Verdict:
    """One row of a chapter's verdict table (also written to ``verdicts.json``)."""

    claim_id: str
    claim: str
    source: str
    paper_evidence: str
    measurement: str
    verdict: str
    why: str
    values: dict[str, list[float]] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)


def correct_of(result: RunResult) -> np.ndarray:
    """Which test images the run's final model classified correctly (from its stored predictions)."""
    from .predictions import unpack_predictions

    stored = result.record.get("predictions")
    if not stored:
        raise ValueError(f"run {result.name} seed {result.seed} stores no per-image predictions (a record made "
                         f"before they were stored); regenerate it: {result.manifest.get('regenerate', '')}")
    return unpack_predictions(stored).correct


def final_metric(result: RunResult, metric: str = "test_accuracy") -> float:
    """A run's metric after its last epoch."""
    return float(result.final[metric])


def runs_table(results: Iterable[RunResult]) -> pd.DataFrame:
    """One row per run: name, seed, final metrics, costs, wall time."""
    rows = []
    for r in results:
        row = {"run": r.name, "seed": r.seed, "model": r.config.model}
        row.update({k: v for k, v in r.final.items()})
        row.update(r.record["costs"])
        row["wall_time_s"] = r.record["wall_time_s"]
        # Median over epochs: robust to an epoch slowed by another job on the same machine.
        row["images_per_s"] = float(np.median([h["train_images_per_second"] for h in r.history]))
        row["images_per_s_best"] = float(np.max([h["train_images_per_second"] for h in r.history]))
        rows.append(row)
    return pd.DataFrame(rows)


def summary_table(results: Iterable[RunResult], metrics: Sequence[str] = ("test_accuracy", "val_accuracy")) -> pd.DataFrame:
    """Per run name: mean and standard deviation over seeds (sample std, ddof=1) of ``metrics``, plus costs."""
    df = runs_table(results)
    agg: dict[str, Any] = {"seed": "count"}
    for m in metrics:
        agg[m] = ["mean", "std"]
    for c in ("params_total", "params_activated", "flops_per_image", "images_per_s", "images_per_s_best", "wall_time_s"):
        agg[c] = "mean"
    out = df.groupby("run", sort=False).agg(agg)
    out.columns = ["seeds" if c == ("seed", "count") else (f"{c[0]}_{c[1]}" if c[1] in ("mean", "std") and c[0] in metrics else c[0]) for c in out.columns]
    return out


def verdict_table(verdicts: Sequence[Verdict]) -> pd.DataFrame:
    """The table a chapter ends with."""
    return pd.DataFrame(
        [
            {
                "claim": v.claim,
                "paper's evidence": v.paper_evidence,
                "our measurement": v.measurement,
                "verdict": v.verdict,
                "why": v.why,
            }
            for v in verdicts
        ],
        index=[v.claim_id for v in verdicts],
    )


def write_verdicts(verdicts: Sequence[Verdict], path: str | Path) -> Path:
    """Write verdicts (claim id, values per seed, statistics, verdict) as JSON next to the results."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([asdict(v) for v in verdicts], indent=1) + "\n")
    return path
