"""What every chapter's experiment module shares: presets and the run entry point.

A chapter module (one per notebook) defines

* ``NAME`` — its results folder name, e.g. ``"dense_baselines"``;
* ``PRESETS`` — ``{"smoke": Preset, "cpu": Preset, "gpu": Preset}``;
* ``experiment(preset) -> dict[str, TrainConfig]`` — the sweep;
* ``run(preset, seeds=None, device="auto", overrides=None) -> ChapterResults``;
* analysis functions the notebook calls (tables, figures, verdicts).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..errors import ConfigError, check_choice
from ..results import RunResult
from ..train import TrainConfig

__all__ = ["Preset", "ChapterResults", "select_preset", "apply_overrides", "results_preset", "preset_frame", "run_sweep"]


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

    def by_name(self) -> dict[str, list[RunResult]]:
        """Runs grouped by their name in the sweep, in sweep order."""
        out: dict[str, list[RunResult]] = {}
        for r in self.results:
            out.setdefault(r.name, []).append(r)
        return out

    def values(self, name: str, metric: str = "test_accuracy") -> list[float]:
        """The final ``metric`` of every seed of run ``name`` (empty if the sweep has no such run)."""
        return [float(r.final[metric]) for r in self.results if r.name == name]


def select_preset(presets: Mapping[str, Preset], name: str) -> Preset:
    """The preset called ``name``; :class:`ConfigError` listing the allowed names otherwise."""
    check_choice("preset", name, list(presets))
    return presets[name]


def apply_overrides(configs: Mapping[str, TrainConfig], overrides: Mapping[str, Any] | None) -> dict[str, TrainConfig]:
    """Apply ``TrainConfig`` field overrides (e.g. ``{"epochs": 2}``) to every config of a sweep."""
    if not overrides:
        return dict(configs)
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides={overrides!r} is invalid; it must be a dict of TrainConfig fields")
    return {name: cfg.replace(**overrides) for name, cfg in configs.items()}


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
    seeds: Sequence[int] | None = None,
    device: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    extra_eval: Callable | None = None,
    hash_extra: Mapping[str, Any] | None = None,
) -> ChapterResults:
    """What every chapter's ``run`` does: load the preset's results, training whatever is missing.

    ``seeds=None`` uses the preset's; ``overrides`` change every config and send the results to
    ``results/custom``; ``extra_eval``/``hash_extra`` as in :func:`vmoe_lib.results.load_or_run`.
    """
    from ..results import load_or_run

    p = select_preset(presets, preset)
    configs = apply_overrides(experiment(preset), overrides)
    folder = results_preset(preset, overrides)
    results = load_or_run(chapter, folder, configs, list(seeds) if seeds else list(p.seeds), device=device,
                          progress=progress, extra_eval=extra_eval, hash_extra=hash_extra)
    return ChapterResults(chapter, folder, results)
