"""Chapter experiment modules: presets, sweeps, and the results of record the book is built from."""

from __future__ import annotations

import pytest

from vmoe_lib.chapters import CHAPTERS, get_chapter
from vmoe_lib.errors import ConfigError
from vmoe_lib.results import MissingResultError

CHAPTER_NAMES = sorted(CHAPTERS)


def test_unknown_chapter_and_preset_are_clear_errors():
    with pytest.raises(ConfigError, match="chapter='nope'.*dense_baselines"):
        get_chapter("nope")
    with pytest.raises(ConfigError, match="preset='huge'.*'smoke', 'cpu', 'gpu'"):
        get_chapter("dense_baselines").experiment("huge")


@pytest.mark.parametrize("name", CHAPTER_NAMES)
def test_presets_are_complete(name, monkeypatch):
    chapter = get_chapter(name)
    assert {"smoke", "cpu", "gpu"} <= set(chapter.presets)
    for preset in chapter.presets.values():
        assert preset.hardware and preset.expected_minutes > 0 and preset.seeds
        first = chapter.prerequisites(preset)
        if first and preset.name == "gpu":
            # A two-stage chapter plans its runs from its prerequisites' records, which only a GPU run makes: the
            # plan says which command makes them, and the prerequisites themselves are valid configs.
            with pytest.raises(MissingResultError, match=f"python -m vmoe_lib run {name} --preset gpu"):
                chapter.experiment(preset.name)
            assert all(r.config.epochs > 0 for r in first)
            continue
        if first and preset.name == "smoke":
            # The smoke preset's prerequisites are made by running it (CI does, in the notebook); planned here from
            # the committed cpu ones, whose records have the same form.
            of_record = chapter.prerequisite_results("cpu")
            monkeypatch.setattr(chapter, "prerequisite_results", lambda preset, _r=of_record: _r)
        configs = chapter.experiment(preset.name)
        monkeypatch.undo()
        assert configs, f"{name}/{preset.name} has an empty sweep"
    if chapter.prerequisites(chapter.preset("smoke")):
        of_record = chapter.prerequisite_results("cpu")
        monkeypatch.setattr(chapter, "prerequisite_results", lambda preset, _r=of_record: _r)
    smoke, cpu = chapter.experiment("smoke"), chapter.experiment("cpu")
    # The smoke preset exercises the same models as the preset of record, on less data.
    assert {c.model for c in smoke.values()} == {c.model for c in cpu.values()}
    assert all(c.train_subset for c in smoke.values())
    assert len(chapter.presets["cpu"].seeds) >= 3, "results of record need >= 3 seeds to show a spread"


@pytest.mark.parametrize("name", CHAPTER_NAMES)
def test_results_of_record_are_committed_and_fresh(name, monkeypatch):
    """Every (config, seed) of the cpu preset has a valid result file: the book build needs them.

    Fails (with the command that regenerates them) when an experiment's config
    changed since its results were recorded.
    """
    chapter = get_chapter(name)
    preset = chapter.presets["cpu"]
    monkeypatch.setenv("VMOE_REQUIRE_RESULTS", "1")  # never train: a missing result raises MissingResultError
    results = chapter.run("cpu", progress=False).results  # the chapter's own keys (with any post-training probe)
    seeds_of = getattr(chapter, "seeds_of", lambda _preset, _name: preset.seeds)  # a chapter may train some runs on fewer seeds
    assert len(results) == sum(len(seeds_of("cpu", name)) for name in chapter.experiment("cpu"))
    for r in results:
        assert r.manifest["git_sha"], f"{r.path} records no git sha"
        assert r.manifest["versions"]["torch"] and r.manifest["hardware"]
        assert len(r.history) == r.config.epochs


def test_overrides_go_to_a_separate_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(tmp_path))
    chapter = get_chapter("dense_baselines")
    with pytest.raises(ConfigError, match="unknown TrainConfig field"):
        chapter.run("smoke", overrides={"epochz": 1})
    from vmoe_lib.chapters.base import results_preset

    assert results_preset("cpu", {"epochs": 1}) == "custom"
    assert results_preset("cpu", {}) == "cpu"


@pytest.mark.parametrize("name", CHAPTER_NAMES)
def test_committed_verdicts_match_the_results(name, monkeypatch, tmp_path):
    """``results/cpu/<chapter>/verdicts.json`` is what the chapter computes now from the committed runs."""
    import json

    from vmoe_lib.results import results_root

    chapter = get_chapter(name)
    monkeypatch.setenv("VMOE_REQUIRE_RESULTS", "1")
    committed = results_root() / "cpu" / name / "verdicts.json"
    assert committed.exists(), f"{committed} is missing: run python -m vmoe_lib run {name} --preset cpu"
    results = chapter.run("cpu", progress=False)
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(tmp_path))
    chapter.verdicts(results)
    fresh = json.loads((tmp_path / "cpu" / name / "verdicts.json").read_text())
    assert json.loads(committed.read_text()) == fresh, (
        f"{committed} is stale: rerun python -m vmoe_lib run {name} --preset cpu (it reuses the stored runs)"
    )
