"""Verdicts from per-seed values (Welch's t-test) and the tables chapters print."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from scipy import stats

from vmoe_lib.analysis import (
    Comparison,
    Verdict,
    compare,
    decide,
    final_metric,
    runs_table,
    summary_table,
    verdict_table,
    write_verdicts,
)
from vmoe_lib.results import RunResult
from vmoe_lib.train import TrainConfig

# ---------------------------------------------------------------------------
# compare: Welch's t-test on golden samples
#
#   a = [2, 4, 6]: mean 4, sample variance 4, va = 4/3;  b = [1, 2, 3]: mean 2, variance 1, vb = 1/3
#   diff = 2, se = sqrt(va + vb) = sqrt(5/3) = 1.290994
#   Welch-Satterthwaite dof = (5/3)^2 / ((4/3)^2/2 + (1/3)^2/2) = (25/9) / (17/18) = 50/17 = 2.941176
#   t = 2 / 1.290994 = 1.549193; 95% half-width = t_{0.975, 50/17} * se = 3.218759 * 1.290994 = 4.155400
A, B = [2.0, 4.0, 6.0], [1.0, 2.0, 3.0]
SE, DOF = math.sqrt(5 / 3), 50 / 17


def test_compare_matches_scipy_welch_and_the_hand_interval():
    c = compare(A, B)
    assert (c.mean_a, c.mean_b, c.diff, c.n_a, c.n_b) == (4.0, 2.0, 2.0, 3, 3)
    expected_p = stats.ttest_ind(A, B, equal_var=False, alternative="greater").pvalue
    assert c.p_value == pytest.approx(expected_p, rel=1e-10)
    assert c.p_value == pytest.approx(stats.t.sf(2 / SE, DOF), rel=1e-10)
    assert 0.10 < c.p_value < 0.12  # t = 1.55 on ~3 dof
    half = stats.t.ppf(0.975, DOF) * SE
    assert half == pytest.approx(4.155400, abs=1e-6)
    assert (c.ci_low, c.ci_high) == (pytest.approx(2 - half, rel=1e-10), pytest.approx(2 + half, rel=1e-10))
    # Same interval as scipy's own Welch interval.
    scipy_ci = stats.ttest_ind(A, B, equal_var=False).confidence_interval(0.95)
    assert (c.ci_low, c.ci_high) == (pytest.approx(scipy_ci.low), pytest.approx(scipy_ci.high))


def test_compare_min_effect_shifts_the_test_not_the_interval():
    c0, c1 = compare(A, B), compare(A, B, min_effect=1.0)
    # H1: a - b > 1 is the one-sided test of a against b + 1.
    expected = stats.ttest_ind(A, [x + 1.0 for x in B], equal_var=False, alternative="greater").pvalue
    assert c1.p_value == pytest.approx(expected, rel=1e-10) and c1.p_value > c0.p_value
    assert (c1.diff, c1.ci_low, c1.ci_high) == (c0.diff, c0.ci_low, c0.ci_high)


def test_compare_confidence_level():
    c = compare(A, B, confidence=0.9)
    half = stats.t.ppf(0.95, DOF) * SE
    assert c.ci_high - c.diff == pytest.approx(half) and half < compare(A, B).ci_high - 2.0


def test_compare_with_unequal_sizes_matches_scipy():
    a, b = [0.81, 0.83, 0.80, 0.84, 0.82], [0.79, 0.80, 0.78]
    c = compare(a, b)
    assert c.p_value == pytest.approx(stats.ttest_ind(a, b, equal_var=False, alternative="greater").pvalue, rel=1e-9)
    ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (c.ci_low, c.ci_high) == (pytest.approx(ci.low), pytest.approx(ci.high))


def test_compare_degenerate_cases():
    one = compare([0.9], [0.8, 0.7])  # one seed: no spread to test against
    assert math.isnan(one.p_value) and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    assert one.diff == pytest.approx(0.15)
    same = compare([2.0, 2.0], [1.0, 1.0])  # no spread at all: the difference is exact
    assert (same.p_value, same.ci_low, same.ci_high) == (0.0, 1.0, 1.0)
    worse = compare([1.0, 1.0], [2.0, 2.0])
    assert math.isnan(worse.p_value) and (worse.ci_low, worse.ci_high) == (-1.0, -1.0)
    with pytest.raises(ValueError):
        compare([], [1.0])


# ---------------------------------------------------------------------------
# decide


@pytest.mark.parametrize(
    "a, b, min_effect, verdict",
    [
        # Clearly higher: diff 9, se 0.08, p ~ 1e-7.
        ([10.0, 10.1, 9.9], [1.0, 1.1, 0.9], 0.0, "reproduced"),
        # Clearly lower: interval (-9.2, -8.8) lies below 0.
        ([1.0, 1.1, 0.9], [10.0, 10.1, 9.9], 0.0, "not reproduced"),
        # The golden samples: p = 0.11 and the interval (-2.2, 6.2) holds 0.
        (A, B, 0.0, "inconclusive"),
        # Higher by 2 +- 0.23 (dof 4: t 2.776 * se 0.0816): above a claimed 1, surely below a claimed 5.
        ([12.0, 12.1, 11.9], [10.0, 10.1, 9.9], 1.0, "reproduced"),
        ([12.0, 12.1, 11.9], [10.0, 10.1, 9.9], 5.0, "not reproduced"),
        # One seed per side is never enough.
        ([0.9], [0.1], 0.0, "inconclusive"),
        # Identical seeds: exact difference.
        ([2.0, 2.0], [1.0, 1.0], 0.0, "reproduced"),
        ([1.0, 1.0], [2.0, 2.0], 0.0, "not reproduced"),
    ],
)
def test_decide(a, b, min_effect, verdict):
    assert decide(compare(a, b, min_effect=min_effect), min_effect=min_effect) == verdict


def test_decide_alpha():
    c = compare(A, B)  # p = 0.11
    assert decide(c, alpha=0.05) == "inconclusive" and decide(c, alpha=0.2) == "reproduced"


def test_decide_negative_margin_needs_the_whole_interval_below_it():
    # diff -0.06 +- 0.04: the interval (-0.10, -0.02) straddles the claimed margin -0.05, so the claim
    # "a - b > -0.05" is neither shown nor refuted (module doc: "not reproduced" needs the whole interval below).
    c = Comparison(mean_a=0.74, mean_b=0.80, diff=-0.06, ci_low=-0.10, ci_high=-0.02, p_value=0.7, n_a=3, n_b=3)
    assert decide(c, min_effect=-0.05) == "inconclusive"


# ---------------------------------------------------------------------------
# Tables


def _result(name: str, seed: int, test_acc: float, val_acc: float, *, model="vit_test_patch7_28", ips=(100.0, 300.0), wall=10.0):
    record = {
        "history": [{"epoch": i + 1, "train_images_per_second": x} for i, x in enumerate(ips)],
        "final": {"test_accuracy": test_acc, "val_accuracy": val_acc, "test_loss": 1.0 - test_acc},
        "costs": {"params_total": 1000, "params_activated": 400, "flops_per_image": 5e5},
        "wall_time_s": wall,
    }
    return RunResult(name, seed, TrainConfig(model=model), record, {}, Path(f"/nowhere/{name}__s{seed}.json"))


RESULTS = [
    _result("vit", 0, 0.50, 0.60, wall=10.0),
    _result("vit", 1, 0.75, 0.60, wall=20.0),
    _result("vit", 2, 1.00, 0.60, wall=30.0),
    _result("conv", 0, 0.25, 0.30, model="convnext_test_32", ips=(50.0, 50.0)),
    _result("conv", 1, 0.75, 0.50, model="convnext_test_32", ips=(50.0, 50.0)),
]


def test_final_metric():
    assert final_metric(RESULTS[1]) == 0.75 and final_metric(RESULTS[1], "val_accuracy") == 0.60


def test_runs_table():
    df = runs_table(RESULTS)
    assert list(df["run"]) == ["vit"] * 3 + ["conv"] * 2 and list(df["seed"]) == [0, 1, 2, 0, 1]
    assert list(df["model"]) == ["vit_test_patch7_28"] * 3 + ["convnext_test_32"] * 2
    assert list(df["test_accuracy"]) == [0.5, 0.75, 1.0, 0.25, 0.75]
    assert list(df["images_per_s"]) == [200.0] * 3 + [50.0] * 2  # mean over epochs
    assert list(df["wall_time_s"]) == [10.0, 20.0, 30.0, 10.0, 10.0]
    assert set(df.columns) >= {"test_loss", "params_total", "params_activated", "flops_per_image"}


def test_summary_table_golden():
    df = summary_table(RESULTS)
    assert list(df.index) == ["vit", "conv"]  # sweep order, not alphabetical
    assert list(df.columns) == [
        "seeds", "test_accuracy_mean", "test_accuracy_std", "val_accuracy_mean", "val_accuracy_std",
        "params_total", "params_activated", "flops_per_image", "images_per_s", "images_per_s_best", "wall_time_s",
    ]
    vit, conv = df.loc["vit"], df.loc["conv"]
    # vit: test [0.5, 0.75, 1.0] -> mean 0.75, sample std sqrt((0.0625 + 0 + 0.0625) / 2) = 0.25.
    assert vit["seeds"] == 3
    assert vit["test_accuracy_mean"] == pytest.approx(0.75) and vit["test_accuracy_std"] == pytest.approx(0.25)
    assert vit["val_accuracy_std"] == pytest.approx(0.0) and vit["wall_time_s"] == pytest.approx(20.0)
    # per-epoch throughput (100, 300): median 200, best 300
    assert vit["images_per_s"] == pytest.approx(200.0) and vit["images_per_s_best"] == pytest.approx(300.0)
    # conv: test [0.25, 0.75] -> mean 0.5, std sqrt(2 * 0.0625 / 1) = 0.353553.
    assert conv["seeds"] == 2 and conv["test_accuracy_std"] == pytest.approx(math.sqrt(0.125))
    assert conv["val_accuracy_mean"] == pytest.approx(0.4) and conv["images_per_s"] == pytest.approx(50.0)
    assert vit["params_activated"] == 400


def test_summary_table_other_metrics():
    df = summary_table(RESULTS, metrics=("test_loss",))
    assert df.loc["vit", "test_loss_mean"] == pytest.approx(0.25) and "test_accuracy_mean" not in df.columns


VERDICTS = [
    Verdict("C1", "ConvNeXt beats ViT", "arXiv:0000.00000 Table 1", "+2%", "+1.0% (3 seeds)", "inconclusive",
            "p = 0.11", values={"a": [1.0, 2.0]}, statistics={"p_value": 0.11}),
    Verdict("C2", "Bigger is better", "Fig. 2", "monotone", "+5%", "reproduced", "p < 0.01"),
]


def test_verdict_table():
    df = verdict_table(VERDICTS)
    assert list(df.index) == ["C1", "C2"]
    assert list(df.columns) == ["claim", "paper's evidence", "our measurement", "verdict", "why"]
    assert df.loc["C1", "verdict"] == "inconclusive" and df.loc["C2", "paper's evidence"] == "monotone"


def test_write_verdicts_round_trip(tmp_path):
    path = write_verdicts(VERDICTS, tmp_path / "new" / "folder" / "verdicts.json")
    assert path == tmp_path / "new" / "folder" / "verdicts.json"
    data = json.loads(path.read_text())
    assert [Verdict(**d) for d in data] == VERDICTS
    assert data[0]["values"] == {"a": [1.0, 2.0]} and data[1]["statistics"] == {}


def test_compare_paired_hand_worked():
    from vmoe_lib.analysis import compare_paired

    # differences 1, 2, 3: mean 2, sd 1, se 1/sqrt(3); t = 2*sqrt(3) = 3.464 with 2 dof
    c = compare_paired([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert c.diff == pytest.approx(2.0)
    assert c.p_value == pytest.approx(0.03709, abs=2e-4)
    half = 4.302653 / math.sqrt(3)  # t_{0.975, 2} * se
    assert (c.ci_low, c.ci_high) == (pytest.approx(2 - half, abs=1e-5), pytest.approx(2 + half, abs=1e-5))


def test_paired_test_sees_a_consistent_gain_that_welch_cannot():
    from vmoe_lib.analysis import compare_paired

    models = [0.80, 0.85, 0.90]  # seeds differ a lot, but each seed's model gains about 1 point
    improved = [m + g for m, g in zip(models, (0.010, 0.012, 0.009))]
    assert decide(compare(improved, models)) == "inconclusive"
    paired = compare_paired(improved, models)
    assert 0 < paired.p_value < 0.01 and paired.ci_low > 0  # a real t-test (non-zero spread of the gains)
    assert decide(paired) == "reproduced"
    assert decide(compare_paired(models, improved)) == "not reproduced"
    with pytest.raises(ValueError, match="equally long"):
        compare_paired([1.0, 2.0], [1.0])
