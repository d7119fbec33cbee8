"""Chapter 3 (router parameterisation vs allocation): its sweep, borrowed arms, claims and claim (b)'s measure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import vmoe_lib as vl
from vmoe_lib.chapters import router_gates, routers_bpr
from vmoe_lib.chapters.base import ChapterResults
from vmoe_lib.errors import ConfigError
from vmoe_lib.results import RunResult

chapter = router_gates.chapter


@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_the_arms_differ_only_in_their_gate_and_the_linear_arms_are_chapter_1s(preset):
    plan = chapter.plan(preset)
    theirs = routers_bpr.chapter.plan(preset)
    for allocation, (lent, _) in router_gates.ALLOCATIONS.items():
        linear = plan.specs_of(f"{allocation}_linear")
        assert linear[0].chapter == "routers_bpr" and linear[0].stored_as == lent
        assert all(s.key == theirs.spec(lent).key for s in linear)  # the same experiment, probe included
        base = theirs.spec(lent).config.to_dict()
        for gate in ("cosine", "l2"):
            other = plan.spec(f"{allocation}_{gate}").config.to_dict()
            kwargs = other.pop("model_kwargs")
            assert kwargs["router_options"] == {**base["model_kwargs"]["router_options"], "gate": gate}
            assert {k: v for k, v in kwargs.items() if k != "router_options"} == {
                k: v for k, v in base["model_kwargs"].items() if k != "router_options"}
            assert other == {k: v for k, v in base.items() if k != "model_kwargs"}
    # Every arm has the preset's seeds; chapter 1's linear seeds are read, the rest trained here.
    for name in ("tc_linear", "ec_cosine"):
        assert plan.seeds_of(name) == chapter.presets[preset].seeds


def test_cpu_linear_arms_borrow_chapter_1s_six_seeds_and_train_six_more():
    plan = chapter.plan("cpu")
    lent, own = plan.specs_of("tc_linear")
    assert (lent.chapter, lent.seeds) == ("routers_bpr", tuple(range(6)))
    assert (own.chapter, own.seeds) == ("router_gates", tuple(range(6, 10)))
    assert lent.key == own.key == "1c651b97fa8f"  # chapter 1's committed record key of softmax_tc


def test_claims_are_declared_with_controls_papers_and_families():
    claims = {c.id: c for c in chapter.claims("cpu")}
    a = [c for c in claims.values() if c.family == router_gates.FAMILY_A]
    assert len(a) == 4 and all(c.test == "paired_t" and c.min_effect == 0.3 and c.paper.effect in (0.8, 0.3) for c in a)
    assert all(claims[c.control].kind == "control" for c in claims.values() if c.control)
    b = claims["allocation_over_parameterisation"]
    assert isinstance(b.measure, router_gates.AllocationOverGates) and b.paper.paper == "routers"
    with pytest.raises(ConfigError, match="preset='huge'"):
        chapter.claims("huge")


def _result(name: str, seed: int, acc: float, bypass: float = 0.5) -> RunResult:
    record = {"final": {"test_accuracy": acc}, "history": [], "costs": {}, "wall_time_s": 1.0,
              "moe_bypass": {"accuracy": bypass}}
    return RunResult(name, seed, None, record, {"chapter": "router_gates"}, Path("x"))  # type: ignore[arg-type]


def _grid(acc: dict[tuple[str, str], list[float]]) -> ChapterResults:
    runs = [_result(f"{a}_{g}", s, v) for (a, g), values in acc.items() for s, v in enumerate(values)]
    return ChapterResults("router_gates", "cpu", runs)


def test_allocation_over_gates_hand_worked():
    # Per seed: expert choice is 1 point above token choice at every gate (A_s = 1); the gates differ by at most
    # 0.2 point (linear - cosine = 0.2 at both allocations; the largest pair), so D_s = A_s - 0.2 = 0.8 every seed
    # but one, where the gates' gap is 0.4: D = [0.8, 0.8, 0.6, 0.8].
    tc = {"linear": [0.802, 0.812, 0.804, 0.806], "cosine": [0.800, 0.810, 0.800, 0.804], "l2": [0.801, 0.811, 0.802, 0.805]}
    acc = {("tc", g): v for g, v in tc.items()}
    acc.update({("ec", g): [x + 0.01 for x in v] for g, v in tc.items()})
    claim = {c.id: c for c in chapter.claims("cpu")}["allocation_over_parameterisation"]
    result = claim.measure(claim, _grid(acc))
    assert result.detail["largest_gate_pair"] == "linear vs cosine"
    assert result.detail["allocation_effect"] == pytest.approx(1.0)
    assert result.detail["largest_gate_effect"] == pytest.approx(np.mean([0.2, 0.2, 0.4, 0.2]))
    assert result.effect == pytest.approx(np.mean([0.8, 0.8, 0.6, 0.8]))
    # Swap the roles: gates 1 point apart, allocations 0.2: the effect turns negative (the claim fails).
    swapped = {("tc", "linear"): tc["linear"], ("ec", "linear"): [x + 0.002 for x in tc["linear"]]}
    for g in ("cosine", "l2"):
        swapped[("tc", g)] = [x - 0.01 for x in tc["linear"]]
        swapped[("ec", g)] = [x - 0.008 for x in tc["linear"]]
    assert claim.measure(claim, _grid(swapped)).effect < 0


def test_the_verdicts_follow_the_numbers_and_a_failed_control_makes_claims_untestable():
    better = {(a, g): [0.80 + 0.01 * s + (0.01 if g == "linear" else 0) + (0.02 if a == "ec" else 0) + 0.001 * (s % 2)
                       for s in range(6)] for a in ("tc", "ec") for g in ("linear", "cosine", "l2")}
    verdicts = {v.claim_id: v for v in chapter.verdicts(_grid(better), write=False)}
    from vmoe_lib.stats import decide_family

    claims = chapter.claims("cpu")
    tests = chapter.test_results(_grid(better))
    assert tests["experts_carry_weight_tc_linear"] is None  # the fake records store no per-image predictions
    assert all(verdicts[c.id].verdict == "not testable" for c in claims if c.control)
    # With a passing control the same numbers reproduce claim (a) for both allocations.
    passing = {**tests, "experts_carry_weight_tc_linear": vl.stats.paired_t([0.8, 0.81, 0.82], [0.5, 0.5, 0.51]),
               "experts_carry_weight_ec_linear": vl.stats.paired_t([0.8, 0.81, 0.82], [0.5, 0.5, 0.51])}
    decided = {v.claim_id: v.verdict for v in decide_family(claims, passing)}
    assert decided["linear_beats_cosine_tc"] == decided["linear_beats_l2_ec"] == "reproduced"
    worse = {k: [x - (0.02 if k[1] == "linear" else 0) for x in v] for k, v in better.items()}
    tests_worse = {**chapter.test_results(_grid(worse)), **{k: passing[k] for k in passing if k.startswith("experts")}}
    decided = {v.claim_id: v.verdict for v in decide_family(claims, tests_worse)}
    assert decided["linear_beats_cosine_tc"] == "not reproduced"


def test_planned_power_reads_chapter_1s_records():
    frame = chapter.planned_power("cpu")
    assert "chapter 1: softmax_ec vs softmax_tc" in frame.index and "MDE, n=10 (this preset)" in frame.columns
    assert (frame["MDE, n=10 (this preset)"] < frame["MDE, n=6"]).all()
