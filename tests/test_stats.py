"""The statistics every chapter's verdicts rest on: hand-worked examples for each test, the rule, Holm.

Numbers in comments are worked out by hand (closed forms; the t distribution with 2 degrees of
freedom has the survival function 0.5 * (1 - t / sqrt(t^2 + 2))).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from vmoe_lib.errors import ConfigError
from vmoe_lib.stats import (
    Claim, decide_family, holm, interaction, mcnemar, mde, paired_bootstrap, paired_t, power_table, seeds_for_mde,
    noninferiority, slope, tost, verdict_frame, welch_t, write_verdict_records,
)


def sf_t2(t: float) -> float:
    """P(T > t) for Student's t with 2 degrees of freedom, in closed form."""
    return 0.5 * (1 - t / math.sqrt(t * t + 2))


def claim(id_: str, test: str = "paired_t", *, min_effect: float = 0.5, paired: bool = True, control: str | None = None,
          family: str = "f", direction: str = "greater", kind: str = "claim") -> Claim:
    return Claim(id=id_, claim=f"claim {id_}", source="paper", contrast="A vs B", test=test, min_effect=min_effect,
                 min_effect_why="the paper's effect", family=family, paired=paired, control=control, direction=direction,
                 kind=kind)


# ----------------------------------------------------------------------------------- tests
def test_paired_t_hand_worked():
    # differences in points: 1, 2, 1 -> mean 4/3, sd sqrt(1/3), se 1/3, t = 4 with 2 dof
    r = paired_t([0.80, 0.82, 0.81], [0.79, 0.80, 0.80])
    assert r.effect == pytest.approx(4 / 3)
    assert r.p_value == pytest.approx(sf_t2(4.0))  # 0.0285955
    q = 2.919986  # t_{0.95, 2}
    assert r.lower == pytest.approx(4 / 3 - q / 3, abs=1e-5)
    assert r.upper == pytest.approx(4 / 3 + q / 3, abs=1e-5)
    assert r.n == 3
    # the other direction: effect -4/3, p = P(T > -4)
    s = paired_t([0.80, 0.82, 0.81], [0.79, 0.80, 0.80], direction="less")
    assert s.effect == pytest.approx(-4 / 3) and s.p_value == pytest.approx(1 - sf_t2(4.0))


def test_welch_t_hand_worked_and_matches_scipy():
    a, b = [0.83, 0.85, 0.87], [0.80, 0.81, 0.82, 0.83, 0.84]
    r = welch_t(a, b)
    # points: var a = 4 (/3 = 4/3), var b = 2.5 (/5 = 1/2): se = sqrt(11/6), effect 3
    assert r.effect == pytest.approx(3.0)
    assert r.detail["dof"] == pytest.approx((11 / 6) ** 2 / ((4 / 3) ** 2 / 2 + 0.25 / 4))
    ref = st.ttest_ind(np.array(a) * 100, np.array(b) * 100, equal_var=False, alternative="greater")
    assert r.p_value == pytest.approx(ref.pvalue)
    assert r.n == (3, 5)


def test_mcnemar_hand_worked():
    # 10 images: 6 right only under A, 1 right only under B, 3 right under both
    a = np.array([1, 1, 1, 1, 1, 1, 0, 1, 1, 1], dtype=bool)
    b = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    r = mcnemar(a, b)
    assert r.detail["n_ab"] == 6 and r.detail["n_ba"] == 1
    assert r.p_value == pytest.approx(8 / 128)  # P(X >= 6), X ~ Bin(7, 1/2) = (7 + 1) / 128
    assert r.effect == pytest.approx(50.0)  # (6 - 1) / 10 images, in points
    se = 100 * math.sqrt(7 - 25 / 10) / 10
    assert r.upper == pytest.approx(50 + st.norm.ppf(0.95) * se)
    swapped = mcnemar(b, a)
    assert swapped.effect == pytest.approx(-50.0) and swapped.p_value == pytest.approx(127 / 128)


def test_mcnemar_pools_seeds():
    a = np.array([[1, 1, 0], [1, 0, 0]], dtype=bool)
    b = np.array([[0, 1, 0], [0, 0, 1]], dtype=bool)
    r = mcnemar(a, b)  # discordant: (s0,i0) A, (s1,i0) A, (s1,i2) B
    assert (r.detail["n_ab"], r.detail["n_ba"], r.n) == (2, 1, 6)
    assert r.p_value == pytest.approx(4 / 8)  # P(X >= 2), X ~ Bin(3, 1/2)


def test_paired_bootstrap_agrees_with_mcnemar_and_is_deterministic():
    rng = np.random.default_rng(1)
    b = rng.random(2000) < 0.80
    a = b.copy()
    a[rng.choice(np.flatnonzero(~b), 50, replace=False)] = True  # A fixes 50 of B's errors ...
    a[rng.choice(np.flatnonzero(b), 10, replace=False)] = False  # ... and makes 10 of its own
    r1 = paired_bootstrap(a, b, resamples=2000, seed=3)
    r2 = paired_bootstrap(a, b, resamples=2000, seed=3)
    m = mcnemar(a, b)
    assert r1 == r2
    assert r1.effect == pytest.approx(m.effect)
    assert r1.p_value < 0.05 and m.p_value < 0.05
    assert r1.upper == pytest.approx(m.upper, abs=0.25)


def test_slope_hand_worked():
    # y (points) 80, 81, 83, 84 at x 0..3: slope 7/5 = 1.4, residuals .1 -.3 .3 -.1, se sqrt(0.2 / 2 / 5)
    r = slope([0, 1, 2, 3], [0.80, 0.81, 0.83, 0.84])
    assert r.effect == pytest.approx(1.4)
    t = 1.4 / math.sqrt(0.02)
    assert r.p_value == pytest.approx(sf_t2(t))
    assert slope([0, 1, 2, 3], [0.80, 0.81, 0.83, 0.84], direction="less").effect == pytest.approx(-1.4)


def test_interaction_hand_worked():
    # per-seed gains 2, 3, 2.5 in setting 1 and 1, 1, 1 in setting 2: differences 1, 2, 1.5 -> t = 1.5 / (0.5 / sqrt 3)
    a1, b1 = [0.82, 0.83, 0.825], [0.80, 0.80, 0.80]
    a2, b2 = [0.81, 0.81, 0.81], [0.80, 0.80, 0.80]
    r = interaction(a1, b1, a2, b2)
    assert r.effect == pytest.approx(1.5)
    assert r.p_value == pytest.approx(sf_t2(1.5 / (0.5 / math.sqrt(3))))
    assert r.test == "interaction"


def test_tost_hand_worked():
    # paired differences 0.1, -0.1, 0.2, 0.0 points: mean 0.05, sd sqrt(0.05/3), margin 1
    a = np.array([80.1, 79.9, 80.2, 80.0]) / 100
    b = np.full(4, 0.80)
    r = tost(a, b, margin=1.0, paired=True)
    se = math.sqrt(0.05 / 3) / 2
    assert r.effect == pytest.approx(0.05)
    assert r.p_value == pytest.approx(max(st.t.sf((0.05 + 1) / se, 3), st.t.cdf((0.05 - 1) / se, 3)))
    assert r.p_value == pytest.approx(3.4e-4, rel=0.01)  # the upper test decides: t = -0.95 / se = -14.7, 3 dof
    far = tost(a + 0.03, b, margin=1.0, paired=True)  # 3 points apart: far outside the margin
    assert far.p_value > 0.99


def test_noninferiority_hand_worked():
    # paired differences -0.2, 0.0, -0.1, 0.1 points: mean -0.05, sd sqrt(0.05/3), se sd/2, margin 0.5
    a = np.array([79.8, 80.0, 79.9, 80.1]) / 100
    b = np.full(4, 0.80)
    r = noninferiority(a, b, margin=0.5, paired=True)
    se = math.sqrt(0.05 / 3) / 2
    assert r.test == "noninferiority" and r.effect == pytest.approx(-0.05)
    assert r.p_value == pytest.approx(st.t.sf((-0.05 + 0.5) / se, 3))  # t = 0.45 / 0.0645 = 6.97, 3 dof
    assert r.p_value == pytest.approx(3.0e-3, rel=0.05)
    assert r.mde == pytest.approx((st.t.ppf(0.95, 3) + st.t.ppf(0.80, 3)) * se)
    worse = noninferiority(a - 0.02, b, margin=0.5, paired=True)  # 2 points worse: far beyond the margin
    assert worse.p_value > 0.99 and worse.upper < -0.5
    with pytest.raises(ConfigError, match=r"margin=0 is invalid"):
        noninferiority(a, b, margin=0, paired=True)


def test_noninferiority_claim():
    c = claim("not_worse", "noninferiority", min_effect=0.5)
    a = np.array([79.8, 80.0, 79.9, 80.1, 80.0]) / 100
    b = np.full(5, 0.80)
    ok = decide_family([c], {"not_worse": noninferiority(a, b, margin=0.5, paired=True)})[0]
    assert ok.verdict == "reproduced" and "not worse by 0.5 points" in ok.why
    bad = decide_family([c], {"not_worse": noninferiority(a - 0.02, b, margin=0.5, paired=True)})[0]
    assert bad.verdict == "not reproduced" and "worse by more than the margin" in bad.why
    noisy = np.array([78.0, 82.0, 79.0, 81.5, 79.5]) / 100  # wide: neither shown
    assert decide_family([c], {"not_worse": noninferiority(noisy, b, margin=0.5, paired=True)})[0].verdict == "inconclusive"
    assert verdict_frame([ok]).loc["not_worse", "min effect"] == "-0.5"
    with pytest.raises(ConfigError, match=r"test='noninferiority' has no direction"):
        claim("x", "noninferiority", direction="less")


def test_holm_hand_worked():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.2]) == pytest.approx([0.2])
    out = holm([0.01, float("nan"), 0.02])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_mde_hand_worked_and_seeds_for_mde():
    assert mde(1.0, 4, paired=True) == pytest.approx((st.t.ppf(0.95, 3) + st.t.ppf(0.8, 3)) * 0.5)  # 1.6659
    assert mde(1.0, 4, paired=False) == pytest.approx((st.t.ppf(0.95, 6) + st.t.ppf(0.8, 6)) * math.sqrt(0.5))
    n = seeds_for_mde(0.6, 0.5, paired=False)
    assert mde(0.6, n, paired=False) <= 0.5 < mde(0.6, n - 1, paired=False)
    table = power_table({"dense": (0.6, False)}, seeds=(3, 6))
    assert table.loc["dense", "MDE, n=3"] == pytest.approx(round(mde(0.6, 3, paired=False), 2))
    with pytest.raises(ConfigError, match="n=1"):
        mde(1.0, 1, paired=True)


# ----------------------------------------------------------------------------------- the rule
A_BETTER = ([0.82, 0.83, 0.84, 0.82], [0.80, 0.80, 0.81, 0.79])


def test_verdicts_flip_when_the_numbers_are_swapped():
    c = claim("a_beats_b", min_effect=0.5)
    yes = decide_family([c], {"a_beats_b": paired_t(*A_BETTER)})[0]
    no = decide_family([c], {"a_beats_b": paired_t(*reversed(A_BETTER))})[0]
    assert yes.verdict == "reproduced"
    assert no.verdict == "not reproduced" and no.bound < 0.5
    # the same for a per-image claim
    a = np.zeros(1000, bool); a[:850] = True
    b = np.zeros(1000, bool); b[:800] = True
    ci = claim("img", "mcnemar", min_effect=0.3)
    assert decide_family([ci], {"img": mcnemar(a, b)})[0].verdict == "reproduced"
    assert decide_family([ci], {"img": mcnemar(b, a)})[0].verdict == "not reproduced"


def test_inconclusive_when_the_design_cannot_tell():
    c = claim("noisy", min_effect=0.5)
    r = paired_t([0.80, 0.83, 0.79], [0.80, 0.80, 0.80])
    v = decide_family([c], {"noisy": r})[0]
    assert v.verdict == "inconclusive" and "MDE" in v.why


def test_significant_but_negligible_effect_is_not_reproduced():
    # a tiny, very consistent gain of 0.1 point: p < 0.05 but the upper bound excludes min_effect 0.5
    a = np.array([0.801, 0.8011, 0.8009, 0.801, 0.8012])
    b = np.full(5, 0.800)
    v = decide_family([claim("tiny", min_effect=0.5)], {"tiny": paired_t(a, b)})[0]
    assert v.verdict == "not reproduced" and v.p_holm < 0.05 and "present" in v.why


def test_not_testable_when_the_positive_control_fails():
    control = claim("experts_matter", min_effect=1.0, kind="control")
    dependent = claim("bpr_helps", control="experts_matter")
    weak_control = paired_t([0.800, 0.801, 0.800], [0.800, 0.800, 0.801])  # bypassing the experts costs nothing
    out = decide_family([control, dependent], {"experts_matter": weak_control, "bpr_helps": paired_t(*A_BETTER)})
    assert out[0].verdict == "failed" and out[0].kind == "control"
    assert "below the 1-point bar" in out[0].why and f"{weak_control.effect:+.2f}" in out[0].why
    assert out[1].verdict == "not testable" and out[1].p_holm is None
    # The reason states the control's value and its pre-registered bar; the effect is kept apart as a note.
    assert f"{weak_control.effect:+.2f} [{weak_control.lower:+.2f}, {weak_control.upper:+.2f}] points" in out[1].why
    assert "below the 1-point bar pre-registered for this claim" in out[1].why
    assert out[1].exploratory.startswith("Exploratory, not a verdict") and out[1].effect is not None
    strong_control = paired_t(*A_BETTER)
    out = decide_family([claim("experts_matter", min_effect=0.5, kind="control"), dependent],
                        {"experts_matter": strong_control, "bpr_helps": paired_t(*A_BETTER)})
    assert [v.verdict for v in out] == ["passed", "reproduced"] and out[1].exploratory == ""


def test_a_control_is_a_check_and_a_claim_must_name_one():
    with pytest.raises(ConfigError, match="declare it kind='control'"):
        decide_family([claim("x"), claim("y", control="x")], {})
    with pytest.raises(ConfigError, match="is a positive control: it has no paper number"):
        claim("z", kind="control", control="x")
    with pytest.raises(ConfigError, match="kind='finding' is not recognised"):
        claim("z", kind="finding")


def test_holm_is_applied_within_the_family_only():
    r = paired_t([0.81, 0.80, 0.815, 0.805], [0.80, 0.79, 0.80, 0.80])
    claims = [claim("x", family="one"), claim("y", family="one"), claim("z", family="two")]
    out = {v.claim_id: v for v in decide_family(claims, {"x": r, "y": r, "z": r})}
    assert out["x"].p_holm == pytest.approx(min(1, 2 * r.p_value))
    assert out["z"].p_holm == pytest.approx(r.p_value)


def test_equivalence_claim():
    c = claim("same", "tost", min_effect=1.0)
    a = np.array([80.1, 79.9, 80.2, 80.0, 80.1]) / 100
    b = np.full(5, 0.80)
    assert decide_family([c], {"same": tost(a, b, margin=1.0, paired=True)})[0].verdict == "reproduced"
    assert decide_family([c], {"same": tost(a + 0.03, b, margin=1.0, paired=True)})[0].verdict == "not reproduced"


def test_records_carry_the_issue_keys(tmp_path):
    out = decide_family([claim("a_beats_b")], {"a_beats_b": paired_t(*A_BETTER)})
    path = write_verdict_records(out, tmp_path / "verdicts.json")
    import json

    entry = json.loads(path.read_text())[0]
    for key in ("claim_id", "claim", "source", "contrast", "metric", "direction", "min_effect", "paired", "test", "family",
                "n", "effect", "bound", "p_value", "p_holm", "mde", "control", "verdict", "why", "values"):
        assert key in entry, key
    frame = verdict_frame(out)
    assert list(frame.columns[:3]) == ["verdict", "effect (points)", "90% interval"]
    assert frame.loc["a_beats_b", "verdict"] == "reproduced"


# ----------------------------------------------------------------------------------- bad input
def test_bad_claims_are_rejected():
    with pytest.raises(ConfigError, match="min_effect=0"):
        claim("x", min_effect=0)
    with pytest.raises(ConfigError, match="test="):
        claim("x", "ttest")
    with pytest.raises(ConfigError, match="needs paired=True"):
        claim("x", "mcnemar", paired=False)
    with pytest.raises(ConfigError, match="direction="):
        claim("x", direction="up")
    with pytest.raises(ConfigError, match="not declared"):
        decide_family([claim("x", control="nope")], {})
    with pytest.raises(ConfigError, match="undeclared"):
        decide_family([claim("x")], {"y": paired_t(*A_BETTER)})
    with pytest.raises(ConfigError, match="one value per seed"):
        paired_t([0.1, 0.2, 0.3], [0.1, 0.2])
    with pytest.raises(ConfigError, match="boolean"):
        mcnemar([1, 0], [0, 1])
