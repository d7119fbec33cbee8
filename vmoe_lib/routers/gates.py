"""Gate parameterisations: how token-expert affinities (router logits) are computed.

The routers study (arXiv:2401.15969) separates the *parameterisation* of the
affinities from the *allocation* algorithm; the "sweet spot" study
(arXiv:2411.18322) compares linear, cosine and other gates and finds the plain
linear gate best. Every gate maps tokens ``(..., D)`` to logits ``(..., E)``
and computes in the dtype of its input (routers pass float32), casting its
parameters on the fly so that a bfloat16 model still routes in float32.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import check_choice, check_positive
from .ops import l2_normalize

__all__ = ["GATES", "CosineGate", "L2Gate", "LinearGate", "MLPGate", "create_gate"]


def _lecun_normal_(weight: torch.Tensor, fan_in: int) -> torch.Tensor:
    # flax.linen.Dense's default kernel init (truncated normal, variance 1/fan_in), used by the reference router.
    std = 1.0 / math.sqrt(fan_in) / 0.87962566103423978  # correct for truncation at 2 std, as flax does
    return nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class LinearGate(nn.Module):
    """Bias-free linear logits ``x @ W``, ``W: (D, E)`` (V-MoE, arXiv:2106.05974 Eq. 1)."""

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        _lecun_normal_(self.weight, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., D) -> logits (..., E)`` in ``x.dtype``."""
        return F.linear(x, self.weight.to(x.dtype))


class CosineGate(nn.Module):
    """Cosine-similarity logits with a learnable temperature (X-MoE, arXiv:2204.09179 Eq. 4).

    ``logits[e] = cos(x, w_e) / tau``; ``tau`` is learned as ``log tau`` and
    clamped to ``>= min_temperature`` (X-MoE clamps at 0.01) so logits stay
    bounded by ``1 / min_temperature``. Deviation from X-MoE: no low-dimensional
    projection of the token before the cosine (the sweet-spot study does not
    specify one); tokens and expert embeddings are compared in ``D`` dims.
    """

    def __init__(
        self, dim: int, num_experts: int, *, temperature: float = 0.07, min_temperature: float = 0.01
    ) -> None:
        super().__init__()
        check_positive("gate_temperature", temperature)
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        _lecun_normal_(self.weight, dim)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.min_temperature = float(min_temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., D) -> logits (..., E)`` in ``x.dtype``, each in ``[-1/tau, 1/tau]``."""
        weight = l2_normalize(self.weight.to(x.dtype), dim=-1)
        cosine = F.linear(l2_normalize(x, dim=-1), weight)
        temperature = self.log_temperature.to(x.dtype).exp().clamp(min=self.min_temperature)
        return cosine / temperature


class L2Gate(nn.Module):
    """Negative squared Euclidean distance to a learned embedding per expert: ``logits[e] = -||x - w_e||^2``.

    The distance router of the sweet-spot study's router comparison (arXiv:2411.18322, Tab. 7), ``W: (E, D)``
    initialised as the linear gate's (LeCun normal). Expanding the square,
    ``-||x - w_e||^2 = 2 x.w_e - ||w_e||^2 - ||x||^2``: the last term is the same for every expert of a token, so a
    softmax over the experts (and a top-k, and a per-token noise) sees a linear gate with twice its slope and a bias
    ``-||w_e||^2`` per expert; only the scale and that bias set it apart.
    """

    def __init__(self, dim: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, dim))
        _lecun_normal_(self.weight, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., D) -> logits (..., E)`` in ``x.dtype``, every one <= 0."""
        weight = self.weight.to(x.dtype)
        cross = F.linear(x, weight)
        return 2 * cross - (weight * weight).sum(-1) - (x * x).sum(-1, keepdim=True)


class MLPGate(nn.Module):
    """A small MLP gate: ``Linear(D, H) -> GELU -> Linear(H, E, bias=False)``."""

    def __init__(self, dim: int, num_experts: int, *, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden_dim = dim if hidden_dim is None else hidden_dim
        check_positive("gate_hidden_dim", hidden_dim)
        self.hidden = nn.Linear(dim, hidden_dim)
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_dim))
        _lecun_normal_(self.weight, hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x: (..., D) -> logits (..., E)`` in ``x.dtype``."""
        h = F.gelu(F.linear(x, self.hidden.weight.to(x.dtype), self.hidden.bias.to(x.dtype)))
        return F.linear(h, self.weight.to(x.dtype))


GATES: dict[str, type[nn.Module]] = {"linear": LinearGate, "cosine": CosineGate, "l2": L2Gate, "mlp": MLPGate}


def create_gate(kind: str, dim: int, num_experts: int, *, hidden_dim: int | None = None) -> nn.Module:
    """Build the gate named ``kind`` (``'linear'``, ``'cosine'``, ``'l2'`` or ``'mlp'``)."""
    check_choice("gate", kind, GATES)
    if kind == "mlp":
        return MLPGate(dim, num_experts, hidden_dim=hidden_dim)
    return GATES[kind](dim, num_experts)
