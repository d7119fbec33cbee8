"""Small tensor helpers shared by the routers: input checks, stable top-k, float32 math.

Axis letters as in :mod:`vmoe_lib.routers.base` (G groups, S tokens per group,
E experts, C capacity, K choices, D width).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import ConfigError

__all__ = [
    "Setting",
    "axis_index",
    "check_bool_setting",
    "check_int_setting",
    "check_rank3",
    "float32_math",
    "l2_normalize",
    "softmax_experts",
    "stable_top_k",
    "static_shapes",
    "static_shapes_active",
]

_static_depth = 0  # open static_shapes() contexts


@contextlib.contextmanager
def static_shapes(enabled: bool = True) -> Iterator[None]:
    """Make the routers inside return static routings (:attr:`.Routing.is_static`) in eager mode too.

    Under ``torch.compile`` and ``torch.export`` they always do (see :func:`static_shapes_active`);
    this context lets eager code (tests, benchmarks, a user comparing the two paths) take the
    same path::

        with vmoe_lib.routers.static_shapes():
            y = model(x)   # every sparse routing static, dispatched by the static backend
    """
    global _static_depth
    _static_depth += int(enabled)
    try:
        yield
    finally:
        _static_depth -= int(enabled)


def static_shapes_active() -> bool:
    """True while compiling or exporting (``torch.compiler.is_compiling()``) or inside
    :func:`static_shapes`: routers then make routings whose tensor sizes depend only on
    ``(G, S, E, C, k)``, never on the data."""
    return _static_depth > 0 or torch.compiler.is_compiling()


def check_rank3(name: str, tensor: torch.Tensor, last_dim: int | None = None, letters: str = "G, S, D") -> None:
    """Raise :class:`ConfigError` unless ``tensor`` has rank 3 (and, if given, last size ``last_dim``)."""
    if not isinstance(tensor, torch.Tensor):
        raise ConfigError(f"{name} must be a torch.Tensor of shape ({letters}), got {type(tensor).__name__}")
    if tensor.ndim != 3:
        raise ConfigError(
            f"{name} must have rank 3, shape ({letters}), but has shape {tuple(tensor.shape)}: "
            "reshape tokens into routing groups first"
        )
    if last_dim is not None and tensor.shape[-1] != last_dim:
        raise ConfigError(
            f"{name} has last dimension {tensor.shape[-1]}, but the router was built for dim={last_dim}"
        )


def check_int_setting(param: str, value: object, *, low: int = 1, high: int | None = None) -> int:
    """Return ``value`` if it is an int with ``low <= value <= high``; raise :class:`ConfigError` otherwise."""
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and value >= low and (high is None or value <= high)  # type: ignore[operator]
    if not ok:
        bound = f"an integer >= {low}" if high is None else f"an integer with {low} <= {param} <= {high}"
        raise ConfigError(f"{param}={value!r} is invalid; it must be {bound}")
    return int(value)  # type: ignore[arg-type]


class Setting:
    """A router or layer setting checked on every assignment: at construction, by
    :func:`vmoe_lib.models.set_routing` and by a user's ``router.batch_priority = ...``. ``check(name, value)``
    returns the value to store or raises :class:`ConfigError` naming the setting; ``fixed=True`` allows one
    assignment only (a setting the layer's weights are shaped by, such as the number of experts)."""

    def __init__(self, check: Callable[[str, Any], Any], *, fixed: bool = False) -> None:
        self.check = check
        self.fixed = fixed

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.attr = name, f"_setting_{name}"

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else obj.__dict__[self.attr]

    def __set__(self, obj: Any, value: Any) -> None:
        if self.fixed and self.attr in obj.__dict__:
            raise ConfigError(f"{self.name}={value!r} cannot be set on a built {type(obj).__name__}: its weights are "
                              f"shaped by {self.name}={obj.__dict__[self.attr]!r}; build a new one instead")
        obj.__dict__[self.attr] = self.check(self.name, value)


def check_bool_setting(param: str, value: object) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not ``"no"``, ``0`` or ``None``)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{param}={value!r} is invalid; it must be True or False")
    return value


def stable_top_k(x: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` values and indices along ``dim``, sorted descending, ties broken by lower index.

    ``torch.topk`` leaves the order of tied values unspecified (and it differs
    between CPU and CUDA); ``jax.lax.top_k``, used by the reference, prefers the
    lower index. A stable sort gives the reference's choice on every device, which
    matters for all-equal logits (e.g. a zero-initialised gate).
    """
    if k == 1:
        # max returns the first maximal index (documented for torch.max / torch.argmax on every
        # device): the same choice as the stable sort, at a tenth of its cost.
        values, indices = x.max(dim=dim, keepdim=True)
        return values, indices
    if x.dtype == torch.float32 and k < x.shape[dim] and x.shape[dim] <= 1 << 24:
        return _top_k_by_keys(x, k, dim)
    values, indices = torch.sort(x, dim=dim, descending=True, stable=True)
    return values.narrow(dim, 0, k), indices.narrow(dim, 0, k)


def _top_k_by_keys(x: torch.Tensor, k: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable top-``k`` of float32 ``x`` by ``torch.topk`` on exact int64 keys (faster than a full sort).

    The float's bits are mapped to an int32 that orders as the floats do (negative floats have
    their magnitude bits flipped; ``-0.0`` is first turned into ``+0.0``, NaN sorts above ``+inf``
    as in ``torch.sort``), then shifted left by 24 bits and given the reversed position in the
    low bits, so equal values rank by lower index: the keys are all distinct and ``topk`` is exact.
    """
    size = x.shape[dim]
    bits = (x + 0.0).view(torch.int32)  # x + 0.0 turns -0.0 into +0.0
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)
    shape = [1] * x.ndim
    shape[dim] = size
    position = torch.arange(size - 1, -1, -1, device=x.device, dtype=torch.int64).view(shape)
    _, indices = torch.topk((ordered << 24) | position, k, dim=dim, largest=True, sorted=True)
    return x.gather(dim, indices), indices


# Below this many entries on the softmax axis, PyTorch's CPU kernel for a softmax over the last
# (contiguous) dim is an order of magnitude slower than its kernel for an inner dim.
_SMALL_SOFTMAX_AXIS = 64


def softmax_experts(logits: torch.Tensor) -> torch.Tensor:
    """``softmax(logits, dim=-1)`` over the experts (or slots) axis, fast for the small ``E`` of MoE.

    On the CPU, PyTorch's softmax over a short last axis (``E = 8``) runs about ten times slower,
    forward and backward, than the same softmax computed over a middle axis (measured with
    ``(G, S, E) = (16, 136, 8)``: 257 vs 25 us forward, 442 vs 100 us forward+backward, one thread),
    so a router's two softmaxes cost more than its gate matmul. Here the experts axis is moved to
    the middle (``(..., E, S)``, one copy), the softmax taken there, and the result viewed back.
    The values agree with ``torch.softmax`` to about one unit in the last place, not bit for bit.
    Elsewhere (CUDA, long axes) it is ``torch.softmax``.
    """
    if logits.device.type != "cpu" or logits.ndim < 2 or logits.shape[-1] > _SMALL_SOFTMAX_AXIS:
        return torch.softmax(logits, dim=-1)
    return torch.softmax(logits.transpose(-1, -2).contiguous(), dim=-2).transpose(-1, -2)


def axis_index(shape: tuple[int, int, int], axis: int, device: torch.device) -> torch.Tensor:
    """The index along ``axis`` of every element of a ``shape`` tensor, flattened in row-major order: ``(N,)`` long.

    A sparse routing lists its entries in such a grid (group, token or expert, choice or slot); e.g.
    ``axis_index((G, S, K), 0, device)`` is each entry's group.
    """
    view = [1] * len(shape)
    view[axis] = -1
    return torch.arange(shape[axis], device=device).view(view).expand(shape).reshape(-1)


def l2_normalize(x: torch.Tensor, dim: int, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x**2) + eps)`` along ``dim`` (the Soft MoE reference's normalisation).

    Unlike ``F.normalize`` (which divides by ``max(norm, eps)``) this is smooth at 0.
    """
    return x * torch.rsqrt(x.square().sum(dim=dim, keepdim=True) + eps)


@contextlib.contextmanager
def float32_math(device: torch.device) -> Iterator[None]:
    """Disable autocast so that router math (softmax, OT, losses) runs in float32.

    Routers cast their inputs to float32 inside this context ("selective
    precision", Switch Transformer, arXiv:2101.03961 Sec. 2.4): bfloat16 logits
    make top-k ties and softmax/OT underflow far more likely.
    """
    with torch.autocast(device_type=device.type, enabled=False):
        yield
