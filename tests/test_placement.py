"""Placement strategies: the papers' meanings, as tables (0-based layer indices)."""

from __future__ import annotations

import pytest

from vmoe_lib.errors import ConfigError
from vmoe_lib.models.placement import describe_layers, resolve_moe_layers, resolve_stage_moe_layers

# (strategy, depth) -> layers. V-MoE (arXiv:2106.05974): Every-2 = odd layers; Last-n = last n odd layers.
TABLE = [
    ("every-2", 8, [1, 3, 5, 7]),
    ("every-2", 12, [1, 3, 5, 7, 9, 11]),
    ("Every-2", 7, [1, 3, 5]),
    ("every-3", 8, [2, 5]),
    ("every-1", 3, [0, 1, 2]),
    ("last-2", 8, [5, 7]),  # V-MoE S/32: layers 5 and 7
    ("last-2", 12, [9, 11]),
    ("last-1", 2, [1]),
    ("last-5", 12, [3, 5, 7, 9, 11]),
    ("last-2", 7, [3, 5]),
    ("first-2", 8, [1, 3]),
    ("first-1", 12, [1]),
    ("all", 4, [0, 1, 2, 3]),
    ([3, 1], 4, [1, 3]),  # any order; a repeated index is an error (test_bad_input.py)
]


@pytest.mark.parametrize("strategy, depth, expected", TABLE)
def test_placement_table(strategy, depth, expected):
    assert resolve_moe_layers(strategy, depth) == expected


@pytest.mark.parametrize(
    "strategy, depth, match",
    [
        ("last-3", 4, "asks for 3 odd layers"),
        ("every-9", 8, "places no layer"),
        ("every-0", 8, "n must be >= 1"),
        ("middle-2", 8, "not recognised"),
        ([0, 8], 8, r"indices \[8\] outside"),
        ("last-2", 0, "depth=0"),
        (2, 8, "not recognised"),
    ],
)
def test_placement_errors(strategy, depth, match):
    with pytest.raises(ConfigError, match=match):
        resolve_moe_layers(strategy, depth)


def test_stage_placement_convnext():
    depths = (2, 2, 6, 2)  # ConvNeXt-atto; flat block indices 0..11, stage starts 0, 2, 4, 10
    assert resolve_stage_moe_layers("last-2", depths) == [9, 11]  # global: last two odd blocks
    assert resolve_stage_moe_layers({3: "all"}, depths) == [10, 11]
    assert resolve_stage_moe_layers("s2:last-1,s3:last-1", depths) == [9, 11]
    assert resolve_stage_moe_layers("stage2:every-2", depths) == [5, 7, 9]
    assert resolve_stage_moe_layers({"3": [0]}, depths) == [10]  # JSON-loaded keys
    assert describe_layers([9, 11], depths) == "[2.5, 3.1] (stage.block; flat [9, 11])"
    with pytest.raises(ConfigError, match="stage 4 does not exist"):
        resolve_stage_moe_layers({4: "all"}, depths)
    with pytest.raises(ConfigError, match=r"moe_layers\[stage 3\]='last-2'"):
        resolve_stage_moe_layers({3: "last-2"}, depths)
    with pytest.raises(ConfigError, match="s<stage>:<strategy>"):
        resolve_stage_moe_layers("s3=all:", depths)
