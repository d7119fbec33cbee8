"""The chapter machinery: a chapter declares its presets, runs, claims and figures; this module does the rest.

A chapter is a :class:`Chapter` subclass in its own module, with one instance registered in
:data:`vmoe_lib.chapters.CHAPTERS` (a notebook gets it with ``vl.chapters.get_chapter("placement")``). It declares

* ``name``, ``title`` and ``presets`` (``smoke``, ``cpu``, ``gpu``: :class:`Preset`);
* :meth:`Chapter.runs` — the runs of a preset (:class:`Run`: a config, its seeds of record, the probe that measures
  it after training, and the chapter it may be read from instead of trained: ``borrow_from``);
* :meth:`Chapter.claims` — its claims, pre-registered (:class:`~vmoe_lib.stats.Claim`), each with the
  :class:`Measure` that computes its test from the runs (:class:`SeedPaired`, :class:`PerImage`, :class:`Bypassed`,
  or one of the chapter's own);
* ``primary`` — the claims whose contrasts the ``cpu`` preset was sized for (the power note);
* the tables and figures only it has.

Everything else is shared and flows one way, preset → plan → sweep → results → verdicts → page:

* :meth:`Chapter.plan` resolves a preset once into a :class:`Plan` — every run with its seeds, where its records
  live (this chapter's folder, or the chapter it is borrowed from) and its probe;
* :meth:`Chapter.run` loads the plan's results and trains whatever is missing, every run from one queue
  (:func:`vmoe_lib.results.load_runs`), so no worker idles between runs of different seed counts;
* :meth:`Chapter.verdicts` decides the claims by the book's one rule and writes ``verdicts.json``;
* :meth:`Chapter.power_frame` / :meth:`Chapter.power_note`, :meth:`Chapter.control_table`,
  :meth:`Chapter.routing_table`, :meth:`Chapter.own_runs`, :meth:`Chapter.wall_minutes`,
  :meth:`Chapter.run_table` and :meth:`Chapter.preset_table`; provenance is :func:`vmoe_lib.book.provenance`.

The book's "Adding a chapter" page (``book/adding_a_chapter.md``) walks through a new chapter.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional, Union

import numpy as np
import pandas as pd

from ..analysis import bypass_correct_of, correct_of, load_cv, routing_of
from ..errors import ConfigError, check_bool, check_choice
from ..results import RunResult, RunSpec, load_runs, regenerate_command, results_root
from ..stats import (Claim, TestResult, VerdictRecord, decide_family, interaction, mcnemar, mde, noninferiority,
                     paired_bootstrap, paired_t, power_table, seeds_for_mde, tost, write_verdict_records)
from ..sweep import EXECUTORS, resolve_workers
from ..train import TrainConfig, check_device

__all__ = [
    "Preset", "Run", "Plan", "Chapter", "ChapterResults", "Measure", "Metric", "SeedPaired", "SeedPairedInteraction",
    "PerImage", "Bypassed", "control_claim",
    "select_preset", "apply_overrides", "results_preset", "preset_frame", "parse_seeds", "parse_overrides",
    "sweep_wall_minutes", "routing_at",
]


# ----------------------------------------------------------------------------------------------- declarations
@dataclass(frozen=True)
class Preset:
    """A named size of a chapter's experiment, with the hardware and time it was sized for.

    ``seeds`` are the seeds of record of every run that does not name its own; ``settings`` hold whatever the
    chapter's :meth:`Chapter.runs` reads (models, epochs, data subsets...).
    """

    name: str
    description: str
    hardware: str
    expected_minutes: float
    seeds: tuple[int, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Run:
    """One run a chapter shows.

    Args:
        name: its name in the chapter (tables, figures, claims' contrasts).
        config: what trains.
        seeds: its seeds of record (``None``: the preset's).
        probe: a post-training measurement stored in the record (an object with ``__call__(model, data, device)``
            and ``settings()``; see :mod:`vmoe_lib.chapters.probes`). Its settings enter the results key.
        borrow_from: a chapter (its name) whose preset of the same name has a run of the same config: the run is then
            that chapter's experiment (its probe too, so the same results key), and its seeds that chapter has are read
            from that chapter's results (trained there if missing), never trained twice; seeds it does not have are
            trained here as the same experiment. Where that chapter has no such run, the run is this chapter's own
            (with ``probe``).
    """

    name: str
    config: TrainConfig
    seeds: tuple[int, ...] | None = None
    probe: Any = None
    borrow_from: str | None = None


@dataclass(frozen=True)
class Plan:
    """A preset resolved once: every run with its seeds, the folder holding its records and its probe.

    ``specs`` are in training order (the chapter's declared order); ``folder`` is ``results/<folder>/``: the
    preset's own name, or ``custom`` with overrides; ``of_record`` is whether these are the preset's results of
    record (its own seeds, complete, no overrides).
    """

    chapter: str
    preset: Preset
    folder: str
    specs: tuple[RunSpec, ...]
    of_record: bool
    notes: tuple[str, ...] = ()

    def specs_of(self, name: str) -> list[RunSpec]:
        """The specs of run ``name``: one, or two when its first seeds are borrowed and the rest are this chapter's."""
        found = [s for s in self.specs if s.name == name]
        if not found:
            check_choice("run", name, list(dict.fromkeys(s.name for s in self.specs)))
        return found

    def spec(self, name: str) -> RunSpec:
        """The (first) spec of run ``name``."""
        return self.specs_of(name)[0]

    def configs(self) -> dict[str, TrainConfig]:
        """Run name -> config, in training order."""
        return {s.name: s.config for s in self.specs}

    def seeds_of(self, name: str) -> tuple[int, ...]:
        """The seeds run ``name`` trains with (borrowed and own together)."""
        return tuple(seed for s in self.specs_of(name) for seed in s.seeds)

    def borrowed(self) -> dict[str, tuple[str, str]]:
        """Runs read (at least for some seeds) from another chapter: this chapter's name -> (that chapter, the run's
        name there); for a run read from several chapters (a lender that borrows some seeds in turn), the first."""
        out: dict[str, tuple[str, str]] = {}
        for s in self.specs:
            if s.chapter != self.chapter:
                out.setdefault(s.name, (s.chapter, s.stored_as or s.name))
        return out


#: What a seed-paired measure reads from a run: a final metric's name (``"test_accuracy"``) or a function of the run.
Metric = Union[str, Callable[[RunResult], Optional[float]]]


@dataclass
class ChapterResults:
    """A chapter's runs for one preset, as :meth:`Chapter.run` returns them.

    ``preset`` is the results folder (``cpu``, ``gpu``, ``smoke`` or ``custom``); ``plan`` the plan they came from
    (its preset names the claims that apply, also for ``custom`` results).
    """

    chapter: str
    preset: str
    results: list[RunResult]
    of_record: bool = True  # the preset's own seeds, complete, without overrides
    plan: Plan | None = None

    def verdicts_path(self) -> Path:
        """Where this sweep's verdicts go: the preset's ``verdicts.json`` of record only for the preset's own,
        complete seed list without overrides; ``results/custom/<chapter>/verdicts.json`` otherwise."""
        return results_root() / (self.preset if self.of_record else "custom") / self.chapter / "verdicts.json"

    def by_name(self) -> dict[str, list[RunResult]]:
        """Runs grouped by their name in the sweep, in sweep order."""
        out: dict[str, list[RunResult]] = {}
        for r in self.results:
            out.setdefault(r.name, []).append(r)
        return out

    def by_seed(self, name: str, metric: Metric = "test_accuracy") -> dict[int, float]:
        """Seed -> ``metric`` of run ``name``: a final metric's name, or a function of the run (seeds where it gives
        ``None`` are left out)."""
        out = {}
        for r in self.results:
            if r.name == name:
                value = r.final[metric] if isinstance(metric, str) else metric(r)
                if value is not None:
                    out[r.seed] = float(value)
        return out

    def paired(self, a: str, b: str, metric: Metric = "test_accuracy") -> tuple[list[float], list[float]]:
        """The ``metric`` (see :meth:`by_seed`) of runs ``a`` and ``b`` on the seeds both have, in seed order (paired
        by seed)."""
        va, vb = self.by_seed(a, metric), self.by_seed(b, metric)
        seeds = sorted(set(va) & set(vb))
        return [va[s] for s in seeds], [vb[s] for s in seeds]

    def values(self, name: str, metric: Metric = "test_accuracy") -> list[float]:
        """The ``metric`` (see :meth:`by_seed`) of every seed of run ``name`` (empty if the sweep has no such run)."""
        return list(self.by_seed(name, metric).values())

    def runs_of(self, name: str) -> list[RunResult]:
        """The stored seeds of run ``name``, in seed order."""
        return sorted((r for r in self.results if r.name == name), key=lambda r: r.seed)


# ----------------------------------------------------------------------------------------------- measures
class Measure:
    """How a claim's test is computed from a chapter's runs: ``measure(claim, results) -> TestResult | None``.

    ``None`` means the runs it needs are missing (the claim is then inconclusive). Measures are frozen dataclasses
    declared inside the claim (``Claim(..., measure=SeedPaired("a", "b"))``), so a claim says what it reads.
    """

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:  # pragma: no cover - abstract
        raise NotImplementedError


def _seed_paired_test(claim: Claim, a: Sequence[float], b: Sequence[float]) -> TestResult | None:
    """The claim's test (``paired_t``, ``noninferiority`` or ``tost``) on per-seed values paired by seed."""
    if len(a) < 2:
        return None
    if claim.test == "noninferiority":
        return noninferiority(a, b, margin=claim.min_effect, paired=True)
    if claim.test == "tost":
        return tost(a, b, margin=claim.min_effect, paired=True)
    if claim.test != "paired_t":
        raise ConfigError(f"claim {claim.id!r}: test={claim.test!r} cannot read seed-paired values; use paired_t, "
                          f"noninferiority or tost")
    return paired_t(a, b, direction=claim.direction)


@dataclass(frozen=True)
class SeedPaired(Measure):
    """The final ``metric`` of runs ``a`` and ``b`` on the seeds both have, paired by seed (same data order and
    initial RNG), tested by the claim's test: ``paired_t``, ``noninferiority`` or ``tost``."""

    a: str
    b: str
    metric: Metric = "test_accuracy"

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:
        va, vb = results.paired(self.a, self.b, self.metric)
        return _seed_paired_test(claim, va, vb)


@dataclass(frozen=True)
class SeedPairedInteraction(Measure):
    """An interaction: per seed, ``(a - b) - (c - d)`` of ``metric`` (a difference of two seed-paired differences, e.g.
    the gain of many experts over few with much data minus that gain with little), on the seeds all four runs have,
    tested by :func:`vmoe_lib.stats.interaction` (the claim's ``test="interaction"``) in the claim's direction. Its
    spread is about sqrt(2) times a single contrast's, so it needs about twice the seeds for the same MDE (four times,
    against a main effect of the same size)."""

    a: str
    b: str
    c: str
    d: str
    metric: Metric = "test_accuracy"

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:
        if claim.test != "interaction":
            raise ConfigError(f"claim {claim.id!r}: an interaction is tested by test='interaction', not {claim.test!r}")
        v = {name: results.by_seed(name, self.metric) for name in (self.a, self.b, self.c, self.d)}
        seeds = sorted(set.intersection(*(set(x) for x in v.values())))
        if len(seeds) < 2:
            return None
        return interaction(*([v[name][s] for s in seeds] for name in (self.a, self.b, self.c, self.d)),
                           direction=claim.direction)


def _stacked_correct(results: ChapterResults, name: str, seeds: Sequence[int] | None = None) -> np.ndarray | None:
    runs = [r for r in results.runs_of(name) if seeds is None or r.seed in seeds]
    if not runs or not all(r.record.get("predictions") for r in runs):
        return None
    return np.stack([correct_of(r) for r in runs])


@dataclass(frozen=True)
class PerImage(Measure):
    """Per test image: which images runs ``a`` and ``b`` got right, on the seeds both have, tested by the claim's
    test: ``mcnemar`` (discordant images pooled over seeds) or ``paired_bootstrap`` (images resampled)."""

    a: str
    b: str

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:
        seeds = sorted({r.seed for r in results.runs_of(self.a)} & {r.seed for r in results.runs_of(self.b)})
        ca, cb = _stacked_correct(results, self.a, seeds), _stacked_correct(results, self.b, seeds)
        if ca is None or cb is None or not seeds:
            return None
        if claim.test == "paired_bootstrap":
            return paired_bootstrap(ca, cb, direction=claim.direction)
        return mcnemar(ca, cb, direction=claim.direction)


@dataclass(frozen=True)
class Bypassed(Measure):
    """The positive control of an MoE run: per test image, right as trained vs right with every MoE layer bypassed
    at inference (McNemar, discordant images pooled over seeds). Positive: the weight the experts carry."""

    run: str

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:
        runs = results.runs_of(self.run)
        if not runs or not all(r.record.get("moe_bypass") and r.record.get("predictions") for r in runs):
            return None
        return mcnemar(np.stack([correct_of(r) for r in runs]), np.stack([bypass_correct_of(r) for r in runs]))


def _seed_span(seeds: Sequence[int]) -> str:
    """``0-5``, ``6-9``, ``0, 2, 4``: seeds as a short text."""
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def control_claim(run: str, *, family: str, min_effect: float, min_effect_why: str, claim_id: str | None = None,
                  label: str | None = None) -> Claim:
    """The positive control of an MoE run (``kind="control"``, measured by :class:`Bypassed`): its experts carry
    weight, i.e. bypassing every MoE layer at inference costs accuracy, and not demonstrably less than ``min_effect``
    points (the rule's reading: above zero, with a 95 % upper bound that reaches the bar). The claims that compare the
    mechanism depend on it (``control=``)."""
    return Claim(
        id=claim_id or f"experts_carry_weight_{run}",
        claim=(f"The experts of {label or run} carry weight: bypassing every MoE layer at inference costs accuracy, "
               f"not shown to be less than {min_effect:g} point"),
        source="positive control: the weight the experts carry", contrast=f"{run} vs {run} with its MoE layers bypassed",
        test="mcnemar", min_effect=min_effect, min_effect_why=min_effect_why, family=family, paired=True,
        kind="control", measure=Bypassed(run),
    )


# ----------------------------------------------------------------------------------------------- overrides, seeds
def select_preset(presets: Mapping[str, Preset], name: str) -> Preset:
    """The preset called ``name``; :class:`ConfigError` listing the allowed names otherwise."""
    check_choice("preset", name, list(presets))
    return presets[name]


def _merge(base: Mapping[str, Any], changes: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` applied; nested dicts (``model_kwargs``, ``router_options``) merge key by key."""
    out = copy.deepcopy(dict(base))
    for key, value in changes.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _is_moe(model: str) -> bool:
    from ..models import moe_convnext_model_names, moe_vit_model_names

    return model in moe_vit_model_names() or model in moe_convnext_model_names()


def apply_overrides(configs: Mapping[str, TrainConfig], overrides: Mapping[str, Any] | None,
                    notes: list[str] | None = None) -> dict[str, TrainConfig]:
    """Apply ``TrainConfig`` field overrides (e.g. ``{"epochs": 2}``) to every config of a sweep.

    Nested dicts merge: ``{"model_kwargs": {"num_experts": 4}}`` changes the expert count of every
    run and keeps each run's other model arguments (its router, say). A ``model_kwargs`` key that is an MoE setting
    (``num_experts``, ``k``, ``router``, ``moe_layers``...; :data:`vmoe_lib.models.moe_utils.MOE_DEFAULTS`) applies to
    the MoE runs only: a dense run has no experts and keeps its own arguments (``notes``, when given, says so); an MoE
    setting no run of the sweep has is rejected. Every changed config is validated before anything trains, and an
    override that makes two runs of the sweep the same experiment is rejected.
    """
    from ..models.moe_utils import MOE_DEFAULTS

    if not overrides:
        return dict(configs)
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides={overrides!r} is invalid; it must be a dict of TrainConfig fields")
    kwargs = overrides.get("model_kwargs")
    moe_only = sorted(set(kwargs) & set(MOE_DEFAULTS)) if isinstance(kwargs, Mapping) else []
    moe_runs = [name for name, cfg in configs.items() if _is_moe(cfg.model)]
    if moe_only and not moe_runs:
        raise ConfigError(f"overrides model_kwargs {moe_only} are MoE settings, and no run of this sweep is an MoE model "
                          f"(runs: {sorted(configs)})")
    out = {}
    for name, cfg in configs.items():
        changes = dict(overrides)
        if moe_only and name not in moe_runs:
            changes["model_kwargs"] = {k: v for k, v in kwargs.items() if k not in moe_only}
        try:
            out[name] = TrainConfig.from_dict(_merge(cfg.to_dict(), changes))
        except ConfigError as err:
            raise ConfigError(f"overrides={dict(overrides)!r} make run {name!r} invalid: {err}") from None
    skipped = [name for name in configs if moe_only and name not in moe_runs]
    if skipped and notes is not None:
        notes.append(f"overrides model_kwargs {moe_only} are MoE settings: they change the MoE runs only; "
                     f"{', '.join(skipped)} (dense) keep{'s' * (len(skipped) == 1)} their own")
    seen: dict[str, str] = {}
    for name, cfg in out.items():
        text = json.dumps(cfg.to_dict(), sort_keys=True)
        before = json.dumps(configs[name].to_dict(), sort_keys=True)
        if text in seen and json.dumps(configs[seen[text]].to_dict(), sort_keys=True) != before:
            raise ConfigError(
                f"overrides={dict(overrides)!r} make runs {seen[text]!r} and {name!r} the same experiment; "
                f"override only fields that keep the sweep's runs distinct"
            )
        seen.setdefault(text, name)
    return out


def parse_seeds(seeds: Any) -> list[int] | None:
    """Seeds as papermill or a user passes them: a list/tuple of ints, one int, or a string.

    Strings may be ``"0,1,2"``, ``"0 1 2"`` or ``"[0, 1, 2]"`` (``papermill -p seeds '[0, 1]'`` passes a
    string). ``None`` keeps the preset's seeds. An empty list and duplicate seeds are rejected.
    """
    if seeds is None:
        return None
    shown = seeds
    if isinstance(seeds, str):
        text = seeds.strip()
        if text.lower() in ("none", ""):
            if text == "":
                raise ConfigError("seeds='' is empty; pass at least one seed, e.g. seeds=[0], or None for the preset's")
            return None
        text = text.strip("[]() ")
        parts = [p for p in text.replace(",", " ").split() if p]
        try:
            seeds = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(f"seeds={shown!r} is invalid; allowed: a list of ints, an int, or a string like '0,1,2'") from None
    elif isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if not isinstance(seeds, (list, tuple)) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ConfigError(f"seeds={shown!r} is invalid; allowed: a list of ints, an int, or a string like '0,1,2'")
    if not seeds:
        raise ConfigError(f"seeds={shown!r} is empty; pass at least one seed, e.g. seeds=[0], or None for the preset's")
    if any(s < 0 for s in seeds):
        raise ConfigError(f"seeds={shown!r} is invalid; seeds must be ints >= 0")
    duplicates = sorted({s for s in seeds if list(seeds).count(s) > 1})
    if duplicates:
        raise ConfigError(f"seeds={shown!r} has duplicate seed(s) {duplicates}; each seed may appear once")
    return list(seeds)


def parse_overrides(overrides: Any) -> dict[str, Any] | None:
    """Overrides as a dict; a JSON string (``papermill -p overrides '{...}'`` passes one) is parsed."""
    if overrides is None or (isinstance(overrides, (str, Mapping)) and not overrides):
        return None
    if isinstance(overrides, str):
        try:
            overrides = json.loads(overrides)
        except ValueError as err:
            raise ConfigError(
                f"overrides={overrides!r} is not valid JSON ({err}); pass a dict, or with papermill use "
                f"-y 'overrides: {{epochs: 2}}'"
            ) from None
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides={overrides!r} is invalid; it must be a dict of TrainConfig fields")
    return dict(overrides) or None


def results_preset(preset: str, overrides: Mapping[str, Any] | None) -> str:
    """Folder a run's results go to: the preset's own, or ``custom`` when overridden.

    Overridden configs get their own keys anyway; keeping them out of the
    preset's folder keeps results of record free of one-off experiments.
    Extra seeds of an unchanged config are still the preset's results.
    """
    return "custom" if overrides else preset


def preset_frame(presets: Mapping[str, Preset]) -> pd.DataFrame:
    """A chapter's presets as a table: what each runs, its hardware, expected wall time and seeds."""
    return pd.DataFrame(
        [{"preset": p.name, "what": p.description, "hardware": p.hardware, "expected minutes": p.expected_minutes,
          "seeds": len(p.seeds)} for p in presets.values()]
    ).set_index("preset")


def sweep_wall_minutes(results: Sequence[RunResult]) -> float:
    """Wall minutes the sweep that made ``results`` took: from the start of its first run to the end of its
    last (each manifest holds when its run finished and how long its worker took from start to end).

    With parallel workers this is what a reader waits, less than the sum of the runs' times. A sweep
    trained in several sittings counts the pauses between them too.
    """
    from datetime import datetime, timedelta

    spans = []
    for r in results:
        end = r.manifest.get("finished_at")
        seconds = r.manifest.get("session_seconds")
        if end is None or seconds is None:
            continue
        finish = datetime.fromisoformat(end)
        spans.append((finish - timedelta(seconds=float(seconds)), finish))
    if not spans:
        return float("nan")
    return (max(e for _, e in spans) - min(s for s, _ in spans)).total_seconds() / 60


def _probe_hash(probe: Any) -> dict[str, Any] | None:
    return {"probe": probe.settings()} if probe is not None else None


# ----------------------------------------------------------------------------------------------- the chapter
class Chapter:
    """What every chapter shares; a chapter subclasses it and declares its presets, runs and claims.

    Subclasses set ``name``, ``title`` and ``presets`` and implement :meth:`runs` and :meth:`claims`; ``primary``
    names the claims whose contrasts the ``cpu`` preset was sized for (:meth:`power_note`), ``power_target`` the
    MDE it aims at (points).
    """

    name: ClassVar[str]
    title: ClassVar[str] = ""
    presets: ClassVar[dict[str, Preset]]
    primary: ClassVar[tuple[str, ...]] = ()
    power_target: ClassVar[float] = 0.5
    benchmark: ClassVar[Optional[str]] = None

    # -- what a chapter declares ------------------------------------------------------------------------------
    def runs(self, preset: Preset) -> list[Run]:
        """The runs of ``preset``, in training order (costlier first keeps the sweep's tail short)."""
        raise NotImplementedError

    def claims(self, preset: str) -> list[Claim]:
        """The chapter's claims for ``preset``, declared before any result is read, each with its measure."""
        raise NotImplementedError

    def prerequisites(self, preset: Preset) -> list[Run]:
        """Runs whose records :meth:`runs` computes other runs' configs from (a two-stage design, e.g. super-classes
        clustered from a trained model's confusion matrix). :meth:`run` trains them first, then resolves the plan;
        :meth:`runs` lists them too, so they are shown and verified with the others. They keep their own seeds and
        configs whatever ``seeds`` and ``overrides`` say (they are part of the preset's design). Default: none."""
        return []

    def _prerequisite_specs(self, p: Preset) -> list[RunSpec]:
        return [RunSpec(r.name, r.config, tuple(r.seeds) if r.seeds is not None else tuple(p.seeds), self.name,
                        extra_eval=r.probe, hash_extra=_probe_hash(r.probe)) for r in self.prerequisites(p)]

    def prerequisite_results(self, preset: str) -> ChapterResults:
        """The stored records of :meth:`prerequisites` (read, never trained): a missing one raises
        :class:`~vmoe_lib.results.MissingResultError` naming the command that makes it (``run`` trains it first)."""
        p = self.preset(preset)
        results = load_runs(self._prerequisite_specs(p), p.name, progress=False, require=True,
                            regenerate=regenerate_command(self.name, preset))
        return ChapterResults(self.name, p.name, results, of_record=True)

    def display_order(self, names: Sequence[str]) -> list[str]:
        """The order runs are shown in (default: as declared)."""
        return list(names)

    # -- preset -> plan -----------------------------------------------------------------------------------------
    def preset(self, name: str) -> Preset:
        """The preset called ``name`` (a clear error listing the chapter's presets otherwise)."""
        return select_preset(self.presets, name)

    def plan(self, preset: str, seeds: Any = None, overrides: Any = None) -> Plan:
        """Resolve ``preset`` once: every run with its seeds, its folder (borrowed or own) and its probe.

        ``seeds`` (a list, an int, a string such as ``"0,1"``; see :func:`parse_seeds`) replaces every run's seeds;
        ``overrides`` (``TrainConfig`` fields, nested dicts merged; a JSON string is parsed) change every config
        and send the results to ``results/custom/``.
        """
        p = self.preset(preset)
        seeds = parse_seeds(seeds)
        overrides = parse_overrides(overrides)
        declared = self.runs(p)
        names = [r.name for r in declared]
        if len(set(names)) != len(names):
            raise ConfigError(f"chapter {self.name!r} declares run names twice: {sorted({n for n in names if names.count(n) > 1})}")
        notes: list[str] = []
        configs = apply_overrides({r.name: r.config for r in declared}, overrides, notes)
        fixed = {r.name for r in self.prerequisites(p)}  # the preset's design: neither seeds nor overrides apply
        configs.update({r.name: r.config for r in declared if r.name in fixed})
        specs, of_record = [], not overrides
        for r in declared:
            own = tuple(r.seeds) if r.seeds is not None else tuple(p.seeds)
            chosen = tuple(seeds) if seeds and r.name not in fixed else own
            of_record = of_record and sorted(chosen) == sorted(own)
            lent = self._lender(r, preset)
            if not lent:
                specs.append(RunSpec(r.name, configs[r.name], chosen, self.name, extra_eval=r.probe,
                                     hash_extra=_probe_hash(r.probe)))
                continue
            # A borrowed run is the lender's experiment, probe included (the same key): its seeds the lender has are
            # read from where the lender reads them (its own results, or a chapter it borrows them from in turn), any
            # others are trained here as the same experiment.
            common = dict(extra_eval=lent[0].extra_eval, hash_extra=lent[0].hash_extra)
            taken: set[int] = set()
            for there in lent:
                lent_seeds = tuple(x for x in chosen if x in there.seeds and x not in taken)
                taken.update(lent_seeds)
                if lent_seeds:
                    specs.append(RunSpec(r.name, configs[r.name], lent_seeds, there.chapter,
                                         stored_as=there.stored_as or there.name, **common))
            rest = tuple(x for x in chosen if x not in taken)
            if rest:
                specs.append(RunSpec(r.name, configs[r.name], rest, self.name, **common))
        return Plan(self.name, p, results_preset(preset, overrides), tuple(specs), of_record, tuple(notes))

    def _lender(self, run: Run, preset: str) -> list[RunSpec]:
        """The lender's specs of ``run`` (``borrow_from``): those of the lender's preset of the same name whose config
        is the same experiment, wherever the lender reads them from (its own folder, or a chapter it borrows from in
        turn); empty when there are none (the run is then this chapter's own)."""
        if run.borrow_from is None:
            return []
        from . import get_chapter

        lender = get_chapter(run.borrow_from)
        if preset not in lender.presets:
            return []
        config = run.config.to_dict()
        return [spec for spec in lender.plan(preset).specs if spec.config.to_dict() == config]

    def experiment(self, preset: str) -> dict[str, TrainConfig]:
        """The sweep of a preset: run name -> config, in training order."""
        return self.plan(preset).configs()

    def seeds_of(self, preset: str, name: str) -> tuple[int, ...]:
        """The seeds of record of run ``name`` in ``preset``."""
        return self.plan(preset).seeds_of(name)

    def borrowed(self, preset: str) -> dict[str, str]:
        """Runs of ``preset`` read from another chapter: this chapter's name -> the run's name there."""
        return {name: there for name, (_, there) in self.plan(preset).borrowed().items()}

    # -- plan -> sweep -> results -------------------------------------------------------------------------------
    def run(self, preset: str = "smoke", seeds: Any = None, device: str = "auto", overrides: Any = None,
            progress: bool = True, *, workers: int | str = 1, executor: str = "local",
            slurm: Mapping[str, Any] | None = None, compile: bool = False) -> ChapterResults:
        """Load the preset's results, training whatever is missing (unless results are required), all from one queue.

        Args:
            preset: ``smoke``, ``cpu`` or ``gpu`` (see :meth:`preset_table`).
            seeds: ``None``: each run's seeds of record; or one list for every run (see :func:`parse_seeds`).
                Verdicts of record are only written for the preset's own seeds.
            device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``, ``mps``.
            overrides: ``TrainConfig`` fields changed in every config (nested dicts merge); results go to
                ``results/custom``.
            progress: one bar for the sweep, one line per worker.
            workers: parallel worker processes of the ``local`` executor (an int or ``"auto"``).
            executor: ``local`` (pinned worker processes, the default), ``inline``, ``slurm`` or ``torchrun``
                (see :mod:`vmoe_lib.sweep`).
            slurm: options of the ``slurm`` executor.
            compile: train the missing runs under ``torch.compile`` (off by default; the manifests record it).
        """
        check_choice("executor", executor, EXECUTORS)
        check_bool("compile", compile)
        check_device(device, here=executor != "slurm")  # a bad value fails here, before anything loads
        resolve_workers(workers, device)
        parse_seeds(seeds), parse_overrides(overrides)  # bad values fail before the prerequisites train
        first = self._prerequisite_specs(self.preset(preset))
        if first:  # a two-stage design: the runs the plan is computed from, trained (or read) first
            load_runs(first, preset, device=device, progress=progress, executor=executor, workers=workers,
                      slurm=slurm, compile=compile, regenerate=regenerate_command(self.name, preset))
        plan = self.plan(preset, seeds, overrides)
        for note in plan.notes:
            print(note, flush=True)
        results = load_runs(plan.specs, plan.folder, device=device, progress=progress, executor=executor,
                            workers=workers, slurm=slurm, regenerate=regenerate_command(self.name, preset),
                            compile=compile)
        if not plan.of_record and plan.folder != "custom":
            print(f"seeds {list(plan.specs[0].seeds)} are not preset {preset!r}'s own: verdicts go to "
                  f"results/custom/{self.name}/, not to the verdicts of record", flush=True)
        order = {name: i for i, name in enumerate(self.display_order([s.name for s in plan.specs]))}
        results.sort(key=lambda r: (order.get(r.name, len(order)), r.seed))
        return ChapterResults(self.name, plan.folder, results, of_record=plan.of_record, plan=plan)

    def results_of_record(self, preset: str = "cpu") -> ChapterResults:
        """The committed results of ``preset`` (its own seeds, no overrides), read and never trained: a missing or
        stale record raises :class:`~vmoe_lib.results.MissingResultError` naming the command that makes it."""
        plan = self.plan(preset)
        results = load_runs(plan.specs, plan.folder, progress=False, require=True,
                            regenerate=regenerate_command(self.name, preset))
        return ChapterResults(self.name, plan.folder, results, of_record=plan.of_record, plan=plan)

    def preset_of(self, results: ChapterResults) -> str:
        """The preset whose claims apply to ``results`` (``custom`` results: the preset they were planned from)."""
        if results.plan is not None:
            return results.plan.preset.name
        return results.preset if results.preset in self.presets else "cpu"

    # -- results -> verdicts ------------------------------------------------------------------------------------
    def test_results(self, results: ChapterResults) -> dict[str, TestResult | None]:
        """Each declared claim's test, computed by its measure from the stored runs (``None``: runs missing)."""
        out: dict[str, TestResult | None] = {}
        for claim in self.claims(self.preset_of(results)):
            if claim.measure is None:
                raise ConfigError(f"claim {claim.id!r} of chapter {self.name!r} declares no measure: say how its test "
                                  f"is computed (e.g. measure=SeedPaired('a', 'b'))")
            out[claim.id] = claim.measure(claim, results)
        return out

    def verdicts(self, results: ChapterResults, *, write: bool = True) -> list[VerdictRecord]:
        """The chapter's claims decided by the book's rule (:mod:`vmoe_lib.stats`), written to ``verdicts.json``."""
        out = decide_family(self.claims(self.preset_of(results)), self.test_results(results))
        if write:
            write_verdict_records(out, results.verdicts_path())
        return out

    # -- power ----------------------------------------------------------------------------------------------------
    def power_designs(self, results: ChapterResults, tests: Mapping[str, TestResult | None] | None = None
                      ) -> dict[str, tuple[float, bool]]:
        """The designs of the power table: label -> (sd in points, paired). Default: every seed-paired contrast of
        the claims (the sd of its per-seed differences), once per contrast."""
        tests = self.test_results(results) if tests is None else tests
        out: dict[str, tuple[float, bool]] = {}
        for claim in self.claims(self.preset_of(results)):
            r = tests.get(claim.id)
            if r is not None and "sd_diff" in r.detail and claim.contrast not in out:
                out[claim.contrast] = (float(r.detail["sd_diff"]), True)
        return out

    def power_frame(self, results: ChapterResults, target: float | None = None) -> pd.DataFrame:
        """The power table: per design, the sd measured here and the MDE (points, one-sided alpha 0.05, 80 % power)
        at several seed counts, and the seeds an MDE of ``target`` points needs."""
        sds = self.power_designs(results)
        return power_table(sds, target=self.power_target if target is None else target) if sds else pd.DataFrame()

    def power_note(self, results: ChapterResults, target: float | None = None) -> str:
        """Markdown: each primary contrast's MDE at this sweep's seeds, the seeds an MDE of ``target`` needs at the
        measured sd, and what they would cost on this machine (the CPU minutes per seed of the runs trained on the
        contrast's seeds, on 2 workers)."""
        target = self.power_target if target is None else target
        tests = self.test_results(results)
        claims = {c.id: c for c in self.claims(self.preset_of(results))}
        lines = []
        for claim_id in self.primary:
            r, claim = tests.get(claim_id), claims[claim_id]
            if r is None or "sd_diff" not in r.detail:
                lines.append(f"* `{claim_id}`: too few seeds here to measure its spread.")
                continue
            sd, n = float(r.detail["sd_diff"]), int(r.n)
            need = seeds_for_mde(sd, target, paired=True)
            reached = "meets" if mde(sd, n, paired=True) <= target else "misses"
            per_seed, runs = self._minutes_per_seed(results, claim)
            cost = (f"{need} seeds, about {need * per_seed / 2:.0f} min on 2 workers at {per_seed:.0f} CPU-min per seed "
                    f"of the {runs} runs trained on its seeds" if need is not None else "more than 200 seeds")
            lines.append(f"* `{claim_id}` ({claim.contrast}): MDE {mde(sd, n, paired=True):.2f} points with {n} seeds "
                         f"(sd of the paired differences {sd:.2f}); it {reached} the {target:g}-point goal, which "
                         f"needs {cost}.")
        return "\n".join(lines)

    def _minutes_per_seed(self, results: ChapterResults, claim: Claim) -> tuple[float, int]:
        """CPU minutes per seed of this chapter's own runs trained on the seeds of the claim's arms, and how many."""
        arms = [a for a in (getattr(claim.measure, name, None) for name in "abcd") if isinstance(a, str)]
        seeds = {r.seed for a in arms for r in results.runs_of(a)}
        groups = {}
        for r in self.own(results):
            groups.setdefault(r.name, set()).add(r.seed)
        names = [n for n, s in groups.items() if s == seeds] or list(groups)
        mine = [r for r in self.own(results) if r.name in names]
        n_seeds = max(1, len({r.seed for r in mine}))
        return sum(float(r.record.get("wall_time_s", 0.0)) for r in mine) / 60 / n_seeds, len(names)

    # -- own runs, wall time --------------------------------------------------------------------------------------
    def own(self, results: ChapterResults) -> list[RunResult]:
        """The runs this chapter trained (borrowed runs are another chapter's)."""
        return [r for r in results.results if r.manifest.get("chapter") == self.name]

    def own_runs(self, results: ChapterResults) -> int:
        """How many of the runs shown this chapter trained."""
        return len(self.own(results))

    def wall_minutes(self, results: ChapterResults) -> float:
        """Wall minutes of this chapter's own sweep (:func:`sweep_wall_minutes` over the runs it trained)."""
        return sweep_wall_minutes(self.own(results))

    # -- shared tables ---------------------------------------------------------------------------------------------
    def preset_table(self) -> pd.DataFrame:
        """The presets, their hardware and expected wall time (for the chapter header)."""
        return preset_frame(self.presets)

    def run_table(self, preset: str, columns: Sequence[str] = ()) -> pd.DataFrame:
        """The runs of ``preset``: model, epochs, seeds, where their records come from, and the ``model_kwargs``
        named in ``columns``. A column with one value for every run moves to the table's caption
        (``frame.attrs["caption"]``, which :func:`vmoe_lib.book.table` shows), so the table keeps what differs."""
        from ..book import cell_text

        plan = self.plan(preset)
        rows: dict[str, dict[str, Any]] = {}
        for s in plan.specs:  # a run read from another chapter for some seeds has one spec per source
            kwargs = s.config.model_kwargs or {}
            source = "this chapter" if s.chapter == self.name else f"{s.chapter} ({s.stored_as})"
            if s.name in rows:
                rows[s.name]["seeds"] += len(s.seeds)
                rows[s.name]["from"] += f"; {source}: seeds {_seed_span(s.seeds)}"
                continue
            several = sum(t.name == s.name for t in plan.specs) > 1
            rows[s.name] = {"model": s.config.model, "epochs": s.config.epochs, "seeds": len(s.seeds),
                            "from": f"{source}: seeds {_seed_span(s.seeds)}" if several else source,
                            **{c: kwargs.get(c, "") for c in columns}}
        frame = pd.DataFrame.from_dict(rows, orient="index")
        same = [c for c in frame.columns if len(frame) > 1 and frame[c].map(cell_text).nunique() == 1]
        out = frame.drop(columns=same)
        if same:
            out.attrs["caption"] = "Every run: " + "; ".join(f"{c} {cell_text(frame[c].iloc[0])}" for c in same) + "."
        return out

    def benchmark_report(self, device: str = "cpu") -> dict[str, Any] | None:
        """The chapter's sizing benchmark of record (``results/benchmarks/<device>/<benchmark>.json``, ``benchmark`` a
        class attribute): its manifest and one row per model; ``None`` if there is none."""
        from ..results import _repo_root

        path = _repo_root() / "results" / "benchmarks" / device / f"{self.benchmark}.json" if self.benchmark else None
        return json.loads(path.read_text()) if path is not None and path.exists() else None

    def throughput_table(self, device: str = "cpu") -> pd.DataFrame:
        """The training step of the chapter's models from its sizing benchmark of record (``benchmarks/bench_<name>.py``
        -> ``results/benchmarks/<device>/<benchmark>.json``, ``benchmark`` a class attribute): parameters, activated
        parameters and FLOPs per image, milliseconds per step of 128 images and the ratio to the dense model's step,
        measured side by side. Empty if the chapter has no benchmark or it has not been run on ``device``."""
        report = self.benchmark_report(device)
        if report is None:
            return pd.DataFrame()
        rows = {}
        for row in report["rows"]:
            rows[row["model"]] = {"params (k)": f"{row['params_total'] / 1e3:.0f}",
                                  "activated (k)": f"{row['params_activated'] / 1e3:.0f}",
                                  "MFLOPs / image": f"{row['flops_per_image'] / 1e6:.2f}",
                                  "train step (ms)": f"{1e3 * row['step_s']:.1f}",
                                  "vs dense": f"{row['vs_dense']:.2f}x",
                                  "eval images / s": f"{row['eval_images_per_s']:.0f}"}
        frame = pd.DataFrame.from_dict(rows, orient="index")
        m = report["manifest"]
        frame.attrs["caption"] = (f"Measured by `{m['command']}` at {str(m.get('git_sha') or '')[:7]} on "
                                  f"{m.get('cpu_model') or m.get('platform')}, {m['torch_threads']} thread(s), "
                                  f"minimum of {m['repeats']} interleaved repeats.")
        return frame

    def control_table(self, results: ChapterResults) -> pd.DataFrame:
        """Per MoE run: test accuracy as trained and with every MoE layer bypassed at inference (mean over seeds), and
        the cost of bypassing (points): the weight the experts carry."""
        rows = {}
        for name, runs in results.by_name().items():
            if not all(r.record.get("moe_bypass") for r in runs):
                continue
            acc = np.mean([r.final["test_accuracy"] for r in runs]) * 100
            bypass = np.mean([r.record["moe_bypass"]["accuracy"] for r in runs]) * 100
            rows[name] = {"test acc. (%)": round(acc, 2), "MoE bypassed (%)": round(bypass, 2),
                          "cost of bypassing (points)": round(acc - bypass, 2)}
        return pd.DataFrame.from_dict(rows, orient="index")

    def routing_table(self, results: ChapterResults, training_capacity: float | None = None) -> pd.DataFrame:
        """Per MoE run and layer (mean over seeds, test set, as the probe recorded it): expert load CV, busiest and
        idlest expert's share, tokens dropped at inference (and at ``training_capacity``, where the probe measured
        it), gate entropy (nats; log E is uniform) and tokens processed by 0 / 1 / 2 / 3+ experts."""
        rows = []
        for name, runs in results.by_name().items():
            first = routing_of(runs[0])
            for layer in first:
                per_seed = [routing_of(r)[layer] for r in runs if layer in routing_of(r)]
                load = np.mean([s["expert_load"] for s in per_seed], axis=0)
                entropy = [s["gate_entropy"] for s in per_seed if "gate_entropy" in s]
                hist = np.mean([s["experts_per_token_hist"] for s in per_seed], axis=0)
                row = {"run": name, "layer": per_seed[0]["layer"],
                       "load CV": round(float(np.mean([load_cv(s["expert_load"]) for s in per_seed])), 3),
                       "busiest expert (%)": round(100 * float(load.max()), 1),
                       "idlest expert (%)": round(100 * float(load.min()), 1),
                       "dropped at inference (%)": round(100 * float(np.mean([s["dropped_fraction"] for s in per_seed])), 2)}
                if training_capacity is not None:
                    at = [routing_at(r, training_capacity).get(layer, {}).get("dropped_fraction") for r in runs]
                    row[f"dropped at cf {training_capacity:g} (%)"] = (round(100 * float(np.mean(at)), 1)
                                                                      if at and None not in at else None)
                row["gate entropy (nats)"] = round(float(np.mean(entropy)), 3) if entropy else None
                row["tokens with 0/1/2/3+ experts (%)"] = " / ".join(f"{100 * v:.0f}" for v in (*hist[:3], hist[3:].sum()))
                rows.append(row)
        return pd.DataFrame(rows).set_index(["run", "layer"]) if rows else pd.DataFrame()

    def __repr__(self) -> str:
        return f"<chapter {self.name!r}: {self.title}>"


def routing_at(result: RunResult, capacity_factor: float) -> dict[str, dict[str, Any]]:
    """The routing statistics a probe measured at an inference capacity factor (``{}`` if not measured; see
    :class:`~vmoe_lib.chapters.probes.RoutingStatsProbe`)."""
    at = (result.record.get("extra") or {}).get("routing_at_capacity", {})
    return at.get(f"{float(capacity_factor):g}", {}).get("routing", {})
