"""Data parallelism for :func:`vmoe_lib.train.train_model`: one run on N processes, as the 1-process run.

Launch with PyTorch's own launcher (``torchrun`` ships with torch)::

    torchrun --nproc_per_node 4 -m vmoe_lib.train config.json --seed 0 --out record.json
    torchrun --nproc_per_node 4 -m vmoe_lib.train config.json --strategy fsdp2 ...
    torchrun --nproc_per_node 4 -m vmoe_lib.train config.json --strategy ep ...     # experts split over ranks

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous; :func:`init_from_env`
reads them and opens the process group (nccl on CUDA, gloo on the CPU). What makes the N-process
run the 1-process run:

* **Data.** Every rank draws the same global batch (the same shuffled order and the same
  augmentation, both seeded by ``(seed, epoch, step)``) and keeps its contiguous share
  (:meth:`DistributedContext.shard`): rank ``r`` of ``N`` takes images ``[r B/N, (r+1) B/N)``.
  ``batch_size`` stays the *global* batch; it must divide by ``N``, and for MoE models ``B/N`` must
  be a multiple of the routing group size, so every rank routes whole groups of the 1-process run.
* **Gradients.** Each rank's loss is the mean over its share; DDP (or FSDP2) averages gradients over
  ranks, which is the gradient of the global mean (equal shares). Auxiliary losses are means over
  routing groups (:mod:`vmoe_lib.routers.losses`), so their mean over ranks is the 1-process value.
* **Router noise.** The logit noise of the routers is drawn for the *global* batch on every rank and
  sliced (:func:`vmoe_lib.noise.global_randn_like`), so each token gets the noise it gets in the 1-process run and the
  ranks' generators stay in step.
* **Schedule, clipping, optimizer**: unchanged; they see the averaged gradients. Under ``"ep"`` the
  norm for clipping adds every rank's expert gradients (:func:`clip_grad_norm`), and checkpoints hold
  the full model: :func:`full_state` gathers the experts (and their optimizer state) of all ranks, and
  :func:`load_full_state` keeps a rank's own.

What differs: the order of floating-point sums (the gradient all-reduce, the loss and accuracy sums),
so the N-process run equals the 1-process run within float32 tolerance over a few steps (the tests
state the tolerance), not bit for bit; over a whole run the differences grow as between two thread
counts (a token's top-1 expert flips and the paths part), so it is a statistically equivalent rerun. timm's dropout and drop-path masks are drawn per rank, from the same generator:
a model with active dropout trains correctly but draws different masks from the 1-process run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import ConfigError, check_choice
from ..noise import active_context, data_parallel_noise, global_randn, global_randn_like  # re-exported: their home is low in the package

__all__ = [
    "STRATEGIES",
    "DistributedContext",
    "init_from_env",
    "launched_by_torchrun",
    "global_randn",
    "global_randn_like",
    "active_context",
    "data_parallel_noise",
    "wrap_model",
    "unwrap",
    "full_state",
    "load_full_state",
    "after_backward",
    "clip_grad_norm",
]

STRATEGIES = ("ddp", "fsdp2", "ep")


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in a data-parallel run.

    Attributes:
        rank, world_size, local_rank: as ``torchrun`` sets them.
        backend: ``"gloo"`` or ``"nccl"``.
        strategy: ``"ddp"`` (DistributedDataParallel), ``"fsdp2"`` (``fully_shard`` per block) or ``"ep"``
            (each rank holds ``E / N`` experts of every MoE layer and trains on its share of the batch; the
            replicated parameters' gradients are averaged over ranks, see :mod:`.expert_parallel`).
    """

    rank: int
    world_size: int
    local_rank: int = 0
    backend: str = "gloo"
    strategy: str = "ddp"

    def __post_init__(self) -> None:
        check_choice("strategy", self.strategy, STRATEGIES)
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank={self.rank} is invalid for world_size={self.world_size}; it must be in [0, world_size)")

    @property
    def is_main(self) -> bool:
        """Rank 0: writes checkpoints, results and progress."""
        return self.rank == 0

    @classmethod
    def from_process_group(cls, strategy: str = "ddp") -> DistributedContext:
        """The context of an already initialised default process group (e.g. in tests)."""
        if not dist.is_initialized():
            raise RuntimeError("no default process group is initialised; launch with torchrun or call init_from_env()")
        return cls(rank=dist.get_rank(), world_size=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                   backend=str(dist.get_backend()), strategy=strategy)

    def check_batch(self, name: str, batch_size: int, group_size: int = 1) -> int:
        """This rank's share of a global batch; a clear error when ranks could not share it equally."""
        if batch_size % self.world_size:
            raise ConfigError(f"{name}={batch_size} is invalid on {self.world_size} processes; it is the global batch "
                              f"and must divide by the number of processes (e.g. {self.world_size * max(1, batch_size // self.world_size)})")
        share = batch_size // self.world_size
        if share % group_size:
            raise ConfigError(f"{name}={batch_size} gives {share} images per process, not a multiple of the MoE routing "
                              f"group size {group_size}; each process must route whole groups (use a {name} that is a "
                              f"multiple of {self.world_size * group_size})")
        return share

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (first dim)."""
        share = batch.shape[0] // self.world_size
        return batch[self.rank * share : (self.rank + 1) * share]

    def all_sum(self, values: Sequence[float], device: torch.device) -> list[float]:
        """Sum of ``values`` over ranks, in float64 (loss and accuracy sums)."""
        tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        """Wait for every rank (after rank 0 wrote a checkpoint)."""
        dist.barrier()

    def describe(self) -> dict[str, Any]:
        """What a run's record says about its processes."""
        return {k: v for k, v in asdict(self).items() if k != "local_rank"}


def launched_by_torchrun() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting ``WORLD_SIZE``)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device: torch.device, strategy: str = "ddp") -> DistributedContext:
    """Open the default process group from ``torchrun``'s environment; nccl for CUDA, gloo otherwise.

    On CUDA, rank ``LOCAL_RANK`` uses GPU ``LOCAL_RANK`` of its node.
    """
    check_choice("strategy", strategy, STRATEGIES)
    if not launched_by_torchrun():
        raise ConfigError("a data-parallel run needs RANK and WORLD_SIZE in the environment: start it with "
                          "`torchrun --nproc_per_node N -m vmoe_lib.train ...`")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return DistributedContext.from_process_group(strategy)


def wrap_model(model: nn.Module, context: DistributedContext, device: torch.device) -> nn.Module:
    """DDP around ``model``; FSDP2 (``fully_shard`` on every block, then the root) on a 1-D mesh; or, for
    ``"ep"``, the experts of every MoE layer split over the ranks (in place; see :func:`after_backward`)."""
    if context.strategy == "ep":
        from .expert_parallel import enable_expert_parallel

        return enable_expert_parallel(model)
    if context.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index if device.index is not None else context.local_rank] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as err:  # FSDP2's public home since torch 2.6
        raise ConfigError(f"strategy='fsdp2' needs torch >= 2.6 (torch.distributed.fsdp.fully_shard); this is torch "
                          f"{torch.__version__}: use strategy='ddp' or a newer torch") from err

    mesh = init_device_mesh(device.type, (context.world_size,), mesh_dim_names=("dp",))
    for block in _shardable_blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _shardable_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: a ViT's ``blocks``, a ConvNeXt's stages' blocks."""
    blocks: list[nn.Module] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Sequential) and name.split(".")[-1] in ("blocks",):
            blocks.extend(module.children())
    return blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    return getattr(model, "module", model)


def after_backward(model: nn.Module, context: DistributedContext | None) -> None:
    """What a strategy needs between ``backward`` and clipping: under ``"ep"``, average the replicated
    parameters' gradients over the ranks (DDP and FSDP2 do theirs inside ``backward``)."""
    if context is not None and context.strategy == "ep":
        from .expert_parallel import average_non_expert_gradients

        average_non_expert_gradients(model)


def clip_grad_norm(model: nn.Module, max_norm: float, context: DistributedContext | None) -> None:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model, also when its experts are split over ranks.

    Under ``"ep"`` each rank holds other experts, so the norm adds the ranks' expert gradients (an
    all-reduce) to the replicated ones (counted once): every rank scales by the same factor, the
    1-process run's.
    """
    if context is None or context.strategy != "ep":
        nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        return
    from .expert_parallel import expert_parameters, non_expert_parameters

    experts = [p.grad for p in expert_parameters(model) if p.grad is not None]
    others = [p.grad for p in non_expert_parameters(model) if p.grad is not None]
    device = (experts or others)[0].device
    squares = torch.stack([torch.zeros((), dtype=torch.float64, device=device),
                           *(g.detach().double().square().sum() for g in experts)]).sum()
    dist.all_reduce(squares)
    squares = squares + sum((g.detach().double().square().sum() for g in others), torch.zeros((), dtype=torch.float64, device=device))
    coefficient = torch.clamp(max_norm / (squares.sqrt() + 1e-6), max=1.0)
    for g in experts + others:
        g.mul_(coefficient.to(g.dtype))


def _expert_slices(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Under ``"ep"``: each expert tensor's name -> (first, count) of the experts this rank holds."""
    from .expert_parallel import named_expert_parameters

    rank = dist.get_rank()
    return {name: (rank * p.shape[0], p.shape[0]) for name, p in named_expert_parameters(model)}


def _gathered(tensor: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts)


def _optimizer_expert_indices(model: nn.Module, optimizer: torch.optim.Optimizer) -> set[int]:
    from .expert_parallel import expert_parameters

    experts = {id(p) for p in expert_parameters(model)}
    order = [p for group in optimizer.param_groups for p in group["params"]]
    return {i for i, p in enumerate(order) if id(p) in experts}


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, context: DistributedContext) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts, on the CPU, for rank 0 to save.

    A collective under FSDP2 and ``"ep"`` (every rank must call it; ``"ep"`` gathers the experts of
    every rank in order); a plain ``state_dict`` under DDP.
    """
    if context.strategy == "ep":
        slices = _expert_slices(model)
        model_state = {k: (_gathered(v) if k in slices else v).cpu() for k, v in model.state_dict().items()}
        optimizer_state = optimizer.state_dict()
        expert_indices = _optimizer_expert_indices(model, optimizer)
        for index in sorted(optimizer_state["state"]):
            state = optimizer_state["state"][index]
            if index in expert_indices:
                optimizer_state["state"][index] = {k: (_gathered(v) if torch.is_tensor(v) and v.ndim > 0 else v)
                                                   for k, v in state.items()}
        return model_state, optimizer_state
    if context.strategy == "ddp":
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optimizer_state: dict,
                    context: DistributedContext) -> None:
    """Load what :func:`full_state` saved into the wrapped model and its optimizer (every rank)."""
    if context.strategy == "ep":  # keep this rank's experts of the full tensors
        slices = _expert_slices(model)
        model.load_state_dict({k: (v[slices[k][0]:slices[k][0] + slices[k][1]] if k in slices else v)
                               for k, v in model_state.items()})
        expert_indices = _optimizer_expert_indices(model, optimizer)
        rank = dist.get_rank()
        state = dict(optimizer_state)
        state["state"] = {}
        for index, values in optimizer_state["state"].items():
            if index in expert_indices:
                values = {k: (v.chunk(dist.get_world_size())[rank].clone() if torch.is_tensor(v) and v.ndim > 0 else v)
                          for k, v in values.items()}
            state["state"][index] = values
        optimizer.load_state_dict(state)
        return
    if context.strategy == "ddp":
        unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state,
                   options=StateDictOptions(full_state_dict=True))
