"""MoE ConvNeXts (as in Videau et al., arXiv:2411.18322), built from timm ConvNeXts.

The dense timm ``ConvNeXt`` is built first and the MLP of chosen blocks is
then replaced by :class:`~vmoe_lib.layers.MoEMlp`. Tokens are the ``H*W``
positions of each image at that stage (the MLP gets ``(B, H, W, C)`` from timm's
channels-last block, or ``(B, C, H, W)`` with ``conv_mlp=True``; both work).

Registered with timm as ``vmoe_`` + the dense name: the 32x32 sizes of
:mod:`vmoe_lib.models.dense` (``vmoe_convnext_test_32`` for unit tests,
``vmoe_convnext_zepto_32``, ``vmoe_convnext_atto_32``) and timm's 224 sizes
``vmoe_convnext_{atto,femto,pico,nano,tiny}``.

Placement (``moe_layers``, :mod:`.placement`): a strategy over all blocks in
order (default ``"last-2"``: the last two odd blocks, which for ConvNeXt-atto's
depths (2, 2, 6, 2) are the last block of stage 2 and of stage 3), or per
stage, e.g. ``{3: "all"}`` or ``"s2:last-1,s3:last-1"``. Other MoE keyword
arguments as for the MoE ViTs (:mod:`.moe_vit`).

timm's model contract as for the MoE ViTs (:mod:`.timm_contract`); ``features_only=True`` gives
the outputs of the four stages, as timm's ConvNeXts.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from .dense import DENSE_CONVNEXT_SIZES
from .moe_utils import attach_ensemble_to, check_class_token_routing, mark_moe_model, moe_factory, moe_model_config, replace_mlps, split_moe_kwargs
from .placement import describe_layers, resolve_stage_moe_layers
from .timm_contract import moe_pretrained_cfg

__all__ = ["MOE_CONVNEXT_BASES", "moe_convnext_from_dense", "moe_convnext_model_names"]

MOE_CONVNEXT_BASES = (
    *DENSE_CONVNEXT_SIZES,
    "convnext_atto",
    "convnext_femto",
    "convnext_pico",
    "convnext_nano",
    "convnext_tiny",
)


def moe_convnext_model_names() -> list[str]:
    """Names of the registered MoE ConvNeXts."""
    return [f"vmoe_{base}" for base in MOE_CONVNEXT_BASES]


def moe_convnext_from_dense(dense: nn.Module, *, name: str = "", dense_name: str = "", model_kwargs: dict | None = None, **moe: Any) -> nn.Module:
    """Turn a built timm ``ConvNeXt`` into an MoE ConvNeXt in place (see module docstring)."""
    moe, rest = split_moe_kwargs(moe)
    if rest:
        raise TypeError(f"moe_convnext_from_dense got non-MoE arguments {sorted(rest)}")
    stage_depths = [len(stage.blocks) for stage in dense.stages]
    blocks = [block for stage in dense.stages for block in stage.blocks]
    names = [f"stages.{s}.blocks.{b}.mlp" for s, d in enumerate(stage_depths) for b in range(d)]
    layers = resolve_stage_moe_layers(moe["moe_layers"], stage_depths)
    options = {key: v for key, v in moe.items() if key != "moe_layers"}
    check_class_token_routing(moe, False, name)
    created = replace_mlps(blocks, layers, block_names=names, **options)
    config = moe_model_config(name, dense_name, moe, model_kwargs or {}, layers, created, describe_layers(layers, stage_depths))
    config["stage_depths"] = stage_depths
    mark_moe_model(dense, config)
    attach_ensemble_to(dense, blocks, layers, moe["ensemble_size"])
    return dense


# timm's register_model reads each model's pretrained config from this module's ``default_cfgs``.
default_cfgs = generate_default_cfgs({
    f"vmoe_{base}": moe_pretrained_cfg(
        base, paper_name="Mixture of Experts in Image Classification: What's the Sweet Spot?", paper_ids="arXiv:2411.18322"
    )
    for base in MOE_CONVNEXT_BASES
})

for _base in MOE_CONVNEXT_BASES:
    register_model(moe_factory(
        _base, moe_convnext_from_dense, family="ConvNeXt", module=__name__,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),  # timm's ConvNeXt: the 4 stages
        ignore=("img_size",) if _base in DENSE_CONVNEXT_SIZES else (),  # size-agnostic; accepted for a uniform API
    ))
