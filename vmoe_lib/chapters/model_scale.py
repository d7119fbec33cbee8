"""Chapter 5 — model size and activated parameters: where MoE helps most.

* The sweet-spot study (Videau et al., TMLR 2025, arXiv:2411.18322): "MoE layers most effectively strengthen tiny and
  mid-sized models, while gains taper off for large-capacity networks" (Tab. 1, MoE minus dense on ImageNet-1k: ViT-S
  +0.7, ViT-B -0.3; ConvNeXt-T 0.0, -S 0.0, -B -0.3); "moderate parameter activation per sample provides the best
  trade-off ... as the number of activated parameters increases, the benefits of MoE diminish" (Fig. 2); ViT-S with 8
  experts, k = 1 / k = 2: 80.2 / 80.5 (Tab. 4).
* Mobile V-MoE (Daxberger et al., arXiv:2309.04354, Sec. 3): the smallest models gain most (ViT-Tiny +3.39 points,
  a 54M-FLOP ViT +4.66).

**Design.** Chapter 0's test bed family: ViTs of depth 4 and patch 7 at widths 16, 32 and 64 (heads of 16 channels;
14k, 53k and 205k parameters), each with its MoE version made the test bed's way (every block MoE, 8 experts, softmax
token choice with k = 1, groups of 8 images, capacity factor 1) against the dense model of the same width, whose
activated FLOPs it matches (one expert of the dense MLP's size per token; the FLOPs counted are stored with every
run). The width-64 pair is the test bed itself (chapters 1 and 3's runs, read; seeds 6-9 of its dense model trained
here). At width 64 the number of experts per token k is varied too: k = 1 (the test bed), k = 2 (chapter 1's run,
capacity factor 1.05; seeds 6-9 trained here) and k = 4 (capacity factor 1.05). Sized from
``benchmarks/bench_model_scale.py``: wider models (a width-128 pair costs 2.6x the width-64 pair) do not fit the
``cpu`` budget, so the family spans 14x in parameters from the small side.

Claims (declared in :meth:`ModelScale.claims` before any result is read): (a) the MoE-minus-dense gain shrinks with
size (its per-seed least-squares slope against log2 of the dense model's parameters is negative); (b) at each width
MoE beats dense; (c) diminishing returns in k: the gain from k = 1 to 2 exceeds the gain from 2 to 4; (d) the gain
over dense per unit of activated FLOPs is highest at the moderate k = 2.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ..analysis import mean_sd_text
from ..errors import ConfigError
from ..papers import PaperNumber
from ..plots import _color, plain_log_axis, style
from ..stats import Claim, TestResult, paired_t
from .base import (Chapter, ChapterResults, Measure, Preset, Run, SeedPaired, SeedPairedInteraction, control_claim)
from .probes import RoutingStatsProbe
from .recipes import SWEET_SPOT_GAIN, TEST_BED

__all__ = ["NAME", "PRESETS", "ModelScale", "WidthFamily", "GainSlope", "GainPerFlop", "size_config", "flops_ratio", "chapter"]

NAME = "model_scale"
LENDERS = {"moe": ("router_gates", "tc_linear"), "dense": ("routers_bpr", "dense"), "k2": ("routers_bpr", "softmax_tc_k2")}

CONTROL_MIN_EFFECT = 1.0
GAIN_MIN_EFFECT = 0.5
SLOPE_MIN_EFFECT = 0.2  # points of gain lost per doubling of the parameters
K_INTERACTION_MIN_EFFECT = 0.3
EFFICIENCY_MIN_EFFECT = 0.2
FAMILY_A, FAMILY_B = f"{NAME}:a_slope", f"{NAME}:b_moe_beats_dense"
FAMILY_C, FAMILY_D = f"{NAME}:c_diminishing_k", f"{NAME}:d_moderate_k"
CONTROL_FAMILY = f"{NAME}:controls"
_SWEET = "Sweet-spot study (Videau et al., arXiv:2411.18322)"


def dense_name(width: int) -> str:
    return f"dense_w{width}"


def moe_name(width: int) -> str:
    return f"moe_w{width}"


K_NAMES = {2: "moe_k2", 4: "moe_k4"}


def size_config(config, width: int, base_width: int, head_channels: int):
    """``config`` (a run of the test bed's ViT) at another width: ``embed_dim`` and ``num_heads`` (``head_channels``
    per head, as the test bed's) in its ``model_kwargs``; the test bed's own width ``base_width`` leaves the config as
    it is (the same experiment, so the same results key)."""
    if width == base_width:
        return config
    if width % head_channels:
        raise ConfigError(f"width={width} is invalid; it must be a multiple of the {head_channels} channels per head")
    return config.replace(model_kwargs={**config.model_kwargs, "embed_dim": int(width),
                                        "num_heads": int(width) // head_channels})


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="every code path: widths 16, 32 and 64 (dense and MoE) and k = 1, 2, 4 at width 64, on 2,048 "
                    "Fashion-MNIST images, 1 epoch, 2 seeds (CI)",
        hardware="CPU, 2 cores", expected_minutes=1.5, seeds=(0, 1),
        settings={"widths": (16, 32, 64), "base_width": 64, "head_channels": 16,
                  "probe_images": 1000},
    ),
    "cpu": Preset(
        name="cpu",
        description=f"chapter 0's test bed family ({TEST_BED.dense} at widths 16, 32 and 64, depth 4; every block "
                    "MoE, 8 experts, k = 1) against the dense model of each width, and k = 1, 2, 4 at width 64; "
                    "Fashion-MNIST 28x28, 55k train images, 3 epochs, 10 seeds",
        hardware="CPU, 2 cores, 2 workers x 1 thread, pinned numerics (estimated 72 min before the sweep)",
        expected_minutes=72.0, seeds=tuple(range(10)),
        # Sized from benchmarks/bench_model_scale.py (train step at width 64: dense 1.00x, MoE k = 1 1.29x, k = 2
        # 1.81x, k = 4 2.76x; a width-128 pair costs about 2.6x the width-64 pair): widths 16-32-64 (14k to 205k
        # parameters, 14x) fit the 90-minute budget with 10 seeds everywhere (72 min estimated from the runs' step
        # times and chapters 1 and 4's measured run times); widths 32-64-128 (or 96) do not, nor 12 seeds.
        settings={"widths": (16, 32, 64), "base_width": 64, "head_channels": 16,
                  "probe_images": None},
    ),
    "gpu": Preset(
        name="gpu",
        description="chapter 1's gpu model family (ViT/4 on CIFAR-100, MoE in layers 5 and 7, 8 experts, k = 1) at "
                    "widths 128, 192 and 384, against the dense model of each width, and k = 1, 2, 4 at width 192, "
                    "60 epochs, 3 seeds (needs CIFAR-100: see the data section)",
        hardware="1 GPU (estimated, not yet measured), bf16 autocast", expected_minutes=300.0, seeds=(0, 1, 2),
        settings={"widths": (128, 192, 384), "base_width": 192, "head_channels": 64,
                  "probe_images": None},
    ),
}


@dataclass(frozen=True)
class GainSlope(Measure):
    """Claim (a): per seed, the least-squares slope of the MoE-minus-dense gain (points) against log2 of the dense
    model's parameters, over the widths that seed has; oriented so a *shrinking* gain is positive; tested by a
    one-sample ``paired_t`` of the per-seed slopes against zero (the seeds pair the widths: same data order and
    initial random stream)."""

    widths: tuple[int, ...]

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:
        gains, params = {}, {}
        for w in self.widths:
            moe, dense = results.by_seed(moe_name(w)), results.by_seed(dense_name(w))
            runs = results.runs_of(dense_name(w))
            if not runs:
                return None
            params[w] = float(np.log2(runs[0].record["costs"]["params_total"]))
            gains[w] = {s: moe[s] - dense[s] for s in set(moe) & set(dense)}
        seeds = sorted(set.intersection(*(set(g) for g in gains.values())))
        if len(seeds) < 2 or len(self.widths) < 3:
            return None
        x = np.array([params[w] for w in self.widths])
        xc = x - x.mean()
        slopes = [float((xc * np.array([gains[w][s] for w in self.widths])).sum() / (xc ** 2).sum()) for s in seeds]
        result = paired_t([0.0] * len(slopes), slopes, direction=claim.direction)
        return replace(result, detail={**result.detail, "slopes_points": [100 * v for v in slopes],
                                       "log2_params": x.tolist()})


@dataclass(frozen=True)
class GainPerFlop(Measure):
    """Claim (d): per seed, the MoE-minus-dense gain (points) of run ``a`` divided by its activated FLOPs relative to
    the dense model's, minus the same for run ``b``; tested by ``paired_t`` against zero. The FLOPs are each run's
    stored ``costs.flops_per_image`` (the token-expert pairs it processes, counted by torch's FLOP counter)."""

    a: str
    b: str
    dense: str

    def __call__(self, claim: Claim, results: ChapterResults) -> TestResult | None:
        dense = results.by_seed(self.dense)
        per = {}
        for name in (self.a, self.b):
            ratio = flops_ratio(results, name, self.dense)
            if ratio is None:
                return None
            per[name] = {s: (v - dense[s]) / ratio for s, v in results.by_seed(name).items() if s in dense}
        seeds = sorted(set(per[self.a]) & set(per[self.b]))
        if len(seeds) < 2:
            return None
        return paired_t([per[self.a][s] for s in seeds], [per[self.b][s] for s in seeds], direction=claim.direction)


def flops_ratio(results: ChapterResults, name: str, dense: str) -> float | None:
    """Activated FLOPs per image of run ``name`` over those of run ``dense`` (stored costs)."""
    a, b = results.runs_of(name), results.runs_of(dense)
    if not a or not b:
        return None
    return a[0].record["costs"]["flops_per_image"] / b[0].record["costs"]["flops_per_image"]


class WidthFamily:
    """What a chapter that trains one model family at several widths reads from its presets' settings: ``widths``
    and ``base_width`` (the width where it compares variants). Mixed into a :class:`Chapter`."""

    def widths(self, preset: str | Preset) -> tuple[int, ...]:
        """The widths a preset trains, ascending."""
        p = preset if isinstance(preset, Preset) else self.preset(preset)
        return tuple(sorted(p.settings["widths"]))

    def base_width(self, preset: str | Preset) -> int:
        """The preset's base width: where the chapter compares variants of one model (chapter 5: k; chapter 6: the
        routings)."""
        p = preset if isinstance(preset, Preset) else self.preset(preset)
        return int(p.settings["base_width"])


class ModelScale(WidthFamily, Chapter):
    """Chapter 5: where MoE helps most, by model size and by activated parameters."""

    name = NAME
    title = "Model size and activated parameters: where MoE helps most"
    presets = PRESETS
    primary = ("gain_shrinks_with_size", "diminishing_returns_in_k")
    power_target = 0.5
    benchmark = "model_scale"

    def k_runs(self, preset: str | Preset) -> dict[int, str]:
        """k -> the run of the MoE model at the base width with k experts per token."""
        return {1: moe_name(self.base_width(preset)), **K_NAMES}

    def runs(self, preset: Preset) -> list[Run]:
        """Per width (ascending): the dense model, then its MoE version; then k = 2 and k = 4 at the test bed's width.
        The test bed's pair and its k = 2 run are chapters 1 and 3's (borrowed: their seeds read where they are
        stored, the others trained here as the same experiment)."""
        from . import get_chapter

        def lent(key: str):
            chapter, run = LENDERS[key]
            return get_chapter(chapter).experiment(preset.name)[run], chapter

        (moe, moe_from), (dense, dense_from), (k2, k2_from) = lent("moe"), lent("dense"), lent("k2")
        probe = RoutingStatsProbe(probe_images=preset.settings["probe_images"])
        out = []
        base, heads = self.base_width(preset), int(preset.settings["head_channels"])
        for w in self.widths(preset):
            mine = w != base
            out.append(Run(dense_name(w), size_config(dense, w, base, heads), borrow_from=None if mine else dense_from))
            out.append(Run(moe_name(w), size_config(moe, w, base, heads), probe=probe,
                           borrow_from=None if mine else moe_from))
        out.append(Run("moe_k2", k2, probe=probe, borrow_from=k2_from))
        out.append(Run("moe_k4", k2.replace(model_kwargs={**k2.model_kwargs, "k": 4}), probe=probe))
        return out

    def claims(self, preset: str) -> list[Claim]:
        """The chapter's claims, declared before any result is read.

        (a) The MoE-minus-dense gain shrinks as the model grows: the per-seed slope of the gain against log2 of the
        dense model's parameters is below zero, by at least :data:`SLOPE_MIN_EFFECT` points per doubling
        (:class:`GainSlope`; control: the smallest width's MoE, whose experts are the smallest). (b) At each width MoE beats dense by at least
        :data:`GAIN_MIN_EFFECT` points (Holm over the widths). (c) Diminishing returns in k at the test bed's width:
        the gain from k = 1 to 2 exceeds the gain from 2 to 4 by :data:`K_INTERACTION_MIN_EFFECT` points (an
        interaction). (d) The gain over dense per unit of activated FLOPs (relative to the dense model's) is higher at
        k = 2 than at k = 1 and than at k = 4 (:class:`GainPerFlop`; Holm over the two).
        """
        widths, k_runs, base = self.widths(preset), self.k_runs(preset), self.base_width(preset)
        why = "MoE gains at this scale are 0.5-1 point (chapter 0); experts that carry less than 1 point cannot show them"
        out = [control_claim(moe_name(w), family=CONTROL_FAMILY, min_effect=CONTROL_MIN_EFFECT, min_effect_why=why)
               for w in widths]
        out += [control_claim(k_runs[k], family=CONTROL_FAMILY, min_effect=CONTROL_MIN_EFFECT, min_effect_why=why)
                for k in (2, 4)]
        out.append(Claim(
            id="gain_shrinks_with_size",
            claim=f"The MoE-minus-dense gain shrinks as the model grows: by at least {SLOPE_MIN_EFFECT:g} point per "
                  f"doubling of the parameters (widths {', '.join(map(str, widths))})",
            source=f"{_SWEET}, Sec. 4: 'MoE layers most effectively strengthen tiny and mid-sized models, while gains "
                   "taper off for large-capacity networks'",
            contrast="per-seed slope of (MoE - dense) against log2(parameters), sign reversed",
            test="paired_t", min_effect=SLOPE_MIN_EFFECT,
            min_effect_why="the gentler of the paper's two rates: ConvNeXt-T/S/B lose 0.3 point over about 1.7 "
                           "doublings (0.2 per doubling), ViT-S to ViT-B 1.0 point over 2 (0.5)",
            family=FAMILY_A, paired=True, control=f"experts_carry_weight_{moe_name(min(widths))}",
            measure=GainSlope(widths),
            paper=PaperNumber("sweet_spot", 0.5, "Tab. 1, ImageNet-1k: ViT-S (22M params) +0.7, ViT-B (86M) -0.3: "
                                                 "1.0 point over 2 doublings (ConvNeXt-T/S/B 0.0/0.0/-0.3)"),
        ))
        for w in widths:
            out.append(Claim(
                id=f"moe_beats_dense_w{w}",
                claim=f"At width {w}, the MoE model beats the dense model of equal activated FLOPs (by at least "
                      f"{GAIN_MIN_EFFECT:g} point)",
                source=f"{_SWEET}, Tab. 1; Mobile V-MoE (arXiv:2309.04354): the smallest models gain most",
                contrast=f"{moe_name(w)} vs {dense_name(w)}", test="paired_t", min_effect=GAIN_MIN_EFFECT,
                min_effect_why="the low end of the gains the sweet-spot study reports for small models (+0.5-1)",
                family=FAMILY_B, paired=True, control=f"experts_carry_weight_{moe_name(w)}",
                measure=SeedPaired(moe_name(w), dense_name(w)),
                paper=SWEET_SPOT_GAIN[("vit", "all")],
            ))
        out.append(Claim(
            id="diminishing_returns_in_k",
            claim=f"Diminishing returns in activated experts: the gain from k = 1 to k = 2 exceeds the gain from "
                  f"k = 2 to k = 4 by at least {K_INTERACTION_MIN_EFFECT:g} point",
            source=f"{_SWEET}, Fig. 2: 'as the number of activated parameters increases, the benefits of MoE "
                   "diminish'",
            contrast=f"({k_runs[2]} - {k_runs[1]}) vs ({k_runs[4]} - {k_runs[2]})", test="interaction",
            min_effect=K_INTERACTION_MIN_EFFECT,
            min_effect_why="the paper's step from k = 1 to 2 (ViT-S, 8 experts: +0.3 point)",
            family=FAMILY_C, paired=True, control=f"experts_carry_weight_{k_runs[4]}",
            measure=SeedPairedInteraction(k_runs[2], k_runs[1], k_runs[4], k_runs[2]),
            paper=PaperNumber("sweet_spot", None, "Tab. 4: ViT-S, 8 experts, k = 1 80.2, k = 2 80.5 (+0.3); no k = 4 "
                                                  "row, so no number for the second step"),
        ))
        for other in (1, 4):
            out.append(Claim(
                id=f"moderate_k_beats_k{other}_per_flop",
                claim=f"Per unit of activated FLOPs, k = 2 gains more over the dense model than k = {other} (by at "
                      f"least {EFFICIENCY_MIN_EFFECT:g} point)",
                source=f"{_SWEET}, Sec. 4: 'moderate parameter activation per sample provides the best trade-off'",
                contrast=f"(gain / FLOPs ratio) of {k_runs[2]} vs {k_runs[other]}", test="paired_t",
                min_effect=EFFICIENCY_MIN_EFFECT,
                min_effect_why="a fifth of a point per dense model's worth of FLOPs: below the spread of a gain",
                family=FAMILY_D, paired=True, control=f"experts_carry_weight_{k_runs[max(2, other)]}",
                measure=GainPerFlop(k_runs[2], k_runs[other], dense_name(base)),
                paper=PaperNumber("sweet_spot", None, "Fig. 2 and Sec. 4; a qualitative statement, no number"),
            ))
        return out

    # -- power, before the sweep --------------------------------------------------------------------------------
    def dense_params(self, preset: str | Preset) -> dict[int, int]:
        """Width -> parameters of the preset's dense model at that width (the models are built, not trained)."""
        from ..models import create_model

        p = preset if isinstance(preset, Preset) else self.preset(preset)
        plan = self.experiment(p.name)
        out = {}
        for w in self.widths(p):
            config = plan[dense_name(w)]
            model = create_model(config.model, num_classes=10, **config.model_kwargs)
            out[w] = int(sum(t.numel() for t in model.parameters()))
        return out

    def planned_power(self, preset: str = "cpu") -> pd.DataFrame:
        """The power this preset's seeds buy, from the closest records there are before its sweep: chapter 1's ``cpu``
        runs of the test bed (width 64). d, the sd of the per-seed gain of its MoE model (``softmax_tc``) over its
        dense model, stands for the sd of a gain at every width; e, the sd of the per-seed difference k = 2 minus
        k = 1 (``softmax_tc_k2`` - ``softmax_tc``), for differences between values of k. Assuming the arms' seed
        deviations independent with equal spread: (b) a gain has sd d; (a) a per-seed slope over the widths has sd
        d / sqrt(sum (x - mean x)^2), x = log2 of the dense models' parameters; (c) the interaction 2 k2 - k1 - k4 has
        sd sqrt(3) e; (d) a difference of gains per FLOP ratio has sd (e / sqrt 2) * sqrt(sum c^2) over its
        coefficients c. MDE one-sided alpha 0.05, 80 % power, at this preset's seeds."""
        from ..stats import mde
        from . import get_chapter

        lender = get_chapter("routers_bpr").results_of_record("cpu")
        gain = [x - y for x, y in zip(*lender.paired("softmax_tc", "dense"))]
        step = [x - y for x, y in zip(*lender.paired("softmax_tc_k2", "softmax_tc"))]
        d, e = 100 * float(np.std(gain, ddof=1)), 100 * float(np.std(step, ddof=1))
        x = np.log2(np.array(list(self.dense_params(preset).values()), dtype=float))
        slope_sd = d / float(np.sqrt(((x - x.mean()) ** 2).sum()))
        # FLOPs of k = 1, 2, 4 relative to the dense model at the test bed's width, from the sizing benchmark's record
        rows = {row["model"]: row["flops_per_image"] for row in self.benchmark_report()["rows"]}
        r1, r2, r4 = (rows[self.k_runs(preset)[k]] / rows["dense"] for k in (1, 2, 4))
        sigma = e / np.sqrt(2)

        def per_flop_sd(ra: float, rb: float) -> float:
            return float(sigma * np.sqrt((1 / ra) ** 2 + (1 / rb) ** 2 + (1 / ra - 1 / rb) ** 2))

        n = len(self.preset(preset).seeds)
        designs = {
            "(a) slope of the gain, points per doubling": (slope_sd, SLOPE_MIN_EFFECT),
            "(b) MoE - dense at one width": (d, GAIN_MIN_EFFECT),
            "(c) interaction (k2 - k1) - (k4 - k2)": (float(np.sqrt(3) * e), K_INTERACTION_MIN_EFFECT),
            "(d) gain per FLOP ratio, k = 2 vs k = 1": (per_flop_sd(r2, r1), EFFICIENCY_MIN_EFFECT),
            "(d) gain per FLOP ratio, k = 2 vs k = 4": (per_flop_sd(r2, r4), EFFICIENCY_MIN_EFFECT),
        }
        out = {label: {"sd of paired differences": f"{sd:.2f}", f"MDE, n={n}": f"{mde(sd, n, paired=True):.2f}",
                       "smallest effect of interest": m} for label, (sd, m) in designs.items()}
        return pd.DataFrame.from_dict(out, orient="index")

    # -- tables ----------------------------------------------------------------------------------------------------
    def size_table(self, results: ChapterResults) -> pd.DataFrame:
        """Per model: parameters in total and activated per image, FLOPs per image (stored costs), test accuracy
        (mean ± sd over seeds), the gain over the dense model of its width (points, paired by seed), training minutes
        per run and the seeds."""
        preset = self.preset_of(results)
        k_runs, base = self.k_runs(preset), self.base_width(preset)
        rows = {}
        for w in self.widths(preset):
            for name, kind in ((dense_name(w), "dense"), (moe_name(w), "MoE, k = 1")):
                rows[(w, kind)] = self._row(results, name, dense_name(w))
        for k in (2, 4):
            rows[(base, f"MoE, k = {k}")] = self._row(results, k_runs[k], dense_name(base))
        frame = pd.DataFrame.from_dict({k: v for k, v in rows.items() if v}, orient="index")
        if not frame.empty:
            frame.index = pd.MultiIndex.from_tuples(frame.index, names=["width", "model"])
        return frame

    def _row(self, results: ChapterResults, name: str, dense: str) -> dict:
        runs = results.runs_of(name)
        if not runs:
            return {}
        costs = runs[0].record.get("costs", {})
        a, b = results.paired(name, dense)
        gain = mean_sd_text([x - y for x, y in zip(a, b)], signed=True) if name != dense and a else ""
        return {"params (k)": f"{costs.get('params_total', 0) / 1e3:.0f}",
                "activated (k)": f"{costs.get('params_activated', 0) / 1e3:.0f}",
                "MFLOPs / image": f"{costs.get('flops_per_image', 0) / 1e6:.2f}",
                "test acc. (%)": mean_sd_text([r.final["test_accuracy"] for r in runs]),
                "gain over dense (points)": gain,
                "min / run": f"{np.mean([r.record.get('wall_time_s', np.nan) for r in runs]) / 60:.1f}",
                "seeds": len(runs)}

    # -- figures ---------------------------------------------------------------------------------------------------
    def _points(self, results: ChapterResults) -> pd.DataFrame:
        rows = []
        for name, runs in results.by_name().items():
            for r in runs:
                costs = r.record.get("costs", {})
                rows.append({"run": name, "seed": r.seed, "accuracy": 100 * r.final["test_accuracy"],
                             "params": costs.get("params_total"), "activated": costs.get("params_activated"),
                             "flops": costs.get("flops_per_image"), "moe": not name.startswith("dense")})
        return pd.DataFrame(rows)

    @staticmethod
    def _label(run: str) -> str:
        """``moe_w32`` -> ``w32``; ``moe_k2`` -> ``k2``: the short label of an MoE run in the figures."""
        return run.removeprefix("moe_")

    def _annotate(self, ax, means: pd.DataFrame, column: str, color: str) -> None:
        """Label the MoE means above their markers; models that share an x (the k runs' total parameters) get one
        label over the highest of them."""
        for x, group in means.groupby(column, sort=True):
            label = ", ".join(self._label(run) for run in group.sort_values("accuracy").index)
            ax.annotate(label, (x, group["accuracy"].max()), textcoords="offset points", xytext=(0, 9), ha="center",
                        fontsize=10, color=color, bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none",
                                                        "alpha": 0.85})

    def plot_frontier(self, results: ChapterResults):
        """Test accuracy against activated parameters (left) and total parameters (right): the dense models' frontier
        (line) and the MoE models (k = 1 at each width; k = 2 and 4 at the test bed's width); points are seeds, the
        large markers the means."""
        style()
        frame = self._points(results)
        fig, axes = plt.subplots(1, 2, figsize=(7.4, 4.2), sharey=True)
        for ax, column, label in ((axes[0], "activated", "activated parameters per image"),
                                  (axes[1], "params", "total parameters")):
            if frame.empty:
                continue
            for moe, color, marker, kind in ((False, _color(7), "o", "dense"), (True, _color(0), "D", "MoE")):
                part = frame[frame["moe"] == moe]
                ax.scatter(part[column], part["accuracy"], color=color, alpha=0.35, s=14, lw=0)
                means = part.groupby("run").agg({column: "first", "accuracy": "mean"}).sort_values(column)
                if moe:
                    ax.scatter(means[column], means["accuracy"], color=color, marker=marker, s=44, label=kind, zorder=3)
                    self._annotate(ax, means, column, color)
                else:
                    ax.plot(means[column], means["accuracy"], color=color, marker=marker, lw=1.6, label=kind)
            ax.set_xscale("log")
            plain_log_axis(ax.xaxis)
            ax.set_xlabel(label)
        axes[0].set_ylabel("test accuracy (%)")
        axes[0].legend(loc="lower right", frameon=True)
        low, high = axes[0].get_ylim()
        axes[0].set_ylim(low, high + 0.06 * (high - low))  # room for the labels over the top markers
        fig.suptitle("Accuracy against parameters (points: seeds)")
        fig.tight_layout()
        return fig

    def plot_gain_by_size(self, results: ChapterResults):
        """The MoE-minus-dense gain at each width against the dense model's parameters: one point per seed, the
        diamond the mean, the line the least-squares fit of the means (claim (a)'s slope is the mean of the per-seed
        fits)."""
        style()
        rows = []
        for w in self.widths(self.preset_of(results)):
            a, b = results.paired(moe_name(w), dense_name(w))
            dense = results.runs_of(dense_name(w))
            if dense:
                rows += [{"params": dense[0].record["costs"]["params_total"], "gain": 100 * (x - y)} for x, y in zip(a, b)]
        frame = pd.DataFrame(rows)
        fig, ax = plt.subplots(figsize=(7.2, 4.0))
        if not frame.empty:
            ax.scatter(frame["params"], frame["gain"], color=_color(0), alpha=0.45, s=18, lw=0, label="seed")
            means = frame.groupby("params")["gain"].mean()
            ax.scatter(means.index, means.values, color=_color(0), marker="D", s=50, zorder=3, label="mean")
            if len(means) >= 2:
                x = np.log2(means.index.to_numpy(dtype=float))
                b1, b0 = np.polyfit(x, means.values, 1)
                xs = np.linspace(x.min(), x.max(), 20)
                ax.plot(2 ** xs, b0 + b1 * xs, color=_color(1), lw=1.6,
                        label=f"fit of the means: {b1:+.2f} points per doubling")
        ax.axhline(0, color="0.3", lw=1)
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
        ax.set_xlabel("parameters of the dense model")
        ax.set_ylabel("MoE - dense (points)")
        ax.set_title("The gain of MoE by model size")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
        fig.tight_layout()
        return fig

    def plot_k(self, results: ChapterResults):
        """Test accuracy against k (experts per token) at the test bed's width, against the activated FLOPs of each
        k relative to the dense model's; the dashed line and band are the dense model's mean and ± 1 sd."""
        style()
        preset = self.preset_of(results)
        base = self.base_width(preset)
        dense = dense_name(base)
        rows = []
        for k, name in self.k_runs(preset).items():
            ratio = flops_ratio(results, name, dense)
            rows += [{"k": k, "label": f"k = {k}\n({ratio:.2f}x FLOPs)" if ratio else f"k = {k}",
                      "accuracy": 100 * v} for v in results.values(name)]
        frame = pd.DataFrame(rows)
        fig, ax = plt.subplots(figsize=(7.2, 4.0))
        if not frame.empty:
            order = list(dict.fromkeys(frame.sort_values("k")["label"]))
            sns.stripplot(data=frame, x="label", y="accuracy", order=order, color=_color(0), alpha=0.5, size=5,
                          jitter=0.1, ax=ax)
            sns.pointplot(data=frame, x="label", y="accuracy", order=order, color=_color(0), errorbar=None,
                          markers="D", ax=ax)
        values = results.values(dense)
        if values:
            m, sd = 100 * np.mean(values), 100 * (np.std(values, ddof=1) if len(values) > 1 else 0.0)
            ax.axhline(m, color="0.35", ls="--", lw=1.2, label="dense, mean ± sd")
            ax.axhspan(m - sd, m + sd, color="0.5", alpha=0.12, lw=0)
            ax.legend(loc="lower right")
        ax.set_xlabel("experts per token (activated FLOPs relative to the dense model)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Activated experts at width {base} (points: seeds)")
        fig.tight_layout()
        return fig

    # -- findings ---------------------------------------------------------------------------------------------------
    def findings(self, results: ChapterResults) -> str:
        """What the stored runs show, as Markdown bullets computed from them (no typed numbers)."""
        lines = []
        preset = self.preset_of(results)
        gains = []
        for w in self.widths(preset):
            a, b = results.paired(moe_name(w), dense_name(w))
            if a:
                gains.append(f"width {w} {100 * np.mean(np.subtract(a, b)):+.2f}")
        if gains:
            lines.append("**MoE minus dense** (points, mean over seeds): " + ", ".join(gains) + ".")
        slope = self.test_results(results).get("gain_shrinks_with_size")
        if slope is not None:
            lines.append(f"**Slope** of the gain against log2(parameters): {-slope.effect:+.2f} points per doubling "
                         f"(90% interval [{-slope.upper:+.2f}, {-slope.lower:+.2f}]).")
        ks = [f"k = {k} {100 * np.mean(results.values(n)):.2f} %" for k, n in self.k_runs(preset).items()
              if results.values(n)]
        if ks:
            lines.append(f"**Experts per token** at width {self.base_width(preset)}, test accuracy: " + ", ".join(ks)
                         + ".")
        dense = dense_name(self.base_width(preset))
        per_flop = []
        for k, name in self.k_runs(preset).items():
            a, b = results.paired(name, dense)
            ratio = flops_ratio(results, name, dense)
            if a and ratio:
                per_flop.append(f"k = {k} {100 * np.mean(np.subtract(a, b)) / ratio:+.2f} ({ratio:.2f}x the FLOPs)")
        if per_flop:
            lines.append("**Gain over dense per unit of activated FLOPs** (points per dense model's FLOPs): "
                         + ", ".join(per_flop) + ".")
        best = max(((np.mean(results.values(n)), n) for n in results.by_name() if results.values(n)), default=None)
        if best is not None:
            lines.append(f"**Most accurate model**: {best[1]} ({100 * best[0]:.2f} %).")
        return "\n".join(f"* {line}" for line in lines)


chapter = ModelScale()
