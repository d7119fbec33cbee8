"""Chapter 1 — six routers at equal compute, and Batch Priority Routing at inference.

Part 1 reproduces the routers study (Liu, Puigcerver, Blondel et al., TMLR 2024,
arXiv:2401.15969): the same small MoE ViT trained with each of its six routers,
every router given the same number of token-expert pairs per routing group.
Its claims (declared in :func:`claims`, decided by :mod:`vmoe_lib.stats`):

* ``ec_vs_tc_*`` — among sparse routers, expert choice beats token choice
  (at the same affinity: softmax EC vs softmax TC, Sinkhorn EC vs Sinkhorn TC);
* ``soft_vs_*`` — Soft MoE beats each sparse router at fixed compute (one
  claim per sparse router: no choosing the best one by its sample mean first);
* ``moe_vs_dense`` — a sparse MoE beats the dense ViT of the same activated
  FLOPs (V-MoE, Riquelme et al., arXiv:2106.05974).

Part 2 reproduces V-MoE's Batch Priority Routing (BPR) result: softmax
token-choice models (trained with ``k = 1`` and ``k = 2``) are evaluated at
inference capacity factors from 0.1 to 2, with vanilla priority (token order)
and with BPR (tokens sorted by their top-1 gate). Claims, paired over seeds:
``bpr_vs_vanilla_k*`` — with capacity cut to 0.5, BPR is more accurate than
vanilla routing; ``vanilla_collapse_k*`` — vanilla routing loses at least
:data:`COLLAPSE_MIN_EFFECT` points between the largest swept capacity and 0.5.
Both depend on the positive control ``experts_carry_weight_k*``: bypassing
the MoE layers must cost at least :data:`CONTROL_MIN_EFFECT` point.
The ``k = 2`` models are also evaluated with ``k = 1``.

Everything the chapter shows beyond final accuracies (capacity sweeps, routing
statistics, the patches dropped at low capacity) is computed right after
training by :class:`RoutingProbe` and stored in each run's record, so the book
renders without the weights or the dataset.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ..analysis import mean_sd_text, routing_of, summary_table
from ..data import BatchLoader, ImageDataset
from ..layers.stats import moe_layers
from ..models.moe_utils import set_routing
from ..plots import _color, strip_with_means, style
from ..predictions import unpack_bits
from ..stats import Claim, TestResult, mcnemar, paired_t
from ..train import TrainConfig
from ..papers import PaperNumber
from .base import Chapter, ChapterResults, Measure, Preset, Run, SeedPaired, control_claim
from .probes import recorded_eval, routing_record
from .recipes import SMOKE_DATA, SWEET_SPOT_GAIN, TEST_BED, preset_recipe

__all__ = [
    "NAME", "PRESETS", "ROUTER_RUNS", "RoutingProbe", "RoutersBPR", "NoDropVsDense", "CapacityPoints", "chapter",
    "equal_compute_settings", "probe_for",
]

NAME = "routers_bpr"

# Run name -> router (registry name), in the order the routers study lists them.
ROUTER_RUNS: dict[str, str] = {
    "softmax_tc": "softmax_token_choice",
    "sinkhorn_tc": "sinkhorn_token_choice",
    "softmax_ec": "softmax_expert_choice",
    "sinkhorn_ec": "sinkhorn_expert_choice",
    "sparse_ec": "sparse_expert_choice",
    "soft": "soft",
}
TOKEN_CHOICE_RUNS = ("softmax_tc", "sinkhorn_tc")
EXPERT_CHOICE_RUNS = ("softmax_ec", "sinkhorn_ec", "sparse_ec")
K2_RUN = "softmax_tc_k2"  # part 2 only: V-MoE's k = 2 with its training capacity factor 1.05
DENSE_RUN = "dense"

_SWEEP_CPU = (0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.25, 1.5, 2.0)
_SWEEP_SMOKE = (0.2, 0.5, 1.0, 2.0)

# The cpu preset trains on chapter 0's test bed of record; seeds sized by chapter 0's power table.
_CPU_SEEDS = tuple(range(6))

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="every code path: the test bed's MoE ViT, 2,048 Fashion-MNIST images, 1 epoch, 2 seeds (CI)",
        hardware="CPU, 2 cores",
        expected_minutes=1.5,
        seeds=(0, 1),
        settings={"dense": TEST_BED.dense, "placement": TEST_BED.placement, "epochs": 1, "experts": 8,
                  "group_images": 8, "tokens_per_image": 17, "sweep": _SWEEP_SMOKE, "probe_images": 1000, **SMOKE_DATA},
    ),
    "cpu": Preset(
        name="cpu",
        description=f"chapter 0's test bed ({TEST_BED.name}: {TEST_BED.dense}, MoE blocks {TEST_BED.placement}, "
                    f"8 experts, {TEST_BED.epochs} epochs), Fashion-MNIST 28x28, 55k train images, "
                    f"{len(_CPU_SEEDS)} seeds; 8 models",
        hardware="CPU, 2 cores, 2 workers x 1 thread, pinned numerics (measured: 68 min for the 48 runs)",
        expected_minutes=68.0,
        seeds=_CPU_SEEDS,
        settings={"dense": TEST_BED.dense, "placement": TEST_BED.placement, "epochs": TEST_BED.epochs, "experts": 8,
                  "group_images": 8, "tokens_per_image": 17, "sweep": _SWEEP_CPU, "probe_images": None},
    ),
    "gpu": Preset(
        name="gpu",
        description="MoE ViT-tiny/4 (d192, depth 8, MoE in layers 5 and 7, 8 experts), CIFAR-100 32x32, "
                    "60 epochs, 3 seeds (needs CIFAR-100: see the data section)",
        hardware="1 GPU (estimated, not yet measured), bf16 autocast",
        expected_minutes=150.0,
        seeds=(0, 1, 2),
        settings={"dense": "vit_tiny_patch4_32", "placement": "last-2", "dataset": "cifar100", "epochs": 60,
                  "experts": 8, "group_images": 8, "tokens_per_image": 65, "sweep": _SWEEP_CPU, "probe_images": None},
    ),
}


def equal_compute_settings(router: str, *, experts: int, group_images: int, tokens_per_image: int) -> dict[str, Any]:
    """MoE keyword arguments giving ``router`` the same token-expert pairs as every other router.

    A routing group of ``group_images`` images holds ``S = group_images * tokens_per_image``
    tokens; every sparse router gets ``C = S / E`` slots per expert (capacity factor 1.0, no
    rounding to a multiple of 4), so ``E * C = S`` pairs per group: the compute of one dense
    MLP per token. Token choice uses ``k = 1``. Soft MoE routes each image alone and gets
    ``P = tokens_per_image // E`` slots per expert, i.e. ``E * P <= tokens_per_image`` slots per
    image (slightly fewer pairs when ``E`` does not divide the token count).
    """
    if router == "soft":
        slots = max(1, tokens_per_image // experts)
        return {"router": "soft", "num_experts": experts, "router_options": {"slots_per_expert": slots}}
    common = {"router": router, "num_experts": experts, "group_size": group_images, "capacity_factor": 1.0,
              "eval_capacity_factor": 1.0, "router_options": {"capacity_multiple": 1}}
    if router.endswith("token_choice"):
        common["k"] = 1
    return common


def _configs(preset: Preset) -> dict[str, TrainConfig]:
    """Run name -> config of a preset: the six routers, the ``k = 2`` model, the dense ViT."""
    s = preset.settings
    recipe = preset_recipe(s, ("dense", "placement", "experts", "group_images", "tokens_per_image", "sweep",
                               "probe_images"))
    placement = {"moe_layers": s["placement"]}
    geometry = {key: s[key] for key in ("experts", "group_images", "tokens_per_image")}
    moe = f"vmoe_{s['dense']}"
    configs = {name: recipe(moe, {**placement, **equal_compute_settings(router, **geometry)})
               for name, router in ROUTER_RUNS.items()}
    configs[K2_RUN] = recipe(moe, {
        **placement, "router": "softmax_token_choice", "num_experts": geometry["experts"],
        "group_size": geometry["group_images"], "k": 2, "capacity_factor": 1.05, "eval_capacity_factor": 1.05,
        "router_options": {"capacity_multiple": 1},
    })
    configs[DENSE_RUN] = recipe(s["dense"], {})
    return configs


# Claims: smallest effects of interest, families, and the capacity factor the BPR claims read.
FAMILY = NAME
ROUTER_MIN_EFFECT = 0.5
BPR_MIN_EFFECT = 1.0
COLLAPSE_MIN_EFFECT = 2.0
CONTROL_MIN_EFFECT = 1.0
LOW_CAPACITY = 0.5  # the inference capacity factor the BPR and collapse claims are read at
_ROUTER_WHY = ("the book's smallest effect of interest for a routing choice: the low end of the 0.3-1 point "
               "effects the papers report at our model sizes (sweet-spot study, arXiv:2411.18322)")


# ----------------------------------------------------------------------------------- probe
@dataclass(frozen=True)
class RoutingProbe:
    """Post-training measurements of an MoE model, stored in its run record (``record["extra"]``).

    For every MoE model: per-layer routing statistics over the test images at the trained
    routing settings (expert load, dropped fraction, experts per token, class x expert).
    For softmax token-choice models, in addition:

    * ``capacity_sweep`` — test accuracy and dropped fraction at each inference capacity
      factor of ``capacity_factors``, with vanilla priority and with BPR, at the trained ``k``
      and (for ``k > 1``) at ``k = 1``;
    * ``dropped_patches`` — for the first routing group of test images (``mask_images``), how
      many experts processed each token in each MoE layer (0: dropped), at the capacity
      factors ``mask_capacity_factors``, vanilla and BPR; with the images themselves;
    * ``no_drop`` — test accuracy (and which images were right) at the trained ``k`` with an
      inference capacity factor of ``E``, at which no token is ever dropped (the MoE-vs-dense
      comparison: a ``k = 1`` token activates at most one expert at any capacity).

    Sweep points at the capacity factors ``bits_capacity_factors`` also store which test
    images were right (packed bits), for the per-image tests of the BPR and collapse claims.

    Args:
        capacity_factors: inference capacity factors of the sweep.
        probe_images: evaluate on the first ``n`` test images (``None``: all).
        mask_capacity_factors: capacity factors of the dropped-patch pictures.
        mask_images: images in the dropped-patch pictures (one routing group).
        bits_capacity_factors: sweep points that store per-image correctness.
    """

    capacity_factors: tuple[float, ...] = _SWEEP_CPU
    probe_images: int | None = None
    mask_capacity_factors: tuple[float, ...] = (0.25, 0.5)
    mask_images: int = 8
    bits_capacity_factors: tuple[float, ...] = ()

    def settings(self) -> dict[str, Any]:
        """The probe's settings as JSON values (they enter the results key)."""
        d = asdict(self)
        return {key: list(v) if isinstance(v, tuple) else v for key, v in d.items()}

    def __call__(self, model: nn.Module, data: ImageDataset, device: torch.device) -> dict[str, Any]:
        first = routing_record(model, data, device, self.probe_images)
        if first is None:
            return {}
        loader, out = first
        layers = moe_layers(model)
        routers = [layer.router for _, layer in layers if layer.router is not None]
        if routers and all(layer.router_name == "softmax_token_choice" for _, layer in layers):
            original = {key: getattr(routers[0], key) for key in ("k", "eval_capacity_factor", "batch_priority", "capacity_multiple")}
            try:
                out["capacity_sweep"] = self._sweep(model, loader, original["k"])
                out["dropped_patches"] = self._dropped_patches(model, data, device, original["k"])
                E = int(routers[0].num_experts)
                set_routing(model, k=original["k"], eval_capacity_factor=float(E), batch_priority=False, capacity_multiple=1)
                nodrop, nodrop_stats = recorded_eval(model, loader, None, bits=True)
                out["no_drop"] = {"capacity_factor": float(E), "k": original["k"], **nodrop,
                                  "dropped_fraction": float(np.mean([s["dropped_fraction"] for s in nodrop_stats.values()]))}
            finally:
                set_routing(model, **original)
        return out

    def _sweep(self, model: nn.Module, loader: BatchLoader, trained_k: int) -> list[dict[str, Any]]:
        rows = []
        for k in sorted({trained_k, 1}, reverse=True):
            for bpr in (False, True):
                for cf in self.capacity_factors:
                    set_routing(model, k=k, eval_capacity_factor=float(cf), batch_priority=bpr, capacity_multiple=1)
                    bits = any(math.isclose(cf, b) for b in self.bits_capacity_factors)
                    metrics, stats = recorded_eval(model, loader, None, bits=bits)
                    dropped = float(np.mean([s["dropped_fraction"] for s in stats.values()]))
                    row = {"k": k, "batch_priority": bpr, "capacity_factor": float(cf),
                           "accuracy": metrics["accuracy"], "loss": metrics["loss"], "dropped_fraction": dropped,
                           "dropped_per_layer": [s["dropped_fraction"] for s in stats.values()]}
                    if bits:
                        row["correct"] = metrics["correct"]
                    rows.append(row)
        return rows

    def _dropped_patches(self, model: nn.Module, data: ImageDataset, device: torch.device, k: int) -> dict[str, Any]:
        images, labels = data.split("test")
        images, labels = images[: self.mask_images], labels[: self.mask_images]
        loader = BatchLoader(images, labels, batch_size=self.mask_images, mean=data.mean, std=data.std, device=device)
        layers = moe_layers(model)
        masks = []
        model.eval()
        for cf in self.mask_capacity_factors:
            for bpr in (False, True):
                set_routing(model, k=k, eval_capacity_factor=float(cf), batch_priority=bpr, capacity_multiple=1)
                for _, layer in layers:
                    layer.keep_routing = True
                try:
                    with torch.no_grad():
                        for batch, _ in loader:
                            model(batch)
                    per_layer = {}
                    for name, layer in layers:
                        r = layer.last_routing
                        tokens = r.num_groups * r.group_size
                        counts = torch.bincount((r.group_index * r.group_size + r.token_index).cpu(), minlength=tokens)
                        per_layer[name] = counts.view(self.mask_images, -1).tolist()
                finally:
                    for _, layer in layers:
                        layer.keep_routing = False
                        layer.last_routing = None
                masks.append({"capacity_factor": float(cf), "batch_priority": bpr, "k": k, "experts_per_token": per_layer})
        return {"images": images.squeeze(1).tolist() if images.shape[1] == 1 else images.tolist(),
                "labels": labels.tolist(), "class_names": list(data.class_names), "masks": masks}


def probe_for(preset: Preset) -> RoutingProbe:
    """The :class:`RoutingProbe` of a preset."""
    s = preset.settings
    return RoutingProbe(capacity_factors=tuple(s["sweep"]), probe_images=s["probe_images"],
                        bits_capacity_factors=(LOW_CAPACITY, float(max(s["sweep"]))))


# ----------------------------------------------------------------------------------- tables
def _describe(config: TrainConfig, tokens_per_image: int) -> tuple[str, int | None]:
    """(routing settings in brief, token-expert pairs per image) of a config.

    ``S``: tokens per routing group; ``C``: slots per expert and group (at the training capacity factor).
    """
    kw = config.model_kwargs
    router = kw.get("router")
    if router is None:
        return "dense MLP", tokens_per_image
    E = kw.get("num_experts", 8)
    if router == "soft":
        P = kw["router_options"]["slots_per_expert"]
        return f"{E}x{P} slots / image", E * P
    group = kw.get("group_size", 8)
    S = group * tokens_per_image
    cf, k = kw.get("capacity_factor", 1.0), kw.get("k")
    C = math.ceil(S * (k or 1) * cf / E)
    if router.endswith("expert_choice"):
        return f"experts pick C={C} of S={S}", E * C / group
    return f"top-{k}, C={C}, S={S}", E * C / group


def _tokens_per_image(result) -> int:
    routing = routing_of(result)
    probe = (result.record.get("extra") or {}).get("probe")
    if routing and probe:
        return int(next(iter(routing.values()))["tokens"] // probe["images"])
    size = result.config.image_size or 28
    patch = 7 if "patch7" in result.config.model else 4
    return (size // patch) ** 2 + 1


def _train_seconds(result) -> float:
    return float(sum(h["epoch_seconds"] for h in result.history))


def _sweep_bits(result, k: int, bpr: bool, cf: float) -> np.ndarray | None:
    """Per-image correctness the probe stored for one capacity-sweep point (``None`` if not stored)."""
    n = (result.record.get("extra") or {}).get("probe", {}).get("images")
    for point in (result.record.get("extra") or {}).get("capacity_sweep", []):
        if point["k"] == k and point["batch_priority"] == bpr and math.isclose(point["capacity_factor"], cf):
            return unpack_bits({"n": n, "bits": point["correct"]}) if "correct" in point and n else None
    return None


def _stacked(rows: list[np.ndarray | None]) -> np.ndarray | None:
    return np.stack(rows) if rows and all(r is not None for r in rows) else None


@dataclass(frozen=True)
class NoDropVsDense(Measure):
    """Seed-paired: the MoE run's test accuracy at inference capacity factor E (no token dropped; the probe's
    ``no_drop``) against the dense run's."""

    moe: str
    dense: str

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:
        nodrop = {r.seed: r.record["extra"]["no_drop"]["accuracy"] for r in results.runs_of(self.moe)
                  if "no_drop" in (r.record.get("extra") or {})}
        dense = {r.seed: float(r.final["test_accuracy"]) for r in results.runs_of(self.dense)}
        shared = sorted(set(nodrop) & set(dense))
        return paired_t([nodrop[s] for s in shared], [dense[s] for s in shared]) if len(shared) >= 2 else None


@dataclass(frozen=True)
class CapacityPoints(Measure):
    """Per image (McNemar pooled over seeds): one softmax token-choice run evaluated at two points of its capacity
    sweep, each ``(batch_priority, capacity_factor)`` at inference ``k``; a capacity factor ``None`` is the largest
    one swept (the same for every seed, else the claim has no data)."""

    run: str
    k: int
    a: tuple[bool, float | None]
    b: tuple[bool, float | None]

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:
        runs = results.runs_of(self.run)
        tops = {max(p["capacity_factor"] for p in (r.record.get("extra") or {}).get("capacity_sweep", [{"capacity_factor": 0}]))
                for r in runs}
        top = tops.pop() if len(tops) == 1 else None
        arms = []
        for bpr, cf in (self.a, self.b):
            cf = top if cf is None else cf
            arms.append(_stacked([_sweep_bits(r, self.k, bpr, cf) for r in runs]) if cf else None)
        return mcnemar(arms[0], arms[1]) if arms[0] is not None and arms[1] is not None else None


class RoutersBPR(Chapter):
    """Chapter 1: six routers at equal compute, and Batch Priority Routing at inference (see the module's docstring)."""

    name = NAME
    title = "Routers at equal compute, and Batch Priority Routing"
    presets = PRESETS
    primary = ("ec_vs_tc_softmax",)  # the contrast the cpu preset's seed count is sized for

    def runs(self, preset: Preset) -> list[Run]:
        """The six routers and the ``k = 2`` model, each measured by the preset's :class:`RoutingProbe`; the dense ViT
        without a probe, so it is the same experiment (same results key) as chapter 0's dense run of the test bed."""
        probe = probe_for(preset)
        return [Run(name, config, probe=None if name == DENSE_RUN else probe) for name, config in _configs(preset).items()]

    def claims(self, preset: str) -> list[Claim]:
        """The chapter's claims, declared before any result is read (one :class:`~vmoe_lib.stats.Claim` each).

        Router contrasts are paired by seed (all runs share seeds: same data order and initial RNG).
        The BPR claims compare one model evaluated two ways, paired by seed. The collapse claims
        depend on the positive control ``experts_carry_weight_k*`` (bypassing the MoE layers costs at
        least :data:`CONTROL_MIN_EFFECT` point): without it, "vanilla routing does not collapse" says
        nothing, since dropping tokens costs little when the experts carry little.
        """
        routers = "Routers study (Liu et al., arXiv:2401.15969, Sec. 4)"
        out = [
            Claim(id=f"ec_vs_tc_{aff}", claim=f"Expert choice beats token choice ({label} affinities, equal pairs)",
                  source=routers, contrast=f"{aff}_ec vs {aff}_tc", test="paired_t", min_effect=ROUTER_MIN_EFFECT,
                  min_effect_why=_ROUTER_WHY, family=FAMILY, paired=True, measure=SeedPaired(f"{aff}_ec", f"{aff}_tc"),
              paper=PaperNumber("routers", None, "Sec. 4 (ViT MoEs with 32 experts, JFT and ImageNet): expert choice "
                                                 "above token choice; no per-router accuracy table could be read"))
            for aff, label in (("softmax", "softmax"), ("sinkhorn", "Sinkhorn"))
        ]
        out += [
            Claim(id=f"soft_vs_{name}", claim=f"Soft MoE beats {name} at fixed compute",
                  source=routers + "; Soft MoE (Puigcerver et al., arXiv:2308.00951)", contrast=f"soft vs {name}",
                  test="paired_t", min_effect=ROUTER_MIN_EFFECT, min_effect_why=_ROUTER_WHY, family=FAMILY, paired=True,
                  measure=SeedPaired("soft", name),
                  paper=PaperNumber("routers", None, "Sec. 4: Soft MoE above every sparse router at fixed compute; no "
                                                     "per-router accuracy table could be read"))
            for name in ROUTER_RUNS if name != "soft"
        ]
        out.append(Claim(
            id="moe_vs_dense", claim=("A V-MoE (softmax token choice, k=1) beats the dense ViT of the same activated FLOPs "
                                      "(evaluated at capacity factor E: no token dropped)"),
            source="V-MoE (Riquelme et al., arXiv:2106.05974, Sec. 3)", contrast=f"softmax_tc (no drops) vs {DENSE_RUN}",
            test="paired_t", min_effect=ROUTER_MIN_EFFECT,
            min_effect_why="tiny MoE ViTs gain +0.5 to +1 point over dense ones (arXiv:2411.18322); the low end",
            family=FAMILY, paired=True, measure=NoDropVsDense("softmax_tc", DENSE_RUN),
            paper=SWEET_SPOT_GAIN[(TEST_BED.family, TEST_BED.placement)], same_as=f"dense_baselines:moe_vs_dense_{TEST_BED.name}",
        ))
        for run_name, k in (("softmax_tc", 1), (K2_RUN, 2)):
            control = f"experts_carry_weight_k{k}"
            out.append(control_claim(
                run_name, claim_id=control, family=f"{FAMILY}:controls", min_effect=CONTROL_MIN_EFFECT,
                min_effect_why="dropping tokens cannot cost more than removing every expert; below 1 point no collapse is visible"))
            out.append(Claim(
                id=f"bpr_vs_vanilla_k{k}",
                claim=f"With capacity cut to {LOW_CAPACITY:g} at inference, BPR is more accurate than vanilla routing ({run_name}, k={k})",
                source="V-MoE (arXiv:2106.05974, Sec. 4.1, the BPR figure)", contrast=f"BPR vs vanilla at cf {LOW_CAPACITY:g}",
                test="mcnemar", min_effect=BPR_MIN_EFFECT,
                min_effect_why="V-MoE's BPR figure shows gaps of several points at low capacity; 1 point is a conservative floor",
                family=FAMILY, paired=True, control=control,
                measure=CapacityPoints(run_name, k, (True, LOW_CAPACITY), (False, LOW_CAPACITY)),
                paper=PaperNumber("vmoe", None, "Sec. 4.1 and its BPR figure (V-MoE on JFT/ImageNet): BPR keeps accuracy as "
                                                "capacity falls below 1, vanilla routing does not; read from a figure"),
            ))
            out.append(Claim(
                id=f"vanilla_collapse_k{k}",
                claim=(f"Vanilla routing collapses below capacity 1: it loses at least {COLLAPSE_MIN_EFFECT:g} points from the "
                       f"largest swept capacity to {LOW_CAPACITY:g} ({run_name}, k={k})"),
                source="V-MoE (arXiv:2106.05974, Sec. 4.1)", contrast=f"vanilla at the largest cf vs vanilla at cf {LOW_CAPACITY:g}",
                test="mcnemar", min_effect=COLLAPSE_MIN_EFFECT,
                min_effect_why=("'collapse' in V-MoE's BPR figure is a loss of several points where BPR loses about one; "
                                "2 points is the floor we read as a collapse"),
                family=FAMILY, paired=True, control=control,
                measure=CapacityPoints(run_name, k, (False, None), (False, LOW_CAPACITY)),
                paper=PaperNumber("vmoe", None, "Sec. 4.1 and its BPR figure: vanilla routing loses several points below "
                                                "capacity 1; read from a figure"),
            ))
        return out

    # -- tables ------------------------------------------------------------
    def router_table(self, results: ChapterResults) -> pd.DataFrame:
        """Per run: how it routes, its token-expert pairs per image, size, FLOPs, training time and test accuracy
        (the routing statistics per layer are in :meth:`routing_table`)."""
        table = summary_table(results.results)
        rows = {}
        for name, runs in results.by_name().items():
            first, t = runs[0], table.loc[name]
            how, pairs = _describe(first.config, _tokens_per_image(first))
            rows[name] = {
                "routing": how, "pairs / image": round(pairs, 1) if pairs is not None else None,
                "params (k)": round(t["params_total"] / 1e3, 1),
                "activated params (k)": round(t["params_activated"] / 1e3, 1),
                "MFLOPs / image": round(t["flops_per_image"] / 1e6, 2),
                "train min / run": round(np.mean([_train_seconds(r) for r in runs]) / 60, 2),
                "test acc. (%)": mean_sd_text([r.final["test_accuracy"] for r in runs]),
                "seeds": len(runs),
            }
        return pd.DataFrame.from_dict(rows, orient="index")

    def sweep_frame(self, results: ChapterResults) -> pd.DataFrame:
        """Every capacity-sweep point of every seed: run, seed, k, priority, capacity factor, accuracy, dropped."""
        rows = []
        for r in results.results:
            for point in (r.record.get("extra") or {}).get("capacity_sweep", []):
                rows.append({"run": r.name, "seed": r.seed, "trained k": r.config.model_kwargs.get("k"),
                             "eval k": point["k"], "priority": "BPR" if point["batch_priority"] else "vanilla",
                             "capacity factor": point["capacity_factor"], "accuracy": point["accuracy"],
                             "dropped": point["dropped_fraction"]})
        return pd.DataFrame(rows)

    def capacity_table(self, results: ChapterResults) -> pd.DataFrame:
        """Test accuracy (%, mean ± std over seeds) per inference capacity factor (rows) and model, evaluated ``k`` and
        priority (columns)."""
        df = self.sweep_frame(results)
        if df.empty:
            return df
        cell = df.groupby(["run", "eval k", "priority", "capacity factor"])["accuracy"].apply(
            lambda v: mean_sd_text(list(v), digits=1))
        out = cell.unstack(["run", "eval k", "priority"])
        out.columns = [f"{run}, eval k={k}, {priority}" for run, k, priority in out.columns]
        return out.rename_axis("capacity factor")

    # -- figures ------------------------------------------------------------
    def plot_router_accuracy(self, results: ChapterResults):
        """Test accuracy per router (points: seeds; diamond: mean ± sd; seaborn), the dense ViT as a band."""
        style()
        groups = results.by_name()
        names = [n for n in (*ROUTER_RUNS, K2_RUN) if n in groups]
        fig, ax = plt.subplots(figsize=(7.2, 4.4))
        dense = np.array(results.values(DENSE_RUN)) * 100
        strip_with_means(ax, {n: np.array(results.values(n)) * 100 for n in names}, band=dense if dense.size else None,
                         band_label=f"dense ViT, same activated FLOPs ({dense.mean():.2f}%)" if dense.size else "",
                         rotate=True)
        ax.set_title("Routers at equal token-expert pairs (k=2 model: twice the pairs)")
        fig.tight_layout()
        return fig

    def plot_accuracy_vs_time(self, results: ChapterResults):
        """Test accuracy against measured training time on this machine (each point a seed)."""
        style()
        fig, ax = plt.subplots(figsize=(7.2, 5.0))
        for i, (name, runs) in enumerate(results.by_name().items()):
            xs = np.array([_train_seconds(r) / 60 for r in runs])
            ys = np.array([r.final["test_accuracy"] for r in runs]) * 100
            ax.scatter(xs, ys, color=_color(i), alpha=0.45, s=18)
            ax.errorbar(xs.mean(), ys.mean(), xerr=xs.std(ddof=1) if xs.size > 1 else None,
                        yerr=ys.std(ddof=1) if ys.size > 1 else None, fmt="o", color=_color(i), capsize=3, label=name)
        device = results.results[0].record.get("device", "")
        ax.set_xlabel(f"training time (min, {device}; epochs with their evaluations)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Accuracy vs training time: the cost of each allocation algorithm")
        ax.legend(ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.2))
        fig.tight_layout()
        return fig

    def plot_load_balance(self, results: ChapterResults):
        """Per router and MoE layer: sorted expert load shares, dropped tokens, experts per token."""
        style()
        groups = {n: runs for n, runs in results.by_name().items() if routing_of(runs[0])}
        names = [n for n in (*ROUTER_RUNS, K2_RUN) if n in groups]
        layer_names = list(routing_of(groups[names[0]][0])) if names else []
        # Stacked, not side by side: at the book's content width three panels in a row would need 6 px text.
        fig, axes = plt.subplots(3, 1, figsize=(7.2, 11.5))
        width = 0.8 / max(1, len(names))
        for i, name in enumerate(names):
            runs = groups[name]
            for j, layer in enumerate(layer_names):
                loads = np.array([sorted(routing_of(r)[layer]["expert_load"], reverse=True) for r in runs]) * 100
                E = loads.shape[1]
                axes[0].plot(np.arange(1, E + 1), loads.mean(0), color=_color(i), ls="-" if j == len(layer_names) - 1 else ":",
                             marker="o", ms=3, label=name if j == len(layer_names) - 1 else None)
            dropped = [[routing_of(r)[layer]["dropped_fraction"] * 100 for r in runs] for layer in layer_names]
            hist = np.mean([[routing_of(r)[layer]["experts_per_token_hist"] for layer in layer_names] for r in runs], axis=(0, 1))
            xs = np.arange(len(layer_names)) + (i - (len(names) - 1) / 2) * width
            axes[1].bar(xs, [np.mean(d) for d in dropped], width=width, color=_color(i), label=name,
                        yerr=[np.std(d, ddof=1) if len(d) > 1 else 0 for d in dropped], capsize=2)
            counts = np.arange(hist.size)
            shown = min(hist.size, 5)
            axes[2].plot(counts[:shown], hist[:shown] * 100, color=_color(i), marker="o", ms=4, label=name)
        E = len(routing_of(groups[names[0]][0])[layer_names[0]]["expert_load"]) if names else 1
        axes[0].axhline(100 / E, color="0.5", lw=1, ls="--")
        axes[0].set_xlabel("expert, sorted by load")
        axes[0].set_ylabel("share of token-expert pairs (%)")
        axes[0].set_title("Expert load (solid: last MoE layer, dotted: earlier;\ndashed: perfect balance)")
        axes[1].set_xticks(range(len(layer_names)), [f"layer {routing_of(groups[names[0]][0])[n]['layer']}" for n in layer_names])
        axes[1].set_ylabel("tokens dropped (%)")
        axes[1].set_title("Tokens processed by no expert (test set)")
        axes[2].set_xlabel("experts processing a token")
        axes[2].set_ylabel("tokens (%)")
        axes[2].set_title("Experts per token (Soft MoE: all, by construction)")
        axes[2].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        # One legend for the three panels (the same colour is the same router in each), above them.
        handles, labels = axes[1].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=4, bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / fig.get_figheight() * (1 + (len(names) - 1) // 4)))
        return fig

    def plot_capacity_sweep(self, results: ChapterResults):
        """V-MoE's figure: test accuracy vs inference capacity factor, vanilla (dashed) vs BPR (solid)."""
        style()
        df = self.sweep_frame(results)
        fig, axes = plt.subplots(2, 1, figsize=(7.2, 8.4), sharex=True)
        if df.empty:
            fig.suptitle("No capacity sweep stored (no softmax token-choice run in these results)")
            return fig
        panels = [(axes[0], [("softmax_tc", 1)], "trained and evaluated with k=1"),
                  (axes[1], [(K2_RUN, 2), (K2_RUN, 1)], "trained with k=2, evaluated with k=2 / k=1")]
        for ax, series, title in panels:
            for i, (run_name, k) in enumerate(series):
                for priority, ls in (("BPR", "-"), ("vanilla", "--")):
                    sel = df[(df["run"] == run_name) & (df["eval k"] == k) & (df["priority"] == priority)]
                    if sel.empty:
                        continue
                    g = sel.groupby("capacity factor")["accuracy"]
                    mean, lo, hi = g.mean() * 100, g.min() * 100, g.max() * 100
                    ax.plot(mean.index, mean.values, ls=ls, marker="o", ms=4, color=_color(i), label=f"eval k={k}, {priority}")
                    ax.fill_between(mean.index, lo.values, hi.values, color=_color(i), alpha=0.15, linewidth=0)
            ax.axvline(1.0, color="0.6", lw=1, ls=":")
            ax.set_title(title)
            ax.set_ylabel("test accuracy (%)")
            ax.legend(loc="lower right")
        axes[-1].set_xlabel("inference capacity factor")
        fig.suptitle("Accuracy vs capacity at inference (band: min-max over seeds)")
        fig.tight_layout()
        return fig

    def plot_dropped_patches(self, results: ChapterResults, run_name: str = "softmax_tc", seed: int | None = None, layer: int = -1,
                             images: int = 8):
        """Which patches vanilla routing and BPR drop at low capacity (red: processed by no expert)."""
        style()
        runs = [x for x in results.by_name().get(run_name, []) if "dropped_patches" in (x.record.get("extra") or {})]
        if not runs:
            raise ValueError(f"run_name={run_name!r} has no stored dropped-patch maps; runs with them: "
                             f"{sorted({x.name for x in results.results if 'dropped_patches' in (x.record.get('extra') or {})})}")
        r = next((x for x in runs if seed is None or x.seed == seed), runs[0])
        info = r.record["extra"]["dropped_patches"]
        pics = np.asarray(info["images"], dtype=float)[:images] / 255.0
        if pics.ndim == 4:  # RGB stored channels-first (CIFAR): matplotlib wants channels-last
            pics = pics.transpose(0, 2, 3, 1)
        masks = info["masks"]
        layer_name = list(masks[0]["experts_per_token"])[layer]
        n = pics.shape[0]
        side = pics.shape[1]
        # 0.9 in per image: eight images span the book's content width (7.2 in) with readable labels.
        fig, axes = plt.subplots(len(masks), n, figsize=(0.9 * n, 1.0 * len(masks) + 0.6), squeeze=False)
        for row, m in enumerate(masks):
            counts = np.asarray(m["experts_per_token"][layer_name])[:n]
            patches = counts[:, 1:] if counts.shape[1] == int(round(math.sqrt(counts.shape[1] - 1))) ** 2 + 1 else counts
            grid = int(round(math.sqrt(patches.shape[1])))
            for col in range(n):
                ax = axes[row, col]
                ax.imshow(pics[col], cmap="gray", vmin=0, vmax=1)
                dropped = (patches[col] == 0).reshape(grid, grid).astype(float)
                overlay = np.zeros((side, side, 4))
                overlay[..., 0] = 1.0  # red, opaque where the patch was dropped
                overlay[..., 3] = 0.5 * np.kron(dropped, np.ones((side // grid, side // grid)))
                ax.imshow(overlay)
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(f"{'BPR' if m['batch_priority'] else 'vanilla'}\ncf {m['capacity_factor']:g}", fontsize=10)
                if row == 0:
                    ax.set_title(info["class_names"][info["labels"][col]], fontsize=10)
        fig.suptitle(f"Patches dropped in MoE layer {layer_name} ({run_name}, seed {r.seed}; red: no expert)", fontsize=11)
        fig.tight_layout()
        return fig

    # -- findings ------------------------------------------------------------
    def findings(self, results: ChapterResults) -> str:
        """What the stored runs show, as Markdown bullets computed from them (no typed numbers)."""
        groups = results.by_name()
        lines: list[str] = []
        sparse_and_soft = [n for n in ROUTER_RUNS if n in groups]
        if sparse_and_soft:
            ranked = sorted(sparse_and_soft, key=lambda n: -np.mean(results.values(n)))
            ranking = " > ".join(f"{n} ({mean_sd_text(results.values(n))})" for n in ranked)
            lines.append(f"**Ranking at equal pairs** (test accuracy %, mean ± std over seeds): {ranking}.")
            spread = np.mean(results.values(ranked[0])) - np.mean(results.values(ranked[-1]))
            stds = [np.std(results.values(n), ddof=1) for n in ranked if len(groups[n]) > 1]
            if stds:
                lines.append(f"Best and worst router are {spread * 100:.2f} points apart; the typical seed std is "
                             f"{np.mean(stds) * 100:.2f} points.")
        if DENSE_RUN in groups:
            lines.append(f"**Dense ViT** at the same activated FLOPs: {mean_sd_text(results.values(DENSE_RUN))} %.")
        if "softmax_tc" in groups:
            base = np.mean([_train_seconds(r) for r in groups["softmax_tc"]])
            times = {n: np.mean([_train_seconds(r) for r in groups[n]]) / base for n in groups}
            slow = ", ".join(f"{n} {t:.2f}x" for n, t in sorted(times.items(), key=lambda kv: kv[1]))
            lines.append(f"**Training time relative to softmax token choice** (this machine): {slow}.")
        dropped = {}
        for n in sparse_and_soft:
            st = [routing_of(r) for r in groups[n]]
            if st and st[0]:
                dropped[n] = np.mean([np.mean([s["dropped_fraction"] for s in x.values()]) for x in st])
        if dropped:
            lines.append("**Tokens no expert processed** (test set, mean over MoE layers and seeds): "
                         + ", ".join(f"{n} {v * 100:.1f}%" for n, v in dropped.items()) + ".")
        sweep = self.sweep_frame(results)
        if not sweep.empty:
            for run_name, k in (("softmax_tc", 1), (K2_RUN, 2), (K2_RUN, 1)):
                sel = sweep[(sweep["run"] == run_name) & (sweep["eval k"] == k)]
                if sel.empty:
                    continue
                mean = sel.groupby(["priority", "capacity factor"])["accuracy"].mean().unstack("priority") * 100
                dropped = sel.groupby("capacity factor")["dropped"].mean() * 100
                lo, hi = mean.index.min(), mean.index.max()
                lines.append(
                    f"**{run_name}, evaluated with k={k}:** at capacity factor {lo:g} ({dropped[lo]:.0f}% of tokens reach no "
                    f"expert) vanilla {mean.loc[lo, 'vanilla']:.1f}% vs BPR {mean.loc[lo, 'BPR']:.1f}%; at {hi:g} "
                    f"({dropped[hi]:.1f}% dropped) vanilla {mean.loc[hi, 'vanilla']:.1f}% vs BPR {mean.loc[hi, 'BPR']:.1f}%."
                )
        return "\n".join(f"* {line}" for line in lines)

    # -- chapter 0 ------------------------------------------------------------
    def dense_check(self, results: ChapterResults) -> pd.DataFrame:
        """This chapter's dense runs beside chapter 0's runs of the same config (the same results key): per seed both
        test accuracies, and whether every loss and accuracy of the two records is bit-identical. Chapter 0's
        results are only read (never trained); a seed chapter 0 lacks is left out."""
        from ..results import MissingResultError, load_or_run
        from . import dense_baselines

        mine = {r.seed: r for r in results.results if r.name == DENSE_RUN}
        if not mine or results.preset not in dense_baselines.PRESETS:
            return pd.DataFrame()
        config = next(iter(mine.values())).config
        names = [n for n, c in dense_baselines.chapter.experiment(results.preset).items() if c.to_dict() == config.to_dict()]
        if not names:
            return pd.DataFrame()
        rows = {}
        for seed, r in sorted(mine.items()):
            try:
                theirs = load_or_run(dense_baselines.NAME, results.preset, {names[0]: config}, [seed], progress=False,
                                     require=True)[0]
            except MissingResultError:
                continue

            def outcome(x):
                return [{k: v for k, v in h.items() if k.endswith(("loss", "accuracy"))} for h in x.history]

            rows[seed] = {"this chapter (%)": round(r.final["test_accuracy"] * 100, 2),
                          "chapter 0 (%)": round(theirs.final["test_accuracy"] * 100, 2),
                          "bit-identical": outcome(r) == outcome(theirs)}
        return pd.DataFrame.from_dict(rows, orient="index").rename_axis("seed")


chapter = RoutersBPR()
