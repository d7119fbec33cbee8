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
           "mean_sd_text", "format_mean_sd", "class_expert_information", "specialisation_of",
           "superclasses_from_confusion"]


def mean_sd_text(values: Sequence[float], unit: float = 100.0, digits: int = 2, signed: bool = False) -> str:
    """``"mean ± sd"`` of ``values`` times ``unit`` (sample sd; the mean alone for one value), joined by
    non-breaking spaces so a table cell never wraps it over several lines; ``signed``: the mean with its sign (a
    difference, ``+0.42 ± 0.30``)."""
    v = np.asarray(values, dtype=float) * unit
    return format_mean_sd(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan"), digits, signed)


def format_mean_sd(mean: float, sd: float, digits: int = 2, signed: bool = False) -> str:
    """``"mean ± sd"`` with non-breaking spaces (the mean alone when ``sd`` is not finite); ``signed``: ``+`` before
    a positive mean."""
    m = f"{mean:+.{digits}f}" if signed else f"{mean:.{digits}f}"
    if np.isfinite(sd):
        return f"{m}\u00a0±\u00a0{sd:.{digits}f}"
    return m


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


def class_expert_information(class_expert: Sequence[Sequence[float]],
                             class_weights: Sequence[float] | None = None) -> float:
    """How much the expert a token is sent to tells about its image's class: ``I(class; expert) / H(class)``.

    ``class_expert`` is a probe's table (row ``c``: the share of class ``c``'s token-expert assignments that went to
    each expert; :class:`~vmoe_lib.layers.stats.RoutingRecorder`), ``class_weights`` each class's share of the tokens
    (default: equal, as in the class-balanced test sets of Fashion-MNIST and CIFAR). 0: every class is routed alike;
    1: the expert identifies the class (possible only with at least as many experts as classes). The denominator
    ``H(class)`` is fixed by the data, so values compare across expert counts and training sets.
    """
    from .errors import ConfigError

    rows = np.asarray(class_expert, dtype=float)
    if rows.ndim != 2 or rows.shape[0] < 2 or not np.isfinite(rows).all() or (rows < 0).any():
        raise ConfigError(f"class_expert of shape {rows.shape} is invalid; it must be a (classes >= 2, experts) table "
                          f"of finite, non-negative shares")
    rows = rows / np.clip(rows.sum(1, keepdims=True), 1e-300, None)
    w = np.full(rows.shape[0], 1.0 / rows.shape[0]) if class_weights is None else np.asarray(class_weights, float)
    if w.shape != (rows.shape[0],) or not np.isfinite(w).all() or (w < 0).any() or not np.isclose(w.sum(), 1.0):
        raise ConfigError(f"class_weights={np.asarray(class_weights).tolist()} is invalid; it must be "
                          f"{rows.shape[0]} non-negative shares (one per class) summing to 1")
    joint = w[:, None] * rows
    expert = joint.sum(0)
    nz = joint > 0
    info = float((joint[nz] * np.log(joint[nz] / (w[:, None] * expert[None, :])[nz])).sum())
    h_class = float(-(w[w > 0] * np.log(w[w > 0])).sum())
    return max(0.0, info) / h_class if h_class > 0 else 0.0  # one class: nothing to tell apart


def specialisation_of(result: RunResult) -> float | None:
    """A run's expert specialisation: :func:`class_expert_information` of each MoE layer's class x expert table on the
    test images (stored by a routing probe), averaged over the layers; ``None`` without such tables."""
    tables = [st["class_expert"] for st in routing_of(result).values() if st.get("class_expert")]
    if not tables:
        return None
    return float(np.mean([class_expert_information(t) for t in tables]))


def superclasses_from_confusion(confusion: Sequence[Sequence[float]], groups: int) -> list[int]:
    """Group classes that a model confuses with each other: Mobile V-MoE's super-classes (Sec. 3), one per expert.

    ``confusion[i][j]`` counts images of class ``i`` predicted as ``j`` (a trained dense model on held-out images).
    Rows are turned into rates, the rates symmetrised (how often ``i`` and ``j`` are mistaken for each other, either
    way), and the classes clustered by average-linkage agglomeration on ``1 - affinity / max affinity`` into
    ``groups`` clusters. Deterministic. Returns each class's super-class, numbered by the smallest class index in
    each group (class 0 is in super-class 0).
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform

    from .errors import ConfigError

    c = np.asarray(confusion, dtype=float)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 2 or not np.isfinite(c).all() or (c < 0).any():
        raise ConfigError(f"confusion of shape {c.shape} is invalid; it must be a square matrix of counts >= 0 over "
                          "at least 2 classes")
    n = c.shape[0]
    if not isinstance(groups, int) or isinstance(groups, bool) or not 1 <= groups <= n:
        raise ConfigError(f"groups={groups!r} is invalid; it must be an int from 1 to the {n} classes")
    rows = c.sum(axis=1, keepdims=True)
    if (rows == 0).any():
        raise ConfigError(f"confusion has no images for class(es) {np.flatnonzero(rows[:, 0] == 0).tolist()}; every "
                          "class needs held-out images")
    rate = c / rows
    affinity = (rate + rate.T) / 2
    np.fill_diagonal(affinity, 0.0)
    top = affinity.max()
    distance = 1.0 - (affinity / top if top > 0 else affinity)
    np.fill_diagonal(distance, 0.0)
    labels = fcluster(linkage(squareform(distance, checks=False), method="average"), t=groups, criterion="maxclust")
    if len(set(labels.tolist())) != groups:  # tied merge heights can leave fewer clusters than asked for
        raise ConfigError(f"the confusion cannot be cut into exactly groups={groups} super-classes (tied confusion "
                          f"rates give {len(set(labels.tolist()))}); choose another number of groups")
    order = {label: rank for rank, label in enumerate(dict.fromkeys(labels.tolist()))}
    return [order[label] for label in labels.tolist()]


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
