"""Chapter 4 (expert count x training-set size): its sweep, the equal-steps recipe, the interaction and
specialisation measures, the claims and their verdicts on synthetic records, and ``eval_every``."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

import vmoe_lib as vl
from vmoe_lib.analysis import class_expert_information, specialisation_of
from vmoe_lib.chapters import experts_data, router_gates, routers_bpr
from vmoe_lib.chapters.base import ChapterResults, SeedPairedInteraction
from vmoe_lib.chapters.recipes import fashion_mnist_recipe, same_steps_on_fewer_images, training_images
from vmoe_lib.errors import ConfigError
from vmoe_lib.results import RunResult
from vmoe_lib.stats import Claim, decide_family, paired_t
from vmoe_lib.train import TrainConfig, _lr_lambda

chapter = experts_data.chapter


# -- the sweep ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["smoke", "cpu", "gpu"])
def test_the_arms_differ_from_the_test_bed_only_in_experts_and_data(preset):
    plan = chapter.plan(preset)
    base = router_gates.chapter.experiment(preset)["tc_linear"].to_dict()
    for spec in plan.specs:
        config = spec.config.to_dict()
        kwargs = config.pop("model_kwargs")
        if spec.name.startswith("e"):
            experts = int(spec.name.split("_")[0][1:])
            assert kwargs == {**base["model_kwargs"], "num_experts": experts}
            assert config["model"] == base["model"]
        data = {k: config.pop(k) for k in ("train_subset", "epochs", "warmup_epochs", "eval_every")}
        assert config == {k: v for k, v in base.items() if k not in ("model_kwargs", "model", *data)} | (
            {"model": config["model"]})
        if spec.name.endswith("_small"):
            assert data["train_subset"] < training_images(spec.config.replace(train_subset=None)) // 8
    # the small set is the first images of the training split, the same for every model
    assert len({s.config.train_subset for s in plan.specs if s.name.endswith("_small")}) == 1


def test_cpu_borrows_the_test_bed_and_its_dense_model_where_they_are_stored():
    plan = chapter.plan("cpu")
    lent = [(s.chapter, s.stored_as, s.seeds, s.key) for s in plan.specs_of("e8_full")]
    assert lent == [("routers_bpr", "softmax_tc", tuple(range(6)), "1c651b97fa8f"),
                    ("router_gates", "tc_linear", tuple(range(6, 10)), "1c651b97fa8f")]
    dense = plan.specs_of("dense_full")
    assert [(s.chapter, s.stored_as, s.seeds) for s in dense] == [("routers_bpr", "dense", tuple(range(4)))]
    assert dense[0].key == routers_bpr.chapter.plan("cpu").spec("dense").key
    # the arms the claims compare have 10 seeds, the curve's 4; only the other arms are trained here
    assert plan.seeds_of("e16_small") == tuple(range(10)) and plan.seeds_of("e2_full") == tuple(range(4))
    own = sum(len(s.seeds) for s in plan.specs if s.chapter == "experts_data")
    assert own == 3 * 10 + 5 * 4  # e8_small, e16_small, e16_full (e8_full is borrowed); 5 curve arms (not dense_full)


# -- equal steps ---------------------------------------------------------------------------------------------------
def test_same_steps_on_fewer_images_keeps_every_step_of_the_schedule():
    full = fashion_mnist_recipe("vit_pico_patch7_28", epochs=3)
    small = same_steps_on_fewer_images(full, 1 / 11)
    n_full, n_small = training_images(full) // 128, small.train_subset // 128
    assert (small.train_subset, small.epochs, small.eval_every) == (4992, 33, 11)
    assert full.epochs * n_full == small.epochs * n_small == 1287
    f, g = _lr_lambda(full, n_full), _lr_lambda(small, n_small)
    assert all(math.isclose(f(i), g(i), abs_tol=1e-12) for i in range(1287))
    # evaluated after the same steps as the full run: 429, 858 and 1287
    assert [e * n_small for e in range(1, 34) if e % small.eval_every == 0] == [429, 858, 1287]
    for bad in (0, 1, 1.5, -0.1, True, "half"):
        with pytest.raises(ConfigError, match="fraction="):
            same_steps_on_fewer_images(full, bad)


def test_eval_every_is_checked_and_left_out_of_the_key_when_unset():
    with pytest.raises(ConfigError, match="eval_every=0 is invalid"):
        TrainConfig(eval_every=0)
    with pytest.raises(ConfigError, match="eval_every=True is invalid"):
        TrainConfig(eval_every=True)
    # adding the field kept every stored key: chapter 0's dense ViT is still its committed record
    assert vl.results.config_hash(vl.chapters.get_chapter("dense_baselines").experiment("cpu")["vit_pico_3ep"]) == \
        "bb5437cfe4a5"


@pytest.mark.usefixtures("one_torch_thread", "hermetic_data")
def test_eval_every_evaluates_every_nth_epoch_and_the_last():
    from vmoe_lib.train import train_model

    config = TrainConfig(model="vit_test_patch7_28", val_size=50, train_subset=64, eval_subset=60, epochs=3,
                         batch_size=32, augment=False, eval_every=2)
    record = train_model(config, seed=0, progress=False)
    assert ["val_accuracy" in h for h in record["history"]] == [False, True, True]
    assert record["final"]["test_accuracy"] == record["history"][-1]["test_accuracy"]


# -- measures ----------------------------------------------------------------------------------------------------
def test_class_information_hand_worked():
    assert class_expert_information(np.eye(4)) == pytest.approx(1.0)
    assert class_expert_information(np.full((10, 8), 1 / 8)) == pytest.approx(0.0, abs=1e-12)
    # Two classes, two experts: class 0 goes 3:1 to expert 0, class 1 1:3. I = log 2 - H(1/4) in nats; H(class) = log 2.
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert class_expert_information([[0.75, 0.25], [0.25, 0.75]]) == pytest.approx((math.log(2) - h) / math.log(2))
    # Weights: a class with no tokens carries no information.
    assert class_expert_information([[1, 0], [0, 1]], class_weights=[1.0, 0.0]) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ConfigError, match=r"class_expert of shape \(3,\) is invalid"):
        class_expert_information([1, 2, 3])
    with pytest.raises(ConfigError, match=r"class_weights=\[0.5, 0.5\] is invalid; it must be 3 non-negative"):
        class_expert_information(np.eye(3), class_weights=[0.5, 0.5])


def _result(name: str, seed: int, acc: float, *, tables: list | None = None, bypass: float = 0.5,
            train: float | None = None) -> RunResult:
    routing = {f"blocks.{i}": {"layer": f"blocks.{i}", "class_expert": t, "expert_load": [0.5, 0.5],
                               "dropped_fraction": 0.0} for i, t in enumerate(tables or [])}
    record = {"final": {"test_accuracy": acc, "train_accuracy": acc + 0.02 if train is None else train},
              "history": [], "costs": {"params_total": 1000, "params_activated": 500}, "wall_time_s": 60.0,
              "moe_bypass": {"accuracy": bypass}, "extra": {"routing": routing} if tables else {}}
    return RunResult(name, seed, None, record, {"chapter": "experts_data"}, Path("x"))  # type: ignore[arg-type]


def test_the_interaction_is_a_difference_of_paired_differences():
    # per seed: 16 - 8 experts is +0.5 point with all images and -0.3 with few -> interaction +0.8 (+/- noise)
    noise = [0.0, 0.001, -0.001, 0.0005]
    runs = []
    for s, eps in enumerate(noise):
        runs += [_result("e8_full", s, 0.85), _result("e16_full", s, 0.855 + eps),
                 _result("e8_small", s, 0.80), _result("e16_small", s, 0.797)]
    results = ChapterResults("experts_data", "cpu", runs)
    claim = {c.id: c for c in chapter.claims("cpu")}["data_lets_more_experts_help"]
    out = claim.measure(claim, results)
    expected = paired_t([0.005 + e for e in noise], [-0.003] * 4)
    assert out.test == "interaction" and out.effect == pytest.approx(0.8 + 100 * np.mean(noise)) and out.p_value == pytest.approx(expected.p_value)
    # swap the data sizes: the interaction flips sign
    swapped = ChapterResults("experts_data", "cpu", [
        _result(r.name.replace("full", "tmp").replace("small", "full").replace("tmp", "small"), r.seed,
                r.final["test_accuracy"]) for r in runs])
    assert claim.measure(claim, swapped).effect == pytest.approx(-out.effect)
    # fewer than two seeds with all four arms: no test
    assert claim.measure(claim, ChapterResults("experts_data", "cpu", runs[:4])) is None
    with pytest.raises(ConfigError, match="interaction is tested by test='interaction'"):
        SeedPairedInteraction("a", "b", "c", "d")(
            Claim(id="x", claim="x", source="x", contrast="x", test="noninferiority", min_effect=0.3,
                  min_effect_why="x", family="x", paired=True), results)


def test_specialisation_reads_the_probe_tables_and_decides_claim_c():
    sharp = [[0.9, 0.1], [0.1, 0.9]]
    flat = [[0.6, 0.4], [0.4, 0.6]]
    runs = []
    for s in range(4):
        jitter = 0.01 * s
        runs += [_result("e8_full", s, 0.85, tables=[[[0.9 - jitter, 0.1 + jitter], [0.1, 0.9]], sharp]),
                 _result("e8_small", s, 0.80, tables=[flat, flat])]
    results = ChapterResults("experts_data", "cpu", runs)
    assert specialisation_of(runs[0]) == pytest.approx(class_expert_information(sharp))
    assert specialisation_of(_result("dense_full", 0, 0.8)) is None
    claims = chapter.claims("cpu")
    tests = chapter.test_results(results)
    c = tests["specialisation_grows_with_data_e8"]
    assert c.n == 4 and c.effect > 30  # points of I / H
    assert tests["specialisation_grows_with_data_e16"] is None  # no 16-expert runs
    # The synthetic records store no per-image predictions: every control fails, every claim is not testable.
    verdicts = {v.claim_id: v.verdict for v in decide_family(claims, tests)}
    assert verdicts["experts_carry_weight_e8_full"] == "failed"
    assert verdicts["specialisation_grows_with_data_e8"] == "not testable"
    # With a passing control the same numbers reproduce it; swapped sizes do not.
    passing = {k: paired_t([0.8, 0.81, 0.82], [0.5, 0.5, 0.51]) for k in tests if k.startswith("experts_carry")}
    assert {v.claim_id: v.verdict for v in decide_family(claims, {**tests, **passing})}[
        "specialisation_grows_with_data_e8"] == "reproduced"
    swapped = ChapterResults("experts_data", "cpu", [
        _result("e8_small" if r.name == "e8_full" else "e8_full", r.seed, 0.8,
                tables=[st["class_expert"] for st in r.record["extra"]["routing"].values()]) for r in runs])
    decided = {v.claim_id: v.verdict for v in decide_family(claims, {**chapter.test_results(swapped), **passing})}
    assert decided["specialisation_grows_with_data_e8"] == "not reproduced"


def test_claims_are_declared_with_controls_papers_and_families():
    claims = {c.id: c for c in chapter.claims("cpu")}
    assert {c.family for c in claims.values()} == {experts_data.FAMILY_A, experts_data.FAMILY_B,
                                                   experts_data.FAMILY_C, experts_data.CONTROL_FAMILY}
    a = claims["e8_not_worse_than_e16_small"]
    assert a.test == "noninferiority" and a.min_effect == 0.4 and a.paper.effect == 0.3
    assert claims["data_lets_more_experts_help"].paper.effect == 0.5
    assert all(claims[c.control].kind == "control" for c in claims.values() if c.control)
    assert all("ImageNet-21k is not available" in c.source for c in claims.values() if c.kind == "claim")
    with pytest.raises(ConfigError, match="preset='huge'"):
        chapter.claims("huge")


def test_planned_power_reads_chapter_1s_records():
    frame = chapter.planned_power("cpu")
    assert list(frame.index) == ["(a) 8 vs 16 experts, small set (non-inferiority)",
                                 "(b) interaction (16 - 8 experts) x data", "(c) class information, all images vs 1/11"]
    assert "MDE, n=10" in frame.columns and frame["smallest effect of interest"].tolist() == [0.4, 0.3, 0.5]


def test_tables_and_findings_on_synthetic_records():
    runs = []
    for s in range(3):
        for e, acc in ((8, 0.85), (16, 0.86)):
            runs += [_result(f"e{e}_full", s, acc + 0.001 * s, tables=[[[0.7, 0.3], [0.3, 0.7]]]),
                     _result(f"e{e}_small", s, acc - 0.05, tables=[[[0.6, 0.4], [0.4, 0.6]]], train=0.95)]
        runs += [_result("dense_full", s, 0.84), _result("dense_small", s, 0.79)]
    results = ChapterResults("experts_data", "cpu", runs)
    table = chapter.cell_table(results)
    assert table.loc[("all images", "16 experts"), "seeds"] == 3
    assert table.loc[("1/11 of the images", "dense"), "class information (%)"] == ""
    text = chapter.findings(results)
    assert "best at 16 experts" in text and "train-test gap" in text
