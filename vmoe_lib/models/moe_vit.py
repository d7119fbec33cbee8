"""MoE Vision Transformers (V-MoE, Riquelme et al., arXiv:2106.05974), built from timm ViTs.

A V-MoE is a ViT whose MLP is replaced by a Mixture of Experts in some blocks.
Here the dense timm ``VisionTransformer`` is built first and the chosen blocks'
``mlp`` are then swapped for :class:`~vmoe_lib.layers.MoEMlp` (works on every
timm >= 1.0; no ViT code is copied).

Registered with timm under the prefix ``vmoe_`` + the dense name::

    timm.create_model("vmoe_vit_pico_patch7_28", num_experts=8, k=2, moe_layers="last-2",
                      router="softmax_token_choice", group_size=8)

Sizes: every dense small-image ViT of :mod:`vmoe_lib.models.dense` (28x28
Fashion-MNIST, 32x32 CIFAR; ``vmoe_vit_test_patch7_28`` is the unit-test size)
and timm's 224 ViT-Ti/S/B (``vmoe_vit_{tiny,small,base}_patch16_224``, 3
channels, 1000 classes, for users with ImageNet).

MoE keyword arguments (defaults in :data:`~vmoe_lib.models.moe_utils.MOE_DEFAULTS`):
``num_experts``, ``k``, ``moe_layers`` (placement, :mod:`.placement`; default
``"last-2"``, ``"last-1"`` for 2-block test models), ``router``,
``router_options``, ``capacity_factor``, ``eval_capacity_factor``,
``group_size`` (images per routing group), ``shared_expert``,
``shared_expert_gate``, ``expert_width`` (each routed expert's hidden width),
``expert_dropout``, ``expert_init``
(``same``/``independent``/``upcycle``), ``backend``, ``ensemble_size`` (E³:
:mod:`vmoe_lib.models.ensemble`). Everything else goes to
the timm model (``img_size``, ``num_classes``, ``drop_path_rate``...).

The resolved MoE layer indices are in ``model.moe_config`` and ``repr(model)``.

The models keep timm's model contract (:mod:`.timm_contract`): a registered ``pretrained_cfg``
(no weights are published: ``pretrained=True`` raises), ``forward_intermediates``, and
``features_only=True`` with ``out_indices`` (block outputs, MoE blocks included; default the last
3 blocks, as timm's ViTs).
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn
from timm.models import generate_default_cfgs, register_model

from .dense import DENSE_VIT_SIZES
from .moe_utils import attach_ensemble_to, check_class_token_routing, mark_moe_model, moe_factory, moe_model_config, replace_mlps, split_moe_kwargs
from .placement import describe_layers, resolve_moe_layers
from .timm_contract import moe_pretrained_cfg

__all__ = ["MOE_VIT_BASES", "moe_vit_from_dense", "moe_vit_model_names"]

# Dense timm names the MoE ViTs are built from; the 224 sizes are timm's own.
MOE_VIT_BASES = (*DENSE_VIT_SIZES, "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224")


def moe_vit_model_names() -> list[str]:
    """Names of the registered MoE ViTs."""
    return [f"vmoe_{base}" for base in MOE_VIT_BASES]


def moe_vit_from_dense(dense: nn.Module, *, name: str = "", dense_name: str = "", model_kwargs: dict | None = None, **moe: Any) -> nn.Module:
    """Turn a built timm ``VisionTransformer`` into an MoE ViT in place (see module docstring)."""
    moe, rest = split_moe_kwargs(moe)
    if rest:
        raise TypeError(f"moe_vit_from_dense got non-MoE arguments {sorted(rest)}")
    depth = len(dense.blocks)
    placement = moe["moe_layers"]
    layers = resolve_moe_layers(placement, depth)
    options = {key: v for key, v in moe.items() if key != "moe_layers"}
    check_class_token_routing(moe, getattr(dense, "cls_token", None) is not None, name)
    created = replace_mlps(list(dense.blocks), layers, block_names=[f"blocks.{i}.mlp" for i in range(depth)], **options)
    mark_moe_model(dense, moe_model_config(name, dense_name, moe, model_kwargs or {}, layers, created, describe_layers(layers)))
    attach_ensemble_to(dense, list(dense.blocks), layers, moe["ensemble_size"])
    return dense


# timm's register_model reads each model's pretrained config from this module's ``default_cfgs``.
default_cfgs = generate_default_cfgs({
    f"vmoe_{base}": moe_pretrained_cfg(base, paper_name="Scaling Vision with Sparse Mixture of Experts", paper_ids="arXiv:2106.05974")
    for base in MOE_VIT_BASES
})

for _base in MOE_VIT_BASES:
    _depth = DENSE_VIT_SIZES.get(_base, {}).get("depth", 12)
    register_model(moe_factory(
        _base, moe_vit_from_dense, family="ViT", module=__name__,
        # timm's ViT default (the last 3 blocks' outputs), at most every block of the 2-block test size
        feature_cfg=dict(out_indices=min(3, _depth), feature_cls="getter"),
        defaults={"moe_layers": "last-2" if _depth >= 4 else "last-1"},
    ))
