"""Pure allocation functions of vmoe_lib.routers: golden values worked by hand, and properties.

Axis letters: G groups, S tokens per group, E experts, C capacity, K choices.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vmoe_lib.routers as R
from vmoe_lib.errors import ConfigError

FAST = settings(max_examples=40, deadline=None)


# ----------------------------------------------------------------------------- capacity
@pytest.mark.parametrize(
    "num_tokens, num_experts, factor, rounding, multiple, expected",
    [
        # V-MoE S/32 group of one 224px image: S=65 (64 patches + class), k=2, E=8.
        (65 * 2, 8, 1.05, "ceil", 4, 20),  # 136.5/8 = 17.06 -> 18 -> multiple of 4: 20
        (65 * 2, 8, 1.05, "ceil", None, 18),  # same without the multiple-of-4 rule
        (65 * 2, 8, 4.0, "ceil", 4, 68),  # eval cf 4: 520/8 = 65 -> 68
        (65 * 2, 8, 0.1, "ceil", 4, 4),  # 13/8 = 1.6 -> 2 -> 4
        (16, 4, 1.0, "ceil", 4, 4),  # exactly 4
        (10, 4, 1.0, "ceil", 1, 3),  # 2.5 -> ceil 3
        (10, 4, 1.0, "round", 1, 2),  # 2.5 -> round-half-even 2 (as jnp.round / Python round)
        (14, 4, 1.0, "round", 1, 4),  # 3.5 -> round-half-even 4
        (10, 4, 1.0, "round", 4, 4),  # 2 -> 4
        (65, 8, 2.0, "ceil", 4, 20),  # expert choice default: 16.25 -> 17 -> 20
    ],
)
def test_compute_capacity_golden(num_tokens, num_experts, factor, rounding, multiple, expected):
    assert R.compute_capacity(num_tokens, num_experts, factor, rounding=rounding, multiple_of=multiple) == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_tokens=1, num_experts=8, capacity_factor=1.0, rounding="round"), "capacity"),  # 0.125 -> 0
        (dict(num_tokens=8, num_experts=8, capacity_factor=0.0), "capacity_factor"),
        (dict(num_tokens=8, num_experts=8, capacity_factor=-1.0), "capacity_factor"),
        (dict(num_tokens=8, num_experts=8, capacity_factor=1.0, rounding="floor"), "capacity_rounding"),
    ],
)
def test_compute_capacity_rejects(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        R.compute_capacity(**kwargs)


# ----------------------------------------------------------------------------- token choice, golden
# G=1, S=4, E=3, K=2. Each row: a token's softmax gates; its top-2 in brackets.
GATES_4x3 = torch.tensor(
    [
        [
            [0.50, 0.30, 0.20],  # t0: [e0 .5, e1 .3]
            [0.10, 0.60, 0.30],  # t1: [e1 .6, e2 .3]
            [0.20, 0.10, 0.70],  # t2: [e2 .7, e0 .2]
            [0.80, 0.15, 0.05],  # t3: [e0 .8, e1 .15]
        ]
    ]
)


def _table(choice):
    """{(token, j): (expert, slot, kept)} for group 0."""
    out = {}
    for s in range(choice.expert_index.shape[1]):
        for j in range(choice.expert_index.shape[2]):
            out[(s, j)] = (
                int(choice.expert_index[0, s, j]),
                int(choice.slot_index[0, s, j]),
                bool(choice.kept[0, s, j]),
            )
    return out


def test_top_k_vanilla_capacity_2_golden():
    # Level 1 in token order: t0->e0 slot0, t1->e1 slot0, t2->e2 slot0, t3->e0 slot1.
    # Level 2 in token order: t0->e1 slot1, t1->e2 slot1, t2->e0 slot2 (>= C: drop), t3->e1 slot2 (drop).
    choice = R.top_k_token_choice(GATES_4x3, k=2, capacity=2, batch_priority=False)
    assert _table(choice) == {
        (0, 0): (0, 0, True), (0, 1): (1, 1, True),
        (1, 0): (1, 0, True), (1, 1): (2, 1, True),
        (2, 0): (2, 0, True), (2, 1): (0, 2, False),
        (3, 0): (0, 1, True), (3, 1): (1, 2, False),
    }  # fmt: skip
    torch.testing.assert_close(choice.gate[0], torch.tensor([[0.5, 0.3], [0.6, 0.3], [0.7, 0.2], [0.8, 0.15]]))


def test_top_k_bpr_capacity_2_golden():
    # BPR priority = top-1 gate: t3 (.8) > t2 (.7) > t1 (.6) > t0 (.5).
    # Level 1 in that order: t3->e0 s0, t2->e2 s0, t1->e1 s0, t0->e0 s1.
    # Level 2 in that order: t3->e1 s1, t2->e0 s2 (drop), t1->e2 s1, t0->e1 s2 (drop).
    choice = R.top_k_token_choice(GATES_4x3, k=2, capacity=2, batch_priority=True)
    assert _table(choice) == {
        (0, 0): (0, 1, True), (0, 1): (1, 2, False),
        (1, 0): (1, 0, True), (1, 1): (2, 1, True),
        (2, 0): (2, 0, True), (2, 1): (0, 2, False),
        (3, 0): (0, 0, True), (3, 1): (1, 1, True),
    }  # fmt: skip


def test_top_k_capacity_1_vanilla_vs_bpr_drops_different_tokens():
    # C=1. Vanilla, level 1: t0 takes e0; t3 (gate .8!) finds e0 full and is dropped entirely.
    # BPR, level 1: t3 takes e0 first; t0 (gate .5) is the one dropped. Level 2 is full everywhere.
    vanilla = R.top_k_token_choice(GATES_4x3, k=2, capacity=1)
    bpr = R.top_k_token_choice(GATES_4x3, k=2, capacity=1, batch_priority=True)
    assert vanilla.kept[0].tolist() == [[True, False], [True, False], [True, False], [False, False]]
    assert bpr.kept[0].tolist() == [[False, False], [True, False], [True, False], [True, False]]


def test_top_k_explicit_bpr_priority():
    # An explicit priority replaces the top-1 gate: serving t0 first (priority 9) at C=1 keeps t0 on e0
    # and drops t3, as in vanilla routing, although t3's top-1 gate (.8) is the largest.
    priority = torch.tensor([[9.0, 2.0, 1.0, 0.0]])
    choice = R.top_k_token_choice(GATES_4x3, k=1, capacity=1, batch_priority=True, priority=priority)
    assert choice.kept[0, :, 0].tolist() == [True, True, True, False]


def test_top_k_reference_scenario():
    # The scenario of vmoe's moe_test (3 tokens, 3 experts, K=2, C=2), re-derived:
    # top-2: t0 [e0 .4, e2 .2], t1 [e0 .5, e2 .4], t2 [e2 .6, e0 .3].
    # vanilla: L1 t0 e0/0, t1 e0/1, t2 e2/0; L2 t0 e2/1, t1 e2/2 drop, t2 e0/2 drop.
    # BPR (t2 > t1 > t0): L1 t2 e2/0, t1 e0/0, t0 e0/1; L2 t2 e0/2 drop, t1 e2/1, t0 e2/2 drop.
    gates = torch.tensor([[[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]]])
    vanilla = R.top_k_token_choice(gates, 2, 2)
    bpr = R.top_k_token_choice(gates, 2, 2, batch_priority=True)
    assert vanilla.slot_index[0].tolist() == [[0, 1], [1, 2], [0, 2]]
    assert bpr.slot_index[0].tolist() == [[1, 2], [0, 1], [0, 2]]
    assert vanilla.expert_index[0].tolist() == [[0, 2], [0, 2], [2, 0]]


def test_top_k_ties_pick_lower_expert_and_bpr_ties_keep_token_order():
    # All-equal gates (a zero-initialised gate): every token picks e0 then e1 (lower index first);
    # BPR with equal priorities must keep token order, so both variants agree.
    gates = torch.full((1, 5, 4), 0.25)
    vanilla = R.top_k_token_choice(gates, 2, 3)
    bpr = R.top_k_token_choice(gates, 2, 3, batch_priority=True)
    assert vanilla.expert_index[0].tolist() == [[0, 1]] * 5
    assert vanilla.slot_index[0].tolist() == [[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]]
    assert torch.equal(vanilla.slot_index, bpr.slot_index)


# ----------------------------------------------------------------------------- token choice, properties
def _naive_token_choice(gates: torch.Tensor, k: int, capacity: int, bpr: bool):
    """Loop-based V-MoE allocation, written from the paper's description (arXiv:2106.05974 Sec. 4.1)."""
    result = {}
    groups, tokens, experts = gates.shape
    for g in range(groups):
        # top-k with ties to the lower index
        ranked = [sorted(range(experts), key=lambda e: (-float(gates[g, s, e]), e))[:k] for s in range(tokens)]
        order = list(range(tokens))
        if bpr:
            order = sorted(order, key=lambda s: (-float(gates[g, s, ranked[s][0]]), s))
        fill = [0] * experts
        for j in range(k):
            for s in order:
                e = ranked[s][j]
                result[(g, s, j)] = (e, fill[e], fill[e] < capacity)
                fill[e] += 1
    return result


@st.composite
def token_choice_case(draw):
    groups = draw(st.integers(1, 3))
    tokens = draw(st.integers(1, 10))
    experts = draw(st.integers(1, 6))
    k = draw(st.integers(1, experts))
    capacity = draw(st.integers(1, tokens + 1))
    bpr = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    coarse = draw(st.booleans())  # coarse values create ties
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(groups, tokens, experts, generator=gen)
    if coarse:
        logits = logits.round()
    return torch.softmax(logits, -1), k, capacity, bpr


@FAST
@given(token_choice_case())
def test_top_k_matches_naive_allocation_and_respects_capacity(case):
    gates, k, capacity, bpr = case
    choice = R.top_k_token_choice(gates, k, capacity, batch_priority=bpr)
    expected = _naive_token_choice(gates, k, capacity, bpr)
    got = {
        (g, s, j): (int(choice.expert_index[g, s, j]), int(choice.slot_index[g, s, j]), bool(choice.kept[g, s, j]))
        for (g, s, j) in expected
    }
    assert got == expected
    # No expert exceeds its capacity, kept slots are distinct and < C.
    groups, _, experts = gates.shape
    for g in range(groups):
        for e in range(experts):
            mask = choice.kept[g] & (choice.expert_index[g] == e)
            slots = choice.slot_index[g][mask]
            assert slots.numel() <= capacity
            assert sorted(slots.tolist()) == list(range(slots.numel()))
    # A token's choices are its top-k experts (distinct, by decreasing gate); a choice is dropped only
    # when its expert is full.
    top = torch.sort(gates, dim=-1, descending=True, stable=True)
    assert torch.equal(choice.expert_index, top.indices[..., :k])
    for (g, s, j), (e, _, kept) in expected.items():
        if not kept:
            assert int((choice.kept[g] & (choice.expert_index[g] == e)).sum()) == capacity


@FAST
@given(token_choice_case())
def test_bpr_never_drops_a_higher_priority_token_at_the_same_level(case):
    gates, k, capacity, _ = case
    choice = R.top_k_token_choice(gates, k, capacity, batch_priority=True)
    priority = gates.max(dim=-1).values
    groups, tokens, _ = gates.shape
    for g in range(groups):
        for j in range(k):
            for a in range(tokens):
                if choice.kept[g, a, j]:
                    continue
                e = choice.expert_index[g, a, j]
                kept_same = choice.kept[g, :, j] & (choice.expert_index[g, :, j] == e)
                # every kept token at this level on this expert has priority >= the dropped one's
                # (ties are served in token order, so an equal-priority kept token comes earlier)
                for b in kept_same.nonzero().flatten().tolist():
                    assert (priority[g, b] > priority[g, a]) or (priority[g, b] == priority[g, a] and b < a)


# ----------------------------------------------------------------------------- expert choice
SCORES_4x2 = torch.tensor(
    [
        [
            [0.90, 0.10],  # t0
            [0.60, 0.40],  # t1
            [0.30, 0.70],  # t2
            [0.55, 0.45],  # t3
        ]
    ]
)


def test_expert_choice_golden():
    # C=3: e0 ranks t0 .9 > t1 .6 > t3 .55 (> t2 .3); e1 ranks t2 .7 > t3 .45 > t1 .4 (> t0 .1).
    choice = R.expert_choice(SCORES_4x2, 3)
    assert choice.token_index[0].tolist() == [[0, 1, 3], [2, 3, 1]]
    torch.testing.assert_close(choice.score[0], torch.tensor([[0.9, 0.6, 0.55], [0.7, 0.45, 0.4]]))
    # t0 and t2 get one expert each, t1 and t3 get two. C=1: e0 takes t0, e1 takes t2; t1, t3 dropped.
    assert R.expert_choice(SCORES_4x2, 1).token_index[0].tolist() == [[0], [2]]


def test_expert_choice_ties_and_tie_break():
    scores = torch.zeros(1, 4, 2)
    # all equal: lower token index first (jax.lax.top_k order)
    assert R.expert_choice(scores, 2).token_index[0].tolist() == [[0, 1], [0, 1]]
    # a secondary key orders the tied tokens: t3 > t2 > t1 > t0
    tie_break = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(1, 4, 1).expand(1, 4, 2)
    assert R.expert_choice(scores, 2, tie_break).token_index[0].tolist() == [[3, 2], [3, 2]]
    # the primary key still dominates
    scores[0, 0, 0] = 1.0
    assert R.expert_choice(scores, 2, tie_break).token_index[0].tolist() == [[0, 3], [3, 2]]


@FAST
@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 6), st.integers(0, 2**16), st.data())
def test_expert_choice_fills_every_expert_exactly(groups, tokens, experts, seed, data):
    capacity = data.draw(st.integers(1, tokens))
    scores = torch.softmax(torch.randn(groups, tokens, experts, generator=torch.Generator().manual_seed(seed)), -1)
    choice = R.expert_choice(scores, capacity)
    assert choice.token_index.shape == (groups, experts, capacity)
    for g in range(groups):
        for e in range(experts):
            picked = choice.token_index[g, e].tolist()
            assert len(set(picked)) == capacity  # C distinct tokens
            # they are the top-C: every picked score >= every unpicked score
            rest = [s for s in range(tokens) if s not in picked]
            if rest:
                assert scores[g, picked, e].min() >= scores[g, rest, e].max()


# ----------------------------------------------------------------------------- Sinkhorn
def test_sinkhorn_golden():
    # Zero logits, S=4, E=2: the uniform plan P = 1/2 meets rows 1 and columns S/E = 2.
    torch.testing.assert_close(R.sinkhorn(torch.zeros(1, 4, 2)), torch.full((1, 4, 2), 0.5))
    # logits [[ln 3, 0], [0, ln 3]]: rows of exp(logits) = [3, 1] normalise to [.75, .25]; columns then
    # already sum to S/E = 1, so P = [[.75, .25], [.25, .75]].
    a = math.log(3.0)
    plan = R.sinkhorn(torch.tensor([[[a, 0.0], [0.0, a]]]))
    torch.testing.assert_close(plan, torch.tensor([[[0.75, 0.25], [0.25, 0.75]]]))


@FAST
@given(st.integers(1, 3), st.integers(1, 16), st.integers(1, 6), st.floats(0.1, 1.0), st.integers(0, 2**16))
def test_sinkhorn_marginals(groups, tokens, experts, scale, seed):
    logits = scale * torch.randn(groups, tokens, experts, generator=torch.Generator().manual_seed(seed))
    plan = R.sinkhorn(logits)  # the reference's 20 iterations
    torch.testing.assert_close(plan.sum(-1), torch.ones(groups, tokens), atol=1e-3, rtol=0)
    mass = tokens / experts
    torch.testing.assert_close(plan.sum(1), torch.full((groups, experts), mass), atol=1e-3 * mass, rtol=0)


def test_sinkhorn_marginals_large_logits_with_more_iterations():
    # With logits of std 5, 20 iterations are not enough for the columns; more iterations converge.
    logits = 5 * torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0))
    plan = R.sinkhorn(logits, iterations=2000)
    torch.testing.assert_close(plan.sum(-1), torch.ones(2, 16), atol=1e-3, rtol=0)
    torch.testing.assert_close(plan.sum(1), torch.full((2, 4), 4.0), atol=4e-3, rtol=0)


def test_sinkhorn_finite_for_huge_logits():
    # The float32 spacing at 1e4 is ~1e-3, so 1e-3 is about the best row accuracy one can ask for here.
    huge = 1e4 * torch.randn(2, 8, 4, generator=torch.Generator().manual_seed(0))
    for logits in (huge, torch.full((1, 8, 4), 1e4), torch.full((1, 1, 1), -1e4)):
        plan = R.sinkhorn(logits)
        assert torch.isfinite(plan).all()
        torch.testing.assert_close(plan.sum(-1), torch.ones(plan.shape[:2]), atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------- sparse OT
def test_sparse_simplex_projection_golden():
    x = torch.tensor([0.5, 0.4, 0.1])
    # k=3: x already on the simplex -> unchanged (tau = 0).
    torch.testing.assert_close(R.sparse_simplex_projection(x, 3), x)
    # k=2: keep .5 and .4; tau = (.9 - 1)/2 = -.05 -> [.55, .45, 0].
    torch.testing.assert_close(R.sparse_simplex_projection(x, 2), torch.tensor([0.55, 0.45, 0.0]))
    # k=1: the top entry gets all the mass.
    torch.testing.assert_close(R.sparse_simplex_projection(x, 1), torch.tensor([1.0, 0.0, 0.0]))
    # [2, 0, 0]: support 1 (0 - (2 - 1)/2 < 0), tau = 1 -> [1, 0, 0].
    one_hot = torch.tensor([1.0, 0.0, 0.0])
    torch.testing.assert_close(R.sparse_simplex_projection(torch.tensor([2.0, 0.0, 0.0]), 3), one_hot)


@FAST
@given(st.integers(1, 3), st.integers(2, 16), st.integers(1, 6), st.integers(0, 2**16), st.data())
def test_sparsity_constrained_plan_properties(groups, tokens, experts, seed, data):
    capacity = data.draw(st.integers(1, tokens))
    scores = torch.softmax(torch.randn(groups, tokens, experts, generator=torch.Generator().manual_seed(seed)), -1)
    plan = R.sparsity_constrained_plan(scores, capacity)
    assert torch.isfinite(plan).all() and (plan >= 0).all()
    # each expert: mass S/E exactly, at most C nonzeros
    torch.testing.assert_close(plan.sum(1), torch.full((groups, experts), tokens / experts), atol=1e-4, rtol=1e-5)
    assert int((plan > 0).sum(1).max()) <= capacity
    choice = R.sparse_expert_choice(scores, capacity)
    assert choice.token_index.shape == (groups, experts, capacity)
    # the expert's plan support is part of its picks
    for g in range(groups):
        for e in range(experts):
            support = set((plan[g, :, e] > 0).nonzero().flatten().tolist())
            assert support <= set(choice.token_index[g, e].tolist())


def test_sparse_ot_adam_moves_towards_the_token_marginals():
    # The semi-dual gradient is P 1_E - 1: Adam steps should reduce the token-marginal violation.
    scores = torch.softmax(2 * torch.randn(4, 32, 4, generator=torch.Generator().manual_seed(1)), -1)

    def violation(iterations):
        plan = R.sparsity_constrained_plan(scores, 8, iterations=iterations, learning_rate=0.05)
        return (plan.sum(-1) - 1).abs().mean()

    assert violation(200) < 0.8 * violation(0)


def test_sparse_expert_choice_tie_break_modes():
    # One expert, S=6 tokens, C=4, alpha = 0 (no Adam step): x = scores / (gamma * S/E) = scores / 6
    # = [.008, .017, .033, .05, .058, 5]. Projecting the top-4 onto the simplex: the support test
    # .058 - (5 + .058 - 1)/2 < 0 keeps only t5 -> plan column [0, 0, 0, 0, 0, 6] (mass S/E = 6).
    scores = torch.tensor([[[0.05], [0.1], [0.2], [0.3], [0.35], [30.0]]])
    plan = R.sparsity_constrained_plan(scores, 4, iterations=0)
    torch.testing.assert_close(plan.view(6), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 6.0]))
    by_score = R.sparse_expert_choice(scores, 4, iterations=0, tie_break="score").token_index[0, 0].tolist()
    by_index = R.sparse_expert_choice(scores, 4, iterations=0, tie_break="index").token_index[0, 0].tolist()
    assert by_score[0] == by_index[0] == 5
    assert by_score == [5, 4, 3, 2]  # remaining slots by softmax score
    assert by_index == [5, 0, 1, 2]  # remaining slots by token index (reference)


# ----------------------------------------------------------------------------- Soft MoE
def test_soft_moe_weights_golden():
    # One group, S=2 tokens x0=[3,0], x1=[0,4]; one expert, one slot mu=[1,0]. Normalised: x0->[1,0],
    # x1->[0,1], mu->[1,0]; logits [1, 0]. dispatch = softmax over tokens = [e, 1]/(e+1); combine over
    # the single slot = 1. The slot input mixes the UN-normalised tokens: e/(e+1)*[3,0] + 1/(e+1)*[0,4].
    x = torch.tensor([[[3.0, 0.0], [0.0, 4.0]]])
    mu = torch.tensor([1.0, 0.0]).view(2, 1, 1)
    dispatch, combine = R.soft_moe_weights(x, mu, 1.0)
    e = math.e
    torch.testing.assert_close(dispatch.view(2), torch.tensor([e / (e + 1), 1 / (e + 1)]))
    torch.testing.assert_close(combine.view(2), torch.ones(2))
    slot_input = torch.einsum("gsep,gsd->gepd", dispatch, x)
    torch.testing.assert_close(slot_input.view(2), torch.tensor([3 * e / (e + 1), 4 / (e + 1)]))
    # the learnable scale multiplies the logits (here mu, the smaller tensor): scale 2 -> logits [2, 0]
    dispatch2, _ = R.soft_moe_weights(x, mu, 2.0)
    torch.testing.assert_close(dispatch2.view(2), torch.softmax(torch.tensor([2.0, 0.0]), 0))


@FAST
@given(
    st.integers(1, 3), st.integers(1, 10), st.integers(1, 5), st.integers(1, 3), st.integers(1, 8), st.integers(0, 2**16)
)
def test_soft_moe_weights_normalised(groups, tokens, experts, slots, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(groups, tokens, dim, generator=gen)
    mu = torch.randn(dim, experts, slots, generator=gen)
    dispatch, combine = R.soft_moe_weights(x, mu, torch.tensor(5.0))
    assert dispatch.shape == combine.shape == (groups, tokens, experts, slots)
    torch.testing.assert_close(dispatch.sum(1), torch.ones(groups, experts, slots))  # columns (slots)
    torch.testing.assert_close(combine.sum((2, 3)), torch.ones(groups, tokens))  # rows (tokens)


# ----------------------------------------------------------------------------- argument checks
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: R.top_k_token_choice(torch.rand(1, 4, 3), 4, 2), "k="),
        (lambda: R.top_k_token_choice(torch.rand(1, 4, 3), 0, 2), "k="),
        (lambda: R.top_k_token_choice(torch.rand(1, 4, 3), 2, 0), "capacity="),
        (lambda: R.top_k_token_choice(torch.rand(4, 3), 2, 2), "rank 3"),
        (lambda: R.expert_choice(torch.rand(1, 4, 3), 0), "capacity="),
        (lambda: R.expert_choice(torch.rand(1, 4, 3), 5), "capacity="),
        (lambda: R.sinkhorn(torch.rand(1, 4, 3), iterations=-1), "sinkhorn_iterations"),
        (lambda: R.sinkhorn(torch.rand(1, 4, 3), epsilon=0.0), "sinkhorn_epsilon"),
        (lambda: R.sparse_expert_choice(torch.rand(1, 4, 3), 2, tie_break="random"), "tie_break"),
    ],
)
def test_pure_functions_reject_bad_settings(call, match):
    with pytest.raises(ConfigError, match=match):
        call()
