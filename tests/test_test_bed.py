"""Chapter 0: the test-bed calibration, its choice rule and its claims, computed from the committed runs."""

from __future__ import annotations

import numpy as np
import pytest

import vmoe_lib as vl
from vmoe_lib.chapters import dense_baselines
from vmoe_lib.chapters.base import ChapterResults
from vmoe_lib.chapters.recipes import TEST_BED, TEST_BED_CONVNEXT
from vmoe_lib.predictions import pack_bits

chapter = dense_baselines.chapter


@pytest.fixture(scope="module")
def cpu_results():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VMOE_REQUIRE_RESULTS", "1")
        return chapter.run("cpu", progress=False)


def _with(results: ChapterResults, name: str, change) -> ChapterResults:
    """The same runs, with ``change(record)`` applied to the records of run ``name``."""
    out = []
    for r in results.results:
        if r.name == name:
            record = change({**r.record})
            r = type(r)(**{**r.__dict__, "record": record})
        out.append(r)
    return ChapterResults(results.chapter, results.preset, out)


def test_every_run_stores_its_per_image_predictions_and_moe_runs_their_bypass(cpu_results):
    for r in cpu_results.results:
        correct = vl.analysis.correct_of(r)
        assert correct.size == 10_000 and correct.mean() == pytest.approx(r.final["test_accuracy"])
        assert (r.record["moe_bypass"] is not None) == r.config.model.startswith("vmoe_")


def test_the_rule_picks_the_recorded_test_beds(cpu_results):
    assert chapter.choose_test_bed(cpu_results) == {"vit": TEST_BED.name, "convnext": TEST_BED_CONVNEXT.name}
    table = chapter.calibration_table(cpu_results)
    assert list(table.columns) == [c.name for c in chapter.candidates("cpu")]
    frame = chapter.calibration_frame(cpu_results)
    best = frame[frame["family"] == "vit"]["resolution / sqrt(CPU h)"].idxmax()
    assert best == TEST_BED.name


def test_the_choice_follows_the_control(cpu_results):
    """If bypassing the chosen bed's experts cost nothing, its control fails and the rule moves on."""
    def no_weight(record):
        record["moe_bypass"] = {"accuracy": record["final"]["test_accuracy"],
                                "correct": pack_bits(vl.predictions.unpack_predictions(record["predictions"]).correct)}
        return record

    changed = _with(cpu_results, TEST_BED.moe_run, no_weight)
    verdicts = {v.claim_id: v for v in chapter.verdicts(changed, write=False)}
    assert verdicts[f"experts_carry_weight_{TEST_BED.name}"].verdict == "failed"
    assert verdicts[f"moe_vs_dense_{TEST_BED.name}"].verdict == "not testable"
    assert chapter.choose_test_bed(changed)["vit"] != TEST_BED.name


def test_claims_are_declared_for_every_candidate_and_decided_by_the_rule(cpu_results):
    claims = chapter.claims("cpu")
    ids = [c.id for c in claims]
    for c in chapter.candidates("cpu"):
        assert f"experts_carry_weight_{c.name}" in ids and f"moe_vs_dense_{c.name}" in ids
    assert "convnet_prior" in ids
    verdicts = chapter.verdicts(cpu_results, write=False)
    assert [v.claim_id for v in verdicts] == ids
    assert all(v.verdict in (vl.stats.CONTROL_VERDICTS if v.kind == "control" else vl.stats.VERDICTS) for v in verdicts)
    # Holm within the chapter's claims, and the controls among themselves
    families = {v.family for v in verdicts}
    assert families == {dense_baselines.FAMILY, f"{dense_baselines.FAMILY}:controls"}


def test_power_table_findings_and_figure(cpu_results):
    import matplotlib

    matplotlib.use("Agg")
    power = chapter.power_frame(cpu_results)
    assert f"{TEST_BED.moe_run} - {TEST_BED.dense_run} (paired)" in power.index
    assert power["MDE, n=6"].between(0, 5).all()
    text = chapter.findings(cpu_results)
    assert TEST_BED.name in text and "Test bed (vit)" in text
    fig = chapter.plot_calibration(cpu_results)
    assert len(fig.axes) == 2
    matplotlib.pyplot.close(fig)
    minutes = vl.chapters.base.sweep_wall_minutes(cpu_results.results)
    assert 10 < minutes < 90  # the measured wall time of the sweep of record, within the chapter's budget
    assert np.isfinite(chapter.calibration_frame(cpu_results)["bypass loss (points)"]).all()
