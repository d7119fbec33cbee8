"""String registry of routers: the names notebooks use as parameters.

``create_router("softmax_token_choice", dim=192, num_experts=8, k=2)`` builds a
router; unknown names and unknown options fail early with a :class:`ConfigError`
that lists what is allowed.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch.nn as nn

from ..errors import ConfigError
from .expert_choice_routing import SoftmaxExpertChoiceRouter
from .per_image_routing import PerImageRouter
from .sinkhorn_routing import SinkhornExpertChoiceRouter, SinkhornTokenChoiceRouter
from .soft_routing import SoftRouter
from .sparse_ot_routing import SparseExpertChoiceRouter
from .token_choice_routing import SoftmaxTokenChoiceRouter

__all__ = ["create_router", "list_routers", "register_router", "router_options"]

_ROUTERS: dict[str, type[nn.Module]] = {}


def register_router(cls: type[nn.Module], name: str | None = None) -> type[nn.Module]:
    """Register a router class under ``name`` (default ``cls.name``); usable as a decorator."""
    key = name or getattr(cls, "name", "")
    if not key:
        raise ConfigError(f"router class {cls.__name__} has no name to register under")
    _ROUTERS[key] = cls
    return cls


for _cls in (
    SoftmaxTokenChoiceRouter,
    SinkhornTokenChoiceRouter,
    SoftmaxExpertChoiceRouter,
    SinkhornExpertChoiceRouter,
    SparseExpertChoiceRouter,
    SoftRouter,
    PerImageRouter,
):
    register_router(_cls)


def list_routers() -> list[str]:
    """Names accepted by :func:`create_router`, in registration order (the routers study's order)."""
    return list(_ROUTERS)


def _check_name(name: str) -> type[nn.Module]:
    if name not in _ROUTERS:
        raise ConfigError(f"router={name!r} is not recognised; allowed values: {', '.join(_ROUTERS)}")
    return _ROUTERS[name]


def router_options(name: str) -> dict[str, Any]:
    """Options of router ``name`` with their defaults (everything but ``dim`` and ``num_experts``)."""
    cls = _check_name(name)
    params = inspect.signature(cls.__init__).parameters
    return {key: p.default for key, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def create_router(name: str, *, dim: int, num_experts: int, **options: Any) -> nn.Module:
    """Build router ``name`` for tokens of width ``dim`` and ``num_experts`` experts.

    Args:
        name: one of :func:`list_routers`.
        dim: ``D``.
        num_experts: ``E``.
        **options: router settings (``k``, ``capacity_factor``, ``batch_priority``...); see
            :func:`router_options` for each router's accepted options and defaults.

    Raises:
        ConfigError: unknown name, unknown option or invalid value (the message names it).
    """
    cls = _check_name(name)
    accepted = router_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(
            f"router {name!r} got unknown option(s) {', '.join(unknown)}; "
            f"accepted options: {', '.join(sorted(accepted))}"
        )
    return cls(dim, num_experts, **options)
