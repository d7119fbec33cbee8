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
``static``
    Sparse routings, with tensor sizes fixed by ``(G, S, E, C)`` alone (what ``torch.compile``
    and ``torch.export`` need: no ``nonzero``, ``bincount`` or host sync). Each kept pair is
    added into its ``(expert, group, slot)`` row of an ``(E, G*C, D)`` buffer (the reference's
    dispatch), the experts run as one batched matmul on every slot, used or not, and each pair
    reads its row back times its combine weight. A static routing's dropped choices
    (:attr:`~vmoe_lib.routers.base.Routing.is_static`) go to one extra row nobody reads back.
``auto``
    While compiling or exporting (``torch.compiler.is_compiling()``): ``static``.
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

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..errors import check_choice
from ..routers.base import Routing
from .experts import ExpertBank, grouped_mm_supported

__all__ = ["BACKENDS", "DispatchInfo", "dispatch_combine", "resolve_backend"]

BACKENDS = ("auto", "einsum", "sort", "segment", "grouped_mm", "static")


class DispatchInfo:
    """What one dispatch computed, for FLOP accounting and statistics.

    ``pairs``: (token, expert) pairs (sparse) or slots (soft) the experts really
    processed; ``rows_computed``: rows the expert matmuls ran on (``pairs`` plus
    padding or empty capacity slots); ``backend``: the backend that ran. The ``static``
    backend hands ``pairs`` as a 0-dim tensor (its value is data, not a size); reading
    ``info.pairs`` turns it into an int then.
    """

    __slots__ = ("backend", "_pairs", "rows_computed")

    def __init__(self, backend: str, pairs: int | torch.Tensor, rows_computed: int) -> None:
        self.backend = backend
        self._pairs = pairs
        self.rows_computed = rows_computed

    @property
    def pairs(self) -> int:
        """(token, expert) pairs (or soft slots) the experts processed."""
        return int(self._pairs)

    def __repr__(self) -> str:
        return f"DispatchInfo(backend={self.backend!r}, pairs={self.pairs}, rows_computed={self.rows_computed})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DispatchInfo):
            return NotImplemented
        return (self.backend, self.pairs, self.rows_computed) == (other.backend, other.pairs, other.rows_computed)


def resolve_backend(backend: str, routing: Routing, x: torch.Tensor, experts: ExpertBank) -> str:
    """The backend that will run: ``soft`` for soft routings (except ``einsum``), ``auto``
    resolved (see the module docstring). ``grouped_mm`` where unsupported falls back to ``sort``.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "einsum":
        return "einsum"
    if not routing.is_sparse:
        return "soft"
    if backend == "static" or (backend == "auto" and torch.compiler.is_compiling()):
        return "static"
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
    if name == "static":
        return _static(x, routing, experts)
    if name == "soft":
        return _soft_bmm(x, routing, experts)
    if name == "einsum":
        return _einsum(x, routing, experts)
    return _sorted(x, routing.compact(), experts, name)  # data-dependent sizes: the kept pairs only


def _static(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> tuple[torch.Tensor, DispatchInfo]:
    G, S, D = x.shape
    E, C = routing.num_experts, routing.capacity
    rows = routing.group_index * S + routing.token_index  # (N,) rows of x_flat
    position = (routing.expert_index * G + routing.group_index) * C + routing.slot_index  # row of the (E*G*C) buffer
    weights = routing.combine_weight.to(x.dtype)
    if routing.kept is None:
        pairs: int | torch.Tensor = rows.numel()
    else:  # dropped choices: into the extra row E*G*C, read back times 0
        position = torch.where(routing.kept, position, E * G * C)
        weights = weights * routing.kept.to(x.dtype)
        pairs = routing.kept.sum()
    x_flat = x.reshape(G * S, D)
    buffer = x.new_zeros(E * G * C + 1, D).index_add(0, position, x_flat.index_select(0, rows))
    out = experts(buffer[: E * G * C].view(E, G * C, D)).reshape(E * G * C, -1)  # (E*G*C, O)
    out = torch.cat([out, out.new_zeros(1, out.shape[1])])
    y = x_flat.new_zeros(G * S, out.shape[1]).index_add(0, rows, out.index_select(0, position) * weights.unsqueeze(1))
    return y.view(G, S, -1), DispatchInfo("static", pairs, E * G * C)


def _einsum(x: torch.Tensor, routing: Routing, experts: ExpertBank) -> tuple[torch.Tensor, DispatchInfo]:
    dispatch, combine = routing.dense()  # (G, S, E, C) each
    G, S, E, C = dispatch.shape
    expert_in = torch.einsum("gsec,gsd->egcd", dispatch.to(x.dtype), x)
    expert_out = experts(expert_in.reshape(E, G * C, -1)).view(E, G, C, -1)
    y = torch.einsum("gsec,egco->gso", combine.to(x.dtype), expert_out)
    if not routing.is_sparse:
        pairs: int | torch.Tensor = G * E * C
    else:
        pairs = routing.expert_index.numel() if routing.kept is None else routing.kept.sum()
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
