"""Soft MoE routing: every slot takes a convex mix of the tokens (Puigcerver et al., arXiv:2308.00951).

Reference: google-research/vmoe ``projects/soft_moe/router.py``. With slot
parameters ``mu (D, E, P)``::

    x_n = x / |x|,  mu_n = mu / |mu| (over D),  the smaller of the two (by element count) times a learnable scalar
    logits[g, s, e, p] = x_n[g, s] . mu_n[:, e, p]
    dispatch = softmax over tokens s        (Alg. 1: each slot is a convex combination of tokens)
    combine  = softmax over all (e, p)      (each token's output is a convex combination of slot outputs)

The experts receive ``sum_s dispatch[g, s, e, p] * x[g, s]`` of the *un-normalised* tokens:
normalisation only enters the logits (a pitfall of several ports). There is no
discrete assignment, so the :class:`Routing` is dense, with ``capacity = P``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..errors import ConfigError, check_positive
from ..noise import global_randn
from .base import LazyMetrics, Routing
from .ops import Setting, check_int_setting, check_rank3, float32_math, l2_normalize, softmax_experts
from .stats import gate_entropy

__all__ = ["SoftRouter", "soft_moe_logits", "soft_moe_weights"]


def soft_moe_logits(x: torch.Tensor, mu: torch.Tensor, scale: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Soft MoE router logits ``(G, S, E, P)`` from tokens ``x (G, S, D)`` and slot parameters ``mu (D, E, P)``.

    Both are L2-normalised over ``D`` (``v / sqrt(|v|^2 + 1e-6)`` as the reference); the
    learnable ``scale`` multiplies whichever of the two has fewer elements (arXiv:2308.00951
    Sec. 2.3 "Normalization"). Computed in float32.
    """
    check_rank3("x", x)
    if mu.ndim != 3 or mu.shape[0] != x.shape[-1]:
        raise ConfigError(f"mu must have shape (D={x.shape[-1]}, E, P), got {tuple(mu.shape)}")
    x_unit = l2_normalize(x.float(), dim=-1)
    mu_unit = l2_normalize(mu.float(), dim=0)
    scale = torch.as_tensor(scale, device=x.device).float()
    if x_unit.numel() < mu_unit.numel():
        x_unit = x_unit * scale
    else:
        mu_unit = mu_unit * scale
    return torch.einsum("gsd,dep->gsep", x_unit, mu_unit)


def soft_moe_weights(
    x: torch.Tensor,
    mu: torch.Tensor,
    scale: torch.Tensor | float = 1.0,
    logits_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft MoE dispatch and combine weights.

    Args:
        x: ``(G, S, D)`` tokens.
        mu: ``(D, E, P)`` slot parameters.
        scale: learnable scalar (see :func:`soft_moe_logits`).
        logits_noise: optional ``(G, S, E, P)`` noise added to the logits (reference option, off by default).

    Returns:
        ``(dispatch, combine)``, both ``(G, S, E, P)`` float32: ``dispatch.sum(1) == 1`` for every
        slot (softmax over tokens) and ``combine.sum((2, 3)) == 1`` for every token.
    """
    logits = soft_moe_logits(x, mu, scale)
    if logits_noise is not None:
        logits = logits + logits_noise
    dispatch = torch.softmax(logits, dim=1)
    groups, tokens, experts, slots = logits.shape
    combine = softmax_experts(logits.reshape(groups, tokens, experts * slots)).view_as(logits)
    return dispatch, combine


class SoftRouter(nn.Module):
    """Soft MoE router (registry name ``soft``): dense ``(G, S, E, P)`` dispatch/combine weights.

    Args:
        dim: ``D``.
        num_experts: ``E``.
        slots_per_expert: ``P`` (Soft MoE uses 1 slot per expert in most configurations).
        noise_std: std of Gaussian noise on the logits in training (reference default 0).

    Soft MoE has no auxiliary loss: ``routing.aux_loss`` is zero. One routing group
    per image is the paper's setting; the router accepts any grouping.
    """

    name = "soft"
    # Checked on every assignment (ops.Setting); the shape-giving ones once, at construction.
    dim = Setting(check_int_setting, fixed=True)
    num_experts = Setting(check_int_setting, fixed=True)
    slots_per_expert = Setting(check_int_setting, fixed=True)
    noise_std = Setting(lambda name, v: float(check_positive(name, v, allow_zero=True)))

    def __init__(self, dim: int, num_experts: int, *, slots_per_expert: int = 1, noise_std: float = 0.0) -> None:
        super().__init__()
        self.dim = dim
        self.num_experts = num_experts
        self.slots_per_expert = slots_per_expert
        self.noise_std = noise_std
        # Reference init: lecun_normal for mu (irrelevant after normalisation) and 1 for the scale.
        self.mu = nn.Parameter(torch.randn(dim, num_experts, slots_per_expert) / math.sqrt(dim))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> Routing:
        """Route ``x: (G, S, D)`` to ``E * P`` slots; weights are returned in ``x.dtype``."""
        with float32_math(x.device):
            check_rank3("x", x, self.dim)
            num_groups, group_size, _ = x.shape
            noise = None
            if self.training and self.noise_std > 0:
                noise = self.noise_std * global_randn(
                    (num_groups, group_size, self.num_experts, self.slots_per_expert), device=x.device
                )
            dispatch, combine = soft_moe_weights(x, self.mu, self.scale, noise)
            routing = Routing(
                num_groups=num_groups,
                group_size=group_size,
                num_experts=self.num_experts,
                capacity=self.slots_per_expert,
                dispatch_dense=dispatch.to(x.dtype),
                combine_dense=combine.to(x.dtype),
                aux_loss=dispatch.new_zeros(()),
            )
            scale = self.scale.detach().float().clone()

            def statistics() -> dict[str, torch.Tensor]:
                load = combine.sum(dim=3).mean(dim=(0, 1))  # (E,) share of combine mass per expert
                reached = (combine.sum(dim=3) > 0).sum(dim=-1).reshape(-1)  # experts per token
                histogram = torch.bincount(reached, minlength=self.num_experts + 1).float() / max(reached.numel(), 1)
                flat = combine.reshape(num_groups, group_size, -1)
                return {
                    "expert_load": load,
                    "dropped_fraction": histogram[0].clone(),
                    "experts_per_token": histogram,
                    "gate_entropy": gate_entropy(flat),
                    "dispatch_entropy": gate_entropy(dispatch, dim=1),
                    "combine_weights_max_mean": flat.max(dim=-1).values.mean(),
                    "dispatch_weights_max_mean": dispatch.max(dim=1).values.mean(),
                    "scale": scale,
                }

            routing.metrics = LazyMetrics(statistics)
            return routing
