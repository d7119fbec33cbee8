"""Bad input gets the library's error, early, naming the parameter, the bad value and what is allowed.

One test per kind of input that used to be accepted silently or to fail with an unrelated message
(configs, routers and layers, models, forward inputs), plus the backward pass of every router x
dispatch backend under bf16 autocast, on CPU here and on CUDA where a GPU is present. Data roots,
papermill parameters and the CLI have their tests beside their code (``test_data.py``,
``test_sweep.py``).
"""

from __future__ import annotations

import itertools
import math

import pytest
import timm
import torch

from vmoe_lib.errors import ConfigError
from vmoe_lib.layers.dispatch import BACKENDS
from vmoe_lib.layers.moe import MoEMlp
from vmoe_lib.routers import create_router, list_routers
from vmoe_lib.train import TrainConfig

INF, NAN = math.inf, math.nan


# ----------------------------------------------------------------------------- TrainConfig
@pytest.mark.parametrize("field, value, allowed", [
    ("lr", INF, "finite number > 0"),
    ("lr", NAN, "finite number > 0"),
    ("lr", -INF, "finite number > 0"),
    ("warmup_epochs", INF, "finite number >= 0"),
    ("warmup_epochs", NAN, "finite number >= 0"),
    ("weight_decay", NAN, "finite number >= 0"),
    ("grad_clip", INF, "finite number > 0"),
    ("label_smoothing", NAN, "0.0 <= label_smoothing <= 0.99"),
    ("min_lr_ratio", NAN, "0.0 <= min_lr_ratio <= 1.0"),
    ("augment", "no", "True or False"),
    ("augment", 0, "True or False"),
    ("flip", "yes", "True or False"),
    ("amp", None, "True or False"),
])
def test_train_config_rejects_non_finite_floats_and_non_bool_flags(field, value, allowed):
    with pytest.raises(ConfigError) as err:
        TrainConfig(**{field: value})
    message = str(err.value)
    assert f"{field}={value!r}" in message and allowed in message


@pytest.mark.parametrize("dataset, padding, size", [("fashion_mnist", 28, 28), ("fashion_mnist", 100, 28), ("cifar10", 32, 32)])
def test_crop_padding_larger_than_the_image_is_rejected(dataset, padding, size):
    model = "vit_pico_patch7_28" if size == 28 else "vit_nano_patch4_32"  # a model that takes the dataset's images
    with pytest.raises(ConfigError) as err:
        TrainConfig(model=model, dataset=dataset, crop_padding=padding)
    assert f"crop_padding={padding}" in str(err.value) and f"{size}x{size} images" in str(err.value)
    assert f"from 0 to {size - 1}" in str(err.value)
    TrainConfig(model=model, dataset=dataset, crop_padding=4)  # a few pixels is fine


@pytest.mark.parametrize("model, kwargs, bad", [
    ("vmoe_vit_pico_patch7_28", {"num_expert": 4}, "num_expert"),  # a typo of num_experts
    ("vit_pico_patch7_28", {"num_experts": 4}, "num_experts"),  # a dense model has no experts
    ("vmoe_vit_pico_patch7_28", {"router": "top_k"}, "router='top_k'"),
    ("vmoe_vit_pico_patch7_28", {"moe_layers": [1, 1]}, "moe_layers=[1, 1]"),
])
def test_model_kwargs_the_model_does_not_accept_fail_when_the_config_is_made(model, kwargs, bad):
    with pytest.raises(ConfigError) as err:
        TrainConfig(model=model, model_kwargs=kwargs)
    message = str(err.value)
    assert f"model_kwargs={kwargs!r}" in message and f"model={model!r}" in message and bad in message
    with pytest.raises(ConfigError):  # replace() validates too
        TrainConfig(model=model).replace(model_kwargs=kwargs)


# ----------------------------------------------------------------------------- routers and layers
@pytest.mark.parametrize("param", ["capacity_factor", "eval_capacity_factor"])
@pytest.mark.parametrize("value", [INF, NAN])
def test_infinite_or_nan_capacity_factor_is_rejected(param, value):
    with pytest.raises(ConfigError, match=rf"{param}={value!r} is invalid; it must be a finite number > 0"):
        MoEMlp(16, 32, num_experts=4, **{param: value})
    with pytest.raises(ConfigError, match=rf"{param}={value!r} is invalid"):
        create_router("softmax_token_choice", dim=16, num_experts=4, **{param: value})


@pytest.mark.parametrize("options", [[("noise_std", 1.0)], "noise_std=1", 1.0])
def test_router_options_must_be_a_dict(options):
    with pytest.raises(ConfigError, match=r"router_options=.* is invalid; it must be a dict of router options"):
        MoEMlp(16, 32, num_experts=4, router_options=options)
    with pytest.raises(ConfigError, match=r"router_options=.* is invalid; it must be a dict"):
        timm.create_model("vmoe_vit_test_patch7_28", num_experts=4, router_options=options)


@pytest.mark.parametrize("name", ["vmoe_vit_pico_patch7_28", "vmoe_convnext_test_32"])
def test_a_vmoe_model_with_no_moe_layer_is_rejected(name):
    with pytest.raises(ConfigError, match=r"moe_layers=\[\] places no MoE layer; a vmoe_\* model needs at least one"):
        timm.create_model(name, num_experts=4, moe_layers=[])


def test_duplicate_moe_layer_indices_are_rejected():
    with pytest.raises(ConfigError, match=r"moe_layers=\[1, 1\] repeats layer\(s\) \[1\]; each index may appear once"):
        timm.create_model("vmoe_vit_pico_patch7_28", num_experts=4, moe_layers=[1, 1])
    with pytest.raises(ConfigError, match=r"repeats layer\(s\) \[3\]"):
        timm.create_model("vmoe_vit_pico_patch7_28", num_experts=4, moe_layers=[3, 1, 3])
    model = timm.create_model("vmoe_vit_pico_patch7_28", num_experts=4, moe_layers=[3, 1])  # order does not matter
    assert model.moe_config["moe_layers_resolved"] == [1, 3]


@pytest.mark.parametrize("use_conv, x, what", [
    (False, torch.tensor(1.0), "shape ()"),
    (False, torch.ones(2, 3, 16, dtype=torch.long), "dtype torch.int64"),
    (False, torch.ones(2, 3, 16, dtype=torch.uint8), "dtype torch.uint8"),
    (True, torch.randn(2, 16, 3), "shape (2, 16, 3)"),
    (True, torch.randn(2, 16, 3, 3, 1), "shape (2, 16, 3, 3, 1)"),
])
def test_forward_rejects_the_wrong_rank_or_an_integer_dtype(use_conv, x, what):
    layer = MoEMlp(16, 32, num_experts=4, use_conv=use_conv)
    with pytest.raises(ConfigError) as err:
        layer(x)
    message = str(err.value)
    assert what in message and "floating-point tensor" in message and "D=16" in message


# ----------------------------------------------------------------------------- bf16 autocast, every router x backend
def _layer_kwargs(router: str) -> dict:
    kwargs: dict = {"num_experts": 4, "router": router}
    if router.endswith("token_choice"):
        kwargs["k"] = 2
    elif router == "per_image":
        kwargs["k"] = 1
    return kwargs


def _autocast_backward(router: str, backend: str, device: str) -> None:
    torch.manual_seed(0)
    layer = MoEMlp(16, 32, backend=backend, **_layer_kwargs(router)).to(device)
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = layer(x)
        loss = y.float().square().mean()
        if layer.aux_loss is not None:
            loss = loss + layer.aux_loss
    loss.backward()
    assert y.shape == x.shape and torch.isfinite(y.float()).all()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    grads = [p.grad for p in layer.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(g is None or (g.dtype == torch.float32 and torch.isfinite(g).all()) for g in grads)


ROUTER_BACKENDS = list(itertools.product(list_routers(), BACKENDS))


@pytest.mark.parametrize("router, backend", ROUTER_BACKENDS)
def test_backward_under_cpu_bf16_autocast_works_for_every_router_and_backend(router, backend):
    _autocast_backward(router, backend, "cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run with pytest -m cuda where one is)")
@pytest.mark.parametrize("router, backend", ROUTER_BACKENDS)
def test_backward_under_cuda_bf16_autocast_works_for_every_router_and_backend(router, backend):
    _autocast_backward(router, backend, "cuda")
