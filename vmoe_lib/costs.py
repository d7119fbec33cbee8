"""What a model costs: parameters (total and activated per image) and FLOPs per image.

FLOPs are counted by :class:`torch.utils.flop_counter.FlopCounterMode` on an
eval-mode forward, i.e. the matrix multiplications and convolutions the model
really executes (2 FLOPs per multiply-accumulate), divided by the batch size.
For an MoE model that is the compute of the token-expert pairs actually
processed, which is what "activated FLOPs" means in the papers.

Activated parameters of MoE layers are reported by the layers themselves
(a module method ``activated_parameters()``, see :mod:`vmoe_lib.layers`); for a
dense model they equal the total.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

__all__ = ["count_parameters", "flops_per_image", "model_costs"]


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of fused attention, from the shapes FlopCounterMode passes (Q K^T and P V)."""
    return sdpa_flop_count(query, key, value)


# torch's counter has no formula for the CPU kernel behind F.scaled_dot_product_attention
# (timm's fused attention), so attention would be missed on CPU but counted on CUDA.
_EXTRA_FLOP_FORMULAS = {
    op: _sdpa_flops
    for name in ("_scaled_dot_product_flash_attention_for_cpu",)
    if (op := getattr(torch.ops.aten, name, None)) is not None
}


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total": ..., "activated": ...}`` parameter counts.

    A submodule that defines ``activated_parameters() -> int`` (MoE layers: the
    router, ``k`` of ``E`` experts, a shared expert) is counted by it; every
    other parameter is always active.
    """
    total = sum(p.numel() for p in model.parameters())
    activated = total
    for module in model.modules():
        fn = getattr(module, "activated_parameters", None)
        if callable(fn) and module is not model:
            own = sum(p.numel() for p in module.parameters())
            activated += int(fn()) - own
    return {"total": total, "activated": activated}


@torch.no_grad()
def flops_per_image(model: nn.Module, input_shape: tuple[int, ...], *, batch_size: int = 8) -> float:
    """Forward FLOPs per image of ``model`` in eval mode on random inputs of shape ``(C, H, W)``.

    ``input_shape`` may include a leading batch dimension, which is ignored.
    A batch of ``batch_size`` images is used so that routing groups of several
    images behave as in training.
    """
    shape = tuple(input_shape[-3:])
    param = next(model.parameters())
    gen = torch.Generator(device=param.device).manual_seed(0)  # leave the global RNG untouched
    x = torch.randn(batch_size, *shape, device=param.device, dtype=param.dtype, generator=gen)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOP_FORMULAS)
    with counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops() / batch_size


def model_costs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
    """Parameter counts and forward FLOPs per image, as stored in every run's record."""
    params = count_parameters(model)
    return {
        "params_total": params["total"],
        "params_activated": params["activated"],
        "flops_per_image": flops_per_image(model, input_shape),
    }
