"""Router modules: registry, settings, forward/backward over the registry, stability, semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import vmoe_lib.routers as R
from vmoe_lib.errors import ConfigError
from vmoe_lib.layers.aux import collect_aux_loss

DIM = 8
ALL = R.list_routers()
SPARSE = [name for name in ALL if name != "soft"]
WITH_K = [name for name in ALL if "k" in R.router_options(name)]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make(name: str, num_experts: int = 4, **options) -> torch.nn.Module:
    torch.manual_seed(0)
    return R.create_router(name, dim=DIM, num_experts=num_experts, **options)


def tokens(groups: int = 3, size: int = 10, dim: int = DIM, seed: int = 1) -> torch.Tensor:
    return torch.randn(groups, size, dim, generator=torch.Generator().manual_seed(seed))


def differentiable_sum(routing: R.Routing) -> torch.Tensor:
    """A scalar that depends on every differentiable output of a routing, plus its aux loss."""
    dispatch, combine = routing.dense()
    weight = torch.linspace(0.5, 1.5, combine.numel(), device=combine.device).view_as(combine)
    total = (combine.float() * weight).sum()
    if dispatch.requires_grad:
        total = total + (dispatch.float() * weight.flip(0)).sum()
    return total + routing.aux_loss


# ----------------------------------------------------------------------------- registry
def test_list_routers_names():
    assert ALL == [
        "softmax_token_choice",
        "sinkhorn_token_choice",
        "softmax_expert_choice",
        "sinkhorn_expert_choice",
        "sparse_expert_choice",
        "soft",
        "per_image",
    ]


def test_unknown_router_name_lists_allowed():
    with pytest.raises(ConfigError, match="router='top2'.*softmax_token_choice.*per_image"):
        R.create_router("top2", dim=DIM, num_experts=4)


def test_unknown_option_is_named_with_accepted_options():
    with pytest.raises(ConfigError, match="capacity_facter.*accepted options: .*capacity_factor"):
        R.create_router("softmax_token_choice", dim=DIM, num_experts=4, capacity_facter=1.0)
    with pytest.raises(ConfigError, match="unknown option.*k"):
        R.create_router("soft", dim=DIM, num_experts=4, k=2)


def test_reference_defaults():
    router = make("softmax_token_choice", num_experts=8)
    assert (router.k, router.capacity_factor, router.eval_capacity_factor) == (2, 1.05, 4.0)
    assert (router.capacity_multiple, router.capacity_rounding, router.batch_priority) == (4, "ceil", False)
    assert router.renormalize is False and router.noise_std == 1.0 and router.noise_sigma == 1.0 / 8
    assert router.importance_loss_weight == router.load_loss_weight == 0.005
    sinkhorn = make("sinkhorn_token_choice")
    assert (sinkhorn.sinkhorn_iterations, sinkhorn.sinkhorn_epsilon) == (20, 1.0)
    assert make("per_image").superclass_loss_weight == 0.3
    assert make("sparse_expert_choice").noise_std == 0.0  # the reference solver has no noise
    assert isinstance(make("softmax_token_choice").gate, R.LinearGate)
    assert isinstance(make("softmax_token_choice", gate="cosine").gate, R.CosineGate)
    assert isinstance(make("softmax_token_choice", gate="mlp").gate, R.MLPGate)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("softmax_token_choice", dict(k=5), "k=5"),
        ("softmax_token_choice", dict(k=0), "k=0"),
        ("per_image", dict(k=5), "k=5"),
        ("softmax_token_choice", dict(capacity=0), "capacity=0"),
        ("softmax_token_choice", dict(capacity=-3), "capacity=-3"),
        ("softmax_expert_choice", dict(capacity=0), "capacity=0"),
        ("softmax_token_choice", dict(capacity_factor=0.0), "capacity_factor=0.0"),
        ("softmax_token_choice", dict(eval_capacity_factor=-1.0), "eval_capacity_factor=-1.0"),
        ("softmax_token_choice", dict(capacity_rounding="floor"), "capacity_rounding"),
        ("softmax_token_choice", dict(capacity_multiple=-4), "capacity_multiple"),
        ("softmax_token_choice", dict(gate="l3"), "gate='l3'"),
        ("softmax_token_choice", dict(noise_std=-1.0), "noise_std"),
        ("softmax_token_choice", dict(load_loss_weight=-1.0), "load_loss_weight"),
        ("sinkhorn_token_choice", dict(sinkhorn_iterations=-1), "sinkhorn_iterations"),
        ("soft", dict(slots_per_expert=0), "slots_per_expert"),
        ("sparse_expert_choice", dict(tie_break="random"), "tie_break"),
    ],
)
def test_bad_settings_name_the_setting(name, options, match):
    with pytest.raises(ConfigError, match=match):
        make(name, **options)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(10, DIM), (2, 3, 10, DIM), (2, 10, DIM + 1)])
def test_wrong_input_shape_raises(name, shape):
    with pytest.raises(ConfigError, match="rank 3|dim="):
        make(name)(torch.randn(*shape))


def test_settings_changeable_and_validated_on_a_built_router():
    router = make("softmax_token_choice", num_experts=4)
    with pytest.raises(ConfigError, match="k=5"):
        router.k = 5
    with pytest.raises(ConfigError, match="capacity_factor"):
        router.capacity_factor = 0
    with pytest.raises(ConfigError, match="capacity=0"):
        router.capacity = 0
    router.k = 1
    router.batch_priority = True
    assert router.k == 1 and router.batch_priority


# ----------------------------------------------------------------------------- registry-wide forward/backward
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("training", [True, False])
def test_forward_backward_contract(name, training, device):
    router = make(name).to(device).train(training)
    x = tokens().to(device)
    routing = router(x)
    assert isinstance(routing, R.Routing)
    assert (routing.num_groups, routing.group_size, routing.num_experts) == (3, 10, 4)
    dispatch, combine = routing.dense()
    assert dispatch.shape == combine.shape == (3, 10, 4, routing.capacity)
    if routing.is_sparse:
        n = routing.expert_index.numel()
        for field in ("group_index", "token_index", "expert_index", "slot_index", "combine_weight"):
            assert getattr(routing, field).shape == (n,)
        assert int(routing.slot_index.max()) < routing.capacity
        # each (group, expert, slot) appears at most once
        assert int(dispatch.max()) <= 1
        assert routing.combine_weight.dtype == x.dtype
    # aux loss: a scalar tensor; metrics: detached, with the required keys
    assert routing.aux_loss.shape == () and torch.isfinite(routing.aux_loss)
    for key in ("expert_load", "dropped_fraction", "experts_per_token", "gate_entropy"):
        assert key in routing.metrics, key
    assert routing.metrics["expert_load"].shape == (4,)
    torch.testing.assert_close(routing.metrics["expert_load"].sum().cpu(), torch.tensor(1.0))
    torch.testing.assert_close(routing.metrics["experts_per_token"].sum().cpu(), torch.tensor(1.0))
    assert not any(v.requires_grad for v in routing.metrics.values())
    differentiable_sum(routing).backward()
    grads = [p.grad for p in router.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # routers never store aux_loss on themselves (the MoE layer does), so nothing is counted twice
    assert "aux_loss" not in vars(router) and collect_aux_loss(router) is None


@pytest.mark.parametrize("name", ALL)
def test_autocast_routes_in_float32(name):
    router = make(name).eval()  # no noise, so both calls route identically
    x = tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routing = router(x)
    _, combine = routing.dense()
    assert combine.dtype == torch.float32 and torch.isfinite(combine).all()
    assert routing.aux_loss.dtype == torch.float32
    with torch.no_grad():
        reference = router(x)
    torch.testing.assert_close(routing.dense()[1], reference.dense()[1])


# ----------------------------------------------------------------------------- numerical stability
def _scale_logits(router: torch.nn.Module, factor: float) -> None:
    with torch.no_grad():
        if isinstance(router, R.SoftRouter):
            router.scale.fill_(factor)  # logits = scale * cosine
        else:
            router.gate.weight.mul_(factor)


SCENARIOS = {
    "logits_1e4": dict(scale=1e4 * math.sqrt(DIM)),
    "logits_-1e4": dict(scale=-1e4 * math.sqrt(DIM)),
    "all_equal": dict(scale=0.0),
    "single_token": dict(size=1),
    "one_expert": dict(num_experts=1, k=1),
    "k_equals_E": dict(num_experts=3, k=3),
}


# k = E only concerns the routers that have a k
STABILITY_CASES = [(n, s) for n in ALL for s in SCENARIOS if s != "k_equals_E" or n in WITH_K]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name, scenario", STABILITY_CASES)
def test_finite_outputs_and_gradients(name, scenario, dtype):
    spec = dict(SCENARIOS[scenario])
    options = {}
    if "k" in spec:
        k = spec.pop("k")
        if name in WITH_K:
            options["k"] = k
    router = make(name, num_experts=spec.get("num_experts", 4), **options).train()
    if "scale" in spec:
        if spec["scale"] == 0.0 and isinstance(router, R.SoftRouter):
            with torch.no_grad():
                router.mu.zero_()
        else:
            _scale_logits(router, spec["scale"])
    router = router.to(dtype)
    x = tokens(size=spec.get("size", 10)).to(dtype).requires_grad_()
    routing = router(x)
    dispatch, combine = routing.dense()
    assert torch.isfinite(dispatch).all() and torch.isfinite(combine).all()
    assert torch.isfinite(routing.aux_loss)
    assert all(torch.isfinite(v).all() for v in routing.metrics.values())
    differentiable_sum(routing).backward()
    for param in router.parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all()
    if x.grad is not None:
        assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("gate", ["cosine", "mlp"])
@pytest.mark.parametrize("name", ["softmax_token_choice", "sinkhorn_expert_choice", "per_image"])
def test_gate_parameterisations(name, gate):
    router = make(name, gate=gate).train()
    routing = router(tokens())
    differentiable_sum(routing).backward()
    grads = {n: p.grad for n, p in router.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values()), grads.keys()
    if gate == "cosine":
        # logits are bounded by 1 / temperature (0.07 at init)
        logits = router.gate(tokens(seed=3) * 100)
        assert logits.abs().max() <= 1 / 0.07 + 1e-3
        assert router.gate.log_temperature.grad is not None


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("name", SPARSE)
def test_gradient_reaches_gate_through_combine_weights(name):
    router = make(name).train()
    routing = router(tokens())
    (routing.combine_weight * torch.linspace(0, 1, routing.combine_weight.numel())).sum().backward()
    assert router.gate.weight.grad.abs().sum() > 0


def test_gradient_reaches_gate_through_aux_losses():
    router = make("softmax_token_choice").train()
    routing = router(tokens())
    assert {"importance_loss", "load_loss"} <= set(routing.metrics)
    routing.aux_loss.backward()
    assert router.gate.weight.grad.abs().sum() > 0
    expected = 0.005 * (routing.metrics["importance_loss"] + routing.metrics["load_loss"])
    torch.testing.assert_close(routing.aux_loss.detach(), expected)


def test_gradient_reaches_soft_moe_parameters():
    router = make("soft")
    differentiable_sum(router(tokens())).backward()
    assert router.mu.grad.abs().sum() > 0 and router.scale.grad.abs() > 0


@pytest.mark.parametrize("name", ["softmax_token_choice", "softmax_expert_choice", "per_image"])
@pytest.mark.parametrize("weight", ["balance_loss_weight", "z_loss_weight"])
def test_optional_losses_enter_aux_loss(name, weight):
    router = make(name, **{weight: 0.1}).eval()
    routing = router(tokens())
    term = weight.replace("_weight", "")
    base = make(name).eval()(tokens()).aux_loss
    torch.testing.assert_close(routing.aux_loss.detach(), base.detach() + 0.1 * routing.metrics[term])


# ----------------------------------------------------------------------------- token choice semantics
def _gates(router, x):
    with torch.no_grad():
        return torch.softmax(router.gate(x.float()), -1)


def test_router_equals_pure_allocation_in_eval():
    router = make("softmax_token_choice", num_experts=4).eval()
    x = tokens(size=12)
    gates = _gates(router, x)
    for bpr in (False, True):
        for eval_factor in (0.25, 1.0, 4.0):
            router.batch_priority, router.eval_capacity_factor = bpr, eval_factor
            routing = router(x)
            capacity = min(R.compute_capacity(12 * 2, 4, eval_factor), 12)
            assert routing.capacity == capacity
            choice = R.top_k_token_choice(gates, 2, capacity, bpr)
            expected = R.Routing(
                num_groups=3, group_size=12, num_experts=4, capacity=capacity,
                group_index=torch.arange(3).view(-1, 1, 1).expand(3, 12, 2)[choice.kept],
                token_index=torch.arange(12).view(1, -1, 1).expand(3, 12, 2)[choice.kept],
                expert_index=choice.expert_index[choice.kept], slot_index=choice.slot_index[choice.kept],
                combine_weight=choice.gate[choice.kept],
            )  # fmt: skip
            torch.testing.assert_close(routing.dense()[1], expected.dense()[1])
            torch.testing.assert_close(routing.dense()[0], expected.dense()[0])


def test_train_and_eval_capacity_factors():
    router = make("softmax_token_choice", num_experts=8)
    x = tokens(groups=2, size=65)
    assert router.train()(x).capacity == 20  # ceil(65*2*1.05/8) = 18 -> 20
    assert router.eval()(x).capacity == 65  # ceil(65*2*4/8) = 65 -> 68, capped at S = 65
    router.eval_capacity_factor = 0.5  # ceil(65*2*.5/8 = 8.125) = 9 -> 12
    assert router(x).capacity == 12
    router.capacity = 3  # explicit capacity overrides both factors
    assert router(x).capacity == 3 and router.train()(x).capacity == 3
    router.capacity = None
    router.capacity_multiple = None
    assert router.train()(x).capacity == 18


def test_low_capacity_drops_tokens_and_bpr_keeps_confident_ones():
    router = make("softmax_token_choice", num_experts=4, k=1).eval()
    x = tokens(groups=4, size=32)
    router.eval_capacity_factor = 0.25  # C = ceil(32*.25/4) = 2 -> multiple of 4: 4 of 32 tokens per expert
    vanilla = router(x)
    router.batch_priority = True
    bpr = router(x)
    assert vanilla.metrics["dropped_fraction"] > 0.4 and bpr.metrics["dropped_fraction"] > 0.4
    # BPR keeps the most confident tokens: higher mean combine weight among kept tokens
    assert bpr.combine_weight.mean() > vanilla.combine_weight.mean()


def test_k_changed_at_inference():
    router = make("softmax_token_choice", k=2).eval()
    router.k = 1
    routing = router(tokens())
    assert routing.metrics["experts_per_token"].shape == (2,)
    assert int(routing.dense()[0].sum((2, 3)).max()) == 1


def test_training_noise_only_in_training():
    router = make("softmax_token_choice")
    x = tokens()
    router.train()
    a, b = router(x), router(x)
    assert not torch.equal(a.dense()[1], b.dense()[1])
    assert "load_loss" in a.metrics
    router.eval()
    c, d = router(x), router(x)
    assert torch.equal(c.dense()[1], d.dense()[1]) and "load_loss" not in c.metrics


def test_combine_weights_raw_or_renormalised():
    x = tokens()
    raw = make("softmax_token_choice", capacity=10).eval()(x)
    per_token = raw.dense()[1].sum((2, 3))
    assert (per_token < 1 - 1e-3).all()  # raw softmax values of the top-2: sum < 1 (V-MoE)
    renorm = make("softmax_token_choice", capacity=10, renormalize=True).eval()(x)
    torch.testing.assert_close(renorm.dense()[1].sum((2, 3)), torch.ones(3, 10))


def test_sinkhorn_token_choice_combines_with_clean_softmax():
    router = make("sinkhorn_token_choice", capacity=10).train()  # noisy dispatch
    x = tokens()
    routing = router(x)
    clean = _gates(router, x)
    expected = clean[routing.group_index, routing.token_index, routing.expert_index]
    torch.testing.assert_close(routing.combine_weight.detach(), expected)


def test_sinkhorn_token_choice_balances_a_skewed_router():
    # All tokens prefer expert 0 by a wide margin: softmax top-1 sends everything there, the
    # Sinkhorn plan spreads the tokens (column marginals S/E).
    router = make("sinkhorn_token_choice", k=1, capacity=10, noise_std=0.0)
    softmax = make("softmax_token_choice", k=1, capacity=10, noise_std=0.0)
    x = tokens()
    with torch.no_grad():
        for r in (router, softmax):
            r.gate.weight.zero_()
            r.gate.weight[0] = 0.5 * x.mean((0, 1)) / x.mean((0, 1)).norm()
    assert softmax(x).metrics["expert_load"].max() > router(x).metrics["expert_load"].max()


# ----------------------------------------------------------------------------- expert choice semantics
@pytest.mark.parametrize("name", ["softmax_expert_choice", "sinkhorn_expert_choice", "sparse_expert_choice"])
def test_expert_choice_routers_fill_every_expert(name):
    router = make(name).eval()
    routing = router(tokens(size=12))
    capacity = R.compute_capacity(12, 4, 2.0)  # ceil(6) = 6 -> 8
    assert routing.capacity == capacity == 8
    dispatch, _ = routing.dense()
    assert torch.equal(dispatch.sum(1), torch.ones(3, 4, capacity))  # every slot holds exactly one token
    torch.testing.assert_close(routing.metrics["expert_load"], torch.full((4,), 0.25))
    assert routing.metrics["experts_per_token"].shape == (5,)  # 0..E experts per token


def test_softmax_expert_choice_matches_pure_function():
    router = make("softmax_expert_choice").eval()
    x = tokens(size=12)
    gates = _gates(router, x)
    routing = router(x)
    choice = R.expert_choice(gates, routing.capacity)
    assert torch.equal(routing.token_index.view(3, 4, -1), choice.token_index)
    torch.testing.assert_close(routing.combine_weight.detach().view(3, 4, -1), choice.score)


def test_expert_choice_capacity_capped_at_group_size():
    router = make("softmax_expert_choice", capacity_factor=8.0)
    assert router(tokens(size=5)).capacity == 5  # ceil(5*8/4) = 10 -> 12, capped at S


# ----------------------------------------------------------------------------- dense vs compact
def _moe_dense(x, routing, weights):
    dispatch, combine = routing.dense()
    expert_in = torch.einsum("gsec,gsd->gecd", dispatch.to(x.dtype), x)
    expert_out = torch.einsum("gecd,edf->gecf", expert_in, weights)
    return torch.einsum("gsec,gecf->gsf", combine.to(x.dtype), expert_out)


def _moe_compact(x, routing, weights):
    """Gather/scatter dispatch from the compact indices (no (G, S, E, C) tensor)."""
    groups, size, dim = x.shape
    buffer = x.new_zeros(groups, routing.num_experts, routing.capacity, dim)
    buffer[routing.group_index, routing.expert_index, routing.slot_index] = x[routing.group_index, routing.token_index]
    expert_out = torch.einsum("gecd,edf->gecf", buffer, weights)
    picked = expert_out[routing.group_index, routing.expert_index, routing.slot_index]
    out = x.new_zeros(groups * size, weights.shape[-1])
    out.index_add_(0, routing.group_index * size + routing.token_index, picked * routing.combine_weight[:, None])
    return out.view(groups, size, -1)


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("training", [True, False])
def test_dense_and_compact_forms_agree(name, training):
    router = make(name).train(training)
    x = tokens(size=12)
    routing = router(x)
    weights = torch.randn(4, DIM, 5)
    torch.testing.assert_close(_moe_compact(x, routing, weights), _moe_dense(x, routing, weights), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- Soft MoE
def test_soft_router_weights_and_unnormalised_tokens():
    router = make("soft", slots_per_expert=2)
    x = 5 * tokens()
    routing = router(x)
    assert not routing.is_sparse and routing.capacity == 2
    dispatch, combine = routing.dense()
    assert dispatch.shape == (3, 10, 4, 2)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(3, 4, 2))
    torch.testing.assert_close(combine.sum((2, 3)), torch.ones(3, 10))
    expected = R.soft_moe_weights(x, router.mu, router.scale)
    torch.testing.assert_close(dispatch, expected[0])
    torch.testing.assert_close(combine, expected[1])
    # routing only depends on token directions (normalised logits) ...
    torch.testing.assert_close(router(x / 5).dense()[0], dispatch)
    # ... while the slots mix the raw tokens: slot inputs scale with the tokens
    slots = torch.einsum("gsep,gsd->gepd", dispatch, x)
    slots_small = torch.einsum("gsep,gsd->gepd", router(x / 5).dense()[0], x / 5)
    torch.testing.assert_close(slots, 5 * slots_small)
    assert float(routing.aux_loss) == 0.0


# ----------------------------------------------------------------------------- per-image routing
def test_per_image_routing_sends_whole_images():
    router = make("per_image", k=2).eval()
    x = tokens(groups=3, size=7)
    routing = router(x)
    assert routing.capacity == 7
    assert not hasattr(router, "last_routing")  # no graph kept on the module: deepcopy (EMA) stays possible
    gates = torch.softmax(router.gate(x.mean(1)).detach(), -1)
    top = torch.sort(gates, dim=-1, descending=True, stable=True)
    dispatch, combine = routing.dense()
    for g in range(3):
        chosen = top.indices[g, :2].tolist()
        for s in range(7):
            # token s of image g sits in slot s of each chosen expert, with the image's gate as weight
            for j, e in enumerate(chosen):
                assert dispatch[g, s, e, s] == 1
                torch.testing.assert_close(combine[g, s, e, s].detach(), top.values[g, j])
        assert int(dispatch[g].sum()) == 7 * 2
    assert float(routing.metrics["dropped_fraction"]) == 0.0


def test_per_image_superclass_guidance():
    router = make("per_image", num_experts=3)
    x = tokens(groups=4, size=5)
    assert float(router(x).aux_loss) == 0.0  # no targets, no balance losses by default
    targets = torch.tensor([0, 2, 1, 2])
    router.superclass_targets = targets
    routing = router(x)
    logits = router.gate(x.mean(1))
    torch.testing.assert_close(routing.aux_loss, 0.3 * F.cross_entropy(logits, targets))
    routing.aux_loss.backward()
    assert router.gate.weight.grad.abs().sum() > 0
    assert "superclass_loss" in routing.metrics and "superclass_accuracy" in routing.metrics
    router.superclass_loss_weight = 0.0
    assert float(router(x).aux_loss) == 0.0


# ----------------------------------------------------------------------------- statistics only when read
@pytest.mark.parametrize("name", ALL)
def test_routing_statistics_are_computed_only_when_read(name, monkeypatch):
    """A training step reads no statistics, so no router computes them in its forward; reading them
    later gives exactly what an eager computation gives (the loss terms included, detached)."""
    from vmoe_lib.routers import stats

    calls = []
    for fn in ("sparse_routing_metrics", "gate_entropy"):
        original = getattr(stats, fn)
        for module in (R.token_choice_routing, R.expert_choice_routing, R.per_image_routing, R.soft_routing):
            if hasattr(module, fn):
                monkeypatch.setattr(module, fn, lambda *a, _o=original, _n=fn, **k: calls.append(_n) or _o(*a, **k))
    router = make(name, **({"k": 2} if "k" in R.router_options(name) and name != "per_image" else {}))
    router.train()
    routing = router(tokens())
    differentiable_sum(routing).backward()
    assert calls == []  # nothing computed in forward or backward
    assert isinstance(routing.metrics, R.LazyMetrics)
    values = dict(routing.metrics)
    assert calls and "expert_load" in values and "gate_entropy" in values
    assert all(not v.requires_grad for v in values.values())
    n = len(calls)
    dict(routing.metrics)
    assert len(calls) == n  # computed once, then kept


@pytest.mark.parametrize("name", [n for n in ALL if n != "soft"])
def test_aux_loss_is_the_weighted_sum_of_the_reported_terms(name):
    weights = {k: 0.01 for k in ("importance_loss_weight", "balance_loss_weight", "z_loss_weight")
               if k in R.router_options(name)}
    router = make(name, **weights)
    router.train()
    routing = router(tokens())
    metrics = dict(routing.metrics)
    expected = sum(getattr(router, f"{term}_weight") * metrics[term] for term in router.loss_weights()
                   if term in metrics and router.loss_weights()[term] > 0)
    assert torch.allclose(routing.aux_loss.detach(), torch.as_tensor(expected, dtype=torch.float32), rtol=1e-6, atol=0)
    for term in ("importance_loss", "balance_loss", "z_loss"):
        assert term in metrics  # reported whatever its weight


# ----------------------------------------------------------------------------- fast paths equal their plain forms
@pytest.mark.parametrize("shape", [(3, 10, 4), (2, 7, 8), (5, 16), (2, 3, 70)])
def test_softmax_experts_equals_torch_softmax(shape):
    from vmoe_lib.routers.ops import softmax_experts

    x = (torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * 5).requires_grad_()
    y = softmax_experts(x)
    ref = torch.softmax(x, dim=-1)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=0, atol=2e-7)  # one ulp or so, not bit for bit
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad(y, x, g)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("values", [
    [[0.2, 0.5, 0.5, 0.1]],  # a tie at the top: the lower index wins
    [[1.0, 1.0, 1.0, 1.0]],  # all equal (a zero-initialised gate)
    [[float("-inf"), float("-inf"), 0.0, float("-inf")]],
    [[0.0, 0.0, float("-inf"), 3.0]],
])
def test_top_1_by_max_is_the_stable_sort_choice(values):
    from vmoe_lib.routers.ops import stable_top_k

    x = torch.tensor(values)
    top, index = stable_top_k(x, 1)
    sorted_values, sorted_index = torch.sort(x, dim=-1, descending=True, stable=True)
    assert torch.equal(index, sorted_index[..., :1]) and torch.equal(top, sorted_values[..., :1])
    x = torch.randn(4, 9, 8, generator=torch.Generator().manual_seed(2)).round()  # many ties
    top, index = stable_top_k(x, 1)
    sorted_values, sorted_index = torch.sort(x, dim=-1, descending=True, stable=True)
    assert torch.equal(index, sorted_index[..., :1]) and torch.equal(top, sorted_values[..., :1])


@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_by_keys_is_the_stable_sort_choice(k):
    from vmoe_lib.routers.ops import stable_top_k

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 6, 9, generator=gen).round()  # many ties
    x[0, 0] = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, float("inf"), float("-inf"), -1.0, -0.0])
    x[0, 1] = torch.tensor([float("-inf")] * 9)
    x[0, 2] = torch.tensor([-2.5, -2.5, -1e-30, 1e-30, 0.0, -0.0, 3e38, -3e38, 5.0])
    x[1] = torch.softmax(torch.randn(6, 9, generator=gen), -1)
    for dim in (-1, 1):
        top, index = stable_top_k(x, k, dim=dim)
        values, order = torch.sort(x, dim=dim, descending=True, stable=True)
        assert torch.equal(index, order.narrow(dim, 0, k))
        assert torch.equal(top, values.narrow(dim, 0, k))
