"""Dense backbones sized for small images, registered with timm.

The book's CPU chapters train on 28x28 Fashion-MNIST (32x32 for ConvNeXt,
whose four 2x reductions need it); the GPU presets on 32x32 CIFAR. The sizes
below are the dense baselines every MoE chapter compares against, chosen to be
*tiny* (where MoE layers are reported to help most, arXiv:2411.18322) and fast
enough on a 2-core CPU: measured train throughput is in the chapter.

Each size is a plain timm model (``VisionTransformer`` or ``ConvNeXt``) with
small-image defaults, so ``timm.create_model("vit_pico_patch7_28")`` works once
``vmoe_lib`` is imported, and the MoE variants (``vmoe_lib.models``) can be
built by replacing block MLPs of exactly these models.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from timm.models.convnext import ConvNeXt
from timm.models.vision_transformer import VisionTransformer

from ..errors import check_choice

__all__ = ["DENSE_VIT_SIZES", "DENSE_CONVNEXT_SIZES", "dense_model_names", "dense_input_cfg"]

# name -> VisionTransformer arguments. Patch 7 on 28x28 gives 4x4 = 16 patches + 1 class token.
DENSE_VIT_SIZES: dict[str, dict[str, Any]] = {
    "vit_test_patch7_28": dict(embed_dim=32, depth=2, num_heads=2),
    "vit_pico_patch7_28": dict(embed_dim=64, depth=4, num_heads=4),
    "vit_nano_patch7_28": dict(embed_dim=96, depth=6, num_heads=4),
    "vit_micro_patch7_28": dict(embed_dim=128, depth=8, num_heads=4),
    # 32x32 inputs (CIFAR; GPU presets): patch 4 gives 8x8 = 64 patches.
    "vit_nano_patch4_32": dict(embed_dim=96, depth=6, num_heads=4, img_size=32, patch_size=4),
    "vit_tiny_patch4_32": dict(embed_dim=192, depth=8, num_heads=3, img_size=32, patch_size=4),
}

# name -> ConvNeXt arguments (inputs 32x32: stem /4, then 8x8 -> 4x4 -> 2x2 -> 1x1).
DENSE_CONVNEXT_SIZES: dict[str, dict[str, Any]] = {
    "convnext_test_32": dict(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64)),
    "convnext_zepto_32": dict(depths=(2, 2, 4, 2), dims=(32, 64, 128, 256)),
    "convnext_atto_32": dict(depths=(2, 2, 6, 2), dims=(40, 80, 160, 320)),
}

_VIT_DEFAULTS = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, mlp_ratio=4.0)
_CONVNEXT_DEFAULTS = dict(in_chans=1, num_classes=10)
CONVNEXT_IMG_SIZE = 32  # the small ConvNeXts' input side; the stem and three downsamplings reduce it 32x
# Fashion-MNIST training-set pixel statistics (the default 1-channel input). vmoe_lib.data normalises
# with the statistics it measures on the training split of whatever dataset it loads.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
# Keys timm.create_model passes to every factory; our models have no pretrained weights.
_TIMM_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _model_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in kwargs.items() if k not in _TIMM_FACTORY_KEYS}


def dense_model_names() -> list[str]:
    """Names of the dense small-image backbones this module registers with timm."""
    return sorted([*DENSE_VIT_SIZES, *DENSE_CONVNEXT_SIZES])


def dense_input_cfg(name: str) -> dict[str, Any]:
    """The timm pretrained-config fields that describe the input and head of the dense size ``name``.

    ``input_size`` is ``(in_chans, H, W)`` of the model as built with its defaults (1 channel:
    Fashion-MNIST; the CIFAR presets pass ``in_chans=3``), ``mean``/``std`` are per channel,
    ``first_conv``/``classifier`` are the parameter names timm's adapters look for. Derived from
    the size tables above, so the config cannot drift from the model it describes.
    """
    check_choice("name", name, dense_model_names())
    common = dict(crop_pct=1.0, interpolation="bilinear", mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD)
    if name in DENSE_VIT_SIZES:
        args = {**_VIT_DEFAULTS, **DENSE_VIT_SIZES[name]}
        return dict(
            common, input_size=(args["in_chans"], args["img_size"], args["img_size"]), fixed_input_size=True,
            pool_size=None, num_classes=args["num_classes"], first_conv="patch_embed.proj", classifier="head",
        )
    args = {**_CONVNEXT_DEFAULTS, **DENSE_CONVNEXT_SIZES[name]}
    side = CONVNEXT_IMG_SIZE // 32
    return dict(
        common, input_size=(args["in_chans"], CONVNEXT_IMG_SIZE, CONVNEXT_IMG_SIZE), pool_size=(side, side),
        num_classes=args["num_classes"], first_conv="stem.0", classifier="head.fc",
    )


def _vit_factory(name: str):
    def create(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
        if pretrained:
            raise ValueError(f"pretrained=True: no pretrained weights exist for {name}")
        return VisionTransformer(**{**_VIT_DEFAULTS, **DENSE_VIT_SIZES[name], **_model_kwargs(kwargs)})

    create.__name__ = name
    create.__doc__ = f"Dense ViT for small images: {DENSE_VIT_SIZES[name]}."
    return create


def _convnext_factory(name: str):
    def create(pretrained: bool = False, **kwargs: Any) -> ConvNeXt:
        if pretrained:
            raise ValueError(f"pretrained=True: no pretrained weights exist for {name}")
        kwargs.pop("img_size", None)  # ConvNeXt is size-agnostic; accepted for a uniform API
        return ConvNeXt(**{**_CONVNEXT_DEFAULTS, **DENSE_CONVNEXT_SIZES[name], **_model_kwargs(kwargs)})

    create.__name__ = name
    create.__doc__ = f"Dense ConvNeXt for 32x32 images: {DENSE_CONVNEXT_SIZES[name]}."
    return create


for _name in DENSE_VIT_SIZES:
    register_model(_vit_factory(_name))
for _name in DENSE_CONVNEXT_SIZES:
    register_model(_convnext_factory(_name))
