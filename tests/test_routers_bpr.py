"""The routers/BPR chapter: equal-compute settings, the post-training routing probe, and its analysis."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import vmoe_lib as vl
from vmoe_lib.chapters import routers_bpr
from vmoe_lib.chapters.base import ChapterResults
from vmoe_lib.data import ImageDataset
from vmoe_lib.layers.stats import collect_routing_stats, moe_layers
from vmoe_lib.models import set_routing

chapter = routers_bpr.chapter


def _dataset(n_test: int = 48, seed: int = 0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n_test, 1, 28, 28), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n_test,), generator=g)
    empty = images[:0]
    return ImageDataset(
        name="fake", train_images=images, train_labels=labels, val_images=empty, val_labels=labels[:0],
        test_images=images, test_labels=labels, class_names=tuple(f"c{i}" for i in range(10)),
        mean=(0.5,), std=(0.25,),
    )


@pytest.mark.parametrize("name", list(routers_bpr.ROUTER_RUNS))
def test_every_router_processes_the_same_pairs(name):
    """The cpu preset's premise: 136 pairs per 8-image group per MoE layer (Soft MoE: 16 per image)."""
    torch.manual_seed(0)
    cfg = chapter.experiment("cpu")[name]
    model = vl.create_model(cfg.model, num_classes=10, in_chans=1, **cfg.model_kwargs)
    for training in (True, False):
        model.train(training)
        with torch.no_grad():
            model(torch.randn(16, 1, 28, 28))
        stats = collect_routing_stats(model)
        from vmoe_lib.chapters.recipes import TEST_BED
        from vmoe_lib.models.placement import resolve_moe_layers

        assert [s["layer"] for s in stats.values()] == resolve_moe_layers(TEST_BED.placement, 4)  # the test bed's blocks
        for s in stats.values():
            if name == "soft":
                assert s["rows_computed"] == 16 * 16  # 16 images x 8 experts x 2 slots
            elif name.endswith("_ec"):
                assert s["pairs_processed"] == 2 * 136  # two groups, every slot filled
            else:  # token choice k=1: at most C=17 per expert and group, each token at most once
                assert s["pairs_processed"] <= 2 * 136
    routers = {layer.router.capacity_factor for _, layer in moe_layers(model) if hasattr(layer.router, "capacity_factor")}
    assert routers <= {1.0}


def test_k2_run_and_dense_run_are_what_the_chapter_says():
    configs = chapter.experiment("cpu")
    k2 = configs[routers_bpr.K2_RUN].model_kwargs
    assert (k2["k"], k2["capacity_factor"]) == (2, 1.05)
    from vmoe_lib.chapters import dense_baselines
    from vmoe_lib.chapters.recipes import TEST_BED

    assert configs[routers_bpr.DENSE_RUN].model == TEST_BED.dense
    assert {c.epochs for c in configs.values()} == {TEST_BED.epochs}
    assert {c.model_kwargs.get("moe_layers") for n, c in configs.items() if n != routers_bpr.DENSE_RUN} == {TEST_BED.placement}
    # the dense run is chapter 0's dense run of the test bed: the same config, so the same results key
    assert configs[routers_bpr.DENSE_RUN].to_dict() == dense_baselines.chapter.experiment("cpu")[TEST_BED.dense_run].to_dict()
    # every run shares the recipe: only the model differs
    recipes = {json.dumps({k: v for k, v in c.to_dict().items() if k not in ("model", "model_kwargs")}, sort_keys=True)
               for c in configs.values()}
    assert len(recipes) == 1


def _token_choice_model(k: int = 1, capacity_multiple: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return vl.create_model("vmoe_vit_pico_patch7_28", num_classes=10, in_chans=1, router="softmax_token_choice",
                           k=k, capacity_factor=1.0, eval_capacity_factor=1.0, group_size=8,
                           router_options={"capacity_multiple": capacity_multiple})


def test_probe_sweeps_capacity_and_restores_the_routing():
    model = _token_choice_model(k=2, capacity_multiple=4)  # the probe itself routes with capacity_multiple=1
    probe = routers_bpr.RoutingProbe(capacity_factors=(0.1, 0.5, 8.0), mask_capacity_factors=(0.25,),
                                 bits_capacity_factors=(0.5,))
    out = probe(model, _dataset(), torch.device("cpu"))
    assert set(out) == {"probe", "routing", "capacity_sweep", "dropped_patches", "no_drop"}
    rows = out["capacity_sweep"]
    # per-image correctness at the claims' capacity only, and it reproduces that point's accuracy
    from vmoe_lib.predictions import unpack_bits

    with_bits = [r for r in rows if "correct" in r]
    assert {r["capacity_factor"] for r in with_bits} == {0.5} and len(with_bits) == 2 * 2
    for r in with_bits:
        assert unpack_bits({"n": 48, "bits": r["correct"]}).mean() == pytest.approx(r["accuracy"])
    # no token is dropped at capacity factor E, at the trained k
    assert out["no_drop"]["dropped_fraction"] == 0.0 and out["no_drop"]["k"] == 2
    assert out["no_drop"]["capacity_factor"] == 8.0
    assert len(rows) == 3 * 2 * 2  # capacity factors x (vanilla, BPR) x (k=2, k=1)
    assert {r["k"] for r in rows} == {1, 2}
    for k in (1, 2):
        for bpr in (False, True):
            dropped = [r["dropped_fraction"] for r in rows if r["k"] == k and r["batch_priority"] == bpr]
            assert dropped == sorted(dropped, reverse=True) and dropped[-1] == 0.0 and dropped[0] > 0.5
        # Nothing is dropped at a large capacity, so priority cannot matter there.
        big = [r["accuracy"] for r in rows if r["k"] == k and r["capacity_factor"] == 8.0]
        assert big[0] == big[1]
    # The model's own routing is back to what it was trained with.
    router = moe_layers(model)[0][1].router
    assert (router.k, router.eval_capacity_factor, router.batch_priority, router.capacity_multiple) == (2, 1.0, False, 4)
    assert all(layer.last_routing is None and not layer.keep_routing for _, layer in moe_layers(model))


def test_dropped_patch_maps_match_the_capacity():
    model = _token_choice_model(k=1)
    probe = routers_bpr.RoutingProbe(capacity_factors=(1.0,), mask_capacity_factors=(0.25, 0.5))
    info = probe(model, _dataset(), torch.device("cpu"))["dropped_patches"]
    assert np.asarray(info["images"]).shape == (8, 28, 28)
    assert len(info["masks"]) == 4
    for m in info["masks"]:
        C = math.ceil(136 * m["capacity_factor"] / 8)
        for counts in m["experts_per_token"].values():
            counts = np.asarray(counts)
            assert counts.shape == (8, 17) and set(np.unique(counts)) <= {0, 1}
            assert counts.sum() <= 8 * C  # no expert over capacity
            assert counts.sum() >= C  # the fullest expert is full
    # Vanilla fills experts in token order: the first tokens are never the ones dropped for lack of room.
    vanilla = next(m for m in info["masks"] if not m["batch_priority"] and m["capacity_factor"] == 0.25)
    for counts in vanilla["experts_per_token"].values():
        flat = np.asarray(counts).reshape(-1)
        assert flat[: math.ceil(136 * 0.25 / 8)].all()


def test_probe_on_a_dense_model_is_empty_and_soft_has_no_sweep():
    dense = vl.create_model("vit_pico_patch7_28", num_classes=10, in_chans=1)
    assert routers_bpr.RoutingProbe()(dense, _dataset(), torch.device("cpu")) == {}
    cfg = chapter.experiment("cpu")["soft"]
    soft = vl.create_model(cfg.model, num_classes=10, in_chans=1, **cfg.model_kwargs)
    out = routers_bpr.RoutingProbe(capacity_factors=(1.0,))(soft, _dataset(16), torch.device("cpu"))
    assert "capacity_sweep" not in out
    for s in out["routing"].values():
        assert s["dropped_fraction"] == 0.0 and s["mean_experts_per_token"] == 8.0


def test_probe_settings_enter_the_results_key():
    from vmoe_lib.results import config_hash

    cfg = chapter.experiment("smoke")["softmax_tc"]
    a = config_hash(cfg, {"probe": routers_bpr.RoutingProbe(capacity_factors=(0.5, 1.0)).settings()})
    b = config_hash(cfg, {"probe": routers_bpr.RoutingProbe(capacity_factors=(0.5, 2.0)).settings()})
    assert a != b


@pytest.fixture(scope="module")
def cpu_results():
    from helpers_foundation import results_of_record

    return results_of_record(chapter)


def test_tables_figures_and_verdicts_from_the_results_of_record(cpu_results, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(tmp_path))  # verdicts.json goes to a scratch folder
    table = chapter.router_table(cpu_results)
    assert list(table.index) == [*routers_bpr.ROUTER_RUNS, routers_bpr.K2_RUN, routers_bpr.DENSE_RUN]
    assert set(table.loc[list(routers_bpr.ROUTER_RUNS) + [routers_bpr.DENSE_RUN], "pairs / image"]) <= {16.0, 17.0}
    caps = chapter.capacity_table(cpu_results)
    assert len(caps.index) == len(chapter.presets["cpu"].settings["sweep"])  # one row per capacity factor
    assert "softmax_tc, eval k=1, BPR" in caps.columns and len(caps.columns) == 2 * 3  # (k=1 model) + (k=2 at k=2, 1)
    assert not chapter.routing_table(cpu_results).empty
    verdicts = chapter.verdicts(cpu_results)
    ids = [v.claim_id for v in verdicts]
    assert ids == [c.id for c in chapter.claims("cpu")]  # every declared claim, in declaration order
    assert {"ec_vs_tc_softmax", "ec_vs_tc_sinkhorn", "moe_vs_dense", "bpr_vs_vanilla_k1", "bpr_vs_vanilla_k2",
            "vanilla_collapse_k1", "vanilla_collapse_k2", "experts_carry_weight_k1"} <= set(ids)
    assert {f"soft_vs_{n}" for n in routers_bpr.ROUTER_RUNS if n != "soft"} <= set(ids)  # against each sparse router
    assert all(v.verdict in (vl.stats.CONTROL_VERDICTS if v.kind == "control" else vl.stats.VERDICTS) for v in verdicts)
    assert (tmp_path / "cpu" / "routers_bpr" / "verdicts.json").exists()
    text = chapter.findings(cpu_results)
    assert "Ranking at equal pairs" in text and "BPR" in text
    for plot in (chapter.plot_router_accuracy, chapter.plot_accuracy_vs_time, chapter.plot_load_balance,
                 chapter.plot_capacity_sweep, chapter.plot_dropped_patches):
        fig = plot(cpu_results)
        assert fig.axes
        matplotlib.pyplot.close(fig)


def test_verdicts_follow_the_numbers(cpu_results, tmp_path, monkeypatch):
    """Swap the accuracies of two routers: the EC-vs-TC verdict must flip with them."""
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(tmp_path))
    groups = cpu_results.by_name()

    def fake(name, acc):
        out = []
        for r, a in zip(groups[name], acc):
            record = {**r.record, "final": {**r.record["final"], "test_accuracy": a}}
            out.append(type(r)(**{**r.__dict__, "record": record}))
        return out

    runs = [*fake("softmax_ec", [0.90, 0.91, 0.92]), *fake("softmax_tc", [0.80, 0.81, 0.80])]
    better = {v.claim_id: v.verdict for v in chapter.verdicts(ChapterResults("routers_bpr", "cpu", runs), write=False)}
    assert better["ec_vs_tc_softmax"] == "reproduced"
    runs = [*fake("softmax_ec", [0.80, 0.81, 0.80]), *fake("softmax_tc", [0.90, 0.91, 0.92])]
    worse = {v.claim_id: v.verdict for v in chapter.verdicts(ChapterResults("routers_bpr", "cpu", runs), write=False)}
    assert worse["ec_vs_tc_softmax"] == "not reproduced"


def test_a_run_killed_in_the_probe_resumes_without_retraining(tmp_path, monkeypatch):
    """Training finished, then the probe died: the rerun reloads the final checkpoint and only probes again."""
    from helpers_foundation import write_fashion_mnist
    from vmoe_lib import train as vtrain
    from vmoe_lib.results import load_or_run
    from vmoe_lib.train import TrainConfig

    write_fashion_mnist(tmp_path / "fm", n_train=300, n_test=60)
    monkeypatch.setenv("VMOE_DATA_DIR", str(tmp_path / "fm"))
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(tmp_path / "results"))
    monkeypatch.setenv("VMOE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VMOE_REQUIRE_RESULTS", raising=False)
    monkeypatch.setattr(vtrain, "_DATA_CACHE", {})
    config = TrainConfig(
        model="vmoe_vit_test_patch7_28", val_size=100, train_subset=64, eval_subset=50, epochs=2, batch_size=64,
        eval_batch_size=100,
        model_kwargs={"router": "softmax_token_choice", "k": 1, "num_experts": 4, "group_size": 8,
                      "capacity_factor": 1.0, "eval_capacity_factor": 1.0, "router_options": {"capacity_multiple": 1}},
    )
    probe = routers_bpr.RoutingProbe(capacity_factors=(0.5, 1.0), probe_images=16)
    steps = []
    original_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return original_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)

    def dying_probe(model, data, device):
        raise KeyboardInterrupt("killed during the probe")

    with pytest.raises(KeyboardInterrupt):
        load_or_run("toy", "smoke", {"tc": config}, [0], extra_eval=dying_probe, hash_extra={"probe": probe.settings()},
                    progress=False)
    trained_steps = len(steps)
    assert trained_steps == 2  # one step per epoch
    [result] = load_or_run("toy", "smoke", {"tc": config}, [0], extra_eval=probe, hash_extra={"probe": probe.settings()},
                           progress=False)
    assert len(steps) == trained_steps  # no step taken again
    assert len(result.history) == 2 and len(result.record["extra"]["capacity_sweep"]) == 2 * 2


def test_analysis_copes_with_one_seed_missing_runs_and_rgb_images(cpu_results, tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.setenv("VMOE_RESULTS_DIR", str(tmp_path))
    one_seed = ChapterResults("routers_bpr", "cpu", [r for r in cpu_results.results if r.seed == 0])
    # one seed: no spread over seeds, so no seed-paired claim can be decided (per-image tests still can)
    assert all(v.verdict == "inconclusive" for v in chapter.verdicts(one_seed, write=False) if v.test == "paired_t")
    assert "Ranking" in chapter.findings(one_seed) and not chapter.router_table(one_seed).empty
    for plot in (chapter.plot_router_accuracy, chapter.plot_accuracy_vs_time, chapter.plot_load_balance,
                 chapter.plot_capacity_sweep, chapter.plot_dropped_patches):
        matplotlib.pyplot.close(plot(one_seed))
    no_tc = ChapterResults("routers_bpr", "cpu", [r for r in cpu_results.results if not r.name.startswith("softmax_tc")])
    assert chapter.capacity_table(no_tc).empty
    matplotlib.pyplot.close(chapter.plot_capacity_sweep(no_tc))
    with pytest.raises(ValueError, match="run_name='softmax_tc' has no stored dropped-patch maps"):
        chapter.plot_dropped_patches(no_tc)
    # A CIFAR-like record: 8 RGB 32x32 images, 64 patches + a class token.
    base = next(r for r in cpu_results.results if r.name == "softmax_tc")
    rng = np.random.default_rng(0)
    info = {"images": rng.integers(0, 256, (8, 3, 32, 32)).tolist(), "labels": list(range(8)),
            "class_names": [f"c{i}" for i in range(10)],
            "masks": [{"capacity_factor": 0.5, "batch_priority": bpr, "k": 1,
                       "experts_per_token": {"blocks.7.mlp": rng.integers(0, 2, (8, 65)).tolist()}} for bpr in (False, True)]}
    record = {**base.record, "extra": {**base.record["extra"], "dropped_patches": info}}
    rgb = ChapterResults("routers_bpr", "gpu", [type(base)(**{**base.__dict__, "record": record})])
    fig = chapter.plot_dropped_patches(rgb)
    assert len(fig.axes) == 2 * 8
    matplotlib.pyplot.close(fig)
