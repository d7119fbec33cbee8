"""Training beyond one process with ``torch.distributed``.

* :mod:`.data_parallel` — one run on N processes that ``torchrun`` starts (DDP, or FSDP2 for large models),
  equal to the 1-process run within float tolerance.
* :mod:`.expert_parallel` — the experts of every MoE layer split over the ranks of an "ep" process
  group or ``DeviceMesh`` dimension, tokens exchanged with ``all_to_all``.

The book's "Running on a cluster" page has the launch commands (one node, several nodes, SLURM).
"""

from .data_parallel import (
    STRATEGIES,
    after_backward,
    clip_grad_norm,
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

from .data_parallel import __all__ as _data_parallel_all  # noqa: E402
from .expert_parallel import __all__ as _expert_parallel_all  # noqa: E402

__all__ = [*_data_parallel_all, *_expert_parallel_all]
