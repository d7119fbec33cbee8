"""Pre-registered claims and the one rule that decides them.

Every chapter declares its claims as :class:`Claim` data in its module, before any result is
read: what is compared (the contrast), in which direction, the smallest effect that matters
(``min_effect``, in accuracy points, with its reason), whether the arms are paired, the family it
is corrected within and the positive control it depends on. The chapter then computes one
:class:`TestResult` per claim with the test the claim names, and :func:`decide_family` applies
Holm's correction within the family and this rule (stated once, in the book's introduction):

* **not testable** — the claim's positive control failed: the mechanism it compares does not carry the
  weight the claim's pre-registered bar asks for here, so its presence or absence of effect says nothing;
* **not reproduced** — the one-sided 95 % upper bound of the effect in the paper's direction is
  below ``min_effect``: any effect in the paper's direction is smaller than the smallest that
  matters (this includes a significant but negligible effect);
* **reproduced** — the Holm-adjusted one-sided p-value (H0: no effect; H1: an effect in the paper's
  direction) is below 0.05;
* **inconclusive** — neither: the design cannot tell.

Equivalence claims ("A is as good as B") are decided by two one-sided tests (TOST) against the
margin ``min_effect``: reproduced when the Holm-adjusted TOST p < 0.05, not reproduced when the
one-sided 95 % bound shows ``|effect| > min_effect``, inconclusive otherwise.

Non-inferiority claims ("A is never meaningfully worse than B") are decided by one one-sided test
against the margin ``min_effect`` (H0: A is worse than B by ``min_effect`` or more): reproduced when
its Holm-adjusted p < 0.05, not reproduced when the one-sided 95 % upper bound of ``A - B`` is below
``-min_effect`` (A is worse by more than the margin), inconclusive otherwise.

A **positive control** (``kind="control"``) is a check a claim depends on, not a finding: the same rule reads it,
and it **passed** where a claim would be reproduced (its effect is above zero and not shown to be below its bar),
**failed** otherwise.

Effects are in accuracy points (percent) in the paper's direction: a positive effect agrees with
the paper. The interval shown is the two-sided 90 % one, whose ends are the two one-sided 95 %
bounds the rule reads. Tests (each with a hand-worked example in ``tests/test_stats.py``):

* :func:`paired_t` — per-seed differences of arms that share seeds (same data order and initial RNG);
* :func:`welch_t` — unpaired arms;
* :func:`mcnemar` — one model (per seed) evaluated two ways, per test image (exact binomial on the
  discordant images, pooled over seeds);
* :func:`paired_bootstrap` — the same contrast by resampling test images;
* :func:`bootstrap_contrast` — any per-image contrast (NLL, calibration error) by resampling test images, also against
  a non-inferiority margin;
* :func:`slope` — a trend: least-squares slope with its bound;
* :func:`interaction` — the difference of two paired differences, per seed;
* :func:`tost` — equivalence within a margin;
* :func:`noninferiority` — not worse than the other arm by the margin or more.

:func:`mde` gives the minimal detectable effect of a design at 80 % power, and
:func:`seeds_for_mde` the seeds needed for a target one.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as _st

from .errors import ConfigError, check_choice

__all__ = [
    "ALPHA", "POWER", "VERDICTS", "CONTROL_VERDICTS", "KINDS", "TESTS", "Claim", "TestResult", "VerdictRecord",
    "paired_t", "welch_t", "mcnemar", "paired_bootstrap", "bootstrap_contrast", "slope", "interaction", "tost", "noninferiority",
    "holm", "mde", "seeds_for_mde", "decide", "decide_family", "verdict_frame", "write_verdict_records",
    "power_table",
]

ALPHA = 0.05
POWER = 0.80
VERDICTS = ("reproduced", "not reproduced", "inconclusive", "not testable")
CONTROL_VERDICTS = ("passed", "failed")
KINDS = ("claim", "control")
TESTS = ("paired_t", "welch_t", "mcnemar", "paired_bootstrap", "slope", "interaction", "tost", "noninferiority")
DIRECTIONS = ("greater", "less")
POINTS = 100.0  # accuracies are stored as fractions; effects are reported in points


# ----------------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Claim:
    """A claim of a paper, declared in a chapter module before its results are read.

    Args:
        id: short identifier, unique in the chapter (``"bpr_vs_vanilla_k1"``).
        claim: the claim in one sentence, as the book prints it.
        source: the paper and where in it (``"V-MoE, arXiv:2106.05974, Sec. 4, Fig. 5"``).
        contrast: what is compared, e.g. ``"softmax_ec vs softmax_tc"``.
        test: one of :data:`TESTS`.
        min_effect: the smallest effect of interest, in points (> 0); for ``tost`` the equivalence margin, for
            ``noninferiority`` the largest shortfall of A that does not matter.
        min_effect_why: where ``min_effect`` comes from (the paper's effect size, a figure...).
        family: the claims Holm's correction runs within (usually the chapter).
        paired: whether the arms are paired (by seed or per image).
        metric: the measured quantity (default: test accuracy).
        direction: ``"greater"`` (A above B, or a rising trend) or ``"less"``.
        control: id of the positive-control claim this claim depends on (``None``: none).
        measure: how the chapter computes this claim's test from its runs, ``measure(claim, results)`` (e.g.
            :class:`vmoe_lib.chapters.base.SeedPaired`); not part of the verdict record.
        kind: ``"claim"`` (a paper's finding) or ``"control"`` (a positive control: a check other claims depend on,
            decided ``passed`` / ``failed``).
        paper: the paper's own number for a claim (:class:`vmoe_lib.papers.PaperNumber`); ``None`` for a control.
        same_as: ``"<chapter>:<claim id>"`` of a claim of an earlier chapter that tests the same contrast on the same
            runs; the book's scoreboard shows the two as one row.
    """

    id: str
    claim: str
    source: str
    contrast: str
    test: str
    min_effect: float
    min_effect_why: str
    family: str
    paired: bool
    metric: str = "test_accuracy"
    direction: str = "greater"
    control: str | None = None
    measure: Any = None
    kind: str = "claim"
    paper: Any = None
    same_as: str | None = None

    def __post_init__(self) -> None:
        if not self.id or not isinstance(self.id, str):
            raise ConfigError(f"Claim id={self.id!r} is invalid; it must be a non-empty string")
        check_choice("test", self.test, TESTS)
        check_choice("direction", self.direction, DIRECTIONS)
        if not isinstance(self.min_effect, (int, float)) or isinstance(self.min_effect, bool) or not self.min_effect > 0:
            raise ConfigError(f"min_effect={self.min_effect!r} of claim {self.id!r} is invalid; it must be a number > 0 "
                              f"(points), the smallest effect of interest")
        if not self.min_effect_why:
            raise ConfigError(f"min_effect_why of claim {self.id!r} is empty; say where min_effect comes from")
        if self.test in ("paired_t", "mcnemar", "paired_bootstrap", "interaction") and not self.paired:
            raise ConfigError(f"claim {self.id!r}: test={self.test!r} needs paired=True")
        if self.test == "welch_t" and self.paired:
            raise ConfigError(f"claim {self.id!r}: test='welch_t' is for unpaired arms; use 'paired_t' for paired ones")
        check_choice("kind", self.kind, KINDS)
        if self.kind == "control" and (self.paper is not None or self.control is not None):
            raise ConfigError(f"claim {self.id!r} is a positive control: it has no paper number and no control of its own")
        if self.paper is not None and not hasattr(self.paper, "to_dict"):
            raise ConfigError(f"paper={self.paper!r} of claim {self.id!r} is invalid; use vmoe_lib.papers.PaperNumber")
        if self.test in ("tost", "noninferiority") and self.direction != "greater":
            raise ConfigError(f"claim {self.id!r}: test={self.test!r} has no direction (the effect is A - B against the "
                              f"margin); leave direction='greater' and order the contrast as A vs B")


@dataclass(frozen=True)
class TestResult:
    """The outcome of one test, in points, oriented so that a positive effect agrees with the claim.

    ``p_value``: one-sided (H1: effect > 0), or the TOST p for ``tost``. ``lower``/``upper``: the
    one-sided 95 % bounds (together the two-sided 90 % interval). ``mde``: the smallest true effect
    this design detects with 80 % power at one-sided alpha 0.05 (same spread, same n).
    """

    test: str
    n: int | tuple[int, int]
    effect: float
    lower: float
    upper: float
    p_value: float
    mde: float
    values: Mapping[str, Any] = field(default_factory=dict)
    detail: Mapping[str, Any] = field(default_factory=dict)


def _orient(x: np.ndarray, direction: str) -> np.ndarray:
    return x if direction == "greater" else -x


def _as_array(name: str, values: Sequence[float], *, min_size: int = 1) -> np.ndarray:
    a = np.asarray(values, dtype=float)
    if a.ndim != 1 or a.size < min_size or not np.all(np.isfinite(a)):
        raise ConfigError(f"{name} must be a 1-d sequence of at least {min_size} finite number(s); got {values!r}")
    return a


def _t_bounds(effect: float, se: float, dof: float) -> tuple[float, float, float]:
    """(p one-sided for effect > 0, lower, upper one-sided 95 % bounds) of a t statistic."""
    if se == 0.0:
        p = 0.0 if effect > 0 else 1.0
        return p, effect, effect
    q = float(_st.t.ppf(1 - ALPHA, dof))
    return float(_st.t.sf(effect / se, dof)), effect - q * se, effect + q * se


def _t_mde(se: float, dof: float) -> float:
    return float((_st.t.ppf(1 - ALPHA, dof) + _st.t.ppf(POWER, dof)) * se)


# ----------------------------------------------------------------------------------- tests
def paired_t(a: Sequence[float], b: Sequence[float], *, direction: str = "greater", scale: float = POINTS) -> TestResult:
    """Paired t-test over seeds of ``a[i] - b[i]`` (arms that share seed ``i``). Values are fractions
    (``scale`` turns them into points)."""
    a, b = _as_array("a", a, min_size=2), _as_array("b", b, min_size=2)
    if a.size != b.size:
        raise ConfigError(f"paired_t needs one value per seed in each arm; got {a.size} and {b.size}")
    d = _orient((a - b) * scale, direction)
    n = d.size
    se = float(d.std(ddof=1) / math.sqrt(n))
    p, lo, hi = _t_bounds(float(d.mean()), se, n - 1)
    return TestResult("paired_t", n, float(d.mean()), lo, hi, p, _t_mde(se, n - 1),
                      values={"a": a.tolist(), "b": b.tolist()}, detail={"sd_diff": float(d.std(ddof=1)), "dof": n - 1})


def welch_t(a: Sequence[float], b: Sequence[float], *, direction: str = "greater", scale: float = POINTS) -> TestResult:
    """Welch's unequal-variance t-test of mean(a) - mean(b) over independent seeds."""
    a, b = _as_array("a", a, min_size=2), _as_array("b", b, min_size=2)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = float(math.sqrt(va + vb)) * scale
    dof = float((va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))) if va + vb > 0 else float(a.size + b.size - 2)
    effect = float(_orient(np.array([a.mean() - b.mean()]) * scale, direction)[0])
    p, lo, hi = _t_bounds(effect, se, dof)
    return TestResult("welch_t", (a.size, b.size), effect, lo, hi, p, _t_mde(se, dof),
                      values={"a": a.tolist(), "b": b.tolist()},
                      detail={"sd_a": float(a.std(ddof=1) * scale), "sd_b": float(b.std(ddof=1) * scale), "dof": dof})


def _bool_matrix(name: str, x: Any) -> np.ndarray:
    m = np.asarray(x)
    if m.ndim == 1:
        m = m[None, :]
    if m.ndim != 2 or m.size == 0 or m.dtype != bool:
        raise ConfigError(f"{name} must be a boolean array (images,) or (seeds, images) of per-image correctness")
    return m


def mcnemar(correct_a: Any, correct_b: Any, *, direction: str = "greater") -> TestResult:
    """Exact McNemar test: the same models' per-image correctness under two evaluations A and B.

    ``correct_*``: booleans of shape ``(images,)`` or ``(seeds, images)``. Discordant images are
    pooled over seeds: ``n_ab`` (A right, B wrong) and ``n_ba``; under H0 each discordant image is
    a fair coin, so ``p = P(X >= n_ab)`` for ``X ~ Binomial(n_ab + n_ba, 1/2)`` (direction greater).
    The effect is the accuracy difference in points; its bounds use the paired-proportion standard
    error ``sqrt(n_ab + n_ba - (n_ab - n_ba)^2 / N) / N`` (``N``: images x seeds).
    """
    a, b = _bool_matrix("correct_a", correct_a), _bool_matrix("correct_b", correct_b)
    if a.shape != b.shape:
        raise ConfigError(f"mcnemar needs the same images under both evaluations; got shapes {a.shape} and {b.shape}")
    n_ab, n_ba = int((a & ~b).sum()), int((~a & b).sum())
    if direction == "less":
        n_ab, n_ba = n_ba, n_ab
    N = a.size
    discordant = n_ab + n_ba
    effect = POINTS * (n_ab - n_ba) / N
    p = float(_st.binom.sf(n_ab - 1, discordant, 0.5)) if discordant else 1.0
    se = POINTS * math.sqrt(max(discordant - (n_ab - n_ba) ** 2 / N, 0.0)) / N
    z = float(_st.norm.ppf(1 - ALPHA))
    mde = float((z + _st.norm.ppf(POWER)) * POINTS * math.sqrt(discordant) / N) if discordant else 0.0
    per_seed = (a.mean(axis=1) * POINTS).tolist(), (b.mean(axis=1) * POINTS).tolist()
    return TestResult("mcnemar", N, effect, effect - z * se, effect + z * se, p, mde,
                      values={"a": per_seed[0], "b": per_seed[1]},
                      detail={"n_ab": n_ab, "n_ba": n_ba, "images": a.shape[1], "seeds": a.shape[0]})


def paired_bootstrap(correct_a: Any, correct_b: Any, *, direction: str = "greater", resamples: int = 10000,
                     seed: int = 0) -> TestResult:
    """Paired bootstrap over test images (the same images resampled for A and B, jointly over seeds).

    p is the share of resampled effects <= 0 (with the +1 correction); the bounds are the 5th and
    95th percentiles. Deterministic for a given ``seed``.
    """
    a, b = _bool_matrix("correct_a", correct_a), _bool_matrix("correct_b", correct_b)
    if a.shape != b.shape:
        raise ConfigError(f"paired_bootstrap needs the same images under both evaluations; got {a.shape} and {b.shape}")
    if not isinstance(resamples, int) or resamples < 100:
        raise ConfigError(f"resamples={resamples!r} is invalid; it must be an int >= 100")
    d = _orient((a.astype(float) - b.astype(float)).mean(axis=0) * POINTS, direction)  # per image, mean over seeds
    rng = np.random.default_rng(seed)
    n = d.size
    boots = np.empty(resamples)
    for start in range(0, resamples, 500):
        stop = min(resamples, start + 500)
        boots[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    effect = float(d.mean())
    p = float((np.sum(boots <= 0) + 1) / (resamples + 1))
    lo, hi = (float(v) for v in np.quantile(boots, [ALPHA, 1 - ALPHA]))
    se = float(boots.std(ddof=1))
    mde = float((_st.norm.ppf(1 - ALPHA) + _st.norm.ppf(POWER)) * se)
    return TestResult("paired_bootstrap", int(a.size), effect, lo, hi, p, mde,
                      values={"a": (a.mean(axis=1) * POINTS).tolist(), "b": (b.mean(axis=1) * POINTS).tolist()},
                      detail={"resamples": resamples, "seed": seed, "se": se})


def bootstrap_contrast(statistic: Callable[[np.ndarray], np.ndarray], images: int, *, direction: str = "greater",
                       margin: float | None = None, resamples: int = 2000, seed: int = 0, chunk: int = 200,
                       values: Mapping[str, Any] | None = None) -> TestResult:
    """Paired bootstrap over test images of any contrast computed from per-image data (NLL, calibration error...).

    ``statistic(index)`` gets ``(R, images)`` rows of image indices (resampled with replacement) and returns the ``R``
    effects A - B (in the claim's units) on those image sets; ``statistic(np.arange(images)[None])`` is the observed
    effect. A and B are evaluated on the same resampled images (paired). Effects are oriented by ``direction`` (a
    positive effect agrees with the claim). Without ``margin``: p is the share of resampled effects <= 0 (+1
    correction), the test is ``"paired_bootstrap"``; with ``margin`` (non-inferiority of A): p is the share <=
    ``-margin``, the test ``"noninferiority"``. Bounds: the 5th and 95th percentiles; MDE from the bootstrap's sd.
    Deterministic for a given ``seed``.
    """
    check_choice("direction", direction, DIRECTIONS)
    if not isinstance(images, int) or images < 2:
        raise ConfigError(f"images={images!r} is invalid; the bootstrap needs at least 2 test images")
    if not isinstance(resamples, int) or resamples < 100:
        raise ConfigError(f"resamples={resamples!r} is invalid; it must be an int >= 100")
    sign = 1.0 if direction == "greater" else -1.0
    observed = sign * float(np.asarray(statistic(np.arange(images)[None]), dtype=float).reshape(-1)[0])
    rng = np.random.default_rng(seed)
    boots = np.empty(resamples)
    for start in range(0, resamples, chunk):
        stop = min(resamples, start + chunk)
        boots[start:stop] = sign * np.asarray(statistic(rng.integers(0, images, size=(stop - start, images))), dtype=float)
    threshold = 0.0 if margin is None else -float(margin)
    p = float((np.sum(boots <= threshold) + 1) / (resamples + 1))
    lo, hi = (float(v) for v in np.quantile(boots, [ALPHA, 1 - ALPHA]))
    se = float(boots.std(ddof=1))
    mde = float((_st.norm.ppf(1 - ALPHA) + _st.norm.ppf(POWER)) * se)
    return TestResult("paired_bootstrap" if margin is None else "noninferiority", images, observed, lo, hi, p, mde,
                      values=dict(values or {}), detail={"resamples": resamples, "seed": seed, "se": se, "bootstrap": True})


def slope(x: Sequence[float], y: Sequence[float], *, direction: str = "greater", scale: float = POINTS) -> TestResult:
    """Least-squares slope of ``y`` (fractions; ``scale`` makes points) on ``x``, one point per run.

    Effect: the slope in points per unit of ``x``; t-test with ``n - 2`` degrees of freedom.
    """
    x, y = _as_array("x", x, min_size=3), _as_array("y", y, min_size=3)
    if x.size != y.size:
        raise ConfigError(f"slope needs one x per y; got {x.size} and {y.size}")
    if np.ptp(x) == 0:
        raise ConfigError("slope needs at least two distinct x values")
    y = y * scale
    xc = x - x.mean()
    b = float((xc * (y - y.mean())).sum() / (xc**2).sum())
    resid = y - (y.mean() + b * xc)
    dof = x.size - 2
    se = float(math.sqrt((resid**2).sum() / dof / (xc**2).sum())) if dof > 0 else float("nan")
    effect = b if direction == "greater" else -b
    p, lo, hi = _t_bounds(effect, se, dof)
    return TestResult("slope", int(x.size), effect, lo, hi, p, _t_mde(se, dof),
                      values={"x": x.tolist(), "y": (y / scale).tolist()}, detail={"dof": dof})


def interaction(a1: Sequence[float], b1: Sequence[float], a2: Sequence[float], b2: Sequence[float], *,
                direction: str = "greater", scale: float = POINTS) -> TestResult:
    """Difference of paired differences: per seed ``(a1 - b1) - (a2 - b2)``, tested like :func:`paired_t`
    (claim: the A-over-B gain is larger in setting 1 than in setting 2)."""
    arrays = [_as_array(name, v, min_size=2) for name, v in (("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2))]
    if len({v.size for v in arrays}) != 1:
        raise ConfigError(f"interaction needs one value per seed in all four arms; got sizes {[v.size for v in arrays]}")
    d1, d2 = arrays[0] - arrays[1], arrays[2] - arrays[3]
    r = paired_t(d1, d2, direction=direction, scale=scale)
    return replace(r, test="interaction", values={"a1": arrays[0].tolist(), "b1": arrays[1].tolist(),
                                                  "a2": arrays[2].tolist(), "b2": arrays[3].tolist()})


def _against_margin(a: Sequence[float], b: Sequence[float], *, margin: float, paired: bool,
                    scale: float) -> tuple[TestResult, float, float]:
    """The t-test of ``a - b`` (paired or Welch) that a margin test starts from: ``(result, dof, se)``."""
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not margin > 0:
        raise ConfigError(f"margin={margin!r} is invalid; it must be a number > 0 (points)")
    base = paired_t(a, b, scale=scale) if paired else welch_t(a, b, scale=scale)
    dof = base.detail["dof"]
    q = float(_st.t.ppf(1 - ALPHA, dof))
    return base, dof, (base.upper - base.effect) / q if q > 0 else 0.0


def tost(a: Sequence[float], b: Sequence[float], *, margin: float, paired: bool, scale: float = POINTS) -> TestResult:
    """Two one-sided tests of equivalence: is ``|mean(a - b)| < margin`` (points)?

    ``p_value`` is the larger of the two one-sided p-values (H0: effect <= -margin; H0: effect >= margin);
    the effect is ``a - b`` (no direction). ``mde`` here is the half-width of the 90 % interval: the
    margin must exceed it for equivalence to be demonstrable with 80 %-ish power at zero true effect.
    """
    base, dof, se = _against_margin(a, b, margin=margin, paired=paired, scale=scale)
    if se == 0.0:
        p = 0.0 if abs(base.effect) < margin else 1.0
    else:
        p_low = float(_st.t.sf((base.effect + margin) / se, dof))  # H0: effect <= -margin
        p_high = float(_st.t.cdf((base.effect - margin) / se, dof))  # H0: effect >= margin
        p = max(p_low, p_high)
    half = float((_st.t.ppf(1 - ALPHA, dof) + _st.t.ppf(1 - (1 - POWER) / 2, dof)) * se)
    return replace(base, test="tost", p_value=p, mde=half, detail={**base.detail, "margin": margin, "paired": paired})


def noninferiority(a: Sequence[float], b: Sequence[float], *, margin: float, paired: bool,
                   scale: float = POINTS) -> TestResult:
    """Is ``a`` not worse than ``b`` by ``margin`` points or more? One one-sided test of H0: ``mean(a - b) <= -margin``.

    The effect is ``a - b`` (points); ``p_value`` is the one-sided p of that H0 (t-test, paired by seed or
    Welch). ``mde`` here is the smallest margin this design demonstrates with 80 % power when the arms
    are truly equal: the margin must exceed it for non-inferiority to be shown.
    """
    base, dof, se = _against_margin(a, b, margin=margin, paired=paired, scale=scale)
    if se == 0.0:
        p = 0.0 if base.effect > -margin else 1.0
    else:
        p = float(_st.t.sf((base.effect + margin) / se, dof))
    smallest = float((_st.t.ppf(1 - ALPHA, dof) + _st.t.ppf(POWER, dof)) * se)
    return replace(base, test="noninferiority", p_value=p, mde=smallest,
                   detail={**base.detail, "margin": margin, "paired": paired})


# ----------------------------------------------------------------------------------- design
def mde(sd: float, n: int, *, paired: bool, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimal detectable effect (same unit as ``sd``) of a one-sided t-test at ``alpha`` with ``power``.

    ``paired``: ``sd`` is the sd of per-seed differences and the test has ``n - 1`` degrees of
    freedom. Unpaired: ``sd`` is the per-arm seed sd, ``n`` seeds per arm, ``2n - 2`` degrees of freedom.
    """
    if not isinstance(n, int) or n < 2:
        raise ConfigError(f"n={n!r} is invalid; a t-test needs at least 2 seeds per arm")
    if not sd >= 0:
        raise ConfigError(f"sd={sd!r} is invalid; it must be a number >= 0")
    dof = n - 1 if paired else 2 * n - 2
    se = sd / math.sqrt(n) if paired else sd * math.sqrt(2.0 / n)
    return float((_st.t.ppf(1 - alpha, dof) + _st.t.ppf(power, dof)) * se)


def seeds_for_mde(sd: float, target: float, *, paired: bool, max_seeds: int = 200) -> int | None:
    """The fewest seeds per arm whose :func:`mde` is <= ``target`` (``None`` if more than ``max_seeds``)."""
    if not target > 0:
        raise ConfigError(f"target={target!r} is invalid; it must be a number > 0")
    for n in range(2, max_seeds + 1):
        if mde(sd, n, paired=paired) <= target:
            return n
    return None


def power_table(sds: Mapping[str, tuple[float, bool]], seeds: Sequence[int] = (3, 4, 6, 8, 12, 16),
                target: float = 0.5) -> pd.DataFrame:
    """For each design (name -> (sd in points, paired)): its MDE at each seed count, and the seeds
    needed for an MDE of ``target`` points."""
    rows = {}
    for name, (sd, paired) in sds.items():
        row: dict[str, Any] = {"sd (points)": round(sd, 3), "paired": paired}
        for n in seeds:
            row[f"MDE, n={n}"] = round(mde(sd, n, paired=paired), 2)
        need = seeds_for_mde(sd, target, paired=paired)
        row[f"seeds for MDE <= {target:g}"] = need if need is not None else "> 200"
        rows[name] = row
    return pd.DataFrame.from_dict(rows, orient="index")


# ----------------------------------------------------------------------------------- the rule
def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (same order as given; NaN entries are left out and stay NaN)."""
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = [i for i in range(p.size) if np.isfinite(p[i])]
    m = len(idx)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


@dataclass
class VerdictRecord:
    """One row of a chapter's verdict table; the entry ``verdicts.json`` stores (same keys)."""

    claim_id: str
    claim: str
    source: str
    contrast: str
    metric: str
    direction: str
    min_effect: float
    paired: bool
    test: str
    family: str
    n: Any
    effect: float | None
    bound: float | None
    p_value: float | None
    p_holm: float | None
    mde: float | None
    control: str | None
    verdict: str
    why: str
    values: dict[str, Any] = field(default_factory=dict)
    interval: tuple[float, float] | None = None
    min_effect_why: str = ""
    kind: str = "claim"
    paper: dict[str, Any] | None = None
    same_as: str | None = None
    exploratory: str = ""


def _p(p: float | None) -> str:
    """A p-value as the book prints it: 3 significant digits; one below double precision's reach as ``< 1e-300``."""
    if p is None:
        return "—"
    return "< 1e-300" if p < 1e-300 else f"{p:.3g}"


def _interval_text(result: TestResult) -> str:
    return f"{result.effect:+.2f} [{result.lower:+.2f}, {result.upper:+.2f}] points"


def _control_failure(control: Claim | None, result: TestResult | None, control_verdict: str | None) -> str:
    """Why a claim is not testable, in the numbers of its control."""
    if control is None or result is None or control_verdict in (None, "not measured in these runs"):
        return "its positive control was not measured in these runs"
    if result.upper < control.min_effect:
        return (f"its positive control failed: the weight it measures ({control.id}), {_interval_text(result)}, is below "
                f"the {control.min_effect:g}-point bar pre-registered for this claim")
    return (f"its positive control failed: the weight it measures ({control.id}), {_interval_text(result)}, is not shown "
            f"to be above zero")


def decide(claim: Claim, result: TestResult | None, p_holm: float | None, control_verdict: str | None = None,
           control: tuple[Claim, TestResult | None] | None = None) -> tuple[str, str]:
    """``(verdict, why)`` of one claim by the module's rule. ``result`` ``None``: the data to test it are missing.

    ``control_verdict`` is the verdict of the claim's positive control and ``control`` that control's claim and test
    (for the reason of a "not testable" verdict). A positive control itself (``claim.kind == "control"``) is
    ``passed`` where the rule would reproduce a claim, ``failed`` otherwise.
    """
    if claim.kind == "control":
        verdict, why = _decide_rule(claim, result, p_holm)
        if result is None:
            return "failed", why
        bar = f"the {claim.min_effect:g}-point bar"
        # an accuracy control measures what removing a mechanism costs; another metric's control, the gain it brings
        what = "cost" if claim.metric == "test_accuracy" else "effect"
        if verdict == "reproduced":
            return "passed", (f"{what} {_interval_text(result)}: above zero (Holm p {_p(p_holm)}) and not shown to be "
                              f"below {bar} (95% upper bound {result.upper:+.2f})")
        if result.upper < claim.min_effect:
            return "failed", f"{what} {_interval_text(result)}: its 95% upper bound is below {bar}"
        return "failed", f"{what} {_interval_text(result)}: not shown to be above zero (Holm p {_p(p_holm)})"
    if claim.control is not None and control_verdict != "passed":
        return "not testable", _control_failure(*(control or (None, None)), control_verdict)
    return _decide_rule(claim, result, p_holm)


def _decide_rule(claim: Claim, result: TestResult | None, p_holm: float | None) -> tuple[str, str]:
    if result is None:
        return "inconclusive", "the runs this claim needs are missing"
    m = claim.min_effect
    if claim.test == "tost":
        if p_holm is not None and p_holm < ALPHA:
            return "reproduced", f"equivalent within ±{m:g} points (TOST, Holm p {p_holm:.3g} < {ALPHA})"
        if result.lower > m or result.upper < -m:
            return "not reproduced", f"the 90% interval lies outside ±{m:g} points: the arms differ by more than the margin"
        return "inconclusive", f"the 90% interval [{result.lower:+.2f}, {result.upper:+.2f}] is not within ±{m:g} points"
    if claim.test == "noninferiority":
        if p_holm is not None and p_holm < ALPHA:
            return "reproduced", (f"not worse by {m:g} points or more (one-sided test against the margin, Holm p "
                                  f"{p_holm:.3g} < {ALPHA})")
        if result.upper < -m:
            return "not reproduced", (f"the 95% upper bound {result.upper:+.2f} is below -{m:g}: worse by more than the "
                                      f"margin")
        return "inconclusive", (f"the 95% lower bound {result.lower:+.2f} does not exclude a shortfall of {m:g} points "
                                f"and the upper bound {result.upper:+.2f} does not show one; smallest margin this design "
                                f"shows {result.mde:.2f}")
    if result.upper < m:
        if p_holm is not None and p_holm < ALPHA:
            return "not reproduced", (f"an effect in the paper's direction is present (Holm p {p_holm:.3g}) but its 95% "
                                      f"upper bound {result.upper:+.2f} is below the smallest effect of interest {m:g}")
        return "not reproduced", f"the 95% upper bound {result.upper:+.2f} is below the smallest effect of interest {m:g}"
    if p_holm is not None and p_holm < ALPHA:
        return "reproduced", f"Holm-adjusted one-sided p {p_holm:.3g} < {ALPHA}"
    return "inconclusive", (f"Holm p {p_holm:.3g} >= {ALPHA} and the upper bound {result.upper:+.2f} does not exclude "
                            f"{m:g}; MDE of this design {result.mde:.2f} points")


def _exploratory(claim: Claim, verdict: str, result: TestResult | None) -> str:
    """A note apart from the verdict where the rule does not read a measured effect (a claim whose control failed)."""
    if verdict != "not testable" or result is None:
        return ""
    return (f"Exploratory, not a verdict: the contrast measured {_interval_text(result)}; the rule does not read it "
            f"because the control it depends on failed.")


def decide_family(claims: Sequence[Claim], results: Mapping[str, TestResult | None]) -> list[VerdictRecord]:
    """Decide every claim: Holm within each family (over the claims that have a result and a testable
    control), controls first, then the rule. Claims are returned in the order given."""
    ids = [c.id for c in claims]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"claim ids must be unique; repeated: {sorted({i for i in ids if ids.count(i) > 1})}")
    unknown = sorted(set(results) - set(ids))
    if unknown:
        raise ConfigError(f"results for undeclared claim(s) {unknown}; declared: {ids}")
    by_id = {c.id: c for c in claims}
    for c in claims:
        if c.control is not None and c.control not in by_id:
            raise ConfigError(f"claim {c.id!r} names control {c.control!r}, which is not declared; declared: {ids}")
        if c.control == c.id:
            raise ConfigError(f"claim {c.id!r} cannot be its own positive control")
    verdicts: dict[str, str] = {}
    p_holm: dict[str, float | None] = {}

    def settle(level: list[Claim]) -> None:
        # Holm within each family, over the claims of this level that are testable and have a result.
        families: dict[str, list[Claim]] = {}
        for c in level:
            testable = c.control is None or verdicts.get(c.control) == "passed"
            if results.get(c.id) is not None and testable:
                families.setdefault(c.family, []).append(c)
        for fam in families.values():
            adjusted = holm([results[c.id].p_value for c in fam])
            for c, p in zip(fam, adjusted):
                p_holm[c.id] = p
        for c in level:
            verdicts[c.id] = decide(c, results.get(c.id), p_holm.get(c.id), verdicts.get(c.control) if c.control else None)[0]

    for c in claims:
        if c.control is not None and by_id[c.control].kind != "control":
            raise ConfigError(f"claim {c.id!r} names {c.control!r} as its positive control, but that claim is declared "
                              f"kind={by_id[c.control].kind!r}; declare it kind='control'")
    controls = [c for c in claims if any(o.control == c.id for o in claims)]
    settle([c for c in controls if c.control is None])
    settle([c for c in claims if c not in controls or c.control is not None])
    out = []
    for c in claims:
        r = results.get(c.id)
        control_verdict = verdicts.get(c.control) if c.control else None
        if c.control and results.get(c.control) is None:
            control_verdict = "not measured in these runs"
        control = (by_id[c.control], results.get(c.control)) if c.control else None
        verdict, why = decide(c, r, p_holm.get(c.id), control_verdict, control)
        out.append(VerdictRecord(
            claim_id=c.id, claim=c.claim, source=c.source, contrast=c.contrast, metric=c.metric, direction=c.direction,
            min_effect=c.min_effect, paired=c.paired, test=c.test, family=c.family,
            n=(list(r.n) if isinstance(r.n, tuple) else r.n) if r else None,
            effect=r.effect if r else None, bound=(r.upper if c.test != "tost" else max(abs(r.lower), abs(r.upper))) if r else None,
            p_value=r.p_value if r else None, p_holm=p_holm.get(c.id), mde=r.mde if r else None, control=c.control,
            verdict=verdict, why=why, values=dict(r.values) if r else {}, interval=(r.lower, r.upper) if r else None,
            min_effect_why=c.min_effect_why, kind=c.kind, paper=c.paper.to_dict() if c.paper is not None else None,
            same_as=c.same_as, exploratory=_exploratory(c, verdict, r),
        ))
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def verdict_frame(records: Sequence[VerdictRecord]) -> pd.DataFrame:
    """The verdict table a chapter shows: verdict, effect with its 90 % interval, the paper's number, min effect, Holm
    p, MDE, n, test, raw p, the claim and why (verdict and numbers first)."""
    rows = {}
    for v in records:
        ci = f"[{v.interval[0]:+.2f}, {v.interval[1]:+.2f}]" if v.interval else "—"
        rows[v.claim_id] = {  # the verdict and its numbers first: they stay on screen when the table scrolls
            "verdict": v.verdict,
            "effect (points)": _fmt(v.effect, "+.2f"),
            "90% interval": ci,
            "paper": ("—" if v.paper is None else "no number" if v.paper.get("effect") is None
                      else f"{v.paper['effect']:+.1f}"),
            "min effect": f"{'±' if v.test == 'tost' else '-' if v.test == 'noninferiority' else ''}{v.min_effect:g}",
            "Holm p": _fmt(v.p_holm, ".3g"),
            "MDE (80%)": _fmt(v.mde, ".2f"),
            "n": "/".join(str(x) for x in v.n) if isinstance(v.n, list) else _fmt(v.n, "d") if isinstance(v.n, int) else "—",
            "test": v.test + (" (paired)" if v.paired and v.test in ("tost",) else ""),
            "p": _fmt(v.p_value, ".3g"),
            "claim": v.claim,
            "why": v.why,
        }
    return pd.DataFrame.from_dict(rows, orient="index")


def write_verdict_records(records: Sequence[VerdictRecord], path: str | Path) -> Path:
    """Write the records as ``verdicts.json`` (a list of objects with the :class:`VerdictRecord` keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def clean(x: Any) -> Any:
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps([clean(asdict(r)) for r in records], indent=1) + "\n")
    return path
