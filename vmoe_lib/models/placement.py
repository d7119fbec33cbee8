"""Where the MoE layers go: placement strategies by name, with the papers' meanings.

Layers are 0-based block indices. Strategies (case-insensitive):

=================  ==========================================================
``"every-n"``      layers ``n-1, 2n-1, 3n-1, ...`` (V-MoE's "Every-2" = 1, 3, 5, ...;
                   arXiv:2106.05974, Sec. 4)
``"last-n"``       the last ``n`` odd layers (V-MoE's "Last-n": depth 8, Last-2 -> 5, 7;
                   depth 12, Last-2 -> 9, 11)
``"first-n"``      the first ``n`` odd layers (the mirror image of Last-n: 1, 3, ...)
``"all"``          every layer
a list of ints     exactly those layers (``[]``: none, a dense model)
=================  ==========================================================

ConvNeXt has stages; a placement for it is either one of the above applied to
all blocks in order (stage 0's blocks first), or per stage: a dict
``{stage: strategy}`` or the string form ``"s3:last-1"`` / ``"s2:every-2,s3:all"``,
each strategy resolved within its stage (e.g. ``{3: "all"}`` = every block of
the last stage; ``"s2:last-1,s3:last-1"`` = the last odd block of the last two
stages). The resolved indices are always flat block indices.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError

__all__ = ["resolve_moe_layers", "resolve_stage_moe_layers", "describe_layers", "PLACEMENT_HELP"]

PLACEMENT_HELP = "'every-n', 'last-n', 'first-n', 'all', or a list of layer indices"
_PATTERN = re.compile(r"^(every|last|first)[-_ ]?(\d+)$")


def resolve_moe_layers(strategy: str | Sequence[int], depth: int, *, param: str = "moe_layers") -> list[int]:
    """Resolve a placement for a stack of ``depth`` blocks into sorted 0-based indices."""
    if not isinstance(depth, int) or depth < 1:
        raise ConfigError(f"depth={depth!r} is invalid; it must be a positive integer")
    if isinstance(strategy, str):
        name = strategy.strip().lower()
        if name == "all":
            return list(range(depth))
        match = _PATTERN.match(name)
        if match is None:
            raise ConfigError(f"{param}={strategy!r} is not recognised; allowed: {PLACEMENT_HELP}")
        kind, n = match.group(1), int(match.group(2))
        if n < 1:
            raise ConfigError(f"{param}={strategy!r} is invalid; n must be >= 1")
        if kind == "every":
            if n > depth:
                raise ConfigError(f"{param}={strategy!r} places no layer in a stack of depth {depth}; n must be <= {depth}")
            return list(range(n - 1, depth, n))
        odd = list(range(1, depth, 2))
        if n > len(odd):
            raise ConfigError(
                f"{param}={strategy!r} asks for {n} odd layers but depth {depth} has {len(odd)} ({odd}); "
                f"use n <= {len(odd)} or an explicit list"
            )
        return odd[-n:] if kind == "last" else odd[:n]
    if isinstance(strategy, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in strategy):
        if not strategy:
            raise ConfigError(f"{param}=[] places no MoE layer; a vmoe_* model needs at least one (use the dense model "
                              f"for none), e.g. {param}=[{depth - 1}] or 'last-2'")
        duplicates = sorted({i for i in strategy if list(strategy).count(i) > 1})
        if duplicates:
            raise ConfigError(f"{param}={list(strategy)!r} repeats layer(s) {duplicates}; each index may appear once")
        layers = sorted(strategy)
        bad = [i for i in layers if not 0 <= i < depth]
        if bad:
            raise ConfigError(f"{param}={list(strategy)!r} has indices {bad} outside 0..{depth - 1} (depth {depth})")
        return layers
    raise ConfigError(f"{param}={strategy!r} is not recognised; allowed: {PLACEMENT_HELP}")


def _parse_stage_string(strategy: str) -> dict[int, str] | None:
    if ":" not in strategy:
        return None
    spec: dict[int, str] = {}
    for part in strategy.split(","):
        match = re.match(r"^\s*s(?:tage)?(\d+)\s*:\s*(.+?)\s*$", part, flags=re.IGNORECASE)
        if match is None:
            raise ConfigError(f"moe_layers={strategy!r}: part {part!r} is not 's<stage>:<strategy>' (e.g. 's3:last-1')")
        spec[int(match.group(1))] = match.group(2)
    return spec


def resolve_stage_moe_layers(strategy: Any, stage_depths: Sequence[int]) -> list[int]:
    """Resolve a ConvNeXt placement (global or per stage) into sorted flat block indices."""
    total = sum(stage_depths)
    spec = strategy
    if isinstance(strategy, str):
        spec = _parse_stage_string(strategy) or strategy
    if not isinstance(spec, dict):
        return resolve_moe_layers(spec, total)
    starts = [sum(stage_depths[:i]) for i in range(len(stage_depths))]
    layers: list[int] = []
    for stage, stage_strategy in spec.items():
        if isinstance(stage, str) and stage.isdigit():  # JSON turns int keys into strings
            stage = int(stage)
        if not isinstance(stage, int) or not 0 <= stage < len(stage_depths):
            raise ConfigError(f"moe_layers stage {stage!r} does not exist; stages are 0..{len(stage_depths) - 1}")
        local = resolve_moe_layers(stage_strategy, stage_depths[stage], param=f"moe_layers[stage {stage}]")
        layers += [starts[stage] + i for i in local]
    return sorted(layers)


def describe_layers(layers: Sequence[int], stage_depths: Sequence[int] | None = None) -> str:
    """Human-readable placement: ``"[5, 7]"`` or, for stages, ``"[3.0, 3.1] (flat [10, 11])"``."""
    if stage_depths is None:
        return str(list(layers))
    named = []
    for i in layers:
        start = 0
        for stage, depth in enumerate(stage_depths):
            if i < start + depth:
                named.append(f"{stage}.{i - start}")
                break
            start += depth
    return f"[{', '.join(named)}] (stage.block; flat {list(layers)})"
