"""Expert parallelism: the experts of every MoE layer split over the ranks of a process group.

Axis letters as in :mod:`vmoe_lib.layers.moe`: ``G`` routing groups, ``S`` tokens per group,
``E`` experts, ``D`` width, ``N`` (token, expert) pairs; here also ``R`` ranks of the
expert-parallel ("ep") group and ``L = E / R`` experts per rank.

Each rank holds the experts ``[r * L, (r + 1) * L)`` of every :class:`~vmoe_lib.layers.MoEMlp`
and a full copy of everything else (router, shared expert, the rest of the backbone), and feeds
its own batch. One MoE forward on rank ``r`` (the pattern of torchtitan's expert-parallel
module; GShard, arXiv:2006.16668, for the original design):

1. the router runs locally on the rank's own routing groups, so capacity (slots per expert per
   group), vanilla priority and Batch Priority Routing keep their single-process meaning: every
   drop is decided before any token leaves the rank;
2. the rank's pairs are sorted by expert; the per-expert counts ``(E,)`` are exchanged first
   (``all_to_all_single``, ``L`` counts to each rank), which gives the uneven split sizes;
3. the token rows go to the ranks that own their experts (``all_to_all_single`` with uneven
   ``input_split_sizes``/``output_split_sizes``), are regrouped by local expert and run through
   the local experts (one matmul per expert segment, as the ``segment`` backend);
4. the outputs come back by the reverse exchange, in the order they left, and are
   scatter-added with the combine weights on the rank that routed them.

Autograd flows through both exchanges (:class:`_AllToAll`: the backward of an exchange is the
exchange with the split sizes swapped), so every rank must run forward and backward through
every expert-parallel layer in the same order, as with DDP.

Gradients. The objective is the mean of the ranks' losses (what DDP's gradient averaging
assumes). The gradient of a replicated parameter of that objective is the mean over ranks of
the local gradients: :func:`average_non_expert_gradients` (or a data-parallel wrapper over the
whole world) does it. An expert receives, through the exchanges, the gradient of every rank's
loss, i.e. the SUM over ranks; the layer divides its expert-weight gradients by ``R`` on the way
(:class:`_ScaleGrad`), so that after backward an expert's gradient is already that of the mean
objective and needs no reduction over the ep ranks (over a "dp" dimension, expert gradients are
averaged like any replicated parameter). A hidden norm of the expert bank is shared by all
experts: it is replicated and averaged as a non-expert parameter.

Auxiliary losses are computed by each rank's router over its local groups (each loss is a mean
over groups, :mod:`vmoe_lib.routers.losses`); with the same number of groups on every rank, the
mean of the ranks' losses equals the one-process loss over all groups. Per-image routing's
balance losses, which see the batch as one group, are the exception (super-class guidance, a
mean over images, is not).

Not supported: Soft MoE (dense routing: every slot mixes every token of its group, so there is
no pair to send). Shared per-image routing (Mobile V-MoE) works: a follower layer exchanges the
leader's routing like its own.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.function import once_differentiable

from ..errors import ConfigError
from ..layers.dispatch import DispatchInfo
from ..layers.experts import ExpertBank, _SegmentLinear
from ..layers.moe import MoEMlp
from ..routers.base import Routing

__all__ = [
    "DENSE_ROUTERS",
    "EP_MESH_DIM",
    "ExchangeTimes",
    "ExpertParallel",
    "average_non_expert_gradients",
    "check_expert_parallel",
    "enable_expert_parallel",
    "exchange_timer",
    "expert_parameters",
    "named_expert_parameters",
    "non_expert_parameters",
    "resolve_group",
]

EP_MESH_DIM = "ep"  # the DeviceMesh dimension experts are split over
# Routers with a dense routing (no (token, expert) pairs to exchange).
DENSE_ROUTERS = ("soft",)
# The stacked per-expert tensors of an ExpertBank: split over the ranks. Anything else in the
# bank (a hidden norm shared by all experts) stays replicated.
_EXPERT_TENSORS = ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")


# ------------------------------------------------------------------------- process groups
def resolve_group(group_or_mesh: Any = None, mesh_dim: str = EP_MESH_DIM) -> dist.ProcessGroup:
    """The process group experts are split over.

    Args:
        group_or_mesh: a ``ProcessGroup``; a ``DeviceMesh`` (its ``mesh_dim`` dimension, or its
            only dimension when it is 1-D); or ``None`` for the default (world) group.
        mesh_dim: the mesh dimension to use (default ``"ep"``).

    Raises:
        ConfigError: torch.distributed unavailable or not initialised, a mesh without that
            dimension, or an object that is neither a group nor a mesh.
    """
    if not dist.is_available():
        raise ConfigError("expert parallelism needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise ConfigError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group (torchrun does "
            "the rendezvous) or torch.distributed.device_mesh.init_device_mesh before enable_expert_parallel"
        )
    if group_or_mesh is None:
        return dist.group.WORLD
    if isinstance(group_or_mesh, dist.ProcessGroup):
        return group_or_mesh
    from torch.distributed.device_mesh import DeviceMesh  # noqa: PLC0415 (not on every build)

    if isinstance(group_or_mesh, DeviceMesh):
        names = group_or_mesh.mesh_dim_names or ()
        if mesh_dim in names:
            return group_or_mesh.get_group(mesh_dim)
        if group_or_mesh.ndim == 1:
            return group_or_mesh.get_group()
        raise ConfigError(
            f"mesh_dim={mesh_dim!r} is not a dimension of the {group_or_mesh.ndim}-D DeviceMesh with dimensions "
            f"{tuple(names)}; name the expert-parallel dimension (e.g. init_device_mesh(..., mesh_dim_names=('dp', 'ep')))"
        )
    raise ConfigError(
        f"group_or_mesh={group_or_mesh!r} is invalid; it must be a torch.distributed ProcessGroup, a DeviceMesh or None"
    )


# ------------------------------------------------------------------------------ exchanges
@dataclass
class ExchangeTimes:
    """Wall time and volume of the all_to_all exchanges run inside :func:`exchange_timer`.

    ``seconds`` is the time spent in the blocking collective calls (forward and backward,
    counts and token rows), waiting for the slower rank included; ``calls`` and ``bytes_sent``
    count them.
    """

    seconds: float = 0.0
    calls: int = 0
    bytes_sent: int = 0


_ACTIVE_TIMERS: list[ExchangeTimes] = []


@contextlib.contextmanager
def exchange_timer() -> Iterator[ExchangeTimes]:
    """Measure the expert-parallel exchanges of the code inside: ``with exchange_timer() as t: ...``."""
    times = ExchangeTimes()
    _ACTIVE_TIMERS.append(times)
    try:
        yield times
    finally:
        _ACTIVE_TIMERS.remove(times)


def _all_to_all(
    x: torch.Tensor, output_splits: list[int] | None, input_splits: list[int] | None, group: dist.ProcessGroup
) -> torch.Tensor:
    """``all_to_all_single`` into a new tensor (rows ``sum(output_splits)``, or ``x``'s with even splits)."""
    rows = x.shape[0] if output_splits is None else sum(output_splits)
    out = x.new_empty((rows, *x.shape[1:]))
    x = x.contiguous()
    if not _ACTIVE_TIMERS:
        dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
        return out
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    start = time.perf_counter()
    dist.all_to_all_single(out, x, output_splits, input_splits, group=group)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    elapsed = time.perf_counter() - start
    for timer in _ACTIVE_TIMERS:
        timer.seconds += elapsed
        timer.calls += 1
        timer.bytes_sent += x.numel() * x.element_size()
    return out


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven exchange: rows ``input_splits[j]`` go to rank ``j``, rows
    ``output_splits[j]`` come from rank ``j``; the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):  # noqa: ANN001, ANN205 (autograd signature)
        ctx.splits, ctx.group = (output_splits, input_splits), group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        output_splits, input_splits = ctx.splits
        return _all_to_all(grad, input_splits, output_splits, ctx.group), None, None, None


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` (the expert weights' ``1 / R``)."""

    @staticmethod
    def forward(ctx, x, scale):  # noqa: ANN001, ANN205
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        return grad * ctx.scale, None


def _segments(counts: list[int]) -> list[tuple[int, int]]:
    ends = list(itertools.accumulate(counts))
    return list(zip([0, *ends[:-1]], ends))


# ------------------------------------------------------------------------- the layer mode
class ExpertParallel:
    """The expert-parallel mode of one :class:`~vmoe_lib.layers.MoEMlp` (its ``expert_parallel``
    attribute, set by :func:`enable_expert_parallel`): the group and which experts this rank owns.

    A plain object, not a module: it holds no parameters. A deep copy (an EMA model) shares the
    group; a pickled layer loses it and must be re-enabled after loading.
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group: dist.ProcessGroup | None = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.size
        self.first_expert = self.rank * self.num_local_experts

    @property
    def local_experts(self) -> range:
        """Global indices of the experts this rank holds."""
        return range(self.first_expert, self.first_expert + self.num_local_experts)

    def __repr__(self) -> str:
        return f"ExpertParallel(rank={self.rank} of {self.size}, experts={self.first_expert}..{self.local_experts.stop - 1})"

    def __deepcopy__(self, memo: dict[int, Any]) -> ExpertParallel:
        return self  # a handle on a communicator: copies of the model share it

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "group": None}

    def dispatch_combine(self, x: torch.Tensor, routing: Routing, experts: ExpertBank) -> tuple[torch.Tensor, DispatchInfo]:
        """Expert-parallel counterpart of :func:`vmoe_lib.layers.dispatch_combine`.

        ``x (G, S, D)`` and ``routing`` are this rank's; ``experts`` holds its ``L`` local experts.
        Returns ``(y (G, S, O), info)``; ``info.pairs`` counts this rank's routed pairs and
        ``info.rows_computed`` the rows its experts processed (from every rank).
        """
        if self.group is None:
            raise RuntimeError("this MoE layer was unpickled without its process group; call enable_expert_parallel again")
        if not routing.is_sparse:
            raise ConfigError(
                "expert parallelism needs a sparse routing ((token, expert) pairs); this layer's router returned a "
                "dense (Soft MoE) routing"
            )
        routing = routing.compact()  # a static routing's dropped choices travel nowhere
        G, S, D = x.shape
        if (G, S) != (routing.num_groups, routing.group_size):
            raise ValueError(f"routing is for (G, S)=({routing.num_groups}, {routing.group_size}); x has {(G, S)}")
        if routing.num_experts != self.num_experts or experts.num_experts != self.num_local_experts:
            raise ValueError(
                f"routing is over {routing.num_experts} experts and the bank holds {experts.num_experts}; expected "
                f"{self.num_experts} and {self.num_local_experts} ({self.num_experts} over {self.size} ranks)"
            )
        R, L, group = self.size, self.num_local_experts, self.group

        # This rank's pairs sorted by expert, hence by owner rank (a stable sort keeps (group, slot) order).
        order = torch.argsort(routing.expert_index, stable=True)
        rows = (routing.group_index * S + routing.token_index).index_select(0, order)  # rows of x_flat
        weights = routing.combine_weight.index_select(0, order).to(x.dtype)
        counts = torch.bincount(routing.expert_index, minlength=self.num_experts)  # (E,)

        # Counts first: recv[j, l] = pairs rank j sends to my local expert l.
        recv = _all_to_all(counts, None, None, group).view(R, L)
        send_splits = counts.view(R, L).sum(1).tolist()  # host sync: the split sizes
        recv_splits = recv.sum(1).tolist()
        per_local_expert = recv.sum(0).tolist()

        x_flat = x.reshape(G * S, D)
        received = _AllToAll.apply(x_flat.index_select(0, rows), recv_splits, send_splits, group)
        # Received rows are ordered (source rank, local expert); the experts want (local expert, source rank).
        regroup = None
        if R > 1 and L > 1:
            segment = torch.arange(R * L, device=x.device).repeat_interleave(recv.flatten())
            regroup = torch.argsort((segment % L) * R + segment // L, stable=True)
            received = received.index_select(0, regroup)
        out = self._run_local_experts(experts, received, _segments(per_local_expert))
        if regroup is not None:
            inverse = torch.empty_like(regroup)
            inverse[regroup] = torch.arange(regroup.numel(), device=x.device)
            out = out.index_select(0, inverse)
        returned = _AllToAll.apply(out, send_splits, recv_splits, group)  # (N, O) in this rank's sorted order

        y = x_flat.new_zeros(G * S, returned.shape[-1]).index_add(0, rows, returned * weights.unsqueeze(1))
        return y.view(G, S, -1), DispatchInfo("expert_parallel", rows.numel(), received.shape[0])

    def _run_local_experts(self, experts: ExpertBank, x: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
        """The local experts on rows sorted by local expert (``bounds``), as ``ExpertBank.forward_segments``,
        with the expert weights' gradients divided by ``R`` (see the module docstring)."""
        scale = 1.0 / self.size

        def scaled(p: torch.Tensor | None) -> torch.Tensor | None:
            return p if p is None or self.size == 1 else _ScaleGrad.apply(p, scale)

        w1, b1, w2, b2 = (scaled(getattr(experts, name)) for name in _EXPERT_TENSORS)
        h = _SegmentLinear.apply(x, w1, b1, bounds)
        return experts.drop2(_SegmentLinear.apply(experts._hidden(h), w2, b2, bounds))


# ------------------------------------------------------------------------------ enabling
def _moe_layers(module: nn.Module) -> list[tuple[str, MoEMlp]]:
    return [(name or type(module).__name__, m) for name, m in module.named_modules() if isinstance(m, MoEMlp)]


def check_expert_parallel(module: nn.Module, ep_size: int) -> list[MoEMlp]:
    """The MoE layers of ``module`` that :func:`enable_expert_parallel` would split over ``ep_size``
    ranks; raises :class:`ConfigError` (naming the layer and value) if any cannot be.

    Runs no collective: every check of :func:`enable_expert_parallel` that can fail on bad input.
    """
    if not isinstance(module, nn.Module):
        raise ConfigError(f"module={module!r} is invalid; it must be an nn.Module holding MoEMlp layers")
    if not isinstance(ep_size, int) or isinstance(ep_size, bool) or ep_size < 1:
        raise ConfigError(f"ep_size={ep_size!r} is invalid; it must be a positive integer (ranks of the ep group)")
    layers = _moe_layers(module)
    if not layers:
        raise ConfigError(f"{type(module).__name__} has no MoEMlp layer: there are no experts to split over ranks")
    for name, layer in layers:
        if layer.expert_parallel is not None:
            raise ConfigError(f"MoE layer {name!r} is already expert-parallel ({layer.expert_parallel!r})")
        if layer.router_name in DENSE_ROUTERS:
            raise ConfigError(
                f"router={layer.router_name!r} (MoE layer {name!r}) has no expert-parallel mode: Soft MoE's dense "
                "routing mixes every token of a group into every slot, so there are no (token, expert) pairs to "
                "send; use a sparse router (token choice, expert choice, per_image) or keep this model data-parallel"
            )
        if layer.num_experts % ep_size:
            raise ConfigError(
                f"num_experts={layer.num_experts} (MoE layer {name!r}) is not divisible by the expert-parallel size "
                f"{ep_size}; allowed: an ep size that divides num_experts "
                f"({', '.join(str(d) for d in range(1, layer.num_experts + 1) if layer.num_experts % d == 0)})"
            )
    return [layer for _, layer in layers]


@torch.no_grad()
def _keep_local_experts(bank: ExpertBank, first: int, count: int) -> None:
    for name in _EXPERT_TENSORS:
        p = getattr(bank, name)
        if p is not None:
            setattr(bank, name, nn.Parameter(p[first:first + count].clone(), requires_grad=p.requires_grad))
    bank.num_experts = count


def enable_expert_parallel(
    module: nn.Module,
    group_or_mesh: Any = None,
    *,
    mesh_dim: str = EP_MESH_DIM,
    sync_parameters: bool = True,
) -> nn.Module:
    """Turn every :class:`~vmoe_lib.layers.MoEMlp` of ``module`` into expert-parallel mode, in place.

    Call it on every rank of the group, on the same model, before building the optimizer (the
    expert weights are replaced by their local slices).

    Args:
        module: a model or a single ``MoEMlp``.
        group_or_mesh: a ``ProcessGroup``, a ``DeviceMesh`` (its ``mesh_dim`` dimension), or
            ``None`` for the default group (see :func:`resolve_group`).
        mesh_dim: the mesh dimension experts are split over (default ``"ep"``).
        sync_parameters: first broadcast every parameter and buffer from the group's first rank,
            so the replicated parts start identical and the experts are slices of one model.

    Returns:
        ``module``, whose MoE layers now hold only experts ``[r * E / R, (r + 1) * E / R)`` on rank
        ``r`` of ``R`` and exchange tokens with ``all_to_all``.

    Raises:
        ConfigError: see :func:`resolve_group` and :func:`check_expert_parallel`.
    """
    group = resolve_group(group_or_mesh, mesh_dim)
    layers = check_expert_parallel(module, dist.get_world_size(group))
    if sync_parameters:
        source = dist.get_global_rank(group, 0)
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            dist.broadcast(tensor.data, src=source, group=group)
    for layer in layers:
        mode = ExpertParallel(group, layer.num_experts)
        _keep_local_experts(layer.experts, mode.first_expert, mode.num_local_experts)
        layer.expert_parallel = mode
    return module


# ---------------------------------------------------------------------------- parameters
def named_expert_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of the expert weights split over the ep ranks (each rank holds
    different ones: never average them over the ep group). Names as ``module.named_parameters()``,
    e.g. for DDP's ``_set_params_and_buffers_to_ignore_for_model``."""
    for layer_name, layer in module.named_modules():
        if isinstance(layer, MoEMlp) and layer.expert_parallel is not None:
            for tensor_name in _EXPERT_TENSORS:
                p = getattr(layer.experts, tensor_name)
                if p is not None:
                    yield (f"{layer_name}.experts.{tensor_name}" if layer_name else f"experts.{tensor_name}"), p


def expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of :func:`named_expert_parameters`."""
    return [p for _, p in named_expert_parameters(module)]


def non_expert_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every other parameter of ``module``: replicated on the ep ranks (router, shared expert, backbone,
    an expert bank's shared hidden norm); their gradients are averaged over the ranks."""
    experts = {id(p) for p in expert_parameters(module)}
    return [p for p in module.parameters() if id(p) not in experts]


@torch.no_grad()
def average_non_expert_gradients(module: nn.Module, group_or_mesh: Any = None, *, mesh_dim: str = EP_MESH_DIM) -> None:
    """All-reduce-average the gradients of the replicated parameters over the group (call after
    ``backward``, before the optimizer step; for pure expert parallelism without a data-parallel
    wrapper). A parameter that requires grad but got none counts as a zero gradient, so every rank
    reduces the same tensors. Expert gradients are left alone (see the module docstring)."""
    group = resolve_group(group_or_mesh, mesh_dim)
    size = dist.get_world_size(group)
    params = [p for p in non_expert_parameters(module) if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_kind: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for p in params:
        by_kind.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_kind.values():  # one all-reduce per dtype and device
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(chunk.view_as(g))
