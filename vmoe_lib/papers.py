"""The papers whose findings the book re-tests, and the number each claim is read against.

A chapter's claim names its paper and the paper's own number (:class:`PaperNumber`: the effect in points in the
claim's direction, or ``None`` where the paper states none, and where in the paper it comes from); the verdict
record stores it, the chapter's verdict table shows it beside our effect, and the landing page groups the claims by
paper (:data:`PAPERS` fixes the order and the names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, check_choice

__all__ = ["Paper", "PaperNumber", "PAPERS", "paper_number"]


@dataclass(frozen=True)
class Paper:
    """A paper of the book: a short name for tables, its citation and its arXiv id."""

    key: str
    short: str
    citation: str
    arxiv: str

    @property
    def url(self) -> str:
        """The paper's arXiv page."""
        return f"https://arxiv.org/abs/{self.arxiv}"


#: The papers, in the order the landing page shows them.
PAPERS: dict[str, Paper] = {p.key: p for p in (
    Paper("vmoe", "V-MoE", "Riquelme et al., Scaling Vision with Sparse Mixture of Experts, NeurIPS 2021", "2106.05974"),
    Paper("routers", "Routers study", "Liu, Puigcerver, Blondel et al., Routers in Vision Mixture of Experts, TMLR 2024",
          "2401.15969"),
    Paper("soft_moe", "Soft MoE", "Puigcerver et al., From Sparse to Soft Mixtures of Experts, ICLR 2024", "2308.00951"),
    Paper("sweet_spot", "Sweet-spot study", "Videau et al., Mixture of Experts in Image Classification: What's the "
          "Sweet Spot?, TMLR 2025", "2411.18322"),
    Paper("mobile_vmoe", "Mobile V-MoE", "Daxberger et al., Mobile V-MoEs: Scaling Down Vision Transformers via Sparse "
          "Mixture-of-Experts, 2023", "2309.04354"),
    Paper("vimoe", "ViMoE", "Han et al., ViMoE: An Empirical Study of Designing Vision Mixture-of-Experts, 2024",
          "2410.15732"),
    Paper("e3", "E³", "Allingham et al., Sparse MoEs meet Efficient Ensembles, TMLR 2022", "2110.03360"),
    Paper("vit", "ViT", "Dosovitskiy et al., An Image is Worth 16x16 Words, ICLR 2021", "2010.11929"),
)}


@dataclass(frozen=True)
class PaperNumber:
    """What a paper reports for a claim: ``effect`` in points in the claim's direction (A minus B for an equivalence
    or non-inferiority claim), ``None`` when the paper states no number (``where`` then says why), and ``where`` it
    comes from (table, model, data: ``"Tab. 4, ViT-S/16, ImageNet-1k: 8 experts 80.5 vs 16 experts 80.2"``)."""

    paper: str
    effect: float | None
    where: str

    def __post_init__(self) -> None:
        check_choice("paper", self.paper, list(PAPERS))
        if self.effect is not None and (not isinstance(self.effect, (int, float)) or isinstance(self.effect, bool)
                                        or not math.isfinite(self.effect)):
            raise ConfigError(f"effect={self.effect!r} is invalid; it must be a finite number (points) or None")
        if not isinstance(self.where, str) or not self.where.strip():
            raise ConfigError(f"where={self.where!r} is invalid; say where in the paper the number comes from")

    def to_dict(self) -> dict[str, Any]:
        """The number as ``verdicts.json`` stores it: ``{"id", "effect", "where"}``."""
        return {"id": self.paper, "effect": self.effect, "where": self.where}


def paper_number(paper: str, effect: float | None, where: str) -> PaperNumber:
    """Shorthand for :class:`PaperNumber`."""
    return PaperNumber(paper, effect, where)
