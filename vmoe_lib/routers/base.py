"""The one data structure every router returns: :class:`Routing`.

Axis letters (as in google-research/vmoe ``moe.py``), used in every shape below:

* ``G`` routing groups (one image, or several images' tokens)
* ``S`` tokens per group
* ``E`` experts
* ``C`` capacity: slots per expert per group (for Soft MoE, ``P`` slots per expert)
* ``K`` choices per token (top-k)
* ``D`` model width
* ``N`` assignments: (group, token, expert, slot) entries of a sparse routing

Every MoE layer computes (routers study, arXiv:2401.15969, Sec. 2)::

    y[g, s] = sum_{e, c} combine[g, s, e, c] * expert_e( sum_{s'} dispatch[g, s', e, c] * x[g, s'] )

A sparse router (token choice, expert choice, per-image) describes its routing
*compactly*: one entry per (token, expert, slot) assignment, with binary
dispatch and a combine weight. Soft MoE has no discrete assignment; it carries
the dense ``(G, S, E, P)`` tensors. :meth:`Routing.dense` returns the dense
dispatch/combine tensors for either kind, for analysis and tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace

import torch

__all__ = ["Routing", "LazyMetrics"]


class LazyMetrics(Mapping):
    """Routing statistics computed on first read, not on every forward.

    A training step never reads a layer's routing statistics (the chapters read them once, after
    training, through :class:`vmoe_lib.layers.stats.RoutingRecorder`), so a router hands
    ``compute`` (a function of the forward's tensors, run under ``torch.no_grad``) instead of the
    values; the first read computes and keeps them, and drops ``compute``. Until then the function
    holds the forward's small routing tensors (logits, gates, indices: ``(G, S, E)`` at most, Soft
    MoE's ``(G, S, E, P)`` weights), which an MoE layer keeps until its next forward replaces them.
    A plain ``dict`` of the values compares equal to it and ``dict(metrics)`` copies it.
    """

    __slots__ = ("_compute", "_values")

    def __init__(self, compute: Callable[[], dict[str, torch.Tensor]]) -> None:
        self._compute: Callable[[], dict[str, torch.Tensor]] | None = compute
        self._values: dict[str, torch.Tensor] | None = None

    def _get(self) -> dict[str, torch.Tensor]:
        if self._values is None:
            assert self._compute is not None
            with torch.no_grad():
                self._values = self._compute()
            self._compute = None  # drop the tensors it held
        return self._values

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __repr__(self) -> str:
        return f"LazyMetrics({self._values!r})" if self._values is not None else "LazyMetrics(<not computed yet>)"


@dataclass
class Routing:
    """A routing of ``G`` groups of ``S`` tokens to ``E`` experts with ``C`` slots each.

    Sparse routings fill ``group_index``, ``token_index``, ``expert_index``,
    ``slot_index`` and ``combine_weight`` (all shape ``(N,)``); each
    ``(group, expert, slot)`` triple appears at most once and ``slot < capacity``.
    Tokens that appear in no entry were dropped: they pass on the residual only.

    A *static* sparse routing (:attr:`is_static`; made when compiling or exporting, or inside
    :func:`vmoe_lib.routers.static_shapes`) also fills ``kept`` ``(N,)`` bool: it lists every
    choice a router made, ``N`` fixed by ``(G, S, E, C, k)`` alone, and the choices whose ``kept`` is
    False were dropped (their ``slot_index`` may be ``>= C``). :meth:`compact` returns the same
    routing without them, as the eager routers make it.

    Soft routings (Soft MoE) fill ``dispatch_dense`` and ``combine_dense``
    (both ``(G, S, E, C)``) and leave the index fields ``None``.

    ``aux_loss`` is the router's weighted auxiliary loss (a scalar tensor that
    keeps its graph; zero when the router has none). ``metrics`` holds detached
    statistics (per-expert load, dropped fraction, the unweighted loss terms...), usually a
    :class:`LazyMetrics` that computes them when first read.
    """

    num_groups: int
    group_size: int
    num_experts: int
    capacity: int
    group_index: torch.Tensor | None = None
    token_index: torch.Tensor | None = None
    expert_index: torch.Tensor | None = None
    slot_index: torch.Tensor | None = None
    combine_weight: torch.Tensor | None = None
    dispatch_dense: torch.Tensor | None = None
    combine_dense: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    metrics: Mapping[str, torch.Tensor] = field(default_factory=dict)

    @property
    def is_sparse(self) -> bool:
        """True when the routing is given by assignment entries (not dense soft weights)."""
        return self.dispatch_dense is None

    @property
    def is_static(self) -> bool:
        """True for a static sparse routing (entries for dropped choices too, marked by ``kept``)."""
        return self.kept is not None

    def compact(self) -> Routing:
        """This routing with only the kept entries (itself when it is not static).

        The entries keep their order. Needs the data (``nonzero``, a host sync on a GPU): read a
        static routing's statistics with it after the forward, not inside a compiled region.
        """
        if self.kept is None:
            return self
        index = self.kept.nonzero().squeeze(1)
        fields = ("group_index", "token_index", "expert_index", "slot_index", "combine_weight")
        return replace(self, kept=None, **{name: getattr(self, name).index_select(0, index) for name in fields})

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense ``(dispatch, combine)`` tensors, each ``(G, S, E, C)``.

        For a sparse routing, dispatch is 0/1 and combine carries the weights,
        differentiable with respect to ``combine_weight``.
        """
        if not self.is_sparse:
            assert self.combine_dense is not None
            return self.dispatch_dense, self.combine_dense
        assert self.combine_weight is not None
        shape = (self.num_groups, self.group_size, self.num_experts, self.capacity)
        flat = (
            (self.group_index * self.group_size + self.token_index) * self.num_experts + self.expert_index
        ) * self.capacity + self.slot_index
        numel = shape[0] * shape[1] * shape[2] * shape[3]
        weights = self.combine_weight
        ones = torch.ones_like(weights)
        if self.kept is not None:  # a static routing's dropped choices land in one extra element, cut off below
            flat = torch.where(self.kept, flat, numel)
        combine = weights.new_zeros(numel + 1).index_put((flat,), weights, accumulate=True)[:numel].view(shape)
        dispatch = weights.new_zeros(numel + 1).index_put((flat,), ones, accumulate=True)[:numel].view(shape)
        return dispatch, combine

    def tokens_per_expert(self) -> torch.Tensor:
        """Number of (token, slot) assignments each expert received, summed over groups: ``(E,)``."""
        if self.is_sparse:
            expert = self.expert_index if self.kept is None else self.expert_index[self.kept]
            return torch.bincount(expert, minlength=self.num_experts)
        dispatch, _ = self.dense()
        return dispatch.sum(dim=(0, 1, 3))
