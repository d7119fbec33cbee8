"""Tables computed from stored results (never typed by hand).

Claims and their verdicts live in :mod:`vmoe_lib.stats`; this module turns runs into the tables
the chapters show and reads per-image outcomes back from the records.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .results import RunResult

__all__ = ["correct_of", "bypass_correct_of", "routing_of", "load_cv", "runs_table", "summary_table", "final_metric",
           "mean_sd_text", "format_mean_sd"]


def mean_sd_text(values: Sequence[float], unit: float = 100.0, digits: int = 2) -> str:
    """``"mean ± sd"`` of ``values`` times ``unit`` (sample sd; the mean alone for one value), joined by
    non-breaking spaces so a table cell never wraps it over several lines."""
    v = np.asarray(values, dtype=float) * unit
    return format_mean_sd(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), digits)


def format_mean_sd(mean: float, sd: float, digits: int = 2) -> str:
    """``"mean ± sd"`` with non-breaking spaces (the mean alone when ``sd`` is not finite)."""
    if np.isfinite(sd):
        return f"{mean:.{digits}f}\u00a0±\u00a0{sd:.{digits}f}"
    return f"{mean:.{digits}f}"


def correct_of(result: RunResult) -> np.ndarray:
    """Which test images the run's final model classified correctly (from its stored predictions)."""
    from .predictions import unpack_predictions

    stored = result.record.get("predictions")
    if not stored:
        raise ValueError(f"run {result.name} seed {result.seed} stores no per-image predictions (a record made "
                         f"before they were stored); regenerate it: {result.manifest.get('regenerate', '')}")
    return unpack_predictions(stored).correct


def bypass_correct_of(result: RunResult) -> np.ndarray:
    """Which test images the run's final model got right with every MoE layer bypassed (its positive control)."""
    from .predictions import unpack_bits

    stored = result.record.get("moe_bypass")
    if not stored:
        raise ValueError(f"run {result.name} seed {result.seed} stores no MoE-bypass evaluation")
    return unpack_bits(stored["correct"])


def routing_of(result: RunResult) -> dict[str, dict[str, Any]]:
    """The per-layer routing statistics a probe stored in the run's record (``{}`` for a dense run or no probe)."""
    return (result.record.get("extra") or {}).get("routing", {})


def load_cv(load: Sequence[float]) -> float:
    """Coefficient of variation of the experts' loads (population sd / mean; 0 = perfectly balanced)."""
    x = np.asarray(load, dtype=float)
    return float(x.std() / x.mean()) if x.mean() > 0 else float("nan")


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
