"""MoE backbones built from timm: registry-wide forward/backward, placement, per-image routing
shared across layers, upcycling, safetensors, parameter and FLOP counts, routing settings."""

from __future__ import annotations

import timm
import torch
import pytest

import vmoe_lib  # noqa: F401  (registers the models)
from vmoe_lib.errors import ConfigError
from vmoe_lib.layers import MoEMlp, collect_aux_loss, collect_routing_stats
from vmoe_lib.models import (
    count_parameters,
    flops_matched_dense,
    flops_per_image,
    load_moe_model,
    save_moe_model,
    set_routing,
    upcycle_from_dense,
)
from vmoe_lib.models.moe_utils import _blocks_of

# Expected default placement ("last-2" = the last two odd blocks; "last-1" for 2-block models).
EXPECTED_LAYERS = {
    "vmoe_vit_test_patch7_28": [1],
    "vmoe_vit_pico_patch7_28": [1, 3],
    "vmoe_vit_nano_patch7_28": [3, 5],
    "vmoe_vit_micro_patch7_28": [5, 7],
    "vmoe_vit_nano_patch4_32": [3, 5],
    "vmoe_vit_tiny_patch4_32": [5, 7],
    "vmoe_vit_tiny_patch16_224": [9, 11],
    "vmoe_vit_small_patch16_224": [9, 11],
    "vmoe_vit_base_patch16_224": [9, 11],
    "vmoe_convnext_test_32": [1, 3],  # depths (1, 1, 1, 1)
    "vmoe_convnext_zepto_32": [7, 9],  # (2, 2, 4, 2)
    "vmoe_convnext_atto_32": [9, 11],  # (2, 2, 6, 2)
    "vmoe_convnext_atto": [9, 11],
    "vmoe_convnext_femto": [9, 11],
    "vmoe_convnext_pico": [9, 11],
    "vmoe_convnext_nano": [11, 13],  # (2, 2, 8, 2)
    "vmoe_convnext_tiny": [15, 17],  # (3, 3, 9, 3)
}


def _input(name, batch=2):
    """A tiny input: 224-size models are run at 32x32 (ViTs rebuilt with img_size=32) to keep CI fast."""
    if name.endswith("_224") or name in ("vmoe_convnext_atto", "vmoe_convnext_femto", "vmoe_convnext_pico", "vmoe_convnext_nano", "vmoe_convnext_tiny"):
        return torch.randn(batch, 3, 32, 32), ({"img_size": 32} if "vit" in name else {})
    size = 28 if name.endswith("_28") else 32
    return torch.randn(batch, 1, size, size), {}


def test_registry_lists_every_moe_model():
    assert sorted(timm.list_models("vmoe_*")) == sorted(EXPECTED_LAYERS)
    assert set(EXPECTED_LAYERS) <= set(vmoe_lib.list_models())


# Larger 224 sizes: built on the meta device (structure and placement checked, no weights
# allocated) and not run: each has 10-115M parameters whose init and first oneDNN forward cost
# seconds of CPU per model. Their layers are the same classes as the sizes that do run
# (vit_tiny_patch16_224 and convnext_atto run forward/backward at 32x32 below).
META_ONLY = {
    "vmoe_vit_small_patch16_224",
    "vmoe_vit_base_patch16_224",
    "vmoe_convnext_femto",
    "vmoe_convnext_pico",
    "vmoe_convnext_nano",
    "vmoe_convnext_tiny",
}


def _check_structure(model, name):
    assert model.moe_config["moe_layers_resolved"] == EXPECTED_LAYERS[name]
    assert str(EXPECTED_LAYERS[name]) in repr(model).splitlines()[1]
    moe_indices = [i for i, block in enumerate(_blocks_of(model)) if isinstance(block.mlp, MoEMlp)]
    assert moe_indices == EXPECTED_LAYERS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_LAYERS))
def test_every_moe_model_forward_backward(name):
    torch.manual_seed(0)
    x, extra = _input(name)
    if name in META_ONLY:
        _check_structure(timm.create_model(name, num_experts=2, k=1, device="meta", **extra), name)
        return
    model = timm.create_model(name, num_experts=2, k=1, **extra)
    _check_structure(model, name)
    model.train()
    out = model(x)
    assert torch.isfinite(out).all()
    aux = collect_aux_loss(model)
    assert aux is not None and torch.isfinite(aux)
    (out.float().pow(2).mean() + aux).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is None or torch.isfinite(g).all() for g in grads)
    assert all(layer.experts.fc1_weight.grad is not None for layer in model.modules() if isinstance(layer, MoEMlp))


@pytest.mark.parametrize("router", ["softmax_token_choice", "sinkhorn_token_choice", "softmax_expert_choice", "sinkhorn_expert_choice", "sparse_expert_choice", "soft", "per_image"])
def test_vit_with_every_router(router):
    torch.manual_seed(0)
    model = timm.create_model("vmoe_vit_test_patch7_28", num_experts=4, router=router, moe_layers="all")
    out = model(torch.randn(4, 1, 28, 28))
    loss = out.pow(2).mean() + collect_aux_loss(model)
    loss.backward()
    assert torch.isfinite(loss)
    stats = collect_routing_stats(model)
    assert list(stats) == ["blocks.0.mlp", "blocks.1.mlp"] and stats["blocks.1.mlp"]["layer"] == 1


def test_create_model_kwargs_pass_through_and_errors():
    model = timm.create_model(
        "vmoe_vit_pico_patch7_28", num_experts=8, moe_layers="every-2", router="softmax_token_choice",
        k=1, capacity_factor=1.5, eval_capacity_factor=2.0, group_size=4, num_classes=7, shared_expert=True,
        router_options={"batch_priority": True}, expert_dropout=0.2,
    )
    layer = model.blocks[1].mlp
    assert model.head.out_features == 7
    assert (layer.router.k, layer.router.capacity_factor, layer.router.eval_capacity_factor, layer.router.batch_priority) == (1, 1.5, 2.0, True)
    assert layer.group_size == 4 and layer.shared_expert is not None and layer.experts.drop1.p == 0.2
    assert model.moe_config["k"] == 1
    with pytest.raises(ConfigError, match="last-9"):
        timm.create_model("vmoe_vit_pico_patch7_28", moe_layers="last-9")
    with pytest.raises(ConfigError, match="expert_init='copy'"):
        timm.create_model("vmoe_vit_pico_patch7_28", expert_init="copy")
    with pytest.raises(ConfigError, match="router_options"):
        timm.create_model("vmoe_vit_pico_patch7_28", router_options="k=2")


def test_convnext_per_stage_placement_and_conv_mlp():
    model = timm.create_model("vmoe_convnext_zepto_32", num_experts=2, moe_layers={3: "all"})
    assert model.moe_config["moe_layers_resolved"] == [8, 9]
    assert "3.0, 3.1" in model.moe_config["moe_layers_description"]
    conv = timm.create_model("vmoe_convnext_test_32", num_experts=2, conv_mlp=True, moe_layers="all")
    assert conv.stages[0].blocks[0].mlp.use_conv
    conv(torch.randn(2, 1, 32, 32)).sum().backward()


def _router_calls(model):
    calls = []
    for module in model.modules():
        if isinstance(module, MoEMlp) and module.router is not None:
            module.router.register_forward_hook(lambda *a: calls.append(1))
    return calls


def test_per_image_routing_is_decided_once_and_shared():
    """Mobile V-MoE: the first MoE layer decides per image; later MoE layers reuse the decision."""
    torch.manual_seed(0)
    model = timm.create_model("vmoe_vit_pico_patch7_28", num_experts=4, k=1, router="per_image", moe_layers="every-2")
    first, second = model.blocks[1].mlp, model.blocks[3].mlp
    assert first.router is not None and second.router is None
    assert "shared from blocks.1.mlp" in repr(second)
    calls = _router_calls(model)
    for layer in (first, second):
        layer.keep_routing = True
    model(torch.randn(3, 1, 28, 28)).sum().backward()
    assert len(calls) == 1
    assert torch.equal(first.last_routing.expert_index, second.last_routing.expert_index)
    assert second.aux_loss is None and first.aux_loss is not None
    # each image's tokens all go to one expert
    r = first.last_routing
    for g in range(3):
        assert r.expert_index[r.group_index == g].unique().numel() == 1
    # the router gets gradients through both layers' combine weights
    assert first.router.gate.weight.grad is not None if hasattr(first.router, "gate") and hasattr(first.router.gate, "weight") else True


def test_per_image_routing_shared_across_convnext_stages():
    """Layers in stages with different H*W re-express the same per-image choice for their token count."""
    torch.manual_seed(0)
    model = timm.create_model("vmoe_convnext_test_32", num_experts=4, k=2, router="per_image", moe_layers="all")
    layers = [m for m in model.modules() if isinstance(m, MoEMlp)]
    for layer in layers:
        layer.keep_routing = True
    calls = _router_calls(model)
    model(torch.randn(2, 1, 32, 32)).sum().backward()
    assert len(calls) == 1
    for layer in layers:
        r = layer.last_routing
        per_image = [sorted(r.expert_index[(r.group_index == g) & (r.token_index == 0)].tolist()) for g in range(2)]
        r0 = layers[0].last_routing
        assert per_image == [sorted(r0.expert_index[(r0.group_index == g) & (r0.token_index == 0)].tolist()) for g in range(2)]
    assert layers[0].last_routing.group_size == 64 and layers[-1].last_routing.group_size == 1  # 8x8 ... 1x1


def test_upcycled_model_equals_dense_when_every_token_reaches_every_expert(tmp_path):
    """k = E with room for every token: combine weights are the full softmax (sum 1), so the
    upcycled MoE computes exactly the dense model."""
    torch.manual_seed(0)
    dense = timm.create_model("vit_pico_patch7_28").eval()
    x = torch.randn(4, 1, 28, 28)
    kwargs = dict(num_experts=4, k=4, eval_capacity_factor=1.0, moe_layers="every-2")
    moe = timm.create_model("vmoe_vit_pico_patch7_28", **kwargs).eval()
    assert not torch.allclose(moe(x), dense(x), atol=1e-4)
    upcycle_from_dense(moe, dense)
    torch.testing.assert_close(moe(x), dense(x), atol=1e-5, rtol=1e-4)
    # from a safetensors checkpoint of the dense model, too
    from safetensors.torch import save_model

    save_model(dense, str(tmp_path / "dense.safetensors"))
    moe2 = upcycle_from_dense(timm.create_model("vmoe_vit_pico_patch7_28", **kwargs).eval(), tmp_path / "dense.safetensors")
    torch.testing.assert_close(moe2(x), dense(x), atol=1e-5, rtol=1e-4)
    # expert_init="upcycle" at build copies the model's own dense MLPs: same seed, same dense model
    torch.manual_seed(1)
    dense1 = timm.create_model("vit_pico_patch7_28").eval()
    torch.manual_seed(1)
    moe3 = timm.create_model("vmoe_vit_pico_patch7_28", expert_init="upcycle", **kwargs).eval()
    torch.testing.assert_close(moe3(x), dense1(x), atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="does not match"):
        upcycle_from_dense(timm.create_model("vmoe_vit_pico_patch7_28", **kwargs), {**dense.state_dict(), "extra.weight": torch.zeros(1)})


@pytest.mark.parametrize("name, kwargs", [
    ("vmoe_vit_test_patch7_28", dict(num_experts=4, router="soft", shared_expert=True)),
    ("vmoe_convnext_test_32", dict(num_experts=2, moe_layers={3: "all"}, router="per_image")),
])
def test_safetensors_roundtrip(tmp_path, name, kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    path = tmp_path / "moe.safetensors"
    save_moe_model(model, path)
    rebuilt = load_moe_model(path).eval()
    assert rebuilt.moe_config["moe_layers_resolved"] == model.moe_config["moe_layers_resolved"]
    x = torch.randn(2, 1, 28 if name.endswith("28") else 32, 28 if name.endswith("28") else 32)
    torch.testing.assert_close(rebuilt(x), model(x))
    again = load_moe_model(path, timm.create_model(name, **kwargs).eval())
    torch.testing.assert_close(again(x), model(x))


def test_parameter_counts_golden():
    # vit_test: D=32, H=128. One expert: 32*128 + 128 + 128*32 + 32 = 8352 parameters.
    dense = timm.create_model("vit_test_patch7_28")
    dense_total = sum(p.numel() for p in dense.parameters())
    model = timm.create_model("vmoe_vit_test_patch7_28", num_experts=4, k=2)  # MoE in block 1
    counts = count_parameters(model)
    router = 32 * 4  # bias-free linear router
    assert counts["total"] == dense_total - 8352 + router + 4 * 8352
    assert counts["experts"] == 4 * 8352
    assert counts["activated_per_token"] == dense_total - 8352 + router + 2 * 8352
    assert counts["experts_per_token"] == {1: 2.0}
    from vmoe_lib.costs import count_parameters as costs_count  # the training records' counter

    assert costs_count(model) == {"total": counts["total"], "activated": counts["activated_per_token"]}
    measured = count_parameters(model, input_size=(1, 28, 28))  # eval capacity 4.0: nothing dropped
    assert measured["experts_per_token"] == {1: 2.0}
    ec = count_parameters(timm.create_model("vmoe_vit_test_patch7_28", num_experts=4, router="softmax_expert_choice"), input_size=(1, 28, 28))
    assert ec["experts_per_token"][1] > 0


def test_flops_count_processed_pairs_only():
    """k=1 and no drops: the MoE spends the dense FLOPs plus its router's (17 tokens x 2*D*E)."""
    dense = flops_per_image(timm.create_model("vit_test_patch7_28"), (1, 28, 28))["flops_per_image"]
    moe = timm.create_model("vmoe_vit_test_patch7_28", num_experts=4, k=1)
    flops = flops_per_image(moe, (1, 28, 28))
    assert flops["flops_per_image"] == dense + 17 * 2 * 32 * 4
    assert flops["moe_expert_flops_per_image"] == 17 * (2 * 32 * 128 * 2)
    # k=2 costs one more expert per token; the FLOP-matched dense model doubles that MLP's width
    moe2 = timm.create_model("vmoe_vit_test_patch7_28", num_experts=4, k=2)
    flops2 = flops_per_image(moe2, (1, 28, 28))["flops_per_image"]
    assert flops2 == dense + 17 * 2 * 32 * 4 + 17 * (2 * 32 * 128 * 2)
    matched = flops_matched_dense(moe2)
    assert matched.description == "vit_test_patch7_28 with MLP hidden [256] in blocks [1]"
    assert flops_per_image(matched, (1, 28, 28))["flops_per_image"] == flops2 - 17 * 2 * 32 * 4


def test_set_routing_changes_built_model():
    model = timm.create_model("vmoe_vit_pico_patch7_28", num_experts=4)
    set_routing(model, eval_capacity_factor=0.5, batch_priority=True, k=1, group_size=2)
    for layer in (model.blocks[1].mlp, model.blocks[3].mlp):
        assert (layer.router.eval_capacity_factor, layer.router.batch_priority, layer.router.k, layer.group_size) == (0.5, True, 1, 2)
    model.eval()(torch.randn(4, 1, 28, 28))
    assert model.blocks[1].mlp.last_dispatch.pairs <= 4 * 17
    with pytest.raises(ConfigError, match="slots_per_expert"):
        set_routing(model, slots_per_expert=2)
    with pytest.raises(ConfigError, match="backend='x'"):
        set_routing(model, backend="x")
    soft = timm.create_model("vmoe_vit_test_patch7_28", router="soft")
    with pytest.raises(ConfigError, match="group_size=8"):
        set_routing(soft, group_size=8)
