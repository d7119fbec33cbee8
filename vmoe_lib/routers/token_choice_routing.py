"""Token choice: each token picks its top-k experts; experts with a full buffer drop the extra tokens.

The allocation is V-MoE's "Top-Experts-Per-Item" routing (arXiv:2106.05974,
Sec. 2.1 and Sec. 4 for Batch Priority Routing; reference
google-research/vmoe ``moe._get_top_experts_per_item_common``):

1. every token ranks experts by its gate and keeps its top ``k`` (ties: lower expert index);
2. assignments are made level by level: all top-1 choices before any top-2 choice (``K``-major);
3. within a level, tokens are served in priority order: token order ("vanilla") or, with
   Batch Priority Routing (BPR), by decreasing top-1 gate (stable: ties in token order);
4. a choice takes the next free slot of its expert; slots ``>= C`` are dropped (the token
   keeps only the residual path for that choice). A dropped choice is *not* re-routed.

:class:`SoftmaxTokenChoiceRouter` is the V-MoE router (the routers study's
"Softmax Token Choice"): bias-free linear logits, noise ``sigma = noise_std / E`` in
training, ``gates = softmax(noisy logits)``, top-k on ``gates``, combine weights = the raw
gate values (not renormalised), importance + load losses (0.005 each).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Routing
from .losses import balance_loss, importance_loss, load_loss, z_loss
from .ops import (Setting, axis_index, check_bool_setting, check_int_setting, check_rank3, float32_math, softmax_experts, stable_top_k,
                  static_shapes_active)
from .router import CapacityRouter
from .stats import gate_entropy, sparse_routing_metrics

__all__ = ["SoftmaxTokenChoiceRouter", "TokenChoice", "TokenChoiceRouter", "token_choice_routing", "top_k_token_choice"]


class TokenChoice(NamedTuple):
    """Result of :func:`top_k_token_choice`, all ``(G, S, K)``; choice ``j`` is the token's top-``(j+1)``."""

    expert_index: torch.Tensor  # long: chosen expert
    slot_index: torch.Tensor  # long: position in the expert's buffer (may be >= C when dropped)
    kept: torch.Tensor  # bool: slot_index < capacity
    gate: torch.Tensor  # gates[g, s, expert_index]: differentiable w.r.t. ``gates``


def top_k_token_choice(
    gates: torch.Tensor,
    k: int,
    capacity: int,
    batch_priority: bool = False,
    priority: torch.Tensor | None = None,
) -> TokenChoice:
    """Allocate each token to its top-``k`` experts under a capacity of ``capacity`` slots per expert.

    Args:
        gates: ``(G, S, E)`` scores that rank the experts (softmax gates, or a Sinkhorn plan).
        k: choices per token, ``1 <= k <= E``.
        capacity: slots per expert per group, ``C >= 1``.
        batch_priority: BPR (arXiv:2106.05974 Sec. 4.1): within each choice level serve tokens by
            decreasing ``priority`` instead of token order.
        priority: ``(G, S)`` BPR priority; default the token's top-1 score ``max_e gates[g, s, e]``.

    Returns:
        :class:`TokenChoice` with ``(G, S, K)`` expert index, slot index, kept mask and gate value.
    """
    check_rank3("gates", gates, letters="G, S, E")
    num_groups, group_size, num_experts = gates.shape
    check_int_setting("k", k, low=1, high=num_experts)
    check_int_setting("capacity", capacity)
    top_gates, expert_index = stable_top_k(gates, k)  # (G, S, K)

    order = None
    ranked = expert_index
    if batch_priority:
        score = top_gates[..., 0] if priority is None else priority
        if score.shape != (num_groups, group_size):
            raise ConfigError(f"priority must have shape (G, S) = {(num_groups, group_size)}, got {tuple(score.shape)}")
        # Stable descending sort: equal priorities keep token order, like jnp.argsort(-p).
        order = torch.sort(score.detach(), dim=1, descending=True, stable=True).indices  # (G, S)
        ranked = expert_index.gather(1, order.unsqueeze(-1).expand(-1, -1, k))
    # K-major flattening (G, K*S): every top-1 choice precedes every top-2 choice.
    flat = ranked.transpose(1, 2).reshape(num_groups, k * group_size)
    one_hot = F.one_hot(flat, num_experts)  # (G, K*S, E)
    # Running count of earlier choices of the same expert = this choice's slot.
    slot = one_hot.cumsum(dim=1).gather(2, flat.unsqueeze(-1)).squeeze(-1) - 1  # (G, K*S)
    slot = slot.reshape(num_groups, k, group_size).transpose(1, 2)  # (G, S, K) in priority order
    if order is not None:
        slot = torch.empty_like(slot).scatter_(1, order.unsqueeze(-1).expand(-1, -1, k), slot)
    return TokenChoice(expert_index, slot, slot < capacity, top_gates)


def token_choice_routing(
    choice: TokenChoice,
    combine_weight: torch.Tensor,
    *,
    capacity: int,
    num_experts: int,
    static: bool = False,
) -> Routing:
    """Compact :class:`Routing` of the kept choices (entries ordered by group, token, choice).

    Args:
        choice: from :func:`top_k_token_choice`.
        combine_weight: ``(G, S, K)`` combine weight of each choice.
        capacity: ``C``.
        num_experts: ``E``.
        static: return every choice instead, dropped ones marked by ``kept`` (a static routing:
            ``G*S*K`` entries whatever the data, see :attr:`.Routing.is_static`); its
            :meth:`~.Routing.compact` is the compact routing.
    """
    num_groups, group_size, k = choice.expert_index.shape
    if static:
        shape = choice.expert_index.shape
        device = choice.expert_index.device
        return Routing(
            num_groups=num_groups,
            group_size=group_size,
            num_experts=num_experts,
            capacity=capacity,
            group_index=axis_index(shape, 0, device),
            token_index=axis_index(shape, 1, device),
            expert_index=choice.expert_index.reshape(-1),
            slot_index=choice.slot_index.reshape(-1),
            combine_weight=combine_weight.reshape(-1),
            kept=choice.kept.reshape(-1),
        )
    # One nonzero (a host sync on CUDA) for the five fields; entries in (group, token, choice) order.
    kept = choice.kept.reshape(-1).nonzero().squeeze(1)
    per_group = group_size * k
    return Routing(
        num_groups=num_groups,
        group_size=group_size,
        num_experts=num_experts,
        capacity=capacity,
        group_index=torch.div(kept, per_group, rounding_mode="floor"),
        token_index=torch.div(kept % per_group, k, rounding_mode="floor"),
        expert_index=choice.expert_index.reshape(-1).index_select(0, kept),
        slot_index=choice.slot_index.reshape(-1).index_select(0, kept),
        combine_weight=combine_weight.reshape(-1).index_select(0, kept),
    )


class TokenChoiceRouter(CapacityRouter):
    """Shared forward of the token-choice routers; subclasses provide :meth:`dispatch_scores`.

    Args (besides :class:`CapacityRouter`'s):
        k: experts per token.
        batch_priority: Batch Priority Routing.
        renormalize: divide the combine weights by the sum of the token's top-k gates
            (Tutel/Mixtral style). Off by default: V-MoE uses the raw gates.
    """

    batch_priority = Setting(check_bool_setting)
    renormalize = Setting(check_bool_setting)

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        k: int = 2,
        batch_priority: bool = False,
        renormalize: bool = False,
        capacity_factor: float = 1.05,
        eval_capacity_factor: float = 4.0,
        **kwargs,
    ) -> None:
        super().__init__(
            dim, num_experts, capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor, **kwargs
        )
        self.k = k
        self.batch_priority = batch_priority
        self.renormalize = renormalize

    @property
    def k(self) -> int:
        """Experts per token (validated: ``1 <= k <= E``); may be changed on a trained router."""
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        self._k = check_int_setting("k", value, low=1, high=self.num_experts)

    def dispatch_scores(
        self, logits: torch.Tensor, noisy_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scores that rank experts, combine gates)``, both ``(G, S, E)``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> Routing:
        """Route ``x: (G, S, D)``; see the module docstring for the algorithm."""
        with float32_math(x.device):
            logits = self.compute_logits(x)  # (G, S, E) float32
            num_groups, group_size, num_experts = logits.shape
            k = self.k
            noisy_logits = self.add_noise(logits)
            scores, combine_gates = self.dispatch_scores(logits, noisy_logits)
            capacity = self.resolve_capacity(group_size * k, group_size)
            choice = top_k_token_choice(scores, k, capacity, self.batch_priority)
            weights = combine_gates.gather(-1, choice.expert_index)  # (G, S, K)
            if self.renormalize:
                weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
            routing = token_choice_routing(
                choice, weights.to(x.dtype), capacity=capacity, num_experts=num_experts,
                static=static_shapes_active(),
            )
            clean_gates = softmax_experts(logits)
            makers = self.loss_terms(logits, noisy_logits, clean_gates, combine_gates)
            routing.aux_loss, routing.metrics = self.aux_loss_and_metrics(
                makers, logits, lambda: self.metrics(routing, choice, clean_gates, k)
            )
            return routing

    def loss_terms(
        self,
        logits: torch.Tensor,
        noisy_logits: torch.Tensor,
        clean_gates: torch.Tensor,
        dispatch_gates: torch.Tensor,
    ) -> dict[str, Callable[[], torch.Tensor]]:
        """The unweighted auxiliary losses, as in the reference ``NoisyTopExpertsPerItemRouter``,
        each as a function that computes it (see :meth:`.GatedRouter.aux_loss_and_metrics`).

        Importance on the clean gates; load (only when noisy) from clean vs noisy
        logits; GShard balance on the gates used for dispatch; z-loss on the clean logits.
        All are reported in the metrics; only those with weight > 0 enter ``aux_loss``.
        """
        k, sigma = self.k, self.noise_sigma
        terms = {"importance_loss": lambda: importance_loss(clean_gates)}
        if self.is_noisy:
            terms["load_loss"] = lambda: load_loss(logits, noisy_logits, sigma, k)
        terms["balance_loss"] = lambda: balance_loss(dispatch_gates)
        terms["z_loss"] = lambda: z_loss(logits)
        return terms

    @torch.no_grad()
    def metrics(
        self,
        routing: Routing,
        choice: TokenChoice,
        clean_gates: torch.Tensor,
        k: int,
    ) -> dict[str, torch.Tensor]:
        """Routing statistics of one forward (see :mod:`.stats`); the loss terms are added by the caller."""
        routing = routing.compact()
        out = sparse_routing_metrics(
            routing.group_index,
            routing.token_index,
            routing.expert_index,
            num_groups=routing.num_groups,
            group_size=routing.group_size,
            num_experts=routing.num_experts,
            num_bins=k + 1,
        )
        out["dropped_choice_fraction"] = 1.0 - choice.kept.float().mean()
        out["gate_entropy"] = gate_entropy(clean_gates)
        out["capacity"] = clean_gates.new_tensor(float(routing.capacity))
        return out


class SoftmaxTokenChoiceRouter(TokenChoiceRouter):
    """V-MoE's noisy top-k router (the routers study's "Softmax Token Choice").

    Args: see :class:`TokenChoiceRouter`, :class:`.CapacityRouter` and :class:`.GatedRouter`.
    Defaults follow the reference: ``k=2``, ``capacity_factor=1.05``,
    ``eval_capacity_factor=4.0``, ``noise_std=1.0``, importance and load loss weights 0.005.
    """

    name = "softmax_token_choice"

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
        importance_loss_weight: float = 0.005,
        load_loss_weight: float = 0.005,
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

    def dispatch_scores(
        self, logits: torch.Tensor, noisy_logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # arXiv:2106.05974 Eq. 1: G(x) = TOP_k(softmax(W x + eps)); the same (noisy) gates rank
        # the experts and weight their outputs.
        gates = softmax_experts(noisy_logits)
        return gates, gates
