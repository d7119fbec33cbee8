"""Collecting auxiliary losses and routing statistics from a whole model.

Protocol: a module that has an auxiliary loss stores it after each forward in
its attribute ``aux_loss`` (a scalar tensor that keeps its graph, or ``None``).
The training engine adds :func:`collect_aux_loss` to the task loss, so any
module that follows the protocol (MoE layers, routers) is trained with its loss.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["collect_aux_loss"]


def collect_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """Sum of ``module.aux_loss`` over all modules of ``model`` that set one; ``None`` if none did."""
    total = None
    for module in model.modules():
        loss = getattr(module, "aux_loss", None)
        if isinstance(loss, torch.Tensor):
            total = loss if total is None else total + loss
    return total
