"""``MoEMlp``: a Mixture-of-Experts layer that drops in for timm's ``Mlp``.

Axis letters (google-research/vmoe ``moe.py``): ``B`` images, ``T`` tokens per
image, ``G`` routing groups, ``S = images_per_group * T`` tokens per group,
``E`` experts, ``C`` capacity, ``D`` width.

What one forward does, for ``x`` of shape ``(B, ..., D)`` (or ``(B, D, H, W)``
with ``use_conv=True``, as ConvNeXt's convolutional MLP gets it):

1. Flatten each image's tokens (``T`` = product of the middle dims, ``H*W`` for
   NCHW) and split the batch into routing groups of ``images_per_group``
   images: ``(G, S, D)``. V-MoE routes groups of several images' tokens
   (arXiv:2106.05974, Sec. 3.2); ``group_size`` counts IMAGES per group. When
   the batch is not divisible by it, the largest divisor of ``B`` that is
   ``<= group_size`` is used, so every group has the same size (a last
   small batch of an epoch still routes in equal groups; a prime batch size
   routes image by image). Soft MoE and per-image routing always use one image
   per group. A 2-D input ``(B, D)`` is ``B`` images of one token each.
2. The router returns a :class:`~vmoe_lib.routers.base.Routing`.
3. A dispatch backend (:mod:`vmoe_lib.layers.dispatch`) runs the expert bank on
   the routed tokens and combines the results.
4. ``self.aux_loss`` is set to the router's weighted auxiliary loss (the
   protocol of :mod:`vmoe_lib.layers.aux`), ``self.last_metrics`` to its detached
   statistics, and a :class:`~vmoe_lib.layers.stats.RoutingRecorder`, when one
   is attached, accumulates per-layer statistics.
5. An optional shared expert (ViMoE) adds its dense output.

An efficient ensemble of experts (E³, arXiv:2110.03360; ``ensemble_size=M > 1``): the layer gets ``M`` copies of the
batch, member-major (the model repeats its input before its first MoE layer, :mod:`vmoe_lib.models.ensemble`), forms
its routing groups within each copy (``images_per_group`` of ``B / M`` images) and routes copy ``m`` only to the
``m``-th set of ``E / M`` experts with its own router (:class:`~vmoe_lib.routers.ensemble_routing.EnsembleRouter`).

Per-image routing shared across layers (Mobile V-MoE, arXiv:2309.04354,
Sec. 3.1): the routing decision is made once, by the first MoE layer, from the
representation entering it, and reused by the following MoE layers of the
same forward. Layers built with the same :class:`SharedRouting` and
``routing_leader=False`` own no router; they read the leader's routing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import ConfigError, check_bool, check_choice, check_positive, check_range
from ..routers.base import Routing
from ..routers.ops import axis_index, static_shapes
from .dispatch import BACKENDS, DispatchInfo, dispatch_combine
from .experts import EXPERT_INITS, ExpertBank
from .shared_expert import SharedExpert

__all__ = ["MoEMlp", "SharedRouting", "images_per_group", "ONE_IMAGE_PER_GROUP_ROUTERS"]

# Routers whose groups are single images: Soft MoE (arXiv:2308.00951, one group per
# image) and per-image routing (arXiv:2309.04354).
ONE_IMAGE_PER_GROUP_ROUTERS = ("soft", "per_image")
DEFAULT_GROUP_SIZE = 8  # images per routing group in V-MoE's configs
# Keyword arguments some timm blocks pass to their own MLP kinds; accepted when they ask for nothing.
_TIMM_NOOP_KWARGS = ("gate_layer", "gate_last", "pre_norm", "layer_idx")


def images_per_group(batch_size: int, group_size: int) -> int:
    """The largest divisor of ``batch_size`` that is ``<= group_size`` (images per routing group)."""
    for size in range(min(group_size, batch_size), 0, -1):
        if batch_size % size == 0:
            return size
    return 1


class SharedRouting:
    """Hands the per-image routing of the leader MoE layer to the following ones in one forward.

    A plain object, not a module: it holds no parameters and is not saved.
    """

    def __init__(self) -> None:
        self.routing: Routing | None = None
        self.leader_name: str = ""
        self.leader_router: nn.Module | None = None  # a reference (not a submodule): its k, for counts

    def __repr__(self) -> str:
        return f"SharedRouting(leader={self.leader_name!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "routing": None}  # the routing is per forward


def _expand_image_routing(routing: Routing, tokens: int) -> Routing:
    """Re-express a per-image routing for ``tokens`` tokens per image (a later stage's size).

    Each image's choices are read from its token 0 and given to all its tokens,
    slot = token index, capacity = ``tokens`` (the per-image router's convention). The per-image
    router lists its entries image by image, token by token, choice by choice, so token 0's are
    the first ``k`` of each image: read by a reshape, with sizes that never depend on the data.
    """
    G, S = routing.num_groups, routing.group_size
    k = routing.expert_index.numel() // (G * S)
    shape = (G, tokens, k)

    def first_token(values: torch.Tensor) -> torch.Tensor:  # (G*S*k,) -> (G, tokens, k)
        return values.view(G, S, k)[:, :1].expand(shape).reshape(-1)

    t = axis_index(shape, 1, routing.expert_index.device)
    return Routing(
        num_groups=G,
        group_size=tokens,
        num_experts=routing.num_experts,
        capacity=tokens,
        group_index=first_token(routing.group_index),
        token_index=t,
        expert_index=first_token(routing.expert_index),
        slot_index=t,
        combine_weight=first_token(routing.combine_weight),
        aux_loss=None,
        metrics=routing.metrics,
    )


class MoEMlp(nn.Module):
    """Mixture of ``num_experts`` timm MLPs behind a router; a drop-in for ``timm.layers.Mlp``.

    The positional/keyword arguments up to ``dtype`` are timm's ``Mlp`` ones and
    mean the same; every MoE setting is keyword-only.

    Args:
        num_experts: ``E``.
        k: experts per token (token-choice and per-image routers), passed to the router.
        router: a router name (see ``vmoe_lib.routers.list_routers()``) or a built router module.
        router_options: further router options (noise, loss weights, ``slots_per_expert``...).
        capacity_factor, eval_capacity_factor: passed to the router when given.
        group_size: images per routing group (default 8 as V-MoE; 1 for ``soft`` and ``per_image``).
        expert_dropout: dropout inside the experts (V-MoE uses 0.2), after the activation
            and after fc2; ``None`` keeps timm's ``drop``.
        shared_expert: ``False``, ``True`` (same width as an expert) or the hidden width
            of an always-on dense MLP added to the output (ViMoE).
        shared_expert_gate: gate the shared expert by a per-token sigmoid (Qwen2-MoE).
        expert_init: ``"same"`` (V-MoE) or ``"independent"``; to upcycle, call
            :meth:`load_dense_mlp` after building.
        init_std: ``None`` (``nn.Linear`` default init) or the truncated-normal std
            of timm's ViT/ConvNeXt init.
        backend: ``"auto"``, ``"einsum"``, ``"sort"``, ``"segment"``, ``"grouped_mm"`` or ``"static"``
            (:mod:`.dispatch`; ``"auto"`` takes the static path while compiling or exporting, and
            ``"static"`` takes it in eager mode too);
            not used once :func:`vmoe_lib.distributed.enable_expert_parallel` has split the experts
            over ranks (the ``expert_parallel`` attribute then dispatches).
        routing_share, routing_leader: share one per-image routing across layers.
        ensemble_size: ``M``; above 1 the layer is an E³ layer (see the module docstring): ``num_experts`` must be a
            multiple of it, ``k`` is per member, the router one of
            :data:`~vmoe_lib.routers.ensemble_routing.ENSEMBLE_ROUTERS`.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        act_layer: type[nn.Module] = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        use_conv: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        num_experts: int = 8,
        k: int | None = None,
        router: str | nn.Module = "softmax_token_choice",
        router_options: dict[str, Any] | None = None,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
        group_size: int | None = None,
        expert_dropout: float | None = None,
        shared_expert: bool | int = False,
        shared_expert_gate: bool = False,
        expert_init: str = "same",
        init_std: float | None = None,
        backend: str = "auto",
        routing_share: SharedRouting | None = None,
        routing_leader: bool = True,
        ensemble_size: int = 1,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        unknown = {key: v for key, v in kwargs.items() if not (key in _TIMM_NOOP_KWARGS and v in (None, False))}
        if unknown:
            raise ConfigError(
                f"MoEMlp got unknown keyword arguments {sorted(unknown)}; MoE settings are: num_experts, k, "
                "router, router_options, capacity_factor, eval_capacity_factor, group_size, expert_dropout, "
                "shared_expert, shared_expert_gate, expert_init, init_std, backend, ensemble_size"
            )
        if not isinstance(ensemble_size, int) or isinstance(ensemble_size, bool) or ensemble_size < 1:
            raise ConfigError(f"ensemble_size={ensemble_size!r} is invalid; it must be a positive integer (1: no ensemble)")
        if ensemble_size > 1 and (routing_share is not None or isinstance(router, nn.Module)):
            raise ConfigError(f"ensemble_size={ensemble_size} is invalid with a shared per-image routing or a router "
                              "module: E³ builds one router per member from a router name")
        check_positive("num_experts", num_experts)
        if not isinstance(num_experts, int):
            raise ConfigError(f"num_experts={num_experts!r} is invalid; it must be a positive integer")
        check_choice("backend", backend, BACKENDS)
        check_choice("expert_init", expert_init, EXPERT_INITS)
        if expert_dropout is not None:
            check_range("expert_dropout", expert_dropout, 0.0, 1.0)
        if not isinstance(shared_expert, (bool, int)) or (not isinstance(shared_expert, bool) and shared_expert <= 0):
            raise ConfigError(f"shared_expert={shared_expert!r} is invalid; use False, True or a positive hidden width")
        for name, value in (("shared_expert_gate", shared_expert_gate), ("routing_leader", routing_leader),
                            ("use_conv", use_conv)):
            check_bool(name, value)

        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.in_features, self.hidden_features, self.out_features = in_features, hidden_features, out_features
        self.num_experts = num_experts
        self.use_conv = use_conv
        self.backend = backend
        self.ensemble_size = ensemble_size

        self.router_name = router if isinstance(router, str) else getattr(router, "name", type(router).__name__)
        one_image = self.router_name in ONE_IMAGE_PER_GROUP_ROUTERS
        if group_size is None:
            group_size = 1 if one_image else DEFAULT_GROUP_SIZE
        check_positive("group_size", group_size)
        if not isinstance(group_size, int):
            raise ConfigError(f"group_size={group_size!r} is invalid; it must be a positive integer (images per group)")
        if one_image and group_size != 1:
            raise ConfigError(f"group_size={group_size} is invalid with router={self.router_name!r}: it routes one image per group; use group_size=1")
        self.group_size = group_size

        if router_options is not None and not isinstance(router_options, dict):
            raise ConfigError(f"router_options={router_options!r} is invalid; it must be a dict of router options "
                              "(see vmoe_lib.routers.router_options(name) for each router's)")
        self.routing_share = routing_share
        self.routing_leader = routing_leader or routing_share is None
        if isinstance(router, nn.Module):
            self.router: nn.Module | None = router
        elif not self.routing_leader:
            self.router = None  # reads the leader's routing (Mobile V-MoE)
        else:
            from ..routers import create_router  # noqa: PLC0415 (routers import layers' helpers)

            options = dict(router_options or {})
            for key, value in (("k", k), ("capacity_factor", capacity_factor), ("eval_capacity_factor", eval_capacity_factor)):
                if value is None:
                    continue
                if key in options and options[key] != value:
                    raise ConfigError(f"{key}={value!r} conflicts with router_options[{key!r}]={options[key]!r}")
                options[key] = value
            if ensemble_size > 1:
                from ..routers.ensemble_routing import EnsembleRouter  # noqa: PLC0415

                self.router = EnsembleRouter(router, dim=in_features, num_experts=num_experts,
                                             ensemble_size=ensemble_size, **options)
            else:
                self.router = create_router(router, dim=in_features, num_experts=num_experts, **options)
        if routing_share is not None and self.routing_leader:
            routing_share.leader_router = self.router

        drop_in_experts = drop if expert_dropout is None else expert_dropout
        self.experts = ExpertBank(
            num_experts, in_features, hidden_features, out_features, act_layer=act_layer, norm_layer=norm_layer,
            bias=bias, drop=drop_in_experts, init=expert_init, init_std=init_std, device=device, dtype=dtype,
        )
        if shared_expert is False:
            self.shared_expert = None
        else:
            width = hidden_features if shared_expert is True else int(shared_expert)
            self.shared_expert = SharedExpert(
                in_features, width, out_features, act_layer=act_layer, bias=bias, drop=drop,
                gated=shared_expert_gate, device=device, dtype=dtype,
            )
            if init_std is not None:
                for module in self.shared_expert.modules():
                    if isinstance(module, nn.Linear):
                        nn.init.trunc_normal_(module.weight, std=init_std)
                        if module.bias is not None:
                            nn.init.zeros_(module.bias)

        self.layer_index: int | None = None  # set by the backbone builders, for reprs and statistics
        self.aux_loss: torch.Tensor | None = None
        self.last_metrics: dict[str, torch.Tensor] = {}
        self.last_dispatch: DispatchInfo | None = None
        self.last_tokens = 0  # tokens routed in the last forward (G * S)
        self.last_routing: Routing | None = None  # kept only while keep_routing is True (tests, analysis)
        self.keep_routing = False
        self._recorder = None  # a stats._LayerRecord while a RoutingRecorder is active
        # Set by vmoe_lib.distributed.enable_expert_parallel: the experts are split over ranks and
        # its dispatch_combine replaces the local backend.
        self.expert_parallel: Any = None

    # Per-forward state (tensors with graphs) is not copied or pickled: deepcopy (EMA models)
    # and torch.save of a model work after a forward.
    _TRANSIENT = ("aux_loss", "last_routing", "_recorder")

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        state = dict(state)
        for key in self._TRANSIENT:
            state[key] = None
        state["last_metrics"] = {}
        return state

    def __prepare_scriptable__(self) -> MoEMlp:
        """``torch.jit.script`` calls this on every submodule first: fail with a plain reason instead
        of a TorchScript frontend error deep inside a router (see ``vmoe_lib.models.timm_contract``)."""
        raise RuntimeError(
            "MoEMlp cannot be compiled by TorchScript (torch.jit.script): its routers return a Routing "
            "dataclass with optional fields and are chosen by name, and the dispatch backend is picked at "
            "run time. Run the model eagerly, or trace it with torch.fx using timm's leaf modules "
            "(timm.models.get_notrace_modules() includes MoEMlp once vmoe_lib.models is imported)."
        )

    # ----------------------------------------------------------------------
    @torch.no_grad()
    def load_dense_mlp(self, mlp: nn.Module, shared_too: bool = True) -> None:
        """Sparse upcycling: every expert (and the shared expert, if any) starts as ``mlp``."""
        self.experts.load_dense_mlp(mlp)
        if shared_too and self.shared_expert is not None and self.shared_expert.mlp.fc1.out_features == self.hidden_features:
            self.shared_expert.mlp.fc1.load_state_dict(_as_linear_state(mlp.fc1))
            self.shared_expert.mlp.fc2.load_state_dict(_as_linear_state(mlp.fc2))

    def experts_per_token(self) -> float | None:
        """Expert applications per token: measured in the last forward if there was one
        (drops, expert choice's variable counts and Soft MoE's slots included), else the
        nominal ``k`` of token-choice/per-image routers or the capacity factor of
        expert-choice routers (their expected experts per token); ``None`` if unknown."""
        if self.last_dispatch is not None and self.last_tokens:
            return self.last_dispatch.pairs / self.last_tokens  # last_tokens counts each image once (E³: per copy set)
        router = self.router if self.router is not None else getattr(self.routing_share, "leader_router", None)
        if router is None:
            return None
        if self.router_name.endswith("token_choice") or self.router_name == "per_image":
            return float(router.k) * self.ensemble_size
        if self.router_name.endswith("expert_choice"):
            factor = router.capacity_factor if self.training or router.eval_capacity_factor is None else router.eval_capacity_factor
            return float(factor) * self.ensemble_size
        return None

    def activated_parameters(self) -> int:
        """Parameters one token uses: router, shared expert, and ``experts_per_token()`` experts
        (all experts when that is unknown). The protocol of ``vmoe_lib.costs.count_parameters``."""
        own = sum(p.numel() for p in self.parameters())
        bank = sum(p.numel() for p in self.experts.parameters())
        per_token = self.experts_per_token()
        if per_token is None:
            return own
        return int(round(own - bank + per_token * bank / self.experts.num_experts))  # local experts under EP

    def _route(self, x: torch.Tensor) -> Routing:
        if self.router is not None:
            if self.backend == "static" and not torch.compiler.is_compiling():
                with static_shapes():  # the router's static routing in eager mode too
                    routing = self.router(x)
            else:
                routing = self.router(x)
            if self.routing_share is not None:
                self.routing_share.routing = routing
            return routing
        share = self.routing_share
        if share is None or share.routing is None:
            raise RuntimeError(
                "this MoE layer reuses the per-image routing of an earlier MoE layer, which has not run "
                "in this forward; run the whole model, not this layer alone"
            )
        routing = share.routing
        if routing.num_groups != x.shape[0]:
            raise RuntimeError(f"shared routing is for {routing.num_groups} images, this layer got {x.shape[0]}")
        if routing.group_size != x.shape[1]:
            routing = _expand_image_routing(routing, x.shape[1])
        return routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Route the tokens of ``x`` to the experts; same shape out as in.

        ``x``: ``(..., D)`` float tokens, any leading dims as timm's ``Mlp`` takes (a routing group
        holds whole images, counted along the first dim); ``(B, D, H, W)`` with ``use_conv``.
        """
        bad_rank = x.ndim != 4 if self.use_conv else x.ndim < 1
        if bad_rank or not x.is_floating_point():
            shape = "(B, D, H, W)" if self.use_conv else "(..., D)"
            raise ConfigError(
                f"input x of shape {tuple(x.shape)} and dtype {x.dtype} is invalid for MoEMlp; it must be a floating-point "
                f"tensor {shape} with D={self.in_features}"
            )
        if self.use_conv:  # (B, D, H, W) -> (B, H, W, D): tokens are the H*W positions
            x = x.permute(0, 2, 3, 1)
        shape = x.shape
        D = shape[-1]
        B = shape[0] if x.ndim > 1 else 1
        T = x.numel() // (B * D) if x.numel() else 0
        M = self.ensemble_size
        if M > 1 and B % M:
            raise ConfigError(
                f"this E³ MoE layer (ensemble_size={M}) got a batch of {B} images, not a multiple of {M}: the model "
                "repeats its input before the first MoE layer; run the whole model, not this layer alone"
            )
        per_group = images_per_group(B // M, self.group_size)  # groups never straddle two ensemble members
        xg = x.reshape(B // per_group, per_group * T, D)

        routing = self._route(xg)
        if self.expert_parallel is None:
            y, info = dispatch_combine(xg, routing, self.experts, self.backend)
        else:
            y, info = self.expert_parallel.dispatch_combine(xg, routing, self.experts)
        # An exported program returns the model's outputs only: an attribute set during torch.export is not one of them.
        exporting = torch.compiler.is_exporting()
        self.aux_loss = routing.aux_loss if self.router is not None and not exporting else None
        self.last_metrics = routing.metrics
        self.last_dispatch = info
        self.last_tokens = xg.shape[0] * xg.shape[1] // M  # tokens of the images (an E³ copy set counts once)
        self.last_routing = routing if self.keep_routing else None
        if self._recorder is not None:
            self._recorder.update(routing, images_per_group=per_group, tokens_per_image=T, copies=M)

        y = y.reshape(*shape[:-1], -1)
        if self.shared_expert is not None:
            y = y + self.shared_expert(x)
        if self.use_conv:
            y = y.permute(0, 3, 1, 2)
        return y

    def shared_output(self, x: torch.Tensor) -> torch.Tensor:
        """The shared expert's output alone for the layer's input ``x`` (what the layer outputs with its routed
        experts bypassed); :class:`~vmoe_lib.errors.ConfigError` if the layer has no shared expert."""
        if self.shared_expert is None:
            raise ConfigError("shared_output: this MoE layer has no shared expert (shared_expert=False)")
        if self.use_conv:
            return self.shared_expert(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.shared_expert(x)

    def extra_repr(self) -> str:
        parts = [f"layer={self.layer_index}"] if self.layer_index is not None else []
        parts += [f"router={self.router_name!r}", f"num_experts={self.num_experts}"]
        for key in ("k", "capacity_factor", "eval_capacity_factor"):
            value = getattr(self.router, key, None) if self.router is not None else None
            if value is not None:
                parts.append(f"{key}={value}")
        if self.router is None:
            parts.append(f"routing=shared from {self.routing_share.leader_name or 'the first MoE layer'}")
        if self.ensemble_size > 1:
            parts.append(f"ensemble_size={self.ensemble_size}")
        parts += [f"group_size={self.group_size}", f"backend={self.backend!r}"]
        if self.expert_parallel is not None:
            parts.append(f"expert_parallel={self.expert_parallel!r}")
        return ", ".join(parts)


def _as_linear_state(layer: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of an ``nn.Linear`` from an ``nn.Linear`` or a 1x1 ``nn.Conv2d``."""
    state = {"weight": layer.weight.reshape(layer.weight.shape[0], -1)}
    if layer.bias is not None:
        state["bias"] = layer.bias
    return state
