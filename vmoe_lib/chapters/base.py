"""What every chapter's experiment module shares: presets and the run entry point.

A chapter module (one per notebook) defines

* ``NAME`` — its results folder name, e.g. ``"dense_baselines"``;
* ``PRESETS`` — ``{"smoke": Preset, "cpu": Preset, "gpu": Preset}``;
* ``experiment(preset) -> dict[str, TrainConfig]`` — the sweep;
* ``run(preset, seeds=None, device="auto", overrides=None, progress=True, **sweep) -> ChapterResults``,
  where ``sweep`` holds :func:`run_sweep`'s ``workers``/``executor``/``slurm``;
* analysis functions the notebook calls (tables, figures, verdicts).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
import json
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import ConfigError, check_choice
from ..results import RunResult
from ..train import TrainConfig

__all__ = [
    "Preset", "ChapterResults", "select_preset", "apply_overrides", "results_preset", "preset_frame", "run_sweep",
    "parse_seeds", "parse_overrides", "sweep_wall_minutes",
]


@dataclass(frozen=True)
class Preset:
    """A named size of a chapter's experiment, with the hardware and time it was sized for."""

    name: str
    description: str
    hardware: str
    expected_minutes: float
    seeds: tuple[int, ...]
    settings: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ChapterResults:
    """A chapter's runs for one preset, as returned by its ``run`` function."""

    chapter: str
    preset: str
    results: list[RunResult]
    of_record: bool = True  # the preset's own seeds, complete, without overrides

    def verdicts_path(self) -> Path:
        """Where this sweep's verdicts go: the preset's ``verdicts.json`` of record only for the preset's own,
        complete seed list without overrides; ``results/custom/<chapter>/verdicts.json`` otherwise."""
        from ..results import results_root

        return results_root() / (self.preset if self.of_record else "custom") / self.chapter / "verdicts.json"

    def by_name(self) -> dict[str, list[RunResult]]:
        """Runs grouped by their name in the sweep, in sweep order."""
        out: dict[str, list[RunResult]] = {}
        for r in self.results:
            out.setdefault(r.name, []).append(r)
        return out

    def paired(self, a: str, b: str, metric: str = "test_accuracy") -> tuple[list[float], list[float]]:
        """The final ``metric`` of runs ``a`` and ``b`` on the seeds both have, in seed order (paired by seed)."""
        va = {r.seed: float(r.final[metric]) for r in self.results if r.name == a}
        vb = {r.seed: float(r.final[metric]) for r in self.results if r.name == b}
        seeds = sorted(set(va) & set(vb))
        return [va[s] for s in seeds], [vb[s] for s in seeds]

    def values(self, name: str, metric: str = "test_accuracy") -> list[float]:
        """The final ``metric`` of every seed of run ``name`` (empty if the sweep has no such run)."""
        return [float(r.final[metric]) for r in self.results if r.name == name]


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


def apply_overrides(configs: Mapping[str, TrainConfig], overrides: Mapping[str, Any] | None) -> dict[str, TrainConfig]:
    """Apply ``TrainConfig`` field overrides (e.g. ``{"epochs": 2}``) to every config of a sweep.

    Nested dicts merge: ``{"model_kwargs": {"num_experts": 4}}`` changes the expert count of every
    run and keeps each run's other model arguments (its router, say). An override that makes two
    runs of the sweep the same experiment is rejected.
    """
    if not overrides:
        return dict(configs)
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides={overrides!r} is invalid; it must be a dict of TrainConfig fields")
    out = {name: TrainConfig.from_dict(_merge(cfg.to_dict(), overrides)) for name, cfg in configs.items()}
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


def run_sweep(
    chapter: str,
    presets: Mapping[str, Preset],
    experiment: Callable[[str], Mapping[str, TrainConfig]],
    preset: str,
    *,
    seeds: Sequence[int] | str | int | None = None,
    device: str = "auto",
    overrides: Mapping[str, Any] | str | None = None,
    progress: bool = True,
    extra_eval: Callable | None = None,
    hash_extra: Mapping[str, Any] | None = None,
    workers: int | str = 1,
    executor: str = "local",
    slurm: Mapping[str, Any] | None = None,
    record_seeds: Sequence[int] | None = None,
) -> ChapterResults:
    """What every chapter's ``run`` does: load the preset's results, training whatever is missing.

    Args:
        seeds: ``None`` uses the preset's; a list, an int or a string such as ``"0,1"`` (see
            :func:`parse_seeds`). Verdicts of record are only written for the preset's own seed list.
        overrides: ``TrainConfig`` fields changed in every config (nested dicts merge); the results
            go to ``results/custom``. A JSON string is parsed.
        workers: parallel worker processes of the ``local`` executor (an int or ``"auto"``).
        executor: ``local`` (pinned worker processes, the default), ``inline`` or ``slurm``
            (see :mod:`vmoe_lib.sweep`).
        slurm: options of the ``slurm`` executor.
        extra_eval, hash_extra: as in :func:`vmoe_lib.results.load_or_run`.
        record_seeds: the seeds of record of these runs when they are not the preset's (a chapter
            that trains some runs with fewer seeds); ``seeds=None`` then uses them.
    """
    from ..results import load_or_run
    from ..sweep import EXECUTORS, resolve_workers

    p = select_preset(presets, preset)
    seeds = parse_seeds(seeds)
    overrides = parse_overrides(overrides)
    check_choice("executor", executor, EXECUTORS)
    resolve_workers(workers, device)  # a bad value fails here, before anything loads
    configs = apply_overrides(experiment(preset), overrides)
    folder = results_preset(preset, overrides)
    own = list(record_seeds) if record_seeds is not None else list(p.seeds)
    chosen = list(seeds) if seeds else own
    of_record = not overrides and sorted(chosen) == sorted(own)
    results = load_or_run(chapter, folder, configs, chosen, device=device, progress=progress, extra_eval=extra_eval,
                          hash_extra=hash_extra, executor=executor, workers=workers, slurm=slurm)
    if not of_record and folder != "custom":
        print(f"seeds {chosen} are not preset {preset!r}'s own {own}: verdicts go to results/custom/{chapter}/, "
              f"not to the verdicts of record", flush=True)
    return ChapterResults(chapter, folder, results, of_record=of_record)


def sweep_wall_minutes(results: Sequence[RunResult]) -> float:
    """Wall minutes the sweep that made ``results`` took: from the start of its first run to the end of its
    last (each manifest holds when its run finished and how long its worker session took).

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
