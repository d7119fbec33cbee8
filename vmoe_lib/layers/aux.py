"""Collecting auxiliary losses and routing statistics from a whole model.

Protocol: a module that has an auxiliary loss stores it after each forward in
its attribute ``aux_loss`` (a scalar tensor that keeps its graph, or ``None``).
The training engine adds :func:`collect_aux_loss` to the task loss, so any
module that follows the protocol (MoE layers, routers) is trained with its loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["collect_aux_loss", "set_routing_labels"]


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of ``module.aux_loss`` over all modules of ``model`` that set one; ``None`` if none did."""
    total = None
    for module in model.modules():
        loss = getattr(module, "aux_loss", None)
        if isinstance(loss, torch.Tensor):
            total = loss if total is None else total + loss
    return total


def set_routing_labels(model: nn.Module, labels: torch.Tensor | None) -> bool:
    """Give every router that learns from class labels (``set_labels``: the super-class-guided per-image router)
    this batch's ``labels``, or clear them with ``None``. Returns whether any router takes labels."""
    found = False
    for module in model.modules():
        setter = getattr(module, "set_labels", None)
        if callable(setter) and getattr(module, "superclasses", None) is not None:
            setter(labels)
            found = True
    return found
