"""Chapter 7 — shared experts, routing analysis and pruning (ViMoE).

ViMoE (Han et al., arXiv:2410.15732) reports that which layers are MoE matters, that a **shared expert** (a dense MLP
every token passes through, added to the routed experts' output) stabilises training and captures common knowledge,
and that a per-layer **routing analysis** shows which MoE layers specialise, the others being turnable back to dense
without losing accuracy. The paper fine-tunes DINOv2 and publishes no code and no table we could find (it was
rejected at ICLR 2025, reviewers calling its gains marginal); this chapter trains from scratch at the test bed's
scale, so its numbers are ours alone.

**Design.** Chapter 2's depth-6 ViT-pico and its five placements (First-2, Last-1, Last-2, Every-2, All), each MoE
layer with and without an ungated shared expert (DeepSeekMoE's form: ``y = sum_e combine_e * expert_e(x) + shared(x)``).
The runs without one are chapter 2's (read, not retrained). To keep the activated FLOPs of the dense model, the experts
are **narrowed**: with a shared expert each routed expert and the shared one have half the dense MLP's hidden width
(k = 1, so a token runs one half-width expert and the half-width shared expert: the dense MLP's FLOPs; the MoE layer
then holds 9 half-width MLPs, about half the parameters of chapter 2's 8 full-width experts).

The routing analysis (:class:`~.probes.LayerAnalysisProbe`, on every model with a shared expert): per MoE layer,
:func:`~vmoe_lib.analysis.class_expert_information` (how much the chosen expert tells about the image's class,
``I(class; expert) / H(class)``) on the **validation** split, the layers ranked by it, and the test accuracy with the
routed experts of chosen layers bypassed at inference (a bypassed layer keeps its shared expert: it is made dense).

Claims (declared in :meth:`SharedExperts.claims` before any result is read): (a) the shared expert improves accuracy
at each placement, and (a') makes accuracy less sensitive to placement; (b) on the All model the routing analysis
predicts which layers matter: bypassing the least specialised half costs less than bypassing the most specialised
half; (c) a model retrained with only the specialising half MoE (the others dense MLPs) is non-inferior to the
All model, at fewer parameters (two-stage: the All models are trained first and their ranking picks its layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..analysis import correct_of, mean_sd_text, summary_table
from ..errors import ConfigError
from ..papers import PaperNumber
from ..plots import _color, style
from ..predictions import unpack_bits
from ..results import RunResult
from ..stats import Claim, TestResult, mcnemar, paired_t
from ..train import TrainConfig
from .base import Chapter, ChapterResults, Measure, Preset, Run, SeedPaired, control_claim
from .placement import LABELS, PLACEMENTS
from .probes import LayerAnalysisProbe

__all__ = ["NAME", "PRESETS", "SharedExperts", "shared_config", "pruned_config", "layer_analysis_of", "RoutedBypass",
           "PlacementSpread", "chapter"]

NAME = "shared_experts"
ALL = "vit_all_shared"  # the prerequisite: the All model with shared experts, whose routing analysis picks layers
PRUNED = "vit_pruned_shared"  # claim (c): only the specialising half of the layers MoE
SHARED_SUFFIX = "_shared"

CONTROL_MIN_EFFECT = 1.0
SHARED_MIN_EFFECT = 0.3
SPREAD_MIN_EFFECT = 0.2
BYPASS_MIN_EFFECT = 0.5
MARGIN = 0.5
FAMILY_A, FAMILY_A2 = f"{NAME}:a_shared_helps", f"{NAME}:a2_spread"
FAMILY_B, FAMILY_C, CONTROL_FAMILY = f"{NAME}:b_analysis", f"{NAME}:c_pruned", f"{NAME}:controls"
_SOURCE = "ViMoE (Han et al., arXiv:2410.15732)"
_NO_NUMBERS = "the paper publishes no table or code we could find (its experiments fine-tune DINOv2)"

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="every code path: chapter 2's smoke ViT (depth 6) at its 5 placements with a shared expert, the "
                    "pruned model from their routing analysis, 2,048 Fashion-MNIST images, 1 epoch, 2 seeds (CI)",
        hardware="CPU, 2 cores", expected_minutes=1.0, seeds=(0, 1),
        settings={"probe_images": 1000, "analysis_seeds": None},
    ),
    "cpu": Preset(
        name="cpu",
        description="chapter 2's ViT-pico at depth 6 (Fashion-MNIST 28x28, 55k train images, 3 epochs) at its 5 "
                    "placements with a shared expert (experts and shared expert of half the MLP width, k = 1), against "
                    "chapter 2's runs without one; the model with only its specialising half of the layers MoE; 4 "
                    "seeds (chapter 2's), 8 for the All and pruned models",
        hardware="CPU, 2 cores, 2 workers x 1 thread, pinned numerics (measured: 73 min for the 32 runs it trains; "
                 "estimated 55 before the sweep: two workers share the memory bandwidth, so a run took about 1.4x "
                 "what the single-worker benchmark's step times suggest)",
        # Sized from benchmarks/bench_shared_experts.py (train step relative to chapter 2's All model: with shared
        # experts 1.05x, Last-2 with them 0.88x, the pruned model 0.94x) and chapter 2's measured runs (about 3.1 min a
        # run of its All model on one worker): 32 runs, about 96 worker-minutes of training plus 16 of routing analysis
        # (up to 10 test evaluations a run), about 55 min on 2 workers. The seeds are chapter 2's 4 (its runs are the
        # arms without a shared expert): planned_power says what they resolve; 8 seeds there would mean training 20
        # more runs of chapter 2's configs and take the sweep past 90 min.
        expected_minutes=73.0, seeds=(0, 1, 2, 3),
        # The All and pruned models (claims (b) and (c), which compare this chapter's own runs) take 8 seeds: 4 would
        # leave (c)'s MDE near 0.9 point, above its 0.5 margin (planned_power).
        settings={"probe_images": None, "analysis_seeds": tuple(range(8))},
    ),
    "gpu": Preset(
        name="gpu",
        description="chapter 2's gpu ViT (ViT-tiny/4, depth 8, CIFAR-100 32x32, 60 epochs) at its 5 placements with a "
                    "shared expert (half-width experts and shared expert), and the pruned model; 3 seeds (needs "
                    "CIFAR-100: see the data section)",
        hardware="1 GPU (estimated, not yet measured), bf16 autocast", expected_minutes=200.0, seeds=(0, 1, 2),
        settings={"probe_images": None, "analysis_seeds": None},
    ),
}


def _mlp_width(config: TrainConfig) -> int:
    """Hidden width of the dense MLP of a test-bed ViT config (embed_dim x mlp_ratio)."""
    from ..models.dense import DENSE_VIT_SIZES

    kwargs = {**DENSE_VIT_SIZES.get(config.model.removeprefix("vmoe_"), {}), **(config.model_kwargs or {})}
    if "embed_dim" not in kwargs:
        raise ConfigError(f"model={config.model!r} is not one of the book's ViTs; chapter {NAME} needs one")
    return int(kwargs["embed_dim"] * kwargs.get("mlp_ratio", 4.0))


def shared_config(plain: TrainConfig) -> TrainConfig:
    """``plain`` (an MoE config of chapter 2) with an ungated shared expert in every MoE layer and the experts narrowed
    so that the activated FLOPs stay the dense model's: routed experts and shared expert of half the MLP width."""
    half = _mlp_width(plain) // 2
    return plain.replace(model_kwargs={**plain.model_kwargs, "shared_expert": half, "expert_width": half})


def pruned_config(plain: TrainConfig, layers: Sequence[int]) -> TrainConfig:
    """The shared-expert version of ``plain`` with only ``layers`` (block indices) MoE; the others keep the dense MLP
    (full width: the same activated FLOPs)."""
    cfg = shared_config(plain)
    return cfg.replace(model_kwargs={**cfg.model_kwargs, "moe_layers": sorted(int(i) for i in layers)})


def layer_analysis_of(result: RunResult) -> dict | None:
    """The routing analysis a :class:`~.probes.LayerAnalysisProbe` stored in the run's record (``None`` if none)."""
    return (result.record.get("extra") or {}).get("layer_analysis")


def _bypass_correct(result: RunResult, key: str) -> np.ndarray:
    stored = layer_analysis_of(result)
    if not stored or key not in stored["bypass"] or "correct" not in stored["bypass"][key]:
        raise ConfigError(f"run {result.name} seed {result.seed} stores no per-image bypass {key!r}")
    n = result.record["predictions"]["n"]
    return unpack_bits({"n": n, "bits": stored["bypass"][key]["correct"]})


@dataclass(frozen=True)
class RoutedBypass(Measure):
    """Per test image, pooled over the seeds of ``run``: right under evaluation ``a`` vs under ``b``, each either
    ``"trained"`` (the model as trained) or a :class:`~.probes.LayerAnalysisProbe` bypass (``"all"``, ``"least"``,
    ``"most"``: those MoE layers' routed experts bypassed, shared experts kept). Tested by McNemar."""

    run: str
    a: str
    b: str

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:
        runs = results.runs_of(self.run)
        if not runs or not all(layer_analysis_of(r) and r.record.get("predictions") for r in runs):
            return None
        if any(k != "trained" and k not in layer_analysis_of(r)["bypass"] for r in runs for k in (self.a, self.b)):
            return None

        def correct(key: str) -> np.ndarray:
            return np.stack([correct_of(r) if key == "trained" else _bypass_correct(r, key) for r in runs])

        return mcnemar(correct(self.a), correct(self.b), direction=claim.direction)


@dataclass(frozen=True)
class PlacementSpread(Measure):
    """Per seed, the standard deviation of test accuracy across placements (runs ``plain``, then ``shared``, one per
    placement), on the seeds every run has; tested by a paired t-test of the two spreads (claim's direction)."""

    plain: tuple[str, ...]
    shared: tuple[str, ...]

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:
        values = {name: results.by_seed(name) for name in (*self.plain, *self.shared)}
        seeds = sorted(set.intersection(*(set(v) for v in values.values())))
        if len(seeds) < 2:
            return None
        spread = [[float(np.std([values[n][s] for n in names], ddof=1)) for s in seeds] for names in (self.plain, self.shared)]
        return paired_t(spread[0], spread[1], direction=claim.direction)


class SharedExperts(Chapter):
    """Chapter 7: shared experts, routing analysis and pruning (ViMoE; see the module's docstring)."""

    name = NAME
    title = "Shared experts, routing analysis and pruning"
    presets = PRESETS
    # The seed-paired contrasts of the claims the cpu preset was sized for; (a') has its own 0.2-point bar and (b) is
    # per image: their MDEs are in the verdict table.
    primary = ("pruned_noninferior_all", "shared_beats_plain_all")
    power_target = MARGIN
    benchmark = "shared_experts"

    def plain_configs(self, preset: Preset) -> dict[str, TrainConfig]:
        """Run name -> chapter 2's config of that run (``vit_<placement>`` and ``vit_dense``) for ``preset``."""
        from . import get_chapter

        plan = get_chapter("placement").experiment(preset.name)
        return {name: plan[name] for name in (*(f"vit_{t}" for t in PLACEMENTS), "vit_dense")}

    def probe(self, preset: Preset) -> LayerAnalysisProbe:
        """The routing analysis stored with every model that has a shared expert."""
        return LayerAnalysisProbe(probe_images=preset.settings["probe_images"])

    def prerequisites(self, preset: Preset) -> list[Run]:
        """The All placement with shared experts, on the analysis seeds (:meth:`analysis_seeds`): its routing analysis
        (validation split) picks the layers of the pruned model."""
        return [Run(ALL, shared_config(self.plain_configs(preset)["vit_all"]), self.analysis_seeds(preset),
                    probe=self.probe(preset))]

    @staticmethod
    def analysis_seeds(preset: Preset) -> tuple[int, ...] | None:
        """Seeds of the All and pruned models (``None``: the preset's)."""
        seeds = preset.settings.get("analysis_seeds")
        return None if seeds is None else tuple(seeds)

    def specialising_layers(self, preset: str | Preset) -> list[int]:
        """The pruned model's MoE layers, by the pre-registered rule: each layer's specialisation on the validation
        split averaged over the seeds of the All model, the ``n // 2`` most specialised of its ``n`` layers (ties: the
        later block). Reads the stored prerequisite runs (a missing one raises
        :class:`~vmoe_lib.results.MissingResultError` naming the command that trains it)."""
        p = preset if isinstance(preset, Preset) else self.preset(preset)
        return self.ranking(self.prerequisite_results(p.name).runs_of(ALL))[-1]

    @staticmethod
    def ranking(runs: Sequence[RunResult]) -> tuple[dict[int, float], list[int]]:
        """``(mean validation specialisation per block, the ``n // 2`` most specialised blocks)`` of the All runs."""
        values: dict[int, list[float]] = {}
        for r in runs:
            for st in (layer_analysis_of(r) or {}).get("specialisation", {}).values():
                values.setdefault(int(st["layer"]), []).append(float(st["value"]))
        if not values:
            raise ConfigError(f"runs {[r.name for r in runs]} store no routing analysis")
        mean = {layer: float(np.mean(v)) for layer, v in sorted(values.items())}
        order = sorted(mean, key=lambda layer: (mean[layer], layer))
        return mean, sorted(order[len(order) - len(order) // 2:])

    def runs(self, preset: Preset) -> list[Run]:
        """The All model with shared experts (the prerequisite), then the other placements with shared experts
        (costlier first), the pruned model, and chapter 2's runs without a shared expert and its dense model
        (borrowed: read, never trained here)."""
        plain = self.plain_configs(preset)
        probe = self.probe(preset)
        out = list(self.prerequisites(preset))
        for tag in ("every2", "first2", "last2", "last1"):
            out.append(Run(f"vit_{tag}{SHARED_SUFFIX}", shared_config(plain[f"vit_{tag}"]), probe=probe))
        out.append(Run(PRUNED, pruned_config(plain["vit_all"], self.specialising_layers(preset)),
                       self.analysis_seeds(preset), probe=probe))
        for name in (*(f"vit_{t}" for t in PLACEMENTS), "vit_dense"):
            out.append(Run(name, plain[name], borrow_from="placement"))
        return out

    def display_order(self, names):
        """Per placement, without then with the shared expert; then the pruned model and the dense one."""
        order = [n for t in PLACEMENTS for n in (f"vit_{t}", f"vit_{t}{SHARED_SUFFIX}")] + [PRUNED, "vit_dense"]
        rank = {n: i for i, n in enumerate(order)}
        return sorted(names, key=lambda n: rank.get(n, len(rank)))

    # -- claims -----------------------------------------------------------------------------------------------------
    def claims(self, preset: str) -> list[Claim]:
        """The chapter's claims, declared before any result is read.

        (a) Per placement, the MoE with a shared expert beats the one without by at least :data:`SHARED_MIN_EFFECT`
        points (seed-paired, Holm over the 5 placements; control: the shared model's MoE layers carry weight).
        (a') The spread across placements is smaller with the shared expert: per seed, the sd of test accuracy across
        the 5 placements, without minus with, at least :data:`SPREAD_MIN_EFFECT` points (paired t over seeds; seed noise
        enters both spreads, so this is "across placements and seeds").
        (b) On the All model with shared experts, bypassing the routed experts of the 3 least specialised layers
        (validation ranking of each run) costs less test accuracy than bypassing the 3 most specialised ones, by at
        least :data:`BYPASS_MIN_EFFECT` points (per image, McNemar pooled over seeds).
        (c) The pruned model (only the 3 layers most specialised on average over the All runs' validation analyses are
        MoE) is non-inferior to the All model within :data:`MARGIN` points (seed-paired).
        (b) and (c) depend on the control that the All model's routed experts carry weight: bypassing all of them
        (shared experts kept) costs at least :data:`CONTROL_MIN_EFFECT` point.
        """
        self.preset(preset)
        why = ("shared-expert and placement effects are 0.3-1 point; MoE layers that carry less than 1 point cannot "
               "show them")
        out = [control_claim(f"vit_{t}{SHARED_SUFFIX}", family=CONTROL_FAMILY, min_effect=CONTROL_MIN_EFFECT,
                             min_effect_why=why) for t in PLACEMENTS]
        out.append(Claim(
            id="routed_experts_carry_weight_all",
            claim=f"The routed experts of {ALL} carry weight: bypassing them in every layer (shared experts kept) costs "
                  f"accuracy, not shown to be less than {CONTROL_MIN_EFFECT:g} point",
            source="positive control: what (b) and (c) remove must matter",
            contrast=f"{ALL} vs {ALL} with its routed experts bypassed", test="mcnemar", min_effect=CONTROL_MIN_EFFECT,
            min_effect_why="(b) compares halves of the layers at 0.5 point: the routed experts must carry at least twice that",
            family=CONTROL_FAMILY, paired=True, kind="control", measure=RoutedBypass(ALL, "trained", "all")))
        paper = PaperNumber("vimoe", None, _NO_NUMBERS)
        for t in PLACEMENTS:
            out.append(Claim(
                id=f"shared_beats_plain_{t}",
                claim=f"{LABELS[t]}: a shared expert (experts narrowed to keep the activated FLOPs) beats the MoE without "
                      f"one by at least {SHARED_MIN_EFFECT:g} point",
                source=_SOURCE + ": 'a shared expert stabilises training and captures common knowledge'",
                contrast=f"vit_{t}{SHARED_SUFFIX} vs vit_{t}", test="paired_t", min_effect=SHARED_MIN_EFFECT,
                min_effect_why="the low end (0.3 point) of the design-choice effects the papers report; ViMoE's "
                               "reviewers called its gains marginal",
                family=FAMILY_A, paired=True, control=f"experts_carry_weight_vit_{t}{SHARED_SUFFIX}",
                measure=SeedPaired(f"vit_{t}{SHARED_SUFFIX}", f"vit_{t}"), paper=paper))
        out.append(Claim(
            id="shared_reduces_placement_spread",
            claim=f"With a shared expert, accuracy depends less on the placement: the sd across the 5 placements (per "
                  f"seed) shrinks by at least {SPREAD_MIN_EFFECT:g} point",
            source=_SOURCE + ": 'performance is sensitive to which layers are MoE'; the shared expert stabilises",
            contrast="sd across placements: without vs with a shared expert", test="paired_t",
            min_effect=SPREAD_MIN_EFFECT,
            min_effect_why="chapter 2's placements differ by about 1 point (sd about 0.4): halving that sd is 0.2",
            family=FAMILY_A2, paired=True, control=f"experts_carry_weight_{ALL}",
            measure=PlacementSpread(tuple(f"vit_{t}" for t in PLACEMENTS),
                                    tuple(f"vit_{t}{SHARED_SUFFIX}" for t in PLACEMENTS)),
            metric="sd of test accuracy across placements (points)", paper=paper))
        out.append(Claim(
            id="analysis_predicts_bypass_cost",
            claim=f"The routing analysis predicts which layers matter: making the least specialised half of the All "
                  f"model's MoE layers dense (routed experts bypassed) costs less than the most specialised half, by at "
                  f"least {BYPASS_MIN_EFFECT:g} point",
            source=_SOURCE + ": non-specialising layers can be turned back to dense without losing accuracy",
            contrast=f"{ALL}: least specialised half bypassed vs most specialised half bypassed", test="mcnemar",
            min_effect=BYPASS_MIN_EFFECT, min_effect_why="the book's smallest effect for a design choice (0.5 point)",
            family=FAMILY_B, paired=True, control="routed_experts_carry_weight_all",
            measure=RoutedBypass(ALL, "least", "most"), paper=paper))
        out.append(Claim(
            id="pruned_noninferior_all",
            claim=f"Retrained with only its specialising half of the layers MoE, the model is not worse than the All "
                  f"model by {MARGIN:g} point or more (at fewer parameters)",
            source=_SOURCE + ": non-specialising layers can be turned back to dense without losing accuracy",
            contrast=f"{PRUNED} vs {ALL}", test="noninferiority", min_effect=MARGIN,
            min_effect_why="the book's margin for 'meaningfully worse' (chapter 2)", family=FAMILY_C, paired=True,
            control="routed_experts_carry_weight_all", measure=SeedPaired(PRUNED, ALL), paper=paper))
        return out

    def planned_power(self, preset: str = "cpu") -> pd.DataFrame:
        """The power this preset's seeds buy, from chapter 2's ``cpu`` records (the closest there are before the
        sweep): (a) and (c), the sd of per-seed differences between two placements of its ViT (every pair, pooled);
        (a'), the sd of the per-seed spread across its 5 placements, times sqrt(2) (a difference of two spreads).
        (b) is per image: its MDE comes from the discordant images after the sweep. One-sided alpha 0.05, 80 % power."""
        from ..stats import mde
        from . import get_chapter

        ch2 = get_chapter("placement").results_of_record("cpu")
        runs = [f"vit_{t}" for t in PLACEMENTS]
        by = {n: ch2.by_seed(n) for n in runs}
        seeds = sorted(set.intersection(*(set(v) for v in by.values())))
        diffs = [np.std([by[a][s] - by[b][s] for s in seeds], ddof=1) for i, a in enumerate(runs) for b in runs[i + 1:]]
        pair_sd = 100 * float(np.sqrt(np.mean(np.square(diffs))))
        spread_sd = 100 * float(np.std([np.std([by[n][s] for n in runs], ddof=1) for s in seeds], ddof=1)) * np.sqrt(2)
        p = self.preset(preset)
        n, n_c = len(p.seeds), len(self.analysis_seeds(p) or p.seeds)
        designs = {"(a) shared - plain, per placement": (pair_sd, SHARED_MIN_EFFECT, n),
                   "(a') spread without - with": (spread_sd, SPREAD_MIN_EFFECT, n),
                   "(c) pruned - All (non-inferiority margin)": (pair_sd, MARGIN, n_c)}
        out = {label: {"sd of paired differences": f"{sd:.2f}", "seeds": k, "MDE": f"{mde(sd, k, paired=True):.2f}",
                       "smallest effect of interest": m} for label, (sd, m, k) in designs.items()}
        return pd.DataFrame.from_dict(out, orient="index")

    # -- tables -------------------------------------------------------------------------------------------------------
    def model_table(self, results: ChapterResults) -> pd.DataFrame:
        """Per run: MoE blocks, shared expert, parameters (total, activated per token), FLOPs and test accuracy."""
        table = summary_table(results.results)
        rows = {}
        for name in self.display_order(list(results.by_name())):
            runs = results.runs_of(name)
            kw = runs[0].config.model_kwargs or {}
            moe = kw.get("moe_layers")
            t = table.loc[name]
            rows[name] = {
                "MoE blocks": (LABELS.get(moe.replace("-", ""), moe) if isinstance(moe, str) else str(moe)) if moe else "—",
                "shared expert": "yes" if kw.get("shared_expert") else "no",
                "params (k)": round(t["params_total"] / 1e3, 1),
                "activated params (k)": round(t["params_activated"] / 1e3, 1),
                "MFLOPs / image": round(t["flops_per_image"] / 1e6, 2),
                "test acc. (%)": mean_sd_text(results.values(name)),
                "seeds": len(runs),
            }
        return pd.DataFrame.from_dict(rows, orient="index")

    def layer_table(self, results: ChapterResults) -> pd.DataFrame:
        """Per MoE block of the All model with shared experts (mean over seeds): its specialisation on the validation
        split, its rank (1 = least specialised, per seed, averaged) and the test accuracy lost when its routed experts
        alone are bypassed; plus the pruned model's choice."""
        runs = [r for r in results.runs_of(ALL) if layer_analysis_of(r)]
        if not runs:
            return pd.DataFrame()
        mean, chosen = self.ranking(runs)
        rows = {}
        for layer in mean:
            cost = [100 * (r.final["test_accuracy"] - layer_analysis_of(r)["bypass"][f"layer:{layer}"]["accuracy"])
                    for r in runs]
            rank = [layer_analysis_of(r)["ranking"].index(layer) + 1 for r in runs]
            rows[f"block {layer}"] = {"specialisation (val, %)": round(100 * mean[layer], 2),
                                      "mean rank (1 = least)": round(float(np.mean(rank)), 2),
                                      "bypass cost (points)": round(float(np.mean(cost)), 2),
                                      "MoE in the pruned model": "yes" if layer in chosen else "no"}
        return pd.DataFrame.from_dict(rows, orient="index")

    def bypass_table(self, results: ChapterResults) -> pd.DataFrame:
        """The All model with shared experts: test accuracy as trained and with the routed experts of the least / most
        specialised half of its layers, or of all of them, bypassed (mean over seeds)."""
        runs = [r for r in results.runs_of(ALL) if layer_analysis_of(r)]
        if not runs:
            return pd.DataFrame()
        rows = {"as trained": [100 * r.final["test_accuracy"] for r in runs]}
        labels = {"least": "least specialised half bypassed", "most": "most specialised half bypassed",
                  "all": "every layer's routed experts bypassed"}
        for key, label in labels.items():
            rows[label] = [100 * layer_analysis_of(r)["bypass"][key]["accuracy"] for r in runs]
        base = np.mean(rows["as trained"])
        return pd.DataFrame({"test acc. (%)": {k: round(float(np.mean(v)), 2) for k, v in rows.items()},
                             "cost (points)": {k: round(float(base - np.mean(v)), 2) for k, v in rows.items()}})

    # -- figures ------------------------------------------------------------------------------------------------------
    def plot_accuracy(self, results: ChapterResults):
        """Test accuracy per placement without and with a shared expert, and the pruned model: seeds as points
        (seaborn strip), mean ± sd beside them (seaborn point plot); the dense model as a band (mean ± sd)."""
        style()
        arms = {"without": "without shared expert (chapter 2)", "with": "with shared expert",
                "pruned": "pruned: specialising half MoE"}
        rows = []
        for tag in (*PLACEMENTS, "pruned"):
            names = [(PRUNED, "pruned")] if tag == "pruned" else [(f"vit_{tag}", "without"),
                                                                   (f"vit_{tag}{SHARED_SUFFIX}", "with")]
            for name, arm in names:
                rows += [{"placement": LABELS.get(tag, "Pruned"), "arm": arms[arm], "acc": 100 * v}
                         for v in results.values(name)]
        data = pd.DataFrame(rows)
        fig, ax = plt.subplots(figsize=(7.2, 5.0))
        dense = np.array(results.values("vit_dense")) * 100
        if dense.size:
            sd = dense.std(ddof=1) if dense.size > 1 else 0.0
            ax.axhspan(dense.mean() - sd, dense.mean() + sd, color="0.9", zorder=0)
            ax.axhline(dense.mean(), color="0.45", ls="--", lw=1, label=f"dense ({dense.mean():.2f}%, band ± 1 sd)")
        if not data.empty:
            hue_order = [arms[k] for k in arms if arms[k] in set(data["arm"])]
            palette = {arms[k]: _color(i) for i, k in enumerate(arms)}
            sns.stripplot(data=data, x="placement", y="acc", hue="arm", hue_order=hue_order, palette=palette, dodge=True,
                          ax=ax, size=5, alpha=0.7, jitter=0.08)
            sns.pointplot(data=data, x="placement", y="acc", hue="arm", hue_order=hue_order, palette=palette,
                          dodge=0.8 - 0.8 / len(hue_order), errorbar="sd", markers="D", linestyles="none", ax=ax,
                          legend=False)
        handles, labels = ax.get_legend_handles_labels()
        keep = {l: h for h, l in zip(handles, labels)}
        ax.legend(list(keep.values()), list(keep), loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
        ax.set_xlabel("")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title("Accuracy per placement (points: seeds; diamonds: mean ± sd)")
        fig.tight_layout()
        return fig

    def plot_bypass_vs_specialisation(self, results: ChapterResults):
        """Per MoE block of the All model with shared experts and seed: the accuracy lost when that block's routed
        experts are bypassed (test) against its specialisation (validation); seaborn scatter, one colour per block."""
        style()
        rows = []
        for r in (x for x in results.runs_of(ALL) if layer_analysis_of(x)):
            la = layer_analysis_of(r)
            for st in la["specialisation"].values():
                layer = int(st["layer"])
                rows.append({"block": f"block {layer}", "spec": 100 * st["value"],
                             "cost": 100 * (r.final["test_accuracy"] - la["bypass"][f"layer:{layer}"]["accuracy"])})
        fig, ax = plt.subplots(figsize=(7.2, 4.8))
        if rows:
            data = pd.DataFrame(rows)
            blocks = sorted(set(data["block"]), key=lambda b: int(b.split()[-1]))
            sns.scatterplot(data=data, x="spec", y="cost", hue="block", hue_order=blocks, s=55, alpha=0.85, ax=ax,
                            palette={b: _color(i) for i, b in enumerate(blocks)})
            ax.legend(ncol=len(blocks), loc="upper center", bbox_to_anchor=(0.5, -0.16))
        ax.axhline(0, color="0.4", lw=1, ls="--")
        ax.set_xlabel("specialisation on validation images, I(class; expert) / H(class) (%)")
        ax.set_ylabel("test accuracy lost (points)")
        ax.set_title(f"{ALL}: accuracy lost when one block's routed experts are\nbypassed (shared expert kept), against "
                     f"its specialisation; one point per block and seed")
        fig.tight_layout()
        return fig

    def plot_class_expert(self, results: ChapterResults, seed: int | None = None):
        """Class x expert tables (test images, % of a class's tokens sent to each expert) of the All model's most and
        least specialised block (validation ranking of that seed)."""
        style()
        runs = [r for r in results.runs_of(ALL) if layer_analysis_of(r)]
        if not runs:
            return None
        r = next((x for x in runs if x.seed == seed), runs[0])
        la = layer_analysis_of(r)
        routing = (r.record.get("extra") or {}).get("routing", {})
        by_layer = {int(st["layer"]): name for name, st in la["specialisation"].items()}
        picks = [("most", la["ranking"][-1]), ("least", la["ranking"][0])]
        classes = la.get("class_names")
        fig, axes = plt.subplots(1, 2, figsize=(7.4, 4.4), sharey=True)
        tables = {layer: np.array(routing[by_layer[layer]]["class_expert"]) * 100 for _, layer in picks}
        top = max(10.0, float(np.ceil(max(t.max() for t in tables.values()) / 10) * 10))  # one scale for both panels
        for ax, (what, layer) in zip(axes, picks):
            table = tables[layer]
            sns.heatmap(table, ax=ax, cmap="viridis", vmin=0, vmax=top, cbar=ax is axes[-1],
                        cbar_kws={"label": "% of the class's tokens"}, annot=False)
            value = 100 * la["specialisation"][by_layer[layer]]["value"]
            ax.set_title(f"block {layer}, {what} specialised\n(val: {value:.1f}%)", fontsize=10)
            ax.set_xlabel("expert")
        axes[0].set_ylabel("class")
        if classes:
            axes[0].set_yticks(np.arange(len(classes)) + 0.5, classes, rotation=0)
        fig.suptitle(f"{ALL}, seed {r.seed}: where each class's test tokens go")
        fig.tight_layout()
        return fig

    # -- findings -----------------------------------------------------------------------------------------------------
    def findings(self, results: ChapterResults) -> str:
        """What the stored runs show, as Markdown bullets computed from them (no typed numbers)."""
        lines = []
        gains = []
        for t in PLACEMENTS:
            a, b = results.paired(f"vit_{t}{SHARED_SUFFIX}", f"vit_{t}")
            if a:  # the mean of the per-seed differences, as the verdict table computes it
                gains.append(f"{LABELS[t]} {np.mean((np.array(a) - np.array(b)) * 100):+.2f}")
        if gains:
            lines.append("**Shared expert minus none** (points, paired by seed, mean): " + ", ".join(gains) + ".")
        spreads = {}
        for label, suffix in (("without", ""), ("with", SHARED_SUFFIX)):
            by = {t: results.by_seed(f"vit_{t}{suffix}") for t in PLACEMENTS}
            seeds = sorted(set.intersection(*(set(v) for v in by.values()))) if all(by.values()) else []
            if seeds:
                spreads[label] = [100 * np.std([by[t][s] for t in PLACEMENTS], ddof=1) for s in seeds]
        if len(spreads) == 2:
            lines.append(f"**Spread across placements** (sd per seed, points, mean over seeds): without a shared expert "
                         f"{np.mean(spreads['without']):.2f}, with {np.mean(spreads['with']):.2f}.")
        layers = self.layer_table(results)
        if not layers.empty:
            spec = layers["specialisation (val, %)"]
            lines.append(f"**Routing analysis** ({ALL}, validation): the most specialised block is "
                         f"{spec.idxmax()} ({spec.max():.1f}%), the least {spec.idxmin()} ({spec.min():.1f}%); the pruned "
                         f"model keeps MoE in {', '.join(layers.index[layers['MoE in the pruned model'] == 'yes'])}.")
            cost = layers["bypass cost (points)"]
            rho = pd.Series(spec.values).corr(pd.Series(cost.values), method="spearman")
            lines.append(f"Across blocks, specialisation and the cost of bypassing a block's routed experts have a rank "
                         f"correlation of {rho:+.2f} (means over seeds; the blocks bypassed alone cost "
                         f"{cost.min():.2f} to {cost.max():.2f} points).")
        bypass = self.bypass_table(results)
        if not bypass.empty:
            c = bypass["cost (points)"]
            lines.append(f"**Bypassing halves** ({ALL}, test): least specialised half {c.iloc[1]:.2f} points, most "
                         f"specialised half {c.iloc[2]:.2f}, every routed expert {c.iloc[3]:.2f}.")
        a, b = results.paired(PRUNED, ALL)
        if a:
            t = summary_table(results.results)
            lines.append(f"**Pruned vs All** (shared experts): {mean_sd_text(a)} vs {mean_sd_text(b)} "
                         f"({np.mean((np.array(a) - np.array(b)) * 100):+.2f} points) at {t.loc[PRUNED, 'params_total'] / 1e3:.0f}k "
                         f"vs {t.loc[ALL, 'params_total'] / 1e3:.0f}k parameters.")
        return "\n".join(f"* {line}" for line in lines)


chapter = SharedExperts()
