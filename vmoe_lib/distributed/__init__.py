"""Running one model over several processes with ``torch.distributed``.

* :mod:`.expert_parallel` — the experts of every MoE layer split over the ranks of an "ep"
  process group or ``DeviceMesh`` dimension, tokens exchanged with ``all_to_all``.
"""

from .expert_parallel import (
    DENSE_ROUTERS,
    EP_MESH_DIM,
    ExchangeTimes,
    ExpertParallel,
    average_non_expert_gradients,
    check_expert_parallel,
    enable_expert_parallel,
    exchange_timer,
    expert_parameters,
    named_expert_parameters,
    non_expert_parameters,
    resolve_group,
)

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
