"""Backbones: dense small-image baselines and their MoE variants, all created through timm."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

from ..errors import check_choice
from . import dense
from .dense import DENSE_CONVNEXT_SIZES, DENSE_VIT_SIZES, dense_model_names
from . import moe_convnext, moe_vit  # registers the vmoe_* models with timm
from .moe_convnext import moe_convnext_from_dense, moe_convnext_model_names
from .moe_utils import (
    count_parameters,
    flops_matched_dense,
    flops_per_image,
    load_moe_model,
    save_moe_model,
    set_routing,
    upcycle_from_dense,
)
from .moe_vit import moe_vit_from_dense, moe_vit_model_names
from .ensemble import (attach_ensemble, ensemble_log_probs, ensemble_size, ensemble_targets, member_log_probs,
                       members_apart)
from .placement import resolve_moe_layers, resolve_stage_moe_layers
from .timm_contract import TIMM_CONTRACT_EXCLUSIONS

__all__ = ["create_model", "list_models", "DENSE_VIT_SIZES", "DENSE_CONVNEXT_SIZES", "dense_model_names"]
__all__ += [
    "count_parameters",
    "flops_matched_dense",
    "flops_per_image",
    "load_moe_model",
    "moe_convnext_from_dense",
    "moe_convnext_model_names",
    "moe_vit_from_dense",
    "moe_vit_model_names",
    "resolve_moe_layers",
    "resolve_stage_moe_layers",
    "save_moe_model",
    "set_routing",
    "TIMM_CONTRACT_EXCLUSIONS",
    "upcycle_from_dense",
    "attach_ensemble",
    "ensemble_log_probs",
    "ensemble_size",
    "ensemble_targets",
    "member_log_probs",
    "members_apart",
]


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (dense and MoE backbones of this library)."""
    return sorted(set(dense_model_names()) | set(timm.list_models("vmoe_*")))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Create a registered backbone by name (``timm.create_model`` with a clear error on typos)."""
    check_choice("model", name, list_models())
    return timm.create_model(name, **kwargs)
