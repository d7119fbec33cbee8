"""Expert choice: each expert picks its top-C tokens (Zhou et al., arXiv:2202.09368).

Reference: google-research/vmoe ``moe._get_top_items_per_expert_einsum_dispatcher``
and ``nn/routing.NoisyTopItemsPerExpertRouter``. Every expert fills exactly
``C = ceil(S * capacity_factor / E)`` slots (rounded up to a multiple of 4 by
default), so the load is perfectly balanced and no auxiliary loss is needed; a
token may be picked by 0..E experts (those picked by none are dropped).

Default ``capacity_factor = 2.0`` (train and eval): the same expert compute as
token choice with ``k = 2``, ``capacity_factor ~ 1`` (for S=65, E=8 both give
``C = 20``). The routers study (arXiv:2401.15969) compares routers at matched
compute in this way.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ConfigError
from .base import Routing
from .losses import balance_loss, importance_loss, z_loss
from .ops import axis_index, check_int_setting, check_rank3, float32_math, softmax_experts
from .router import CapacityRouter
from .stats import gate_entropy, sparse_routing_metrics

__all__ = [
    "ExpertChoice",
    "ExpertChoiceRouter",
    "SoftmaxExpertChoiceRouter",
    "expert_choice",
    "expert_choice_routing",
]


class ExpertChoice(NamedTuple):
    """Result of :func:`expert_choice`, both ``(G, E, C)``: expert ``e``'s ``c``-th pick."""

    token_index: torch.Tensor  # long
    score: torch.Tensor  # scores[g, token_index, e]


def expert_choice(scores: torch.Tensor, capacity: int, tie_break: torch.Tensor | None = None) -> ExpertChoice:
    """Each expert takes the ``capacity`` tokens with the highest score.

    Args:
        scores: ``(G, S, E)`` token-expert scores (softmax gates, a Sinkhorn plan...).
        capacity: ``C``, tokens per expert, ``1 <= C <= S``.
        tie_break: optional ``(G, S, E)`` secondary key ordering tokens with equal ``scores``
            (default: lower token index first, as ``jax.lax.top_k``).

    Returns:
        :class:`ExpertChoice`; slot ``c`` of expert ``e`` holds its ``(c+1)``-th best token.
    """
    check_rank3("scores", scores, letters="G, S, E")
    group_size = scores.shape[1]
    check_int_setting("capacity", capacity, low=1, high=group_size)
    by_expert = scores.transpose(1, 2)  # (G, E, S)
    if tie_break is None:
        order = torch.sort(by_expert, dim=-1, descending=True, stable=True).indices
    else:
        if tie_break.shape != scores.shape:
            raise ConfigError(f"tie_break shape {tuple(tie_break.shape)} != scores shape {tuple(scores.shape)}")
        # Lexicographic (score, tie_break) order: sort by the secondary key, then stably by the primary.
        secondary = torch.sort(tie_break.transpose(1, 2), dim=-1, descending=True, stable=True).indices
        primary = torch.sort(by_expert.gather(-1, secondary), dim=-1, descending=True, stable=True).indices
        order = secondary.gather(-1, primary)
    token_index = order[..., :capacity]  # (G, E, C)
    return ExpertChoice(token_index, by_expert.gather(-1, token_index))


def expert_choice_routing(choice: ExpertChoice, combine_weight: torch.Tensor, *, group_size: int) -> Routing:
    """Compact :class:`Routing` of an expert choice (entries ordered by group, expert, slot).

    Args:
        choice: from :func:`expert_choice`.
        combine_weight: ``(G, E, C)`` combine weight of each pick.
        group_size: ``S``.
    """
    num_groups, num_experts, capacity = choice.token_index.shape
    device = choice.token_index.device
    shape = (num_groups, num_experts, capacity)
    return Routing(
        num_groups=num_groups,
        group_size=group_size,
        num_experts=num_experts,
        capacity=capacity,
        group_index=axis_index(shape, 0, device),
        token_index=choice.token_index.reshape(-1),
        expert_index=axis_index(shape, 1, device),
        slot_index=axis_index(shape, 2, device),
        combine_weight=combine_weight.reshape(-1),
    )


class ExpertChoiceRouter(CapacityRouter):
    """Shared forward of the expert-choice routers; subclasses provide :meth:`dispatch_scores`.

    ``eval_capacity_factor`` defaults to ``capacity_factor`` (expert choice drops
    no tokens by overflow, so there is no reason to give evaluation more slots).
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        capacity_factor: float = 2.0,
        eval_capacity_factor: float | None = None,
        **kwargs,
    ) -> None:
        if eval_capacity_factor is None:
            eval_capacity_factor = capacity_factor
        super().__init__(
            dim, num_experts, capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor, **kwargs
        )

    def dispatch_scores(
        self, logits: torch.Tensor, noisy_logits: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(scores experts rank tokens by, combine gates, tie_break or None)``, each ``(G, S, E)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Routing:
        """Route ``x: (G, S, D)``: expert ``e`` takes its top-``C`` tokens by :meth:`dispatch_scores`."""
        with float32_math(x.device):
            logits = self.compute_logits(x)
            group_size = logits.shape[1]
            noisy_logits = self.add_noise(logits)
            capacity = self.resolve_capacity(group_size, group_size)
            scores, combine_gates, tie_break = self.dispatch_scores(logits, noisy_logits, capacity)
            choice = expert_choice(scores, capacity, tie_break)
            weights = combine_gates.transpose(1, 2).gather(-1, choice.token_index)  # (G, E, C)
            routing = expert_choice_routing(choice, weights.to(x.dtype), group_size=group_size)
            clean_gates = softmax_experts(logits)
            terms = {
                "importance_loss": lambda: importance_loss(clean_gates),
                "balance_loss": lambda: balance_loss(combine_gates),
                "z_loss": lambda: z_loss(logits),
            }

            def statistics() -> dict[str, torch.Tensor]:
                metrics = sparse_routing_metrics(
                    routing.group_index,
                    routing.token_index,
                    routing.expert_index,
                    num_groups=routing.num_groups,
                    group_size=group_size,
                    num_experts=routing.num_experts,
                    num_bins=routing.num_experts + 1,
                )
                metrics["gate_entropy"] = gate_entropy(clean_gates)
                metrics["capacity"] = logits.new_tensor(float(capacity))
                metrics["min_selected_score"] = choice.score.min().detach()
                return metrics

            routing.aux_loss, routing.metrics = self.aux_loss_and_metrics(terms, logits, statistics)
            return routing


class SoftmaxExpertChoiceRouter(ExpertChoiceRouter):
    """The routers study's "Softmax Expert Choice": experts take their top-C tokens by softmax gate.

    As the reference ``NoisyTopItemsPerExpertRouter``: training noise ``noise_std / E``
    on the logits, the (noisy) softmax gates both rank the tokens and weight the outputs,
    no auxiliary loss by default (weights accepted for experiments).
    """

    name = "softmax_expert_choice"

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

    def dispatch_scores(
        self, logits: torch.Tensor, noisy_logits: torch.Tensor, capacity: int
    ) -> tuple[torch.Tensor, torch.Tensor, None]:
        gates = softmax_experts(noisy_logits)
        return gates, gates, None
