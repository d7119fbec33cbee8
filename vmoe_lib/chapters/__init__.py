"""One experiment module per book chapter: presets, the sweep, tables, figures and verdicts.

``CHAPTERS`` maps a chapter's name (its results folder and CLI name) to its module.
"""

from __future__ import annotations

from types import ModuleType

from ..errors import check_choice
from . import recipes, dense_baselines, routers_bpr, placement

__all__ = ["CHAPTERS", "get_chapter", "recipes", "dense_baselines", "routers_bpr", "placement"]

CHAPTERS: dict[str, ModuleType] = {
    dense_baselines.NAME: dense_baselines,
    routers_bpr.NAME: routers_bpr,
    placement.NAME: placement,
}


def get_chapter(name: str) -> ModuleType:
    """The experiment module of chapter ``name``."""
    check_choice("chapter", name, list(CHAPTERS))
    return CHAPTERS[name]
