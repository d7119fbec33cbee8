"""A bank of ``E`` two-layer MLP experts stored as batched weights.

Axis letters as in ``vmoe_lib.routers.base``: ``E`` experts, ``C`` rows per
expert (capacity slots or tokens), ``N`` (token, expert) pairs, ``D`` input
width, ``H`` hidden width, ``O`` output width.

Each expert is timm's ``Mlp`` (fc1 -> act -> drop -> norm -> fc2 -> drop), but
the ``E`` experts' weights live in four tensors (``fc1_weight (E, D, H)``,
``fc1_bias (E, H)``, ``fc2_weight (E, H, O)``, ``fc2_bias (E, O)``) so that all
experts run in one batched matmul (:meth:`ExpertBank.forward`) or one grouped
matmul over jagged per-expert rows (:meth:`ExpertBank.forward_grouped`), never
in a Python loop over modules.

Initialisation (``init``):

* ``"independent"``: every expert drawn independently.
* ``"same"``: one draw copied into every expert, as V-MoE does (its experts are
  created by ``vmap`` without splitting the parameter RNG: ``split_rngs=False``
  in google-research/vmoe ``vmoe/nn/vit_moe.py``).
* upcycling from a dense MLP is :meth:`ExpertBank.load_dense_mlp`.

The draw follows timm: with ``init_std=None`` it is ``nn.Linear``'s default
(what a stand-alone ``timm.layers.Mlp`` gets); with ``init_std=0.02`` it is the
truncated normal / zero bias that timm's ViT and ConvNeXt apply to every linear
layer of the model (what the backbones use).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import get_act_layer, to_2tuple, trunc_normal_

from ..errors import ConfigError, check_choice, check_positive

__all__ = ["ExpertBank", "EXPERT_INITS", "grouped_mm_supported"]

EXPERT_INITS = ("same", "independent")


def _grouped_mm_fn() -> Callable | None:
    fn = getattr(F, "grouped_mm", None)
    return fn if fn is not None else getattr(torch, "_grouped_mm", None)


_GROUPED_MM_PROBES: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, *widths: int) -> bool:
    """Whether ``grouped_mm`` runs forward and backward here for rows of these widths.

    The kernels need 16-byte aligned row strides (so ``width * itemsize % 16 == 0``)
    and, depending on the torch build, a given device and dtype; the latter is
    probed once per (device type, dtype) on a tiny problem.
    """
    fn = _grouped_mm_fn()
    if fn is None:
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(w * itemsize % 16 for w in widths):
        return False
    key = (torch.device(device).type, dtype)
    if key not in _GROUPED_MM_PROBES:
        try:
            a = torch.randn(6, 16, device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(2, 16, 8, device=device, dtype=dtype, requires_grad=True)
            offs = torch.tensor([2, 6], device=device, dtype=torch.int32)
            fn(a, b, offs=offs).contiguous().backward(torch.ones(6, 8, device=device, dtype=dtype))
            _GROUPED_MM_PROBES[key] = True
        except (RuntimeError, NotImplementedError, TypeError):
            _GROUPED_MM_PROBES[key] = False
    return _GROUPED_MM_PROBES[key]


class _SegmentLinear(torch.autograd.Function):
    """``y[rows of expert e] = x[rows of expert e] @ weight[e] (+ bias[e])`` for contiguous row segments.

    One ``addmm`` per non-empty expert segment, written straight into the output,
    and the mirror image in backward: exactly the work of a dense ``nn.Linear`` on
    the same rows, no padding, no gathered bias. ``bounds`` are host ints
    ``[(start, end)] * E`` covering all rows of ``x``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, bounds):  # noqa: ANN001, ANN205 (autograd signature)
        out = x.new_empty(x.shape[0], weight.shape[2])
        for e, (start, end) in enumerate(bounds):
            if end > start:
                if bias is None:
                    torch.mm(x[start:end], weight[e], out=out[start:end])
                else:
                    torch.addmm(bias[e], x[start:end], weight[e], out=out[start:end])
        ctx.save_for_backward(x, weight)
        ctx.bounds, ctx.has_bias = bounds, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = x.new_empty(x.shape) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_b = weight.new_zeros(weight.shape[0], weight.shape[2]) if ctx.has_bias and ctx.needs_input_grad[2] else None
        for e, (start, end) in enumerate(ctx.bounds):
            if end == start:
                continue
            g = grad[start:end]
            if grad_x is not None:
                torch.mm(g, weight[e].t(), out=grad_x[start:end])
            if grad_w is not None:
                torch.mm(x[start:end].t(), g, out=grad_w[e])
            if grad_b is not None:
                torch.sum(g, 0, out=grad_b[e])
        return grad_x, grad_w, grad_b, None


def _activation_backward(act: nn.Module, h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``d act(h) / dh * grad``: GELU's kernel directly, any other activation by autograd."""
    if isinstance(act, nn.GELU):
        return torch.ops.aten.gelu_backward(grad, h, approximate=act.approximate)
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        return torch.autograd.grad(act(h), h, grad)[0]


class _SortedExpertsCombine(torch.autograd.Function):
    """The whole sparse MoE computation on pairs sorted by expert, in one autograd node:

    ``y[rows[i]] += weights[i] * (act(x[rows[i]] @ W1[e] + b1[e]) @ W2[e] + b2[e])`` for the
    pairs ``i`` of each expert ``e`` (rows ``bounds[e]`` of the sorted order).

    Forward and backward are written out (one ``addmm``/``mm`` per expert segment, the
    combine weights applied in place, per-segment scatter-adds), so the work is that of a
    dense MLP on ``N`` rows plus one gather and one scatter of ``N x D``; composing the same
    from autograd ops costs several extra passes over ``(N, D)`` and ``(N, H)`` tensors.
    Kept for backward: the gathered inputs, pre-activations, activations and outputs (what a
    dense MLP keeps, plus the ``(N, O)`` outputs for the combine-weight gradient), each freed
    as soon as backward is done with it.
    Used when the experts have no active dropout and no hidden norm.
    """

    @staticmethod
    def forward(ctx, x, weights, w1, b1, w2, b2, rows, bounds, act):  # noqa: ANN001, ANN205
        N = rows.numel()
        tokens = x.index_select(0, rows)  # (N, D), contiguous per expert
        h = x.new_empty(N, w1.shape[2])
        for e, (start, end) in enumerate(bounds):
            if end > start:
                _linear_into(h[start:end], tokens[start:end], w1[e], None if b1 is None else b1[e])
        a = act(h)
        out = x.new_empty(N, w2.shape[2])
        for e, (start, end) in enumerate(bounds):
            if end > start:
                _linear_into(out[start:end], a[start:end], w2[e], None if b2 is None else b2[e])
        # One weighted scatter-add for all pairs (rows are in expert order, as the loop went).
        y = x.new_zeros(x.shape[0], w2.shape[2]).index_add_(0, rows, out * weights[:, None])
        ctx.save_for_backward(weights, w1, w2, rows)
        # Intermediates live on ctx (not saved tensors) so backward can free each when done with it.
        ctx.tokens, ctx.h, ctx.a, ctx.out = tokens, h, a, out
        ctx.bounds, ctx.act, ctx.num_rows = bounds, act, x.shape[0]
        ctx.has_bias = (b1 is not None, b2 is not None)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):  # noqa: ANN001, ANN205
        weights, w1, w2, rows = ctx.saved_tensors
        tokens, h, a, out = ctx.tokens, ctx.h, ctx.a, ctx.out
        del ctx.tokens, ctx.h, ctx.a, ctx.out
        g = grad_y.contiguous().index_select(0, rows)  # (N, O): dL/dy at each pair's token
        grad_weights = torch.empty_like(weights)
        grad_w1, grad_w2 = torch.zeros_like(w1), torch.zeros_like(w2)
        grad_b1 = w1.new_zeros(w1.shape[0], w1.shape[2]) if ctx.has_bias[0] else None
        grad_b2 = w2.new_zeros(w2.shape[0], w2.shape[2]) if ctx.has_bias[1] else None
        grad_a = torch.empty_like(a)
        torch.sum(g * out, -1, out=grad_weights)  # dL/d(combine weight) of every pair at once
        g.mul_(weights[:, None])  # now dL/d(expert output)
        for e, (start, end) in enumerate(ctx.bounds):
            if end == start:
                continue
            g_e = g[start:end]
            torch.mm(a[start:end].t(), g_e, out=grad_w2[e])
            if grad_b2 is not None:
                torch.sum(g_e, 0, out=grad_b2[e])
            torch.mm(g_e, w2[e].t(), out=grad_a[start:end])
        del a, out, g  # free (N, H) and (N, O) before the activation's backward, as a dense MLP would
        grad_h = _activation_backward(ctx.act, h, grad_a)
        del grad_a, h
        grad_tokens = torch.empty_like(tokens)
        for e, (start, end) in enumerate(ctx.bounds):
            if end == start:
                continue
            torch.mm(tokens[start:end].t(), grad_h[start:end], out=grad_w1[e])
            if grad_b1 is not None:
                torch.sum(grad_h[start:end], 0, out=grad_b1[e])
            torch.mm(grad_h[start:end], w1[e].t(), out=grad_tokens[start:end])
        del grad_h
        # One scatter-add back to the token rows (empty segments leave no row to add).
        grad_x = tokens.new_zeros(ctx.num_rows, tokens.shape[1]).index_add_(0, rows, grad_tokens)
        return grad_x, grad_weights, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None


def _linear_into(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if bias is None:
        torch.mm(x, weight, out=out)
    else:
        torch.addmm(bias, x, weight, out=out)


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # grouped_mm's backward rejects expanded (stride-0) gradients, e.g. from ``.sum()``.
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


class ExpertBank(nn.Module):
    """``E`` timm-style MLPs with batched weights.

    Args:
        num_experts: ``E``.
        in_features, hidden_features, out_features: ``D``, ``H``, ``O`` (timm's names).
        act_layer: activation class (or timm name), applied elementwise.
        norm_layer: optional norm on the hidden features (timm's ``scale_mlp_norm``);
            one norm module is shared by all experts.
        bias: bias in fc1/fc2 (bool or a pair, as timm).
        drop: dropout after the activation and after fc2 (float or a pair, as timm).
            V-MoE's "expert dropout" is this dropout inside the experts.
        init: ``"same"`` or ``"independent"`` (see the module docstring).
        init_std: ``None`` for ``nn.Linear``'s default draw, or the std of timm's
            truncated-normal init (biases zero).
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: int,
        out_features: int,
        act_layer: type[nn.Module] | str = nn.GELU,
        norm_layer: type[nn.Module] | None = None,
        bias: bool | tuple[bool, bool] = True,
        drop: float | tuple[float, float] = 0.0,
        init: str = "same",
        init_std: float | None = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        check_positive("num_experts", num_experts)
        check_choice("expert_init", init, EXPERT_INITS)
        if init_std is not None:
            check_positive("init_std", init_std)
        dd = {"device": device, "dtype": dtype}
        E, D, H, O = num_experts, in_features, hidden_features, out_features
        self.num_experts, self.in_features, self.hidden_features, self.out_features = E, D, H, O
        bias1, bias2 = to_2tuple(bias)
        drop1, drop2 = to_2tuple(drop)
        self.fc1_weight = nn.Parameter(torch.empty(E, D, H, **dd))
        self.fc1_bias = nn.Parameter(torch.empty(E, H, **dd)) if bias1 else None
        self.fc2_weight = nn.Parameter(torch.empty(E, H, O, **dd))
        self.fc2_bias = nn.Parameter(torch.empty(E, O, **dd)) if bias2 else None
        act_layer = get_act_layer(act_layer) if isinstance(act_layer, str) else act_layer
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop1)
        self.norm = norm_layer(H, **dd) if norm_layer is not None else nn.Identity()
        self.drop2 = nn.Dropout(drop2)
        self.init, self.init_std = init, init_std
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def _draw(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Fill one expert's ``(fan_in, fan_out)`` weight and bias like timm would."""
        fan_in = weight.shape[0]
        if self.init_std is None:  # nn.Linear.reset_parameters
            bound = 1.0 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)
        else:  # timm ViT / ConvNeXt _init_weights
            trunc_normal_(weight, std=self.init_std)
            if bias is not None:
                nn.init.zeros_(bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Re-draw all experts (``init="same"``: one draw copied into all of them)."""
        layers = [(self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)]
        for weight, bias in layers:
            experts = 1 if self.init == "same" else self.num_experts
            for e in range(experts):
                self._draw(weight[e], None if bias is None else bias[e])
            if self.init == "same":
                weight.copy_(weight[:1].expand_as(weight))
                if bias is not None:
                    bias.copy_(bias[:1].expand_as(bias))
        if hasattr(self.norm, "reset_parameters"):
            self.norm.reset_parameters()

    @torch.no_grad()
    def load_dense_mlp(self, mlp: nn.Module) -> None:
        """Copy a dense timm ``Mlp`` (``nn.Linear`` or 1x1 ``nn.Conv2d``) into every expert.

        Sparse upcycling (Komatsuzaki et al., arXiv:2212.05055): the MoE starts as
        ``E`` copies of the trained dense MLP.
        """
        for name, weight, bias in (("fc1", self.fc1_weight, self.fc1_bias), ("fc2", self.fc2_weight, self.fc2_bias)):
            layer = getattr(mlp, name)
            dense_w = layer.weight.reshape(layer.weight.shape[0], -1).t()  # (in, out)
            if dense_w.shape != weight.shape[1:]:
                raise ConfigError(
                    f"dense {name} weight has shape {tuple(dense_w.shape)} (in, out); "
                    f"the experts need {tuple(weight.shape[1:])}"
                )
            weight.copy_(dense_w.unsqueeze(0).expand_as(weight))
            if (bias is None) != (layer.bias is None):
                raise ConfigError(f"dense {name} bias={layer.bias is not None} but experts bias={bias is not None}")
            if bias is not None:
                bias.copy_(layer.bias.unsqueeze(0).expand_as(bias))
        dense_norm = getattr(mlp, "norm", None)
        if dense_norm is not None and not isinstance(self.norm, nn.Identity):
            self.norm.load_state_dict(dense_norm.state_dict())

    # --------------------------------------------------------------- forward
    def _hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.drop1(self.act(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on its own rows: ``x (E, C, D) -> (E, C, O)`` by batched matmul."""
        if self.fc1_bias is None:
            h = torch.bmm(x, self.fc1_weight)
        else:
            h = torch.baddbmm(self.fc1_bias.unsqueeze(1), x, self.fc1_weight)
        h = self._hidden(h)
        if self.fc2_bias is None:
            y = torch.bmm(h, self.fc2_weight)
        else:
            y = torch.baddbmm(self.fc2_bias.unsqueeze(1), h, self.fc2_weight)
        return self.drop2(y)

    def forward_grouped(self, x: torch.Tensor, expert_of_row: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Jagged rows sorted by expert: ``x (N, D) -> (N, O)`` by one grouped matmul per layer.

        ``expert_of_row (N,)`` is each row's expert (non-decreasing) and
        ``offsets (E,)`` the int32 end of each expert's rows (``cumsum`` of counts).
        """
        grouped_mm = _grouped_mm_fn()
        h = _contiguous_grad(grouped_mm(x, self.fc1_weight, offs=offsets))
        if self.fc1_bias is not None:  # grouped_mm has no bias argument on every build
            h = h + self.fc1_bias.index_select(0, expert_of_row)
        h = self._hidden(h)
        y = _contiguous_grad(grouped_mm(h, self.fc2_weight, offs=offsets))
        if self.fc2_bias is not None:
            y = y + self.fc2_bias.index_select(0, expert_of_row)
        return self.drop2(y)

    def forward_segments(self, x: torch.Tensor, bounds: list[tuple[int, int]]) -> torch.Tensor:
        """Rows sorted by expert: ``x (N, D) -> (N, O)``, expert ``e`` on rows ``bounds[e]``.

        One matmul per expert segment (host loop over ``E``), no padding: on a CPU
        this costs what a dense MLP costs on ``N`` rows.
        """
        h = _SegmentLinear.apply(x, self.fc1_weight, self.fc1_bias, bounds)
        return self.drop2(_SegmentLinear.apply(self._hidden(h), self.fc2_weight, self.fc2_bias, bounds))

    def forward_sorted_combine(
        self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, bounds: list[tuple[int, int]]
    ) -> torch.Tensor:
        """``y (T, O)`` with ``y[rows[i]] += weights[i] * expert_e(x[rows[i]])`` for pairs sorted by
        expert (expert ``e`` owns positions ``bounds[e]``); ``x (T, D)`` are all tokens.

        One fused autograd node (:class:`_SortedExpertsCombine`) when the experts are plain
        (no active dropout, no hidden norm); otherwise the same from autograd ops.
        """
        dropout_active = self.training and (self.drop1.p > 0 or self.drop2.p > 0)
        if not dropout_active and isinstance(self.norm, nn.Identity):
            return _SortedExpertsCombine.apply(
                x, weights, self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias, rows, bounds, self.act
            )
        out = self.forward_segments(x.index_select(0, rows), bounds)
        return x.new_zeros(x.shape[0], out.shape[-1]).index_add(0, rows, out * weights.unsqueeze(1))

    def forward_expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` alone on ``x (..., D)``: the plain per-expert definition, for tests."""
        h = x @ self.fc1_weight[e]
        if self.fc1_bias is not None:
            h = h + self.fc1_bias[e]
        y = self._hidden(h) @ self.fc2_weight[e]
        if self.fc2_bias is not None:
            y = y + self.fc2_bias[e]
        return self.drop2(y)

    def params_per_expert(self) -> int:
        """Parameters of one expert (the shared hidden norm is not counted)."""
        return sum(p[0].numel() for p in (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias) if p is not None)

    def flops_per_row(self) -> int:
        """Matmul FLOPs for one row through one expert (2 per multiply-add; biases not counted)."""
        return 2 * self.in_features * self.hidden_features + 2 * self.hidden_features * self.out_features

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in_features={self.in_features}, "
            f"hidden_features={self.hidden_features}, out_features={self.out_features}, init={self.init!r}"
        )
