"""Chapter 7 (ViMoE): narrowed experts beside a shared expert, bypassing chosen layers' routed experts, the routing
analysis probe, and the chapter's design and claims on synthetic records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from vmoe_lib.analysis import class_expert_information
from vmoe_lib.chapters import placement, shared_experts
from vmoe_lib.chapters.base import ChapterResults
from vmoe_lib.chapters.probes import LayerAnalysisProbe, layer_specialisation
from vmoe_lib.data import ImageDataset
from vmoe_lib.errors import ConfigError
from vmoe_lib.layers import record_routing
from vmoe_lib.models.moe_utils import bypass_moe, count_parameters
from vmoe_lib.predictions import pack_bits
from vmoe_lib.results import MissingResultError, RunResult
from vmoe_lib.stats import decide_family

SE = shared_experts


def _moe(**kw):
    torch.manual_seed(0)
    base = dict(depth=4, moe_layers="all", num_experts=4, k=1, shared_expert=128, expert_width=128)
    return timm.create_model("vmoe_vit_pico_patch7_28", **{**base, **kw}).eval()


# ----------------------------------------------------------------------------------------------- library
def test_narrowed_experts_with_a_shared_expert_keep_the_dense_activated_parameters():
    shared = count_parameters(_moe(), (1, 28, 28))
    plain = count_parameters(_moe(shared_expert=False, expert_width=None), (1, 28, 28))
    dense = count_parameters(timm.create_model("vit_pico_patch7_28", depth=4), (1, 28, 28))
    # per MoE layer one half-width expert and the half-width shared expert: the dense MLP's weights, one more fc1 bias
    assert shared["activated_per_token"] - plain["activated_per_token"] == 4 * 64
    assert plain["activated_per_token"] - dense["activated_per_token"] == 4 * (64 * 4)  # the routers
    assert shared["total"] < plain["total"]
    layer = _moe().blocks[0].mlp
    assert layer.experts.hidden_features == 128 and layer.shared_expert.mlp.fc1.out_features == 128


@pytest.mark.parametrize("bad, match", [(0, "expert_width=0 is invalid"), ("wide", "expert_width='wide' is invalid"),
                                        (True, "expert_width=True is invalid")])
def test_a_bad_expert_width_is_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        _moe(expert_width=bad)


def test_upcycling_refuses_narrowed_experts():
    with pytest.raises(ConfigError, match="expert_width=32 is invalid with expert_init='upcycle'"):
        _moe(expert_width=32, expert_init="upcycle")


def test_bypassing_routed_experts_keeps_the_shared_expert_of_the_chosen_layers_only():
    model = _moe()
    x = torch.randn(3, 1, 28, 28)
    seen = {}
    hooks = [model.blocks[i].mlp.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, (a[0], out)))
             for i in (1, 2)]
    with torch.no_grad(), bypass_moe(model, [1, "blocks.2.mlp"], keep_shared=True):
        bypassed = model(x)
    for h in hooks:
        h.remove()
    # a forward hook sees the layer's own output; bypass_moe's hook (registered later) replaces it afterwards
    with torch.no_grad():
        for i in (1, 2):
            assert torch.allclose(model.blocks[i].mlp.shared_output(seen[i][0]), model.blocks[i].mlp.shared_expert(seen[i][0]))
        full = model(x)
        with bypass_moe(model):
            zeroed = model(x)
        with bypass_moe(model, [0, 1, 2, 3], keep_shared=False):
            zeroed_too = model(x)
    assert not torch.allclose(bypassed, full) and not torch.allclose(bypassed, zeroed)
    assert torch.equal(zeroed, zeroed_too)
    # the hooks are gone after the block
    with torch.no_grad():
        assert torch.equal(model(x), full)


def test_bypass_keep_shared_on_a_layer_without_a_shared_expert_zeroes_it():
    model = _moe(shared_expert=False, expert_width=None)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad(), bypass_moe(model, keep_shared=True):
        a = model(x)
    with torch.no_grad(), bypass_moe(model):
        b = model(x)
    assert torch.equal(a, b)
    with pytest.raises(ConfigError, match="has no shared expert"):
        model.blocks[0].mlp.shared_output(x)


@pytest.mark.parametrize("layers", [[7], ["blocks.9.mlp"], "blocks.0.mlp", [True], 3])
def test_bypass_refuses_layers_the_model_does_not_have(layers):
    with pytest.raises(ConfigError, match="bypass_moe: layers=.* is invalid; use None or a list of this model's MoE layers"):
        with bypass_moe(_moe(moe_layers=[0, 1]), layers):
            pass


def test_the_recorder_stores_each_class_token_count_and_specialisation_weights_by_it():
    model = _moe(depth=2, moe_layers=[1])
    x, y = torch.randn(8, 1, 28, 28), torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
    with torch.no_grad(), record_routing(model, 3) as rec:
        rec.labels = y
        model(x)
    st = rec.summary()["blocks.1.mlp"]
    assert st["class_assignments"] == [6 * 17.0, 17.0, 17.0]  # k = 1: one pair per token, 17 tokens an image
    value = layer_specialisation({"blocks.1.mlp": st})["blocks.1.mlp"]
    assert value == pytest.approx(class_expert_information(st["class_expert"], [0.75, 0.125, 0.125]))


def _dataset(n: int = 24) -> ImageDataset:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.arange(n) % 3
    return ImageDataset("tiny", images, labels, images[:12], labels[:12], images, labels, ("a", "b", "c"), (0.5,),
                        (0.5,), {})


def test_the_layer_analysis_probe_ranks_on_validation_and_bypasses_on_test():
    model = _moe()
    out = LayerAnalysisProbe()(model, _dataset(), torch.device("cpu"))
    la = out["layer_analysis"]
    assert out["probe"]["images"] == 24 and set(out["routing"]) == {f"blocks.{i}.mlp" for i in range(4)}
    values = {st["layer"]: st["value"] for st in la["specialisation"].values()}
    assert sorted(la["ranking"]) == [0, 1, 2, 3]
    assert [values[i] for i in la["ranking"]] == sorted(values.values())
    assert la["bypass"]["least"]["layers"] == sorted(la["ranking"][:2])
    assert la["bypass"]["most"]["layers"] == sorted(la["ranking"][2:])
    assert {f"layer:{i}" for i in range(4)} | {"all", "least", "most"} == set(la["bypass"])
    assert "correct" in la["bypass"]["least"] and "correct" not in la["bypass"]["layer:0"]
    assert la["class_names"] == ["a", "b", "c"] and la["split"] == "val"
    from vmoe_lib.chapters.probes import eval_loader, recorded_eval

    with bypass_moe(model, keep_shared=True):
        metrics, _ = recorded_eval(model, eval_loader(_dataset(), torch.device("cpu")), None)
    assert la["bypass"]["all"]["accuracy"] == metrics["accuracy"]
    one = LayerAnalysisProbe()(_moe(moe_layers=[3]), _dataset(), torch.device("cpu"))["layer_analysis"]
    assert set(one["bypass"]) == {"all", "layer:3"}  # one MoE layer: no halves to compare
    assert LayerAnalysisProbe(100).settings() == {"layer_analysis": {"probe_images": 100}}
    assert LayerAnalysisProbe()(timm.create_model("vit_pico_patch7_28"), _dataset(), torch.device("cpu")) == {}


# ----------------------------------------------------------------------------------------------- the chapter
def test_the_chapter_declares_its_design():
    ch = SE.chapter
    cpu = ch.preset("cpu")
    (first,) = ch.prerequisites(cpu)
    plain = placement.chapter.experiment("cpu")
    assert first.name == SE.ALL and first.seeds == tuple(range(8)) and isinstance(first.probe, LayerAnalysisProbe)
    assert first.config == SE.shared_config(plain["vit_all"])
    kw = first.config.model_kwargs
    assert kw["shared_expert"] == kw["expert_width"] == 128 and kw["moe_layers"] == "all"
    assert {k: v for k, v in kw.items() if k not in ("shared_expert", "expert_width")} == plain["vit_all"].model_kwargs
    assert ch.plain_configs(cpu)["vit_last2"] == plain["vit_last2"]  # borrowed: chapter 2's configs exactly
    assert SE.pruned_config(plain["vit_all"], [5, 1, 3]).model_kwargs["moe_layers"] == [1, 3, 5]
    claims = {c.id: c for c in ch.claims("cpu")}
    assert {f"shared_beats_plain_{t}" for t in placement.PLACEMENTS} <= set(claims)
    assert {"shared_reduces_placement_spread", "analysis_predicts_bypass_cost", "pruned_noninferior_all",
            "routed_experts_carry_weight_all"} <= set(claims)
    assert all(c.control in claims for c in claims.values() if c.control)
    assert all(c.paper is not None for c in claims.values() if c.kind == "claim")
    assert set(ch.planned_power("cpu")["seeds"]) == {4, 8}
    with pytest.raises(MissingResultError, match="python -m vmoe_lib run shared_experts --preset gpu"):
        ch.experiment("gpu")


def test_the_pruned_layers_follow_the_pre_registered_rule():
    def run(seed, values):
        la = {"specialisation": {f"blocks.{i}.mlp": {"layer": i, "value": v} for i, v in enumerate(values)}}
        return RunResult(SE.ALL, seed, None, {"extra": {"layer_analysis": la}}, {}, Path("x"))

    mean, chosen = SE.SharedExperts.ranking([run(0, [0.1, 0.5, 0.2, 0.4, 0.3, 0.6]), run(1, [0.3, 0.1, 0.2, 0.4, 0.5, 0.6])])
    assert mean[0] == pytest.approx(0.2) and chosen == [3, 4, 5]
    _, tied = SE.SharedExperts.ranking([run(0, [0.2, 0.2, 0.1, 0.1])])
    assert tied == [0, 1]  # the top half of 4: blocks 0 and 1 (tie between them broken towards the later block)
    _, tie_at_cut = SE.SharedExperts.ranking([run(0, [0.3, 0.2, 0.2, 0.1])])
    assert tie_at_cut == [0, 2]  # 0.2 tied at the cut: the later block is ranked more specialised
    with pytest.raises(ConfigError, match="store no routing analysis"):
        SE.SharedExperts.ranking([])


# ----------------------------------------------------------------------------------------------- synthetic records
N = 400


def _bits(acc: float, seed: int) -> str:
    rng = np.random.default_rng(seed)
    right = np.zeros(N, dtype=bool)
    right[rng.permutation(N)[: int(round(acc * N))]] = True
    return right


def _record(acc: float, seed: int, *, analysis: dict | None = None, params=(1_000_000, 300_000)) -> dict:
    from vmoe_lib.predictions import pack_predictions

    right = _bits(acc, seed)
    labels = np.zeros(N, dtype=np.int64)
    pred = np.where(right, 0, 1)
    history = [{"epoch": 1, "train_images_per_second": 1000.0, "epoch_seconds": 60.0}]
    rec = {"final": {"test_accuracy": float(right.mean()), "val_accuracy": acc, "train_accuracy": acc}, "history": history,
           "wall_time_s": 60.0,
           "costs": {"params_total": params[0], "params_activated": params[1], "flops_per_image": 1e7},
           "moe_bypass": {"accuracy": 0.5, "correct": pack_bits(np.zeros(N, dtype=bool))},
           "predictions": pack_predictions(pred, labels, np.where(right, 0.9, 0.1)), "extra": {"routing": {}}}
    if analysis is not None:
        rec["extra"]["layer_analysis"] = analysis
    return rec


def _analysis(seed: int, acc: float, least: float, most: float, every: float) -> dict:
    base = _bits(acc, seed)

    def drop(cost: float, salt: int) -> np.ndarray:
        out = base.copy()
        rng = np.random.default_rng(1000 + salt + seed)
        hit = rng.permutation(np.flatnonzero(out))[: int(round(cost * N))]
        out[hit] = False
        return out

    values = [0.05, 0.10, 0.30, 0.20, 0.40, 0.35]
    ranking = sorted(range(6), key=lambda i: (values[i], i))
    bypass = {key: {"layers": layers, "accuracy": float(bits.mean()), "correct": pack_bits(bits)["bits"]}
              for key, layers, bits in (("least", sorted(ranking[:3]), drop(least, 1)),
                                        ("most", sorted(ranking[3:]), drop(most, 2)), ("all", list(range(6)), drop(every, 3)))}
    bypass.update({f"layer:{i}": {"layers": [i], "accuracy": float(base.mean()) - 0.02 * values[i]} for i in range(6)})
    return {"split": "val", "specialisation": {f"blocks.{i}.mlp": {"layer": i, "value": values[i]} for i in range(6)},
            "ranking": ranking, "bypass": bypass, "class_names": [f"c{i}" for i in range(10)]}


def _sweep(*, gain: float = 0.01, least: float = 0.01, most: float = 0.08, every: float = 0.2, pruned: float = 0.0,
           plain_spread: float = 0.01) -> ChapterResults:
    ch = SE.chapter
    cpu = ch.preset("cpu")
    plain = ch.plain_configs(cpu)
    runs = []
    offsets = {t: plain_spread * (i - 2) for i, t in enumerate(placement.PLACEMENTS)}
    table = [[0.25] * 4 for _ in range(10)]
    routing = {f"blocks.{i}.mlp": {"layer": i, "class_expert": table, "expert_load": [0.25] * 4} for i in range(6)}
    for s in range(8):
        jitter = 0.0025 * ((s * 7) % 5 - 2)
        acc_all = 0.80 + gain + 1.5 * jitter
        rec = _record(acc_all, s, analysis=_analysis(s, acc_all, least, most, every))
        rec["extra"]["routing"] = routing
        runs.append(RunResult(SE.ALL, s, SE.shared_config(plain["vit_all"]), rec, {}, Path("x")))
        runs.append(RunResult(SE.PRUNED, s, SE.pruned_config(plain["vit_all"], [2, 4, 5]),
                              _record(acc_all + pruned + 0.5 * jitter, 100 + s, params=(600_000, 300_000)), {}, Path("x")))
        if s >= 4:
            continue
        for t in placement.PLACEMENTS:
            base = 0.80 + offsets[t] + jitter
            runs.append(RunResult(f"vit_{t}", s, plain[f"vit_{t}"], _record(base, 200 + s), {}, Path("x")))
            if t != "all":
                noise = 0.0025 * ((s + len(t)) % 3 - 1)  # per seed and placement: the spreads vary from seed to seed
                runs.append(RunResult(f"vit_{t}_shared", s, SE.shared_config(plain[f"vit_{t}"]),
                                      _record(0.80 + gain + offsets[t] / 4 + 2 * jitter + noise, 300 + s), {}, Path("x")))
        runs.append(RunResult("vit_dense", s, plain["vit_dense"], _record(0.79 + jitter, 400 + s), {}, Path("x")))
    return ChapterResults(SE.NAME, "cpu", runs)


def _passing(tests):
    from vmoe_lib.stats import paired_t

    return {k: paired_t([0.8, 0.81, 0.82], [0.5, 0.5, 0.51]) for k in tests if k.startswith("experts_carry")}


def test_claims_flip_with_the_numbers_and_depend_on_their_controls():
    ch = SE.chapter
    claims = ch.claims("cpu")
    tests = ch.test_results(_sweep())
    # the routed experts' control reads the probe's bits: 20 % of the images lost when all are bypassed
    assert tests["routed_experts_carry_weight_all"].effect == pytest.approx(20.0, abs=0.5)
    assert tests["analysis_predicts_bypass_cost"].effect == pytest.approx(7.0, abs=0.5)
    decided = {v.claim_id: v.verdict for v in decide_family(claims, {**tests, **_passing(tests)})}
    assert decided["routed_experts_carry_weight_all"] == "passed"
    assert decided["analysis_predicts_bypass_cost"] == "reproduced"
    assert decided["pruned_noninferior_all"] == "reproduced"
    assert decided["shared_reduces_placement_spread"] == "reproduced"
    assert decided["shared_beats_plain_last2"] == "reproduced"
    # the stored bypass controls of synthetic records cost 30 points: passing; a failed one makes its claim not testable
    flipped = _sweep(gain=-0.01, least=0.08, most=0.01, pruned=-0.03)
    tests = ch.test_results(flipped)
    decided = {v.claim_id: v.verdict for v in decide_family(claims, {**tests, **_passing(tests)})}
    assert decided["analysis_predicts_bypass_cost"] == "not reproduced"
    assert decided["pruned_noninferior_all"] == "not reproduced"
    assert decided["shared_beats_plain_last2"] == "not reproduced"
    weak = _sweep(every=0.0)
    tests = ch.test_results(weak)
    decided = {v.claim_id: v.verdict for v in decide_family(claims, {**tests, **_passing(tests)})}
    assert decided["routed_experts_carry_weight_all"] == "failed"
    assert decided["analysis_predicts_bypass_cost"] == decided["pruned_noninferior_all"] == "not testable"


def test_tables_figures_and_findings_on_synthetic_records():
    import matplotlib.pyplot as plt

    from vmoe_lib.plots import check_readable

    ch = SE.chapter
    results = _sweep()
    layers = ch.layer_table(results)
    assert list(layers.index[layers["MoE in the pruned model"] == "yes"]) == ["block 2", "block 4", "block 5"]
    assert layers.loc["block 4", "specialisation (val, %)"] == 40.0
    assert layers.loc["block 0", "mean rank (1 = least)"] == 1.0
    bypass = ch.bypass_table(results)
    assert bypass.loc["most specialised half bypassed", "cost (points)"] == pytest.approx(8.0, abs=0.3)
    table = ch.model_table(results)
    assert table.loc[SE.PRUNED, "MoE blocks"] == "[2, 4, 5]" and table.loc["vit_last2_shared", "shared expert"] == "yes"
    assert table.loc["vit_last2", "MoE blocks"] == "Last-2"
    text = ch.findings(results)
    a, b = results.paired("vit_last2_shared", "vit_last2")
    assert f"Last-2 {100 * (np.mean(a) - np.mean(b)):+.2f}" in text and "most specialised block is block 4" in text and "Pruned vs All" in text
    for plot in (ch.plot_accuracy, ch.plot_bypass_vs_specialisation, ch.plot_class_expert):
        fig = plot(results)
        check_readable(fig)
        plt.close(fig)
