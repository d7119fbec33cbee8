"""Router noise that a data-parallel run draws as the 1-process run does.

The routers draw their logit noise through :func:`global_randn`. Outside a data-parallel run it is
``torch.randn``. While a data-parallel run trains (:func:`data_parallel_noise`, entered by the training
engine with the run's :class:`~vmoe_lib.distributed.DistributedContext`), every rank draws the noise of
the *global* batch and keeps its own share: each token gets the noise it gets in the 1-process run, and
the ranks' generators stay in step.

This module depends on torch alone, so the routers (low in the package) and :mod:`vmoe_lib.distributed`
(which builds on the MoE layers) both use it without importing each other.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

import torch

__all__ = ["Sharder", "global_randn", "global_randn_like", "data_parallel_noise", "active_context"]


class Sharder(Protocol):
    """What the noise draw needs of a data-parallel context: the number of processes and this rank's share."""

    world_size: int

    def shard(self, batch: torch.Tensor) -> torch.Tensor: ...


_ACTIVE: Any = None  # the Sharder of the data-parallel run training in this process, if any


@contextmanager
def data_parallel_noise(context: Sharder | None) -> Iterator[None]:
    """While active, :func:`global_randn` draws noise for the global batch and keeps this rank's share."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, context
    try:
        yield
    finally:
        _ACTIVE = previous


def active_context() -> Any:
    """The data-parallel context of the run training in this process, if any."""
    return _ACTIVE


def global_randn(shape: Sequence[int], *, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``torch.randn(shape)``; in a data-parallel run, this rank's share of the global batch's draw.

    ``shape[0]`` is this rank's share (routing groups). Every rank draws the noise of all ranks'
    groups, in rank order, and keeps its own: the values each token gets, and the state of the
    generator afterwards, are those of the 1-process run. Outside a data-parallel run this is
    exactly ``torch.randn(shape)``.
    """
    context = _ACTIVE
    if context is None or context.world_size == 1:
        return torch.randn(tuple(shape), dtype=dtype, device=device)
    full = torch.randn((shape[0] * context.world_size, *shape[1:]), dtype=dtype, device=device)
    return context.shard(full)


def global_randn_like(local: torch.Tensor) -> torch.Tensor:
    """:func:`global_randn` with ``local``'s shape, dtype and device."""
    return global_randn(local.shape, dtype=local.dtype, device=local.device)
