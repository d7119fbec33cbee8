"""What every chapter's experiment module shares: presets and the run entry point.

A chapter module (one per notebook) defines

* ``NAME`` — its results folder name, e.g. ``"dense_baselines"``;
* ``PRESETS`` — ``{"smoke": Preset, "cpu": Preset, "gpu": Preset}``;
* ``experiment(preset) -> dict[str, TrainConfig]`` — the sweep;
* ``run(preset, seeds=None, device="auto", overrides=None) -> ChapterResults``;
* analysis functions the notebook calls (tables, figures, verdicts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError, check_choice
from ..results import RunResult
from ..train import TrainConfig

__all__ = ["Preset", "ChapterResults", "select_preset", "apply_overrides", "results_preset"]


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
        out: dict[str, list[RunResult]] = {}
        for r in self.results:
            out.setdefault(r.name, []).append(r)
        return out


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
