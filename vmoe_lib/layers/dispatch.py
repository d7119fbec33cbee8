"""Dispatch backends: move tokens to their experts and the results back.

Axis letters (google-research/vmoe ``moe.py``): ``G`` routing groups, ``S``
tokens per group, ``E`` experts, ``C`` capacity (slots per expert per group;
``P`` for Soft MoE), ``D`` input width, ``O`` output width, ``N`` (token,
expert) pairs of a sparse routing, ``M`` rows per expert buffer.

Every backend computes the same function (routers study, arXiv:2401.15969, Sec. 2)::

    y[g, s] = sum_{e, c} combine[g, s, e, c] * expert_e( sum_{s'} dispatch[g, s', e, c] * x[g, s'] )

``einsum``
    The reference: builds the dense ``(G, S, E, C)`` dispatch/combine tensors and
    evaluates the formula literally. Easy to check, slow: it spends
    ``G*S*E*C*D`` multiply-adds moving tokens and runs the experts on every
    capacity slot, used or not.
``sort``
    Sparse routings only. Sorts the (token, expert) pairs by expert, gathers the
    tokens into per-expert buffers ``(E, M, D)`` (``M`` = the largest number of
    pairs any expert received, over all groups together), runs all experts as
    ONE batched matmul, and scatter-adds the weighted results back. Nothing of
    size ``(G*S) x E x C`` exists; the only waste is ``E*M - N`` padding rows
    (a few % under training capacity factors; none for expert choice).
``segment``
    The CPU fast path. As ``sort`` but without padding: each expert's matmuls
    run on its own contiguous segment of the sorted pairs, and the whole
    computation (gather, both layers, combine weights, scatter-add) is one
    autograd node with a hand-written backward
    (:class:`~vmoe_lib.layers.experts._SortedExpertsCombine`): the work of a
    dense MLP on ``N`` rows plus one gather and one scatter of ``N x D``.
``grouped_mm``
    As ``segment`` but through ``torch.nn.functional.grouped_mm``
    (``torch._grouped_mm`` on older builds) with per-expert offsets: no
    padding, no host sync. Used where the installed torch, device, dtype and
    widths support it (probed once); elsewhere it falls back to ``sort``.
``auto``
    CPU: ``segment``. GPU: ``grouped_mm`` where supported, else ``sort`` (one
    kernel per layer; ``E`` small kernels and a host sync cost more there).
    Under a torch dispatch mode (e.g. ``FlopCounterMode``): ``segment``, so FLOP
    counts are exact (no padding).

Soft routings (Soft MoE) have no pairs to sort: every non-reference backend
runs them as three batched matmuls per group (dispatch, experts, combine), the
same arithmetic as the einsum without re-laying out ``(G, S, E, P)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..errors import check_choice
from ..routers.base import Routing
from .experts import ExpertBank, grouped_mm_supported

__all__ = ["BACKENDS", "DispatchInfo", "dispatch_combine", "resolve_backend"]

BACKENDS = ("auto", "einsum", "sort", "segment", "grouped_mm")


@dataclass
class DispatchInfo:
    """What one dispatch computed, for FLOP accounting and statistics.

    ``pairs``: (token, expert) pairs (sparse) or slots (soft) the experts really
    processed; ``rows_computed``: rows the expert matmuls ran on (``pairs`` plus
    padding or empty capacity slots); ``backend``: the backend that ran.
    """

    backend: str
    pairs: int
    rows_computed: int


def resolve_backend(backend: str, routing: Routing, x: torch.Tensor, experts: ExpertBank) -> str:
    """The backend that will run: ``soft`` for soft routings (except ``einsum``), ``auto``
    resolved (see the module docstring). ``grouped_mm`` where unsupported falls back to ``sort``.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "einsum":
        return "einsum"
    if not routing.is_sparse:
        return "soft"
    if backend == "auto" and _get_current_dispatch_mode() is not None:
        # Under a dispatch mode (FlopCounterMode, memory trackers...): exact rows, plain addmm,
        # so that counted FLOPs are those of the processed pairs, never padding.
        return "segment"
    if backend == "auto" and x.device.type == "cpu":
        return "segment"
    if backend in ("auto", "grouped_mm"):
        widths = (experts.in_features, experts.hidden_features, experts.out_features)
        return "grouped_mm" if grouped_mm_supported(x.device, x.dtype, *widths) else "sort"
    return backend


def dispatch_combine(
    x: torch.Tensor, routing: Routing, experts: ExpertBank, backend: str = "auto"
) -> tuple[torch.Tensor, DispatchInfo]:
    """Apply ``experts`` to ``x (G, S, D)`` as ``routing`` says: returns ``(y (G, S, O), info)``."""
    G, S, _ = x.shape
    if (G, S) != (routing.num_groups, routing.group_size):
        raise ValueError(f"routing is for (G, S)=({routing.num_groups}, {routing.group_size}); x has {(G, S)}")
    name = resolve_backend(backend, routing, x, experts)
    if name == "einsum":
        return _einsum(x, routing, experts)
    if name == "soft":
        return _soft_bmm(x, routing, experts)
    return _sorted(x, routing, experts, name)


def _einsum(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> tuple[torch.Tensor, DispatchInfo]:
    dispatch, combine = routing.dense()  # (G, S, E, C) each
    G, S, E, C = dispatch.shape
    expert_in = torch.einsum("gsec,gsd->egcd", dispatch.to(x.dtype), x)
    expert_out = experts(expert_in.reshape(E, G * C, -1)).view(E, G, C, -1)
    y = torch.einsum("gsec,egco->gso", combine.to(x.dtype), expert_out)
    pairs = routing.expert_index.numel() if routing.is_sparse else G * E * C
    return y, DispatchInfo("einsum", pairs, E * G * C)


def _soft_bmm(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> tuple[torch.Tensor, DispatchInfo]:
    G, S, E, P = routing.dispatch_dense.shape
    dispatch = routing.dispatch_dense.to(x.dtype).reshape(G, S, E * P)
    combine = routing.combine_dense.to(x.dtype).reshape(G, S, E * P)
    slots = torch.bmm(dispatch.transpose(1, 2), x)  # (G, E*P, D): each slot a mix of tokens
    slots = slots.view(G, E, P, -1).transpose(0, 1).reshape(E, G * P, -1)
    out = experts(slots)  # (E, G*P, O)
    out = out.view(E, G, P, -1).transpose(0, 1).reshape(G, E * P, -1)
    y = torch.bmm(combine, out)  # (G, S, O)
    return y, DispatchInfo("soft", G * E * P, G * E * P)


def _sorted(x: torch.Tensor, routing: Routing, experts: ExpertBank, backend: str) -> tuple[torch.Tensor, DispatchInfo]:
    G, S, D = x.shape
    E = routing.num_experts
    # Pairs sorted by expert; a stable sort keeps each expert's rows in (group, slot) order.
    order = torch.argsort(routing.expert_index, stable=True)
    expert_sorted = routing.expert_index.index_select(0, order)
    rows = (routing.group_index * S + routing.token_index).index_select(0, order)  # rows of x_flat
    weights = routing.combine_weight.index_select(0, order).to(x.dtype)
    counts = torch.bincount(routing.expert_index, minlength=E)
    N = rows.numel()
    x_flat = x.reshape(G * S, D)

    if backend == "segment":
        ends = list(itertools.accumulate(counts.tolist()))  # host sync: the segment bounds
        y = experts.forward_sorted_combine(x_flat, rows, weights, list(zip([0, *ends[:-1]], ends)))
        return y.view(G, S, -1), DispatchInfo(backend, N, N)

    tokens = x_flat.index_select(0, rows)  # (N, D), contiguous per expert
    rows_computed = N
    if backend == "grouped_mm":
        offsets = torch.cumsum(counts, 0).to(torch.int32)
        out = experts.forward_grouped(tokens, expert_sorted, offsets)  # (N, O)
    else:  # sort: (E, M, D) buffers padded to the busiest expert, one batched matmul
        M = int(counts.max()) if N else 0  # host sync: the buffer size
        if M * E == N:  # perfectly balanced (e.g. expert choice): the sorted rows are the buffer
            out = experts(tokens.view(E, M, D)).reshape(N, experts.out_features)
        else:
            rows_computed = E * M
            starts = torch.cumsum(counts, 0) - counts
            position = expert_sorted * M + torch.arange(N, device=x.device) - starts.index_select(0, expert_sorted)
            buffer = x.new_zeros(E * M, D).index_copy(0, position, tokens)
            out = experts(buffer.view(E, M, D)).reshape(E * M, experts.out_features).index_select(0, position)
    y = x_flat.new_zeros(G * S, out.shape[-1]).index_add(0, rows, out * weights.unsqueeze(1))
    return y.view(G, S, -1), DispatchInfo(backend, N, rows_computed)
