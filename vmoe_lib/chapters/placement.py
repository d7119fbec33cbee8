"""Chapter 2 — where to put the MoE layers, in a ViT and in a ConvNeXt.

Claims of Videau et al., *Mixture of Experts in Image Classification: What's the Sweet Spot?*
(TMLR 2025, arXiv:2411.18322), with V-MoE's placement names (Riquelme et al., arXiv:2106.05974):

* (a) **Last-2 is the most robust placement across architectures**: in the ViT and in the
  ConvNeXt, Last-2 is not meaningfully worse than any other placement of that architecture;
* (b) **Every-2 is slightly better than Last-2 for ViT**: tested twice, as a superiority claim
  (Every-2 above Last-2) and as equivalence at a small margin ("slightly");
* (c) **both placements remain effective as the model grows**: MoE (Last-2 and Every-2) beats the
  dense model of equal activated FLOPs at two ViT sizes.

**Placements** (:data:`PLACEMENTS`), all at the test bed's MoE settings (:data:`~.recipes.TEST_BED_MOE`:
softmax token choice, ``k = 1``, 8 experts), in V-MoE's meaning for both architectures
(:mod:`vmoe_lib.models.placement`; a ConvNeXt's blocks are numbered across its stages):
First-2 (the first two odd blocks), Last-1 and Last-2 (the last one or two odd blocks), Every-2
(every odd block) and All (every block). Last-n thus means the last ``n`` of Every-2's blocks, as in
V-MoE (depth 12, Last-2 = blocks 9 and 11), so Last-2 is always a subset of Every-2.

**Models.** The ViT is the test bed's ViT-pico (width 64, patch 7) at depth 6, the least depth at
which Every-2 and Last-2 differ (at depth 4 both are blocks 1 and 3); the ConvNeXt is the test bed's
ConvNeXt-zepto (blocks 2-2-4-2). Claim (c)'s smaller size is chapter 0's depth-4 ViT-pico, whose
Last-2 (= Every-2) and dense runs are read from chapter 0's records (the same recipe and seeds),
as is the dense ConvNeXt-zepto.

Each MoE run's record carries per-layer routing statistics on the test set (:class:`~.probes.RoutingStatsProbe`:
expert load, dropped tokens, gate entropy) and its positive control (accuracy with every MoE layer
bypassed), so the chapter renders without weights or data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.patches import Rectangle

from ..analysis import load_cv, mean_sd_text, routing_of, summary_table
from ..models.placement import resolve_moe_layers
from ..plots import _color, plain_log_axis, strip_with_means, style
from ..stats import Claim, VerdictRecord
from ..train import TrainConfig
from ..papers import PaperNumber
from .base import Chapter, ChapterResults, Preset, Run, SeedPaired, control_claim, routing_at
from .probes import RoutingStatsProbe
from .recipes import SMOKE_DATA, SWEET_SPOT_GAIN, TEST_BED_MOE, preset_recipe

__all__ = ["NAME", "PRESETS", "PLACEMENTS", "ARCHITECTURES", "Placement", "chapter"]

NAME = "placement"

# Run tag -> placement strategy (vmoe_lib.models.placement), in the order the chapter shows them.
PLACEMENTS: dict[str, str] = {"first2": "first-2", "last1": "last-1", "last2": "last-2", "every2": "every-2", "all": "all"}
LABELS: dict[str, str] = {"first2": "First-2", "last1": "Last-1", "last2": "Last-2", "every2": "Every-2", "all": "All",
                          "dense": "dense"}
ARCHITECTURES = ("vit", "convnext")
ARCH_LABELS = {"vit": "ViT", "convnext": "ConvNeXt"}
SMALL = "vit_small"  # claim (c)'s smaller ViT: runs "vit_small_dense" and "vit_small_last2"

# Costlier placements first: with two workers the sweep's tail is then a short run.
_COST_ORDER = ("all", "every2", "first2", "last2", "last1")

PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke",
        description="every code path: ViT-pico depth 6 and ConvNeXt-zepto, 5 placements + dense each, "
                    "2,048 Fashion-MNIST images, 1 epoch, 2 seeds (CI)",
        hardware="CPU, 2 cores",
        expected_minutes=2.0,
        seeds=(0, 1),
        settings={"vit": ("vit_pico_patch7_28", {"depth": 6}), "convnext": ("convnext_zepto_32", {}),
                  "small": ("vit_pico_patch7_28", {}), "epochs": 1, "seeds_by_arch": {},
                  "probe_images": 1000, **SMOKE_DATA},
    ),
    "cpu": Preset(
        name="cpu",
        description="Fashion-MNIST 28x28 (55k train images), 3 epochs: ViT-pico at depth 6 (5 placements + dense, "
                    "4 seeds) and ConvNeXt-zepto (5 placements, 3 seeds; its dense runs and the depth-4 ViT-pico's "
                    "are chapter 0's records)",
        hardware="CPU, 2 cores, 2 workers x 1 thread, pinned numerics (measured: 91 min for the 39 runs it trains; "
                 "estimated 85 before the sweep)",
        expected_minutes=91.0,
        seeds=(0, 1, 2, 3),
        settings={"vit": ("vit_pico_patch7_28", {"depth": 6}), "convnext": ("convnext_zepto_32", {}),
                  "small": ("vit_pico_patch7_28", {}), "epochs": 3, "seeds_by_arch": {"convnext": (0, 1, 2), SMALL: (0, 1, 2, 3, 4, 5)},
                  "probe_images": None},
    ),
    "gpu": Preset(
        name="gpu",
        description="CIFAR-100 32x32, 60 epochs, 3 seeds: ViT-tiny/4 (d192, depth 8) and ConvNeXt-atto, 5 placements "
                    "+ dense each; ViT-nano/4 (depth 6) dense and Last-2 as the smaller size (needs CIFAR-100: see "
                    "the data section)",
        hardware="1 GPU (estimated, not yet measured), bf16 autocast",
        expected_minutes=300.0,
        seeds=(0, 1, 2),
        settings={"vit": ("vit_tiny_patch4_32", {}), "convnext": ("convnext_atto_32", {}),
                  "small": ("vit_nano_patch4_32", {}), "dataset": "cifar100", "epochs": 60, "seeds_by_arch": {},
                  "probe_images": None},
    ),
}


# ----------------------------------------------------------------------------------- claims
ROBUST_FAMILY = f"{NAME}:a_last2_robust"
EVERY2_FAMILY = f"{NAME}:b_every2_vit"
SIZE_FAMILY = f"{NAME}:c_size"
CONTROL_FAMILY = f"{NAME}:controls"
MARGIN = 0.5
SLIGHT = 0.3
GAIN_MIN_EFFECT = 0.5
CONTROL_MIN_EFFECT = 1.0
# The sweet-spot study's placement table (Tab. 3, 8 experts, ImageNet-1k): Last-2 minus the other placement.
_TAB3_MODEL = {"vit": "ViT-S", "convnext": "ConvNeXt-T"}
_TAB3 = {
    ("vit", "every2"): PaperNumber("sweet_spot", -0.2, "Tab. 3, ViT-S, ImageNet-1k: Last-2 80.5, Every-2 80.7"),
    ("convnext", "every2"): PaperNumber("sweet_spot", 0.3, "Tab. 3, ConvNeXt-T, ImageNet-1k: Last-2 82.1, Every-2 81.8"),
}
_EVERY2_OVER_LAST2 = PaperNumber("sweet_spot", 0.2, "Tab. 3, ViT-S, ImageNet-1k: Every-2 80.7, Last-2 80.5")
_SWEET = "Sweet-spot study (Videau et al., arXiv:2411.18322), placement study"
_MARGIN_WHY = ("the book's smallest effect of interest for a design choice: the low end of the 0.3-1 point effects the "
               "papers report at our model sizes; a placement 0.5 point worse than the best is 'meaningfully worse'")


# ----------------------------------------------------------------------------------- the sweep
def _arch_of(run_name: str) -> str:
    """The key of a run's seeds in a preset's ``seeds_by_arch``: ``convnext``, ``vit`` or :data:`SMALL`."""
    if run_name.startswith(SMALL):
        return SMALL
    return "convnext" if run_name.startswith("convnext") else "vit"


def _display_order() -> list[str]:
    names = [f"{arch}_{tag}" for arch in ARCHITECTURES for tag in (*PLACEMENTS, "dense")]
    return names + [f"{SMALL}_last2", f"{SMALL}_dense"]


# ----------------------------------------------------------------------------------- placements
def _blocks(model: str, model_kwargs: Mapping[str, Any]) -> tuple[int, list[int] | None]:
    """(number of blocks, ConvNeXt stage depths or None) of a dense model name, without building it."""
    from ..models.dense import DENSE_CONVNEXT_SIZES, DENSE_VIT_SIZES

    if model in DENSE_VIT_SIZES:
        return int(model_kwargs.get("depth", DENSE_VIT_SIZES[model]["depth"])), None
    depths = list(model_kwargs.get("depths", DENSE_CONVNEXT_SIZES[model]["depths"]))
    return sum(depths), depths


# ----------------------------------------------------------------------------------- tables
def _epoch_minutes(r) -> float:
    h = r.history
    return float(np.mean([e["epoch_seconds"] for e in h])) / 60 if h else float("nan")


def _moe_blocks(config: TrainConfig) -> list[int]:
    kwargs = dict(config.model_kwargs or {})
    depth, _ = _blocks(config.model.removeprefix("vmoe_"), kwargs)
    return resolve_moe_layers(kwargs["moe_layers"], depth)




# ----------------------------------------------------------------------------------- figures
class Placement(Chapter):
    """Chapter 2: where to put the MoE layers, in a ViT and a ConvNeXt (see the module's docstring)."""

    name = NAME
    title = "Where to put the MoE layers"
    presets = PRESETS
    primary = ("last2_noninferior_vit_every2", "every2_beats_last2_vit", "last2_noninferior_convnext_every2")
    power_target = MARGIN

    def runs(self, preset: Preset) -> list[Run]:
        """Runs ``<arch>_<placement>`` for each architecture and placement, ``<arch>_dense`` (the dense model at equal
        activated FLOPs: ``k = 1`` with experts the size of the dense MLP), and claim (c)'s smaller ViT,
        ``vit_small_dense`` and ``vit_small_last2``; costlier runs first. The dense ConvNeXt and the smaller ViT's runs
        are chapter 0's where it has them (the same config and seeds): read from its results, never trained twice.
        Every run this chapter trains carries the routing-statistics probe (:meth:`probe`)."""
        s = preset.settings
        recipe = preset_recipe(s, ("vit", "convnext", "small", "seeds_by_arch", "probe_images"))
        probe = self.probe(preset)
        by_arch = s["seeds_by_arch"]

        def seeds(name: str) -> tuple[int, ...] | None:
            return tuple(by_arch[_arch_of(name)]) if _arch_of(name) in by_arch else None

        out: list[Run] = []
        for arch in ("convnext", "vit"):
            dense, kwargs = s[arch]
            for tag in _COST_ORDER:
                name = f"{arch}_{tag}"
                out.append(Run(name, recipe(f"vmoe_{dense}", {**kwargs, "moe_layers": PLACEMENTS[tag], **TEST_BED_MOE}),
                               seeds(name), probe=probe))
            name = f"{arch}_dense"
            if arch == "convnext":
                out.append(Run(name, recipe(dense, dict(kwargs)), seeds(name), borrow_from="dense_baselines"))
            else:
                out.append(Run(name, recipe(dense, dict(kwargs)), seeds(name), probe=probe))
        small, kwargs = s["small"]
        out.append(Run(f"{SMALL}_last2", recipe(f"vmoe_{small}", {**kwargs, "moe_layers": "last-2", **TEST_BED_MOE}),
                       seeds(f"{SMALL}_last2"), borrow_from="dense_baselines"))
        out.append(Run(f"{SMALL}_dense", recipe(small, dict(kwargs)), seeds(f"{SMALL}_dense"), borrow_from="dense_baselines"))
        return out

    def probe(self, preset: Preset) -> RoutingStatsProbe:
        """The routing-statistics probe: the routing at the trained inference setting (capacity factor 8 = E: nothing
        dropped) and at the training capacity factor 1.0, where the experts' capacity drops tokens as in training."""
        return RoutingStatsProbe(probe_images=preset.settings["probe_images"],
                                 capacity_factors=(float(TEST_BED_MOE["capacity_factor"]),))

    def display_order(self, names):
        """Placements in the chapter's order, each architecture's dense model after them, then the smaller ViT."""
        order = {name: i for i, name in enumerate(_display_order())}
        return sorted(names, key=lambda n: order.get(n, len(order)))

    def placement_layers(self, preset: str) -> dict[str, dict[str, Any]]:
        """Per architecture of the preset: its dense model, number of blocks, stage depths and each placement's
        MoE blocks (0-based, numbered across stages)."""
        s = self.preset(preset).settings
        out = {}
        for arch in ARCHITECTURES:
            model, kwargs = s[arch]
            depth, stages = _blocks(model, kwargs)
            out[arch] = {"model": model, "depth": depth, "stages": stages,
                         "layers": {tag: resolve_moe_layers(strategy, depth) for tag, strategy in PLACEMENTS.items()}}
        return out

    def plot_placements(self, preset: str = "cpu"):
        """Block diagram: which blocks are MoE (filled) in each placement, for each architecture."""
        style()
        info = self.placement_layers(preset)
        fig, axes = plt.subplots(len(info), 1, figsize=(7.2, 1.0 + 1.9 * len(info)))
        for ax, (arch, d) in zip(np.atleast_1d(axes), info.items()):
            depth = d["depth"]
            for row, (tag, layers) in enumerate(d["layers"].items()):
                y = len(d["layers"]) - 1 - row
                for b in range(depth):
                    moe = b in layers
                    ax.add_patch(Rectangle((b + 0.08, y + 0.12), 0.84, 0.76, facecolor=_color(0) if moe else "white",
                                           edgecolor="0.3", lw=1))
                    if moe:
                        ax.text(b + 0.5, y + 0.5, "MoE", ha="center", va="center", color="white", fontsize=10)
                ax.text(-0.2, y + 0.5, LABELS[tag], ha="right", va="center", fontsize=10)
            if d["stages"]:
                start = 0
                for i, n in enumerate(d["stages"]):
                    if i:
                        ax.axvline(start, color="0.5", ls="--", lw=1)
                    ax.text(start + n / 2, len(d["layers"]) + 0.15, f"stage {i}", ha="center", va="bottom", fontsize=10)
                    start += n
            ax.set_xlim(-2.2, depth + 0.1)
            ax.set_ylim(-0.1, len(d["layers"]) + 0.9)
            ax.grid(False)
            ax.set_xticks(np.arange(depth) + 0.5, [str(b) for b in range(depth)])
            ax.set_yticks([])
            for side in ("left", "right", "top"):
                ax.spines[side].set_visible(False)
            ax.set_xlabel(f"block (0-based) of {d['model']}, {depth} blocks")
            ax.set_title(f"{ARCH_LABELS[arch]}: MoE blocks per placement (filled)")
        fig.tight_layout()
        return fig

    def placement_table(self, results: ChapterResults) -> pd.DataFrame:
        """Per run: placement, MoE blocks, parameters (total, activated), FLOPs, minutes per epoch and test accuracy
        (mean ± std over seeds); its positive control is in :meth:`control_table`."""
        table = summary_table(results.results)
        rows = {}
        for name, runs in results.by_name().items():
            first, t = runs[0], table.loc[name]
            moe = (first.config.model_kwargs or {}).get("moe_layers")
            rows[name] = {
                "placement": LABELS.get(name.rsplit("_", 1)[-1], name),
                "MoE blocks": str(_moe_blocks(first.config)) if moe else "—",
                "params (k)": round(t["params_total"] / 1e3, 1),
                "activated params (k)": round(t["params_activated"] / 1e3, 1),
                "MFLOPs / image": round(t["flops_per_image"] / 1e6, 2),
                "min / epoch": round(float(np.mean([_epoch_minutes(r) for r in runs])), 2),
                "test acc. (%)": mean_sd_text([r.final["test_accuracy"] for r in runs]),
                "seeds": len(runs),
            }
        return pd.DataFrame.from_dict(rows, orient="index")

    def claims(self, preset: str) -> list[Claim]:
        """The chapter's claims, declared before any result is read.

        How claim (a), "Last-2 is the most robust placement across architectures", is decided (pre-registered):
        for each architecture and each other placement P, one non-inferiority claim "Last-2 is not worse than P by
        :data:`MARGIN` points or more" (paired by seed, Holm-corrected over the 8 in family :data:`ROBUST_FAMILY`).
        Claim (a) is reproduced when all 8 are, not reproduced when any is, inconclusive otherwise
        (:meth:`robustness_verdict`). Why this and not the best mean rank: a rank ignores how far apart placements
        are, and with a few seeds the ranks of placements within noise of each other are a coin toss; the margin
        says what "meaningfully worse" means in points, and each test says whether the data can tell.

        Claim (b) is two claims: Every-2 above Last-2 by at least :data:`SLIGHT` points ("slightly": the smallest
        effect of interest is the low end of the papers' effects), and Every-2 equivalent to Last-2 within
        :data:`MARGIN` (TOST). Claim (c) is one claim per (size, placement): MoE beats the dense ViT of equal
        activated FLOPs by at least :data:`GAIN_MIN_EFFECT`; at depth 4 Every-2 and Last-2 are the same model.

        Every claim depends on a positive control: bypassing the MoE layers of the Last-2 model (of the claim's
        architecture and size) costs at least :data:`CONTROL_MIN_EFFECT` point; without it, placements would
        agree only because the experts carry nothing. Each MoE run has its own control in the table.
        """
        self.preset(preset)
        out: list[Claim] = []
        runs = [f"{arch}_{tag}" for arch in ARCHITECTURES for tag in PLACEMENTS] + [f"{SMALL}_last2"]
        for run_name in runs:
            out.append(control_claim(
                run_name, family=CONTROL_FAMILY, min_effect=CONTROL_MIN_EFFECT,
                min_effect_why="placement effects are 0.3-1 point; experts that carry less than 1 point cannot show them"))
        for arch in ARCHITECTURES:
            for tag in PLACEMENTS:
                if tag == "last2":
                    continue
                out.append(Claim(
                    id=f"last2_noninferior_{arch}_{tag}",
                    claim=f"{ARCH_LABELS[arch]}: Last-2 is not worse than {LABELS[tag]} by {MARGIN:g} point or more",
                    source=_SWEET + ": 'Last-2 is the most robust placement across architectures'",
                    contrast=f"{arch}_last2 vs {arch}_{tag}", test="noninferiority", min_effect=MARGIN,
                    min_effect_why=_MARGIN_WHY, family=ROBUST_FAMILY, paired=True,
                    control=f"experts_carry_weight_{arch}_last2", measure=SeedPaired(f"{arch}_last2", f"{arch}_{tag}"),
                    paper=_TAB3.get((arch, tag)) or PaperNumber(
                        "sweet_spot", None, f"Tab. 3 has no {LABELS[tag]} row for {_TAB3_MODEL[arch]}"),
                ))
        out.append(Claim(
            id="every2_beats_last2_vit", claim=f"ViT: Every-2 is more accurate than Last-2 (by at least {SLIGHT:g} point)",
            source=_SWEET + ": 'Every-2 is slightly better for ViT'", contrast="vit_every2 vs vit_last2", test="paired_t",
            min_effect=SLIGHT, min_effect_why="'slightly better': the low end (0.3 point) of the papers' effects",
            family=EVERY2_FAMILY, paired=True, control="experts_carry_weight_vit_last2",
            measure=SeedPaired("vit_every2", "vit_last2"), paper=_EVERY2_OVER_LAST2,
        ))
        out.append(Claim(
            id="every2_equivalent_last2_vit", claim=f"ViT: Every-2 and Last-2 are equivalent within ±{MARGIN:g} point",
            source=_SWEET + ": 'slightly' better is also consistent with equivalence at a small margin",
            contrast="vit_every2 vs vit_last2", test="tost", min_effect=MARGIN, min_effect_why=_MARGIN_WHY,
            family=EVERY2_FAMILY, paired=True, control="experts_carry_weight_vit_last2",
            measure=SeedPaired("vit_every2", "vit_last2"), paper=_EVERY2_OVER_LAST2,
        ))
        sizes = [(f"{SMALL}_last2", f"{SMALL}_dense", "smaller ViT (chapter 0's depth 4), Last-2 = Every-2",
                  f"experts_carry_weight_{SMALL}_last2", "last-2"),
                 ("vit_last2", "vit_dense", "larger ViT (depth 6), Last-2", "experts_carry_weight_vit_last2", "last-2"),
                 ("vit_every2", "vit_dense", "larger ViT (depth 6), Every-2", "experts_carry_weight_vit_every2", "every-2")]
        small = dict(self.borrowed(preset))
        for moe, dense, what, control, placement in sizes:
            out.append(Claim(
                id=f"moe_effective_{moe}", claim=f"{what}: the MoE model beats the dense ViT of equal activated FLOPs",
                source=_SWEET + ": MoE helps tiny and small models; both placements remain effective as size grows",
                contrast=f"{moe} vs {dense}", test="paired_t", min_effect=GAIN_MIN_EFFECT,
                min_effect_why="the sweet-spot study's +0.5 to +1 point for tiny models; the low end",
                family=SIZE_FAMILY, paired=True, control=control, measure=SeedPaired(moe, dense),
            paper=SWEET_SPOT_GAIN[("vit", placement)],
            same_as=(f"dense_baselines:moe_vs_dense_{small[moe].removeprefix('moe_')}" if moe in small else None),
            ))
        return out

    def robustness_verdict(self, records: Sequence[VerdictRecord]) -> tuple[str, str]:
        """Claim (a)'s verdict from its 8 non-inferiority verdicts, by the pre-registered rule of :func:`claims`:
        reproduced if all are, not reproduced if any is not, inconclusive otherwise (not testable if any is)."""
        parts = {r.claim_id: r.verdict for r in records if r.family == ROBUST_FAMILY}
        if not parts:
            return "inconclusive", "no non-inferiority claim was decided"
        counts = {v: sum(1 for x in parts.values() if x == v) for v in set(parts.values())}
        summary = ", ".join(f"{n} {v}" for v, n in sorted(counts.items()))
        if "not reproduced" in counts:
            bad = [k.removeprefix("last2_noninferior_") for k, v in parts.items() if v == "not reproduced"]
            return "not reproduced", f"Last-2 is worse by more than {MARGIN:g} point than: {', '.join(bad)} ({summary})"
        if "not testable" in counts:
            return "not testable", f"a positive control failed ({summary})"
        if counts.get("reproduced", 0) == len(parts):
            return "reproduced", f"all {len(parts)} non-inferiority claims reproduced"
        return "inconclusive", f"of the {len(parts)} non-inferiority claims: {summary}"

    def plot_accuracy(self, results: ChapterResults):
        """Test accuracy per placement, one panel per architecture: seeds as points, mean ± std as a diamond, the
        dense model (equal activated FLOPs) as a band (mean ± std)."""
        style()
        groups = results.by_name()
        fig, axes = plt.subplots(len(ARCHITECTURES), 1, figsize=(7.2, 8.0))
        for ax, arch in zip(axes, ARCHITECTURES):
            dense = np.array(results.values(f"{arch}_dense")) * 100
            tags = [t for t in PLACEMENTS if f"{arch}_{t}" in groups]
            strip_with_means(ax, {LABELS[t]: np.array(results.values(f"{arch}_{t}")) * 100 for t in tags},
                             band=dense if dense.size else None,
                             band_label=f"dense, same activated FLOPs ({dense.mean():.2f}%, band ± 1 sd)" if dense.size else "")
            seeds = len(groups[f"{arch}_{tags[0]}"]) if tags else 0
            ax.set_title(f"{ARCH_LABELS[arch]} ({seeds} seeds; points: seeds, diamond: mean ± sd)")
        fig.tight_layout()
        return fig

    def plot_gain_vs_activated(self, results: ChapterResults):
        """Accuracy gain over the dense model (paired by seed, mean ± sd) against activated parameters per token,
        for every placement of both architectures and the smaller ViT."""
        style()
        table = summary_table(results.results)
        fig, ax = plt.subplots(figsize=(7.2, 5.4))
        markers = {"vit": "o", "convnext": "s", SMALL: "^"}
        series = [(arch, f"{arch}_dense", [f"{arch}_{t}" for t in PLACEMENTS]) for arch in ARCHITECTURES]
        series.append((SMALL, f"{SMALL}_dense", [f"{SMALL}_last2"]))
        for arch, dense, names in series:
            for name in names:
                a, b = results.paired(name, dense)
                if len(a) < 1 or name not in table.index:
                    continue
                gain = (np.array(a) - np.array(b)) * 100
                tag = name.rsplit("_", 1)[-1]
                color = _color(list(PLACEMENTS).index(tag))
                # Placements of one model activate (almost) the same parameters: spread them a little sideways.
                x = table.loc[name, "params_activated"] / 1e3 * 1.04 ** (list(PLACEMENTS).index(tag) - 2)
                ax.errorbar(x, gain.mean(), yerr=gain.std(ddof=1) if gain.size > 1 else None, fmt=markers[arch],
                            color=color, capsize=3, ms=7, mfc=color if arch != SMALL else "white")
        ax.axhline(0, color="0.4", lw=1, ls="--")
        ax.set_xscale("log")
        plain_log_axis(ax.xaxis)
        ax.set_xlabel("activated parameters per token (thousands, log scale)")
        ax.set_ylabel("gain over dense (points)")
        ax.set_title("MoE gain over the dense model of equal activated FLOPs (paired by seed)")
        from matplotlib.lines import Line2D
        handles = [Line2D([], [], color=_color(i), marker="o", ls="", label=LABELS[t]) for i, t in enumerate(PLACEMENTS)]
        handles += [Line2D([], [], color="0.3", marker=m, ls="", mfc="white" if k == SMALL else "0.3",
                           label={"vit": "ViT depth 6", "convnext": "ConvNeXt", SMALL: "ViT depth 4"}[k] if self.preset_of(results) != "gpu"
                           else {"vit": "ViT (larger)", "convnext": "ConvNeXt", SMALL: "ViT (smaller)"}[k])
                    for k, m in markers.items()]
        ax.legend(handles=handles, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.17))
        fig.tight_layout()
        return fig

    def plot_routing(self, results: ChapterResults):
        """Per architecture, placement and MoE block (mean over seeds, test set): tokens dropped at the training
        capacity factor, the experts' load imbalance (CV) and the gate entropy."""
        style()
        groups = results.by_name()
        cf = float(TEST_BED_MOE["capacity_factor"])
        panels = [("dropped", f"tokens dropped at capacity factor {cf:g} (%)"),
                  ("cv", "expert load CV (0 = balanced)"), ("entropy", "gate entropy (nats)")]
        fig, axes = plt.subplots(len(panels), len(ARCHITECTURES), figsize=(7.2, 9.6), squeeze=False)
        for col, arch in enumerate(ARCHITECTURES):
            for i, tag in enumerate(PLACEMENTS):
                runs = groups.get(f"{arch}_{tag}", [])
                if not runs or not routing_of(runs[0]):
                    continue
                names = list(routing_of(runs[0]))
                blocks = [routing_of(runs[0])[n]["layer"] for n in names]
                values = {
                    "dropped": [np.mean([routing_at(r, float(TEST_BED_MOE["capacity_factor"])).get(n, {}).get("dropped_fraction", np.nan) for r in runs]) * 100
                                for n in names],
                    "cv": [np.mean([load_cv(routing_of(r)[n]["expert_load"]) for r in runs]) for n in names],
                    "entropy": [np.mean([routing_of(r)[n].get("gate_entropy", np.nan) for r in runs]) for n in names],
                }
                for row, (key, _) in enumerate(panels):
                    axes[row, col].plot(blocks, values[key], marker="o", ms=5, color=_color(i), label=LABELS[tag])
            E = TEST_BED_MOE["num_experts"]
            axes[2, col].axhline(np.log(E), color="0.5", ls="--", lw=1)
            for row, (_, title) in enumerate(panels):
                axes[row, col].set_title(f"{ARCH_LABELS[arch]}:\n{title}", fontsize=10)
                axes[row, col].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
            axes[-1, col].set_xlabel("block")
        axes[0, 0].set_ylabel("dropped (%)")
        axes[1, 0].set_ylabel("CV of expert loads")
        axes[2, 0].set_ylabel(f"nats (dashed: log {TEST_BED_MOE['num_experts']})")
        handles, labels = axes[0, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=5, bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout(rect=(0, 0, 1, 0.965))
        return fig

    # -- findings ------------------------------------------------------------
    def findings(self, results: ChapterResults, records: Sequence[VerdictRecord] | None = None) -> str:
        """What the stored runs show, as Markdown bullets computed from them (no typed numbers)."""
        groups = results.by_name()
        lines: list[str] = []
        for arch in ARCHITECTURES:
            tags = [t for t in PLACEMENTS if f"{arch}_{t}" in groups]
            if not tags:
                continue
            ranked = sorted(tags, key=lambda t: -np.mean(results.values(f"{arch}_{t}")))
            text = " > ".join(f"{LABELS[t]} ({mean_sd_text(results.values(f'{arch}_{t}'))})" for t in ranked)
            dense = results.values(f"{arch}_dense")
            tail = f"; dense {mean_sd_text(dense)}" if dense else ""
            lines.append(f"**{ARCH_LABELS[arch]}**, test accuracy % (mean ± sd over seeds): {text}{tail}.")
            best, last2 = ranked[0], "last2"
            if last2 in tags and best != last2:
                a, b = results.paired(f"{arch}_{last2}", f"{arch}_{best}")
                if a:
                    lines.append(f"{ARCH_LABELS[arch]}: Last-2 minus the best placement ({LABELS[best]}) = "
                                 f"{(np.mean(a) - np.mean(b)) * 100:+.2f} points (paired by seed).")
        if f"{SMALL}_last2" in groups and f"{SMALL}_dense" in groups:
            a, b = results.paired(f"{SMALL}_last2", f"{SMALL}_dense")
            lines.append(f"**Smaller ViT** (chapter 0's depth 4): Last-2 {mean_sd_text(a)} vs dense {mean_sd_text(b)}.")
        controls = self.control_table(results)
        if not controls.empty:
            cost = controls["cost of bypassing (points)"]
            carry = ", ".join(f"{n} {v:.2f}" for n, v in cost.items())
            lines.append(f"**Weight the experts carry** (test accuracy lost when every MoE layer is bypassed, points): {carry}. "
                         f"Placements with more MoE blocks carry more; the control asks for at least {CONTROL_MIN_EFFECT:g}.")
            weak = [n for n in (f"{a}_last2" for a in ARCHITECTURES) if n in cost.index and cost[n] < CONTROL_MIN_EFFECT]
            if weak:
                lines.append(f"Bypassing the Last-2 models' MoE layers costs less than {CONTROL_MIN_EFFECT:g} point in "
                             f"{', '.join(weak)}: the claims that compare Last-2 with other placements depend on that "
                             f"control, so the verdicts decide them only where it holds (see the verdict table).")
        last = {}
        for arch in ARCHITECTURES:
            for tag in PLACEMENTS:
                for r in groups.get(f"{arch}_{tag}", []):
                    for layer in routing_of(r).values():
                        last.setdefault((arch, layer["layer"]), []).append(layer.get("gate_entropy", np.nan))
        if ("convnext", 9) in last:
            final = np.nanmean(last[("convnext", 9)])
            others = np.nanmean([np.nanmean(v) for (a, b), v in last.items() if a == "convnext" and b < 8])
            E = TEST_BED_MOE["num_experts"]
            lines.append(f"**ConvNeXt's last block** (one position per image): its router's gate entropy is {final:.2f} nats "
                         f"(log {E} = {np.log(E):.2f}: uniform), against {others:.2f} in stages 0-2: there the router tells "
                         f"the experts almost nothing apart.")
        if records is not None:
            verdict, why = self.robustness_verdict(records)
            lines.append(f"**Claim (a), Last-2 the most robust placement:** {verdict} ({why}).")
        return "\n".join(f"* {line}" for line in lines)


chapter = Placement()
