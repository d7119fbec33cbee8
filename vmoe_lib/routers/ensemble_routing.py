"""Partitioned routing of an efficient ensemble of experts (E³, Allingham et al., TMLR 2022, arXiv:2110.03360).

An E³ model repeats every image ``M`` times just before its first MoE layer (member-major: the batch becomes
``M`` copies of it, copy ``m`` the ``m``-th block of ``B`` images) and splits the ``E`` experts of each MoE layer
into ``M`` disjoint sets of ``E / M``: copy ``m`` routes only within set ``m``, with its own router (gate weights,
training noise, softmax over its ``E / M`` experts, auxiliary losses). This is the reference's block-diagonal gating
(google-research/vmoe ``ensemble_routing.py``): there a routing group holds all ``M`` copies of its tokens and the
gates of copy ``m`` are zero outside set ``m``, so an expert of set ``m`` only ever sees copy ``m``'s tokens, in the
same order, with the capacity ``C = ceil(M S k cf / E) = ceil(S k cf / (E / M))`` of a member's group of ``S``
tokens. Here each member routes its own groups (the MoE layer never lets a group straddle two copies), which gives
the same assignments, slots and drops without the ``(G, S, E)`` block-diagonal tensor.

:class:`EnsembleRouter` holds the ``M`` member routers (any sparse router of the registry, built with ``E / M``
experts) and merges their routings into one over the ``E`` experts: member ``m``'s groups follow member ``m - 1``'s
and its expert indices are offset by ``m E / M``. The auxiliary loss is the mean of the members' (each member's
loss weights apply to its own routing); the statistics are the members' merged (``expert_load`` over all ``E``
experts, the rest averaged over members).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError
from .base import LazyMetrics, Routing

__all__ = ["EnsembleRouter", "merge_member_routings", "ENSEMBLE_ROUTERS"]

# Routers whose routing is sparse and whose groups may hold several images: the ones E³ can partition. Soft MoE's
# routing is dense and per-image routing shares one decision across layers (and may learn from labels of the B
# images, not of the M B copies).
ENSEMBLE_ROUTERS = ("softmax_token_choice", "sinkhorn_token_choice", "softmax_expert_choice", "sinkhorn_expert_choice",
                    "sparse_expert_choice")


def _merge_metrics(members: list[Mapping[str, torch.Tensor]], experts_per_member: int) -> dict[str, torch.Tensor]:
    if not members or any(not m for m in members):
        return {}
    out: dict[str, torch.Tensor] = {}
    for key in members[0]:
        values = [m[key] for m in members if key in m]
        if len(values) != len(members):
            continue
        if key == "expert_load":  # each member's load sums to 1 over its experts; over all E experts, to 1 / M each
            out[key] = torch.cat([v / len(values) for v in values])
        elif all(v.shape == values[0].shape for v in values):
            out[key] = torch.stack([v.float() for v in values]).mean(0)
    return out


def _merged_kept(routings: list[Routing]) -> torch.Tensor | None:
    """The merged ``kept`` mask when any member's routing is static (a compact one keeps all its entries)."""
    if not any(r.is_static for r in routings):
        return None
    return torch.cat([r.kept if r.is_static else torch.ones_like(r.expert_index, dtype=torch.bool) for r in routings])


def merge_member_routings(routings: list[Routing], experts_per_member: int) -> Routing:
    """One :class:`Routing` over ``M * experts_per_member`` experts from the members' routings (member ``m``'s groups
    after member ``m - 1``'s, its experts offset by ``m * experts_per_member``). All members must route the same number
    of groups of the same size with the same capacity (they do: same settings, equal shares of the batch)."""
    first = routings[0]
    for r in routings:
        if not r.is_sparse:
            raise ConfigError("merge_member_routings: E³ partitions sparse routings only (not Soft MoE's dense one)")
        if (r.num_groups, r.group_size, r.capacity, r.num_experts) != (first.num_groups, first.group_size, first.capacity,
                                                                        experts_per_member):
            raise ConfigError(
                f"merge_member_routings: the members route different shapes: (groups, group size, capacity, experts) "
                f"{[(x.num_groups, x.group_size, x.capacity, x.num_experts) for x in routings]}; expected "
                f"{experts_per_member} experts each and equal groups and capacity"
            )
    G = first.num_groups
    losses = [r.aux_loss for r in routings if r.aux_loss is not None]
    metrics = [r.metrics for r in routings]
    return Routing(
        num_groups=G * len(routings),
        group_size=first.group_size,
        num_experts=experts_per_member * len(routings),
        capacity=first.capacity,
        group_index=torch.cat([r.group_index + m * G for m, r in enumerate(routings)]),
        token_index=torch.cat([r.token_index for r in routings]),
        expert_index=torch.cat([r.expert_index + m * experts_per_member for m, r in enumerate(routings)]),
        slot_index=torch.cat([r.slot_index for r in routings]),
        combine_weight=torch.cat([r.combine_weight for r in routings]),
        kept=_merged_kept(routings),
        aux_loss=torch.stack(losses).mean() if len(losses) == len(routings) else None,
        metrics=LazyMetrics(lambda: _merge_metrics(metrics, experts_per_member)),
    )


class EnsembleRouter(nn.Module):
    """``M`` member routers over disjoint sets of ``E / M`` experts (E³'s partitioned routing).

    ``forward(x)`` takes ``(G, S, D)`` whose first ``G / M`` groups are member 0's tokens, the next ``G / M`` member
    1's, and so on (the layout :class:`~vmoe_lib.layers.MoEMlp` builds when ``ensemble_size > 1``), and returns the
    merged :class:`Routing` over all ``E`` experts.

    Routing settings (``k``, ``capacity_factor``, ``eval_capacity_factor``, ``batch_priority``...) read from member 0
    and, when set, are set on every member (so :func:`vmoe_lib.models.set_routing` works as on a single router).

    Args:
        name: a router of :data:`ENSEMBLE_ROUTERS`.
        dim: token width ``D``.
        num_experts: ``E`` (all members together; a multiple of ``ensemble_size``).
        ensemble_size: ``M >= 2``.
        **options: the member routers' options (each member gets the same; ``k`` is per member).
    """

    def __init__(self, name: str, *, dim: int, num_experts: int, ensemble_size: int, **options: Any) -> None:
        super().__init__()
        from .registry import create_router  # noqa: PLC0415

        if name not in ENSEMBLE_ROUTERS:
            raise ConfigError(f"router={name!r} is invalid with ensemble_size={ensemble_size}: E³ partitions the experts "
                              f"of a sparse router whose groups hold several images; allowed: {', '.join(ENSEMBLE_ROUTERS)}")
        if not isinstance(ensemble_size, int) or isinstance(ensemble_size, bool) or ensemble_size < 2:
            raise ConfigError(f"ensemble_size={ensemble_size!r} is invalid for EnsembleRouter; it must be an integer >= 2")
        if num_experts % ensemble_size:
            raise ConfigError(f"num_experts={num_experts} is invalid with ensemble_size={ensemble_size}: the experts are "
                              f"split into {ensemble_size} equal sets, so num_experts must be a multiple of it")
        self.name = name
        self.ensemble_size = ensemble_size
        self.num_experts = num_experts
        self.experts_per_member = num_experts // ensemble_size
        self.members = nn.ModuleList(
            create_router(name, dim=dim, num_experts=self.experts_per_member, **options) for _ in range(ensemble_size)
        )

    def forward(self, x: torch.Tensor) -> Routing:
        """Route ``x: (G, S, D)``, member ``m`` owning groups ``m G / M`` to ``(m + 1) G / M - 1``."""
        G = x.shape[0]
        if x.ndim != 3 or G % self.ensemble_size:
            raise ConfigError(f"EnsembleRouter got x of shape {tuple(x.shape)}; it needs (G, S, D) with G a multiple of "
                              f"ensemble_size={self.ensemble_size} (each member's groups in one block)")
        chunks = x.chunk(self.ensemble_size, dim=0)
        return merge_member_routings([member(chunk) for member, chunk in zip(self.members, chunks)],
                                     self.experts_per_member)

    def __getattr__(self, key: str) -> Any:
        try:
            return super().__getattr__(key)
        except AttributeError:
            if key.startswith("_") or key in ("members", "name", "ensemble_size"):
                raise
            members = self._modules.get("members")
            if members is None or not hasattr(members[0], key):
                raise
            return getattr(members[0], key)  # a routing setting of the members (k, capacity_factor...)

    def __setattr__(self, key: str, value: Any) -> None:
        members = self.__dict__.get("_modules", {}).get("members")
        if members is not None and key not in self.__dict__ and not isinstance(value, nn.Module) \
                and hasattr(members[0], key) and not hasattr(type(self), key):
            for member in members:
                setattr(member, key, value)  # each member checks the value
            return
        super().__setattr__(key, value)

    def extra_repr(self) -> str:
        return f"{self.name!r}, ensemble_size={self.ensemble_size}, num_experts={self.num_experts}"
