"""Backbones: dense small-image baselines and their MoE variants, all created through timm."""

from __future__ import annotations

from typing import Any

import timm
import torch.nn as nn

from ..errors import check_choice
from . import dense
from .dense import DENSE_CONVNEXT_SIZES, DENSE_VIT_SIZES, dense_model_names

__all__ = ["create_model", "list_models", "DENSE_VIT_SIZES", "DENSE_CONVNEXT_SIZES", "dense_model_names"]


def list_models() -> list[str]:
    """Names accepted by :func:`create_model` (dense and MoE backbones of this library)."""
    return sorted(set(dense_model_names()) | set(timm.list_models("vmoe_*")))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Create a registered backbone by name (``timm.create_model`` with a clear error on typos)."""
    check_choice("model", name, list_models())
    return timm.create_model(name, **kwargs)
