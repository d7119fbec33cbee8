"""Shared expert: an always-on dense MLP added to the routed experts' output.

ViMoE (Han et al., arXiv:2410.15732, Sec. 3.3) adds a dense MLP that every
token passes through, beside the routed experts, to capture common knowledge
and stabilise training. Public code has two forms, both offered here:

* ungated (DeepSeekMoE): ``y = moe(x) + shared(x)``;
* sigmoid-gated (Qwen2-MoE): ``y = moe(x) + sigmoid(x @ w_gate) * shared(x)``,
  one scalar gate per token.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from timm.layers import Mlp

from ..errors import check_positive

__all__ = ["SharedExpert"]


class SharedExpert(nn.Module):
    """A timm ``Mlp`` of width ``hidden_features`` on ``(..., D)``, optionally gated per token."""

    def __init__(
        self,
        in_features: int,
        hidden_features: int,
        out_features: int,
        act_layer: type[nn.Module] = nn.GELU,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        gated: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        check_positive("shared_expert (width)", hidden_features)
        dd = {"device": device, "dtype": dtype}
        self.mlp = Mlp(in_features, hidden_features, out_features, act_layer=act_layer, bias=bias, drop=drop, **dd)
        # Qwen2-MoE: a bias-free linear map to one logit per token.
        self.gate = nn.Linear(in_features, 1, bias=False, **dd) if gated else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mlp(x)
        if self.gate is not None:
            y = torch.sigmoid(self.gate(x)) * y
        return y
