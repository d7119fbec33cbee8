"""Routing statistics reported by every router in ``Routing.metrics`` (all detached).

* ``expert_load`` ``(E,)``: fraction of all assignments that went to each expert (sums to 1).
* ``dropped_fraction``: fraction of tokens that no expert processes (they keep only the residual).
* ``experts_per_token`` ``(B,)``: histogram, fraction of tokens processed by 0, 1, ..., B-1 experts.
* ``gate_entropy``: mean over tokens of the entropy (nats) of the token's gate distribution.
"""

from __future__ import annotations

import torch

__all__ = ["gate_entropy", "sparse_routing_metrics"]


@torch.no_grad()
def gate_entropy(probs: torch.Tensor, dim: int | tuple[int, ...] = -1) -> torch.Tensor:
    """Mean entropy (nats) of the distributions ``probs`` (summing to 1 along ``dim``)."""
    probs = probs.float()
    plogp = torch.where(probs > 0, probs * probs.clamp_min(1e-38).log(), torch.zeros_like(probs))
    return -plogp.sum(dim=dim).mean()


@torch.no_grad()
def sparse_routing_metrics(
    group_index: torch.Tensor,
    token_index: torch.Tensor,
    expert_index: torch.Tensor,
    *,
    num_groups: int,
    group_size: int,
    num_experts: int,
    num_bins: int,
) -> dict[str, torch.Tensor]:
    """Load, dropped fraction and experts-per-token histogram of a sparse routing.

    Args:
        group_index, token_index, expert_index: ``(N,)`` assignments.
        num_groups, group_size, num_experts: ``G``, ``S``, ``E``.
        num_bins: histogram bins (``K + 1`` for token choice, ``E + 1`` for expert choice).
    """
    num_tokens = num_groups * group_size
    per_expert = torch.bincount(expert_index, minlength=num_experts).float()
    expert_load = per_expert / per_expert.sum().clamp_min(1.0)
    per_token = torch.bincount(group_index * group_size + token_index, minlength=num_tokens)
    histogram = torch.bincount(per_token.clamp_max(num_bins - 1), minlength=num_bins).float() / max(num_tokens, 1)
    mean = per_token.float().mean() if num_tokens else per_token.new_zeros((), dtype=torch.float32)
    return {
        "expert_load": expert_load,
        "dropped_fraction": histogram[0].clone(),
        "experts_per_token": histogram,
        "mean_experts_per_token": mean,
    }
