"""MoEMlp: timm drop-in behaviour, routing groups, every router through every backend,
shared expert, auxiliary losses, statistics and bad settings."""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn

from vmoe_lib.errors import ConfigError
from vmoe_lib.layers import (
    MoEMlp,
    RoutingRecorder,
    collect_aux_loss,
    collect_routing_stats,
    images_per_group,
)
from vmoe_lib.routers import list_routers

ROUTERS = list_routers()
ONE_IMAGE = ("soft", "per_image")


def _layer(router, backend="einsum", **kw):
    options = {"group_size": 1 if router in ONE_IMAGE else 2, **kw}
    if router == "soft":
        options.setdefault("router_options", {"slots_per_expert": 2})
    return MoEMlp(8, 16, num_experts=4, router=router, backend=backend, expert_init="independent", **options)


@pytest.mark.parametrize("router", ROUTERS)
def test_backends_agree_for_every_router(router):
    """Forward outputs and gradients (input, router and expert parameters) match the einsum reference."""
    torch.manual_seed(0)
    reference = _layer(router).train()
    x = torch.randn(4, 7, 8)
    probe = torch.randn(4, 7, 8)

    def run(layer):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # same router noise for every backend
        y = layer(xi)
        loss = (y * probe).sum() + (layer.aux_loss if layer.aux_loss is not None else 0)
        loss.backward()
        grads = {n: p.grad for n, p in layer.named_parameters() if p.grad is not None}
        return y, xi.grad, grads

    copies = {backend: copy.deepcopy(reference) for backend in ("sort", "segment", "grouped_mm", "auto")}
    y0, gx0, g0 = run(reference)
    assert g0, "no parameter received a gradient"
    for backend, layer in copies.items():
        layer.backend = backend
        y, gx, grads = run(layer)
        torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-4, msg=f"{router}/{backend} forward")
        torch.testing.assert_close(gx, gx0, atol=1e-5, rtol=1e-4, msg=f"{router}/{backend} input grad")
        assert grads.keys() == g0.keys()
        for name in g0:
            torch.testing.assert_close(grads[name], g0[name], atol=1e-5, rtol=1e-4, msg=f"{router}/{backend} {name}")


@pytest.mark.parametrize("router", ROUTERS)
def test_aux_loss_and_metrics_kept_after_forward(router):
    layer = _layer(router, backend="auto").train()
    assert layer.aux_loss is None
    x = torch.randn(4, 5, 8)
    y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert isinstance(layer.aux_loss, torch.Tensor) and torch.isfinite(layer.aux_loss)
    model = nn.Sequential(layer)
    assert collect_aux_loss(model) is layer.aux_loss
    stats = collect_routing_stats(model)["0"]
    assert stats["router"] == router and "expert_load" in stats and stats["pairs_processed"] > 0


def test_timm_drop_in_any_leading_dims_and_nchw():
    from timm.models.vision_transformer import VisionTransformer

    mlp_layer = functools.partial(MoEMlp, num_experts=4, k=1, group_size=2)
    vit = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2, mlp_layer=mlp_layer)
    assert vit(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert collect_aux_loss(vit) is not None

    layer = MoEMlp(8, 16, num_experts=4, k=1)
    for shape in [(5, 8), (2, 3, 8), (2, 3, 4, 8), (8,)]:
        assert layer(torch.randn(*shape)).shape == shape
    conv = MoEMlp(8, 16, num_experts=4, k=1, use_conv=True)
    x = torch.randn(2, 8, 3, 3)
    y = conv(x)
    assert y.shape == x.shape
    assert conv.last_tokens == 18  # tokens are the H*W positions of each image
    # NCHW through use_conv equals NHWC through the same weights
    conv.eval()
    flat = copy.deepcopy(conv)
    flat.use_conv = False
    torch.testing.assert_close(conv(x), flat(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


def test_routing_groups_count_images():
    # largest divisor of the batch <= group_size
    table = {(16, 8): 8, (12, 8): 6, (7, 8): 7, (14, 8): 7, (13, 8): 1, (3, 1): 1, (2, 8): 2}
    for (batch, group), expected in table.items():
        assert images_per_group(batch, group) == expected
    layer = MoEMlp(8, 16, num_experts=4, k=1, group_size=4, backend="sort")
    layer.keep_routing = True
    layer(torch.randn(6, 5, 8))  # 6 images of 5 tokens, group of 3 images (3 divides 6)
    assert (layer.last_routing.num_groups, layer.last_routing.group_size) == (2, 15)
    soft = MoEMlp(8, 16, num_experts=4, router="soft")
    assert soft.group_size == 1


def test_shared_expert_is_added_and_gated():
    torch.manual_seed(0)
    layer = MoEMlp(8, 16, num_experts=4, k=1, shared_expert=24, shared_expert_gate=True).eval()
    assert layer.shared_expert.mlp.fc1.out_features == 24
    x = torch.randn(2, 5, 8)
    routed = copy.deepcopy(layer)
    routed.shared_expert = None
    shared = layer.shared_expert.mlp(x) * torch.sigmoid(layer.shared_expert.gate(x))
    torch.testing.assert_close(layer(x), routed(x) + shared)
    assert MoEMlp(8, 16, num_experts=2, shared_expert=True).shared_expert.mlp.fc1.out_features == 16


def test_expert_dropout_only_in_training():
    layer = MoEMlp(8, 16, num_experts=4, k=1, expert_dropout=0.5, router_options={"noise_std": 0.0})
    assert layer.experts.drop1.p == 0.5 and layer.experts.drop2.p == 0.5
    x = torch.randn(2, 5, 8)
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("router", ["softmax_token_choice", "soft"])
def test_routing_recorder(router):
    layer = _layer(router, backend="auto").eval()
    model = nn.Sequential(layer)
    labels = torch.tensor([0, 1, 1, 2])
    with RoutingRecorder(model, num_classes=3) as rec:
        for _ in range(2):
            rec.labels = labels
            model(torch.randn(4, 5, 8))
    assert layer._recorder is None  # detached after the block: no cost when off
    table = rec.summary()["0"]
    assert table["tokens"] == 2 * 4 * 5
    assert abs(sum(table["expert_load"]) - 1) < 1e-6
    assert abs(sum(table["experts_per_token_hist"]) - 1) < 1e-6
    assert 0 <= table["dropped_fraction"] <= 1
    assert len(table["class_expert"]) == 3 and all(abs(sum(row) - 1) < 1e-6 for row in table["class_expert"])
    if router == "soft":
        assert table["dropped_fraction"] == 0 and table["mean_experts_per_token"] == 4


def test_recorder_counts_golden():
    """Token choice with k=1 and a huge capacity: every token has exactly one expert."""
    layer = MoEMlp(8, 16, num_experts=4, k=1, eval_capacity_factor=8.0, group_size=2).eval()
    model = nn.Sequential(layer)
    with RoutingRecorder(model, num_classes=2) as rec:
        rec.labels = torch.tensor([0, 1])
        model(torch.randn(2, 3, 8))
    table = rec.summary()["0"]
    assert table["experts_per_token_hist"] == [0.0, 1.0, 0.0, 0.0, 0.0]
    assert table["dropped_fraction"] == 0.0 and table["mean_experts_per_token"] == 1.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_experts=0), "num_experts=0"),
        (dict(backend="fast"), "backend='fast'"),
        (dict(group_size=0), "group_size=0"),
        (dict(router="nope"), "nope"),
        (dict(router="soft", group_size=8), "group_size=8"),
        (dict(expert_dropout=1.5), "expert_dropout=1.5"),
        (dict(expert_init="copy"), "expert_init='copy'"),
        (dict(shared_expert=-4), "shared_expert=-4"),
        (dict(num_expert=8), "num_expert"),
        (dict(k=1, router_options={"k": 2}), "conflicts"),
        (dict(router_options={"slots": 2}), "slots"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        MoEMlp(8, 16, **kwargs)


def test_timm_noop_kwargs_accepted():
    MoEMlp(8, 16, num_experts=2, gate_layer=None)
