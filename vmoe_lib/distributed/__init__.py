"""Training beyond one process: data parallelism (DDP, FSDP2) launched by ``torchrun``, and expert parallelism.

See the book's "Running on a cluster" page for launch commands (one node, several nodes, SLURM).
"""

from .data_parallel import (
    STRATEGIES,
    DistributedContext,
    active_context,
    data_parallel_noise,
    full_state,
    global_randn,
    global_randn_like,
    init_from_env,
    launched_by_torchrun,
    load_full_state,
    unwrap,
    wrap_model,
)

__all__ = [
    "STRATEGIES",
    "DistributedContext",
    "active_context",
    "data_parallel_noise",
    "full_state",
    "global_randn",
    "global_randn_like",
    "init_from_env",
    "launched_by_torchrun",
    "load_full_state",
    "unwrap",
    "wrap_model",
]
