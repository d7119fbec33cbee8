"""Sparsity-constrained expert choice: experts pick tokens from a C-sparse optimal-transport plan.

Routers study (arXiv:2401.15969 Sec. 3.3) after Liu et al., "Sparsity-Constrained
Optimal Transport" (arXiv:2209.15466). With ``scores = softmax(logits)``
``(S, E)`` per group, token marginals ``a = 1`` and expert marginals ``b = S/E``::

    P = argmax_{P >= 0, P 1_E = a, P^T 1_S = b, ||P[:, e]||_0 <= C}  <P, scores> - (gamma/2) ||P||^2 (column-scaled)

solved through its semi-dual (Blondel et al., arXiv:1710.06276 Eq. 10): minimise over
token potentials ``alpha (S,)``::

    F(alpha) = sum_e b_e * max_{p in simplex, ||p||_0 <= C} [<p, alpha + scores[:, e]> - (gamma b_e / 2)(||p||^2 - 1)]
               - sum_s alpha_s

whose inner maximiser is the ``C``-sparse simplex projection of ``(alpha + scores[:, e]) / (gamma b_e)``
(top-C entries, then the sort-based simplex projection); the plan is ``P[:, e] = b_e * p_e``
and ``dF/dalpha = P 1_E - a``. Reference (google-research/vmoe
``projects/sparsity_constrained_ot/ksparse_projection_routing.py`` with jaxopt's
``_regularized_transport_semi_dual``): 20 Adam steps, lr 1e-2, from ``alpha = 0``,
``gamma = 1``, no training noise, ``C`` = the expert-choice capacity.

Each column of the plan sums to ``b_e`` exactly and has at most ``C`` nonzeros; the row
marginals are only approximately met after 20 steps (raise ``sparse_ot_iterations`` for a
better-converged plan). Experts then take their top-C tokens of the plan; combine = softmax.

Deviation (documented option ``tie_break``): a column may have fewer than ``C`` nonzeros.
The reference fills the remaining slots with the lowest-index tokens among the zeros
(``jax.lax.top_k`` tie order), which favours the first patches of every image; by default
we fill them with the tokens of highest softmax score. ``tie_break='index'`` restores the
reference behaviour.
"""

from __future__ import annotations

import torch

from ..errors import check_choice, check_positive
from .expert_choice_routing import ExpertChoice, ExpertChoiceRouter, expert_choice
from .ops import check_int_setting, check_rank3, softmax_experts, stable_top_k

__all__ = [
    "SparseExpertChoiceRouter",
    "sparse_expert_choice",
    "sparse_simplex_projection",
    "sparsity_constrained_plan",
]

TIE_BREAKS = ("score", "index")


def sparse_simplex_projection(x: torch.Tensor, max_nonzeros: int) -> torch.Tensor:
    """Euclidean projection of each row of ``x (..., S)`` onto the simplex, with at most ``max_nonzeros`` nonzeros.

    The exact solution keeps the ``max_nonzeros`` largest entries and projects them onto
    the simplex (Kyrillidis et al., ICML 2013, Thm. 1); the projection is the sort-based
    one of Duchi et al. (ICML 2008, Fig. 1): ``p = max(x - tau, 0)``.
    """
    size = x.shape[-1]
    k = min(max_nonzeros, size)
    top, index = stable_top_k(x, k)  # (..., k) sorted descending
    cumulative = top.cumsum(dim=-1) - 1.0
    ranks = torch.arange(1, k + 1, device=x.device, dtype=x.dtype)
    support = (top - cumulative / ranks > 0).sum(dim=-1, keepdim=True).clamp_min(1)  # rho >= 1
    tau = cumulative.gather(-1, support - 1) / support.to(x.dtype)
    return torch.zeros_like(x).scatter(-1, index, (top - tau).clamp_min(0.0))


def sparsity_constrained_plan(
    scores: torch.Tensor,
    max_tokens_per_expert: int,
    *,
    iterations: int = 20,
    learning_rate: float = 1e-2,
    gamma: float = 1.0,
) -> torch.Tensor:
    """Squared-L2-regularised OT plan with at most ``max_tokens_per_expert`` nonzeros per expert.

    Args:
        scores: ``(G, S, E)`` similarities (the routers use softmax gates); cost = ``-scores``.
        max_tokens_per_expert: ``C``, the sparsity of each expert's column.
        iterations: Adam steps on the semi-dual (reference: 20).
        learning_rate: Adam learning rate (reference: 1e-2; optax defaults b1=0.9, b2=0.999, eps=1e-8).
        gamma: regularisation strength (reference: 1).

    Returns:
        ``(G, S, E)`` float32 plan; column ``e`` sums to ``S/E`` with ``<= C`` nonzeros.
        Not differentiable (the routers only use it to choose).
    """
    check_rank3("scores", scores, letters="G, S, E")
    check_int_setting("capacity", max_tokens_per_expert)
    check_int_setting("sparse_ot_iterations", iterations, low=0)
    check_positive("sparse_ot_learning_rate", learning_rate)
    check_positive("gamma", gamma)
    with torch.no_grad():
        scores = scores.float()
        _, group_size, num_experts = scores.shape
        mass = group_size / num_experts  # b_e, the same for every expert
        by_expert = scores.transpose(1, 2).contiguous()  # (G, E, S)
        alpha = scores.new_zeros(scores.shape[0], 1, group_size)  # token potentials, broadcast over E
        first = torch.zeros_like(alpha)
        second = torch.zeros_like(alpha)
        beta1, beta2, eps = 0.9, 0.999, 1e-8

        def columns(potential: torch.Tensor) -> torch.Tensor:
            return sparse_simplex_projection((potential + by_expert) / (gamma * mass), max_tokens_per_expert)

        for step in range(1, iterations + 1):
            grad = mass * columns(alpha).sum(dim=1, keepdim=True) - 1.0  # dF/dalpha = P 1_E - a
            first = beta1 * first + (1 - beta1) * grad
            second = beta2 * second + (1 - beta2) * grad.square()
            update = (first / (1 - beta1**step)) / ((second / (1 - beta2**step)).sqrt() + eps)
            alpha = alpha - learning_rate * update
        return (mass * columns(alpha)).transpose(1, 2).contiguous()


def sparse_expert_choice(
    scores: torch.Tensor,
    capacity: int,
    *,
    iterations: int = 20,
    learning_rate: float = 1e-2,
    tie_break: str = "score",
) -> ExpertChoice:
    """Experts take their top-``capacity`` tokens of the ``capacity``-sparse OT plan of ``scores``.

    Args:
        scores: ``(G, S, E)`` softmax gates.
        capacity: ``C``, tokens per expert (also the plan's sparsity, as in the reference).
        iterations, learning_rate: semi-dual Adam solver settings (see :func:`sparsity_constrained_plan`).
        tie_break: how slots left by a column with fewer than ``C`` nonzeros are filled:
            ``'score'`` (highest ``scores`` first) or ``'index'`` (lowest token index, the reference).

    Returns:
        :class:`.ExpertChoice` with ``(G, E, C)`` token indices and their plan values.
    """
    check_choice("tie_break", tie_break, TIE_BREAKS)
    plan = sparsity_constrained_plan(scores, capacity, iterations=iterations, learning_rate=learning_rate)
    return expert_choice(plan, capacity, scores.detach().float() if tie_break == "score" else None)


class SparseExpertChoiceRouter(ExpertChoiceRouter):
    """The routers study's "Sparsity-constrained Expert Choice".

    Reference ``KSparseProjectionTransportTopItemsPerExpertRouter``: no training noise
    (``noise_std = 0`` by default), scores = ``softmax(logits)``, plan from
    :func:`sparsity_constrained_plan` with ``C`` = capacity, experts take their top-C plan
    entries, combine = softmax gates, no auxiliary loss.

    Args: ``sparse_ot_iterations`` (20), ``sparse_ot_learning_rate`` (1e-2), ``tie_break``
    (``'score'``; ``'index'`` = reference), the rest as :class:`.SoftmaxExpertChoiceRouter`.
    """

    name = "sparse_expert_choice"

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
        noise_std: float = 0.0,
        gate: str = "linear",
        gate_hidden_dim: int | None = None,
        sparse_ot_iterations: int = 20,
        sparse_ot_learning_rate: float = 1e-2,
        tie_break: str = "score",
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
        self.sparse_ot_iterations = check_int_setting("sparse_ot_iterations", sparse_ot_iterations, low=0)
        self.sparse_ot_learning_rate = float(check_positive("sparse_ot_learning_rate", sparse_ot_learning_rate))
        self.tie_break = check_choice("tie_break", tie_break, TIE_BREAKS)

    def dispatch_scores(
        self, logits: torch.Tensor, noisy_logits: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        gates = softmax_experts(noisy_logits)
        plan = sparsity_constrained_plan(
            gates, capacity, iterations=self.sparse_ot_iterations, learning_rate=self.sparse_ot_learning_rate
        )
        return plan, gates, gates.detach() if self.tie_break == "score" else None
