"""Sinkhorn routers: an entropic optimal-transport plan balances tokens over experts before top-k.

The plan solves (routers study, arXiv:2401.15969 Sec. 3.2; Cuturi 2013)::

    P = argmin_{P >= 0, P 1_E = a, P^T 1_S = b} <P, -logits> - eps * H(P),   a = 1 (per token), b = S/E (per expert)

with ``eps = 1`` and exactly 20 Sinkhorn iterations in the reference
(google-research/vmoe ``projects/sparsity_constrained_ot/kl_projection_routing.py``,
``ott`` ``sinkhorn(lse_mode=False, min_iterations=max_iterations=20)``).

* Sinkhorn Token Choice: top-k experts of each token on ``P`` (capacity and BPR as in
  V-MoE, BPR priority = the token's largest plan entry); combine = ``softmax(clean logits)``.
* Sinkhorn Expert Choice: each expert takes its top-C tokens of ``P``; combine =
  ``softmax(logits)`` of the same (noisy in training) logits, as in the reference.

Deviation (numerics only): the reference iterates in the kernel domain (``exp(logits)``),
which overflows for large logits; we iterate the same updates on log-potentials, so the
plan is identical where the reference is finite and stays finite for logits up to 1e4.
"""

from __future__ import annotations

import math

import torch

from ..errors import check_positive
from .expert_choice_routing import ExpertChoiceRouter
from .ops import check_int_setting, check_rank3, softmax_experts
from .token_choice_routing import TokenChoiceRouter

__all__ = ["SinkhornExpertChoiceRouter", "SinkhornTokenChoiceRouter", "sinkhorn"]


def sinkhorn(
    logits: torch.Tensor,
    *,
    iterations: int = 20,
    epsilon: float = 1.0,
    token_marginal: float = 1.0,
    expert_marginal: float | None = None,
) -> torch.Tensor:
    """Entropic OT plan between tokens and experts with cost ``-logits``, in the log domain.

    Each iteration first rescales the experts (columns) then the tokens (rows), the
    order of ``ott``'s Sinkhorn, so after the last iteration every row sums to
    ``token_marginal`` exactly and the columns approximately to ``expert_marginal``.

    Args:
        logits: ``(G, S, E)`` router logits (any float dtype; computed in float32).
        iterations: number of Sinkhorn iterations (reference: 20).
        epsilon: entropic regularisation ``eps`` (reference: 1).
        token_marginal: mass of each token (reference: 1).
        expert_marginal: mass of each expert; default ``S * token_marginal / E``.

    Returns:
        ``(G, S, E)`` float32 plan ``P = exp((f_s + g_e + logits_se) / eps)``; differentiable
        (unrolled), though the routers use it only to choose and call it under ``no_grad``.
    """
    check_rank3("logits", logits, letters="G, S, E")
    check_int_setting("sinkhorn_iterations", iterations, low=0)
    check_positive("sinkhorn_epsilon", epsilon)
    _, group_size, num_experts = logits.shape
    if expert_marginal is None:
        expert_marginal = group_size * token_marginal / num_experts
    scaled = logits.float() / epsilon  # (G, S, E): -cost / eps
    log_a = math.log(token_marginal)
    log_b = math.log(expert_marginal)
    f = scaled.new_zeros(scaled.shape[:2] + (1,))  # token potentials / eps, (G, S, 1)
    g = scaled.new_zeros(scaled.shape[:1] + (1, num_experts))  # expert potentials / eps, (G, 1, E)
    for _ in range(iterations):
        g = log_b - torch.logsumexp(scaled + f, dim=1, keepdim=True)
        f = log_a - torch.logsumexp(scaled + g, dim=2, keepdim=True)
    # (scaled + g) + f repeats the rounding of the last row update, so rows sum to 1 even for huge logits.
    return torch.exp((scaled + g) + f)


class SinkhornTokenChoiceRouter(TokenChoiceRouter):
    """The routers study's "Sinkhorn Token Choice" (reference ``KLProjectionNoisyTopExpertsPerItemRouter``).

    Top-k on the Sinkhorn plan of the (noisy in training) logits; capacity, BPR and drops as
    V-MoE; combine weights = ``softmax`` of the *clean* logits. The reference class defaults to
    no auxiliary loss (the plan already balances), and so do we; V-MoE's losses can be enabled.

    Args: ``sinkhorn_iterations`` (20), ``sinkhorn_epsilon`` (1.0), the rest as
    :class:`.SoftmaxTokenChoiceRouter`.
    """

    name = "sinkhorn_token_choice"

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        k: int = 2,
        capacity_factor: float = 1.05,
        eval_capacity_factor: float = 4.0,
        capacity: int | None = None,
        capacity_multiple: int | None = 4,
        capacity_rounding: str = "ceil",
        batch_priority: bool = False,
        renormalize: bool = False,
        noise_std: float = 1.0,
        gate: str = "linear",
        gate_hidden_dim: int | None = None,
        sinkhorn_iterations: int = 20,
        sinkhorn_epsilon: float = 1.0,
        importance_loss_weight: float = 0.0,
        load_loss_weight: float = 0.0,
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(
            dim,
            num_experts,
            k=k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            capacity=capacity,
            capacity_multiple=capacity_multiple,
            capacity_rounding=capacity_rounding,
            batch_priority=batch_priority,
            renormalize=renormalize,
            noise_std=noise_std,
            gate=gate,
            gate_hidden_dim=gate_hidden_dim,
            importance_loss_weight=importance_loss_weight,
            load_loss_weight=load_loss_weight,
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
        )
        self.sinkhorn_iterations = check_int_setting("sinkhorn_iterations", sinkhorn_iterations, low=0)
        self.sinkhorn_epsilon = float(check_positive("sinkhorn_epsilon", sinkhorn_epsilon))

    def dispatch_scores(
        self, logits: torch.Tensor, noisy_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # the plan only chooses; gradients flow through the combine softmax
            plan = sinkhorn(noisy_logits, iterations=self.sinkhorn_iterations, epsilon=self.sinkhorn_epsilon)
        return plan, softmax_experts(logits)


class SinkhornExpertChoiceRouter(ExpertChoiceRouter):
    """The routers study's "Sinkhorn Expert Choice" (reference ``KLProjectionNoisyTopItemsPerExpertRouter``).

    Each expert takes its top-C tokens of the Sinkhorn plan of the (noisy in training)
    logits; combine weights = ``softmax`` of the same logits. No auxiliary loss by default.

    Args: ``sinkhorn_iterations`` (20), ``sinkhorn_epsilon`` (1.0), the rest as
    :class:`.SoftmaxExpertChoiceRouter`.
    """

    name = "sinkhorn_expert_choice"

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        capacity_factor: float = 2.0,
        eval_capacity_factor: float | None = None,
        capacity: int | None = None,
        capacity_multiple: int | None = 4,
        capacity_rounding: str = "ceil",
        noise_std: float = 1.0,
        gate: str = "linear",
        gate_hidden_dim: int | None = None,
        sinkhorn_iterations: int = 20,
        sinkhorn_epsilon: float = 1.0,
        importance_loss_weight: float = 0.0,
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__(
            dim,
            num_experts,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            capacity=capacity,
            capacity_multiple=capacity_multiple,
            capacity_rounding=capacity_rounding,
            noise_std=noise_std,
            gate=gate,
            gate_hidden_dim=gate_hidden_dim,
            importance_loss_weight=importance_loss_weight,
            balance_loss_weight=balance_loss_weight,
            z_loss_weight=z_loss_weight,
        )
        self.sinkhorn_iterations = check_int_setting("sinkhorn_iterations", sinkhorn_iterations, low=0)
        self.sinkhorn_epsilon = float(check_positive("sinkhorn_epsilon", sinkhorn_epsilon))

    def dispatch_scores(
        self, logits: torch.Tensor, noisy_logits: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        with torch.no_grad():
            plan = sinkhorn(noisy_logits, iterations=self.sinkhorn_iterations, epsilon=self.sinkhorn_epsilon)
        return plan, softmax_experts(noisy_logits), None
