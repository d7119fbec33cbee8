"""Chapter 5 (model size and experts per token): its sweep, the slope and per-FLOP measures, the claims and their
verdicts on synthetic records, the tables and findings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vmoe_lib.chapters import model_scale, router_gates, routers_bpr
from vmoe_lib.chapters.base import ChapterResults
from vmoe_lib.errors import ConfigError
from vmoe_lib.results import RunResult
from vmoe_lib.stats import decide_family, paired_t

chapter = model_scale.chapter
WIDTH_PARAMS = {16: 14_410, 32: 53_386, 64: 205_066}  # the dense models' parameters at the cpu widths
FLOPS = {"dense_w64": 7.0e6, "moe_w64": 6.4e6, "moe_k2": 10.8e6, "moe_k4": 20.0e6}


# -- the sweep ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_the_runs_differ_from_the_test_bed_only_in_width_or_k(preset):
    base_width, heads = chapter.base_width(preset), chapter.preset(preset).settings["head_channels"]
    moe = router_gates.chapter.experiment(preset)["tc_linear"]
    dense = routers_bpr.chapter.experiment(preset)["dense"]
    k2 = routers_bpr.chapter.experiment(preset)["softmax_tc_k2"]
    plan = chapter.experiment(preset)
    for w in chapter.widths(preset):
        width = {} if w == base_width else {"embed_dim": w, "num_heads": w // heads}
        assert plan[f"dense_w{w}"] == dense.replace(model_kwargs={**dense.model_kwargs, **width})
        assert plan[f"moe_w{w}"] == moe.replace(model_kwargs={**moe.model_kwargs, **width})
    assert plan["moe_k2"] == k2
    assert plan["moe_k4"] == k2.replace(model_kwargs={**k2.model_kwargs, "k": 4})
    assert len(chapter.widths(preset)) >= 3


def test_cpu_borrows_the_test_beds_runs_and_trains_the_rest():
    plan = chapter.plan("cpu")
    lent = {(s.name, s.chapter, s.stored_as, s.seeds) for s in plan.specs if s.chapter != "model_scale"}
    assert lent == {("dense_w64", "routers_bpr", "dense", tuple(range(6))),
                    ("moe_w64", "routers_bpr", "softmax_tc", tuple(range(6))),
                    ("moe_w64", "router_gates", "tc_linear", tuple(range(6, 10))),
                    ("moe_k2", "routers_bpr", "softmax_tc_k2", tuple(range(6)))}
    own = sum(len(s.seeds) for s in plan.specs if s.chapter == "model_scale")
    assert own == 4 * 10 + 4 + 4 + 10  # widths 16 and 32 (dense, MoE); seeds 6-9 of dense_w64 and moe_k2; moe_k4
    # the widths span more than 4x in parameters, as the claims need
    params = chapter.dense_params("cpu")
    assert params == WIDTH_PARAMS and max(params.values()) / min(params.values()) > 4


def test_a_width_must_fit_the_heads():
    config = chapter.experiment("cpu")["dense_w64"]
    with pytest.raises(ConfigError, match="width=40 is invalid; it must be a multiple of the 16 channels"):
        model_scale.size_config(config, 40, 64, 16)
    assert model_scale.size_config(config, 64, 64, 16) is config


# -- measures on synthetic records ---------------------------------------------------------------------------------
def _result(name: str, seed: int, acc: float, *, params: int = 1000, flops: float = 1e6, bypass: float = 0.5) -> RunResult:
    record = {"final": {"test_accuracy": acc, "train_accuracy": acc + 0.02}, "history": [],
              "costs": {"params_total": params, "params_activated": params, "flops_per_image": flops},
              "wall_time_s": 60.0, "moe_bypass": {"accuracy": bypass}, "extra": {}}
    return RunResult(name, seed, None, record, {"chapter": "model_scale"}, Path("x"))  # type: ignore[arg-type]


def _sweep(gains: dict[int, float], seeds: int = 4, k_acc: dict[str, float] | None = None) -> ChapterResults:
    """Dense at 0.80 at every width; MoE at 0.80 + gain (+ a small per-seed jitter); the k runs at ``k_acc``."""
    runs = []
    for s in range(seeds):
        jitter = 0.0005 * (s - 1.5)
        for w, g in gains.items():
            runs += [_result(f"dense_w{w}", s, 0.80, params=WIDTH_PARAMS[w], flops=FLOPS["dense_w64"]),
                     _result(f"moe_w{w}", s, 0.80 + g + jitter * w / 16, params=5 * WIDTH_PARAMS[w],
                             flops=FLOPS["moe_w64"])]
        for name, acc in (k_acc or {}).items():
            runs.append(_result(name, s, acc + jitter, params=5 * WIDTH_PARAMS[64], flops=FLOPS[name]))
    return ChapterResults("model_scale", "cpu", runs)


def test_the_slope_is_the_per_seed_fit_against_log2_parameters():
    # gains of 3, 2 and 1 point at 14k, 53k and 205k parameters: a gain that shrinks with size
    results = _sweep({16: 0.03, 32: 0.02, 64: 0.01})
    claim = {c.id: c for c in chapter.claims("cpu")}["gain_shrinks_with_size"]
    out = claim.measure(claim, results)
    x = np.log2(list(WIDTH_PARAMS.values()))
    expected = -np.polyfit(x, [3.0, 2.0, 1.0], 1)[0]  # points per doubling, sign reversed (shrinking is positive)
    assert out.n == 4 and out.effect == pytest.approx(expected, abs=0.01)
    assert len(out.detail["slopes_points"]) == 4 and out.detail["log2_params"] == pytest.approx(list(x))
    # a gain that grows with size: the effect flips sign
    grows = claim.measure(claim, _sweep({16: 0.01, 32: 0.02, 64: 0.03}))
    assert grows.effect == pytest.approx(-expected, abs=0.01)
    # two widths only: no slope to test
    assert claim.measure(claim, _sweep({16: 0.03, 32: 0.02})) is None


def test_gain_per_flop_divides_each_gain_by_its_flop_ratio():
    results = _sweep({16: 0.01, 32: 0.01, 64: 0.01}, k_acc={"moe_k2": 0.83, "moe_k4": 0.835})
    claims = {c.id: c for c in chapter.claims("cpu")}
    vs_k1 = claims["moderate_k_beats_k1_per_flop"].measure(claims["moderate_k_beats_k1_per_flop"], results)
    vs_k4 = claims["moderate_k_beats_k4_per_flop"].measure(claims["moderate_k_beats_k4_per_flop"], results)
    r1, r2, r4 = (FLOPS[n] / FLOPS["dense_w64"] for n in ("moe_w64", "moe_k2", "moe_k4"))
    assert vs_k1.effect == pytest.approx(3.0 / r2 - 1.0 / r1, abs=0.01)
    assert vs_k4.effect == pytest.approx(3.0 / r2 - 3.5 / r4, abs=0.01)
    # the interaction: (k2 - k1) - (k4 - k2) = 2 - 0.5 points
    inter = claims["diminishing_returns_in_k"].measure(claims["diminishing_returns_in_k"], results)
    assert inter.test == "interaction" and inter.effect == pytest.approx(1.5, abs=0.01)


def test_claims_are_declared_and_decided_by_the_rule():
    claims = chapter.claims("cpu")
    by_id = {c.id: c for c in claims}
    assert {c.family for c in claims} == {model_scale.FAMILY_A, model_scale.FAMILY_B, model_scale.FAMILY_C,
                                           model_scale.FAMILY_D, model_scale.CONTROL_FAMILY}
    assert all(by_id[c.control].kind == "control" for c in claims if c.control)
    assert all(c.paper is not None for c in claims if c.kind == "claim")
    assert by_id["gain_shrinks_with_size"].control == "experts_carry_weight_moe_w16"
    assert [c.id for c in claims if c.family == model_scale.FAMILY_B] == [f"moe_beats_dense_w{w}" for w in (16, 32, 64)]
    # synthetic records store no predictions: every control fails and every claim is not testable
    results = _sweep({16: 0.03, 32: 0.02, 64: 0.01}, k_acc={"moe_k2": 0.83, "moe_k4": 0.835})
    tests = chapter.test_results(results)
    decided = {v.claim_id: v.verdict for v in decide_family(claims, tests)}
    assert decided["gain_shrinks_with_size"] == "not testable"
    # with passing controls: a shrinking gain reproduces claim (a), a growing one does not
    passing = {k: paired_t([0.8, 0.81, 0.82], [0.5, 0.5, 0.51]) for k in tests if k.startswith("experts_carry")}
    jittered = _sweep({16: 0.05, 32: 0.03, 64: 0.01}, seeds=6)
    decided = {v.claim_id: v.verdict for v in decide_family(claims, {**chapter.test_results(jittered), **passing})}
    assert decided["gain_shrinks_with_size"] == "reproduced" and decided["moe_beats_dense_w16"] == "reproduced"
    flipped = _sweep({16: 0.01, 32: 0.03, 64: 0.05}, seeds=6)
    decided = {v.claim_id: v.verdict for v in decide_family(claims, {**chapter.test_results(flipped), **passing})}
    assert decided["gain_shrinks_with_size"] == "not reproduced"
    with pytest.raises(ConfigError, match="preset='huge'"):
        chapter.claims("huge")


def test_planned_power_reads_chapter_1s_records():
    frame = chapter.planned_power("cpu")
    assert frame.index[0].startswith("(a) slope") and len(frame) == 5
    assert "MDE, n=10" in frame.columns
    assert frame["smallest effect of interest"].tolist() == [0.2, 0.5, 0.3, 0.2, 0.2]


def test_tables_and_findings_on_synthetic_records():
    results = _sweep({16: 0.03, 32: 0.02, 64: 0.01}, k_acc={"moe_k2": 0.83, "moe_k4": 0.835})
    table = chapter.size_table(results)
    assert table.loc[(16, "MoE, k = 1"), "gain over dense (points)"].startswith("+3.0")
    assert table.loc[(64, "MoE, k = 4"), "seeds"] == 4 and table.loc[(16, "dense"), "gain over dense (points)"] == ""
    text = chapter.findings(results)
    assert "width 16 +3.00" in text and "points per doubling" in text and "k = 4 83.50 %" in text
