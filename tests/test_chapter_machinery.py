"""The chapter machinery end to end, on a toy chapter that trains in seconds.

Two toy chapters: ``toy_lender`` trains a dense model; ``toy_chapter`` borrows that run (the same results key), trains
two MoE models (one with fewer seeds, from the same queue) and declares a positive control, a seed-paired claim, a
per-image claim and a claim whose control cannot pass. Everything a real chapter gets from
:class:`vmoe_lib.chapters.base.Chapter` is exercised: the plan, one queue, the borrowed run read (never trained twice),
verdicts by the one rule, the power table and note, own runs and wall time, the control and routing tables.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from vmoe_lib import chapters
from vmoe_lib.analysis import bypass_correct_of, correct_of
from vmoe_lib.chapters.base import Chapter, PerImage, Preset, Run, SeedPaired, control_claim
from vmoe_lib.papers import PaperNumber
from vmoe_lib.chapters.probes import RoutingStatsProbe
from vmoe_lib.chapters.recipes import TEST_BED_MOE
from vmoe_lib.errors import ConfigError
from vmoe_lib.stats import Claim, mcnemar, paired_t
from vmoe_lib.train import TrainConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread", "hermetic_data")
SYNTHETIC_IMAGES = (200, 60)

BASE = TrainConfig(model="vit_test_patch7_28", val_size=50, train_subset=64, eval_subset=60, epochs=1, batch_size=32,
                   augment=False)
MOE = BASE.replace(model="vmoe_vit_test_patch7_28", model_kwargs={**TEST_BED_MOE, "moe_layers": "all"})
PRESETS = {"smoke": Preset("smoke", "toy", "CPU", 0.2, seeds=(0, 1, 2))}


class Lender(Chapter):
    name, title, presets = "toy_lender", "the chapter a run is borrowed from", PRESETS

    def runs(self, preset):
        return [Run("dense", BASE)]

    def claims(self, preset):
        return []


class Toy(Chapter):
    name, title, presets = "toy_chapter", "a toy chapter", PRESETS
    primary = ("moe_beats_dense",)

    def runs(self, preset):
        probe = RoutingStatsProbe(capacity_factors=(1.0,))
        return [Run("moe", MOE, probe=probe),
                Run("moe_slow", MOE.replace(lr=1e-4), seeds=(0, 1), probe=probe),
                Run("dense", BASE, borrow_from="toy_lender")]

    def claims(self, preset):
        common = dict(source="toy", min_effect_why="a toy's", paired=True, paper=PaperNumber("vmoe", None, "a toy"))
        return [
            control_claim("moe", claim_id="control", family="toy:controls", min_effect=0.01, min_effect_why="a toy's"),
            control_claim("moe", claim_id="impossible_control", family="toy:controls", min_effect=100.0,
                          min_effect_why="no bypass can cost 100 points"),
            Claim(id="moe_beats_dense", claim="MoE beats dense", contrast="moe vs dense", test="paired_t",
                  min_effect=0.5, family="toy", control="control", measure=SeedPaired("moe", "dense"), **common),
            Claim(id="per_image", claim="MoE is right on more images", contrast="moe vs dense (per image)",
                  test="mcnemar", min_effect=0.5, family="toy", measure=PerImage("moe", "dense"), **common),
            Claim(id="needs_the_impossible", claim="depends on a control that cannot pass", contrast="moe vs dense",
                  test="paired_t", min_effect=0.5, family="toy", control="impossible_control",
                  measure=SeedPaired("moe", "dense"), **common),
        ]


@pytest.fixture
def toys(monkeypatch):
    lender, toy = Lender(), Toy()
    monkeypatch.setitem(chapters.CHAPTERS, lender.name, lender)
    monkeypatch.setitem(chapters.CHAPTERS, toy.name, toy)
    return lender, toy


def test_the_plan_resolves_seeds_borrowed_runs_and_probes_once(toys):
    lender, toy = toys
    plan = toy.plan("smoke")
    assert [s.name for s in plan.specs] == ["moe", "moe_slow", "dense"]
    assert plan.seeds_of("moe") == (0, 1, 2) and plan.seeds_of("moe_slow") == (0, 1)
    assert plan.borrowed() == {"dense": ("toy_lender", "dense")}
    assert plan.spec("dense").hash_extra is None and plan.spec("moe").hash_extra["probe"]["routing_stats"]
    assert plan.spec("dense").key == lender.plan("smoke").spec("dense").key
    assert plan.of_record and plan.folder == "smoke"
    custom = toy.plan("smoke", seeds=[0], overrides={"epochs": 2})
    assert custom.folder == "custom" and not custom.of_record and all(s.seeds == (0,) for s in custom.specs)
    with pytest.raises(ConfigError, match="preset='cpu' is not recognised"):
        toy.plan("cpu")


def test_a_toy_chapter_runs_through_the_whole_machinery(toys, tmp_path, monkeypatch):
    lender, toy = toys
    from vmoe_lib import sweep

    lent = lender.run("smoke", executor="inline", progress=False)
    batches = []
    real = sweep.run_tasks
    monkeypatch.setattr("vmoe_lib.results.run_tasks", lambda tasks, **kw: batches.append(len(tasks)) or real(tasks, **kw))
    results = toy.run("smoke", executor="inline", progress=False)

    # One queue: every missing (run, seed) of the chapter in one call; the borrowed run is read, not trained.
    assert batches == [3 + 2]
    assert toy.own_runs(results) == 5 and np.isfinite(toy.wall_minutes(results))
    dense = results.runs_of("dense")
    assert [r.path for r in dense] == [r.path for r in lent.results]
    assert not list((tmp_path / "results" / "smoke" / "toy_chapter").glob("dense__*"))
    assert all(r.manifest["chapter"] == "toy_lender" for r in dense)

    verdicts = {v.claim_id: v for v in toy.verdicts(results)}
    written = json.loads((tmp_path / "results" / "smoke" / "toy_chapter" / "verdicts.json").read_text())
    assert [r["claim_id"] for r in written] == [c.id for c in toy.claims("smoke")]
    # The measures compute what the tests would by hand.
    a, b = results.paired("moe", "dense")
    assert verdicts["moe_beats_dense"].effect == pytest.approx(paired_t(a, b).effect)
    moe_correct = np.stack([correct_of(r) for r in results.runs_of("moe")])
    by_hand = mcnemar(moe_correct, np.stack([correct_of(r) for r in dense]))
    assert verdicts["per_image"].effect == pytest.approx(by_hand.effect) and verdicts["per_image"].n == 3 * 60
    control = mcnemar(moe_correct, np.stack([bypass_correct_of(r) for r in results.runs_of("moe")]))
    assert verdicts["control"].effect == pytest.approx(control.effect)
    # A control whose bar cannot be reached makes the claims on it "not testable", by the one rule.
    assert verdicts["impossible_control"].verdict == "failed" and verdicts["control"].kind == "control"
    assert verdicts["needs_the_impossible"].verdict == "not testable"

    power = toy.power_frame(results)
    assert list(power.index) == ["moe vs dense"] and "MDE, n=3" in power.columns
    note = toy.power_note(results)
    assert note.startswith("* `moe_beats_dense` (moe vs dense): MDE") and "seeds" in note
    assert set(toy.control_table(results).index) == {"moe", "moe_slow"}
    routing = toy.routing_table(results, training_capacity=1.0)
    assert set(routing.index.get_level_values("run")) == {"moe", "moe_slow"} and "dropped at cf 1 (%)" in routing
    table = toy.run_table("smoke")
    assert table.loc["dense", "from"] == "toy_lender (dense)" and table.loc["moe_slow", "seeds"] == 2

    # Loading again trains nothing.
    batches.clear()
    again = toy.run("smoke", executor="inline", progress=False)
    assert batches == [] and [r.path for r in again.results] == [r.path for r in results.results]


def test_a_claim_without_a_measure_is_a_clear_error(toys):
    _, toy = toys

    class NoMeasure(Toy):
        def claims(self, preset):
            return [Claim(id="x", claim="x", source="x", contrast="a vs b", test="paired_t", min_effect=1.0,
                          min_effect_why="x", family="x", paired=True)]

    from vmoe_lib.chapters.base import ChapterResults

    with pytest.raises(ConfigError, match="claim 'x' of chapter 'toy_chapter' declares no measure"):
        NoMeasure().verdicts(ChapterResults("toy_chapter", "smoke", []), write=False)


def test_a_run_borrowed_from_a_borrower_is_read_where_each_seed_lives(toys, monkeypatch):
    """Chapter C borrows ``dense`` from the toy chapter, which reads seeds 0-2 from the lender: C reads those seeds
    from the lender (not from the toy chapter, which never trained them), and trains only the seeds nobody has."""
    lender, toy = toys

    class Third(Chapter):
        name, title = "toy_third", "borrows from a borrower"
        presets = {"smoke": Preset("smoke", "toy", "CPU", 0.2, seeds=(0, 1, 2, 3))}

        def runs(self, preset):
            return [Run("base", BASE, borrow_from="toy_chapter")]

        def claims(self, preset):
            return []

    third = Third()
    monkeypatch.setitem(chapters.CHAPTERS, third.name, third)
    plan = third.plan("smoke")
    where = {(s.chapter, s.stored_as or s.name): s.seeds for s in plan.specs}
    assert where == {("toy_lender", "dense"): (0, 1, 2), ("toy_third", "base"): (3,)}
    assert len({s.key for s in plan.specs}) == 1 and plan.borrowed() == {"base": ("toy_lender", "dense")}
