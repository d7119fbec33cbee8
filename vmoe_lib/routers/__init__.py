"""Routers of the five Vision-MoE papers, as ``nn.Module`` objects returning a :class:`Routing`.

Registry names, algorithms and papers:

* ``softmax_token_choice`` — noisy softmax, top-k, capacity, vanilla/BPR (V-MoE, arXiv:2106.05974)
* ``sinkhorn_token_choice`` — top-k on an entropic OT plan (routers study, arXiv:2401.15969)
* ``softmax_expert_choice`` — each expert takes its top-C tokens by softmax (routers study; arXiv:2202.09368)
* ``sinkhorn_expert_choice`` — each expert takes its top-C tokens of the OT plan (routers study)
* ``sparse_expert_choice`` — top-C of a C-sparse L2-regularised OT plan (routers study; arXiv:2209.15466)
* ``soft`` — Soft MoE: softmax over tokens / over slots (arXiv:2308.00951)
* ``per_image`` — one decision per image, with super-class guidance (Mobile V-MoE, arXiv:2309.04354)

:class:`EnsembleRouter` splits the experts among the members of an efficient ensemble of experts (E³,
arXiv:2110.03360), one of the sparse routers above per member.

Each allocation step is also a pure function of the router logits (or, for Soft MoE,
of the tokens and slot parameters): :func:`top_k_token_choice`, :func:`expert_choice`,
:func:`sinkhorn`, :func:`sparse_expert_choice`, :func:`soft_moe_weights`; the capacity
rule is :func:`compute_capacity`; the auxiliary losses are :func:`importance_loss`,
:func:`load_loss`, :func:`balance_loss`, :func:`z_loss`, :func:`superclass_loss`.

Routers never set an ``aux_loss`` attribute on themselves: the MoE layer copies
``routing.aux_loss`` (already weighted) onto its own ``aux_loss``.
"""

from .base import LazyMetrics, Routing
from .capacity import compute_capacity
from .ensemble_routing import ENSEMBLE_ROUTERS, EnsembleRouter, merge_member_routings
from .expert_choice_routing import ExpertChoice, SoftmaxExpertChoiceRouter, expert_choice
from .gates import GATES, CosineGate, L2Gate, LinearGate, MLPGate, create_gate
from .losses import balance_loss, importance_loss, load_loss, superclass_loss, z_loss
from .per_image_routing import PerImageRouter
from .registry import create_router, list_routers, register_router, router_options
from .sinkhorn_routing import SinkhornExpertChoiceRouter, SinkhornTokenChoiceRouter, sinkhorn
from .soft_routing import SoftRouter, soft_moe_logits, soft_moe_weights
from .sparse_ot_routing import (
    SparseExpertChoiceRouter,
    sparse_expert_choice,
    sparse_simplex_projection,
    sparsity_constrained_plan,
)
from .ops import static_shapes, static_shapes_active
from .stats import gate_entropy
from .token_choice_routing import SoftmaxTokenChoiceRouter, TokenChoice, top_k_token_choice

__all__ = [
    "CosineGate",
    "ENSEMBLE_ROUTERS",
    "EnsembleRouter",
    "merge_member_routings",
    "L2Gate",
    "GATES",
    "ExpertChoice",
    "LinearGate",
    "MLPGate",
    "PerImageRouter",
    "Routing",
    "LazyMetrics",
    "SinkhornExpertChoiceRouter",
    "SinkhornTokenChoiceRouter",
    "SoftRouter",
    "SoftmaxExpertChoiceRouter",
    "SoftmaxTokenChoiceRouter",
    "SparseExpertChoiceRouter",
    "TokenChoice",
    "balance_loss",
    "compute_capacity",
    "create_gate",
    "create_router",
    "expert_choice",
    "gate_entropy",
    "importance_loss",
    "list_routers",
    "load_loss",
    "register_router",
    "router_options",
    "sinkhorn",
    "soft_moe_logits",
    "soft_moe_weights",
    "sparse_expert_choice",
    "sparse_simplex_projection",
    "sparsity_constrained_plan",
    "static_shapes",
    "static_shapes_active",
    "superclass_loss",
    "top_k_token_choice",
    "z_loss",
]
