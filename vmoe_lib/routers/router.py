"""Base classes of the gated routers: gate, training noise, capacity settings, weighted losses.

A router is an ``nn.Module`` with ``forward(x: (G, S, D)) -> Routing``. It
never stores ``aux_loss`` on itself: the MoE layer that owns it copies
``routing.aux_loss`` onto its own ``aux_loss`` attribute (the protocol of
:func:`vmoe_lib.layers.aux.collect_aux_loss`), so each loss is counted once.

The settings that inference-time experiments change on a trained model
(``k``, ``capacity_factor``, ``eval_capacity_factor``, ``capacity``,
``batch_priority``) are plain attributes, validated when set.
``self.training`` picks the train or eval capacity factor and turns noise on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch
import torch.nn as nn

from ..errors import ConfigError, check_choice, check_positive
from ..noise import global_randn_like
from .base import LazyMetrics
from .capacity import CAPACITY_ROUNDINGS, compute_capacity
from .gates import GATES, create_gate
from .ops import Setting, check_int_setting, check_rank3

__all__ = ["CapacityRouter", "GatedRouter"]


def _check_weight(param: str, value: float) -> float:
    return float(check_positive(param, value, allow_zero=True))


class GatedRouter(nn.Module):
    """A router whose affinities are logits ``gate(x): (G, S, E)``, plus training noise and aux losses.

    Args:
        dim: token width ``D``.
        num_experts: ``E``.
        gate: ``'linear'`` (default), ``'cosine'`` or ``'mlp'`` (see :mod:`.gates`).
        gate_hidden_dim: hidden width of the ``'mlp'`` gate (default ``D``).
        noise_std: training noise ``N(0, sigma^2)`` on the logits with ``sigma = noise_std / E``
            (V-MoE, arXiv:2106.05974 App. A.1); 0 disables it.
        importance_loss_weight, load_loss_weight, balance_loss_weight, z_loss_weight:
            weights of the auxiliary losses in ``routing.aux_loss`` (see :mod:`.losses`).
    """

    #: registry name (set by each concrete router)
    name: ClassVar[str] = ""

    # Settings checked on every assignment (ops.Setting): the shape-giving ones once, at construction.
    dim = Setting(check_int_setting, fixed=True)
    num_experts = Setting(check_int_setting, fixed=True)
    noise_std = Setting(lambda name, v: float(check_positive(name, v, allow_zero=True)))
    importance_loss_weight = Setting(_check_weight)
    load_loss_weight = Setting(_check_weight)
    balance_loss_weight = Setting(_check_weight)
    z_loss_weight = Setting(_check_weight)

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        gate: str = "linear",
        gate_hidden_dim: int | None = None,
        noise_std: float = 1.0,
        importance_loss_weight: float = 0.0,
        load_loss_weight: float = 0.0,
        balance_loss_weight: float = 0.0,
        z_loss_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_experts = num_experts
        self.gate_kind = check_choice("gate", gate, tuple(GATES))
        self.gate = create_gate(gate, dim, num_experts, hidden_dim=gate_hidden_dim)
        self.noise_std = noise_std
        self.importance_loss_weight = importance_loss_weight
        self.load_loss_weight = load_loss_weight
        self.balance_loss_weight = balance_loss_weight
        self.z_loss_weight = z_loss_weight

    # -- logits and noise --------------------------------------------------------------------
    def compute_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits ``(G, S, E)`` in float32 (call inside :func:`.ops.float32_math`)."""
        check_rank3("x", x, self.dim)
        return self.gate(x.float())

    @property
    def noise_sigma(self) -> float:
        """Std of the logit noise: ``noise_std / E`` (V-MoE's scaling, arXiv:2106.05974 App. A.1)."""
        return self.noise_std / self.num_experts

    @property
    def is_noisy(self) -> bool:
        """Whether this forward adds noise: training mode and ``noise_std > 0``."""
        return self.training and self.noise_std > 0

    def add_noise(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits + N(0, sigma^2)`` when :attr:`is_noisy`, else ``logits`` unchanged."""
        if not self.is_noisy:
            return logits
        return logits + self.noise_sigma * global_randn_like(logits)

    # -- losses ------------------------------------------------------------------------------
    def loss_weights(self) -> dict[str, float]:
        """Current weight of each auxiliary loss term, by metric name."""
        return {
            "importance_loss": self.importance_loss_weight,
            "load_loss": self.load_loss_weight,
            "balance_loss": self.balance_loss_weight,
            "z_loss": self.z_loss_weight,
        }

    def weighted_aux_loss(self, terms: dict[str, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """``sum_t weight_t * term_t`` over terms with weight > 0 (a float32 zero scalar if none).

        Terms with weight 0 are left out rather than multiplied by 0, as in the
        reference (``_weighted_sum``): a NaN in an unused loss must not poison training.
        """
        weights = self.loss_weights()
        total = like.new_zeros((), dtype=torch.float32)
        for key, value in terms.items():
            weight = weights.get(key, 0.0)
            if weight > 0:
                total = total + weight * value
        return total

    def aux_loss_and_metrics(
        self,
        loss_terms: dict[str, Callable[[], torch.Tensor]],
        like: torch.Tensor,
        statistics: Callable[[], dict[str, torch.Tensor]],
    ) -> tuple[torch.Tensor, LazyMetrics]:
        """The weighted auxiliary loss now, the routing statistics when first read.

        ``loss_terms`` maps each loss name to a function computing it. Only the terms with a
        weight > 0 are computed in the forward (with their graph); the others, and
        ``statistics()``, are computed by the returned :class:`.LazyMetrics` when something reads
        them (no training step does), so a step pays only for the losses it trains on.
        The metrics hold every term, detached, beside the statistics.
        """
        weights = self.loss_weights()
        computed = {name: make() for name, make in loss_terms.items() if weights.get(name, 0.0) > 0}
        aux_loss = self.weighted_aux_loss(computed, like)

        def metrics() -> dict[str, torch.Tensor]:
            out = statistics()
            for name, make in loss_terms.items():
                out[name] = (computed[name] if name in computed else make()).detach().float()
            return out

        return aux_loss, LazyMetrics(metrics)


class CapacityRouter(GatedRouter):
    """A gated router with a per-expert capacity (token choice and expert choice).

    Args (besides :class:`GatedRouter`'s):
        capacity_factor: training capacity factor.
        eval_capacity_factor: capacity factor in eval mode.
        capacity: explicit slots per expert per group; overrides both factors when not ``None``.
        capacity_multiple: round ``C`` up to a multiple of this (reference: 4); 0/None to skip.
        capacity_rounding: ``'ceil'`` (reference) or ``'round'``.
    """

    capacity_multiple = Setting(lambda name, v: None if v is None else check_int_setting(name, v, low=0))
    capacity_rounding = Setting(lambda name, v: check_choice(name, v, CAPACITY_ROUNDINGS))

    def __init__(
        self,
        dim: int,
        num_experts: int,
        *,
        capacity_factor: float,
        eval_capacity_factor: float,
        capacity: int | None = None,
        capacity_multiple: int | None = 4,
        capacity_rounding: str = "ceil",
        **kwargs,
    ) -> None:
        super().__init__(dim, num_experts, **kwargs)
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.capacity = capacity
        self.capacity_multiple = capacity_multiple
        self.capacity_rounding = capacity_rounding

    # The capacity factors fix the capacity C, a size of the routing's tensors, so under torch.compile they must be
    # constants of the graph. A float attribute that changes between compilations (another model's factor, a factor
    # set between calls, as set_routing does) is traced as a symbolic float by Dynamo's automatic dynamic shapes, and
    # C would no longer be a plain int. A string is always a guarded constant: the factors are kept as their exact
    # repr, so a new value recompiles with the new C.
    @property
    def capacity_factor(self) -> float:
        """Training capacity factor (validated: > 0)."""
        return float(self._capacity_factor_repr)

    @capacity_factor.setter
    def capacity_factor(self, value: float) -> None:
        self._capacity_factor_repr = repr(float(check_positive("capacity_factor", value)))

    @property
    def eval_capacity_factor(self) -> float:
        """Evaluation capacity factor (validated: > 0)."""
        return float(self._eval_capacity_factor_repr)

    @eval_capacity_factor.setter
    def eval_capacity_factor(self, value: float) -> None:
        self._eval_capacity_factor_repr = repr(float(check_positive("eval_capacity_factor", value)))

    @property
    def capacity(self) -> int | None:
        """Explicit capacity (slots per expert per group) or ``None`` to derive it from the factor."""
        return self._capacity

    @capacity.setter
    def capacity(self, value: int | None) -> None:
        self._capacity = None if value is None else check_int_setting("capacity", value)

    @property
    def active_capacity_factor(self) -> float:
        """``capacity_factor`` in training mode, ``eval_capacity_factor`` in eval mode."""
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def resolve_capacity(self, num_tokens: int, group_size: int) -> int:
        """Capacity for this forward: explicit ``capacity`` or :func:`.compute_capacity`, at most ``S``.

        Capping at ``S`` never changes a token-choice routing (a token takes at
        most one slot per expert, so an expert never receives more than ``S``
        tokens) and lets expert choice pick its top-``C`` tokens when ``C`` would
        exceed the group (the reference would fail there).
        """
        if group_size < 1:
            raise ConfigError(f"group size S={group_size}: a routing group needs at least one token")
        if self.capacity is not None:
            capacity = self.capacity
        else:
            capacity = compute_capacity(
                num_tokens,
                self.num_experts,
                self.active_capacity_factor,
                rounding=self.capacity_rounding,  # type: ignore[arg-type]
                multiple_of=self.capacity_multiple,
            )
        return min(capacity, group_size)
