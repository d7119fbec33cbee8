"""Expert capacity: how many slots each expert has per routing group.

V-MoE (arXiv:2106.05974, Sec. 2.1 and App. A.1) gives every expert a buffer of
``C = ceil(k * S * capacity_factor / E)`` slots per group; the reference
(google-research/vmoe ``moe.compute_capacity``) then rounds ``C`` up to a
multiple of 4 to avoid padding on TPUs. Expert choice uses the same rule with
``k = 1`` (``C = ceil(S * capacity_factor / E)``).
"""

from __future__ import annotations

import math
from typing import Literal

from ..errors import ConfigError, check_choice, check_positive

__all__ = ["CAPACITY_ROUNDINGS", "CapacityRounding", "compute_capacity"]

CapacityRounding = Literal["ceil", "round"]
CAPACITY_ROUNDINGS: tuple[str, ...] = ("ceil", "round")


def compute_capacity(
    num_tokens: int,
    num_experts: int,
    capacity_factor: float,
    *,
    rounding: CapacityRounding = "ceil",
    multiple_of: int | None = 4,
) -> int:
    """Slots per expert needed to spread ``num_tokens`` assignments over ``num_experts`` experts.

    Args:
        num_tokens: assignments to spread per group: ``S * k`` for token choice, ``S`` for expert choice.
        num_experts: ``E``.
        capacity_factor: slack over a perfectly balanced load (1.0 = exactly balanced).
        rounding: ``'ceil'`` (reference default) or ``'round'`` (Python's round-half-even, as ``jnp.round``).
        multiple_of: round the result *up* to a multiple of this (reference: 4); ``None`` or ``0`` to skip.

    Returns:
        ``C >= 1``.

    Example (worked by hand): S=65 tokens, k=2, E=8, cf=1.05:
    ``65 * 2 * 1.05 / 8 = 17.06 -> ceil 18 -> multiple of 4: 20``.
    """
    check_positive("num_tokens", num_tokens)
    check_positive("num_experts", num_experts)
    check_positive("capacity_factor", capacity_factor)
    check_choice("capacity_rounding", rounding, CAPACITY_ROUNDINGS)
    bad_multiple = not isinstance(multiple_of, int) or isinstance(multiple_of, bool) or multiple_of < 0
    if multiple_of is not None and bad_multiple:
        raise ConfigError(f"capacity_multiple={multiple_of!r} is invalid; it must be an integer >= 0 or None")
    # Same float expression as the reference, so that both agree even where the
    # product is an integer up to rounding error.
    exact = num_tokens * capacity_factor / num_experts
    capacity = int(math.ceil(exact)) if rounding == "ceil" else int(round(exact))
    if capacity < 1:
        raise ConfigError(
            f"capacity_factor={capacity_factor!r} with {num_tokens} tokens and {num_experts} experts "
            f"gives capacity={capacity}; it must be >= 1 (raise capacity_factor or use capacity_rounding='ceil')"
        )
    if multiple_of:
        capacity += (-capacity) % multiple_of
    return capacity
