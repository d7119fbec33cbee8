"""Reusable layers: the MoE layer (a timm ``Mlp`` drop-in), its expert bank, dispatch backends,
shared expert, and the collection of auxiliary losses and routing statistics."""

from .aux import collect_aux_loss, set_routing_labels
from .dispatch import BACKENDS, DispatchInfo, dispatch_combine, resolve_backend
from .experts import EXPERT_INITS, ExpertBank, grouped_mm_supported
from .moe import MoEMlp, SharedRouting, images_per_group
from .shared_expert import SharedExpert
from .stats import RoutingRecorder, collect_routing_stats, moe_layers, record_routing

__all__ = [
    "BACKENDS",
    "EXPERT_INITS",
    "DispatchInfo",
    "ExpertBank",
    "MoEMlp",
    "RoutingRecorder",
    "SharedExpert",
    "SharedRouting",
    "collect_aux_loss",
    "set_routing_labels",
    "collect_routing_stats",
    "dispatch_combine",
    "grouped_mm_supported",
    "images_per_group",
    "moe_layers",
    "record_routing",
    "resolve_backend",
]
