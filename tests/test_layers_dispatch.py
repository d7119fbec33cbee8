"""Expert bank and dispatch backends: golden values, properties, and backend equivalence.

Backends must compute the same function (routers study, arXiv:2401.15969, Sec. 2);
these tests compare them on hand-made routings (no router needed) and, in
tests/test_layers_moe.py, on every registered router.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from vmoe_lib.errors import ConfigError
from vmoe_lib.layers import BACKENDS, ExpertBank, dispatch_combine, grouped_mm_supported, resolve_backend
from vmoe_lib.routers.base import Routing

SPARSE_BACKENDS = ("einsum", "sort", "segment", "grouped_mm", "static", "auto")


def _routing(G, S, E, C, entries, weights=None):
    """Routing from ``[(group, token, expert, slot), ...]``."""
    g, t, e, c = (torch.tensor(v, dtype=torch.long) for v in zip(*entries)) if entries else [torch.zeros(0, dtype=torch.long)] * 4
    w = torch.tensor(weights, dtype=torch.float32) if weights is not None else torch.rand(len(entries))
    return Routing(G, S, E, C, g, t, e, c, w)


def _linear_bank(scales):
    """Bank of 1-d experts ``y = scale_e * x`` (identity activation, no bias)."""
    bank = ExpertBank(len(scales), 1, 1, 1, act_layer=nn.Identity, bias=False)
    with torch.no_grad():
        bank.fc1_weight.copy_(torch.tensor(scales, dtype=torch.float32).view(-1, 1, 1))
        bank.fc2_weight.fill_(1.0)
    return bank


@pytest.mark.parametrize("backend", SPARSE_BACKENDS)
def test_golden_two_experts(backend):
    # Expert 0: y = 2x, expert 1: y = 3x. Tokens x = 1, 2, 3, 4 (one group).
    # token 0 -> e0 (w .5)                   : .5 * 2 * 1             = 1.0
    # token 1 -> e1 (w 1)                    : 1 * 3 * 2              = 6.0
    # token 2 -> e0 (w .25) and e1 (w .75)   : .25 * 2 * 3 + .75 * 3 * 3 = 8.25
    # token 3 -> dropped                     : 0
    bank = _linear_bank([2.0, 3.0])
    routing = _routing(1, 4, 2, 2, [(0, 0, 0, 0), (0, 1, 1, 0), (0, 2, 0, 1), (0, 2, 1, 1)], [0.5, 1.0, 0.25, 0.75])
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 4, 1)
    y, info = dispatch_combine(x, routing, bank, backend)
    torch.testing.assert_close(y.view(-1), torch.tensor([1.0, 6.0, 8.25, 0.0]))
    assert info.pairs == 4
    assert info.rows_computed >= 4


def test_golden_soft_routing():
    # One group of 2 tokens, 1 expert (y = 2x) with 2 slots.
    # dispatch (softmax over tokens per slot): slot0 = .25 x0 + .75 x1, slot1 = .5 x0 + .5 x1
    # x = (1, 3): slot0 = 2.5, slot1 = 2.0 -> expert: 5.0, 4.0
    # combine: token0 = .5 * 5 + .5 * 4 = 4.5; token1 = 1 * 5 + 0 * 4 = 5.0
    bank = _linear_bank([2.0])
    dispatch = torch.tensor([[0.25, 0.5], [0.75, 0.5]]).view(1, 2, 1, 2)
    combine = torch.tensor([[0.5, 0.5], [1.0, 0.0]]).view(1, 2, 1, 2)
    routing = Routing(1, 2, 1, 2, dispatch_dense=dispatch, combine_dense=combine)
    x = torch.tensor([1.0, 3.0]).view(1, 2, 1)
    for backend in ("einsum", "auto"):
        y, info = dispatch_combine(x, routing, bank, backend)
        torch.testing.assert_close(y.view(-1), torch.tensor([4.5, 5.0]))
    assert info.backend == "soft" and info.pairs == 2


def test_expert_bank_matches_per_expert_mlp():
    torch.manual_seed(0)
    bank = ExpertBank(3, 8, 16, 6, init="independent")
    x = torch.randn(3, 5, 8)
    y = bank(x)
    for e in range(3):
        torch.testing.assert_close(y[e], bank.forward_expert(e, x[e]))
    # 'same' init: every expert starts equal (V-MoE's split_rngs=False)
    same = ExpertBank(4, 8, 16, 8, init="same", init_std=0.02)
    assert all(torch.equal(same.fc1_weight[0], same.fc1_weight[e]) for e in range(4))
    assert same.fc1_weight.std() < 0.03 and torch.all(same.fc1_bias == 0)
    assert not torch.equal(bank.fc1_weight[0], bank.fc1_weight[1])


def test_expert_bank_upcycles_dense_mlp_linear_and_conv():
    from timm.layers import Mlp

    torch.manual_seed(0)
    for use_conv in (False, True):
        dense = Mlp(6, 12, use_conv=use_conv)
        bank = ExpertBank(3, 6, 12, 6)
        bank.load_dense_mlp(dense)
        x = torch.randn(4, 6)
        ref = dense(x.view(4, 6, 1, 1)).view(4, 6) if use_conv else dense(x)
        for e in range(3):
            torch.testing.assert_close(bank.forward_expert(e, x), ref)


def _random_sparse_routing(G, S, E, C, density, seed):
    gen = torch.Generator().manual_seed(seed)
    entries = []
    for g in range(G):
        for e in range(E):
            tokens = torch.randperm(S, generator=gen)[:C].tolist()
            for slot, t in enumerate(tokens):
                if torch.rand((), generator=gen) < density:
                    entries.append((g, t, e, slot))
    weights = torch.rand(len(entries), generator=gen).tolist()
    return _routing(G, S, E, C, entries, weights)


def _run(backend, bank, x, routing):
    bank = copy.deepcopy(bank)
    x = x.detach().clone().requires_grad_(True)
    w = routing.combine_weight.detach().clone().requires_grad_(True)
    r = copy.copy(routing)
    r.combine_weight = w
    y, _ = dispatch_combine(x, r, bank, backend)
    probe = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * probe).sum().backward()
    biases = [None if b is None else b.grad for b in (bank.fc1_bias, bank.fc2_bias)]
    return [y, x.grad, w.grad, bank.fc1_weight.grad, bank.fc2_weight.grad, *biases]


@settings(max_examples=15, deadline=None)
@given(
    G=st.integers(1, 3),
    S=st.integers(1, 9),
    E=st.integers(1, 5),
    C=st.integers(1, 4),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_backends_agree_on_random_routings(G, S, E, C, density, seed):
    """Every backend gives the same outputs and gradients (x, combine weights, expert weights)."""
    C = min(C, S)
    torch.manual_seed(seed)
    bank = ExpertBank(E, 4, 8, 4, init="independent")
    x = torch.randn(G, S, 4)
    routing = _random_sparse_routing(G, S, E, C, density, seed)
    reference = _run("einsum", bank, x, routing)
    for backend in ("sort", "segment", "grouped_mm", "auto"):
        for got, want in zip(_run(backend, bank, x, routing), reference):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), density=st.floats(0.1, 1.0))
def test_dispatch_matches_definition(seed, density):
    """y[g, s] = sum over the token's entries of w * expert_e(x[g, s]); dropped tokens give 0."""
    torch.manual_seed(seed)
    G, S, E, C = 2, 6, 3, 3
    bank = ExpertBank(E, 4, 8, 4, init="independent")
    x = torch.randn(G, S, 4)
    routing = _random_sparse_routing(G, S, E, C, density, seed)
    expected = torch.zeros(G, S, 4)
    for g, t, e, w in zip(routing.group_index, routing.token_index, routing.expert_index, routing.combine_weight):
        expected[g, t] += w * bank.forward_expert(int(e), x[g, t])
    y, _ = dispatch_combine(x, routing, bank, "sort")
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-4)


def test_no_dense_gsec_tensor_in_fast_path():
    """The fast path's largest tensor is O(N * width), never (G*S) x E x C."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class MaxNumel(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.max = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    self.max = max(self.max, t.numel())
            return out

    G, S, E, C = 4, 64, 16, 16
    bank = ExpertBank(E, 4, 4, 4)
    routing = _random_sparse_routing(G, S, E, C, 0.5, 0)
    x = torch.randn(G, S, 4)
    for backend in ("sort", "segment"):
        with MaxNumel() as mode:
            dispatch_combine(x, routing, bank, backend)
        assert mode.max < G * S * E * C // 4, backend
    with MaxNumel() as mode:  # the reference does build them
        dispatch_combine(x, routing, bank, "einsum")
    assert mode.max >= G * S * E * C


def test_backend_resolution_and_errors():
    bank = ExpertBank(2, 4, 8, 4)
    x = torch.randn(1, 4, 4)
    balanced = _routing(1, 4, 2, 2, [(0, 0, 0, 0), (0, 1, 1, 0)], [1.0, 1.0])
    skewed = _routing(1, 4, 2, 4, [(0, 0, 0, 0), (0, 1, 0, 1), (0, 2, 0, 2), (0, 3, 1, 0)], [1.0] * 4)
    # CPU auto: exact per-expert segments; sort pads every expert to the busiest one
    info = dispatch_combine(x, skewed, bank, "auto")[1]
    assert (info.backend, info.rows_computed) == ("segment", 4)
    assert dispatch_combine(x, skewed, bank, "sort")[1].rows_computed == 6  # 2 experts x 3 rows
    assert dispatch_combine(x, balanced, bank, "sort")[1].rows_computed == 2
    assert resolve_backend("einsum", balanced, x, bank) == "einsum"
    odd = ExpertBank(2, 3, 5, 3)  # 3 floats = 12 bytes: not 16-byte aligned rows
    assert resolve_backend("grouped_mm", balanced, torch.randn(1, 4, 3), odd) == "sort"
    assert not grouped_mm_supported(torch.device("cpu"), torch.float32, 3)
    with pytest.raises(ConfigError, match="backend='fast'.*allowed"):
        dispatch_combine(x, balanced, bank, "fast")
    with pytest.raises(ValueError, match="routing is for"):
        dispatch_combine(torch.randn(2, 4, 4), balanced, bank, "sort")
    assert set(SPARSE_BACKENDS) == set(BACKENDS)
    with pytest.raises(ConfigError, match="expert_init"):
        ExpertBank(2, 4, 8, 4, init="copy")


@pytest.mark.parametrize(
    "bank_kwargs",
    [
        dict(act_layer=nn.ReLU),  # fused path, activation backward through autograd
        dict(act_layer=nn.SiLU, bias=(True, False)),
        dict(norm_layer=nn.LayerNorm),  # hidden norm: the composable (unfused) path
        dict(bias=False, act_layer=functools.partial(nn.GELU, approximate="tanh")),
    ],
)
def test_backends_agree_for_expert_variants(bank_kwargs):
    torch.manual_seed(0)
    bank = ExpertBank(3, 4, 8, 4, init="independent", **bank_kwargs)
    x = torch.randn(2, 6, 4)
    routing = _random_sparse_routing(2, 6, 3, 3, 0.8, 1)
    reference = _run("einsum", bank, x, routing)
    for backend in ("sort", "segment"):
        for got, want in zip(_run(backend, bank, x, routing), reference):
            if want is None:
                assert got is None
            else:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
