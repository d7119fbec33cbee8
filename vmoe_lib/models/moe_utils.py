"""Turning a built timm model into an MoE model, and what to do with one afterwards.

* :func:`replace_mlps` swaps the MLP of chosen blocks for :class:`~vmoe_lib.layers.MoEMlp`
  after the model is built (works on every timm >= 1.0: no model code is copied).
* :func:`set_routing` changes routing settings of a built model (inference experiments:
  lower the eval capacity, switch batch priority on, change ``k``); :func:`bypass_moe` removes
  every MoE layer's output for a while (the positive control "do the experts carry weight?").
* :func:`count_parameters` and :func:`flops_per_image` give total and activated
  parameters and FLOPs; :func:`flops_matched_dense` builds the dense model with the same
  activated FLOPs, for fair comparisons.
* :func:`upcycle_from_dense` loads a dense checkpoint into an MoE model (sparse upcycling);
  :func:`save_moe_model` / :func:`load_moe_model` store MoE models with safetensors.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError, check_choice
from ..layers.moe import ONE_IMAGE_PER_GROUP_ROUTERS, MoEMlp, SharedRouting
from ..layers.stats import moe_layers

__all__ = [
    "MOE_DEFAULTS",
    "EXPERT_INIT_CHOICES",
    "split_moe_kwargs",
    "replace_mlps",
    "set_routing",
    "bypass_moe",
    "count_parameters",
    "flops_per_image",
    "flops_matched_dense",
    "upcycle_from_dense",
    "save_moe_model",
    "load_moe_model",
    "moe_factory",
    "check_out_indices",
]

# MoE model keyword arguments and their defaults (the rest goes to the timm model).
MOE_DEFAULTS: dict[str, Any] = dict(
    num_experts=8,
    k=None,  # the router's default (token choice: 2, per-image: 1)
    moe_layers="last-2",
    router="softmax_token_choice",
    router_options=None,
    capacity_factor=None,
    eval_capacity_factor=None,
    group_size=None,  # images per routing group; None: 8, or 1 for soft / per_image
    shared_expert=False,
    shared_expert_gate=False,
    expert_width=None,  # hidden width of each routed expert; None: the width of the MLP it replaces
    expert_dropout=None,
    expert_init="same",
    backend="auto",
    ensemble_size=1,  # E³ members (vmoe_lib.models.ensemble); 1: no ensemble
)
EXPERT_INIT_CHOICES = ("same", "independent", "upcycle")
# timm's ViT and ConvNeXt initialise every linear layer with a truncated normal of this std.
TIMM_INIT_STD = 0.02
# Keys timm.create_model passes to every model function (not model arguments).
_TIMM_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "pretrained_model_args")
# Feature-extraction keys of timm's build_model_with_cfg (besides ``features_only``).
_FEATURE_KEYS = ("out_indices", "feature_cls")


def split_moe_kwargs(kwargs: dict[str, Any], defaults: dict[str, Any] | None = None) -> tuple[dict, dict]:
    """``(moe settings with defaults filled in, the remaining timm model kwargs)``."""
    defaults = {**MOE_DEFAULTS, **(defaults or {})}
    moe = {key: kwargs.get(key, value) for key, value in defaults.items()}
    rest = {key: v for key, v in kwargs.items() if key not in defaults and key not in _TIMM_FACTORY_KEYS}
    return moe, rest


def _mlp_geometry(mlp: nn.Module, where: str) -> dict[str, Any]:
    """timm ``Mlp`` constructor arguments that rebuild ``mlp``'s shape (Linear or 1x1 conv)."""
    if type(mlp).__name__ == "GlobalResponseNormMlp":
        raise ConfigError(f"{where}: GlobalResponseNormMlp (ConvNeXt-V2, use_grn=True) has no MoE version here")
    fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
    if not isinstance(fc1, (nn.Linear, nn.Conv2d)) or not isinstance(fc2, (nn.Linear, nn.Conv2d)):
        raise ConfigError(f"{where}: {type(mlp).__name__} is not a timm Mlp (fc1 -> act -> fc2); cannot replace it")
    if not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
        raise ConfigError(f"{where}: MLPs with a hidden norm (scale_mlp_norm=True) are not supported")
    use_conv = isinstance(fc1, nn.Conv2d)
    drop = (getattr(mlp, "drop1", nn.Dropout(0.0)).p, getattr(mlp, "drop2", nn.Dropout(0.0)).p)
    return dict(
        in_features=fc1.in_channels if use_conv else fc1.in_features,
        hidden_features=fc1.out_channels if use_conv else fc1.out_features,
        out_features=fc2.out_channels if use_conv else fc2.out_features,
        act_layer=type(mlp.act),
        bias=(fc1.bias is not None, fc2.bias is not None),
        drop=drop,
        use_conv=use_conv,
        device=fc1.weight.device,
        dtype=fc1.weight.dtype,
    )


def replace_mlps(
    blocks: Sequence[nn.Module],
    layers: Sequence[int],
    *,
    num_experts: int = 8,
    k: int | None = None,
    router: str = "softmax_token_choice",
    router_options: dict[str, Any] | None = None,
    capacity_factor: float | None = None,
    eval_capacity_factor: float | None = None,
    group_size: int | None = None,
    shared_expert: bool | int = False,
    shared_expert_gate: bool = False,
    expert_width: int | None = None,
    expert_dropout: float | None = None,
    expert_init: str = "same",
    backend: str = "auto",
    ensemble_size: int = 1,
    block_names: Sequence[str] | None = None,
) -> list[MoEMlp]:
    """Replace ``blocks[i].mlp`` for ``i`` in ``layers`` by :class:`MoEMlp` layers; returns them.

    ``expert_init``: ``"same"`` (one draw copied to every expert, V-MoE), ``"independent"``,
    or ``"upcycle"`` (every expert a copy of the MLP it replaces). Draws use timm's ViT/ConvNeXt
    init (truncated normal, std 0.02, zero bias). With ``router="per_image"`` the first MoE
    layer routes and the following ones reuse its decision (Mobile V-MoE).

    ``expert_width``: the hidden width of each routed expert (``None``: the replaced MLP's). Narrower
    experts beside a shared expert keep the activated FLOPs of the dense MLP, e.g. half-width experts
    with ``k = 1`` and a half-width ``shared_expert`` (DeepSeekMoE's shared-expert isolation).

    ``ensemble_size``: ``M > 1`` builds E³ layers (experts split into ``M`` sets, one router per member; see
    :mod:`vmoe_lib.models.ensemble`); the model builders then tile the input before the first MoE block.
    """
    check_choice("expert_init", expert_init, EXPERT_INIT_CHOICES)
    if expert_width is not None:
        if not isinstance(expert_width, int) or isinstance(expert_width, bool) or expert_width <= 0:
            raise ConfigError(f"expert_width={expert_width!r} is invalid; use None (the width of the MLP an MoE layer "
                              "replaces) or a positive integer hidden width")
        if expert_init == "upcycle":
            raise ConfigError(f"expert_width={expert_width} is invalid with expert_init='upcycle': an upcycled expert "
                              "copies the dense MLP, so it has that MLP's width; use expert_width=None")
    if router_options is not None and not isinstance(router_options, dict):
        raise ConfigError(f"router_options={router_options!r} is invalid; it must be a dict of router options")
    check_ensemble(ensemble_size, num_experts, router)
    share = SharedRouting() if router == "per_image" and len(layers) > 1 else None
    created = []
    for position, index in enumerate(layers):
        block = blocks[index]
        where = block_names[index] if block_names is not None else f"block {index}"
        dense = block.mlp
        geometry = _mlp_geometry(dense, where)
        if expert_width is not None:
            geometry["hidden_features"] = expert_width
        layer = MoEMlp(
            **geometry,
            num_experts=num_experts,
            k=k,
            router=router,
            router_options=router_options,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            group_size=group_size,
            expert_dropout=expert_dropout,
            shared_expert=shared_expert,
            shared_expert_gate=shared_expert_gate,
            expert_init="independent" if expert_init == "independent" else "same",
            init_std=TIMM_INIT_STD,
            backend=backend,
            routing_share=share,
            routing_leader=position == 0,
            ensemble_size=ensemble_size,
        )
        if expert_init == "upcycle":
            layer.load_dense_mlp(dense)
        layer.layer_index = index
        if share is not None and position == 0:
            share.leader_name = where
        block.mlp = layer
        created.append(layer)
    return created


def check_ensemble(ensemble_size: Any, num_experts: Any, router: Any) -> None:
    """Refuse an ``ensemble_size`` that is not a positive integer, that does not divide ``num_experts``, or whose
    router E³ cannot partition (it needs a sparse router of several images per group)."""
    from ..routers.ensemble_routing import ENSEMBLE_ROUTERS  # noqa: PLC0415

    if not isinstance(ensemble_size, int) or isinstance(ensemble_size, bool) or ensemble_size < 1:
        raise ConfigError(f"ensemble_size={ensemble_size!r} is invalid; it must be a positive integer (1: no ensemble, "
                          "M >= 2: an E³ model of M members)")
    if ensemble_size == 1:
        return
    if isinstance(num_experts, int) and num_experts % ensemble_size:
        raise ConfigError(f"ensemble_size={ensemble_size} is invalid with num_experts={num_experts}: the experts are split "
                          f"into {ensemble_size} equal sets, so num_experts must be a multiple of ensemble_size")
    if router not in ENSEMBLE_ROUTERS:
        raise ConfigError(f"ensemble_size={ensemble_size} is invalid with router={router!r}: E³ partitions a sparse router "
                          f"whose groups hold several images; use one of {', '.join(ENSEMBLE_ROUTERS)}")


def attach_ensemble_to(model: nn.Module, blocks: Sequence[nn.Module], layers: Sequence[int], members: int) -> None:
    """E³: tile ``model``'s input before the first MoE block (``blocks[min(layers)]``) and combine its members' outputs
    (:func:`vmoe_lib.models.ensemble.attach_ensemble`); nothing for ``members == 1``."""
    if members > 1:
        from .ensemble import attach_ensemble  # noqa: PLC0415

        attach_ensemble(model, blocks[min(layers)], members)


def check_class_token_routing(moe: dict[str, Any], has_class_token: bool, name: str) -> None:
    """Refuse a per-image router told to read the class token (``route_from="class_token"``) in a model that has
    none (a ViT built with ``class_token=False``, a ConvNeXt): its first token would be an ordinary patch."""
    options = moe.get("router_options") or {}
    if moe.get("router") == "per_image" and isinstance(options, dict) and options.get("route_from") == "class_token" \
            and not has_class_token:
        raise ConfigError(f"router_options['route_from']='class_token' is invalid for {name or 'this model'}: it has no "
                          "class token; use route_from='mean' (the mean of the image's tokens)")


def _fixed_repr(text: str) -> str:
    return text


def mark_moe_model(model: nn.Module, config: dict[str, Any]) -> None:
    """Attach the MoE configuration (``model.moe_config``) and show it in ``repr(model)``."""
    model.moe_config = config
    shown = {key: config[key] for key in ("model", "moe_layers_resolved", "num_experts", "router", "k") if key in config}
    model.extra_repr = functools.partial(_fixed_repr, "moe: " + ", ".join(f"{k}={v}" for k, v in shown.items()))


def check_out_indices(out_indices: Any, levels: int, name: str) -> None:
    """Raise :class:`ConfigError` unless ``out_indices`` selects feature levels of a model with ``levels``.

    timm's meaning: an int ``n`` takes the last ``n`` levels; a sequence lists level indices
    (negative ones count from the end).
    """
    if isinstance(out_indices, int) and not isinstance(out_indices, bool):
        if not 1 <= out_indices <= levels:
            raise ConfigError(f"out_indices={out_indices!r} is invalid for {name}: an int takes the last n of its "
                              f"{levels} feature levels, so 1 <= n <= {levels}")
        return
    ok = isinstance(out_indices, (list, tuple)) and len(out_indices) > 0
    ok = ok and all(isinstance(i, int) and not isinstance(i, bool) and -levels <= i < levels for i in out_indices)
    if not ok:
        raise ConfigError(f"out_indices={out_indices!r} is invalid for {name}: use an int n (the last n levels) or a "
                          f"non-empty tuple of level indices in [{-levels}, {levels - 1}] ({levels} feature levels)")


def moe_factory(
    base: str,
    from_dense: Callable[..., nn.Module],
    *,
    family: str,
    module: str,
    feature_cfg: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    ignore: Sequence[str] = (),
) -> Callable[..., nn.Module]:
    """A timm model function ``vmoe_<base>``: build timm's dense ``base``, then ``from_dense`` swaps in MoE layers.

    The model goes through timm's ``build_model_with_cfg`` as timm's own models do: it gets the
    pretrained config registered for ``vmoe_<base>`` (``model.pretrained_cfg``/``default_cfg``),
    and ``features_only=True`` (with ``out_indices``, ``feature_cls``) wraps the finished MoE
    model, so the feature extractor keeps the MoE blocks. ``feature_cfg`` is the family's
    feature-extractor default (as timm's ``_create_vision_transformer`` / ``_create_convnext``).
    ``defaults`` are MoE keyword defaults for this base (e.g. its placement); keyword arguments
    named in ``ignore`` are accepted and dropped (a uniform API across families). The function's
    ``__module__`` is ``module``, so timm files the model (and finds its ``default_cfgs``) there.
    ``pretrained=True`` raises :class:`ConfigError`: no weights are published.
    """
    import timm  # noqa: PLC0415 (timm is only needed when a model is built)
    from timm.models import build_model_with_cfg  # noqa: PLC0415

    name = f"vmoe_{base}"

    def create(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        if pretrained:
            raise ConfigError(
                f"pretrained={pretrained!r} is invalid for {name}: no pretrained weights exist for it "
                "(its pretrained_cfg has no url or hf_hub_id); use pretrained=False, then train it or "
                "load a dense checkpoint with vmoe_lib.models.upcycle_from_dense"
            )
        moe, model_kwargs = split_moe_kwargs(kwargs, defaults)
        timm_kwargs = {key: kwargs[key] for key in _TIMM_FACTORY_KEYS if kwargs.get(key) is not None}
        features = {**feature_cfg, **(model_kwargs.pop("feature_cfg", None) or {})}
        for key in _FEATURE_KEYS:  # popped here as timm's ViT does, so they never reach the model
            if key in model_kwargs:
                features[key] = model_kwargs.pop(key)
        features_only = model_kwargs.pop("features_only", False)
        if features_only and moe.get("ensemble_size", 1) != 1:
            raise ConfigError(f"features_only=True is invalid with ensemble_size={moe['ensemble_size']}: an E³ model tiles "
                              "and combines its members in forward(), which a feature extractor does not call")
        for key in ignore:
            model_kwargs.pop(key, None)

        def build(**resolved: Any) -> nn.Module:
            # ``resolved`` is ``model_kwargs`` plus the defaults timm reads from the pretrained
            # config (num_classes, in_chans, img_size): with the registered config they equal the
            # dense model's own defaults, and moe_config records the caller's kwargs (as always);
            # a caller's pretrained_cfg(_overlay) may change them, so then the resolved ones are kept.
            for key in ignore:
                resolved.pop(key, None)
            recorded = dict(resolved) if timm_kwargs.keys() & {"pretrained_cfg", "pretrained_cfg_overlay"} else model_kwargs
            dense = timm.create_model(base, pretrained=False, **resolved)
            model = from_dense(dense, name=name, dense_name=base, model_kwargs=recorded, **moe)
            if features_only:
                check_out_indices(features["out_indices"], len(model.feature_info), name)
            return model

        return build_model_with_cfg(
            build, name, False, feature_cfg=features, features_only=features_only, **timm_kwargs, **model_kwargs
        )

    create.__name__ = create.__qualname__ = name
    create.__module__ = module
    create.__doc__ = f"MoE {family} built from timm's ``{base}`` by replacing block MLPs (see {module})."
    return create


# ---------------------------------------------------------------------------- routing settings
_LAYER_SETTINGS = ("group_size", "backend")
# The router settings a built model's routing may change (what the weights are shaped by, such as num_experts, may not).
ROUTING_SETTINGS = ("k", "capacity_factor", "eval_capacity_factor", "batch_priority", "capacity", "capacity_multiple",
                    "renormalize", "noise_std")


def set_routing(model: nn.Module, **settings: Any) -> nn.Module:
    """Change routing settings of every MoE layer of a built model, in place; returns the model.

    Layer settings: ``group_size`` (images per group), ``backend``. Any other key must be an
    attribute of the routers (e.g. ``k``, ``capacity_factor``, ``eval_capacity_factor``,
    ``batch_priority``, ``capacity``). Layers that reuse another layer's routing (per-image
    followers) have no router and are skipped for router settings.

    Example: ``set_routing(model, eval_capacity_factor=0.5, batch_priority=True)``.
    """
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        raise ConfigError("set_routing: the model has no MoE layers")
    for key, value in settings.items():
        if key == "backend":
            from ..layers.dispatch import BACKENDS  # noqa: PLC0415

            check_choice("backend", value, BACKENDS)
        if key == "group_size":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"group_size={value!r} is invalid; it must be a positive integer (images per group)")
            if value != 1 and any(layer.router_name in ONE_IMAGE_PER_GROUP_ROUTERS for layer in layers):
                raise ConfigError(f"group_size={value} is invalid for soft/per_image routers (one image per group)")
        if key in _LAYER_SETTINGS:
            for layer in layers:
                setattr(layer, key, value)
            continue
        routers = [layer.router for layer in layers if layer.router is not None]
        if key not in ROUTING_SETTINGS or not all(hasattr(r, key) for r in routers):
            allowed = sorted({a for r in routers for a in ROUTING_SETTINGS if hasattr(r, a)})
            raise ConfigError(f"set_routing: {key}={value!r} is not a setting of these routers; settable: {[*_LAYER_SETTINGS, *allowed]}")
        for r in routers:
            setattr(r, key, value)  # each router checks the value (vmoe_lib.routers.ops.Setting and its properties)
    return model


@contextlib.contextmanager
def bypass_moe(model: nn.Module, layers: Sequence[str | int] | None = None, keep_shared: bool = False) -> Iterator[nn.Module]:
    """Inside the ``with`` block every MoE layer of ``model`` outputs zeros: each token passes its MoE
    block on the residual stream alone, as a dropped token does.

    The accuracy lost this way is the weight the experts carry (a chapter's positive control): if it
    is near zero, a claim about how tokens are routed cannot be tested on that model. In a ViT block
    only the MLP half goes (attention stays); in a ConvNeXt block the whole residual branch goes,
    since its depthwise convolution feeds only the MLP. A model without MoE layers is rejected.

    Args:
        layers: bypass only these MoE layers, by module name (``"blocks.3.mlp"``) or block index (the
            ``layer_index`` of :func:`moe_layers`); ``None``: all of them. An unknown one is rejected.
        keep_shared: bypass only the routed experts: a layer with a shared expert then outputs the shared
            expert's output alone (the layer made dense again, ViMoE's pruning); a layer without one outputs zeros.
    """
    found = moe_layers(model)
    if not found:
        raise ConfigError("bypass_moe: the model has no MoE layers")
    if layers is None:
        chosen = [layer for _, layer in found]
    else:
        by_key: dict[str | int, nn.Module] = {}
        for name, layer in found:
            by_key[name] = layer
            if getattr(layer, "layer_index", None) is not None:
                by_key[int(layer.layer_index)] = layer
        if isinstance(layers, (str, int)) or not all(isinstance(x, (str, int)) and not isinstance(x, bool) for x in layers) \
                or any(x not in by_key for x in layers):
            raise ConfigError(f"bypass_moe: layers={layers!r} is invalid; use None or a list of this model's MoE layers, by "
                              f"name {[n for n, _ in found]} or block index {[getattr(m, 'layer_index', None) for _, m in found]}")
        chosen = list({id(by_key[x]): by_key[x] for x in layers}.values())

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        if keep_shared and getattr(module, "shared_expert", None) is not None:
            return module.shared_output(args[0])
        return torch.zeros_like(out)

    handles = [layer.register_forward_hook(hook) for layer in chosen]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------- parameters & FLOPs
@torch.no_grad()
def _probe(model: nn.Module, input_size: Sequence[int], batch_size: int) -> None:
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        model(torch.randn(batch_size, *input_size, device=param.device, dtype=param.dtype))
    finally:
        model.train(was_training)


def count_parameters(model: nn.Module, input_size: Sequence[int] | None = None, batch_size: int = 8) -> dict[str, Any]:
    """Total and activated parameter counts.

    ``activated_per_token`` = every parameter outside the expert banks (attention, norms,
    routers, shared experts...) + for each MoE layer, (expert applications per token) x
    (parameters of one expert), see :meth:`MoEMlp.experts_per_token`. With ``input_size``
    (C, H, W) they are measured on a random batch in eval mode (capacity drops, expert
    choice's variable counts and Soft MoE's slots per token are what the model really does);
    otherwise the last forward's measurement, or the nominal ``k`` / capacity factor, is used
    (``None`` where unknown, e.g. Soft MoE before any forward). For per-image routing all
    tokens of an image use the same experts: ``activated_per_image`` = ``activated_per_token``.
    """
    layers = moe_layers(model)
    total = sum(p.numel() for p in model.parameters())
    expert_params = sum(sum(p.numel() for p in layer.experts.parameters()) for _, layer in layers)
    if input_size is not None:
        for _, layer in layers:
            layer.last_dispatch = None
        _probe(model, input_size, batch_size)
    per_layer: dict[int | str, float | None] = {}
    activated: float | None = float(total - expert_params)
    for name, layer in layers:
        per_token = layer.experts_per_token()
        per_layer[layer.layer_index if layer.layer_index is not None else name] = per_token
        if per_token is None or activated is None:
            activated = None
        else:
            activated += per_token * sum(p.numel() for p in layer.experts.parameters()) / layer.num_experts
    result = {
        "total": total,
        "experts": expert_params,
        "non_expert": total - expert_params,
        "activated_per_token": None if activated is None else int(round(activated)),
        "experts_per_token": per_layer,
    }
    if any(layer.router_name == "per_image" for _, layer in layers):
        result["activated_per_image"] = result["activated_per_token"]
    return result


def flops_per_image(model: nn.Module, input_size: Sequence[int], batch_size: int = 8) -> dict[str, Any]:
    """FLOPs of one eval forward per image, as :func:`vmoe_lib.costs.flops_per_image` counts them.

    What is counted: matmul-like ops (linear, conv, bmm, attention), 2 FLOPs per
    multiply-add; elementwise ops (GELU, softmax, norms, sorting, gathers) are not. Under the
    counter the MoE layers run the exact-rows dispatch, so expert FLOPs are those of the
    (token, expert) pairs (Soft MoE: slots) really processed: dropped tokens cost nothing and
    no padding is charged. Router matmuls (and Soft MoE's dispatch/combine matmuls) are
    counted. Measured on a batch of ``batch_size`` images (routing groups as in training).
    Returns the total and the part spent in the experts.
    """
    from ..costs import flops_per_image as counted_flops  # noqa: PLC0415

    total = counted_flops(model, tuple(input_size), batch_size=batch_size)
    layers = [layer for _, layer in moe_layers(model)]
    expert = sum(layer.last_dispatch.pairs * layer.experts.flops_per_row() for layer in layers)
    return {"flops_per_image": total, "moe_expert_flops_per_image": expert / batch_size}


def flops_matched_dense(model: nn.Module, input_size: Sequence[int] | None = None) -> nn.Module:
    """The dense counterpart with the same activated FLOPs per token as ``model``.

    Built as the MoE model's dense base model (``model.moe_config['dense_model']``) with the
    MLP of every MoE block widened to ``round(experts per token x hidden)`` (so k=1 gives the
    base model itself, k=2 MLPs twice as wide). Its ``description`` attribute names it, e.g.
    ``"vit_pico_patch7_28 with MLP hidden 512 in blocks [1, 3]"``.
    """
    import timm  # noqa: PLC0415
    from timm.layers import Mlp  # noqa: PLC0415

    config = getattr(model, "moe_config", None)
    if config is None:
        raise ConfigError("flops_matched_dense: the model has no moe_config (build it with timm.create_model('vmoe_...'))")
    params = count_parameters(model, input_size)
    dense = timm.create_model(config["dense_model"], **config.get("model_kwargs", {}))
    blocks = _blocks_of(dense)
    widths = {}
    for name, layer in moe_layers(model):
        per_token = params["experts_per_token"][layer.layer_index]
        if per_token is None:
            raise ConfigError(f"flops_matched_dense: experts per token of {name} unknown; pass input_size")
        width = max(1, round(per_token * layer.hidden_features))
        widths[layer.layer_index] = width
        old = blocks[layer.layer_index].mlp
        geometry = _mlp_geometry(old, name)
        geometry["hidden_features"] = width
        new = Mlp(**geometry)
        for m in new.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=TIMM_INIT_STD)
                nn.init.zeros_(m.bias)
        blocks[layer.layer_index].mlp = new
    dense.description = f"{config['dense_model']} with MLP hidden {sorted(set(widths.values()))} in blocks {sorted(widths)}"
    return dense


def _blocks_of(model: nn.Module) -> list[nn.Module]:
    """Blocks in flat order: ViT ``model.blocks``, ConvNeXt ``stage.blocks`` of every stage."""
    if hasattr(model, "stages"):
        return [block for stage in model.stages for block in stage.blocks]
    return list(model.blocks)


# ----------------------------------------------------------------------- upcycling and storage
def _load_state(source: nn.Module | dict[str, torch.Tensor] | str | os.PathLike) -> dict[str, torch.Tensor]:
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, dict):
        return source
    path = os.fspath(source)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


@torch.no_grad()
def upcycle_from_dense(
    model: nn.Module, dense: nn.Module | dict[str, torch.Tensor] | str | os.PathLike, *, shared_too: bool = True
) -> nn.Module:
    """Sparse upcycling: load a dense checkpoint into an MoE model of the same base architecture.

    Every non-MoE weight is copied by name; the dense MLP of each MoE block is copied into
    every expert (and the shared expert, if it has the same width). Routers keep their
    initialisation. Raises :class:`ConfigError` naming the keys that do not match.
    """
    state = _load_state(dense)
    layers = moe_layers(model)
    mlp_prefixes = [name + "." for name, _ in layers]
    for name, layer in layers:
        def tensor(key: str, _name: str = name) -> torch.Tensor | None:
            return state.get(f"{_name}.{key}")

        if tensor("fc1.weight") is None:
            raise ConfigError(f"upcycle_from_dense: the dense checkpoint has no {name}.fc1.weight")
        mlp = SimpleNamespace(
            fc1=SimpleNamespace(weight=tensor("fc1.weight"), bias=tensor("fc1.bias")),
            fc2=SimpleNamespace(weight=tensor("fc2.weight"), bias=tensor("fc2.bias")),
        )
        layer.load_dense_mlp(mlp, shared_too=shared_too)
    rest = {key: v for key, v in state.items() if not any(key.startswith(p) for p in mlp_prefixes)}
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [key for key in missing if not any(key.startswith(p) for p in mlp_prefixes)]
    if missing or unexpected:
        raise ConfigError(f"upcycle_from_dense: checkpoint does not match the model; missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def save_moe_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Save weights with safetensors, with ``model.moe_config`` (how to rebuild it) as metadata."""
    from safetensors.torch import save_model  # noqa: PLC0415

    config = getattr(model, "moe_config", None)
    metadata = {"vmoe_config": json.dumps(config, default=str)} if config is not None else None
    save_model(model, os.fspath(path), metadata=metadata)


def load_moe_model(path: str | os.PathLike, model: nn.Module | None = None, **overrides: Any) -> nn.Module:
    """Load a model saved by :func:`save_moe_model`.

    With ``model`` given, its weights are loaded in place. Otherwise the model is rebuilt
    from the stored configuration (``timm.create_model(name, **kwargs, **overrides)``) first.
    """
    from safetensors import safe_open  # noqa: PLC0415
    from safetensors.torch import load_model  # noqa: PLC0415

    path = os.fspath(path)
    if model is None:
        import timm  # noqa: PLC0415

        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        if "vmoe_config" not in metadata:
            raise ConfigError(f"{path} has no vmoe_config metadata; pass the model to load into")
        config = json.loads(metadata["vmoe_config"])
        kwargs = {**config.get("model_kwargs", {}), **config.get("moe_kwargs", {}), **overrides}
        model = timm.create_model(config["model"], **kwargs)
    load_model(model, path)
    return model


def moe_model_config(
    name: str,
    dense_name: str,
    moe: dict[str, Any],
    model_kwargs: dict[str, Any],
    layers: list[int],
    created: list[MoEMlp],
    description: str,
) -> dict[str, Any]:
    """The ``moe_config`` dict stored on an MoE model and in its checkpoints (JSON-serialisable).

    ``k`` is the routers' effective ``k`` (their default when ``k=None`` was asked), ``None``
    for routers without one (expert choice, Soft MoE).
    """
    routers = [layer.router for layer in created if layer.router is not None]
    k = getattr(routers[0], "k", None) if routers else None
    def plain(value: Any) -> Any:
        return value if isinstance(value, (str, int, float, bool, type(None), list, dict, tuple)) else repr(value)

    return {
        "model": name,
        "dense_model": dense_name,
        "moe_kwargs": {key: plain(v) for key, v in copy.deepcopy(moe).items()},
        "model_kwargs": {key: plain(v) for key, v in model_kwargs.items()},
        "moe_layers_resolved": list(layers),
        "moe_layers_description": description,
        "num_experts": moe["num_experts"],
        "router": moe["router"],
        "k": k,
    }
