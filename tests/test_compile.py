"""Static-shape routing, ``torch.compile(fullgraph=True)`` and ``torch.export`` of the MoE models (#31).

The static path (:func:`vmoe_lib.routers.static_shapes`, the ``static`` dispatch backend) must make the same routing
decisions as the eager default path, bit for bit, and the same outputs and gradients within float32 rounding (the
experts run as one batched matmul on every capacity slot instead of per-expert matmuls on the kept rows: the same
products summed in another order). Under ``torch.compile`` and ``torch.export`` the default settings take it.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

import vmoe_lib.models  # noqa: F401  (registers the vmoe_* models)
from vmoe_lib.errors import ConfigError
from vmoe_lib.layers import MoEMlp
from vmoe_lib.layers.dispatch import dispatch_combine
from vmoe_lib.models import ensemble_size, ensemble_targets
from vmoe_lib.routers import create_router, list_routers, static_shapes, static_shapes_active

ROUTERS = list_routers()
FIELDS = ("group_index", "token_index", "expert_index", "slot_index", "combine_weight")
# The stated tolerance of the static path against the eager default (float32, unit-scale inputs): the same products
# summed in another order.
ATOL = 1e-5


def _layer_pair(router: str, **options) -> tuple[MoEMlp, MoEMlp]:
    kwargs = dict(num_experts=8, router=router)
    if router.endswith("token_choice"):
        kwargs["capacity_factor"] = 0.5  # drops in every group
    eager = MoEMlp(16, 32, **kwargs, router_options=options or None)
    static = copy.deepcopy(eager)
    static.backend = "static"
    eager.keep_routing = static.keep_routing = True
    return eager, static


@pytest.mark.parametrize("router", ["softmax_token_choice", "sinkhorn_token_choice"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("batch_priority", [False, True])
def test_static_token_choice_same_decisions_fixed_sizes(router, k, batch_priority):
    torch.manual_seed(0)
    r = create_router(router, dim=16, num_experts=8, k=k, batch_priority=batch_priority, capacity=2)
    r.eval()  # no noise: both calls see the same gates
    sizes = set()
    for seed in range(3):
        x = torch.randn(3, 20, 16, generator=torch.Generator().manual_seed(seed))
        eager = r(x)
        with static_shapes():
            assert static_shapes_active()
            static = r(x)
        assert not static_shapes_active()
        assert static.is_static and not eager.is_static
        assert bool((~static.kept).any()), "the test needs dropped choices"
        sizes.add(tuple(getattr(static, f).numel() for f in (*FIELDS, "kept")))
        compact = static.compact()
        for field in FIELDS:  # the same decisions, slots and weights, in the same order
            assert torch.equal(getattr(compact, field), getattr(eager, field)), field
        # the dropped choices are those whose slot is past the capacity
        assert torch.equal(static.kept, static.slot_index < static.capacity)
        for a, b in zip(static.dense(), eager.dense()):
            assert torch.equal(a, b)
        assert torch.equal(static.tokens_per_expert(), eager.tokens_per_expert())
        assert static.metrics.keys() == eager.metrics.keys()
        for key, value in eager.metrics.items():
            assert torch.equal(static.metrics[key], value), key
    assert sizes == {(3 * 20 * k,) * 6}, "the static routing's sizes depend on (G, S, k) only"


@pytest.mark.parametrize("router", ROUTERS)
def test_static_layer_matches_eager(router):
    options = {"batch_priority": True} if router == "softmax_token_choice" else {}
    eager, static = _layer_pair(router, **options)
    x = torch.randn(4, 10, 16, requires_grad=True)
    x_static = x.detach().clone().requires_grad_()
    torch.manual_seed(1)
    y = eager(x)
    torch.manual_seed(1)
    y_static = static(x_static)
    (y.square().sum() + eager.aux_loss).backward()
    (y_static.square().sum() + static.aux_loss).backward()
    assert static.last_dispatch.backend == ("soft" if router == "soft" else "static")
    torch.testing.assert_close(y_static, y, atol=ATOL, rtol=0)
    torch.testing.assert_close(x_static.grad, x.grad, atol=ATOL, rtol=0)
    for (name, p), q in zip(eager.named_parameters(), static.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=1e-5, msg=name)
    assert static.last_dispatch.pairs == eager.last_dispatch.pairs
    routing, routing_static = eager.last_routing, static.last_routing.compact()
    if routing.is_sparse:
        for field in FIELDS:
            assert torch.equal(getattr(routing_static, field), getattr(routing, field)), field


def test_static_dispatch_of_dropped_choices_by_hand():
    """Two tokens, one expert of capacity 1: the second token's choice is dropped and gets exactly 0 (not the
    expert's output on an empty slot, which is not 0 with biases)."""
    from vmoe_lib.layers.experts import ExpertBank
    from vmoe_lib.routers.base import Routing

    torch.manual_seed(0)
    bank = ExpertBank(1, 4, 8, 4)
    x = torch.randn(1, 2, 4)
    one = torch.ones(2)
    routing = Routing(1, 2, 1, 1, group_index=torch.zeros(2, dtype=torch.long), token_index=torch.arange(2),
                      expert_index=torch.zeros(2, dtype=torch.long), slot_index=torch.arange(2),
                      combine_weight=one * 0.5, kept=torch.tensor([True, False]))
    y, info = dispatch_combine(x, routing, bank, backend="static")
    torch.testing.assert_close(y[0, 0], 0.5 * bank(x[:, :1])[0, 0])
    assert torch.equal(y[0, 1], torch.zeros(4))
    assert info.pairs == 1 and info.rows_computed == 1
    y_compact, _ = dispatch_combine(x, routing, bank, backend="segment")  # the compact backends drop it too
    torch.testing.assert_close(y_compact, y)


def _train_step(model, compiled, x, y):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    logits = compiled(x)
    aux = [m.aux_loss for m in model.modules() if isinstance(m, MoEMlp) and m.aux_loss is not None]
    loss = F.cross_entropy(logits, ensemble_targets(y, ensemble_size(model))) + sum(aux)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return loss


def _model(name: str, **kwargs):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs)
    x = torch.randn(16, *model.pretrained_cfg["input_size"])
    return model, x, torch.randint(0, model.num_classes, (16,))


@pytest.mark.parametrize("backend", ["auto", "einsum"])
@pytest.mark.parametrize("router", ROUTERS)
def test_no_graph_breaks(router, backend):
    """The issue's table (vmoe_vit_pico_patch7_28, training mode, batch 16): every cell 0 graph breaks."""
    model, x, _ = _model("vmoe_vit_pico_patch7_28", router=router, backend=backend)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.train())(x)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize(("name", "router"), [("vmoe_vit_pico_patch7_28", router) for router in ROUTERS] + [
    ("vmoe_convnext_zepto_32", router) for router in ("softmax_token_choice", "softmax_expert_choice", "per_image")])
def test_compile_fullgraph_train_and_eval(name, router):
    """fullgraph=True, the model's default settings, training step (forward, backward, optimizer step) and evaluation.
    AOTAutograd's eager backend traces exactly what Inductor compiles (the test below runs Inductor itself)."""
    model, x, y = _model(name, router=router)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss = _train_step(model.train(), compiled, x, y)
    assert torch.isfinite(loss)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), atol=ATOL, rtol=0)


@pytest.mark.slow
def test_compile_inductor_default_backend_matches_eager():
    """``torch.compile(model, fullgraph=True)`` with nothing chosen (Inductor): a training step and evaluation of
    the smallest ViT; evaluation equals eager within the stated tolerance."""
    model, x, y = _model("vmoe_vit_test_patch7_28")
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    reference = copy.deepcopy(model)
    torch.manual_seed(3)
    loss = _train_step(model.train(), compiled, x, y)
    torch.manual_seed(3)
    loss_eager = _train_step(reference.train(), reference, x, y)
    assert torch.isfinite(loss) and torch.isfinite(loss_eager)
    model.eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference.eval()(x), atol=ATOL, rtol=0)


def test_compile_e3_and_shared_routing_fullgraph():
    for kwargs in ({"ensemble_size": 2, "k": 1}, {"router": "per_image", "moe_layers": "every-2"}):
        model, x, y = _model("vmoe_vit_pico_patch7_28", **kwargs)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        assert torch.isfinite(_train_step(model.train(), compiled, x, y))
        with torch.no_grad():
            torch.testing.assert_close(compiled.eval()(x), model.eval()(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("router", ROUTERS)  # every capacity router, and Soft MoE
@pytest.mark.parametrize("name", ["vmoe_vit_pico_patch7_28", "vmoe_convnext_zepto_32"])
def test_export_inference_equals_eager(name, router):
    model, x, _ = _model(name, router=router)
    model.eval()
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(program.module()(x), expected, atol=ATOL, rtol=0)
    other = torch.randn_like(x)  # the program is not specialised to the data it was exported with
    with torch.no_grad():
        torch.testing.assert_close(program.module()(other), model(other), atol=ATOL, rtol=0)


def test_static_backend_name_and_bad_values():
    with pytest.raises(ConfigError, match="backend"):
        MoEMlp(16, 32, backend="staticc")
    layer = MoEMlp(16, 32, backend="static")
    assert "backend='static'" in repr(layer)


@pytest.mark.usefixtures("one_torch_thread", "hermetic_data")
def test_engine_compile_option(monkeypatch):
    """``train_model(compile=True)`` trains through ``torch.compile`` (here with AOTAutograd's eager backend, the
    graphs Inductor would compile; the Inductor test above compiles one), says so in the record and the manifest; an
    eager record has no ``compiled`` field at all (records of record are unchanged); bad values are refused."""
    from vmoe_lib.chapters import get_chapter
    from vmoe_lib.records import build_manifest
    from vmoe_lib.results import load_runs
    from vmoe_lib.sweep import RunTask
    from vmoe_lib.train import TrainConfig, train_model

    compiled_models = []
    real_compile = torch.compile

    def compile_spy(model, **kwargs):
        compiled_models.append(model)
        return real_compile(model, backend="aot_eager", fullgraph=True, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_spy)
    config = TrainConfig(model="vmoe_vit_test_patch7_28", val_size=100, train_subset=128, eval_subset=100, epochs=1,
                         batch_size=64, eval_batch_size=100)
    torch._dynamo.reset()
    record = train_model(config, 0, device="cpu", progress=False, compile=True)
    assert len(compiled_models) == 1 and record["compiled"] is True
    assert 0.0 <= record["final"]["test_accuracy"] <= 1.0
    eager = train_model(config, 0, device="cpu", progress=False)
    assert "compiled" not in eager and len(compiled_models) == 1
    task = RunTask("c", "smoke", "run", 0, config, "key", None, None, compile=True)
    assert build_manifest(task, record, session_seconds=1.0)["compile"] is True
    with pytest.raises(ConfigError, match="compile='yes'"):
        train_model(config, 0, device="cpu", progress=False, compile="yes")
    with pytest.raises(ConfigError, match="compile=1"):
        load_runs([], "smoke", compile=1)
    with pytest.raises(ConfigError, match="compile=None"):
        get_chapter("dense_baselines").run("smoke", compile=None)


def test_compiled_model_follows_routing_settings_changed_between_calls():
    """Settings changed on a compiled model recompile with the new capacity (none is traced as a symbolic number, which
    would break the graph): Dynamo's automatic dynamic shapes make a float that changed between compilations symbolic,
    so the capacity factors are kept as guarded constants. Also two layers of different capacity factors in one
    process (what a benchmark does)."""
    from vmoe_lib.models import set_routing

    torch._dynamo.reset()
    tokens = torch.randn(8, 65, 32)
    for layer in (MoEMlp(32, 64), MoEMlp(32, 64, router="softmax_expert_choice", capacity_factor=2.0),
                  MoEMlp(32, 64, router="softmax_expert_choice", capacity_factor=3.0)):
        torch.compile(layer.train(), fullgraph=True, backend="aot_eager")(tokens)
    model, x, _ = _model("vmoe_vit_pico_patch7_28")
    compiled = torch.compile(model.train(), fullgraph=True, backend="aot_eager")
    layers = [m for m in model.modules() if isinstance(m, MoEMlp)]
    # 8 images x 17 tokens per group, E = 8, capacity rounded up to a multiple of 4
    for change, capacity in ((dict(k=1), 20), (dict(capacity_factor=1.5), 28), (dict(capacity=3), 3)):
        set_routing(model, **change)
        compiled(x)
        assert [float(m.last_metrics["capacity"]) for m in layers] == [capacity] * len(layers), change
