"""The book's chapters: one :class:`~vmoe_lib.chapters.base.Chapter` per notebook (presets, runs, claims, figures).

``CHAPTERS`` maps a chapter's name (its results folder and CLI name) to the chapter; a notebook gets its chapter
with ``vl.chapters.get_chapter("placement")``. :mod:`vmoe_lib.chapters.base` holds the machinery every chapter
shares, :mod:`~vmoe_lib.chapters.recipes` the training recipes and :mod:`~vmoe_lib.chapters.probes` the
post-training measurements.
"""

from __future__ import annotations

from ..errors import check_choice
from . import base, probes, recipes, dense_baselines, routers_bpr, placement, router_gates, experts_data, model_scale, image_routing, \
    shared_experts, efficient_ensembles
from .base import Chapter

__all__ = ["CHAPTERS", "get_chapter", "Chapter", "base", "probes", "recipes", "dense_baselines", "routers_bpr",
           "placement", "router_gates", "experts_data", "model_scale", "image_routing", "shared_experts",
           "efficient_ensembles"]

CHAPTERS: dict[str, Chapter] = {
    c.name: c for c in (dense_baselines.chapter, routers_bpr.chapter, placement.chapter, router_gates.chapter,
                                 experts_data.chapter, model_scale.chapter, image_routing.chapter,
                                 shared_experts.chapter, efficient_ensembles.chapter)
}


def get_chapter(name: str) -> Chapter:
    """The chapter called ``name`` (its results folder and CLI name), e.g. ``get_chapter("placement")``."""
    check_choice("chapter", name, list(CHAPTERS))
    return CHAPTERS[name]
