"""Efficient ensembles of experts (E³): tiling, partitioned routing, ensemble log-probabilities worked out by hand,
training with repeated labels, calibration metrics, the per-image bootstrap, and chapter 8's claims on synthetic
records."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from helpers_foundation import use_hermetic_folders
from vmoe_lib.calibration import (confidence_correct, ece_resampled, ensemble_log_probs, expected_calibration_error,
                                  nll_per_image, pack_log_probs, reliability_table, unpack_labels, unpack_log_probs)
from vmoe_lib.errors import ConfigError
from vmoe_lib.layers import record_routing
from vmoe_lib.models import set_routing
from vmoe_lib.models.ensemble import ensemble_log_probs as torch_ensemble_log_probs
from vmoe_lib.models.ensemble import ensemble_size, ensemble_targets, member_log_probs, members_apart
from vmoe_lib.routers import create_router
from vmoe_lib.routers.ensemble_routing import EnsembleRouter
from vmoe_lib.stats import bootstrap_contrast
from vmoe_lib.train import TrainConfig, train_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _e3(members=2, **kw):
    torch.manual_seed(0)
    base = dict(depth=4, moe_layers="last-2", num_experts=4, k=1, ensemble_size=members, capacity_factor=1.0,
                eval_capacity_factor=4.0, num_classes=10, in_chans=1)
    return timm.create_model("vmoe_vit_test_patch7_28", **{**base, **kw})


# ----------------------------------------------------------------------------------------------- tiling
def test_the_input_is_tiled_member_major_just_before_the_first_moe_block():
    model = _e3().eval()
    first = min(layer.layer_index for layer in (b.mlp for b in model.blocks) if hasattr(layer, "ensemble_size"))
    seen = {}

    def keep(i):
        def hook(module, args, out):
            seen.setdefault(i, (args[0].shape[0], out.detach().clone()))
        return hook

    for i, block in enumerate(model.blocks):
        block.register_forward_hook(keep(i))
    x = torch.randn(3, 1, 28, 28)
    model(x)
    assert first == 1  # test depth 4, last-2: blocks 1 and 3
    assert seen[0][0] == 3  # before the first MoE block: once
    assert all(seen[i][0] == 6 for i in range(first, 4))  # from it on: two copies
    # the copies enter the first MoE block identical: member-major rows m * B + i
    tiled_input = seen[0][1].repeat(2, 1, 1)
    entering = {}

    def pre(module, args):
        entering.setdefault("x", args[0].clone())

    model.blocks[first].register_forward_pre_hook(pre)
    model(x)
    assert torch.equal(entering["x"], tiled_input)  # the pre-hook that tiles runs before this one sees the input


def test_training_returns_every_members_logits_and_eval_the_ensembles_log_probabilities():
    model = _e3()
    x = torch.randn(4, 1, 28, 28)
    model.train()
    assert model(x).shape == (8, 10)
    model.eval()
    out = model(x)
    assert out.shape == (4, 10)
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(4))
    with members_apart(model):
        members = model(x)
    assert members.shape == (8, 10)
    by_hand = torch.log((F.softmax(members[:4], -1) + F.softmax(members[4:], -1)) / 2)
    torch.testing.assert_close(out, by_hand)
    torch.testing.assert_close(member_log_probs(model, x), F.log_softmax(members, -1).view(2, 4, 10))
    # the cross-entropy of the eval output is the ensemble's NLL
    y = torch.tensor([0, 3, 5, 9])
    torch.testing.assert_close(F.cross_entropy(out, y), -by_hand[torch.arange(4), y].mean())


def test_ensemble_log_probabilities_worked_out_by_hand():
    # member 0: logits (0, 0) -> p = (1/2, 1/2); member 1: (log 3, 0) -> (3/4, 1/4); mean (5/8, 3/8)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    torch.testing.assert_close(torch_ensemble_log_probs(logits, 2), torch.log(torch.tensor([[5 / 8, 3 / 8]])))
    lp = np.log(np.array([[[0.5, 0.5]], [[0.75, 0.25]]]))
    np.testing.assert_allclose(ensemble_log_probs(list(lp)), np.log([[5 / 8, 3 / 8]]), rtol=1e-6)
    with pytest.raises(ConfigError, match="not \\(M B, C\\) with M=2"):
        torch_ensemble_log_probs(torch.zeros(3, 2), 2)


def test_flops_count_the_tiled_blocks_twice_and_activated_parameters_both_members():
    from vmoe_lib.costs import model_costs

    single = model_costs(_e3(members=1), (1, 28, 28))
    e3 = model_costs(_e3(members=2), (1, 28, 28))
    assert e3["params_total"] == single["params_total"]  # M gates of D x E/M: the single router's D x E weights
    assert 1.4 < e3["flops_per_image"] / single["flops_per_image"] < 1.8  # blocks 1-3 of 4 (and the head) twice
    layer = _e3().blocks[1].mlp
    assert layer.experts_per_token() == 2.0  # k = 1 in each of 2 members (nominal, before a forward)


# ------------------------------------------------------------------------------------------- partitioned routing
def _reference_partitioned(logits: torch.Tensor, members: int, capacity: int) -> list[tuple[int, int, int, int]]:
    """The reference's block-diagonal top-1 routing of one group holding every copy of ``S`` tokens, in the
    reference's order (token-major, then member): (member, token, expert, slot) of each kept assignment."""
    M, S, E_m = logits.shape
    counts = [0] * (M * E_m)
    kept = []
    for s in range(S):
        for m in range(M):
            expert = m * E_m + int(logits[m, s].argmax())
            if counts[expert] < capacity:
                kept.append((m, s, expert, counts[expert]))
            counts[expert] += 1
    return sorted(kept)


def test_partitioned_routing_equals_the_block_diagonal_reference_worked_by_hand():
    torch.manual_seed(1)
    E, M, S, D = 4, 2, 6, 5
    router = EnsembleRouter("softmax_token_choice", dim=D, num_experts=E, ensemble_size=M, k=1, capacity_factor=1.0,
                            noise_std=0.0, capacity_multiple=1)
    x = torch.randn(1, S, D)
    routing = router(x.repeat(M, 1, 1))  # one group per member: the copies of the same S tokens
    logits = torch.stack([member.gate(x)[0] for member in router.members])  # (M, S, E/M)
    # C = ceil(S k cf / (E/M)) for a member's group = ceil(M S k cf / E) for the reference's group of all copies
    capacity = math.ceil(S * 1 * 1.0 / (E // M))
    assert routing.capacity == capacity == math.ceil(M * S * 1.0 / E)
    got = sorted(zip(routing.group_index.tolist(), routing.token_index.tolist(), routing.expert_index.tolist(),
                     routing.slot_index.tolist()))
    assert got == _reference_partitioned(logits, M, capacity)
    assert routing.num_experts == E and routing.num_groups == M
    # member m only reaches set m
    for m in range(M):
        experts = routing.expert_index[routing.group_index == m]
        assert ((experts >= m * E // M) & (experts < (m + 1) * E // M)).all()


def test_each_member_routes_as_its_own_router_on_its_own_copies():
    torch.manual_seed(2)
    router = EnsembleRouter("softmax_token_choice", dim=8, num_experts=8, ensemble_size=2, k=2, noise_std=0.0)
    x = torch.randn(4, 10, 8)
    merged = router(x)
    for m, member in enumerate(router.members):
        own = member(x[2 * m: 2 * m + 2])
        sel = (merged.group_index >= 2 * m) & (merged.group_index < 2 * m + 2)
        assert torch.equal(merged.group_index[sel] - 2 * m, own.group_index)
        assert torch.equal(merged.expert_index[sel] - 4 * m, own.expert_index)
        assert torch.equal(merged.slot_index[sel], own.slot_index)
        torch.testing.assert_close(merged.combine_weight[sel], own.combine_weight)
    losses = torch.stack([member(x[2 * m: 2 * m + 2]).aux_loss for m, member in enumerate(router.members)])
    torch.testing.assert_close(merged.aux_loss, losses.mean())
    assert float(merged.metrics["expert_load"].sum()) == pytest.approx(1.0)
    assert merged.metrics["expert_load"].shape == (8,)


def test_routing_groups_never_straddle_two_members():
    model = _e3(group_size=8).eval()
    layer = model.blocks[1].mlp
    layer.keep_routing = True
    model(torch.randn(6, 1, 28, 28))  # 12 rows, groups of 6 images (the largest divisor of 6 that is <= 8)
    r = layer.last_routing
    assert r.num_groups == 2 and r.group_size == 6 * 17
    assert set(r.expert_index[r.group_index == 0].tolist()) <= {0, 1}
    assert set(r.expert_index[r.group_index == 1].tolist()) <= {2, 3}


def test_routing_settings_reach_every_member_and_the_recorder_labels_every_copy():
    model = _e3().eval()
    set_routing(model, eval_capacity_factor=2.0)
    for block in (model.blocks[1], model.blocks[3]):
        assert [m.eval_capacity_factor for m in block.mlp.router.members] == [2.0, 2.0]
        assert block.mlp.router.eval_capacity_factor == 2.0
    with pytest.raises(ConfigError):
        set_routing(model, k=5)  # each member has 2 experts
    with record_routing(model, num_classes=10) as rec:
        rec.labels = torch.tensor([1, 2, 3])
        model(torch.randn(3, 1, 28, 28))
    table = np.array(rec.summary()["blocks.1.mlp"]["class_expert"])
    assert table.shape == (10, 4)
    assert np.allclose(table[[1, 2, 3]].sum(1), 1.0) and table[0].sum() == 0  # each labelled class's tokens, both copies
    for c in (1, 2, 3):  # half of a class's tokens (the copy of member 0) in set 0, half in set 1 (no drops at cf 2)
        assert table[c, :2].sum() == pytest.approx(0.5) and table[c, 2:].sum() == pytest.approx(0.5)


def test_convnext_tiles_its_feature_maps():
    torch.manual_seed(0)
    model = timm.create_model("vmoe_convnext_test_32", num_experts=4, k=1, ensemble_size=2, num_classes=10,
                              in_chans=3).eval()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10) and ensemble_size(model) == 2
    model.train()
    assert model(torch.randn(2, 3, 32, 32)).shape == (4, 10)


@pytest.mark.parametrize("kwargs, match", [
    (dict(ensemble_size=3), "ensemble_size=3 is invalid with num_experts=4"),
    (dict(ensemble_size=0), "ensemble_size=0 is invalid"),
    (dict(ensemble_size=1.5), "ensemble_size=1.5 is invalid"),
    (dict(router="soft"), "ensemble_size=2 is invalid with router='soft'"),
    (dict(router="per_image"), "ensemble_size=2 is invalid with router='per_image'"),
    (dict(features_only=True), "features_only=True is invalid with ensemble_size=2"),
])
def test_a_bad_ensemble_is_refused_with_what_is_allowed(kwargs, match):
    with pytest.raises(ConfigError, match=match.replace("(", "\\(").replace(")", "\\)")):
        _e3(**{"members": kwargs.pop("ensemble_size", 2), **kwargs})


def test_an_e3_layer_alone_refuses_a_batch_that_holds_no_whole_copies():
    layer = _e3().blocks[1].mlp
    with pytest.raises(ConfigError, match="got a batch of 3 images, not a multiple of 2"):
        layer(torch.randn(3, 17, 32))


def test_ensemble_targets_repeat_the_labels_member_major():
    assert ensemble_targets(torch.tensor([4, 7]), 2).tolist() == [4, 7, 4, 7]
    assert ensemble_targets(torch.tensor([4, 7]), 1).tolist() == [4, 7]


def test_the_engine_trains_every_member_on_its_labels(data_dir, tmp_path, monkeypatch):
    use_hermetic_folders(monkeypatch, data_dir, tmp_path)
    config = TrainConfig(model="vmoe_vit_test_patch7_28", model_kwargs={"num_experts": 4, "k": 1, "ensemble_size": 2},
                         val_size=100, train_subset=128, eval_subset=100, epochs=1, batch_size=64, eval_batch_size=100)
    record = train_model(config, 0, device="cpu", progress=False)
    final = record["final"]
    assert 0.0 <= final["train_accuracy"] <= 1.0 and math.isfinite(final["test_loss"])
    assert record["costs"]["flops_per_image"] > 0


# ----------------------------------------------------------------------------------------------- calibration
def test_expected_calibration_error_worked_out_by_hand():
    # 2 bins: (0, .5] holds confidences .3 (wrong) and .5 (right): accuracy .5, confidence .4 -> gap .1 x 2/4
    #         (.5, 1] holds .9 (right) and .7 (wrong): accuracy .5, confidence .8 -> gap .3 x 2/4
    conf = np.array([0.3, 0.5, 0.9, 0.7])
    right = np.array([False, True, True, False])
    assert expected_calibration_error(conf, right, bins=2) == pytest.approx(0.5 * 0.1 + 0.5 * 0.3)
    table = reliability_table(conf, right, bins=2)
    assert table["images"].tolist() == [2, 2]
    assert table["accuracy"].tolist() == [0.5, 0.5] and table["confidence"].tolist() == pytest.approx([0.4, 0.8])
    idx = np.array([[0, 1, 2, 3], [2, 2, 3, 3], [0, 0, 0, 1]])
    expect = [expected_calibration_error(conf[i], right[i], bins=2) for i in idx]
    np.testing.assert_allclose(ece_resampled(conf, right, idx, bins=2), expect)
    with pytest.raises(ConfigError, match="bins=0 is invalid"):
        expected_calibration_error(conf, right, bins=0)


def test_nll_confidence_and_the_stored_log_probabilities_round_trip():
    p = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]])
    y = np.array([0, 1, 2])
    lp = np.log(p)
    np.testing.assert_allclose(nll_per_image(lp, y), -np.log([0.7, 0.1, 0.25]))
    conf, right = confidence_correct(lp, y)
    np.testing.assert_allclose(conf, [0.7, 0.8, 0.5])
    assert right.tolist() == [True, False, False]
    stored = pack_log_probs(lp, y)
    back = unpack_log_probs(stored)
    np.testing.assert_allclose(back, lp, rtol=2e-3)
    assert unpack_labels(stored).tolist() == [0, 1, 2]
    with pytest.raises(ConfigError, match="not log-probabilities"):
        pack_log_probs(p + 1)
    with pytest.raises(ConfigError, match="carry no labels"):
        unpack_labels(pack_log_probs(lp))


def test_confidence_is_the_same_on_every_cpu():
    """The confidence is exp in float64 rounded to float32, equal to the scalar libm value rounded the same way (numpy's
    float32 exp picks a SIMD kernel by CPU and differed in the last bit between machines, and so did stored ECEs)."""
    import math

    lp = -np.random.default_rng(0).random((2000, 1)).astype(np.float32) * 5
    conf, _ = confidence_correct(lp, np.zeros(2000, dtype=np.int64))
    assert conf.dtype == np.float32
    assert conf.tolist() == [float(np.float32(math.exp(float(v)))) for v in lp[:, 0]]


def test_bootstrap_contrast_is_deterministic_oriented_and_reads_a_margin():
    rng = np.random.default_rng(0)
    d = rng.normal(1.0, 1.0, 500)  # per-image effect A - B, mean about 1
    stat = lambda idx: d[idx].mean(axis=1)  # noqa: E731
    a = bootstrap_contrast(stat, 500, resamples=500)
    assert a == bootstrap_contrast(stat, 500, resamples=500)
    assert a.effect == pytest.approx(d.mean()) and a.lower < a.effect < a.upper and a.p_value < 0.01
    assert a.test == "paired_bootstrap"
    b = bootstrap_contrast(stat, 500, direction="less", resamples=500)
    assert b.effect == pytest.approx(-d.mean()) and b.p_value > 0.99
    c = bootstrap_contrast(lambda idx: -stat(idx), 500, margin=2.0, resamples=500)  # -1 against a margin of 2
    assert c.test == "noninferiority" and c.p_value < 0.01
    c = bootstrap_contrast(lambda idx: -stat(idx), 500, margin=0.5, resamples=500)
    assert c.p_value > 0.99 and c.upper < -0.5


# ----------------------------------------------------------------------------------------------- chapter 8's claims
from pathlib import Path  # noqa: E402

from vmoe_lib.chapters import efficient_ensembles as EE  # noqa: E402
from vmoe_lib.chapters.base import ChapterResults  # noqa: E402
from vmoe_lib.predictions import pack_predictions  # noqa: E402
from vmoe_lib.results import RunResult  # noqa: E402
from vmoe_lib.stats import decide_family  # noqa: E402

N_IMAGES, CLASSES = 3000, 10
LABELS = np.random.default_rng(123).integers(0, CLASSES, N_IMAGES)


def _log_probs(strength: float, seed: int) -> np.ndarray:
    logits = np.random.default_rng(seed).normal(0.0, 1.0, (N_IMAGES, CLASSES))
    logits[np.arange(N_IMAGES), LABELS] += strength
    return logits - np.log(np.exp(logits).sum(1, keepdims=True))


def _record(log_probs: np.ndarray, flops: float, members: list[np.ndarray] | None = None) -> dict:
    summary = EE.metrics_of(log_probs, LABELS)
    calibration = {"split": "test", "bins": 15, **summary, "log_probs": pack_log_probs(log_probs, LABELS)}
    if members is not None:
        calibration["members"] = [EE.metrics_of(m, LABELS) for m in members]
        calibration["disagreement"] = float((members[0].argmax(1) != members[1].argmax(1)).mean())
    pred = log_probs.argmax(1)
    return {"final": {"test_accuracy": summary["accuracy"], "val_accuracy": summary["accuracy"]},
            "history": [{"epoch": 1, "train_images_per_second": 1000.0, "epoch_seconds": 60.0}], "wall_time_s": 60.0,
            "costs": {"params_total": 769_290, "params_activated": 306_000, "flops_per_image": flops},
            "predictions": pack_predictions(pred, LABELS, np.exp(log_probs[np.arange(N_IMAGES), LABELS])),
            "extra": {"calibration": calibration}}


def _sweep(e3_strength: float = 2.6, single_strength: float = 2.0, deep_diverse: bool = True, e3_seeds=4):
    plain = EE.chapter.plain_configs(EE.chapter.preset("cpu"))
    runs = []
    for s in range(2 * e3_seeds):
        noise_seed = 1000 + s if deep_diverse else 1000  # identical singles: a deep ensemble gains nothing
        runs.append(RunResult(EE.SINGLE, s, EE.single_config(plain["moe"]),
                              _record(_log_probs(single_strength, noise_seed), 10.6e6), {}, Path("x")))
    for s in range(e3_seeds):
        members = [_log_probs(e3_strength, 2000 + 10 * s + m) for m in range(2)]
        ens = ensemble_log_probs(members)
        runs.append(RunResult(EE.E3, s, EE.e3_config(plain["moe"]), _record(ens, 15.8e6, members), {}, Path("x")))
    for s in range(2):
        runs.append(RunResult(EE.DENSE, s, EE.single_config(plain["dense"]),
                              _record(_log_probs(1.8, 3000 + s), 10.5e6), {}, Path("x")))
    return ChapterResults(EE.NAME, "cpu", runs)


def _verdicts(results):
    claims = EE.chapter.claims("cpu")
    return {v.claim_id: v for v in decide_family(claims, EE.chapter.test_results(results))}


def test_chapter_claims_are_declared_with_their_control_and_units():
    claims = EE.chapter.claims("cpu")
    ids = [c.id for c in claims]
    assert ids[0] == EE.CONTROL and claims[0].kind == "control"
    assert {f"e3_beats_single_{m}" for m in EE.METRICS} <= set(ids)
    assert {f"e3_beats_single_{m}_per_image" for m in EE.METRICS} <= set(ids)
    assert all(c.control == EE.CONTROL for c in claims[1:])
    assert all(c.paper.paper == "e3" for c in claims[1:])
    by_id = {c.id: c for c in claims}
    assert by_id["e3_beats_single_nll"].direction == "less" and by_id["e3_beats_single_accuracy"].direction == "greater"
    assert by_id["e3_noninferior_deep_ensemble_nll"].test == "noninferiority"


def test_deep_ensembles_pair_seed_i_with_seed_n_plus_i():
    results = _sweep()
    pairs = EE.deep_ensembles(results)
    assert [(i, a.seed, b.seed) for i, a, b in pairs] == [(0, 0, 4), (1, 1, 5), (2, 2, 6), (3, 3, 7)]
    short = ChapterResults(EE.NAME, "cpu", [r for r in results.results if not (r.name == EE.SINGLE and r.seed == 5)])
    assert [i for i, *_ in EE.deep_ensembles(short)] == [0, 2, 3]


def test_claims_flip_with_the_numbers():
    better = _verdicts(_sweep(e3_strength=2.6))
    assert better[EE.CONTROL].verdict == "passed"
    for claim in ("e3_beats_single_accuracy", "e3_beats_single_nll", "e3_beats_single_accuracy_per_image",
                  "e3_beats_single_nll_per_image"):
        assert better[claim].verdict == "reproduced", (claim, better[claim].why)
    worse = _verdicts(_sweep(e3_strength=1.4))
    assert worse[EE.CONTROL].verdict == "passed"
    for claim in ("e3_beats_single_accuracy", "e3_beats_single_nll", "e3_beats_single_accuracy_per_image",
                  "e3_beats_single_nll_per_image", "e3_noninferior_deep_ensemble_nll_per_image"):
        assert worse[claim].verdict == "not reproduced", (claim, worse[claim].why)
    assert better["e3_noninferior_deep_ensemble_nll_per_image"].verdict == "reproduced"


def test_every_claim_is_not_testable_when_ensembling_carries_no_weight():
    verdicts = _verdicts(_sweep(deep_diverse=False))
    assert verdicts[EE.CONTROL].verdict == "failed"
    assert "effect" in verdicts[EE.CONTROL].why  # not "cost": the control is an NLL gain
    assert all(v.verdict == "not testable" for k, v in verdicts.items() if k != EE.CONTROL)


def test_tables_figures_and_findings_read_the_synthetic_sweep():
    import matplotlib.pyplot as plt

    results = _sweep()
    arms = EE.chapter.arm_table(results)
    assert list(arms.index) == ["dense ViT", "single MoE (8 experts, k = 1)", "E³ (2 x 4 experts, k = 1 each)",
                                "deep ensemble of 2 single MoEs"]
    assert arms.loc["E³ (2 x 4 experts, k = 1 each)", "FLOPs vs deep ens."] == f"{15.8 / 21.2:.2f}x"
    members = EE.chapter.members_table(results)
    assert {"E³: the ensemble", "deep ensemble: the ensemble"} <= set(members.index)
    text = EE.chapter.findings(results)
    assert "E³ minus single MoE" in text and "% fewer" in text
    for fig in (EE.chapter.plot_metrics_vs_flops(results), EE.chapter.plot_reliability(results)):
        assert fig.axes
        plt.close(fig)
